import os
import zstandard

import numpy as np
import pytest

from tests.data.conftest import (
    SAMPLE_TOKENIZER, make_slimpajama, random_documents, run_prepare, tree_bytes, write_jsonl,
)
from xlstm_train.data import DataError
from xlstm_train.data.shards import TokenShard
from xlstm_train.data.sources import FileSource
from xlstm_train.data.tokenizer import open_tokenizer


def subset_tokens(root, manifest, subset):
    dtype = np.dtype(manifest["dtype"])
    shards = [TokenShard(root, s, dtype) for s in manifest["subsets"][subset]["shards"]]
    tokens = np.concatenate([np.asarray(s.tokens) for s in shards])
    ends, offset = [], 0
    for s in shards:
        ends.extend((np.asarray(s.doc_ends) + offset).tolist())
        offset += len(s.tokens)
    return tokens, ends


def reference_tokens(tokenizer, docs):
    tokens, ends = [], []
    for doc in docs:
        tokens += tokenizer.encode(doc) + [tokenizer.eos_id]
        ends.append(len(tokens))
    return np.array(tokens), ends


@pytest.fixture(scope="module")
def slimpajama(tmp_path_factory):
    root = tmp_path_factory.mktemp("slimpajama")
    return root, make_slimpajama(root)


SP_ARGS = ("--tokenizer", SAMPLE_TOKENIZER, "--docs-per-unit", 50, "--batch-docs", 8)


def test_slimpajama_shards_match_direct_tokenization_for_any_worker_count(slimpajama, tmp_path):
    root, by_subset = slimpajama
    outputs = []
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        manifest = run_prepare("--slimpajama", root, "--output", out, "--workers", workers, *SP_ARGS)
        outputs.append(tree_bytes(out))
    assert outputs[0] == outputs[1] == outputs[2]

    tokenizer = open_tokenizer(SAMPLE_TOKENIZER)
    assert manifest["tokenizer"]["sha256"] == tokenizer.identity["sha256"]
    assert set(manifest["subsets"]) == set(by_subset)
    assert manifest["units"] == 4  # 160 train records in units of 50
    for subset, docs in by_subset.items():
        tokens, ends = subset_tokens(tmp_path / "w1", manifest, subset)
        want_tokens, want_ends = reference_tokens(tokenizer, docs)
        np.testing.assert_array_equal(tokens, want_tokens)
        assert ends == want_ends
        entry = manifest["subsets"][subset]
        assert (entry["documents"], entry["tokens"]) == (len(docs), len(want_tokens))
        assert entry["max_token_id"] == want_tokens.max()
    assert [f["path"] for f in manifest["source_files"]] == [
        str(root / "train" / c / f"example_train_{i}.jsonl.zst") for c in ("chunk1", "chunk2") for i in (0, 1)]


def test_validation_split_is_read_from_its_own_directory(slimpajama, tmp_path):
    root, _ = slimpajama
    manifest = run_prepare("--slimpajama", root, "--split", "validation", "--output", tmp_path / "v",
                           "--workers", 1, *SP_ARGS)
    assert manifest["source"]["split"] == "validation"
    assert all("/validation/" in f["path"] for f in manifest["source_files"])


