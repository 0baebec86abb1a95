"""Accuracy on the synthetic tasks' answer positions, on the validation split's lengths.

The validation split has its own lengths (``val_min_len``/``val_max_len``), so a model trained on
short sequences is evaluated on longer ones, as in the paper's length-extrapolation experiments
(trained on lengths 3-40, evaluated on 40-256). MQAR is evaluated once per number of key-value pairs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import numpy as np
import torch

from xlstm_train.config import ConfigError
from xlstm_train.data import IGNORE_INDEX
from xlstm_train.data.synthetic import VAL_SPLIT, AnswerCounts, SyntheticBatches, make_task, score_answers
from xlstm_train.eval.perplexity import NonFiniteScoreWarning


def with_task_options(data_cfg, **options):
    """A copy of ``data_cfg`` whose task options are updated by the non-None ``options``."""
    merged = {**data_cfg.task_options, **{k: v for k, v in options.items() if v is not None}}
    return dataclasses.replace(data_cfg, task_options=merged)


@torch.no_grad()
def task_accuracy(model, data_cfg, *, num_samples: int = 1024, batch_size: int = 64, max_len: int | None = None,
                  autocast=contextlib.nullcontext) -> dict:
    """Accuracy, scaled accuracy and whole-sequence accuracy on ``num_samples`` validation samples."""
    task = make_task(data_cfg)
    seq_len = task.longest() - 1
    if max_len is not None and seq_len > max_len:
        raise ConfigError(f"task '{task.name}' at validation lengths up to {task.val_max_len} needs sequences "
                          f"of {seq_len} tokens; the model takes at most model.max_seq_len = {max_len}")
    batches = SyntheticBatches(task, seq_len, data_cfg.seed, VAL_SPLIT)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    counts = AnswerCounts()
    non_finite = 0  # answer positions whose logits hold NaN or an infinity
    first_id, num_choices = task.answer_choices()
    try:
        for first in range(0, num_samples, batch_size):
            batch = batches.batch(np.arange(first, min(first + batch_size, num_samples)))
            with autocast():
                logits = model(batch["input_ids"].to(device))
            labels = batch["labels"].to(device)
            counts += score_answers(logits, labels, task.answer_choices())
            answer_logits = logits[..., first_id:first_id + num_choices]
            non_finite += int((~torch.isfinite(answer_logits).all(dim=-1) & (labels != IGNORE_INDEX)).sum())
    finally:
        model.train(was_training)
    metrics = counts.metrics(num_choices)
    if non_finite:
        # an argmax over NaN is no prediction: the accuracies are reported as nan, not as a count
        warnings.warn(f"task '{task.name}': {non_finite} of {counts.tokens} answer positions have NaN or infinite "
                      "logits (reported as nan accuracy): the model's weights have diverged or were damaged",
                      NonFiniteScoreWarning, stacklevel=2)
        metrics.update(accuracy=math.nan, scaled_accuracy=math.nan, sequence_accuracy=math.nan)
    return {"task": task.name, "min_len": task.val_min_len, "max_len": task.val_max_len, **metrics}


def evaluate_synthetic(model, data_cfg, *, num_samples: int = 1024, batch_size: int = 64, max_len: int | None = None,
                       autocast=contextlib.nullcontext, kv_pairs: list[int] | None = None) -> dict:
    """``{name: metrics}``: the task, or for MQAR one entry ``kv<N>`` per number of key-value pairs
    in ``kv_pairs`` (default: the configured one)."""
    if data_cfg.task == "mqar":
        counts = kv_pairs or [make_task(data_cfg).options["num_kv_pairs"]]
        results = {}
        for n in counts:
            # num_queries follows the pairs unless the recipe fixed it
            cfg = with_task_options(data_cfg, num_kv_pairs=n)
            results[f"mqar_kv{n}"] = task_accuracy(model, cfg, num_samples=num_samples, batch_size=batch_size,
                                                   max_len=max_len, autocast=autocast)
        return results
    if kv_pairs:
        raise ConfigError(f"--kv-pairs applies to MQAR only; this checkpoint's task is '{data_cfg.task}'")
    return {data_cfg.task: task_accuracy(model, data_cfg, num_samples=num_samples, batch_size=batch_size,
                                         max_len=max_len, autocast=autocast)}
