"""The training loop: one process, or one of many launched by torchrun or deepspeed (see ``launch/``).

``train(cfg)`` reads top to bottom: check the inputs (nothing is written before they pass), build
(device, seed, model, engine, schedule, loaders, checkpoint restore, loggers), then loop:

    engine.step (forward-backward -> clip -> finite check -> update or skip) -> schedule
    -> log -> evaluate -> checkpoint

and finally sample a few lines of text from the trained model. The step itself lives in
``xlstm_train.train.engine`` (FSDP2 or DeepSpeed, as ``parallel.engine`` says). Evaluating is the
validation loss plus the recipe's ``eval`` section (``xlstm_train.eval.training``), at step 0, every
``train.eval_interval`` steps and at the end.

The loop ends early, with a checkpoint, when

* a stop signal arrives (SIGTERM, SIGUSR1, SIGINT; see ``train.preemption``): every rank finishes
  the same step, saves, and ``train`` returns normally (exit code 0);
* ``train.max_skipped_steps`` updates in a row were skipped (non-finite steps under
  ``on_nonfinite: skip``, or the spike guard): ``SkippedStepsError``, exit code 1. The weights
  saved are those before the skipped steps, since a skipped step leaves them alone.

The run directory (``cfg.run_path``) is never deleted or overwritten. A run whose directory holds a
complete checkpoint continues from the latest one (``checkpoint.resume: auto``); so does a run
killed before its first checkpoint, whose directory holds only what the run writes before then
(``config.yaml`` equal to the recipe's, ``metrics.jsonl``, ``wandb/``, ``step-*.tmp``): it starts
over. Anything else in it is refused with a message (pick another ``name`` or ``run_dir``).
``checkpoint.resume: never`` always asks for an empty directory; a checkpoint path starts from that
checkpoint. After a resume ``metrics.jsonl`` holds each step once: the records of the steps after the
checkpoint, which are trained again, are dropped.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from xlstm_train.archs import get_spec
from xlstm_train.config import ConfigError, to_dict
from xlstm_train.data import (
    DataError,
    build_train_loader,
    build_val_loader,
    load_tokenizer,
    relative_path_note,
)
from xlstm_train.data.loader import check_dataset_paths
from xlstm_train.eval.training import run_training_evals
from xlstm_train.models import build_model, count_params
from xlstm_train.models.generate import NonFiniteLogitsError, generate
from xlstm_train.parallel import (
    build_mesh,
    destroy_distributed,
    dp_mean,
    dp_rank_and_size,
    init_distributed,
    loss_context,
    setup_rank_logging,
    to_full,
)
from xlstm_train.train import checkpoint as ckpt
from xlstm_train.train.config import Config
from xlstm_train.train.engine import Engine, SpikeGuard, StepResult, build_engine, token_loss
from xlstm_train.train.flops import flops_per_token
from xlstm_train.train.metrics import MetricsLogger, drop_records_after, memory_gib, peak_flops, perplexity
from xlstm_train.train.optim import build_scheduler
from xlstm_train.train.preemption import StopSignals


class _SilentLogger:
    """The metrics logger of ranks other than 0: rank 0 logs for the whole run."""

    wandb_id = None

    def log_train(self, *args, **kwargs) -> None:
        pass

    log_val = log_event = log_train

    def close(self) -> None:
        pass


class NonFiniteError(RuntimeError):
    """The loss or gradient norm of a step was NaN or infinite and the recipe says to stop."""


class SkippedStepsError(NonFiniteError):
    """``train.max_skipped_steps`` updates in a row were skipped; the state is saved."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped steps included)
    consumed_samples: int = 0  # sequences drawn from the training data, over all ranks
    tokens_seen: int = 0
    skipped_steps: int = 0  # updates not applied: non-finite steps and spikes
    spike_steps: int = 0  # of those, the spike guard's
    consecutive_skipped: int = 0  # skipped updates since the last applied one


# ----------------------------------------------------------------------------------------------
# Checks that run before anything is written


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda': no CUDA device is available here; allowed: auto, cpu")
    return torch.device(name)


def check_data_paths(cfg: Config) -> None:
    data = cfg.data
    if data.source != "shards":
        return
    if not data.datasets:
        raise ConfigError("data.datasets is empty: data.source 'shards' needs at least one prepared dataset")
    check_dataset_paths(data)
    if data.tokenizer is not None and not Path(data.tokenizer).exists():
        raise DataError(
            f"data.tokenizer = '{data.tokenizer}': no such file{relative_path_note(data.tokenizer)}; expected "
            "a SentencePiece .model or a Hugging Face tokenizer.json (or its directory)"
        )


