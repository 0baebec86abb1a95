"""``xlstm-train eval CHECKPOINT ...`` and ``xlstm-train generate CHECKPOINT ...``.

Both load the checkpoint with ``load_for_inference`` (any architecture, any parallel layout, the
run's own tokenizer). Bad input -- a missing or foreign checkpoint, an unknown task, a tokenizer that
cannot be found, a prompt longer than a Llama's context -- is a ConfigError/DataError: one line on
stderr and exit code 2, before any model work. Weights whose logits are NaN or infinite (a diverged
run) stop ``generate`` with one message and exit 2; ``eval`` reports the scores they give (nan or
inf) with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

from xlstm_train.config import ConfigError

# ----------------------------------------------------------------------------------------------
# eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (runs/<name>/step-NNNNNNN)")
    p.add_argument("--data", nargs="+", default=[], metavar="PATH",
                   help="prepared dataset directories or raw .txt/.jsonl/.jsonl.zst files (or folders of them): "
                        "loss, perplexity and bits per byte over whole documents")
    p.add_argument("--max-documents", type=int, default=None, metavar="N", help="the first N documents of each --data")
    p.add_argument("--window", type=int, default=None, metavar="N",
                   help="tokens per forward pass over a long document (default: the run's data.seq_len)")
    p.add_argument("--stride", type=int, default=None, metavar="N",
                   help="Llama: tokens a sliding window advances (default: half a window)")
    p.add_argument("--tasks", default=None, metavar="NAME,...",
                   help="lm-evaluation-harness tasks, e.g. lambada_openai,hellaswag,piqa,arc_easy,arc_challenge,winogrande")
    p.add_argument("--tasks-path", default=None, metavar="DIR", help="a folder of extra harness task YAMLs")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K")
    p.add_argument("--limit", type=float, default=None, metavar="N", help="harness examples per task (debugging)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="sequences per forward pass (harness, synthetic)")
    p.add_argument("--num-samples", type=int, default=1024, metavar="N", help="synthetic tasks: validation samples scored")
    p.add_argument("--lengths", default=None, metavar="MIN:MAX",
                   help="synthetic tasks: question lengths to evaluate at (default: the run's val_min_len:val_max_len)")
    p.add_argument("--kv-pairs", default=None, metavar="N,...", help="MQAR: numbers of key-value pairs to evaluate at")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="the tokenizer, when the run's cannot be found")
    p.add_argument("--output", default=None, metavar="FILE", help="also write the results as JSON here")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"{flag} {text!r}: expected positive integers separated by commas")
    return values


def _check_eval_args(args: argparse.Namespace) -> None:
    for flag, value, lowest in (("--max-documents", args.max_documents, 1), ("--window", args.window, 1),
                                ("--stride", args.stride, 1), ("--batch-size", args.batch_size, 1),
                                ("--num-samples", args.num_samples, 1), ("--num-fewshot", args.num_fewshot, 0)):
        if value is not None and value < lowest:
            raise ConfigError(f"{flag} {value}: expected an integer >= {lowest}")
    for path in args.data:
        if not Path(path).exists():
            raise ConfigError(f"--data {path}: no such file or directory")


def _parse_lengths(text: str | None) -> tuple[int | None, int | None]:
    if text is None:
        return None, None
    try:
        low, high = (int(v) for v in text.split(":"))
    except ValueError:
        raise ConfigError(f"--lengths {text!r}: expected MIN:MAX, e.g. 40:256") from None
    if not 1 <= low <= high:
        raise ConfigError(f"--lengths {text!r}: expected 1 <= MIN <= MAX")
    return low, high


@contextlib.contextmanager
def _score_warnings_as_lines():
    """Warnings about non-finite scores as one ``warning: ...`` line each on stderr (other warnings
    as Python shows them)."""
    from xlstm_train.eval.perplexity import NonFiniteScoreWarning

    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        python_show = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, NonFiniteScoreWarning):
                print(f"warning: {message}", file=sys.stderr, flush=True)
            else:
                python_show(message, category, filename, lineno, file, line)

        warnings.simplefilter("default", NonFiniteScoreWarning)
        warnings.showwarning = show
        yield


def run_eval(args: argparse.Namespace) -> int:
    with _score_warnings_as_lines():
        return _run_eval(args)


def _run_eval(args: argparse.Namespace) -> int:
    from xlstm_train.eval.loading import load_for_inference
    from xlstm_train.train.checkpoint import read_checkpoint_config

    _check_eval_args(args)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
    kv_pairs = _int_list(args.kv_pairs, "--kv-pairs")
    low, high = _parse_lengths(args.lengths)
    cfg = read_checkpoint_config(args.checkpoint)
    synthetic = cfg.data.source == "synthetic"
    if synthetic and (args.data or tasks):
        raise ConfigError(f"checkpoint '{args.checkpoint}' was trained on the synthetic task '{cfg.data.task}', "
                          "which has no text: --data and --tasks do not apply (it is scored on its task)")
    if not synthetic and not (args.data or tasks):
        raise ConfigError("nothing to evaluate: pass --data PATH and/or --tasks NAME,...")
    if not synthetic and (kv_pairs or args.lengths):
        raise ConfigError("--kv-pairs and --lengths apply to checkpoints of synthetic tasks only")
    task_manager = None
    if tasks:  # lm_eval is imported only when tasks are asked for; names are checked before any model work
        from xlstm_train.eval.harness import check_task_names, make_task_manager, run_harness_tasks

        task_manager = make_task_manager(args.tasks_path)
        check_task_names(task_manager, tasks)
    loaded = load_for_inference(args.checkpoint, device=args.device, tokenizer=args.tokenizer)

    results: dict = {"checkpoint": str(args.checkpoint), "arch": cfg.model.arch, "device": str(loaded.device)}
    if synthetic:
        from xlstm_train.eval.synthetic import evaluate_synthetic, with_task_options

        data_cfg = with_task_options(cfg.data, val_min_len=low, val_max_len=high)
        results["synthetic"] = evaluate_synthetic(
            loaded.model, data_cfg, num_samples=args.num_samples, batch_size=args.batch_size,
            max_len=loaded.max_len, autocast=loaded.autocast, kv_pairs=kv_pairs,
        )
    if args.data:
        from xlstm_train.eval.perplexity import evaluate_documents, read_documents

        results["data"] = {}
        for path in args.data:
            documents = read_documents(path, loaded.tokenizer, args.max_documents)
            results["data"][path] = evaluate_documents(
                loaded, documents, window=args.window, stride=args.stride, label=f"eval {path}",
            )
    if tasks:
        results["tasks"] = run_harness_tasks(
            loaded, tasks, task_manager=task_manager, num_fewshot=args.num_fewshot,
            limit=int(args.limit) if args.limit and args.limit >= 1 else args.limit, batch_size=args.batch_size,
        )
    if args.output:
        out = Path(args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, out)
    print(json.dumps(results, indent=2) if args.json else format_results(results))
    return 0


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.4f}"
    return str(value)


def format_results(results: dict) -> str:
    """One table per kind of result."""
    lines = [f"{results['checkpoint']} ({results['arch']}, {results['device']})"]
    if "data" in results:
        lines.append(f"{'data':<40} {'loss':>8} {'ppl':>10} {'bits/byte':>10} {'tokens':>12} {'docs':>7}")
        for path, m in results["data"].items():
            lines.append(f"{path:<40} {_fmt(m['loss']):>8} {_fmt(m['perplexity']):>10} {_fmt(m['bits_per_byte']):>10} "
                         f"{_fmt(m['tokens']):>12} {_fmt(m['documents']):>7}")
    if "tasks" in results:
        lines.append(f"{'task':<32} {'metric':<24} {'value':>10}")
        for task, metrics in results["tasks"].items():
            for name, value in metrics.items():
                lines.append(f"{task:<32} {name:<24} {_fmt(value):>10}")
    if "synthetic" in results:
        lines.append(f"{'task':<28} {'lengths':>9} {'accuracy':>9} {'scaled':>8} {'sequence':>9} {'answers':>8}")
        for name, m in results["synthetic"].items():
            lines.append(f"{name:<28} {m['min_len']:>4}-{m['max_len']:<4} {_fmt(m['accuracy']):>9} "
                         f"{_fmt(m['scaled_accuracy']):>8} {_fmt(m['sequence_accuracy']):>9} {_fmt(m['answers']):>8}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# generate


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint directory (runs/<name>/step-NNNNNNN)")
    p.add_argument("--prompt", action="append", default=[], metavar="TEXT", help="a prompt (repeat for several)")
    p.add_argument("--prompt-file", default=None, metavar="FILE", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N")
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy decoding")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling: the most likely tokens up to P")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--tokenizer", default=None, metavar="PATH", help="the tokenizer, when the run's cannot be found")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise ConfigError(f"--prompt-file {path}: no such file")
        try:
            prompts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except UnicodeDecodeError as e:
            raise ConfigError(f"--prompt-file {path}: not UTF-8 text ({e})") from None
    if not prompts:
        raise ConfigError("no prompt: pass --prompt TEXT (repeatable) or --prompt-file FILE")
    return prompts


def _check_generate_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
    if args.temperature < 0:
        raise ConfigError(f"--temperature {args.temperature}: expected a number >= 0 (0: greedy)")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: expected an integer >= 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p}: expected a number in (0, 1]")


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from xlstm_train.eval.loading import load_for_inference
    from xlstm_train.train.checkpoint import read_checkpoint_config
    from xlstm_train.models.generate import NonFiniteLogitsError, generate_stream

    _check_generate_args(args)
    prompts = _read_prompts(args)
    cfg = read_checkpoint_config(args.checkpoint)
    if cfg.data.source == "synthetic" and args.tokenizer is None:
        raise ConfigError(f"checkpoint '{args.checkpoint}' was trained on the synthetic task '{cfg.data.task}': "
                          "it has no tokenizer to read a text prompt (pass --tokenizer PATH to force one)")
    loaded = load_for_inference(args.checkpoint, device=args.device, tokenizer=args.tokenizer)
    tokenizer = loaded.tokenizer
    ids = [tokenizer.encode(p) or [tokenizer.eos_id] for p in prompts]
    if loaded.max_len is not None:
        for n, prompt_ids in enumerate(ids):
            if len(prompt_ids) > loaded.max_len:
                raise ConfigError(f"prompt {n + 1} has {len(prompt_ids)} tokens, more than the model's context "
                                  f"(model.max_seq_len = {loaded.max_len})")
        for n, prompt_ids in enumerate(ids):
            if len(prompt_ids) + args.max_new_tokens > loaded.max_len:
                raise ConfigError(f"--max-new-tokens {args.max_new_tokens}: prompt {n + 1} ({len(prompt_ids)} tokens) "
                                  f"plus the new tokens exceed the model's context (model.max_seq_len = "
                                  f"{loaded.max_len}); at most {loaded.max_len - len(prompt_ids)} fit")
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    tensors = [torch.tensor(p, device=loaded.device) for p in ids]
    generated: list[list[int]] = [[] for _ in prompts]
    stream = len(prompts) == 1
    shown = ""
    if stream:  # the prompt and its continuation are decoded together, so spacing comes out right
        shown = tokenizer.decode(ids[0])
        print(shown, end="", flush=True)
    start = time.perf_counter()
    first_token_s = None
    try:
        with loaded.autocast():
            for step, tokens in enumerate(generate_stream(
                loaded.model, tensors, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, generator=generator, stop_ids=[tokenizer.eos_id],
            )):
                if first_token_s is None:
                    first_token_s = time.perf_counter() - start
                for row, token in enumerate(tokens.tolist()):
                    if not generated[row] or generated[row][-1] != tokenizer.eos_id:
                        generated[row].append(token)
                if stream:
                    text = tokenizer.decode(ids[0] + [t for t in generated[0] if t != tokenizer.eos_id])
                    print(text[len(shown):], end="", flush=True)
                    shown = text
                else:
                    print(f"\rgenerating: {step + 1}/{args.max_new_tokens} steps", end="", file=sys.stderr, flush=True)
    except NonFiniteLogitsError as e:  # broken weights are bad input too: one message, exit 2
        if stream:
            print(flush=True)  # end the streamed prompt's line
        elif first_token_s is not None:
            print(file=sys.stderr)  # end the progress line
        print(f"error: checkpoint '{args.checkpoint}': {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    if stream:
        print()
    else:
        print(file=sys.stderr)
        for n, (prompt, row) in enumerate(zip(prompts, generated)):
            print(f"--- {n + 1} ---")
            print(tokenizer.decode(ids[n] + [t for t in row if t != tokenizer.eos_id]))
    total = sum(len(row) for row in generated)
    decode_s = elapsed - (first_token_s or 0.0)
    rate = (total - len(prompts)) / decode_s if decode_s > 0 and total > len(prompts) else float("nan")
    print(f"{total} tokens for {len(prompts)} prompt(s) in {elapsed:.2f}s: first tokens after {first_token_s or 0:.2f}s "
          f"(prefill of {sum(map(len, ids))} prompt tokens), then {rate:,.1f} tokens/s", file=sys.stderr)
    return 0
