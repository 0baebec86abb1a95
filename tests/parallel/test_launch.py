"""Launch behaviour: an error on one rank ends the whole job with that rank named; a two-node
torchrun launch (simulated on localhost) trains, and its checkpoint resumes in other layouts; the
DeepSpeed launcher script trains and saves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.parallel.harness import free_port
from xlstm_train.cli import main as cli_main

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
# the launch scripts call entry points (torchrun, deepspeed, xlstm-train) installed beside python
PATH = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"


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


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def test_two_node_launch_then_resume_under_tp_and_on_one_process(tmp_path):
    """Two torchrun "nodes" on localhost train with FSDP dp=2 (saving asynchronously); the step-2
    checkpoint then resumes under TP=2 and on one process, and both continue with the same losses
    (the same global batch, the same data position)."""
    tiny = ["train.eval_interval=0", "train.sample_tokens=0", "logging.wandb=disabled", "logging.interval=1",
            "data.seq_len=64", "train.steps=4", "checkpoint.interval=2", "model.slstm_at=[1]",
            "model.num_blocks=2"]  # fmt: skip
    env = {**os.environ, "PATH": PATH, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NNODES": "2",
           "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "LOG_DIR": str(tmp_path / "logs")}  # fmt: skip
    first = tmp_path / "dp2"
    nodes = [
        subprocess.Popen(["bash", str(REPO / "launch" / "torchrun.sh"), f"run_dir={first}",
                          "checkpoint.async_save=true", *tiny],
                         cwd=REPO, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "16 x 64 tokens per step on 2 process(es)" in outputs[0]
    # one DCP shard file per rank: a two-process save
    assert sorted(p.name for p in (first / "step-0000004").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    expected = _train_losses(first)

    # the same global batch of 16 sequences: 16 per data-parallel rank now that dp = 1
    resume = [f"checkpoint.resume={first / 'step-0000002'}", "train.micro_batch_size=16", *tiny]
    tp_run = tmp_path / "tp2"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
         "xlstm-train", "train", f"run_dir={tp_run}", "parallel.tp=2", *resume],
        cwd=REPO, env={**os.environ, "PATH": PATH, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = tmp_path / "single"
    assert cli_main(["train", f"run_dir={single}", *resume]) == 0
    for run in (tp_run, single):
        losses = _train_losses(run)
        assert sorted(losses) == [3, 4]
        for step, loss in losses.items():
            assert abs(loss - expected[step]) <= 1e-5 * abs(expected[step]), (run.name, losses, expected)


def test_deepspeed_launcher_trains_and_saves_its_checkpoint(tmp_path):
    """launch/deepspeed.sh starts two processes (CPU accelerator, gloo) that train with ZeRO-2 and
    write a DeepSpeed checkpoint with our train state beside it."""
    pytest.importorskip("deepspeed")
    run_dir = tmp_path / "ds"
    env = {**os.environ, "PATH": PATH, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NUM_GPUS": "2",
           "MASTER_PORT": str(free_port())}  # fmt: skip
    proc = subprocess.run(
        ["bash", str(REPO / "launch" / "deepspeed.sh"), f"run_dir={run_dir}", "parallel.zero_stage=2",
         "train.eval_interval=0", "train.sample_tokens=0", "logging.wandb=disabled", "logging.interval=1",
         "data.seq_len=64", "train.steps=2", "checkpoint.interval=2", "model.num_blocks=2", "model.slstm_at=[1]"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert "on 2 process(es)" in output, output[-3000:]
    assert sorted(_train_losses(run_dir)) == [1, 2]
    checkpoint = run_dir / "step-0000002"
    assert (checkpoint / "latest").is_file() and (checkpoint / "train_state.pt").is_file()
