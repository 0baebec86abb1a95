"""Stop requests from outside: SIGTERM (a scheduler, a preemption), SIGUSR1 (SLURM's warning before the
time limit, see ``launch/slurm/train.sbatch``) and SIGINT (Ctrl-C).

The handlers only record the request; the training loop asks ``stop_agreed()`` after each step, and
every rank finishes the same step, writes the checkpoint and exits. A signal arrives at different
ranks at different moments (or at one rank only), so the ranks agree through one all-reduce of the
flag (MAX) over the default process group. A second SIGINT raises KeyboardInterrupt at once, for a
user who does not want to wait for the checkpoint.

    with StopSignals() as stop:
        while step < steps:
            ...one step...
            if stop.stop_agreed():
                save(); break
"""

from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """Handlers for ``signals`` that record a stop request; ``restore()`` puts the previous ones back."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: list[signal.Signals] = []  # in order of arrival
        self._previous: dict[signal.Signals, object] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("signal handlers can only be installed from the main thread")
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        """Idempotent."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopSignals:
        return self.install()

    def __exit__(self, *exc_info) -> None:
        self.restore()

    def _handle(self, signum, frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and signal.SIGINT in self.received:
            raise KeyboardInterrupt
        self.received.append(sig)

    @property
    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return bool(self.received)

    def describe(self) -> str:
        """The signal(s) received, for the console: ``"SIGTERM"``."""
        return ", ".join(dict.fromkeys(s.name for s in self.received)) or "none"

    def stop_agreed(self, device: torch.device | None = None) -> bool:
        """Whether any rank received a stop signal; every rank gets the same answer.

        A collective: every rank must call it at the same step. ``device``: where the flag lives
        for the all-reduce (a CUDA device for NCCL; default: the current CUDA device under NCCL,
        else the CPU). In a single process it is ``requested``.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.requested
        if device is None:
            nccl = dist.get_backend() == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
