"""Python started in the repository root (``python -m pytest``, a notebook, ``python -c``) puts the root
first on ``sys.path``. Nothing there may be importable as ``kernels``: transformers imports Hugging
Face's ``kernels`` distribution by that name, and our ``kernels/`` folder must not shadow it."""

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_in_repo_root(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_kernels_resolves_outside_the_repository():
    out = run_in_repo_root("""
        import kernels, xlstm_kernels
        print(xlstm_kernels.__file__)
        print(getattr(kernels, "__file__", None))
        print(*kernels.__path__, sep="\\n")
    """).splitlines()
    ours, kernels_file, kernels_path = out[0], out[1], out[2:]
    assert Path(ours).resolve().is_relative_to(REPO / "kernels" / "xlstm_kernels")
    assert kernels_file != "None", "kernels is a namespace package: the installed distribution is missing"
    # compared as paths: a virtual environment may sit beside the checkout with a longer name
    for where in (kernels_file, *kernels_path):
        assert not Path(where).resolve().is_relative_to(REPO), (kernels_file, kernels_path)


def test_transformers_xlstm_round_trip_from_the_repository_root(tmp_path):
    """Train two steps, export, load with ``xLSTMForCausalLM.from_pretrained`` and compare logits, all in
    a process started in the repository root where transformers imports the ``kernels`` distribution."""
    out = run_in_repo_root(f"""
        from pathlib import Path
        import torch, yaml
        from transformers import xLSTMForCausalLM
        from xlstm_train.export.hf import export_hf
        from xlstm_train.train.checkpoint import load_model_state, read_checkpoint_config
        from xlstm_train.models import build_model
        from xlstm_train.train.config import load_config
        from xlstm_train.train.trainer import train

        root = Path({str(tmp_path)!r})
        recipe = {{
            "name": "layout",
            "model": {{"arch": "xlstm_large", "vocab_size": 4096, "embedding_dim": 128, "num_blocks": 1,
                      "num_heads": 2, "chunk_size": 16}},
            "data": {{"source": "shards", "datasets": [{{"path": "data/sample"}}],
                     "tokenizer": "data/tokenizer/austen_sp4096.model", "seq_len": 16}},
            "optim": {{"lr": 1e-2, "warmup_steps": 1}},
            "train": {{"steps": 2, "micro_batch_size": 2, "eval_interval": 0, "eval_batches": 1,
                      "sample_tokens": 0}},
            "logging": {{"interval": 1, "wandb": "disabled"}},
            "checkpoint": {{"interval": 0}},
        }}
        (root / "r.yaml").write_text(yaml.safe_dump(recipe))
        ckpt = Path(train(load_config(root / "r.yaml", [f"run_dir={{root / 'run'}}"]))["checkpoint"])
        export_hf(ckpt, root / "hf")
        cfg = read_checkpoint_config(ckpt)
        ours = build_model(cfg.model)
        ours.load_state_dict(load_model_state(ckpt, cfg.model))
        theirs = xLSTMForCausalLM.from_pretrained(root / "hf").float().eval()
        tokens = torch.randint(0, 4096, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            a = ours.eval()(tokens).float()
            b = theirs(tokens).logits.float()
        print((a - b).abs().max().item() / a.abs().max().item())
    """)
    assert float(out.strip().splitlines()[-1]) < 1e-4


def test_no_top_level_folder_shadows_an_installed_package():
    """The guard for the next dependency that ships a top-level name we also use as a folder: only the
    folders meant to be packages hold an ``__init__.py``, and no installed distribution (other than
    ours) provides a top-level module of the same name."""
    from importlib.metadata import packages_distributions

    importable = {p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert importable <= {"xlstm_train", "tests"}, f"importable folders in the repository root: {importable}"
    provided = packages_distributions()
    clashes = {name: provided[name] for name in importable if set(provided.get(name, [])) - {"xlstm-train"}}
    assert not clashes, f"installed distributions also provide these top-level names: {clashes}"
