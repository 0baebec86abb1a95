"""Where metrics go: one compact console line, a JSONL file in the run directory, and wandb.

MFU = flops_per_token * tokens/s / peak, with the dense bf16 peak of the GPU (no sparsity). On CPU,
or on a GPU whose peak is not known, no MFU is reported.

The console line carries the instantaneous tokens/s of the last logging interval and, beside it, the
rate over the last ``SMOOTHING_INTERVALS`` intervals (``tokens_per_s_avg``), which a busy machine
does not swing; the elapsed wall time of this process and an ETA from the recent wall time per step
(evaluations and checkpoints included).

wandb starts on the first metrics record, not before: a rerun of a finished run, which trains
nothing, leaves no new wandb run behind. Its id is fixed up front (``wandb_id``), so a checkpoint
written before that first record still resumes the same wandb run.
"""

from __future__ import annotations

import collections
import json
import math
import os
import resource
import secrets
import string
import time
from pathlib import Path

import torch

# Dense bf16 peak FLOP/s, matched against torch.cuda.get_device_name() in this order.
PEAK_FLOPS_BY_GPU_NAME = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS_BY_GPU_NAME:
        if key in name:
            return peak
    return None


def memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the resident memory of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:  # not Linux: the peak resident size (kilobytes on Linux, bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**30 if os.uname().sysname == "Darwin" else peak / 2**20


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def format_duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h07m``, ``2d04h``: two units at most, for a console line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def format_train_line(m: dict, total_steps: int) -> str:
    width = len(str(total_steps))
    parts = [
        f"step {m['step']:>{width}}/{total_steps}",
        f"loss {m['loss']:.4f}",
        f"ppl {m['ppl']:.1f}",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3f}",
    ]
    if m.get("tokens_per_s_avg") is not None:
        parts.append(f"{_si(m['tokens_per_s_avg'])} tok/s (now {_si(m['tokens_per_s'])})")
    else:
        parts.append(f"{_si(m['tokens_per_s'])} tok/s")
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['memory_gib']:.2f}GiB")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    if m.get("elapsed_s") is not None:
        eta = f" eta {format_duration(m['eta_s'])}" if m.get("eta_s") is not None else ""
        parts.append(f"{format_duration(m['elapsed_s'])}{eta}")
    return " | ".join(parts)


SMOOTHING_INTERVALS = 10  # logging intervals behind tokens_per_s_avg and the ETA


class Throughput:
    """Smoothed tokens/s and ETA from the records of consecutive logging intervals."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps
        self.started = self._last_time = time.perf_counter()
        self._last_step, self._last_tokens = 0, None
        # per interval: (tokens, step time, steps, wall time)
        self._intervals: collections.deque = collections.deque(maxlen=SMOOTHING_INTERVALS)

    def update(self, m: dict) -> dict:
        """Fields to add to train record ``m`` (which holds step, tokens_seen and tokens_per_s)."""
        now = time.perf_counter()
        steps, wall = m["step"] - self._last_step, now - self._last_time
        # The first record of this process only sets the baselines: its interval holds the start-up
        # (model build, first evaluation, compilation) and, after a resume, an unknown number of steps.
        if self._last_tokens is not None and steps > 0 and m.get("tokens_per_s"):
            tokens = m["tokens_seen"] - self._last_tokens
            self._intervals.append((tokens, tokens / m["tokens_per_s"], steps, wall))
        self._last_step, self._last_time, self._last_tokens = m["step"], now, m["tokens_seen"]
        tokens = sum(i[0] for i in self._intervals)
        step_time = sum(i[1] for i in self._intervals)
        steps_done = sum(i[2] for i in self._intervals)
        wall_time = sum(i[3] for i in self._intervals)
        remaining = max(self.total_steps - m["step"], 0)
        return {
            "tokens_per_s_avg": tokens / step_time if step_time > 0 else None,
            "elapsed_s": now - self.started,
            "eta_s": remaining * wall_time / steps_done if steps_done else None,
        }


def format_val_line(m: dict, total_steps: int) -> str:
    """The validation loss and the recipe's ``eval`` metrics (``eval/...``) of one record; either may
    be absent (validation off, no evaluation due)."""
    width = len(str(total_steps))
    parts = [f"step {m['step']:>{width}}/{total_steps}"]
    if m.get("val_loss") is not None:
        parts += [f"val loss {m['val_loss']:.4f}", f"val ppl {m['val_ppl']:.2f}"]
    parts += [f"{k} {v:.4g}" for k, v in m.items() if k.startswith("eval/") and isinstance(v, (int, float))]
    return " | ".join(parts)


def drop_records_after(path: Path, step: int) -> int:
    """Remove from metrics file ``path`` the records of steps after ``step`` and any line cut short by a
    kill; returns how many lines went. A run resumed from its checkpoint at ``step`` logs the later
    steps again, so each step keeps one record (``step = -1``: a run starting over keeps none).
    The file is replaced whole, so a kill during this leaves the old one."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a partial last line of a killed process
            dropped += 1
            continue
        if isinstance(record, dict) and record.get("step", -1) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped


