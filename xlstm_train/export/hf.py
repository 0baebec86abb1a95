"""``xlstm-train export-hf CHECKPOINT OUT_DIR``: a training checkpoint as a directory others can load.

What is written depends on the architecture:

* ``xlstm_large`` -> a transformers ``xLSTMForCausalLM`` directory and ``llama`` -> a transformers
  ``LlamaForCausalLM`` directory: ``config.json``, ``generation_config.json``, ``model.safetensors``
  (shards plus ``model.safetensors.index.json`` above ``max_shard_size``) and the tokenizer, so that
  ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` / ``AutoTokenizer.from_pretrained(OUT_DIR)``
  load them with the stock library.
* ``xlstm_blocks`` (the paper's architecture, which transformers has no class for) -> the official
  ``xlstm`` package's ``xLSTMLMModel``: ``model.safetensors`` in its layout and ``config.yaml`` with
  its ``xLSTMLMModelConfig`` fields.

Every directory also gets a ``README.md`` (how to load it and how to tokenize) and the run's
resolved configuration as ``training_config.yaml``.

Only the model weights are read from the checkpoint, into a single-process model built from the
checkpoint's own ``config.yaml``; DCP reshards on load, so checkpoints of sharded (FSDP/TP) runs
export the same way. Everything is written into ``OUT_DIR.tmp`` and renamed when complete: a failed
export leaves no partial ``OUT_DIR``.

Tokenizers are exported only when transformers reproduces the training tokenization: the written
tokenizer is loaded back with ``AutoTokenizer`` and must give the training tokenizer's ids on a set
of probe texts. A Hugging Face ``tokenizer.json`` is copied. A SentencePiece unigram model is
rewritten as a ``tokenizer.json`` (transformers' own SentencePiece conversions assume BPE or
model-specific normalisation and tokenize our unigram models differently); when that does not
reproduce it, the ``.model`` file is kept under another name and the README says how to use it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from xlstm_train.config import ConfigError
from xlstm_train.data import DataError
from xlstm_train.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, load_tokenizer, open_tokenizer

if TYPE_CHECKING:
    import torch

    from xlstm_train.models.llama import LlamaConfig
    from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
    from xlstm_train.train.config import Config

# torch, the models and the checkpoint code are imported where they are used, so that building the
# command line parser stays fast; hence also the names below rather than torch dtypes.
DTYPES = ("float32", "bfloat16")
SLSTM_BACKENDS = ("vanilla", "cuda")  # convert.SLSTM_BACKENDS
# The official mLSTM backends divide by (normaliser + 1e-6), a constant rather than a setting.
OFFICIAL_MLSTM_EPS = 1e-6
TRAINING_CONFIG_FILE = "training_config.yaml"


@dataclass
class ExportedTokenizer:
    """What was written for the tokenizer: whether ``AutoTokenizer`` loads it, the special-token ids
    for the model config, and a README paragraph."""

    auto_tokenizer: bool
    token_ids: dict[str, int | None]
    readme: str


# ----------------------------------------------------------------------------------------------
# Tokenizer


def find_tokenizer(cfg: Config, checkpoint_dir: Path, override: str | None):
    """The run's tokenizer (or ``override``); None for a synthetic task, whose ids are the task's."""
    if override is not None:
        try:
            tokenizer = open_tokenizer(override)
        except DataError as e:
            raise ConfigError(f"--tokenizer {override}: {e}") from None
    elif cfg.data.source == "synthetic":
        return None
    else:
        try:
            tokenizer = load_tokenizer(cfg.data)
        except DataError as e:
            raise ConfigError(
                f"the tokenizer of checkpoint '{checkpoint_dir}' (data.tokenizer = {cfg.data.tokenizer!r} or "
                f"the manifest of data.datasets[0], in its config.yaml) cannot be opened from here: {e}. "
                "Run from the directory the training ran in (relative paths), or pass --tokenizer PATH"
            ) from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"tokenizer '{tokenizer.path}' has {tokenizer.vocab_size} tokens, more than the model's "
            f"model.vocab_size = {cfg.model.vocab_size}; it cannot be the tokenizer this model was trained with"
        )
    return tokenizer


def sentencepiece_to_tokenizers(model_path: Path):
    """``(tokenizer, special_tokens)``: a ``tokenizers.Tokenizer`` that segments like the SentencePiece
    unigram model at ``model_path`` and its ``{"bos_token": piece, ...}``; None for models it cannot
    express (BPE/word/char models, whitespace as suffix).

    SentencePiece normalises (precompiled map, whitespace cleanup, dummy "▁" prefix, spaces -> "▁")
    and then runs a Viterbi search over the piece scores of the whole text; user-defined pieces
    score ``len(piece) * max_score - 0.1`` there, which makes them win wherever they occur.

    Two spellings tokenize differently, as in transformers tokenizers generally: the text of a
    control piece (``</s>``) is read as that special token, and the text of a byte piece
    (``<0x41>``) as that piece; SentencePiece spells both out character by character.
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = sentencepiece_model_pb2.ModelProto.FromString(model_path.read_bytes())
    spec, normalizer_spec = proto.trainer_spec, proto.normalizer_spec
    unigram = sentencepiece_model_pb2.TrainerSpec.ModelType.UNIGRAM
    if spec.model_type != unigram or spec.treat_whitespace_as_suffix:
        return None
    Piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    max_score = max(p.score for p in proto.pieces if p.type == Piece.NORMAL)

    def score(piece) -> float:
        return len(piece.piece) * max_score - 0.1 if piece.type == Piece.USER_DEFINED else piece.score

    tokenizer = Tokenizer(
        models.Unigram(
            [(p.piece, score(p)) for p in proto.pieces], unk_id=spec.unk_id, byte_fallback=spec.byte_fallback
        )
    )
    steps = []
    if normalizer_spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(normalizer_spec.precompiled_charsmap))
    if normalizer_spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if normalizer_spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if normalizer_spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " ")]
    if spec.byte_fallback:
        decode_steps += [decoders.ByteFallback(), decoders.Fuse()]
    if normalizer_spec.add_dummy_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode_steps)
    special = [p.piece for p in proto.pieces if p.type in (Piece.CONTROL, Piece.UNKNOWN)]
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False) for piece in special])
    special_ids = {
        "bos_token": spec.bos_id, "eos_token": spec.eos_id, "unk_token": spec.unk_id, "pad_token": spec.pad_id
    }  # fmt: skip
    return tokenizer, {name: proto.pieces[i].piece for name, i in special_ids.items() if i >= 0}


