"""lm-evaluation-harness over our models: the ``xlstm-train`` model class and ``run_harness_tasks``.

``XLSTMTrainLM`` answers the harness's three request types, so any harness task runs:

- ``loglikelihood``: log P(continuation | context) and whether greedy decoding would produce it,
  for batches of requests sorted by length and right-padded (one forward pass per batch);
- ``loglikelihood_rolling``: a whole text's log-likelihood, scored like ``eval --data`` scores a
  document (through the recurrent state, or sliding windows for Llama);
- ``generate_until``: greedy (or sampled, when the task asks) generation through the models' states,
  cut at the task's stop strings.

It is registered under the name ``xlstm-train``; the harness's own command line takes it when run
through this module (importing it registers the class):
``python -m xlstm_train.eval.harness --model xlstm-train --model_args checkpoint=runs/tiny/step-0000350
--device cpu --tasks lambada_openai``.
This module imports ``lm_eval``; nothing in training imports it.
"""

from __future__ import annotations

import difflib
import json
import warnings
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from xlstm_train.config import ConfigError
from xlstm_train.eval.loading import LoadedModel, load_for_inference
from xlstm_train.eval.perplexity import NonFiniteScoreWarning, score_token_sequences, warn_if_not_finite
from xlstm_train.models.generate import NonFiniteLogitsError, generate_stream

DEFAULT_MAX_GEN_TOKENS = 256


