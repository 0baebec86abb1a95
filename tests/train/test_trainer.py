"""The training loop end to end, on tiny models and a synthetic task (a few seconds each)."""

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from xlstm_train.config import ConfigError
from xlstm_train.models import build_model
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
from xlstm_train.train import checkpoint as ckpt
from xlstm_train.train import engine
from xlstm_train.train import trainer
from xlstm_train.train.config import load_config
from xlstm_train.train.optim import lr_multiplier

BASE_RECIPE = {
    "name": "test",
    # mLSTM blocks only (the sLSTM reference cell is a slow per-step loop); test_exact_resume adds one
    "model": {"arch": "xlstm_blocks", "embedding_dim": 32, "num_blocks": 2, "slstm_at": [],
              "mlstm_num_heads": 2, "slstm_num_heads": 2, "chunk_size": 16, "dropout": 0.1},
    "data": {"source": "synthetic", "task": "parity", "task_options": {"max_len": 24}, "seq_len": 32},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {"steps": 8, "micro_batch_size": 4, "eval_interval": 4, "eval_batches": 2, "sample_tokens": 0},
    "logging": {"interval": 1, "wandb": "disabled"},
    "checkpoint": {"interval": 4, "keep": 3},
    "eval": {"synthetic_samples": 16},  # the task's accuracy at every validation, kept cheap
}
REPO = Path(__file__).resolve().parents[2]


def make_config(tmp_path, *overrides, run="run"):
    recipe = tmp_path / "recipe.yaml"
    if not recipe.exists():
        recipe.write_text(yaml.safe_dump(BASE_RECIPE))
    return load_config(recipe, [f"run_dir={tmp_path / run}", *overrides])


def make_shards_config(tmp_path, *overrides, run="run"):
    """The base recipe on the bundled text sample (many loss tokens per step, and a tokenizer to sample
    with) instead of the synthetic task."""
    recipe = tmp_path / "shards.yaml"
    if not recipe.exists():
        base = {k: v for k, v in BASE_RECIPE.items() if k not in ("data", "eval")}
        base["data"] = {"source": "shards", "datasets": [{"path": str(REPO / "data/sample")}], "verify": "size",
                        "tokenizer": str(REPO / "data/tokenizer/austen_sp4096.model"), "seq_len": 32}
        base["model"] = {**base["model"], "vocab_size": 4096}
        recipe.write_text(yaml.safe_dump(base))
    return load_config(recipe, [f"run_dir={tmp_path / run}", *overrides])


