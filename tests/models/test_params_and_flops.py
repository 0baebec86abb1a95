"""Parameter counts of the recipes (built on the meta device) against the published ones, and the
FLOP formula against FLOPs counted by PyTorch while running a model."""

from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from tests.models.utils import VOCAB
from xlstm_train.models import LlamaConfig, build_model, count_params, xLSTMBlocksConfig, xLSTMLargeConfig
from xlstm_train.train.config import load_config
from xlstm_train.train.flops import flops_per_token, sequence_mixing_flops

RECIPES = Path(__file__).resolve().parents[2] / "recipes"

# xLSTM paper (arXiv 2405.04517) Tables 1/3 and the xLSTM 7B paper, millions of parameters;
# Llama rows are the paper's Llama baselines.
PUBLISHED_MILLIONS = {
    "paper/125m_1-0": 163.8, "paper/125m_7-1": 163.7,
    "paper/350m_1-0": 409.3, "paper/350m_7-1": 408.4,
    "paper/760m_1-0": 840.4, "paper/760m_7-1": 839.7,
    "paper/1.3b_1-0": 1422.6, "paper/1.3b_7-1": 1420.1,
    "large/7b": 6865.4,
    "llama/125m": 162.2, "llama/350m": 406.6, "llama/1.3b": 1420.4,
}  # fmt: skip


def _meta_params(model_cfg) -> int:
    with torch.device("meta"):
        return count_params(build_model(model_cfg))


@pytest.mark.parametrize("recipe", sorted(PUBLISHED_MILLIONS))
def test_recipe_parameter_count_is_the_published_one(recipe):
    cfg = load_config(RECIPES / f"{recipe}.yaml")
    assert round(_meta_params(cfg.model) / 1e6, 1) == PUBLISHED_MILLIONS[recipe]


@pytest.mark.parametrize("recipe", ["125m", "350m", "1.3b"])
def test_large_recipes_are_comparable_to_the_paper_sizes(recipe):
    large = _meta_params(load_config(RECIPES / "large" / f"{recipe}.yaml").model)
    paper = _meta_params(load_config(RECIPES / "paper" / f"{recipe}_1-0.yaml").model)
    assert abs(large / paper - 1) < 0.01


def test_7b_is_the_published_architecture():
    model_cfg = load_config(RECIPES / "large" / "7b.yaml").model
    with torch.device("meta"):
        model = build_model(model_cfg)
    layer = model.backbone.blocks[0].mlstm_layer
    assert len(model.backbone.blocks) == 32
    assert tuple(layer.q.weight.shape) == (2048, 4096) and tuple(layer.v.weight.shape) == (4096, 4096)
    assert tuple(layer.igate_preact.weight.shape) == (8, 4096)
    assert tuple(model.backbone.blocks[0].ffn.proj_up.weight.shape) == (10944, 4096)
    assert count_params(model) == 6_865_424_896


def _measured_forward_flops(model, seq_len: int) -> float:
    ids = torch.randint(0, VOCAB, (1, seq_len))
    # The math SDPA backend runs attention as matmuls, which the counter sees (fused kernels it may not).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(ids)
    return counter.get_total_flops() / seq_len


def test_llama_flops_match_counted_flops():
    """PyTorch counts the matmuls and attention (full, non-causal score matrix) exactly; our formula
    adds only norm weights on top."""
    cfg = LlamaConfig(vocab_size=VOCAB, embedding_dim=64, num_blocks=2, num_heads=4, max_seq_len=128)
    measured = _measured_forward_flops(build_model(cfg), 128)
    assert flops_per_token(cfg, 128) / 3 == pytest.approx(measured, rel=0.01)


@pytest.mark.parametrize("arch", ["xlstm_large", "xlstm_blocks"])
def test_xlstm_flops_match_counted_flops(arch):
    """With the reference kernels every matmul is visible to the counter. What it does not see is
    elementwise work that the formula counts as parameters (convolutions, norm weights): a few
    percent at these tiny widths."""
    if arch == "xlstm_large":
        cfg = xLSTMLargeConfig(vocab_size=VOCAB, embedding_dim=128, num_blocks=2, num_heads=2, chunk_size=16,
                               kernel="reference")  # fmt: skip
    else:
        cfg = xLSTMBlocksConfig(vocab_size=VOCAB, embedding_dim=64, num_blocks=3, slstm_at=[1], chunk_size=16,
                                kernel="reference")  # fmt: skip
    measured = _measured_forward_flops(build_model(cfg), 64)
    assert flops_per_token(cfg, 64) / 3 == pytest.approx(measured, rel=0.06)


@pytest.mark.parametrize("chunk_size, seq_len, dqk, dv", [(16, 64, 32, 64), (64, 256, 128, 256)])
def test_mlstm_cell_term_matches_the_chunkwise_kernel(chunk_size, seq_len, dqk, dv):
    """The per-head cell term, 4 dqk dv + 2 L (dqk + dv), against the matmuls of the chunkwise
    reference kernel (the Triton kernel follows the same schedule)."""
    from xlstm_kernels import mlstm

    cfg = xLSTMLargeConfig(embedding_dim=2 * dqk, num_heads=1, num_blocks=1, chunk_size=chunk_size)
    assert (cfg.qk_dim, cfg.v_dim) == (dqk, dv)
    q, k = torch.randn(1, 1, seq_len, dqk), torch.randn(1, 1, seq_len, dqk)
    v, i, f = torch.randn(1, 1, seq_len, dv), torch.randn(1, 1, seq_len), torch.randn(1, 1, seq_len)
    with FlopCounterMode(display=False) as counter:
        mlstm(q, k, v, i, f, chunk_size=chunk_size, impl="reference")
    assert sequence_mixing_flops(cfg, seq_len) == pytest.approx(counter.get_total_flops() / seq_len, rel=0.02)


def test_flops_grow_with_context_only_through_attention_and_chunks():
    llama, large = LlamaConfig(), xLSTMLargeConfig()
    assert flops_per_token(llama, 4096) > flops_per_token(llama, 2048)
    assert flops_per_token(large, 8192) == flops_per_token(large, 2048)  # the recurrence is linear in S
    assert flops_per_token(large, 16) < flops_per_token(large, 2048)  # chunks shorter than 64