def check_tokenizer_fits(tokenizer, cfg: Config) -> None:
    if tokenizer is not None and tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size = {cfg.model.vocab_size} is smaller than the vocabulary of "
            f"data.tokenizer = '{cfg.data.tokenizer}' ({tokenizer.vocab_size} tokens); "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )


# What a run writes into its directory before its first checkpoint (besides config.yaml).
_START_FILES = {"metrics.jsonl", "metrics.jsonl.tmp", "wandb"}
_UNFINISHED_CHECKPOINT = re.compile(r"step-\d+\.tmp")


def check_own_start(run_dir: Path, cfg: Config) -> None:
    """Pass when ``run_dir`` holds only what this run writes before its first checkpoint, with a
    ``config.yaml`` equal to ``cfg``'s (an earlier start of the same command, killed or stopped by a
    data error before it saved); otherwise raise a ConfigError naming what is foreign."""
    refused = (f"run directory '{run_dir}' already holds files and no complete checkpoint to resume from "
               "(checkpoint.resume = 'auto'); it is left untouched. ")
    remedy = "Choose another name or run_dir, or remove the directory yourself"
    entries = sorted(p.name for p in run_dir.iterdir())
    foreign = [name for name in entries if name != ckpt.CONFIG_FILE and name not in _START_FILES
               and not _UNFINISHED_CHECKPOINT.fullmatch(name)]
    if foreign:
        raise ConfigError(
            f"{refused}Not written by a run before its first checkpoint: {', '.join(foreign)} (a run restarts "
            f"by itself only from {ckpt.CONFIG_FILE}, metrics.jsonl, wandb/ and step-*.tmp). {remedy}"
        )
    config_file = run_dir / ckpt.CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{refused}It has no {ckpt.CONFIG_FILE} to show that it is this run's. {remedy}")
    try:
        saved = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError:
        saved = None
    now = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # as it would be written
    if saved != now:
        differing = _differing_keys(saved, now) if isinstance(saved, dict) else [f"{ckpt.CONFIG_FILE} (unreadable)"]
        raise ConfigError(
            f"{refused}Its {ckpt.CONFIG_FILE} is another run's; it differs from this recipe in: "
            f"{', '.join(differing[:8])}{' ...' if len(differing) > 8 else ''}. {remedy}"
        )


def _differing_keys(saved: dict, now: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in dict.fromkeys([*saved, *now]):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _differing_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} = {b!r} (there: {a!r})")
    return keys


def find_resume_checkpoint(cfg: Config) -> Path | None:
    """The checkpoint this run continues from, or None for a new run (see the module docstring)."""
    run_dir = cfg.run_path
    resume = cfg.checkpoint.resume
    occupied = run_dir.exists() and any(run_dir.iterdir())
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory '{run_dir}' exists and is not a directory")
    if resume not in ("auto", "never"):
        path = Path(resume)
        if not ckpt.is_complete(path):
            raise ConfigError(
                f"checkpoint.resume = '{resume}': not a complete checkpoint directory (step-NNNNNNN "
                "holding .metadata and train_state.pt); allowed: auto, never, or such a path"
            )
        if ckpt.is_deepspeed(path) != (cfg.parallel.engine == "deepspeed"):
            raise ConfigError(
                f"checkpoint.resume = '{resume}' was written by the "
                f"{'deepspeed' if ckpt.is_deepspeed(path) else 'fsdp'} engine and parallel.engine = "
                f"'{cfg.parallel.engine}'; resume with the engine that wrote it (a DeepSpeed checkpoint "
                "converts to ours with convert_deepspeed_checkpoint, as initial weights)"
            )
        if occupied and path.resolve().parent != run_dir.resolve():
            raise ConfigError(
                f"run directory '{run_dir}' already holds files; starting it from another run's "
                f"checkpoint '{resume}' would mix two runs. Choose a new name or run_dir"
            )
        return path
    latest = ckpt.latest_checkpoint(run_dir) if resume == "auto" else None
    if latest is None and occupied and resume == "auto":
        check_own_start(run_dir, cfg)  # an earlier start of this run: it starts over
        return None
    if latest is None and occupied:
        raise ConfigError(
            f"run directory '{run_dir}' already holds files (checkpoint.resume = '{resume}'); it is left "
            "untouched. Choose another name or run_dir, or remove the directory yourself"
        )
    if latest is not None and ckpt.is_deepspeed(latest) != (cfg.parallel.engine == "deepspeed"):
        raise ConfigError(
            f"the latest checkpoint '{latest}' was written by the "
            f"{'deepspeed' if ckpt.is_deepspeed(latest) else 'fsdp'} engine and parallel.engine = "
            f"'{cfg.parallel.engine}'; resume with the engine that wrote it"
        )
    return latest


