"""A compact Llama-style Transformer baseline (RMSNorm, RoPE, SwiGLU, SDPA).

Module names follow torchtitan's Llama (``tok_embeddings``, ``layers.{i}.attention.wq`` ...,
``norm``, ``output``), and so does the init (depth-scaled output projections). With
``reset_at_document_boundaries`` and ``doc_ids`` the causal mask is block-diagonal: a token attends
only to earlier tokens of its own document.

For generation the model keeps a key/value cache (``KVCache``) as its ``state``, so that decoding a
token costs one position's projections plus attention over the cache, not a pass over the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from xlstm_train.config import ConfigError
from xlstm_train.models.layers import RMSNorm, head_loss_sum, round_up


@dataclass
class LlamaConfig:
    arch: Literal["llama"] = "llama"
    vocab_size: int = 50304
    embedding_dim: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    num_kv_heads: int | None = None  # None: as many as query heads (no GQA)
    ffn_hidden_dim: int | None = None  # None: round_up(8/3 * embedding_dim, ffn_multiple_of)
    ffn_multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    tie_embeddings: bool = False
    reset_at_document_boundaries: bool = False  # mask attention across packed documents

    @property
    def head_dim(self) -> int:
        return self.embedding_dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden_dim is not None:
            return self.ffn_hidden_dim
        return round_up(8 * self.embedding_dim / 3, self.ffn_multiple_of)

    def validate(self, prefix: str = "model") -> None:
        def fail(field: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}.{field} = {getattr(self, field)!r}: {allowed}")

        for name in ("vocab_size", "embedding_dim", "num_blocks", "num_heads", "ffn_multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                fail(name, "must be a positive integer")
        if self.embedding_dim % self.num_heads:
            fail("num_heads", f"must divide embedding_dim = {self.embedding_dim}")
        if self.head_dim % 2:
            fail("num_heads", f"gives an odd head dim {self.head_dim}; RoPE needs an even one")
        if self.num_kv_heads is not None and (self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads):
            fail("num_kv_heads", f"must be a positive divisor of num_heads = {self.num_heads}")
        if self.ffn_hidden_dim is not None and self.ffn_hidden_dim < 1:
            fail("ffn_hidden_dim", "must be a positive integer or null")
        if self.rope_theta <= 0:
            fail("rope_theta", "must be positive")


def rope_tables(head_dim: int, max_seq_len: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(max_seq_len, head_dim / 2)`` in fp32 for rotating adjacent pairs (Llama's layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``(B, S, H, D)``; rotates each pair ``(x[2j], x[2j+1])`` by angle ``pos * theta^(-2j/D)``.

    cos, sin are ``(S, D/2)``, or ``(B, S, D/2)`` when the rows of a batch sit at different positions."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


@dataclass
class KVCache:
    """Keys and values of every layer for the first ``length`` positions: Llama's generation state.

    ``keys[l]``/``values[l]`` are ``(B, KVH, capacity, D)`` buffers. A forward pass with a cache
    writes its positions ``[length, length + S)`` into the buffers and returns a new ``KVCache`` with
    the larger length; the buffers grow by doubling when full (a copy). An older cache object still
    describes its own positions correctly, but two continuations of one cache must not both be
    decoded, since they would write the same buffer slots.

    ``padding`` ``(B,)``, when set, counts the empty slots at the start of each row: ``merge`` puts
    prompts of different lengths into one batch right-aligned, so all rows decode in step. Those
    slots are masked out, and a row's positions for RoPE are its slot index minus its padding.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    padding: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def with_room_for(self, num_new: int, max_len: int) -> KVCache:
        """This cache, or a copy into buffers large enough for ``num_new`` more positions."""
        needed = self.length + num_new
        if needed <= self.capacity:
            return self
        capacity = min(max(2 * self.capacity, _round_up_to(needed, 256)), max(max_len, needed))

        def grown(buffer):
            new = buffer.new_zeros(*buffer.shape[:2], capacity, buffer.shape[3])
            new[:, :, : self.length] = buffer[:, :, : self.length]
            return new

        return KVCache([grown(k) for k in self.keys], [grown(v) for v in self.values], self.length, self.padding)

    @staticmethod
    def merge(caches: list[KVCache]) -> KVCache:
        """One batch from caches of single sequences (possibly of different lengths), right-aligned."""
        length = max(c.length for c in caches)
        pads = [length - c.length for c in caches]

        def stacked(buffers):
            first = buffers[0]
            out = first.new_zeros(sum(b.shape[0] for b in buffers), first.shape[1], length, first.shape[3])
            row = 0
            for buffer, pad in zip(buffers, pads):
                out[row : row + buffer.shape[0], :, pad:] = buffer[:, :, : length - pad]
                row += buffer.shape[0]
            return out

        num_layers = len(caches[0].keys)
        keys = [stacked([c.keys[layer] for c in caches]) for layer in range(num_layers)]
        values = [stacked([c.values[layer] for c in caches]) for layer in range(num_layers)]
        rows = [c.keys[0].shape[0] for c in caches]
        padding = None
        if any(pads):
            padding = torch.tensor([p for p, r in zip(pads, rows) for _ in range(r)], device=keys[0].device)
        return KVCache(keys, values, length, padding)


