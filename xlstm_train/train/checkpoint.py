"""Checkpoints: the one module that knows their formats, and that a killed save never corrupts them.

A checkpoint ``<run_dir>/step-0000100/`` holds

- the model and optimizer state, in one of two formats:

  * ours (``parallel.engine: fsdp``): a ``torch.distributed.checkpoint`` directory (``.metadata`` +
    ``__<rank>_0.distcp``), taken with ``get_state_dict``/``set_state_dict``, which also understand
    FSDP2/TP-sharded models, so the same code reshards on load when the parallel layout changes;
  * DeepSpeed's (``parallel.engine: deepspeed``): a ``latest`` tag file and the ZeRO shards under
    ``step-0000100/`` inside the checkpoint directory, one set per TP rank, with the TP layout in
    the client state (``save_deepspeed_checkpoint``). It resumes only under DeepSpeed;
    ``deepspeed_to_state_dict`` merges it into one full model state dict;

- ``train_state.pt``: step, consumed samples, tokens seen, skipped steps, scheduler state and the
  RNG states of torch/cuda/python/numpy;
- ``config.yaml``: the resolved configuration of the run that wrote it.

Everything is written into ``step-0000100.tmp/`` first and renamed when complete, so a directory
without the ``.tmp`` suffix is always whole; leftover ``.tmp`` directories are ignored and replaced.

Outside training (export, evaluation) ``read_checkpoint_config`` and ``load_model_state`` read either
format into a single process; ``convert_deepspeed_checkpoint`` rewrites a DeepSpeed checkpoint's
model in ours.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
import tempfile
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
TP_LAYOUT_KEY = "tensor_parallel_layout"  # client state of a DeepSpeed tp > 1 checkpoint: shard dim by name
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
# DeepSpeed's format


def save_deepspeed_checkpoint(engine, directory: str | Path, step: int, client_state: dict | None = None) -> None:
    """DeepSpeed's own sharded checkpoint (``directory/step-N/`` + the ``latest`` tag file).

    DeepSpeed writes the tag file last, so a killed save leaves ``latest`` on the previous good one.
    With tp > 1 each TP rank writes its shards (``mp_rank_XX``) and the client state records how
    they split each parameter, which ``deepspeed_to_state_dict`` needs to merge them.
    """
    from xlstm_train.parallel.deepspeed_engine import tensor_parallel_layout

    client_state = dict(client_state or {})
    layout = tensor_parallel_layout(engine.module)
    if layout:
        client_state[TP_LAYOUT_KEY] = layout
    engine.save_checkpoint(str(directory), tag=checkpoint_name(step), client_state=client_state)


def load_deepspeed_checkpoint(engine, directory: str | Path) -> dict:
    """Resume from the ``latest`` checkpoint in ``directory``; returns its client state."""
    path, client_state = engine.load_checkpoint(str(directory))
    if path is None:
        raise FileNotFoundError(f"no DeepSpeed checkpoint (no '{DEEPSPEED_TAG_FILE}' tag) in {directory}")
    return client_state


def deepspeed_to_state_dict(directory: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """The full fp32 model state dict of a DeepSpeed checkpoint of any ZeRO stage, on CPU.

    A checkpoint of a tp > 1 run holds one ZeRO checkpoint per TP rank; each is consolidated over
    its data-parallel ranks and the TP shards are concatenated along their shard dimension
    (replicated parameters and buffers are taken from TP rank 0).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    directory = Path(directory)
    if tag is None:
        if not is_deepspeed(directory):
            raise FileNotFoundError(f"{directory}: not a DeepSpeed checkpoint directory (no '{DEEPSPEED_TAG_FILE}' tag file)")
        tag = (directory / DEEPSPEED_TAG_FILE).read_text().strip()
    model_files = glob.glob(os.path.join(directory, tag, "*model_states.pt"))
    if not model_files:
        raise FileNotFoundError(f"{directory / tag}: no DeepSpeed model states in this tag")
    tp_ranks = sorted({int(m) for f in model_files for m in re.findall(r"mp_rank_(\d+)_model_states", f)})
    if len(tp_ranks) <= 1:
        return _checkpoint_keys(get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag))

    first = min(glob.glob(os.path.join(directory, tag, "*mp_rank_00_model_states.pt")))
    layout = torch.load(first, map_location="cpu", weights_only=False).get(TP_LAYOUT_KEY)
    if layout is None:
        raise ValueError(f"{directory / tag}: a checkpoint of {len(tp_ranks)} TP ranks without its '{TP_LAYOUT_KEY}'")
    shards = []
    for rank in tp_ranks:
        # zero_to_fp32 consolidates all the files of a tag: show it those of one TP rank
        with tempfile.TemporaryDirectory() as view:
            os.mkdir(os.path.join(view, tag))
            for f in glob.glob(os.path.join(directory, tag, f"*mp_rank_{rank:02d}_*")):
                os.symlink(os.path.abspath(f), os.path.join(view, tag, os.path.basename(f)))
            shards.append(_checkpoint_keys(get_fp32_state_dict_from_zero_checkpoint(view, tag=tag)))
    return {
        name: tensor if layout.get(name) is None else torch.cat([s[name] for s in shards], dim=layout[name])
        for name, tensor in shards[0].items()
    }


