"""The eval and generate command lines: results, streaming, and one clear message (exit 2) for a
missing or foreign checkpoint, an unknown task, a prompt longer than a Llama's context, a missing
tokenizer; the recipe's eval section as training calls it."""

import json
from pathlib import Path

import pytest

from tests.eval.conftest import text_config, write_checkpoint
from xlstm_train.cli import main
from xlstm_train.config import ConfigError
from xlstm_train.eval.config import EvalConfig
from xlstm_train.eval.training import run_training_evals
from xlstm_train.train.config import Config

TASKS = str(Path(__file__).parent / "tasks")


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_checkpoints_exit_2_with_one_line(tmp_path, capsys):
    code, _, err = _run(["eval", str(tmp_path / "nope"), "--data", "data/sample"], capsys)
    assert code == 2 and "no such directory" in err and err.count("\n") == 1
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model.safetensors").write_text("")
    code, _, err = _run(["generate", str(foreign), "--prompt", "Hi"], capsys)
    assert code == 2 and "has no .metadata or config.yaml" in err


def test_missing_tokenizer_exits_2(tmp_path, capsys):
    cfg = text_config("xlstm_large")
    cfg.data.tokenizer = str(tmp_path / "gone.model")
    checkpoint = write_checkpoint(tmp_path / "run" / "step-0000001", cfg)
    code, _, err = _run(["generate", str(checkpoint), "--prompt", "Hi"], capsys)
    assert code == 2 and "cannot be opened from here" in err and "--tokenizer" in err


def test_llama_prompt_longer_than_context_exits_2(checkpoints, tmp_path, capsys):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("Elizabeth\n\n" + "and so on " * 80 + "\n")
    code, _, err = _run(["generate", str(checkpoints["llama"]), "--prompt-file", str(prompt_file)], capsys)
    assert code == 2 and "prompt 2 has" in err and "max_seq_len = 64" in err
    code, _, err = _run(["generate", str(checkpoints["llama"]), "--prompt", "Elizabeth", "--max-new-tokens", "70"],
                        capsys)
    assert code == 2 and "at most" in err


def test_unknown_task_exits_2_before_loading(checkpoints, capsys, monkeypatch):
    from xlstm_train.eval import harness

    only_ours = harness.make_task_manager
    monkeypatch.setattr(harness, "make_task_manager", lambda path=None, defaults=True: only_ours(path, False))
    code, _, err = _run(["eval", str(checkpoints["xlstm_large"]), "--tasks", "xlstm_train_tiny_choise",
                         "--tasks-path", TASKS], capsys)
    assert code == 2 and "unknown lm-evaluation-harness task 'xlstm_train_tiny_choise'" in err


def test_generate_streams_one_prompt_and_batches_several(checkpoints, capsys):
    argv = ["generate", str(checkpoints["xlstm_blocks"]), "--max-new-tokens", "5", "--temperature", "0"]
    code, out, err = _run(argv + ["--prompt", "Elizabeth"], capsys)
    assert code == 0 and out.startswith("Elizabeth") and "tokens/s" in err
    alone = out.strip()
    code, out, _ = _run(argv + ["--prompt", "It is a truth", "--prompt", "Elizabeth"], capsys)
    assert code == 0 and out.split("--- 2 ---\n")[1].strip() == alone  # batched = alone (greedy)


def test_eval_data_writes_json_and_a_table(checkpoints, tmp_path, capsys):
    text = tmp_path / "held_out.jsonl"
    text.write_text(json.dumps({"text": "Emma Woodhouse, handsome, clever, and rich."}) + "\n")
    output = tmp_path / "out" / "eval.json"
    code, out, _ = _run(["eval", str(checkpoints["llama"]), "--data", str(text), "--output", str(output)], capsys)
    assert code == 0 and "bits/byte" in out
    result = json.loads(output.read_text())["data"][str(text)]
    assert result["documents"] == 1 and result["bytes"] == 43 and result["perplexity"] > 1


def test_eval_of_a_synthetic_checkpoint_scores_its_task(tmp_path, capsys):
    cfg = Config(name="mqar")
    cfg.data.source, cfg.data.task, cfg.data.seq_len = "synthetic", "mqar", 40
    cfg.data.task_options = {"num_kv_pairs": 4}
    cfg.model.vocab_size, cfg.model.embedding_dim, cfg.model.num_blocks = 130, 32, 2
    cfg.model.slstm_at, cfg.model.mlstm_num_heads, cfg.model.chunk_size = [], 2, 8
    checkpoint = write_checkpoint(tmp_path / "mqar" / "step-0000001", cfg)
    code, out, _ = _run(["eval", str(checkpoint), "--kv-pairs", "2,8", "--num-samples", "8", "--json"], capsys)
    assert code == 0
    synthetic = json.loads(out)["synthetic"]
    assert sorted(synthetic) == ["mqar_kv2", "mqar_kv8"] and synthetic["mqar_kv8"]["answers"] == 64
    code, _, err = _run(["eval", str(checkpoint), "--data", "data/sample"], capsys)
    assert code == 2 and "synthetic task 'mqar'" in err
    code, _, err = _run(["generate", str(checkpoint), "--prompt", "1 2 3"], capsys)
    assert code == 2 and "no tokenizer" in err


