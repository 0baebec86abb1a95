"""Sweep recipes: a ``sweep:`` block over a base recipe, expanded into ordinary training runs.

A sweep recipe::

    name: tiny-scaling                  # the sweep's name: its directory and its wandb group
    base: recipes/tiny.yaml             # the recipe every point starts from (unless a model names its own)
    sweep_dir: runs/sweeps/tiny         # default: runs/sweeps/<name>
    overrides: {train.eval_interval: 0} # dotted keys set on every point
    sweep:
      models:                           # the model sizes, each with a readable name
        - {name: xlstm-w64, model: {arch: xlstm_blocks, embedding_dim: 64, ...}}  # replaces base's model
        - {name: llama-125m, recipe: recipes/llama/125m.yaml}                   # a whole recipe as base
        - {name: x10-125m, label: xlstm-1-0, recipe: recipes/paper/125m_1-0.yaml}  # label: see below
      tokens: [2.0e9, 8.0e9]            # token budgets, or
      flops: [1.0e19, 3.0e19]           # IsoFLOP budgets: D = C / flops_per_token(model, seq_len)
      grid: {optim.lr: [1.0e-3, 3.0e-3]}  # more axes: the product of everything
      points:                           # or an explicit list instead of the product
        - {model: xlstm-w64, tokens: 2.0e9, overrides: {optim.lr: 2.0e-3}}
      warmup_fraction: 0.05             # each run warms up over this fraction of its own steps
      min_steps: 20                     # IsoFLOP pairs with fewer steps are left out of the plan
    fit: {bootstrap: 1000, predict_flops: [1.0e21]}   # what `xlstm-train sweep` fits at the end
    slurm: {partition: gpu, gpus_per_node: 8, timeout_min: 1440}  # for --launcher slurm / sbatch

A model's ``label`` (default: its ``model.arch``) is the curve it belongs to: the ``arch`` column of
results.csv and the unit of every fit, so that xLSTM[1:0] and xLSTM[7:1], one architecture in the
registry, get a law each.

Every point is a ``Config`` that ``train(cfg)`` runs as it is: its steps follow from its token
budget and the recipe's global batch, its warmup from ``warmup_fraction`` (cosine and WSD decay
already follow ``train.steps``). Everything is checked before the first point runs.
"""

from __future__ import annotations

import copy
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xlstm_train.config import ConfigError, from_dict, read_recipe, to_dict

