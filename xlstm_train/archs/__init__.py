"""Architecture specs: everything the framework needs to know about one architecture, in one place.

A spec names an architecture's config and model classes and answers, for that architecture, the
questions the generic code asks: which submodule list holds the residual blocks, how tensor
parallelism splits it and which head counts it must divide, the sequence-mixing FLOPs per token,
which parameters are never weight-decayed, which model keys may change when a run resumes, which
parameter is the input embedding, and how the weights are exported and imported. The trainer, the
parallel layer, the FLOP count, the optimizer and the export look the spec up by ``model.arch``;
none of them branches on an architecture's name or names its parameter paths.

This module is the registry and imports nothing of the package but the config errors, so every
layer may ask it. The built-in specs (``xlstm_train.archs.<name>``) import models, parallel styles
and export adapters; they are imported on first lookup. Another architecture registers itself with
``register_spec`` (see "Adding an architecture" in ``docs/architecture.md``).
"""

from __future__ import annotations

import dataclasses
import importlib
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from xlstm_train.config import ConfigError

if TYPE_CHECKING:
    from torch import nn
    from torch.distributed.tensor.parallel import ParallelStyle

    from xlstm_train.export.adapter import ExportAdapter

# Loaded on first lookup; the first is the architecture of a ``model`` section without ``arch``.
BUILTIN_ARCHS = ("xlstm_blocks", "xlstm_large", "llama")


def _no_params(model: nn.Module) -> Iterable[nn.Parameter]:
    return ()


def _no_heads(model_cfg: Any) -> dict[str, int]:
    return {}


@dataclass(frozen=True)
class ArchSpec:
    """One architecture. The callables take the architecture's own config (``model_cfg``) or model."""

    name: str
    """The ``model.arch`` value; the config class's ``arch`` field is ``Literal[name]``."""
    config_class: type
    """The ``model`` section's dataclass. It may define ``validate(prefix)`` for checks across fields."""
    model_class: type[nn.Module]
    """``model_class(model_cfg)`` builds the single-device model, ``init_weights()`` initialises it;
    it takes ``(input_ids, doc_ids=None, state=None, return_state=False)`` and returns logits."""
    block_list: str
    """Path of the ``nn.ModuleList`` of residual blocks: the unit of activation checkpointing,
    per-block compile and FSDP sharding."""
    embedding_param: str
    """Name of the input embedding table's parameter (left out of non-embedding counts)."""
    sequence_mixing_flops: Callable[[Any, int], float]
    """``(model_cfg, seq_len)`` -> forward FLOPs per token of what mixes the sequence (cells,
    attention) summed over blocks: the part of ``train.flops`` that parameters do not count."""
    tp_plan: Callable[[nn.Module, bool, bool], dict[str, ParallelStyle]] | None = None
    """``(model, sequence_parallel, loss_parallel)`` -> a ``parallelize_module`` plan; None: the
    architecture has no tensor-parallel plan."""
    tp_head_counts: Callable[[Any], dict[str, int]] = _no_heads
    """``model_cfg`` -> every count tensor parallelism splits across ranks (heads, blocks of a
    block-diagonal projection), by the config key or quantity it comes from: tp must divide each."""
    no_weight_decay: Callable[[nn.Module], Iterable[nn.Parameter]] = _no_params
    """``model`` -> matrices that are never weight-decayed (vectors and embedding tables follow
    ``optim.decay_norms_and_biases`` / ``optim.decay_embeddings``)."""
    resumable_model_keys: frozenset[str] = frozenset()
    """Model config keys that change how the computation runs but not the parameters (kernels,
    chunk sizes, dropout): free to differ from the checkpoint's on resume."""
    export: ExportAdapter | None = None
    """Writes a checkpoint's weights for another implementation (``xlstm-train export-hf``)."""


_SPECS: dict[str, ArchSpec] = {}


def register_spec(spec: ArchSpec) -> ArchSpec:
    """Make ``spec`` known under ``spec.name``. Registering the same spec again is a no-op (a module
    imported twice); another spec under a taken name is an error."""
    if not dataclasses.is_dataclass(spec.config_class):
        raise TypeError(f"architecture {spec.name!r}: config_class {spec.config_class!r} is not a dataclass")
    arch_type = typing.get_type_hints(spec.config_class).get("arch")
    if typing.get_args(arch_type) != (spec.name,):
        raise TypeError(
            f"architecture {spec.name!r}: {spec.config_class.__name__}.arch must be typed Literal[{spec.name!r}]"
        )
    known = _SPECS.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"architecture {spec.name!r} is already registered (by {known.model_class.__module__})")
    _SPECS[spec.name] = spec
    return spec


def _load_builtin(name: str) -> None:
    if name in BUILTIN_ARCHS and name not in _SPECS:
        importlib.import_module(f"xlstm_train.archs.{name}")


def get_spec(arch: str) -> ArchSpec:
    """The spec registered as ``arch``; a ConfigError naming the known ones otherwise."""
    _load_builtin(arch)
    spec = _SPECS.get(arch)
    if spec is None:
        raise ConfigError(f"model.arch = {arch!r}: expected one of {', '.join(map(repr, arch_names()))}")
    return spec


def arch_names() -> list[str]:
    """Every registered architecture, the built-in ones first."""
    for name in BUILTIN_ARCHS:
        _load_builtin(name)
    return list(_SPECS)


def model_config_classes() -> list[type]:
    """The config class of every registered architecture (what a ``model`` section may be)."""
    return [get_spec(name).config_class for name in arch_names()]


def spec_of(model: nn.Module) -> ArchSpec | None:
    """The spec whose model class ``model`` is an instance of (the most derived one), or None.

    Wrappers that subclass the model's class on the fly (FSDP2) still find it."""
    by_class = {spec.model_class: spec for spec in (get_spec(name) for name in arch_names())}
    for cls in type(model).__mro__:
        if cls in by_class:
            return by_class[cls]
    return None


__all__ = ["ArchSpec", "arch_names", "get_spec", "model_config_classes", "register_spec", "spec_of"]