def new_wandb_id() -> str:
    """A run id in wandb's own form (8 lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class MetricsLogger:
    """Writes every record to the console, ``metrics.jsonl`` and (unless disabled) wandb.

    The trainer calls ``close()`` at the end of the run, also when it fails.
    """

    def __init__(self, run_dir: Path, *, total_steps: int, wandb_mode: str, wandb_project: str,
                 wandb_entity: str | None, run_name: str, config: dict, wandb_id: str | None = None,
                 wandb_group: str | None = None):
        self.total_steps = total_steps
        self.run_dir = run_dir
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # appended across resumes
        self._throughput = Throughput(total_steps)
        self._wandb_run = None
        self._wandb_init = None
        self._wandb_id = None
        if wandb_mode != "disabled":
            self._wandb_id = wandb_id or new_wandb_id()
            self._wandb_init = dict(
                project=wandb_project, entity=wandb_entity, group=wandb_group, name=run_name, dir=str(run_dir),
                mode=wandb_mode, config=config, id=self._wandb_id, resume="allow",
            )

    @property
    def wandb_id(self) -> str | None:
        """The wandb run this run logs to (None without wandb), known before wandb starts."""
        return self._wandb_id

    def _wandb(self):
        if self._wandb_init is not None and self._wandb_run is None:
            import wandb  # imported here: slow to import, and most tests do not need it

            # quiet: no summary of every metric at the end of each run
            self._wandb_run = wandb.init(**self._wandb_init, settings=wandb.Settings(quiet=True))
        return self._wandb_run

    def log_train(self, metrics: dict) -> None:
        metrics = {**metrics, **self._throughput.update(metrics)}
        print(format_train_line(metrics, self.total_steps), flush=True)
        self._write("train", metrics)

    def log_val(self, metrics: dict) -> None:
        print(format_val_line(metrics, self.total_steps), flush=True)
        self._write("val", metrics)

    def log_event(self, event: str, **fields) -> None:
        self._jsonl.write(json.dumps({"kind": "event", "event": event, "time": time.time(), **fields}) + "\n")

    def _write(self, kind: str, metrics: dict) -> None:
        # strict JSON has no NaN/Infinity: a non-finite value (a skipped step's loss) is written as null
        record = {"kind": kind, "time": time.time(), **{k: _finite_or_none(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        run = self._wandb()
        if run is not None:
            prefix = "train" if kind == "train" else "val"
            # the eval section's metrics are named in full already (eval/<data or task>/<metric>)
            run.log({k if k.startswith("eval/") else f"{prefix}/{k}": v
                     for k, v in metrics.items() if k != "step" and v is not None}, step=metrics["step"])

    def close(self) -> None:
        """Idempotent."""
        if not self._jsonl.closed:
            self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        self._wandb_init = None