def test_training_evals_follow_the_eval_section(checkpoints, tmp_path, monkeypatch):
    from xlstm_train.eval import harness
    from xlstm_train.eval.loading import load_for_inference

    only_ours = harness.make_task_manager
    monkeypatch.setattr(harness, "make_task_manager", lambda path=None, defaults=True: only_ours(path, False))
    loaded = load_for_inference(checkpoints["xlstm_large"], device="cpu")
    text = tmp_path / "held_out.txt"
    text.write_text("It is a truth universally acknowledged.")
    cfg = loaded.cfg
    cfg.eval = EvalConfig(interval=20, data=[str(text)], tasks=["xlstm_train_tiny_choice"], tasks_path=TASKS, limit=2)
    monkeypatch.chdir(TASKS)
    assert run_training_evals(loaded.model, cfg, 10, tokenizer=loaded.tokenizer, device="cpu") == {}
    metrics = run_training_evals(loaded.model, cfg, 40, tokenizer=loaded.tokenizer, device="cpu")
    assert set(metrics) == {"eval/held_out/loss", "eval/held_out/perplexity", "eval/held_out/bits_per_byte",
                            "eval/xlstm_train_tiny_choice/acc", "eval/xlstm_train_tiny_choice/acc_norm"}
    assert metrics["eval/xlstm_train_tiny_choice/acc"] in (0.0, 0.5, 1.0)  # two examples (limit)
    assert run_training_evals(loaded.model, cfg, 45, tokenizer=loaded.tokenizer, device="cpu", final=True)


def test_eval_section_is_validated():
    with pytest.raises(ConfigError, match=r"eval.data\[0\] = 'missing.jsonl'"):
        EvalConfig(data=["missing.jsonl"]).validate("eval")
    with pytest.raises(ConfigError, match="eval.interval = -1"):
        EvalConfig(interval=-1).validate("eval")


def test_sampling_flags_change_what_is_drawn(checkpoints, capsys):
    """--top-k 1 and a tiny --top-p leave only the most likely token (greedy); --seed repeats a draw."""
    argv = ["generate", str(checkpoints["xlstm_large"]), "--prompt", "Elizabeth", "--max-new-tokens", "8"]
    outputs = {}
    for name, flags in {"greedy": ["--temperature", "0"], "top_k_1": ["--temperature", "1.5", "--top-k", "1"],
                        "top_p_tiny": ["--temperature", "1.5", "--top-p", "1e-6"],
                        "seed_1": ["--temperature", "1.5", "--seed", "1"],
                        "seed_1_again": ["--temperature", "1.5", "--seed", "1"],
                        "seed_2": ["--temperature", "1.5", "--seed", "2"]}.items():  # fmt: skip
        code, out, _ = _run(argv + flags, capsys)
        assert code == 0, name
        outputs[name] = out
    assert outputs["top_k_1"] == outputs["greedy"] == outputs["top_p_tiny"]
    assert outputs["seed_1"] == outputs["seed_1_again"]
    assert outputs["seed_1"] != outputs["seed_2"] and outputs["seed_1"] != outputs["greedy"]  # 4096 tokens, flat


@pytest.mark.parametrize("flags, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0: expected an integer >= 1"),
    (["--temperature", "-1"], "--temperature -1.0: expected a number >= 0"),
    (["--top-k", "0"], "--top-k 0: expected an integer >= 1"),
    (["--top-p", "0"], r"--top-p 0.0: expected a number in (0, 1]"),
    (["--top-p", "1.5"], r"--top-p 1.5: expected a number in (0, 1]"),
    (["--prompt-file", "no/such/prompts.txt"], "--prompt-file no/such/prompts.txt: no such file"),
])  # fmt: skip
def test_bad_generate_flags_exit_2(checkpoints, capsys, flags, message):
    prompt = [] if "--prompt-file" in flags else ["--prompt", "Emma"]
    code, out, err = _run(["generate", str(checkpoints["llama"]), *prompt, *flags], capsys)
    assert code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1 and out == ""


def test_generate_without_a_prompt_exits_2(checkpoints, capsys):
    code, _, err = _run(["generate", str(checkpoints["llama"])], capsys)
    assert code == 2 and "no prompt: pass --prompt TEXT" in err


@pytest.mark.parametrize("flags, message", [
    ([], "nothing to evaluate: pass --data PATH and/or --tasks NAME"),
    (["--data", "no/such.jsonl"], "--data no/such.jsonl: no such file or directory"),
    (["--data", "data/sample", "--batch-size", "0"], "--batch-size 0: expected an integer >= 1"),
    (["--data", "data/sample", "--kv-pairs", "8"], "--kv-pairs and --lengths apply to checkpoints of synthetic"),
    (["--data", "data/sample", "--lengths", "9"], "--lengths '9': expected MIN:MAX"),
    (["--data", "data/sample", "--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
])  # fmt: skip
def test_bad_eval_flags_exit_2(checkpoints, capsys, flags, message):
    code, out, err = _run(["eval", str(checkpoints["xlstm_blocks"]), *flags], capsys)
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1 and out == ""
