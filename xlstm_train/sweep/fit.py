"""Scaling-law fits of final loss against model size N and training tokens D (docs/scaling.md).

Approach 3 (Hoffmann et al. 2022, as Besiroglu et al. 2024 redid it): per architecture

    L(N, D) = E + A / N^alpha + B / D^beta

fitted in log space, ``log L ~ LSE(a - alpha log N, b - beta log D, e)`` with ``A = e^a``,
``B = e^b``, ``E = e^e``, by minimising the summed Huber loss (delta 1e-3) of the log residuals with
L-BFGS-B from every point of a grid of initialisations, keeping the best. Confidence intervals are
percentiles of the same fit on bootstrap resamples of the points.

Approach 2 (Hoffmann et al. 2022), where the points come in IsoFLOP groups: a parabola in log N per
budget, its minimum N*(C) and the D*(C) there, then the power laws N*(C) = k_N C^a and
D*(C) = k_D C^b, with bootstrap intervals (points resampled within each budget).
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from xlstm_train.config import ConfigError

REQUIRED_COLUMNS = ("arch", "params", "tokens", "flops", "loss")
PARAM_NAMES = ("E", "A", "alpha", "B", "beta")
HUBER_DELTA = 1e-3
# Hoffmann et al.'s grid of initialisations: alpha, beta in {0, 0.5, ..., 2}, e in {-1, -0.5, ..., 1},
# a, b in {0, 5, ..., 25}
INIT_GRID = {
    "a": np.arange(0.0, 30.0, 5.0),
    "b": np.arange(0.0, 30.0, 5.0),
    "e": np.arange(-1.0, 1.5, 0.5),
    "alpha": np.arange(0.0, 2.5, 0.5),
    "beta": np.arange(0.0, 2.5, 0.5),
}
# theta = (a, b, e, alpha, beta); the exponents stay non-negative, the rest in a wide box
BOUNDS = [(-30.0, 80.0), (-30.0, 80.0), (-10.0, 10.0), (0.0, 5.0), (0.0, 5.0)]


# ----------------------------------------------------------------------------------------------
# Reading results


@dataclass
class Points:
    arch: str
    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    budget: np.ndarray  # the IsoFLOP budget of each point (nan: none stated)
    run_dirs: list[str] = field(default_factory=list)


def read_results(path: str | Path, params_column: str = "params") -> dict[str, Points]:
    """The finished points of a results CSV, per architecture. Rows with a ``status`` other than
    ``done`` or without a finite positive loss are left out."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"results file not found: {path}")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        need = [c if c != "params" else params_column for c in REQUIRED_COLUMNS]
        missing = [c for c in need if c not in columns]
        if missing:
            raise ConfigError(f"results file {path} lacks the column{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}; it has: {', '.join(columns) or '(no header)'}. "
                              f"Required: {', '.join(need)}")
        rows = list(reader)
    per_arch: dict[str, list] = {}
    for n, row in enumerate(rows, start=2):
        if row.get("status", "done") not in ("done", ""):
            continue
        try:
            values = [float(row[c]) for c in (params_column, "tokens", "flops")]
            loss = float(row["loss"]) if row["loss"] not in ("", None) else math.nan
        except ValueError as e:
            raise ConfigError(f"results file {path}, line {n}: {e}; expected numbers in "
                              f"{params_column}, tokens, flops, loss") from None
        if not (math.isfinite(loss) and loss > 0) or min(values) <= 0:
            continue
        budget = row.get("flops_budget") or ""
        per_arch.setdefault(row["arch"], []).append(
            (*values, loss, float(budget) if budget else math.nan, row.get("run_dir", ""))
        )
    if not per_arch:
        raise ConfigError(f"results file {path} has no finished points (rows with a positive loss)")
    out = {}
    for arch, items in per_arch.items():
        N, D, C, L, budget, dirs = zip(*items)
        out[arch] = Points(arch, np.array(N), np.array(D), np.array(C), np.array(L), np.array(budget), list(dirs))
    return out


