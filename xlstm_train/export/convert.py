"""Weight conversion between our models and the official implementations.

* Paper blocks (``xlstm_blocks``) <-> the official ``xlstm.xLSTMLMModel``. Our names, shapes and
  parametrisations (norm weights stored as gamma - 1) are the official ones with the CUDA sLSTM
  backend, so for ``backend="cuda"`` the state dict maps as is. The ``vanilla`` backend stores the
  sLSTM recurrent kernel as ``(NH, 4*DH, DH)`` [head, gate*out, in] and the bias gate-major
  ``(4, NH, DH)``; those two tensors are permuted.
* xLSTM Large (``xlstm_large``) <-> Hugging Face transformers' ``xLSTMForCausalLM``: identical
  names except ``embedding.weight`` <-> ``backbone.embeddings.weight``; all norms store gamma.
  ``hf_config`` writes a config that transformers loads without the ``xlstm`` package (native
  kernel names) and ``load_hf_checkpoint`` imports a Hub-format directory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xlstm_train.models.xlstm_large import xLSTMLargeConfig

SLSTM_BACKENDS = ("vanilla", "cuda")
_RECURRENT = "slstm_cell._recurrent_kernel_"
_BIAS = "slstm_cell._bias_"


def _check_backend(backend: str) -> None:
    if backend not in SLSTM_BACKENDS:
        raise ValueError(f"sLSTM backend must be one of {SLSTM_BACKENDS}, got {backend!r}")


def to_official_blocks_state_dict(state_dict: dict, backend: str = "vanilla") -> dict:
    """Our ``xlstm_blocks`` state dict -> ``xlstm.xLSTMLMModel`` with the given sLSTM backend."""
    _check_backend(backend)
    out = dict(state_dict)
    if backend == "cuda":
        return out
    for key, recurrent in state_dict.items():
        if not key.endswith(_RECURRENT):
            continue
        prefix = key[: -len(_RECURRENT)]
        num_heads, head_dim = recurrent.shape[0], recurrent.shape[1]
        R = recurrent.view(num_heads, head_dim, 4, head_dim)  # [head, in, gate, out]
        out[key] = R.permute(0, 2, 3, 1).reshape(num_heads, 4 * head_dim, head_dim).contiguous()
        bias = state_dict[prefix + _BIAS].view(num_heads, 4, head_dim)
        out[prefix + _BIAS] = bias.transpose(0, 1).reshape(-1).contiguous()
    return out


def from_official_blocks_state_dict(state_dict: dict, backend: str = "vanilla") -> dict:
    """An ``xlstm.xLSTMLMModel`` state dict (sLSTM backend ``backend``) -> our ``xlstm_blocks``."""
    _check_backend(backend)
    out = dict(state_dict)
    if backend == "cuda":
        return out
    for key, recurrent in state_dict.items():
        if not key.endswith(_RECURRENT):
            continue
        prefix = key[: -len(_RECURRENT)]
        num_heads, head_dim = recurrent.shape[0], recurrent.shape[2]
        R = recurrent.view(num_heads, 4, head_dim, head_dim)  # [head, gate, out, in]
        out[key] = R.permute(0, 3, 1, 2).reshape(num_heads, head_dim, 4 * head_dim).contiguous()
        bias = state_dict[prefix + _BIAS].view(4, num_heads, head_dim)
        out[prefix + _BIAS] = bias.transpose(0, 1).reshape(-1).contiguous()
    return out


# --------------------------------------------------------------------------------------------------
# xLSTM Large <-> Hugging Face transformers

_OUR_EMBEDDING, _HF_EMBEDDING = "embedding.weight", "backbone.embeddings.weight"


def to_hf_state_dict(state_dict: dict) -> dict:
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
    from safetensors.torch import load_file
    from transformers import xLSTMConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face xLSTM checkpoint directory)")
    cfg = large_config_from_hf(xLSTMConfig.from_pretrained(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    state_dict = {}
    for name in files:
        state_dict.update(load_file(path / name))
    state_dict = from_hf_state_dict(state_dict)
    if cfg.tie_embeddings:  # transformers saves a tied head once, under the embedding's name
        state_dict.setdefault("lm_head.weight", state_dict[_OUR_EMBEDDING])
    return cfg, state_dict