# Texts on which the exported tokenizer must give the training tokenizer's ids: whitespace runs,
# newlines, leading/trailing spaces, digits, punctuation and characters outside most vocabularies.
_PROBE_TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "  two  leading spaces,\ttabs\tand trailing ones  ",
    "CHAPTER 1\n\nThe family of Dashwood had long been settled in Sussex.\nA new line.\n\n\n",
    " 1234567890 3.14159 -42 1e-3 $100 50%",
    "\"Quoted,\" she said; (brackets) [and] {braces} -- dashes... ellipses!?",
    "ünïcödé, 漢字, Ελληνικά, русский, emoji 😀🚀",
    "\n",
    " ",
    "x",
]


def _probe_texts(tokenizer) -> list[str]:
    """The fixed probes plus texts decoded from random id sequences (seeded)."""
    rng = random.Random(0)
    decoded = [tokenizer.decode([rng.randrange(tokenizer.vocab_size) for _ in range(24)]) for _ in range(64)]
    return _PROBE_TEXTS + decoded


def _first_mismatch(ours, theirs, texts: list[str]) -> str | None:
    """A description of the first probe tokenized or decoded differently, or None."""
    for text in texts:
        expected = ours.encode(text)
        got = theirs.encode(text, add_special_tokens=False)
        if got != expected:
            return f"{text[:40]!r} -> {got[:8]}... instead of {expected[:8]}..."
        if theirs.decode(expected) != ours.decode(expected):
            return f"decoding the ids of {text[:40]!r} gives {theirs.decode(expected)[:40]!r}"
    return None


