"""``xlstm-train export-hf CHECKPOINT OUT_DIR``: a training checkpoint as a directory others can load.

What is written is up to the export adapter of the checkpoint's architecture (``ArchSpec.export``,
``xlstm_train.export.adapter``); for the built-in ones:

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

Exports are exact or refused. A setting the target class cannot represent (e.g. a sigmoid input
gate) is named before any weights are read (ConfigError, exit 2). A tied head is stored once only
where the target ties it on loading (transformers' Llama, the official ``xLSTMLMModel``); transformers'
xLSTM keeps its head a parameter of its own whatever its config says, so there ``lm_head.weight`` is
written out. The reverse direction reads such directories back into our configs and weights
(``archs.xlstm_large.load_hf_checkpoint``, ``archs.llama.load_hf_checkpoint``,
``archs.xlstm_blocks.load_official_checkpoint``) as the model the target library runs: a config
that says tied but stores a different head is imported untied.

Only the model weights are read from the checkpoint (``train.checkpoint.load_model_state``, which
reads every checkpoint format), into a single-process model built from the checkpoint's own
``config.yaml``; checkpoints of sharded (FSDP/TP) runs export the same way. Everything is written into ``OUT_DIR.tmp`` and renamed when complete: a failed
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
from xlstm_train.export.adapter import SLSTM_BACKENDS, ExportOptions

if TYPE_CHECKING:
    from xlstm_train.train.config import Config

# torch, the models and the checkpoint code are imported where they are used, so that building the
# command line parser stays fast; hence also the names below rather than torch dtypes.
DTYPES = ("float32", "bfloat16")
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
    adapter = exporter(cfg.model, checkpoint_dir / "config.yaml")
    run_tokenizer = find_tokenizer(cfg, checkpoint_dir, None if tokenizer is None else str(tokenizer))
    state = load_model_state(checkpoint_dir, cfg.model)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():  # left by an export that was killed
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        options = ExportOptions(dtype=dtype, max_shard_size=max_shard_size, slstm_backend=slstm_backend)
        _write_export(tmp, cfg, state, checkpoint_dir, out_dir.name, run_tokenizer, adapter, options)
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


def exporter(model_cfg, config_path: Path):
    """The export adapter of the model's architecture, once it has accepted the model's settings
    (checked before any weights are read)."""
    from xlstm_train.archs import get_spec

    adapter = get_spec(model_cfg.arch).export
    if adapter is None:
        raise ConfigError(f"{config_path}: model.arch = {model_cfg.arch!r} has no export adapter")
    try:
        adapter.check(model_cfg)
    except ValueError as e:
        raise ConfigError(f"{config_path}: {e}") from None
    return adapter


def _write_export(directory: Path, cfg: Config, state: dict, checkpoint_dir: Path, name: str, tokenizer,
                  adapter, options: ExportOptions) -> None:  # fmt: skip
    import torch

    from xlstm_train.config import to_dict
    from xlstm_train.models import build_model, count_params
    from xlstm_train.train import checkpoint as ckpt

    with torch.device("meta"):
        num_params = count_params(build_model(cfg.model))
    exported_tokenizer = export_tokenizer(tokenizer, directory)
    exported = adapter.write(directory, cfg, state, exported_tokenizer, name, options)
    (directory / TRAINING_CONFIG_FILE).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    step = ckpt.read_train_state(checkpoint_dir)["progress"]["step"] if (
        checkpoint_dir / ckpt.TRAIN_STATE_FILE).is_file() else None  # fmt: skip
    trained = f" after {step} steps" if step is not None else ""
    (directory / "README.md").write_text(
        f"# {cfg.name}\n\n"
        f"A language model of architecture `{cfg.model.arch}` with {num_params:,} parameters ({options.dtype}), "
        f"trained with xlstm-train{trained} and exported from checkpoint `{checkpoint_dir}` for {exported.target}. "
        f"`{TRAINING_CONFIG_FILE}` is the training configuration.\n\n"
        f"## Loading\n\n{exported.usage}\n\n## Tokenizer\n\n{exported_tokenizer.readme}\n"
    )


# ----------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory of either engine (FSDP or DeepSpeed), e.g. runs/tiny/step-0000350")
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
