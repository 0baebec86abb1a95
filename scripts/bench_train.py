"""Training throughput of the trainer's own step: tokens/s per GPU, MFU and peak memory.

Each timed step is ``Engine.step`` of ``xlstm_train.train.engine``, the step ``train()`` runs:
forward-backward with the token-normalised loss (``doc_ids`` included), clipping, the finite check
and AdamW, at the recipe's precision and engine (FSDP2 or DeepSpeed), plus the schedule's step. Its
micro-batches are random tokens (``--data random``, one document per row) or the recipe's own loader
(``--data recipe``). Timings are the median of the measured steps after warm-up; each step is timed
from fetching its micro-batches to the GPU being idle after its update.

One configuration (under torchrun for several GPUs; recipe overrides pick the layout):

    torchrun --nproc-per-node 4 scripts/bench_train.py --recipe recipes/large/1.3b.yaml parallel.tp=2

The parallel layouts of the parallelism issue (xLSTM-Large 1.3B at S=2048: 1 GPU, FSDP on 2 and 4,
TP=2, TP=4, DeepSpeed ZeRO-2 on 2 and 4), each in its own torchrun:

    python scripts/bench_train.py --sweep --gpus 4 --json bench_train.json

One recipe key at several values, each in its own process (e.g. the mLSTM chunk size):

    python scripts/bench_train.py --sweep model.chunk_size=64,128,256

``--trainer`` times ``train()`` itself instead: it trains ``--warmup + --steps`` steps of the same
configuration in a temporary run directory (logging every step, evaluation and samples off) and
reports the median of the step times the trainer logs (tokens per step / its logged tokens/s).
``--vs-trainer`` runs both, each in its own process on the recipe's data, and prints how far apart
they are: the benchmark's figure is the trainer's when they agree.

MFU = flops_per_token x tokens/s per GPU / peak bf16 FLOP/s of the GPU, with ``flops_per_token``
from ``xlstm_train.train.flops`` (3 x forward; see that module's docstring) and the dense peak from
``xlstm_train.train.metrics``.

Runs from the repository root with ``PYTHONPATH=$PWD``; DeepSpeed, datasets and wandb are imported
only by the configurations that use them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

PARALLEL_LAYOUTS = [  # (name, GPUs, overrides)
    ("1 GPU", 1, []),
    ("FSDP dp=2", 2, ["parallel.zero_stage=3"]),
    ("FSDP dp=4", 4, ["parallel.zero_stage=3"]),
    ("TP=2", 2, ["parallel.tp=2"]),
    ("TP=4", 4, ["parallel.tp=4"]),
    ("DeepSpeed ZeRO-2 dp=2", 2, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
    ("DeepSpeed ZeRO-2 dp=4", 4, ["parallel.engine=deepspeed", "parallel.zero_stage=2"]),
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/large/1.3b.yaml")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--data", choices=("random", "recipe"), default="random",
                   help="micro-batches of random tokens, or from the recipe's data loader")  # fmt: skip
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--profile", action="store_true",
        help="after the timed steps, profile two more with torch.profiler and print (rank 0) the "
        "operators by CPU time and the kernels by GPU time: where a step's time goes",
    )  # fmt: skip
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--trainer", action="store_true", help="time train() itself from the step times it logs")
    mode.add_argument("--vs-trainer", action="store_true",
                      help="run the benchmark and --trainer on the recipe's data and compare their step times")  # fmt: skip
    p.add_argument(
        "--sweep", nargs="?", const="parallel", default=None, metavar="KEY=V1,V2,...",
        help="without a value: the table of parallel layouts, one torchrun each; with KEY=V1,V2,...: one "
        "run per value of that recipe key",
    )  # fmt: skip
    p.add_argument("--gpus", type=int, default=None,
                   help="--sweep: the largest GPU count of the layouts table (default 4); processes per "
                   "run of a key sweep or --vs-trainer (default 1)")  # fmt: skip
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. parallel.tp=2")
    return p.parse_args(argv)


def load_bench_config(args: argparse.Namespace, *extra: str):
    from xlstm_train.train.config import load_config

    overrides = [f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch_size}",
                 "train.grad_accum_steps=1", *args.overrides, *extra]  # fmt: skip
    return load_config(args.recipe, overrides)


def random_micro_batches(cfg, dp_rank: int, device):
    """Endless micro-batches of random tokens (TP ranks share them), the same sequence in every run of
    one configuration: Zipf-distributed, so that the loss falls as a model learns the unigram
    frequencies and two runs' losses can be compared, with two document boundaries in each row."""
    import torch

    B, S, V = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator(device=device).manual_seed(1 + dp_rank)
    probs = 1.0 / torch.arange(1, V + 1, device=device, dtype=torch.float32)
    positions = torch.arange(S, device=device)
    while True:
        tokens = torch.multinomial(probs, B * (S + 1), replacement=True, generator=gen).view(B, S + 1)
        cuts = torch.randint(1, S, (B, 2), device=device, generator=gen)
        doc_ids = (positions[None, :, None] >= cuts[:, None, :]).sum(-1, dtype=torch.int32)
        yield {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:], "doc_ids": doc_ids}