AUTO_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def write_auto_tokenizer(tokenizer, directory: Path):
    """Write ``tokenizer`` as ``tokenizer.json`` + ``tokenizer_config.json`` and load it back with
    ``AutoTokenizer``. Returns ``(loaded, None)`` when it reproduces the training tokenization, else
    ``(None, why)`` with the files removed again."""
    from transformers import AutoTokenizer

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "add_bos_token": False, "add_eos_token": False}  # fmt: skip
    if isinstance(tokenizer, HuggingFaceTokenizer):
        shutil.copyfile(tokenizer.path, directory / "tokenizer.json")
        config["eos_token"] = tokenizer.eos_token
    else:
        converted = sentencepiece_to_tokenizers(Path(tokenizer.path))
        if converted is None:
            return None, ("of SentencePiece models, only unigram ones are converted to a tokenizer that transformers "
                          "runs with the same segmentation")  # fmt: skip
        converted_tokenizer, special_tokens = converted
        converted_tokenizer.save(str(directory / "tokenizer.json"))
        config.update(special_tokens)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    try:
        loaded = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - whatever stops transformers loading it, the fallback is the same
        problem = f"transformers could not load it ({type(e).__name__}: {e})"
    else:
        mismatch = _first_mismatch(tokenizer, loaded, _probe_texts(tokenizer))
        if mismatch is None:
            return loaded, None
        problem = f"transformers' tokenization differs from training: {mismatch}"
    for name in AUTO_TOKENIZER_FILES:
        (directory / name).unlink()
    return None, problem


def export_tokenizer(tokenizer, directory: Path) -> ExportedTokenizer:
    """Write the run's tokenizer into ``directory``: for ``AutoTokenizer`` if transformers reproduces
    it, else the original file under a name ``AutoTokenizer`` ignores, with instructions."""
    no_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is None:
        return ExportedTokenizer(False, no_ids, (
            "The model was trained on a synthetic task: token ids are the task's own symbols and there "
            "is no text tokenizer."
        ))  # fmt: skip
    source = Path(tokenizer.path)
    loaded, problem = write_auto_tokenizer(tokenizer, directory)
    if loaded is not None:
        ids = {f"{name}_token_id": getattr(loaded, f"{name}_token_id") for name in ("bos", "eos", "pad")}
        return ExportedTokenizer(True, ids, (
            f"`AutoTokenizer.from_pretrained` loads the training tokenizer ({source.name}). Training text "
            "was encoded without added special tokens, i.e. `tokenizer(text, add_special_tokens=False)`, "
            f"and every document ended with the EOS token `{loaded.eos_token}` (id {loaded.eos_token_id}). "
            f"Special tokens written out in text (such as `{loaded.eos_token}`) are read as those tokens."
        ))  # fmt: skip
    if isinstance(tokenizer, SentencePieceTokenizer):
        kept = "sentencepiece.model"
        usage = (f"import sentencepiece\nsp = sentencepiece.SentencePieceProcessor(model_file='{kept}')\n"
                 "ids = sp.encode(text)")  # fmt: skip
    else:
        kept = "training_tokenizer.json"
        usage = (f"from tokenizers import Tokenizer\ntok = Tokenizer.from_file('{kept}')\n"
                 "ids = tok.encode(text, add_special_tokens=False).ids")  # fmt: skip
    shutil.copyfile(source, directory / kept)
    return ExportedTokenizer(False, {**no_ids, "eos_token_id": tokenizer.eos_id}, (
        f"No `AutoTokenizer` files are included: {problem}. The training tokenizer is `{kept}`; encode "
        f"with\n\n```python\n{usage}\n```\n\nEvery training document ended with the EOS id {tokenizer.eos_id}."
    ))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Weights and configs per architecture


def check_exportable(model_cfg, config_path: Path) -> None:
    """Refuse settings the target implementation cannot represent, before any weights are read."""
    if model_cfg.arch == "xlstm_large":
        from xlstm_train.export.convert import hf_config

        try:
            hf_config(model_cfg)
        except ValueError as e:
            raise ConfigError(f"{config_path}: {e}") from None
    elif model_cfg.arch == "xlstm_blocks":
        if model_cfg.input_gate != "exp":
            raise ConfigError(
                f"{config_path}: model.input_gate = {model_cfg.input_gate!r}: the official xlstm package's "
                "mLSTM has only the exponential input gate; allowed: 'exp'"
            )
        if model_cfg.cell_eps != OFFICIAL_MLSTM_EPS:
            raise ConfigError(
                f"{config_path}: model.cell_eps = {model_cfg.cell_eps!r}: the official xlstm package's mLSTM "
                f"uses a fixed {OFFICIAL_MLSTM_EPS}; allowed: {OFFICIAL_MLSTM_EPS}"
            )


