"""DeepSpeed ZeRO-1/2/3 (ZeRO-2 also with the optimizer offloaded to CPU, ZeRO-3 also with
checkpointed blocks) on 2 gloo ranks match a single process over 3 steps; its checkpoints save,
resume and convert to ours. The trainer with engine=deepspeed (ZeRO-1/2, dp=2) matches the
single-process fsdp trainer, across a resume, and its checkpoints (tp=1 and 2) reach export."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from tests.parallel.cases import BATCH, batch, make_model
from tests.parallel.harness import assert_close, run_distributed

pytest.importorskip("deepspeed")


def run_config(stage: int):
    from xlstm_train.train.config import Config

    cfg = Config()
    cfg.parallel.engine, cfg.parallel.zero_stage = "deepspeed", stage
    cfg.train.micro_batch_size, cfg.train.dtype = BATCH // 2, "fp32"
    cfg.optim.lr, cfg.optim.eps, cfg.optim.weight_decay, cfg.optim.clip_grad_norm = 1e-2, 1e-5, 0.1, 0.5
    cfg.optim.betas = [0.9, 0.95]
    return cfg


def _local_loss(engine, step: int, rows: slice) -> torch.Tensor:
    """This rank's loss of a step's batch rows; a plain tensor also from vocabulary-sharded logits
    (tp > 1, computed under ``loss_context``)."""
    from xlstm_train.parallel import to_full

    inputs, labels, doc_ids = batch(step)
    return to_full(F.cross_entropy(engine(inputs[rows], doc_ids[rows]).flatten(0, 1), labels[rows].flatten()))


def _engine_and_reference(cfg, arch: str):
    """A DeepSpeed engine of ``cfg`` on a fresh ``arch`` model, the single-process copy it must match
    with its optimizer, the mesh, this rank's batch rows and the parameter names."""
    import torch.distributed as dist

    from xlstm_train.parallel import build_mesh, dp_rank_and_size
    from xlstm_train.parallel.deepspeed_engine import build_deepspeed_engine

    model_cfg, model = make_model(arch)
    cfg.model = model_cfg
    reference = copy.deepcopy(model)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    mesh = build_mesh(cfg.parallel, dist.get_world_size(), "cpu", model_cfg)
    engine, _ = build_deepspeed_engine(model, [{"params": list(model.parameters())}], cfg, mesh)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    names = [n for n, _ in reference.named_parameters()]
    return engine, reference, ref_opt, mesh, rows, names


def _zero_stages(ckpt_root: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from xlstm_train.parallel import dp_mean
    from xlstm_train.train.checkpoint import load_deepspeed_checkpoint, save_deepspeed_checkpoint

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference at start-up; ZeRO does
    # not use it, and compiling it would take most of this test's time on a fresh CI machine.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    for stage, offload, checkpointing in ((1, False, "none"), (2, False, "none"), (3, False, "none"),
                                          (2, True, "none"), (3, False, "full")):  # fmt: skip
        cfg = run_config(stage)
        cfg.parallel.offload_optimizer = offload  # Adam states and fp32 master weights in CPU memory
        cfg.parallel.activation_checkpointing = checkpointing
        engine, reference, ref_opt, mesh, rows, names = _engine_and_reference(cfg, "xlstm_large")
        for step in range(3):
            inputs, labels, doc_ids = batch(step)
            ref_loss = F.cross_entropy(reference(inputs, doc_ids).flatten(0, 1), labels.flatten())
            ref_loss.backward()
            loss = F.cross_entropy(engine(inputs[rows], doc_ids[rows]).flatten(0, 1), labels[rows].flatten())
            engine.backward(loss)
            where = f"ZeRO-{stage}{' offload' if offload else ''} checkpointing={checkpointing} step {step}"
            assert_close(dp_mean(loss, mesh), ref_loss, what=f"{where} loss")
            for name, p, ref in zip(names, engine.module.parameters(), reference.parameters()):
                assert_close(safe_get_full_grad(p), ref.grad, what=f"{where} grad of {name}")
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()
            engine.step()
        for name, p, ref in zip(names, engine.module.parameters(), reference.parameters()):
            assert_close(safe_get_full_fp32_param(p), ref.detach(), what=f"ZeRO-{stage} weight {name}")

        # save, take one more step, resume and retake it: the same loss
        ckpt = os.path.join(ckpt_root, f"zero{stage}{'-offload' if offload else ''}-{checkpointing}")
        save_deepspeed_checkpoint(engine, ckpt, step=3, client_state={"consumed_samples": 3 * BATCH})
        before = _local_loss(engine, 3, rows).detach()
        engine.backward(_local_loss(engine, 3, rows))
        engine.step()
        assert not torch.allclose(_local_loss(engine, 3, rows).detach(), before)
        client_state = load_deepspeed_checkpoint(engine, ckpt)
        assert client_state["consumed_samples"] == 3 * BATCH
        assert_close(_local_loss(engine, 3, rows).detach(), before, rtol=1e-6, what=f"ZeRO-{stage} loss after resume")
        dist.barrier()


