"""Parallelism configuration: one DeviceMesh (dp_replicate x dp_shard x tp) and the ZeRO engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xlstm_train.config import ConfigError


@dataclass
class ParallelConfig:
    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    tp: int = 1
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves after tp x dp_replicate
    # fsdp: 3 reshards parameters after forward, 2 keeps them gathered until backward.
    # deepspeed: ZeRO stage 1, 2 or 3.
    zero_stage: int = 3
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    # torch.compile of each block. "auto": on CUDA (it fuses the blocks' elementwise work and cuts
    # kernel launches), off elsewhere (on CPU compiling costs more than a short run gains).
    compile: bool | Literal["auto"] = "auto"
    # Tensor parallel extras (only with tp > 1): norms and residual stream sharded over the
    # sequence between the TP regions, and a cross-entropy on vocabulary-sharded logits.
    sequence_parallel: bool = False
    loss_parallel: bool = True
    # deepspeed only: keep Adam moments and the fp32 master weights in CPU memory.
    offload_optimizer: bool = False
    # Seconds a collective may wait before the job fails instead of hanging.
    timeout_s: int = 600

    def compile_on(self, device_type: str) -> bool:
        """Whether blocks are compiled on this kind of device."""
        if self.compile == "auto":
            return self.engine == "fsdp" and device_type == "cuda"
        return self.compile

    def validate(self, prefix: str = "parallel") -> None:
        p = f"{prefix}." if prefix else ""
        for key in ("tp", "dp_replicate"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{p}{key} = {getattr(self, key)}: expected an integer >= 1")
        if self.dp_shard != -1 and self.dp_shard < 1:
            raise ConfigError(f"{p}dp_shard = {self.dp_shard}: expected -1 (infer) or an integer >= 1")
        allowed = (2, 3) if self.engine == "fsdp" else (1, 2, 3)
        if self.zero_stage not in allowed:
            raise ConfigError(
                f"{p}zero_stage = {self.zero_stage}: engine '{self.engine}' supports "
                f"{' or '.join(map(str, allowed))}"
            )
        if self.offload_optimizer and self.engine != "deepspeed":
            raise ConfigError(f"{p}offload_optimizer = true needs {p}engine = 'deepspeed'")
        if self.engine == "deepspeed" and self.dp_replicate != 1:
            raise ConfigError(
                f"{p}dp_replicate = {self.dp_replicate}: engine 'deepspeed' partitions over all "
                "data-parallel ranks; use dp_shard (or engine 'fsdp' for HSDP)"
            )
        if self.engine == "deepspeed" and self.activation_checkpointing == "selective":
            raise ConfigError(
                f"{p}activation_checkpointing = 'selective' with {p}engine = 'deepspeed': expected none | full "
                "(selective checkpointing is an fsdp-engine option)"
            )
        if self.engine == "deepspeed" and self.tp > 1 and self.zero_stage == 3:
            # ZeRO-3 gathers each module's parameters in its own hooks, and the tensor-parallel
            # modules compute on DTensor views of the local shards that those hooks cannot gather
            raise ConfigError(
                f"{p}zero_stage = 3 with {p}tp = {self.tp} and {p}engine = 'deepspeed': DeepSpeed ZeRO-3 does "
                f"not compose with tensor parallelism here; allowed: {p}zero_stage = 1 or 2 with tp > 1, or "
                f"{p}engine = 'fsdp' (ZeRO-3 sharding with TP)"
            )
        if self.engine == "deepspeed" and (self.compile is True or self.sequence_parallel):
            raise ConfigError(f"{p}compile = true and {p}sequence_parallel are fsdp-engine options")
        if self.timeout_s < 1:
            raise ConfigError(f"{p}timeout_s = {self.timeout_s}: expected seconds >= 1")
