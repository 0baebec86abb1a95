"""lm-evaluation-harness through our model class, on tasks defined by YAML + jsonl files in
tests/eval/tasks (no network), checked against scores computed here from plain forward passes."""

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from xlstm_train.config import ConfigError  # noqa: E402
from xlstm_train.eval.harness import XLSTMTrainLM, run_harness_tasks  # noqa: E402
from xlstm_train.eval.loading import load_for_inference  # noqa: E402

TASKS = Path(__file__).parent / "tasks"


def _logprob(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor(context + continuation)
    with torch.no_grad():
        logprobs = F.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)[len(context) - 1:]
    target = torch.tensor(continuation)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def _expected_choice_scores(model, tok, eos):
    acc, acc_norm = [], []
    for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines():
        doc = json.loads(line)
        context = tok.encode(doc["question"]) if doc["question"] else [eos]
        scores = []
        for choice in doc["choices"]:
            whole = tok.encode(doc["question"] + choice) if doc["question"] else context + tok.encode(choice)
            scores.append(_logprob(model, context, whole[len(context):])[0])
        acc.append(max(range(len(scores)), key=scores.__getitem__) == doc["answer"])
        normed = [s / len(c) for s, c in zip(scores, doc["choices"])]
        acc_norm.append(max(range(len(normed)), key=normed.__getitem__) == doc["answer"])
    return sum(acc) / len(acc), sum(acc_norm) / len(acc_norm)


def _expected_rolling_scores(model, tok, eos):
    loglik, words, nbytes = 0.0, 0, 0
    for line in (TASKS / "tiny_rolling.jsonl").read_text().splitlines():
        text = json.loads(line)["text"]
        ids = tok.encode(text)
        loglik += _logprob(model, [eos], ids)[0]
        words += len(re.split(r"\s+", text))
        nbytes += len(text.encode("utf-8"))
    return math.exp(-loglik / words), -loglik / nbytes / math.log(2)


@pytest.mark.parametrize("arch", ["xlstm_large", "llama"])
def test_harness_scores_equal_hand_computed_ones(checkpoints, arch, monkeypatch):
    loaded = load_for_inference(checkpoints[arch], device="cpu")
    monkeypatch.chdir(TASKS)  # the task YAMLs name their jsonl files relative to their folder
    results = run_harness_tasks(loaded, ["xlstm_train_tiny_choice", "xlstm_train_tiny_rolling"],
                                include_path=TASKS, include_defaults=False, batch_size=3)
    acc, acc_norm = _expected_choice_scores(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_id)
    assert results["xlstm_train_tiny_choice"]["acc"] == pytest.approx(acc)
    assert results["xlstm_train_tiny_choice"]["acc_norm"] == pytest.approx(acc_norm)
    word_ppl, bpb = _expected_rolling_scores(loaded.model, loaded.tokenizer, loaded.tokenizer.eos_id)
    assert results["xlstm_train_tiny_rolling"]["word_perplexity"] == pytest.approx(word_ppl, rel=1e-4)
    assert results["xlstm_train_tiny_rolling"]["bits_per_byte"] == pytest.approx(bpb, rel=1e-4)


def test_loglikelihood_and_greedy_generation_requests(checkpoints):
    loaded = load_for_inference(checkpoints["xlstm_blocks"], device="cpu")
    lm = XLSTMTrainLM(loaded, batch_size=2)
    tok, model = loaded.tokenizer, loaded.model
    pairs = [("Elizabeth was", " happy"), ("She said", " nothing at all"), ("", "Emma")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, 0) for pair in pairs])
    for (context, continuation), (score, greedy) in zip(pairs, got):
        ctx = tok.encode(context) if context else [tok.eos_id]
        whole = tok.encode(context + continuation) if context else ctx + tok.encode(continuation)
        want_score, want_greedy = _logprob(model, ctx, whole[len(ctx):])
        assert score == pytest.approx(want_score, rel=1e-5) and greedy == want_greedy
    # the greedy continuation is greedy, with probability above every other single token path
    (context, _), = pairs[:1]
    ids = tok.encode(context)
    greedy_ids = []
    with torch.no_grad():
        for _ in range(6):
            greedy_ids.append(int(model(torch.tensor([ids + greedy_ids]))[0, -1].argmax()))
    text = lm.generate_until([Instance("generate_until", {}, (context, {"until": ["\u2603"], "max_gen_toks": 6}), 0)])[0]
    assert text == tok.decode(greedy_ids)
    assert lm.loglikelihood_tokens([(ids, greedy_ids)])[0][1] is True
    stop = tok.decode(greedy_ids)[3:5]
    cut = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 6}), 0)])[0]
    assert cut == tok.decode(greedy_ids)[: tok.decode(greedy_ids).index(stop)]


def test_unknown_task_names_are_refused_with_suggestions(checkpoints):
    loaded = load_for_inference(checkpoints["xlstm_large"], device="cpu")
    with pytest.raises(ConfigError, match="unknown lm-evaluation-harness task 'xlstm_train_tiny_chioce'.*tiny_choice"):
        run_harness_tasks(loaded, ["xlstm_train_tiny_chioce"], include_path=TASKS, include_defaults=False)
