"""Data-path throughput: tokenization (per worker, and prepare-data end to end) and the training loader.

    python scripts/bench_data.py [--repeat 8] [--json out.json]

Tokenization runs on the bundled sample (data/austen, repeated --repeat times so that process start-up
is a small part of the end-to-end runs) with the bundled SentencePiece model and with a byte-level BPE
``tokenizer.json`` (Hugging Face ``tokenizers``) trained on the same sample. "per worker" is one
process, one thread, tokenizing in memory; "prepare-data" is the whole command (read + decompress +
parse + tokenize in worker processes + write shards), wall clock including the pool's start-up.
Each rate is given per wall-clock second and per CPU second (user + system time of the processes
doing the work): on a shared machine the second is the one that does not depend on the neighbours.

The loader is pinned to one CPU core and delivers micro-batches of 8 x 2048 tokens from data/sample
(input_ids, labels, doc_ids), in the main thread (prefetch 0) and with the background thread.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "austen" / "austen.jsonl.zst"
SP_MODEL = REPO / "data" / "tokenizer" / "austen_sp4096.model"


def sample_texts() -> list[str]:
    import zstandard

    raw = zstandard.ZstdDecompressor().decompress(SAMPLE.read_bytes())
    return [json.loads(line)["text"] for line in raw.decode().splitlines()]


def tokenize_per_worker(tokenizer_path: Path, texts: list[str], repeat: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of one single-threaded tokenizer process."""
    from xlstm_train.data import prepare

    prepare._init_worker(str(tokenizer_path), None)  # one thread, as in a prepare-data worker
    prepare._tokenize(texts[:8])  # warm-up
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for _ in range(repeat):
        for i in range(0, len(texts), 64):  # the batch size prepare-data uses
            tokens += len(prepare._tokenize(texts[i:i + 64])[0])
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start)


def prepare_end_to_end(tokenizer_path: Path, corpus: Path, workers: int, out: Path) -> tuple[float, float, int]:
    """(tokens per wall second, tokens per CPU second of all its processes, tokens) of a prepare-data run."""
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "xlstm_train.data.prepare", "--input", str(corpus), "--tokenizer",
                    str(tokenizer_path), "--output", str(out), "--workers", str(workers), "--overwrite",
                    "--no-progress"], check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime
    tokens = json.loads((out / "manifest.json").read_text())["tokens"]
    return tokens / seconds, tokens / cpu_seconds, tokens


def loader_throughput(prefetch: int, batches: int) -> tuple[float, float]:
    import torch

    from xlstm_train.data import build_train_loader
    from xlstm_train.data.config import DataConfig, DatasetSpec

    torch.set_num_threads(1)
    cfg = DataConfig(datasets=[DatasetSpec(str(REPO / "data" / "sample"))], tokenizer=str(SP_MODEL),
                     seq_len=2048, prefetch=prefetch)
    loader = iter(build_train_loader(cfg, micro_batch_size=8, vocab_size=4096))
    for _ in range(20):  # warm-up: page in the shard, start the thread
        next(loader)
    tokens, start, cpu_start = 0, time.perf_counter(), time.process_time()
    for batch in itertools.islice(loader, batches):
        tokens += batch["input_ids"].numel()
    return tokens / (time.perf_counter() - start), tokens / (time.process_time() - cpu_start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=8, help="copies of the sample to tokenize")
    parser.add_argument("--loader-batches", type=int, default=2000)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    from xlstm_train.data.tokenizer import train_byte_level_bpe

    texts = sample_texts()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bpe = train_byte_level_bpe(texts, tmp / "bpe" / "tokenizer.json", 4096)
        corpus = tmp / "corpus.jsonl"
        with open(corpus, "w") as f:
            for _ in range(args.repeat):
                for text in texts:
                    f.write(json.dumps({"text": text}) + "\n")
        for name, path in (("HF byte-level BPE 4096 (tokenizers)", bpe), ("SentencePiece unigram 4096", SP_MODEL)):
            rows.append((f"tokenize, 1 worker in memory: {name}", *tokenize_per_worker(path, texts, args.repeat)))
            for workers in (1, 2):
                wall, cpu, tokens = prepare_end_to_end(path, corpus, workers, tmp / f"out{workers}")
                rows.append((f"prepare-data --workers {workers} ({tokens / 1e6:.1f}M tokens): {name}", wall, cpu))
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # the loader on one core
    for prefetch in (0, 2):
        rows.append((f"loader 8 x 2048, one core, prefetch {prefetch}", *loader_throughput(prefetch,
                                                                                             args.loader_batches)))

    import numpy
    import sentencepiece
    import tokenizers
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
           "tokenizers": tokenizers.__version__, "sentencepiece": sentencepiece.__version__,
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "load_average_1min_after": os.getloadavg()[0]}
    width = max(len(name) for name, *_ in rows)
    print(f"{'measurement':<{width}}  {'tokens/s':>9}  {'tokens/CPU-s':>12}")
    for name, wall, cpu in rows:
        print(f"{name:<{width}}  {wall / 1e6:8.2f}M  {cpu / 1e6:11.2f}M")
    print(json.dumps(env))
    if args.json:
        results = {name: {"tokens_per_s": wall, "tokens_per_cpu_s": cpu} for name, wall, cpu in rows}
        Path(args.json).write_text(json.dumps({"env": env, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