def test_resume_keeps_finished_units_and_redoes_damaged_ones(slimpajama, tmp_path):
    root, _ = slimpajama
    out, clean = tmp_path / "out", tmp_path / "clean"
    run_prepare("--slimpajama", root, "--output", clean, "--workers", 1, *SP_ARGS)
    want = tree_bytes(clean)
    run_prepare("--slimpajama", root, "--output", out, "--workers", 1, *SP_ARGS)

    first_unit = sorted(out.glob("*/00000.bin"))
    stamps = {p: p.stat().st_mtime_ns for p in first_unit}
    # a shard of unit 2 truncated (a kill while writing it), another deleted, and no manifest yet
    victims = sorted(out.glob("*/00002.bin"))
    with open(victims[0], "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    victims[1].unlink()
    (out / "manifest.json").unlink()
    run_prepare("--slimpajama", root, "--output", out, "--workers", 2, *SP_ARGS)
    assert tree_bytes(out) == want
    assert {p: p.stat().st_mtime_ns for p in first_unit} == stamps  # unit 0 was not redone

    # a finished run whose shard was damaged afterwards is repaired too
    sorted(out.glob("*/00003.idx"))[0].unlink()
    run_prepare("--slimpajama", root, "--output", out, "--workers", 1, *SP_ARGS)
    assert tree_bytes(out) == want


def test_interrupted_run_resumes_to_identical_bytes(slimpajama, tmp_path, monkeypatch):
    root, _ = slimpajama
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_prepare("--slimpajama", root, "--output", clean, "--workers", 1, *SP_ARGS)

    original = FileSource._json_record
    calls = {"n": 0}

    def dies_midway(self, *args):
        calls["n"] += 1
        if calls["n"] == 120:  # inside unit 2
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(FileSource, "_json_record", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        run_prepare("--slimpajama", root, "--output", out, "--workers", 1, *SP_ARGS)
    monkeypatch.setattr(FileSource, "_json_record", original)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in (out / "progress").glob("unit_*")) == ["unit_00000.json", "unit_00001.json"]
    run_prepare("--slimpajama", root, "--output", out, "--workers", 2, *SP_ARGS)
    assert tree_bytes(out) == tree_bytes(clean)


def test_caps_and_subset_selection(slimpajama, tmp_path):
    root, by_subset = slimpajama
    tokenizer = open_tokenizer(SAMPLE_TOKENIZER)
    keep = ["RedPajamaC4", "RedPajamaBook", "RedPajamaArXiv"]
    manifest = run_prepare("--slimpajama", root, "--output", tmp_path / "o", "--workers", 1, *SP_ARGS,
                           "--subsets", ",".join(keep), "--max-tokens-per-subset", 300,
                           "--cap", "RedPajamaBook=100")
    assert sorted(manifest["subsets"]) == sorted(keep)
    excluded = sum(len(v) for k, v in by_subset.items() if k not in keep)
    # reading stops once every kept subset is full
    assert 0 < manifest["skipped"]["excluded_subset"] < excluded
    for subset, cap in (("RedPajamaC4", 300), ("RedPajamaArXiv", 300), ("RedPajamaBook", 100)):
        _, ends = reference_tokens(tokenizer, by_subset[subset])
        # documents are taken while the subset holds fewer tokens than its cap
        want = next(e for e in ends if e >= cap)
        assert manifest["subsets"][subset]["tokens"] == want

    uncapped = run_prepare("--slimpajama", root, "--output", tmp_path / "u", "--workers", 1, *SP_ARGS,
                           "--subsets", ",".join(keep), "--cap", "RedPajamaBook=100")
    assert uncapped["skipped"]["excluded_subset"] == excluded
    assert uncapped["subsets"]["RedPajamaC4"]["documents"] == len(by_subset["RedPajamaC4"])
    assert uncapped["capped_documents"] == len(by_subset["RedPajamaBook"]) - manifest["subsets"][
        "RedPajamaBook"]["documents"]


def test_text_jsonl_and_zst_inputs_in_one_run(tmp_path):
    docs = random_documents(12, seed=3)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(docs[0])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"text": d} for d in docs[1:6]])
    write_jsonl(tmp_path / "in" / "c.jsonl.zst", [{"body": {"text": d}} for d in docs[6:]], compress=True)
    with pytest.raises(DataError, match=r"c\.jsonl\.zst:1: no 'text' field \(found: body\)"):
        run_prepare("--input", tmp_path / "in", "--output", tmp_path / "bad", "--tokenizer", SAMPLE_TOKENIZER)
    # the same files with the text found under another field name
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"body": {"text": d}} for d in docs[1:6]])
    (tmp_path / "in" / "a.txt").unlink()
    manifest = run_prepare("--input", tmp_path / "in", "--output", tmp_path / "out", "--tokenizer",
                           SAMPLE_TOKENIZER, "--text-field", "body.text", "--workers", 1)
    tokens, _ = subset_tokens(tmp_path / "out", manifest, "default")
    np.testing.assert_array_equal(tokens, reference_tokens(open_tokenizer(SAMPLE_TOKENIZER), docs[1:])[0])


