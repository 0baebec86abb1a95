"""Document scoring against a plain full-sequence forward: every token once, the first predicted from
EOS; long documents through the carried state (xLSTMs) or sliding windows (Llama); bits per byte."""

import math

import pytest
import torch
import torch.nn.functional as F

from tests.models.utils import VOCAB, perturb_, tiny_configs
from xlstm_train.data import DataError
from xlstm_train.eval.loading import load_for_inference
from xlstm_train.eval.perplexity import Document, TextScores, evaluate_documents, read_documents, score_token_sequences
from xlstm_train.models import build_model

EOS = 3


def _model(arch):
    torch.manual_seed(0)
    return perturb_(build_model(tiny_configs()[arch])).eval()


def _reference_nll(model, seq, context_for=None, eos=EOS):
    """Summed NLL of seq[i] for every i, each from the context ``context_for(i)`` (start index into
    [EOS] + seq) by its own forward pass, or from the whole prefix when not given."""
    inputs = torch.tensor([eos] + seq[:-1])
    if context_for is None:
        logprobs = F.log_softmax(model(inputs[None])[0].double(), dim=-1)
        return -float(logprobs[torch.arange(len(seq)), torch.tensor(seq)].sum())
    total = 0.0
    for i, target in enumerate(seq):
        logits = model(inputs[None, context_for(i):i + 1])[0, -1].double()
        total -= float(F.log_softmax(logits, dim=-1)[target])
    return total


@pytest.mark.parametrize("arch", ["xlstm_blocks", "xlstm_large"])
def test_recurrent_models_score_long_documents_through_their_state(arch):
    model = _model(arch)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (1, 7, 45, 20)]
    with torch.no_grad():
        got = score_token_sequences(model, docs, context_token=EOS, max_len=None, window=16, batch_tokens=40)
        want = [_reference_nll(model, d) for d in docs]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_llama_scores_long_documents_with_sliding_windows():
    model = _model("llama")  # max_seq_len 64
    gen = torch.Generator().manual_seed(2)
    long_doc, short_doc = (torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in (150, 30))
    window, stride = 48, 20
    with torch.no_grad():
        got = score_token_sequences(model, [short_doc, long_doc], context_token=EOS, max_len=64, window=window,
                                    stride=stride, batch_tokens=1000)
        # token i is scored by the first window [b, b + window) that holds it, b a multiple of stride
        first_window = lambda i: max(0, math.ceil((i - window + 1) / stride)) * stride  # noqa: E731
        want = [_reference_nll(model, short_doc), _reference_nll(model, long_doc, first_window)]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=1e-4)


def test_text_scores_metrics():
    scores = TextScores()
    scores.add(10 * math.log(2), Document([5] * 4, 6))
    scores.add(2 * math.log(2), Document([5] * 2, 6))
    m = scores.metrics()
    assert m["tokens"] == 6 and m["bytes"] == 12 and m["documents"] == 2
    assert m["bits_per_byte"] == pytest.approx(1.0)
    assert m["loss"] == pytest.approx(2 * math.log(2)) and m["perplexity"] == pytest.approx(4.0)


def test_documents_from_shards_and_raw_text_agree(checkpoints, tmp_path):
    """The bundled sample's first documents read from the shards give the same tokens and bytes as
    their text tokenized here, and the same metrics."""
    import json

    import zstandard

    from tests.eval.conftest import REPO

    loaded = load_for_inference(checkpoints["xlstm_large"], device="cpu")
    from_shards = read_documents(str(REPO / "data" / "sample"), loaded.tokenizer, max_documents=2)
    with zstandard.open(REPO / "data" / "austen" / "austen.jsonl.zst", "rt") as f:
        lines = [next(f) for _ in range(2)]
    raw = tmp_path / "two.jsonl"
    raw.write_text("".join(lines))
    from_text = read_documents(str(raw), loaded.tokenizer)
    assert [d.tokens for d in from_shards] == [d.tokens for d in from_text]
    assert [d.num_bytes for d in from_shards] == [len(json.loads(line)["text"].encode()) for line in lines]
    short = [Document(d.tokens[:40] + [loaded.tokenizer.eos_id], 100) for d in from_text]
    metrics = evaluate_documents(loaded, short, show_progress=False)
    assert metrics["tokens"] == 82 and metrics["documents"] == 2 and metrics["bytes"] == 200
    with torch.no_grad():
        nll = sum(_reference_nll(loaded.model, d.tokens, eos=loaded.tokenizer.eos_id) for d in short)
    assert metrics["loss"] == pytest.approx(nll / 82, rel=1e-5)
    assert metrics["bits_per_byte"] == pytest.approx(nll / (200 * math.log(2)), rel=1e-5)


def test_shards_of_another_tokenizer_are_refused(checkpoints, tmp_path):
    import json
    import shutil

    from tests.eval.conftest import REPO

    loaded = load_for_inference(checkpoints["llama"], device="cpu")
    copy = tmp_path / "sample"
    shutil.copytree(REPO / "data" / "sample", copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="not with the model's tokenizer"):
        read_documents(str(copy), loaded.tokenizer)
