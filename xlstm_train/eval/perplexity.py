"""Loss, perplexity and bits per byte of whole documents.

Every token of a document is scored, the first one from the end-of-document token before it (which
is how the model saw a document start in its packed training windows), the last one being the
document's own EOS. Documents longer than one forward pass are not cut into independent pieces:

- the recurrent models (the xLSTMs) run a long document window by window, carrying their state, so
  every token is predicted from the whole document before it, in memory bounded by the window;
- Llama, which has a fixed context, scores a long document with sliding windows of its context
  length that advance by ``stride``: every token after the first window keeps at least
  ``context - stride`` tokens of context (the usual strided perplexity).

Bits per byte = summed NLL / (ln 2 x UTF-8 bytes of the text), comparable across tokenizers.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from xlstm_train.data import IGNORE_INDEX, DataError



class NonFiniteScoreWarning(RuntimeWarning):
    """An evaluation scored NaN or infinite log-likelihoods; the results report them as they are."""


@dataclass
class Document:
    tokens: list[int]  # the document's tokens, ending with EOS
    num_bytes: int  # UTF-8 bytes of its text


@dataclass
class TextScores:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def add(self, nll: float, doc: Document) -> None:
        self.nll += nll
        self.tokens += len(doc.tokens)
        self.bytes += doc.num_bytes
        self.documents += 1

    def metrics(self) -> dict:
        """Non-finite losses (NaN or inf logits) stay what they are: nan or inf in every metric."""
        loss = self.nll / max(self.tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.nan if math.isnan(loss) else math.exp(loss) if loss < 700 else math.inf,
            "bits_per_byte": self.nll / (math.log(2) * self.bytes) if self.bytes else None,
            "tokens": self.tokens,
            "bytes": self.bytes,
            "documents": self.documents,
        }


# ----------------------------------------------------------------------------------------------
# Reading documents


def shard_documents(root: Path, tokenizer, max_documents: int | None = None) -> Iterable[Document]:
    """The documents of a prepared dataset (every subset), checked against the model's tokenizer."""
    from xlstm_train.data.shards import TokenShard, read_manifest

    manifest = read_manifest(root)
    made_with = manifest["tokenizer"]
    if made_with.get("sha256") != tokenizer.identity["sha256"]:
        raise DataError(
            f"--data {root}: tokenized with '{made_with.get('name')}' (sha256 {str(made_with.get('sha256'))[:12]}...), "
            f"not with the model's tokenizer '{tokenizer.identity['name']}' "
            f"(sha256 {tokenizer.identity['sha256'][:12]}...): its ids would mean other text"
        )
    dtype = np.dtype(manifest["dtype"])
    count = 0
    for subset in sorted(manifest["subsets"]):
        for info in manifest["subsets"][subset]["shards"]:
            if not info["tokens"]:
                continue
            shard = TokenShard(root, info, dtype)
            begin = 0
            for end in shard.doc_ends:
                if max_documents is not None and count >= max_documents:
                    return
                tokens = shard.tokens[begin:int(end)].astype(np.int64).tolist()
                begin = int(end)
                text_ids = tokens[:-1] if tokens and tokens[-1] == tokenizer.eos_id else tokens
                count += 1
                yield Document(tokens, len(tokenizer.decode(text_ids).encode("utf-8")))


def text_documents(paths: list[str], tokenizer, max_documents: int | None = None) -> Iterable[Document]:
    """Raw text: ``.txt`` files (one document each) and ``.jsonl``/``.jsonl.zst`` (a ``text`` field per line)."""
    from xlstm_train.data.sources import FileSource, list_input_files

    count = 0
    for record in FileSource(list_input_files(paths)).records():
        if record.problem:
            raise DataError(record.problem)
        if not record.text:
            continue
        if max_documents is not None and count >= max_documents:
            return
        count += 1
        yield Document(tokenizer.encode(record.text) + [tokenizer.eos_id], len(record.text.encode("utf-8")))


def read_documents(path: str, tokenizer, max_documents: int | None = None) -> list[Document]:
    """A prepared dataset directory (holding manifest.json) or raw text files/directories."""
    from xlstm_train.data.shards import MANIFEST

    if tokenizer is None:
        raise DataError(f"--data {path}: this checkpoint has no tokenizer (a synthetic task); "
                        "it is evaluated on its task instead")
    root = Path(path)
    if (root / MANIFEST).is_file():
        return list(shard_documents(root, tokenizer, max_documents))
    return list(text_documents([path], tokenizer, max_documents))


# ----------------------------------------------------------------------------------------------
# Scoring


class Progress:
    """One updating line on stderr: items done, tokens/s and the time left."""

    def __init__(self, label: str, total_tokens: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total_tokens, enabled and total_tokens > 0
        self.done, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, tokens: int) -> None:
        self.done += tokens
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        print(f"\r{self.label}: {self.done:,}/{self.total:,} tokens, {rate:,.0f} tok/s, ETA {eta:.0f}s",
              end="\n" if self.done >= self.total else "", file=sys.stderr, flush=True)


