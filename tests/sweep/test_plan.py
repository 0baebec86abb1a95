"""Sweep recipes expanded into runs: the dry-run table, the shipped recipes, and bad input refused by
name (exit code 2) before anything is written."""

from pathlib import Path

import pytest
import yaml

from xlstm_train.cli import main
from xlstm_train.sweep.plan import format_table, load_sweep
from xlstm_train.train.flops import flops_per_token

REPO = Path(__file__).resolve().parents[2]
TINY_SWEEP = REPO / "recipes" / "sweeps" / "tiny.yaml"


def tiny_sweep(**changes) -> dict:
    """The tiny sweep recipe with an absolute base, changed at dotted keys ('sweep.flops': [...])."""
    data = yaml.safe_load(TINY_SWEEP.read_text())
    data["base"] = str(REPO / "recipes" / "tiny.yaml")
    for dotted, value in changes.items():
        node, *path, last = [data, *dotted.split(".")]
        for part in path:
            node = node[part]
        if value is None:
            node.pop(last)
        else:
            node[last] = value
    return data


def write(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def test_tiny_plan_follows_the_flop_count(tmp_path):
    sweep = load_sweep(TINY_SWEEP, sweep_dir=tmp_path / "s", world_size=1)
    assert len(sweep.points) == 12 and {p.arch for p in sweep.points} == {"xlstm-7-1", "llama"}
    for p in sweep.points:
        # D = C / flops_per_token(model, seq_len), rounded to whole steps of 8 x 64 tokens
        assert p.tokens_per_step == 8 * 64
        assert p.flops_per_token == flops_per_token(p.cfg.model, 64)
        assert abs(p.tokens - p.flops_budget / p.flops_per_token) <= p.tokens_per_step / 2
        assert p.cfg.train.steps == p.steps and p.cfg.optim.warmup_steps == max(1, round(0.1 * p.steps))
        assert p.run_dir == tmp_path / "s" / p.name and p.cfg.checkpoint.resume == "auto"
    by_name = {p.name: p for p in sweep.points}
    assert by_name["xlstm71-w16_C2e10"].steps == 2 * by_name["xlstm71-w16_C1e10"].steps
    assert by_name["llama-w48_C1e10"].params > by_name["llama-w16_C1e10"].params


def test_dry_run_prints_the_table_and_writes_nothing(tmp_path, capsys):
    assert main(["sweep", str(TINY_SWEEP), "--dry-run", "--sweep-dir", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header == ["#", "name", "arch", "params", "non-emb", "tokens", "FLOPs", "steps", "batch", "lr", "status"]
    assert "llama-w32_C2e10" in out and "12 points" in out and "8x64" in out
    assert not (tmp_path / "s").exists()


def test_paper_sweep_keeps_the_papers_points():
    sweep = load_sweep(REPO / "recipes" / "sweeps" / "paper_15b.yaml", world_size=8)
    assert len(sweep.points) == 12
    assert {p.arch for p in sweep.points} == {"llama", "xlstm-1-0", "xlstm-7-1"}
    for p in sweep.points:
        assert p.steps == 28610 and p.cfg.optim.warmup_steps == 750  # 15B tokens at 256 x 2048
    assert "256x2048" in format_table(sweep)


def test_isoflop_sweep_budgets():
    sweep = load_sweep(REPO / "recipes" / "sweeps" / "isoflop.yaml", world_size=8)
    assert {p.arch for p in sweep.points} == {"xlstm_large", "llama"} and not sweep.left_out
    assert {p.flops_budget for p in sweep.points} == {1e19, 3e19, 1e20}
    for p in sweep.points:
        assert p.flops == pytest.approx(p.flops_budget, rel=0.01)


BAD_INPUT = [
    ({"sweep.grid": {"optim.learning_rate": [1e-3, 2e-3]}},
     "sweep.grid key 'optim.learning_rate' is not a recipe key"),
    ({"sweep.flops": [1.0e6, 1.0e10]},
     "sweep.flops budget 1e+06 is too small for every model"),
    ({"sweep.models": [{"name": "a", "model": {"arch": "llama", "vocab_size": 4096, "embedding_dim": 16,
                                              "num_blocks": 2, "num_heads": 2}},
                       {"name": "b", "model": {"arch": "llama", "vocab_size": 4096, "embedding_dim": 16,
                                              "num_blocks": 2, "num_heads": 2}}]},
     "points 'a_C1e10' and 'b_C1e10' resolve to the same run"),
    ({"sweep.flops": None, "sweep.min_steps": None, "sweep.points": [
        {"model": "llama-w16", "tokens": 4096}, {"model": "llama-w16", "tokens": 4096,
                                                 "overrides": {"optim.lr": 1e-3}}]},
     "points 1 and 2 both resolve to the run 'llama-w16_D4.1k'"),
    ({"sweep.sizes": [1, 2]}, "unknown key 'sweep.sizes'"),
    ({"fit.predict_flops": ["lots"]}, "fit.predict_flops[0] = 'lots': expected a number > 0"),
    ({"sweep.models": [{"name": "x", "recipe": "recipes/nope.yaml"}]}, "sweep.models[0].recipe = 'recipes/nope.yaml'"),
]


@pytest.mark.parametrize("changes, message", BAD_INPUT, ids=["grid-key", "small-budget", "same-run", "same-dir",
                                                             "sweep-key", "fit-flops", "missing-recipe"])
def test_bad_input_is_refused_by_name(tmp_path, capsys, changes, message):
    recipe = write(tmp_path, tiny_sweep(**changes))
    sweep_dir = tmp_path / "runs"
    assert main(["sweep", recipe, "--sweep-dir", str(sweep_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert err.count("\n") == 1  # one line
    assert not sweep_dir.exists()  # nothing ran, nothing was written
