"""The whole run's configuration and how it is loaded from a recipe plus overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xlstm_train.config import ConfigError, apply_override, from_dict, read_recipe
from xlstm_train.data.config import DataConfig
from xlstm_train.models.llama import LlamaConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
from xlstm_train.models.xlstm_large import xLSTMLargeConfig
from xlstm_train.parallel.config import ParallelConfig

ModelConfig = xLSTMBlocksConfig | xLSTMLargeConfig | LlamaConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO_ROOT / "recipes" / "tiny.yaml"


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: the last fraction of the steps decays linearly
    weight_decay: float = 0.1
    decay_embeddings: bool = False  # norms, biases and embeddings get no decay unless asked
    decay_norms_and_biases: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad_norm: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU always runs fp32
    on_nonfinite: Literal["stop", "skip"] = "stop"
    eval_interval: int = 100
    eval_batches: int = 8
    sample_tokens: int = 64  # tokens sampled per prompt when training ends (0: none)
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: Literal["disabled", "offline", "online"] = "offline"
    wandb_project: str = "xlstm-train"
    wandb_entity: str | None = None


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints (a final one is always written); 0: final only
    keep: int = 2  # most recent checkpoints kept
    resume: str = "auto"  # "auto": latest in the run directory; "never"; or a checkpoint path
    async_save: bool = False


@dataclass
class Config:
    name: str = "tiny"
    run_dir: str | None = None  # default: runs/<name>
    model: ModelConfig = field(default_factory=xLSTMBlocksConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read ``recipe`` (default: recipes/tiny.yaml), apply ``key.sub=value`` overrides, validate."""
    path = Path(recipe) if recipe is not None else DEFAULT_RECIPE
    data = read_recipe(path)
    config = from_dict(Config, data, where=str(path))
    for override in overrides:  # validated one by one so that an error names its override
        apply_override(data, override)
        config = from_dict(Config, data, where=f"override '{override}'")
    return config


__all__ = ["Config", "ConfigError", "load_config"]
