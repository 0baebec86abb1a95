"""Scaling-law fits on synthetic points from a known law: Approach 3 recovers its parameters and its
bootstrap intervals cover them; Approach 2 recovers the compute-optimal exponents on IsoFLOP data."""

import csv
import json

import numpy as np
import pytest

from xlstm_train.cli import main
from xlstm_train.config import ConfigError
from xlstm_train.sweep.fit import PARAM_NAMES, Points, fit_isoflop, fit_parametric, predict_loss, read_results

# a Chinchilla-like law (Hoffmann et al. 2022 report E 1.69, A 406.4, alpha 0.34, B 410.7, beta 0.28)
TRUTH = (1.69, 406.4, 0.34, 410.7, 0.28)
FLOPS_PER_PARAM_TOKEN = 6.0


def grid_points(seed: int, noise: float = 0.005) -> Points:
    """Five sizes x five token counts, losses with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(3e7, 3e9, 5), np.geomspace(3e8, 3e11, 5)))
    L = predict_loss(TRUTH, N, D) * np.exp(rng.normal(0.0, noise, N.shape))
    return Points("synthetic", N, D, FLOPS_PER_PARAM_TOKEN * N * D, L, np.full(N.shape, np.nan))


def isoflop_points(seed: int, budgets=(1e18, 1e19, 1e20), noise: float = 0.002) -> Points:
    """Seven sizes per budget, spread evenly in log N around the law's optimum at that budget."""
    rng = np.random.default_rng(seed)
    E, A, alpha, B, beta = TRUTH
    G = (alpha * A / (beta * B)) ** (1 / (alpha + beta))
    N, D, C, budget = [], [], [], []
    for c in budgets:
        n_opt = G * (c / FLOPS_PER_PARAM_TOKEN) ** (beta / (alpha + beta))
        sizes = n_opt * np.geomspace(1 / 8, 8, 7)
        N += list(sizes)
        D += list(c / (FLOPS_PER_PARAM_TOKEN * sizes))
        C += [c] * len(sizes)
        budget += [c] * len(sizes)
    N, D = np.array(N), np.array(D)
    L = predict_loss(TRUTH, N, D) * np.exp(rng.normal(0.0, noise, N.shape))
    return Points("synthetic", N, D, np.array(C), L, np.array(budget))


def test_approach3_recovers_a_known_law():
    fit = fit_parametric(grid_points(seed=0), bootstrap=0)
    E, A, alpha, B, beta = fit.params
    assert E == pytest.approx(TRUTH[0], rel=0.05)
    assert alpha == pytest.approx(TRUTH[2], abs=0.03)
    assert beta == pytest.approx(TRUTH[4], abs=0.03)
    # A and B trade off against the exponents; the predicted losses are what must agree
    N, D = np.geomspace(1e8, 1e10, 4), np.geomspace(1e9, 1e12, 4)
    assert predict_loss(fit.params, N, D) == pytest.approx(predict_loss(TRUTH, N, D), rel=0.01)
    assert fit.residual_error < 0.02 and fit.num_points == 25
    # the compute-optimal size at a budget follows the law's closed form
    n_opt, d_opt, _ = fit.optimum(1e22)
    G = (TRUTH[2] * TRUTH[1] / (TRUTH[4] * TRUTH[3])) ** (1 / (TRUTH[2] + TRUTH[4]))
    assert n_opt == pytest.approx(G * (1e22 / 6) ** (TRUTH[4] / (TRUTH[2] + TRUTH[4])), rel=0.5)
    assert n_opt * d_opt * FLOPS_PER_PARAM_TOKEN == pytest.approx(1e22, rel=1e-6)


def test_approach3_intervals_cover_the_truth_in_most_seeds():
    seeds = range(5)
    covered = {name: 0 for name in PARAM_NAMES}
    for seed in seeds:
        fit = fit_parametric(grid_points(seed, noise=0.01), bootstrap=20, seed=seed)
        for name, true in zip(PARAM_NAMES, TRUTH):
            low, high = fit.ci[name]
            assert low <= high
            covered[name] += low <= true <= high
    assert all(count >= 3 for count in covered.values()), covered


def test_approach2_recovers_the_optimal_exponents():
    iso = fit_isoflop(isoflop_points(seed=0), bootstrap=50)
    alpha, beta = TRUTH[2], TRUTH[4]
    assert [b.budget for b in iso.budgets] == [1e18, 1e19, 1e20]
    assert all(b.inside for b in iso.budgets)
    assert iso.n_law[0] == pytest.approx(beta / (alpha + beta), abs=0.03)
    assert iso.d_law[0] == pytest.approx(alpha / (alpha + beta), abs=0.03)
    assert iso.n_law[0] + iso.d_law[0] == pytest.approx(1.0, abs=1e-6)  # N D = C / 6 along every budget
    low, high = iso.interval(iso.n_law_samples, 0)
    assert low <= iso.n_law[0] <= high and high - low < 0.1


def test_approach2_needs_isoflop_structure():
    assert fit_isoflop(grid_points(seed=0)) is None  # no budget has three sizes at one compute


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def test_fit_command_on_a_published_style_csv(tmp_path, capsys):
    points = isoflop_points(seed=1)
    rows = [{"arch": arch, "params": n, "tokens": d, "flops": c, "loss": loss * scale}
            for arch, scale in (("llama", 1.0), ("xlstm", 0.97))
            for n, d, c, loss in zip(points.N, points.D, points.C, points.L)]
    write_csv(tmp_path / "published.csv", rows, ["arch", "params", "tokens", "flops", "loss"])
    out = tmp_path / "fit"
    assert main(["fit", str(tmp_path / "published.csv"), "--out", str(out), "--bootstrap", "5",
                 "--predict-flops", "1e21"]) == 0
    fit = json.loads((out / "fit.json").read_text())
    assert sorted(fit) == ["llama", "xlstm"]
    for entry in fit.values():
        assert set(entry) == {"E", "A", "alpha", "B", "beta", "ci", "huber_delta", "num_points", "residual_error"}
        assert set(entry["ci"]) == set(PARAM_NAMES) and all(len(v) == 2 for v in entry["ci"].values())
        assert entry["num_points"] == 21 and entry["huber_delta"] == 1e-3
    iso = json.loads((out / "isoflop.json").read_text())
    assert len(iso["llama"]["budgets"]) == 3  # budgets found from the flops column alone
    predictions = json.loads((out / "predictions.json").read_text())
    assert predictions["xlstm"][0]["loss"] < predictions["llama"][0]["loss"]
    # no run directories in a published CSV: no recipe, said so
    assert not list(out.glob("optimal_*.yaml")) and "no recipe written" in capsys.readouterr().out
    for name in ("loss_vs_compute", "isoflop", "optimal_scaling", "residuals"):
        assert (out / f"{name}.png").stat().st_size > 0 and (out / f"{name}.svg").stat().st_size > 0


def test_results_with_missing_columns_are_refused(tmp_path, capsys):
    write_csv(tmp_path / "r.csv", [{"arch": "llama", "params": 1e8, "tokens": 1e9, "loss": 3.0}],
              ["arch", "params", "tokens", "loss"])
    with pytest.raises(ConfigError, match=r"lacks the column flops"):
        read_results(tmp_path / "r.csv")
    assert main(["fit", str(tmp_path / "r.csv"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "r.csv lacks the column flops" in err and "Required: arch, params, tokens, flops, loss" in err
    assert not (tmp_path / "out").exists()
