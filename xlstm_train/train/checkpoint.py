"""Checkpoints: ``torch.distributed.checkpoint`` directories that a killed save never corrupts.

A checkpoint ``<run_dir>/step-0000100/`` holds

- the model and optimizer state, written by DCP (``.metadata`` + ``__<rank>_0.distcp``). They are
  taken with ``get_state_dict``/``set_state_dict``, which also understand FSDP2/TP-sharded models,
  so the same code reshards on load when the parallel layout changes;
- ``train_state.pt``: step, consumed samples, tokens seen, skipped steps, scheduler state and the
  RNG states of torch/cuda/python/numpy;
- ``config.yaml``: the resolved configuration of the run that wrote it.

Under ``parallel.engine: deepspeed`` the model and optimizer part is DeepSpeed's own format instead
(``save_deepspeed_checkpoint``: a ``latest`` tag file and the ZeRO shards under ``step-0000100/``
inside the checkpoint directory), with the same ``train_state.pt`` and ``config.yaml`` beside it;
``convert_deepspeed_checkpoint`` turns it into the DCP model format for export.

Everything is written into ``step-0000100.tmp/`` first and renamed when complete, so a directory
without the ``.tmp`` suffix is always whole; leftover ``.tmp`` directories are ignored and replaced.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from xlstm_train.config import ConfigError, from_dict

TRAIN_STATE_FILE = "train_state.pt"
DEEPSPEED_TAG_FILE = "latest"  # DeepSpeed's pointer to its checkpoint tag, written last
CONFIG_FILE = "config.yaml"
_NAME = re.compile(r"^step-(\d{7,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


def is_deepspeed(path: Path) -> bool:
    """Whether checkpoint ``path`` holds the model and optimizer in DeepSpeed's format."""
    return (path / DEEPSPEED_TAG_FILE).is_file()


def is_complete(path: Path) -> bool:
    return (
        _NAME.match(path.name) is not None
        and ((path / ".metadata").is_file() or is_deepspeed(path))
        and (path / TRAIN_STATE_FILE).is_file()
    )


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# ----------------------------------------------------------------------------------------------
# RNG state


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # numpy's state as plain values and a tensor, so that torch.load(weights_only=True) reads it
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Save and load


# DCP warns on every save/load without a process group; a single process is a supported case here.
_SINGLE_PROCESS_WARNING = r"torch\.distributed is disabled"
# process-wide, for the writer thread of asynchronous saves ...
warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)


