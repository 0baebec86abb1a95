"""Plots of a fit (PNG and SVG): loss against compute with the fitted frontier, IsoFLOP curves with
their minima, N*(C) and D*(C) with interval bands, and the residuals; all architectures on one set
of axes per plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _save(fig, out: Path, name: str) -> None:
    for ext in ("png", "svg"):
        fig.savefig(out / f"{name}.{ext}", dpi=120, bbox_inches="tight")


def _minor_ticks_unlabelled(*axes) -> None:
    """Log axes over less than a decade label their minor ticks, which then collide."""
    from matplotlib.ticker import NullFormatter

    for ax in axes:
        for axis, scale, (low, high) in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()),
                                         (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale == "log" and low > 0 and high / low > 10:  # under a decade the minor labels are all there is
                axis.set_minor_formatter(NullFormatter())


def plot_all(data: dict, parametric: dict, isoflop: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xlstm_train.sweep.fit import _budget_minimum, isoflop_groups, predict_loss

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
    _minor_ticks_unlabelled(ax)
    _save(fig, out, "loss_vs_compute")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for arch, points in data.items():
        # every budget's points and, where the parabola has a minimum, the parabola and its minimum
        # (drawn here even when too few budgets have one for the power laws of Approach 2)
        groups = [g for g in isoflop_groups(points) if len(np.unique(points.N[g])) >= 3]
        for g in groups:
            order = g[np.argsort(points.N[g])]
            ax.plot(points.N[order], points.L[order], "o", ms=4, color=colors[arch],
                    label=arch if g is groups[0] else None)
            drawn = True
            b = _budget_minimum(points, g)
            x = np.linspace(np.log10(points.N[g].min()) - 0.1, np.log10(points.N[g].max()) + 0.1, 50)
            c2, c1, c0 = b.coeffs if b is not None else np.polyfit(np.log10(points.N[g]), points.L[g], 2)
            ax.plot(10**x, np.polyval([c2, c1, c0], x), color=colors[arch], alpha=0.6,
                    ls="-" if b is not None else ":")
            if b is not None:
                ax.scatter([b.N_opt], [b.loss_opt], marker="*", s=80, color=colors[arch], zorder=3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="validation loss",
           title="IsoFLOP curves and minima (dotted: no minimum)")
    if drawn:
        ax.legend(fontsize=7)
    _minor_ticks_unlabelled(ax)
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
        else:
            ax.text(0.5, 0.5, "no IsoFLOP power law: it needs two or more\nbudgets whose parabola has a minimum",
                    ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set(xticks=[], yticks=[])
    axes[0].set_title("compute-optimal parameters")
    axes[1].set_title("compute-optimal tokens")
    _minor_ticks_unlabelled(*axes)
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
    _minor_ticks_unlabelled(ax)
    _save(fig, out, "residuals")
    plt.close(fig)