def check_checkpoint_matches(path: Path, cfg: Config) -> None:
    """A checkpoint only fits the model it was made with (and the sequence length its data position
    counts in): refuse any other by name. Model keys that change how the computation runs but not
    the parameters (``ArchSpec.resumable_model_keys``) are free to change."""
    saved = ckpt.read_config(path)
    now = to_dict(cfg)
    resumable = get_spec(cfg.model.arch).resumable_model_keys
    differing = [
        f"model.{k} = {v!r} (checkpoint: {saved['model'].get(k)!r})"
        for k, v in now["model"].items()
        if k not in resumable and saved["model"].get(k) != v
    ]
    if saved["data"]["seq_len"] != cfg.data.seq_len:
        differing.append(f"data.seq_len = {cfg.data.seq_len} (checkpoint: {saved['data']['seq_len']})")
    if differing:
        raise ConfigError(
            f"the recipe differs from checkpoint '{path}' in: {'; '.join(differing)}. "
            "Resume with the checkpoint's settings, or start a new run (another name or run_dir)"
        )


# ----------------------------------------------------------------------------------------------
# Evaluation and samples


@torch.no_grad()
def evaluate(engine: Engine, val_loader) -> float:
    """Mean token loss over the validation set. Each data-parallel rank evaluates its share of every
    validation batch (as in training); the loss sums and token counts are summed over the ranks."""
    model = engine.model
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in val_loader:
        with loss_context(engine.mesh, engine.parallel_cfg):
            with engine.autocast():
                loss_sum, num_tokens = token_loss(model, batch)
            total += to_full(loss_sum).item()
        count += int(num_tokens)
    model.train(was_training)
    # the mean over ranks of (sum, count) has the global sums' ratio
    total, count = dp_mean(torch.tensor([total, count], dtype=torch.float64, device=batch["labels"].device),
                           engine.mesh)  # fmt: skip
    return (total / count.clamp(min=1)).item()


@torch.no_grad()
def sample_text(model, tokenizer, cfg: Config, device: torch.device, autocast) -> list[str]:
    model.eval()
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    top_k = cfg.train.sample_top_k
    texts = []
    for prompt in cfg.train.sample_prompts:
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        prompt_ids = torch.tensor([ids], dtype=torch.long, device=device)
        with autocast():
            out = generate(
                model, prompt_ids, cfg.train.sample_tokens, temperature=cfg.train.sample_temperature,
                top_k=None if top_k is None else min(top_k, cfg.model.vocab_size), generator=generator,
            )
        texts.append(tokenizer.decode(out[0].tolist()))
    return texts


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # all devices


# ----------------------------------------------------------------------------------------------
# The run


def train(cfg: Config) -> dict:
    """Train as ``cfg`` says; return a summary (final step, last validation loss, paths, samples, and
    ``stopped``: the stop signal that ended the run early, or None)."""
    # --- checks: every bad input ends here, before anything is written ---
    device = resolve_device(cfg.train.device)
    env = init_distributed(cfg.parallel.timeout_s, device.type)  # no-op for one process
    device = env.device
    if env.world_size > 1:
        setup_rank_logging(env.rank)  # library logs (torch, DeepSpeed): warnings only off rank 0
    mesh = build_mesh(cfg.parallel, env.world_size, device.type, cfg.model)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    check_data_paths(cfg)
    tokenizer = load_tokenizer(cfg.data)
    check_tokenizer_fits(tokenizer, cfg)
    resume_from = find_resume_checkpoint(cfg)
    if resume_from is not None:
        check_checkpoint_matches(resume_from, cfg)
    saved_state = ckpt.read_train_state(resume_from) if resume_from is not None else {}
    state = TrainState(**saved_state.get("progress", {}))
    complete = state.step >= cfg.train.steps  # a finished run, started again: nothing to do

    samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * dp_size
    loader_args = dict(micro_batch_size=cfg.train.micro_batch_size, vocab_size=cfg.model.vocab_size,
                       dp_rank=dp_rank, dp_size=dp_size, device=str(device), tokenizer=tokenizer)  # fmt: skip
    train_loader = build_train_loader(cfg.data, consumed_samples=state.consumed_samples, **loader_args)
    try:
        # eval_batches 0 (validation off) builds an empty loader without reading any data
        val_loader = build_val_loader(cfg.data, num_batches=0 if complete else cfg.train.eval_batches, **loader_args)
    except BaseException:
        close_loader(train_loader)
        raise
    try:
        return _run(cfg, env, mesh, device, dp_size, tokenizer, resume_from, saved_state, state,
                    samples_per_step, train_loader, val_loader)
    finally:
        # the prefetch threads end before the interpreter does (see ShardLoader.close)
        close_loader(train_loader)
        close_loader(val_loader)


