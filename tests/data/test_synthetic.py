import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from xlstm_train.data import DataError, build_train_loader, build_val_loader
from xlstm_train.data.config import DataConfig
from xlstm_train.data.synthetic import FIRST_SYMBOL, IGNORE_INDEX, PAD, SEP, TASKS, make_task, task_vocab_size


def cfg_for(task, seq_len=128, **options):
    return DataConfig(source="synthetic", task=task, task_options=options, seq_len=seq_len, seed=3)


def decoded_samples(task, n_batches=25, mbs=8, **options):
    """(question symbols, answer ids, task) for generated samples, read back from the batches."""
    cfg = cfg_for(task, **options)
    t = make_task(cfg)
    vocab = task_vocab_size(cfg)
    out = []
    for batch in itertools.islice(build_train_loader(cfg, micro_batch_size=mbs, vocab_size=vocab), n_batches):
        assert batch["input_ids"].max() < vocab and (batch["doc_ids"] == 0).all()
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            sep = ids.index(SEP)
            question = [x - FIRST_SYMBOL for x in ids[:sep]]
            scored = [(p, y) for p, y in enumerate(labels) if y != IGNORE_INDEX]
            # labels are the next tokens: wherever an answer token is also an input, they agree
            for p, y in scored:
                if p + 1 < len(ids) and ids[p + 1] != PAD:
                    assert ids[p + 1] == y
            assert all(p >= sep for p, _ in scored)
            out.append((question, [y for _, y in scored], ids[sep + 1:], t))
    return out


def as_class(task, y):
    return y - FIRST_SYMBOL - task.num_symbols


def as_symbol(y):
    return y - FIRST_SYMBOL


def test_parity_labels_are_parities():
    for q, ans, _, t in decoded_samples("parity"):
        assert set(q) <= {0, 1} and 3 <= len(q) <= 40
        assert [as_class(t, y) for y in ans] == [q.count(1) % 2]


def test_even_pairs_counts_ab_and_ba():
    for q, ans, _, t in decoded_samples("even_pairs"):
        s = "".join("ab"[x] for x in q)
        pairs = sum(s[i:i + 2] in ("ab", "ba") for i in range(len(s) - 1))
        assert as_class(t, ans[0]) == int(pairs % 2 == 0)


def test_cycle_navigation_ends_where_the_walk_ends():
    for q, ans, _, t in decoded_samples("cycle_navigation", cycle_length=7):
        position = 0
        for move in q:
            position = {0: position, 1: (position + 1) % 7, 2: (position - 1) % 7}[move]
        assert as_class(t, ans[0]) == position


def _expression(t, q):
    return t.text_of(q)


@pytest.mark.parametrize("task", ["modular_arithmetic", "modular_arithmetic_brackets"])
def test_modular_arithmetic_is_python_arithmetic_mod_m(task):
    brackets = 0
    for q, ans, _, t in decoded_samples(task, modulus=7):
        text = _expression(t, q)
        assert set(text) <= set("0123456+-*()")
        brackets += text.count("(")
        assert as_class(t, ans[0]) == eval(text) % 7  # Python: * binds tighter, brackets first
    assert (brackets > 0) == (task == "modular_arithmetic_brackets")


def test_solve_equation_answer_is_the_unique_solution():
    for q, ans, _, t in decoded_samples("solve_equation"):
        lhs, rhs = _expression(t, q).split("=")
        assert lhs.count("x") == 1
        solutions = [x for x in range(5) if eval(lhs.replace("x", str(x))) % 5 == int(rhs)]
        assert solutions == [as_class(t, ans[0])]


def test_majority_and_majority_count():
    for q, ans, _, t in decoded_samples("majority", num_symbols=4):
        counts = Counter(q)
        best = max(counts.values())
        assert as_symbol(ans[0]) == min(s for s, c in counts.items() if c == best)
    for q, ans, _, t in decoded_samples("majority_count"):
        assert as_class(t, ans[0]) == max(Counter(q).values())


