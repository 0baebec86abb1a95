"""Running a sweep: its points one after another in this process, or as a SLURM array.

A point is an ordinary run directory, so everything about resuming is the trainer's: a point whose
final checkpoint and final evaluation are there is finished and skipped; a point with a checkpoint
continues from it (``checkpoint.resume: auto``). Results are read back from each run's
``metrics.jsonl`` into ``SWEEP_DIR/results.csv`` after every point.

Under torchrun or the deepspeed launcher every rank walks the same list; each point is one
``train(cfg)`` call on all ranks, and rank 0 alone prints and writes the sweep's files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

from xlstm_train.config import ConfigError
from xlstm_train.sweep.plan import Sweep, SweepPoint, format_count

RESULTS_FILE = "results.csv"
FAILED_FILE = "failed.json"  # points stopped by a non-finite loss: {name: message}
RESULT_COLUMNS = [
    "arch", "name", "model", "params", "non_embedding_params", "tokens", "flops", "flops_budget",
    "steps", "lr", "loss", "best_loss", "tokens_per_s", "wall_time_s", "status", "run_dir",
]


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _say(*args) -> None:
    if _is_main():
        print(*args, flush=True)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


# ----------------------------------------------------------------------------------------------
# What a run directory says


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return records


def summarize_run(point: SweepPoint, records: list[dict]) -> dict:
    """Final and best validation loss, mean tokens/s and the wall time over all sessions of a run."""
    vals = [r for r in records if r.get("kind") == "val" and r.get("val_loss") is not None]
    final = [r["val_loss"] for r in vals if r.get("step") == point.steps]
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r.get("tokens_per_s")]
    wall, session_start, last = 0.0, None, None
    for r in records:
        if r.get("kind") == "event" and r.get("event") in ("start", "resume"):
            if session_start is not None and last is not None:
                wall += last - session_start
            session_start, last = r["time"], r["time"]
        elif "time" in r:
            last = r["time"]
    if session_start is not None and last is not None:
        wall += last - session_start
    return {
        "loss": final[-1] if final else None,
        "best_loss": min(r["val_loss"] for r in vals) if vals else None,
        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
        "wall_time_s": wall if records else None,
    }


def point_status(point: SweepPoint, failed: dict[str, str]) -> str:
    """``done``, ``failed`` (a non-finite loss stopped it), ``partial`` (resumable) or ``new``."""
    from xlstm_train.train import checkpoint as ckpt

    run_dir = point.run_dir
    if point.name in failed:
        return "failed"
    final_checkpoint = run_dir / ckpt.checkpoint_name(point.steps)
    if ckpt.is_complete(final_checkpoint) and summarize_run(point, read_metrics(run_dir))["loss"] is not None:
        return "done"
    if run_dir.is_dir() and any(run_dir.iterdir()):
        return "partial"
    return "new"


def read_failed(sweep: Sweep) -> dict[str, str]:
    path = sweep.sweep_dir / FAILED_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def result_row(point: SweepPoint, status: str) -> dict:
    summary = summarize_run(point, read_metrics(point.run_dir))
    return {
        "arch": point.arch, "name": point.name, "model": point.model_name, "params": point.params,
        "non_embedding_params": point.non_embedding_params, "tokens": point.tokens, "flops": point.flops,
        "flops_budget": point.flops_budget if point.flops_budget is not None else "",
        "steps": point.steps, "lr": point.cfg.optim.lr,
        **{k: ("" if v is None else v) for k, v in summary.items()},
        "status": status, "run_dir": str(point.run_dir),
    }


def collect_results(sweep: Sweep) -> list[dict]:
    failed = read_failed(sweep)
    return [result_row(p, point_status(p, failed)) for p in sweep.points]


def write_results(sweep: Sweep, rows: list[dict]) -> Path:
    """``SWEEP_DIR/results.csv``, written to a temporary name and renamed (a kill leaves the old one)."""
    path = sweep.sweep_dir / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------
# Running here


def _set_aside_unresumable(point: SweepPoint) -> None:
    """A run directory killed before its first checkpoint cannot be resumed (the trainer refuses an
    occupied directory without one); it is renamed, not deleted, and the point starts afresh."""
    from xlstm_train.train import checkpoint as ckpt

    run_dir = point.run_dir
    if not (run_dir.is_dir() and any(run_dir.iterdir())) or ckpt.latest_checkpoint(run_dir) is not None:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"run directory '{run_dir}' holds files but no checkpoint to resume from; "
                          "move it away and run the sweep again")
    n = 1
    while run_dir.with_name(f"{run_dir.name}.incomplete-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.incomplete-{n}")
    run_dir.rename(aside)
    _say(f"  {run_dir} had no checkpoint to resume from; moved to {aside}, starting afresh")


def run_sweep(sweep: Sweep, *, only: list[str] | None = None, retry_failed: bool = False) -> list[dict]:
    """Run the sweep's unfinished points in this process, one after another; return the result rows."""
    from xlstm_train.train import checkpoint as ckpt
    from xlstm_train.train.trainer import NonFiniteError, train

    points = sweep.points
    if only:
        known = {p.name: p for p in points}
        for name in only:
            if name not in known:
                raise ConfigError(f"--point {name}: no such point in {sweep.recipe}; the points are: "
                                  + ", ".join(known))
        points = [known[name] for name in only]
    if _is_main():
        sweep.sweep_dir.mkdir(parents=True, exist_ok=True)
    failed = read_failed(sweep)
    if retry_failed:
        failed = {k: v for k, v in failed.items() if k not in {p.name for p in points}}
    statuses = {p.name: point_status(p, failed) for p in points}
    remaining = {p.name: p.flops for p in points if statuses[p.name] in ("new", "partial")}
    total_flops = sum(p.flops for p in points)
    n = len(points)
    started = time.perf_counter()
    trained_flops, trained_time = 0.0, 0.0
    for k, point in enumerate(points, 1):
        tag = f"[{k}/{n}] {point.name}"
        status = statuses[point.name]
        if status == "done":
            _say(f"{tag}: finished earlier, skipped")
            continue
        if status == "failed":
            _say(f"{tag}: stopped earlier by a non-finite loss, skipped (--retry-failed runs it again): "
                 f"{failed[point.name]}")
            continue
        _set_aside_unresumable(point)
        latest = ckpt.latest_checkpoint(point.run_dir)
        done_steps = int(latest.name.split("-")[1]) if latest is not None else 0
        _say(f"{tag}: {point.arch}, {format_count(point.params)} parameters, {point.steps} steps x "
             f"{point.tokens_per_step} tokens = {format_count(point.tokens)} tokens, {point.flops:.3g} FLOPs"
             + (f", resuming at step {done_steps}" if latest is not None else ""))
        t0 = time.perf_counter()
        try:
            summary = train(point.cfg)
        except NonFiniteError as e:
            failed[point.name] = str(e)
            if _is_main():
                (sweep.sweep_dir / FAILED_FILE).write_text(json.dumps(failed, indent=1))
            _say(f"{tag}: stopped by a non-finite loss; the sweep goes on without it")
            remaining.pop(point.name, None)
            continue
        elapsed = time.perf_counter() - t0
        if summary.get("stopped"):
            # a stop request (preemption, a time limit, Ctrl-C) ends the sweep, not just this point:
            # the point has its checkpoint, and the same command resumes it and the points after it
            rows = collect_results(sweep)
            if _is_main():
                write_results(sweep, rows)
            _say(f"{tag}: stopped by {summary['stopped']} at step {summary['step']} of {point.steps}; the sweep "
                 "stops here, and the same command resumes it")
            return rows
        trained_flops += point.flops * (point.steps - done_steps) / point.steps
        trained_time += elapsed
        remaining.pop(point.name, None)
        rate = trained_flops / trained_time if trained_time > 0 else float("nan")
        eta = sum(remaining.values()) / rate if remaining else 0.0
        rows = collect_results(sweep)
        if _is_main():
            write_results(sweep, rows)
        loss = next((r["loss"] for r in rows if r["name"] == point.name), "")
        done_flops = total_flops - sum(remaining.values())
        _say(f"{tag}: done in {format_duration(elapsed)}, val loss "
             f"{loss if loss == '' else f'{loss:.4f}'} | sweep {done_flops / total_flops:.0%} of its FLOPs, "
             f"{n - len(remaining)}/{n} points | elapsed {format_duration(time.perf_counter() - started)} "
             f"| ETA {format_duration(eta)}")
    rows = collect_results(sweep)
    if _is_main():
        path = write_results(sweep, rows)
        finished = sum(r["status"] == "done" for r in rows)
        _say(f"{sweep.name}: {finished}/{len(rows)} points finished; results in {path}")
    return rows


