"""Single-device language models: ``xlstm_large`` (xLSTM-7B style), ``xlstm_blocks`` (the paper's
mLSTM/sLSTM stacks) and ``llama`` (baseline). All share one calling convention::

    logits = model(input_ids, doc_ids=None, state=None, return_state=False)
    logits, state = model(input_ids, state=state, return_state=True)
"""

from __future__ import annotations

from torch import nn

from xlstm_train.archs import get_spec, spec_of
from xlstm_train.models.llama import Llama, LlamaConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig, xLSTMBlocksModel
from xlstm_train.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig


def build_model(model_cfg) -> nn.Module:
    """The model of the architecture ``model_cfg.arch`` names (``xlstm_train.archs``), with its
    official init applied.

    Built under ``torch.device("meta")`` it allocates nothing; materialise it later with
    ``model.to_empty(device=...)`` followed by ``model.init_weights()``.
    """
    model = get_spec(model_cfg.arch).model_class(model_cfg)
    model.init_weights()
    return model


def count_params(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Number of parameters, shared (tied) tensors counted once. ``non_embedding`` leaves out the
    input embedding table of a registered architecture's model (a tied output head then counts as
    not present)."""
    spec = spec_of(model) if non_embedding else None
    skip = spec.embedding_param if spec is not None else None
    seen = set()
    total = 0
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
