"""Training FLOPs per token, the numerator of MFU.

    flops_per_token = 3 * forward          (backward = 2 x forward, as in PaLM/nanoGPT/torchtitan)
    forward         = 2 * N_matmul + sum over blocks of the sequence-mixing term

* ``N_matmul``: every parameter is one multiply-add per token, except the input embedding table
  (a lookup); a tied output head still does its ``V * E`` multiply-adds and is counted once more.
  Norm weights, biases and the depthwise convolutions are counted the same way (negligible).
* mLSTM block, per head, in the chunkwise form with chunk size ``L = min(chunk_size, seq_len)``
  (64 by default), after ``NX-AI/xlstm_scaling_laws``: ``4 * dqk * dv`` (state update ``k v^T``
  and read-out ``q^T C``) ``+ 2 * L * (dqk + dv)`` (intra-chunk ``q k^T`` and its product with V).
  Gate and normaliser arithmetic, O(dqk), is left out.
* sLSTM block: the recurrent matmul ``R y_{t-1}``, block-diagonal over heads: ``2 * 4 * DH * E``.
* Llama layer: attention scores and their product with V over the full context ``T = seq_len``,
  ``4 * T * H * head_dim`` (causal sparsity ignored, as in torchtitan and nanoGPT).
"""

from __future__ import annotations

import torch

from xlstm_train.models import EMBEDDING_PARAM, build_model, count_params


def _matmul_params(model_cfg) -> int:
    with torch.device("meta"):
        model = build_model(model_cfg)
    n = count_params(model, non_embedding=True)
    if model_cfg.tie_embeddings:
        n += model.get_parameter(EMBEDDING_PARAM[model_cfg.arch]).numel()
    return n


def sequence_mixing_flops(model_cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the cells (mLSTM, sLSTM) or of attention, summed over blocks."""
    arch = model_cfg.arch
    if arch == "xlstm_large":
        L = min(model_cfg.chunk_size, seq_len)
        dqk, dv = model_cfg.qk_dim // model_cfg.num_heads, model_cfg.v_dim // model_cfg.num_heads
        per_block = model_cfg.num_heads * (4 * dqk * dv + 2 * L * (dqk + dv))
        return float(model_cfg.num_blocks * per_block)
    if arch == "xlstm_blocks":
        L = min(model_cfg.chunk_size, seq_len)
        dh = model_cfg.mlstm_inner_dim // model_cfg.mlstm_num_heads
        mlstm = model_cfg.mlstm_num_heads * (4 * dh * dh + 2 * L * 2 * dh)
        slstm = 2 * 4 * (model_cfg.embedding_dim // model_cfg.slstm_num_heads) * model_cfg.embedding_dim
        num_slstm = len(model_cfg.slstm_at)
        return float((model_cfg.num_blocks - num_slstm) * mlstm + num_slstm * slstm)
    if arch == "llama":
        return float(model_cfg.num_blocks * 4 * seq_len * model_cfg.num_heads * model_cfg.head_dim)
    raise ValueError(f"model.arch = {arch!r}: no FLOP formula")


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context ``seq_len``:
    ``3 * (2 * N_matmul + sequence_mixing_flops(model_cfg, seq_len))``, terms as in the module doc."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 3.0 * (2.0 * _matmul_params(model_cfg) + sequence_mixing_flops(model_cfg, seq_len))
