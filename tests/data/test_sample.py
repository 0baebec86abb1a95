"""The bundled sample: its committed shards are exactly what prepare-data makes of it today."""

import itertools
import json

import zstandard

from tests.data.conftest import REPO, run_prepare, tree_bytes
from xlstm_train.data import build_train_loader, build_val_loader, load_tokenizer
from xlstm_train.data.config import DataConfig, DatasetSpec

SAMPLE = REPO / "data" / "sample"


def test_committed_shards_regenerate_byte_identically(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the manifest records the input and tokenizer paths as given, relative to the repo
    out = tmp_path / "sample"
    run_prepare("--input", "data/austen/austen.jsonl.zst", "--tokenizer", "data/tokenizer/austen_sp4096.model",
                "--output", out, "--workers", 2)
    assert tree_bytes(out) == tree_bytes(SAMPLE)


def test_sample_tokenizer_and_loader(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = DataConfig(datasets=[DatasetSpec("data/sample")], tokenizer="data/tokenizer/austen_sp4096.model",
                     seq_len=256)
    tok = load_tokenizer(cfg)
    assert tok.vocab_size == 4096 and tok.eos_id == 2 and tok.identity["kind"] == "sentencepiece"
    raw = zstandard.ZstdDecompressor().decompress((REPO / "data/austen/austen.jsonl.zst").read_bytes())
    first = json.loads(raw.split(b"\n", 1)[0])
    assert first["meta"] == {"title": "Sense and Sensibility", "chapter": 1}
    assert tok.decode(tok.encode(first["text"])) == first["text"]

    manifest = json.loads((SAMPLE / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == tok.identity["sha256"]
    assert manifest["documents"] == 269
    batches = list(itertools.islice(build_train_loader(cfg, micro_batch_size=8, vocab_size=4096), 3))
    assert batches[0]["input_ids"].shape == (8, 256)
    val = build_val_loader(cfg, micro_batch_size=8, vocab_size=4096, num_batches=8)
    assert len(list(val)) == 8
