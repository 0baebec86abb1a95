"""Our models against the official implementations holding the same (converted) weights, in fp32 on
CPU: the ``xlstm`` package's ``xLSTMLMModel`` (vanilla sLSTM backend) for the paper blocks and
transformers' ``xLSTMForCausalLM`` for xLSTM Large."""

import pytest
import torch
from transformers import xLSTMForCausalLM

pytest.importorskip("xlstm", reason="the official xlstm package (the dev extra) is the oracle here")
from xlstm import (  # noqa: E402
    FeedForwardConfig,
    mLSTMBlockConfig,
    mLSTMLayerConfig,
    sLSTMBlockConfig,
    sLSTMLayerConfig,
    xLSTMLMModel,
    xLSTMLMModelConfig,
)

from tests.models.utils import perturb_
from xlstm_train.archs.xlstm_blocks import from_official_blocks_state_dict, to_official_blocks_state_dict
from xlstm_train.archs.xlstm_large import (
    from_hf_state_dict,
    hf_config,
    load_hf_checkpoint,
    to_hf_state_dict,
)
from xlstm_train.models import build_model, xLSTMBlocksConfig, xLSTMLargeConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksModel


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _official_blocks_model(vocab, dim, num_blocks, slstm_at, context):
    cfg = xLSTMLMModelConfig(
        mlstm_block=mLSTMBlockConfig(mlstm=mLSTMLayerConfig(conv1d_kernel_size=4, qkv_proj_blocksize=4, num_heads=4)),
        slstm_block=sLSTMBlockConfig(
            slstm=sLSTMLayerConfig(backend="vanilla", num_heads=4, conv1d_kernel_size=4),
            feedforward=FeedForwardConfig(proj_factor=1.3, act_fn="gelu"),
        ),
        context_length=context, num_blocks=num_blocks, embedding_dim=dim, slstm_at=slstm_at, vocab_size=vocab,
    )  # fmt: skip
    model = xLSTMLMModel(cfg)
    model.reset_parameters()  # the constructor leaves the embedding at N(0, 1)
    return model


def _ours_blocks_config(vocab, dim, num_blocks, slstm_at):
    return xLSTMBlocksConfig(
        vocab_size=vocab, embedding_dim=dim, num_blocks=num_blocks, slstm_at=slstm_at, chunk_size=16,
        kernel="reference",
    )  # fmt: skip


def test_blocks_match_official_xlstm_lm_model():
    torch.manual_seed(0)
    vocab, dim, seq = 101, 64, 45  # 45: two full chunks of 16 and a partial one
    official = perturb_(_official_blocks_model(vocab, dim, 4, [1, 2], context=seq)).eval()
    ours = xLSTMBlocksModel(_ours_blocks_config(vocab, dim, 4, [1, 2])).eval()
    ours.load_state_dict(from_official_blocks_state_dict(official.state_dict(), backend="vanilla"))
    ids = torch.randint(0, vocab, (2, seq))
    with torch.no_grad():
        expected, got = official(ids), ours(ids)
    assert rel_error(got, expected) <= 1e-4

    # and back: our weights in the official layout reproduce the official state dict exactly
    back = to_official_blocks_state_dict(ours.state_dict(), backend="vanilla")
    official_sd = official.state_dict()
    assert back.keys() == official_sd.keys()
    assert all(torch.equal(back[k], official_sd[k]) for k in back)


def test_blocks_init_matches_official_reset_parameters():
    """Deterministic parameters equal the official ones; random ones have the official spread."""
    vocab, dim, num_blocks, slstm_at = 512, 256, 4, [1, 3]
    torch.manual_seed(0)
    official = from_official_blocks_state_dict(
        _official_blocks_model(vocab, dim, num_blocks, slstm_at, context=8).state_dict()
    )
    ours = build_model(_ours_blocks_config(vocab, dim, num_blocks, slstm_at)).state_dict()
    assert ours.keys() == official.keys()
    for key, theirs in official.items():
        mine = ours[key]
        assert mine.shape == theirs.shape, key
        if key.endswith("igate.bias") and "mlstm_cell" in key:  # N(0, 0.1) over 4 heads: too few to compare
            continue
        if theirs.numel() > 1000 and theirs.std() > 0:
            assert abs(mine.std().item() / theirs.std().item() - 1) < 0.1, key
            assert abs(mine.mean().item() - theirs.mean().item()) < 0.1 * theirs.std().item() + 1e-3, key
        elif key.endswith(("norm.weight", "learnable_skip", "fgate.bias", "_bias_", "_recurrent_kernel_")):
            assert torch.equal(mine, theirs), key