def _corrupt_inputs(tmp_path):
    good = [{"text": d} for d in random_documents(5, seed=1)]
    raw = "".join(__import__("json").dumps(r) + "\n" for r in good * 40).encode()
    compressed = zstandard.ZstdCompressor(level=3).compress(raw)
    cases = {}
    cases["not_json"] = (write_jsonl(tmp_path / "a.jsonl", good[:2]), "a.jsonl:3: not valid JSON")
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"text": "unterminated\n')
    cases["missing_text"] = (write_jsonl(tmp_path / "b.jsonl", [good[0], {"content": "x"}]),
                             r"b.jsonl:2: no 'text' field \(found: content\)")
    (tmp_path / "c.jsonl").write_bytes(b"")
    cases["empty_file"] = (tmp_path / "c.jsonl", "c.jsonl: empty file")
    (tmp_path / "d.jsonl.zst").write_bytes(compressed[: len(compressed) // 2])
    cases["truncated_zst"] = (tmp_path / "d.jsonl.zst", r"d.jsonl.zst: truncated zstd stream .* after line \d+")
    (tmp_path / "e.jsonl.zst").write_bytes(b"this is not zstd data at all" * 10)
    cases["corrupt_zst"] = (tmp_path / "e.jsonl.zst", "e.jsonl.zst: corrupt zstd data")
    return cases


@pytest.mark.parametrize("case", ["not_json", "missing_text", "empty_file", "truncated_zst", "corrupt_zst"])
def test_bad_input_names_file_and_line(tmp_path, case):
    path, message = _corrupt_inputs(tmp_path)[case]
    with pytest.raises(DataError, match=message):
        run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER, "--workers", 1)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_bad_records_skipped_and_counted_when_asked(tmp_path):
    cases = _corrupt_inputs(tmp_path)
    files = [path for path, _ in cases.values()]
    good = write_jsonl(tmp_path / "z_good.jsonl", [{"text": "A good document."}, {"text": ""}])
    with open(good, "a") as f:
        f.write("\n")  # a blank line
    manifest = run_prepare("--input", *files, good, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER,
                           "--workers", 1, "--on-bad-record", "skip")
    assert manifest["skipped"] == {"bad_json": 1, "missing_text": 1, "empty_file": 1, "corrupt_file": 2,
                                   "empty_document": 2}
    # a.jsonl: 2 good lines; b.jsonl: 1; d.jsonl.zst: the complete lines before the cut; z_good.jsonl: 1
    readable = zstandard.ZstdDecompressor().decompressobj().decompress((tmp_path / "d.jsonl.zst").read_bytes())
    assert manifest["documents"] == 2 + 1 + readable.count(b"\n") + 1
    assert any("d.jsonl.zst: truncated" in p for p in manifest["skipped_examples"])


def test_settings_change_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in random_documents(4, seed=2)])
    run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER, "--workers", 1)
    with pytest.raises(DataError, match="other settings.*docs_per_unit"):
        run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER,
                    "--docs-per-unit", 2)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty and not a prepare-data output"):
        run_prepare("--input", path, "--output", tmp_path / "other", "--tokenizer", SAMPLE_TOKENIZER)


def test_the_advice_to_skip_bad_records_works_as_given(tmp_path):
    """An error's advice (--on-bad-record skip) is taken by the same command, before or after units finished."""
    docs = [{"text": d} for d in random_documents(12, seed=3)]
    inputs = tmp_path / "in"
    write_jsonl(inputs / "a.jsonl", docs[:6])
    (inputs / "b.jsonl").write_text("")  # an empty file, after a's six records
    write_jsonl(inputs / "c.jsonl", docs[6:])
    common = ("--input", inputs, "--tokenizer", SAMPLE_TOKENIZER, "--workers", 1)
    for docs_per_unit, finished_before_error in ((100, 0), (3, 2)):
        out = tmp_path / f"out-{docs_per_unit}"
        with pytest.raises(DataError, match=r"b.jsonl: empty file \(use --on-bad-record skip"):
            run_prepare(*common, "--output", out, "--docs-per-unit", docs_per_unit)
        assert len(list((out / "progress").glob("unit_*.json"))) == finished_before_error
        manifest = run_prepare(*common, "--output", out, "--docs-per-unit", docs_per_unit, "--on-bad-record", "skip")
        assert manifest["skipped"] == {"empty_file": 1} and manifest["documents"] == 12
        fresh = tmp_path / f"fresh-{docs_per_unit}"
        run_prepare(*common, "--output", fresh, "--docs-per-unit", docs_per_unit, "--on-bad-record", "skip")
        assert tree_bytes(out) == tree_bytes(fresh)
    # the other way round could keep units that skipped records under "error": refused
    with pytest.raises(DataError, match=r"other settings \(on_bad_record differ\)"):
        run_prepare(*common, "--output", tmp_path / "out-3", "--docs-per-unit", 3)


