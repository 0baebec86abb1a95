"""Generation: greedy decoding through the states equals re-running the full forward, batches of
prompts of different lengths equal the prompts decoded alone, the Llama KV cache continues a
sequence exactly, nucleus sampling keeps the right tokens, non-finite logits give a clear error."""

import pytest
import torch

from tests.models.utils import VOCAB, perturb_, tiny_configs
from xlstm_train.models import build_model
from xlstm_train.models.generate import NonFiniteLogitsError, generate, generate_stream, sample_next
from xlstm_train.models.llama import KVCache


def _model(arch, seed=0):
    torch.manual_seed(seed)
    return perturb_(build_model(tiny_configs()[arch]), seed=seed).eval()


def _greedy_by_rerunning(model, prompt, n):
    tokens = prompt[None]
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):]


@pytest.mark.parametrize("arch", ["xlstm_blocks", "xlstm_large", "llama"])
def test_batched_prompts_of_different_lengths_decode_like_full_forwards(arch):
    model = _model(arch)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 1, 12)]
    steps = torch.stack(list(generate_stream(model, prompts, 9, temperature=0.0)), dim=1)
    for row, prompt in enumerate(prompts):
        assert torch.equal(steps[row], _greedy_by_rerunning(model, prompt, 9)), f"prompt {row}"


def test_llama_kv_cache_continues_exactly_and_grows():
    model = _model("llama")
    ids = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        full = model(ids)
        head, cache = model(ids[:, :30], return_state=True)
        small = KVCache([k[:, :, :30].clone() for k in cache.keys], [v[:, :, :30].clone() for v in cache.values], 30)
        parts = [head]
        for t in range(30, 33):  # one token at a time, from a full cache that must grow
            logits, small = model(ids[:, t : t + 1], state=small, return_state=True)
            parts.append(logits)
        logits, small = model(ids[:, 33:], state=small, return_state=True)  # several tokens at once
        parts.append(logits)
    assert small.length == 40 and small.capacity >= 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_llama_cache_longer_than_context_is_refused():
    model = _model("llama")  # max_seq_len 64
    with torch.no_grad():
        _, cache = model(torch.zeros(1, 64, dtype=torch.long), return_state=True)
        with pytest.raises(ValueError, match="max_seq_len = 64"):
            model(torch.zeros(1, 1, dtype=torch.long), state=cache, return_state=True)


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, 0.8 too (0.5 + 0.3 >= 0.8)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.7, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}), (0.4, {0})):
        drawn = set(sample_next(logits, 1.0, None, gen, top_p).flatten().tolist())
        assert drawn == kept, top_p
    frequencies = torch.bincount(sample_next(logits, 1.0, None, gen, 0.7).flatten(), minlength=4) / 4000
    torch.testing.assert_close(frequencies[:2], torch.tensor([0.625, 0.375]), atol=0.03, rtol=0)


def test_stop_ids_end_each_row_and_the_stream():
    model = _model("xlstm_large")
    prompt = torch.randint(0, VOCAB, (4,))
    greedy = list(generate_stream(model, [prompt], 6, temperature=0.0))
    stop = int(greedy[2])
    steps = list(generate_stream(model, [prompt, prompt], 6, temperature=0.0, stop_ids=[stop]))
    first_stop = next(i for i, t in enumerate(greedy) if int(t) == stop)
    assert len(steps) == first_stop + 1
    assert all(int(s[0]) == int(g) for s, g in zip(steps, greedy))


def test_non_finite_logits_raise_a_clear_error():
    model = _model("xlstm_blocks")
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    with pytest.raises(NonFiniteLogitsError, match="not finite"):
        generate(model, torch.randint(0, VOCAB, (1, 3)), 4)


def test_generate_keeps_prompt_and_batch_shape():
    model = _model("xlstm_blocks")
    prompt = torch.randint(0, VOCAB, (3, 5))
    out = generate(model, prompt, 4, temperature=0.0)
    assert out.shape == (3, 9) and torch.equal(out[:, :5], prompt)
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), 1)
