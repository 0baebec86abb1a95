"""Single-device language models: ``xlstm_large`` (xLSTM-7B style), ``xlstm_blocks`` (the paper's
mLSTM/sLSTM stacks) and ``llama`` (baseline). All share one calling convention::

    logits = model(input_ids, doc_ids=None, state=None, return_state=False)
    logits, state = model(input_ids, state=state, return_state=True)
"""

from __future__ import annotations

from torch import nn

from xlstm_train.models.llama import Llama, LlamaConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig, xLSTMBlocksModel
from xlstm_train.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig

MODEL_CLASSES = {"xlstm_large": xLSTMLarge, "xlstm_blocks": xLSTMBlocksModel, "llama": Llama}

# Per architecture, the name of the input embedding table (excluded from "non-embedding" counts).
EMBEDDING_PARAM = {
    "xlstm_large": "embedding.weight",
    "xlstm_blocks": "token_embedding.weight",
    "llama": "tok_embeddings.weight",
}


def build_model(model_cfg: xLSTMLargeConfig | xLSTMBlocksConfig | LlamaConfig) -> nn.Module:
    """The model for ``model_cfg.arch`` with the official init applied.

    Built under ``torch.device("meta")`` it allocates nothing; materialise it later with
    ``model.to_empty(device=...)`` followed by ``model.init_weights()``.
    """
    if model_cfg.arch not in MODEL_CLASSES:
        raise ValueError(f"model.arch = {model_cfg.arch!r}: expected one of {sorted(MODEL_CLASSES)}")
    model = MODEL_CLASSES[model_cfg.arch](model_cfg)
    model.init_weights()
    return model


def count_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Number of parameters, shared (tied) tensors counted once. ``non_embedding`` leaves out the
    input embedding table (a tied output head then counts as not present)."""
    seen = set()
    total = 0
    skip = EMBEDDING_PARAM.get(getattr(getattr(model, "cfg", None), "arch", None)) if non_embedding else None
    for name, param in model.named_parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        if name != skip:
            total += param.numel()
    return total


__all__ = [
    "Llama",
    "LlamaConfig",
    "build_model",
    "count_params",
    "xLSTMBlocksConfig",
    "xLSTMBlocksModel",
    "xLSTMLarge",
    "xLSTMLargeConfig",
]
