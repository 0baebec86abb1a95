"""Data configuration: which prepared shards (or synthetic task) feed training, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass
class DatasetSpec:
    path: str  # a directory written by `xlstm-train prepare-data` (holds manifest.json)
    weight: float = 1.0


@dataclass
class DataConfig:
    source: Literal["shards", "synthetic"] = "shards"
    # source: shards -- prepared token shards, mixed by weight
    datasets: list[DatasetSpec] = field(default_factory=list)
    validation: list[DatasetSpec] = field(default_factory=list)  # empty: a held-out split of `datasets`
    tokenizer: str | None = None  # must match the tokenizer the shards were made with
    # source: synthetic -- one of the xLSTM paper's synthetic tasks, generated on the fly
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    seq_len: int = 256
    seed: int = 1234
