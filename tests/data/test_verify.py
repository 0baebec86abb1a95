"""Shards are checked against their manifest, and the manifest against the recipe, before training."""

import hashlib
import json
import shutil

import numpy as np
import pytest

from tests.data.conftest import SAMPLE_TOKENIZER, random_documents, run_prepare, write_jsonl
from xlstm_train.data import DataError, build_train_loader, build_val_loader
from xlstm_train.data import shards as shards_module
from xlstm_train.data.config import DataConfig, DatasetSpec

VOCAB = 4096


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    rows = [{"text": d} for d in random_documents(40, seed=5)]
    run_prepare("--input", write_jsonl(root / "in.jsonl", rows), "--output", root / "prepared",
                "--tokenizer", SAMPLE_TOKENIZER, "--docs-per-unit", 15, "--workers", 1)
    return root / "prepared"


@pytest.fixture
def copy(prepared, tmp_path):
    """A fresh copy of the prepared dataset (and no file of it verified yet in this process)."""
    shards_module._verified_files.clear()
    return shutil.copytree(prepared, tmp_path / "copy")


def config(path, **kw):
    return DataConfig(datasets=[DatasetSpec(str(path))], tokenizer=str(SAMPLE_TOKENIZER), seq_len=16, **kw)


def build(path, **kw):
    return build_train_loader(config(path, **kw), micro_batch_size=2, vocab_size=VOCAB)


def edit_manifest(root, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_prepare_data_records_both_files_checksums(prepared):
    manifest = json.loads((prepared / "manifest.json").read_text())
    shards = manifest["subsets"]["default"]["shards"]
    assert len(shards) == 3
    for shard in shards:
        for suffix, key in ((".bin", "sha256"), (".idx", "idx_sha256")):
            data = (prepared / f"{shard['name']}{suffix}").read_bytes()
            assert shard[key] == hashlib.sha256(data).hexdigest()


def test_one_flipped_byte_is_refused_by_name(copy):
    shard = copy / "default" / "00001.bin"
    tokens = np.fromfile(shard, dtype=np.uint16)
    position = int(np.random.default_rng().integers(len(tokens)))
    tokens[position] ^= 1  # still a valid id: only the checksum can tell
    assert tokens[position] < VOCAB
    tokens.tofile(shard)
    with pytest.raises(DataError, match=r"copy/default/00001\.bin: its SHA-256 is [0-9a-f]+\.\.\. but .*manifest\.json "
                                        r"records [0-9a-f]+\.\.\.: the file changed after prepare-data"):
        build(copy)
    with pytest.raises(DataError, match=r"00001\.bin: its SHA-256"):  # the validation set is verified as well
        build_val_loader(config(copy), micro_batch_size=1, vocab_size=VOCAB, num_batches=1)
    build(copy, verify="size")  # size-only verification cannot see it: the price of not reading the corpus


def test_a_changed_index_is_refused_by_name(copy):
    index = copy / "default" / "00002.idx"
    data = bytearray(index.read_bytes())
    data[-9] ^= 1  # inside the second-to-last document end: moves a document boundary
    index.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"copy/default/00002\.idx: its SHA-256"):
        build(copy)


def test_size_only_verification_catches_truncation_and_growth(copy):
    shard = copy / "default" / "00000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"00000\.bin: \d+ bytes on disk but the manifest records \d+"):
        build(copy, verify="size")
    shard.write_bytes(data + b"\0\0")
    with pytest.raises(DataError, match=r"00000\.bin: \d+ bytes on disk but the manifest records"):
        build(copy, verify="size")


@pytest.mark.parametrize("key, value", [("vocab_size", 5000), ("eos_id", 3)])
def test_manifest_fields_must_agree_with_the_tokenizer(copy, key, value):
    edit_manifest(copy, lambda m: m["tokenizer"].__setitem__(key, value))
    with pytest.raises(DataError, match=rf"copy/manifest\.json: records {key} {value} where the tokenizer has \d+ "
                                        r"for the same tokenizer file"):
        build(copy)


def test_manifest_that_contradicts_itself_is_refused(copy):
    def fewer_tokens(m):
        m["subsets"]["default"]["shards"][1]["tokens"] -= 1
    edit_manifest(copy, fewer_tokens)
    with pytest.raises(DataError, match=r"copy/default/00001: the manifest's entry contradicts itself \(bin_bytes"):
        build(copy)

    def wrong_dtype(m):
        m["dtype"] = "uint32"
    edit_manifest(copy, wrong_dtype)
    with pytest.raises(DataError, match=r"dtype uint32 does not fit its tokenizer's vocab_size 4096"):
        build(copy)


def test_datasets_of_different_tokenizers_are_not_mixed(copy, prepared, tmp_path):
    from xlstm_train.data.tokenizer import train_byte_level_bpe

    other_tokenizer = train_byte_level_bpe(random_documents(20, seed=1), tmp_path / "bpe.json", 300)
    rows = [{"text": d} for d in random_documents(10, seed=6)]
    run_prepare("--input", write_jsonl(tmp_path / "other.jsonl", rows), "--output", tmp_path / "other",
                "--tokenizer", other_tokenizer, "--workers", 1)
    # without data.tokenizer the first dataset's tokenizer is the reference
    cfg = DataConfig(datasets=[DatasetSpec(str(prepared)), DatasetSpec(str(tmp_path / "other"))], seq_len=16)
    with pytest.raises(DataError, match=r"other: made with tokenizer 'bpe' .* but the tokenizer of data.datasets\[0\]"):
        build_train_loader(cfg, micro_batch_size=2, vocab_size=VOCAB)


def test_each_file_is_hashed_once_per_process_and_by_the_first_local_rank_only(copy, monkeypatch):
    hashed = []
    real = shards_module._sha256_of
    monkeypatch.setattr(shards_module, "_sha256_of", lambda path, *a: hashed.append(path.name) or real(path, *a))
    build(copy)
    build_val_loader(config(copy), micro_batch_size=1, vocab_size=VOCAB, num_batches=1)
    assert sorted(hashed) == sorted(f"0000{i}.{s}" for i in range(3) for s in ("bin", "idx"))

    shards_module._verified_files.clear()
    hashed.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")
    build(copy)
    assert hashed == []


def test_missing_dataset_names_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"data.datasets\[0\].path = 'data/sample': no such directory \(relative "
                                        rf"paths are read from the working directory, here {tmp_path}\)"):
        build_train_loader(DataConfig(datasets=[DatasetSpec("data/sample")]), micro_batch_size=1, vocab_size=VOCAB)


def test_own_data_by_a_list_override(prepared):
    from xlstm_train.train.config import load_config

    cfg = load_config(None, [f"data.datasets=[{{path: {prepared}}}]", "data.verify=size"])
    assert [(d.path, d.weight, d.subset) for d in cfg.data.datasets] == [(str(prepared), 1.0, None)]
    assert cfg.data.verify == "size"
    with build_train_loader(cfg.data, micro_batch_size=2, vocab_size=VOCAB) as loader:
        assert next(iter(loader))["input_ids"].shape == (2, cfg.data.seq_len)
