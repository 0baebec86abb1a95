"""Launch behaviour: an error on one rank ends the whole job with that rank named."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.parallel.harness import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def test_error_on_one_rank_stops_the_job_and_names_the_rank():
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
         f"--master-port={free_port()}", "--max-restarts=0", str(HERE / "rank_failure.py")],
        cwd=REPO, capture_output=True, text=True, timeout=100, check=False,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "[rank 1] ValueError: shard 7 is corrupt" in proc.stderr, proc.stderr[-3000:]
    # rank 0 was waiting in a barrier with a 120 s timeout: the launcher stopped it long before
    assert elapsed < 60, f"the job took {elapsed:.0f} s to stop"
