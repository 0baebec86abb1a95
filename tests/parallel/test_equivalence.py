"""TP, FSDP2 and TP x FSDP2 on gloo match a single process over 3 steps (fp32, rel. err <= 1e-5)."""

from __future__ import annotations

import pytest

from tests.parallel.cases import (
    check_bf16_compute_fp32_reduce,
    compare_with_single_process,
)
from tests.parallel.harness import run_distributed

ARCHS = ("xlstm_large", "llama", "xlstm_blocks")


def _two_ranks() -> None:
    # one process group for both layouts: starting processes is most of these tests' time
    for arch in ARCHS:
        compare_with_single_process(arch, tp=2)
    compare_with_single_process("xlstm_large", tp=2, sequence_parallel=True, loss_parallel=False)
    compare_with_single_process("xlstm_blocks", tp=2, sequence_parallel=True)
    compare_with_single_process("xlstm_blocks", tp=2, activation_checkpointing="selective")
    for arch in ARCHS:
        compare_with_single_process(arch, zero_stage=3)
    compare_with_single_process("xlstm_large", zero_stage=2, activation_checkpointing="full")
    check_bf16_compute_fp32_reduce()


def _tp2_dp2() -> None:
    for arch in ARCHS:
        compare_with_single_process(arch, tp=2)
    compare_with_single_process("xlstm_large", tp=2, dp_replicate=2, sequence_parallel=True)
    compare_with_single_process("xlstm_blocks", dp_replicate=2, zero_stage=2)  # HSDP: 2 replicas x 2 shards


def test_tensor_parallel_2_and_fsdp_dp2():
    run_distributed(_two_ranks, 2)


@pytest.mark.slow
def test_tp2_x_fsdp_dp2():
    run_distributed(_tp2_dp2, 4)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_single_process(mode):
    for arch in ("xlstm_large", "xlstm_blocks"):
        compare_with_single_process(arch, steps=2, activation_checkpointing=mode)
