"""The xLSTM paper's synthetic tasks, generated on the fly.

Formal-language tasks (Deletang et al., "Neural Networks and the Chomsky Hierarchy", as used in the
xLSTM paper): parity, even pairs, cycle navigation, modular arithmetic without and with brackets,
majority, majority count, bucket sort, missing duplicate, solve equation; and multi-query associative
recall (MQAR, Arora et al., "Zoology").

Each sample is one sequence ``question SEP answer`` padded to ``seq_len``: the model reads the
question and is scored only on the answer tokens (every other label is -100). Token 0 is padding,
token 1 the separator, then the task's symbols, then its answer classes (if they are not symbols).

Sample k is drawn from a generator seeded by (seed, split, k), so the stream is a pure function of the
seed: resume from ``consumed_samples`` is exact for any number of data-parallel ranks, and the
validation set (``val_min_len``/``val_max_len`` set its lengths, e.g. longer than training to test
length extrapolation) is the same at every evaluation.

Options (``data.task_options``): ``min_len``/``max_len`` (question lengths, default 3/40),
``val_min_len``/``val_max_len``, ``modulus`` (5, modular arithmetic and solve equation),
``cycle_length`` (5), ``num_symbols`` (majority, majority count, bucket sort, missing duplicate: 5),
MQAR: ``num_kv_pairs`` (8), ``num_queries`` (= num_kv_pairs), ``num_keys``/``num_values`` (64 each),
``context_length`` (unset: the queries follow the pairs back to back; set: as in Zoology, the queries
sit at random places of a sequence of that many tokens, the rest padding).

The metric is accuracy on the answer positions only (``score_answers``), the prediction being the
most likely of the task's possible answers (``Task.answer_choices``), as a classifier over the
task's output symbols would give. The xLSTM paper reports the formal languages as *scaled accuracy*,
``(accuracy - 1/C) / (1 - 1/C)`` for C possible answers: 0 is chance, 1 perfect (``scaled_accuracy``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from xlstm_train.data import IGNORE_INDEX, DataError

PAD, SEP = 0, 1
FIRST_SYMBOL = 2
TRAIN_SPLIT, VAL_SPLIT = 0, 1

_COMMON_OPTIONS = {"min_len": 3, "max_len": 40, "val_min_len": None, "val_max_len": None}


@dataclass
class Sample:
    question: list[int]  # task-local symbol ids (0-based, before the shift by FIRST_SYMBOL)
    answer: list[int]  # task-local ids: symbols, or classes when the task has them
    answer_is_class: bool
    query_slots: list[int] | None = None  # MQAR with a context_length: where each query sits


class Task:
    """A task: its options and vocabulary (symbols + classes); subclasses add ``sample(rng, n) -> Sample``."""

    name: str = ""
    defaults: dict = {}
    num_symbols = 0
    num_classes = 0

    def __init__(self, options: dict):
        known = {**_COMMON_OPTIONS, **self.defaults}
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise DataError(f"data.task_options: unknown option(s) {unknown} for task '{self.name}'; "
                            f"allowed: {', '.join(sorted(known))}")
        merged = {**known, **options}
        for key, value in merged.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise DataError(f"data.task_options.{key} = {value!r}: expected a positive integer")
        self.options = merged
        self.min_len, self.max_len = merged["min_len"], merged["max_len"]
        self.val_min_len = merged["val_min_len"] or self.min_len
        self.val_max_len = merged["val_max_len"] or self.max_len
        for lo, hi, what in ((self.min_len, self.max_len, ""), (self.val_min_len, self.val_max_len, "val_")):
            if lo > hi:
                raise DataError(f"data.task_options: {what}min_len {lo} > {what}max_len {hi}")

    def vocab_size(self) -> int:
        return FIRST_SYMBOL + self.num_symbols + self.num_classes

    def answer_choices(self) -> tuple[int, int]:
        """(first token id, count) of the ids an answer token can take: the classes, or the symbols."""
        if self.num_classes:
            return FIRST_SYMBOL + self.num_symbols, self.num_classes
        return FIRST_SYMBOL, self.num_symbols

    def longest(self) -> int:
        """The longest sequence (question + SEP + answer) any split can produce."""
        return max(self.sequence_length(n) for n in (self.max_len, self.val_max_len))

    def sequence_length(self, n: int) -> int:
        return n + 1 + 1  # question, SEP, a one-token answer

    def encode(self, sample: Sample) -> tuple[list[int], list[int]]:
        """(tokens, answer positions): the full sequence and where its answer tokens sit."""
        question = [FIRST_SYMBOL + s for s in sample.question]
        offset = FIRST_SYMBOL + (self.num_symbols if sample.answer_is_class else 0)
        answer = [offset + a for a in sample.answer]
        start = len(question) + 1
        return question + [SEP] + answer, list(range(start, start + len(answer)))


class Parity(Task):
    """Is the number of b's (symbol 1) in a string over {a, b} odd? Classes: 0 even, 1 odd."""

    name, num_symbols, num_classes = "parity", 2, 2

    def sample(self, rng, n):
        bits = rng.integers(0, 2, n).tolist()
        return Sample(bits, [sum(bits) % 2], True)