def test_deepspeed_zero_1_2_3_match_single_process_and_resume(tmp_path):
    run_distributed(_zero_stages, 2, str(tmp_path))
    # the ZeRO-3 checkpoint converts to ours and loads into a plain single-process model
    import torch.distributed.checkpoint as dcp

    from xlstm_train.train.checkpoint import convert_deepspeed_checkpoint, deepspeed_to_state_dict

    for run in ("zero3-none", "zero3-full"):  # the second with checkpoint-wrapped blocks
        expected = deepspeed_to_state_dict(tmp_path / run)
        out = convert_deepspeed_checkpoint(tmp_path / run, tmp_path / f"converted-{run}")
        _, model = make_model("xlstm_large", seed=1)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=out, no_dist=True)
        model.load_state_dict(state["model"])
        assert set(expected) == set(model.state_dict())
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, expected[name]), name


# ------------------------------------------------------------------------------------------------
# Tensor parallel x ZeRO: the TP shards are ZeRO's parameters, partitioned over dp only

TP_CASES = (("xlstm_large", 1, "none"), ("llama", 2, "none"), ("xlstm_blocks", 2, "full"))


def _zero_with_tensor_parallel(ckpt_root: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from xlstm_train.parallel import dp_mean, dp_rank_and_size, loss_context
    from xlstm_train.train.checkpoint import save_deepspeed_checkpoint

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see _zero_stages
    for arch, stage, checkpointing in TP_CASES:
        cfg = run_config(stage)
        cfg.parallel.tp, cfg.parallel.activation_checkpointing = 2, checkpointing
        engine, reference, ref_opt, mesh, rows, names = _engine_and_reference(cfg, arch)
        dp_size = dp_rank_and_size(mesh)[1]
        assert (engine.dp_world_size, dp_size) == (2, 2)  # ZeRO partitions over dp, not over tp x dp
        assert engine.optimizer.partition_count == [dp_size]

        for step in range(3):
            inputs, labels, doc_ids = batch(step)
            ref_loss = F.cross_entropy(reference(inputs, doc_ids).flatten(0, 1), labels.flatten())
            ref_loss.backward()
            with loss_context(mesh, cfg.parallel):
                loss = _local_loss(engine, step, rows)
                engine.backward(loss)
            where = f"{arch} ZeRO-{stage} tp=2 dp=2 checkpointing={checkpointing} step {step}"
            assert_close(dp_mean(loss, mesh), ref_loss, what=f"{where} loss")
            for name, p, ref in zip(names, engine.module.parameters(), reference.parameters()):
                assert_close(p.tp_shard.full(safe_get_full_grad(p)), ref.grad, what=f"{where} grad of {name}")
            ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
            ref_opt.step()
            ref_opt.zero_grad()
            engine.step()
            assert_close(torch.tensor(float(engine.get_global_grad_norm())), ref_norm, what=f"{where} grad norm")
        for name, p, ref in zip(names, engine.module.parameters(), reference.parameters()):
            assert_close(p.tp_shard.full(safe_get_full_fp32_param(p)), ref.detach(), what=f"{where} weight {name}")
        # a checkpoint per TP rank, and the next step's loss for the converted one to match
        save_deepspeed_checkpoint(engine, os.path.join(ckpt_root, arch), step=3)
        with loss_context(mesh, cfg.parallel), torch.no_grad():
            next_loss = dp_mean(_local_loss(engine, 3, rows), mesh)
        if dist.get_rank() == 0:
            torch.save(next_loss, os.path.join(ckpt_root, arch, "next_loss.pt"))
        dist.barrier()


def test_deepspeed_zero_1_2_with_tp2_dp2_match_single_process_and_convert(tmp_path):
    run_distributed(_zero_with_tensor_parallel, 4, str(tmp_path))
    # each run's checkpoint holds a ZeRO checkpoint per TP rank; merged, it is the whole model
    import torch.distributed.checkpoint as dcp

    from xlstm_train.train.checkpoint import convert_deepspeed_checkpoint

    for arch, _, _ in TP_CASES:
        assert len(list((tmp_path / arch / "step-0000003").glob("mp_rank_*_model_states.pt"))) == 2
        out = convert_deepspeed_checkpoint(tmp_path / arch, tmp_path / f"converted-{arch}")
        _, model = make_model(arch, seed=1)
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=out, no_dist=True)
        model.load_state_dict(state["model"])
        inputs, labels, doc_ids = batch(3)
        with torch.no_grad():
            loss = F.cross_entropy(model(inputs, doc_ids).flatten(0, 1), labels.flatten())
        assert_close(loss, torch.load(tmp_path / arch / "next_loss.pt"), what=f"{arch} loss after conversion")


