"""Benchmark the xLSTM cells: forward and forward+backward time and peak memory.

    python scripts/bench_kernels.py mlstm [--seq-lens 2048 8192] [--layers 7b] [--json out.json]
    python scripts/bench_kernels.py slstm ...      (arguments of scripts/bench_slstm.py)

mLSTM columns: our Triton kernels with the exponential and the sigmoid input gate, our chunkwise
PyTorch reference, torch SDPA causal flash attention (32 heads x 128, the Llama-7B layer) on the
same tokens, and the official mlstm_kernels Triton kernels when that package imports. Every
configuration processes the same number of tokens (B = tokens / S). Times are medians of
``triton.testing.do_bench``; memory is the peak allocated during one call above what was allocated
before it (the inputs), in GiB. bf16 q, k, v; fp32 gate pre-activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

# name -> (heads, DQK, DV)
MLSTM_LAYERS = {
    "7b": (8, 256, 512),  # xLSTM-7B: E=4096, qk_dim 0.5 E, v_dim E, 8 heads
    "paper-1.3b": (4, 1024, 1024),  # xLSTM[1:0] 1.3B: E=2048, pre-up projection x2 -> 4096, 4 heads
}
MLSTM_COLUMNS = ("ours-exp", "ours-sigmoid", "reference", "sdpa-flash", "official-limit-chunk",
                 "official-xl-chunk", "official-xl-chunk-sigmoid")  # fmt: skip


def add_mlstm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", type=int, default=65536, help="B * S for every configuration")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--layers", nargs="+", choices=sorted(MLSTM_LAYERS), default=list(MLSTM_LAYERS))
    parser.add_argument("--columns", nargs="+", choices=MLSTM_COLUMNS, default=list(MLSTM_COLUMNS))
    parser.add_argument(
        "--input-gates", nargs="+", choices=("exp", "sigmoid"), default=["exp", "sigmoid"], help="for --breakdown"
    )
    parser.add_argument(
        "--launch", default=None, metavar="SETTINGS",
        help="launch settings for our kernels in the table or the profile, as in --breakdown (e.g. 'states.num_stages=3')",
    )  # fmt: skip
    parser.add_argument("--chunk-size", type=int, default=None, help="our kernels' chunk (default 128)")
    parser.add_argument(
        "--reference-max-seq", type=int, default=8192, help="skip the (slow) reference above this length"
    )
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of the table: the torch.profiler kernel table of our forward+backward (GPU time per "
        "call of every kernel, ours and PyTorch's), for each layer, S and input gate",
    )
    parser.add_argument(
        "--breakdown",
        nargs="*",
        metavar="VARIANT",
        default=None,
        help="instead of the table: time each of our kernels alone for launch variants such as "
        "'L=64' or 'L=128,output.BV=128,grads.num_warps=8,state_dtype=float32' (the chunk first; "
        "no VARIANT: a default set)",
    )


def _mlstm_inputs(B, NH, S, DQK, DV, device, generator=None):
    """bf16 q, k, v and fp32 gate pre-activations (i ~ N(0, 1), f ~ 3 + N(0, 1))."""
    q, k = (torch.randn(B, NH, S, DQK, device=device, generator=generator, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(B, NH, S, DV, device=device, generator=generator, dtype=torch.bfloat16)
    i = torch.randn(B, NH, S, device=device, generator=generator)
    f = 3.0 + torch.randn(B, NH, S, device=device, generator=generator)
    return q, k, v, i, f


BREAKDOWN_VARIANTS = [
    "L=128",
    "L=128,output.BV=256,output.num_warps=8",
    "L=128,grads.num_warps=8",
    "L=128,states.num_stages=3",
    "L=128,states.BV=64",
    "L=256",
    "L=256,states.BV=64",
    "L=256,output.BV=256,output.num_warps=8",
    "L=64",
]


def run_mlstm_breakdown(args) -> list[dict]:
    """Time each kernel of ours alone (forward states, forward output, backward states, backward
    gradients) for launch variants; print registers and spills of every compiled kernel."""
    import triton
    import triton.testing

    from xlstm_kernels.mlstm import triton_chunkwise as tc

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py mlstm needs a CUDA device")
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    rows = []
    for layer in args.layers:
        NH, DQK, DV = MLSTM_LAYERS[layer]
        for S in args.seq_lens:
            B = max(1, args.tokens // S)
            q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, device)
            dh = torch.randn_like(v)
            reset = torch.zeros(B, S, device=device, dtype=torch.int8)
            for gate in args.input_gates:
                for variant in args.breakdown or BREAKDOWN_VARIANTS:
                    chunk, _, settings = variant.partition(",")
                    cfg = tc._Config(q, v, int(chunk.removeprefix("L=")), gate, 1e-6)
                    if settings:
                        cfg.override(settings)
                    try:
                        summary = tc._ChunkSummary(i, f, reset, cfg)
                        states = tc._launch_fwd_states(k, v, summary, None, None, None, cfg)[:3]
                        h, m_tok, qn_tok = tc._launch_fwd_output(q, k, v, i, f, reset, summary, *states, cfg)
                        den, _, dqn = tc._normaliser_grads(dh, h, m_tok, qn_tok, cfg)
                        dc_states, dn_states, _, carry_dots = tc._launch_bwd_states(
                            q, dh, summary, m_tok, den, dqn, states, None, None, cfg)  # fmt: skip
                        d_states = (dc_states, dn_states, carry_dots)
                        launches = {
                            "summary": lambda: tc._ChunkSummary(i, f, reset, cfg),
                            "fwd_states": lambda: tc._launch_fwd_states(k, v, summary, None, None, None, cfg),
                            "fwd_output": lambda: tc._launch_fwd_output(q, k, v, i, f, reset, summary, *states, cfg),
                            "bwd_states": lambda: tc._launch_bwd_states(
                                q, dh, summary, m_tok, den, dqn, states, None, None, cfg),
                            "bwd_grads": lambda: tc._launch_bwd_key_grads(
                                q, k, v, dh, den, summary, states[2],
                                tc._launch_bwd_query_grads(q, k, v, i, f, reset, dh, m_tok, den, dqn, summary, states, cfg),
                                d_states, cfg),
                        }  # fmt: skip
                        times = {
                            name: triton.testing.do_bench(fn, warmup=10, rep=args.rep_ms, return_mode="median")
                            for name, fn in launches.items()
                        }
                        del states, d_states, h
                    except Exception as error:
                        times = {"error": f"{type(error).__name__}: {str(error)[:200]}"}
                    torch.cuda.empty_cache()
                    row = dict(layer=layer, S=S, B=B, gate=gate, variant=variant, **times)
                    rows.append(row)
                    cells = "  ".join(f"{k} {v:7.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in times.items())
                    print(f"{layer:>10} S={S:<6} {gate:<8} {variant:<70} {cells}", flush=True)
    for kernel in (tc._chunk_summary_kernel, tc._fwd_states_kernel, tc._fwd_output_kernel, tc._bwd_states_kernel,
                   tc._bwd_scores_kernel, tc._bwd_dq_kernel, tc._bwd_dkdv_kernel, tc._gate_grads_kernel,
                   tc._input_gate_grads_kernel):
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                if not hasattr(compiled, "n_regs"):  # its launch failed (out of resources)
                    continue
                print(f"  {kernel.__name__}: {compiled.n_regs} registers, {compiled.n_spills} spilled, "
                      f"{compiled.metadata.shared} B shared, {compiled.metadata.num_warps} warps, "
                      f"{compiled.metadata.num_stages} stages")  # fmt: skip
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(rows, file, indent=2)
    return rows


def _apply_launch_settings(settings: str | None) -> None:
    """Make every call of our kernels use these launch settings (``_Config.override``)."""
    if not settings:
        return
    from xlstm_kernels.mlstm import triton_chunkwise as tc

    default_init = tc._Config.__init__

    def init_with_launch_settings(self, *init_args, **init_kwargs):
        default_init(self, *init_args, **init_kwargs)
        self.override(settings)

    tc._Config.__init__ = init_with_launch_settings
    print(f"# launch settings: {settings}")


def run_mlstm_profile(args) -> None:
    """Where the time of one forward+backward goes, kernel by kernel: our Triton kernels and the
    PyTorch operations around them (autograd glue, the stabiliser's backward scan)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py mlstm needs a CUDA device")
    device = torch.device("cuda")
    _apply_launch_settings(args.launch)
    steps = 5
    for layer in args.layers:
        NH, DQK, DV = MLSTM_LAYERS[layer]
        for S in args.seq_lens:
            B = max(1, args.tokens // S)
            q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, device)
            leaves = [t.requires_grad_(True) for t in (q, k, v, i, f)]
            for gate in args.input_gates:
                forward = _mlstm_column(f"ours-{gate}", args.chunk_size)
                grad_out = torch.randn_like(v)
                def forward_backward():
                    for t in leaves:  # no gradient accumulation kernels in the profile
                        t.grad = None
                    forward(*leaves).backward(grad_out)

                for _ in range(3):  # compile and warm up
                    forward_backward()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(steps):
                        forward_backward()
                    torch.cuda.synchronize()
                events = [e for e in prof.key_averages() if e.device_time_total > 0]
                events.sort(key=lambda e: -e.device_time_total)
                total_ms = sum(e.device_time_total for e in events) / 1e3 / steps
                print(f"\n## {layer} S={S} B={B} {gate} gate: {total_ms:.2f} ms of GPU time per forward+backward")
                print("| kernel | calls | ms per fwd+bwd | share |")
                print("|---|---|---|---|")
                for e in events:
                    ms = e.device_time_total / 1e3 / steps
                    print(f"| {e.key[:90]} | {e.count // steps} | {ms:.3f} | {100 * ms / total_ms:.1f}% |")
            del q, k, v, i, f, leaves
            torch.cuda.empty_cache()


def _mlstm_column(name: str, chunk_size: int | None):
    """A function (q, k, v, i, f) -> h for the column, or None when unavailable here."""
    from xlstm_kernels import mlstm

    if name in ("ours-exp", "ours-sigmoid"):
        gate = "exp" if name == "ours-exp" else "sigmoid"
        return lambda q, k, v, i, f: mlstm(q, k, v, i, f, input_gate=gate, impl="triton", chunk_size=chunk_size)
    if name == "reference":
        return lambda q, k, v, i, f: mlstm(q, k, v, i, f, impl="reference")
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError:
        return None
    kernel_name, chunk = {
        "official-limit-chunk": ("chunkwise--triton_limit_chunk", 64),
        "official-xl-chunk": ("chunkwise--triton_xl_chunk", 128),
        "official-xl-chunk-sigmoid": ("chunkwise--triton_xl_chunk_siging", 128),
    }[name]
    kernel = get_mlstm_kernel(kernel_name)
    return lambda q, k, v, i, f: kernel(q, k, v, i, f, chunk_size=chunk, autocast_kernel_dtype=torch.bfloat16)


def _measure(forward, inputs, rep_ms):
    """(forward ms, forward+backward ms, forward GiB, forward+backward GiB) or an error string."""
    import triton.testing

    def peak_gib(fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**30

    leaves = [t.detach().requires_grad_(True) for t in inputs]
    grad_out = None

    def forward_only():
        with torch.no_grad():
            return forward(*inputs)

    def forward_backward():
        nonlocal grad_out
        out = forward(*leaves)
        if grad_out is None:
            grad_out = torch.randn_like(out)
        out.backward(grad_out)

    try:
        forward_backward()  # compile and allocate the output gradient outside the timings
        fwd_ms = triton.testing.do_bench(forward_only, warmup=25, rep=rep_ms, return_mode="median")
        fb_ms = triton.testing.do_bench(
            forward_backward, warmup=25, rep=rep_ms, grad_to_none=leaves, return_mode="median"
        )
        for t in leaves:
            t.grad = None
        fwd_gib = peak_gib(forward_only)
        fb_gib = peak_gib(forward_backward)
    except torch.cuda.OutOfMemoryError:
        return "OOM"
    except Exception as error:  # an official kernel may not compile on this Triton
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80] if str(error) else ''}"
    finally:
        for t in leaves:
            t.grad = None
        torch.cuda.empty_cache()
    return fwd_ms, fb_ms, fwd_gib, fb_gib


