"""Tiny checkpoints of every architecture with the bundled tokenizer, written as training writes them."""

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml

from tests.models.utils import perturb_, tiny_configs
from xlstm_train.config import to_dict
from xlstm_train.models import build_model
from xlstm_train.train.config import Config

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "data" / "tokenizer" / "austen_sp4096.model"


def write_checkpoint(directory: Path, cfg: Config, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(directory, perturb_(build_model(cfg.model), seed=seed), cfg)


def save_checkpoint(directory: Path, model, cfg: Config) -> Path:
    """``model``'s weights and ``cfg`` as a single-process checkpoint directory."""
    directory.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": model.state_dict()}, checkpoint_id=directory, no_dist=True)
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return directory


def text_config(arch: str) -> Config:
    cfg = Config(name=f"tiny-{arch}")
    cfg.model = tiny_configs()[arch]
    cfg.model.vocab_size = 4096
    cfg.data.tokenizer = str(TOKENIZER)
    cfg.data.seq_len = 32
    return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{arch: checkpoint directory} for the three architectures."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: write_checkpoint(root / arch / "step-0000001", text_config(arch))
            for arch in ("xlstm_blocks", "xlstm_large", "llama")}
