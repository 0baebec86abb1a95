"""Data: sources, tokenization, token shards, the resumable mixing loader and synthetic tasks."""


class DataError(ValueError):
    """Bad data or a bad data setting: the message names the file (and line) and what is wrong."""


from xlstm_train.data.loader import build_train_loader, build_val_loader  # noqa: E402
from xlstm_train.data.tokenizer import load_tokenizer  # noqa: E402

__all__ = ["DataError", "build_train_loader", "build_val_loader", "load_tokenizer"]
