import pytest

from xlstm_train.config import ConfigError, apply_override, from_dict, to_dict
from xlstm_train.models.llama import LlamaConfig
from xlstm_train.models.xlstm_large import xLSTMLargeConfig
from xlstm_train.train.config import Config, load_config


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_recipe_states_only_differences(tmp_path):
    cfg = load_config(write(tmp_path, "name: r\noptim:\n  lr: 3e-4\ntrain:\n  steps: 7\n"))
    assert cfg.optim.lr == pytest.approx(3e-4)  # PyYAML reads "3e-4" as a string; coerced to float
    assert cfg.train.steps == 7
    assert cfg.train.micro_batch_size == Config().train.micro_batch_size
    assert cfg.run_path.as_posix() == "runs/r"


def test_model_union_is_chosen_by_arch(tmp_path):
    recipe = write(tmp_path, "model:\n  arch: xlstm_large\n  num_blocks: 3\n")
    cfg = load_config(recipe)
    assert isinstance(cfg.model, xLSTMLargeConfig) and cfg.model.num_blocks == 3
    cfg = load_config(recipe, ["model.arch=llama", "model.num_heads=4"])
    assert isinstance(cfg.model, LlamaConfig) and cfg.model.num_heads == 4


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("optim.lrr=1", ["unknown key 'optim.lrr'", "did you mean 'lr'", "override 'optim.lrr=1'"]),
        ("model.num_blocks=abc", ["model.num_blocks = 'abc'", "expected int"]),
        ("model.num_blocks=2.5", ["model.num_blocks = 2.5", "expected int"]),
        ("train.device=tpu", ["train.device = 'tpu'", "'auto' | 'cpu' | 'cuda'"]),
        ("model.arch=gpt", ["model.arch = 'gpt'", "'xlstm_blocks'"]),
        ("train.steps", ["not of the form key.sub=value"]),
        ("optim.betas=[0.9, x]", ["optim.betas[1] = 'x'", "expected float"]),
        ("train.seed.deep=1", ["train.seed"]),
    ],
)
def test_bad_overrides_name_key_value_and_allowed(tmp_path, override, fragments):
    recipe = write(tmp_path, "name: r\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, [override])
    for fragment in fragments:
        assert fragment in str(err.value)


def test_errors_in_the_recipe_name_the_file(tmp_path):
    recipe = write(tmp_path, "train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train.stepz' \(in .*recipe.yaml\)"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_nested_dataclass_lists_and_optional(tmp_path):
    cfg = load_config(
        write(tmp_path, "data:\n  datasets:\n    - {path: a, weight: 2}\n    - {path: b}\n"),
        ["model.arch=llama", "model.num_kv_heads=null"],
    )
    assert [(d.path, d.weight) for d in cfg.data.datasets] == [("a", 2.0), ("b", 1.0)]
    assert cfg.model.num_kv_heads is None
    with pytest.raises(ConfigError, match=r"missing required key 'data.datasets\[0\].path'"):
        load_config(write(tmp_path, "data:\n  datasets:\n    - {weight: 2}\n"))


def test_round_trip_through_dict():
    cfg = Config()
    again = from_dict(Config, to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_apply_override_refuses_to_descend_into_a_value():
    data = {"train": {"steps": 3}}
    apply_override(data, "train.steps=5")
    assert data == {"train": {"steps": 5}}
    with pytest.raises(ConfigError, match="'steps' is a value"):
        apply_override(data, "train.steps.x=1")


def test_skipping_nonfinite_steps_under_deepspeed_is_refused_when_read(tmp_path):
    recipe = write(tmp_path, "name: r\nparallel:\n  engine: deepspeed\n  zero_stage: 2\n")
    assert load_config(recipe).train.on_nonfinite == "stop"
    with pytest.raises(ConfigError, match=r"train.on_nonfinite = 'skip' with parallel.engine = 'deepspeed'.*allowed: stop"):
        load_config(recipe, ["train.on_nonfinite=skip"])
