"""The evaluations a recipe's ``eval`` section asks for during training.

The trainer calls ``run_training_evals`` with every validation; it returns flat metrics
(``eval/<data>/loss``, ``eval/<task>/<metric>``, ``eval/<task>/accuracy`` ...) for the metrics
logger, or nothing when no evaluation is due. Every rank calls it (FSDP's gathers need all of them)
and computes the same numbers. Held-out documents are read once per process and kept.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn

from xlstm_train.eval.loading import LoadedModel


def evals_due(cfg, step: int, final: bool) -> bool:
    ev = cfg.eval
    wanted = ev.data or ev.tasks or (cfg.data.source == "synthetic" and ev.synthetic_samples > 0)
    return bool(wanted) and (final or ev.interval == 0 or step % ev.interval == 0)


@functools.lru_cache(maxsize=16)
def _documents(path: str, tokenizer, max_documents: int):
    from xlstm_train.eval.perplexity import read_documents

    return read_documents(path, tokenizer, max_documents)


def _name(path: str) -> str:
    p = Path(path)
    return p.name.split(".")[0] or str(p)


def run_training_evals(model: nn.Module, cfg, step: int, *, tokenizer, device: torch.device,
                       final: bool = False) -> dict[str, float]:
    """The ``eval`` section's metrics at ``step``; {} when none is due (or under tensor parallelism,
    whose vocabulary-sharded logits these evaluations do not take)."""
    if not evals_due(cfg, step, final):
        return {}
    if cfg.parallel.tp > 1:
        warnings.warn("eval: the recipe's eval section is skipped under tensor parallelism (parallel.tp > 1)",
                      stacklevel=2)
        return {}
    loaded = LoadedModel(model, tokenizer, cfg, torch.device(device), checkpoint=Path(f"step {step}"))
    ev = cfg.eval
    metrics: dict[str, float] = {}
    was_training = model.training
    model.eval()
    try:
        if cfg.data.source == "synthetic" and ev.synthetic_samples > 0:
            from xlstm_train.eval.synthetic import evaluate_synthetic

            results = evaluate_synthetic(model, cfg.data, num_samples=ev.synthetic_samples, max_len=loaded.max_len,
                                         autocast=loaded.autocast, kv_pairs=ev.kv_pairs or None)
            for name, values in results.items():
                for key in ("accuracy", "scaled_accuracy", "sequence_accuracy"):
                    metrics[f"eval/{name}/{key}"] = values[key]
        for path in ev.data:
            from xlstm_train.eval.perplexity import evaluate_documents

            documents = _documents(path, tokenizer, ev.max_documents)
            values = evaluate_documents(loaded, documents, window=ev.window, label=f"eval {path}", show_progress=False)
            for key in ("loss", "perplexity", "bits_per_byte"):
                metrics[f"eval/{_name(path)}/{key}"] = values[key]
        if ev.tasks:
            from xlstm_train.eval.harness import run_harness_tasks

            results = run_harness_tasks(loaded, list(ev.tasks), include_path=ev.tasks_path,
                                        num_fewshot=ev.num_fewshot, limit=ev.limit)
            for task, values in results.items():
                for key, value in values.items():
                    metrics[f"eval/{task}/{key}"] = float(value)
    finally:
        model.train(was_training)
    return metrics
