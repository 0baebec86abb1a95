"""``xlstm-train prepare-data``: raw text -> token shards + index + manifest.

The input is read as one ordered stream of documents (see ``sources``), cut into *units* of
``--docs-per-unit`` records. Worker processes tokenize batches of documents; the main process takes
the results back in order and appends them (EOS after every document) to one shard per subset per
unit. So the bytes written depend only on the input and the settings, never on the number of workers.

A unit is finished when its shards are renamed into place and ``progress/unit_<n>.json`` records
them. After a kill, a re-run keeps every finished unit whose files are intact, deletes the rest and
continues from where the last good unit ended.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xlstm_train.data import DataError
from xlstm_train.data.shards import (
    FORMAT_NAME, FORMAT_VERSION, MANIFEST, ShardWriter, read_manifest, shard_files_intact, token_dtype,
    write_json_atomic,
)
from xlstm_train.data.sources import (
    FileSource, HuggingFaceSource, Record, list_input_files, slimpajama_files,
)
from xlstm_train.data.tokenizer import (
    limit_tokenizer_threads, open_tokenizer, train_byte_level_bpe, train_sentencepiece,
)

PROGRESS_DIR = "progress"
_MAX_PROBLEM_EXAMPLES = 5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("input (exactly one of --input, --slimpajama, --hf-dataset)")
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help=".txt (one document per file), .jsonl or .jsonl.zst files, or directories of them")
    source.add_argument("--slimpajama", metavar="DIR",
                        help="a local copy of SlimPajama in its published layout (<DIR>/<split>/chunk*/*.jsonl.zst)")
    source.add_argument("--hf-dataset", metavar="NAME_OR_PATH",
                        help="a Hugging Face dataset by Hub name (e.g. cerebras/SlimPajama-627B) or local path")
    source.add_argument("--hf-config", default=None, help="the dataset's configuration name")
    source.add_argument("--hf-data-files", nargs="+", default=None,
                        help="data files to load (load_dataset's data_files)")
    source.add_argument("--no-streaming", action="store_true", help="download/prepare the dataset instead of streaming")
    source.add_argument("--split", default="train", help="SlimPajama or Hugging Face split (default: train)")
    source.add_argument("--text-field", default="text", help="JSON field (dotted path) holding the text")
    source.add_argument("--subset-field", default=None,
                        help="JSON field (dotted path) naming each document's subset; SlimPajama: "
                             "meta.redpajama_set_name (the default with --slimpajama)")

    tok = parser.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", required=True, metavar="PATH",
                     help="a SentencePiece .model, a Hugging Face tokenizer.json or a directory holding one, "
                          "or a Hugging Face Hub id (e.g. EleutherAI/gpt-neox-20b)")
    tok.add_argument("--train-tokenizer", choices=["sentencepiece", "bpe"], default=None,
                     help="first train a tokenizer of this kind on the input and write it to --tokenizer")
    tok.add_argument("--vocab-size", type=int, default=4096, help="vocabulary size for --train-tokenizer")
    tok.add_argument("--tokenizer-train-documents", type=int, default=100_000,
                     help="documents (from the start of the input) that --train-tokenizer learns from")
    tok.add_argument("--eos-token", default=None, help="end-of-document token of a Hugging Face tokenizer")

    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR", help="directory for the shards and manifest.json")
    out.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    out.add_argument("--docs-per-unit", type=int, default=1_000_000,
                     help="input records per unit of work (a unit writes one shard per subset)")
    out.add_argument("--batch-docs", type=int, default=64, help="documents per tokenization task")
    out.add_argument("--subsets", default=None, help="comma-separated subsets to keep (default: all)")
    out.add_argument("--max-tokens-per-subset", type=int, default=None,
                     help="stop adding documents to a subset once it holds this many tokens")
    out.add_argument("--cap", action="append", default=[], metavar="SUBSET=TOKENS",
                     help="a per-subset token cap (repeatable; overrides --max-tokens-per-subset)")
    out.add_argument("--on-bad-record", choices=["error", "skip"], default="error",
                     help="a bad record (not JSON, no text, corrupt or empty file): stop with an error "
                          "naming file and line, or skip it and count it in the manifest")
    out.add_argument("--overwrite", action="store_true", help="discard an existing output directory")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


# ----------------------------------------------------------------------------------------------
# Tokenization workers

_worker_tokenizer = None


def _init_worker(tokenizer_path: str, eos_token: str | None) -> None:
    global _worker_tokenizer
    limit_tokenizer_threads()
    _worker_tokenizer = open_tokenizer(tokenizer_path, eos_token)


def _tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of all ``texts`` back to back, each followed by EOS, and each document's length."""
    tok = _worker_tokenizer
    encoded = tok.encode_batch(texts)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    flat = np.empty(int(lengths.sum()), dtype=np.uint32)
    offset = 0
    for ids, length in zip(encoded, lengths.tolist()):
        flat[offset:offset + length - 1] = ids
        flat[offset + length - 1] = tok.eos_id
        offset += length
    return flat, lengths


