"""The recipe's ``eval`` section: what training evaluates besides its validation loss."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from xlstm_train.config import ConfigError


@dataclass
class EvalConfig:
    # steps between these evaluations; they run with the validation at those steps and at the end.
    # 0: with every validation (train.eval_interval). A multiple of train.eval_interval otherwise.
    interval: int = 0
    # held-out data scored as whole documents (loss, perplexity, bits per byte): prepared dataset
    # directories or raw .txt/.jsonl/.jsonl.zst files, as `xlstm-train eval --data` takes them
    data: list[str] = field(default_factory=list)
    max_documents: int = 64  # per entry of `data`
    window: int | None = None  # tokens per forward pass over a long document (null: data.seq_len)
    tasks: list[str] = field(default_factory=list)  # lm-evaluation-harness task names
    tasks_path: str | None = None  # a folder of extra task YAMLs
    num_fewshot: int | None = None
    limit: int | None = 200  # examples per harness task (null: all)
    # synthetic tasks (data.source: synthetic): accuracy on this many validation samples, at the
    # validation lengths (data.task_options.val_min_len / val_max_len); 0: none during training
    synthetic_samples: int = 512
    kv_pairs: list[int] = field(default_factory=list)  # MQAR: pairs to evaluate at (empty: the trained number)

    def validate(self, prefix: str = "eval") -> None:
        def fail(key: str, allowed: str) -> None:
            raise ConfigError(f"{prefix}.{key} = {getattr(self, key)!r}: expected {allowed}")

        if self.interval < 0:
            fail("interval", ">= 0 (0: with every validation)")
        if self.max_documents < 1:
            fail("max_documents", "an integer >= 1")
        if self.window is not None and self.window < 1:
            fail("window", "null or an integer >= 1")
        if self.limit is not None and self.limit < 1:
            fail("limit", "null or an integer >= 1")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            fail("num_fewshot", "null or an integer >= 0")
        if self.synthetic_samples < 0:
            fail("synthetic_samples", "an integer >= 0 (0: no accuracy during training)")
        if any(n < 1 for n in self.kv_pairs):
            fail("kv_pairs", "positive integers")
        for n, path in enumerate(self.data):
            if not Path(path).exists():
                raise ConfigError(f"{prefix}.data[{n}] = '{path}': no such file or directory; expected a prepared "
                                  "dataset directory or raw .txt/.jsonl/.jsonl.zst files")
        if self.tasks_path is not None and not Path(self.tasks_path).is_dir():
            fail("tasks_path", "a directory of lm-evaluation-harness task YAMLs")
