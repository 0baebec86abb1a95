"""xLSTM Large: the xLSTM-7B architecture (arXiv 2503.13427).

Parameter names follow the official ``xlstm.xlstm_large`` checkpoints exactly, so a Hugging Face
export is a key rename (``embedding.weight`` -> ``backbone.embeddings.weight``), not a reshuffle.

A block is pre-norm residual: ``x + mLSTMLayer(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``. The
mLSTM layer runs at model width (q, k: ``qk_dim_factor * E``; v, output gate: ``v_dim_factor * E``)
with scalar input/forget gates per head from plain linear maps of the block input, soft-capped at
``gate_soft_cap``; each head's output is LayerNorm-ed, gated by ``sigmoid(o)`` and projected back.
The logits are soft-capped at ``output_logit_soft_cap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from xlstm_train.config import ConfigError
from xlstm_train.models.layers import (
    MultiHeadLayerNorm,
    RMSNorm,
    head_loss_sum,
    linspace_,
    mlstm_cell,
    round_up,
    small_init_,
    soft_cap,
    wang_init_,
)


@dataclass
class xLSTMLargeConfig:
    arch: Literal["xlstm_large"] = "xlstm_large"
    vocab_size: int = 50304
    embedding_dim: int = 4096
    num_blocks: int = 32
    num_heads: int = 8
    qk_dim_factor: float = 0.5
    v_dim_factor: float = 1.0
    ffn_proj_factor: float = 2.667
    ffn_round_up_to_multiple_of: int = 64
    gate_soft_cap: float = 15.0
    output_logit_soft_cap: float = 30.0
    norm_eps: float = 1e-6
    use_bias: bool = False
    igate_bias_init: float = -10.0
    # mLSTM cell
    input_gate: Literal["exp", "sigmoid"] = "exp"
    cell_eps: float = 1e-6
    # the fastest in a measured training step (docs/benchmarks.md, "Training step on one GPU")
    chunk_size: int = 128
    kernel: Literal["auto", "reference", "triton"] = "auto"
    reset_at_document_boundaries: bool = True
    tie_embeddings: bool = False

    @property
    def qk_dim(self) -> int:
        return int(self.embedding_dim * self.qk_dim_factor)

    @property
    def v_dim(self) -> int:
        return int(self.embedding_dim * self.v_dim_factor)

    @property
    def ffn_dim(self) -> int:
        return round_up(self.embedding_dim * self.ffn_proj_factor, self.ffn_round_up_to_multiple_of)

    def validate(self, prefix: str = "model") -> None:
        def fail(field: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}.{field} = {getattr(self, field)!r}: {allowed}")

        for field in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_round_up_to_multiple_of"):
            if getattr(self, field) < 1:
                fail(field, "must be a positive integer")
        for field in ("qk_dim_factor", "v_dim_factor", "ffn_proj_factor", "gate_soft_cap", "output_logit_soft_cap"):
            if getattr(self, field) <= 0:
                fail(field, "must be positive")
        for field in ("norm_eps", "cell_eps"):
            if getattr(self, field) < 0:
                fail(field, "must be >= 0")
        for field, width in (("qk_dim_factor", self.embedding_dim * self.qk_dim_factor),
                             ("v_dim_factor", self.embedding_dim * self.v_dim_factor)):
            if width != int(width) or int(width) % self.num_heads:
                fail(field, f"embedding_dim * {field} = {width} must be an integer divisible by "
                            f"num_heads = {self.num_heads}")
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            fail("chunk_size", "must be a power of two")


def _rms_norm(cfg: xLSTMLargeConfig) -> RMSNorm:
    return RMSNorm(cfg.embedding_dim, cfg.norm_eps, bias=cfg.use_bias)


class mLSTMLayer(nn.Module):
    def __init__(self, cfg: xLSTMLargeConfig):
        super().__init__()
        self.cfg = cfg
        E, bias = cfg.embedding_dim, cfg.use_bias
        self.q = nn.Linear(E, cfg.qk_dim, bias=bias)
        self.k = nn.Linear(E, cfg.qk_dim, bias=bias)
        self.v = nn.Linear(E, cfg.v_dim, bias=bias)
        self.ogate_preact = nn.Linear(E, cfg.v_dim, bias=bias)
        self.igate_preact = nn.Linear(E, cfg.num_heads, bias=True)
        self.fgate_preact = nn.Linear(E, cfg.num_heads, bias=True)
        self.multihead_norm = MultiHeadLayerNorm(cfg.v_dim, cfg.norm_eps, residual_weight=False, bias=bias)
        self.out_proj = nn.Linear(cfg.v_dim, E, bias=bias)

    def forward(self, x, doc_ids=None, state=None, return_state=False):
        B, S, _ = x.shape
        cfg = self.cfg
        # Gate math in fp32: the soft-cap and the kernel's log-space gates need the range.
        i = soft_cap(self.igate_preact(x).float(), cfg.gate_soft_cap)  # (B, S, NH)
        f = soft_cap(self.fgate_preact(x).float(), cfg.gate_soft_cap)
        num_heads = i.shape[-1]
        q = self.q(x).view(B, S, num_heads, -1)
        k = self.k(x).view(B, S, num_heads, -1)
        v = self.v(x).view(B, S, num_heads, -1)
        h, state = mlstm_cell(
            q, k, v, i, f,
            state=state, doc_ids=doc_ids, return_state=return_state,
            input_gate=cfg.input_gate, chunk_size=cfg.chunk_size, eps=cfg.cell_eps, impl=cfg.kernel,
        )  # fmt: skip
        h = self.multihead_norm(h.to(x.dtype))  # (B, S, v_dim)
        return self.out_proj(torch.sigmoid(self.ogate_preact(x)) * h), state


class FeedForward(nn.Module):
    """SwiGLU: ``proj_down(silu(proj_up_gate(x)) * proj_up(x))``."""

    def __init__(self, cfg: xLSTMLargeConfig):
        super().__init__()
        E, F_, bias = cfg.embedding_dim, cfg.ffn_dim, cfg.use_bias
        self.proj_up_gate = nn.Linear(E, F_, bias=bias)
        self.proj_up = nn.Linear(E, F_, bias=bias)
        self.proj_down = nn.Linear(F_, E, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_down(nn.functional.silu(self.proj_up_gate(x)) * self.proj_up(x))


class mLSTMBlock(nn.Module):
    def __init__(self, cfg: xLSTMLargeConfig):
        super().__init__()
        self.norm_mlstm = _rms_norm(cfg)
        self.mlstm_layer = mLSTMLayer(cfg)
        self.norm_ffn = _rms_norm(cfg)
        self.ffn = FeedForward(cfg)

    def forward(self, x, doc_ids=None, state=None, return_state=False):
        y, state = self.mlstm_layer(self.norm_mlstm(x), doc_ids, state, return_state)
        x = x + y
        return x + self.ffn(self.norm_ffn(x)), state


class xLSTMLargeBlockStack(nn.Module):
    def __init__(self, cfg: xLSTMLargeConfig):
        super().__init__()
        self.blocks = nn.ModuleList(mLSTMBlock(cfg) for _ in range(cfg.num_blocks))
        self.out_norm = _rms_norm(cfg)


class xLSTMLarge(nn.Module):
    """``model(input_ids, doc_ids=None, state=None, return_state=False)`` -> fp32 soft-capped logits;
    with ``labels=`` the summed cross-entropy over the labels that are not -100 instead (the head
    and loss fused: no logits are materialised, see ``layers.head_loss_sum``).

    The state is a list with one ``(C, n, m)`` tuple per block (fp32); it is never updated in place,
    so it can be carried across training windows with autograd.
    """

    def __init__(self, cfg: xLSTMLargeConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.backbone = xLSTMLargeBlockStack(cfg)
        self.lm_head = nn.Linear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    @torch.no_grad()
    def init_weights(self) -> None:
        """The official xLSTM-7B init (xlstm-jax): small_init for inputs, wang for outputs, zero gate
        weights, input-gate bias ``igate_bias_init``, forget-gate bias linspace(3, 6) over heads."""
        cfg = self.cfg
        E, L = cfg.embedding_dim, cfg.num_blocks
        small_init_(self.embedding.weight, E)
        if not cfg.tie_embeddings:
            small_init_(self.lm_head.weight, E)
        for block in self.backbone.blocks:
            layer, ffn = block.mlstm_layer, block.ffn
            for lin in (layer.q, layer.k, layer.v, ffn.proj_up_gate, ffn.proj_up):
                small_init_(lin.weight, E)
            for lin in (layer.out_proj, ffn.proj_down):
                wang_init_(lin.weight, E, L)
            for lin in (layer.ogate_preact, layer.igate_preact, layer.fgate_preact):
                nn.init.zeros_(lin.weight)
            nn.init.constant_(layer.igate_preact.bias, cfg.igate_bias_init)
            linspace_(layer.fgate_preact.bias, 3.0, 6.0)
            for lin in (layer.q, layer.k, layer.v, layer.ogate_preact, layer.out_proj,
                        ffn.proj_up_gate, ffn.proj_up, ffn.proj_down):  # fmt: skip
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for norm in (block.norm_mlstm, block.norm_ffn, layer.multihead_norm):
                norm.reset_parameters()
        self.backbone.out_norm.reset_parameters()

    def forward(self, input_ids, doc_ids=None, state=None, return_state=False, labels=None):
        if not self.cfg.reset_at_document_boundaries:
            doc_ids = None
        x = self.embedding(input_ids)
        new_state = []
        for n, block in enumerate(self.backbone.blocks):
            x, block_state = block(x, doc_ids, None if state is None else state[n], return_state)
            new_state.append(block_state)
        x = self.backbone.out_norm(x)
        if labels is not None:
            out = head_loss_sum(x, self.lm_head, labels, self.cfg.output_logit_soft_cap)
        else:
            out = soft_cap(self.lm_head(x).float(), self.cfg.output_logit_soft_cap)
        return (out, new_state) if return_state else out
