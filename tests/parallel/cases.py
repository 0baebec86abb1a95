"""Tiny models and the parallel-vs-single-process comparison the distributed tests run on each rank.

Every rank also trains an unsharded copy of the same model on the whole global batch; that copy is
the single-process run the parallel one must match (losses, gradients and the updated weights,
step after step, in fp32).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from tests.parallel.harness import assert_close
from xlstm_train.models import build_model
from xlstm_train.models.llama import LlamaConfig
from xlstm_train.models.xlstm_blocks import xLSTMBlocksConfig
from xlstm_train.models.xlstm_large import xLSTMLargeConfig
from xlstm_train.parallel import (
    ParallelConfig,
    build_mesh,
    clip_grad_norm_,
    dp_mean,
    dp_rank_and_size,
    loss_context,
    parallelize_model,
)

VOCAB, SEQ, BATCH = 96, 16, 4


def model_config(arch: str):
    if arch == "xlstm_large":
        return xLSTMLargeConfig(
            vocab_size=VOCAB, embedding_dim=32, num_blocks=2, num_heads=4, chunk_size=8, kernel="reference"
        )
    if arch == "llama":
        return LlamaConfig(vocab_size=VOCAB, embedding_dim=32, num_blocks=2, num_heads=4, num_kv_heads=2,
                           ffn_hidden_dim=64, max_seq_len=SEQ, reset_at_document_boundaries=True)  # fmt: skip
    if arch == "xlstm_blocks":
        return xLSTMBlocksConfig(
            vocab_size=VOCAB, embedding_dim=32, num_blocks=3, slstm_at=[1], mlstm_num_heads=4,
            mlstm_round_proj_up_to_multiple_of=16, slstm_num_heads=4, chunk_size=8,
            ffn_round_up_to_multiple_of=16, kernel="reference",
        )  # fmt: skip
    raise ValueError(arch)


def make_model(arch: str, seed: int = 0):
    """The model with its official init plus noise, so that no weight is zero or shared by heads
    (zero gate weights would hide a wrong head split)."""
    cfg = model_config(arch)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model


def batch(step: int):
    """Global batch of a step: inputs, labels and document ids with a boundary inside each row."""
    g = torch.Generator().manual_seed(1000 + step)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    starts = torch.randint(1, SEQ, (BATCH,), generator=g)
    doc_ids = (torch.arange(SEQ)[None, :] >= starts[:, None]).long()
    return tokens[:, :-1], tokens[:, 1:], doc_ids


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def param_names(model) -> list[str]:
    return [n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters()]


def compare_with_single_process(arch: str, steps: int = 3, **parallel) -> None:
    import torch.distributed as dist

    pcfg = ParallelConfig(**parallel)
    world = dist.get_world_size() if dist.is_initialized() else 1
    model_cfg, model = make_model(arch)
    reference = copy.deepcopy(model)
    mesh = build_mesh(pcfg, world, "cpu", model_cfg)
    parallelize_model(model, mesh, pcfg, model_cfg)
    assert param_names(model) == [n for n, _ in reference.named_parameters()]
    if mesh is not None:  # one kind of parameter, so that foreach/fused optimizers can step them together
        assert all(isinstance(p, DTensor) for p in model.parameters())
    # eps well above fp32 noise: Adam divides by sqrt(v) + eps, and for a gradient that is zero up to
    # summation-order noise (1e-10 here, 1e-12 there) a tiny eps would turn that noise into full steps.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1, foreach=True)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, eps=1e-5, weight_decay=0.1)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    per_rank = BATCH // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    for step in range(steps):
        inputs, labels, doc_ids = batch(step)
        ref_loss = F.cross_entropy(reference(inputs, doc_ids).flatten(0, 1), labels.flatten())
        ref_loss.backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
        with loss_context(mesh, pcfg):
            logits = model(inputs[rows], doc_ids[rows])
            loss = F.cross_entropy(logits.flatten(0, 1), labels[rows].flatten())
            loss.backward()
        # before clipping: the raw gradients of every parameter
        where = f"{arch} {parallel} step {step}"
        assert_close(dp_mean(full(loss), mesh), ref_loss, what=f"{where} loss")
        norm = clip_grad_norm_(model.parameters(), 0.5)
        assert_close(norm, ref_norm, what=f"{where} grad norm")
        for name, p, ref in zip(param_names(model), model.parameters(), reference.parameters()):
            assert_close(full(p.grad), ref.grad, what=f"{where} grad of {name}")
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for name, p, ref in zip(param_names(model), model.parameters(), reference.parameters()):
        assert_close(full(p.detach()), ref.detach(), what=f"{arch} {parallel} weight {name} after {steps} steps")


def check_bf16_compute_fp32_reduce() -> None:
    """FSDP with bf16 parameters for compute: the forward runs in bf16, the sharded master weights
    and the reduced gradients stay fp32, and the loss is the fp32 loss to bf16 accuracy."""
    import torch.distributed as dist

    pcfg = ParallelConfig()
    model_cfg, model = make_model("llama")
    reference = copy.deepcopy(model)
    mesh = build_mesh(pcfg, dist.get_world_size(), "cpu", model_cfg)
    parallelize_model(model, mesh, pcfg, model_cfg, param_dtype=torch.bfloat16)
    dp_rank, dp_size = dp_rank_and_size(mesh)
    rows = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
    inputs, labels, doc_ids = batch(0)
    logits = model(inputs[rows], doc_ids[rows])
    assert logits.dtype == torch.bfloat16
    loss = F.cross_entropy(logits.float().flatten(0, 1), labels[rows].flatten())
    loss.backward()
    ref_loss = F.cross_entropy(reference(inputs, doc_ids).flatten(0, 1), labels.flatten())
    assert_close(dp_mean(loss, mesh), ref_loss, rtol=2e-2, what="bf16 loss")
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32
