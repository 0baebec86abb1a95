"""Process groups and the one DeviceMesh of a run.

The launcher (torchrun, the ``deepspeed`` launcher, srun + torchrun) sets RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``init_distributed`` reads them. Without them the run is a
single process and nothing is initialised, so the same code path trains on a laptop and on a cluster.

The mesh has three named dimensions, outermost first: ``dp_replicate`` (HSDP replicas, usually
across nodes), ``dp_shard`` (FSDP / ZeRO sharding) and ``tp`` (tensor parallel, innermost so that
its frequent collectives stay on the fastest links). ``dp`` is the flattened data-parallel view
(dp_replicate x dp_shard): the data loader splits batches over it and losses are averaged over it.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xlstm_train.archs import get_spec
from xlstm_train.config import ConfigError
from xlstm_train.parallel.config import ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class DistributedEnv:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(timeout_s: float = 600, device_type: str | None = None) -> DistributedEnv:
    """Join the process group described by the launcher's environment (no-op for one process).

    ``device_type`` defaults to ``cuda`` when a GPU is visible, else ``cpu``; the backend follows
    (nccl on CUDA, gloo on CPU). ``timeout_s`` bounds every collective: a rank that dies or never
    arrives makes the others fail with a timeout instead of waiting forever.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device(device_type)
    if world_size > 1 and not dist.is_initialized():
        if device_type == "cuda":
            # Fail fast on a collective error or timeout instead of leaving the other ranks stuck.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if device_type == "cuda" else None,
        )
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistributedEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def resolve_dims(cfg: ParallelConfig, world_size: int) -> dict[str, int]:
    """The size of each mesh dimension; ``dp_shard = -1`` takes what tp x dp_replicate leave."""
    dp_shard = cfg.dp_shard
    if dp_shard == -1:
        if world_size % (cfg.tp * cfg.dp_replicate) != 0:
            raise ConfigError(
                f"parallel.tp x parallel.dp_replicate = {cfg.tp} x {cfg.dp_replicate} does not divide "
                f"the world size {world_size}"
            )
        dp_shard = world_size // (cfg.tp * cfg.dp_replicate)
    if cfg.dp_replicate * dp_shard * cfg.tp != world_size:
        raise ConfigError(
            f"parallel.dp_replicate x parallel.dp_shard x parallel.tp = {cfg.dp_replicate} x {dp_shard} x "
            f"{cfg.tp} = {cfg.dp_replicate * dp_shard * cfg.tp}, but the world size is {world_size}"
        )
    return {"dp_replicate": cfg.dp_replicate, "dp_shard": dp_shard, "tp": cfg.tp}


def check_tp_divides_heads(model_cfg: Any, tp: int) -> None:
    """Tensor parallelism gives each rank whole heads: tp must divide every count the
    architecture's spec says it splits."""
    if tp == 1:
        return
    for key, count in get_spec(model_cfg.arch).tp_head_counts(model_cfg).items():
        if count % tp != 0:
            divisors = [d for d in range(1, count + 1) if count % d == 0]
            raise ConfigError(
                f"parallel.tp = {tp} does not divide {key} = {count}: tensor parallelism splits whole "
                f"heads across ranks, so tp must be one of {divisors}"
            )


def build_mesh(
    cfg: ParallelConfig, world_size: int, device_type: str, model_cfg: Any = None
) -> DeviceMesh | None:
    """The run's DeviceMesh ``(dp_replicate, dp_shard, tp)`` plus the flattened ``dp``; None for one process.

    With ``model_cfg``, tp is checked against the model's head counts first, before any process
    group is touched: the one place that check runs."""
    dims = resolve_dims(cfg, world_size)
    if model_cfg is not None:
        check_tp_divides_heads(model_cfg, cfg.tp)
    if world_size == 1:
        return None
    mesh = init_device_mesh(device_type, tuple(dims[d] for d in MESH_DIMS), mesh_dim_names=MESH_DIMS)
    _DP_MESHES[id(mesh)] = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh


# The flattened data-parallel mesh of each root mesh (torch asks callers to keep it themselves).
_DP_MESHES: dict[int, DeviceMesh] = {}


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D data-parallel mesh (dp_replicate x dp_shard flattened) of a ``build_mesh`` mesh."""
    return _DP_MESHES[id(mesh)]


def dp_rank_and_size(mesh: DeviceMesh | None) -> tuple[int, int]:
    """This rank's data-parallel coordinate: which slice of each global batch it loads."""
    if mesh is None:
        return 0, 1
    dp = dp_mesh(mesh)
    return dp.get_local_rank(), dp.size()


def fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The mesh FSDP shards over: 1-D dp_shard, or 2-D (dp_replicate, dp_shard) for HSDP."""
    if mesh["dp_replicate"].size() > 1:
        return mesh["dp_replicate", "dp_shard"]
    return mesh["dp_shard"]


# ------------------------------------------------------------------------------------------------
# Logging and errors across ranks


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_rank_logging(rank: int, level: int = logging.INFO) -> None:
    """Rank 0 logs at ``level``; the other ranks only log warnings and errors, tagged with their rank."""
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RankFilter(rank))
    handler.setFormatter(logging.Formatter("[rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level if rank == 0 else logging.WARNING)


def run_on_every_rank(fn: Callable[[], Any], expected: tuple[type[BaseException], ...] = ()) -> Any:
    """Call ``fn``; if it raises, name this rank and make sure the job ends.

    Errors of the ``expected`` types (bad input the caller reports itself) are re-raised as they
    are: the process exits, and the launcher stops the other ranks. Any other error is printed with
    its rank and traceback; in a multi-process run the process then exits at once rather than
    unwinding into a collective (or a checkpoint thread) that the other ranks will never join.
    """
    try:
        return fn()
    except expected:
        raise
    except Exception as error:
        rank = dist.get_rank() if dist.is_initialized() else _env_int("RANK", 0)
        sys.stderr.write(f"[rank {rank}] {type(error).__name__}: {error}\n{traceback.format_exc()}")
        sys.stderr.flush()
        if dist.is_initialized() and dist.get_world_size() > 1:
            os._exit(1)
        raise


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End a worker of a multi-process run once its work is done: flush its output, leave the
    process group and exit without the interpreter's teardown, during which a native gloo thread
    occasionally aborts the process (SIGABRT) and turns a finished run into a failed job."""
    sys.stdout.flush()
    sys.stderr.flush()
    destroy_distributed()
    os._exit(code)


def rank_prefix() -> str:
    """``"[rank N] "`` in a multi-process run (from the launcher's environment), else ``""``."""
    return f"[rank {_env_int('RANK', 0)}] " if _env_int("WORLD_SIZE", 1) > 1 else ""
