"""The sLSTM reference: exact math in fp64, the official vanilla backend, gradients, state and resets."""

import pytest
import torch
import torch.nn.functional as F
from xlstm_kernels import slstm
from xlstm_kernels.slstm import slstm_step
from xlstm_kernels.slstm.reference import slstm_pointwise

F64 = torch.float64


def random_cell(batch, seq_len, num_heads, head_dim, *, seed, dtype=F64, gate_scale=1.0):
    """Fresh random inputs with the official init's character: forget bias spread from +5 to -7."""
    gen = torch.Generator().manual_seed(seed)
    x_gates = gate_scale * torch.randn(batch, seq_len, num_heads, 4, head_dim, generator=gen, dtype=dtype)
    R = torch.randn(num_heads, head_dim, 4, head_dim, generator=gen, dtype=dtype) / head_dim**0.5
    b = 0.5 * torch.randn(num_heads, 4, head_dim, generator=gen, dtype=dtype)
    b[:, 1] += torch.linspace(5.0, -7.0, head_dim, dtype=dtype)
    return x_gates, R, b


def random_state(batch, num_heads, head_dim, *, seed, dtype=F64):
    """A reachable state: n > 0, |c| < n, any m."""
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, num_heads, head_dim)
    n = 0.1 + torch.rand(shape, generator=gen, dtype=dtype)
    c = n * (2 * torch.rand(shape, generator=gen, dtype=dtype) - 1)
    m = 3 * torch.randn(shape, generator=gen, dtype=dtype)
    y = torch.rand(shape, generator=gen, dtype=dtype) * c / n
    return (y, c, n, m)


def unstabilized_slstm(x_gates, R, b):
    """The textbook recurrence without the max stabilizer: exp input gate, sigmoid forget gate."""
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    y = x_gates.new_zeros(batch, num_heads, head_dim)
    c = torch.zeros_like(y)
    n = torch.zeros_like(y)
    outputs = []
    for t in range(seq_len):
        raw = x_gates[:, t] + torch.einsum("bhk,hkgj->bhgj", y, R) + b
        i_raw, f_raw, z_raw, o_raw = raw.unbind(dim=-2)
        c = torch.sigmoid(f_raw) * c + torch.exp(i_raw) * torch.tanh(z_raw)
        n = torch.sigmoid(f_raw) * n + torch.exp(i_raw)
        y = torch.sigmoid(o_raw) * c / n
        outputs.append(y)
    return torch.stack(outputs, dim=1)


def test_matches_unstabilized_recurrence_fp64():
    x_gates, R, b = random_cell(2, 24, 2, 8, seed=0)
    y = slstm(x_gates, R, b, impl="reference")
    torch.testing.assert_close(y, unstabilized_slstm(x_gates, R, b), rtol=1e-11, atol=1e-12)


def test_stabilizer_survives_huge_input_gates():
    # exp(300) overflows nothing in the stabilized form; the unstabilized one would be inf/inf.
    x_gates, R, b = random_cell(2, 16, 2, 8, seed=1)
    x_gates[:, :, :, 0] += 300.0
    y, (_, c, n, m) = slstm(x_gates, R, b, return_state=True, impl="reference")
    assert torch.isfinite(y).all() and torch.isfinite(c).all() and torch.isfinite(n).all()
    assert (m > 250).all()
    shifted = x_gates.clone()
    shifted[:, :, :, 0] -= 300.0
    # The output is invariant to a constant shift of i~ at all steps (it scales c and n alike).
    torch.testing.assert_close(y, slstm(shifted, R, b, impl="reference"), rtol=1e-9, atol=1e-10)


