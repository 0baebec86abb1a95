"""An architecture that only this file knows: registered here, it trains through ``train()`` in one
process and with TP = 2 on gloo, saves, resumes and exports, with no other file naming it.

It is a renamed two-block Llama whose spec reuses the Llama plan, FLOP formula and export adapter,
and adds rules of its own: its attention output projections are never weight-decayed, and its
document masking may change when a run resumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
import yaml

from tests.parallel.harness import assert_close, run_distributed
from xlstm_train.archs import ArchSpec, arch_names, get_spec, register_spec
from xlstm_train.archs import llama as llama_spec
from xlstm_train.config import ConfigError
from xlstm_train.models.llama import Llama, LlamaConfig

ARCH = "toy_llama"


@dataclass
class ToyLlamaConfig(LlamaConfig):
    arch: Literal["toy_llama"] = "toy_llama"
    num_blocks: int = 2


class ToyLlama(Llama):
    pass


def _attention_outputs(model: ToyLlama):
    return [layer.attention.wo.weight for layer in model.layers]


SPEC = register_spec(ArchSpec(
    name=ARCH,
    config_class=ToyLlamaConfig,
    model_class=ToyLlama,
    block_list="layers",
    embedding_param="tok_embeddings.weight",
    sequence_mixing_flops=llama_spec.sequence_mixing_flops,
    tp_plan=llama_spec.tp_plan,
    tp_head_counts=llama_spec.tp_head_counts,
    no_weight_decay=_attention_outputs,
    resumable_model_keys=frozenset({"reset_at_document_boundaries"}),
    export=llama_spec.SPEC.export,
))  # fmt: skip

RECIPE = {
    "name": "toy",
    "model": {"arch": ARCH, "embedding_dim": 32, "num_heads": 4, "num_kv_heads": 2, "ffn_hidden_dim": 64,
              "max_seq_len": 32},
    "data": {"source": "synthetic", "task": "parity", "task_options": {"max_len": 24}, "seq_len": 32},
    "optim": {"lr": 3e-3, "warmup_steps": 2, "schedule": "constant"},
    "train": {"steps": 4, "micro_batch_size": 4, "dtype": "fp32", "eval_interval": 2, "eval_batches": 1,
              "sample_tokens": 0},
    "logging": {"interval": 1, "wandb": "disabled"},
    "checkpoint": {"interval": 2, "keep": 2},
    "eval": {"synthetic_samples": 0},  # the task's accuracy is not what this test is about
}  # fmt: skip


def _config(root: str, run: str, *overrides: str):
    from xlstm_train.train.config import load_config

    return load_config(os.path.join(root, "recipe.yaml"), [f"run_dir={os.path.join(root, run)}", *overrides])


def _train(root: str, run: str, overrides: tuple[str, ...]) -> None:
    from xlstm_train.train.trainer import train

    train(_config(root, run, *overrides))


def _losses(run_dir: Path) -> dict[int, float]:
    """The last train loss of each step (a resumed run appends)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_registered_spec_is_what_the_framework_uses():
    from xlstm_train.models import build_model, count_params
    from xlstm_train.train.config import OptimConfig
    from xlstm_train.train.optim import param_groups

    assert ARCH in arch_names() and get_spec(ARCH) is SPEC
    cfg = ToyLlamaConfig(vocab_size=64, embedding_dim=32, num_heads=4, max_seq_len=32)
    model = build_model(cfg)
    assert type(model) is ToyLlama
    assert count_params(model) - count_params(model, non_embedding=True) == 64 * 32
    decayed, undecayed = param_groups(model, OptimConfig(weight_decay=0.1))
    assert all(any(p is q for q in undecayed["params"]) for p in _attention_outputs(model))
    assert any(p is model.layers[0].attention.wq.weight for p in decayed["params"])


def test_custom_architecture_trains_with_tensor_parallelism_resumes_and_exports(tmp_path):
    from transformers import AutoModelForCausalLM

    from xlstm_train.export.hf import export_hf
    from xlstm_train.models import build_model
    from xlstm_train.train import checkpoint as ckpt
    from xlstm_train.train.trainer import check_checkpoint_matches, train

    root = str(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    single = train(_config(root, "single"))  # one process, uninterrupted
    assert single["step"] == 4
    # TP = 2: two steps, then the same run directory resumed from its step-2 checkpoint to step 4
    run_distributed(_train, 2, root, "tp2", ("parallel.tp=2", "train.steps=2"))
    run_distributed(_train, 2, root, "tp2", ("parallel.tp=2",))
    expected, got = _losses(tmp_path / "single"), _losses(tmp_path / "tp2")
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:
        assert_close(torch.tensor(got[step]), torch.tensor(expected[step]), what=f"TP=2 loss at step {step}")
    events = [json.loads(line) for line in (tmp_path / "tp2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in events if r["kind"] == "event" and r["event"] == "resume"] == [2]
    # what may differ on resume is the spec's to say
    final = ckpt.latest_checkpoint(tmp_path / "tp2")
    check_checkpoint_matches(final, _config(root, "tp2", "model.reset_at_document_boundaries=true"))
    with pytest.raises(ConfigError, match=r"model.rope_theta = 500.0 \(checkpoint: 10000.0\)"):
        check_checkpoint_matches(final, _config(root, "tp2", "model.rope_theta=500"))

    # the TP checkpoint (heads sharded over two ranks) exports as a transformers Llama with the
    # single-process run's weights
    out = export_hf(final, tmp_path / "hf")
    cfg = ckpt.read_checkpoint_config(final)
    assert cfg.model.arch == ARCH
    ours = build_model(cfg.model)
    ours.load_state_dict(ckpt.load_model_state(Path(single["checkpoint"]), cfg.model))
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, cfg.model.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(theirs(ids, use_cache=False).logits, ours.eval()(ids), rtol=1e-4, what="exported logits")
    assert f"architecture `{ARCH}`" in (out / "README.md").read_text()


def test_no_other_file_knows_the_architecture():
    package = Path(__file__).resolve().parents[1] / "xlstm_train"
    assert not [p for p in package.rglob("*.py") if ARCH in p.read_text()]
