"""The Triton cells as torch.library custom ops: registration checked by ``torch.library.opcheck``
(schema, fake shapes, autograd), and ``torch.compile(fullgraph=True)`` of a function that calls
them traces without a graph break and gives the eager call's outputs and gradients.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest) at small shapes; the compile tests use
the ``aot_eager`` backend, which traces forward and backward as inductor would, without generating
code."""

import pytest
import torch

import xlstm_kernels.mlstm.triton_chunkwise  # noqa: F401  (registers the ops)
import xlstm_kernels.slstm.triton_kernel  # noqa: F401
from xlstm_kernels import mlstm, slstm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _mlstm_inputs(input_gate, with_state, B=1, NH=2, S=40, DQK=16, DV=16):
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(B, NH, S, DQK, generator=g) for _ in range(2))
    v = torch.randn(B, NH, S, DV, generator=g)
    i = 2.0 * torch.randn(B, NH, S, generator=g)
    f = 3.0 + 2.0 * torch.randn(B, NH, S, generator=g)
    inputs = dict(q=q, k=k, v=v, i=i, f=f)
    if with_state:
        inputs |= dict(c0=torch.randn(B, NH, DQK, DV, generator=g), n0=torch.randn(B, NH, DQK, generator=g))
        if input_gate == "exp":
            inputs["m0"] = torch.randn(B, NH, 1, generator=g)
    return {name: t.to(DEVICE).requires_grad_() for name, t in inputs.items()}


@pytest.mark.parametrize("input_gate, with_state", [("exp", True), ("sigmoid", False)])
def test_mlstm_op_registration(input_gate, with_state):
    x = _mlstm_inputs(input_gate, with_state)
    reset = torch.zeros(1, 40, dtype=torch.int8, device=DEVICE)
    reset[0, 25] = 1
    args = (x["q"], x["k"], x["v"], x["i"], x["f"], x.get("c0"), x.get("n0"), x.get("m0"), reset, input_gate, 16, 1e-6)
    torch.library.opcheck(
        torch.ops.xlstm_kernels.mlstm_chunkwise_fwd.default, args,
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip


def _grads(fn, inputs, **kwargs):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}
    out = fn(**leaves, **kwargs)
    torch.manual_seed(1)
    flat = [out] if isinstance(out, torch.Tensor) else [out[0], *[s for s in out[1] if s is not None]]
    loss = sum((t.float() * torch.randn_like(t.float())).sum() for t in flat)
    return [t.detach() for t in flat] + list(torch.autograd.grad(loss, list(leaves.values())))


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_compiled_mlstm_has_no_graph_break(input_gate):
    inputs = _mlstm_inputs(input_gate, with_state=True)
    doc_ids = torch.zeros(1, 40, dtype=torch.long, device=DEVICE)
    doc_ids[0, 17:] = 1

    def cell(**kw):
        # the ops sit between ordinary tensor code, as in a block
        h, state = mlstm(**kw, doc_ids=doc_ids, chunk_size=16, impl="triton", return_state=True)
        return torch.nn.functional.silu(h) * 2.0, state

    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    want = _grads(cell, inputs)
    got = _grads(compiled, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def _slstm_inputs(B=2, S=12, NH=2, DH=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, NH, 4, DH, generator=g)
    R = 0.2 * torch.randn(NH, DH, 4, DH, generator=g)
    b = torch.randn(NH, 4, DH, generator=g)
    state0 = [0.5 * torch.randn(B, NH, DH, generator=g) for _ in range(4)]
    return x, R, b, state0


def test_slstm_op_registration():
    x, R, b, (y0, c0, n0, m0) = _slstm_inputs()
    starts = torch.zeros(2, 12, dtype=torch.int8)
    starts[1, 5] = 1
    args = [t.to(DEVICE).requires_grad_() for t in (x, R, b, y0, c0, n0, m0)]
    torch.library.opcheck(
        torch.ops.xlstm_kernels.slstm_fwd.default, (*args, starts.to(DEVICE), None, True),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )  # fmt: skip


def test_compiled_slstm_has_no_graph_break():
    x, R, b, state0 = _slstm_inputs()
    doc_ids = torch.tensor([[0] * 12, [0] * 5 + [1] * 7], device=DEVICE)
    inputs = dict(x_gates=x, R=R, b=b, y0=state0[0], c0=state0[1], n0=state0[2], m0=state0[3])
    inputs = {n: t.to(DEVICE) for n, t in inputs.items()}

    def cell(x_gates, R, b, y0, c0, n0, m0):
        return slstm(torch.tanh(x_gates), R, b, state0=(y0, c0, n0, m0), doc_ids=doc_ids, return_state=True, impl="triton")

    torch._dynamo.reset()
    compiled = torch.compile(cell, fullgraph=True, backend="aot_eager")
    want = _grads(cell, inputs)
    got = _grads(compiled, inputs)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