@register_model("xlstm-train")
class XLSTMTrainLM(LM):
    def __init__(self, loaded: LoadedModel | None = None, checkpoint: str | None = None, batch_size: int | str = 8,
                 device: str = "auto", window: int | None = None, **unused):
        super().__init__()
        if loaded is None:
            if checkpoint is None:
                raise ConfigError("model xlstm-train: pass checkpoint=PATH in --model_args")
            loaded = load_for_inference(checkpoint, device=device)
        if loaded.tokenizer is None:
            raise ConfigError(f"checkpoint '{loaded.checkpoint}' has no tokenizer (a synthetic task): "
                              "harness tasks need text")
        self.loaded, self.model, self.tokenizer = loaded, loaded.model, loaded.tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.window = window or loaded.cfg.data.seq_len
        self._device = loaded.device

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    # -- log-likelihoods ------------------------------------------------------------------------

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # a space ending the context belongs to the continuation, where tokenizers expect it
        stripped = context.rstrip(" ")
        continuation = context[len(stripped):] + continuation
        if not stripped:
            return [self.eot_token_id], self.tokenizer.encode(continuation)
        whole = self.tokenizer.encode(stripped + continuation)
        context_ids = self.tokenizer.encode(stripped)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self.loglikelihood_tokens(pairs)

    @torch.no_grad()
    def loglikelihood_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(summed log-probability of the continuation, whether it is the greedy continuation) per pair."""
        max_len = self.loaded.max_len
        sequences = []
        for context, continuation in pairs:
            if not continuation:
                raise ValueError("loglikelihood: an empty continuation has no tokens to score")
            inputs = (context + continuation)[:-1]
            if max_len is not None:
                inputs = inputs[-max_len:]  # Llama sees the last max_len tokens
            sequences.append((inputs, continuation))
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
        for first in range(0, len(order), self.batch_size):
            batch = order[first:first + self.batch_size]
            longest = len(sequences[batch[0]][0])
            inputs = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, index in enumerate(batch):
                ids = sequences[index][0]
                inputs[row, :len(ids)] = torch.tensor(ids)
            with self.loaded.autocast():
                logits = self.model(inputs.to(self._device))
            for row, index in enumerate(batch):
                ids, continuation = sequences[index]
                n = len(continuation)
                logprobs = F.log_softmax(logits[row, len(ids) - n:len(ids)].float(), dim=-1)
                target = torch.tensor(continuation, device=logprobs.device)
                score = logprobs.gather(-1, target[:, None]).sum()
                greedy = bool((logprobs.argmax(dim=-1) == target).all())
                results[index] = (float(score), greedy)
        warn_if_not_finite("harness loglikelihood", [score for score, _ in results], "requests")
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        sequences = [self.tokenizer.encode(request.args[0]) for request in requests]
        nll = score_token_sequences(
            self.model, sequences, context_token=self.eot_token_id, max_len=self.loaded.max_len,
            window=self.window, batch_tokens=self.batch_size * self.window, autocast=self.loaded.autocast,
        )
        warn_if_not_finite("harness loglikelihood_rolling", nll, "texts")
        return [-value for value in nll]

    # -- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # requests with the same generation settings decode together
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((index, context))
        outputs = [""] * len(requests)
        for key, members in groups.items():
            kwargs = json.loads(key)
            until = kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKENS))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            for first in range(0, len(members), self.batch_size):
                chunk = members[first:first + self.batch_size]
                texts = self._generate([context for _, context in chunk], max_new, temperature)
                for (index, _), text in zip(chunk, texts):
                    cuts = [text.find(stop) for stop in until if stop and stop in text]
                    outputs[index] = text[:min(cuts)] if cuts else text
        return outputs

    @torch.no_grad()
    def _generate(self, contexts: list[str], max_new_tokens: int, temperature: float) -> list[str]:
        max_len = self.loaded.max_len
        prompts = []
        for context in contexts:
            ids = self.tokenizer.encode(context) or [self.eot_token_id]
            if max_len is not None:
                ids = ids[-max(max_len - max_new_tokens, 1):]
                max_new_tokens = min(max_new_tokens, max_len - len(ids))
            prompts.append(torch.tensor(ids, device=self._device))
        try:
            with self.loaded.autocast():
                steps = list(generate_stream(self.model, prompts, max_new_tokens, temperature=temperature,
                                             stop_ids=[self.eot_token_id]))
        except NonFiniteLogitsError as e:
            # scored as the empty answer (wrong), like every other answer such weights give
            warnings.warn(f"harness generate_until: {e}; answering with empty text", NonFiniteScoreWarning,
                          stacklevel=2)
            return ["" for _ in contexts]
        if not steps:
            return ["" for _ in contexts]
        generated = torch.stack(steps, dim=1).tolist()
        texts = []
        for row in generated:
            if self.eot_token_id in row:
                row = row[:row.index(self.eot_token_id)]
            texts.append(self.tokenizer.decode(row))
        return texts


def check_task_names(task_manager, tasks: list[str]) -> None:
    """A ConfigError naming each unknown task and the closest known names."""
    known = set(task_manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--tasks: unknown lm-evaluation-harness task '{name}'{hint} "
                              "(`lm_eval ls tasks` lists them; --tasks-path adds a folder of task YAMLs)")


def make_task_manager(include_path: str | Path | None = None, include_defaults: bool = True):
    """The harness's task index, with a folder of extra task YAMLs; ``include_defaults=False`` leaves
    out the harness's own tasks, whose indexing takes seconds."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"--tasks-path {include_path}: no such directory")
    return TaskManager(include_path=None if include_path is None else str(include_path),
                       include_defaults=include_defaults)


def run_harness_tasks(loaded: LoadedModel, tasks: list[str], *, include_path: str | Path | None = None,
                      task_manager=None, num_fewshot: int | None = None, limit: int | float | None = None,
                      batch_size: int = 8, seed: int = 1234, include_defaults: bool = True) -> dict:
    """Run harness tasks on ``loaded``; -> ``{task: {metric: value}}`` (stderr entries dropped)."""
    from lm_eval import simple_evaluate

    task_manager = task_manager or make_task_manager(include_path, include_defaults)
    check_task_names(task_manager, tasks)
    output = simple_evaluate(
        model=XLSTMTrainLM(loaded, batch_size=batch_size), tasks=tasks, task_manager=task_manager,
        num_fewshot=num_fewshot, limit=limit, log_samples=False, bootstrap_iters=1000,
        random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
    )
    results = {}
    for task, metrics in output["results"].items():
        results[task] = {name.split(",")[0]: value for name, value in metrics.items()
                         if "," in name and "_stderr" not in name and isinstance(value, (int, float))}
    return results


if __name__ == "__main__":
    # The harness's own command line with this model class registered. lm_eval finds models by name
    # in its registry and discovers no plugins, so a plain `lm_eval --model xlstm-train` does not
    # know it; `python -m xlstm_train.eval.harness --model xlstm-train ...` does.
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
