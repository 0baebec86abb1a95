"""Benchmark the sLSTM cell: forward and forward+backward time and peak memory.

Implementations: our fused Triton kernels ("triton"), our PyTorch reference ("reference") and the
official CUDA kernel of the `xlstm` package ("official", JIT-compiled with nvcc on first use).
Shapes default to the xLSTM paper's sLSTM blocks: E in {768, 1024}, 4 heads, S = 2048, B in
{4, 8, 16}, bf16 inputs and weights.

    python scripts/bench_slstm.py [--embedding-dims 1024] [--batch-sizes 8] [--json out.json]
    python scripts/bench_kernels.py slstm ...      (same arguments)

All implementations get the same random inputs. Times are medians over repetitions timed with
CUDA events after warm-up; memory is the peak allocated during one call above what was allocated
before it (inputs and weights excluded).
"""

import argparse
import json
import statistics
import sys
from dataclasses import asdict

import torch

IMPLS = ("triton", "reference", "official")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedding-dims", type=int, nargs="+", default=[768, 1024])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument(
        "--official-shapes",
        nargs="*",
        default=None,
        metavar="E:B",
        help="only these (embedding dim, batch) pairs for the official kernel (default: all shapes)",
    )
    parser.add_argument("--reps", type=int, default=10, help="timed repetitions (reference: at most 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--columns", type=int, nargs="+", default=[None], help="triton: output units per program (tuning)"
    )
    parser.add_argument("--json", dest="json_path", default=None, help="also write the rows to this JSON file")


