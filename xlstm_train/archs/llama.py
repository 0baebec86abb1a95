"""``llama``: the Transformer baseline (``xlstm_train.models.llama``, torchtitan's names).

Exported as, and imported from, transformers' ``LlamaForCausalLM``; q and k rows are reordered
between our RoPE pairing and transformers' ``rotate_half`` (``llama_qk_to_rotate_half``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, SequenceParallel

from xlstm_train.archs import ArchSpec, register_spec
from xlstm_train.export.adapter import TransformersExport, read_safetensors, resolve_tied_head
from xlstm_train.models.llama import Llama, LlamaConfig
from xlstm_train.parallel.tensor_parallel import embedding_and_head_plan, region_input, row_output


def tp_plan(model: Llama, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Megatron's: q, k, v and the FFN's w1/w3 column-parallel, wo and w2 row-parallel."""
    sp = sequence_parallel
    plan = embedding_and_head_plan("tok_embeddings", "norm", "output", sp, loss_parallel)
    for n in range(len(model.layers)):
        p = f"layers.{n}"
        plan[f"{p}.attention"] = region_input(sp, autocast_input=True)
        for name in ("wq", "wk", "wv"):
            plan[f"{p}.attention.{name}"] = ColwiseParallel()
        plan[f"{p}.attention.wo"] = row_output(sp)
        plan[f"{p}.feed_forward"] = region_input(sp, autocast_input=True)
        plan[f"{p}.feed_forward.w1"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w3"] = ColwiseParallel()
        plan[f"{p}.feed_forward.w2"] = row_output(sp)
        if sp:
            plan[f"{p}.attention_norm"] = SequenceParallel()
            plan[f"{p}.ffn_norm"] = SequenceParallel()
    return plan


def tp_head_counts(cfg: LlamaConfig) -> dict[str, int]:
    return {"model.num_heads": cfg.num_heads, "model.num_kv_heads": cfg.kv_heads}


def sequence_mixing_flops(cfg: LlamaConfig, seq_len: int) -> float:
    """Attention scores and their product with V over the full context ``T = seq_len``:
    ``4 * T * H * head_dim`` per layer (causal sparsity ignored, as in torchtitan and nanoGPT)."""
    return float(cfg.num_blocks * 4 * seq_len * cfg.num_heads * cfg.head_dim)


# ------------------------------------------------------------------------------------------------
# transformers' LlamaForCausalLM


def llama_qk_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from our RoPE layout to transformers'.

    We rotate adjacent pairs ``(2j, 2j+1)`` of each head by frequency j; transformers' ``rotate_half``
    pairs ``(j, j + D/2)``. Moving row 2j to j and row 2j+1 to j + D/2 in every head makes the two
    the same rotation; q and k get the same permutation, so attention scores are unchanged."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.view(num_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def llama_qk_from_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The inverse of ``llama_qk_to_rotate_half``: transformers' row order back to ours."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.view(num_heads, 2, head_dim // 2, in_features).transpose(1, 2).reshape(out_features, in_features)


# (ours, transformers') names of each block's weights that map one to one
_BLOCK_NAMES = [
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
]


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our ``llama`` state dict (torchtitan names) -> transformers' ``LlamaForCausalLM``."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}  # fmt: skip
    for n in range(cfg.num_blocks):
        ours, theirs = f"layers.{n}.", f"model.layers.{n}."
        wq, wk = state[ours + "attention.wq.weight"], state[ours + "attention.wk.weight"]
        out[theirs + "self_attn.q_proj.weight"] = llama_qk_to_rotate_half(wq, cfg.num_heads)
        out[theirs + "self_attn.k_proj.weight"] = llama_qk_to_rotate_half(wk, cfg.kv_heads)
        for our_name, their_name in _BLOCK_NAMES:
            out[theirs + their_name] = state[ours + our_name]
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """A transformers ``LlamaForCausalLM`` state dict -> our ``llama`` (the head only if stored)."""
    out = {"tok_embeddings.weight": state["model.embed_tokens.weight"], "norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state:
        out["output.weight"] = state["lm_head.weight"]
    for n in range(cfg.num_blocks):
        ours, theirs = f"layers.{n}.", f"model.layers.{n}."
        wq, wk = state[theirs + "self_attn.q_proj.weight"], state[theirs + "self_attn.k_proj.weight"]
        out[ours + "attention.wq.weight"] = llama_qk_from_rotate_half(wq, cfg.num_heads)
        out[ours + "attention.wk.weight"] = llama_qk_from_rotate_half(wk, cfg.kv_heads)
        for our_name, their_name in _BLOCK_NAMES:
            out[ours + our_name] = state[theirs + their_name]
    return out


def hf_config(cfg: LlamaConfig, **token_ids):
    from transformers import LlamaConfig as HFLlamaConfig

    return HFLlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embedding_dim,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.num_blocks,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        architectures=["LlamaForCausalLM"],
        **token_ids,
    )


def llama_config_from_hf(hf_cfg) -> LlamaConfig:
    """Our ``llama`` config for a transformers ``LlamaConfig``; ValueError naming a setting our
    model does not have (biases, another activation or head size, RoPE scaling)."""
    unsupported = {
        "hidden_act": (hf_cfg.hidden_act, "silu"),
        "attention_bias": (hf_cfg.attention_bias, False),
        "mlp_bias": (hf_cfg.mlp_bias, False),
        "head_dim": (hf_cfg.head_dim, hf_cfg.hidden_size // hf_cfg.num_attention_heads),
        "rope_parameters.rope_type": (hf_cfg.rope_parameters.get("rope_type", "default"), "default"),
    }
    for name, (value, allowed) in unsupported.items():
        if value != allowed:
            raise ValueError(f"{name} = {value!r}: our llama supports only {allowed!r}")
    cfg = LlamaConfig(
        vocab_size=hf_cfg.vocab_size,
        embedding_dim=hf_cfg.hidden_size,
        num_blocks=hf_cfg.num_hidden_layers,
        num_heads=hf_cfg.num_attention_heads,
        num_kv_heads=hf_cfg.num_key_value_heads,
        ffn_hidden_dim=hf_cfg.intermediate_size,
        norm_eps=hf_cfg.rms_norm_eps,
        rope_theta=hf_cfg.rope_parameters["rope_theta"],
        max_seq_len=hf_cfg.max_position_embeddings,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
    cfg.validate("model")
    return cfg


def load_hf_checkpoint(path: str | Path) -> tuple[LlamaConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama directory -> ``(config, state dict for our llama)``, the model
    transformers runs for it (a tied config whose stored head differs from the embedding is
    untied there too: ``export.adapter.resolve_tied_head``)."""
    from transformers import LlamaConfig as HFLlamaConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face Llama checkpoint directory)")
    cfg = llama_config_from_hf(HFLlamaConfig.from_pretrained(path))
    state = from_hf_state_dict(read_safetensors(path), cfg)
    tied = resolve_tied_head(cfg.tie_embeddings, state, "tok_embeddings.weight", "output.weight", path)
    return dataclasses.replace(cfg, tie_embeddings=tied), state


SPEC = register_spec(ArchSpec(
    name="llama",
    config_class=LlamaConfig,
    model_class=Llama,
    block_list="layers",
    embedding_param="tok_embeddings.weight",
    sequence_mixing_flops=sequence_mixing_flops,
    tp_plan=tp_plan,
    tp_head_counts=tp_head_counts,
    export=TransformersExport("LlamaForCausalLM", to_hf_state_dict, hf_config),
))  # fmt: skip