def bench_one(args: argparse.Namespace) -> dict | None:
    """One configuration on the ranks torchrun started; returns the result on rank 0."""
    import torch

    from xlstm_train.data import build_train_loader, load_tokenizer
    from xlstm_train.models import build_model
    from xlstm_train.parallel import build_mesh, dp_rank_and_size, init_distributed
    from xlstm_train.train.engine import build_engine
    from xlstm_train.train.metrics import memory_gib
    from xlstm_train.train.optim import build_scheduler
    from xlstm_train.train.trainer import seed_everything

    cfg = load_bench_config(args)
    env = init_distributed(cfg.parallel.timeout_s, env_device_type())
    mesh = build_mesh(cfg.parallel, env.world_size, env.device.type, cfg.model)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    # built as train() builds it
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(env.device)
    model.train()
    engine = build_engine(model, cfg, mesh, env.device)
    scheduler = build_scheduler(engine.optimizer, cfg.optim, cfg.train.steps)
    if args.data == "recipe":
        micro_batches = iter(build_train_loader(
            cfg.data, micro_batch_size=cfg.train.micro_batch_size, vocab_size=cfg.model.vocab_size,
            dp_rank=dp_rank, dp_size=dp_size, device=str(env.device), tokenizer=load_tokenizer(cfg.data),
        ))  # fmt: skip
    else:
        micro_batches = random_micro_batches(cfg, dp_rank, env.device)
    accum = cfg.train.grad_accum_steps

    losses = []

    def step() -> None:
        losses.append(engine.step([next(micro_batches) for _ in range(accum)]).loss)
        scheduler.step()

    cuda = env.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for n in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        if n >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:
        profile_steps(step, sync, env.rank)
    step_time = statistics.median(times)
    tokens_per_step = cfg.train.micro_batch_size * accum * cfg.data.seq_len * dp_size
    memory = torch.tensor(memory_gib(env.device), device=env.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
        torch.distributed.destroy_process_group()
    if env.rank != 0:
        return None
    result = summarise(cfg, env.world_size, env.device, step_time, tokens_per_step, memory.item())
    return {**result, "losses": losses[: args.warmup + args.steps]}


def env_device_type() -> str | None:
    import torch

    return "cuda" if torch.cuda.is_available() else None


def summarise(cfg, world_size: int, device, step_time: float, tokens_per_step: int, peak_memory_gib: float) -> dict:
    """The result row of one configuration."""
    import torch

    from xlstm_train.train.flops import flops_per_token
    from xlstm_train.train.metrics import peak_flops

    tokens_per_gpu = tokens_per_step / step_time / world_size
    peak = peak_flops(device)
    return {
        "world_size": world_size,
        "parallel": {k: getattr(cfg.parallel, k) for k in ("engine", "tp", "dp_replicate", "dp_shard", "zero_stage")},
        "micro_batch_size": cfg.train.micro_batch_size,
        "grad_accum_steps": cfg.train.grad_accum_steps,
        "seq_len": cfg.data.seq_len,
        "chunk_size": getattr(cfg.model, "chunk_size", None),
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_gpu / peak if peak else None,
        "peak_memory_gib": peak_memory_gib,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


def bench_trainer(args: argparse.Namespace) -> dict | None:
    """``train()`` for warm-up + measured steps; on rank 0, the median of the step times it logged
    (each step's tokens / its logged tokens/s) and the largest memory it logged."""
    import torch

    from xlstm_train.train.trainer import train

    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    # one directory for all ranks: torchrun's ranks share their parent process
    run_dir = os.environ.get("BENCH_TRAIN_RUN_DIR") or os.path.join(
        tempfile.gettempdir(), f"bench_train_run_{os.getppid() if world_size > 1 else os.getpid()}")  # fmt: skip
    cfg = load_bench_config(
        args, f"train.steps={args.warmup + args.steps}", "logging.interval=1", "logging.wandb=disabled",
        "train.eval_interval=0", "train.eval_batches=1", "train.sample_tokens=0", "checkpoint.interval=0",
        "checkpoint.resume=never", f"run_dir={run_dir}",
    )  # fmt: skip
    try:
        train(cfg)
        if rank != 0:
            return None
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = sorted((r for r in map(json.loads, f) if r["kind"] == "train"), key=lambda r: r["step"])
    finally:
        if rank == 0:
            shutil.rmtree(run_dir, ignore_errors=True)
    seen = [0] + [r["tokens_seen"] for r in records]
    times = [(seen[n + 1] - seen[n]) / r["tokens_per_s"] for n, r in enumerate(records)]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return summarise(cfg, world_size, device, statistics.median(times[args.warmup:]), seen[-1] - seen[-2],
                     max(r["memory_gib"] for r in records))  # fmt: skip


def profile_steps(step, sync, rank: int, steps: int = 2) -> None:
    """Profile ``steps`` training steps; rank 0 prints the CPU-side operators and the GPU kernels
    that take the most time, and how busy the GPU was over the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    if rank != 0:
        return
    events = prof.key_averages()
    kernels_ms = sum(e.self_device_time_total for e in events) / 1e3 / steps
    print(f"\n# profile (rank 0): {wall_ms:.1f} ms per step of wall time, {kernels_ms:.1f} ms of GPU kernel "
          f"time per step ({100 * kernels_ms / wall_ms:.0f}% busy, overlapping streams counted twice)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60), flush=True)


# ----------------------------------------------------------------------------------------------
# Several configurations, each in its own process


def launch(args: argparse.Namespace, gpus: int, extra: list[str], *, trainer: bool, data: str) -> dict:
    """Run one configuration of this script in a fresh process (torchrun for several GPUs)."""
    fd, out = tempfile.mkstemp(prefix="bench_train_", suffix=".json")
    os.close(fd)
    launcher = [sys.executable] if gpus == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}"]  # fmt: skip
    cmd = [
        *launcher, os.path.abspath(__file__), "--recipe", args.recipe, f"--micro-batch-size={args.micro_batch_size}",
        f"--seq-len={args.seq_len}", f"--warmup={args.warmup}", f"--steps={args.steps}", f"--data={data}",
        "--json", out, *(["--trainer"] if trainer else []), *(["--profile"] if args.profile else []),
        *args.overrides, *extra,
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    try:
        if subprocess.run(cmd, check=False).returncode != 0:
            return {"error": "failed (its output is above)"}
        with open(out) as f:
            return json.load(f)
    finally:
        os.remove(out)


def parse_key_sweep(spec: str) -> tuple[str, list[str]]:
    key, sep, values = spec.partition("=")
    if not sep or not key or not values:
        raise SystemExit(f"--sweep {spec!r}: expected KEY=V1,V2,... (e.g. model.chunk_size=64,128), or no value")
    return key, re.split(r",(?![^\[]*\])", values)  # commas inside [...] belong to a list value


def run_layouts(args: argparse.Namespace) -> list[dict]:
    max_gpus = args.gpus or 4
    return [
        {"name": name, "gpus": gpus, **launch(args, gpus, overrides, trainer=args.trainer, data=args.data)}
        for name, gpus, overrides in PARALLEL_LAYOUTS
        if gpus <= max_gpus
    ]


def run_key_sweep(args: argparse.Namespace) -> list[dict]:
    key, values = parse_key_sweep(args.sweep)
    gpus = args.gpus or 1
    rows = []
    for value in values:
        override = f"{key}={value}"
        if args.vs_trainer:
            rows += compare_with_trainer(args, gpus, [override], prefix=f"{override} ")
        else:
            rows.append({"name": override, "gpus": gpus,
                         **launch(args, gpus, [override], trainer=args.trainer, data=args.data)})  # fmt: skip
    return rows


def compare_with_trainer(args: argparse.Namespace, gpus: int, extra: list[str], prefix: str = "") -> list[dict]:
    """The benchmark's step and train()'s logged step, both on the recipe's data."""
    rows = [{"name": f"{prefix}{name}", "gpus": gpus, **launch(args, gpus, extra, trainer=trainer, data="recipe")}
            for name, trainer in (("bench", False), ("trainer", True))]  # fmt: skip
    return rows


def print_table(rows: list[dict]) -> None:
    width = max([24, *(len(r["name"]) for r in rows)])
    print(f"{'configuration':<{width}} {'GPUs':>4} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<{width}} {r['gpus']:>4}  {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['name']:<{width}} {r['gpus']:>4} {r['step_time_s']:>8.3f} {r['tokens_per_s_per_gpu']:>10.0f} "
              f"{mfu:>6} {r['peak_memory_gib']:>9.1f}")  # fmt: skip
    by_name = {r["name"]: r for r in rows if "error" not in r}
    with_losses = [r for r in by_name.values() if r.get("losses")]
    if len(with_losses) > 1:  # the same micro-batches in every run: how far the loss curves are apart
        first = with_losses[0]
        for r in with_losses[1:]:
            rel = max(abs(a - b) / abs(a) for a, b in zip(first["losses"], r["losses"]))
            print(f"losses of {r['name']} vs {first['name']}: largest relative difference over "
                  f"{len(r['losses'])} steps {rel:.2e}, final {first['losses'][-1]:.4f} vs {r['losses'][-1]:.4f}")
    one = by_name.get("1 GPU")
    for dp in ("FSDP dp=2", "FSDP dp=4"):
        if one and dp in by_name:
            eff = by_name[dp]["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
            print(f"data-parallel scaling {dp}: {100 * eff:.1f}% of 1 GPU per GPU (target >= 90%)")
    if "TP=2" in by_name and "FSDP dp=2" in by_name:
        ratio = by_name["TP=2"]["tokens_per_s_per_gpu"] / by_name["FSDP dp=2"]["tokens_per_s_per_gpu"]
        print(f"TP=2 per-GPU tokens/s = {100 * ratio:.1f}% of FSDP dp=2 (target >= 80%)")
    for name, bench in by_name.items():
        trainer = by_name.get(name.removesuffix("bench") + "trainer") if name.endswith("bench") else None
        if trainer is not None:
            diff = bench["step_time_s"] / trainer["step_time_s"] - 1
            print(f"{name.removesuffix('bench') or ''}benchmark step time = trainer's logged step time "
                  f"{100 * diff:+.1f}% (target within 3%)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep is not None or args.vs_trainer:
        if args.sweep == "parallel":
            rows = run_layouts(args)
        elif args.sweep is not None:
            rows = run_key_sweep(args)
        else:
            rows = compare_with_trainer(args, args.gpus or 1, [])
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0 if all("error" not in r for r in rows) else 1
    result = bench_trainer(args) if args.trainer else bench_one(args)
    if result is not None:
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