TOP_LEVEL_KEYS = {"name", "base", "sweep_dir", "overrides", "sweep", "fit", "slurm"}
SWEEP_KEYS = {"models", "tokens", "flops", "grid", "points", "warmup_fraction", "min_steps"}
MODEL_ENTRY_KEYS = {"name", "label", "recipe", "model", "overrides"}
POINT_KEYS = {"model", "tokens", "flops", "overrides"}
FIT_KEYS = {"bootstrap", "huber_delta", "predict_flops", "params_column"}
SLURM_KEYS = {"partition", "account", "qos", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb",
              "timeout_min", "array_parallelism", "constraint"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")


@dataclass
class ModelEntry:
    name: str
    label: str | None  # the curve in results.csv and the fit; None: the model's arch
    recipe: Path | None  # a whole recipe as this model's base, or None: the sweep's base
    model: dict | None  # the model section, replacing the base's
    overrides: dict


@dataclass
class SweepPoint:
    """One run of the sweep: an ordinary run directory ``SWEEP_DIR/<name>``."""

    index: int
    name: str
    model_name: str
    cfg: Any  # xlstm_train.train.config.Config
    arch: str  # the entry's label, else the model's architecture
    params: int
    non_embedding_params: int
    flops_per_token: float
    steps: int
    tokens_per_step: int
    flops_budget: float | None  # the IsoFLOP budget the point belongs to
    grid_values: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_path


@dataclass
class Sweep:
    name: str
    recipe: Path
    sweep_dir: Path
    points: list[SweepPoint]
    left_out: list[str]  # IsoFLOP pairs left out of the plan, with the reason
    fit: dict
    slurm: dict
    world_size: int


# ----------------------------------------------------------------------------------------------
# Small pieces


def set_dotted(data: dict, dotted: str, value: Any, where: str) -> None:
    """``data['a']['b'] = value`` for ``dotted = 'a.b'``, creating sections on the way."""
    parts = str(dotted).split(".")
    if not all(parts):
        raise ConfigError(f"{where}: key '{dotted}' is not of the form section.key")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: key '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def format_count(n: float) -> str:
    """20000 -> '20k', 1.5e10 -> '15B': short, readable, usable in a directory name."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def format_flops(c: float) -> str:
    """1e19 -> '1e19', 2.5e13 -> '2.5e13'."""
    text = f"{c:.3g}"
    if "e" not in text:
        return text
    mantissa, exponent = text.split("e")
    return f"{mantissa}e{int(exponent)}"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_format_value(v) for v in value)
    return str(value)


def _number(value: Any, key: str, where: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, str):
        try:
            value = float(value)  # PyYAML reads "1e19" (no dot) as a string
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > minimum:
        raise ConfigError(f"{where}: {key} = {value!r}: expected a number > {minimum:g}")
    return float(value)


def _numbers(value: Any, key: str, where: str) -> list[float]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: {key} = {value!r}: expected a non-empty list of numbers")
    return [_number(v, f"{key}[{n}]", where) for n, v in enumerate(value)]


def _mapping(value: Any, key: str, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} = {value!r}: expected a mapping")
    return value


def _check_keys(data: dict, allowed: set[str], key: str, where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        label = f"'{key}.{unknown[0]}'" if key else f"'{unknown[0]}'"
        raise ConfigError(f"{where}: unknown key {label}; allowed keys here: {', '.join(sorted(allowed))}")


def data_parallel_size(cfg, world_size: int) -> int:
    from xlstm_train.parallel.distributed import resolve_dims

    dims = resolve_dims(cfg.parallel, world_size)
    return dims["dp_replicate"] * dims["dp_shard"]


def model_counts(model_cfg) -> tuple[int, int]:
    """(parameters, non-embedding parameters) from a model built on the meta device."""
    import torch

    from xlstm_train.models import build_model, count_params

    with torch.device("meta"):
        model = build_model(model_cfg)
    return int(count_params(model)), int(count_params(model, non_embedding=True))


# ----------------------------------------------------------------------------------------------
# Expansion


def _model_entries(spec: dict, where: str, recipe_dir: Path) -> list[ModelEntry]:
    raw = spec.get("models")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}: sweep.models = {raw!r}: expected a non-empty list of "
                          "{name, model | recipe, overrides} mappings")
    entries, seen = [], set()
    for n, item in enumerate(raw):
        key = f"sweep.models[{n}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: {key} = {item!r}: expected a mapping with 'name' and 'model' or 'recipe'")
        _check_keys(item, MODEL_ENTRY_KEYS, key, where)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_OK.match(name):
            raise ConfigError(f"{where}: {key}.name = {name!r}: expected a name of letters, digits and . _ = -")
        if name in seen:
            raise ConfigError(f"{where}: {key}.name = '{name}' is used twice in sweep.models")
        seen.add(name)
        if ("recipe" in item) == ("model" in item):
            raise ConfigError(f"{where}: {key} ('{name}'): give exactly one of 'model' (a model section) "
                              "or 'recipe' (a recipe file)")
        label = item.get("label")
        if label is not None and (not isinstance(label, str) or not _NAME_OK.match(label)):
            raise ConfigError(f"{where}: {key}.label = {label!r}: expected a name of letters, digits and . _ = -")
        recipe = None
        if "recipe" in item:
            recipe = Path(item["recipe"])
            if not recipe.is_file() and (recipe_dir / recipe).is_file():
                recipe = recipe_dir / recipe
            if not recipe.is_file():
                raise ConfigError(f"{where}: {key}.recipe = '{item['recipe']}': no such recipe file")
        model = _mapping(item.get("model"), f"{key}.model", where) if "model" in item else None
        overrides = _mapping(item.get("overrides"), f"{key}.overrides", where)
        entries.append(ModelEntry(name, label, recipe, model, overrides))
    return entries


def _grid(spec: dict, where: str) -> list[dict]:
    grid = _mapping(spec.get("grid"), "sweep.grid", where)
    axes = []
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: sweep.grid['{key}'] = {values!r}: expected a non-empty list of values")
        if str(key).split(".")[0] in ("name", "run_dir") or key in ("train.steps",):
            raise ConfigError(f"{where}: sweep.grid['{key}']: the sweep sets this key itself; "
                              "use sweep.tokens / sweep.flops for the run length")
        axes.append([(key, v) for v in values])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def load_sweep(recipe: str | Path, overrides: list[str] = (), *, sweep_dir: str | Path | None = None,
               world_size: int | None = None, for_slurm: bool = False) -> Sweep:
    """Read a sweep recipe and resolve every point to a checked ``Config``; raises ConfigError
    naming the key, value or point at fault before anything is written.

    Each point's steps follow from its token budget and its global batch, which counts the
    data-parallel ranks: ``world_size`` (default: this process's ``WORLD_SIZE``), or with
    ``for_slurm`` the recipe's ``slurm.nodes x slurm.gpus_per_node``.
    """
    from xlstm_train.config import apply_override
    from xlstm_train.train.config import Config
    from xlstm_train.train.flops import flops_per_token

    path = Path(recipe)
    where = str(path)
    data = read_recipe(path)
    _check_keys(data, TOP_LEVEL_KEYS, "", where)
    spec = data.get("sweep")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: no 'sweep:' mapping; a sweep recipe states its points under 'sweep:' "
                          "(see docs/scaling.md)")
    _check_keys(spec, SWEEP_KEYS, "sweep", where)
    name = data.get("name")
    if not isinstance(name, str) or not _NAME_OK.match(name):
        raise ConfigError(f"{where}: name = {name!r}: expected the sweep's name (letters, digits and . _ = -)")
    fit = _mapping(data.get("fit"), "fit", where)
    _check_keys(fit, FIT_KEYS, "fit", where)
    bootstrap = fit.get("bootstrap", 1000)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
        raise ConfigError(f"{where}: fit.bootstrap = {bootstrap!r}: expected an integer >= 0")
    if "huber_delta" in fit:
        fit["huber_delta"] = _number(fit["huber_delta"], "fit.huber_delta", where)
    if "predict_flops" in fit:
        fit["predict_flops"] = _numbers(fit["predict_flops"], "fit.predict_flops", where)
    if fit.get("params_column", "params") not in ("params", "non_embedding_params"):
        raise ConfigError(f"{where}: fit.params_column = {fit['params_column']!r}: expected params or "
                          "non_embedding_params")
    slurm = _mapping(data.get("slurm"), "slurm", where)
    _check_keys(slurm, SLURM_KEYS, "slurm", where)
    for key in ("nodes", "gpus_per_node", "cpus_per_task", "timeout_min", "array_parallelism", "mem_gb"):
        value = slurm.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "gpus_per_node" else 1):
            raise ConfigError(f"{where}: slurm.{key} = {value!r}: expected a positive integer")
    if for_slurm:
        world_size = slurm.get("nodes", 1) * max(slurm.get("gpus_per_node", 1), 1)
    root = Path(sweep_dir) if sweep_dir is not None else Path(data.get("sweep_dir") or Path("runs") / "sweeps" / name)
    recipe_dir = path.parent
    base_path = data.get("base")
    if base_path is not None:
        base_path = Path(base_path)
        if not base_path.is_file() and (recipe_dir / base_path).is_file():
            base_path = recipe_dir / base_path
        if not base_path.is_file():
            raise ConfigError(f"{where}: base = '{data['base']}': no such recipe file")
    common = _mapping(data.get("overrides"), "overrides", where)
    entries = _model_entries(spec, where, recipe_dir)
    if base_path is None and any(e.recipe is None for e in entries):
        raise ConfigError(f"{where}: base is not set, and sweep.models entries with a 'model' section need "
                          "a base recipe for everything else")
    by_name = {e.name: e for e in entries}
    grid = _grid(spec, where)
    warmup_fraction = spec.get("warmup_fraction")
    if warmup_fraction is not None:
        warmup_fraction = _number(warmup_fraction, "sweep.warmup_fraction", where, minimum=-1e-300)
        if warmup_fraction >= 1:
            raise ConfigError(f"{where}: sweep.warmup_fraction = {warmup_fraction}: expected a fraction in [0, 1)")
    min_steps = spec.get("min_steps", 1)
    if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
        raise ConfigError(f"{where}: sweep.min_steps = {min_steps!r}: expected an integer >= 1")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))

    # the plan: (model entry, tokens or None, flops budget or None, grid values, point overrides)
    has_points = "points" in spec
    if has_points and any(k in spec for k in ("tokens", "flops", "grid")):
        raise ConfigError(f"{where}: sweep.points is an explicit list; it cannot be combined with "
                          "sweep.tokens, sweep.flops or sweep.grid (put those in each point)")
    plan = []
    if has_points:
        raw_points = spec["points"]
        if not isinstance(raw_points, list) or not raw_points:
            raise ConfigError(f"{where}: sweep.points = {raw_points!r}: expected a non-empty list")
        for n, item in enumerate(raw_points):
            key = f"sweep.points[{n}]"
            if not isinstance(item, dict):
                raise ConfigError(f"{where}: {key} = {item!r}: expected a mapping {{model, tokens | flops, overrides}}")
            _check_keys(item, POINT_KEYS, key, where)
            if item.get("model") not in by_name:
                raise ConfigError(f"{where}: {key}.model = {item.get('model')!r}: expected one of the names in "
                                  f"sweep.models ({', '.join(by_name)})")
            if ("tokens" in item) == ("flops" in item):
                raise ConfigError(f"{where}: {key}: give exactly one of 'tokens' or 'flops'")
            tokens = _number(item["tokens"], f"{key}.tokens", where) if "tokens" in item else None
            budget = _number(item["flops"], f"{key}.flops", where) if "flops" in item else None
            point_overrides = _mapping(item.get("overrides"), f"{key}.overrides", where)
            plan.append((by_name[item["model"]], tokens, budget, point_overrides))
    else:
        if ("tokens" in spec) == ("flops" in spec):
            raise ConfigError(f"{where}: the sweep block needs exactly one of sweep.tokens (token budgets) "
                              "or sweep.flops (IsoFLOP budgets), or an explicit sweep.points list")
        tokens_list = _numbers(spec["tokens"], "sweep.tokens", where) if "tokens" in spec else [None]
        flops_list = _numbers(spec["flops"], "sweep.flops", where) if "flops" in spec else [None]
        for entry, tokens, budget, values in itertools.product(entries, tokens_list, flops_list, grid):
            plan.append((entry, tokens, budget, values))

    base_cache: dict[Path, dict] = {}

    def base_dict(entry: ModelEntry) -> dict:
        source = entry.recipe or base_path
        if source not in base_cache:
            base_cache[source] = read_recipe(source)
        out = copy.deepcopy(base_cache[source])
        if entry.model is not None:
            out["model"] = copy.deepcopy(entry.model)
        return out

    def build(entry: ModelEntry, values: dict, run_name: str, steps: int | None, warmup: int | None,
              what: str) -> Config:
        d = base_dict(entry)
        for source, mapping in (("overrides", common), (f"sweep.models '{entry.name}' overrides", entry.overrides),
                                ("sweep.grid / point overrides", values)):
            for key, value in mapping.items():
                set_dotted(d, key, value, f"{where} {source}")
        for override in overrides:
            apply_override(d, override)
        d["name"] = f"{name}-{run_name}"
        d["run_dir"] = str(root / run_name)
        d.setdefault("checkpoint", {})["resume"] = "auto"
        if _has_wandb_group():
            d.setdefault("logging", {})["wandb_group"] = name
        if steps is not None:
            d.setdefault("train", {})["steps"] = steps
        if warmup is not None:
            d.setdefault("optim", {})["warmup_steps"] = warmup
        try:
            return from_dict(Config, d, where=f"{where}, {what}")
        except ConfigError as e:
            unknown = re.match(r"unknown key '([^']+)'", str(e))
            if unknown:
                for source, mapping in (("sweep.grid", values), ("overrides", common),
                                        (f"sweep.models '{entry.name}' overrides", entry.overrides)):
                    if unknown.group(1) in mapping:
                        raise ConfigError(f"{where}: {source} key '{unknown.group(1)}' is not a recipe key: "
                                          f"{e}") from None
            raise

    points: list[SweepPoint] = []
    left_out: list[str] = []
    counts_cache: dict[str, tuple[int, int, float]] = {}
    budget_fits: dict[float, bool] = {}
    for entry, tokens, budget, values in plan:
        label = "_".join(f"{k.split('.')[-1]}{_format_value(v)}" for k, v in values.items()) if values else ""
        run_name = entry.name + (f"_C{format_flops(budget)}" if budget is not None else f"_D{format_count(tokens)}")
        if label and not has_points:
            run_name += f"_{label}"
        what = f"point '{run_name}'"
        probe = build(entry, values, run_name, None, None, what)
        dp = data_parallel_size(probe, world_size)
        tokens_per_step = probe.train.micro_batch_size * probe.train.grad_accum_steps * dp * probe.data.seq_len
        model_key = repr(to_dict(probe.model)) + f"@{probe.data.seq_len}"
        if model_key not in counts_cache:
            n_all, n_non_emb = model_counts(probe.model)
            counts_cache[model_key] = (n_all, n_non_emb, flops_per_token(probe.model, probe.data.seq_len))
        n_all, n_non_emb, fpt = counts_cache[model_key]
        if budget is not None:
            tokens_wanted = budget / fpt
            steps = round(tokens_wanted / tokens_per_step)
            budget_fits.setdefault(budget, False)
            if steps < min_steps:
                left_out.append(f"{run_name}: {format_count(tokens_wanted)} tokens at C = {budget:.3g} is "
                                f"{tokens_wanted / tokens_per_step:.1f} steps of {tokens_per_step} tokens "
                                f"(< sweep.min_steps = {min_steps})")
                continue
            budget_fits[budget] = True
        else:
            steps = round(tokens / tokens_per_step)
            if steps < min_steps:
                raise ConfigError(
                    f"{where}: {what}: {tokens:.4g} tokens is {tokens / tokens_per_step:.2f} steps of "
                    f"{tokens_per_step} tokens (micro_batch_size x grad_accum_steps x data-parallel size x "
                    f"seq_len); the budget must give at least sweep.min_steps = {min_steps} steps"
                )
        if warmup_fraction is not None:
            warmup = max(1, round(warmup_fraction * steps)) if warmup_fraction > 0 else 0
        else:
            warmup = probe.optim.warmup_steps
            if warmup >= steps:
                raise ConfigError(
                    f"{where}: {what} runs {steps} steps but optim.warmup_steps = {warmup}: set "
                    "sweep.warmup_fraction so that each run warms up over a fraction of its own steps"
                )
        cfg = build(entry, values, run_name, steps, warmup, what)
        points.append(SweepPoint(
            index=len(points), name=run_name, model_name=entry.name, cfg=cfg, arch=entry.label or cfg.model.arch,
            params=n_all, non_embedding_params=n_non_emb, flops_per_token=fpt, steps=steps,
            tokens_per_step=tokens_per_step, flops_budget=budget, grid_values=dict(values),
        ))
    too_small = [b for b, fits in budget_fits.items() if not fits]
    if too_small:
        smallest = min(points or [], key=lambda p: p.flops_per_token, default=None)
        hint = f" (the smallest model, '{smallest.model_name}', needs C >= " \
               f"{min_steps * smallest.tokens_per_step * smallest.flops_per_token:.3g})" if smallest else ""
        raise ConfigError(f"{where}: sweep.flops budget {too_small[0]:.4g} is too small for every model: "
                          f"no model gets sweep.min_steps = {min_steps} steps{hint}")
    if not points:
        raise ConfigError(f"{where}: the sweep has no points: " + "; ".join(left_out))
    _check_distinct(points, where)
    return Sweep(name=name, recipe=path, sweep_dir=root, points=points, left_out=left_out,
                 fit=fit, slurm=slurm, world_size=world_size)


def _has_wandb_group() -> bool:
    from dataclasses import fields

    from xlstm_train.train.config import LoggingConfig

    return any(f.name == "wandb_group" for f in fields(LoggingConfig))


def _check_distinct(points: list[SweepPoint], where: str) -> None:
    """Two points with one run directory, or the same run under two names, are a mistake in the recipe."""
    by_dir: dict[str, SweepPoint] = {}
    by_content: dict[str, SweepPoint] = {}
    for p in points:
        key = str(p.run_dir.resolve())
        if key in by_dir:
            raise ConfigError(f"{where}: points {by_dir[key].index + 1} and {p.index + 1} both resolve to "
                              f"the run '{p.name}'; give the models distinct names or make the points differ")
        by_dir[key] = p
        content = to_dict(p.cfg)
        content.pop("name"), content.pop("run_dir")
        content = repr(content)
        if content in by_content:
            other = by_content[content]
            raise ConfigError(f"{where}: points '{other.name}' and '{p.name}' resolve to the same run "
                              "(identical model, data and training settings); remove one")
        by_content[content] = p


# ----------------------------------------------------------------------------------------------
# The table


def format_table(sweep: Sweep, statuses: dict[str, str] | None = None) -> str:
    header = ["#", "name", "arch", "params", "non-emb", "tokens", "FLOPs", "steps", "batch", "lr"]
    if statuses is not None:
        header.append("status")
    rows = []
    for p in sweep.points:
        cfg = p.cfg
        dp = p.tokens_per_step // (cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.data.seq_len)
        row = [str(p.index + 1), p.name, p.arch, format_count(p.params), format_count(p.non_embedding_params),
               format_count(p.tokens), f"{p.flops:.3g}", str(p.steps),
               f"{cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp}x{cfg.data.seq_len}",
               f"{cfg.optim.lr:.3g}"]
        if statuses is not None:
            row.append(statuses.get(p.name, ""))
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    right = {0, 3, 4, 5, 6, 7}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    total = sum(p.flops for p in sweep.points)
    lines.append(f"{len(sweep.points)} points, {total:.3g} training FLOPs in all, run directories under "
                 f"{sweep.sweep_dir}/ (batch: sequences x sequence length per step, at world size "
                 f"{sweep.world_size})")
    for note in sweep.left_out:
        lines.append(f"left out: {note}")
    return "\n".join(lines)


__all__ = ["Sweep", "SweepPoint", "format_count", "format_flops", "format_table", "load_sweep",
           "model_counts", "set_dotted"]