def read_metrics(run_dir, kind="train"):
    """The record of each step; a step logged twice fails (a resume drops the records it repeats)."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            assert record["step"] not in records, f"step {record['step']} logged twice in {run_dir}"
            records[record["step"]] = record
    return records


class SimulatedKill(Exception):
    pass


def kill_after_batches(monkeypatch, num_batches):
    """Make the training loader fail after ``num_batches`` batches, like a killed process."""
    build = trainer.build_train_loader

    def build_failing(*args, **kwargs):
        batches = iter(build(*args, **kwargs))

        def failing():
            for _ in range(num_batches):
                yield next(batches)
            raise SimulatedKill

        return failing()

    monkeypatch.setattr(trainer, "build_train_loader", build_failing)


def test_exact_resume(tmp_path, monkeypatch):
    with_slstm = ("model.slstm_at=[1]", "data.seq_len=24", "data.task_options.max_len=16")
    straight = trainer.train(make_config(tmp_path, *with_slstm, run="straight"))
    assert straight["step"] == 8

    kill_after_batches(monkeypatch, 6)  # dies during step 7, after the checkpoint at step 4
    with pytest.raises(SimulatedKill):
        trainer.train(make_config(tmp_path, *with_slstm, run="resumed"))
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step-0000004"
    monkeypatch.undo()
    resumed = trainer.train(make_config(tmp_path, *with_slstm, run="resumed"))
    assert resumed["step"] == 8

    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:  # bitwise: same data, same RNG (dropout is on), same optimizer state
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["grad_norm"] == b[step]["grad_norm"], step
    assert straight["val_loss"] == resumed["val_loss"]
    events = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e["step"] == 4 for e in events)


def test_metrics_jsonl(tmp_path):
    cfg = make_config(tmp_path, "logging.interval=3", "optim.schedule=cosine")
    summary = trainer.train(cfg)
    train = read_metrics(cfg.run_path)
    assert sorted(train) == [3, 6, 8]  # every 3 steps and the last
    tokens_per_step = 4 * 32
    for step, record in train.items():
        assert {"loss", "ppl", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_gib", "tokens_seen",
                "skipped_steps", "time"} <= set(record)
        assert math.isfinite(record["loss"]) and record["ppl"] == pytest.approx(math.exp(record["loss"]))
        assert record["lr"] == pytest.approx(3e-3 * lr_multiplier(step - 1, cfg.optim, 8))
        assert record["tokens_seen"] == step * tokens_per_step
        assert record["tokens_per_s"] > 0 and record["memory_gib"] > 0
        assert record["mfu"] is None  # CPU: no peak to compare with
    val = read_metrics(cfg.run_path, "val")
    assert sorted(val) == [0, 4, 8]
    assert val[8]["val_ppl"] == pytest.approx(math.exp(val[8]["val_loss"]))
    # the eval section (a synthetic task: its accuracy) rides on every validation record
    for record in val.values():
        assert 0 <= record["eval/parity/accuracy"] <= 1 and "eval/parity/scaled_accuracy" in record
    assert summary["val_loss"] == val[8]["val_loss"]
    assert yaml.safe_load((cfg.run_path / "config.yaml").read_text())["train"]["steps"] == 8
    assert [p.name for p in ckpt.list_checkpoints(cfg.run_path)] == ["step-0000004", "step-0000008"]


def poison_training_forward(monkeypatch, at_calls):
    """Return NaN logits from the model's training forward calls numbered ``at_calls`` (1-based).

    Also records a fingerprint of the parameters at every training forward call.
    """
    build = trainer.build_model
    fingerprints = []

    def build_poisoned(model_cfg):
        model = build(model_cfg)

        def pre_hook(module, args):
            if module.training:
                fingerprints.append(torch.cat([p.detach().flatten() for p in module.parameters()]).clone())

        def hook(module, args, output):
            if module.training and len(fingerprints) in at_calls:
                return output * float("nan")
            return output

        model.register_forward_pre_hook(pre_hook)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_poisoned)
    return fingerprints


def test_nonfinite_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    poison_training_forward(monkeypatch, at_calls={6})  # step 6 (one micro-batch per step)
    cfg = make_config(tmp_path, "train.on_nonfinite=stop", run="stopped")
    with pytest.raises(trainer.NonFiniteError, match=r"at step 6.*step-0000005"):
        trainer.train(cfg)
    assert ckpt.latest_checkpoint(cfg.run_path).name == "step-0000005"
    monkeypatch.undo()
    # the saved state is the exact state before the bad step: resuming matches a clean run
    trainer.train(make_config(tmp_path, run="stopped"))
    trainer.train(make_config(tmp_path, run="clean"))
    stopped, clean = read_metrics(tmp_path / "stopped"), read_metrics(tmp_path / "clean")
    assert [stopped[s]["loss"] for s in range(1, 9)] == [clean[s]["loss"] for s in range(1, 9)]


def test_nonfinite_loss_skips_step(tmp_path, monkeypatch):
    fingerprints = poison_training_forward(monkeypatch, at_calls={3})
    cfg = make_config(tmp_path, "train.on_nonfinite=skip", "train.eval_interval=0")
    summary = trainer.train(cfg)
    assert summary["step"] == 8 and summary["skipped_steps"] == 1
    train = read_metrics(cfg.run_path)
    assert train[3]["loss"] is None and train[3]["ppl"] is None  # NaN is written as null
    assert [train[s]["skipped_steps"] for s in range(1, 9)] == [0, 0, 1, 1, 1, 1, 1, 1]
    # step 3 left the parameters alone; every other step moved them
    assert len(fingerprints) == 8
    assert torch.equal(fingerprints[2], fingerprints[3])
    for before, after in zip(fingerprints[:2] + fingerprints[3:-1], fingerprints[1:2] + fingerprints[4:]):
        assert not torch.equal(before, after)
    assert all(torch.isfinite(f).all() for f in fingerprints)


def test_grad_accumulation_equals_larger_batch_fp64():
    """k micro-batches with uneven numbers of ignored labels == one batch k times larger."""
    torch.manual_seed(0)
    cfg = xLSTMBlocksConfig(vocab_size=17, embedding_dim=16, num_blocks=2, slstm_at=[1], mlstm_num_heads=2,
                            slstm_num_heads=2, chunk_size=8, kernel="reference")
    model = build_model(cfg).double()
    for p in model.parameters():  # move off the init so every parameter gets a gradient
        p.data += 0.05 * torch.randn_like(p)
    input_ids = torch.randint(0, 17, (6, 12))
    labels = torch.randint(0, 17, (6, 12))
    labels[0, :10] = -100  # micro-batch 1 has far fewer valid tokens than micro-batch 2
    labels[1, ::2] = -100
    doc_ids = torch.zeros(6, 12, dtype=torch.int32)
    doc_ids[4, 5:] = 1
    batch = {"input_ids": input_ids, "labels": labels, "doc_ids": doc_ids}
    split = [{k: v[i:j] for k, v in batch.items()} for i, j in ((0, 2), (2, 3), (3, 6))]

    loss_one = engine.forward_backward(model, [batch])
    grads_one = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_acc = engine.forward_backward(model, split)
    grads_acc = [p.grad.clone() for p in model.parameters()]

    # the fp64 reference: mean token loss over the whole batch, from scratch
    logits = model(input_ids, doc_ids=doc_ids)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert loss_one.item() == pytest.approx(ref.item(), rel=1e-12)
    assert loss_acc.item() == pytest.approx(ref.item(), rel=1e-12)
    for a, b in zip(grads_one, grads_acc):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)
    assert sum(g.abs().sum() for g in grads_acc) > 0


def test_grad_accumulation_run_matches_larger_batch(tmp_path):
    trainer.train(make_config(tmp_path, "train.micro_batch_size=4", "model.dropout=0.0",
                                    "train.steps=3", run="big"))
    trainer.train(make_config(tmp_path, "train.micro_batch_size=2", "train.grad_accum_steps=2",
                                    "model.dropout=0.0", "train.steps=3", run="acc"))
    a, b = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
        assert a[step]["tokens_seen"] == b[step]["tokens_seen"]


def test_occupied_run_dir_is_refused_and_left_alone(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"already holds files.*no complete checkpoint"):
        trainer.train(make_config(tmp_path))
    assert [p.name for p in run_dir.iterdir()] == ["notes.txt"]
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_resume_never_refuses_a_run_with_checkpoints(tmp_path):
    trainer.train(make_config(tmp_path, "train.steps=2", "checkpoint.interval=0"))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ConfigError, match="checkpoint.resume = 'never'"):
        trainer.train(make_config(tmp_path, "train.steps=2", "checkpoint.resume=never"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


def test_resume_with_another_model_is_refused(tmp_path):
    trainer.train(make_config(tmp_path, "train.steps=2"))
    with pytest.raises(ConfigError, match=r"model.embedding_dim = 48 \(checkpoint: 32\)"):
        trainer.train(make_config(tmp_path, "train.steps=4", "model.embedding_dim=48"))


def test_finished_run_resumes_without_training(tmp_path, capsys):
    trainer.train(make_config(tmp_path, "train.steps=2"))
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    summary = trainer.train(make_config(tmp_path, "train.steps=2"))
    assert summary["step"] == 2
    assert "run is complete at step 2" in capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[: len(lines)] == lines


def _engine_and_batches(seed: int, num_steps: int = 1):
    """A single-process FSDPEngine on an fp64 model with clipping that acts, an independent copy of
    the model, and per step a batch with uneven numbers of ignored labels over the rows and the same
    batch as two micro-batches."""
    import copy

    from xlstm_train.train.config import Config

    torch.manual_seed(seed)
    cfg = Config()
    cfg.model = xLSTMBlocksConfig(vocab_size=17, embedding_dim=16, num_blocks=2, slstm_at=[1], mlstm_num_heads=2,
                                  slstm_num_heads=2, chunk_size=8, kernel="reference")  # fmt: skip
    cfg.optim.clip_grad_norm, cfg.optim.lr = 0.05, 1e-2
    model = build_model(cfg.model).double()
    reference = copy.deepcopy(model)
    step_engine = engine.build_engine(model, cfg, None, torch.device("cpu"))
    steps = []
    for _ in range(num_steps):
        labels = torch.randint(0, 17, (4, 12))
        labels[0, :9] = -100
        doc_ids = torch.zeros(4, 12, dtype=torch.int32)
        doc_ids[1, 7:] = 1
        batch = {"input_ids": torch.randint(0, 17, (4, 12)), "labels": labels, "doc_ids": doc_ids}
        steps.append((batch, [{k: v[i:j] for k, v in batch.items()} for i, j in ((0, 1), (1, 4))]))
    return cfg, step_engine, reference, steps


def test_engine_step_matches_a_plain_pytorch_step_fp64():
    """``FSDPEngine.step`` = mean token loss over the whole batch, clip, AdamW with the decay groups
    (two steps: AdamW's first update does not depend on the gradient's scale, its second does)."""
    from xlstm_train.train.optim import param_groups

    cfg, step_engine, reference, steps = _engine_and_batches(seed=1, num_steps=2)
    ref_opt = torch.optim.AdamW(param_groups(reference, cfg.optim), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                eps=cfg.optim.eps)  # fmt: skip
    for batch, micro_batches in steps:
        logits = reference(batch["input_ids"], doc_ids=batch["doc_ids"])
        labels = batch["labels"].flatten()
        ref_loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels, ignore_index=-100)
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.optim.clip_grad_norm)
        ref_opt.step()
        ref_opt.zero_grad()

        result = step_engine.step(micro_batches)
        assert result.applied and result.finite
        assert result.loss == pytest.approx(ref_loss.item(), rel=1e-12)
        # the norm is reduced in fp32 (parallel.grad_norm), whatever the gradients' dtype
        assert result.grad_norm == pytest.approx(ref_norm.item(), rel=1e-6) and result.grad_norm > cfg.optim.clip_grad_norm
        for (name, p), ref in zip(step_engine.model.named_parameters(), reference.parameters()):
            # (a clip scale from the fp32 norm moves elements with tiny gradients in the ninth digit)
            torch.testing.assert_close(p, ref, rtol=1e-7, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
        assert all(p.grad is None for p in step_engine.model.parameters())


def test_engine_step_with_a_nonfinite_loss_leaves_the_weights():
    _, step_engine, _, [(_, micro_batches)] = _engine_and_batches(seed=2)
    before = [p.detach().clone() for p in step_engine.model.parameters()]
    calls = []

    def nan_on_second_call(module, args, output):  # the second micro-batch's logits
        calls.append(1)
        return output * float("nan") if len(calls) == 2 else output

    step_engine.model.register_forward_hook(nan_on_second_call)
    result = step_engine.step(micro_batches)
    assert len(calls) == 2 and not result.finite and not result.applied
    assert all(torch.equal(p, b) for p, b in zip(step_engine.model.parameters(), before))
    assert all(p.grad is None for p in step_engine.model.parameters())


# ----------------------------------------------------------------------------------------------
# Evaluation off, skipped-step limit, spike guard, stop signals, self-recovery


def test_validation_off_builds_no_validation_set(tmp_path, monkeypatch):
    def no_evaluate(*args, **kwargs):
        raise AssertionError("evaluate() called with validation off")

    monkeypatch.setattr(trainer, "evaluate", no_evaluate)
    cfg = make_config(tmp_path, "train.eval_batches=0", "train.steps=4")
    summary = trainer.train(cfg)
    assert summary["step"] == 4 and summary["val_loss"] is None
    # the eval section still runs at the validation points, alone in the record
    val = read_metrics(cfg.run_path, "val")
    assert sorted(val) == [0, 4] and all("val_loss" not in r and "eval/parity/accuracy" in r for r in val.values())


def on_training_forwards(monkeypatch, action):
    """Models that ``trainer.train`` builds call ``action(n, output)`` after their n-th training
    forward (1-based) and return what it returns in place of the output."""
    build = trainer.build_model
    calls = []

    def build_hooked(model_cfg):
        model = build(model_cfg)

        def hook(module, args, output):
            if not module.training:
                return output
            calls.append(1)
            return action(len(calls), output)

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_hooked)


def poison_all_training_forwards_from(monkeypatch, first_call, factor=float("nan")):
    """Multiply the logits of every training forward from call ``first_call`` (1-based) by ``factor``."""
    on_training_forwards(monkeypatch, lambda n, output: output * factor if n >= first_call else output)


def weights(checkpoint_dir, cfg):
    model = build_model(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt.Checkpointer.load(checkpoint_dir, model, optimizer)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_too_many_skipped_steps_stop_with_the_good_weights_saved(tmp_path, monkeypatch):
    poison_all_training_forwards_from(monkeypatch, first_call=3)  # steps 3, 4, 5 ... diverge
    cfg = make_config(tmp_path, "train.on_nonfinite=skip", "train.max_skipped_steps=3", "train.eval_interval=0",
                      "checkpoint.interval=2")
    with pytest.raises(trainer.SkippedStepsError, match=r"3 updates in a row were skipped, steps 3-5 "
                       r"\(train.max_skipped_steps = 3\).*step-0000005.*weights are those after step 2"):
        trainer.train(cfg)
    assert ckpt.latest_checkpoint(cfg.run_path).name == "step-0000005"
    assert torch.equal(weights(cfg.run_path / "step-0000005", cfg), weights(cfg.run_path / "step-0000002", cfg))
    train = read_metrics(cfg.run_path)
    assert train[5]["loss"] is None and train[5]["skipped_steps"] == 3
    assert read_metrics(cfg.run_path, "val") == {}  # no evaluation of the stopped run


def test_skipped_step_limit_ends_the_command_with_exit_code_1(tmp_path, monkeypatch, capsys):
    from xlstm_train.cli import main as cli_main

    poison_all_training_forwards_from(monkeypatch, first_call=2)
    make_config(tmp_path)  # writes the recipe
    code = cli_main(["train", "--recipe", str(tmp_path / "recipe.yaml"), f"run_dir={tmp_path / 'run'}",
                     "train.on_nonfinite=skip", "train.max_skipped_steps=2", "train.eval_interval=0"])
    assert code == 1
    err = capsys.readouterr().err
    assert "error: 2 updates in a row were skipped, steps 2-3" in err and "Traceback" not in err


def test_nonfinite_model_evaluates_and_samples_without_crashing(tmp_path, monkeypatch, capsys):
    """Every logit NaN, training and evaluation alike: the run skips its updates, logs a NaN validation
    loss as null, and says why there are no samples instead of failing in the sampler."""
    build = trainer.build_model

    def build_nan(model_cfg):
        model = build(model_cfg)

        def hook(module, args, output):
            if isinstance(output, tuple):  # (logits, state) of generation
                return (output[0] * float("nan"), *output[1:])
            return output * float("nan")

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_nan)
    summary = trainer.train(make_shards_config(tmp_path, "train.sample_tokens=4", "train.on_nonfinite=skip",
                                               "train.max_skipped_steps=0", "train.steps=3", "train.eval_interval=0"))
    assert summary["skipped_steps"] == 3 and summary["samples"] == []
    out = capsys.readouterr().out
    assert "samples: none; the model's logits are not finite" in out
    assert read_metrics(tmp_path / "run", "val")[3]["val_loss"] is None


def spike_at_training_calls(monkeypatch, at_calls, factor=30.0):
    """Scale the logits of the training forward calls numbered ``at_calls`` (1-based, per process) by
    ``factor``: a finite loss far above the others. Records the parameters at every training call."""
    build = trainer.build_model
    fingerprints = []

    def build_spiky(model_cfg):
        model = build(model_cfg)

        def hook(module, args, output):
            if module.training:
                fingerprints.append(torch.cat([p.detach().flatten() for p in module.parameters()]).clone())
                if len(fingerprints) in at_calls:
                    return output * factor
            return output

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(trainer, "build_model", build_spiky)
    return fingerprints


GUARD = ("train.spike_guard.window=3", "train.spike_guard.loss_sigmas=6", "train.spike_guard.grad_norm_sigmas=6",
         "train.eval_interval=0")


def test_spike_guard_skips_a_loss_spike(tmp_path, monkeypatch, capsys):
    fingerprints = spike_at_training_calls(monkeypatch, at_calls={6})
    cfg = make_shards_config(tmp_path, *GUARD)
    summary = trainer.train(cfg)
    assert summary["skipped_steps"] == 1 and summary["spike_steps"] == 1
    assert torch.equal(fingerprints[5], fingerprints[6])  # step 6 left the weights alone
    train = read_metrics(cfg.run_path)
    assert [train[s]["spike_steps"] for s in range(1, 9)] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert train[6]["loss"] > 3 * train[5]["loss"]
    assert "step 6: loss spike: loss" in capsys.readouterr().out
    # the same run without the guard takes the update
    monkeypatch.undo()
    spike_at_training_calls(monkeypatch, at_calls={6})
    unguarded = trainer.train(make_shards_config(tmp_path, "train.eval_interval=0", run="unguarded"))
    assert unguarded["skipped_steps"] == 0


def test_spike_guard_window_resumes_exactly(tmp_path, monkeypatch):
    """The spike at step 7 is judged by the window of steps 4-6, three of which ran before the
    checkpoint at step 4 was resumed: without the window in the checkpoint it would pass."""
    spike_at_training_calls(monkeypatch, at_calls={7})
    straight = trainer.train(make_shards_config(tmp_path, *GUARD, run="straight"))
    assert straight["spike_steps"] == 1
    monkeypatch.undo()

    kill_after_batches(monkeypatch, 5)  # dies in step 6
    with pytest.raises(SimulatedKill):
        trainer.train(make_shards_config(tmp_path, *GUARD, run="resumed"))
    monkeypatch.undo()
    spike_at_training_calls(monkeypatch, at_calls={3})  # the resumed process starts at step 5
    resumed = trainer.train(make_shards_config(tmp_path, *GUARD, run="resumed"))
    assert resumed["spike_steps"] == 1
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    assert [a[s]["loss"] for s in range(1, 9)] == [b[s]["loss"] for s in range(1, 9)]
    assert [a[s]["spike_steps"] for s in range(1, 9)] == [b[s]["spike_steps"] for s in range(1, 9)]


def signal_self_at_step(monkeypatch, step, sig):
    """Send ``sig`` to this process while step ``step`` is training (from its forward pass)."""

    def send(n, output):
        if n == step:
            os.kill(os.getpid(), sig)
        return output

    on_training_forwards(monkeypatch, send)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_and_returns_then_resumes_exactly(tmp_path, monkeypatch, capsys, sig):
    signal_self_at_step(monkeypatch, 3, sig)
    summary = trainer.train(make_config(tmp_path, run="stopped"))
    assert summary["stopped"] == sig.name and summary["step"] == 3
    assert ckpt.latest_checkpoint(tmp_path / "stopped").name == "step-0000003"
    assert f"stop requested ({sig.name}): stopped after step 3 of 8" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are put back
    monkeypatch.undo()
    trainer.train(make_config(tmp_path, run="stopped"))
    trainer.train(make_config(tmp_path, run="clean"))
    stopped, clean = read_metrics(tmp_path / "stopped"), read_metrics(tmp_path / "clean")
    assert [stopped[s]["loss"] for s in range(1, 9)] == [clean[s]["loss"] for s in range(1, 9)]


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, monkeypatch):
    kill_after_batches(monkeypatch, 2)  # dies in step 3, before the checkpoint at step 4
    with pytest.raises(SimulatedKill):
        trainer.train(make_config(tmp_path))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    assert ckpt.latest_checkpoint(run_dir) is None and (run_dir / "metrics.jsonl").exists()
    (run_dir / "step-0000004.tmp").mkdir()  # a save that never completed
    (run_dir / "step-0000004.tmp" / "partial").write_text("")
    (run_dir / "wandb").mkdir()
    config_before = (run_dir / "config.yaml").read_bytes()

    summary = trainer.train(make_config(tmp_path))
    assert summary["step"] == 8
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert not (run_dir / "step-0000004.tmp").exists()
    trainer.train(make_config(tmp_path, run="clean"))
    restarted, clean = read_metrics(run_dir), read_metrics(tmp_path / "clean")  # each step once
    assert [restarted[s]["loss"] for s in range(1, 9)] == [clean[s]["loss"] for s in range(1, 9)]
    assert sorted(read_metrics(run_dir, "val")) == [0, 4, 8]


def test_a_foreign_file_or_another_config_is_still_refused(tmp_path, monkeypatch):
    kill_after_batches(monkeypatch, 1)
    with pytest.raises(SimulatedKill):
        trainer.train(make_config(tmp_path))
    monkeypatch.undo()
    run_dir = tmp_path / "run"
    (run_dir / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(ConfigError, match=r"no complete checkpoint.*Not written by a run before its first "
                                          r"checkpoint: notes.txt"):
        trainer.train(make_config(tmp_path))
    (run_dir / "notes.txt").unlink()
    del before["notes.txt"]
    with pytest.raises(ConfigError, match=r"config.yaml is another run's; it differs from this recipe in: "
                                          r"train.steps = 6 \(there: 8\)"):
        trainer.train(make_config(tmp_path, "train.steps=6"))
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
