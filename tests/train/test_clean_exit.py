"""A finished run exits cleanly: exit code 0 and no abort while the interpreter shuts down.

Issue #21 saw about one run in 25-40 end with ``terminate called without an active exception``
(exit 134) after its final checkpoint, with the data loader's prefetch thread still running. The
trainer now closes its loaders; this test repeats short runs of the tiny recipe, each in its own
interpreter (the abort happens at interpreter exit), for as long as its time budget allows. CI time
buys only a handful of runs; docs/operations.md gives the count of a longer loop.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUDGET_S = 50  # runs start while this much time has not passed
MIN_RUNS = 3

# The tiny recipe, reduced: its data, prefetch thread, tokenizer, an sLSTM block, a validation, a
# checkpoint (the abort came after the last one) and a few sampled tokens.
OVERRIDES = ["model.num_blocks=2", "model.slstm_at=[1]", "model.embedding_dim=32", "model.chunk_size=16",
             "data.seq_len=32", "data.verify=size", "train.steps=2", "train.micro_batch_size=2",
             "train.eval_interval=2", "train.eval_batches=1", "train.sample_tokens=2", "logging.wandb=disabled",
             "checkpoint.interval=0"]  # fmt: skip


def test_short_runs_exit_cleanly(tmp_path):
    started = time.monotonic()
    runs = 0
    while runs < MIN_RUNS or time.monotonic() - started < BUDGET_S:
        run_dir = tmp_path / f"run{runs}"
        proc = subprocess.run(
            [sys.executable, "-m", "xlstm_train.cli", "train", f"run_dir={run_dir}", *OVERRIDES],
            cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        runs += 1
        assert "terminate called" not in proc.stderr, f"run {runs}: {proc.stderr[-3000:]}"
        assert proc.returncode == 0, f"run {runs}: exit code {proc.returncode}\n{proc.stderr[-3000:]}"
        assert (run_dir / "step-0000002").is_dir()
    print(f"{runs} runs exited cleanly in {time.monotonic() - started:.0f} s")
