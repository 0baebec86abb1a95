"""One model, its tokenizer and its run configuration from any checkpoint, for ``eval`` and ``generate``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xlstm_train.config import ConfigError


@dataclass
class LoadedModel:
    model: nn.Module  # single-device, in eval mode
    tokenizer: object | None  # xlstm_train.data.tokenizer.Tokenizer; None for synthetic tasks
    cfg: object  # the run's Config
    device: torch.device
    checkpoint: Path

    def autocast(self):
        """bf16 autocast on GPU when the run trained in bf16 (as the trainer does); fp32 on CPU."""
        if self.device.type == "cuda" and self.cfg.train.dtype == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @property
    def max_len(self) -> int | None:
        """The longest sequence the model takes (Llama's context), None for the recurrent models."""
        return getattr(self.cfg.model, "max_seq_len", None)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None


def load_for_inference(checkpoint: str | Path, *, device: str = "auto", tokenizer: str | None = None,
                       kernel: str | None = None) -> LoadedModel:
    """The checkpoint's model (weights from any parallel layout, resharded into one process), the run's
    tokenizer (or ``tokenizer``, a path overriding it) and its config.

    ``kernel`` overrides ``model.kernel`` of the xLSTMs (``auto`` takes the Triton kernels on CUDA,
    whatever the run trained with). A ConfigError names what is missing or foreign.
    """
    from xlstm_train.export.hf import find_tokenizer
    from xlstm_train.models import build_model
    from xlstm_train.train.checkpoint import load_model_state, read_checkpoint_config

    checkpoint = Path(checkpoint)
    cfg = read_checkpoint_config(checkpoint)
    run_tokenizer = find_tokenizer(cfg, checkpoint, tokenizer)
    if kernel is not None and hasattr(cfg.model, "kernel"):
        cfg.model.kernel = kernel
    target = resolve_device(device)
    state = load_model_state(checkpoint, cfg.model)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device=target)
    model.init_weights()  # fills the derived buffers (RoPE tables); every parameter is overwritten below
    model.load_state_dict(state)
    return LoadedModel(model.eval(), run_tokenizer, cfg, target, checkpoint)
