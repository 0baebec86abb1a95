"""The training step behind one interface, with two implementations: FSDP2 and DeepSpeed ZeRO.

An engine owns the parallelised model and its optimizer. Per optimizer step it runs

    forward_backward(micro_batches)   the exact token-normalised loss of the whole step
    step(micro_batches, accept)       forward_backward -> clip -> finite check -> accept? -> update or skip

and it saves and loads its model and optimizer state through ``train.checkpoint``. The trainer's loop
and ``scripts/bench_train.py`` both drive ``step``, so a benchmark's step is the trainer's step. The
learning-rate schedule, data, progress and logging belong to the loop; the schedule sets the rates of
``engine.optimizer``'s parameter groups.

The loss is ``token_loss``, the one function both engines, evaluation and benchmarks call: the summed
cross-entropy over a micro-batch's valid tokens and their count. Each micro-batch's sum is divided by
the valid tokens of the whole step (all micro-batches, all data-parallel ranks), so accumulating k
micro-batches gives exactly the gradient of one batch k times larger, whatever the padding.
"""

from __future__ import annotations

import collections
import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from xlstm_train.data import IGNORE_INDEX
from xlstm_train.parallel import clip_grad_norm_, dp_mean, loss_context, parallelize_model, to_full
from xlstm_train.train.optim import build_optimizer, param_groups

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from xlstm_train.parallel import ParallelConfig
    from xlstm_train.train.checkpoint import Checkpointer
    from xlstm_train.train.config import Config, SpikeGuardConfig

MicroBatch = dict[str, torch.Tensor]  # input_ids, labels (IGNORE_INDEX where no loss), doc_ids: (B, S)


# ----------------------------------------------------------------------------------------------
# The loss


