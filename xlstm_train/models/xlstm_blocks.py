"""The xLSTM paper architecture (arXiv 2405.04517): mLSTM and sLSTM blocks stacked residually.

An ``xLSTM[a:b]`` stack has sLSTM blocks at the indices ``slstm_at`` and mLSTM blocks elsewhere.
Parameter names follow the official ``xlstm`` package's ``xLSTMLMModel``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


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
    chunk_size: int = 64
    # sLSTM block (post up-projection)
    slstm_num_heads: int = 4
    slstm_conv1d_kernel_size: int = 4
    ffn_proj_factor: float = 1.3
    ffn_round_up_to_multiple_of: int = 64
    kernel: Literal["auto", "reference", "triton"] = "auto"
    reset_at_document_boundaries: bool = True
