"""AdamW with weight-decay groups, and the learning-rate schedules as LambdaLR multipliers."""

from __future__ import annotations

import math

import torch
from torch import nn

from xlstm_train.archs import spec_of
from xlstm_train.train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Split parameters into a decayed and an undecayed group.

    Matrices and higher-rank kernels (linear weights, convolutions) are decayed. Vectors (norm
    weights, biases, gate biases, learnable skips) and embedding tables are not, unless
    ``decay_norms_and_biases`` / ``decay_embeddings`` ask for it. A weight tied between the embedding
    and the head is one parameter and counts as an embedding. The model's architecture spec may
    name matrices that are never decayed (``ArchSpec.no_weight_decay``, e.g. the sLSTM recurrent
    kernel).
    """
    spec = spec_of(model)
    never_decayed = {id(p) for p in spec.no_weight_decay(model)} if spec is not None else set()
    embedding_params = {
        id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)
    }
    decay, no_decay = [], []
    seen = set()
    for p in model.parameters():  # parameters() already skips tied duplicates
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in never_decayed:
            wants_decay = False
        elif id(p) in embedding_params:
            wants_decay = cfg.decay_embeddings
        elif p.ndim < 2:
            wants_decay = cfg.decay_norms_and_biases
        else:
            wants_decay = True
        (decay if wants_decay else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    use_fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=use_fused or None,
    )


def lr_multiplier(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """The factor on ``cfg.lr`` for the optimizer update with 0-based index ``step``.

    Linear warmup reaches the peak at update ``warmup_steps - 1``. Then ``cosine`` decays to
    ``min_lr_ratio`` at ``total_steps``; ``wsd`` (warmup-stable-decay) holds the peak and decays
    linearly to ``min_lr_ratio`` over the last ``decay_fraction`` of ``total_steps``; ``constant``
    holds the peak.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = round(cfg.decay_fraction * total_steps)
        decay_start = max(cfg.warmup_steps, total_steps - decay_steps)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        return 1.0 - (1.0 - floor) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, total_steps)
    )
