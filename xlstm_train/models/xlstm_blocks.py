"""The xLSTM paper architecture (arXiv 2405.04517): mLSTM and sLSTM blocks stacked residually.

An ``xLSTM[a:b]`` stack has sLSTM blocks at the indices ``slstm_at`` and mLSTM blocks elsewhere.
Parameter names, shapes and parametrisations follow the official ``xlstm`` package's
``xLSTMLMModel`` with the CUDA sLSTM backend, so that its state dict is ours key for key (the
vanilla backend stores the sLSTM recurrent kernel and bias in another layout; see
``xlstm_train.archs.xlstm_blocks``). Norm weights store gamma - 1, as there.

mLSTM block (pre up-projection)::

    x_m, z = split(proj_up(LN(x)))                       # E -> 2 * inner, inner = proj_factor * E
    x_c = silu(causal_conv(x_m))
    q, k = headwise(x_c); v = headwise(x_m)             # block-diagonal, blocks of qkv_proj_blocksize
    i, f = igate(q|k|v), fgate(q|k|v)                    # one scalar per head
    h = groupnorm(mlstm(q, k, v, i, f)) + learnable_skip * x_c
    x = x + proj_down(h * silu(z))

sLSTM block (post up-projection)::

    x_c = silu(causal_conv(LN(x)))
    y = groupnorm(slstm(i, f from x_c; z, o from LN(x)))  # headwise gate projections
    x = x + y;  x = x + proj_down(gelu(g) * u), (g, u) = split(proj_up(LN(x)))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from xlstm_train.config import ConfigError
from xlstm_train.models.layers import (
    CausalConv1d,
    LayerNorm,
    LinearHeadwise,
    MultiHeadLayerNorm,
    head_loss_sum,
    linspace_,
    mlstm_cell,
    round_up,
    slstm_cell,
    small_init_,
    wang_init_,
)


@dataclass
class xLSTMBlocksConfig:
    arch: Literal["xlstm_blocks"] = "xlstm_blocks"
    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 24
    slstm_at: list[int] = field(default_factory=list)  # 0-based indices of sLSTM blocks
    tie_embeddings: bool = False
    dropout: float = 0.0
    # mLSTM block (pre up-projection)
    mlstm_num_heads: int = 4
    mlstm_proj_factor: float = 2.0
    mlstm_round_proj_up_to_multiple_of: int = 64
    qkv_proj_blocksize: int = 4
    mlstm_conv1d_kernel_size: int = 4
    input_gate: Literal["exp", "sigmoid"] = "exp"
    cell_eps: float = 1e-6
    # the fastest in a measured training step (docs/benchmarks.md, "Training step on one GPU")
    chunk_size: int = 128
    # sLSTM block (post up-projection)
    slstm_num_heads: int = 4
    slstm_conv1d_kernel_size: int = 4
    ffn_proj_factor: float = 1.3
    ffn_round_up_to_multiple_of: int = 64
    kernel: Literal["auto", "reference", "triton"] = "auto"
    reset_at_document_boundaries: bool = True

    @property
    def mlstm_inner_dim(self) -> int:
        return round_up(self.mlstm_proj_factor * self.embedding_dim, self.mlstm_round_proj_up_to_multiple_of)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.ffn_proj_factor * self.embedding_dim, self.ffn_round_up_to_multiple_of)

    def validate(self, prefix: str = "model") -> None:
        def fail(field: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}.{field} = {getattr(self, field)!r}: {allowed}")

        for name in ("vocab_size", "embedding_dim", "num_blocks", "mlstm_num_heads", "qkv_proj_blocksize",
                     "mlstm_round_proj_up_to_multiple_of", "slstm_num_heads", "ffn_round_up_to_multiple_of",
                     "mlstm_conv1d_kernel_size", "slstm_conv1d_kernel_size"):  # fmt: skip
            if getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        for name in ("mlstm_proj_factor", "ffn_proj_factor"):
            if getattr(self, name) <= 0:
                fail(name, "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.cell_eps < 0:
            fail("cell_eps", "must be >= 0")
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            fail("chunk_size", "must be a power of two")
        inner = self.mlstm_inner_dim
        if inner % self.mlstm_num_heads:
            fail("mlstm_num_heads", f"must divide the mLSTM inner dimension {inner}")
        if inner % self.qkv_proj_blocksize:
            fail("qkv_proj_blocksize", f"must divide the mLSTM inner dimension {inner}")
        if self.slstm_at and self.embedding_dim % self.slstm_num_heads:
            fail("slstm_num_heads", f"must divide embedding_dim = {self.embedding_dim}")
        if any(not 0 <= b < self.num_blocks for b in self.slstm_at) or len(set(self.slstm_at)) != len(self.slstm_at):
            fail("slstm_at", f"must be distinct block indices in [0, num_blocks = {self.num_blocks})")


# --------------------------------------------------------------------------------------------------
# mLSTM block


class mLSTMCell(nn.Module):
    """Input/forget gates from ``q|k|v``, the mLSTM kernel and the per-head output norm."""

    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        self.cfg = cfg
        inner = cfg.mlstm_inner_dim
        self.igate = nn.Linear(3 * inner, cfg.mlstm_num_heads)
        self.fgate = nn.Linear(3 * inner, cfg.mlstm_num_heads)
        self.outnorm = MultiHeadLayerNorm(inner, eps=1e-5, residual_weight=True)

    def forward(self, q, k, v, doc_ids, state, return_state):
        B, S, _ = q.shape
        cfg = self.cfg
        qkv = torch.cat([q, k, v], dim=-1)
        i, f = self.igate(qkv).float(), self.fgate(qkv).float()  # (B, S, NH); gate math in fp32
        num_heads = i.shape[-1]
        h, state = mlstm_cell(
            q.view(B, S, num_heads, -1), k.view(B, S, num_heads, -1), v.view(B, S, num_heads, -1), i, f,
            state=state, doc_ids=doc_ids, return_state=return_state,
            input_gate=cfg.input_gate, chunk_size=cfg.chunk_size, eps=cfg.cell_eps, impl=cfg.kernel,
        )  # fmt: skip
        return self.outnorm(h.to(q.dtype)), state


class mLSTMLayer(nn.Module):
    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        E, inner = cfg.embedding_dim, cfg.mlstm_inner_dim
        num_proj_blocks = inner // cfg.qkv_proj_blocksize
        self.proj_up = nn.Linear(E, 2 * inner, bias=False)
        self.q_proj = LinearHeadwise(inner, num_proj_blocks)
        self.k_proj = LinearHeadwise(inner, num_proj_blocks)
        self.v_proj = LinearHeadwise(inner, num_proj_blocks)
        self.conv1d = CausalConv1d(inner, cfg.mlstm_conv1d_kernel_size)
        self.mlstm_cell = mLSTMCell(cfg)
        self.learnable_skip = nn.Parameter(torch.empty(inner))
        self.proj_down = nn.Linear(inner, E, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, doc_ids, state, return_state):
        conv_state, cell_state = state if state is not None else (None, None)
        x_m, z = self.proj_up(x).chunk(2, dim=-1)
        x_c, conv_state = self.conv1d(x_m, doc_ids, conv_state, return_state)
        x_c = nn.functional.silu(x_c)
        h, cell_state = self.mlstm_cell(
            self.q_proj(x_c), self.k_proj(x_c), self.v_proj(x_m), doc_ids, cell_state, return_state
        )
        h = (h + self.learnable_skip * x_c) * nn.functional.silu(z)
        return self.dropout(self.proj_down(h)), (conv_state, cell_state)


class mLSTMBlock(nn.Module):
    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        self.xlstm_norm = LayerNorm(cfg.embedding_dim)
        self.xlstm = mLSTMLayer(cfg)

    def forward(self, x, doc_ids=None, state=None, return_state=False):
        y, state = self.xlstm(self.xlstm_norm(x), doc_ids, state, return_state)
        return x + y, state


# --------------------------------------------------------------------------------------------------
# sLSTM block


class sLSTMCell(nn.Module):
    """The sLSTM recurrence's own parameters, stored as the official CUDA backend stores them:
    ``_recurrent_kernel_`` ``(NH, DH, 4 * DH)`` (R[head, in, gate, out] flattened) and ``_bias_``
    ``(NH * 4 * DH)`` head-major, gates in the order i, f, z, o."""

    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        num_heads = cfg.slstm_num_heads
        head_dim = cfg.embedding_dim // num_heads
        self.cfg = cfg
        self._recurrent_kernel_ = nn.Parameter(torch.empty(num_heads, head_dim, 4 * head_dim))
        self._bias_ = nn.Parameter(torch.empty(num_heads * 4 * head_dim))

    def reset_parameters(self, block_idx: int, num_blocks: int) -> None:
        """Recurrent kernel zero; forget-gate bias "powerlaw_blockdependent": per head from +5 down
        to -7 over the head's units, falling faster in deeper blocks; the other biases zero."""
        num_heads, head_dim = self._recurrent_kernel_.shape[:2]
        nn.init.zeros_(self._recurrent_kernel_)
        nn.init.zeros_(self._bias_)
        depth = block_idx / (num_blocks - 1) if num_blocks > 1 else 0.0
        units = torch.arange(head_dim, dtype=torch.float32, device=self._bias_.device) / max(head_dim - 1, 1)
        forget_bias = -(-5.0 + 12.0 * units ** (0.3 + 1.3 * depth))
        with torch.no_grad():
            self._bias_.view(num_heads, 4, head_dim)[:, 1, :] = forget_bias

    def forward(self, x_gates, doc_ids, state, return_state):
        return slstm_cell(
            x_gates, self._recurrent_kernel_, self._bias_,
            state=state, doc_ids=doc_ids, return_state=return_state, impl=self.cfg.kernel,
        )  # fmt: skip


