"""Fault injection: training runs killed at random points and resumed by the same command until they
finish end with the losses of an uninterrupted run, bit for bit.

The faults: SIGKILL and SIGTERM at a random moment of a random step (evaluation included), during
start-up, during a checkpoint save and just before a save is committed; in a two-rank gloo run, on
one rank only (a SIGKILLed rank takes the other down, as a launcher would). SIGTERM must end the run
with a checkpoint and exit code 0; after any fault the next start resumes from the latest complete
checkpoint (or starts over when there is none) and ``metrics.jsonl`` holds each step once.

Each run is a real process, started from a fork server that has imported torch and the trainer
once, so a run costs its training and not an interpreter start. The faults are drawn from a seeded
generator; the seed and the number of faults survived are printed.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from tests.parallel.harness import free_port

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
# The tiny recipe, shrunk: its data and tokenizer, an sLSTM block, dropout (so the RNG state must be
# restored exactly), a checkpoint every 3 steps and a validation every 4.
OVERRIDES = ["model.num_blocks=2", "model.slstm_at=[1]", "model.embedding_dim=32", "model.chunk_size=16",
             "model.dropout=0.1", "data.seq_len=32", "data.verify=size", f"train.steps={STEPS}",
             "train.micro_batch_size=2", "train.eval_interval=4", "train.eval_batches=1", "train.sample_tokens=0",
             "logging.interval=1", "logging.wandb=disabled", "checkpoint.interval=3", "checkpoint.keep=2",
             "parallel.timeout_s=60"]  # fmt: skip
RUN_TIMEOUT_S = 120

_context = None


def fork_server():
    """A multiprocessing context whose processes fork from one server that imported the trainer."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(["torch", "xlstm_train.train.trainer"])
    return _context


# ----------------------------------------------------------------------------------------------
# The worker: one training process, with its fault armed


def _signal_later(delay_s: float, sig: int) -> None:
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), sig))
    timer.daemon = True
    timer.start()


def _arm(fault: dict | None) -> None:
    """Make this process receive ``fault["signal"]`` where ``fault["at"]`` says:
    ``start`` (``delay`` s after the process starts), ``step`` (``delay`` s into step ``n`` of this
    process), ``eval`` (``delay`` s into its ``n``-th validation), ``save`` (``delay`` s into its
    ``n``-th checkpoint save) or ``commit`` (at once, when the ``n``-th save's shards are written and
    its directory is not yet renamed)."""
    if fault is None:
        return
    from xlstm_train.train import checkpoint as ckpt
    from xlstm_train.train import trainer

    sig, at, n, delay = fault["signal"], fault["at"], fault.get("n"), fault.get("delay", 0.0)
    if at == "start":
        _signal_later(delay, sig)
    elif at == "step":
        build_engine, steps = trainer.build_engine, []

        def build_counting(*args, **kwargs):
            engine = build_engine(*args, **kwargs)
            step = engine.step

            def counted(*a, **k):
                steps.append(1)
                if len(steps) == n:
                    _signal_later(delay, sig)
                return step(*a, **k)

            engine.step = counted
            return engine

        trainer.build_engine = build_counting
    elif at == "eval":
        evaluate, calls = trainer.evaluate, []

        def evaluate_counting(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                _signal_later(delay, sig)
            return evaluate(*args, **kwargs)

        trainer.evaluate = evaluate_counting
    elif at in ("save", "commit"):
        method = "save" if at == "save" else "_commit"
        original, calls = getattr(ckpt.Checkpointer, method), []

        def wrapped(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                if at == "commit":
                    os.kill(os.getpid(), sig)
                else:
                    _signal_later(delay, sig)
            return original(self, *args, **kwargs)

        setattr(ckpt.Checkpointer, method, wrapped)


def _train_worker(overrides: list[str], env: dict, fault: dict | None, log_path: str) -> None:
    """One rank of one run: its output to ``log_path``; exit 0 when ``train`` returns, 1 when it raises."""
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.chdir(REPO)
    os.environ.update(env)
    import torch

    torch.set_num_threads(1)
    _arm(fault)
    from xlstm_train.train.config import load_config
    from xlstm_train.train.trainer import train

    try:
        summary = train(load_config(None, overrides))
        print(f"summary: {json.dumps(summary)}", flush=True)
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# Launching runs and faults


def launch(run_dir: Path, world_size: int, fault: dict | None, fault_rank: int, log_path: Path) -> list[int]:
    """Start one run (``world_size`` ranks; the fault on ``fault_rank``) and wait for it; like a
    launcher, a rank that fails takes the others down. Returns the ranks' exit codes."""
    ctx = fork_server()
    overrides = [f"run_dir={run_dir}", *OVERRIDES]
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {"OMP_NUM_THREADS": "1"}
        if world_size > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)  # fmt: skip
        proc = ctx.Process(target=_train_worker, args=(overrides, env, fault if rank == fault_rank else None,
                                                       f"{log_path}.rank{rank}"))
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.exitcode is None:
                    p.kill()
        time.sleep(0.02)
    for p in procs:
        p.join()
    return [p.exitcode for p in procs]


def random_fault(rng: random.Random, sig: int, at: str) -> dict:
    """A fault of kind ``at`` at a random moment (see ``_arm``)."""
    if at == "start":
        return {"signal": sig, "at": at, "delay": rng.uniform(0.0, 1.5)}
    if at == "commit":
        return {"signal": sig, "at": at, "n": rng.randint(1, 2)}
    n = rng.randint(1, 3) if at == "step" else rng.randint(1, 2)  # early: the next fault has steps left to hit
    return {"signal": sig, "at": at, "n": n, "delay": rng.uniform(0.0, 0.15)}


# Every kind of fault once, in an order the seed shuffles: (signal, where, rank).
FAULTS_ONE_RANK = [(signal.SIGKILL, "step", 0), (signal.SIGTERM, "step", 0), (signal.SIGKILL, "eval", 0),
                   (signal.SIGKILL, "save", 0), (signal.SIGKILL, "commit", 0), (signal.SIGTERM, "save", 0),
                   (signal.SIGTERM, "start", 0), (signal.SIGKILL, "start", 0)]  # fmt: skip
FAULTS_TWO_RANKS = [(signal.SIGTERM, "step", 1), (signal.SIGKILL, "step", 1), (signal.SIGKILL, "commit", 1),
                    (signal.SIGTERM, "eval", 0), (signal.SIGKILL, "save", 0)]  # fmt: skip


def read_train_records(run_dir: Path) -> dict[int, tuple]:
    """Per step (loss, grad_norm) of train records and val_loss of val records; each step once."""
    records = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] in ("train", "val"):
            key = (r["kind"], r["step"])
            assert key not in records, f"{key} logged twice in {run_dir}/metrics.jsonl"
            records[key] = (r.get("loss"), r.get("grad_norm"), r.get("val_loss"))
    return records