# ----------------------------------------------------------------------------------------------
# Approach 3


def _log_sum_exp3(t0: np.ndarray, t1: np.ndarray, t2: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """log(e^t0 + e^t1 + e^t2) and the three softmax weights, element-wise. Written out rather than
    scipy.special.logsumexp, whose per-call overhead dominates an objective over a few dozen points."""
    m = np.maximum(np.maximum(t0, t1), t2)
    w = [np.exp(t0 - m), np.exp(t1 - m), np.exp(t2 - m)]
    total = w[0] + w[1] + w[2]
    return m + np.log(total), [x / total for x in w]


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * (r / delta) ** 2, np.abs(r) / delta - 0.5)


def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Summed Huber loss of the log residuals and its gradient. The sum is divided by delta^2, which
    leaves the minimiser unchanged and keeps the objective away from the tiny values at which a
    relative stopping rule ends the search early (what Besiroglu et al. found in the original fit)."""
    a, b, e, alpha, beta = theta
    pred, weights = _log_sum_exp3(a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e))
    r = pred - log_l
    d_r = np.where(np.abs(r) <= delta, r / delta**2, np.sign(r) / delta)
    grad = np.array([
        d_r @ weights[0],
        d_r @ weights[1],
        d_r @ weights[2],
        -(d_r * weights[0]) @ log_n,
        -(d_r * weights[1]) @ log_d,
    ])
    return float(_huber(r, delta).sum()), grad


def _objective_many(thetas: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    """The objective at many starting points at once (to rank a grid of initialisations)."""
    a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    pred, _ = _log_sum_exp3(a - alpha * log_n, b - beta * log_d, np.broadcast_to(e, (len(thetas), len(log_n))))
    return _huber(pred - log_l, delta).sum(axis=1)


def init_grid(grid: dict[str, np.ndarray] = INIT_GRID) -> np.ndarray:
    return np.array(list(itertools.product(grid["a"], grid["b"], grid["e"], grid["alpha"], grid["beta"])))


def _one_blas_thread():
    """L-BFGS-B calls BLAS on five-element vectors; with a multi-threaded BLAS every call pays for
    waking its threads, which on a busy machine makes a fit many times slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _fit_from(starts: np.ndarray, log_n, log_d, log_l, delta) -> np.ndarray:
    best, best_loss = None, math.inf
    for x0 in starts:
        result = minimize(_objective, x0, args=(log_n, log_d, log_l, delta), jac=True, method="L-BFGS-B",
                          bounds=BOUNDS, options={"maxiter": 500, "ftol": 1e-12, "gtol": 1e-8})
        if result.fun < best_loss:
            best, best_loss = result.x, result.fun
    return best


def _to_params(theta: np.ndarray) -> np.ndarray:
    a, b, e, alpha, beta = theta
    return np.array([math.exp(e), math.exp(a), alpha, math.exp(b), beta])  # E, A, alpha, B, beta


def predict_loss(params, N, D):
    E, A, alpha, B, beta = params
    return E + A / np.asarray(N, dtype=float) ** alpha + B / np.asarray(D, dtype=float) ** beta


