"""The fused Triton sLSTM kernels against the fp64 reference.

On CPU they run under TRITON_INTERPRET=1 (set by conftest) at small shapes, where a group is one
program. The GPU tests cover the multi-program groups (head dims 64..512, 1..8 heads) and long
sequences.
"""

import pytest
import torch
from xlstm_kernels import slstm
from xlstm_kernels.documents import document_resets
from xlstm_kernels.slstm.triton_kernel import slstm_triton

from tests.kernels.test_slstm_reference import random_cell, random_state

F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def compare_with_reference(
    batch,
    seq_len,
    num_heads,
    head_dim,
    *,
    dtype,
    seed,
    tol,
    state_tol=None,
    with_state=True,
    doc_ids=None,
    columns=None,
):
    """Outputs, final states and all gradients of the kernels vs autograd through the fp64 reference.

    tol bounds the relative error of y and the gradients, state_tol (default tol) that of the
    final states, which stay fp32 inside the kernels whatever the input dtype.
    """
    x_gates, R, b = random_cell(batch, seq_len, num_heads, head_dim, seed=seed)
    state0 = random_state(batch, num_heads, head_dim, seed=seed + 1) if with_state else None
    gen = torch.Generator().manual_seed(seed + 2)
    out_grads = [torch.randn(batch, seq_len, num_heads, head_dim, generator=gen, dtype=F64)]
    out_grads += [torch.randn(batch, num_heads, head_dim, generator=gen, dtype=F64) for _ in range(4)]

    def run(impl, device, cast):
        inputs = [cast(t).to(device).requires_grad_() for t in (x_gates, R, b)]
        state = None
        if with_state:
            state = tuple(s.float().to(device).requires_grad_() for s in state0)
            if cast(x_gates).dtype == F64:
                state = tuple(s.detach().double().requires_grad_() for s in state)
        docs = None if doc_ids is None else doc_ids.to(device)
        if columns is not None and impl == "triton":
            starts = None if docs is None else document_resets(docs, batch, seq_len, inputs[0].device)
            zeros = torch.zeros(batch, num_heads, head_dim, device=device)
            y, final = slstm_triton(*inputs, state or (zeros,) * 4, starts, columns=columns)
        else:
            y, final = slstm(*inputs, state0=state, doc_ids=docs, return_state=True, impl=impl)
        loss = sum((o.double() * g.to(device)).sum() for o, g in zip((y, *final), out_grads))
        loss.backward()
        grads = [t.grad for t in inputs] + ([s.grad for s in state] if with_state else [])
        return [y, *final], grads

    # The reference sees the kernel's rounded inputs, so only the kernel's arithmetic differs.
    rounded = lambda t: t.to(dtype).to(F64)
    outs_ref, grads_ref = run("reference", DEVICE, rounded)
    outs, grads = run("triton", DEVICE, lambda t: t.to(dtype))
    names = ["y", "y_T", "c_T", "n_T", "m_T", "d x_gates", "d R", "d b", "d y0", "d c0", "d n0", "d m0"]
    errors = {name: relative_error(a, e) for name, a, e in zip(names, outs + grads, outs_ref + grads_ref)}
    state_names = ("y_T", "c_T", "n_T", "m_T")
    limits = {name: (state_tol or tol) if name in state_names else tol for name in names}
    bad = {name: err for name, err in errors.items() if not err <= limits[name]}
    assert not bad, f"relative errors over {limits}: {bad}"
    return errors


@pytest.mark.parametrize(
    "batch, seq_len, num_heads, head_dim, seed",
    [(3, 17, 2, 16, 0), (1, 40, 1, 32, 1), (2, 9, 3, 24, 2)],
)
def test_matches_reference_fp32(batch, seq_len, num_heads, head_dim, seed):
    compare_with_reference(batch, seq_len, num_heads, head_dim, dtype=torch.float32, seed=seed, tol=2e-5)


def test_zero_initial_state_and_document_resets_fp32():
    doc_ids = torch.tensor([[0] * 6 + [1] * 10 + [2] * 4, [3] * 20, [0] + [1] * 19])
    compare_with_reference(3, 20, 2, 16, dtype=torch.float32, seed=3, tol=2e-5, with_state=False, doc_ids=doc_ids)
    compare_with_reference(3, 20, 2, 16, dtype=torch.float32, seed=4, tol=2e-5, doc_ids=doc_ids)


def test_bf16_inputs_within_bf16_tolerance():
    # y and the gradients are rounded to bf16 once at the end; the states never are.
    compare_with_reference(2, 24, 2, 32, dtype=torch.bfloat16, seed=5, tol=1e-2, state_tol=1e-5)


