import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from tests.data.conftest import SAMPLE_TOKENIZER, random_documents, run_prepare, write_jsonl
from xlstm_train.data import DataError, build_train_loader, build_val_loader, load_tokenizer
from xlstm_train.data.config import DataConfig, DatasetSpec
from xlstm_train.data.loader import IGNORE_INDEX, FeistelPermutation, blend_table, validation_size
from xlstm_train.data.tokenizer import open_tokenizer

VOCAB = 4096


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two subsets, several shards each (units of 7 records), and the reference token streams."""
    root = tmp_path_factory.mktemp("corpus")
    docs = random_documents(60, seed=11, min_words=1, max_words=30)
    rows = [{"text": d, "meta": {"set": "A" if i % 3 else "B"}} for i, d in enumerate(docs)]
    path = write_jsonl(root / "in.jsonl", rows)
    run_prepare("--input", path, "--output", root / "prepared", "--tokenizer", SAMPLE_TOKENIZER,
                "--subset-field", "meta.set", "--docs-per-unit", 7, "--workers", 1)
    tokenizer = open_tokenizer(SAMPLE_TOKENIZER)
    streams = {}
    for subset in ("A", "B"):
        tokens, doc_of_token = [], []
        for n, row in enumerate(r for r in rows if r["meta"]["set"] == subset):
            ids = tokenizer.encode(row["text"]) + [tokenizer.eos_id]
            tokens += ids
            doc_of_token += [n] * len(ids)
        streams[subset] = (np.array(tokens), np.array(doc_of_token))
    return root / "prepared", streams


def config(corpus_dir, seq_len=16, **kw):
    specs = kw.pop("datasets", [DatasetSpec(str(corpus_dir))])
    return DataConfig(datasets=specs, tokenizer=str(SAMPLE_TOKENIZER), seq_len=seq_len, seed=7, **kw)


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_windows_doc_ids_and_labels_match_the_token_stream(corpus):
    root, streams = corpus
    cfg = config(root, seq_len=16, validation_fraction=0.0, prefetch=0)
    loader = build_train_loader(cfg, micro_batch_size=4, vocab_size=VOCAB)
    names = [s.subset for s in loader.streams]
    assert len(loader.streams[0].shards) > 1  # windows cross shard edges below
    samples = np.arange(200)
    stream_ids, window_ids = loader.order(samples)
    batches = take(loader, 50)
    seen_boundaries = 0
    for k, (s, w) in enumerate(zip(stream_ids, window_ids)):
        tokens, doc_of_token = streams[names[s]]
        window = slice(w * 16, w * 16 + 17)
        batch, row = batches[k // 4], k % 4
        np.testing.assert_array_equal(batch["input_ids"][row].numpy(), tokens[window][:-1])
        docs = doc_of_token[window]
        np.testing.assert_array_equal(batch["doc_ids"][row].numpy(), docs[:-1] - docs[0])
        crosses = docs[1:] != docs[:-1]
        want_labels = np.where(crosses, IGNORE_INDEX, tokens[window][1:])
        np.testing.assert_array_equal(batch["labels"][row].numpy(), want_labels)
        seen_boundaries += int(crosses.sum())
    assert seen_boundaries > 20
    b = batches[0]
    assert b["input_ids"].dtype == torch.int64 and b["labels"].dtype == torch.int64
    assert b["doc_ids"].dtype == torch.int32 and b["input_ids"].shape == (4, 16)


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_feistel_is_a_seeded_permutation(n):
    perm = FeistelPermutation(n, (1, 2, 3))(np.arange(n))
    assert sorted(perm.tolist()) == list(range(n))
    if n > 16:
        other = FeistelPermutation(n, (1, 2, 4))(np.arange(n))
        assert not np.array_equal(perm, other) and not np.array_equal(perm, np.arange(n))


def test_every_epoch_is_a_fresh_permutation_of_all_windows(corpus):
    root, _ = corpus
    cfg = config(root, datasets=[DatasetSpec(str(root), subset="A")], validation_fraction=0.0)
    loader = build_train_loader(cfg, micro_batch_size=1, vocab_size=VOCAB)
    n = loader.order.windows_per_stream[0][1]
    _, windows = loader.order(np.arange(3 * n))
    epochs = windows.reshape(3, n)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(n))
    assert not np.array_equal(epochs[0], epochs[1])


def test_blend_follows_the_weights():
    weights = np.array([0.5, 0.3, 0.15, 0.05])
    stream_of, rank, counts = blend_table(weights, period=10_000)
    np.testing.assert_allclose(counts / 10_000, weights, atol=1e-4)
    for d in range(4):  # every prefix is within one sample of its share
        prefix_counts = np.cumsum(stream_of == d)
        assert np.abs(prefix_counts - weights[d] * np.arange(1, 10_001)).max() <= 1.0
        assert np.array_equal(rank[stream_of == d], np.arange(counts[d]))


def test_weights_mix_subsets(corpus):
    root, _ = corpus
    cfg = config(root, datasets=[DatasetSpec(str(root), weight=3.0, subset="A"),
                                 DatasetSpec(str(root), weight=1.0, subset="B")])
    loader = build_train_loader(cfg, micro_batch_size=1, vocab_size=VOCAB)
    stream_ids, _ = loader.order(np.arange(4000))
    assert np.bincount(stream_ids).tolist() == [3000, 1000]


def _global_rows(batches_by_rank, dp_size):
    """Interleave ranks' micro-batches back into the global sample order (sample k is on rank k % dp)."""
    rows = []
    for step in range(len(batches_by_rank[0])):
        for i in range(batches_by_rank[0][step]["input_ids"].shape[0]):
            for r in range(dp_size):
                rows.append(torch.cat([batches_by_rank[r][step][k][i].to(torch.int64)
                                       for k in ("input_ids", "labels", "doc_ids")]))
    return torch.stack(rows)


