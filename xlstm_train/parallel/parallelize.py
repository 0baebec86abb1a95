"""Apply parallelism to a single-device model from outside, in torchtitan's order:
tensor parallel -> activation checkpointing -> torch.compile -> FSDP2.

TP comes first because FSDP shards the (already TP-sharded) DTensor parameters a second time over
the data-parallel mesh; checkpointing and compile wrap whole blocks, and FSDP's per-block
all-gather / reduce-scatter hooks go outermost so that they overlap with the block's compute.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel
from torch.utils.checkpoint import (
    CheckpointPolicy,
    create_selective_checkpoint_contexts,
)

from xlstm_train.archs import get_spec
from xlstm_train.config import ConfigError
from xlstm_train.parallel.config import ParallelConfig
from xlstm_train.parallel.distributed import dp_mesh, fsdp_mesh
from xlstm_train.parallel.tensor_parallel import apply_tensor_parallel

def block_list(model: nn.Module, model_cfg: Any) -> nn.ModuleList:
    """The model's residual blocks: the unit of checkpointing, compilation and FSDP sharding."""
    return model.get_submodule(get_spec(model_cfg.arch).block_list)


# ------------------------------------------------------------------------------------------------
# Activation checkpointing

# Outputs of these ops are kept by selective checkpointing; everything else in a block (norms,
# activations, gates, the recurrent cells) is recomputed in the backward. The matmuls are most of a
# block's FLOPs but a small share of its activation memory. Keeping the cells' outputs as well was
# measured faster but much larger (docs/benchmarks.md); selective checkpointing is for memory.
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.linear.default,
}


def _selective_policy(_ctx, op, *_args, **_kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(blocks: nn.ModuleList, mode: str, reentrant: bool = False) -> None:
    """``full``: keep only each block's input and recompute the block in the backward.
    ``selective``: recompute the block but keep the matmul outputs (op-level selective AC).
    ``reentrant``: recompute through autograd's reentrant checkpoint (``full`` only), which runs the
    block's module hooks again in the backward as DeepSpeed ZeRO-3 needs to gather its parameters."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ConfigError(f"parallel.activation_checkpointing = {mode!r}: expected none | full | selective")
    if reentrant:  # full only: ParallelConfig.validate refuses selective under DeepSpeed
        for n, block in enumerate(blocks):
            blocks[n] = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.REENTRANT, preserve_rng_state=True)
        return
    # early_stop=False: the recomputation runs the block's forward to its end instead of stopping
    # by an exception once it has what the backward needs, so that forward hooks, such as the
    # tensor-parallel hooks that swap parameters for their local shards and back, always run.
    kwargs = {"preserve_rng_state": True, "early_stop": False}
    if mode == "selective":
        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy)
    for n, block in enumerate(blocks):
        blocks[n] = checkpoint_wrapper(block, **kwargs)


# ------------------------------------------------------------------------------------------------
# FSDP2


def apply_fsdp(
    model: nn.Module,
    blocks: nn.ModuleList,
    dp_mesh: DeviceMesh,
    zero_stage: int,
    param_dtype: torch.dtype | None,
) -> None:
    """``fully_shard`` each block, then the root (embedding, final norm, head).

    ZeRO-3 frees the gathered parameters after each block's forward and gathers them again for the
    backward; ZeRO-2 keeps them until the backward. Gradients are reduced in fp32 whatever the
    parameter dtype. The last block is never resharded after forward: its backward comes first.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    reshard = zero_stage == 3
    for n, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard and n < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard)


def parallelize_model(
    model: nn.Module,
    mesh: DeviceMesh | None,
    cfg: ParallelConfig,
    model_cfg: Any,
    param_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
) -> nn.Module:
    """Apply TP, activation checkpointing, compile and FSDP2 (as configured) to ``model`` in place.

    ``mesh`` is ``build_mesh``'s (None for one process: only checkpointing and compile apply).
    ``param_dtype`` is the dtype FSDP gathers parameters in for compute (e.g. bf16 on GPU; the
    sharded master copy stays fp32); None computes in the parameters' own dtype. ``device_type``
    decides ``parallel.compile = auto``.
    """
    if cfg.engine != "fsdp":
        raise ConfigError(f"parallelize_model is the fsdp engine; parallel.engine = {cfg.engine!r}")
    if mesh is not None and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"], cfg, model_cfg)
    blocks = block_list(model, model_cfg)
    apply_activation_checkpointing(blocks, cfg.activation_checkpointing)
    if cfg.compile_on(device_type):
        for block in blocks:
            block.compile()
    if mesh is not None and dp_mesh(mesh).size() > 1:
        apply_fsdp(model, blocks, fsdp_mesh(mesh), cfg.zero_stage, param_dtype)
    return model


def loss_context(mesh: DeviceMesh | None, cfg: ParallelConfig):
    """The context the loss must be computed in: vocabulary-parallel cross-entropy when the
    logits come out sharded over the vocabulary (tp > 1 with loss_parallel), else nothing."""
    if mesh is not None and mesh["tp"].size() > 1 and cfg.loss_parallel:
        return loss_parallel()
    return contextlib.nullcontext()


def to_full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered into a plain tensor (e.g. the replicated scalar of a vocabulary-parallel
    loss); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# ------------------------------------------------------------------------------------------------
# Gradient norm and clipping over DTensors


@torch.no_grad()
def grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The global gradient norm over all ranks, for any mix of plain and DTensor parameters.

    Gradients are grouped by (mesh, placements); each group's norm is a DTensor reduction that
    all-reduces only over the mesh dimensions the group is sharded on, so replicated copies are
    counted once. Plain-tensor gradients are identical on every rank and count as they are.
    """
    groups: dict[Any, list[torch.Tensor]] = defaultdict(list)
    for p in parameters:
        if p.grad is None:
            continue
        g = p.grad
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    norms = []
    for key, grads in groups.items():
        norm = torch.nn.utils.get_total_norm(grads, norm_type, foreach=None)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        norms.append(norm.float())
    if not norms:
        return torch.tensor(0.0)
    stacked = torch.stack(norms)
    if math.isinf(norm_type):
        return stacked.max()
    return stacked.pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients so that their global norm is at most ``max_norm``; return the norm before."""
    parameters = [p for p in parameters if p.grad is not None]
    total = grad_norm(parameters, norm_type)
    scale = max_norm / (float(total) + 1e-6)
    if max_norm > 0 and scale < 1.0:
        for p in parameters:
            p.grad.mul_(scale)
    return total


# ------------------------------------------------------------------------------------------------
# Reductions over the data-parallel ranks


def dp_mean(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """Average a scalar (e.g. the loss of this rank's micro-batches) over the data-parallel ranks."""
    if mesh is None or dp_mesh(mesh).size() == 1:
        return value
    value = value.detach().clone().to(torch.promote_types(value.dtype, torch.float32))
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=dp_mesh(mesh).get_group())
    return value / dp_mesh(mesh).size()