def test_hugging_face_tokenizer_and_datasets_sources(tmp_path):
    docs = random_documents(30, seed=5)
    rows = [{"content": d, "meta": {"source": "s" + str(i % 2)}} for i, d in enumerate(docs)]
    path = write_jsonl(tmp_path / "data" / "part.jsonl", rows)
    tok_path = tmp_path / "bpe" / "tokenizer.json"
    common = ("--text-field", "content", "--subset-field", "meta.source", "--workers", 2)
    from_files = run_prepare("--input", path, "--output", tmp_path / "files", "--tokenizer", tok_path,
                             "--train-tokenizer", "bpe", "--vocab-size", 400, *common)
    tokenizer = open_tokenizer(tok_path)
    assert from_files["tokenizer"]["kind"] == "huggingface"
    assert tokenizer.eos_id == tokenizer._tok.token_to_id("<|endoftext|>")
    tokens, ends = subset_tokens(tmp_path / "files", from_files, "s1")
    assert tokenizer.decode(tokens[: ends[0] - 1].tolist()) == docs[1]

    import datasets

    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    for name, extra in (("json", ("--hf-data-files", path)), (tmp_path / "saved", ())):
        out = tmp_path / f"hf_{len(extra)}"
        manifest = run_prepare("--hf-dataset", name, *extra, "--output", out, "--tokenizer", tok_path, *common)
        assert tree_bytes(out / "s0") == tree_bytes(tmp_path / "files" / "s0")
        assert tree_bytes(out / "s1") == tree_bytes(tmp_path / "files" / "s1")
        assert manifest["source"]["kind"] == "huggingface"
        if extra:  # local data files are pinned by their checksums
            assert manifest["source_files"] == from_files["source_files"]


def test_trained_sentencepiece_round_trips(tmp_path):
    docs = random_documents(40, seed=9)
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": d} for d in docs])
    model = tmp_path / "tok" / "sp.model"
    manifest = run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", model,
                           "--train-tokenizer", "sentencepiece", "--vocab-size", 350, "--workers", 1)
    tokenizer = open_tokenizer(model)
    assert tokenizer.vocab_size == 350 and manifest["tokenizer"]["vocab_size"] == 350
    assert all(tokenizer.decode(tokenizer.encode(d)) == d for d in docs)  # newlines and spacing survive
    with pytest.raises(DataError, match="vocab-size 100.*too small"):
        run_prepare("--input", path, "--output", tmp_path / "out3", "--tokenizer", tmp_path / "small.model",
                    "--train-tokenizer", "sentencepiece", "--vocab-size", 100)
    with pytest.raises(DataError, match="already exists"):
        run_prepare("--input", path, "--output", tmp_path / "out2", "--tokenizer", model,
                    "--train-tokenizer", "sentencepiece", "--vocab-size", 350)
    # re-running the same command (as after a kill) resumes with the tokenizer it trained
    (tmp_path / "out" / "manifest.json").unlink()
    again = run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", model,
                        "--train-tokenizer", "sentencepiece", "--vocab-size", 350, "--workers", 1)
    assert again == manifest


def test_missing_or_unusable_inputs(tmp_path):
    with pytest.raises(DataError, match="input not found"):
        run_prepare("--input", tmp_path / "nope.jsonl", "--output", tmp_path / "o", "--tokenizer", SAMPLE_TOKENIZER)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported input file"):
        run_prepare("--input", tmp_path / "x.csv", "--output", tmp_path / "o", "--tokenizer", SAMPLE_TOKENIZER)
    with pytest.raises(DataError, match="no such directory"):
        run_prepare("--slimpajama", tmp_path, "--output", tmp_path / "o", "--tokenizer", SAMPLE_TOKENIZER)
    with pytest.raises(DataError, match="exists and is not a directory"):
        run_prepare("--input", write_jsonl(tmp_path / "e.jsonl", [{"text": "t"}]), "--output", tmp_path / "x.csv",
                    "--tokenizer", SAMPLE_TOKENIZER)
    with pytest.raises(DataError, match="tokenizer not found"):
        run_prepare("--input", write_jsonl(tmp_path / "d.jsonl", [{"text": "t"}]), "--output", tmp_path / "o2",
                    "--tokenizer", tmp_path / "none.model")


