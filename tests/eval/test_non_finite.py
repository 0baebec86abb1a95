"""Weights that give NaN or infinite logits (a diverged run): sampling raises NonFiniteLogitsError
before drawing a token, ``generate`` exits 2 with one message, and every evaluation (documents,
harness tasks, synthetic accuracy) reports nan/inf with a warning instead of a traceback."""

import json
import math
from pathlib import Path

import pytest
import torch

from tests.eval.conftest import save_checkpoint, text_config
from tests.models.utils import perturb_
from xlstm_train.cli import main
from xlstm_train.eval.loading import load_for_inference
from xlstm_train.eval.perplexity import NonFiniteScoreWarning
from xlstm_train.models import build_model
from xlstm_train.models.generate import NonFiniteLogitsError, generate, sample_next
from xlstm_train.train.config import Config

TASKS = Path(__file__).parent / "tasks"


def _broken_checkpoint(directory: Path, cfg: Config, value: float = math.nan) -> Path:
    """A checkpoint whose final norm is ``value``: every logit of every position is non-finite."""
    torch.manual_seed(0)
    model = perturb_(build_model(cfg.model))
    norm = {"xlstm_large": "backbone.out_norm.weight", "llama": "norm.weight",
            "xlstm_blocks": "xlstm_block_stack.post_blocks_norm.weight"}[cfg.model.arch]  # fmt: skip
    with torch.no_grad():
        model.get_parameter(norm).fill_(value)
    return save_checkpoint(directory, model, cfg)


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return _broken_checkpoint(tmp_path_factory.mktemp("broken") / "step-0000001", text_config("xlstm_large"))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.0, None, None), (1.0, None, None), (0.7, 5, 0.9)])
def test_sample_next_refuses_non_finite_rows(bad, temperature, top_k, top_p):
    logits = torch.randn(3, 11)
    logits[1, 4] = bad
    with pytest.raises(NonFiniteLogitsError, match=r"not finite \(NaN or inf\) in row\(s\) \[1\]"):
        sample_next(logits, temperature, top_k, None, top_p)


def test_a_tiny_temperature_on_large_logits_stays_finite():
    """Dividing logits of 1e4 by a temperature of 1e-30 overflows unless the rows are shifted first."""
    logits = torch.tensor([[1e4, 2e4, 0.0], [-3e4, -1e4, -2e4]])
    drawn = sample_next(logits, 1e-30, None, torch.Generator().manual_seed(0))
    assert drawn.flatten().tolist() == [1, 1]


def test_generate_raises_the_one_error_type_the_trainer_catches(broken):
    loaded = load_for_inference(broken, device="cpu")
    prompt = torch.tensor([loaded.tokenizer.encode("Emma")])
    for temperature in (0.0, 0.8):
        with pytest.raises(NonFiniteLogitsError, match=r"after the prompt of prompt\(s\) \[1\]"):
            generate(loaded.model, prompt, 4, temperature=temperature, top_k=3)
    assert issubclass(NonFiniteLogitsError, ValueError)


def test_generate_command_exits_2_with_one_message(broken, capsys):
    code = main(["generate", str(broken), "--prompt", "Emma", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    assert out.startswith("Emma")  # the streamed prompt, then the line is ended
    assert err.startswith(f"error: checkpoint '{broken}': the model's logits are not finite") and err.count("\n") == 1
    code = main(["generate", str(broken), "--prompt", "Emma", "--prompt", "Anne", "--max-new-tokens", "3"])
    assert code == 2 and "prompt(s) [1, 2]" in capsys.readouterr().err


def test_eval_data_reports_nan_with_a_warning(broken, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("Emma Woodhouse, handsome, clever, and rich.")
    output = tmp_path / "eval.json"
    code = main(["eval", str(broken), "--data", str(text), "--output", str(output)])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert "warning: eval " in err and "1 of 1 documents scored a NaN or infinite log-likelihood" in err
    result = json.loads(output.read_text())["data"][str(text)]
    assert all(math.isnan(result[key]) for key in ("loss", "perplexity", "bits_per_byte"))
    assert out.splitlines()[-1].split()[1:4] == ["nan", "nan", "nan"]  # the table


def test_eval_tasks_report_and_warn(broken, capsys, monkeypatch):
    """Harness tasks of every request type on NaN weights: scores come back (nan log-likelihoods,
    empty generations) with warnings, and the harness computes its metrics from them."""
    from lm_eval.api.instance import Instance

    from xlstm_train.eval import harness

    only_ours = harness.make_task_manager
    monkeypatch.setattr(harness, "make_task_manager", lambda path=None, defaults=True: only_ours(path, False))
    monkeypatch.chdir(TASKS)
    code = main(["eval", str(broken), "--tasks", "xlstm_train_tiny_choice,xlstm_train_tiny_rolling",
                 "--tasks-path", str(TASKS), "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    choices = sum(len(json.loads(line)["choices"]) for line in (TASKS / "tiny_choice.jsonl").read_text().splitlines())
    assert f"warning: harness loglikelihood: {choices} of {choices} requests" in err
    assert "warning: harness loglikelihood_rolling: 2 of 2 texts" in err
    results = json.loads(out)["tasks"]
    assert math.isnan(results["xlstm_train_tiny_rolling"]["word_perplexity"])
    assert 0 <= results["xlstm_train_tiny_choice"]["acc"] <= 1

    lm = harness.XLSTMTrainLM(load_for_inference(broken, device="cpu"), batch_size=2)
    request = Instance("generate_until", {}, ("Emma", {"until": ["\n"], "max_gen_toks": 4}), 0)
    with pytest.warns(NonFiniteScoreWarning, match="generate_until: the model's logits are not finite"):
        assert lm.generate_until([request, request]) == ["", ""]


def test_synthetic_accuracy_is_nan_with_a_warning(tmp_path):
    from xlstm_train.eval.synthetic import evaluate_synthetic

    cfg = Config(name="parity")
    cfg.data.source, cfg.data.task, cfg.data.seq_len = "synthetic", "parity", 16
    cfg.data.task_options = {"max_len": 12}
    cfg.model.vocab_size, cfg.model.embedding_dim, cfg.model.num_blocks = 8, 32, 1
    cfg.model.mlstm_num_heads, cfg.model.chunk_size, cfg.model.kernel = 2, 8, "reference"
    checkpoint = _broken_checkpoint(tmp_path / "step-0000001", cfg, value=math.inf)
    loaded = load_for_inference(checkpoint, device="cpu")
    with pytest.warns(NonFiniteScoreWarning, match="answer positions have NaN or infinite logits"):
        metrics = evaluate_synthetic(loaded.model, cfg.data, num_samples=8, batch_size=4)["parity"]
    assert all(math.isnan(metrics[key]) for key in ("accuracy", "scaled_accuracy", "sequence_accuracy"))
    assert metrics["answers"] > 0
