"""``xlstm_large``: the xLSTM-7B architecture (``xlstm_train.models.xlstm_large``).

Exported as, and imported from, transformers' ``xLSTMForCausalLM``: the names are the official
ones except ``embedding.weight`` <-> ``backbone.embeddings.weight``, and all norms store gamma.
transformers' class never ties its head to the embedding, whatever ``tie_word_embeddings`` says: a
tied model is exported with ``lm_head.weight`` written out, and a checkpoint is imported as the
model transformers runs (``export.adapter.resolve_tied_head``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch.distributed.tensor import Shard
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, SequenceParallel

from xlstm_train.archs import ArchSpec, register_spec
from xlstm_train.export.adapter import TransformersExport, read_safetensors, resolve_tied_head
from xlstm_train.models.xlstm_large import xLSTMLarge, xLSTMLargeConfig
from xlstm_train.parallel.tensor_parallel import HeadLocal, embedding_and_head_plan, region_input, row_output


def tp_plan(model: xLSTMLarge, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """Every projection into heads (q, k, v, the three gates, FFN up) column-parallel, the output
    and FFN down projections row-parallel, the per-head output norm local to the rank's heads."""
    sp = sequence_parallel
    plan = embedding_and_head_plan("embedding", "backbone.out_norm", "lm_head", sp, loss_parallel)
    for n in range(len(model.backbone.blocks)):
        p = f"backbone.blocks.{n}"
        plan[f"{p}.mlstm_layer"] = region_input(sp, autocast_input=True)
        for name in ("q", "k", "v", "ogate_preact", "igate_preact", "fgate_preact"):
            plan[f"{p}.mlstm_layer.{name}"] = ColwiseParallel()
        plan[f"{p}.mlstm_layer.multihead_norm"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)})
        plan[f"{p}.mlstm_layer.out_proj"] = row_output(sp)
        plan[f"{p}.ffn"] = region_input(sp, autocast_input=True)
        plan[f"{p}.ffn.proj_up_gate"] = ColwiseParallel()
        plan[f"{p}.ffn.proj_up"] = ColwiseParallel()
        plan[f"{p}.ffn.proj_down"] = row_output(sp)
        if sp:
            plan[f"{p}.norm_mlstm"] = SequenceParallel()
            plan[f"{p}.norm_ffn"] = SequenceParallel()
    return plan


def sequence_mixing_flops(cfg: xLSTMLargeConfig, seq_len: int) -> float:
    """The mLSTM cell per head in the chunkwise form with chunk size ``L = min(chunk_size, seq_len)``,
    after ``NX-AI/xlstm_scaling_laws``: ``4 * dqk * dv`` (state update ``k v^T`` and read-out
    ``q^T C``) ``+ 2 * L * (dqk + dv)`` (intra-chunk ``q k^T`` and its product with V). Gate and
    normaliser arithmetic, O(dqk), is left out."""
    L = min(cfg.chunk_size, seq_len)
    dqk, dv = cfg.qk_dim // cfg.num_heads, cfg.v_dim // cfg.num_heads
    return float(cfg.num_blocks * cfg.num_heads * (4 * dqk * dv + 2 * L * (dqk + dv)))


# ------------------------------------------------------------------------------------------------
# transformers' xLSTMForCausalLM

_OUR_EMBEDDING, _HF_EMBEDDING = "embedding.weight", "backbone.embeddings.weight"


def to_hf_state_dict(state_dict: dict, cfg: xLSTMLargeConfig | None = None) -> dict:
    """Our ``xlstm_large`` state dict -> ``xLSTMForCausalLM`` (weight_mode "single")."""
    return {(_HF_EMBEDDING if k == _OUR_EMBEDDING else k): v for k, v in state_dict.items()}


def from_hf_state_dict(state_dict: dict) -> dict:
    """An ``xLSTMForCausalLM`` state dict (weight_mode "single") -> our ``xlstm_large``."""
    fused = [k for k in state_dict if k.endswith(("qkv_opreact.weight", "ifgate_preact.weight"))]
    if fused:
        raise ValueError(
            f"checkpoint uses weight_mode 'fused' (e.g. {fused[0]}); only 'single' weights are supported"
        )
    return {(_OUR_EMBEDDING if k == _HF_EMBEDDING else k): v for k, v in state_dict.items()}


