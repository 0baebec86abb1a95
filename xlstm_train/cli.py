"""The ``xlstm-train`` command.

    xlstm-train train [--recipe PATH] [key.sub=value ...]
    xlstm-train info [--recipe PATH] [--json] [key.sub=value ...]
    xlstm-train prepare-data ...
    xlstm-train export-hf CHECKPOINT OUT_DIR
    xlstm-train eval CHECKPOINT [--data PATH ...] [--tasks NAME,...]
    xlstm-train generate CHECKPOINT --prompt TEXT|--prompt-file FILE

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
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