def run_mlstm(args) -> list[dict]:
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py mlstm needs a CUDA device")
    import triton

    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}")
    _apply_launch_settings(args.launch)
    rows = []
    for layer in args.layers:
        NH, DQK, DV = MLSTM_LAYERS[layer]
        for S in args.seq_lens:
            B = max(1, args.tokens // S)
            gen = torch.Generator(device=device).manual_seed(0)
            q, k, v, i, f = _mlstm_inputs(B, NH, S, DQK, DV, device, gen)
            for column in args.columns:
                if column == "reference" and S > args.reference_max_seq:
                    continue
                row = dict(layer=layer, column=column, B=B, NH=NH, S=S, DQK=DQK, DV=DV, launch=args.launch)
                if column == "sdpa-flash":
                    heads, dim = 32, 128
                    qkv = [torch.randn(B, heads, S, dim, device=device, generator=gen, dtype=torch.bfloat16)
                           for _ in range(3)]  # fmt: skip
                    row.update(NH=heads, DQK=dim, DV=dim)
                    result = _measure(_sdpa_flash, qkv, args.rep_ms)
                    del qkv
                else:
                    if column.startswith("official") and max(DQK, DV) > 512:
                        # chunkwise--triton_limit_chunk hits an illegal memory access at head dim
                        # 1024 (H200, Triton 3.6), which poisons the CUDA context for what follows
                        continue
                    forward = _mlstm_column(column, args.chunk_size)
                    if forward is None:
                        continue
                    result = _measure(forward, (q, k, v, i, f), args.rep_ms)
                if isinstance(result, str):
                    row["error"] = result
                else:
                    row.update(zip(("forward_ms", "forward_backward_ms", "forward_gib", "forward_backward_gib"), result))
                rows.append(row)
                _print_row(row)
            del q, k, v, i, f
            torch.cuda.empty_cache()
    print()
    _print_mlstm_table(rows)
    if args.json_path:
        with open(args.json_path, "w") as file:
            json.dump(rows, file, indent=2)
    return rows


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['layer']:>10} S={row['S']:<6} {row['column']:<26} {row['error']}", flush=True)
    else:
        print(
            f"{row['layer']:>10} S={row['S']:<6} {row['column']:<26} fwd {row['forward_ms']:8.2f} ms  "
            f"fwd+bwd {row['forward_backward_ms']:8.2f} ms  peak {row['forward_gib']:6.2f} / "
            f"{row['forward_backward_gib']:6.2f} GiB",
            flush=True,
        )


