"""The fused loss (``token_loss``) on a mesh: a tensor-parallel head falls back to the logits and the
vocabulary-parallel loss, an FSDP2-sharded head takes the fused loss with its gathered weight; both
give the single process's loss and gradients (fp32, gloo, 2 CPU processes)."""

from __future__ import annotations

import copy


from tests.parallel.cases import batch, full, make_model, param_names
from tests.parallel.harness import assert_close, run_distributed
from xlstm_train.parallel import ParallelConfig, build_mesh, dp_rank_and_size, loss_context, parallelize_model
from xlstm_train.train.engine import token_loss

LAYOUTS = (dict(tp=2), dict(tp=2, loss_parallel=False), dict(zero_stage=3))


def _compare_layouts() -> None:
    import torch.distributed as dist

    for arch in ("xlstm_large", "llama", "xlstm_blocks"):
        for layout in LAYOUTS:
            pcfg = ParallelConfig(**layout)
            model_cfg, model = make_model(arch)
            if arch == "xlstm_large":
                model_cfg.output_logit_soft_cap = 1.0  # a cap that shapes the loss
            reference = copy.deepcopy(model)
            mesh = build_mesh(pcfg, dist.get_world_size(), "cpu", model_cfg)
            parallelize_model(model, mesh, pcfg, model_cfg)
            inputs, labels, doc_ids = batch(0)
            labels = labels.clone()  # a view of the inputs' tokens
            labels[0, :3] = -100
            ref_loss, ref_count = token_loss(reference, {"input_ids": inputs, "labels": labels, "doc_ids": doc_ids})
            ref_loss.backward()
            dp_rank, dp_size = dp_rank_and_size(mesh)
            rows = slice(dp_rank * len(inputs) // dp_size, (dp_rank + 1) * len(inputs) // dp_size)
            with loss_context(mesh, pcfg):
                loss, count = token_loss(model, {"input_ids": inputs[rows], "labels": labels[rows], "doc_ids": doc_ids[rows]})
                # FSDP averages gradients over the data-parallel ranks: scale the sum to match
                (loss * dp_size).backward()
            where = f"{arch} {layout}"
            loss = full(loss).detach().clone()
            count = count.clone()
            if dp_size > 1:
                dist.all_reduce(loss)
                dist.all_reduce(count)
            assert count.item() == ref_count.item()
            assert_close(loss, ref_loss, what=f"{where} loss")
            for name, p, ref in zip(param_names(model), model.parameters(), reference.parameters()):
                assert_close(full(p.grad), ref.grad, what=f"{where} grad of {name}")


def test_fused_loss_under_tensor_parallel_and_fsdp():
    run_distributed(_compare_layouts, 2)