@dataclass
class ParametricFit:
    arch: str
    params: np.ndarray  # E, A, alpha, B, beta
    ci: dict[str, list[float]]
    huber_delta: float
    num_points: int
    residual_error: float  # root-mean-square of log(predicted) - log(observed)
    samples: np.ndarray  # bootstrap estimates, (n, 5)
    flops_per_param_token: float  # median of C / (N D) over the points, for C(N, D) = k N D

    def as_json(self) -> dict:
        out = {name: float(v) for name, v in zip(PARAM_NAMES, self.params)}
        out.update(ci=self.ci, huber_delta=self.huber_delta, num_points=self.num_points,
                   residual_error=self.residual_error)
        return out

    def optimum(self, C: float, params=None) -> tuple[float, float, float]:
        """Compute-optimal (N, D, loss) at budget C under C = k N D: minimising L along the budget
        gives N = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
        E, A, alpha, B, beta = self.params if params is None else params
        budget = C / self.flops_per_param_token
        G = (alpha * A / (beta * B)) ** (1.0 / (alpha + beta))
        N = G * budget ** (beta / (alpha + beta))
        D = budget / N
        return float(N), float(D), float(predict_loss((E, A, alpha, B, beta), N, D))

    def optimum_interval(self, C: float, level: float = 0.95) -> dict[str, list[float]]:
        values = np.array([self.optimum(C, s) for s in self.samples if s[2] > 0 and s[4] > 0])
        if len(values) == 0:
            return {}
        lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
        return {key: [float(np.percentile(values[:, i], lo)), float(np.percentile(values[:, i], hi))]
                for i, key in enumerate(("N", "D", "loss"))}


def fit_parametric(points: Points, *, bootstrap: int = 1000, delta: float = HUBER_DELTA, level: float = 0.95,
                   grid: dict[str, np.ndarray] = INIT_GRID, starts: int = 32, bootstrap_starts: int = 1,
                   seed: int = 0) -> ParametricFit:
    """Approach 3 on one architecture's points, with percentile bootstrap intervals.

    Every point of ``grid`` is scored by the objective; L-BFGS-B runs from the ``starts`` best of
    them and the lowest optimum wins. A bootstrap fit starts from the full fit's optimum and from
    the ``bootstrap_starts`` grid points best on that resample."""
    with _one_blas_thread():
        return _fit_parametric(points, bootstrap, delta, level, grid, starts, bootstrap_starts, seed)


def _fit_parametric(points, bootstrap, delta, level, grid, starts, bootstrap_starts, seed) -> ParametricFit:
    log_n, log_d, log_l = np.log(points.N), np.log(points.D), np.log(points.L)
    grid_points = init_grid(grid)
    ranked = grid_points[np.argsort(_objective_many(grid_points, log_n, log_d, log_l, delta))]
    theta = _fit_from(ranked[:starts], log_n, log_d, log_l, delta)
    params = _to_params(theta)
    residual = np.log(predict_loss(params, points.N, points.D)) - log_l
    rng = np.random.default_rng(seed)
    samples = []
    n = len(log_n)
    for _ in range(bootstrap):
        idx = rng.integers(0, n, n)
        ln, ld, ll = log_n[idx], log_d[idx], log_l[idx]
        ranked = grid_points[np.argsort(_objective_many(grid_points, ln, ld, ll, delta))[:bootstrap_starts]]
        samples.append(_to_params(_fit_from(np.vstack([theta, ranked]), ln, ld, ll, delta)))
    samples = np.array(samples).reshape(-1, 5)
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    ci = {name: ([float(np.percentile(samples[:, i], lo)), float(np.percentile(samples[:, i], hi))]
                 if len(samples) else [math.nan, math.nan]) for i, name in enumerate(PARAM_NAMES)}
    return ParametricFit(
        arch=points.arch, params=params, ci=ci, huber_delta=delta, num_points=n,
        residual_error=float(np.sqrt(np.mean(residual**2))), samples=samples,
        flops_per_param_token=float(np.median(points.C / (points.N * points.D))),
    )


# ----------------------------------------------------------------------------------------------
# Approach 2


def isoflop_groups(points: Points, tolerance: float = 0.1) -> list[np.ndarray]:
    """Indices of the points of each IsoFLOP budget: the stated ``flops_budget`` where there is one,
    else points whose FLOPs lie within ``tolerance`` (relative) of a group's smallest."""
    if np.all(np.isfinite(points.budget)):
        return [np.flatnonzero(points.budget == b) for b in np.unique(points.budget)]
    order = np.argsort(points.C)
    groups, current = [], [order[0]]
    for i in order[1:]:
        if points.C[i] <= points.C[current[0]] * (1 + tolerance):
            current.append(i)
        else:
            groups.append(np.array(current))
            current = [i]
    groups.append(np.array(current))
    return groups