# ----------------------------------------------------------------------------------------------
# SLURM: one array task per unfinished point


def fit_finished_sweep(sweep: Sweep, rows: list[dict], *, bootstrap: int | None = None) -> None:
    """Fit and plot ``results.csv`` into ``SWEEP_DIR/fit`` with the recipe's ``fit:`` settings once every
    point is done; otherwise say which points are missing. ``bootstrap`` overrides ``fit.bootstrap``."""
    from xlstm_train.sweep.fit import run_fit

    unfinished = [r["name"] for r in rows if r["status"] != "done"]
    if unfinished:
        print(f"not fitted: {len(unfinished)} point(s) not finished ({', '.join(unfinished)}); `xlstm-train fit "
              f"{sweep.sweep_dir / 'results.csv'} --out DIR` fits the finished ones")
        return
    if bootstrap is None:
        bootstrap = int(sweep.fit.get("bootstrap", 1000))
    run_fit(sweep.sweep_dir / "results.csv", sweep.sweep_dir / "fit", bootstrap=bootstrap,
            params_column=sweep.fit.get("params_column", "params"),
            predict_flops=[float(c) for c in sweep.fit.get("predict_flops", [])],
            delta=float(sweep.fit.get("huber_delta", 1e-3)))
    print(f"fit and plots in {sweep.sweep_dir / 'fit'}")


