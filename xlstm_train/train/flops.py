"""Training FLOPs per token, the numerator of MFU.

    flops_per_token = 3 * forward          (backward = 2 x forward, as in PaLM/nanoGPT/torchtitan)
    forward         = 2 * N_matmul + sequence_mixing_flops

* ``N_matmul``: every parameter is one multiply-add per token, except the input embedding table
  (a lookup); a tied output head still does its ``V * E`` multiply-adds and is counted once more.
  Norm weights, biases and the depthwise convolutions are counted the same way (negligible).
* ``sequence_mixing_flops``: what mixes tokens and has no parameters of its own (the mLSTM and
  sLSTM cells, attention), summed over blocks; each architecture's spec gives its formula
  (``xlstm_train.archs``).
"""

from __future__ import annotations

import torch

from xlstm_train.archs import get_spec
from xlstm_train.models import build_model, count_params


def _matmul_params(model_cfg) -> int:
    with torch.device("meta"):
        model = build_model(model_cfg)
    n = count_params(model, non_embedding=True)
    if getattr(model_cfg, "tie_embeddings", False):
        n += model.get_parameter(get_spec(model_cfg.arch).embedding_param).numel()
    return n


def sequence_mixing_flops(model_cfg, seq_len: int) -> float:
    """Forward FLOPs per token of the cells (mLSTM, sLSTM) or of attention, summed over blocks."""
    return get_spec(model_cfg.arch).sequence_mixing_flops(model_cfg, seq_len)


def flops_per_token(model_cfg, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context ``seq_len``:
    ``3 * (2 * N_matmul + sequence_mixing_flops(model_cfg, seq_len))``, terms as in the module doc."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    return 3.0 * (2.0 * _matmul_params(model_cfg) + sequence_mixing_flops(model_cfg, seq_len))