def hf_config(cfg: xLSTMLargeConfig, **token_ids):
    """A transformers ``xLSTMConfig`` describing ``cfg``; ``token_ids`` (``bos_token_id``,
    ``eos_token_id``, ``pad_token_id``) override transformers' defaults (0, 2, 1: GPT-NeoX)."""
    from transformers import xLSTMConfig

    if cfg.input_gate != "exp":
        raise ValueError(f"model.input_gate = {cfg.input_gate!r}: transformers' xLSTM supports only 'exp'")
    if cfg.use_bias:
        raise ValueError("model.use_bias = True: transformers' xLSTM has no bias on its final norm (out_norm)")
    # transformers sizes its generation cache with q/k/v widths rounded up to multiples of 64, the
    # layers with the exact widths: they agree only when the widths are multiples of 64.
    for name, width in (("qk_dim_factor", cfg.qk_dim), ("v_dim_factor", cfg.v_dim)):
        if width % 64:
            raise ValueError(
                f"model.{name} = {getattr(cfg, name)}: embedding_dim * {name} = {width} must be a multiple "
                "of 64 for transformers' xLSTM"
            )
    return xLSTMConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embedding_dim,
        embedding_dim=cfg.embedding_dim,
        num_hidden_layers=cfg.num_blocks,
        num_blocks=cfg.num_blocks,
        num_heads=cfg.num_heads,
        use_bias=cfg.use_bias,
        norm_reduction_force_float32=True,
        tie_word_embeddings=cfg.tie_embeddings,
        add_out_norm=True,
        norm_eps=cfg.norm_eps,
        qk_dim_factor=cfg.qk_dim_factor,
        v_dim_factor=cfg.v_dim_factor,
        # Native kernel names: transformers >= 5 rejects Triton ones unless `xlstm` is installed.
        chunkwise_kernel="chunkwise--native_autograd",
        sequence_kernel="native_sequence__native",
        step_kernel="native",
        mode="inference",
        chunk_size=cfg.chunk_size,
        return_last_states=True,
        eps=cfg.cell_eps,
        inference_state_dtype="float32",
        ffn_proj_factor=cfg.ffn_proj_factor,
        ffn_round_up_to_multiple_of=cfg.ffn_round_up_to_multiple_of,
        gate_soft_cap=cfg.gate_soft_cap,
        output_logit_soft_cap=cfg.output_logit_soft_cap,
        weight_mode="single",
        architectures=["xLSTMForCausalLM"],
        **token_ids,
    )


def large_config_from_hf(hf_cfg) -> xLSTMLargeConfig:
    """Our ``xlstm_large`` config for a transformers ``xLSTMConfig``.

    Widths and depth come from ``embedding_dim`` / ``num_blocks``: a config written with the
    official names only (as NX-AI/xLSTM-7b's) leaves ``hidden_size`` / ``num_hidden_layers`` at
    transformers' defaults, while the reverse case copies them into the official names."""
    if getattr(hf_cfg, "weight_mode", "single") != "single":
        raise ValueError(f"weight_mode = {hf_cfg.weight_mode!r}: only 'single' checkpoints are supported")
    cfg = xLSTMLargeConfig(
        vocab_size=hf_cfg.vocab_size,
        embedding_dim=hf_cfg.embedding_dim,
        num_blocks=hf_cfg.num_blocks,
        num_heads=hf_cfg.num_heads,
        qk_dim_factor=hf_cfg.qk_dim_factor,
        v_dim_factor=hf_cfg.v_dim_factor,
        ffn_proj_factor=hf_cfg.ffn_proj_factor,
        ffn_round_up_to_multiple_of=hf_cfg.ffn_round_up_to_multiple_of,
        gate_soft_cap=hf_cfg.gate_soft_cap,
        output_logit_soft_cap=hf_cfg.output_logit_soft_cap,
        norm_eps=hf_cfg.norm_eps,
        use_bias=hf_cfg.use_bias,
        cell_eps=hf_cfg.eps,
        chunk_size=hf_cfg.chunk_size,
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
    )
    cfg.validate("model")
    return cfg


def load_hf_checkpoint(path: str | Path) -> tuple[xLSTMLargeConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face xLSTM directory (``config.json`` + ``model.safetensors`` or sharded
    ``model-*.safetensors`` with an index) -> ``(config, state dict for our xlstm_large)``."""
    from transformers import xLSTMConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face xLSTM checkpoint directory)")
    cfg = large_config_from_hf(xLSTMConfig.from_pretrained(path))
    state_dict = from_hf_state_dict(read_safetensors(path))
    tied = resolve_tied_head(cfg.tie_embeddings, state_dict, _OUR_EMBEDDING, "lm_head.weight", path)
    return dataclasses.replace(cfg, tie_embeddings=tied), state_dict


SPEC = register_spec(ArchSpec(
    name="xlstm_large",
    config_class=xLSTMLargeConfig,
    model_class=xLSTMLarge,
    block_list="backbone.blocks",
    embedding_param=_OUR_EMBEDDING,
    sequence_mixing_flops=sequence_mixing_flops,
    tp_plan=tp_plan,
    tp_head_counts=lambda cfg: {"model.num_heads": cfg.num_heads},
    resumable_model_keys=frozenset({"kernel", "chunk_size"}),
    export=TransformersExport("xLSTMForCausalLM", to_hf_state_dict, hf_config),
))  # fmt: skip