def test_fresh_state_test_is_per_element():
    raw = torch.randn(3, 4, 5, dtype=F64)
    c = torch.randn(3, 5, dtype=F64)
    n = torch.rand(3, 5, dtype=F64) + 0.5
    m = torch.randn(3, 5, dtype=F64)
    n[0, 1] = 0.0
    c[0, 1] = 0.0
    _, _, _, m_new = slstm_pointwise(raw, (c, n, m))
    assert m_new[0, 1] == raw[0, 0, 1]
    expected = torch.maximum(raw[:, 0], m + F.logsigmoid(raw[:, 1]))
    mask = torch.ones_like(n, dtype=torch.bool)
    mask[0, 1] = False
    torch.testing.assert_close(m_new[mask], expected[mask], rtol=0, atol=0)


def _vanilla_cell(R, b):
    from xlstm.blocks.slstm.cell import sLSTMCell_vanilla, sLSTMCellConfig

    num_heads, head_dim = R.shape[0], R.shape[1]
    config = sLSTMCellConfig(hidden_size=num_heads * head_dim, num_heads=num_heads, backend="vanilla")
    cell = sLSTMCell_vanilla(config).double()
    with torch.no_grad():
        # vanilla stores R as (NH, 4*DH_out, DH_in) and the bias gate-major (4, NH, DH).
        cell._recurrent_kernel_.copy_(R.permute(0, 2, 3, 1).reshape(num_heads, 4 * head_dim, head_dim))
        cell._bias_.copy_(b.permute(1, 0, 2).reshape(-1))
    return cell