def test_module_entry_point_reports_errors_with_exit_code_2(tmp_path):
    import subprocess
    import sys

    bad = write_jsonl(tmp_path / "a.jsonl", [{"text": "fine"}])
    with open(bad, "a") as f:
        f.write("{oops\n")
    proc = subprocess.run([sys.executable, "-m", "xlstm_train.data.prepare", "--input", str(bad), "--output",
                           str(tmp_path / "o"), "--tokenizer", str(SAMPLE_TOKENIZER), "--workers", "1",
                           "--no-progress"], capture_output=True, text=True, env={**os.environ})
    assert proc.returncode == 2
    assert "a.jsonl:2: not valid JSON" in proc.stderr and "Traceback" not in proc.stderr


def test_hub_tokenizer_ids_resolve_through_the_hub_cache(tmp_path, monkeypatch):
    import huggingface_hub

    from xlstm_train.data.tokenizer import train_byte_level_bpe

    snapshot = tmp_path / "cache" / "snapshot"
    train_byte_level_bpe(random_documents(20, seed=4), snapshot / "tokenizer.json", 300)
    (snapshot / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|endoftext|>"}}')
    asked = []

    def fake_download(repo_id, filename):
        asked.append((repo_id, filename))
        return str(snapshot / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    tok = open_tokenizer("some-org/some-tokenizer")
    assert asked == [("some-org/some-tokenizer", "tokenizer.json"),
                     ("some-org/some-tokenizer", "tokenizer_config.json")]
    assert tok.identity["name"] == "some-org/some-tokenizer" and tok.eos_token == "<|endoftext|>"
    assert tok.decode(tok.encode("Emma said.")) == "Emma said."

    def offline(repo_id, filename):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(DataError, match="'some-org/other': not a local path, and the Hugging Face Hub did not"):
        open_tokenizer("some-org/other")


def test_unsafe_subset_names_get_distinct_directories(tmp_path):
    rows = [{"text": d, "set": s} for d, s in zip(random_documents(6, seed=6), ["a b", "a_b", "../up"] * 2)]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    manifest = run_prepare("--input", path, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER,
                           "--subset-field", "set", "--workers", 1)
    dirs = {name: entry["shards"][0]["name"].split("/")[0] for name, entry in manifest["subsets"].items()}
    assert sorted(dirs) == ["../up", "a b", "a_b"] and len(set(dirs.values())) == 3
    assert all((tmp_path / "out" / d).is_dir() and ".." not in d for d in dirs.values())
    assert all(entry["documents"] == 2 for entry in manifest["subsets"].values())


def test_sigkill_midway_then_rerun_gives_identical_bytes(slimpajama, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root, _ = slimpajama
    clean, out = tmp_path / "clean", tmp_path / "out"
    run_prepare("--slimpajama", root, "--output", clean, "--workers", 1, *SP_ARGS)
    # the same command in a child process that stalls inside unit 2 (after unit 1 is on disk) until killed
    script = (
        "import os, sys, time\n"
        "from xlstm_train.data import prepare\n"
        "tokenize = prepare._tokenize\n"
        "def stalling(texts):\n"
        "    while os.path.exists(sys.argv[-1]):\n"
        "        time.sleep(1)\n"
        "    return tokenize(texts)\n"
        "prepare._tokenize = stalling\n"
        "sys.exit(prepare.main(sys.argv[1:-1]))\n"
    )
    args = ["--slimpajama", root, "--output", out, "--workers", 1, *SP_ARGS, "--no-progress",
            out / "progress" / "unit_00001.json"]
    child = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / "progress" / "unit_00001.json").exists() and time.time() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert (out / "progress" / "unit_00001.json").exists() and not (out / "manifest.json").exists()
    run_prepare("--slimpajama", root, "--output", out, "--workers", 2, *SP_ARGS)
    assert tree_bytes(out) == tree_bytes(clean)


def test_progress_bar_shows_rates_and_eta(tmp_path, capsys):
    from tests.data.conftest import prepare_args
    from xlstm_train.data.prepare import prepare

    path = write_jsonl(tmp_path / "a.jsonl.zst", [{"text": d} for d in random_documents(50, seed=8)], compress=True)
    prepare(prepare_args("--input", path, "--output", tmp_path / "out", "--tokenizer", SAMPLE_TOKENIZER,
                         "--workers", 1))
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in bar and "docs/s" in bar and "tok/s" in bar and "<00:00" in bar