def token_loss(model: Callable[..., torch.Tensor], micro_batch: MicroBatch, fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy over the micro-batch's valid tokens, number of valid tokens).

    ``model`` is whatever runs the forward (a module, or DeepSpeed's engine around it). ``fused``:
    the model computes the loss in its forward from the labels (head and soft-capped cross-entropy
    fused, see ``models.layers.head_loss_sum``), so the logits are never materialised; otherwise the
    forward returns the logits and the loss is taken from them here (the reference path). Either way
    the sum is computed in fp32 or wider; under tensor parallelism with a vocabulary-parallel loss it
    is a replicated DTensor (call it inside ``loss_context``).
    """
    labels = micro_batch["labels"]
    num_tokens = (labels != IGNORE_INDEX).sum()
    if fused:
        return model(micro_batch["input_ids"], doc_ids=micro_batch["doc_ids"], labels=labels), num_tokens
    logits = model(micro_batch["input_ids"], doc_ids=micro_batch["doc_ids"])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    loss_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, num_tokens


def count_valid_tokens(micro_batches: list[MicroBatch]) -> torch.Tensor:
    return sum((mb["labels"] != IGNORE_INDEX).sum() for mb in micro_batches)


def normalised_losses(model, micro_batches: list[MicroBatch], autocast, mesh=None,
                      parallel_cfg: ParallelConfig | None = None, fused: bool = True) -> Iterator[torch.Tensor]:  # fmt: skip
    """Each micro-batch's summed loss divided by the step's valid tokens, yielded inside the loss
    context so that the caller's backward runs there too.

    With data parallelism the divisor is the mean token count per rank: both engines average the
    ranks' gradients, which makes the sum over all ranks' tokens divided by all of them.
    """
    num_tokens = dp_mean(count_valid_tokens(micro_batches).float(), mesh).clamp(min=1)
    for mb in micro_batches:
        with loss_context(mesh, parallel_cfg):
            with autocast():
                loss_sum, _ = token_loss(model, mb, fused)
            yield loss_sum / num_tokens


# ----------------------------------------------------------------------------------------------
# The interface


@dataclass
class StepResult:
    """What one optimizer step did. ``loss`` is the step's mean token loss over all ranks,
    ``grad_norm`` the total gradient norm before clipping (NaN when no gradient was reduced);
    ``applied`` says whether the optimizer changed the weights."""

    loss: float
    grad_norm: float
    applied: bool

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


# Decides, from a finite step's loss and gradient norm, whether its update is applied (a spike guard).
AcceptStep = Callable[[StepResult], bool]


class SpikeGuard:
    """Rejects the update of a step whose loss or gradient norm jumps above the recent steps.

    A value is a spike when it exceeds the mean of the last ``window`` accepted steps by more than
    ``sigmas`` of their standard deviations (OLMo's skip-step rule; Megatron checks spiky losses
    against recent ones too). Only accepted steps enter the window, so a spike does not widen the
    band that the next one is judged by. Nothing is rejected until the window is full: early
    training, where the loss falls fastest, always passes. Every rank sees the same loss and norm
    (both are reduced over the ranks), so every rank decides the same way. The window is part of
    the checkpointed train state, which keeps a resumed run's decisions those of an uninterrupted one.
    """

    def __init__(self, cfg: SpikeGuardConfig):
        self.cfg = cfg
        self.losses: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.grad_norms: collections.deque[float] = collections.deque(maxlen=cfg.window)
        self.rejected: str | None = None  # why the last step was rejected, for the console

    def __call__(self, result: StepResult) -> bool:
        self.rejected = None
        if len(self.losses) == self.cfg.window:
            for name, value, window, sigmas in (
                ("loss", result.loss, self.losses, self.cfg.loss_sigmas),
                ("gradient norm", result.grad_norm, self.grad_norms, self.cfg.grad_norm_sigmas),
            ):
                mean, std = _mean_std(window)
                if sigmas > 0 and value > mean + sigmas * std:
                    self.rejected = (f"{name} {value:.4g} is more than {sigmas:g} standard deviations above "
                                     f"the mean of the last {len(window)} steps ({mean:.4g} +- {std:.3g})")
                    return False
        self.losses.append(result.loss)
        self.grad_norms.append(result.grad_norm)
        return True

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "grad_norms": list(self.grad_norms)}

    def load_state_dict(self, state: dict) -> None:
        self.losses.clear()
        self.losses.extend(state["losses"])
        self.grad_norms.clear()
        self.grad_norms.extend(state["grad_norms"])


def _mean_std(values) -> tuple[float, float]:
    """Mean and population standard deviation, in plain Python floats (the same on every rank and
    every resume)."""
    mean = math.fsum(values) / len(values)
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / len(values))


class Engine:
    """The parallelised model and its optimizer (see the module docstring).

    ``model`` is the module to evaluate and sample with; ``optimizer`` the torch optimizer whose
    parameter groups the schedule drives. ``can_skip``: whether a non-finite step can leave the
    weights untouched (``step`` then returns ``applied=False``) or is only detected after the update.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    can_skip: bool

    def __init__(self, cfg: Config, mesh: DeviceMesh | None, autocast):
        self.mesh, self.parallel_cfg, self.autocast = mesh, cfg.parallel, autocast
        self.max_grad_norm = cfg.optim.clip_grad_norm
        self.fused_loss = cfg.train.fused_cross_entropy

    def forward_backward(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Accumulate the gradient of the step's mean token loss; return this rank's share of it."""
        raise NotImplementedError

    def step(self, micro_batches: list[MicroBatch], accept: AcceptStep | None = None) -> StepResult:
        """One optimizer step. The update is applied when the loss and gradient norm are finite and
        ``accept`` (if given) agrees; otherwise the weights and optimizer state stay as they were."""
        raise NotImplementedError

    def save(self, checkpointer: Checkpointer, step: int, train_state: dict, config: dict) -> Path:
        raise NotImplementedError

    def load(self, path: Path) -> None:
        """Restore the model and optimizer in place from checkpoint ``path``."""
        raise NotImplementedError


def autocast_for(cfg: Config, device: torch.device):
    """bf16 autocast on GPU when the recipe asks for bf16; fp32 otherwise (CPU always runs fp32)."""
    if device.type == "cuda" and cfg.train.dtype == "bf16":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def build_engine(model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device) -> Engine:
    """The engine ``cfg.parallel.engine`` names, around ``model`` (built on ``device``, unsharded)."""
    if cfg.parallel.engine == "deepspeed":
        return DeepSpeedEngine(model, cfg, mesh, device)
    return FSDPEngine(model, cfg, mesh, device)


# ----------------------------------------------------------------------------------------------
# FSDP2 (and tensor parallel, activation checkpointing, compile): the native engine


def forward_backward(model: nn.Module, micro_batches: list[MicroBatch], autocast=contextlib.nullcontext,
                     mesh=None, parallel_cfg=None, fused: bool = True) -> torch.Tensor:  # fmt: skip
    """``FSDPEngine.forward_backward`` on any module: accumulate the gradient of the step's mean
    token loss into ``.grad``; return this rank's share of that loss."""
    total = 0.0
    for loss in normalised_losses(model, micro_batches, autocast, mesh, parallel_cfg, fused):
        loss.backward()
        total = total + to_full(loss.detach())  # a DTensor under vocabulary-parallel loss
    return total


class FSDPEngine(Engine):
    """TP -> activation checkpointing -> compile -> FSDP2 as the recipe's parallel section says, and
    ``torch.optim.AdamW``. The finite check comes before the update, so a bad step can be skipped."""

    can_skip = True

    def __init__(self, model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device):
        super().__init__(cfg, mesh, autocast_for(cfg, device))
        param_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.dtype == "bf16" else None
        self.model = parallelize_model(model, mesh, cfg.parallel, cfg.model, param_dtype=param_dtype,
                                       device_type=device.type)
        self.optimizer = build_optimizer(self.model, cfg.optim)

    def forward_backward(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        return forward_backward(self.model, micro_batches, self.autocast, self.mesh, self.parallel_cfg,
                                self.fused_loss)

    def step(self, micro_batches: list[MicroBatch], accept: AcceptStep | None = None) -> StepResult:
        loss = self.forward_backward(micro_batches)
        norm = clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        result = StepResult(dp_mean(loss, self.mesh).item(), norm.item(), applied=False)
        if result.finite and (accept is None or accept(result)):
            self.optimizer.step()
            result.applied = True
        self.optimizer.zero_grad(set_to_none=True)
        return result

    def save(self, checkpointer: Checkpointer, step: int, train_state: dict, config: dict) -> Path:
        return checkpointer.save(step, self.model, self.optimizer, train_state, config)

    def load(self, path: Path) -> None:
        from xlstm_train.train.checkpoint import Checkpointer

        Checkpointer.load(path, self.model, self.optimizer)


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO-1/2/3 (see ``xlstm_train.parallel.deepspeed_engine``) with the same parameter
    groups and loss. DeepSpeed accumulates, clips and updates inside ``engine.step()``, and has no
    overflow skip in fp32/bf16: a non-finite loss is caught before that call (``applied=False``), a
    non-finite gradient norm only after its update (``applied=True``)."""

    can_skip = False

    def __init__(self, model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device):
        from xlstm_train.parallel.deepspeed_engine import build_deepspeed_engine

        super().__init__(cfg, mesh, autocast_for(cfg, device))
        # ZeRO partitions the optimizer over the dp ranks; the schedule sets the lr of its groups
        self.engine, ds_optimizer = build_deepspeed_engine(model, param_groups(model, cfg.optim), cfg, mesh)
        self.model = self.engine.module
        self.optimizer = ds_optimizer.optimizer

    def forward_backward(self, micro_batches: list[MicroBatch]) -> torch.Tensor:
        """Every micro-batch but the last is followed by ``engine.step()``, which only counts it;
        ``step`` takes the last (the update) after its finite check. Our loss is already divided by
        the step's tokens, so DeepSpeed's division by the accumulation steps is switched off."""
        total = 0.0
        losses = normalised_losses(self.engine, micro_batches, self.autocast, self.mesh, self.parallel_cfg,
                                   self.fused_loss)
        for n, loss in enumerate(losses):
            loss = to_full(loss)  # DeepSpeed takes a plain scalar
            self.engine.backward(loss, scale_wrt_gas=False)
            if n < len(micro_batches) - 1:
                self.engine.step()
            total = total + loss.detach()
        return total

    def step(self, micro_batches: list[MicroBatch], accept: AcceptStep | None = None) -> StepResult:
        if accept is not None:  # refused when the config is read (train.spike_guard)
            raise ValueError("the DeepSpeed engine learns the gradient norm only after its update: it cannot "
                             "skip a step by its loss and norm")
        loss = dp_mean(self.forward_backward(micro_batches), self.mesh).item()
        if not math.isfinite(loss):
            return StepResult(loss, math.nan, applied=False)
        self.engine.step()
        return StepResult(loss, float(self.engine.get_global_grad_norm()), applied=True)

    def save(self, checkpointer: Checkpointer, step: int, train_state: dict, config: dict) -> Path:
        return checkpointer.save_deepspeed(step, self.engine, train_state, config)

    def load(self, path: Path) -> None:
        from xlstm_train.train.checkpoint import load_deepspeed_checkpoint

        load_deepspeed_checkpoint(self.engine, path)