def test_matches_official_vanilla_backend():
    pytest.importorskip("xlstm")
    batch, seq_len, num_heads, head_dim = 3, 20, 2, 16
    x_gates, R, b = random_cell(batch, seq_len, num_heads, head_dim, seed=2)
    state0 = random_state(batch, num_heads, head_dim, seed=3)
    cell = _vanilla_cell(R, b)
    # vanilla input: (B, S, 4*H) gate-major (4, NH, DH); output (B, NH, S, DH); state (4, B, H).
    x_vanilla = x_gates.permute(0, 1, 3, 2, 4).reshape(batch, seq_len, 4 * num_heads * head_dim)
    state_vanilla = torch.stack([s.reshape(batch, -1) for s in state0])
    y_vanilla, final_vanilla = cell(x_vanilla, state_vanilla)

    y, final = slstm(x_gates, R, b, state0=state0, return_state=True, impl="reference")
    torch.testing.assert_close(y, y_vanilla.transpose(1, 2), rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(final, final_vanilla):
        torch.testing.assert_close(ours, theirs.reshape(batch, num_heads, head_dim), rtol=1e-12, atol=1e-12)

    # And from the zero state, where the official code takes the "fresh state" branch at t = 0.
    y_vanilla, _ = cell(x_vanilla)
    torch.testing.assert_close(
        slstm(x_gates, R, b, impl="reference"), y_vanilla.transpose(1, 2), rtol=1e-12, atol=1e-12
    )


def test_gradcheck_all_inputs():
    x_gates, R, b = random_cell(2, 5, 2, 3, seed=4)
    state0 = random_state(2, 2, 3, seed=5)
    inputs = [t.clone().requires_grad_() for t in (x_gates, R, b, *state0)]

    def run(x_gates, R, b, y0, c0, n0, m0):
        y, state = slstm(x_gates, R, b, state0=(y0, c0, n0, m0), return_state=True, impl="reference")
        return (y, *state)

    # fast_mode checks the Jacobian along random directions: a full gradcheck of the 7 inputs costs
    # half a minute of CI.
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_gradcheck_with_document_resets():
    x_gates, R, b = random_cell(2, 6, 1, 3, seed=6)
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    inputs = [t.clone().requires_grad_() for t in (x_gates, R, b)]
    assert torch.autograd.gradcheck(
        lambda x, r, bias: slstm(x, r, bias, doc_ids=doc_ids, impl="reference"),
        inputs,
        eps=1e-6,
        atol=1e-7,
        fast_mode=True,
    )


def test_state_passing_two_halves_equal_whole():
    x_gates, R, b = random_cell(2, 30, 2, 8, seed=7)
    state0 = random_state(2, 2, 8, seed=8)
    y, final = slstm(x_gates, R, b, state0=state0, return_state=True, impl="reference")
    y1, mid = slstm(x_gates[:, :13], R, b, state0=state0, return_state=True, impl="reference")
    y2, final2 = slstm(x_gates[:, 13:], R, b, state0=mid, return_state=True, impl="reference")
    torch.testing.assert_close(torch.cat([y1, y2], dim=1), y, rtol=0, atol=0)
    for a, c in zip(final2, final):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_document_resets_equal_separate_sequences():
    x_gates, R, b = random_cell(2, 25, 2, 8, seed=9)
    state0 = random_state(2, 2, 8, seed=10)
    lengths = [[7, 11, 7], [25]]
    doc_ids = torch.tensor([[0] * 7 + [3] * 11 + [1] * 7, [4] * 25])
    y, final = slstm(x_gates, R, b, state0=state0, doc_ids=doc_ids, return_state=True, impl="reference")
    for row, row_lengths in enumerate(lengths):
        start = 0
        for k, length in enumerate(row_lengths):
            # Only the first document of a row continues from state0.
            row_state = tuple(s[row : row + 1] for s in state0) if k == 0 else None
            piece = x_gates[row : row + 1, start : start + length]
            y_sep, final_sep = slstm(piece, R, b, state0=row_state, return_state=True, impl="reference")
            torch.testing.assert_close(y[row : row + 1, start : start + length], y_sep, rtol=1e-13, atol=1e-13)
            start += length
        for a, c in zip(final, final_sep):
            torch.testing.assert_close(a[row : row + 1], c, rtol=1e-13, atol=1e-13)


def test_step_equals_full_sequence():
    x_gates, R, b = random_cell(3, 12, 2, 8, seed=11)
    y, final = slstm(x_gates, R, b, return_state=True, impl="reference")
    state = None
    for t in range(x_gates.shape[1]):
        y_t, state = slstm_step(x_gates[:, t], R, b, state)
        torch.testing.assert_close(y_t, y[:, t], rtol=0, atol=0)
    for a, c in zip(state, final):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_bf16_inputs_give_bf16_output_and_fp32_states():
    x_gates, R, b = random_cell(2, 6, 2, 8, seed=12, dtype=torch.bfloat16)
    y, state = slstm(x_gates, R, b, return_state=True, impl="reference")
    assert y.dtype == torch.bfloat16 and y.shape == (2, 6, 2, 8)
    assert all(s.dtype == torch.float32 and s.shape == (2, 2, 8) for s in state)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: {**a, "x_gates": a["x_gates"][:, :, :, :3]}, "x_gates must be"),
        (lambda a: {**a, "R": a["R"][:, :4]}, "R must be"),
        (lambda a: {**a, "b": a["b"][0]}, "b must be"),
        (lambda a: {**a, "impl": "cuda"}, "impl must be one of"),
        (lambda a: {**a, "doc_ids": torch.zeros(2, 5)}, "doc_ids must be an integer"),
        (lambda a: {**a, "doc_ids": torch.zeros(2, 4, dtype=torch.long)}, "doc_ids must be"),
        (lambda a: {**a, "state0": (torch.zeros(2, 2, 8),) * 3}, "state0 must be a tuple"),
        (lambda a: {**a, "state0": (torch.zeros(2, 2, 4),) * 4}, "state0 y must be"),
        (lambda a: {**a, "x_gates": a["x_gates"][:, :0]}, "empty sequence"),
    ],
)
def test_bad_arguments_are_named(change, message):
    x_gates, R, b = random_cell(2, 5, 2, 8, seed=13, dtype=torch.float32)
    args = change({"x_gates": x_gates, "R": R, "b": b})
    with pytest.raises(ValueError, match=message):
        slstm(args.pop("x_gates"), args.pop("R"), args.pop("b"), **args)


def test_step_rejects_sequence_input():
    x_gates, R, b = random_cell(2, 5, 2, 8, seed=14, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"x_gates must be \(B, NH, 4, DH\)"):
        slstm_step(x_gates, R, b, None)