def test_no_grad_forward_saves_nothing_and_matches(monkeypatch):
    from xlstm_kernels.slstm import triton_kernel

    launches = []
    real_forward = triton_kernel.slstm_forward

    def recording_forward(*args, save_states, **kwargs):
        launches.append(save_states)
        return real_forward(*args, save_states=save_states, **kwargs)

    monkeypatch.setattr(triton_kernel, "slstm_forward", recording_forward)
    x_gates, R, b = random_cell(2, 15, 2, 16, seed=6, dtype=torch.float32)
    state0 = random_state(2, 2, 16, seed=7, dtype=torch.float32)
    # Weights that require grad, as in a model evaluated under torch.no_grad().
    x_gates, R, b = x_gates.to(DEVICE), R.to(DEVICE).requires_grad_(), b.to(DEVICE).requires_grad_()
    state0 = tuple(s.to(DEVICE) for s in state0)
    with torch.no_grad():
        y, final = slstm(x_gates, R, b, state0=state0, return_state=True, impl="triton")
        y_ref, final_ref = slstm(x_gates, R, b, state0=state0, return_state=True, impl="reference")
    slstm(x_gates, R, b, impl="triton")
    assert launches == [False, True]
    assert relative_error(y, y_ref) < 2e-6
    for a, e in zip(final, final_ref):
        assert relative_error(a, e) < 2e-6


def test_packed_documents_equal_separate_sequences():
    x_gates, R, b = random_cell(1, 30, 2, 16, seed=8, dtype=torch.float32)
    x_gates, R, b = x_gates.to(DEVICE), R.to(DEVICE), b.to(DEVICE)
    doc_ids = torch.tensor([[7] * 12 + [8] * 18], device=DEVICE)
    y = slstm(x_gates, R, b, doc_ids=doc_ids, impl="triton")
    first = slstm(x_gates[:, :12], R, b, impl="triton")
    second = slstm(x_gates[:, 12:], R, b, impl="triton")
    torch.testing.assert_close(y, torch.cat([first, second], dim=1), rtol=1e-6, atol=1e-6)


def test_triton_rejects_fp64():
    x_gates, R, b = random_cell(1, 3, 1, 16, seed=9)
    with pytest.raises(ValueError, match="impl='triton' takes x_gates in"):
        slstm(x_gates.to(DEVICE), R.to(DEVICE), b.to(DEVICE), impl="triton")


# --- GPU: multi-program groups, the paper's shapes, long sequences ---------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "batch, num_heads, head_dim, columns",
    [(8, 4, 256, None), (8, 4, 256, 16), (4, 4, 192, None), (3, 1, 512, None), (5, 8, 64, None), (16, 2, 128, 32)],
)
def test_gpu_groups_match_reference_bf16(batch, num_heads, head_dim, columns):
    errors = compare_with_reference(
        batch, 64, num_heads, head_dim, dtype=torch.bfloat16, seed=10, tol=1e-2, state_tol=1e-5, columns=columns
    )
    print({name: f"{err:.1e}" for name, err in errors.items()})


@pytest.mark.gpu
def test_gpu_document_resets_with_forced_column_split_bf16():
    doc_ids = torch.tensor([[0] * 30 + [1] * 34] * 8)
    compare_with_reference(
        8, 64, 4, 256, dtype=torch.bfloat16, seed=13, tol=1e-2, state_tol=1e-5, doc_ids=doc_ids, columns=64
    )


@pytest.mark.gpu
def test_gpu_fp32_multi_program_groups_are_exact():
    doc_ids = torch.tensor([[0] * 20 + [1] * 27] * 3)
    compare_with_reference(3, 47, 2, 256, dtype=torch.float32, seed=11, tol=1e-5, doc_ids=doc_ids)


@pytest.mark.gpu
def test_gpu_long_sequence_does_not_drift_bf16():
    # S = 4096 at the paper's head dim: errors must stay at bf16 level, not grow with t.
    errors = compare_with_reference(
        2, 4096, 4, 256, dtype=torch.bfloat16, seed=12, tol=1e-2, state_tol=1e-5, with_state=False
    )
    print({name: f"{err:.1e}" for name, err in errors.items()})


@pytest.mark.gpu
@pytest.mark.parametrize("batch, num_heads, head_dim, columns", [(8, 4, 256, None), (8, 4, 256, 64), (4, 2, 512, None)])
def test_gpu_repeated_calls_are_bitwise_identical(batch, num_heads, head_dim, columns):
    """The programs of a group exchange their hidden states through global memory at every step: a
    race there would first show as run-to-run differences, well inside the reference tolerance."""
    x_gates, R, b = (t.to(DEVICE, torch.bfloat16) for t in random_cell(batch, 512, num_heads, head_dim, seed=15))
    dy = torch.randn(batch, 512, num_heads, head_dim, device=DEVICE)
    zeros = torch.zeros(batch, num_heads, head_dim, device=DEVICE)

    def call():
        inputs = [t.detach().requires_grad_() for t in (x_gates, R, b)]
        y, _ = slstm_triton(*inputs, (zeros,) * 4, None, columns=columns)
        (y.float() * dy).sum().backward()
        return [y] + [t.grad for t in inputs]

    first = call()
    for repeat in range(1, 4):
        again = call()
        for name, a, e in zip(("y", "d x_gates", "d R", "d b"), again, first):
            assert torch.equal(a, e), f"{name} differs in call {repeat} at {(a != e).sum().item()} entries"
