import math

import pytest
import torch
from torch import nn

from xlstm_train.config import ConfigError, from_dict
from xlstm_train.train.config import OptimConfig
from xlstm_train.train.optim import build_optimizer, build_scheduler, lr_multiplier, param_groups


def optim_cfg(**kw) -> OptimConfig:
    return from_dict(OptimConfig, kw, prefix="optim")


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_warmup_is_linear_and_reaches_peak(schedule):
    cfg = optim_cfg(schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    values = [lr_multiplier(s, cfg, 100) for s in range(10)]
    assert values[0] == pytest.approx(0.1)
    assert values[-1] == pytest.approx(1.0)
    assert all(b - a == pytest.approx(0.1) for a, b in zip(values, values[1:]))


def test_cosine_peak_midpoint_and_floor():
    cfg = optim_cfg(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier(10, cfg, 110) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg, 110) == pytest.approx(0.55)  # halfway: (1 + 0.1) / 2
    assert lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert lr_multiplier(500, cfg, 110) == pytest.approx(0.1)  # past the end it stays at the floor
    decay = [lr_multiplier(s, cfg, 110) for s in range(10, 111)]
    assert all(b < a for a, b in zip(decay, decay[1:]))


def test_wsd_holds_then_decays_linearly():
    cfg = optim_cfg(schedule="wsd", warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(10, cfg, 100) == 1.0
    assert lr_multiplier(80, cfg, 100) == 1.0  # the decay starts at 100 - 20
    assert lr_multiplier(90, cfg, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg, 100) == pytest.approx(0.0)


def test_scheduler_drives_optimizer_lr():
    model = nn.Linear(3, 3)
    cfg = optim_cfg(lr=2e-3, schedule="cosine", warmup_steps=4, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, 20)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(2e-3 / 4)
    assert seen[3] == pytest.approx(2e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-4)


class TinyLM(nn.Module):
    def __init__(self, tie: bool):
        super().__init__()
        self.embedding = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.skip = nn.Parameter(torch.ones(8))
        self.conv = nn.Conv1d(8, 8, 3, groups=8)
        self.head = nn.Linear(8, 11, bias=False)
        if tie:
            self.head.weight = self.embedding.weight


@pytest.mark.parametrize("tie", [False, True])
def test_weight_decay_groups(tie):
    model = TinyLM(tie)
    groups = param_groups(model, optim_cfg(weight_decay=0.1))
    decayed = {id(p) for p in groups[0]["params"]}
    undecayed = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed.isdisjoint(undecayed)
    assert decayed | undecayed == {id(p) for p in model.parameters()}
    expect_decayed = {id(model.proj.weight), id(model.conv.weight)}
    if not tie:
        expect_decayed.add(id(model.head.weight))
    assert decayed == expect_decayed
    assert id(model.embedding.weight) in undecayed and id(model.norm.weight) in undecayed
    assert id(model.proj.bias) in undecayed and id(model.skip) in undecayed


def test_slstm_recurrent_kernel_is_not_decayed():
    from xlstm_train.models import build_model, xLSTMBlocksConfig

    cfg = xLSTMBlocksConfig(vocab_size=32, embedding_dim=32, num_blocks=2, slstm_at=[1])
    model = build_model(cfg)
    decayed = {id(p) for p in param_groups(model, optim_cfg(weight_decay=0.1))[0]["params"]}
    named = dict(model.named_parameters())
    recurrent = [n for n in named if n.endswith("_recurrent_kernel_")]
    assert recurrent and all(id(named[n]) not in decayed for n in recurrent)
    assert id(named["xlstm_block_stack.blocks.0.xlstm.proj_up.weight"]) in decayed


def test_weight_decay_flags_move_parameters():
    model = TinyLM(tie=False)
    groups = param_groups(model, optim_cfg(decay_embeddings=True, decay_norms_and_biases=True))
    assert len(groups) == 1 and len(groups[0]["params"]) == len(list(model.parameters()))
    groups = param_groups(model, optim_cfg(decay_embeddings=True))
    assert id(model.embedding.weight) in {id(p) for p in groups[0]["params"]}


def test_undecayed_parameters_are_not_shrunk():
    # with zero gradients AdamW moves a parameter only through weight decay
    model = TinyLM(tie=False)
    opt = build_optimizer(model, optim_cfg(lr=0.1, weight_decay=0.5))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(model.embedding.weight, before["embedding.weight"])
    assert torch.equal(model.norm.weight, before["norm.weight"])
    assert torch.allclose(model.proj.weight, before["proj.weight"] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("key, value", [("lr", 0.0), ("warmup_steps", -1), ("min_lr_ratio", 1.5),
                                        ("betas", [0.9]), ("clip_grad_norm", -1.0)])
def test_bad_optim_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"optim\.{key} = "):
        optim_cfg(**{key: value})


def test_nan_free_schedule_with_zero_warmup():
    cfg = optim_cfg(warmup_steps=0)
    assert all(math.isfinite(lr_multiplier(s, cfg, 5)) for s in range(7))
    assert lr_multiplier(0, cfg, 5) == 1.0