def _window_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed NLL per row ``(B,)`` of ``targets`` ``(B, S)`` (IGNORE_INDEX skipped) under ``logits``."""
    losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none")
    return losses.view(targets.shape).sum(dim=1)


@torch.no_grad()
def score_token_sequences(model, sequences: list[list[int]], *, context_token: int, max_len: int | None,
                          window: int, stride: int | None = None, batch_tokens: int = 16384, autocast=None,
                          progress: Progress | None = None) -> list[float]:
    """Summed NLL (nats) of every token of each sequence, the first predicted from ``context_token``.

    ``max_len`` None: a recurrent model, run ``window`` tokens at a time with its state carried.
    Otherwise sliding windows of ``min(window, max_len)`` tokens advancing by ``stride`` (default:
    half a window). Sequences are batched longest first, right-padded (padding follows every real
    token, so causality keeps it out of their scores).
    """
    import contextlib

    autocast = autocast or contextlib.nullcontext
    device = next(model.parameters()).device
    if max_len is not None:
        window = min(window, max_len)
        stride = stride or max(window // 2, 1)
        if not 0 < stride <= window:
            raise ValueError(f"stride {stride} must be in [1, window = {window}]")
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = [0.0] * len(sequences)
    position = 0
    while position < len(order):
        longest = max(len(sequences[order[position]]), 1)
        rows = max(1, batch_tokens // min(longest, window))
        batch = order[position:position + rows]
        position += len(batch)
        inputs = torch.zeros(len(batch), longest, dtype=torch.long)
        targets = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
        for row, index in enumerate(batch):
            seq = sequences[index]
            if seq:
                inputs[row, :len(seq)] = torch.tensor([context_token] + seq[:-1])
                targets[row, :len(seq)] = torch.tensor(seq)
        inputs, targets = inputs.to(device), targets.to(device)
        with autocast():
            nll = (_recurrent_nll(model, inputs, targets, window) if max_len is None
                   else _sliding_nll(model, inputs, targets, window, stride))
        for row, index in enumerate(batch):
            scores[index] = float(nll[row])
        if progress is not None:
            progress.update(sum(len(sequences[i]) for i in batch))
    return scores


def _recurrent_nll(model, inputs, targets, window):
    total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
    state = None
    for start in range(0, inputs.shape[1], window):
        logits, state = model(inputs[:, start:start + window], state=state, return_state=True)
        total += _window_nll(logits, targets[:, start:start + window]).double()
    return total


def _sliding_nll(model, inputs, targets, window, stride):
    total = torch.zeros(inputs.shape[0], dtype=torch.float64, device=inputs.device)
    length, scored_until = inputs.shape[1], 0
    for begin in range(0, length, stride):
        end = min(begin + window, length)
        window_targets = targets[:, begin:end].clone()
        window_targets[:, : scored_until - begin] = IGNORE_INDEX  # scored by an earlier window
        total += _window_nll(model(inputs[:, begin:end]), window_targets).double()
        scored_until = end
        if end == length:
            break
    return total


def evaluate_documents(loaded, documents: list[Document], *, window: int | None = None, stride: int | None = None,
                       batch_tokens: int = 16384, label: str = "eval", show_progress: bool = True) -> dict:
    """Loss, perplexity and bits per byte of ``documents`` under ``loaded`` (a ``LoadedModel``)."""
    if not documents:
        raise DataError(f"{label}: no documents to evaluate")
    window = window or loaded.cfg.data.seq_len
    progress = Progress(label, sum(len(d.tokens) for d in documents), show_progress)
    nll = score_token_sequences(
        loaded.model, [d.tokens for d in documents], context_token=loaded.tokenizer.eos_id, max_len=loaded.max_len,
        window=window, stride=stride, batch_tokens=batch_tokens, autocast=loaded.autocast, progress=progress,
    )
    scores = TextScores()
    for value, doc in zip(nll, documents):
        scores.add(value, doc)
    warn_if_not_finite(label, nll)
    return scores.metrics()


def warn_if_not_finite(label: str, scores: list[float], unit: str = "documents") -> None:
    """A warning, not an error, when some of ``scores`` (log-likelihoods) are NaN or infinite: the
    results then say nan or inf, and the warning says why."""
    bad = sum(not math.isfinite(value) for value in scores)
    if bad:
        warnings.warn(
            f"{label}: {bad} of {len(scores)} {unit} scored a NaN or infinite log-likelihood (reported as it is): "
            "the model's logits are not finite; its weights have diverged or were damaged",
            NonFiniteScoreWarning, stacklevel=3,
        )