def _checkpoint_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from xlstm_train.parallel.deepspeed_engine import checkpoint_key

    return {checkpoint_key(name): tensor for name, tensor in state.items()}


def convert_deepspeed_checkpoint(directory: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Write a DeepSpeed checkpoint's fp32 model in our format: a DCP directory ``{"model": ...}``,
    with the ``config.yaml`` (and ``train_state.pt``) of a checkpoint our trainer wrote.

    It loads into a model of any parallel layout as the model part of our checkpoints does (for
    evaluation, export or as initial weights). It holds no optimizer state: DeepSpeed keeps the
    moments in its own flat partitions, so they are not converted.
    """
    directory, out_dir = Path(directory), Path(out_dir)
    state = deepspeed_to_state_dict(directory, tag)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():  # left by a conversion that was killed
        shutil.rmtree(tmp)
    with _single_process_ok():
        dcp.save({"model": state}, checkpoint_id=tmp, no_dist=True)
    for name in (CONFIG_FILE, TRAIN_STATE_FILE):
        if (directory / name).is_file():
            shutil.copy2(directory / name, tmp / name)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# Reading a checkpoint outside training (export, evaluation), in either format


def read_checkpoint_config(checkpoint_dir: Path):
    """The run configuration (a ``Config``) saved with a checkpoint of either format; a ConfigError
    unless the checkpoint is whole."""
    from xlstm_train.train.config import Config

    checkpoint_dir = Path(checkpoint_dir)
    expected = (
        f"expected a complete checkpoint directory (runs/<name>/step-NNNNNNN holding {CONFIG_FILE} and "
        f"the model: .metadata, or DeepSpeed's '{DEEPSPEED_TAG_FILE}' tag file)"
    )
    if not checkpoint_dir.is_dir():
        raise ConfigError(f"checkpoint '{checkpoint_dir}': no such directory; {expected}")
    if checkpoint_dir.name.endswith(".tmp"):
        raise ConfigError(f"checkpoint '{checkpoint_dir}' is a save that never completed (.tmp); {expected}")
    missing = [name for name in (CONFIG_FILE,) if not (checkpoint_dir / name).is_file()]
    if not ((checkpoint_dir / ".metadata").is_file() or is_deepspeed(checkpoint_dir)):
        missing.insert(0, ".metadata")
    if missing:
        latest = latest_checkpoint(checkpoint_dir)
        hint = f"; the latest checkpoint in this run directory is '{latest}'" if latest is not None else ""
        raise ConfigError(f"checkpoint '{checkpoint_dir}' has no {' or '.join(missing)}; {expected}{hint}")
    try:
        return from_dict(Config, read_config(checkpoint_dir), where=str(checkpoint_dir / CONFIG_FILE))
    except yaml.YAMLError as e:
        raise ConfigError(f"{checkpoint_dir / CONFIG_FILE} is not valid YAML: {e}") from None


def load_model_state(checkpoint_dir: Path, model_cfg) -> dict[str, torch.Tensor]:
    """The model's full (unsharded) fp32 state dict from a checkpoint of either format, read in this
    process (a DeepSpeed checkpoint of any ZeRO stage and tp is merged by ``deepspeed_to_state_dict``).

    The model is built on the meta device and materialised without init: every tensor of its state
    dict is then filled from the checkpoint. Tied weights stay one tensor under both names."""
    from torch.distributed.checkpoint.api import CheckpointException

    from xlstm_train.models import build_model

    checkpoint_dir = Path(checkpoint_dir)
    with torch.device("meta"):
        model = build_model(model_cfg)
    model.to_empty(device="cpu")
    state = model.state_dict()
    misfit = f"checkpoint '{checkpoint_dir}': its model weights do not fit the model its {CONFIG_FILE} describes"
    if is_deepspeed(checkpoint_dir):
        saved = deepspeed_to_state_dict(checkpoint_dir)
        causes = [f"missing {k}" for k in state if k not in saved]
        causes += [f"unexpected {k}" for k in saved if k not in state]
        causes += [f"{k}: shape {tuple(saved[k].shape)} in the checkpoint, {tuple(v.shape)} in the model"
                   for k, v in state.items() if k in saved and saved[k].shape != v.shape]  # fmt: skip
        if causes:
            raise ConfigError(f"{misfit}: {'; '.join(causes)}")
        with torch.no_grad():
            for name, tensor in state.items():
                tensor.copy_(saved[name])
        return state
    with _single_process_ok():
        try:
            dcp.load({"model": state}, checkpoint_id=checkpoint_dir, no_dist=True)
        except CheckpointException as e:  # missing keys, shape mismatches; one (exception, trace) per rank
            causes = "; ".join(str(failure[0] if isinstance(failure, tuple) else failure)
                               for failure in e.failures.values())  # fmt: skip
            raise ConfigError(f"{misfit}: {causes}") from None
    return state
