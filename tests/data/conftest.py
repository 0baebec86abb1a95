import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import zstandard

from xlstm_train.data.prepare import add_arguments, prepare
from xlstm_train.data.sources import SLIMPAJAMA_SUBSETS

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TOKENIZER = REPO / "data" / "tokenizer" / "austen_sp4096.model"
WORDS = ("the of and to a in that was her it his she he had as with for not but be you at on my all by "
         "this which have so very could would been were there him they one Elinor Marianne Emma Harriet "
         "said Mrs Mr Miss sister letter morning house walk little great time").split()


def random_documents(n: int, seed: int, min_words: int = 3, max_words: int = 60) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        words = rng.choice(WORDS, int(rng.integers(min_words, max_words + 1)))
        text = " ".join(words)
        docs.append(text[0].upper() + text[1:] + ".\n\nThe end of it, " + str(rng.integers(0, 1000)) + ".")
    return docs


def write_jsonl(path: Path, rows: list[dict], compress: bool = False) -> Path:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data) if compress else data)
    return path


def make_slimpajama(root: Path, seed: int = 0, files_per_chunk: int = 2, docs_per_file: int = 40,
                    splits=("train", "validation")) -> dict[str, list[str]]:
    """A local directory in SlimPajama's published layout; returns every split's documents by subset, in order."""
    rng = np.random.default_rng(seed)
    by_subset: dict[str, list[str]] = {}
    for split in splits:
        for chunk in (1, 2):
            for i in range(files_per_chunk):
                docs = random_documents(docs_per_file, seed=int(rng.integers(1 << 30)))
                subsets = rng.choice(SLIMPAJAMA_SUBSETS, docs_per_file)
                rows = [{"text": d, "meta": {"redpajama_set_name": str(s)}} for d, s in zip(docs, subsets)]
                write_jsonl(root / split / f"chunk{chunk}" / f"example_{split}_{i}.jsonl.zst", rows, compress=True)
                if split == "train":
                    for d, s in zip(docs, subsets):
                        by_subset.setdefault(str(s), []).append(d)
    return by_subset


def prepare_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def run_prepare(*argv) -> dict:
    return prepare(prepare_args(*argv, "--no-progress"))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def sample_tokenizer() -> Path:
    return SAMPLE_TOKENIZER
