"""Data configuration: which prepared shards (or synthetic task) feed training, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from xlstm_train.config import ConfigError


@dataclass
class DatasetSpec:
    path: str  # a directory written by `xlstm-train prepare-data` (holds manifest.json)
    weight: float = 1.0
    # one subset of that directory (e.g. RedPajamaC4); None: all of its subsets, in proportion to their tokens
    subset: str | None = None


@dataclass
class DataConfig:
    source: Literal["shards", "synthetic"] = "shards"
    # source: shards -- prepared token shards, mixed by weight
    datasets: list[DatasetSpec] = field(default_factory=list)
    validation: list[DatasetSpec] = field(default_factory=list)  # empty: a held-out split of `datasets`
    # with no `validation`: the last this fraction of every dataset's windows is held out for evaluation
    validation_fraction: float = 0.05
    tokenizer: str | None = None  # must match the tokenizer the shards were made with
    # checks of the shard files against their manifest before training: "full" hashes every file
    # (SHA-256, on the first process of each node); "size" only compares sizes (for corpora too
    # large to read at every start)
    verify: Literal["full", "size"] = "full"
    # source: synthetic -- one of the xLSTM paper's synthetic tasks, generated on the fly
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    seed: int = 1234
    prefetch: int = 2  # batches assembled ahead in a background thread (0: none)

    def validate(self, prefix: str = "data") -> None:
        prefix = prefix or "data"
        if self.seq_len < 1:
            raise ConfigError(f"{prefix}.seq_len = {self.seq_len}: expected a positive integer")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ConfigError(f"{prefix}.validation_fraction = {self.validation_fraction}: expected 0 <= x < 1")
        if self.prefetch < 0:
            raise ConfigError(f"{prefix}.prefetch = {self.prefetch}: expected an integer >= 0")
        for key in ("datasets", "validation"):
            for n, spec in enumerate(getattr(self, key)):
                if not spec.weight > 0:
                    raise ConfigError(f"{prefix}.{key}[{n}].weight = {spec.weight}: expected a positive number")
        if self.task is not None:  # (a missing task is reported when the loader is built)
            from xlstm_train.data.synthetic import TASKS

            if self.task not in TASKS:
                raise ConfigError(f"{prefix}.task = {self.task!r}: expected one of {', '.join(sorted(TASKS))}")