@pytest.mark.parametrize("dp_before,dp_after", [(1, 1), (2, 1), (1, 2)])
def test_resume_is_exact_across_data_parallel_sizes(corpus, dp_before, dp_after):
    root, _ = corpus
    cfg = config(root, seq_len=16)
    mbs, steps = 3, 4
    total_batches = 2 * steps * dp_before * dp_after
    reference = _global_rows([take(build_train_loader(cfg, micro_batch_size=mbs, vocab_size=VOCAB), total_batches)],
                             1)

    before = [take(build_train_loader(cfg, micro_batch_size=mbs, vocab_size=VOCAB, dp_rank=r, dp_size=dp_before),
                   steps * dp_after) for r in range(dp_before)]
    consumed = steps * dp_after * mbs * dp_before
    after = [take(build_train_loader(cfg, micro_batch_size=mbs, vocab_size=VOCAB, dp_rank=r, dp_size=dp_after,
                                     consumed_samples=consumed), steps * dp_before) for r in range(dp_after)]
    resumed = torch.cat([_global_rows(before, dp_before), _global_rows(after, dp_after)])
    assert torch.equal(resumed, reference)


def test_prefetch_thread_gives_the_same_batches(corpus):
    root, _ = corpus
    plain = take(build_train_loader(config(root, prefetch=0), micro_batch_size=2, vocab_size=VOCAB), 20)
    ahead = take(build_train_loader(config(root, prefetch=3), micro_batch_size=2, vocab_size=VOCAB), 20)
    for a, b in zip(plain, ahead):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_is_fixed_held_out_and_rank_split(corpus):
    root, streams = corpus
    cfg = config(root, seq_len=8, validation_fraction=0.2)
    val = build_val_loader(cfg, micro_batch_size=2, vocab_size=VOCAB, num_batches=3)
    first, second = list(val), list(val)
    assert len(first) == 3
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, second) for k in a)
    # the held-out windows lie after every training window of their stream
    train = build_train_loader(cfg, micro_batch_size=1, vocab_size=VOCAB)
    for s, (first_window, n) in enumerate(train.order.windows_per_stream):
        total = train.streams[s].num_windows
        assert first_window == 0 and n < total - int(np.ceil(total * 0.2))
    two = [build_val_loader(cfg, micro_batch_size=1, vocab_size=VOCAB, num_batches=3, dp_rank=r, dp_size=2)
           for r in range(2)]
    assert torch.equal(_global_rows([list(v) for v in two], 2), _global_rows([first], 1))



