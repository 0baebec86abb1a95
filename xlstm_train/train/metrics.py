"""Where metrics go: one compact console line, a JSONL file in the run directory, and wandb.

MFU = flops_per_token * tokens/s / peak, with the dense bf16 peak of the GPU (no sparsity). On CPU,
or on a GPU whose peak is not known, no MFU is reported.
"""

from __future__ import annotations

import json
import math
import os
import resource
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


def format_train_line(m: dict, total_steps: int) -> str:
    width = len(str(total_steps))
    parts = [
        f"step {m['step']:>{width}}/{total_steps}",
        f"loss {m['loss']:.4f}",
        f"ppl {m['ppl']:.1f}",
        f"lr {m['lr']:.2e}",
        f"gnorm {m['grad_norm']:.3f}",
        f"{_si(m['tokens_per_s'])} tok/s",
    ]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['memory_gib']:.2f}GiB")
    if m.get("skipped_steps"):
        parts.append(f"skipped {m['skipped_steps']}")
    return " | ".join(parts)


def format_val_line(m: dict, total_steps: int) -> str:
    width = len(str(total_steps))
    return f"step {m['step']:>{width}}/{total_steps} | val loss {m['val_loss']:.4f} | val ppl {m['val_ppl']:.2f}"


class MetricsLogger:
    """Writes every record to the console, ``metrics.jsonl`` and (unless disabled) wandb."""

    def __init__(self, run_dir: Path, *, total_steps: int, wandb_mode: str, wandb_project: str,
                 wandb_entity: str | None, run_name: str, config: dict, wandb_id: str | None = None):
        self.total_steps = total_steps
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a", buffering=1)  # appended across resumes
        self._wandb_run = None
        if wandb_mode != "disabled":
            import wandb  # imported here: slow to import, and most tests do not need it

            self._wandb_run = wandb.init(
                project=wandb_project, entity=wandb_entity, name=run_name, dir=str(run_dir),
                mode=wandb_mode, config=config, id=wandb_id, resume="allow",
            )

    @property
    def wandb_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    def log_train(self, metrics: dict) -> None:
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
        if self._wandb_run is not None:
            prefix = "train" if kind == "train" else "val"
            self._wandb_run.log(
                {f"{prefix}/{k}": v for k, v in metrics.items() if k != "step" and v is not None},
                step=metrics["step"],
            )

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