def close_loader(loader) -> None:
    close = getattr(loader, "close", None)
    if close is not None:
        close()


def _run(cfg: Config, env, mesh, device: torch.device, dp_size: int, tokenizer, resume_from: Path | None,
         saved_state: dict, state: TrainState, samples_per_step: int, train_loader, val_loader) -> dict:
    """``train`` once its inputs are checked and its loaders built."""
    # --- build ---
    seed_everything(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    model.train()
    num_params = count_params(model)  # before sharding
    engine = build_engine(model, cfg, mesh, device)
    scheduler = build_scheduler(engine.optimizer, cfg.optim, cfg.train.steps)
    spike_guard = SpikeGuard(cfg.train.spike_guard) if cfg.train.spike_guard.enabled else None
    flops_token = flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops(device)

    run_dir = cfg.run_path
    if env.world_size > 1:
        torch.distributed.barrier()  # every rank has looked at the run directory before rank 0 writes
    config_dict = to_dict(cfg)
    starting_over = resume_from is None and run_dir.exists() and any(run_dir.iterdir())
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # the steps after the checkpoint are trained (and logged) again; a run starting over keeps none
        drop_records_after(run_dir / "metrics.jsonl", state.step if resume_from is not None else -1)
    checkpointer = ckpt.Checkpointer(run_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    if resume_from is not None:
        engine.load(resume_from)
        scheduler.load_state_dict(saved_state["scheduler"])
        ckpt.restore_rng_state(saved_state["rng"])
        if spike_guard is not None and "spike_guard" in saved_state:
            spike_guard.load_state_dict(saved_state["spike_guard"])
    elif env.is_main and not starting_over:  # starting over: config.yaml is there and equal
        (run_dir / ckpt.CONFIG_FILE).write_text(yaml.safe_dump(config_dict, sort_keys=False))
    # rank 0 logs (console, JSONL, wandb) for the whole run
    logger = MetricsLogger(
        run_dir, total_steps=cfg.train.steps, wandb_mode=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project, wandb_entity=cfg.logging.wandb_entity,
        wandb_group=cfg.logging.wandb_group, run_name=cfg.name, config=config_dict,
        wandb_id=saved_state.get("wandb_id"),
    ) if env.is_main else _SilentLogger()
    say = print if env.is_main else (lambda *args, **kwargs: None)
    saved_step = state.step if resume_from is not None else None

    def save(wait: bool = True) -> Path:
        """A checkpoint of this step (once); ``wait``: written and committed before it returns (a
        periodic asynchronous save goes on behind the next steps)."""
        nonlocal saved_step
        if saved_step != state.step:
            train_state = {
                "progress": asdict(state),
                "scheduler": scheduler.state_dict(),
                "rng": ckpt.capture_rng_state(),
                "wandb_id": logger.wandb_id,
            }
            if spike_guard is not None:
                train_state["spike_guard"] = spike_guard.state_dict()
            engine.save(checkpointer, state.step, train_state, config_dict)
            saved_step = state.step
        if wait:
            checkpointer.wait()
        return run_dir / ckpt.checkpoint_name(state.step)

    def run_evals(final: bool) -> float | None:
        """The validation loss (None when validation is off) and the eval section's metrics, logged."""
        record = {}
        val_loss = None
        if len(val_loader) > 0:
            val_loss = evaluate(engine, val_loader)
            record.update(val_loss=val_loss, val_ppl=perplexity(val_loss))
        record.update(run_training_evals(engine.model, cfg, state.step, tokenizer=tokenizer, device=device,
                                         final=final))
        if record:
            logger.log_val({"step": state.step, **record})
        return val_loss

    def stop_at_nonfinite(result: StepResult, rng_before_step: dict) -> None:
        """Save the state before this step when the update was not applied, and end the run."""
        what = f"non-finite loss {result.loss} or gradient norm {result.grad_norm} at step {state.step + 1}"
        advice = "Lower optim.lr or raise optim.warmup_steps and resume"
        if result.applied:  # the engine finds out only after its update: these weights are not saved
            raise NonFiniteError(
                f"{what}; the {cfg.parallel.engine} engine has applied this update, so its weights are "
                f"not saved. The last good state is the latest checkpoint in {run_dir}. {advice}"
            )
        ckpt.restore_rng_state(rng_before_step)  # the state as it was before this step
        path = save()
        skip = ", or set train.on_nonfinite=skip to skip such steps" if engine.can_skip else ""
        raise NonFiniteError(
            f"{what}; the optimizer step was not taken. The last good state is saved in {path}. {advice}{skip}"
        )

    def stop_after_skips(reason: str) -> None:
        """``max_skipped_steps`` updates in a row were skipped: save (the weights are those before the
        first of them) and end the run."""
        path = save()
        n = state.consecutive_skipped
        first = state.step - n + 1
        raise SkippedStepsError(
            f"{n} updates in a row were skipped, steps {first}-{state.step} (train.max_skipped_steps = "
            f"{cfg.train.max_skipped_steps}); the last: {reason}. The state is saved in {path}; its weights "
            f"are those after step {first - 1}, as the skipped updates were never applied. Lower optim.lr or "
            "raise optim.warmup_steps and resume"
            + (", or loosen train.spike_guard" if spike_guard is not None else "")
        )

    say(
        f"{cfg.name}: {cfg.model.arch}, {num_params / 1e6:.2f}M parameters, {device.type}, "
        f"{samples_per_step} x {cfg.data.seq_len} tokens per step on {env.world_size} process(es), "
        f"run directory {run_dir}",
        flush=True,
    )
    final = resume_from
    samples, val_loss, stopped = [], None, None
    try:
        if resume_from is not None:
            say(f"resumed from {resume_from} at step {state.step}", flush=True)
            if state.step >= cfg.train.steps:
                say(f"the run is complete at step {state.step} (train.steps = {cfg.train.steps}), its last "
                    f"checkpoint {resume_from}; raise train.steps to train further", flush=True)
                logger.close()
                destroy_distributed()
                return _summary(state, val_loss, run_dir, final, samples, stopped)
            logger.log_event("resume", step=state.step, checkpoint=str(resume_from))
        else:
            if starting_over:
                say(f"{run_dir} holds no complete checkpoint, only what an earlier start of this run wrote: "
                    "starting over", flush=True)
            logger.log_event("start", step=0, params=num_params)

        with StopSignals() as stop:
            if state.step == 0 and cfg.train.eval_interval > 0:
                val_loss = run_evals(final=False)  # the untrained baseline

            # --- the loop ---
            train_iter = iter(train_loader)
            window_tokens, window_time = 0, 0.0
            while state.step < cfg.train.steps:
                step_start = time.perf_counter()
                rng_before_step = ckpt.capture_rng_state() if cfg.train.on_nonfinite == "stop" else None
                micro_batches = [next(train_iter) for _ in range(cfg.train.grad_accum_steps)]
                lr = scheduler.get_last_lr()[0]  # the rate this update uses
                result = engine.step(micro_batches, accept=spike_guard)
                skip_reason = None
                if not result.finite:
                    if cfg.train.on_nonfinite == "stop":
                        stop_at_nonfinite(result, rng_before_step)
                    skip_reason = f"non-finite loss {result.loss} or gradient norm {result.grad_norm}"
                elif not result.applied:  # the spike guard rejected it
                    skip_reason = f"loss spike: {spike_guard.rejected}"
                    state.spike_steps += 1
                if skip_reason is None:
                    state.consecutive_skipped = 0
                else:
                    state.skipped_steps += 1
                    state.consecutive_skipped += 1
                    say(f"step {state.step + 1}: {skip_reason}; update skipped ({state.skipped_steps} so far)",
                        flush=True)
                scheduler.step()
                state.step += 1
                state.consumed_samples += samples_per_step
                step_tokens = sum(mb["input_ids"].numel() for mb in micro_batches) * dp_size
                state.tokens_seen += step_tokens
                window_tokens += step_tokens
                window_time += time.perf_counter() - step_start

                last_step = state.step == cfg.train.steps
                limit = cfg.train.max_skipped_steps
                too_many_skipped = limit > 0 and state.consecutive_skipped >= limit
                if state.step % cfg.logging.interval == 0 or last_step or too_many_skipped:
                    tokens_per_s = window_tokens / max(window_time, 1e-9)
                    record = {
                        "step": state.step,
                        "loss": result.loss,
                        "ppl": perplexity(result.loss),
                        "lr": lr,
                        "grad_norm": result.grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "mfu": flops_token * tokens_per_s / (peak * env.world_size) if peak else None,
                        "memory_gib": memory_gib(device),
                        "tokens_seen": state.tokens_seen,
                        "skipped_steps": state.skipped_steps,
                    }
                    if spike_guard is not None:
                        record["spike_steps"] = state.spike_steps
                    logger.log_train(record)
                    window_tokens, window_time = 0, 0.0
                if too_many_skipped:
                    stop_after_skips(skip_reason)
                interval = cfg.train.eval_interval
                if (interval > 0 and state.step % interval == 0) or last_step:
                    val_loss = run_evals(final=last_step)
                interval = cfg.checkpoint.interval
                if (interval > 0 and state.step % interval == 0) or last_step:
                    final = save(wait=False)
                if not last_step and stop.stop_agreed():
                    stopped = _received_signals(stop, env.world_size)
                    final = save()
                    say(f"stop requested ({stopped}): stopped after step {state.step} of {cfg.train.steps} with "
                        f"checkpoint {final}; the same command resumes from it", flush=True)
                    logger.log_event("stop", step=state.step, signal=stopped, checkpoint=str(final))
                    break
            final = save()
            if stopped is None:
                say(f"checkpoint: {final}", flush=True)
                if stop.stop_agreed():  # during the last step: no samples, just exit
                    stopped = _received_signals(stop, env.world_size)
                else:
                    samples = _samples(engine, tokenizer, cfg, device, mesh, state, logger, say)
    finally:
        logger.close()
    destroy_distributed()
    return _summary(state, val_loss, run_dir, final, samples, stopped)


def _samples(engine: Engine, tokenizer, cfg: Config, device: torch.device, mesh, state: TrainState, logger,
             say) -> list[str]:
    """The end-of-run samples, printed and logged; none when the logits are not finite (a note says so).

    Every rank generates (FSDP's gathers need them all); under tensor parallelism the logits are
    vocabulary-sharded DTensors that the sampler does not take, so there is no sample.
    """
    tp_sharded = mesh is not None and mesh["tp"].size() > 1
    if tokenizer is None or cfg.train.sample_tokens == 0 or not cfg.train.sample_prompts or tp_sharded:
        return []
    try:
        samples = sample_text(engine.model, tokenizer, cfg, device, engine.autocast)
    except NonFiniteLogitsError as e:
        say(f"samples: none; {e}", flush=True)
        logger.log_event("samples", step=state.step, prompts=cfg.train.sample_prompts, texts=[], error=str(e))
        return []
    for n, text in enumerate(samples):
        say(f"--- sample {n + 1} ---\n{text}", flush=True)
    logger.log_event("samples", step=state.step, prompts=cfg.train.sample_prompts, texts=samples)
    return samples


def _received_signals(stop: StopSignals, world_size: int) -> str:
    """The signals any rank received, e.g. ``SIGTERM`` (a signal may have reached one rank only)."""
    if world_size == 1:
        return stop.describe()
    described = [None] * world_size
    torch.distributed.all_gather_object(described, stop.describe())
    names = [name for d in described for name in d.split(", ") if name != "none"]
    return ", ".join(dict.fromkeys(names)) or "none"


def _summary(state: TrainState, val_loss: float | None, run_dir: Path, final: Path | None, samples: list[str],
             stopped: str | None) -> dict:
    return {
        "step": state.step,
        "val_loss": val_loss,
        "val_ppl": perplexity(val_loss) if val_loss is not None else None,
        "skipped_steps": state.skipped_steps,
        "spike_steps": state.spike_steps,
        "run_dir": str(run_dir),
        "checkpoint": str(final) if final else None,
        "samples": samples,
        "stopped": stopped,
    }
