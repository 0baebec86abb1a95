import random

import numpy as np
import pytest
import torch
from torch import nn

from xlstm_train.train import checkpoint as ckpt


def make(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def train_a_bit(model, opt, steps=3):
    for _ in range(steps):
        x = torch.randint(0, 10, (4, 5))
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_save_load_round_trip(tmp_path):
    model, opt = make(0)
    train_a_bit(model, opt)
    state = {"progress": {"step": 3}, "rng": ckpt.capture_rng_state()}
    saver = ckpt.Checkpointer(tmp_path, keep=2)
    path = saver.save(3, model, opt, state, {"model": {"x": 1}})
    assert path.name == "step-0000003" and ckpt.is_complete(path)
    assert ckpt.read_config(path) == {"model": {"x": 1}}

    model2, opt2 = make(1)
    train_a_bit(model2, opt2, steps=1)
    loaded = ckpt.Checkpointer.load(path, model2, opt2)
    assert loaded["progress"] == {"step": 3}
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in s1:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1[k][name], s2[k][name])
    # both continue identically
    torch.manual_seed(5)
    train_a_bit(model, opt, 2)
    torch.manual_seed(5)
    train_a_bit(model2, opt2, 2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_rng_state_round_trip(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = ckpt.capture_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_leftover_tmp_is_ignored_and_replaced(tmp_path):
    model, opt = make(0)
    saver = ckpt.Checkpointer(tmp_path, keep=3)
    saver.save(2, model, opt, {"progress": {}}, {})
    # a save of step 4 killed half-way: files but no rename
    broken = tmp_path / "step-0000004.tmp"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    # an incomplete directory without the suffix (no .metadata) is not trusted either
    (tmp_path / "step-0000003").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-0000002"
    path = saver.save(4, model, opt, {"progress": {}}, {})
    assert not broken.exists() and ckpt.is_complete(path)
    assert ckpt.latest_checkpoint(tmp_path) == path


def test_keep_prunes_oldest(tmp_path):
    model, opt = make(0)
    saver = ckpt.Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30, 40):
        saver.save(step, model, opt, {"progress": {}}, {})
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-0000030", "step-0000040"]


def test_async_save_commits_on_wait(tmp_path):
    model, opt = make(0)
    train_a_bit(model, opt)
    saver = ckpt.Checkpointer(tmp_path, keep=2, async_save=True)
    path = saver.save(7, model, opt, {"progress": {}}, {})
    expected = [p.detach().clone() for p in model.parameters()]
    train_a_bit(model, opt)  # changing the model after the call does not change what is saved
    saver.wait()
    assert ckpt.is_complete(path) and not path.with_name(path.name + ".tmp").exists()
    model2, opt2 = make(1)
    ckpt.Checkpointer.load(path, model2, opt2)
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b)
