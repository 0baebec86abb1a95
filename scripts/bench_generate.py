"""Decoding speed and memory against context length: xLSTM-Large 1.3B and our Llama 1.3B, one GPU.

For each model and context length L, a random prompt of L tokens is prefilled and then
``--new-tokens`` tokens are decoded greedily by ``xlstm_train.models.generate.generate_stream``, the
code behind ``xlstm-train generate``: the xLSTM carries its recurrent state (mLSTM step kernel in
Triton on CUDA), Llama its KV cache. Reported per (model, L):

- ``ms_per_token`` / ``tokens_per_s``: decoding time per generated token (batch 1), after prefill;
- ``prefill_s``: time to the first generated token;
- ``state_mib``: the bytes of the state after decoding (xLSTM: C, n, m and conv histories; Llama:
  the allocated KV cache);
- ``peak_gib``: peak allocated GPU memory during decoding, weights included.

Weights are randomly initialised (the speed does not depend on them) in fp32 and run under bf16
autocast, as ``generate`` runs a bf16 checkpoint. Llama's ``max_seq_len`` is raised to the longest
context + new tokens (RoPE tables only). Prints a table, writes JSON and a PNG plot (matplotlib):

    python scripts/bench_generate.py --json bench_generate.json --plot docs/bench_generate.png
    python scripts/bench_generate.py --quick          # 1k and 4k tokens, 32 new tokens

``--override KEY=VALUE`` applies recipe overrides to both models (e.g. a tiny model on CPU:
``--device cpu --contexts 64,128 --override model.embedding_dim=64 model.num_blocks=2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from xlstm_train.models import build_model  # noqa: E402
from xlstm_train.models.generate import generate_stream  # noqa: E402
from xlstm_train.models.llama import KVCache  # noqa: E402
from xlstm_train.train.config import load_config  # noqa: E402

MODELS = {"xlstm-large-1.3b": REPO / "recipes" / "large" / "1.3b.yaml", "llama-1.3b": REPO / "recipes" / "llama" / "1.3b.yaml"}
CONTEXTS = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
QUICK_CONTEXTS = [1024, 4096]


def state_bytes(state) -> int:
    if isinstance(state, KVCache):
        return sum(t.numel() * t.element_size() for t in state.keys + state.values)
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(s) for s in state)
    return 0


def build(name: str, overrides: list[str], max_len: int, device: torch.device):
    cfg = load_config(MODELS[name], overrides)
    if cfg.model.arch == "llama":
        cfg.model.max_seq_len = max(cfg.model.max_seq_len, max_len)
    with torch.device("meta"):
        model = build_model(cfg.model)
    model.to_empty(device=device)
    model.init_weights()
    return model.eval(), cfg


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, vocab_size: int, context: int, new_tokens: int, device: torch.device) -> dict:
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    prompt = torch.randint(0, vocab_size, (context,), device=device, generator=torch.Generator(device).manual_seed(0))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    captured = {}

    def keep_state(module, args, kwargs, output):  # the state the last decoding step returned
        if isinstance(output, tuple):
            captured["state"] = output[1]

    handle = model.register_forward_hook(keep_state, with_kwargs=True)
    try:
        with autocast:
            sync(device)
            start = time.perf_counter()
            stream = generate_stream(model, [prompt], new_tokens, temperature=0.0)
            next(stream)
            sync(device)
            first = time.perf_counter()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)  # decoding's peak, not prefill's activations
            decoded = sum(1 for _ in stream)
            sync(device)
            end = time.perf_counter()
    finally:
        handle.remove()
    per_token = (end - first) / max(decoded, 1)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"context": context, "new_tokens": decoded + 1, "prefill_s": first - start, "ms_per_token": 1e3 * per_token,
            "tokens_per_s": 1.0 / per_token if per_token > 0 else None,
            "state_mib": state_bytes(captured.get("state")) / 2**20, "peak_gib": peak}


def plot(results: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == name and "ms_per_token" in r]
        ax_time.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=name)
        ax_mem.plot([r["context"] for r in rows], [r["peak_gib"] if r["peak_gib"] is not None else r["state_mib"] / 1024
                                                   for r in rows], marker="o", label=name)
    for ax, label in ((ax_time, "ms per generated token"), (ax_mem, "peak memory while decoding (GiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"decoding at batch 1, bf16 autocast, {device_name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--contexts", default=None, help=f"comma-separated context lengths (default {CONTEXTS})")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens decoded per measurement (default 128)")
    parser.add_argument("--quick", action="store_true", help=f"contexts {QUICK_CONTEXTS}, 32 new tokens")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides for both models")
    parser.add_argument("--json", default="bench_generate.json", help="results file")
    parser.add_argument("--plot", default="bench_generate.png", help="plot file (empty: none)")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    contexts = ([int(c) for c in args.contexts.split(",")] if args.contexts
                else QUICK_CONTEXTS if args.quick else CONTEXTS)
    new_tokens = args.new_tokens or (32 if args.quick else 128)
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    results = []
    print(f"{'model':<18} {'context':>8} {'ms/token':>9} {'tokens/s':>9} {'prefill s':>9} {'state MiB':>10} {'peak GiB':>9}")
    for name in names:
        model, cfg = build(name, args.override, max(contexts) + new_tokens, device)
        for context in contexts:
            try:
                row = {"model": name, **measure(model, cfg.model.vocab_size, context, new_tokens, device)}
            except torch.OutOfMemoryError:
                row = {"model": name, "context": context, "error": "out of memory"}
                torch.cuda.empty_cache()
            results.append(row)
            if "error" in row:
                print(f"{name:<18} {context:>8} out of memory", flush=True)
                continue
            peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
            print(f"{name:<18} {context:>8} {row['ms_per_token']:>9.2f} {row['tokens_per_s']:>9.1f} "
                  f"{row['prefill_s']:>9.2f} {row['state_mib']:>10.2f} {peak:>9}", flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    meta = {"device": device_name, "torch": torch.__version__, "new_tokens": new_tokens,
            "date": time.strftime("%Y-%m-%d"), "overrides": args.override}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.json}")
    if args.plot:
        plot(results, Path(args.plot), device_name)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
