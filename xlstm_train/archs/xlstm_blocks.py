"""``xlstm_blocks``: the xLSTM paper's mLSTM/sLSTM stacks (``xlstm_train.models.xlstm_blocks``).

Exported to, and imported from (``load_official_checkpoint``), the official ``xlstm`` package's
``xLSTMLMModel`` (transformers has no class for it). Our names, shapes and parametrisations (norm
weights stored as gamma - 1) are the official ones with the CUDA sLSTM backend, so for
``backend="cuda"`` the state dict maps as is.
The ``vanilla`` backend stores the sLSTM recurrent kernel as ``(NH, 4*DH, DH)`` [head, gate*out, in]
and the bias gate-major ``(4, NH, DH)``; those two tensors are permuted.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ParallelStyle, SequenceParallel

from xlstm_train.archs import ArchSpec, register_spec
from xlstm_train.export.adapter import (
    SLSTM_BACKENDS,
    ExportAdapter,
    ExportedModel,
    read_safetensors,
    write_safetensors,
)
from xlstm_train.models.xlstm_blocks import mLSTMBlock, sLSTMCell, xLSTMBlocksConfig, xLSTMBlocksModel
from xlstm_train.parallel.tensor_parallel import (
    Compose,
    GateFromAllHeads,
    GatherOutput,
    HeadLocal,
    Packed,
    embedding_and_head_plan,
    region_input,
    row_output,
)


def tp_plan(model: xLSTMBlocksModel, sequence_parallel: bool, loss_parallel: bool) -> dict[str, ParallelStyle]:
    """The paper blocks, split by head.

    mLSTM (pre up-projection): ``proj_up`` packs ``[x_m; z]`` (``Packed(2)``: each rank computes
    its heads' rows of both); the causal conv, the block-diagonal q/k/v projections, the output
    norm and the learnable skip are per channel, hence per head, and run locally; the gates read
    ``cat(q, k, v)`` of all heads (``GateFromAllHeads``: partial sums and one all-reduce of NH
    numbers per token); ``proj_down`` is row-parallel.

    sLSTM (post up-projection): conv, gate projections (block-diagonal per head), the recurrent
    cell and its per-head norm run on the rank's heads; the layer's output is all-gathered into
    the residual stream (there is no projection after the cell to make row-parallel). The gated
    FFN's ``proj_up`` packs ``[gate; up]`` (``Packed(2)``), ``proj_down`` is row-parallel.
    """
    sp = sequence_parallel
    plan = embedding_and_head_plan("token_embedding", "xlstm_block_stack.post_blocks_norm", "lm_head", sp,
                                   loss_parallel)  # fmt: skip
    residual = Shard(1) if sp else Replicate()
    for n, block in enumerate(model.xlstm_block_stack.blocks):
        p = f"xlstm_block_stack.blocks.{n}"
        if sp:
            plan[f"{p}.xlstm_norm"] = SequenceParallel()
        if isinstance(block, mLSTMBlock):
            plan[f"{p}.xlstm"] = Compose(region_input(sp), HeadLocal({"learnable_skip": Shard(0)}))
            plan[f"{p}.xlstm.proj_up"] = HeadLocal({"weight": Packed(2)}, input="partial")
            plan[f"{p}.xlstm.conv1d"] = HeadLocal({"conv.weight": Shard(0), "conv.bias": Shard(0)})
            for proj in ("q_proj", "k_proj", "v_proj"):
                plan[f"{p}.xlstm.{proj}"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)})
            plan[f"{p}.xlstm.mlstm_cell.igate"] = GateFromAllHeads()
            plan[f"{p}.xlstm.mlstm_cell.fgate"] = GateFromAllHeads()
            plan[f"{p}.xlstm.mlstm_cell.outnorm"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)})
            plan[f"{p}.xlstm.proj_down"] = row_output(sp)
        else:
            cell = {"slstm_cell._recurrent_kernel_": Shard(0), "slstm_cell._bias_": Shard(0)}
            plan[f"{p}.xlstm"] = Compose(
                region_input(sp), HeadLocal(cell), GatherOutput(dim=-1, output_layout=residual)
            )
            plan[f"{p}.xlstm.conv1d"] = HeadLocal({"conv.weight": Shard(0), "conv.bias": Shard(0)}, input="slice")
            for gate in ("fgate", "igate"):  # they read the (already local) convolved input
                plan[f"{p}.xlstm.{gate}"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)}, input="local")
            for gate in ("zgate", "ogate"):  # they read the layer's replicated input
                plan[f"{p}.xlstm.{gate}"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)}, input="slice")
            plan[f"{p}.xlstm.group_norm"] = HeadLocal({"weight": Shard(0), "bias": Shard(0)})
            if sp:
                plan[f"{p}.ffn_norm"] = SequenceParallel()
            plan[f"{p}.ffn"] = region_input(sp)
            plan[f"{p}.ffn.proj_up"] = HeadLocal({"weight": Packed(2)}, input="partial")
            plan[f"{p}.ffn.proj_down"] = row_output(sp)
    return plan


def tp_head_counts(cfg: xLSTMBlocksConfig) -> dict[str, int]:
    """The heads of the block kinds the stack has, and the blocks of the mLSTM's block-diagonal
    q/k/v projections, which must not straddle two ranks."""
    counts = {}
    if len(cfg.slstm_at) < cfg.num_blocks:
        counts["model.mlstm_num_heads"] = cfg.mlstm_num_heads
        inner = cfg.mlstm_inner_dim
        counts[f"the q/k/v projection blocks (mLSTM inner dimension {inner} / model.qkv_proj_blocksize)"] = (
            inner // cfg.qkv_proj_blocksize
        )
    if cfg.slstm_at:
        counts["model.slstm_num_heads"] = cfg.slstm_num_heads
    return counts


def sequence_mixing_flops(cfg: xLSTMBlocksConfig, seq_len: int) -> float:
    """mLSTM blocks: the chunkwise cell per head, ``4 * dh^2 + 2 * L * 2 * dh`` with head dim ``dh``
    and ``L = min(chunk_size, seq_len)`` (as for ``xlstm_large``, with dqk = dv = dh). sLSTM blocks:
    the recurrent matmul ``R y_{t-1}``, block-diagonal over heads, ``2 * 4 * DH * E``."""
    L = min(cfg.chunk_size, seq_len)
    dh = cfg.mlstm_inner_dim // cfg.mlstm_num_heads
    mlstm = cfg.mlstm_num_heads * (4 * dh * dh + 2 * L * 2 * dh)
    slstm = 2 * 4 * (cfg.embedding_dim // cfg.slstm_num_heads) * cfg.embedding_dim
    num_slstm = len(cfg.slstm_at)
    return float((cfg.num_blocks - num_slstm) * mlstm + num_slstm * slstm)


def no_weight_decay(model: xLSTMBlocksModel):
    """The sLSTM recurrent kernels, as in the official xLSTM training code: they are the cell's
    memory mixing, which decay would pull towards the zeros they are initialised at."""
    return [cell._recurrent_kernel_ for cell in model.modules() if isinstance(cell, sLSTMCell)]


# ------------------------------------------------------------------------------------------------
# The official xlstm package's xLSTMLMModel

_RECURRENT = "slstm_cell._recurrent_kernel_"
_EMBEDDING = "token_embedding.weight"
_BIAS = "slstm_cell._bias_"
# The official mLSTM backends divide by (normaliser + 1e-6), a constant rather than a setting.
OFFICIAL_MLSTM_EPS = 1e-6


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


def from_official_blocks_state_dict(state_dict: dict, backend: str = "vanilla", tie_embeddings: bool | None = None
                                    ) -> dict:  # fmt: skip
    """An ``xlstm.xLSTMLMModel`` state dict (sLSTM backend ``backend``) -> our ``xlstm_blocks``.

    ``tie_embeddings`` (the official ``tie_weights``) checks the head: a tied model's head may be
    left out (as ``export-hf`` writes it) or stored equal to the embedding; an untied one needs its
    own. ``None`` leaves the head as it is."""
    _check_backend(backend)
    out = dict(state_dict)
    head, embedding = out.get("lm_head.weight"), out.get(_EMBEDDING)
    if tie_embeddings and embedding is not None:
        if head is None:
            out["lm_head.weight"] = embedding
        elif not torch.equal(head, embedding):
            raise ValueError("tie_weights is true but lm_head.weight differs from token_embedding.weight: the "
                             "official model would load one matrix over the other; import it with tie_weights false")
    elif tie_embeddings is False and head is None:
        raise ValueError("tie_weights is false but the weights have no lm_head.weight: the output head is missing")
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


def official_config(cfg: xLSTMBlocksConfig, context_length: int, slstm_backend: str) -> dict:
    """The official ``xLSTMLMModelConfig`` for ``cfg`` as a plain mapping (its field names)."""
    official = {
        "vocab_size": cfg.vocab_size,
        "context_length": context_length,
        "num_blocks": cfg.num_blocks,
        "embedding_dim": cfg.embedding_dim,
        "slstm_at": list(cfg.slstm_at),
        "tie_weights": cfg.tie_embeddings,
        "dropout": cfg.dropout,
        "bias": False,
        "add_post_blocks_norm": True,
        "mlstm_block": None,
        "slstm_block": None,
    }
    if len(cfg.slstm_at) < cfg.num_blocks:
        official["mlstm_block"] = {"mlstm": {
            "num_heads": cfg.mlstm_num_heads,
            "proj_factor": cfg.mlstm_proj_factor,
            "round_proj_up_dim_up": True,
            "round_proj_up_to_multiple_of": cfg.mlstm_round_proj_up_to_multiple_of,
            "qkv_proj_blocksize": cfg.qkv_proj_blocksize,
            "conv1d_kernel_size": cfg.mlstm_conv1d_kernel_size,
        }}  # fmt: skip
    if cfg.slstm_at:
        official["slstm_block"] = {
            "slstm": {
                "backend": slstm_backend,
                "num_heads": cfg.slstm_num_heads,
                "conv1d_kernel_size": cfg.slstm_conv1d_kernel_size,
                "bias_init": "powerlaw_blockdependent",
                "recurrent_weight_init": "zeros",
            },
            "feedforward": {
                "proj_factor": cfg.ffn_proj_factor,
                "round_proj_up_dim_up": True,
                "round_proj_up_to_multiple_of": cfg.ffn_round_up_to_multiple_of,
                "act_fn": "gelu",
            },
        }
    return official


def _official_value(section: dict, where: str, name: str, allowed, default=None):
    """``section[name]`` (``default`` when absent); ValueError unless it is ``allowed``."""
    value = section.get(name, default)
    if value != allowed:
        raise ValueError(f"{where}.{name} = {value!r}: our xlstm_blocks supports only {allowed!r}")
    return value


def blocks_config_from_official(official: dict) -> tuple[xLSTMBlocksConfig, str]:
    """Our ``xlstm_blocks`` config and the sLSTM backend (weight layout) of an official
    ``xLSTMLMModelConfig`` mapping (``config.yaml``); absent fields take the official defaults.
    ValueError names a field our model cannot represent."""
    _official_value(official, "config", "bias", False, False)
    _official_value(official, "config", "add_post_blocks_norm", True, True)
    mlstm = (official.get("mlstm_block") or {}).get("mlstm") or {}
    slstm_block = official.get("slstm_block") or {}
    slstm, ffn = slstm_block.get("slstm") or {}, slstm_block.get("feedforward") or {}
    _official_value(mlstm, "mlstm_block.mlstm", "round_proj_up_dim_up", True, True)
    _official_value(slstm, "slstm_block.slstm", "function", "slstm", "slstm")
    _official_value(slstm, "slstm_block.slstm", "forward_clipval", None)
    _official_value(slstm, "slstm_block.slstm", "group_norm_weight", True, True)
    _official_value(ffn, "slstm_block.feedforward", "round_proj_up_dim_up", True, True)
    _official_value(ffn, "slstm_block.feedforward", "act_fn", "gelu", "gelu")
    _official_value(ffn, "slstm_block.feedforward", "ff_type", "ffn_gated", "ffn_gated")
    backend = slstm.get("backend", "cuda")
    _check_backend(backend)
    # the official dataclasses' defaults, which are also ours
    cfg = xLSTMBlocksConfig(
        vocab_size=official["vocab_size"],
        embedding_dim=official.get("embedding_dim", 128),
        num_blocks=official.get("num_blocks", 1),
        slstm_at=list(official.get("slstm_at") or []),
        tie_embeddings=bool(official.get("tie_weights", False)),
        dropout=official.get("dropout", 0.0),
        mlstm_num_heads=mlstm.get("num_heads", 4),
        mlstm_proj_factor=mlstm.get("proj_factor", 2.0),
        mlstm_round_proj_up_to_multiple_of=mlstm.get("round_proj_up_to_multiple_of", 64),
        qkv_proj_blocksize=mlstm.get("qkv_proj_blocksize", 4),
        mlstm_conv1d_kernel_size=mlstm.get("conv1d_kernel_size", 4),
        cell_eps=OFFICIAL_MLSTM_EPS,
        slstm_num_heads=slstm.get("num_heads", 4),
        slstm_conv1d_kernel_size=slstm.get("conv1d_kernel_size", 4),
        ffn_proj_factor=ffn.get("proj_factor", 1.3),
        ffn_round_up_to_multiple_of=ffn.get("round_proj_up_to_multiple_of", 64),
    )
    cfg.validate("model")
    return cfg, backend


def load_official_checkpoint(directory: str | Path) -> tuple[xLSTMBlocksConfig, dict[str, torch.Tensor]]:
    """An official ``xLSTMLMModel`` directory as ``export-hf`` writes it (``config.yaml`` with the
    ``xLSTMLMModelConfig`` fields, ``model.safetensors`` or shards) -> ``(config, state dict for our
    xlstm_blocks)``. A tied model's head may be absent; an untied one needs its own."""
    directory = Path(directory)
    if not (directory / "config.yaml").is_file():
        raise FileNotFoundError(f"{directory}: no config.yaml (expected an official xlstm model directory)")
    cfg, backend = blocks_config_from_official(yaml.safe_load((directory / "config.yaml").read_text()))
    weights = read_safetensors(directory)
    try:
        return cfg, from_official_blocks_state_dict(weights, backend, tie_embeddings=cfg.tie_embeddings)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


LOAD_SNIPPET = """import glob
from pathlib import Path

import yaml
from dacite import Config, from_dict
from safetensors.torch import load_file
from xlstm import xLSTMLMModel, xLSTMLMModelConfig

directory = Path("{name}")
config = from_dict(xLSTMLMModelConfig, yaml.safe_load((directory / "config.yaml").read_text()),
                   config=Config(strict=True))
model = xLSTMLMModel(config)
state_dict = {{}}
for path in sorted(glob.glob(str(directory / "model*.safetensors"))):
    state_dict.update(load_file(path))
missing, unexpected = model.load_state_dict(state_dict, strict=False)
assert not unexpected and set(missing) <= {{"lm_head.weight"}}  # a tied head is the embedding
model.eval()
"""


class OfficialExport(ExportAdapter):
    """``model.safetensors`` in the layout of the chosen sLSTM backend and ``config.yaml`` with the
    official ``xLSTMLMModelConfig`` fields."""

    def check(self, cfg: xLSTMBlocksConfig) -> None:
        if cfg.input_gate != "exp":
            raise ValueError(
                f"model.input_gate = {cfg.input_gate!r}: the official xlstm package's mLSTM has only the "
                "exponential input gate; allowed: 'exp'"
            )
        if cfg.cell_eps != OFFICIAL_MLSTM_EPS:
            raise ValueError(
                f"model.cell_eps = {cfg.cell_eps!r}: the official xlstm package's mLSTM uses a fixed "
                f"{OFFICIAL_MLSTM_EPS}; allowed: {OFFICIAL_MLSTM_EPS}"
            )

    def write(self, directory, cfg, state, tokenizer, name, options) -> ExportedModel:
        model_cfg, backend = cfg.model, options.slstm_backend
        weights = to_official_blocks_state_dict(state, backend=backend)
        if model_cfg.tie_embeddings:
            weights.pop("lm_head.weight")
        write_safetensors(weights, directory, options.dtype, options.max_shard_size)
        official = official_config(model_cfg, cfg.data.seq_len, backend)
        (directory / "config.yaml").write_text(yaml.safe_dump(official, sort_keys=False))
        usage = (
            "Load it with the `xlstm` package (it needs `dacite` and `pyyaml`); `context_length` is the "
            f"training sequence length ({cfg.data.seq_len}): raise it in `config.yaml` to run longer "
            f"sequences through the parallel mLSTM.\n\n```python\n{LOAD_SNIPPET.format(name=name)}```"
        )
        if backend == "vanilla" and model_cfg.slstm_at:
            usage += (
                "\n\nThe sLSTM weights are in the layout of the `vanilla` (PyTorch) backend; the `cuda` backend "
                "stores `_recurrent_kernel_` and `_bias_` differently (`xlstm-train export-hf --slstm-backend cuda`)."
            )
        return ExportedModel(f"the official `xlstm` package's `xLSTMLMModel` (sLSTM backend `{backend}`)", usage)


SPEC = register_spec(ArchSpec(
    name="xlstm_blocks",
    config_class=xLSTMBlocksConfig,
    model_class=xLSTMBlocksModel,
    block_list="xlstm_block_stack.blocks",
    embedding_param=_EMBEDDING,
    sequence_mixing_flops=sequence_mixing_flops,
    tp_plan=tp_plan,
    tp_head_counts=tp_head_counts,
    no_weight_decay=no_weight_decay,
    resumable_model_keys=frozenset({"kernel", "chunk_size", "dropout"}),
    export=OfficialExport(),
))  # fmt: skip
