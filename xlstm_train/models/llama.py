"""A compact Llama-style Transformer baseline (RMSNorm, RoPE, SwiGLU, SDPA)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class LlamaConfig:
    arch: Literal["llama"] = "llama"
    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: as many as query heads (no GQA)
    ffn_hidden_dim: int | None = None  # None: round_up(8/3 * embedding_dim, ffn_multiple_of)
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    reset_at_document_boundaries: bool = False  # mask attention across packed documents
