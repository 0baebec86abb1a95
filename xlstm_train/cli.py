"""The ``xlstm-train`` command.

    xlstm-train train [--recipe PATH] [key.sub=value ...]
    xlstm-train info [--recipe PATH] [--json] [key.sub=value ...]
    xlstm-train prepare-data ...
    xlstm-train export-hf CHECKPOINT OUT_DIR
    xlstm-train eval CHECKPOINT [--data PATH ...] [--tasks NAME,...]
    xlstm-train generate CHECKPOINT --prompt TEXT|--prompt-file FILE
    xlstm-train sweep RECIPE [--dry-run] [--launcher local|slurm|sbatch] [key.sub=value ...]
    xlstm-train fit RESULTS.csv --out DIR [--predict-flops C ...]

Bad input (an unknown key, a wrong type, a missing file, a tokenizer or sequence length the model
cannot take, an occupied run directory) ends with one line ``error: ...`` on stderr and exit code 2,
before anything is written. A run stopped by a non-finite loss exits with code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

RECIPE_HELP = "YAML recipe (default: recipes/tiny.yaml, the tiny first run)"
OVERRIDES_HELP = "overrides of recipe values, e.g. model.num_blocks=4 train.steps=50"


def cmd_train(args: argparse.Namespace) -> int:
    from xlstm_train.config import ConfigError
    from xlstm_train.data import DataError
    from xlstm_train.parallel import run_on_every_rank
    from xlstm_train.parallel.distributed import exit_without_teardown
    from xlstm_train.train.config import load_config
    from xlstm_train.train.trainer import NonFiniteError, train

    cfg = load_config(args.recipe, args.overrides)
    # an unexpected error on any rank is printed with the rank and ends the job (see launch/)
    run_on_every_rank(lambda: train(cfg), expected=(ConfigError, DataError, NonFiniteError))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        exit_without_teardown(0)
    return 0


def model_summary(cfg) -> dict:
    """Parameter count and FLOPs per token, from a model built on the meta device (no memory)."""
    import torch

    from xlstm_train.config import to_dict
    from xlstm_train.models import build_model, count_params
    from xlstm_train.train.flops import flops_per_token

    with torch.device("meta"):
        model = build_model(cfg.model)
    return {
        "name": cfg.name,
        "arch": cfg.model.arch,
        "params": int(count_params(model)),
        "params_by_module": {name: int(count_params(child)) for name, child in model.named_children()},
        "seq_len": cfg.data.seq_len,
        "flops_per_token": float(flops_per_token(cfg.model, cfg.data.seq_len)),
        "config": to_dict(cfg),
    }


def cmd_info(args: argparse.Namespace) -> int:
    import yaml

    from xlstm_train.train.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    summary = model_summary(cfg)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['name']}: {summary['arch']}, {summary['params']:,} parameters "
          f"({summary['params'] / 1e6:.2f}M)")
    for name, count in summary["params_by_module"].items():
        print(f"  {name:<24} {count:>15,}")
    print(f"training FLOPs per token at seq_len {summary['seq_len']}: {summary['flops_per_token']:.4g}")
    print("resolved config:")
    print(yaml.safe_dump(summary["config"], sort_keys=False).rstrip())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from xlstm_train.data import prepare
    from xlstm_train.eval import commands as eval_commands
    from xlstm_train.export import hf as export_hf

    parser = argparse.ArgumentParser(prog="xlstm-train", description="Train xLSTM language models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model (default: the tiny first run on CPU)")
    p.add_argument("--recipe", default=None, help=RECIPE_HELP)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("info", help="model summary, parameter count, FLOPs per token, resolved config")
    p.add_argument("--recipe", default=None, help=RECIPE_HELP)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_info)

    p = commands.add_parser("prepare-data", help="tokenize text into training shards")
    prepare.add_arguments(p)
    p.set_defaults(func=prepare.run)

    p = commands.add_parser("export-hf", help="a checkpoint as a Hugging Face / official xlstm model directory")
    export_hf.add_arguments(p)
    p.set_defaults(func=export_hf.run)

    p = commands.add_parser("eval", help="loss/perplexity/bits per byte, harness tasks, synthetic-task accuracy")
    eval_commands.add_eval_arguments(p)
    p.set_defaults(func=eval_commands.run_eval)

    p = commands.add_parser("generate", help="sample text from a checkpoint (streamed, several prompts batched)")
    eval_commands.add_generate_arguments(p)
    p.set_defaults(func=eval_commands.run_generate)

    p = commands.add_parser("sweep", help="run a scaling sweep (a recipe with a sweep: block), then fit it")
    p.add_argument("recipe", help="sweep recipe, e.g. recipes/sweeps/tiny.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the table of points and run nothing")
    p.add_argument("--sweep-dir", default=None, help="where the runs go (default: the recipe's sweep_dir)")
    p.add_argument("--launcher", choices=["local", "slurm", "sbatch"], default="local",
                   help="local: one point after another here (also under torchrun/deepspeed); slurm: a "
                        "submitit array job; sbatch: write SWEEP_DIR/sweep.sbatch")
    p.add_argument("--point", action="append", default=None, metavar="NAME", help="run only this point")
    p.add_argument("--collect", action="store_true", help="only write results.csv (and fit) from the runs")
    p.add_argument("--retry-failed", action="store_true", help="run points stopped by a non-finite loss again")
    p.add_argument("--no-fit", action="store_true", help="do not fit and plot once every point is done")
    p.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples of the fit (default: "
                   "the recipe's fit.bootstrap, else 1000)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides applied to every point")
    p.set_defaults(func=cmd_sweep)

    p = commands.add_parser("fit", help="fit scaling laws to a results CSV (arch,params,tokens,flops,loss)")
    p.add_argument("results", help="results CSV, e.g. SWEEP_DIR/results.csv")
    p.add_argument("--out", required=True, help="directory for fit.json, isoflop.json and the plots")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    p.add_argument("--huber-delta", type=float, default=1e-3)
    p.add_argument("--params-column", default="params", help="params or non_embedding_params")
    p.add_argument("--predict-flops", type=float, action="append", default=[], metavar="C",
                   help="compute-optimal N, D and loss per arch at this budget")
    p.add_argument("--no-plots", action="store_true")
    p.set_defaults(func=cmd_fit)
    return parser


def cmd_sweep(args: argparse.Namespace) -> int:
    from xlstm_train.sweep.plan import format_table, load_sweep
    from xlstm_train.sweep.run import collect_results, fit_finished_sweep, point_status, read_failed, run_sweep, \
        submit_slurm, write_results, write_sbatch

    for_slurm = args.launcher != "local"
    sweep = load_sweep(args.recipe, args.overrides, sweep_dir=args.sweep_dir, for_slurm=for_slurm)
    if args.dry_run:
        failed = read_failed(sweep)
        print(format_table(sweep, {p.name: point_status(p, failed) for p in sweep.points}))
        return 0
    if args.launcher == "slurm":
        submit_slurm(sweep, args.recipe, args.overrides)
        return 0
    if args.launcher == "sbatch":
        write_sbatch(sweep, args.recipe, args.overrides)
        return 0
    if args.collect:
        rows = collect_results(sweep)
        print(f"wrote {write_results(sweep, rows)}")
    else:
        from xlstm_train.config import ConfigError
        from xlstm_train.data import DataError
        from xlstm_train.parallel import run_on_every_rank

        # as in cmd_train: an unexpected error on any rank is printed with the rank and ends the job
        rows = run_on_every_rank(lambda: run_sweep(sweep, only=args.point, retry_failed=args.retry_failed),
                                 expected=(ConfigError, DataError))
    if int(os.environ.get("RANK", "0")) == 0 and not (args.no_fit or args.point):
        fit_finished_sweep(sweep, rows, bootstrap=args.bootstrap)
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from xlstm_train.sweep.fit import run_fit

    run_fit(args.results, args.out, bootstrap=args.bootstrap, delta=args.huber_delta,
            params_column=args.params_column, predict_flops=args.predict_flops, plots=not args.no_plots)
    print(f"fit written to {args.out}/fit.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    from xlstm_train.config import ConfigError
    from xlstm_train.data import DataError
    from xlstm_train.parallel.distributed import rank_prefix
    from xlstm_train.train.trainer import NonFiniteError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"{rank_prefix()}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # a second Ctrl-C (the first asks for a checkpoint and a clean stop): stop now, quietly
        print(f"{rank_prefix()}interrupted: stopped without a checkpoint; rerun the command to resume "
              "from the last one", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
