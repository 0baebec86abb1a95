"""The tiny sweep end to end through the CLI, made smaller (lower budgets, shorter sequences): points
run one after another, a sweep stopped part-way resumes without re-running finished points,
results.csv, fit.json, the plots, and the compute-optimal recipe."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from xlstm_train.cli import main
from xlstm_train.sweep.plan import model_counts
from xlstm_train.sweep.run import RESULT_COLUMNS
from xlstm_train.train.config import load_config

from .test_plan import tiny_sweep, write

REPO = Path(__file__).resolve().parents[2]
DATA = {"data.datasets": [{"path": str(REPO / "data" / "sample")}],
        "data.tokenizer": str(REPO / "data" / "tokenizer" / "austen_sp4096.model")}


def small_tiny_sweep(tmp_path: Path) -> str:
    """The tiny sweep's models at two blocks (xLSTM: an mLSTM and an sLSTM block), on sequences of 32."""
    data = tiny_sweep(**{"sweep.flops": [0.4e9, 0.8e9], "sweep.min_steps": 2})
    for entry in data["sweep"]["models"]:
        entry["model"]["num_blocks"] = 2
        if "slstm_at" in entry["model"]:
            entry["model"]["slstm_at"] = [1]
    data["overrides"].update(DATA)
    data["overrides"].update({"data.seq_len": 32, "data.verify": "size", "train.micro_batch_size": 4,
                              "train.eval_batches": 1, "checkpoint.interval": 100})
    return write(tmp_path, data)


@pytest.fixture
def one_thread():
    """Models this small train many times faster on one intra-op thread than on two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mtimes(directory: Path) -> dict:
    return {str(p): p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


def test_tiny_sweep_end_to_end_with_resume(tmp_path, capsys, one_thread):
    recipe = small_tiny_sweep(tmp_path)
    root = tmp_path / "runs"
    first, second = "xlstm71-w16_C4e8", "llama-w16_C4e8"

    # a sweep stopped after two points: they finished, a third left a directory with no checkpoint
    assert main(["sweep", recipe, "--sweep-dir", str(root), "--point", first, "--point", second]) == 0
    before = {name: mtimes(root / name) for name in (first, second)}
    assert all(any("step-" in path for path in files) for files in before.values())
    unresumable = root / "llama-w32_C4e8"
    unresumable.mkdir()
    (unresumable / "metrics.jsonl").write_text('{"kind": "event", "event": "start", "time": 0}\n')
    capsys.readouterr()

    assert main(["sweep", recipe, "--sweep-dir", str(root), "--bootstrap", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{first}: finished earlier, skipped" in out and f"{second}: finished earlier, skipped" in out
    assert out.count("finished earlier, skipped") == 2 and "ETA" in out
    for name, files in before.items():
        assert mtimes(root / name) == files  # not one file of a finished point was touched
    assert (root / "llama-w32_C4e8.incomplete-1" / "metrics.jsonl").is_file()

    with open(root / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RESULT_COLUMNS
        rows = list(reader)
    assert len(rows) == 12 and all(r["status"] == "done" for r in rows)
    assert {r["arch"] for r in rows} == {"xlstm-7-1", "llama"}
    for r in rows:
        assert float(r["loss"]) > 0 and float(r["best_loss"]) <= float(r["loss"])
        assert int(r["tokens"]) == int(r["steps"]) * 4 * 32 and float(r["tokens_per_s"]) > 0
        assert abs(float(r["flops"]) / float(r["flops_budget"]) - 1) < 0.5

    fit_dir = root / "fit"
    fit = json.loads((fit_dir / "fit.json").read_text())
    assert sorted(fit) == ["llama", "xlstm-7-1"]
    assert all(entry["num_points"] == 6 and set(entry["ci"]) == {"E", "A", "alpha", "B", "beta"}
               for entry in fit.values())
    for name in ("loss_vs_compute", "isoflop", "optimal_scaling", "residuals"):
        for ext in ("png", "svg"):
            assert (fit_dir / f"{name}.{ext}").stat().st_size > 1000

    # the compute-optimal run at a larger budget, written as a recipe that loads and has about N* params
    out_dir = tmp_path / "refit"
    assert main(["fit", str(root / "results.csv"), "--out", str(out_dir), "--bootstrap", "0",
                 "--predict-flops", "1e10", "--no-plots"]) == 0
    predictions = json.loads((out_dir / "predictions.json").read_text())
    for arch in ("llama", "xlstm-7-1"):
        cfg = load_config(out_dir / f"optimal_{arch}.yaml")
        n_star = predictions[arch][0]["N"]
        n = model_counts(cfg.model)[0]
        assert cfg.model.arch == ("llama" if arch == "llama" else "xlstm_blocks")
        assert cfg.model.num_blocks == 2  # the template's depth
        assert 0.8 < n / n_star < 1.25 or cfg.model.embedding_dim == 16  # the nearest valid width
        tokens = cfg.train.steps * cfg.train.micro_batch_size * cfg.data.seq_len
        assert abs(tokens / predictions[arch][0]["D"] - 1) < 0.1 or cfg.train.steps == 1
        assert yaml.safe_load((out_dir / f"optimal_{arch}.yaml").read_text())["name"] == f"optimal-{arch}-C1e10"


def test_a_stop_request_ends_the_sweep_not_just_its_point(tmp_path, monkeypatch, capsys):
    """A preempted point (the trainer saved and returned with ``stopped``) stops the sweep: the next
    points are not started, and nothing is fitted."""
    from xlstm_train.train import trainer

    calls = []

    def preempted(cfg):
        calls.append(cfg.name)
        return {"stopped": "SIGTERM", "step": 3}

    monkeypatch.setattr(trainer, "train", preempted)
    recipe = small_tiny_sweep(tmp_path)
    assert main(["sweep", recipe, "--sweep-dir", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    assert calls == ["tiny-scaling-xlstm71-w16_C4e8"]
    assert "stopped by SIGTERM at step 3 of 7; the sweep stops here" in out and "not fitted" in out
    assert not (tmp_path / "runs" / "fit").exists()
    with open(tmp_path / "runs" / "results.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["new"] * 12
