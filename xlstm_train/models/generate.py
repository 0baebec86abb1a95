"""Autoregressive sampling.

Recurrent models (the xLSTMs) prefill the prompt once, keep their state, then feed one token per
step: constant memory and time per token. A model that returns no state (Llama) re-runs the whole
sequence every step.
"""

from __future__ import annotations

import torch
from torch import nn


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits ``(B, V)`` -> token ids ``(B, 1)``. ``temperature == 0`` picks the argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend ``prompt_ids`` ``(1, P)`` by ``max_new_tokens`` sampled tokens -> ``(1, P + N)``.

    ``temperature=0`` is greedy decoding; ``top_k`` keeps only the k most likely tokens.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must have shape (1, P) with P >= 1, got {tuple(prompt_ids.shape)}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
    was_training = model.training
    model.eval()
    try:
        tokens = prompt_ids
        logits, state = model(tokens, return_state=True)
        for step in range(max_new_tokens):
            next_token = sample_next(logits[:, -1], temperature, top_k, generator)
            tokens = torch.cat([tokens, next_token], dim=1)
            if step == max_new_tokens - 1:
                break
            if state is None:  # no recurrent state: re-run the whole sequence
                logits, _ = model(tokens, return_state=True)
            else:
                logits, state = model(next_token, state=state, return_state=True)
    finally:
        model.train(was_training)
    return tokens