def test_small_validation_set_is_sized_to_what_is_held_out(corpus, capsys):
    root, _ = corpus
    cfg = config(root, seq_len=8, validation_fraction=0.2)
    held_out = build_val_loader(cfg, micro_batch_size=1, vocab_size=VOCAB, num_batches=10_000)
    windows = [tuple(b["input_ids"][0].tolist()) for b in held_out]
    assert "instead of the 10000 of 1 x 1 asked for" in capsys.readouterr().out
    # held-out windows only, none twice, and all of the stream that runs out first
    held_out_by_stream = []
    for stream in build_train_loader(cfg, micro_batch_size=1, vocab_size=VOCAB).streams:
        n = int(np.ceil(stream.num_windows * 0.2))
        contents = []
        for w in range(stream.num_windows - n, stream.num_windows):
            tokens, starts = np.empty(9, np.int64), np.empty(9, np.int32)
            stream.window(w, tokens, starts)
            contents.append(tuple(tokens[:-1].tolist()))
        held_out_by_stream.append(Counter(contents))
    assert not Counter(windows) - sum(held_out_by_stream, Counter())
    assert any(not part - Counter(windows) for part in held_out_by_stream) and len(windows) > 8

    # too few windows for one full batch: one batch of fewer rows, the same windows
    one = build_val_loader(cfg, micro_batch_size=64, vocab_size=VOCAB, num_batches=10)
    assert len(one) == 1
    rows = [tuple(r) for r in next(iter(one))["input_ids"].tolist()]
    assert rows == windows
    # enough for some full batches: fewer batches of full size
    some = list(build_val_loader(cfg, micro_batch_size=4, vocab_size=VOCAB, num_batches=100))
    assert len(some) == len(windows) // 4 and all(b["input_ids"].shape[0] == 4 for b in some)
    # two ranks: each gets half the rows of the same windows, in the usual rank split
    two = [list(build_val_loader(cfg, micro_batch_size=64, vocab_size=VOCAB, num_batches=10, dp_rank=r, dp_size=2))
           for r in range(2)]
    assert [len(v) for v in two] == [1, 1] and two[0][0]["input_ids"].shape[0] == len(windows) // 2
    assert [tuple(r) for r in _global_rows(two, 2)[:, :8].tolist()] == windows[:2 * (len(windows) // 2)]
    capsys.readouterr()
    # asking for no more than there is prints nothing; no batches at all reads no data
    build_val_loader(cfg, micro_batch_size=2, vocab_size=VOCAB, num_batches=2)
    assert capsys.readouterr().out == ""
    assert len(build_val_loader(config(root / "absent"), micro_batch_size=2, vocab_size=VOCAB, num_batches=0)) == 0

    with pytest.raises(DataError, match="validation_fraction = 0 and no data.validation: nothing is held out"):
        build_val_loader(config(root, validation_fraction=0.0), micro_batch_size=2, vocab_size=VOCAB, num_batches=1)


@pytest.mark.parametrize("available, asked, want", [
    (100, (3, 8, 2), (3, 8)),  # enough
    (40, (3, 8, 2), (2, 8)),  # two full batches of 8 x 2
    (15, (3, 8, 2), (1, 7)),  # one batch, 7 rows on each of the two ranks
    (1, (3, 8, 2), (0, 0)),  # fewer windows than ranks
])
def test_validation_size(available, asked, want):
    assert validation_size(available, *asked) == want


def test_explicit_validation_dataset(corpus):
    root, streams = corpus
    cfg = config(root, seq_len=8, validation=[DatasetSpec(str(root), subset="B")])
    batch = next(iter(build_val_loader(cfg, micro_batch_size=2, vocab_size=VOCAB, num_batches=1)))
    tokens_b = streams["B"][0]
    for row in batch["input_ids"].numpy():
        starts = [i for i in range(len(tokens_b) - 8) if np.array_equal(tokens_b[i:i + 8], row)]
        assert any(start % 8 == 0 for start in starts)
    # with an explicit validation set nothing is held out of training
    train = build_train_loader(cfg, micro_batch_size=1, vocab_size=VOCAB)
    assert [n for _, n in train.order.windows_per_stream] == [s.num_windows for s in train.streams]


def test_tokenizer_mismatch_is_refused(corpus, tmp_path):
    root, _ = corpus
    other = tmp_path / "bpe.json"
    from xlstm_train.data.tokenizer import train_byte_level_bpe

    train_byte_level_bpe(random_documents(20, seed=1), other, 300)
    cfg = config(root)
    cfg.tokenizer = str(other)
    with pytest.raises(DataError, match=r"made with tokenizer 'austen_sp4096' .* re-run prepare-data"):
        build_train_loader(cfg, micro_batch_size=2, vocab_size=VOCAB)
    cfg.tokenizer = None  # falls back to the manifest's tokenizer
    tok = load_tokenizer(cfg)
    assert tok.identity["sha256"] == open_tokenizer(SAMPLE_TOKENIZER).identity["sha256"]


def test_token_ids_beyond_the_vocabulary_are_refused(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(DataError, match=r"/A/00000\.bin: holds token id \d+ >= vocab_size 100"):
        build_train_loader(config(root), micro_batch_size=2, vocab_size=100)

    # bytes changed behind the manifest's back: the full hash refuses the shard at once, and with
    # data.verify: size the batch itself is checked
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    shard = copy / "A" / "00000.bin"
    data = np.fromfile(shard, dtype=np.uint16)
    data[:] = 4500
    data.tofile(shard)
    with pytest.raises(DataError, match=r"copy/A/00000\.bin: its SHA-256 is .* but .* records"):
        build_train_loader(config(copy, datasets=[DatasetSpec(str(copy), subset="A")]), micro_batch_size=4,
                           vocab_size=VOCAB)
    loader = build_train_loader(config(copy, validation_fraction=0.0, datasets=[DatasetSpec(str(copy), subset="A")],
                                       verify="size"), micro_batch_size=4, vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"copy/A/0000\d\.bin: window \d+ of .* holds token id 4500 >= vocab_size"):
        take(loader, 50)


def test_damaged_or_missing_shards(corpus, tmp_path):
    import shutil

    root, _ = corpus
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    with open(copy / "B" / "00001.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(DataError, match=r"B/00001\.bin: 10 bytes on disk but the manifest records"):
        build_train_loader(config(copy), micro_batch_size=2, vocab_size=VOCAB)
    (copy / "B" / "00001.bin").unlink()
    with pytest.raises(DataError, match=r"B/00001\.bin: shard file missing"):
        build_train_loader(config(copy), micro_batch_size=2, vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"manifest\.json: not found"):
        build_train_loader(config(tmp_path), micro_batch_size=2, vocab_size=VOCAB)
    with pytest.raises(DataError, match=r"subset = 'C'.*has subsets \['A', 'B'\]"):
        build_train_loader(config(root, datasets=[DatasetSpec(str(root), subset="C")]), micro_batch_size=2,
                           vocab_size=VOCAB)
    with pytest.raises(DataError, match="dp_rank 2 is not in"):
        build_train_loader(config(root), micro_batch_size=2, vocab_size=VOCAB, dp_rank=2, dp_size=2)


def test_data_config_validation():
    from xlstm_train.config import ConfigError, from_dict

    cfg = from_dict(DataConfig, {"datasets": [{"path": "x", "weight": 2, "subset": "RedPajamaC4"}]}, prefix="data")
    assert cfg.datasets[0].subset == "RedPajamaC4"
    with pytest.raises(ConfigError, match=r"data.datasets\[0\].weight = 0.0"):
        from_dict(DataConfig, {"datasets": [{"path": "x", "weight": 0}]}, prefix="data")
    with pytest.raises(ConfigError, match="data.validation_fraction = 1.5"):
        from_dict(DataConfig, {"validation_fraction": 1.5}, prefix="data")
    with pytest.raises(ConfigError, match="data.task = 'sorting'.*parity"):
        from_dict(DataConfig, {"source": "synthetic", "task": "sorting"}, prefix="data")
    no_task = from_dict(DataConfig, {"source": "synthetic"}, prefix="data")
    with pytest.raises(DataError, match="data.task = None: data.source 'synthetic' needs one of"):
        build_train_loader(no_task, micro_batch_size=1, vocab_size=10)


def test_tokenizer_decodes_tensors(corpus):
    tok = open_tokenizer(SAMPLE_TOKENIZER)
    ids = tok.encode("It is a truth universally acknowledged.")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "It is a truth universally acknowledged."


@pytest.mark.gpu
def test_batches_arrive_on_the_gpu_unchanged(corpus):
    root, _ = corpus
    on_cpu = take(build_train_loader(config(root), micro_batch_size=4, vocab_size=VOCAB), 3)
    on_gpu = take(build_train_loader(config(root), micro_batch_size=4, vocab_size=VOCAB, device="cuda"), 3)
    for a, b in zip(on_cpu, on_gpu):
        assert all(b[k].device.type == "cuda" and torch.equal(a[k], b[k].cpu()) for k in a)
    val = build_val_loader(config(root, seq_len=8), micro_batch_size=2, vocab_size=VOCAB, num_batches=2,
                           device="cuda")
    assert all(batch["input_ids"].is_cuda for batch in val)


def _data_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "xlstm-train-data" and t.is_alive()]


def test_close_stops_and_joins_the_prefetch_thread(corpus):
    root, _ = corpus
    before = len(_data_threads())
    loader = build_train_loader(config(root, prefetch=2), micro_batch_size=2, vocab_size=VOCAB)
    batches = iter(loader)
    take(batches, 3)
    assert len(_data_threads()) == before + 1
    loader.close()
    assert len(_data_threads()) == before
    assert list(batches) == []  # an iterator of a closed loader ends
    loader.close()  # idempotent
    with build_train_loader(config(root, prefetch=2), micro_batch_size=2, vocab_size=VOCAB) as loader:
        first, second = iter(loader), iter(loader)  # two iterations: two threads
        take(first, 2)
        take(second, 2)
        assert len(_data_threads()) == before + 2
    assert len(_data_threads()) == before


def test_a_loader_left_open_is_closed_at_interpreter_exit(corpus):
    import subprocess
    import sys
    import textwrap

    root, _ = corpus
    script = textwrap.dedent(f"""
        import atexit, threading

        def check():  # registered first, so it runs after the loader module's own exit handler
            alive = [t for t in threading.enumerate() if t.name == "xlstm-train-data" and t.is_alive()]
            print("data threads alive at exit:", len(alive), flush=True)

        atexit.register(check)
        from xlstm_train.data import build_train_loader
        from xlstm_train.data.config import DataConfig, DatasetSpec
        cfg = DataConfig(datasets=[DatasetSpec({str(root)!r})], seq_len=16, prefetch=2)
        batches = iter(build_train_loader(cfg, micro_batch_size=64, vocab_size={VOCAB}))
        next(batches)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "data threads alive at exit: 0" in result.stdout