class EvenPairs(Task):
    """Is the number of "ab" plus "ba" substrings even? (It is exactly when first and last agree.)"""

    name, num_symbols, num_classes = "even_pairs", 2, 2

    def sample(self, rng, n):
        bits = rng.integers(0, 2, n).tolist()
        changes = sum(a != b for a, b in zip(bits, bits[1:]))
        return Sample(bits, [1 - changes % 2], True)  # class 1: even


class CycleNavigation(Task):
    """Moves on a cycle (0: stay, 1: forward, 2: back) from position 0; class: the final position."""

    name = "cycle_navigation"
    defaults = {"cycle_length": 5}
    num_symbols = 3

    @property
    def num_classes(self):
        return self.options["cycle_length"]

    def sample(self, rng, n):
        moves = rng.integers(0, 3, n).tolist()
        position = sum({0: 0, 1: 1, 2: -1}[m] for m in moves) % self.options["cycle_length"]
        return Sample(moves, [position], True)


class _Arithmetic(Task):
    """Symbols: digits 0..modulus-1, then + - * ( ) x =; classes: the residues."""

    defaults = {"modulus": 5}
    OPS = "+-*"

    @property
    def m(self):
        return self.options["modulus"]

    @property
    def num_symbols(self):
        return self.m + 6

    @property
    def num_classes(self):
        return self.m

    def symbol(self, ch: str) -> int:
        return int(ch) if ch.isdigit() else self.m + "+-*()x=".index(ch)

    def text_of(self, question: list[int]) -> str:
        return "".join(str(s) if s < self.m else "+-*()x="[s - self.m] for s in question)


def evaluate_mod(tokens: list[str], modulus: int) -> int:
    """Value of an expression of digits, + - * and brackets, with * binding tighter; mod ``modulus``."""
    pos = 0

    def expr():
        nonlocal pos
        value = term()
        while pos < len(tokens) and tokens[pos] in "+-":
            op = tokens[pos]
            pos += 1
            value = value + term() if op == "+" else value - term()
        return value % modulus

    def term():
        nonlocal pos
        value = factor()
        while pos < len(tokens) and tokens[pos] == "*":
            pos += 1
            value = value * factor()
        return value % modulus

    def factor():
        nonlocal pos
        token = tokens[pos]
        pos += 1
        if token == "(":
            value = expr()
            pos += 1  # ")"
            return value
        return int(token)

    return expr()