# ------------------------------------------------------------------------------------------------
# The trainer with parallel.engine=deepspeed

TRAIN_RECIPE = {
    "name": "ds",
    # no dropout: its masks depend on how the batch is split over ranks
    "model": {"arch": "xlstm_blocks", "embedding_dim": 32, "num_blocks": 2, "slstm_at": [],
              "mlstm_num_heads": 2, "slstm_num_heads": 2, "chunk_size": 16, "dropout": 0.0},
    "data": {"source": "synthetic", "task": "parity", "task_options": {"max_len": 24}, "seq_len": 32},
    # a schedule that does not depend on train.steps, so a 2-step run resumed to 4 steps sees the
    # rates of a 4-step run; a clip low enough to act
    "optim": {"lr": 3e-3, "warmup_steps": 3, "schedule": "constant", "clip_grad_norm": 0.2},
    "train": {"steps": 4, "micro_batch_size": 4, "grad_accum_steps": 2, "dtype": "fp32",
              "eval_interval": 2, "eval_batches": 2, "sample_tokens": 0},
    "logging": {"interval": 1, "wandb": "disabled"},
    "checkpoint": {"interval": 2, "keep": 2},
    "eval": {"synthetic_samples": 0},  # the task's accuracy is not what these tests compare
}
TRAIN_STEPS = 4


def _train_config(root, run: str, *overrides):
    from xlstm_train.train.config import load_config

    return load_config(os.path.join(root, "recipe.yaml"), [f"run_dir={os.path.join(root, run)}", *overrides])


def _train_records(run_dir, kind: str = "train") -> dict[int, dict]:
    """The last record of ``kind`` (train or val) of each step in the run's metrics.jsonl (a resumed
    run appends)."""
    import json

    records = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if record["kind"] == kind:
                records[record["step"]] = record
    return records


def _deepspeed_train(root: str, run: str, overrides: tuple[str, ...]) -> None:
    import deepspeed

    from xlstm_train.train.trainer import train

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see _zero_stages
    train(_train_config(root, run, *overrides))