@contextlib.contextmanager
def _single_process_ok():
    """... and locally too, where something (a test runner) has reset the process-wide filters."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING, category=UserWarning)
        yield


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves to and restores from one run directory, keeping the last ``keep`` checkpoints.

    Every rank calls ``save``/``wait``/``load``: each writes its own shards; rank 0 alone creates
    the directory, writes ``train_state.pt``/``config.yaml`` and commits (renames) it.
    """

    def __init__(self, run_dir: Path, *, keep: int, async_save: bool = False):
        self.run_dir = run_dir
        self.keep = keep
        self.async_save = async_save
        self._pending: tuple[Future, Path, Path] | None = None
        # An asynchronous save talks to the other ranks from a background thread: give it its own
        # process group so that its collectives never interleave with the training step's.
        self._async_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             train_state: dict, config: dict) -> Path:
        final = self.run_dir / checkpoint_name(step)
        if final.exists():  # this step is already saved (e.g. the run ended right after resuming)
            return final
        self.wait()  # one save in flight at a time
        tmp = self._begin(final, train_state, config)
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _single_process_ok():
            if self.async_save:
                # the state is staged (copied) before async_save returns; the writes go on in a thread
                future = dcp.async_save(state, checkpoint_id=tmp, process_group=self._async_group)
                self._pending = (future, tmp, final)
                return final
            dcp.save(state, checkpoint_id=tmp)
        self._commit(tmp, final)
        return final

    def save_deepspeed(self, step: int, engine, train_state: dict, config: dict) -> Path:
        """Save a DeepSpeed engine in its own format, committed like ``save`` (always synchronous)."""
        from xlstm_train.parallel.deepspeed_engine import save_deepspeed_checkpoint

        final = self.run_dir / checkpoint_name(step)
        if final.exists():
            return final
        tmp = self._begin(final, train_state, config)
        save_deepspeed_checkpoint(engine, tmp, step)
        self._commit(tmp, final)
        return final

    def _begin(self, final: Path, train_state: dict, config: dict) -> Path:
        """Rank 0 makes the fresh ``.tmp`` directory holding the train state and the config."""
        tmp = final.with_name(final.name + ".tmp")
        if _is_main():
            if tmp.exists():  # a save that was killed part-way
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            torch.save(train_state, tmp / TRAIN_STATE_FILE)
            (tmp / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        _barrier()  # the directory exists before any rank writes its shards
        return tmp

    def wait(self) -> None:
        """Block until an asynchronous save in flight is written and committed."""
        if self._pending is None:
            return
        future, tmp, final = self._pending
        self._pending = None
        future.result()
        self._commit(tmp, final)

    def _commit(self, tmp: Path, final: Path) -> None:
        _barrier()  # every rank's shards are written
        if _is_main():
            os.replace(tmp, final)
            for old in list_checkpoints(self.run_dir)[: -self.keep]:
                shutil.rmtree(old)
        _barrier()  # no rank goes on (or looks for checkpoints) before the commit

    @staticmethod
    def load(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Restore model and optimizer in place from checkpoint ``path``; return its train state."""
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optim_state}
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return read_train_state(path)


def read_train_state(path: Path) -> dict:
    return torch.load(path / TRAIN_STATE_FILE, weights_only=True)


def read_config(path: Path) -> dict:
    return yaml.safe_load((path / CONFIG_FILE).read_text())



# ----------------------------------------------------------------------------------------------
# Reading a checkpoint outside training (export, evaluation)


def read_checkpoint_config(checkpoint_dir: Path):
    """The run configuration (a ``Config``) saved with a checkpoint; a ConfigError unless the
    checkpoint is whole."""
    from xlstm_train.train.config import Config

    checkpoint_dir = Path(checkpoint_dir)
    expected = (
        "expected a complete checkpoint directory (runs/<name>/step-NNNNNNN holding .metadata and "
        f"{CONFIG_FILE})"
    )
    if not checkpoint_dir.is_dir():
        raise ConfigError(f"checkpoint '{checkpoint_dir}': no such directory; {expected}")
    if checkpoint_dir.name.endswith(".tmp"):
        raise ConfigError(f"checkpoint '{checkpoint_dir}' is a save that never completed (.tmp); {expected}")
    missing = [name for name in (".metadata", CONFIG_FILE) if not (checkpoint_dir / name).is_file()]
    if missing:
        latest = latest_checkpoint(checkpoint_dir)
        hint = f"; the latest checkpoint in this run directory is '{latest}'" if latest is not None else ""
        raise ConfigError(f"checkpoint '{checkpoint_dir}' has no {' or '.join(missing)}; {expected}{hint}")
    try:
        return from_dict(Config, read_config(checkpoint_dir), where=str(checkpoint_dir / CONFIG_FILE))
    except yaml.YAMLError as e:
        raise ConfigError(f"{checkpoint_dir / CONFIG_FILE} is not valid YAML: {e}") from None


def load_model_state(checkpoint_dir: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) fp32 state dict from a DCP checkpoint, read in this process.

    The model is built on the meta device and materialised without init: every tensor of its state
    dict is then filled by DCP. Tied weights stay one tensor under both names."""
    from torch.distributed.checkpoint.api import CheckpointException

    from xlstm_train.models import build_model

    with torch.device("meta"):
        model = build_model(model_cfg)
    model.to_empty(device="cpu")
    state = model.state_dict()
    with _single_process_ok():
        try:
            dcp.load({"model": state}, checkpoint_id=checkpoint_dir, no_dist=True)
        except CheckpointException as e:  # missing keys, shape mismatches; one (exception, trace) per rank
            causes = "; ".join(str(failure[0] if isinstance(failure, tuple) else failure)
                               for failure in e.failures.values())  # fmt: skip
            raise ConfigError(
                f"checkpoint '{checkpoint_dir}': its model weights do not fit the model its "
                f"config.yaml describes: {causes}"
            ) from None
    return state
