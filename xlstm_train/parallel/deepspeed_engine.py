"""DeepSpeed ZeRO as the second data-parallel engine (``parallel.engine: deepspeed``).

The run keeps its own model, parameter groups and learning-rate schedule; DeepSpeed owns the
ZeRO partitioning (stage 1: optimizer states, 2: + gradients, 3: + parameters), the optional CPU
offload of the optimizer, bf16, gradient accumulation and clipping. Its process groups come from
our DeviceMesh through ``MeshMPU``, so ZeRO partitions over the data-parallel ranks only.

The optimizer is ``torch.optim.AdamW`` (``"torch_adam": true``): DeepSpeed's fused Adam is a
JIT-built extension that a CPU-only machine (CI) cannot rely on.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from xlstm_train.config import ConfigError
from xlstm_train.parallel.distributed import dp_mesh
from xlstm_train.parallel.parallelize import apply_activation_checkpointing, block_list


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
    if mesh is not None and mesh["tp"].size() > 1:
        raise ConfigError(
            f"parallel.tp = {mesh['tp'].size()} with parallel.engine = 'deepspeed': the DTensor tensor-parallel "
            "plans compose with the fsdp engine; use engine 'fsdp' for tp > 1"
        )
    device_type = next(model.parameters()).device.type
    if not dist.is_initialized():
        raise ConfigError("the deepspeed engine needs a process group: launch with torchrun or deepspeed")
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


# ------------------------------------------------------------------------------------------------
# Checkpoints


def save_deepspeed_checkpoint(engine, directory: str | Path, step: int, client_state: dict | None = None) -> None:
    """DeepSpeed's own sharded checkpoint (``directory/step-N/`` + the ``latest`` tag file).

    DeepSpeed writes the tag file last, so a killed save leaves ``latest`` on the previous good one.
    """
    engine.save_checkpoint(str(directory), tag=f"step-{step:07d}", client_state=client_state or {})


def load_deepspeed_checkpoint(engine, directory: str | Path) -> dict:
    """Resume from the ``latest`` checkpoint in ``directory``; returns its client state."""
    path, client_state = engine.load_checkpoint(str(directory))
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (no 'latest' tag) in {directory}")
    return client_state


def deepspeed_to_state_dict(directory: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint of any ZeRO stage, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(directory)
    if not (directory / "latest").is_file() and tag is None:
        raise FileNotFoundError(f"{directory}: not a DeepSpeed checkpoint directory (no 'latest' tag file)")
    if tag is not None and not glob.glob(os.path.join(directory, tag, "*model_states.pt")):
        raise FileNotFoundError(f"{directory / tag}: no DeepSpeed model states in this tag")
    state = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    # names as in our checkpoints: without the activation-checkpointing wrapper's prefix
    return {name.replace("_checkpoint_wrapped_module.", ""): tensor for name, tensor in state.items()}


def convert_deepspeed_checkpoint(directory: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write a DeepSpeed checkpoint's fp32 model in our format: a DCP directory ``{"model": ...}``.

    It loads into a model of any parallel layout as the model part of our checkpoints does (for
    evaluation, export or as initial weights). It holds the model only: DeepSpeed keeps optimizer
    moments in its own flat partitions, so they are not converted, and there is no train state.
    """
    import torch.distributed.checkpoint as dcp

    state = deepspeed_to_state_dict(directory, tag)
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
    os.replace(tmp, out_dir)
    return out_dir
