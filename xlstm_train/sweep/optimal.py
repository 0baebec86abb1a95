"""The compute-optimal point of a fit, written out as a recipe one can train (``fit --predict-flops``).

The fit gives a parameter count N* and a token count D*, not a model. The recipe takes its shape from
the sweep's own run of that architecture closest in size to N* (its ``config.yaml``), keeps its depth,
heads and every other setting, and picks the ``embedding_dim`` whose model comes closest to N*; the
run length is D* over the template's tokens per step, with the template's warmup fraction.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from xlstm_train.config import ConfigError, from_dict, read_recipe, to_dict
from xlstm_train.sweep.plan import format_count, format_flops, model_counts

# embedding_dim candidates are multiples of this times the lcm of the model's head counts, so that
# every head width stays a multiple of it
WIDTH_QUANTUM = 8


def _template_row(rows: list[dict], arch: str, N: float, results_path: Path) -> tuple[dict, Path] | None:
    """The finished run of ``arch`` closest to N (in log N) whose directory still holds config.yaml."""
    candidates = []
    for row in rows:
        if row.get("arch") != arch or row.get("status", "done") not in ("done", "") or not row.get("run_dir"):
            continue
        if not row.get("steps") or not row.get("tokens"):
            continue  # the template's tokens per step come from its row
        run_dir = Path(row["run_dir"])
        for where in (run_dir, results_path.parent / run_dir.name):  # recorded path, or next to the CSV
            if (where / "config.yaml").is_file():
                candidates.append((abs(math.log(float(row["params"]) / N)), row, where / "config.yaml"))
                break
    if not candidates:
        return None
    _, row, config_path = min(candidates, key=lambda c: c[0])
    return row, config_path


def _heads_lcm(model: dict) -> int:
    heads = [v for k, v in model.items() if k.endswith("num_heads") and isinstance(v, int) and v > 0]
    return math.lcm(*heads) if heads else 1


def _sized_model(template: dict, N: float) -> tuple[dict, int]:
    """The template's model section with the embedding_dim whose parameter count is closest to N."""
    from xlstm_train.train.config import Config

    def count(width: int) -> tuple[dict, int] | None:
        data = {**template, "model": {**template["model"], "embedding_dim": width}}
        try:
            cfg = from_dict(Config, data)
            return to_dict(cfg.model), model_counts(cfg.model)[0]
        except (ConfigError, ValueError):
            return None  # a width this architecture cannot take (a head or block size that does not divide)

    width = int(template["model"]["embedding_dim"])
    quantum = WIDTH_QUANTUM * _heads_lcm(template["model"])
    # at fixed depth the count is a quadratic in the width (blocks) plus a linear part (embeddings,
    # which dominate small models): fit it through three widths the template's divisibility allows,
    # solve for N, and look at the valid widths around that
    widths = [width, 2 * width, 3 * width]
    counts = [count(w) for w in widths]
    if any(c is None for c in counts):
        raise ConfigError(f"{template['model']['arch']}: the template's embedding_dim {width} times 2 or 3 "
                          "is not a valid width; write the recipe by hand from predictions.json")
    c2, c1, c0 = np.polyfit(widths, [c[1] for c in counts], 2)
    roots = [r.real for r in np.roots([c2, c1, c0 - N]) if abs(r.imag) < 1e-9 and r.real > 0]
    guess = max(1, round((max(roots) if roots else width) / quantum))
    best = None
    for k in range(max(1, guess - 4), guess + 5):
        found = count(k * quantum)
        if found is not None and (best is None or abs(math.log(found[1] / N)) < abs(math.log(best[1] / N))):
            best = found
    if best is None:
        raise ConfigError(f"no embedding_dim near {guess * quantum} gives a valid {template['model']['arch']} "
                          "model; write the recipe by hand from predictions.json")
    return best


def write_optimal_recipe(rows: list[dict], results_path: Path, arch: str, C: float, N: float, D: float,
                         loss: float, interval: dict, path: Path) -> Path | None:
    """Write the recipe of the compute-optimal run of ``arch`` at budget C to ``path``; None when the
    results name no run of that architecture whose config.yaml can serve as the template."""
    found = _template_row(rows, arch, N, results_path)
    if found is None:
        return None
    row, config_path = found
    template = read_recipe(config_path)
    model, n_params = _sized_model(template, N)
    tokens_per_step = float(row["tokens"]) / float(row["steps"])
    steps = max(1, round(D / tokens_per_step))
    template_steps = int(template["train"]["steps"])
    warmup_fraction = int(template["optim"].get("warmup_steps", 0)) / template_steps
    name = f"optimal-{arch}-C{format_flops(C)}"
    recipe = dict(template)
    recipe.update(name=name, run_dir=str(Path("runs") / name), model=model)
    recipe["train"] = {**template["train"], "steps": steps}
    recipe["optim"] = {**template["optim"], "warmup_steps": round(warmup_fraction * steps)}

    def span(key: str) -> str:
        low_high = interval.get(key)
        return f" (95% interval {low_high[0]:.4g} to {low_high[1]:.4g})" if low_high else ""

    header = [
        f"# The compute-optimal {arch} run at C = {C:.4g} training FLOPs, from the Approach 3 fit of",
        f"# {results_path}:",
        f"#   N* = {N:.4g} parameters{span('N')}",
        f"#   D* = {D:.4g} tokens{span('D')}",
        f"#   predicted final validation loss {loss:.4f}{span('loss')}",
        f"# The shape is that of the run '{row.get('name', config_path.parent.name)}' ({config_path}) with",
        f"# embedding_dim {model['embedding_dim']}: {format_count(n_params)} parameters; {steps} steps of "
        f"{tokens_per_step:.0f} tokens = {format_count(steps * tokens_per_step)} tokens.",
        f"#   xlstm-train train --recipe {path}",
    ]
    path.write_text("\n".join(header) + "\n" + yaml.safe_dump(recipe, sort_keys=False))
    return path


__all__ = ["write_optimal_recipe"]
