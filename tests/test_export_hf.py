"""``export-hf`` end to end: train a few steps, export the checkpoint, load it with transformers or the
official ``xlstm`` package and compare logits with ours (fp32, CPU) on fresh random tokens."""

import argparse
import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch.distributed.checkpoint import FileSystemReader

from xlstm_train.config import ConfigError
from xlstm_train.data.tokenizer import open_tokenizer, train_byte_level_bpe
from xlstm_train.archs.llama import llama_qk_to_rotate_half
from xlstm_train.eval.loading import load_for_inference
from xlstm_train.export import adapter, hf
from xlstm_train.export.hf import export_hf
from xlstm_train.train.checkpoint import load_model_state, read_checkpoint_config
from xlstm_train.models import build_model
from xlstm_train.train.config import load_config
from xlstm_train.train.trainer import train

REPO = Path(__file__).resolve().parents[1]
SAMPLE_TOKENIZER = REPO / "data" / "tokenizer" / "austen_sp4096.model"

COMMON = {
    "optim": {"lr": 1e-2, "warmup_steps": 1},
    "train": {"steps": 2, "micro_batch_size": 2, "eval_interval": 0, "eval_batches": 1, "sample_tokens": 0},
    "logging": {"interval": 1, "wandb": "disabled"},
    "checkpoint": {"interval": 0},
    "eval": {"synthetic_samples": 0},  # these runs only make checkpoints to export
}
SYNTHETIC = {"source": "synthetic", "task": "parity", "task_options": {"max_len": 12}, "seq_len": 16}
RUNS = {
    # xLSTM Large on the bundled text sample with its SentencePiece tokenizer
    "xlstm_large": {
        "model": {"arch": "xlstm_large", "vocab_size": 4096, "embedding_dim": 128, "num_blocks": 2, "num_heads": 2,
                  "chunk_size": 16},
        "data": {"source": "shards", "datasets": [{"path": str(REPO / "data" / "sample")}],
                 "tokenizer": str(SAMPLE_TOKENIZER), "seq_len": 16},
    },
    # Llama with grouped-query attention and a tied head
    "llama": {
        "model": {"arch": "llama", "embedding_dim": 64, "num_blocks": 2, "num_heads": 4, "num_kv_heads": 2,
                  "max_seq_len": 64, "tie_embeddings": True, "rope_theta": 500.0},
        "data": SYNTHETIC,
    },
    # xLSTM[1:1]: an mLSTM and an sLSTM block
    "xlstm_blocks": {
        "model": {"arch": "xlstm_blocks", "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1], "mlstm_num_heads": 2,
                  "slstm_num_heads": 2, "chunk_size": 8},
        "data": SYNTHETIC,
    },
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> the final checkpoint of a few training steps (made on first use)."""
    root = tmp_path_factory.mktemp("runs")
    made = {}

    def get(arch: str) -> Path:
        if arch not in made:
            recipe = root / f"{arch}.yaml"
            recipe.write_text(yaml.safe_dump({"name": arch, **COMMON, **RUNS[arch]}))
            made[arch] = Path(train(load_config(recipe, [f"run_dir={root / arch}"]))["checkpoint"])
        return made[arch]

    return get


def our_model(checkpoint: Path):
    cfg = read_checkpoint_config(checkpoint)
    model = build_model(cfg.model)
    model.load_state_dict(load_model_state(checkpoint, cfg.model))
    return model.eval(), cfg


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


def assert_same_greedy_continuation(hf_model, ours, prompt: torch.Tensor, new_tokens: int = 12) -> None:
    """transformers' generate (with its cache: step kernels for xLSTM, a KV cache for Llama) continues
    ``prompt`` greedily as our generate does (it may stop early at the EOS token)."""
    from xlstm_train.models.generate import generate

    expected = generate(ours, prompt, new_tokens, temperature=0)
    got = hf_model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert got.shape[1] > prompt.shape[1]
    assert torch.equal(got, expected[:, : got.shape[1]])


def assert_no_leftovers(out: Path) -> None:
    assert not out.with_name(out.name + ".tmp").exists()
    assert not out.with_name(out.name + ".old").exists()


# ----------------------------------------------------------------------------------------------
# Each architecture loads in its target library and computes our logits


def test_xlstm_large_loads_in_transformers_with_its_tokenizer(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = checkpoints("xlstm_large")
    out = export_hf(checkpoint, tmp_path / "large")
    assert_no_leftovers(out)
    expected_files = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                      "tokenizer_config.json", "README.md", "training_config.yaml"}  # fmt: skip
    assert expected_files <= {p.name for p in out.iterdir()}
    ours, cfg = our_model(checkpoint)
    out_norm = ours.backbone.out_norm.weight
    assert not torch.equal(out_norm, torch.ones_like(out_norm))  # trained, not at init

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "xLSTMForCausalLM"
    ids = torch.randint(0, cfg.model.vocab_size, (2, 77))  # more than one 64-token chunk, not a multiple
    with torch.no_grad():
        assert rel_error(model(ids, use_cache=False).logits, ours(ids)) <= 1e-4
    assert_same_greedy_continuation(model, ours, ids[:1, :9])

    # the tokenizer is the training one: same ids on text it has not seen, same special tokens
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours_tok = open_tokenizer(SAMPLE_TOKENIZER)
    text = "Mr. Darcy's  letter,\nwritten at eight o'clock -- 1811 -- reached Elizabeth   ünïcödé 😀\n\n"
    assert tokenizer(text, add_special_tokens=False).input_ids == ours_tok.encode(text)
    assert tokenizer.eos_token_id == ours_tok.eos_id == model.generation_config.eos_token_id

    # the README's example loads both and samples text
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(snippet.replace('"large"', repr(str(out))), namespace)
    assert namespace["tokenizer"].eos_token_id == ours_tok.eos_id and "model" in namespace


def test_llama_loads_in_transformers(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoints("llama")
    out = export_hf(checkpoint, tmp_path / "llama")
    ours, cfg = our_model(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == 2 and model.config.tie_word_embeddings
    with safe_open(out / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # the tied head is stored once
    ids = torch.randint(0, cfg.model.vocab_size, (3, 64))
    with torch.no_grad():
        assert rel_error(model(ids, use_cache=False).logits, ours(ids)) <= 1e-4
    assert_same_greedy_continuation(model, ours, ids[:1, :5])
    assert "no text tokenizer" in (out / "README.md").read_text()


def test_llama_rope_permutation_matches_rotate_half():
    """Our adjacent-pair RoPE of x equals transformers' rotate_half RoPE of the permuted x (ours
    rotates in fp32, transformers here in fp64)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from xlstm_train.models.llama import apply_rope, rope_tables

    torch.manual_seed(0)
    heads, head_dim, seq, dim = 3, 8, 11, 5
    weight = torch.randn(heads * head_dim, dim, dtype=torch.float64)
    x = torch.randn(2, seq, dim, dtype=torch.float64)
    cos, sin = rope_tables(head_dim, seq, 10000.0)
    ours = apply_rope((x @ weight.T).view(2, seq, heads, head_dim), cos.double(), sin.double())
    permuted = llama_qk_to_rotate_half(weight, heads)
    theirs_in = (x @ permuted.T).view(2, seq, heads, head_dim).transpose(1, 2)  # (B, H, S, D)
    cos_full, sin_full = torch.cat([cos, cos], -1).double()[None], torch.cat([sin, sin], -1).double()[None]
    theirs, _ = apply_rotary_pos_emb(theirs_in, theirs_in, cos_full, sin_full)
    # the same permutation applied to our output gives theirs
    ours_permuted = ours.reshape(2, seq, heads, head_dim // 2, 2).transpose(-1, -2).reshape(2, seq, heads, head_dim)
    torch.testing.assert_close(theirs.transpose(1, 2), ours_permuted, rtol=1e-5, atol=1e-5)


def test_xlstm_blocks_load_in_the_official_package_as_the_readme_says(checkpoints, tmp_path):
    checkpoint = checkpoints("xlstm_blocks")
    out = export_hf(checkpoint, tmp_path / "blocks")
    assert {p.name for p in out.iterdir()} == {"config.yaml", "model.safetensors", "README.md", "training_config.yaml"}
    readme = (out / "README.md").read_text()
    snippet = readme.split("```python\n")[1].split("```")[0]
    assert 'directory = Path("blocks")' in snippet
    namespace = {}
    exec(snippet.replace('Path("blocks")', f"Path({str(out)!r})"), namespace)  # the README's own code
    official = namespace["model"]
    assert type(official).__name__ == "xLSTMLMModel"

    ours, cfg = our_model(checkpoint)
    ids = torch.randint(0, cfg.model.vocab_size, (2, cfg.data.seq_len))
    with torch.no_grad():
        assert rel_error(official(ids), ours(ids)) <= 1e-4

    # the cuda backend's layout is ours as is
    cuda = export_hf(checkpoint, tmp_path / "blocks_cuda", slstm_backend="cuda")
    assert yaml.safe_load((cuda / "config.yaml").read_text())["slstm_block"]["slstm"]["backend"] == "cuda"
    state = ours.state_dict()
    with safe_open(cuda / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(state)
        assert all(torch.equal(f.get_tensor(k), state[k]) for k in f.keys())


def test_bfloat16_sharded_export(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    checkpoint = checkpoints("xlstm_large")
    out = export_hf(checkpoint, tmp_path / "bf16", dtype="bfloat16", max_shard_size="400KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    with safe_open(out / shards[0], "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    ours, cfg = our_model(checkpoint)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the weights as exported
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (1, 40))
    with torch.no_grad():
        assert rel_error(model(ids, use_cache=False).logits, ours(ids)) <= 1e-4


SHARDED_MODEL = {"arch": "xlstm_large", "vocab_size": 96, "embedding_dim": 128, "num_blocks": 2, "num_heads": 2,
                 "chunk_size": 8, "kernel": "reference"}  # fmt: skip


def _perturbed_sharded_model():
    """The model of ``SHARDED_MODEL`` with its init plus noise (the same in every process)."""
    from xlstm_train.models.xlstm_large import xLSTMLargeConfig

    cfg = xLSTMLargeConfig(**SHARDED_MODEL)
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def _save_tensor_parallel_checkpoint(path: str) -> None:
    """On each of 2 ranks: shard the model's heads over TP = 2 and save its DCP state dict."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from xlstm_train.parallel import ParallelConfig, build_mesh, parallelize_model

    cfg, model = _perturbed_sharded_model()
    parallel = ParallelConfig(tp=2)
    parallelize_model(model, build_mesh(parallel, 2, "cpu", cfg), parallel, cfg)
    dcp.save({"model": get_model_state_dict(model)}, checkpoint_id=path)
    # Leave without interpreter teardown: after a parallelized model on gloo, a native thread
    # occasionally aborts the process during shutdown (SIGABRT, "terminate called without an active
    # exception"; about 1 run in 15 here, TP and FSDP alike), after all the work is done.
    torch.distributed.destroy_process_group()
    os._exit(0)


def test_checkpoint_of_a_tensor_parallel_run(tmp_path):
    """DCP reshards a TP-sharded checkpoint into the single-process export."""
    from transformers import AutoModelForCausalLM

    from tests.parallel.harness import run_distributed

    checkpoint = tmp_path / "run" / "step-0000001"
    run_distributed(_save_tensor_parallel_checkpoint, 2, str(checkpoint))
    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    q_weight = metadata["model.backbone.blocks.0.mlstm_layer.q.weight"]
    assert len(q_weight.chunks) == 2  # saved as two shards, one per rank
    recipe = {"name": "tp", "model": SHARDED_MODEL, "data": {"source": "synthetic", "task": "parity"}}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(recipe))
    out = export_hf(checkpoint, tmp_path / "out")

    cfg, ours = _perturbed_sharded_model()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert rel_error(model(ids, use_cache=False).logits, ours.eval()(ids)) <= 1e-4
        # xlstm-train eval and generate read the same sharded checkpoint
        assert torch.equal(load_for_inference(checkpoint, device="cpu").model(ids), ours(ids))
    assert "after" not in (out / "README.md").read_text().split("\n")[2]  # no train_state.pt: no step count


# ----------------------------------------------------------------------------------------------
# Tokenizers transformers can and cannot reproduce


def test_hugging_face_tokenizer_json_is_exported(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    texts = [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife.",
        "However little known the feelings or views of such a man may be.",
    ]
    path = train_byte_level_bpe(texts * 20, tmp_path / "bpe" / "tokenizer.json", vocab_size=300)
    out = export_hf(checkpoints("xlstm_large"), tmp_path / "out", tokenizer=path)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ours = open_tokenizer(path)
    text = "A wife, a fortune and  universal truths.\n"
    assert tokenizer(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == ours.eos_id
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == ours.eos_id


def test_sentencepiece_bpe_model_is_kept_with_instructions(checkpoints, tmp_path):
    """transformers' conversions do not reproduce a SentencePiece BPE model: no AutoTokenizer files,
    the model kept under a name AutoTokenizer ignores, and the README saying how to tokenize."""
    import sentencepiece as spm

    text = (REPO / "data" / "README.md").read_text()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split("\n\n")), model_prefix=str(tmp_path / "bpe"),
                                   vocab_size=200, model_type="bpe", minloglevel=2)  # fmt: skip
    out = export_hf(checkpoints("xlstm_large"), tmp_path / "out", tokenizer=tmp_path / "bpe.model")
    names = {p.name for p in out.iterdir()}
    assert "sentencepiece.model" in names and not names & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}
    readme = (out / "README.md").read_text()
    assert "only unigram ones are converted" in readme
    assert "SentencePieceProcessor(model_file='sentencepiece.model')" in readme


def test_sentencepiece_unigram_conversion_matches_on_the_corpus():
    """The converted sample tokenizer gives SentencePiece's ids on whole chapters of the corpus."""
    import zstandard

    converted, special = hf.sentencepiece_to_tokenizers(SAMPLE_TOKENIZER)
    assert special == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    ours = open_tokenizer(SAMPLE_TOKENIZER)
    raw = zstandard.ZstdDecompressor().decompress((REPO / "data/austen/austen.jsonl.zst").read_bytes())
    chapters = [json.loads(line)["text"] for line in raw.splitlines()[::40]]
    for text in chapters:
        assert converted.encode(text, add_special_tokens=False).ids == ours.encode(text)


# ----------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing (half-)written


def _copy_with_config(checkpoint: Path, tmp_path: Path, **model_changes) -> Path:
    """A copy of ``checkpoint`` whose saved config differs in ``model_changes`` (same weights)."""
    copy = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["model"].update(model_changes)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def test_not_a_checkpoint(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="no such directory"):
        export_hf(tmp_path / "missing", out)
    latest = re.escape(str(checkpoint))
    with pytest.raises(ConfigError, match=rf"has no \.metadata.* the latest checkpoint .* is '{latest}'"):
        export_hf(checkpoint.parent, out)  # the run directory, not a checkpoint in it
    unfinished = tmp_path / "step-0000009.tmp"
    shutil.copytree(checkpoint, unfinished)
    with pytest.raises(ConfigError, match="never completed"):
        export_hf(unfinished, out)
    assert not out.exists()
    assert_no_leftovers(out)


def test_occupied_output_needs_overwrite(checkpoints, tmp_path):
    checkpoint = checkpoints("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists and is not empty; pass --overwrite"):
        export_hf(checkpoint, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="contains or lies inside checkpoint"):
        export_hf(checkpoint, checkpoint.parent, overwrite=True)

    # the command line: --overwrite replaces the directory as a whole
    parser = argparse.ArgumentParser()
    hf.add_arguments(parser)
    assert hf.run(parser.parse_args([str(checkpoint), str(out), "--overwrite"])) == 0
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert_no_leftovers(out)


@pytest.mark.parametrize("arch, change, message", [
    ("xlstm_large", {"input_gate": "sigmoid"}, r"model.input_gate = 'sigmoid': transformers' xLSTM supports only"),
    ("xlstm_large", {"use_bias": True}, r"model.use_bias = True"),
    ("xlstm_blocks", {"input_gate": "sigmoid"}, r"model.input_gate = 'sigmoid': the official .* allowed: 'exp'"),
    ("xlstm_blocks", {"cell_eps": 1e-4}, r"model.cell_eps = 0.0001: .* allowed: 1e-06"),
])  # fmt: skip
def test_unsupported_settings_are_refused(checkpoints, tmp_path, arch, change, message):
    checkpoint = _copy_with_config(checkpoints(arch), tmp_path, **change)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message) as error:
        export_hf(checkpoint, out)
    assert str(checkpoint / "config.yaml") in str(error.value)
    assert not out.exists()
    assert_no_leftovers(out)


def test_weights_that_do_not_fit_the_saved_config(checkpoints, tmp_path):
    checkpoint = _copy_with_config(checkpoints("llama"), tmp_path, ffn_hidden_dim=99)
    with pytest.raises(ConfigError, match=r"do not fit .* Size mismatch .* model.layers.0.feed_forward.w1.weight"):
        export_hf(checkpoint, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tokenizer_and_bad_options(checkpoints, tmp_path):
    checkpoint = checkpoints("xlstm_large")
    copy = tmp_path / "run" / checkpoint.name
    shutil.copytree(checkpoint, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["data"]["tokenizer"] = str(tmp_path / "moved" / "austen_sp4096.model")
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=r"moved/austen_sp4096.model.*pass --tokenizer PATH"):
        export_hf(copy, out)
    with pytest.raises(ConfigError, match="has 4096 tokens, more than the model's model.vocab_size = 6"):
        export_hf(checkpoints("llama"), out, tokenizer=SAMPLE_TOKENIZER)
    with pytest.raises(ConfigError, match="dtype = 'float16': expected one of float32, bfloat16"):
        export_hf(checkpoint, out, dtype="float16")
    assert not out.exists()


def test_a_failed_write_leaves_the_previous_export(checkpoints, tmp_path, monkeypatch):
    checkpoint = checkpoints("llama")
    out = export_hf(checkpoint, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(adapter, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_hf(checkpoint, out, overwrite=True, dtype="bfloat16")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert_no_leftovers(out)
    with pytest.raises(OSError, match="No space left"):
        export_hf(checkpoint, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert_no_leftovers(tmp_path / "fresh")


# ----------------------------------------------------------------------------------------------
# A DeepSpeed run's checkpoint


def _deepspeed_train(recipe: str, overrides: list[str]) -> None:
    import deepspeed

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU inference at start-up; ZeRO does not
    # use it (as in tests/parallel/test_deepspeed.py)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    train(load_config(recipe, overrides))


def test_deepspeed_checkpoint_with_tensor_parallelism_exports(tmp_path):
    """``xlstm-train export-hf`` on the checkpoint of a DeepSpeed ZeRO-1 run with tp = 2 (its shards
    merged through the checkpoint module) gives the model of the same run trained in one process."""
    pytest.importorskip("deepspeed")
    from transformers import AutoModelForCausalLM

    from tests.parallel.harness import run_distributed
    from xlstm_train.cli import main
    from xlstm_train.train import checkpoint as ckpt

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"name": "ds", **COMMON, **RUNS["xlstm_large"]}))
    # an eps well above fp32 noise, so that summation-order noise in near-zero gradients is not
    # turned into full Adam steps that would tell the two runs apart
    common = ["optim.eps=1e-5"]
    ds = ["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.tp=2"]
    run_distributed(_deepspeed_train, 2, str(recipe), [f"run_dir={tmp_path / 'ds'}", *common, *ds])
    single = Path(train(load_config(recipe, [f"run_dir={tmp_path / 'single'}", *common]))["checkpoint"])
    checkpoint = ckpt.latest_checkpoint(tmp_path / "ds")
    assert ckpt.is_deepspeed(checkpoint) and len(list(checkpoint.rglob("mp_rank_*_model_states.pt"))) == 2

    assert main(["export-hf", str(checkpoint), str(tmp_path / "hf")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ours, cfg = our_model(single)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 40))
    with torch.no_grad():
        assert rel_error(model(ids, use_cache=False).logits, ours(ids)) <= 1e-4
        # xlstm-train eval and generate read the DeepSpeed checkpoint too
        assert rel_error(load_for_inference(checkpoint, device="cpu").model(ids), ours(ids)) <= 1e-4
    assert "after 2 steps" in (tmp_path / "hf" / "README.md").read_text()


# ----------------------------------------------------------------------------------------------
# Tied and untied heads: every export computes our logits, and imports are the model they describe

TINY_MODELS = {
    "xlstm_large": {"arch": "xlstm_large", "vocab_size": 96, "embedding_dim": 128, "num_blocks": 1, "num_heads": 2,
                    "chunk_size": 8, "kernel": "reference"},
    "llama": {"arch": "llama", "vocab_size": 96, "embedding_dim": 32, "num_blocks": 1, "num_heads": 2,
              "max_seq_len": 32},
    "xlstm_blocks": {"arch": "xlstm_blocks", "vocab_size": 96, "embedding_dim": 32, "num_blocks": 2, "slstm_at": [1],
                     "mlstm_num_heads": 2, "slstm_num_heads": 2, "chunk_size": 8, "kernel": "reference"},
}  # fmt: skip


def _saved_checkpoint(tmp_path: Path, model: dict):
    """A single-process checkpoint (weights and config.yaml) of a randomly perturbed model -> (dir, model)."""
    import torch.distributed.checkpoint as dcp

    from xlstm_train.archs import get_spec

    recipe = {"name": "tiny", "model": model, "data": {"source": "synthetic", "task": "parity", "seq_len": 16}}
    checkpoint = tmp_path / "run" / "step-0000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(recipe))
    torch.manual_seed(0)
    ours = build_model(get_spec(model["arch"]).config_class(**model))
    ours.init_weights()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": ours.state_dict()}, checkpoint_id=checkpoint, no_dist=True)
    return checkpoint, ours.eval()


def _load_export(out: Path):
    """The exported model as its target library loads it -> (model, its head, its embedding)."""
    if (out / "config.json").is_file():
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        return model.eval(), model.get_output_embeddings().weight, model.get_input_embeddings().weight
    snippet = (out / "README.md").read_text().split("```python\n")[1].split("```")[0]
    namespace = {}
    exec(snippet.replace(f'Path("{out.name}")', f"Path({str(out)!r})"), namespace)
    model = namespace["model"]
    return model, model.lm_head.weight, model.token_embedding.weight


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_every_export_loads_with_our_logits(arch, tied, tmp_path):
    checkpoint, ours = _saved_checkpoint(tmp_path, {**TINY_MODELS[arch], "tie_embeddings": tied})
    out = export_hf(checkpoint, tmp_path / "out")
    model, head, embedding = _load_export(out)
    assert torch.equal(head, embedding) == tied
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        theirs = model(ids, use_cache=False).logits if (out / "config.json").is_file() else model(ids)
        assert rel_error(theirs, ours(ids)) <= 1e-4


def test_only_classes_that_tie_on_loading_store_a_tied_head_once():
    """transformers' xLSTM does not tie, so its export writes the head in full; Llama ties."""
    from xlstm_train.archs import get_spec

    assert not get_spec("xlstm_large").export.ties_head()
    assert get_spec("llama").export.ties_head()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["xlstm_large", "llama"])
def test_transformers_exports_import_back_exactly(arch, tied, tmp_path):
    """export-hf, then our import of the directory: the same config (tying included) and weights."""
    import importlib

    load_hf_checkpoint = importlib.import_module(f"xlstm_train.archs.{arch}").load_hf_checkpoint
    checkpoint, ours = _saved_checkpoint(tmp_path, {**TINY_MODELS[arch], "tie_embeddings": tied})
    out = export_hf(checkpoint, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied
    cfg, state = load_hf_checkpoint(out)
    assert cfg.tie_embeddings == tied
    again = build_model(cfg).eval()
    again.load_state_dict(state, strict=True)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    head, embedding = (again.lm_head, again.embedding) if arch == "xlstm_large" else (again.output, again.tok_embeddings)
    assert (head.weight is embedding.weight) == tied
    ids = torch.randint(0, 96, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def test_import_of_a_transformers_xlstm_said_tied_but_with_its_own_head(tmp_path):
    """A transformers xLSTM built with tie_word_embeddings=True has two different matrices: the
    import keeps both (untied) and computes transformers' logits."""
    from transformers import xLSTMForCausalLM

    from xlstm_train.archs.xlstm_large import hf_config, load_hf_checkpoint
    from xlstm_train.models.xlstm_large import xLSTMLargeConfig

    torch.manual_seed(0)
    hf_model = xLSTMForCausalLM(hf_config(xLSTMLargeConfig(**TINY_MODELS["xlstm_large"], tie_embeddings=True)))
    hf_model.eval().save_pretrained(tmp_path / "hf")
    assert not torch.equal(hf_model.lm_head.weight, hf_model.backbone.embeddings.weight)
    cfg, state = load_hf_checkpoint(tmp_path / "hf")
    assert not cfg.tie_embeddings
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert rel_error(ours(ids), hf_model(ids, use_cache=False).logits) <= 1e-5

    # an untied config whose weights have no head is refused rather than given a random one
    (tmp_path / "headless").mkdir()
    hf_model.config.tie_word_embeddings = False
    hf_model.config.save_pretrained(tmp_path / "headless")
    weights = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    adapter.write_safetensors(weights, tmp_path / "headless", "float32", "5GB")
    with pytest.raises(ValueError, match="tie_word_embeddings is false but .* no lm_head.weight"):
        load_hf_checkpoint(tmp_path / "headless")


def test_import_of_a_transformers_llama_said_tied_but_stored_untied(tmp_path):
    """transformers keeps both matrices when a tied config's stored head differs from the embedding
    (it warns): the import does the same and computes its logits; settings our Llama lacks are refused."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM
    from transformers import LlamaConfig as HFLlamaConfig

    from xlstm_train.archs.llama import load_hf_checkpoint

    torch.manual_seed(0)
    hf_cfg = HFLlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                           tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    LlamaForCausalLM(hf_cfg).save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf_model.config.tie_word_embeddings
    assert not torch.equal(hf_model.lm_head.weight, hf_model.model.embed_tokens.weight)
    cfg, state = load_hf_checkpoint(tmp_path / "hf")
    assert not cfg.tie_embeddings and cfg.ffn_dim == 48 and cfg.kv_heads == 2
    ours = build_model(cfg).eval()
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, 96, (2, 20))
    with torch.no_grad():
        assert rel_error(ours(ids), hf_model(ids, use_cache=False).logits) <= 1e-5

    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias = True: our llama supports only False"):
        load_hf_checkpoint(tmp_path / "hf")


@pytest.mark.parametrize("backend", ["vanilla", "cuda"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_official_xlstm_blocks_exports_import_back_exactly(tied, backend, tmp_path):
    from xlstm_train.archs.xlstm_blocks import load_official_checkpoint

    checkpoint, ours = _saved_checkpoint(tmp_path, {**TINY_MODELS["xlstm_blocks"], "tie_embeddings": tied})
    out = export_hf(checkpoint, tmp_path / "out", slstm_backend=backend)
    cfg, state = load_official_checkpoint(out)
    # the same model: every setting but how the cells are computed (which the format does not hold)
    expected = read_checkpoint_config(checkpoint).model
    assert cfg == dataclasses.replace(expected, kernel=cfg.kernel, chunk_size=cfg.chunk_size)
    cfg = dataclasses.replace(cfg, kernel=expected.kernel, chunk_size=expected.chunk_size)  # bitwise the same sums
    again = build_model(cfg).eval()
    again.load_state_dict(state, strict=True)
    assert (again.lm_head.weight is again.token_embedding.weight) == tied
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)


def test_official_xlstm_blocks_import_checks_the_head_and_the_config(tmp_path):
    """The official package ties its head: its own tied state dict imports exactly; a head that
    differs from the embedding, an untied model without a head and settings we lack are refused."""
    from safetensors.torch import load_file

    from xlstm_train.archs.xlstm_blocks import from_official_blocks_state_dict, load_official_checkpoint

    checkpoint, ours = _saved_checkpoint(tmp_path, {**TINY_MODELS["xlstm_blocks"], "tie_embeddings": True})
    out = export_hf(checkpoint, tmp_path / "out")
    official, _, _ = _load_export(out)
    again = build_model(read_checkpoint_config(checkpoint).model).eval()
    again.load_state_dict(from_official_blocks_state_dict(official.state_dict(), "vanilla", tie_embeddings=True))
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids), rtol=0, atol=0)
    saved = dict(official.state_dict())
    saved["lm_head.weight"] = saved["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="lm_head.weight differs from token_embedding.weight"):
        from_official_blocks_state_dict(saved, "vanilla", tie_embeddings=True)

    config = yaml.safe_load((out / "config.yaml").read_text())
    (out / "config.yaml").write_text(yaml.safe_dump({**config, "tie_weights": False}))
    with pytest.raises(ValueError, match=f"{re.escape(str(out))}: tie_weights is false but .* no lm_head.weight"):
        load_official_checkpoint(out)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    config["slstm_block"]["feedforward"]["act_fn"] = "relu"
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="slstm_block.feedforward.act_fn = 'relu': our xlstm_blocks supports only 'gelu'"):
        load_official_checkpoint(out)


def test_settings_the_target_cannot_hold_exit_2_by_name(tmp_path, capsys):
    from xlstm_train.cli import main

    checkpoint, _ = _saved_checkpoint(tmp_path, {**TINY_MODELS["xlstm_large"], "tie_embeddings": True,
                                                 "input_gate": "sigmoid"})  # fmt: skip
    assert main(["export-hf", str(checkpoint), str(tmp_path / "out")]) == 2
    assert "model.input_gate = 'sigmoid'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
