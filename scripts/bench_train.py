"""Training throughput of the parallel layer: tokens/s per GPU, MFU and peak memory.

One configuration (run under torchrun; recipe overrides pick the layout):

    torchrun --nproc-per-node 4 scripts/bench_train.py --recipe recipes/large/1.3b.yaml parallel.tp=2

The whole table of the parallelism issue (xLSTM-Large 1.3B at S=2048: 1 GPU, FSDP on 2 and 4,
TP=2, TP=4, DeepSpeed ZeRO-2 on 2 and 4), each configuration in its own torchrun:

    python scripts/bench_train.py --sweep --gpus 4 --json bench_train.json

Each step is a full training step on random tokens (forward, backward, clipping, AdamW) with bf16
compute (FSDP gathers bf16 parameters, fp32 master weights and gradient reduction; DeepSpeed bf16;
a single GPU or pure TP use autocast). Timings are the median of the measured steps after warm-up.

MFU = flops_per_token x tokens/s per GPU / peak bf16 FLOP/s of the GPU, with ``flops_per_token``
from ``xlstm_train.train.flops`` (3 x forward; forward = 2 x matmul parameters + the mLSTM chunkwise
cell term; see that module's docstring) and the dense peak from ``xlstm_train.train.metrics``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SWEEP = [  # (name, GPUs, overrides)
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
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--profile", action="store_true",
        help="after the timed steps, profile two more with torch.profiler and print (rank 0) the "
        "operators by CPU time and the kernels by GPU time: where a step's time goes",
    )  # fmt: skip
    p.add_argument("--sweep", action="store_true", help="run the whole table, one torchrun per configuration")
    p.add_argument("--gpus", type=int, default=4, help="--sweep: largest GPU count to include")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. parallel.tp=2")
    return p.parse_args(argv)


def bench_one(args: argparse.Namespace) -> dict | None:
    """One configuration on the ranks torchrun started; returns the result on rank 0."""
    import torch
    import torch.nn.functional as F

    from xlstm_train.models import build_model
    from xlstm_train.parallel import (
        build_mesh,
        clip_grad_norm_,
        dp_rank_and_size,
        init_distributed,
        loss_context,
        parallelize_model,
        to_full,
    )
    from xlstm_train.train.config import load_config
    from xlstm_train.train.flops import flops_per_token
    from xlstm_train.train.metrics import memory_gib, peak_flops

    overrides = [f"data.seq_len={args.seq_len}", f"train.micro_batch_size={args.micro_batch_size}",
                 "train.grad_accum_steps=1", *args.overrides]  # fmt: skip
    cfg = load_config(args.recipe, overrides)
    env = init_distributed(cfg.parallel.timeout_s)
    mesh = build_mesh(cfg.parallel, env.world_size, env.device.type, cfg.model)
    torch.manual_seed(0)
    with torch.device(env.device):
        model = build_model(cfg.model)
    model.init_weights()
    bf16 = torch.bfloat16
    cuda = env.device.type == "cuda"
    if cfg.parallel.engine == "deepspeed":
        from xlstm_train.parallel.deepspeed_engine import build_deepspeed_engine

        engine, _ = build_deepspeed_engine(model, [{"params": list(model.parameters())}], cfg, mesh)
        autocast = torch.autocast(env.device.type, enabled=False)
    else:
        fsdp = mesh is not None and mesh["dp_shard"].size() * mesh["dp_replicate"].size() > 1
        parallelize_model(model, mesh, cfg.parallel, cfg.model, param_dtype=bf16 if fsdp and cuda else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), foreach=True)
        autocast = torch.autocast(env.device.type, dtype=bf16, enabled=cuda and not fsdp)
    dp_rank, dp_size = dp_rank_and_size(mesh)

    def step(tokens: torch.Tensor) -> None:
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        if cfg.parallel.engine == "deepspeed":
            with loss_context(mesh, cfg.parallel):
                loss = F.cross_entropy(engine(inputs).float().flatten(0, 1), labels.flatten())
                engine.backward(to_full(loss))  # a replicated DTensor under vocabulary-parallel loss
            engine.step()
            return
        with loss_context(mesh, cfg.parallel):
            with autocast:
                logits = model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
            loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    B, S = cfg.train.micro_batch_size, cfg.data.seq_len
    gen = torch.Generator(device=env.device).manual_seed(1 + dp_rank)  # TP ranks share a batch
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for n in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), device=env.device, generator=gen)
        sync()
        start = time.perf_counter()
        step(tokens)
        sync()
        if n >= args.warmup:
            times.append(time.perf_counter() - start)
    if args.profile:
        profile_steps(step, lambda: torch.randint(0, cfg.model.vocab_size, (B, S + 1), device=env.device,
                                                  generator=gen), sync, env.rank)  # fmt: skip
    step_time = statistics.median(times)
    tokens_per_gpu = B * S * dp_size / step_time / env.world_size
    peak = peak_flops(env.device)
    mem = torch.tensor(memory_gib(env.device), device=env.device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(mem, op=torch.distributed.ReduceOp.MAX)
    result = {
        "world_size": env.world_size,
        "parallel": {k: getattr(cfg.parallel, k) for k in ("engine", "tp", "dp_replicate", "dp_shard", "zero_stage")},
        "micro_batch_size": B,
        "seq_len": S,
        "step_time_s": step_time,
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": flops_per_token(cfg.model, S) * tokens_per_gpu / peak if peak else None,
        "peak_memory_gib": mem.item(),
        "device": torch.cuda.get_device_name(env.device) if cuda else "cpu",
    }
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return result if env.rank == 0 else None


def profile_steps(step, make_tokens, sync, rank: int, steps: int = 2) -> None:
    """Profile ``steps`` training steps; rank 0 prints the CPU-side operators and the GPU kernels
    that take the most time, and how busy the GPU was over the profiled wall time."""
    from torch.profiler import ProfilerActivity, profile

    sync()
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(make_tokens())
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


def run_sweep(args: argparse.Namespace) -> list[dict]:
    rows = []
    for name, gpus, overrides in SWEEP:
        if gpus > args.gpus:
            continue
        out = f"/tmp/bench_train_{os.getpid()}_{len(rows)}.json"
        cmd = [
            "torchrun", "--standalone", f"--nproc-per-node={gpus}", __file__, "--recipe", args.recipe,
            f"--micro-batch-size={args.micro_batch_size}", f"--seq-len={args.seq_len}",
            f"--warmup={args.warmup}", f"--steps={args.steps}", "--json", out, *overrides, *args.overrides,
        ]  # fmt: skip
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, check=False)
        if proc.returncode != 0:
            rows.append({"name": name, "gpus": gpus, "error": f"exit code {proc.returncode}"})
            continue
        with open(out) as f:
            rows.append({"name": name, "gpus": gpus, **json.load(f)})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'configuration':<24} {'GPUs':>4} {'step s':>8} {'tok/s/GPU':>10} {'MFU':>6} {'peak GiB':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<24} {r['gpus']:>4}  failed: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['name']:<24} {r['gpus']:>4} {r['step_time_s']:>8.3f} {r['tokens_per_s_per_gpu']:>10.0f} "
              f"{mfu:>6} {r['peak_memory_gib']:>9.1f}")  # fmt: skip
    by_name = {r["name"]: r for r in rows if "error" not in r}
    one = by_name.get("1 GPU")
    for dp in ("FSDP dp=2", "FSDP dp=4"):
        if one and dp in by_name:
            eff = by_name[dp]["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
            print(f"data-parallel scaling {dp}: {100 * eff:.1f}% of 1 GPU per GPU (target >= 90%)")
    if "TP=2" in by_name and "FSDP dp=2" in by_name:
        ratio = by_name["TP=2"]["tokens_per_s_per_gpu"] / by_name["FSDP dp=2"]["tokens_per_s_per_gpu"]
        print(f"TP=2 per-GPU tokens/s = {100 * ratio:.1f}% of FSDP dp=2 (target >= 80%)")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        rows = run_sweep(args)
        print_table(rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0 if all("error" not in r for r in rows) else 1
    result = bench_one(args)
    if result is not None:
        print(json.dumps(result, indent=2), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