def _time_ms(fn, reps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def _ours(impl, x_gates, columns):
    """Our implementation as a function of (x_gates, R, b) -> y (B, S, NH, DH)."""
    from xlstm_kernels import slstm
    from xlstm_kernels.slstm.triton_kernel import slstm_triton

    if impl == "triton" and columns is not None:
        zeros = torch.zeros(x_gates.shape[0], x_gates.shape[2], x_gates.shape[4], device=x_gates.device)
        return lambda x, r, bias: slstm_triton(x, r, bias, (zeros,) * 4, None, columns=columns)[0]
    return lambda x, r, bias: slstm(x, r, bias, impl=impl)


def _official(x_gates, R, b):
    """The official cell (CUDA backend) holding our weights, as a function of (x_gates, R, b) -> y.

    R and b are the cell's own parameters (bf16 recurrent kernel, fp32 bias, its mixed-precision
    defaults); the R, b arguments are ignored.
    """
    from xlstm.blocks.slstm import cell as official

    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    config = official.sLSTMCellConfig(
        hidden_size=num_heads * head_dim, num_heads=num_heads, backend="cuda", batch_size=batch
    )
    # The compiled extension takes batch and hidden size at run time (sLSTMFunc(training, batch,
    # hidden, heads)); they reach its build only as defines that its sources never read. Reuse the
    # first build for every shape instead of compiling one per shape.
    key = repr({k: v for k, v in asdict(config).items() if k not in "_block_idx"})
    if official.sLSTMCellCUDA.mod and key not in official.sLSTMCellCUDA.mod:
        official.sLSTMCellCUDA.mod[key] = next(iter(official.sLSTMCellCUDA.mod.values()))
    cell = official.sLSTMCell(config).to(x_gates.device)
    cell.recurrent_kernel[:] = R.float()  # the proxy converts from our (NH, DH, 4, DH) layout
    cell.bias[:] = b.float()

    def run(x, r, bias):
        # official input: (B, S, 4 * H) gate-major (4, NH, DH); output (B, NH, S, DH)
        x_official = x.transpose(2, 3).reshape(batch, seq_len, 4 * num_heads * head_dim)
        cell.train(torch.is_grad_enabled())  # its training mode also stores the gate cache
        return cell(x_official)[0].transpose(1, 2)

    return run, list(cell.parameters())


def _bench_one(impl, fn, extra_leaves, x_gates, R, b, reps, warmup):
    leaves = [t.detach().requires_grad_() for t in (x_gates, R, b)] + extra_leaves
    grad = torch.randn(x_gates.shape[:3] + x_gates.shape[4:], device=x_gates.device, dtype=x_gates.dtype)

    def forward():
        with torch.no_grad():
            return fn(x_gates, R, b)

    def forward_backward():
        fn(*leaves[:3]).backward(grad)
        for leaf in leaves:
            leaf.grad = None

    if impl == "reference":  # a Python loop of small launches: seconds per call
        reps, warmup = min(reps, 2), 1
    forward_backward()  # compile or build outside the timing
    return forward(), {
        "forward_ms": _time_ms(forward, reps, warmup),
        "forward_backward_ms": _time_ms(forward_backward, reps, warmup),
        "forward_peak_mib": _peak_mib(forward),
        "forward_backward_peak_mib": _peak_mib(forward_backward),
    }


def run(args) -> list[dict]:
    if not torch.cuda.is_available():
        sys.exit("bench_slstm: needs a CUDA device")
    device = torch.device("cuda")
    official_shapes = None
    if args.official_shapes is not None:
        official_shapes = {tuple(int(v) for v in s.split(":")) for s in args.official_shapes}
    rows = []
    for embedding_dim in args.embedding_dims:
        head_dim = embedding_dim // args.heads
        for batch in args.batch_sizes:
            gen = torch.Generator(device=device).manual_seed(embedding_dim * 1000 + batch)
            shape = (batch, args.seq_len, args.heads, 4, head_dim)
            x_gates = torch.randn(shape, generator=gen, device=device).to(torch.bfloat16)
            R = (torch.randn(args.heads, head_dim, 4, head_dim, generator=gen, device=device) / head_dim**0.5).to(
                torch.bfloat16
            )
            b = torch.randn(args.heads, 4, head_dim, generator=gen, device=device)
            first_output = None
            for impl in args.impls:
                variants = args.columns if impl == "triton" else [None]
                for columns in variants:
                    if impl == "official":
                        if official_shapes is not None and (embedding_dim, batch) not in official_shapes:
                            continue
                        fn, params = _official(x_gates, R, b)
                    else:
                        fn, params = _ours(impl, x_gates, columns), []
                    y, result = _bench_one(impl, fn, params, x_gates, R, b, args.reps, args.warmup)
                    if first_output is None:
                        first_output = y.float()
                    row = {"impl": impl if columns is None else f"{impl}(W={columns})"}
                    row.update(E=embedding_dim, heads=args.heads, head_dim=head_dim, B=batch, S=args.seq_len)
                    row.update(result)
                    # All implementations compute one function: report how far each is from the first.
                    row["rel_diff_y"] = ((y.float() - first_output).norm() / first_output.norm()).item()
                    rows.append(row)
                    print(
                        f"  {row['impl']:>16} E={embedding_dim} B={batch}: fwd {row['forward_ms']:.2f} ms, "
                        f"fwd+bwd {row['forward_backward_ms']:.2f} ms, rel. diff of y {row['rel_diff_y']:.1e}",
                        flush=True,
                    )
            del x_gates, R, b
            torch.cuda.empty_cache()
    if "triton" in args.impls:
        _print_kernel_report()
    _print_table(rows)
    if args.json_path:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": __import__("triton").__version__,
        }
        with open(args.json_path, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return rows


def _print_kernel_report() -> None:
    """Registers, spills and shared memory of each compiled Triton kernel variant."""
    from xlstm_kernels.slstm import triton_kernel

    for kernel in (triton_kernel.slstm_forward_kernel, triton_kernel.slstm_backward_kernel):
        for caches in kernel.device_caches.values():
            for compiled in caches[0].values():
                print(
                    f"  {kernel.__name__}: {compiled.n_regs} registers, {compiled.n_spills} spilled, "
                    f"{compiled.metadata.shared} B shared, {compiled.metadata.num_warps} warps"
                )


def _print_table(rows: list[dict]) -> None:
    official = {(r["E"], r["B"]): r for r in rows if r["impl"] == "official"}
    header = (
        f"{'impl':>16} {'E':>5} {'NH':>3} {'B':>3} {'S':>5} | {'fwd ms':>8} {'fwd+bwd ms':>10} | "
        f"{'fwd MiB':>8} {'f+b MiB':>8} | {'speedup f+b vs official':>23}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        base = official.get((r["E"], r["B"]))
        speedup = f"{base['forward_backward_ms'] / r['forward_backward_ms']:.2f}x" if base else "-"
        print(
            f"{r['impl']:>16} {r['E']:>5} {r['heads']:>3} {r['B']:>3} {r['S']:>5} | {r['forward_ms']:>8.2f} "
            f"{r['forward_backward_ms']:>10.2f} | {r['forward_peak_mib']:>8.0f} {r['forward_backward_peak_mib']:>8.0f} "
            f"| {speedup:>23}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    run(parser.parse_args())
