"""DeepSpeed ZeRO as the second data-parallel engine (``parallel.engine: deepspeed``).

The run keeps its own model, parameter groups and learning-rate schedule; DeepSpeed owns the
ZeRO partitioning (stage 1: optimizer states, 2: + gradients, 3: + parameters), the optional CPU
offload of the optimizer, bf16, gradient accumulation and clipping. Its process groups come from
our DeviceMesh through ``MeshMPU``, so ZeRO partitions over the data-parallel ranks only.

With tp > 1 (ZeRO-1 and 2) the model is first split by its tensor-parallel plan; the DTensor
parameters then become plain parameters holding the local shards, which ZeRO partitions like any
other, and the plan's code computes on DTensor views of them (``localize_tensor_parallel``).

The optimizer is ``torch.optim.AdamW`` (``"torch_adam": true``): DeepSpeed's fused Adam is a
JIT-built extension that a CPU-only machine (CI) cannot rely on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Shard

from xlstm_train.config import ConfigError
from xlstm_train.parallel.distributed import dp_mesh
from xlstm_train.parallel.parallelize import apply_activation_checkpointing, block_list
from xlstm_train.parallel.tensor_parallel import apply_tensor_parallel


class MeshMPU:
    """The ``mpu`` object DeepSpeed asks for its model- and data-parallel groups, read off our mesh.

    "Model parallel" is the ``tp`` mesh dimension; "data parallel" is dp_replicate x dp_shard
    flattened. There is no pipeline or sequence parallelism in this mesh.
    """

    def __init__(self, mesh: DeviceMesh):
        self.tp = mesh["tp"]
        self.dp = dp_mesh(mesh)

    # tensor / model parallel
    def get_model_parallel_group(self):
        return self.tp.get_group()

    def get_model_parallel_rank(self) -> int:
        return self.tp.get_local_rank()

    def get_model_parallel_world_size(self) -> int:
        return self.tp.size()

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_tensor_model_parallel_src_rank(self) -> int:
        return dist.get_global_rank(self.tp.get_group(), 0)

    # data parallel
    def get_data_parallel_group(self):
        return self.dp.get_group()

    def get_data_parallel_rank(self) -> int:
        return self.dp.get_local_rank()

    def get_data_parallel_world_size(self) -> int:
        return self.dp.size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        return dist.get_process_group_ranks(self.dp.get_group())

    # no pipeline stages
    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1

    def get_pipeline_model_parallel_rank(self) -> int:
        return 0


# ------------------------------------------------------------------------------------------------
# Tensor parallel under ZeRO: local shards as plain parameters


@dataclass(frozen=True)
class TPShard:
    """Where a plain local parameter sits in its tensor-parallel (DTensor) parameter."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    shape: torch.Size
    stride: tuple[int, ...]

    def view(self, local: torch.Tensor) -> DTensor:
        """The DTensor whose shard on this rank is ``local`` (differentiable, no communication)."""
        return DTensor.from_local(
            local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride
        )

    def full(self, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor, gathered from every TP rank's ``local`` (a collective over TP)."""
        return self.view(local.detach()).full_tensor()


def localize_tensor_parallel(model: nn.Module) -> None:
    """Replace the DTensor parameters of a tensor-parallel ``model`` by plain parameters holding the
    local shards, which ZeRO can flatten and partition (``compute_on_dtensor_views`` lets the plan's
    code compute on DTensors again).

    Each such parameter keeps its layout as ``param.tp_shard``. Shards (not replicas) are marked
    ``tensor_model_parallel``: DeepSpeed's gradient norm counts those on every TP rank and the
    others on TP rank 0 only, then sums over the mpu's model-parallel group (the TP ranks).
    """
    for owner in model.modules():
        for leaf, param in list(owner._parameters.items()):
            if isinstance(param, DTensor):
                local = nn.Parameter(param.to_local().detach(), requires_grad=param.requires_grad)
                local.tp_shard = TPShard(param.device_mesh, tuple(param.placements), param.shape, param.stride())
                local.tensor_model_parallel = any(p.is_shard() for p in param.placements)
                owner._parameters[leaf] = local


def compute_on_dtensor_views(model: nn.Module, blocks: list[nn.Module]) -> None:
    """During the forward of each block, and of the root for the parameters outside the blocks,
    put DTensor views of the localized parameters in their place, and the local parameters back
    after it: the plan's hooks and forwards, inside these modules, see DTensors as they were made.

    Blocks are entered on their own too (a checkpointed block's recomputation in the backward).
    The root and the blocks carry no hooks of the plan, so these hooks come first.
    ``from_local`` is differentiable: gradients land on the local parameters with the placements
    of their DTensors (a replicated parameter's partial-sum gradient is all-reduced over TP, as for
    a DTensor parameter).
    """
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    for entry in [*blocks, model]:
        slots = [
            (owner, leaf, param)
            for owner in entry.modules()
            for leaf, param in owner._parameters.items()
            if hasattr(param, "tp_shard") and (entry is not model or id(param) not in in_blocks)
        ]
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

        def to_dtensors(_module, _args, slots=slots, swapped=swapped):
            for owner, leaf, local in slots:
                owner._parameters[leaf] = local.tp_shard.view(local)
                swapped.append((owner, leaf, local))

        def to_locals(_module, _args, _output, swapped=swapped):
            while swapped:
                owner, leaf, local = swapped.pop()
                owner._parameters[leaf] = local

        entry.register_forward_pre_hook(to_dtensors)
        entry.register_forward_hook(to_locals, always_call=True)


def tensor_parallel_layout(model: nn.Module) -> dict[str, int | None]:
    """Each localized parameter's shard dimension (None: replicated over TP), by checkpoint name."""
    layout = {}
    for name, param in model.named_parameters():
        if hasattr(param, "tp_shard"):
            (placement,) = param.tp_shard.placements
            layout[checkpoint_key(name)] = placement.dim if isinstance(placement, Shard) else None
    return layout


def checkpoint_key(name: str) -> str:
    """A parameter's name as in our checkpoints: without the activation-checkpointing wrapper's prefix
    (DeepSpeed names the parameters of ``engine.module`` with it)."""
    return name.replace("_checkpoint_wrapped_module.", "")


def deepspeed_config(cfg: Any, device_type: str) -> dict:
    """The DeepSpeed JSON config of a run (``cfg``: the run's Config with parallel/optim/train)."""
    par, optim, train = cfg.parallel, cfg.optim, cfg.train
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device_type == "cuda"}
    if par.zero_stage == 3:
        # gather full weights on save so that the model file is directly usable
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    bf16 = train.dtype == "bf16" and device_type == "cuda"
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": optim.clip_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # a torch optimizer, also under offload (the DeepSpeed CPU Adam is a JIT-built extension)
        "zero_force_ds_cpu_optimizer": False,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": optim.lr,
                "betas": list(optim.betas),
                "eps": optim.eps,
                "weight_decay": optim.weight_decay,
                "torch_adam": True,
            },
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def build_deepspeed_engine(model: nn.Module, optimizer_groups: list[dict], cfg: Any, mesh: DeviceMesh | None):
    """Wrap ``model`` in a DeepSpeed engine; returns ``(engine, optimizer)``.

    ``optimizer_groups`` are torch parameter groups (e.g. with and without weight decay); their
    options override the config's. Use ``engine(batch)``, ``engine.backward(loss)`` and
    ``engine.step()`` (which accumulates, clips and steps at the accumulation boundary).
    """
    import deepspeed

    if cfg.parallel.engine != "deepspeed":
        raise ConfigError(f"build_deepspeed_engine needs parallel.engine = 'deepspeed', got {cfg.parallel.engine!r}")
    device_type = next(model.parameters()).device.type
    if not dist.is_initialized():
        raise ConfigError("the deepspeed engine needs a process group: launch with torchrun or deepspeed")
    cfg.parallel.validate()  # e.g. ZeRO-3 with tp > 1
    tensor_parallel = mesh is not None and mesh["tp"].size() > 1
    if tensor_parallel:
        # TP replaces the parameters: the groups are given in the model's parameters as they were
        names = {id(p): name for name, p in model.named_parameters()}
        apply_tensor_parallel(model, mesh["tp"], cfg.parallel, cfg.model)
        localize_tensor_parallel(model)
        compute_on_dtensor_views(model, list(block_list(model, cfg.model)))
        params = dict(model.named_parameters())
        optimizer_groups = [
            {**group, "params": [params[names[id(p)]] for p in group["params"]]} for group in optimizer_groups
        ]
    # Per-block checkpointing, reentrant: a non-reentrant recomputation under ZeRO-3 ran on the
    # partitioned (empty) parameters, as the block's gathering hooks did not run for it.
    apply_activation_checkpointing(block_list(model, cfg.model), cfg.parallel.activation_checkpointing, reentrant=True)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=optimizer_groups,
        config=deepspeed_config(cfg, device_type),
        mpu=MeshMPU(mesh) if mesh is not None else None,
        dist_init_required=False,
    )
    return engine, optimizer
