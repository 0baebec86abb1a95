"""Data: sources, tokenization, token shards, the resumable mixing loader and synthetic tasks."""


class DataError(ValueError):
    """Bad data or a bad data setting: the message names the file (and line) and what is wrong."""


def relative_path_note(path) -> str:
    """For a message about a missing path: where a relative path was looked for."""
    import os

    if os.path.isabs(path):
        return ""
    return f" (relative paths are read from the working directory, here {os.getcwd()})"


# The label of a position the loss skips (a token that starts a new document, a synthetic task's
# non-answer tokens): PyTorch's default ``ignore_index`` for cross-entropy.
IGNORE_INDEX = -100


_LAZY = {"build_train_loader": "loader", "build_val_loader": "loader", "load_tokenizer": "tokenizer"}


def __getattr__(name: str):
    # Imported on first use, so that tokenizer worker processes of prepare-data never import torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"xlstm_train.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'xlstm_train.data' has no attribute {name!r}")


__all__ = ["IGNORE_INDEX", "DataError", "build_train_loader", "build_val_loader", "load_tokenizer"]
