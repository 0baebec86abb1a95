"""The ``xlstm-train`` command: info, train with overrides, and bad input (exit code 2, one line)."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from xlstm_train.cli import main
from xlstm_train.models import build_model, count_params
from xlstm_train.train.config import load_config
from xlstm_train.train.flops import flops_per_token

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes" / "tiny.yaml")
SAMPLE = str(REPO / "data" / "sample")
TOKENIZER = str(REPO / "data" / "tokenizer" / "austen_sp4096.model")
# the tiny recipe made smaller still, with absolute data paths so tests can run from any directory
SMALL = [f"data.datasets=[{{path: {SAMPLE}}}]", f"data.tokenizer={TOKENIZER}", "model.embedding_dim=32",
         "model.num_blocks=2", "model.slstm_at=[]", "data.seq_len=32", "train.micro_batch_size=2",
         "train.eval_batches=1", "train.eval_interval=2", "optim.warmup_steps=2", "logging.wandb=disabled",
         "train.sample_tokens=8"]


def run_cli(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "xlstm_train.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_info_json():
    result = run_cli("info", "--recipe", "recipes/tiny.yaml", "--json", "model.num_blocks=4", "model.slstm_at=[1]")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    cfg = load_config(TINY, ["model.num_blocks=4", "model.slstm_at=[1]"])
    assert isinstance(info["params"], int) and info["params"] == count_params(build_model(cfg.model))
    assert info["flops_per_token"] == pytest.approx(flops_per_token(cfg.model, cfg.data.seq_len))
    assert info["flops_per_token"] > 6 * count_params(build_model(cfg.model), non_embedding=True)
    assert info["config"]["model"]["num_blocks"] == 4 and info["config"]["data"]["seq_len"] == 256
    assert sum(info["params_by_module"].values()) >= info["params"]  # a tied head counts in two modules


def test_overrides_are_checked_together(capsys):
    # num_blocks=2 alone does not fit the recipe's slstm_at [3]; with the second override it does
    assert main(["info", "--recipe", TINY, "--json", "model.num_blocks=2", "model.slstm_at=[1]"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["model"]["slstm_at"] == [1]
    assert main(["info", "--recipe", TINY, "model.num_blocks=2", "train.steps=5"]) == 2
    err = capsys.readouterr().err
    assert "model.slstm_at = [3]" in err and "overrides 'model.num_blocks=2', 'train.steps=5'" in err


def test_info_builds_7b_on_meta_device(capsys):
    assert main(["info", "--recipe", str(REPO / "recipes" / "large" / "7b.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert round(info["params"] / 1e9, 3) == 6.865


def test_info_text(capsys):
    assert main(["info", "--recipe", TINY, "model.embedding_dim=64"]) == 0
    out = capsys.readouterr().out
    cfg = load_config(TINY, ["model.embedding_dim=64"])
    assert f"{count_params(build_model(cfg.model)):,} parameters" in out
    assert "embedding_dim: 64" in out and "FLOPs per token at seq_len 256" in out


def test_train_with_overrides_then_resume(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--recipe", TINY, *SMALL, "train.steps=4", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "step 4/4 | val loss" in out and "--- sample 2 ---" in out
    assert (run_dir / "step-0000004").is_dir()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in records if r["kind"] == "val"}
    assert sorted(val) == [0, 2, 4] and val[4] < val[2] < val[0]  # it learns
    samples = [r for r in records if r.get("event") == "samples"]
    assert len(samples) == 1 and samples[0]["prompts"] == ["Elizabeth", "It is a truth universally acknowledged"]
    assert [text.startswith(p) for text, p in zip(samples[0]["texts"], samples[0]["prompts"])] == [True, True]
    assert all(text in out for text in samples[0]["texts"])
    saved = yaml.safe_load((run_dir / "step-0000004" / "config.yaml").read_text())
    assert saved["model"]["num_blocks"] == 2 and saved["train"]["steps"] == 4
    # the same command with more steps continues the run
    assert main(["train", "--recipe", TINY, *SMALL, "train.steps=6", f"run_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step-0000004 at step 4" in out and "step 6/6" in out


def write_llama_recipe(tmp_path) -> str:
    recipe = tmp_path / "llama.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"arch": "llama", "vocab_size": 4096, "embedding_dim": 32, "num_blocks": 1, "num_heads": 2,
                  "max_seq_len": 128},
        "data": {"datasets": [{"path": SAMPLE}], "tokenizer": TOKENIZER, "seq_len": 64},
    }))
    return str(recipe)


BAD_INPUTS = {
    "unknown key": (["model.num_blockz=3"], ["unknown key 'model.num_blockz'", "num_blocks"]),
    "unknown section": (["trainer.steps=3"], ["unknown key 'trainer'", "train"]),
    "wrong type": (["train.steps=many"], ["train.steps = 'many'", "int"]),
    "bad choice": (["train.on_nonfinite=ignore"], ["train.on_nonfinite = 'ignore'", "'stop' | 'skip'"]),
    "missing data path": (["data.datasets=[{path: no/such/shards}]"], ["data.datasets[0].path", "no/such/shards"]),
    "missing tokenizer": (["data.tokenizer=no/such.model"], ["data.tokenizer", "no/such.model"]),
    "tokenizer larger than the model": (["model.vocab_size=1000"], ["model.vocab_size = 1000", "4096"]),
    "zero seq_len": (["data.seq_len=0"], ["data.seq_len = 0"]),
    "negative seq_len": (["data.seq_len=-8"], ["data.seq_len = -8"]),
    "missing recipe": (["--recipe", "no/such/recipe.yaml"], ["no/such/recipe.yaml"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    overrides, expected = BAD_INPUTS[case]
    run_dir = tmp_path / "run"
    code = main(["train", "--recipe", TINY, *SMALL, f"run_dir={run_dir}", *overrides])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for text in expected:
        assert text in err
    assert not run_dir.exists()  # checked before anything is written


def test_llama_sequence_longer_than_it_takes(tmp_path, capsys):
    code = main(["train", "--recipe", write_llama_recipe(tmp_path), "data.seq_len=256",
                 f"run_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2 and "data.seq_len = 256" in err and "model.max_seq_len = 128" in err
    assert not (tmp_path / "run").exists()


def test_bad_input_leaves_an_existing_run_alone(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--recipe", TINY, *SMALL, "train.steps=2", f"run_dir={run_dir}"]) == 0
    before = snapshot(run_dir)
    for overrides in (["model.vocab_size=1000"], ["model.embedding_dim=48"], ["checkpoint.resume=never"],
                      ["data.datasets=[{path: no/such/shards}]"]):
        code = main(["train", "--recipe", TINY, *SMALL, "train.steps=4", f"run_dir={run_dir}", *overrides])
        assert code == 2, overrides
        assert capsys.readouterr().err.startswith("error: ")
        assert snapshot(run_dir) == before


def test_console_script_has_no_traceback(tmp_path):
    result = run_cli("train", "train.steps=0", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2
    assert result.stderr == (f"error: train.steps = 0: expected an integer >= 1 (with overrides 'train.steps=0', "
                             f"'run_dir={tmp_path / 'run'}')\n")
    assert not (tmp_path / "run").exists()


def test_occupied_run_dir_console(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("precious")
    result = run_cli("train", *SMALL, "train.steps=1", f"run_dir={run_dir}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"run directory '{run_dir}' already holds files" in result.stderr
    assert snapshot(run_dir) == {"keep.txt": hashlib.sha256(b"precious").hexdigest()}


def test_wandb_offline_writes_into_the_run_dir(tmp_path, capsys):
    run_dir = tmp_path / "run"
    env_mode = os.environ.pop("WANDB_MODE", None)
    try:
        assert main(["train", "--recipe", TINY, *SMALL, "train.steps=1", "train.sample_tokens=0",
                     "logging.wandb=offline", f"run_dir={run_dir}"]) == 0
    finally:
        if env_mode is not None:
            os.environ["WANDB_MODE"] = env_mode
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and any(offline_runs[0].rglob("*.wandb"))


def test_prepare_data_is_wired(tmp_path, capsys):
    text = tmp_path / "a.txt"
    text.write_text("Some words of text.\n" * 50)
    code = main(["prepare-data", "--input", str(text), "--tokenizer", TOKENIZER, "--output",
                 str(tmp_path / "shards"), "--workers", "1", "--no-progress"])
    assert code == 0
    assert (tmp_path / "shards" / "manifest.json").is_file()


def test_export_hf_is_wired(tmp_path, capsys):
    (tmp_path / "step-0000004.tmp").mkdir()
    code = main(["export-hf", str(tmp_path / "step-0000004.tmp"), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "never completed" in err
    assert not (tmp_path / "out").exists()



def test_keyboard_interrupt_ends_in_one_line_and_exit_130(monkeypatch, capsys):
    """A second Ctrl-C raises KeyboardInterrupt in the trainer (tests/train/test_preemption.py); the
    command turns it into one line and the shell's exit code for SIGINT, not a traceback."""
    import xlstm_train.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info", "--recipe", TINY]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted: stopped without a checkpoint" in err
