"""Building blocks shared by the models: norms, headwise projections, the causal convolution, the
cell calls (through ``xlstm_kernels``), the official initialisers and the language-model loss.

Per-head operations derive the number of heads from tensor shapes, never from a config, so that a
tensor-parallel shard holding only some of the heads runs the same code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from xlstm_kernels.cross_entropy import linear_cross_entropy
from xlstm_kernels.mlstm import mlstm, mlstm_step
from xlstm_kernels.slstm import slstm, slstm_step

from xlstm_train.data import IGNORE_INDEX  # the label format's one definition (torch-free)

# --------------------------------------------------------------------------------------------------
# Initialisers (from gpt-neox, as used by the official xLSTM code)


def small_init_(weight: torch.Tensor, dim: int) -> torch.Tensor:
    """N(0, sqrt(2 / (5 dim))): "Transformers without Tears" (Nguyen & Salazar, 2019)."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(weight: torch.Tensor, dim: int, num_blocks: int) -> torch.Tensor:
    """N(0, 2 / (num_blocks sqrt(dim))): output projections shrink with depth."""
    return nn.init.normal_(weight, mean=0.0, std=2.0 / num_blocks / math.sqrt(dim))


def linspace_(param: torch.Tensor, start: float, end: float) -> torch.Tensor:
    with torch.no_grad():
        return param.copy_(torch.linspace(start, end, param.numel(), device=param.device).view_as(param))


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """``cap * tanh(x / cap)``: smooth clipping to (-cap, cap)."""
    return cap * torch.tanh(x / cap)


def round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


# --------------------------------------------------------------------------------------------------
# The language-model loss

def head_loss_sum(
    x: torch.Tensor, head: nn.Linear, labels: torch.Tensor, logit_soft_cap: float | None = None
) -> torch.Tensor:
    """Summed cross-entropy of ``head``'s (soft-capped) logits of ``x`` over the labels that are not
    ``IGNORE_INDEX``, in fp32.

    The head and the loss run fused, a block of tokens at a time, so the logits are never
    materialised whole (``xlstm_kernels.cross_entropy``). A tensor-parallel head (a DTensor weight)
    runs the plain way instead: its logits come out sharded over the vocabulary and the loss is the
    caller's vocabulary-parallel one (``loss_parallel``); the soft-cap is elementwise, so it applies
    to the shards as they are.
    """
    if isinstance(head.weight, DTensor):
        logits = head(x)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if logit_soft_cap is not None:
            logits = soft_cap(logits, logit_soft_cap)
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    if head.bias is not None:
        raise ValueError("head_loss_sum: the fused loss takes a head without bias")
    return linear_cross_entropy(x, head.weight, labels, soft_cap=logit_soft_cap, ignore_index=IGNORE_INDEX)


# --------------------------------------------------------------------------------------------------
# Norms


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with fp32 reductions; stores gamma (ones at init)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight
        return y if self.bias is None else y + self.bias