def run_point_job(recipe: str, overrides: list[str], sweep_dir: str, point_name: str, cwd: str) -> dict:
    """The body of one SLURM array task (submitit): this task's rank of one point's run."""
    import submitit

    from xlstm_train.sweep.plan import load_sweep
    from xlstm_train.train.trainer import train

    os.chdir(cwd)  # recipes name data and runs relative to the directory the sweep was started in
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    sweep = load_sweep(recipe, overrides, sweep_dir=sweep_dir, world_size=env.num_tasks)
    point = next(p for p in sweep.points if p.name == point_name)
    return train(point.cfg)


def slurm_world_size(slurm_opts: dict) -> int:
    """The processes of one array task: the world size its point's batch is planned for."""
    return int(slurm_opts.get("nodes", 1)) * max(int(slurm_opts.get("gpus_per_node", 1)), 1)


def _slurm_resources(sweep: Sweep) -> dict:
    opts = sweep.slurm
    gpus = int(opts.get("gpus_per_node", 1))
    return {
        "nodes": int(opts.get("nodes", 1)),
        "gpus_per_node": gpus,
        "tasks_per_node": max(gpus, 1),
        "cpus_per_task": int(opts.get("cpus_per_task", 8)),
        "timeout_min": int(opts.get("timeout_min", 24 * 60)),
    }


