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

import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from xlstm_train.data import DataError
from xlstm_train.data.shards import TokenShard, read_manifest, token_dtype
from xlstm_train.data.tokenizer import open_tokenizer

IGNORE_INDEX = -100
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


def _resolve_streams(specs, seq_len: int, vocab_size: int, tokenizer_sha256: str | None,
                     what: str) -> tuple[list[TokenStream], np.ndarray]:
    """Open every (dataset, subset) stream named by ``specs``; weights split by token share within a spec."""
    streams, weights = [], []
    for n, spec in enumerate(specs):
        root = Path(spec.path)
        manifest = read_manifest(root)
        key = f"data.{what}[{n}]"
        if tokenizer_sha256 is not None and manifest["tokenizer"]["sha256"] != tokenizer_sha256:
            raise DataError(f"{root}: made with tokenizer '{manifest['tokenizer']['name']}' "
                            f"(sha256 {manifest['tokenizer']['sha256'][:12]}...) but data.tokenizer has sha256 "
                            f"{tokenizer_sha256[:12]}...; re-run prepare-data with the recipe's tokenizer")
        if np.dtype(manifest["dtype"]) != token_dtype(manifest["tokenizer"]["vocab_size"]):
            raise DataError(f"{root}: dtype {manifest['dtype']} does not fit its tokenizer's vocabulary")
        if spec.subset is not None and spec.subset not in manifest["subsets"]:
            raise DataError(f"{key}.subset = {spec.subset!r}: {root} has subsets {sorted(manifest['subsets'])}")
        subsets = [spec.subset] if spec.subset is not None else sorted(manifest["subsets"])
        for subset in subsets:
            for shard in manifest["subsets"][subset]["shards"]:
                if shard["max_token_id"] >= vocab_size:
                    raise DataError(f"{root / shard['name']}.bin: holds token id {shard['max_token_id']} "
                                    f">= vocab_size {vocab_size}")
        opened = [TokenStream(root, subset, manifest, seq_len) for subset in subsets]
        total = sum(s.tokens for s in opened)
        if total == 0:
            raise DataError(f"{key}: {root} holds no tokens" + (f" in subset {spec.subset}" if spec.subset else ""))
        for stream in opened:
            if stream.tokens:
                streams.append(stream)
                weights.append(spec.weight * stream.tokens / total)
    return streams, np.asarray(weights, dtype=np.float64)


def _tokenizer_sha256(data_cfg, tokenizer=None) -> str | None:
    """The hash of ``data.tokenizer`` that the shards must have been made with; ``tokenizer``: that
    tokenizer already opened (hashing a large tokenizer file once per run is enough)."""
    if not data_cfg.tokenizer:
        return None
    return (tokenizer or open_tokenizer(data_cfg.tokenizer)).identity["sha256"]


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
    """Infinite iterator of this rank's micro-batches, from global sample ``consumed_samples`` on."""

    def __init__(self, streams, order: SampleOrder, *, seq_len: int, vocab_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int, device, prefetch: int):
        self.streams, self.order, self.seq_len, self.vocab_size = streams, order, seq_len, vocab_size
        self.micro_batch_size, self.dp_rank, self.dp_size = micro_batch_size, dp_rank, dp_size
        self.consumed_samples, self.device, self.prefetch = consumed_samples, torch.device(device), prefetch

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
        if self.prefetch <= 0:
            step = 0
            while True:
                yield _to_device(self.batch_at(step), self.device)
                step += 1
        yield from self._prefetched()

    def _prefetched(self):
        ready: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            step = 0
            try:
                while not stop.is_set():
                    item = self.batch_at(step)
                    step += 1
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            except BaseException as e:  # handed to the consumer, which raises it
                ready.put(e)

        worker = threading.Thread(target=produce, name="xlstm-train-data", daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield _to_device(item, self.device)
        finally:
            stop.set()


class ValidationLoader:
    """The same ``num_batches`` micro-batches of held-out windows at every iteration."""

    def __init__(self, make_batch, num_batches: int, device):
        self._batches = [make_batch(b) for b in range(num_batches)]
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
    streams, weights = _resolve_streams(data_cfg.datasets, data_cfg.seq_len, vocab_size,
                                        _tokenizer_sha256(data_cfg, tokenizer), "datasets")
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


def build_val_loader(data_cfg, *, micro_batch_size: int, vocab_size: int, num_batches: int, dp_rank: int = 0,
                     dp_size: int = 1, device="cpu", tokenizer=None):
    _check_rank(dp_rank, dp_size, micro_batch_size)
    if data_cfg.source == "synthetic":
        from xlstm_train.data.synthetic import build_synthetic_val_loader

        return build_synthetic_val_loader(data_cfg, micro_batch_size=micro_batch_size, vocab_size=vocab_size,
                                          num_batches=num_batches, dp_rank=dp_rank, dp_size=dp_size,
                                          device=device)
    specs = data_cfg.validation or data_cfg.datasets
    if not specs:
        raise DataError("data.datasets is empty: name at least one directory written by prepare-data")
    streams, weights = _resolve_streams(specs, data_cfg.seq_len, vocab_size, _tokenizer_sha256(data_cfg, tokenizer),
                                        "validation" if data_cfg.validation else "datasets")
    needed = num_batches * micro_batch_size * dp_size
    ranges = []
    for stream in streams:
        if data_cfg.validation:
            first, n = 0, stream.num_windows
        else:
            n = _heldout_windows(stream, data_cfg.validation_fraction)
            first = stream.num_windows - n
        ranges.append((first, n))
    order = SampleOrder(ranges, weights, data_cfg.seed)
    stream_ids, _ = order(np.arange(needed, dtype=np.int64))
    for s, stream in enumerate(streams):  # each evaluation sees every window at most once
        used = int((stream_ids == s).sum())
        if used > ranges[s][1]:
            where = ("data.validation" if data_cfg.validation
                     else f"the held-out {data_cfg.validation_fraction:g} of data.datasets")
            raise DataError(f"{stream.name}: validation needs {used} windows of seq_len {data_cfg.seq_len} "
                            f"but {where} holds {ranges[s][1]}; lower the evaluation batches or raise "
                            "data.validation_fraction")
    loader = ShardLoader(streams, order, seq_len=data_cfg.seq_len, vocab_size=vocab_size,
                         micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
                         consumed_samples=0, device="cpu", prefetch=0)
    return ValidationLoader(loader.batch_at, num_batches, device)
