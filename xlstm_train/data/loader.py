"""The training and validation loaders over prepared token shards.

Every prepared subset is one *stream*: its shards' tokens back to back. A stream of T tokens holds
(T - 1) // seq_len windows; window w is tokens [w * seq_len, (w + 1) * seq_len + 1), so documents are
packed across window edges and no token is dropped. ``doc_ids`` numbers the documents inside a window
and a label whose token starts a new document is ignored (-100): the model is never asked to guess
across a document boundary, and its recurrent state resets there.

The global order of samples is a pure function of (seed, manifests, seq_len, weights):

* a blend table assigns global sample k to a stream in proportion to the weights (each stream's j-th
  sample sits at "time" (j + 1/2) / weight; merging the times interleaves them evenly);
* the j-th sample of a stream is window ``perm_e(j mod N)`` of epoch e = j // N, where ``perm_e`` is a
  seeded permutation of [0, N). It is a Feistel bijection, so it needs no memory and any sample can be
  found without building the ones before it.

Sample k goes to data-parallel rank k % dp_size. Resuming with ``consumed_samples`` (a global count)
continues the same global order whatever the number of ranks, and each rank computes only its own
samples.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xlstm_train.data import IGNORE_INDEX, DataError, relative_path_note
from xlstm_train.data.shards import (
    MANIFEST, TokenShard, check_manifest_consistency, read_manifest, verify_shard_files,
)
from xlstm_train.data.tokenizer import open_tokenizer

BLEND_PERIOD = 1 << 16  # the blend table repeats every this many samples
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# ----------------------------------------------------------------------------------------------
# Seeded permutations without memory: a Feistel network over [0, 4^h) with cycle walking


class FeistelPermutation:
    """A pseudo-random bijection of [0, n) determined by ``key`` (a tuple of ints)."""

    rounds = 6

    def __init__(self, n: int, key: tuple[int, ...]):
        if n < 1:
            raise ValueError("a permutation needs n >= 1")
        self.n = n
        self.half_bits = max(1, (int(n - 1).bit_length() + 1) // 2)
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        self.round_keys = np.random.SeedSequence(list(key)).generate_state(self.rounds, dtype=np.uint64)

    def _round(self, x: np.ndarray, k: np.uint64) -> np.ndarray:
        # splitmix64-style finalizer: every output bit depends on every input bit
        z = (x + k) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & self.half_mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half_bits), x & self.half_mask
        for k in self.round_keys:
            left, right = right, left ^ self._round(right, k)
        return (left << np.uint64(self.half_bits)) | right

    def __call__(self, index) -> np.ndarray:
        x = np.asarray(index, dtype=np.uint64)
        with np.errstate(over="ignore"):
            x = self._encrypt(x)
            # cycle walking: outside [0, n) encrypt again; the domain is < 4n so this ends quickly
            while (out := x >= self.n).any():
                x[out] = self._encrypt(x[out])
        return x.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Streams of windows over shards


class TokenStream:
    """One prepared subset as a concatenation of its shards, cut into windows of seq_len + 1 tokens."""

    def __init__(self, root: Path, subset: str, manifest: dict, seq_len: int):
        self.root, self.subset, self.seq_len = root, subset, seq_len
        self.name = f"{root}[{subset}]"
        dtype = np.dtype(manifest["dtype"])
        info = manifest["subsets"][subset]
        self.shards = [TokenShard(root, shard, dtype) for shard in info["shards"] if shard["tokens"]]
        self.shard_starts = np.cumsum([0] + [s.num_tokens for s in self.shards])
        self.tokens = int(self.shard_starts[-1])
        self.num_windows = max(0, (self.tokens - 1) // seq_len)

    def shard_files(self, w: int) -> str:
        """The .bin file(s) window w reads from."""
        first, last = np.searchsorted(self.shard_starts, [w * self.seq_len, (w + 1) * self.seq_len], side="right")
        return ", ".join(str(self.root / f"{self.shards[i].name}.bin") for i in range(first - 1, last))

    def window(self, w: int, tokens_out: np.ndarray, doc_starts_out: np.ndarray) -> None:
        """Write window w's seq_len + 1 tokens, and 1 where a document starts (after position 0)."""
        begin, length = w * self.seq_len, self.seq_len + 1
        doc_starts_out[:] = 0
        s = int(np.searchsorted(self.shard_starts, begin, side="right")) - 1
        filled = 0
        while filled < length:
            shard = self.shards[s]
            local = begin + filled - int(self.shard_starts[s])
            take = min(length - filled, shard.num_tokens - local)
            tokens_out[filled:filled + take] = shard.tokens[local:local + take]
            ends = shard.doc_ends
            first, last = np.searchsorted(ends, [local, local + take - 1], side="right")
            doc_starts_out[filled + ends[first:last] - local] = 1  # the token after a document's end
            filled += take
            if filled < length:  # the next shard starts a new document
                s += 1
                doc_starts_out[filled] = 1
        doc_starts_out[0] = 0


