"""Mesh sizes, the TP head-divisibility rule and parallel-config checks: one clear error each."""

from __future__ import annotations

import pytest

from xlstm_train.config import ConfigError, from_dict
from xlstm_train.models.llama import LlamaConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
from xlstm_train.models.xlstm_large import xLSTMLargeConfig
from xlstm_train.parallel import ParallelConfig, build_mesh, check_tp_divides_heads
from xlstm_train.parallel.distributed import resolve_dims


def test_dp_shard_takes_what_tp_and_replicas_leave():
    assert resolve_dims(ParallelConfig(tp=2, dp_replicate=2), 8) == {"dp_replicate": 2, "dp_shard": 2, "tp": 2}
    assert resolve_dims(ParallelConfig(), 1) == {"dp_replicate": 1, "dp_shard": 1, "tp": 1}


def test_mesh_product_must_equal_world_size():
    with pytest.raises(ConfigError, match=r"2 x 3 x 2 = 12, but the world size is 8"):
        build_mesh(ParallelConfig(tp=2, dp_replicate=2, dp_shard=3), 8, "cpu")
    with pytest.raises(ConfigError, match=r"parallel.tp x parallel.dp_replicate = 3 x 1 does not divide the world size 8"):
        build_mesh(ParallelConfig(tp=3), 8, "cpu")


def test_tp_must_divide_every_split_head_count():
    with pytest.raises(ConfigError, match=r"parallel.tp = 3 does not divide model.num_heads = 8.*one of \[1, 2, 4, 8\]"):
        check_tp_divides_heads(xLSTMLargeConfig(num_heads=8), 3)
    with pytest.raises(ConfigError, match=r"model.num_kv_heads = 2"):
        check_tp_divides_heads(LlamaConfig(num_heads=8, num_kv_heads=2), 4)
    with pytest.raises(ConfigError, match=r"model.slstm_num_heads = 2"):
        check_tp_divides_heads(xLSTMBlocksConfig(num_blocks=2, slstm_at=[1], mlstm_num_heads=4, slstm_num_heads=2), 4)
    # an sLSTM head count does not matter when there is no sLSTM block
    check_tp_divides_heads(xLSTMBlocksConfig(num_blocks=2, mlstm_num_heads=4, slstm_num_heads=2), 4)
    # the blocks of the mLSTM's block-diagonal q/k/v projections must not straddle two ranks either
    blocks = xLSTMBlocksConfig(embedding_dim=32, num_blocks=1, mlstm_num_heads=4, qkv_proj_blocksize=32,
                               mlstm_round_proj_up_to_multiple_of=16)  # fmt: skip
    with pytest.raises(ConfigError, match=r"tp = 4 does not divide the q/k/v projection blocks \(mLSTM inner "
                                          r"dimension 64 / model.qkv_proj_blocksize\) = 2.*one of \[1, 2\]"):
        check_tp_divides_heads(blocks, 4)
    check_tp_divides_heads(blocks, 2)
    # the check runs when the mesh is built, before any process group is touched
    with pytest.raises(ConfigError, match=r"parallel.tp = 2 does not divide model.num_heads = 3"):
        build_mesh(ParallelConfig(tp=2), 2, "cpu", LlamaConfig(embedding_dim=48, num_heads=3))


@pytest.mark.parametrize(
    "section, message",
    [
        ({"tp": 0}, r"parallel.tp = 0: expected an integer >= 1"),
        ({"dp_shard": 0}, r"parallel.dp_shard = 0: expected -1 \(infer\)"),
        ({"zero_stage": 1}, r"parallel.zero_stage = 1: engine 'fsdp' supports 2 or 3"),
        ({"engine": "deepspeed", "zero_stage": 0}, r"engine 'deepspeed' supports 1 or 2 or 3"),
        ({"offload_optimizer": True}, r"offload_optimizer = true needs parallel.engine = 'deepspeed'"),
        ({"engine": "deepspeed", "dp_replicate": 2}, r"dp_replicate = 2: engine 'deepspeed'"),
        (
            {"engine": "deepspeed", "activation_checkpointing": "selective"},
            r"activation_checkpointing = 'selective' with parallel.engine = 'deepspeed': expected none \| full",
        ),
        (
            {"engine": "deepspeed", "tp": 2, "zero_stage": 3},
            (
                r"parallel.zero_stage = 3 with parallel.tp = 2 and parallel.engine = 'deepspeed'.*allowed: "
                r"parallel.zero_stage = 1 or 2 with tp > 1"
            ),
        ),
        ({"activation_checkpointing": "some"}, r"parallel.activation_checkpointing = 'some'"),
        ({"compile": "yes"}, r"parallel.compile = 'yes': expected bool \| 'auto'"),
        ({"engine": "deepspeed", "compile": True}, r"parallel.compile = true and parallel.sequence_parallel are"),
    ],
)
def test_bad_parallel_sections_name_key_and_allowed_values(section, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ParallelConfig, section, prefix="parallel")


def test_compile_auto_compiles_on_cuda_with_the_fsdp_engine_only():
    auto = ParallelConfig()
    assert auto.compile == "auto" and auto.compile_on("cuda") and not auto.compile_on("cpu")
    assert not ParallelConfig(engine="deepspeed").compile_on("cuda")
    assert ParallelConfig(compile=True).compile_on("cpu") and not ParallelConfig(compile=False).compile_on("cuda")
