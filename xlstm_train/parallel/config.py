"""Parallelism configuration: one DeviceMesh (dp_replicate x dp_shard x tp) and the ZeRO engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class ParallelConfig:
    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    tp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after tp x dp_replicate
    zero_stage: int = 3  # fsdp: 3 reshards after forward, 2 keeps parameters gathered
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