@dataclass
class IsoFlopBudget:
    budget: float
    N_opt: float
    D_opt: float
    loss_opt: float
    coeffs: list[float]  # loss = c2 x^2 + c1 x + c0, x = log10 N
    inside: bool  # the minimum lies within the sampled sizes


@dataclass
class IsoFlopFit:
    arch: str
    budgets: list[IsoFlopBudget]
    n_law: tuple[float, float]  # (exponent a, log10 k_N): N*(C) = k_N C^a
    d_law: tuple[float, float]
    n_law_samples: np.ndarray  # bootstrap (a, log10 k), (m, 2)
    d_law_samples: np.ndarray
    level: float

    def interval(self, samples: np.ndarray, i: int) -> list[float]:
        if len(samples) == 0:
            return [math.nan, math.nan]
        lo, hi = 100 * (1 - self.level) / 2, 100 * (1 + self.level) / 2
        return [float(np.percentile(samples[:, i], lo)), float(np.percentile(samples[:, i], hi))]

    def as_json(self) -> dict:
        return {
            "budgets": [{"flops": b.budget, "N_opt": b.N_opt, "D_opt": b.D_opt, "loss_opt": b.loss_opt,
                         "parabola_log10N": b.coeffs, "minimum_inside_sampled_sizes": b.inside}
                        for b in self.budgets],
            "N_opt_law": {"exponent": self.n_law[0], "coefficient": 10 ** self.n_law[1],
                          "ci": {"exponent": self.interval(self.n_law_samples, 0),
                                 "log10_coefficient": self.interval(self.n_law_samples, 1)}},
            "D_opt_law": {"exponent": self.d_law[0], "coefficient": 10 ** self.d_law[1],
                          "ci": {"exponent": self.interval(self.d_law_samples, 0),
                                 "log10_coefficient": self.interval(self.d_law_samples, 1)}},
        }


def _budget_minimum(points: Points, idx: np.ndarray) -> IsoFlopBudget | None:
    x = np.log10(points.N[idx])
    if len(np.unique(x)) < 3:
        return None
    c2, c1, c0 = np.polyfit(x, points.L[idx], 2)
    if c2 <= 0:
        return None  # no minimum: the curve opens downwards
    x_opt = -c1 / (2 * c2)
    slope, intercept = np.polyfit(x, np.log10(points.D[idx]), 1)  # D falls as N grows at fixed C
    stated = points.budget[idx[0]]
    budget = stated if np.isfinite(stated) else float(np.exp(np.mean(np.log(points.C[idx]))))
    return IsoFlopBudget(budget=float(budget), N_opt=float(10**x_opt), D_opt=float(10 ** (slope * x_opt + intercept)),
                         loss_opt=float(c0 - c1**2 / (4 * c2)), coeffs=[float(c2), float(c1), float(c0)],
                         inside=bool(x.min() <= x_opt <= x.max()))


def _power_laws(budgets: list[IsoFlopBudget]) -> tuple[tuple[float, float], tuple[float, float]]:
    log_c = np.log10([b.budget for b in budgets])
    n_law = np.polyfit(log_c, np.log10([b.N_opt for b in budgets]), 1)
    d_law = np.polyfit(log_c, np.log10([b.D_opt for b in budgets]), 1)
    return (float(n_law[0]), float(n_law[1])), (float(d_law[0]), float(d_law[1]))


def fit_isoflop(points: Points, *, bootstrap: int = 1000, level: float = 0.95, seed: int = 0) -> IsoFlopFit | None:
    """Approach 2, or None when fewer than two budgets have a parabola with a minimum."""
    groups = [g for g in isoflop_groups(points) if len(np.unique(points.N[g])) >= 3]
    budgets = [b for b in (_budget_minimum(points, g) for g in groups) if b is not None]
    if len(budgets) < 2:
        return None
    n_law, d_law = _power_laws(budgets)
    rng = np.random.default_rng(seed)
    n_samples, d_samples = [], []
    for _ in range(bootstrap):
        resampled = [_budget_minimum(points, rng.choice(g, len(g))) for g in groups]
        resampled = [b for b in resampled if b is not None]
        if len(resampled) < 2 or len({b.budget for b in resampled}) < 2:
            continue
        n_s, d_s = _power_laws(resampled)
        n_samples.append(n_s)
        d_samples.append(d_s)
    return IsoFlopFit(points.arch, budgets, n_law, d_law, np.array(n_samples).reshape(-1, 2),
                      np.array(d_samples).reshape(-1, 2), level)