def test_large_matches_transformers_xlstm_for_causal_lm(tmp_path):
    torch.manual_seed(0)
    cfg = xLSTMLargeConfig(vocab_size=101, embedding_dim=128, num_blocks=2, num_heads=2, kernel="reference")
    ours = perturb_(build_model(cfg)).eval()
    hf = xLSTMForCausalLM(hf_config(cfg)).eval()
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 77))  # more than one 64-token chunk, not a multiple
    with torch.no_grad():
        expected = hf(ids, use_cache=False).logits
        got = ours(ids)
    assert rel_error(got, expected) <= 1e-4

    # import path: a saved transformers checkpoint directory (Hub layout) -> config and weights
    hf.save_pretrained(tmp_path)
    loaded_cfg, state_dict = load_hf_checkpoint(tmp_path)
    assert (loaded_cfg.embedding_dim, loaded_cfg.num_blocks, loaded_cfg.num_heads) == (128, 2, 2)
    again = build_model(loaded_cfg)
    again.load_state_dict(state_dict, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), got)


def test_hf_config_rejects_what_transformers_cannot_represent():
    with pytest.raises(ValueError, match="input_gate = 'sigmoid'"):
        hf_config(xLSTMLargeConfig(embedding_dim=128, num_heads=2, input_gate="sigmoid"))
    with pytest.raises(ValueError, match=r"qk_dim_factor = 0.5: embedding_dim \* qk_dim_factor = 96"):
        hf_config(xLSTMLargeConfig(embedding_dim=192, num_heads=2))
    with pytest.raises(ValueError, match="use_bias = True"):
        hf_config(xLSTMLargeConfig(embedding_dim=128, num_heads=2, use_bias=True))
    with pytest.raises(ValueError, match="weight_mode 'fused'"):
        from_hf_state_dict({"backbone.blocks.0.mlstm_layer.qkv_opreact.weight": torch.zeros(1)})


def test_hub_config_with_official_field_names(tmp_path):
    """NX-AI/xLSTM-7b's config.json names the sizes embedding_dim / num_blocks (transformers keeps
    its own hidden_size / num_hidden_layers defaults then); a smaller model must not read as 7B."""
    from transformers import xLSTMConfig

    from xlstm_train.archs.xlstm_large import large_config_from_hf

    (tmp_path / "config.json").write_text(
        '{"model_type": "xlstm", "embedding_dim": 512, "num_blocks": 6, "num_heads": 4, "vocab_size": 1000,'
        ' "igate_bias_init_range": -10.0, "force_bos_token_insert": true}'
    )
    cfg = large_config_from_hf(xLSTMConfig.from_pretrained(tmp_path))
    assert (cfg.embedding_dim, cfg.num_blocks, cfg.num_heads, cfg.vocab_size) == (512, 6, 4, 1000)


def test_tied_embeddings_round_trip_through_a_saved_checkpoint(tmp_path):
    cfg = xLSTMLargeConfig(vocab_size=101, embedding_dim=128, num_blocks=1, num_heads=2, tie_embeddings=True,
                           kernel="reference")  # fmt: skip
    ours = perturb_(build_model(cfg)).eval()
    hf = xLSTMForCausalLM(hf_config(cfg))
    hf.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=True)
    hf.save_pretrained(tmp_path)  # writes the tied matrix once
    loaded_cfg, state_dict = load_hf_checkpoint(tmp_path)
    again = build_model(loaded_cfg).eval()
    again.load_state_dict(state_dict, strict=True)
    assert again.lm_head.weight is again.embedding.weight
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), ours(ids))
