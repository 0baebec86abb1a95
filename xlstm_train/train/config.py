"""The whole run's configuration and how it is loaded from a recipe plus overrides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from xlstm_train.archs import model_config_classes
from xlstm_train.config import ConfigError, OneOf, apply_override, from_dict, read_recipe
from xlstm_train.data.config import DataConfig
from xlstm_train.eval.config import EvalConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
from xlstm_train.parallel.config import ParallelConfig

# The config class of the registered architecture that `model.arch` names (xlstm_train.archs).
ModelConfig = Annotated[Any, OneOf(model_config_classes)]

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

    def validate(self, prefix: str) -> None:
        _check(prefix, "lr", self.lr, self.lr > 0, "a positive number")
        _check(prefix, "min_lr_ratio", self.min_lr_ratio, 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        _check(prefix, "warmup_steps", self.warmup_steps, self.warmup_steps >= 0, ">= 0")
        _check(prefix, "decay_fraction", self.decay_fraction, 0 <= self.decay_fraction <= 1, "in [0, 1]")
        _check(prefix, "weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0")
        _check(prefix, "betas", self.betas, len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "two numbers in [0, 1)")
        _check(prefix, "eps", self.eps, self.eps > 0, "a positive number")
        _check(prefix, "clip_grad_norm", self.clip_grad_norm, self.clip_grad_norm >= 0, ">= 0 (0 disables clipping)")


@dataclass
class SpikeGuardConfig:
    """Skips the update of a step whose loss or gradient norm jumps above the recent steps (see
    ``xlstm_train.train.engine.SpikeGuard``). Off unless ``window`` > 0."""

    window: int = 0  # accepted steps the mean and standard deviation are taken over; 0: off
    loss_sigmas: float = 6.0  # a loss above mean + loss_sigmas * std is a spike; 0: loss not checked
    grad_norm_sigmas: float = 6.0  # the same for the gradient norm (before clipping); 0: not checked

    def validate(self, prefix: str) -> None:
        _check(prefix, "window", self.window, self.window >= 0, ">= 0 (0: off)")
        if self.window == 1:
            raise ConfigError(f"{prefix}.window = 1: one step has no spread to measure a spike by; "
                              "expected 0 (off) or an integer >= 2")
        _check(prefix, "loss_sigmas", self.loss_sigmas, self.loss_sigmas >= 0, ">= 0 (0: loss not checked)")
        _check(prefix, "grad_norm_sigmas", self.grad_norm_sigmas, self.grad_norm_sigmas >= 0,
               ">= 0 (0: gradient norm not checked)")
        if self.window > 0 and self.loss_sigmas == 0 and self.grad_norm_sigmas == 0:
            raise ConfigError(f"{prefix}.window = {self.window} with {prefix}.loss_sigmas = 0 and "
                              f"{prefix}.grad_norm_sigmas = 0 checks nothing; set one of them > 0, or window = 0")

    @property
    def enabled(self) -> bool:
        return self.window > 0


@dataclass
class TrainConfig:
    steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU always runs fp32
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # The loss from the final hidden states block by block (head and cross-entropy fused), never
    # holding the whole micro-batch's fp32 logits; false materialises them (the reference path).
    fused_cross_entropy: bool = True
    # consecutive skipped updates (non-finite steps under on_nonfinite=skip, spike-guard skips) after
    # which the run saves its state and stops with an error; 0: no limit
    max_skipped_steps: int = 10
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)
    eval_interval: int = 100  # steps between validations; 0: at the end only
    eval_batches: int = 8  # validation micro-batches per rank; 0: no validation loss at all
    sample_tokens: int = 64  # tokens sampled per prompt when training ends (0: none)
    sample_prompts: list[str] = field(default_factory=lambda: ["The"])
    sample_temperature: float = 0.8
    sample_top_k: int | None = 50

    def validate(self, prefix: str) -> None:
        _check(prefix, "steps", self.steps, self.steps >= 1, "an integer >= 1")
        _check(prefix, "micro_batch_size", self.micro_batch_size, self.micro_batch_size >= 1, "an integer >= 1")
        _check(prefix, "grad_accum_steps", self.grad_accum_steps, self.grad_accum_steps >= 1, "an integer >= 1")
        _check(prefix, "eval_interval", self.eval_interval, self.eval_interval >= 0, ">= 0 (0: evaluate at the end only)")
        _check(prefix, "eval_batches", self.eval_batches, self.eval_batches >= 0, ">= 0 (0: no validation)")
        _check(prefix, "max_skipped_steps", self.max_skipped_steps, self.max_skipped_steps >= 0, ">= 0 (0: no limit)")
        _check(prefix, "sample_tokens", self.sample_tokens, self.sample_tokens >= 0, ">= 0")
        _check(prefix, "sample_temperature", self.sample_temperature, self.sample_temperature > 0, "> 0")
        top_k = self.sample_top_k
        _check(prefix, "sample_top_k", top_k, top_k is None or top_k >= 1, "null or an integer >= 1")


@dataclass
class LoggingConfig:
    interval: int = 10
    wandb: Literal["disabled", "offline", "online"] = "offline"
    wandb_project: str = "xlstm-train"
    wandb_entity: str | None = None
    wandb_group: str | None = None  # groups runs in the wandb UI (e.g. the points of one sweep)

    def validate(self, prefix: str) -> None:
        _check(prefix, "interval", self.interval, self.interval >= 1, "an integer >= 1")


@dataclass
class CheckpointConfig:
    interval: int = 500  # steps between checkpoints (a final one is always written); 0: final only
    keep: int = 2  # most recent checkpoints kept
    resume: str = "auto"  # "auto": latest in the run directory; "never"; or a checkpoint path
    async_save: bool = False

    def validate(self, prefix: str) -> None:
        _check(prefix, "interval", self.interval, self.interval >= 0, ">= 0 (0: final checkpoint only)")
        _check(prefix, "keep", self.keep, self.keep >= 1, "an integer >= 1")


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
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluations besides the validation loss

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name

    def validate(self, prefix: str) -> None:
        """Checks that span sections (each section checks its own fields)."""
        seq_len = self.data.seq_len  # data.seq_len >= 1 is checked by DataConfig
        max_seq_len = getattr(self.model, "max_seq_len", None)
        if max_seq_len is not None and seq_len > max_seq_len:
            raise ConfigError(
                f"data.seq_len = {seq_len}: the {self.model.arch} model takes at most "
                f"model.max_seq_len = {max_seq_len} tokens; lower data.seq_len or raise model.max_seq_len"
            )
        if not self.name or "/" in self.name:
            raise ConfigError(f"name = {self.name!r}: expected a non-empty name without '/'")
        if self.parallel.engine == "deepspeed" and self.train.on_nonfinite == "skip":
            raise ConfigError(
                "train.on_nonfinite = 'skip' with parallel.engine = 'deepspeed': DeepSpeed applies the update "
                "inside engine.step() and cannot skip it in fp32/bf16; allowed: stop (or engine 'fsdp')"
            )
        if self.parallel.engine == "deepspeed" and self.train.spike_guard.enabled:
            raise ConfigError(
                f"train.spike_guard.window = {self.train.spike_guard.window} with parallel.engine = 'deepspeed': "
                "DeepSpeed knows the gradient norm only after its update and cannot skip a spike; "
                "allowed: window 0 (or engine 'fsdp')"
            )


def _check(prefix: str, name: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        key = f"{prefix}.{name}" if prefix else name
        raise ConfigError(f"{key} = {value!r}: expected {allowed}")


def load_config(recipe: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read ``recipe`` (default: recipes/tiny.yaml), apply ``key.sub=value`` overrides, validate."""
    path = Path(recipe) if recipe is not None else DEFAULT_RECIPE
    data = read_recipe(path)
    config = from_dict(Config, data, where=str(path))
    if overrides:
        # checked together, so that their order does not matter: `model.num_blocks=2
        # model.slstm_at=[1]` is fine although the first alone does not fit the recipe's slstm_at
        for override in overrides:
            apply_override(data, override)
        where = f"override{'s' if len(overrides) > 1 else ''} " + ", ".join(f"'{o}'" for o in overrides)
        try:
            config = from_dict(Config, data, where=where)
        except ConfigError as e:
            if where in str(e):
                raise
            # a section's own check (validate) does not know the source; the recipe alone passed them
            raise ConfigError(f"{e} (with {where})") from None
    if config.data.source == "synthetic" and "vocab_size" not in (data.get("model") or {}):
        # a synthetic task fixes its own vocabulary; the model follows unless the recipe says otherwise
        from xlstm_train.data.synthetic import task_vocab_size

        config.model.vocab_size = task_vocab_size(config.data)
    return config


__all__ = ["Config", "ConfigError", "load_config"]