def _round_up_to(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        E, D = cfg.embedding_dim, cfg.head_dim
        self.head_dim = D
        self.wq = nn.Linear(E, cfg.num_heads * D, bias=False)
        self.wk = nn.Linear(E, cfg.kv_heads * D, bias=False)
        self.wv = nn.Linear(E, cfg.kv_heads * D, bias=False)
        self.wo = nn.Linear(cfg.num_heads * D, E, bias=False)

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0):
        """``cache_kv``: this layer's ``(keys, values)`` buffers of a ``KVCache``; the new positions are
        written at ``[start, start + S)`` and attention runs over ``[0, start + S)``. ``mask`` None
        means plain causal attention from position 0, or over all cached keys for one new token."""
        B, S, _ = x.shape
        q = apply_rope(self.wq(x).view(B, S, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(x).view(B, S, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(B, S, -1, self.head_dim).transpose(1, 2)
        if cache_kv is not None:
            keys, values = cache_kv
            keys[:, :, start : start + S] = k.to(keys.dtype)
            values[:, :, start : start + S] = v.to(values.dtype)
            k, v = keys[:, :, : start + S].to(q.dtype), values[:, :, : start + S].to(q.dtype)
        gqa = q.shape[1] != k.shape[1]
        if mask is None:
            causal = k.shape[2] == S  # one new token (S == 1) attends to every cached key
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal and S > 1, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.embedding_dim, cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.embedding_dim, bias=False)
        self.w3 = nn.Linear(cfg.embedding_dim, cfg.ffn_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.embedding_dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.embedding_dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x, cos, sin, mask, cache_kv=None, start=0):
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, cache_kv, start)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """``model(input_ids, doc_ids=None, state=None, return_state=False)`` -> logits; with
    ``labels=`` the summed cross-entropy over the labels that are not -100 instead (head and loss
    fused, see ``layers.head_loss_sum``).

    The state is a ``KVCache``: ``return_state=True`` returns the cache of every position so far, and
    a ``state`` passed in continues from it (positions, RoPE angles and the causal mask follow).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_blocks))
        self.norm = RMSNorm(cfg.embedding_dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.embedding_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self._register_rope()

    def _register_rope(self) -> None:
        # Derived, not learned: kept out of the state dict and recomputed by init_weights, which is
        # what fills buffers after materialising a meta-device model with to_empty.
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchtitan's Llama init: embeddings N(0, 1), input projections truncated N(0, 0.02),
        output projections of layer l truncated N(0, 0.02 / sqrt(2 (l + 1))), head N(0, E^-1/2)."""
        cfg = self.cfg
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        if cfg.tie_embeddings:
            nn.init.normal_(self.tok_embeddings.weight, std=cfg.embedding_dim**-0.5)
        else:
            nn.init.normal_(self.tok_embeddings.weight)
            std = cfg.embedding_dim**-0.5
            nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        for layer_id, layer in enumerate(self.layers):
            depth_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
            attn, ffn = layer.attention, layer.feed_forward
            for lin in (attn.wq, attn.wk, attn.wv, ffn.w1):
                nn.init.trunc_normal_(lin.weight, std=0.02)
            for lin in (attn.wo, ffn.w2, ffn.w3):
                nn.init.trunc_normal_(lin.weight, std=depth_std)
            layer.attention_norm.reset_parameters()
            layer.ffn_norm.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, input_ids, doc_ids=None, state=None, return_state=False, labels=None):
        B, S = input_ids.shape
        start = 0 if state is None else state.length
        if start + S > self.cfg.max_seq_len:
            raise ValueError(f"llama: sequence length {start + S} exceeds model.max_seq_len = {self.cfg.max_seq_len}")
        mask = None
        if doc_ids is not None and self.cfg.reset_at_document_boundaries:
            if state is not None:
                raise ValueError("llama: doc_ids cannot be combined with a KV cache (state)")
            causal = torch.ones(S, S, dtype=torch.bool, device=input_ids.device).tril()
            mask = (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]  # (B, 1, S, S)
        cache = None
        if return_state or state is not None:
            cache = state.with_room_for(S, self.cfg.max_seq_len) if state is not None else self._new_cache(B, S)
        cos, sin = self.rope_cos[start : start + S], self.rope_sin[start : start + S]
        if cache is not None and (cache.padding is not None or (start > 0 and S > 1)):
            mask, positions = self._cache_mask(cache, S, input_ids.device)
            if cache.padding is not None:
                cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        x = self.tok_embeddings(input_ids)
        for n, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.keys[n], cache.values[n])
            x = layer(x, cos, sin, mask, cache_kv, start)
        x = self.norm(x)
        logits = self.output(x) if labels is None else head_loss_sum(x, self.output, labels)
        if not return_state:
            return logits
        return logits, KVCache(cache.keys, cache.values, start + S, cache.padding)

    def _new_cache(self, batch_size: int, num_tokens: int) -> KVCache:
        capacity = min(_round_up_to(num_tokens, 256), self.cfg.max_seq_len)
        weight = self.layers[0].attention.wk.weight
        device_type = weight.device.type
        # under autocast the keys come out of the projections in the autocast dtype: store them so
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        shape = (batch_size, self.cfg.kv_heads, capacity, self.cfg.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in self.layers]
        values = [torch.zeros(shape, dtype=dtype, device=weight.device) for _ in self.layers]
        return KVCache(keys, values, 0)

    @staticmethod
    def _cache_mask(cache: KVCache, S: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(mask ``(B or 1, 1, S, start + S)``, RoPE positions ``(B, S)`` or None) for new positions."""
        start = cache.length
        query_slot = start + torch.arange(S, device=device)
        key_slot = torch.arange(start + S, device=device)
        mask = (key_slot[None, :] <= query_slot[:, None])[None, None]
        if cache.padding is None:
            return mask, None
        padding = cache.padding.to(device)
        mask = mask & (key_slot[None, None, None, :] >= padding[:, None, None, None])
        return mask, query_slot[None, :] - padding[:, None]
