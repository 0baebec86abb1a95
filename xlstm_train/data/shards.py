"""The token shard format.

A prepared dataset is a directory::

    manifest.json                 tokenizer identity, dtype, per-subset shard lists and counts, sources
    <subset>/<unit>.bin           token ids back to back (uint16 when the vocabulary fits, else uint32);
                                  every document ends with the tokenizer's EOS id
    <subset>/<unit>.idx           16-byte header (magic, version, dtype code) + int64 end offset (in
                                  tokens) of every document of the .bin
    progress/unit_<n>.json        what each finished unit of input wrote (for resuming prepare-data)

Reads are numpy memmaps: opening a shard costs nothing and the loader touches only the windows it
serves.

The manifest records each shard file's size and SHA-256 (``bin_bytes``/``sha256`` for the tokens,
``idx_bytes``/``idx_sha256`` for the index). ``verify_shard_files`` checks them before training:
sizes always, hashes too under ``data.verify: full`` (the default).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from xlstm_train.data import DataError

FORMAT_NAME = "xlstm-train-token-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IDX_MAGIC = b"XLSTMIDX"
IDX_HEADER_BYTES = 16
_DTYPE_CODES = {"uint16": 1, "uint32": 2}


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _idx_header(dtype: np.dtype) -> bytes:
    version_and_code = np.array([FORMAT_VERSION, _DTYPE_CODES[dtype.name]], dtype="<u4").tobytes()
    return IDX_MAGIC + version_and_code


class ShardWriter:
    """Writes one shard under temporary names; ``finish`` renames it into place (never half-visible)."""

    def __init__(self, directory: Path, name: str, dtype: np.dtype):
        self.directory, self.name, self.dtype = Path(directory), name, dtype
        self.bin_path = self.directory / f"{name}.bin"
        self.idx_path = self.directory / f"{name}.idx"
        self.directory.mkdir(parents=True, exist_ok=True)
        self._bin = open(self.bin_path.with_suffix(".bin.tmp"), "wb")
        self._doc_ends: list[int] = []
        self._sha256 = hashlib.sha256()
        self.tokens = 0
        self.max_token_id = -1

    def add(self, tokens: np.ndarray, doc_lengths: np.ndarray) -> None:
        """Append documents given as their concatenated tokens and their lengths."""
        data = tokens.astype(self.dtype, copy=False).tobytes()
        self._bin.write(data)
        self._sha256.update(data)
        ends = self.tokens + np.cumsum(doc_lengths, dtype=np.int64)
        self._doc_ends.extend(ends.tolist())
        self.tokens += int(tokens.size)
        if tokens.size:
            self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def finish(self) -> dict:
        self._bin.close()
        idx_bytes = _idx_header(self.dtype) + np.asarray(self._doc_ends, dtype="<i8").tobytes()
        idx_tmp = self.idx_path.with_suffix(".idx.tmp")
        idx_tmp.write_bytes(idx_bytes)
        os.replace(self.bin_path.with_suffix(".bin.tmp"), self.bin_path)
        os.replace(idx_tmp, self.idx_path)
        return {"name": f"{self.directory.name}/{self.name}", "tokens": self.tokens,
                "documents": len(self._doc_ends), "max_token_id": self.max_token_id,
                "bin_bytes": self.tokens * self.dtype.itemsize, "idx_bytes": len(idx_bytes),
                "sha256": self._sha256.hexdigest(), "idx_sha256": hashlib.sha256(idx_bytes).hexdigest()}

    def abandon(self) -> None:
        self._bin.close()
        self.bin_path.with_suffix(".bin.tmp").unlink(missing_ok=True)


def check_size(path: Path, recorded: int, root: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path}: shard file missing (listed in {root / MANIFEST})")
    if path.stat().st_size != recorded:
        raise DataError(f"{path}: {path.stat().st_size} bytes on disk but the manifest records "
                        f"{recorded}: the shard is truncated or was rewritten; re-run prepare-data")


def shard_files_intact(root: Path, shard: dict) -> bool:
    """Whether a shard recorded as finished is still on disk at its recorded sizes."""
    bin_path, idx_path = root / f"{shard['name']}.bin", root / f"{shard['name']}.idx"
    return (bin_path.is_file() and bin_path.stat().st_size == shard["bin_bytes"]
            and idx_path.is_file() and idx_path.stat().st_size == shard["idx_bytes"])


class TokenShard:
    """One shard: ``tokens`` and ``doc_ends`` (int64 end offset of each document), memory-mapped on first use.

    Opening checks only sizes and the index header; the maps come later, so that a loader over
    thousands of shards neither pays for nor holds maps of the shards it has not read yet.
    """

    def __init__(self, root: Path, info: dict, dtype: np.dtype):
        self.name, self.dtype = info["name"], dtype
        self.num_tokens, self.num_documents = info["tokens"], info["documents"]
        self.bin_path, self.idx_path = root / f"{self.name}.bin", root / f"{self.name}.idx"
        check_size(self.bin_path, info["bin_bytes"], root)
        check_size(self.idx_path, info["idx_bytes"], root)
        with open(self.idx_path, "rb") as f:
            header = f.read(IDX_HEADER_BYTES)
        version, code = np.frombuffer(header[8:], dtype="<u4")
        if header[:8] != IDX_MAGIC or version != FORMAT_VERSION or code != _DTYPE_CODES[dtype.name]:
            raise DataError(f"{self.idx_path}: not a version-{FORMAT_VERSION} {dtype.name} shard index")
        self._tokens = self._doc_ends = None

    @property
    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            self._tokens = (np.memmap(self.bin_path, dtype=self.dtype, mode="r") if self.num_tokens
                            else np.zeros(0, self.dtype))
        return self._tokens

    @property
    def doc_ends(self) -> np.ndarray:
        if self._doc_ends is None:
            ends = (np.memmap(self.idx_path, dtype="<i8", mode="r", offset=IDX_HEADER_BYTES)
                    if self.num_documents else np.zeros(0, "<i8"))
            if len(ends) and ends[-1] != self.num_tokens:
                raise DataError(f"{self.idx_path}: its last document ends at token {int(ends[-1])} but "
                                f"{self.bin_path} holds {self.num_tokens}")
            self._doc_ends = ends
        return self._doc_ends


def read_manifest(path: str | Path) -> dict:
    root = Path(path)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        hint = " (prepare-data did not finish there)" if (root / "progress").is_dir() else ""
        raise DataError(f"{manifest_path}: not found; a dataset is a directory written by "
                        f"`xlstm-train prepare-data`{hint}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("version") != FORMAT_VERSION:
        raise DataError(f"{manifest_path}: not a version-{FORMAT_VERSION} {FORMAT_NAME} manifest")
    return manifest


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Verifying shards against their manifest

HASH_BLOCK_BYTES = 16 << 20  # large reads: hashing runs at the speed of the disk or of SHA-256
HASH_THREADS = 8
# files whose hash matched in this process, as (path, size, mtime_ns, sha256): the training and
# validation loaders over the same dataset hash each file once
_verified_files: set[tuple[str, int, int, str]] = set()


def check_manifest_consistency(root: Path, manifest: dict, subsets: list[str]) -> None:
    """The manifest's own numbers agree with each other (a hand-edited or mixed-up manifest is refused)."""
    where = root / MANIFEST
    tokenizer = manifest["tokenizer"]
    dtype = np.dtype(manifest["dtype"])
    if dtype != token_dtype(tokenizer["vocab_size"]):
        raise DataError(f"{where}: dtype {manifest['dtype']} does not fit its tokenizer's vocab_size "
                        f"{tokenizer['vocab_size']} (expected {token_dtype(tokenizer['vocab_size']).name})")
    for subset in subsets:
        entry = manifest["subsets"][subset]
        for shard in entry["shards"]:
            name = root / shard["name"]
            problems = []
            if shard["bin_bytes"] != shard["tokens"] * dtype.itemsize:
                problems.append(f"bin_bytes {shard['bin_bytes']} != tokens {shard['tokens']} x {dtype.itemsize}")
            if shard["idx_bytes"] != IDX_HEADER_BYTES + 8 * shard["documents"]:
                problems.append(f"idx_bytes {shard['idx_bytes']} does not hold {shard['documents']} documents")
            if shard["max_token_id"] >= tokenizer["vocab_size"]:
                problems.append(f"max_token_id {shard['max_token_id']} >= the tokenizer's vocab_size "
                                f"{tokenizer['vocab_size']}")
            if problems:
                raise DataError(f"{name}: the manifest's entry contradicts itself ({'; '.join(problems)}) in "
                                f"{where}; re-run prepare-data")
        for key in ("tokens", "documents"):
            if entry[key] != sum(shard[key] for shard in entry["shards"]):
                raise DataError(f"{where}: subset {subset!r} records {key} = {entry[key]} but its shards hold "
                                f"{sum(shard[key] for shard in entry['shards'])}; re-run prepare-data")