def test_trainer_deepspeed_zero_1_2_match_fsdp_and_resume(tmp_path):
    import yaml

    from xlstm_train.export.hf import export_hf
    from xlstm_train.models import build_model
    from xlstm_train.train import checkpoint as ckpt
    from xlstm_train.train.trainer import train

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TRAIN_RECIPE))
    # run name: overrides, on 2 processes: ZeRO over dp=2, or tp=2 (dp=1) with the recipe's batch
    runs = {
        f"zero{stage}": ("parallel.engine=deepspeed", f"parallel.zero_stage={stage}", "train.micro_batch_size=2")
        for stage in (1, 2)
    }
    runs["zero2-tp2"] = ("parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.tp=2")
    for run, overrides in runs.items():
        # two steps, then the same run directory resumed from its step-2 checkpoint to step 4
        # (train() leaves the process group, and DeepSpeed keeps it: one launch per run)
        run_distributed(_deepspeed_train, 2, str(tmp_path), run, (*overrides, "train.steps=2"))
        run_distributed(_deepspeed_train, 2, str(tmp_path), run, overrides)
    cfg = _train_config(str(tmp_path), "fsdp")
    train(cfg)  # one process, uninterrupted
    expected = _train_records(tmp_path / "fsdp")
    assert len(expected) == TRAIN_STEPS
    assert any(r["grad_norm"] > TRAIN_RECIPE["optim"]["clip_grad_norm"] for r in expected.values())
    for run in runs:
        run_dir = tmp_path / run
        got = _train_records(run_dir)
        assert sorted(got) == sorted(expected)
        for step, record in got.items():
            where = f"{run} step {step}"
            assert record["lr"] == pytest.approx(expected[step]["lr"], rel=1e-12), where
            for key in ("loss", "grad_norm"):
                assert_close(torch.tensor(record[key]), torch.tensor(expected[step][key]), what=f"{where} {key}")
        # validation: each data-parallel rank evaluates its share of every validation batch, so the
        # set and the loss are those of the single process
        expected_val = _train_records(tmp_path / "fsdp", "val")
        assert sorted(expected_val) == [0, 2, 4]
        got_val = _train_records(run_dir, "val")
        assert sorted(got_val) == [0, 2, 4]
        for step, record in got_val.items():
            assert_close(torch.tensor(record["val_loss"]), torch.tensor(expected_val[step]["val_loss"]),
                         what=f"{run} step {step} val_loss")  # fmt: skip
        # DeepSpeed's format with our train state beside it, and it still converts to ours
        final = ckpt.latest_checkpoint(run_dir)
        assert final.name == "step-0000004" and ckpt.is_deepspeed(final)
        assert ckpt.read_train_state(final)["progress"]["step"] == TRAIN_STEPS
        assert not list(run_dir.glob("*.tmp"))
        state = ckpt.deepspeed_to_state_dict(final)  # the TP shards merged
        expected_state = build_model(cfg.model).state_dict()
        assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected_state.items()}
        # export reads it as it reads ours: the run's config, and the merged weights into a fresh model
        saved_cfg = ckpt.read_checkpoint_config(final)
        assert saved_cfg.parallel.engine == "deepspeed" and saved_cfg.model == cfg.model
        loaded = ckpt.load_model_state(final, saved_cfg.model)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
        converted = ckpt.convert_deepspeed_checkpoint(final, tmp_path / f"converted-{run}")
        assert ckpt.read_checkpoint_config(converted).model == cfg.model
        assert all(torch.equal(t, state[k]) for k, t in ckpt.load_model_state(converted, cfg.model).items())
    out = export_hf(ckpt.latest_checkpoint(tmp_path / "zero2-tp2"), tmp_path / "exported")
    assert (out / "model.safetensors").is_file()



