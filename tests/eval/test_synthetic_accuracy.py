"""Answer-position accuracy of the synthetic tasks: the restricted argmax, whole-sequence accuracy,
the paper's scaled accuracy, MQAR per number of key-value pairs and with Zoology's spread queries,
evaluation at longer lengths than training."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from xlstm_train.config import ConfigError
from xlstm_train.data.config import DataConfig
from xlstm_train.data.synthetic import (
    FIRST_SYMBOL, IGNORE_INDEX, PAD, SEP, VAL_SPLIT, SyntheticBatches, make_task, scaled_accuracy, score_answers,
)
from xlstm_train.eval.synthetic import evaluate_synthetic


def test_score_answers_against_a_loop():
    gen = torch.Generator().manual_seed(0)
    B, S, V, first, count = 6, 12, 20, 5, 4
    logits = torch.randn(B, S, V, generator=gen)
    logits[..., 0] = 100.0  # the overall argmax is never a possible answer: it must not count
    labels = torch.full((B, S), IGNORE_INDEX)
    for b in range(B - 1):  # the last row has no answer
        for p in torch.randperm(S, generator=gen)[: 1 + b % 3].tolist():
            labels[b, p] = first + int(torch.randint(0, count, (1,), generator=gen))
    labels[0, 3], labels[0, 7] = first + int(logits[0, 3, first:first + count].argmax()), IGNORE_INDEX
    got = score_answers(logits, labels, (first, count))
    right = total = whole = rows = 0
    for b in range(B):
        marks = [int(logits[b, p, first:first + count].argmax()) + first == int(labels[b, p])
                 for p in range(S) if labels[b, p] != IGNORE_INDEX]
        right, total = right + sum(marks), total + len(marks)
        whole, rows = whole + (bool(marks) and all(marks)), rows + bool(marks)
    assert (got.correct_tokens, got.tokens, got.correct_sequences, got.sequences) == (right, total, whole, rows)
    assert got.correct_tokens >= 1 and rows == B - 1


def test_scaled_accuracy_puts_chance_at_zero():
    assert scaled_accuracy(0.5, 2) == 0.0
    assert scaled_accuracy(1.0, 5) == 1.0
    assert scaled_accuracy(0.6, 5) == pytest.approx(0.5)
    assert scaled_accuracy(0.1, 5) == pytest.approx(-0.125)


class ConstantLogits(torch.nn.Module):
    """Equal logits everywhere: the restricted argmax is always the first possible answer."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **_):
        self.lengths = getattr(self, "lengths", []) + [input_ids.shape[1]]
        return torch.zeros(*input_ids.shape, self.vocab) + self.anchor


@pytest.mark.parametrize("task", ["parity", "majority", "bucket_sort", "missing_duplicate"])
def test_accuracy_on_longer_validation_lengths(task):
    cfg = DataConfig(source="synthetic", task=task, seq_len=48, seed=5,
                     task_options={"min_len": 3, "max_len": 20, "val_min_len": 40, "val_max_len": 60})
    t = make_task(cfg)
    model = ConstantLogits(t.vocab_size())
    result = evaluate_synthetic(model, cfg, num_samples=50, batch_size=16)[task]
    first, count = t.answer_choices()
    batches = SyntheticBatches(t, t.longest() - 1, cfg.seed, VAL_SPLIT)
    labels = batches.batch(np.arange(50))["labels"]
    answers = labels[labels != IGNORE_INDEX]
    assert result["accuracy"] == pytest.approx(float((answers == first).float().mean()))
    assert result["scaled_accuracy"] == pytest.approx(scaled_accuracy(result["accuracy"], count))
    assert (result["min_len"], result["max_len"]) == (40, 60)
    assert max(model.lengths) >= 40 > cfg.task_options["max_len"]  # longer than anything trained on
    with pytest.raises(ConfigError, match="max_seq_len = 32"):
        evaluate_synthetic(model, cfg, num_samples=4, max_len=32)


def test_mqar_is_scored_per_number_of_kv_pairs():
    cfg = DataConfig(source="synthetic", task="mqar", seq_len=64, seed=1, task_options={"num_kv_pairs": 4})
    results = evaluate_synthetic(ConstantLogits(make_task(cfg).vocab_size()), cfg, num_samples=20, kv_pairs=[2, 8])
    assert sorted(results) == ["mqar_kv2", "mqar_kv8"]
    assert results["mqar_kv2"]["answers"] == 20 * 2 and results["mqar_kv8"]["answers"] == 20 * 8
    with pytest.raises(ConfigError, match="MQAR only"):
        evaluate_synthetic(ConstantLogits(10), DataConfig(source="synthetic", task="parity"), kv_pairs=[2])


def test_mqar_queries_spread_over_the_context_length():
    options = {"num_kv_pairs": 6, "num_queries": 4, "context_length": 64}
    cfg = DataConfig(source="synthetic", task="mqar", seq_len=63, seed=2, task_options=options)
    t = make_task(cfg)
    batches = SyntheticBatches(t, 63, 2, VAL_SPLIT)
    spread_seen = False
    for k in range(20):
        tokens, positions = batches.sample(k)
        assert len(tokens) <= 64 and len(positions) == 4
        pairs = dict(zip(tokens[0:12:2], tokens[1:12:2]))
        assert tokens[12] == SEP
        for p in positions:  # each scored value follows its query key and is that key's value
            assert tokens[p - 1] in pairs and tokens[p] == pairs[tokens[p - 1]]
        filler = [x for i, x in enumerate(tokens[13:], 13) if i not in positions and i + 1 not in positions]
        assert set(filler) <= {PAD}
        spread_seen |= positions != [14, 16, 18, 20]
    assert spread_seen
    assert t.answer_choices() == (FIRST_SYMBOL + 64, 64)
    from xlstm_train.data import DataError

    with pytest.raises(DataError, match="context_length = 20"):
        make_task(DataConfig(source="synthetic", task="mqar", task_options={**options, "context_length": 20}))


RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes" / "synthetic").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_each_synthetic_recipe_loads_for_the_four_architectures(recipe):
    """Every recipe with the overrides its header documents (xLSTM[1:1], [1:0], [0:1], Llama) is a
    valid run whose validation sequences fit the model, at lengths beyond training's."""
    from xlstm_train.models import build_model
    from xlstm_train.train.config import load_config

    llama = re.search(r"Llama: '(model=\{.*\})'", recipe.read_text())
    assert llama, f"{recipe.name}: no Llama override in its header"
    variants = [([], [1]), (["model.slstm_at=[]"], []), (["model.slstm_at=[0,1]"], [0, 1]), ([llama.group(1)], None)]
    for overrides, slstm_at in variants:
        cfg = load_config(recipe, overrides)
        assert cfg.data.source == "synthetic" and cfg.data.task == recipe.stem
        task = make_task(cfg.data)
        assert task.longest() - 1 <= cfg.data.seq_len, overrides
        if slstm_at is None:
            assert cfg.model.arch == "llama" and task.longest() - 1 <= cfg.model.max_seq_len
        else:
            assert cfg.model.arch == "xlstm_blocks" and cfg.model.slstm_at == slstm_at and cfg.model.num_blocks == 2
        with torch.device("meta"):
            build_model(cfg.model)
        if recipe.stem != "mqar":  # the formal languages extrapolate: validation starts where training ends
            assert task.val_min_len >= task.options["max_len"] > task.options["min_len"]