def check_dataset_paths(data_cfg) -> None:
    """Every dataset directory named by the recipe exists; a missing one is named with its key, and a
    relative one with the working directory it was looked for in."""
    if data_cfg.source != "shards":
        return
    for section in ("datasets", "validation"):
        for n, spec in enumerate(getattr(data_cfg, section)):
            if not Path(spec.path).is_dir():
                raise DataError(f"data.{section}[{n}].path = '{spec.path}': no such directory"
                                f"{relative_path_note(spec.path)}; expected a directory written by "
                                "`xlstm-train prepare-data` (holding manifest.json)")


def _hashes_shards_here() -> bool:
    """Whether this process hashes shard files under ``data.verify: full``.

    The first process of each node does (LOCAL_RANK 0, or a process outside any launcher). That
    covers a corpus on a shared file system and node-local copies alike, and a refusal appears on the
    console, which shows local rank 0. The node's other processes check sizes only; when the first
    one refuses the data, the launcher stops them.
    """
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _reference_tokenizer(data_cfg, tokenizer=None) -> tuple[dict, str]:
    """The tokenizer identity every dataset must have been made with, and what it is (for messages):
    ``data.tokenizer`` (``tokenizer``: that one already opened) when set, else the tokenizer recorded
    by the first training dataset."""
    if data_cfg.tokenizer:
        identity = (tokenizer or open_tokenizer(data_cfg.tokenizer)).identity
        return identity, f"data.tokenizer '{data_cfg.tokenizer}'"
    first = Path(data_cfg.datasets[0].path)
    return read_manifest(first)["tokenizer"], f"the tokenizer of data.datasets[0] ({first})"


def _check_tokenizer(root: Path, manifest: dict, reference: dict, described: str) -> None:
    recorded = manifest["tokenizer"]
    if recorded["sha256"] != reference["sha256"]:
        raise DataError(f"{root}: made with tokenizer '{recorded['name']}' (sha256 {recorded['sha256'][:12]}...) "
                        f"but {described} has sha256 {reference['sha256'][:12]}...; re-run prepare-data with "
                        "the recipe's tokenizer")
    differing = [f"{key} {recorded.get(key)!r} where the tokenizer has {reference[key]!r}"
                 for key in ("vocab_size", "eos_id") if recorded.get(key) != reference[key]]
    if differing:
        raise DataError(f"{root / MANIFEST}: records {', '.join(differing)} for the same tokenizer file "
                        f"(sha256 {reference['sha256'][:12]}...); the manifest was edited or belongs to other "
                        "shards; re-run prepare-data")