def test_resume_with_the_other_engine_is_refused(tmp_path):
    import yaml

    from xlstm_train.config import ConfigError
    from xlstm_train.train.trainer import find_resume_checkpoint

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TRAIN_RECIPE))
    step = tmp_path / "run" / "step-0000002"
    step.mkdir(parents=True)
    (step / "latest").write_text("step-0000002")  # DeepSpeed's tag file
    torch.save({}, step / "train_state.pt")
    with pytest.raises(ConfigError, match=r"written by the deepspeed engine and parallel.engine = 'fsdp'"):
        find_resume_checkpoint(_train_config(str(tmp_path), "run"))
    with pytest.raises(ConfigError, match=r"written by the deepspeed engine and parallel.engine = 'fsdp'"):
        find_resume_checkpoint(_train_config(str(tmp_path), "other", f"checkpoint.resume={step}"))
    ds = ("parallel.engine=deepspeed", "parallel.zero_stage=2")
    assert find_resume_checkpoint(_train_config(str(tmp_path), "run", *ds)) == step


def _deepspeed_train_poisoned(root: str, run: str, poisoned_call: int, overrides: tuple[str, ...]) -> None:
    """``_deepspeed_train`` with NaN logits from training forward call ``poisoned_call`` (1-based) on
    every rank; the NonFiniteError's message is written to ``<run>.error``."""
    import deepspeed
    import torch.distributed as dist

    from xlstm_train.train import trainer

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # see _zero_stages
    build, calls = trainer.build_model, []

    def build_poisoned(model_cfg):
        model = build(model_cfg)

        def poison(module, args, output):
            if module.training:
                calls.append(1)
                if len(calls) == poisoned_call:
                    return output * float("nan")
            return output

        model.register_forward_hook(poison)
        return model

    trainer.build_model = build_poisoned
    rank = dist.get_rank()  # train() leaves the process group on success only
    try:
        trainer.train(_train_config(root, run, *overrides))
    except trainer.NonFiniteError as e:
        if rank == 0:
            with open(os.path.join(root, f"{run}.error"), "w") as f:
                f.write(str(e))


def test_trainer_deepspeed_nonfinite_loss_saves_the_state_before_the_step(tmp_path):
    """A NaN loss under DeepSpeed is caught before ``engine.step()``: the run stops with the state
    before that step saved (DeepSpeed's format, step 1), and resuming from it gives the losses of a
    clean run. (Two DeepSpeed launches: the only check that this engine saves the exact state.)"""
    import yaml

    from xlstm_train.train import checkpoint as ckpt
    from xlstm_train.train.trainer import train

    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(TRAIN_RECIPE))
    ds = ("parallel.engine=deepspeed", "parallel.zero_stage=2", "train.micro_batch_size=2", "train.steps=3",
          "train.eval_interval=0")  # fmt: skip
    # two micro-batches per step: call 3 is the first micro-batch of step 2
    run_distributed(_deepspeed_train_poisoned, 2, str(tmp_path), "stopped", 3, ds)
    message = (tmp_path / "stopped.error").read_text()
    assert "at step 2" in message and "step-0000001" in message, message
    saved = ckpt.latest_checkpoint(tmp_path / "stopped")
    assert saved.name == "step-0000001" and ckpt.is_deepspeed(saved)
    assert ckpt.read_train_state(saved)["progress"]["step"] == 1
    run_distributed(_deepspeed_train, 2, str(tmp_path), "stopped", ds)
    # the clean run: one process (the trainer test above shows it matches DeepSpeed on dp=2)
    train(_train_config(str(tmp_path), "clean", "train.steps=3", "train.eval_interval=0"))
    stopped, clean = _train_records(tmp_path / "stopped"), _train_records(tmp_path / "clean")
    assert sorted(stopped) == sorted(clean) == [1, 2, 3]
    for step in (1, 2, 3):
        assert_close(torch.tensor(stopped[step]["loss"]), torch.tensor(clean[step]["loss"]), what=f"step {step} loss")
