"""Tensor-parallel plans: DTensor ``parallelize_module`` plans for every model, split by head.

The recipe is Megatron's, written with PyTorch's DTensor styles so that it runs on gloo (CI) and
nccl alike:

- projections into heads (q, k, v, gates, FFN up) are column-parallel: each rank computes the
  output features of its heads from the full (replicated) input;
- projections out of heads (mLSTM out/down, FFN down) are row-parallel: each rank contributes a
  partial sum that one all-reduce (or reduce-scatter with sequence parallelism) combines;
- everything per head in between (the mLSTM/sLSTM cells, per-head norms, depthwise convolutions,
  block-diagonal projections) runs locally on the rank's heads. Their parameters are sharded by
  head as DTensors (so checkpoints reshard) but the modules compute on plain local shards
  (``HeadLocal``), which keeps the single-device model code unchanged;
- the embedding is vocabulary-parallel and the head column-parallel over the vocabulary; with
  ``loss_parallel`` the logits stay sharded over the vocabulary and the cross-entropy runs under
  ``torch.distributed.tensor.parallel.loss_parallel()`` (the logit soft-cap is elementwise, so it
  applies to the shards as they are);
- with ``sequence_parallel`` the residual stream and the norms between TP regions are sharded
  over the sequence: all-gather before a TP region, reduce-scatter after it.

Models derive head counts from tensor shapes, so a rank holding ``NH / tp`` heads runs the same code.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.placement_types import _StridedShard

from xlstm_train.config import ConfigError
from xlstm_train.parallel.config import ParallelConfig
from xlstm_train.parallel.distributed import check_tp_divides_heads

# ------------------------------------------------------------------------------------------------
# Styles beyond the stock column/row/sequence ones


class PrepareFirstInput(ParallelStyle):
    """Turn the first positional input into a DTensor with ``desired`` layout; leave the rest.

    Used on a TP region (an mLSTM layer, an FFN) so that its input is made replicated once: the
    column-parallel projections inside then add their partial input gradients into one DTensor
    and a single all-reduce (or reduce-scatter under sequence parallelism) finishes the backward.
    """

    def __init__(self, input_layout, desired_layout):
        super().__init__()
        self.input_layout = input_layout
        self.desired_layout = desired_layout

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def prepare(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return args
            x = args[0]
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, mesh, (self.input_layout,), run_check=False)
            if x.placements != (self.desired_layout,):
                x = x.redistribute(placements=(self.desired_layout,))
            return (x, *args[1:])

        module.register_forward_pre_hook(prepare)
        return module


class GatherOutput(ParallelStyle):
    """All-gather a module's head-sharded output (first element if it returns a tuple) along ``dim``.

    The sLSTM layer has no row-parallel projection after its cell: its per-head outputs go straight
    into the residual stream, which is replicated, so they are gathered.
    """

    def __init__(self, dim: int = -1, output_layout=None):
        super().__init__()
        self.dim = dim
        self.output_layout = output_layout or Replicate()

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def gather(_module, _args, output):
            rest = None
            if isinstance(output, tuple):
                output, *rest = output
            y = DTensor.from_local(output, mesh, (Shard(self.dim % output.ndim),), run_check=False)
            y = y.redistribute(placements=(self.output_layout,)).to_local()
            return y if rest is None else (y, *rest)

        module.register_forward_hook(gather)
        return module


class SliceInput(ParallelStyle):
    """Give a head-local module only its rank's slice of a replicated input (along ``dim``).

    The backward all-gathers the slices' gradients, which is exactly the gradient of the slicing.
    Inputs that already hold only the local slice (their ``dim`` is the local size) pass unchanged.
    """

    def __init__(self, full_size_of, dim: int = -1):
        super().__init__()
        self.full_size_of = full_size_of  # module -> the global size of the sliced dimension
        self.dim = dim

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        full = self.full_size_of(module)

        def slice_input(_module, args):
            x = args[0]
            if isinstance(x, DTensor):
                x = x.redistribute(placements=(Replicate(),)).to_local()
            if x.shape[self.dim] != full:
                return args
            x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
            x = x.redistribute(placements=(Shard(self.dim % x.ndim),)).to_local()
            return (x, *args[1:])

        module.register_forward_pre_hook(slice_input)
        return module


class HeadLocal(ParallelStyle):
    """Shard a per-head module's parameters by head and run it on the local shards.

    ``params`` maps a parameter name (relative to the module) to the placement of its head
    dimension: ``Shard(d)``, or ``_StridedShard(d, split_factor=n)`` for a tensor that packs ``n``
    head-major parts one after another (each part is split by head and a rank holds the rank-th
    piece of every part). The parameters become DTensors, so optimizers, FSDP and checkpoints see
    their global shapes; during the module's own forward they are swapped for their local shards
    (``DTensor.to_local`` is differentiable, the gradient lands on the DTensor parameter), so the
    module's code runs unchanged on the rank's heads.
    """

    def __init__(self, params: dict[str, Any]):
        super().__init__()
        self.params = params

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        owners = []
        for name, placement in self.params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            param = owner._parameters.get(leaf)
            if param is None:
                continue  # an optional parameter (e.g. a bias) this model does not have
            if not isinstance(param, DTensor):
                param = nn.Parameter(distribute_tensor(param.data, mesh, [placement]), param.requires_grad)
                owner.register_parameter(leaf, param)
            owners.append((owner, leaf))
        if not owners:
            return module
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

        def to_local(_module, _args):
            for owner, leaf in owners:
                param = owner._parameters[leaf]
                if isinstance(param, DTensor):
                    swapped.append((owner, leaf, param))
                    owner._parameters[leaf] = param.to_local()

        def restore(_module, _args, _output):
            while swapped:
                owner, leaf, param = swapped.pop()
                owner._parameters[leaf] = param

        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore, always_call=True)
        return module


# ------------------------------------------------------------------------------------------------
# Shared pieces of the plans


def _embedding_and_head(embedding: str, final_norm: str, head: str, sp: bool, loss_parallel: bool) -> dict:
    residual = Shard(1) if sp else Replicate()
    plan = {
        embedding: RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        head: ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sp:
        plan[final_norm] = SequenceParallel()
    return plan


def _region_input(sp: bool) -> PrepareFirstInput:
    return PrepareFirstInput(Shard(1) if sp else Replicate(), Replicate())


def _row_output(sp: bool) -> RowwiseParallel:
    return RowwiseParallel(output_layouts=Shard(1) if sp else Replicate())


# ------------------------------------------------------------------------------------------------
# Per-architecture plans


def xlstm_large_plan(model: nn.Module, sp: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    plan = _embedding_and_head("embedding", "backbone.out_norm", "lm_head", sp, loss_parallel)
    for n in range(len(model.backbone.blocks)):
        p = f"backbone.blocks.{n}"
        plan[f"{p}.mlstm_layer"] = _region_input(sp)
        for name in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact"):
            plan[f"{p}.mlstm_layer.{name}"] = ColwiseParallel()
        plan[f"{p}.mlstm_layer.multihead_norm"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)})
        plan[f"{p}.mlstm_layer.out_proj"] = _row_output(sp)
        plan[f"{p}.ffn"] = _region_input(sp)
        plan[f"{p}.ffn.proj_up_gate"] = ColwiseParallel()
        plan[f"{p}.ffn.proj_up"] = ColwiseParallel()
        plan[f"{p}.ffn.proj_down"] = _row_output(sp)
        if sp:
            plan[f"{p}.norm_mlstm"] = SequenceParallel()
            plan[f"{p}.norm_ffn"] = SequenceParallel()
    return plan


def llama_plan(model: nn.Module, sp: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    plan = _embedding_and_head("tok_embeddings", "norm", "output", sp, loss_parallel)
    for n in range(len(model.layers)):
        p = f"layers.{n}"
        plan[f"{p}.attention"] = _region_input(sp)
        for name in ("wq", "wk", "wv"):
            plan[f"{p}.attention.{name}"] = ColwiseParallel()
        plan[f"{p}.attention.wo"] = _row_output(sp)
        plan[f"{p}.feed_forward"] = _region_input(sp)
        plan[f"{p}.feed_forward.w1"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w3"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w2"] = _row_output(sp)
        if sp:
            plan[f"{p}.attention_norm"] = SequenceParallel()
            plan[f"{p}.ffn_norm"] = SequenceParallel()
    return plan


PLANS = {"xlstm_large": xlstm_large_plan, "llama": llama_plan}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig, model_cfg: Any) -> nn.Module:
    """Shard ``model`` over ``tp_mesh`` in place by its architecture's plan."""
    arch = getattr(model_cfg, "arch", None)
    if arch not in PLANS:
        raise ConfigError(f"model.arch = {arch!r}: tensor parallelism is available for {sorted(PLANS)}")
    check_tp_divides_heads(model_cfg, tp_mesh.size())
    if getattr(model_cfg, "tie_embeddings", False):
        raise ConfigError(
            "model.tie_embeddings = true with parallel.tp > 1: the vocabulary-parallel embedding and the "
            "column-parallel head shard the shared matrix differently; untie them for tensor parallelism"
        )
    plan = PLANS[arch](model, cfg.sequence_parallel, cfg.loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    return model