def _print_mlstm_table(rows: list[dict]) -> None:
    """Markdown: one row per (layer, S), one 'fwd / fwd+bwd ms (peak fwd+bwd GiB)' cell per column."""
    columns = [c for c in MLSTM_COLUMNS if any(r["column"] == c for r in rows)]
    print("| layer | S | B | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for key in dict.fromkeys((r["layer"], r["S"], r["B"]) for r in rows):
        cells = []
        for column in columns:
            row = next((r for r in rows if (r["layer"], r["S"], r["B"]) == key and r["column"] == column), None)
            if row is None:
                cells.append("-")
            elif "error" in row:
                cells.append(row["error"] if row["error"] == "OOM" else "fails")
            else:
                cells.append(f"{row['forward_ms']:.2f} / {row['forward_backward_ms']:.2f} ({row['forward_backward_gib']:.1f})")
        print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_mlstm_arguments(commands.add_parser("mlstm", help="the mLSTM cell (chunkwise kernels)"))
    slstm_parser = commands.add_parser("slstm", help="the sLSTM cell (see scripts/bench_slstm.py)")
    bench_slstm = None
    if argv[:1] == ["slstm"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_slstm

        bench_slstm.add_arguments(slstm_parser)
    args = parser.parse_args(argv)
    if args.command == "slstm":
        bench_slstm.run(args)
    elif args.profile:
        run_mlstm_profile(args)
    elif args.breakdown is not None:
        run_mlstm_breakdown(args)
    else:
        run_mlstm(args)


if __name__ == "__main__":
    main()
