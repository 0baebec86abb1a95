"""Raw-text sources, read as one deterministic stream of documents.

A source is a sorted list of local files (``.txt``: one document per file; ``.jsonl`` and
``.jsonl.zst``: one JSON object per line) or a Hugging Face ``datasets`` dataset. Every record carries
the stream position just after it, ``(file_index, record_index)``, so that ``prepare-data`` can resume
from the end of its last finished unit without re-tokenizing anything before it.

A record that cannot be used (not JSON, no text field, truncated file, ...) is yielded with a
``problem`` string naming the file and line; the caller either raises it or skips and counts it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


from xlstm_train.data import DataError
from xlstm_train.data.tokenizer import file_sha256

SLIMPAJAMA_SUBSETS = (
    "RedPajamaCommonCrawl", "RedPajamaC4", "RedPajamaGithub", "RedPajamaBook",
    "RedPajamaArXiv", "RedPajamaWikipedia", "RedPajamaStackExchange",
)
DEFAULT_SUBSET = "default"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.zst")
_READ_BYTES = 1 << 20


@dataclass
class Record:
    text: str | None  # None when `problem` is set
    subset: str
    position: tuple[int, int]  # stream position just after this record
    problem: str | None = None  # "file:line: what is wrong"
    problem_kind: str | None = None  # short key for the skip counters
    consumed_bytes: int = 0  # compressed input bytes read since the previous record (progress)


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def list_input_files(paths: list[str]) -> list[Path]:
    """Files named directly, plus every .txt/.jsonl/.jsonl.zst under named directories, in natural order."""
    files: list[Path] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)]
            if not found:
                raise DataError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this directory")
            files.extend(sorted(found, key=_natural_key))
        elif path.is_file():
            if not path.name.endswith(TEXT_SUFFIXES):
                raise DataError(f"{path}: unsupported input file; expected one of {', '.join(TEXT_SUFFIXES)}")
            files.append(path)
        else:
            raise DataError(f"input not found: {path}")
    return files


def slimpajama_files(root: str, split: str) -> list[Path]:
    """SlimPajama's published layout: ``<root>/<split>/chunk<N>/example_<split>_<M>.jsonl.zst``."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(f"{split_dir}: no such directory (SlimPajama layout is <root>/train|validation|test/chunk*/)")
    files = sorted(split_dir.glob("chunk*/*.jsonl.zst"), key=_natural_key)
    if not files:
        raise DataError(f"{split_dir}: no chunk*/*.jsonl.zst files")
    return files


