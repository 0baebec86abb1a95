"""Everything that knows about ranks: process groups, the DeviceMesh, tensor parallel plans,
FSDP2, DeepSpeed ZeRO, activation checkpointing and compile, applied from outside the models."""

from xlstm_train.parallel.config import ParallelConfig
from xlstm_train.parallel.distributed import (
    DistributedEnv,
    build_mesh,
    check_tp_divides_heads,
    destroy_distributed,
    dp_mesh,
    dp_rank_and_size,
    init_distributed,
    run_on_every_rank,
    setup_rank_logging,
)
from xlstm_train.parallel.parallelize import (
    clip_grad_norm_,
    dp_mean,
    grad_norm,
    loss_context,
    parallelize_model,
    to_full,
)

__all__ = [
    "DistributedEnv",
    "ParallelConfig",
    "build_mesh",
    "check_tp_divides_heads",
    "clip_grad_norm_",
    "destroy_distributed",
    "dp_mean",
    "dp_mesh",
    "dp_rank_and_size",
    "grad_norm",
    "init_distributed",
    "loss_context",
    "parallelize_model",
    "run_on_every_rank",
    "setup_rank_logging",
    "to_full",
]
