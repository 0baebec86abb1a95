"""What an architecture's export adapter is, and the adapter for a transformers causal-LM class.

``xlstm-train export-hf`` (``export.hf``) reads a checkpoint, exports the tokenizer, and hands the
model's state dict to the adapter of the checkpoint's architecture (``ArchSpec.export``), which
writes the weights and the configuration its target implementation loads and says how to load
them. Adapters of the built-in architectures live with their specs (``xlstm_train.archs``).
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from xlstm_train.export.hf import ExportedTokenizer
    from xlstm_train.train.config import Config


SLSTM_BACKENDS = ("vanilla", "cuda")  # the official xlstm package's sLSTM weight layouts


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "float32"  # of the written weights: "float32" or "bfloat16"
    max_shard_size: int | str = "5GB"  # largest safetensors file before the weights are split
    slstm_backend: str = "vanilla"  # the official sLSTM weight layout (architectures with sLSTM blocks)


@dataclass(frozen=True)
class ExportedModel:
    target: str  # what the directory loads as, e.g. "transformers `LlamaForCausalLM`"
    usage: str  # the README's "Loading" section (markdown)


class ExportAdapter(ABC):
    def check(self, model_cfg: Any) -> None:
        """Raise ValueError naming a setting the target cannot represent (before weights are read)."""

    @abstractmethod
    def write(self, directory: Path, cfg: Config, state: dict[str, torch.Tensor], tokenizer: ExportedTokenizer,
              name: str, options: ExportOptions) -> ExportedModel:  # fmt: skip
        """Write the model (weights and configuration) of run ``cfg`` with weights ``state`` (our
        names, a tied head under both names) into ``directory``; ``name`` is the final directory's."""


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, dtype: str, max_shard_size) -> None:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` above ``max_shard_size``."""
    import torch
    from huggingface_hub import save_torch_state_dict

    state = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in state.items()}
    save_torch_state_dict(state, directory, max_shard_size=max_shard_size)


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    """All weights of a Hugging Face directory: ``model.safetensors``, or the shards its
    ``model.safetensors.index.json`` lists."""
    from safetensors.torch import load_file

    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (directory / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{directory}: neither model.safetensors nor model.safetensors.index.json")
    state = {}
    for name in files:
        state.update(load_file(directory / name))
    return state


HF_LOAD_SNIPPET = """from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{name}")
"""
HF_TOKENIZER_SNIPPET = """from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{name}")
tokenizer = AutoTokenizer.from_pretrained("{name}")
prompt = tokenizer({prompt}, return_tensors="pt", add_special_tokens=False).input_ids
print(tokenizer.decode(model.generate(prompt, max_new_tokens=40, do_sample=True, top_k=50)[0]))
"""


@dataclass(frozen=True)
class TransformersExport(ExportAdapter):
    """A transformers causal-LM directory: ``config.json``, ``generation_config.json`` and the
    weights, which ``AutoModelForCausalLM.from_pretrained`` loads with the stock library.

    ``state_dict(state, model_cfg)`` renames (and reorders) our weights into the class's, the head
    under ``lm_head.weight`` also when it is tied. ``config(model_cfg, **token_ids)`` is the
    transformers config; it raises ValueError for settings the class cannot represent, which is
    also the adapter's ``check``.

    A tied head is written once, under the embedding's name, only when the class ties it on loading
    (it lists ``lm_head.weight`` in ``_tied_weights_keys``). A class that keeps its head a separate
    parameter whatever the config says (transformers' xLSTM) would load it as missing, i.e. random:
    for those the head is written out in full, a copy of the embedding."""

    class_name: str
    state_dict: Callable[[dict, Any], dict]
    config: Callable[..., Any]

    def check(self, model_cfg: Any) -> None:
        self.config(model_cfg)

    def ties_head(self) -> bool:
        """Whether the transformers class shares ``lm_head.weight`` with the embedding on loading
        when its config says ``tie_word_embeddings``."""
        import transformers

        tied = getattr(getattr(transformers, self.class_name), "_tied_weights_keys", None) or ()
        return "lm_head.weight" in tied  # a dict (target -> source) or, in older releases, a list

    def write(self, directory, cfg, state, tokenizer, name, options) -> ExportedModel:
        from transformers import GenerationConfig

        weights = self.state_dict(state, cfg.model)
        if cfg.model.tie_embeddings:
            if self.ties_head():
                weights.pop("lm_head.weight", None)
            else:
                # a copy: safetensors writers keep one of several names that share storage
                weights["lm_head.weight"] = weights["lm_head.weight"].clone()
        write_safetensors(weights, directory, options.dtype, options.max_shard_size)
        hf_cfg = self.config(cfg.model, **tokenizer.token_ids)
        hf_cfg.dtype = options.dtype
        hf_cfg.save_pretrained(directory)
        GenerationConfig(**{k: v for k, v in tokenizer.token_ids.items() if v is not None}).save_pretrained(directory)
        snippet = HF_TOKENIZER_SNIPPET if tokenizer.auto_tokenizer else HF_LOAD_SNIPPET
        prompt = json.dumps((cfg.train.sample_prompts or ["The"])[0], ensure_ascii=False)  # a Python literal too
        return ExportedModel(f"transformers `{self.class_name}`", f"```python\n{snippet.format(name=name, prompt=prompt)}```")


def resolve_tied_head(tied: bool, state: dict[str, torch.Tensor], embedding: str, head: str, source) -> bool:
    """Whether the model that transformers runs for a checkpoint ties its head, filling a tied head
    missing from ``state`` (our names ``embedding`` and ``head``) in place.

    transformers uses a stored head that differs from the embedding as it is, even under
    ``tie_word_embeddings`` (Llama says so in a warning, xLSTM never ties): such a checkpoint is
    imported untied, with both matrices; tying would overwrite one with the other. A tied config
    whose head is missing or equal to the embedding is imported tied. An untied config without a
    head is refused: transformers would start from a random one."""
    if embedding not in state:
        raise ValueError(f"{source}: the checkpoint's weights have no input embedding")
    if head not in state:
        if not tied:
            raise ValueError(f"{source}: tie_word_embeddings is false but the checkpoint's weights have no "
                             "lm_head.weight: the output head is missing")
        state[head] = state[embedding]
        return True
    import torch

    return tied and torch.equal(state[head], state[embedding])