class sLSTMLayer(nn.Module):
    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        E, num_heads = cfg.embedding_dim, cfg.slstm_num_heads
        self.conv1d = CausalConv1d(E, cfg.slstm_conv1d_kernel_size)
        # The official layer feeds `fgate` into the input gate and `igate` into the forget gate; we
        # keep that so that checkpoints map one to one (both get the same init).
        self.fgate = LinearHeadwise(E, num_heads)
        self.igate = LinearHeadwise(E, num_heads)
        self.zgate = LinearHeadwise(E, num_heads)
        self.ogate = LinearHeadwise(E, num_heads)
        self.slstm_cell = sLSTMCell(cfg)
        self.group_norm = MultiHeadLayerNorm(E, eps=1e-5, residual_weight=True)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, doc_ids, state, return_state):
        B, S, _ = x.shape
        conv_state, cell_state = state if state is not None else (None, None)
        x_c, conv_state = self.conv1d(x, doc_ids, conv_state, return_state)
        x_c = nn.functional.silu(x_c)
        num_heads = self.slstm_cell._recurrent_kernel_.shape[0]
        gates = [self.fgate(x_c), self.igate(x_c), self.zgate(x), self.ogate(x)]  # i, f, z, o
        x_gates = torch.stack([g.view(B, S, num_heads, -1) for g in gates], dim=3)  # (B, S, NH, 4, DH)
        y, cell_state = self.slstm_cell(x_gates, doc_ids, cell_state, return_state)
        return self.group_norm(self.dropout(y.to(x.dtype))), (conv_state, cell_state)


