"""A DCP checkpoint of model and optimizer saved in one layout (FSDP dp=2) loads in another (TP=2,
one process) and gives the same next-step losses."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from tests.parallel.cases import BATCH, batch, full, make_model
from tests.parallel.harness import run_distributed
from xlstm_train.parallel import (
    ParallelConfig,
    build_mesh,
    dp_mean,
    dp_rank_and_size,
    loss_context,
    parallelize_model,
)

ARCH = "xlstm_blocks"  # mLSTM and sLSTM blocks: every TP style is exercised by the reshard


def _setup(parallel: dict, seed: int):
    import torch.distributed as dist

    pcfg = ParallelConfig(**parallel)
    world = dist.get_world_size() if dist.is_initialized() else 1
    model_cfg, model = make_model(ARCH, seed=seed)
    mesh = build_mesh(pcfg, world, "cpu", model_cfg)
    parallelize_model(model, mesh, pcfg, model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1, foreach=True)
    return pcfg, mesh, model, opt


def _step(pcfg, mesh, model, opt, step: int) -> float:
    """One training step on the global batch of ``step``; returns the loss averaged over dp."""
    dp_rank, dp_size = dp_rank_and_size(mesh)
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    inputs, labels, doc_ids = batch(step)
    with loss_context(mesh, pcfg):
        loss = F.cross_entropy(model(inputs[rows], doc_ids[rows]).flatten(0, 1), labels[rows].flatten())
        loss.backward()
    opt.step()
    opt.zero_grad()
    return dp_mean(full(loss).detach(), mesh).item()


def _save_after_two_steps(path: str) -> None:
    pcfg, mesh, model, opt = _setup({"zero_stage": 3}, seed=0)
    for step in range(2):
        _step(pcfg, mesh, model, opt, step)
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=os.path.join(path, "ckpt"))
    losses = [_step(pcfg, mesh, model, opt, step) for step in (2, 3)]
    if torch.distributed.get_rank() == 0:
        with open(os.path.join(path, "expected.json"), "w") as f:
            json.dump(losses, f)


def _resume(path: str, parallel: dict, out_name: str) -> None:
    pcfg, mesh, model, opt = _setup(parallel, seed=1)  # different init: everything must come from disk
    model_state, optim_state = get_state_dict(model, opt)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(path, "ckpt"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    losses = [_step(pcfg, mesh, model, opt, step) for step in (2, 3)]
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        with open(os.path.join(path, out_name), "w") as f:
            json.dump(losses, f)


def _save_then_resume_under_tp(path: str) -> None:
    _save_after_two_steps(path)
    _resume(path, {"tp": 2}, "tp2.json")  # a new model, mesh and optimizer in the same process group


def test_fsdp_checkpoint_resumes_under_tp_and_on_one_process(tmp_path):
    run_distributed(_save_then_resume_under_tp, 2, str(tmp_path))
    _resume(str(tmp_path), {}, "single.json")
    expected = json.loads((tmp_path / "expected.json").read_text())
    for name in ("tp2.json", "single.json"):
        losses = json.loads((tmp_path / name).read_text())
        for got, want in zip(losses, expected):
            assert abs(got - want) <= 1e-5 * abs(want), (name, losses, expected)