class LayerNorm(nn.Module):
    """Bias-free LayerNorm of the xLSTM paper blocks.

    The stored ``weight`` is gamma - 1 (zeros at init), the official ``xlstm`` parametrisation, so
    that checkpoints map one to one and weight decay pulls gamma towards 1 rather than 0.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), 1.0 + self.weight, None, self.eps)


class MultiHeadLayerNorm(nn.Module):
    """LayerNorm of each head's vector separately: ``(B, S, NH, DH) -> (B, S, NH * DH)``.

    Reductions run in fp32. ``residual_weight=True`` stores gamma - 1 (paper blocks); otherwise
    gamma itself (xLSTM Large). The affine weight spans all heads, so a TP shard holds its heads' part.
    """

    def __init__(self, dim: int, eps: float, residual_weight: bool, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.residual_weight = residual_weight
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight) if self.residual_weight else nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, S, NH, DH = h.shape
        hf = h.float()
        hf = (hf - hf.mean(-1, keepdim=True)) * torch.rsqrt(hf.var(-1, keepdim=True, unbiased=False) + self.eps)
        y = hf.to(h.dtype).reshape(B, S, NH * DH)
        y = y * (1.0 + self.weight if self.residual_weight else self.weight)
        return y if self.bias is None else y + self.bias


# --------------------------------------------------------------------------------------------------
# Projections and convolution


class LinearHeadwise(nn.Module):
    """Block-diagonal linear map: the features split into ``num_blocks`` blocks, each mapped by its
    own square matrix. ``weight`` is ``(num_blocks, block_out, block_in)`` as in the official code."""

    def __init__(self, features: int, num_blocks: int, bias: bool = False):
        super().__init__()
        block = features // num_blocks
        self.weight = nn.Parameter(torch.empty(num_blocks, block, block))
        self.bias = nn.Parameter(torch.empty(features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_blocks = self.weight.shape[0]
        y = torch.einsum("...hi,hoi->...ho", x.view(*x.shape[:-1], num_blocks, -1), self.weight)
        y = y.reshape(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time, ``(B, S, C) -> (B, S, C)``.

    Parameters live in ``conv`` (an ``nn.Conv1d`` with ``groups=C``) to keep the official names; the
    convolution itself is written as a sum of K shifted copies so that it can (a) start from a
    state holding the previous K-1 inputs and (b) leave out inputs from other documents: with
    ``doc_ids`` an output only sees inputs of its own document.
    """

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=True)

    def reset_parameters(self) -> None:
        # PyTorch's default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)), fan_in = kernel size.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.conv.weight, -bound, bound)
        nn.init.uniform_(self.conv.bias, -bound, bound)

    def forward(
        self,
        x: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        return_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``state`` is ``(B, K-1, C)``: the last K-1 inputs before ``x`` (they continue the document
        of ``x``'s first token). Returns ``(y, new_state)``; new_state holds only inputs of the
        document of the last token (others zeroed), as the cell states do."""
        B, S, C = x.shape
        K = self.kernel_size
        if state is None:
            state = x.new_zeros(B, K - 1, C)
        x_ext = torch.cat([state.to(x.dtype), x], dim=1)  # (B, S + K - 1, C)
        weight = self.conv.weight.view(C, K).to(x.dtype)
        if doc_ids is not None:
            doc_ext = torch.cat([doc_ids[:, :1].expand(B, K - 1), doc_ids], dim=1)
        y = self.conv.bias.to(x.dtype)
        for j in range(K):  # tap j sees the input K-1-j steps back
            tap = x_ext[:, j : j + S] * weight[:, j]
            if doc_ids is not None and j < K - 1:
                tap = tap * (doc_ext[:, j : j + S] == doc_ids).unsqueeze(-1).to(x.dtype)
            y = y + tap
        new_state = None
        if return_state:
            new_state = x_ext[:, S:]
            if doc_ids is not None:
                new_state = new_state * (doc_ext[:, S:] == doc_ids[:, -1:]).unsqueeze(-1).to(x.dtype)
        return y, new_state


# --------------------------------------------------------------------------------------------------
# Cells


def mlstm_cell(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i: torch.Tensor,
    f: torch.Tensor,
    *,
    state: tuple | None,
    doc_ids: torch.Tensor | None,
    return_state: bool,
    input_gate: str,
    chunk_size: int,
    eps: float,
    impl: str,
) -> tuple[torch.Tensor, tuple | None]:
    """q, k ``(B, S, NH, DQK)``, v ``(B, S, NH, DV)``, i, f ``(B, S, NH)`` -> h ``(B, S, NH, DV)``.

    One token with a state (generation) takes the step kernel; everything else the chunkwise one.
    """
    if q.shape[1] == 1 and state is not None:
        c, n, m = state
        h, new_state = mlstm_step(
            q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], c, n, m, input_gate=input_gate, eps=eps, impl=impl
        )
        return h.unsqueeze(1), new_state
    c0, n0, m0 = state if state is not None else (None, None, None)
    out = mlstm(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        i.transpose(1, 2),
        f.transpose(1, 2),
        c0=c0,
        n0=n0,
        m0=m0,
        input_gate=input_gate,
        chunk_size=chunk_size,
        doc_ids=doc_ids,
        return_state=return_state,
        impl=impl,
        eps=eps,
    )
    h, new_state = out if return_state else (out, None)
    return h.transpose(1, 2), new_state


def slstm_cell(
    x_gates: torch.Tensor,
    recurrent_kernel: torch.Tensor,
    bias: torch.Tensor,
    *,
    state: tuple | None,
    doc_ids: torch.Tensor | None,
    return_state: bool,
    impl: str,
) -> tuple[torch.Tensor, tuple | None]:
    """x_gates ``(B, S, NH, 4, DH)`` (gates i, f, z, o), recurrent_kernel ``(NH, DH, 4 * DH)``,
    bias ``(NH * 4 * DH)`` head-major -> y ``(B, S, NH, DH)``; the state is ``(y, c, n, m)``."""
    num_heads, head_dim = recurrent_kernel.shape[0], recurrent_kernel.shape[1]
    R = recurrent_kernel.view(num_heads, head_dim, 4, head_dim)
    b = bias.view(num_heads, 4, head_dim)
    if x_gates.shape[1] == 1 and state is not None:
        y, new_state = slstm_step(x_gates[:, 0], R, b, state)
        return y.unsqueeze(1), new_state
    out = slstm(x_gates, R, b, state0=state, doc_ids=doc_ids, return_state=return_state, impl=impl)
    return out if return_state else (out, None)