# ----------------------------------------------------------------------------------------------
# The stream of work: batches of documents, never crossing a unit boundary


@dataclass
class Batch:
    unit: int
    texts: list[str] = field(default_factory=list)
    subsets: list[str] = field(default_factory=list)
    end: tuple[int, int] = (0, 0)  # stream position after the batch's last record
    last_in_unit: bool = False
    skipped: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    consumed_bytes: int = 0
    records: int = 0  # input records behind this batch, used or skipped


def _batches(records: Iterator[Record], first_unit: int, docs_per_unit: int, batch_docs: int,
             on_bad_record: str, keep_subsets: set[str] | None) -> Iterator[Batch]:
    unit, in_unit = first_unit, 0
    batch = Batch(unit)
    for record in records:
        in_unit += 1
        batch.records += 1
        batch.end = record.position
        batch.consumed_bytes += record.consumed_bytes
        if record.problem is not None:
            if on_bad_record == "error":
                raise DataError(record.problem + " (use --on-bad-record skip to skip and count such records)")
            batch.skipped[record.problem_kind] += 1
            batch.problems.append(record.problem)
        elif keep_subsets is not None and record.subset not in keep_subsets:
            batch.skipped["excluded_subset"] += 1
        elif not record.text:
            batch.skipped["empty_document"] += 1
        else:
            batch.texts.append(record.text)
            batch.subsets.append(record.subset)
        if in_unit == docs_per_unit:
            batch.last_in_unit = True
            yield batch
            unit, in_unit = unit + 1, 0
            batch = Batch(unit)
        elif len(batch.texts) >= batch_docs:
            yield batch
            batch = Batch(unit)
    if in_unit:
        batch.last_in_unit = True
        yield batch


def _tokenized(batches: Iterator[Batch], pool, in_flight: int):
    """(batch, tokens, lengths) in input order; at most ``in_flight`` tasks outstanding."""
    if pool is None:
        for batch in batches:
            yield (batch, *_tokenize(batch.texts))
        return
    pending: deque = deque()
    for batch in batches:
        pending.append((batch, pool.apply_async(_tokenize, (batch.texts,))))
        if len(pending) >= in_flight:
            done, result = pending.popleft()
            yield (done, *result.get())
    while pending:
        done, result = pending.popleft()
        yield (done, *result.get())


# ----------------------------------------------------------------------------------------------
# Units: the resumable pieces of output


