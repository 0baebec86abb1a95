"""xLSTM Large: the xLSTM-7B architecture (arXiv 2503.13427).

Parameter names follow the official ``xlstm.xlstm_large`` checkpoints exactly, so a Hugging Face
export is a key rename (``embedding.weight`` -> ``backbone.embeddings.weight``), not a reshuffle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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
    chunk_size: int = 64
    kernel: Literal["auto", "reference", "triton"] = "auto"
    reset_at_document_boundaries: bool = True
    tie_embeddings: bool = False