# ----------------------------------------------------------------------------------------------
# The `fit` command's outputs


def _write_optimal_recipes(results: Path, predictions: dict, out: Path) -> None:
    """``optimal_<arch>.yaml`` per architecture (``optimal_<arch>_C<budget>.yaml`` for several budgets)."""
    from xlstm_train.sweep.optimal import write_optimal_recipe
    from xlstm_train.sweep.plan import format_flops

    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    for arch, items in predictions.items():
        for item in items:
            suffix = f"_C{format_flops(item['flops'])}" if len(items) > 1 else ""
            path = write_optimal_recipe(rows, results, arch, item["flops"], item["N"], item["D"], item["loss"],
                                        item["ci"], out / f"optimal_{arch}{suffix}.yaml")
            if path is None:
                print(f"{arch}: no recipe written; {results} names no finished run of it with a config.yaml "
                      "(and steps, tokens) to take the model's shape from")
            else:
                print(f"{arch} at C = {item['flops']:.3g}: recipe {path}")


def run_fit(results: str | Path, out_dir: str | Path, *, bootstrap: int = 1000, delta: float = HUBER_DELTA,
            params_column: str = "params", predict_flops: list[float] = (), plots: bool = True) -> dict:
    """Fit every architecture in ``results``; write ``fit.json`` (Approach 3), ``isoflop.json``
    (Approach 2, where the data allow), predictions and plots into ``out_dir``."""
    import json

    if bootstrap < 0:
        raise ConfigError(f"--bootstrap {bootstrap}: expected an integer >= 0")
    for C in predict_flops:
        if not C > 0:
            raise ConfigError(f"--predict-flops {C}: expected a positive number of FLOPs")
    data = read_results(results, params_column)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parametric, isoflop = {}, {}
    for arch, points in sorted(data.items()):
        if len(points.L) < 5:
            print(f"{arch}: {len(points.L)} points; Approach 3 needs at least 5 (five parameters), skipped")
            continue
        parametric[arch] = fit_parametric(points, bootstrap=bootstrap, delta=delta)
        iso = fit_isoflop(points, bootstrap=bootstrap)
        if iso is not None:
            isoflop[arch] = iso
        f = parametric[arch]
        print(f"{arch}: L = {f.params[0]:.4g} + {f.params[1]:.4g}/N^{f.params[2]:.4g} + "
              f"{f.params[3]:.4g}/D^{f.params[4]:.4g}  ({f.num_points} points, rms log residual "
              f"{f.residual_error:.3g}, {bootstrap} bootstrap resamples)")
    (out / "fit.json").write_text(json.dumps({a: f.as_json() for a, f in parametric.items()}, indent=2))
    if isoflop:
        (out / "isoflop.json").write_text(json.dumps({a: f.as_json() for a, f in isoflop.items()}, indent=2))
    predictions = {}
    for C in predict_flops:
        for arch, f in parametric.items():
            N, D, loss = f.optimum(C)
            predictions.setdefault(arch, []).append(
                {"flops": C, "N": N, "D": D, "loss": loss, "ci": f.optimum_interval(C)})
            print(f"{arch} at C = {C:.3g}: N = {N:.4g}, D = {D:.4g}, predicted loss {loss:.4f}")
    if predictions:
        (out / "predictions.json").write_text(json.dumps(predictions, indent=2))
        _write_optimal_recipes(Path(results), predictions, out)
    if plots and parametric:
        from xlstm_train.sweep.plots import plot_all

        plot_all(data, parametric, isoflop, out)
    return {"parametric": parametric, "isoflop": isoflop, "predictions": predictions}