def _sha256_of(path: Path, on_bytes, cancelled: threading.Event) -> str | None:
    digest = hashlib.sha256()
    block = bytearray(HASH_BLOCK_BYTES)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while (n := f.readinto(block)) and not cancelled.is_set():
            digest.update(view[:n])  # reads and large updates release the GIL: threads hash in parallel
            on_bytes(n)
    return None if cancelled.is_set() else digest.hexdigest()


def verify_shard_files(root: Path, shards: list[dict], *, hashes: bool, progress: bool = True) -> None:
    """Check every file of ``shards`` against the manifest: its size, and with ``hashes`` its SHA-256.

    A mismatch raises DataError naming the file and what differs. Files are hashed by a few threads
    at once, with a progress bar (bytes/s, ETA) on stderr once hashing has taken a second. Manifests
    written before the index files were hashed verify their .bin files only.
    """
    from tqdm import tqdm

    todo = []
    for shard in shards:
        for suffix, size_key, sha_key in ((".bin", "bin_bytes", "sha256"), (".idx", "idx_bytes", "idx_sha256")):
            path = root / f"{shard['name']}{suffix}"
            check_size(path, shard[size_key], root)
            if hashes and shard.get(sha_key):
                stat = path.stat()
                key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, shard[sha_key])
                if key not in _verified_files:
                    todo.append((path, key))
    if not todo:
        return
    hashed, lock, cancelled = [0], threading.Lock(), threading.Event()

    def count(n: int) -> None:
        with lock:
            hashed[0] += n

    total = sum(key[1] for _, key in todo)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verifying {root}", delay=1.0, file=sys.stderr,
               disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=min(HASH_THREADS, len(todo), os.cpu_count() or 1),
                              thread_name_prefix="xlstm-train-verify")
    try:
        futures = {pool.submit(_sha256_of, path, count, cancelled): (path, key) for path, key in todo}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.5)
            bar.update(hashed[0] - bar.n)
            for future in finished:
                path, key = futures[future]
                actual = future.result()
                if actual != key[3]:
                    raise DataError(f"{path}: its SHA-256 is {actual[:16]}... but {root / MANIFEST} records "
                                    f"{key[3][:16]}...: the file changed after prepare-data wrote it (damaged on "
                                    "disk or in a copy); restore it or re-run prepare-data")
                _verified_files.add(key)
    finally:
        cancelled.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
