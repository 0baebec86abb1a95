"""Per-block torch.compile under tensor parallelism (gloo, CPU inductor): one graph serves every
block (no recompilation per block) and training matches the eager single process."""

from __future__ import annotations

from tests.parallel.cases import compare_with_single_process
from tests.parallel.harness import run_distributed


def _compiled_tp2() -> None:
    import torch._dynamo

    torch._dynamo.reset()
    # the blocks share code and differ only in their parameters: a recompile means a guard on
    # something per block (a hook id, a module attribute) and, past dynamo's limit, eager blocks
    torch._dynamo.config.error_on_recompile = True
    try:
        compare_with_single_process("xlstm_large", steps=2, tp=2, compile=True)
        torch._dynamo.reset()
        compare_with_single_process("xlstm_large", steps=2, tp=2, compile=True, activation_checkpointing="full")
    finally:
        torch._dynamo.config.error_on_recompile = False


def test_compiled_blocks_under_tensor_parallel():
    run_distributed(_compiled_tp2, 2)