def submit_slurm(sweep: Sweep, recipe: str, overrides: list[str], *, cluster: str = "slurm") -> list:
    """Submit one array job, one task per unfinished point, through submitit; returns its jobs.
    The world size of each task (nodes x gpus_per_node) is what the points were planned with."""
    import submitit

    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("--launcher slurm: no `sbatch` on this machine; run the sweep from a SLURM login "
                          "node, or use --launcher sbatch to write a batch script")
    failed = read_failed(sweep)
    pending = [p for p in sweep.points if point_status(p, failed) in ("new", "partial")]
    if not pending:
        _say(f"{sweep.name}: every point is finished or failed; nothing to submit")
        return []
    res = _slurm_resources(sweep)
    executor = submitit.AutoExecutor(folder=sweep.sweep_dir / "slurm" / "%j", cluster=cluster)
    params = dict(name=sweep.name, nodes=res["nodes"], gpus_per_node=res["gpus_per_node"],
                  tasks_per_node=res["tasks_per_node"], cpus_per_task=res["cpus_per_task"],
                  timeout_min=res["timeout_min"])
    if cluster == "slurm":
        opts = sweep.slurm
        params.update({f"slurm_{k}": opts[k] for k in ("partition", "account", "qos", "constraint") if k in opts})
        if "mem_gb" in opts:
            params["mem_gb"] = opts["mem_gb"]
        params["slurm_array_parallelism"] = int(opts.get("array_parallelism", len(pending)))
    executor.update_parameters(**params)
    cwd = os.getcwd()
    jobs = executor.map_array(
        run_point_job, [str(sweep.recipe)] * len(pending), [list(overrides)] * len(pending),
        [str(sweep.sweep_dir)] * len(pending), [p.name for p in pending], [cwd] * len(pending),
    )
    for p, job in zip(pending, jobs):
        _say(f"submitted {p.name} as job {job.job_id}")
    _say(f"{len(jobs)} array tasks; logs in {sweep.sweep_dir / 'slurm'}. When they are done, "
         f"`xlstm-train sweep {sweep.recipe} --collect` writes results.csv and fits")
    return jobs


def write_sbatch(sweep: Sweep, recipe: str, overrides: list[str]) -> Path:
    """``SWEEP_DIR/sweep.sbatch``: an array job, one task per unfinished point, each running
    torchrun on its nodes for ``xlstm-train sweep RECIPE --point NAME``."""
    failed = read_failed(sweep)
    pending = [p for p in sweep.points if point_status(p, failed) in ("new", "partial")]
    if not pending:
        raise ConfigError(f"{sweep.recipe}: every point is finished or failed; no batch script to write")
    res = _slurm_resources(sweep)
    opts = sweep.slurm
    parallelism = int(opts.get("array_parallelism", len(pending)))
    lines = [
        "#!/usr/bin/env bash",
        f"# The unfinished points of sweep '{sweep.name}' ({sweep.recipe}), one array task each.",
        f"#   sbatch {sweep.sweep_dir / 'sweep.sbatch'}",
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --array=0-{len(pending) - 1}%{parallelism}",
        f"#SBATCH --nodes={res['nodes']}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={res['gpus_per_node']}",
        f"#SBATCH --cpus-per-task={res['cpus_per_task']}",
        f"#SBATCH --time={res['timeout_min'] // 60}:{res['timeout_min'] % 60:02d}:00",
        f"#SBATCH --output={sweep.sweep_dir / 'slurm'}/%A_%a.out",
    ]
    for key in ("partition", "account", "qos", "constraint"):
        if key in opts:
            lines.append(f"#SBATCH --{key}={opts[key]}")
    if "mem_gb" in opts:
        lines.append(f"#SBATCH --mem={opts['mem_gb']}G")
    names = " ".join(shlex.quote(p.name) for p in pending)
    extra = " ".join(shlex.quote(o) for o in overrides)
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(os.getcwd())}",
        f"POINTS=({names})",
        'POINT=${POINTS[$SLURM_ARRAY_TASK_ID]}',
        'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "MASTER_PORT=$((20000 + SLURM_ARRAY_TASK_ID % 20000))",
        "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}",
        'srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c "',
        f"  torchrun --nnodes $SLURM_JOB_NUM_NODES --node-rank \\$SLURM_NODEID "
        f"--nproc-per-node {res['gpus_per_node']} \\",
        "    --master-addr $MASTER_ADDR --master-port $MASTER_PORT --max-restarts 0 --no-python \\",
        f"    xlstm-train sweep {shlex.quote(str(sweep.recipe))} --sweep-dir "
        f"{shlex.quote(str(sweep.sweep_dir))} --point $POINT{' ' + extra if extra else ''}\"",
        "",
    ]
    path = sweep.sweep_dir / "sweep.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    (sweep.sweep_dir / "slurm").mkdir(exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    _say(f"wrote {path} ({len(pending)} array tasks); submit it with: sbatch {path}")
    return path


__all__ = ["RESULT_COLUMNS", "collect_results", "point_status", "run_sweep", "slurm_world_size",
           "submit_slurm", "write_results", "write_sbatch"]