def llama_qk_to_rotate_half(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder the rows of a q/k projection from our RoPE layout to transformers'.

    We rotate adjacent pairs ``(2j, 2j+1)`` of each head by frequency j; transformers' ``rotate_half``
    pairs ``(j, j + D/2)``. Moving row 2j to j and row 2j+1 to j + D/2 in every head makes the two
    the same rotation; q and k get the same permutation, so attention scores are unchanged."""
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    return weight.view(num_heads, head_dim // 2, 2, in_features).transpose(1, 2).reshape(out_features, in_features)


def to_hf_llama_state_dict(state: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
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


def hf_llama_config(cfg: LlamaConfig, **token_ids):
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


def official_blocks_config(cfg: xLSTMBlocksConfig, context_length: int, slstm_backend: str) -> dict:
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


HF_LOAD_SNIPPET = """from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{name}")
"""
HF_TOKENIZER_SNIPPET = """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
prompt = tokenizer({prompt}, return_tensors="pt", add_special_tokens=False).input_ids
print(tokenizer.decode(model.generate(prompt, max_new_tokens=40, do_sample=True, top_k=50)[0]))
"""

BLOCKS_LOAD_SNIPPET = """import glob
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


def _write_weights(state: dict[str, torch.Tensor], directory: Path, dtype: str, max_shard_size) -> None:
    import torch
    from huggingface_hub import save_torch_state_dict

    state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------------------------
# The export


def _check_out_dir(out_dir: Path, checkpoint_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output '{out_dir}' exists and is not a directory")
    out, source = out_dir.resolve(), checkpoint_dir.resolve()
    if out == source or out in source.parents or source in out.parents:
        raise ConfigError(
            f"output '{out_dir}' contains or lies inside checkpoint '{checkpoint_dir}'; choose a directory elsewhere"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ConfigError(f"output '{out_dir}' already exists and is not empty; pass --overwrite to replace it")


def export_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    slstm_backend: str = "vanilla",
    max_shard_size: int | str = "5GB",
) -> Path:
    """Export the model of checkpoint ``checkpoint_dir`` into ``out_dir`` (see the module docstring).

    ``tokenizer`` replaces the run's tokenizer (e.g. when its relative path does not resolve from
    here); ``slstm_backend`` picks the official sLSTM weight layout of ``xlstm_blocks`` exports.
    Returns ``out_dir``."""
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise ConfigError(f"dtype = {dtype!r}: expected one of {', '.join(DTYPES)}")
    if slstm_backend not in SLSTM_BACKENDS:
        raise ConfigError(f"slstm_backend = {slstm_backend!r}: expected one of {', '.join(SLSTM_BACKENDS)}")
    from xlstm_train.train.checkpoint import load_model_state, read_checkpoint_config

    cfg = read_checkpoint_config(checkpoint_dir)
    _check_out_dir(out_dir, checkpoint_dir, overwrite)
    check_exportable(cfg.model, checkpoint_dir / "config.yaml")
    run_tokenizer = find_tokenizer(cfg, checkpoint_dir, None if tokenizer is None else str(tokenizer))
    state = load_model_state(checkpoint_dir, cfg.model)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():  # left by an export that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        _write_export(tmp, cfg, state, checkpoint_dir, out_dir.name, run_tokenizer,
                      dtype=dtype, slstm_backend=slstm_backend, max_shard_size=max_shard_size)  # fmt: skip
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is removed only once ``new`` is in place."""
    if target.is_dir() and any(target.iterdir()):
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old, target)
            raise
        shutil.rmtree(old)
    else:
        os.replace(new, target)  # rename(2) replaces an empty directory


def _write_export(directory: Path, cfg: Config, state: dict, checkpoint_dir: Path, name: str, tokenizer, *,
                  dtype: str, slstm_backend: str, max_shard_size) -> None:  # fmt: skip
    import torch

    from xlstm_train.config import to_dict
    from xlstm_train.export import convert
    from xlstm_train.models import build_model, count_params
    from xlstm_train.train import checkpoint as ckpt

    model_cfg = cfg.model
    arch = model_cfg.arch
    with torch.device("meta"):
        num_params = count_params(build_model(model_cfg))
    exported = export_tokenizer(tokenizer, directory)
    # A tied head is stored once, under the embedding's name (what transformers and safetensors expect).
    if arch == "xlstm_large":
        weights = convert.to_hf_state_dict(state)
        hf_cfg = convert.hf_config(model_cfg, **exported.token_ids)
        target = "transformers `xLSTMForCausalLM`"
    elif arch == "llama":
        weights = to_hf_llama_state_dict(state, model_cfg)
        hf_cfg = hf_llama_config(model_cfg, **exported.token_ids)
        target = "transformers `LlamaForCausalLM`"
    else:
        weights = convert.to_official_blocks_state_dict(state, backend=slstm_backend)
        hf_cfg = None
        target = f"the official `xlstm` package's `xLSTMLMModel` (sLSTM backend `{slstm_backend}`)"
    if model_cfg.tie_embeddings:
        weights.pop("lm_head.weight")
    _write_weights(weights, directory, dtype, max_shard_size)

    if hf_cfg is not None:
        from transformers import GenerationConfig

        hf_cfg.dtype = dtype
        hf_cfg.save_pretrained(directory)
        GenerationConfig(**{k: v for k, v in exported.token_ids.items() if v is not None}).save_pretrained(directory)
        snippet = HF_TOKENIZER_SNIPPET if exported.auto_tokenizer else HF_LOAD_SNIPPET
        prompt = json.dumps((cfg.train.sample_prompts or ["The"])[0], ensure_ascii=False)  # a Python literal too
        usage = f"```python\n{snippet.format(name=name, prompt=prompt)}```"
    else:
        official = official_blocks_config(model_cfg, cfg.data.seq_len, slstm_backend)
        (directory / "config.yaml").write_text(yaml.safe_dump(official, sort_keys=False))
        usage = (
            "Load it with the `xlstm` package (it needs `dacite` and `pyyaml`); `context_length` is the "
            f"training sequence length ({cfg.data.seq_len}): raise it in `config.yaml` to run longer "
            f"sequences through the parallel mLSTM.\n\n```python\n{BLOCKS_LOAD_SNIPPET.format(name=name)}```"
        )
        if slstm_backend == "vanilla" and model_cfg.slstm_at:
            usage += (
                "\n\nThe sLSTM weights are in the layout of the `vanilla` (PyTorch) backend; the `cuda` backend "
                "stores `_recurrent_kernel_` and `_bias_` differently (`xlstm-train export-hf --slstm-backend cuda`)."
            )
    (directory / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    step = ckpt.read_train_state(checkpoint_dir)["progress"]["step"] if (
        checkpoint_dir / ckpt.TRAIN_STATE_FILE).is_file() else None  # fmt: skip
    trained = f" after {step} steps" if step is not None else ""
    (directory / "README.md").write_text(
        f"# {cfg.name}\n\n"
        f"A language model of architecture `{arch}` with {num_params:,} parameters ({dtype}), trained with "
        f"xlstm-train{trained} and exported from checkpoint `{checkpoint_dir}` for {target}. "
        f"`{TRAINING_CONFIG_FILE}` is the training configuration.\n\n"
        f"## Loading\n\n{usage}\n\n## Tokenizer\n\n{exported.readme}\n"
    )


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory, e.g. runs/tiny/step-0000350")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write (must be absent or empty)")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="dtype of the written weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="the tokenizer to export instead of the run's (SentencePiece .model or tokenizer.json)")
    parser.add_argument("--slstm-backend", choices=SLSTM_BACKENDS, default="vanilla",
                        help="xlstm_blocks: the official sLSTM backend whose weight layout to write")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file before the weights are split into shards (default: 5GB)")


def run(args: argparse.Namespace) -> int:
    out_dir = export_hf(
        args.checkpoint, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, tokenizer=args.tokenizer,
        slstm_backend=args.slstm_backend, max_shard_size=args.max_shard_size,
    )  # fmt: skip
    files = sorted(p.name for p in out_dir.iterdir())
    print(f"exported {args.checkpoint} -> {out_dir}: {', '.join(files)}", flush=True)
    return 0