def _subset_dir(subset: str) -> str:
    """A directory name for a subset: the name itself when it is safe, else a cleaned name + a short hash."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", subset)
    if safe == subset and subset not in (PROGRESS_DIR, ".", ".."):
        return subset
    return f"{safe.strip('.')}-{hashlib.sha256(subset.encode()).hexdigest()[:8]}"


class Unit:
    def __init__(self, index: int, start: tuple[int, int], root: Path, dtype: np.dtype):
        self.index, self.start, self.end = index, start, start
        self.root, self.dtype = root, dtype
        self.writers: dict[str, ShardWriter] = {}
        self.skipped: Counter = Counter()
        self.problems: list[str] = []
        self.capped_documents = 0

    def add(self, subset: str, tokens: np.ndarray, lengths: np.ndarray) -> None:
        writer = self.writers.get(subset)
        if writer is None:
            writer = ShardWriter(self.root / _subset_dir(subset), f"{self.index:05d}", self.dtype)
            self.writers[subset] = writer
        writer.add(tokens, lengths)

    def finish(self, files: list[dict]) -> dict:
        shards = {subset: writer.finish() for subset, writer in sorted(self.writers.items())}
        record = {"index": self.index, "start": list(self.start), "end": list(self.end), "shards": shards,
                  "skipped": dict(sorted(self.skipped.items())), "problems": self.problems[:_MAX_PROBLEM_EXAMPLES],
                  "capped_documents": self.capped_documents, "files": files}
        write_json_atomic(self.root / PROGRESS_DIR / f"unit_{self.index:05d}.json", record)
        return record


def _finished_units(root: Path) -> list[dict]:
    """Finished units in order, up to the first one that is missing or whose shards are damaged."""
    units = []
    while (path := root / PROGRESS_DIR / f"unit_{len(units):05d}.json").is_file():
        try:
            unit = json.loads(path.read_text())
        except json.JSONDecodeError:
            break
        if not all(shard_files_intact(root, shard) for shard in unit["shards"].values()):
            break
        units.append(unit)
    return units


def _remove_unfinished(root: Path, keep_units: int) -> None:
    """Delete every unit record and shard file from unit ``keep_units`` on, and stray temporaries."""
    for path in (root / PROGRESS_DIR).glob("unit_*.json*"):
        if path.name.endswith(".tmp") or int(path.name[5:10]) >= keep_units:
            path.unlink()
    for path in root.glob("*/*"):
        if path.parent.name == PROGRESS_DIR or not path.is_file():
            continue
        stem = path.name.split(".")[0]
        if path.name.endswith(".tmp") or (stem.isdigit() and int(stem) >= keep_units):
            path.unlink()
    (root / MANIFEST).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Driver


def _parse_caps(args) -> dict[str, int]:
    caps = {}
    for item in args.cap:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise DataError(f"--cap {item!r}: expected SUBSET=TOKENS with a whole number of tokens")
        caps[name] = int(value)
    return caps


def _make_source(args):
    chosen = [name for name in ("input", "slimpajama", "hf_dataset") if getattr(args, name)]
    if len(chosen) != 1:
        raise DataError("give exactly one input: --input, --slimpajama or --hf-dataset")
    if args.input:
        files = list_input_files(args.input)
        return FileSource(files, args.text_field, args.subset_field,
                          {"kind": "files", "inputs": list(args.input), "text_field": args.text_field,
                           "subset_field": args.subset_field})
    if args.slimpajama:
        subset_field = args.subset_field or "meta.redpajama_set_name"
        return FileSource(slimpajama_files(args.slimpajama, args.split), args.text_field, subset_field,
                          {"kind": "slimpajama", "root": args.slimpajama, "split": args.split,
                           "text_field": args.text_field, "subset_field": subset_field})
    return HuggingFaceSource(args.hf_dataset, args.hf_config, args.split, args.text_field, args.subset_field,
                             streaming=not args.no_streaming, data_files=args.hf_data_files)


def _train_tokenizer(args, source) -> None:
    path = Path(args.tokenizer)
    if path.exists():
        settings = Path(args.output) / PROGRESS_DIR / "settings.json"
        if settings.is_file() and json.loads(settings.read_text())["tokenizer"]["sha256"] == \
                open_tokenizer(path, args.eos_token).identity["sha256"]:
            return  # trained by this same command before it was interrupted: resume with it
        raise DataError(f"--train-tokenizer: {path} already exists; remove it or drop --train-tokenizer to use it")
    texts = []
    for record in source.records():
        if record.problem is not None and args.on_bad_record == "error":
            raise DataError(record.problem)
        if record.text:
            texts.append(record.text)
        if len(texts) >= args.tokenizer_train_documents:
            break
    if args.train_tokenizer == "sentencepiece":
        if path.suffix != ".model":
            raise DataError(f"--tokenizer {path}: a SentencePiece model is written to a .model path")
        try:
            train_sentencepiece(texts, path.with_suffix(""), args.vocab_size)
        except RuntimeError as e:  # SentencePiece reports bad settings this way
            raise DataError(f"--train-tokenizer sentencepiece --vocab-size {args.vocab_size}: too small or "
                            f"unusable for this input ({e})") from None
    else:
        train_byte_level_bpe(texts, path / "tokenizer.json" if path.suffix != ".json" else path, args.vocab_size)
    print(f"trained a {args.train_tokenizer} tokenizer ({args.vocab_size} tokens) on {len(texts)} documents: {path}")


def _check_settings_unchanged(root: Path, previous: dict, settings: dict) -> None:
    """A re-run continues an interrupted one only with settings that give the same bytes.

    Two changes are always safe: any change before the first unit finished (nothing is kept), and
    ``--on-bad-record`` from error to skip (units finished under "error" met no bad record, so they
    are what "skip" writes too). The latter is the advice an error gives, so it must work as given.
    """
    changed = sorted(k for k in settings if previous.get(k) != settings.get(k))
    if not changed or not _finished_units(root):
        return
    if changed == ["on_bad_record"] and (previous["on_bad_record"], settings["on_bad_record"]) == ("error", "skip"):
        return
    raise DataError(f"{root}: was prepared with other settings ({', '.join(changed)} differ); "
                    "use another --output or pass --overwrite")


def prepare(args) -> dict:
    """Run prepare-data; returns the manifest."""
    if args.workers < 1 or args.docs_per_unit < 1 or args.batch_docs < 1:
        raise DataError("--workers, --docs-per-unit and --batch-docs must be at least 1")
    caps = _parse_caps(args)
    keep_subsets = set(args.subsets.split(",")) if args.subsets else None
    source = _make_source(args)
    if args.train_tokenizer:
        _train_tokenizer(args, source)
    tokenizer = open_tokenizer(args.tokenizer, args.eos_token)
    dtype = token_dtype(tokenizer.vocab_size)

    root = Path(args.output)
    settings = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype.name,
        "tokenizer": {**tokenizer.identity, "path": str(args.tokenizer),
                      "eos_token": getattr(tokenizer, "eos_token", None)},
        "source": source.description,
        "input_files": [{"path": str(p), "bytes": p.stat().st_size} for p in source.files],
        "docs_per_unit": args.docs_per_unit, "batch_docs": args.batch_docs,
        "subsets": sorted(keep_subsets) if keep_subsets else None,
        "max_tokens_per_subset": args.max_tokens_per_subset, "caps": caps, "on_bad_record": args.on_bad_record,
    }
    settings_path = root / PROGRESS_DIR / "settings.json"
    if root.exists() and not root.is_dir():
        raise DataError(f"--output {root}: exists and is not a directory")
    if args.overwrite and root.exists():
        shutil.rmtree(root)
    if root.is_dir() and any(root.iterdir()) and not settings_path.is_file():
        raise DataError(f"{root}: not empty and not a prepare-data output; use another --output or --overwrite")
    settings = json.loads(json.dumps(settings))  # as it reads back from disk (tuples become lists)
    if settings_path.is_file():
        _check_settings_unchanged(root, json.loads(settings_path.read_text()), settings)
    (root / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings_path, settings)

    units = _finished_units(root)
    if (root / MANIFEST).is_file() and len(units) == read_manifest(root)["units"]:
        print(f"{root}: already prepared ({len(units)} units intact)")
        return read_manifest(root)
    _remove_unfinished(root, len(units))
    if units:
        print(f"{root}: resuming after {len(units)} finished units")

    totals: Counter = Counter()
    for unit in units:
        for subset, shard in unit["shards"].items():
            totals[subset] += shard["tokens"]

    def cap_of(subset: str) -> int | None:
        return caps.get(subset, args.max_tokens_per_subset)

    def all_capped() -> bool:
        return keep_subsets is not None and all(
            cap_of(s) is not None and totals[s] >= cap_of(s) for s in keep_subsets)

    start = tuple(units[-1]["end"]) if units else (0, 0)
    if not all_capped():
        reported = {f["path"] for unit in units for f in unit["files"]}
        units += _tokenize_units(args, source, root, dtype, start, len(units), keep_subsets, totals, cap_of,
                                 all_capped, reported)
    manifest = _manifest(settings, units, source)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def _tokenize_units(args, source, root, dtype, start, first_unit, keep_subsets, totals, cap_of, all_capped,
                    reported: set[str]) -> list[dict]:
    from tqdm import tqdm

    records = source.records(start)
    batches = _batches(records, first_unit, args.docs_per_unit, args.batch_docs, args.on_bad_record, keep_subsets)
    pool = None
    if args.workers > 1:
        pool = multiprocessing.get_context("spawn").Pool(
            args.workers, initializer=_init_worker, initargs=(str(args.tokenizer), args.eos_token))
    else:
        _init_worker(str(args.tokenizer), args.eos_token)
    by_bytes = isinstance(source, FileSource)
    if by_bytes:  # local files: progress in input bytes, which gives an honest ETA
        skipped_bytes = sum(f.stat().st_size for f in source.files[:start[0]])
        bar = tqdm(total=source.total_bytes or None, initial=skipped_bytes, unit="B", unit_scale=True,
                   disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    else:  # a dataset stream: progress in documents, out of the split's size when its metadata says
        bar = tqdm(total=source.total_documents(), initial=start[1], unit="doc", unit_scale=True,
                   disable=args.no_progress, file=sys.stderr, dynamic_ncols=True)
    finished, unit = [], None
    docs = tokens = 0
    started = last_report = time.perf_counter()
    try:
        for batch, flat, lengths in _tokenized(batches, pool, in_flight=2 * args.workers + 2):
            if unit is None:
                unit = Unit(batch.unit, start, root, dtype)
            unit.end = batch.end
            unit.skipped.update(batch.skipped)
            unit.problems.extend(batch.problems[:_MAX_PROBLEM_EXAMPLES])
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for subset in dict.fromkeys(batch.subsets):  # subsets in first-seen order
                keep = []
                for i, s in enumerate(batch.subsets):
                    if s != subset:
                        continue
                    cap = cap_of(subset)
                    if cap is not None and totals[subset] >= cap:
                        unit.capped_documents += 1
                        continue
                    keep.append(i)
                    totals[subset] += int(lengths[i])
                if keep:
                    pieces = [flat[offsets[i]:offsets[i + 1]] for i in keep]
                    unit.add(subset, np.concatenate(pieces), lengths[keep])
            docs += len(batch.texts)
            tokens += int(lengths.sum())
            bar.update(batch.consumed_bytes if by_bytes else batch.records)
            now = time.perf_counter()
            if now - last_report > 0.5:
                elapsed = now - started
                bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s", refresh=False)
                last_report = now
            stop = all_capped()
            if batch.last_in_unit or stop:
                # files the stream has moved past (reading ahead must not change what a unit records)
                files = [c for k, c in sorted(source.file_checksums.items())
                         if k < batch.end[0] and c["path"] not in reported]
                reported.update(c["path"] for c in files)
                finished.append(unit.finish(files))
                start, unit = batch.end, None
            if stop:
                break
    except BaseException:
        if unit is not None:
            for writer in unit.writers.values():
                writer.abandon()
        raise
    finally:
        elapsed = max(time.perf_counter() - started, 1e-9)
        bar.set_postfix_str(f"{docs / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tok/s", refresh=False)
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return finished


def _manifest(settings: dict, units: list[dict], source) -> dict:
    subsets: dict[str, dict] = {}
    skipped: Counter = Counter()
    problems: list[str] = []
    files: dict[str, dict] = {}
    capped = 0
    for unit in units:
        for subset, shard in unit["shards"].items():
            entry = subsets.setdefault(subset, {"tokens": 0, "documents": 0, "max_token_id": -1, "shards": []})
            entry["tokens"] += shard["tokens"]
            entry["documents"] += shard["documents"]
            entry["max_token_id"] = max(entry["max_token_id"], shard["max_token_id"])
            entry["shards"].append(shard)
        skipped.update(unit["skipped"])
        problems.extend(unit["problems"])
        capped += unit["capped_documents"]
        for f in unit["files"]:
            files[f["path"]] = f
    for f in source.file_checksums.values():
        files.setdefault(f["path"], f)
    input_order = {f["path"]: i for i, f in enumerate(settings["input_files"])}
    return {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": settings["dtype"],
        "tokenizer": settings["tokenizer"], "source": settings["source"],
        "source_files": sorted(files.values(), key=lambda f: input_order.get(f["path"], len(input_order))),
        "subsets": dict(sorted(subsets.items())),
        "tokens": sum(s["tokens"] for s in subsets.values()),
        "documents": sum(s["documents"] for s in subsets.values()),
        "skipped": dict(sorted(skipped.items())), "skipped_examples": problems[:_MAX_PROBLEM_EXAMPLES],
        "capped_documents": capped,
        "units": len(units),
        "settings": {k: settings[k] for k in ("docs_per_unit", "batch_docs", "subsets", "max_tokens_per_subset",
                                              "caps", "on_bad_record")},
    }


def run(args) -> int:
    manifest = prepare(args)
    print(f"{args.output}: {manifest['tokens']:,} tokens in {manifest['documents']:,} documents, "
          f"{len(manifest['subsets'])} subset(s)"
          + (f"; skipped {sum(manifest['skipped'].values()):,} records {manifest['skipped']}"
             if manifest["skipped"] else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xlstm_train.data.prepare", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
