"""Tensor parallelism: the DTensor styles the architectures' plans are made of, and applying a plan.

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
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from xlstm_train.archs import arch_names, get_spec
from xlstm_train.config import ConfigError
from xlstm_train.parallel.config import ParallelConfig

# ------------------------------------------------------------------------------------------------
# Styles beyond the stock column/row/sequence ones


class PrepareFirstInput(ParallelStyle):
    """Turn the first positional input into a DTensor with ``desired`` layout; leave the rest.

    Used on a TP region (an mLSTM layer, an FFN) so that its input is made replicated once: the
    column-parallel projections inside then add their partial input gradients into one DTensor
    and a single all-reduce (or reduce-scatter under sequence parallelism) finishes the backward.
    """

    def __init__(self, input_layout, desired_layout, autocast_input: bool = False):
        super().__init__()
        self.input_layout = input_layout
        self.desired_layout = desired_layout
        # For regions whose input only feeds projections: under autocast, cast it to the compute
        # dtype on entry (autocast would cast it inside each projection anyway). The input
        # gradient's partial sums then arrive in that dtype and the all-reduce that finishes them
        # moves half the bytes of an fp32 one.
        self.autocast_input = autocast_input

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def prepare(_module, args):
            if not args or not isinstance(args[0], torch.Tensor):
                return args
            x = args[0]
            device_type = x.device.type
            if self.autocast_input and torch.is_autocast_enabled(device_type):
                x = x.to(torch.get_autocast_dtype(device_type))
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


class Packed:
    """A parameter packing ``parts`` head-major tensors one after another along ``dim``.

    The paper mLSTM's ``proj_up`` rows are ``[x_m; z]`` and its gates read ``cat(q, k, v)``: a
    rank's heads sit in every part. Such a parameter stays whole (replicated) over TP - a packed
    split is no DTensor placement that FSDP2 can shard further - and each rank computes with the
    rows (or columns) of its heads in every part; the all-gather in the backward gives every rank
    the full, correct gradient.
    """

    def __init__(self, parts: int, dim: int = 0):
        self.parts = parts
        self.dim = dim


def local_heads_of_packed(param: DTensor, packed: Packed) -> torch.Tensor:
    """The local-head slice of a replicated packed DTensor parameter, as a plain tensor."""
    dim = packed.dim % param.ndim
    shape = list(param.shape)
    split = shape[:dim] + [packed.parts, shape[dim] // packed.parts] + shape[dim + 1 :]
    local = param.view(split).redistribute(placements=(Shard(dim + 1),)).to_local()
    return local.reshape(*shape[:dim], -1, *shape[dim + 1 :])


def _local_input(x: torch.Tensor, mesh: DeviceMesh, mode: str) -> torch.Tensor:
    """Convert a module's input for local compute on this rank's heads.

    ``local``: already this rank's heads. ``slice``: a replicated input of which the rank takes
    its heads' features (the backward all-gathers). ``partial``: a replicated input used whole;
    each rank's input gradient is a partial sum (the backward all-reduces).
    """
    if mode == "local":
        return x.to_local() if isinstance(x, DTensor) else x
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, (Replicate(),), run_check=False)
    x = x.redistribute(placements=(Replicate(),))
    if mode == "slice":
        return x.redistribute(placements=(Shard(x.ndim - 1),)).to_local()
    return x.to_local(grad_placements=(Partial(),))


class HeadLocal(ParallelStyle):
    """Run a per-head module on this rank's heads only.

    ``params`` maps a parameter name (relative to the module, dotted for a submodule's) to
    ``Shard(d)`` (split by head along ``d``) or ``Packed(parts, dim)``. Parameters become DTensors,
    so optimizers, FSDP and checkpoints see their global shapes; during the module's forward they
    are swapped for their local heads (``to_local`` is differentiable: gradients land on the
    DTensor parameters), so the module's code runs unchanged. ``input`` says how the first
    positional input is made local (see ``_local_input``).
    """

    def __init__(self, params: dict[str, Any], input: str = "local"):
        super().__init__()
        self.params = params
        self.input = input

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        owned = []
        for name, placement in self.params.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            param = owner._parameters.get(leaf)
            if param is None:
                continue  # an optional parameter (a bias) this model does not have
            dt_placement = Replicate() if isinstance(placement, Packed) else placement
            param = nn.Parameter(distribute_tensor(param.data, mesh, [dt_placement]), param.requires_grad)
            owner.register_parameter(leaf, param)
            owned.append((owner, leaf, placement))
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []

        def to_local(_module, args):
            for owner, leaf, placement in owned:
                param = owner._parameters[leaf]
                if isinstance(param, DTensor):
                    swapped.append((owner, leaf, param))
                    local = local_heads_of_packed(param, placement) if isinstance(placement, Packed) else param.to_local()
                    owner._parameters[leaf] = local
            if args and isinstance(args[0], torch.Tensor):
                return (_local_input(args[0], mesh, self.input), *args[1:])
            return args

        def restore(_module, _args, _output):
            while swapped:
                owner, leaf, param = swapped.pop()
                owner._parameters[leaf] = param

        # Not always_call=True: under torch.compile that makes each block's graph guard on its own
        # hook id, recompiling per block. A forward that raises ends the step anyway, and
        # activation checkpointing recomputes without early stop (parallelize.py).
        module.register_forward_pre_hook(to_local)
        module.register_forward_hook(restore)
        return module


class GateFromAllHeads(ParallelStyle):
    """The paper mLSTM's input/forget gate: ``Linear(3 * inner -> NH)`` on ``cat(q, k, v)`` of all heads.

    Each rank holds q, k, v of its heads only. Rather than all-gathering them (3 * inner features
    per token), each rank multiplies its features by the matching weight columns, one all-reduce of
    the NH-wide partial sums gives every head's pre-activation, and the rank keeps its heads'.
    """

    def __init__(self, parts: int = 3):
        super().__init__()
        self.packed = Packed(parts, dim=1)

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for leaf in ("weight", "bias"):
            param = module._parameters[leaf]
            module.register_parameter(
                leaf, nn.Parameter(distribute_tensor(param.data, mesh, [Replicate()]), param.requires_grad)
            )

        def forward(qkv_local: torch.Tensor) -> torch.Tensor:
            weight = local_heads_of_packed(module.weight, self.packed)
            partial = nn.functional.linear(_local_input(qkv_local, mesh, "local"), weight)
            pre = DTensor.from_local(partial, mesh, (Partial(),), run_check=False)
            pre = pre.redistribute(placements=(Replicate(),)) + module.bias
            return pre.redistribute(placements=(Shard(pre.ndim - 1),)).to_local()

        module.forward = forward
        return module


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) in the forward, identity in the backward: the partial embeddings of the
    vocabulary shards add up to the full ones, and each shard's gradient is the output's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ReduceScatterSequence(torch.autograd.Function):
    """Sum over ranks and keep this rank's slice of the sequence (dim 1); the backward all-gathers."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        chunks = [c.contiguous() for c in x.chunk(world, dim=1)]
        out = torch.empty_like(chunks[dist.get_rank(group)])
        dist.reduce_scatter(out, chunks, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        parts = [torch.empty_like(grad) for _ in range(world)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.group)
        return torch.cat(parts, dim=1), None


class VocabParallelEmbedding(ParallelStyle):
    """An ``nn.Embedding`` whose rows (the vocabulary) are split over the TP ranks.

    Each rank looks up the ids in its rows (zeros for the others) and the ranks' outputs are
    summed (all-reduce, or reduce-scatter over the sequence with sequence parallelism). Unlike
    ``RowwiseParallel`` on an embedding, the output leaves through a plain autograd function rather
    than a DTensor, which a compiled block after it needs for its backward.
    """

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        weight = module.weight
        module.register_parameter(
            "weight", nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(0)]), weight.requires_grad)
        )
        group = mesh.get_group()
        rows_per_rank = -(-weight.shape[0] // mesh.size())  # torch.chunk's split: ceil
        first = rows_per_rank * mesh.get_local_rank()

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            local_weight = module.weight.to_local()
            local_ids = input_ids - first
            mine = (local_ids >= 0) & (local_ids < local_weight.shape[0])
            out = nn.functional.embedding(local_ids.clamp(0, local_weight.shape[0] - 1), local_weight)
            out = out * mine.unsqueeze(-1).to(out.dtype)
            if self.sequence_parallel:
                return _ReduceScatterSequence.apply(out, group)
            return _SumOverRanks.apply(out, group)

        module.forward = forward
        return module


class Compose(ParallelStyle):
    """Several styles on one module, applied in order."""

    def __init__(self, *styles: ParallelStyle):
        super().__init__()
        self.styles = styles

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        for style in self.styles:
            module = style._apply(module, mesh)
        return module


# ------------------------------------------------------------------------------------------------
# Pieces of every plan (the plans themselves are the architectures' specs: xlstm_train.archs)


def embedding_and_head_plan(
    embedding: str, final_norm: str, head: str, sequence_parallel: bool, loss_parallel: bool
) -> dict[str, ParallelStyle]:
    """A vocabulary-parallel input embedding and a head column-parallel over the vocabulary (its
    logits left sharded for ``loss_parallel``); with sequence parallelism the final norm is sharded."""
    residual = Shard(1) if sequence_parallel else Replicate()
    plan = {
        embedding: VocabParallelEmbedding(sequence_parallel=sequence_parallel),
        head: ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    if sequence_parallel:
        plan[final_norm] = SequenceParallel()
    return plan


def region_input(sequence_parallel: bool, autocast_input: bool = False) -> PrepareFirstInput:
    """On a TP region (a mixing layer, an FFN): make its input replicated once, on entry."""
    return PrepareFirstInput(Shard(1) if sequence_parallel else Replicate(), Replicate(), autocast_input)


def row_output(sequence_parallel: bool) -> RowwiseParallel:
    """A projection out of heads: partial sums all-reduced, or reduce-scattered over the sequence."""
    return RowwiseParallel(output_layouts=Shard(1) if sequence_parallel else Replicate())


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, cfg: ParallelConfig, model_cfg: Any) -> nn.Module:
    """Shard ``model`` over ``tp_mesh`` in place by its architecture's plan.

    That tp divides the head counts is checked where the mesh is built (``build_mesh``)."""
    spec = get_spec(model_cfg.arch)
    if spec.tp_plan is None:
        with_plan = [name for name in arch_names() if get_spec(name).tp_plan is not None]
        raise ConfigError(f"model.arch = {spec.name!r}: tensor parallelism is available for {with_plan}")
    if getattr(model_cfg, "tie_embeddings", False):
        raise ConfigError(
            "model.tie_embeddings = true with parallel.tp > 1: the vocabulary-parallel embedding and the "
            "column-parallel head shard the shared matrix differently; untie them for tensor parallelism"
        )
    plan = spec.tp_plan(model, cfg.sequence_parallel, cfg.loss_parallel)
    parallelize_module(model, tp_mesh, plan)
    replicate_remaining_params(model, tp_mesh)
    return model


def replicate_remaining_params(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make every parameter the plan left alone (the norms between TP regions, without sequence
    parallelism) a replicated DTensor that its module uses as a local tensor.

    Their gradients are already equal on all TP ranks; the point is one kind of parameter: a
    foreach/fused optimizer cannot mix DTensors and plain tensors in one step.
    """
    for module in model.modules():
        plain = [name for name, p in module.named_parameters(recurse=False) if not isinstance(p, DTensor)]
        if plain:
            HeadLocal({name: Replicate() for name in plain})._apply(module, tp_mesh)