class ModularArithmetic(_Arithmetic):
    """``d op d op ... d`` (no brackets, * before + and -), class: its value mod ``modulus``."""

    name = "modular_arithmetic"

    def sample(self, rng, n):
        terms = max(1, (n + 1) // 2)  # n tokens: terms digits and terms - 1 operators
        chars = [str(rng.integers(0, self.m))]
        for _ in range(terms - 1):
            chars += [_Arithmetic.OPS[rng.integers(0, 3)], str(rng.integers(0, self.m))]
        return Sample([self.symbol(c) for c in chars], [evaluate_mod(chars, self.m)], True)


def _bracketed_expression(rng, leaves: list[str], ops: str) -> list[str]:
    """A random binary expression over ``leaves`` in order; every operation but the outermost is bracketed."""

    def build(items, outer):
        if len(items) == 1:
            return [items[0]]
        split = int(rng.integers(1, len(items)))
        inner = build(items[:split], False) + [ops[rng.integers(0, len(ops))]] + build(items[split:], False)
        return inner if outer else ["(", *inner, ")"]

    return build(leaves, True)


def _leaves_for_length(n: int) -> int:
    # k leaves in this form take 4k - 5 tokens (k digits, k - 1 operators, k - 2 bracket pairs), k >= 2
    return max(1, (n + 5) // 4)


class ModularArithmeticBrackets(ModularArithmetic):
    """A bracketed expression over + - *, class: its value mod ``modulus``."""

    name = "modular_arithmetic_brackets"

    def sample(self, rng, n):
        leaves = [str(d) for d in rng.integers(0, self.m, _leaves_for_length(n))]
        chars = _bracketed_expression(rng, leaves, _Arithmetic.OPS)
        return Sample([self.symbol(c) for c in chars], [evaluate_mod(chars, self.m)], True)

    def sequence_length(self, n):
        k = _leaves_for_length(n)
        return (4 * k - 5 if k > 1 else 1) + 2


class SolveEquation(ModularArithmeticBrackets):
    """``expression(x) = r`` over + and - (so x has one solution mod ``modulus``); class: x."""

    name = "solve_equation"

    def sample(self, rng, n):
        k = _leaves_for_length(n)
        leaves = [str(d) for d in rng.integers(0, self.m, k)]
        leaves[int(rng.integers(0, k))] = "x"
        chars = _bracketed_expression(rng, leaves, "+-")
        x = int(rng.integers(0, self.m))
        result = evaluate_mod([str(x) if c == "x" else c for c in chars], self.m)
        return Sample([self.symbol(c) for c in chars + ["=", str(result)]], [x], True)

    def sequence_length(self, n):
        return super().sequence_length(n) + 2


class Majority(Task):
    """The most frequent symbol (ties: the smallest one)."""

    name = "majority"
    defaults = {"num_symbols": 5}

    @property
    def num_symbols(self):
        return self.options["num_symbols"]

    def sample(self, rng, n):
        seq = rng.integers(0, self.num_symbols, n)
        return Sample(seq.tolist(), [int(np.bincount(seq, minlength=self.num_symbols).argmax())], False)


class MajorityCount(Majority):
    """How often the most frequent symbol occurs; classes 0..max length."""

    name = "majority_count"

    @property
    def num_classes(self):
        return max(self.max_len, self.val_max_len) + 1

    def sample(self, rng, n):
        seq = rng.integers(0, self.num_symbols, n)
        return Sample(seq.tolist(), [int(np.bincount(seq).max())], True)


class BucketSort(Majority):
    """The string sorted; the answer is as long as the question."""

    name = "bucket_sort"

    def sample(self, rng, n):
        seq = rng.integers(0, self.num_symbols, n)
        return Sample(seq.tolist(), sorted(seq.tolist()), False)

    def sequence_length(self, n):
        return 2 * n + 1


class MissingDuplicate(Majority):
    """``w w`` with one symbol of the second copy masked; the answer is the masked symbol."""

    name = "missing_duplicate"

    @property
    def num_symbols(self):
        return self.options["num_symbols"] + 1  # the last symbol is the mask

    def sample(self, rng, n):
        half = rng.integers(0, self.options["num_symbols"], max(1, n // 2)).tolist()
        masked = int(rng.integers(0, len(half)))
        second = list(half)
        second[masked] = self.options["num_symbols"]
        return Sample(half + second, [half[masked]], False)

    def sequence_length(self, n):
        return 2 * max(1, n // 2) + 2

    def answer_choices(self):
        return FIRST_SYMBOL, self.options["num_symbols"]  # not the mask symbol


class MultiQueryAssociativeRecall(Task):
    """Key-value pairs, then queries of keys each followed by its value; scored on every value."""

    name = "mqar"
    defaults = {"num_kv_pairs": 8, "num_queries": None, "num_keys": 64, "num_values": 64, "context_length": None}

    def __init__(self, options):
        super().__init__(options)
        o = self.options
        self.num_queries = o["num_queries"] or o["num_kv_pairs"]
        if o["num_kv_pairs"] > o["num_keys"]:
            raise DataError(f"data.task_options.num_kv_pairs = {o['num_kv_pairs']}: at most num_keys "
                            f"({o['num_keys']}) distinct keys exist")
        if o["context_length"] is not None and self._query_slots() < self.num_queries:
            raise DataError(f"data.task_options.context_length = {o['context_length']}: too short for "
                            f"{o['num_kv_pairs']} key-value pairs and {self.num_queries} queries; "
                            f"it needs at least {2 * o['num_kv_pairs'] + 1 + 2 * self.num_queries}")

    @property
    def num_symbols(self):
        return self.options["num_keys"] + self.options["num_values"]

    def answer_choices(self):
        return FIRST_SYMBOL + self.options["num_keys"], self.options["num_values"]

    def _query_slots(self) -> int:
        """Places for a (key, value) query after the pairs and the separator, within context_length."""
        return (self.options["context_length"] - 2 * self.options["num_kv_pairs"] - 1) // 2

    def longest(self):
        if self.options["context_length"] is not None:
            return 2 * self.options["num_kv_pairs"] + 1 + 2 * self._query_slots()
        return 2 * self.options["num_kv_pairs"] + 1 + 2 * self.num_queries

    def sample(self, rng, n):
        o = self.options
        keys = rng.choice(o["num_keys"], o["num_kv_pairs"], replace=False)
        values = o["num_keys"] + rng.integers(0, o["num_values"], o["num_kv_pairs"])
        context = np.stack([keys, values], axis=1).reshape(-1).tolist()
        asked = rng.integers(0, o["num_kv_pairs"], self.num_queries)
        sample = Sample(context, [int(x) for q in asked for x in (keys[q], values[q])], False)
        if o["context_length"] is not None:
            sample.query_slots = sorted(rng.choice(self._query_slots(), self.num_queries, replace=False).tolist())
        return sample

    def encode(self, sample):
        tokens, positions = super().encode(sample)
        if sample.query_slots is None:
            return tokens, positions[1::2]  # scored on the values; the query keys are given
        head = len(sample.question) + 1
        spread = tokens[:head] + [PAD] * (2 * self._query_slots())
        for n, slot in enumerate(sample.query_slots):
            spread[head + 2 * slot : head + 2 * slot + 2] = tokens[head + 2 * n : head + 2 * n + 2]
        return spread, [head + 2 * slot + 1 for slot in sample.query_slots]


TASKS: dict[str, type[Task]] = {cls.name: cls for cls in (
    Parity, EvenPairs, CycleNavigation, ModularArithmetic, ModularArithmeticBrackets, Majority, MajorityCount,
    BucketSort, MissingDuplicate, SolveEquation, MultiQueryAssociativeRecall)}


@dataclass
class AnswerCounts:
    """Correct answer tokens and wholly correct sequences, summed over batches."""

    correct_tokens: int = 0
    tokens: int = 0
    correct_sequences: int = 0
    sequences: int = 0

    def __iadd__(self, other: AnswerCounts) -> AnswerCounts:
        self.correct_tokens += other.correct_tokens
        self.tokens += other.tokens
        self.correct_sequences += other.correct_sequences
        self.sequences += other.sequences
        return self

    def metrics(self, num_choices: int) -> dict:
        accuracy = self.correct_tokens / max(self.tokens, 1)
        return {"accuracy": accuracy, "scaled_accuracy": scaled_accuracy(accuracy, num_choices),
                "sequence_accuracy": self.correct_sequences / max(self.sequences, 1), "answers": self.tokens}


def score_answers(logits: torch.Tensor, labels: torch.Tensor, choices: tuple[int, int]) -> AnswerCounts:
    """Accuracy counts at the answer positions (``labels != IGNORE_INDEX``) of ``logits`` ``(B, S, V)``;
    the prediction is the most likely id among ``choices`` = (first id, count)."""
    first, count = choices
    scored = labels != IGNORE_INDEX
    predicted = logits[..., first:first + count].argmax(dim=-1) + first
    right = (predicted == labels) & scored
    has_answer = scored.any(dim=1)
    whole = (right | ~scored).all(dim=1) & has_answer
    return AnswerCounts(int(right.sum()), int(scored.sum()), int(whole.sum()), int(has_answer.sum()))


def scaled_accuracy(accuracy: float, num_choices: int) -> float:
    """Accuracy rescaled so that chance (1 / num_choices) is 0 and perfect is 1."""
    chance = 1.0 / num_choices
    return (accuracy - chance) / (1.0 - chance) if num_choices > 1 else accuracy


def make_task(data_cfg) -> Task:
    if data_cfg.task not in TASKS:
        raise DataError(f"data.task = {data_cfg.task!r}: data.source 'synthetic' needs one of "
                        f"{', '.join(sorted(TASKS))}")
    return TASKS[data_cfg.task](dict(data_cfg.task_options))


def task_vocab_size(data_cfg) -> int:
    """The vocabulary a model needs for ``data_cfg``'s task."""
    return make_task(data_cfg).vocab_size()


class SyntheticBatches:
    """Micro-batches of one split: sample k of the split comes from a generator seeded by (seed, split, k)."""

    def __init__(self, task: Task, seq_len: int, seed: int, split: int):
        if task.longest() > seq_len + 1:
            raise DataError(f"data.seq_len = {seq_len}: task '{task.name}' produces sequences of up to "
                            f"{task.longest()} tokens; set data.seq_len >= {task.longest() - 1}")
        self.task, self.seq_len, self.seed, self.split = task, seq_len, seed, split
        self.min_len, self.max_len = ((task.min_len, task.max_len) if split == TRAIN_SPLIT
                                      else (task.val_min_len, task.val_max_len))

    def sample(self, k: int) -> tuple[list[int], list[int]]:
        rng = np.random.default_rng([self.seed, self.split, k])
        n = int(rng.integers(self.min_len, self.max_len + 1))
        return self.task.encode(self.task.sample(rng, n))

    def batch(self, samples) -> dict:
        input_ids = np.full((len(samples), self.seq_len), PAD, dtype=np.int64)
        labels = np.full((len(samples), self.seq_len), IGNORE_INDEX, dtype=np.int64)
        for row, k in enumerate(samples):
            tokens, answer_positions = self.sample(int(k))
            input_ids[row, :len(tokens) - 1] = tokens[:-1]
            for p in answer_positions:  # the token at p is predicted from position p - 1
                labels[row, p - 1] = tokens[p]
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "doc_ids": torch.zeros(input_ids.shape, dtype=torch.int32)}


def _checked_task(data_cfg, vocab_size: int) -> Task:
    task = make_task(data_cfg)
    if task.vocab_size() > vocab_size:
        raise DataError(f"task '{task.name}' needs vocab_size >= {task.vocab_size()}, the model has {vocab_size}")
    return task


def build_synthetic_loader(data_cfg, *, micro_batch_size, vocab_size, dp_rank, dp_size, consumed_samples, device):
    batches = SyntheticBatches(_checked_task(data_cfg, vocab_size), data_cfg.seq_len, data_cfg.seed, TRAIN_SPLIT)
    device = torch.device(device)

    def generate():
        step = 0
        while True:
            base = consumed_samples + step * micro_batch_size * dp_size + dp_rank
            batch = batches.batch(base + dp_size * np.arange(micro_batch_size))
            yield {k: v.to(device) for k, v in batch.items()}
            step += 1

    return generate()


class _SyntheticValidation:
    def __init__(self, batches, num_batches, micro_batch_size, dp_rank, dp_size, device):
        per_step = micro_batch_size * dp_size
        self._batches = [batches.batch(b * per_step + dp_rank + dp_size * np.arange(micro_batch_size))
                         for b in range(num_batches)]
        self.device = torch.device(device)

    def __len__(self):
        return len(self._batches)

    def __iter__(self):
        for batch in self._batches:
            yield {k: v.to(self.device) for k, v in batch.items()}


def build_synthetic_val_loader(data_cfg, *, micro_batch_size, vocab_size, num_batches, dp_rank, dp_size, device):
    batches = SyntheticBatches(_checked_task(data_cfg, vocab_size), data_cfg.seq_len, data_cfg.seed, VAL_SPLIT)
    return _SyntheticValidation(batches, num_batches, micro_batch_size, dp_rank, dp_size, device)