class GatedFeedForward(nn.Module):
    """``proj_down(gelu(g) * u)`` with ``(g, u) = split(proj_up(x))``."""

    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        self.proj_up = nn.Linear(cfg.embedding_dim, 2 * cfg.ffn_dim, bias=False)
        self.proj_down = nn.Linear(cfg.ffn_dim, cfg.embedding_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.proj_up(x).chunk(2, dim=-1)
        return self.proj_down(nn.functional.gelu(gate) * up)


class sLSTMBlock(nn.Module):
    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        self.xlstm_norm = LayerNorm(cfg.embedding_dim)
        self.xlstm = sLSTMLayer(cfg)
        self.ffn_norm = LayerNorm(cfg.embedding_dim)
        self.ffn = GatedFeedForward(cfg)

    def forward(self, x, doc_ids=None, state=None, return_state=False):
        y, state = self.xlstm(self.xlstm_norm(x), doc_ids, state, return_state)
        x = x + y
        return x + self.ffn(self.ffn_norm(x)), state


# --------------------------------------------------------------------------------------------------
# The language model


class xLSTMBlockStack(nn.Module):
    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        slstm_at = set(cfg.slstm_at)
        self.blocks = nn.ModuleList(
            sLSTMBlock(cfg) if n in slstm_at else mLSTMBlock(cfg) for n in range(cfg.num_blocks)
        )
        self.post_blocks_norm = LayerNorm(cfg.embedding_dim)


class xLSTMBlocksModel(nn.Module):
    """``model(input_ids, doc_ids=None, state=None, return_state=False)`` -> logits; with
    ``labels=`` the summed cross-entropy over the labels that are not -100 instead (head and loss
    fused, see ``layers.head_loss_sum``).

    The state is a list with one ``(conv_state, cell_state)`` pair per block: conv_state holds the
    last K-1 conv inputs, cell_state is ``(C, n, m)`` (mLSTM) or ``(y, c, n, m)`` (sLSTM).
    """

    def __init__(self, cfg: xLSTMBlocksConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.xlstm_block_stack = xLSTMBlockStack(cfg)
        self.lm_head = nn.Linear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official init (``xLSTMLMModel.reset_parameters``): small_init(E) for input-side
        projections and embeddings, wang_init(E, num_blocks) for output projections, zero gate
        weights, input-gate bias N(0, 0.1), forget-gate bias linspace(3, 6) (mLSTM) or power law
        (sLSTM), norms at gamma = 1, convolutions PyTorch's default."""
        cfg = self.cfg
        E, L = cfg.embedding_dim, cfg.num_blocks
        small_init_(self.token_embedding.weight, E)
        if not cfg.tie_embeddings:
            small_init_(self.lm_head.weight, E)
        for block_idx, block in enumerate(self.xlstm_block_stack.blocks):
            block.xlstm_norm.reset_parameters()
            layer = block.xlstm
            layer.conv1d.reset_parameters()
            if isinstance(block, mLSTMBlock):
                small_init_(layer.proj_up.weight, E)
                for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
                    small_init_(proj.weight, E)
                wang_init_(layer.proj_down.weight, E, L)
                nn.init.ones_(layer.learnable_skip)
                cell = layer.mlstm_cell
                nn.init.zeros_(cell.igate.weight)
                nn.init.normal_(cell.igate.bias, mean=0.0, std=0.1)
                nn.init.zeros_(cell.fgate.weight)
                linspace_(cell.fgate.bias, 3.0, 6.0)
                cell.outnorm.reset_parameters()
            else:
                for gate in (layer.igate, layer.fgate, layer.zgate, layer.ogate):
                    small_init_(gate.weight, E)
                layer.slstm_cell.reset_parameters(block_idx, L)
                layer.group_norm.reset_parameters()
                block.ffn_norm.reset_parameters()
                small_init_(block.ffn.proj_up.weight, E)
                wang_init_(block.ffn.proj_down.weight, E, L)
        self.xlstm_block_stack.post_blocks_norm.reset_parameters()

    def forward(self, input_ids, doc_ids=None, state=None, return_state=False, labels=None):
        if not self.cfg.reset_at_document_boundaries:
            doc_ids = None
        x = self.token_embedding(input_ids)
        new_state = []
        for n, block in enumerate(self.xlstm_block_stack.blocks):
            x, block_state = block(x, doc_ids, None if state is None else state[n], return_state)
            new_state.append(block_state)
        x = self.xlstm_block_stack.post_blocks_norm(x)
        out = self.lm_head(x) if labels is None else head_loss_sum(x, self.lm_head, labels)
        return (out, new_state) if return_state else out
