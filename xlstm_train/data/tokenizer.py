"""Tokenizers: a SentencePiece ``.model`` or a Hugging Face fast tokenizer (``tokenizer.json``).

Both are wrapped behind one small interface (``encode``, ``encode_batch``, ``decode``, ``vocab_size``,
``eos_id``, ``identity``). ``identity`` names the tokenizer and carries the SHA-256 of its file: it is
written into every shard manifest, and the loader refuses shards whose tokenizer hash differs from the
recipe's, since the same ids would mean different text.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from xlstm_train.data import DataError

# Names under which Hugging Face tokenizers commonly register their end-of-document token.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"{self.path}: not a readable SentencePiece model ({e})") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eos_id = self._sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{self.path}: the SentencePiece model has no EOS piece (train it with eos_id >= 0)")
        self.identity = {"kind": self.kind, "name": self.path.stem, "sha256": file_sha256(self.path),
                         "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # one thread: parallelism comes from worker processes, which keeps the per-worker rate honest
        return self._sp.encode(texts, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(_int_list(ids))


class HuggingFaceTokenizer:
    """A fast tokenizer from ``tokenizer.json`` (a file, or a directory holding one)."""

    kind = "huggingface"

    def __init__(self, path: str | Path, eos_token: str | None = None, name: str | None = None):
        from tokenizers import Tokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        self.path = path / "tokenizer.json" if path.is_dir() else path
        if not self.path.is_file():
            raise DataError(f"{path}: no tokenizer.json found")
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise DataError(f"{self.path}: not a readable Hugging Face tokenizer ({e})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos_token = eos_token or _configured_eos_token(directory)
        candidates = [eos_token] if eos_token else list(_EOS_CANDIDATES)
        ids = [self._tok.token_to_id(c) for c in candidates]
        found = [(c, i) for c, i in zip(candidates, ids) if i is not None]
        if not found:
            raise DataError(f"{self.path}: no end-of-document token among {candidates}; name one with --eos-token")
        self.eos_token, self.eos_id = found[0]
        name = name or (directory.name if path.is_dir() else self.path.stem)
        self.identity = {"kind": self.kind, "name": name, "sha256": file_sha256(self.path),
                         "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # the _fast variant skips character offsets, which tokenizing for training never needs
        return [e.ids for e in self._tok.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_int_list(ids), skip_special_tokens=False)


def _int_list(ids) -> list[int]:
    # tensors and arrays (what a model hands back) as well as plain lists
    return ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]


def _configured_eos_token(directory: Path) -> str | None:
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer


def open_tokenizer(path: str | Path, eos_token: str | None = None) -> Tokenizer:
    """A SentencePiece ``.model`` file, a ``tokenizer.json`` file or a directory holding one, or the id of
    a Hugging Face Hub repository with a ``tokenizer.json`` (e.g. ``EleutherAI/gpt-neox-20b``)."""
    local = Path(path)
    if not local.exists():
        if _HUB_ID.fullmatch(str(path)):
            return HuggingFaceTokenizer(_download_from_hub(str(path)), eos_token, name=str(path))
        raise DataError(f"tokenizer not found: {path} (expected a SentencePiece .model, a tokenizer.json or "
                        "its directory, or a Hugging Face Hub id such as EleutherAI/gpt-neox-20b)")
    if local.is_dir() or local.suffix == ".json":
        return HuggingFaceTokenizer(local, eos_token)
    return SentencePieceTokenizer(local)


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _download_from_hub(repo_id: str) -> Path:
    """The Hub repository's tokenizer files, fetched into (or found in) the Hugging Face cache."""
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "tokenizer.json"))
    except Exception as e:  # offline, no such repository, no tokenizer.json: all end the same way
        raise DataError(f"tokenizer '{repo_id}': not a local path, and the Hugging Face Hub did not provide "
                        f"its tokenizer.json ({type(e).__name__}: {e})") from None
    try:
        hf_hub_download(repo_id, "tokenizer_config.json")  # names the EOS token, when present
    except Exception:
        pass
    return path.parent


def load_tokenizer(data_cfg) -> Tokenizer | None:
    """The recipe's tokenizer; None for synthetic tasks (their vocabularies are fixed by the task).

    Without ``data.tokenizer`` the tokenizer recorded in the first dataset's manifest is used.
    """
    if data_cfg.source == "synthetic":
        return None
    if data_cfg.tokenizer:
        return open_tokenizer(data_cfg.tokenizer)
    from xlstm_train.data.shards import read_manifest

    if not data_cfg.datasets:
        raise DataError("data.datasets is empty: name at least one prepared shard directory")
    manifest = read_manifest(data_cfg.datasets[0].path)
    recorded = manifest["tokenizer"].get("path")
    if not recorded or not Path(recorded).exists():
        raise DataError(f"{data_cfg.datasets[0].path}: the manifest's tokenizer ({recorded}) is not available; "
                        "set data.tokenizer")
    return open_tokenizer(recorded, manifest["tokenizer"].get("eos_token"))


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int) -> Path:
    """Train a byte-fallback unigram SentencePiece model that keeps newlines and spacing as written."""
    import sentencepiece as spm

    model_prefix = Path(model_prefix)
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    # SentencePiece trains on "sentences" of at most a few KB: feed paragraphs, keeping their newlines.
    paragraphs = (p for text in texts for p in text.split("\n\n") if p.strip())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(paragraphs),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type="unigram",
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        max_sentence_length=1 << 16,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    return model_prefix.with_suffix(".model")


def train_byte_level_bpe(texts: Iterable[str], out_path: str | Path, vocab_size: int) -> Path:
    """Train a byte-level BPE ``tokenizer.json`` with an ``<|endoftext|>`` token (GPT-2 style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return out_path


def limit_tokenizer_threads() -> None:
    """Keep Hugging Face tokenizers to one thread per process (workers are the unit of parallelism)."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
