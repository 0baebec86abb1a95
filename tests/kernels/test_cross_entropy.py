"""The fused linear + soft-capped cross-entropy against the plain PyTorch expression (full logits,
fp32/fp64 softmax), values and gradients, on fresh random inputs."""

import pytest
import torch
import torch.nn.functional as F
from xlstm_kernels.cross_entropy import linear_cross_entropy


def plain_loss_sum(hidden, weight, labels, soft_cap=None, ignore_index=-100):
    logits = (hidden @ weight.t()).to(torch.promote_types(hidden.dtype, torch.float32))
    if soft_cap is not None:
        logits = soft_cap * torch.tanh(logits / soft_cap)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction="sum")


def _inputs(shape, vocab, dim, dtype, logit_scale=1.0, ignored=0.25, seed=None):
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    hidden = torch.randn(*shape, dim, generator=gen, dtype=dtype) * logit_scale
    weight = torch.randn(vocab, dim, generator=gen, dtype=dtype) / dim**0.5
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignored] = -100
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def _value_and_grads(fn, hidden, weight, labels, **kw):
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, labels, **kw)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("soft_cap", [None, 30.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chunked_equals_plain(dtype, soft_cap):
    """Blocks of 7 rows over 3 x 13 tokens (the last block short), a quarter of the labels ignored."""
    hidden, weight, labels = _inputs((3, 13), vocab=37, dim=16, dtype=dtype, logit_scale=3.0)
    got = _value_and_grads(linear_cross_entropy, hidden, weight, labels, soft_cap=soft_cap, impl="chunked", chunk_rows=7)
    want = _value_and_grads(plain_loss_sum, hidden, weight, labels, soft_cap=soft_cap)
    assert got[0].dtype == want[0].dtype == torch.promote_types(dtype, torch.float32)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_fp32_chunked_against_fp64_plain_on_hard_inputs():
    """Logits far beyond the cap (tanh saturates, softmax of near-equal maxima) and far without a
    cap (a softmax that overflows without its max shift): fp32 stays close to the fp64 truth."""
    for soft_cap, scale in ((30.0, 200.0), (None, 60.0)):
        hidden, weight, labels = _inputs((4, 9), vocab=50, dim=32, dtype=torch.float64, logit_scale=scale)
        want = _value_and_grads(plain_loss_sum, hidden, weight, labels, soft_cap=soft_cap)
        got = _value_and_grads(
            linear_cross_entropy, hidden.float(), weight.float(), labels, soft_cap=soft_cap, impl="chunked", chunk_rows=8
        )
        assert torch.isfinite(want[0]) and want[0] > 10  # the hard case is hard
        for g, w in zip(got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())


def test_all_ignored_gives_zero_and_zero_grads():
    hidden, weight, labels = _inputs((2, 5), vocab=11, dim=8, dtype=torch.float32, ignored=1.0)
    loss, dh, dw = _value_and_grads(linear_cross_entropy, hidden, weight, labels, soft_cap=5.0, chunk_rows=3)
    assert loss.item() == 0.0
    assert dh.abs().max() == 0 and dw.abs().max() == 0


def test_no_grad_and_frozen_weight():
    hidden, weight, labels = _inputs((2, 6), vocab=11, dim=8, dtype=torch.float64)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels, soft_cap=4.0, chunk_rows=5)
    torch.testing.assert_close(loss, plain_loss_sum(hidden, weight, labels, soft_cap=4.0).detach())
    h = hidden.detach().clone().requires_grad_()
    linear_cross_entropy(h, weight.detach(), labels, chunk_rows=5).backward()
    h_ref = hidden.detach().clone().requires_grad_()
    plain_loss_sum(h_ref, weight.detach(), labels).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(impl="fast"), "impl must be one of"),
        (dict(soft_cap=0.0), "soft_cap must be None or positive"),
        (dict(chunk_rows=0), "chunk_rows must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    hidden, weight, labels = _inputs((2, 3), vocab=5, dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(hidden, weight, labels, **kwargs)


def test_bad_shapes_are_named():
    hidden, weight, labels = _inputs((2, 3), vocab=5, dim=4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight must be \(V, E\)"):
        linear_cross_entropy(hidden, weight.t(), labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(hidden, weight, labels[:, :2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("soft_cap", [None, 30.0])
def test_liger_equals_plain_on_gpu(soft_cap):
    pytest.importorskip("liger_kernel")
    torch.manual_seed(0)
    hidden, weight, labels = _inputs((2, 300), vocab=5000, dim=256, dtype=torch.float32, logit_scale=4.0)
    hidden, weight, labels = hidden.detach().cuda(), weight.detach().cuda(), labels.cuda()
    got = _value_and_grads(linear_cross_entropy, hidden, weight, labels, soft_cap=soft_cap, impl="liger")
    want = _value_and_grads(plain_loss_sum, hidden.double(), weight.double(), labels, soft_cap=soft_cap)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4 * w.abs().max().item())
    with torch.autocast("cuda", dtype=torch.bfloat16):  # bf16 matmuls: bf16 noise, not more
        got = _value_and_grads(linear_cross_entropy, hidden, weight, labels, soft_cap=soft_cap, impl="liger")
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=2e-2, atol=2e-2 * w.abs().max().item())
