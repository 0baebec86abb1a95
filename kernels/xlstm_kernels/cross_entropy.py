"""Linear head + (soft-capped) cross-entropy without materialising the logits.

The language-model loss ``sum_t CE(cap * tanh((h_t @ W.T) / cap), y_t)`` needs the logits only one
block of tokens at a time. Materialised whole they dominate peak memory: at micro-batch 8,
S = 2048 and a 50k vocabulary, one fp32 copy is 3.1 GiB, and the soft-cap, the cast and their
gradients keep several copies alive.

Two implementations, one contract:

- ``"liger"``: Liger Kernel's fused linear cross-entropy (Triton, CUDA). It computes the loss and
  the gradients of ``hidden`` and ``weight`` block by block in the forward and keeps only those
  gradients; the soft-cap is applied inside its kernel. Imported lazily: it is a dependency on
  Linux but this package must import without it.
- ``"chunked"``: plain PyTorch on any device and dtype (fp64 included). Each block of tokens is an
  activation-checkpointed call of the plain expression, so only one block's logits exist at a
  time, in the forward and again in the backward.

``"auto"`` takes Liger for CUDA tensors in fp32/bf16/fp16 when it imports, else the chunked path.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IMPLS = ("auto", "liger", "chunked")
IGNORE_INDEX = -100

# Rows per block of the chunked path: the block's fp32 logits are rows * vocab * 4 bytes (about
# 200 MiB at a 50k vocabulary); larger blocks only save Python overhead.
DEFAULT_CHUNK_ROWS = 1024


@functools.cache
def _liger_function():
    try:
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyFunction


def _plain_loss_sum(hidden, weight, labels, soft_cap: float | None, ignore_index: int) -> torch.Tensor:
    """The reference expression: full logits, upcast to fp32 (or wider), soft-capped, summed CE."""
    logits = hidden @ weight.t()
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if soft_cap is not None:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")


def _chunked_loss_sum(hidden, weight, labels, soft_cap, ignore_index, chunk_rows: int) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    total = None
    for start in range(0, hidden.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        args = (hidden[rows], weight, labels[rows], soft_cap, ignore_index)
        if needs_grad:
            part = checkpoint(_plain_loss_sum, *args, use_reentrant=False)
        else:
            part = _plain_loss_sum(*args)
        total = part if total is None else total + part
    return total


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    soft_cap: float | None = None,
    ignore_index: int = IGNORE_INDEX,
    impl: str = "auto",
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> torch.Tensor:
    """Summed cross-entropy of the logits ``soft_cap(hidden @ weight.T)`` against ``labels``.

    hidden ``(..., E)``, weight ``(V, E)``, labels ``(...)`` integer class ids (``ignore_index``
    leaves a token out). ``soft_cap`` None or a positive float: logits become
    ``soft_cap * tanh(logits / soft_cap)``. Returns a 0-dim tensor, fp32 (fp64 for fp64 inputs):
    the sum over the tokens that are not ignored, 0 when all are. Under CUDA autocast the matmuls
    run in the autocast dtype, as ``nn.Linear`` would; the softmax is in fp32 either way.
    """
    if impl not in IMPLS:
        raise ValueError(f"linear_cross_entropy: impl must be one of {IMPLS}, got {impl!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be (V, E) with E = hidden.shape[-1] = {hidden.shape[-1]}; "
            f"got {tuple(weight.shape)}"
        )
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"linear_cross_entropy: labels {tuple(labels.shape)} must match hidden's leading dims "
            f"{tuple(hidden.shape[:-1])}"
        )
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"linear_cross_entropy: soft_cap must be None or positive, got {soft_cap!r}")
    if chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be >= 1, got {chunk_rows!r}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if impl == "auto":
        on_gpu = hidden.is_cuda and hidden.dtype in (torch.float32, torch.bfloat16, torch.float16)
        # Liger computes the gradients during the forward: without a backward that is wasted work
        impl = "liger" if on_gpu and needs_grad and _liger_function() is not None else "chunked"
    if impl == "liger":
        liger = _liger_function()
        if liger is None:
            raise ValueError("linear_cross_entropy: impl='liger' needs the liger-kernel package, which does not import here")
        if torch.is_autocast_enabled("cuda"):
            # an autograd.Function runs outside autocast: cast its matmul operands as nn.Linear would
            dtype = torch.get_autocast_dtype("cuda")
            hidden, weight = hidden.to(dtype), weight.to(dtype)
        # Liger keeps the weight's gradient in the weight's dtype unless told otherwise: accumulate
        # the blocks' contributions in fp32 (bf16 parameters, e.g. under FSDP's mixed precision).
        loss, *_ = liger.apply(
            hidden.contiguous(), weight, labels.contiguous(), None, None, ignore_index, 0.0, 0.0, "sum",
            soft_cap, False, torch.float32,
        )  # fmt: skip
        return loss
    return _chunked_loss_sum(hidden, weight, labels, soft_cap, ignore_index, chunk_rows)


__all__ = ["linear_cross_entropy"]
