"""Stop signals, sent for real to worker processes: one process, and two gloo ranks that must agree."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from xlstm_train.train.preemption import StopSignals

# A stand-in for the training loop: steps of `step_s` seconds, asking after each whether to stop.
WORKER = textwrap.dedent("""
    import os, sys, time
    import torch.distributed as dist
    from xlstm_train.train.preemption import StopSignals

    step_s = float(sys.argv[1])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    with StopSignals() as stop:
        print("ready", flush=True)
        step = 0
        while step < 10_000:
            time.sleep(step_s)
            step += 1
            if stop.stop_agreed():
                print(f"stopped after step {step}; received: {stop.describe()}", flush=True)
                break
    if dist.is_initialized():
        dist.destroy_process_group()
""")


def start(step_s: float, env=None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(step_s)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_ends_the_loop_after_the_current_step(sig):
    proc = start(step_s=0.05)
    time.sleep(0.3)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"received: {sig.name}" in out and "Traceback" not in err


def test_a_second_sigint_interrupts_at_once():
    proc = start(step_s=30.0)  # a long step: the loop would not look at the flag for a while
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - started < 10
    assert proc.returncode != 0 and "KeyboardInterrupt" in err and "stopped" not in out


def test_the_previous_handlers_come_back():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGUSR1, mine)
    try:
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGUSR1) == stop._handle
            os.kill(os.getpid(), signal.SIGUSR1)
            deadline = time.monotonic() + 5
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.requested and stop.stop_agreed() and stop.describe() == "SIGUSR1"
        assert signal.getsignal(signal.SIGUSR1) is mine
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        stop.restore()  # idempotent
    finally:
        signal.signal(signal.SIGUSR1, previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_stop_at_the_same_step_when_one_is_signalled():
    port = str(_free_port())
    ranks = [subprocess.Popen([sys.executable, "-c", WORKER, "0.05"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
             for r in range(2)]
    assert [proc.stdout.readline().strip() for proc in ranks] == ["ready", "ready"]
    time.sleep(0.5)
    ranks[1].send_signal(signal.SIGTERM)  # only rank 1 hears it
    outputs = [proc.communicate(timeout=60) for proc in ranks]
    assert [proc.returncode for proc in ranks] == [0, 0], [err for _, err in outputs]
    steps = [out.split("stopped after step ")[1].split(";")[0] for out, _ in outputs]
    assert steps[0] == steps[1]
    assert "received: none" in outputs[0][0] and "received: SIGTERM" in outputs[1][0]