def _resolve_streams(specs, data_cfg, vocab_size: int, what: str, tokenizer=None
                     ) -> tuple[list[TokenStream], np.ndarray]:
    """Open every (dataset, subset) stream named by ``specs``; weights split by token share within a spec.

    Each dataset's manifest is checked against the recipe (tokenizer, vocabulary) and against itself,
    and its shard files against the manifest (``data.verify``), before any window is read.
    """
    check_dataset_paths(data_cfg)
    reference, described = _reference_tokenizer(data_cfg, tokenizer)
    hashes = data_cfg.verify == "full" and _hashes_shards_here()
    streams, weights = [], []
    for n, spec in enumerate(specs):
        root = Path(spec.path)
        manifest = read_manifest(root)
        key = f"data.{what}[{n}]"
        _check_tokenizer(root, manifest, reference, described)
        if spec.subset is not None and spec.subset not in manifest["subsets"]:
            raise DataError(f"{key}.subset = {spec.subset!r}: {root} has subsets {sorted(manifest['subsets'])}")
        subsets = [spec.subset] if spec.subset is not None else sorted(manifest["subsets"])
        check_manifest_consistency(root, manifest, subsets)
        shards = [shard for subset in subsets for shard in manifest["subsets"][subset]["shards"]]
        for shard in shards:
            if shard["max_token_id"] >= vocab_size:
                raise DataError(f"{root / shard['name']}.bin: holds token id {shard['max_token_id']} "
                                f">= vocab_size {vocab_size}")
        verify_shard_files(root, shards, hashes=hashes)
        opened = [TokenStream(root, subset, manifest, data_cfg.seq_len) for subset in subsets]
        total = sum(s.tokens for s in opened)
        if total == 0:
            raise DataError(f"{key}: {root} holds no tokens" + (f" in subset {spec.subset}" if spec.subset else ""))
        for stream in opened:
            if stream.tokens:
                streams.append(stream)
                weights.append(spec.weight * stream.tokens / total)
    return streams, np.asarray(weights, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Blending and the global sample order


def blend_table(weights: np.ndarray, period: int = BLEND_PERIOD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stream of each of ``period`` consecutive samples, its rank within that stream, and per-stream counts."""
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    times, owners, ranks = [], [], []
    for d, w in enumerate(weights):
        j = np.arange(int(np.ceil(period * w)) + 1)
        times.append((j + 0.5) / w)
        owners.append(np.full(len(j), d))
        ranks.append(j)
    times, owners, ranks = map(np.concatenate, (times, owners, ranks))
    order = np.lexsort((owners, times))[:period]  # by time, ties by stream index
    stream_of, rank_in_stream = owners[order], ranks[order]
    counts = np.bincount(stream_of, minlength=len(weights))
    return stream_of, rank_in_stream, counts


@dataclass
class SampleOrder:
    """Global sample index -> (stream, window), a pure function of the seed and the streams."""

    windows_per_stream: list[tuple[int, int]]  # (first window, number of windows) of each stream
    weights: np.ndarray
    seed: int
    shuffle: bool = True

    def __post_init__(self):
        self.stream_of, self.rank_in_stream, self.counts = blend_table(self.weights)
        if (self.counts == 0).any():
            raise DataError(f"a dataset weight is below 1/{BLEND_PERIOD} of the total: "
                            f"weights {self.weights.tolist()}")
        self._perms: dict[tuple[int, int], FeistelPermutation] = {}

    def _perm(self, stream: int, epoch: int) -> FeistelPermutation:
        key = (stream, epoch)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            self._perms[key] = FeistelPermutation(self.windows_per_stream[stream][1], (self.seed, stream, epoch))
        return self._perms[key]

    def __call__(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        period, r = np.divmod(samples, BLEND_PERIOD)
        streams = self.stream_of[r]
        j = period * self.counts[streams] + self.rank_in_stream[r]  # index within the stream's own order
        windows = np.empty_like(samples)
        for s in np.unique(streams):
            first, n = self.windows_per_stream[s]
            mine = streams == s
            epoch, pos = np.divmod(j[mine], n)
            if not self.shuffle:
                windows[mine] = first + pos
                continue
            for e in np.unique(epoch):
                sel = epoch == e
                out = np.flatnonzero(mine)[sel]
                windows[out] = first + self._perm(int(s), int(e))(pos[sel])
        return streams, windows


# ----------------------------------------------------------------------------------------------
# Batches


def _assemble(streams: list[TokenStream], stream_ids, window_ids, seq_len: int, vocab_size: int) -> dict:
    batch = len(window_ids)
    tokens = np.empty((batch, seq_len + 1), dtype=np.int64)
    starts = np.empty((batch, seq_len + 1), dtype=np.int32)
    for row, (s, w) in enumerate(zip(stream_ids.tolist(), window_ids.tolist())):
        streams[s].window(w, tokens[row], starts[row])
        if tokens[row].max() >= vocab_size:  # a damaged shard must never become a silent wrong batch
            raise DataError(f"{streams[s].shard_files(w)}: window {w} of {streams[s].name} holds token id "
                            f"{int(tokens[row].max())} >= vocab_size {vocab_size}; the shard is damaged or "
                            "was made with another tokenizer")
    doc_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    labels = tokens[:, 1:].copy()
    labels[starts[:, 1:] == 1] = IGNORE_INDEX
    return {"input_ids": torch.from_numpy(tokens[:, :-1]), "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(doc_ids[:, :-1]))}


def _to_device(batch: dict, device: torch.device) -> dict:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class ShardLoader:
    """Infinite iterator of this rank's micro-batches, from global sample ``consumed_samples`` on.

    With ``prefetch`` > 0 a background thread assembles the next batches. ``close()`` (or leaving a
    ``with`` block) stops and joins it; loaders still open at interpreter exit are closed then.
    """

    def __init__(self, streams, order: SampleOrder, *, seq_len: int, vocab_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int, device, prefetch: int):
        self.streams, self.order, self.seq_len, self.vocab_size = streams, order, seq_len, vocab_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed_samples, self.device, self.prefetch = consumed_samples, torch.device(device), prefetch
        self._producers: list[tuple[threading.Thread, threading.Event]] = []

    def batch_at(self, step: int) -> dict:
        """The ``step``-th micro-batch of this rank after ``consumed_samples`` (CPU tensors)."""
        base = self.consumed_samples + step * self.micro_batch_size * self.dp_size + self.dp_rank
        samples = base + self.dp_size * np.arange(self.micro_batch_size, dtype=np.int64)
        stream_ids, window_ids = self.order(samples)
        batch = _assemble(self.streams, stream_ids, window_ids, self.seq_len, self.vocab_size)
        if self.device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        return batch

    def __iter__(self):
        return self._prefetched() if self.prefetch > 0 else self._direct()

    def _direct(self):
        step = 0
        while True:
            yield _to_device(self.batch_at(step), self.device)
            step += 1

    def _prefetched(self):
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        worker = threading.Thread(target=_produce, args=(self.batch_at, ready, stop), name="xlstm-train-data",
                                  daemon=True)
        self._producers.append((worker, stop))
        _open_loaders.add(self)
        worker.start()
        try:
            while not stop.is_set():  # set by close()
                try:
                    item = ready.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
                if isinstance(item, BaseException):
                    raise item
                yield _to_device(item, self.device)
        finally:
            stop.set()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the prefetch threads and wait for them (each finishes the batch it is assembling).

        Idempotent. An iterator of a closed loader ends. A training process must call this before it
        exits: a daemon thread still running native code while the interpreter shuts down can abort
        the process (``terminate called without an active exception``).
        """
        producers, self._producers = self._producers, []
        for _, stop in producers:
            stop.set()
        for worker, _ in producers:
            worker.join(timeout_s)
        _open_loaders.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


_POLL_S = 0.1  # how often a blocked prefetch thread or consumer looks whether the loader was closed
# Loaders that may have a prefetch thread running; closed at interpreter exit, before daemon threads
# are frozen (atexit handlers run while every thread is still alive).
_open_loaders: weakref.WeakSet[ShardLoader] = weakref.WeakSet()


@atexit.register
def _close_open_loaders() -> None:
    for loader in list(_open_loaders):
        loader.close()


def _put_unless_stopped(ready: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            ready.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def _produce(make_batch, ready: queue.Queue, stop: threading.Event) -> None:
    """The prefetch thread: batches 0, 1, ... into ``ready`` until ``stop``; an error is passed on
    to the consumer, which raises it."""
    step = 0
    try:
        while not stop.is_set():
            _put_unless_stopped(ready, make_batch(step), stop)
            step += 1
    except BaseException as e:
        _put_unless_stopped(ready, e, stop)


class ValidationLoader:
    """The same micro-batches of held-out windows at every iteration (none: evaluation is off)."""

    def __init__(self, batches: list[dict], device):
        self._batches = batches
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        for batch in self._batches:
            yield _to_device(batch, self.device)


# ----------------------------------------------------------------------------------------------
# Public builders


def _check_rank(dp_rank: int, dp_size: int, micro_batch_size: int) -> None:
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size})")
    if micro_batch_size < 1:
        raise DataError(f"micro_batch_size must be >= 1, got {micro_batch_size}")


def _heldout_windows(stream: TokenStream, fraction: float) -> int:
    return int(np.ceil(stream.num_windows * fraction)) if fraction > 0 else 0


def build_train_loader(data_cfg, *, micro_batch_size: int, vocab_size: int, dp_rank: int = 0, dp_size: int = 1,
                       consumed_samples: int = 0, device="cpu", tokenizer=None):
    _check_rank(dp_rank, dp_size, micro_batch_size)
    if data_cfg.source == "synthetic":
        from xlstm_train.data.synthetic import build_synthetic_loader

        return build_synthetic_loader(data_cfg, micro_batch_size=micro_batch_size, vocab_size=vocab_size,
                                      dp_rank=dp_rank, dp_size=dp_size, consumed_samples=consumed_samples,
                                      device=device)
    if not data_cfg.datasets:
        raise DataError("data.datasets is empty: name at least one directory written by prepare-data")
    streams, weights = _resolve_streams(data_cfg.datasets, data_cfg, vocab_size, "datasets", tokenizer)
    held_out = 0.0 if data_cfg.validation else data_cfg.validation_fraction
    ranges = []
    for stream in streams:
        # one window between the training and held-out ranges keeps their tokens apart
        gap = 1 if _heldout_windows(stream, held_out) else 0
        n = stream.num_windows - _heldout_windows(stream, held_out) - gap
        if n < 1:
            raise DataError(f"{stream.name}: {stream.tokens} tokens leave no training window of "
                            f"seq_len {data_cfg.seq_len} (+ held-out fraction {held_out})")
        ranges.append((0, n))
    order = SampleOrder(ranges, weights, data_cfg.seed)
    return ShardLoader(streams, order, seq_len=data_cfg.seq_len, vocab_size=vocab_size,
                       micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                       consumed_samples=consumed_samples, device=device, prefetch=data_cfg.prefetch)


def validation_size(available: int, num_batches: int, micro_batch_size: int, dp_size: int) -> tuple[int, int]:
    """(batches, rows per rank) of a validation set that asks for ``num_batches`` micro-batches but
    has only ``available`` windows: fewer batches first, then fewer rows in one batch. Every rank
    gets the same number of batches and rows, as the model's collectives need."""
    per_batch = micro_batch_size * dp_size
    if available >= num_batches * per_batch:
        return num_batches, micro_batch_size
    if available >= per_batch:
        return available // per_batch, micro_batch_size
    return (1, available // dp_size) if available >= dp_size else (0, 0)


def build_val_loader(data_cfg, *, micro_batch_size: int, vocab_size: int, num_batches: int, dp_rank: int = 0,
                     dp_size: int = 1, device="cpu", tokenizer=None):
    """The validation set: ``num_batches`` micro-batches per rank, or as many as the held-out windows
    (or ``data.validation``) hold, with a note on the console when that is fewer. ``num_batches`` 0
    gives an empty loader (no evaluation) without reading any data."""
    _check_rank(dp_rank, dp_size, micro_batch_size)
    if num_batches == 0:
        return ValidationLoader([], device)
    if data_cfg.source == "synthetic":
        from xlstm_train.data.synthetic import build_synthetic_val_loader

        return build_synthetic_val_loader(data_cfg, micro_batch_size=micro_batch_size, vocab_size=vocab_size,
                                          num_batches=num_batches, dp_rank=dp_rank, dp_size=dp_size,
                                          device=device)
    specs = data_cfg.validation or data_cfg.datasets
    if not specs:
        raise DataError("data.datasets is empty: name at least one directory written by prepare-data")
    if not data_cfg.validation and data_cfg.validation_fraction == 0:
        raise DataError("data.validation_fraction = 0 and no data.validation: nothing is held out to evaluate "
                        "on; set data.validation_fraction > 0 or name a validation dataset in data.validation")
    streams, weights = _resolve_streams(specs, data_cfg, vocab_size,
                                        "validation" if data_cfg.validation else "datasets", tokenizer)
    ranges = []
    for stream in streams:
        if data_cfg.validation:
            first, n = 0, stream.num_windows
        else:
            n = _heldout_windows(stream, data_cfg.validation_fraction)
            first = stream.num_windows - n
        ranges.append((first, n))
    # streams too short for one window take no part (only possible in an explicit validation set)
    keep = [s for s, (_, n) in enumerate(ranges) if n > 0]
    streams, ranges, weights = [streams[s] for s in keep], [ranges[s] for s in keep], weights[keep]
    where = ("data.validation" if data_cfg.validation
             else f"the held-out {data_cfg.validation_fraction:g} of data.datasets")
    if not streams:
        raise DataError(f"{where} holds no window of seq_len {data_cfg.seq_len}")
    order = SampleOrder(ranges, weights, data_cfg.seed)

    # Each evaluation sees every window at most once: the validation set is the longest prefix of the
    # order in which no stream is asked for more windows than it holds.
    wanted = num_batches * micro_batch_size * dp_size
    stream_ids, _ = order(np.arange(wanted, dtype=np.int64))
    available = wanted
    for s, (_, n) in enumerate(ranges):
        used_at = np.flatnonzero(stream_ids == s)
        if len(used_at) > n:
            available = min(available, int(used_at[n]))
    batches, rows = validation_size(available, num_batches, micro_batch_size, dp_size)
    if batches == 0:
        raise DataError(f"{where} holds {available} windows of seq_len {data_cfg.seq_len}, fewer than the "
                        f"{dp_size} data-parallel ranks; raise data.validation_fraction or lower data.seq_len")
    if (batches, rows) != (num_batches, micro_batch_size) and dp_rank == 0:
        print(f"validation: {where} holds {available} windows of seq_len {data_cfg.seq_len} in the blend, so "
              f"each evaluation uses {batches} batch(es) of {rows} x {dp_size} rows instead of the "
              f"{num_batches} of {micro_batch_size} x {dp_size} asked for", flush=True)
    loader = ShardLoader(streams, order, seq_len=data_cfg.seq_len, vocab_size=vocab_size,
                         micro_batch_size=rows, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=0, device="cpu", prefetch=0)
    return ValidationLoader([loader.batch_at(b) for b in range(batches)], device)
