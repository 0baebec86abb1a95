"""``llama``: the Transformer baseline (``xlstm_train.models.llama``, torchtitan's names).

Exported as transformers' ``LlamaForCausalLM``; q and k rows are reordered from our RoPE pairing to
transformers' ``rotate_half`` (``llama_qk_to_rotate_half``).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, SequenceParallel

from xlstm_train.archs import ArchSpec, register_spec
from xlstm_train.export.adapter import TransformersExport
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


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our ``llama`` state dict (torchtitan names) -> transformers' ``LlamaForCausalLM``."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"],
           "lm_head.weight": state["output.weight"]}  # fmt: skip
    for n in range(cfg.num_blocks):
        ours, theirs = f"layers.{n}.", f"model.layers.{n}."
        wq, wk = state[ours + "attention.wq.weight"], state[ours + "attention.wk.weight"]
        out[theirs + "self_attn.q_proj.weight"] = llama_qk_to_rotate_half(wq, cfg.num_heads)
        out[theirs + "self_attn.k_proj.weight"] = llama_qk_to_rotate_half(wk, cfg.kv_heads)
        out[theirs + "self_attn.v_proj.weight"] = state[ours + "attention.wv.weight"]
        out[theirs + "self_attn.o_proj.weight"] = state[ours + "attention.wo.weight"]
        out[theirs + "mlp.gate_proj.weight"] = state[ours + "feed_forward.w1.weight"]
        out[theirs + "mlp.up_proj.weight"] = state[ours + "feed_forward.w3.weight"]
        out[theirs + "mlp.down_proj.weight"] = state[ours + "feed_forward.w2.weight"]
        out[theirs + "input_layernorm.weight"] = state[ours + "attention_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
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