def test_bucket_sort_answers_the_sorted_string():
    for q, ans, _, t in decoded_samples("bucket_sort", seq_len=96):
        assert [as_symbol(y) for y in ans] == sorted(q)


def test_missing_duplicate_answers_the_masked_symbol():
    for q, ans, _, t in decoded_samples("missing_duplicate"):
        half = len(q) // 2
        first, second = q[:half], q[half:]
        mask = t.options["num_symbols"]
        assert second.count(mask) == 1 and mask not in first
        i = second.index(mask)
        assert first[:i] + first[i + 1:] == second[:i] + second[i + 1:]
        assert as_symbol(ans[0]) == first[i]


def test_mqar_values_are_recalled_from_the_context():
    for q, ans, after_sep, t in decoded_samples("mqar", num_kv_pairs=6, num_queries=4):
        pairs = dict(zip(q[0::2], q[1::2]))
        assert len(pairs) == 6 and all(k < 64 <= v for k, v in pairs.items())
        queries = [as_symbol(x) for x in after_sep[0::2]][:4]
        assert [as_symbol(y) for y in ans] == [pairs[k] for k in queries]


def test_resume_and_data_parallel_give_the_same_global_samples():
    cfg = cfg_for("bucket_sort", seq_len=96)
    vocab = task_vocab_size(cfg)
    single = list(itertools.islice(build_train_loader(cfg, micro_batch_size=4, vocab_size=vocab), 4))
    resumed = next(iter(build_train_loader(cfg, micro_batch_size=4, vocab_size=vocab, consumed_samples=8)))
    assert torch.equal(resumed["input_ids"], single[2]["input_ids"])
    ranks = [next(iter(build_train_loader(cfg, micro_batch_size=2, vocab_size=vocab, dp_rank=r, dp_size=2)))
             for r in range(2)]
    interleaved = torch.stack([ranks[k % 2]["labels"][k // 2] for k in range(4)])
    assert torch.equal(interleaved, single[0]["labels"])


def test_validation_uses_its_own_lengths_and_is_fixed():
    cfg = cfg_for("parity", seq_len=300, val_min_len=100, val_max_len=256)
    vocab = task_vocab_size(cfg)
    val = build_val_loader(cfg, micro_batch_size=4, vocab_size=vocab, num_batches=3)
    first, second = list(val), list(val)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, second))
    lengths = [row.tolist().index(SEP) for b in first for row in b["input_ids"]]
    assert min(lengths) >= 100 and max(lengths) <= 256
    train = next(iter(build_train_loader(cfg, micro_batch_size=4, vocab_size=vocab)))
    assert max(row.tolist().index(SEP) for row in train["input_ids"]) <= 40


def test_bad_task_settings():
    with pytest.raises(DataError, match="seq_len = 20: task 'bucket_sort' produces sequences of up to 81"):
        next(iter(build_train_loader(cfg_for("bucket_sort", seq_len=20), micro_batch_size=1, vocab_size=100)))
    with pytest.raises(DataError, match="needs vocab_size >= 48"):
        build_train_loader(cfg_for("majority_count"), micro_batch_size=1, vocab_size=10)
    with pytest.raises(DataError, match=r"unknown option\(s\) \['modulus'\] for task 'parity'"):
        task_vocab_size(cfg_for("parity", modulus=3))
    with pytest.raises(DataError, match="min_len 50 > max_len 40"):
        task_vocab_size(cfg_for("parity", min_len=50))
    with pytest.raises(DataError, match="num_kv_pairs = 80"):
        task_vocab_size(cfg_for("mqar", num_kv_pairs=80))


def test_every_listed_task_is_available():
    assert set(TASKS) == {"parity", "even_pairs", "cycle_navigation", "modular_arithmetic",
                          "modular_arithmetic_brackets", "majority", "majority_count", "bucket_sort",
                          "missing_duplicate", "solve_equation", "mqar"}
    sizes = {name: task_vocab_size(cfg_for(name)) for name in TASKS}
    assert sizes["parity"] == 2 + 2 + 2 and sizes["mqar"] == 2 + 128
    assert np.all(np.array(list(sizes.values())) > 2)