def describe(fault: dict | None) -> str:
    if fault is None:
        return "no fault"
    where = {"start": "after start-up began", "step": f"into step {fault.get('n')}",
             "eval": f"into validation {fault.get('n')}", "save": f"into save {fault.get('n')}", "commit": f"before save {fault.get('n')} is committed"}
    delay = f"{fault['delay']:.2f} s " if "delay" in fault else ""
    return f"{signal.Signals(fault['signal']).name} {delay}{where[fault['at']]}"


def run_with_faults(tmp_path: Path, world_size: int, kinds: list, seed: int) -> tuple[int, list[str]]:
    """Start the run again and again until it is done, each start with the next fault of ``kinds``
    (shuffled) at a random moment while there is one; return the number of faults that hit (and were
    survived) and a line per start. A fault can miss: its save or step may not come before the end."""
    from xlstm_train.train import checkpoint as ckpt

    rng = random.Random(seed)
    kinds = rng.sample(kinds, len(kinds))
    run_dir = tmp_path / "faulted"
    hits, history = 0, []
    for attempt in range(len(kinds) + 3):
        fault, fault_rank = None, 0
        if attempt < len(kinds):
            sig, at, fault_rank = kinds[attempt]
            fault = random_fault(rng, sig, at)
        log = tmp_path / f"attempt{attempt}.log"
        codes = launch(run_dir, world_size, fault, fault_rank, log)
        output = "".join(Path(f"{log}.rank{r}").read_text() for r in range(world_size)
                         if Path(f"{log}.rank{r}").exists())
        latest = ckpt.latest_checkpoint(run_dir) if run_dir.exists() else None
        complete = latest is not None and latest.name == ckpt.checkpoint_name(STEPS)
        finished = complete and codes == [0] * world_size
        hit = any(code < 0 for code in codes) or "stop requested" in output
        hits += hit
        what = (f"start {attempt}: {describe(fault)}{f' on rank {fault_rank}' if world_size > 1 and fault else ''}"
                f" -> exit codes {codes}, latest checkpoint {latest.name if latest else None}")
        history.append(what)
        if fault is None or not hit:
            assert "Traceback" not in output, f"{what}\n{output[-4000:]}"
        if hit and fault is not None and fault["signal"] == signal.SIGTERM and fault["at"] in ("step", "save") and not complete:
            # the handlers are in place from the first step on: a clean stop with a checkpoint, exit 0
            # (a signal that comes after the last step may find the process already leaving)
            assert codes == [0] * world_size and "stop requested (SIGTERM)" in output, f"{what}\n{output[-4000:]}"
            assert latest is not None and f"stopped after step {int(latest.name[5:])} of" in output, what
        if finished:
            return hits, history
        assert fault is not None, f"{what}\n{output[-4000:]}"
    raise AssertionError("the run did not finish:\n" + "\n".join(history))


@pytest.mark.parametrize(("world_size", "kinds", "seed"), [(1, FAULTS_ONE_RANK, 2101), (2, FAULTS_TWO_RANKS, 2102)])
def test_runs_killed_and_resumed_match_an_uninterrupted_run(tmp_path, world_size, kinds, seed):
    started = time.monotonic()
    codes = launch(tmp_path / "clean", world_size, None, 0, tmp_path / "clean.log")
    assert codes == [0] * world_size, Path(f"{tmp_path / 'clean.log'}.rank0").read_text()[-4000:]
    survived, history = run_with_faults(tmp_path, world_size, kinds, seed)
    clean, faulted = read_train_records(tmp_path / "clean"), read_train_records(tmp_path / "faulted")
    assert sorted(k for k in clean if k[0] == "train") == [("train", s) for s in range(1, STEPS + 1)]
    assert faulted == clean, "\n".join(history)  # bitwise: every loss, gradient norm and validation loss
    assert survived >= 2, "\n".join(history)
    print("\n".join(history))
    print(f"{world_size} rank(s), seed {seed}: survived {survived} faults, losses bitwise equal to an "
          f"uninterrupted run ({time.monotonic() - started:.0f} s)")