class _HashingReader:
    """Reads a file in blocks while hashing every byte, so input checksums cost no second pass."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self) -> bytes:
        block = self._file.read(_READ_BYTES)
        self.sha256.update(block)
        self.bytes_read += len(block)
        return block

    def close(self) -> None:
        self._file.close()


class _CorruptInput(Exception):
    pass


def _raw_lines(path: Path, reader: _HashingReader) -> Iterator[tuple[bytes, int]]:
    """Complete lines of a .jsonl/.jsonl.zst file with the compressed bytes consumed so far."""
    if path.name.endswith(".zst"):
        blocks = _zstd_blocks(reader)
    else:
        blocks = iter(reader.read, b"")
    pending = b""
    for block in blocks:
        pending += block
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line, reader.bytes_read
    if pending:
        yield pending, reader.bytes_read


def _zstd_blocks(reader: _HashingReader) -> Iterator[bytes]:
    """Decompressed bytes of a (multi-frame) zstd file; raises on corrupt data or a stream that ends mid-frame."""
    import zstandard  # only .zst inputs need it

    decompressor = zstandard.ZstdDecompressor()
    frame = decompressor.decompressobj()
    fed = False
    while block := reader.read():
        while block:
            fed = True
            try:
                out = frame.decompress(block)
            except zstandard.ZstdError as e:
                raise _CorruptInput(f"corrupt zstd data ({e})") from None
            if out:
                yield out
            if frame.eof:
                block, frame, fed = frame.unused_data, decompressor.decompressobj(), False
            else:
                block = b""
    if fed and not frame.eof:
        raise _CorruptInput("truncated zstd stream (the last frame ends early)")


def _field(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


class FileSource:
    """Local .txt / .jsonl / .jsonl.zst files, read in the given order."""

    def __init__(self, files: list[Path], text_field: str = "text", subset_field: str | None = None,
                 description: dict | None = None):
        self.files = files
        self.text_field = text_field
        self.subset_field = subset_field
        self.description = description or {"kind": "files"}
        self.file_checksums: dict[int, dict] = {}  # file_index -> {"path", "bytes", "sha256"}, once fully read
        self.total_bytes = sum(f.stat().st_size for f in files)

    def records(self, start: tuple[int, int] = (0, 0)) -> Iterator[Record]:
        first_file, skip_records = start
        for file_index in range(first_file, len(self.files)):
            yield from self._file_records(file_index, skip_records if file_index == first_file else 0)

    def _file_records(self, file_index: int, skip: int) -> Iterator[Record]:
        path = self.files[file_index]
        reader = _HashingReader(path)
        last_bytes = 0
        try:
            if path.stat().st_size == 0:
                yield Record(None, DEFAULT_SUBSET, (file_index + 1, 0), f"{path}: empty file", "empty_file")
                return
            if path.suffix == ".txt":
                data = b"".join(iter(reader.read, b""))
                yield self._text_file_record(path, data, file_index, reader.bytes_read)
            else:
                line_number = 0
                try:
                    for line, bytes_read in _raw_lines(path, reader):
                        line_number += 1
                        if line_number <= skip:
                            continue
                        position = (file_index, line_number)
                        record = self._json_record(path, line_number, line, position)
                        record.consumed_bytes, last_bytes = bytes_read - last_bytes, bytes_read
                        yield record
                except _CorruptInput as e:
                    yield Record(None, DEFAULT_SUBSET, (file_index + 1, 0),
                                 f"{path}: {e} after line {line_number}", "corrupt_file",
                                 reader.bytes_read - last_bytes)
                    return
                if line_number == 0:
                    yield Record(None, DEFAULT_SUBSET, (file_index + 1, 0), f"{path}: no records (empty file)",
                                 "empty_file", reader.bytes_read)
                    return
            self.file_checksums[file_index] = {"path": str(path), "bytes": reader.bytes_read,
                                               "sha256": reader.sha256.hexdigest()}
        finally:
            reader.close()

    def _text_file_record(self, path: Path, data: bytes, file_index: int, nbytes: int) -> Record:
        position = (file_index + 1, 0)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            return Record(None, DEFAULT_SUBSET, position, f"{path}: not UTF-8 text ({e})", "bad_encoding", nbytes)
        return Record(text, DEFAULT_SUBSET, position, consumed_bytes=nbytes)

    def _json_record(self, path: Path, line_number: int, line: bytes, position) -> Record:
        where = f"{path}:{line_number}"
        if not line.strip():
            return Record("", DEFAULT_SUBSET, position)  # a blank line: an empty document, counted and dropped
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return Record(None, DEFAULT_SUBSET, position, f"{where}: not valid JSON ({e})", "bad_json")
        text = _field(obj, self.text_field)
        if not isinstance(text, str):
            keys = ", ".join(sorted(obj)) if isinstance(obj, dict) else type(obj).__name__
            what = "no" if text is None else "a non-string"
            return Record(None, DEFAULT_SUBSET, position,
                          f"{where}: {what} '{self.text_field}' field (found: {keys})", "missing_text")
        subset = DEFAULT_SUBSET
        if self.subset_field:
            subset = _field(obj, self.subset_field)
            if not isinstance(subset, str) or not subset:
                return Record(None, DEFAULT_SUBSET, position,
                              f"{where}: no '{self.subset_field}' field naming the subset", "missing_subset")
        return Record(text, subset, position)


class HuggingFaceSource:
    """A ``datasets`` dataset by Hub name or local path (streamed when ``streaming``)."""

    def __init__(self, name: str, config: str | None, split: str, text_field: str = "text",
                 subset_field: str | None = None, streaming: bool = True, data_files: list[str] | None = None):
        self.name, self.config, self.split = name, config, split
        self.text_field, self.subset_field, self.streaming = text_field, subset_field, streaming
        self.data_files = data_files
        self.files: list[Path] = []
        self.file_checksums: dict[int, dict] = {}
        self.total_bytes = 0
        # local data is hashed, so that the manifest pins exactly what was tokenized
        local = Path(name)
        if local.is_dir():
            self.files = sorted((p for p in local.rglob("*") if p.is_file() and not p.name.startswith(".")),
                                key=_natural_key)
        self.files += [Path(f) for f in data_files or [] if Path(f).is_file()]
        self.description = {"kind": "huggingface", "name": name, "config": config, "split": split,
                            "data_files": data_files, "streaming": streaming, "text_field": text_field,
                            "subset_field": subset_field}

    def total_documents(self) -> int | None:
        """The split's number of rows when the dataset's metadata records it (None for most streams)."""
        try:
            import datasets

            builder = datasets.load_dataset_builder(self.name, self.config, data_files=self.data_files)
            return builder.info.splits[self.split].num_examples
        except Exception:  # no metadata is fine: the bar then shows rates without an ETA
            return None

    def _load(self):
        import datasets

        local = Path(self.name)
        try:
            if local.is_dir() and (local / "state.json").is_file():  # written by Dataset.save_to_disk
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[self.split]
                return ds.to_iterable_dataset() if self.streaming else ds
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=self.streaming,
                                         data_files=self.data_files)
        except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:  # OSError: offline too
            raise DataError(f"Hugging Face dataset '{self.name}' (config {self.config}, split {self.split}): {e}") \
                from None

    def records(self, start: tuple[int, int] = (0, 0)) -> Iterator[Record]:
        for i, path in enumerate(self.files):
            self.file_checksums[i] = {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        ds = self._load()
        _, skip = start
        if skip:
            ds = ds.skip(skip)
        index = skip
        for row in ds:
            index += 1
            where = f"{self.name}[{self.split}] row {index}"
            position = (0, index)
            text = _field(row, self.text_field)
            if not isinstance(text, str):
                yield Record(None, DEFAULT_SUBSET, position,
                             f"{where}: no string '{self.text_field}' field (found: {', '.join(sorted(row))})",
                             "missing_text")
                continue
            subset = DEFAULT_SUBSET
            if self.subset_field:
                subset = _field(row, self.subset_field)
                if not isinstance(subset, str) or not subset:
                    yield Record(None, DEFAULT_SUBSET, position,
                                 f"{where}: no '{self.subset_field}' field naming the subset", "missing_subset")
                    continue
            yield Record(text, subset, position)
