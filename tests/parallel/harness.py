"""Run a test function on N CPU processes joined in a gloo process group.

Each worker gets the environment a launcher would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and calls ``init_distributed`` like the trainer does. A failure on any rank fails the
test with that rank's traceback.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    from xlstm_train.parallel import destroy_distributed, init_distributed

    code = 0
    try:
        init_distributed(timeout_s=120, device_type="cpu")
        fn(*args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        code = 1
    finally:
        destroy_distributed()
    # Leave without interpreter teardown: after a parallelized model on gloo, a native thread
    # occasionally aborts the process while it shuts down (SIGABRT), after all the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_distributed(fn, world_size: int, *args) -> None:
    """Call ``fn(*args)`` on ``world_size`` processes; raise with the first failing rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, errors), nprocs=world_size, start_method="spawn"
        )
    except Exception as exc:
        detail = errors.get() if not errors.empty() else ""
        raise AssertionError(f"distributed run failed\n{detail}") from exc


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    """Relative error ``|a - e| / |e|`` (norms over the whole tensor) at most ``rtol``."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).norm() / expected.norm().clamp_min(1e-30)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.0e}"
