"""Plots of a fit (PNG and SVG): loss against compute with the fitted frontier, IsoFLOP curves with
their minima, N*(C) and D*(C) with interval bands, and the residuals; all architectures on one set
of axes per plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig, out: Path, name: str) -> None:
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", dpi=120, bbox_inches="tight")


def plot_all(data: dict, parametric: dict, isoflop: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlstm_train.sweep.fit import predict_loss

    colors = dict(zip(sorted(data), plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in data.items():
        ax.scatter(points.C, points.L, s=18, color=colors[name], label=f"{name} runs")
        if name in parametric:
            f = parametric[name]
            C = np.geomspace(points.C.min() / 2, points.C.max() * 4, 60)
            ax.plot(C, [f.optimum(c)[2] for c in C], color=colors[name], label=f"{name} compute-optimal fit")
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="validation loss", title="Loss against compute")
    ax.legend(fontsize=7)
    _save(fig, out, "loss_vs_compute")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, iso in isoflop.items():
        for b in iso.budgets:
            x = np.linspace(np.log10(data[arch].N.min()) - 0.1, np.log10(data[arch].N.max()) + 0.1, 50)
            ax.plot(10**x, np.polyval(b.coeffs, x), color=colors[arch], alpha=0.6)
            ax.scatter([b.N_opt], [b.loss_opt], marker="*", s=80, color=colors[arch])
        points = data[arch]
        ax.scatter(points.N, points.L, s=14, color=colors[arch], label=arch)
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss", title="IsoFLOP curves and minima")
    if isoflop:
        ax.legend(fontsize=7)
    _save(fig, out, "isoflop")
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for arch, iso in isoflop.items():
        C_obs = np.array([b.budget for b in iso.budgets])
        C = np.geomspace(C_obs.min() / 3, C_obs.max() * 3, 40)
        for ax, law, samples, values, label in (
            (axes[0], iso.n_law, iso.n_law_samples, [b.N_opt for b in iso.budgets], "N*(C)"),
            (axes[1], iso.d_law, iso.d_law_samples, [b.D_opt for b in iso.budgets], "D*(C)"),
        ):
            ax.scatter(C_obs, values, color=colors[arch])
            ax.plot(C, 10 ** (law[0] * np.log10(C) + law[1]), color=colors[arch], label=f"{arch}: C^{law[0]:.2f}")
            if len(samples):
                curves = 10 ** (samples[:, :1] * np.log10(C)[None] + samples[:, 1:])
                lo, hi = np.percentile(curves, [100 * (1 - iso.level) / 2, 100 * (1 + iso.level) / 2], axis=0)
                ax.fill_between(C, lo, hi, color=colors[arch], alpha=0.2)
            ax.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel=label)
    for ax in axes:
        if isoflop:
            ax.legend(fontsize=7)
    axes[0].set_title("compute-optimal parameters")
    axes[1].set_title("compute-optimal tokens")
    _save(fig, out, "optimal_scaling")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, f in parametric.items():
        points = data[arch]
        residual = np.log(predict_loss(f.params, points.N, points.D)) - np.log(points.L)
        ax.scatter(points.C, residual, s=18, color=colors[arch], label=arch)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="log L_fit - log L", title="Approach 3 residuals")
    ax.legend(fontsize=7)
    _save(fig, out, "residuals")
    plt.close(fig)
