"""Autoregressive sampling, the one implementation behind ``xlstm-train generate``, the harness's
greedy generation and the samples printed at the end of a run.

Every model returns a state with ``return_state=True``: the xLSTMs their recurrent states (memory and
time per token independent of the context length; one token with a state takes the step kernels),
Llama a key/value cache. Each prompt is prefilled on its own, so prompts of different lengths need
no padding inside the recurrence; the states are then joined into one batch and all rows decode in
step, one token per forward pass.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from xlstm_train.models.llama import KVCache


class NonFiniteLogitsError(ValueError):
    """The model produced NaN or infinite logits: its weights (or the inputs) are broken.

    Raised by every sampling function here before a token is drawn from such logits, so callers
    (``xlstm-train generate``, the samples at the end of a run, the harness) catch one type and
    print one message instead of failing inside ``torch.multinomial``."""


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
    top_p: float | None = None,
) -> torch.Tensor:
    """logits ``(B, V)`` -> token ids ``(B, 1)``. ``temperature == 0`` picks the argmax.

    ``top_k`` keeps the k most likely tokens, ``top_p`` the smallest set of most likely tokens whose
    probabilities add up to at least p (nucleus sampling); both apply after the temperature.
    Raises ``NonFiniteLogitsError`` when a row of ``logits`` holds NaN or an infinity.
    """
    _check_options(temperature, top_k, top_p)
    _check_finite(logits)
    return _sample(logits, temperature, top_k, generator, top_p)


def _sample(logits, temperature, top_k, generator, top_p) -> torch.Tensor:
    """``sample_next`` on logits already checked to be finite."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # Shifting each row to a maximum of 0 leaves the distribution as it is and keeps a small
    # temperature from dividing large logits into infinities (and the softmax into NaN).
    logits = logits.float()
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the more likely ones before it already reach top_p (the first always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _check_options(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"generate: top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1] or None, got {top_p}")


def _check_finite(logits: torch.Tensor, step: int | None = None) -> None:
    """``NonFiniteLogitsError`` naming the rows (prompts) whose logits hold NaN or an infinity, and
    after which token of the generation (``step``) when known."""
    finite = torch.isfinite(logits).all(dim=-1)
    if not bool(finite.all()):
        rows = [int(r) for r in (~finite).nonzero().flatten()]
        if step is None:
            where = f"in row(s) {rows}"
        else:
            after = "the prompt" if step == 0 else f"generated token {step}"
            where = f"after {after} of prompt(s) {[r + 1 for r in rows]}"  # numbered from 1, as the CLI does
        raise NonFiniteLogitsError(
            f"the model's logits are not finite (NaN or inf) {where}: the checkpoint's weights have "
            "diverged or were damaged (a run that skipped non-finite steps, or a corrupted file), so "
            "no text can be sampled from it"
        )


def merge_states(states: list):
    """One batch state from the states of single prompts (their batch dimension is dim 0)."""
    if isinstance(states[0], KVCache):
        return KVCache.merge(states)
    if states[0] is None:
        return None
    if isinstance(states[0], torch.Tensor):
        return torch.cat(states, dim=0)
    if isinstance(states[0], (list, tuple)):
        merged = [merge_states([s[n] for s in states]) for n in range(len(states[0]))]
        return type(states[0])(merged) if isinstance(states[0], tuple) else merged
    raise TypeError(f"generate: cannot batch a model state of type {type(states[0]).__name__}")


@torch.no_grad()
def prefill(model: nn.Module, prompts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, object]:
    """Run each prompt ``(P_b,)`` through the model; -> (last logits ``(B, V)``, batched state)."""
    last_logits, states = [], []
    for prompt in prompts:
        logits, state = model(prompt[None], return_state=True)
        last_logits.append(logits[:, -1].float())
        states.append(state)
    return torch.cat(last_logits, dim=0), merge_states(states)


@torch.no_grad()
def generate_stream(
    model: nn.Module,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
) -> Iterator[torch.Tensor]:
    """Yield the next token of every prompt ``(B,)`` per step, up to ``max_new_tokens`` steps.

    A row that has produced one of ``stop_ids`` keeps producing that id (callers cut there); the
    stream ends early once every row has stopped. Raises ``NonFiniteLogitsError`` when the model's
    logits are not finite.
    """
    _check_options(temperature, top_k, top_p)
    if not prompts or any(p.dim() != 1 or p.numel() < 1 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if max_new_tokens < 1:
        return
    was_training = model.training
    model.eval()
    try:
        logits, state = prefill(model, prompts)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
        done = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        held = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        for step in range(max_new_tokens):
            _check_finite(logits, step)
            token = _sample(logits, temperature, top_k, generator, top_p)[:, 0]
            token = torch.where(done, held, token)
            yield token
            if len(stop):
                newly = torch.isin(token, stop) & ~done
                held = torch.where(newly, token, held)
                done = done | newly
                if bool(done.all()):
                    return
            if step == max_new_tokens - 1:
                return
            logits, state = model(token[:, None], state=state, return_state=True)
            logits = logits[:, -1].float()
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Extend each row of ``prompt_ids`` ``(B, P)`` by ``max_new_tokens`` tokens -> ``(B, P + N)``.

    ``temperature=0`` is greedy decoding; ``top_k``/``top_p`` restrict sampling (see ``sample_next``).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1:
        raise ValueError(f"generate: prompt_ids must have shape (B, P) with P >= 1, got {tuple(prompt_ids.shape)}")
    steps = list(generate_stream(model, list(prompt_ids), max_new_tokens, temperature, top_k, top_p, generator))
    if not steps:
        return prompt_ids
    return torch.cat([prompt_ids, torch.stack(steps, dim=1)], dim=1)
