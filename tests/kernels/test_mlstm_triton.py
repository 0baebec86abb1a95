"""The Triton mLSTM kernels against the fp64 reference: outputs, final states and every gradient.

Without CUDA the kernels run under TRITON_INTERPRET=1 (set in conftest) at small shapes in fp32; the
gpu-marked tests run bf16 at the real head dims.
"""

import random

import pytest
import torch

from xlstm_kernels import mlstm, mlstm_step
from xlstm_kernels.mlstm.reference import mlstm_recurrent

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def make_inputs(B, NH, S, DQK, DV, *, input_gate, hard, with_state, dtype):
    """Random inputs; ``hard``: forget pre-activations near -20 and input pre-activations up to +15."""
    q = torch.randn(B, NH, S, DQK)
    k = torch.randn(B, NH, S, DQK)
    v = torch.randn(B, NH, S, DV)
    if hard:
        i = torch.empty(B, NH, S).uniform_(-5.0, 15.0)
        f = torch.where(torch.rand(B, NH, S) < 0.5, -20.0 + torch.randn(B, NH, S), 3.0 * torch.randn(B, NH, S))
    else:
        i = 2.0 * torch.randn(B, NH, S)
        f = 3.0 + 2.0 * torch.randn(B, NH, S)
    inputs = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), i=i, f=f)
    if with_state:
        inputs["c0"] = torch.randn(B, NH, DQK, DV)
        inputs["n0"] = torch.randn(B, NH, DQK)
        if input_gate == "exp":
            inputs["m0"] = 2.0 * torch.randn(B, NH, 1)
    return {name: t.to(DEVICE) for name, t in inputs.items()}


def random_doc_ids(B, S):
    return torch.cumsum((torch.rand(B, S) < 0.1).long(), dim=1).to(DEVICE)


def outputs_and_grads(fn, inputs, weights, **kwargs):
    leaves = {name: t.detach().clone().requires_grad_(True) for name, t in inputs.items()}
    h, (c, n, m) = fn(**leaves, return_state=True, **kwargs)
    loss = (h * weights["h"]).sum() + (c * weights["c"]).sum() + (n * weights["n"]).sum()
    if m is not None:
        loss = loss + (m * weights["m"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"h": h, "c": c, "n": n} | ({"m": m} if m is not None else {})
    return results | {f"d{name}": g for name, g in zip(leaves, grads)}


def compare_with_reference(inputs, input_gate, tol, seed, **kwargs):
    """Relative error (norm of the difference over norm of the reference) of every output/gradient
    against the fp64 reference. Some gradients are ill-conditioned (h is nearly invariant to the scale
    of q, so dq is a small difference of large terms): a key may also pass by being within 10x the
    error of the same reference run in the kernel's dtype."""
    B, NH, S, DQK = inputs["q"].shape
    DV = inputs["v"].shape[-1]
    weights = {
        "h": torch.randn(B, NH, S, DV, device=DEVICE, dtype=torch.float64),
        "c": torch.randn(B, NH, DQK, DV, device=DEVICE, dtype=torch.float64),
        "n": torch.randn(B, NH, DQK, device=DEVICE, dtype=torch.float64),
        "m": torch.randn(B, NH, 1, device=DEVICE, dtype=torch.float64),
    }
    doc_ids = kwargs.get("doc_ids")

    def reference(dtype):
        return outputs_and_grads(
            mlstm_recurrent if S <= 64 else mlstm,  # the chunkwise reference is faster at length
            {name: t.to(dtype) for name, t in inputs.items()},
            {name: w.to(dtype) for name, w in weights.items()},
            input_gate=input_gate,
            doc_ids=doc_ids,
            **({"impl": "reference"} if S > 64 else {}),
        )

    expected = reference(torch.float64)
    actual = outputs_and_grads(
        mlstm, inputs, {name: w.to(torch.float32) for name, w in weights.items()},
        input_gate=input_gate, impl="triton", **kwargs,
    )  # fmt: skip
    assert actual.keys() == expected.keys()
    assert actual["h"].dtype == inputs["q"].dtype and actual["c"].dtype == torch.float32

    # dm0 = <dc0, c0> + <dn0, n0> + (stabiliser terms): h is invariant to the scale of the state
    # except through its normaliser's lower bound, so the inner products nearly cancel and dm0 is a
    # small difference of large terms. An error e in dc0 moves <dc0, c0> by up to |e| |c0|, so dm0's
    # error is measured against |dc0| |c0| + |dn0| |n0| per head: as relative as dc0's and dn0's.
    scales = {key: e.norm() for key, e in expected.items()}
    if "dm0" in expected and "c0" in inputs:
        c_term = expected["dc0"].flatten(-2).norm(dim=-1) * inputs["c0"].double().flatten(-2).norm(dim=-1)
        n_term = expected["dn0"].norm(dim=-1) * inputs["n0"].double().norm(dim=-1)
        scales["dm0"] = (expected["dm0"].flatten().abs() + c_term.flatten() + n_term.flatten()).norm()

    def errors(results):
        return {
            key: ((results[key].double() - e).norm() / scales[key].clamp_min(1e-30)).item() for key, e in expected.items()
        }

    for key, value in actual.items():
        assert torch.isfinite(value).all(), f"{key} has non-finite values (seed {seed})"
    kernel_errors = errors(actual)
    if any(err > tol for err in kernel_errors.values()):
        same_dtype_errors = errors(reference(inputs["q"].dtype))
        bad = {
            key: f"{err:.2e} (reference in {inputs['q'].dtype}: {same_dtype_errors[key]:.2e})"
            for key, err in kernel_errors.items()
            if err > max(tol, 10 * same_dtype_errors[key])
        }
        assert not bad, f"relative errors above {tol}: {bad} (seed {seed}, all: {kernel_errors})"


# The chunk's tile is the chunk itself up to 64 tokens; the cases with a tile of 16 at chunk 32 and
# 64 take the cross-tile log-weights, stabilisers and gate-gradient sums that the default shapes
# (chunk 128, tile 64) take, at CPU sizes.
CPU_CASES = [
    # (input_gate, S, DQK, DV, chunk, tile, hard, with_state, with_docs)
    ("exp", 37, 16, 32, 16, 16, True, True, False),
    ("exp", 69, 32, 16, 32, 32, True, False, True),
    ("exp", 64, 16, 16, 16, 16, False, True, True),
    ("exp", 1, 16, 16, 16, 16, True, True, False),
    ("sigmoid", 37, 16, 32, 16, 16, True, True, True),
    ("sigmoid", 69, 32, 16, 32, 32, False, False, False),
    ("sigmoid", 1, 32, 16, 16, 16, False, True, False),
    ("exp", 37, 16, 32, 32, 16, True, True, False),
    ("exp", 100, 32, 16, 64, 16, True, False, True),
    ("exp", 130, 16, 16, 64, 16, True, True, True),
    ("exp", 64, 16, 16, 64, 16, False, True, True),
    ("sigmoid", 77, 16, 32, 32, 16, True, True, True),
    ("sigmoid", 69, 32, 16, 64, 16, False, False, False),
]


@pytest.mark.parametrize("input_gate,S,DQK,DV,chunk,tile,hard,with_state,with_docs", CPU_CASES)
def test_chunkwise_kernel_matches_reference_fp32(
    monkeypatch, seed, input_gate, S, DQK, DV, chunk, tile, hard, with_state, with_docs
):
    with_launch_variant(monkeypatch, f"tile={tile}")
    inputs = make_inputs(2, 2, S, DQK, DV, input_gate=input_gate, hard=hard, with_state=with_state, dtype=torch.float32)
    doc_ids = random_doc_ids(2, S) if with_docs else None
    compare_with_reference(inputs, input_gate, 1e-4, seed, chunk_size=chunk, doc_ids=doc_ids)


@pytest.mark.parametrize("chunk,tile", [(16, 16), (64, 16)])
def test_stabiliser_after_a_reset_counts_the_zero_state(monkeypatch, seed, chunk, tile):
    """After a reset the segment starts from the zero state with m = 0, a source of the stabiliser
    like any key: with closed input gates (log i = -8) and open forget gates it is the largest, and
    the normaliser's lower bound exp(-m) depends on it."""
    with_launch_variant(monkeypatch, f"tile={tile}")
    B, NH, S, D = 1, 2, 40, 16
    inputs = make_inputs(B, NH, S, D, D, input_gate="exp", hard=False, with_state=False, dtype=torch.float32)
    inputs["i"] = torch.full_like(inputs["i"], -8.0)
    inputs["f"] = torch.full_like(inputs["f"], 8.0)
    doc_ids = (torch.arange(S, device=DEVICE) >= 9).long()[None]  # a reset inside the first chunk
    compare_with_reference(inputs, "exp", 1e-4, seed, chunk_size=chunk, doc_ids=doc_ids)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_gradients_of_h_alone_with_a_partial_initial_state(seed, input_gate):
    """return_state=False (no gradient flows in through the final state) and only n0 (and m0) given."""
    B, NH, S, DQK, DV = 1, 2, 21, 16, 16
    inputs = make_inputs(B, NH, S, DQK, DV, input_gate=input_gate, hard=True, with_state=True, dtype=torch.float32)
    del inputs["c0"]
    weights = torch.randn(B, NH, S, DV, device=DEVICE, dtype=torch.float64)

    def grads(impl, dtype):
        leaves = {name: t.to(dtype).requires_grad_(True) for name, t in inputs.items()}
        h = mlstm(**leaves, input_gate=input_gate, impl=impl, chunk_size=16)
        return torch.autograd.grad((h * weights.to(dtype)).sum(), list(leaves.values()))

    for name, actual, expected in zip(inputs, grads("triton", torch.float32), grads("reference", torch.float64)):
        err = ((actual.double() - expected).norm() / expected.norm()).item()
        assert err < 1e-4, f"d{name}: relative error {err:.2e} (seed {seed})"


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_step_kernel_matches_reference_step(seed, input_gate):
    B, NH, DQK, DV = 2, 3, 32, 48
    inputs = make_inputs(B, NH, 1, DQK, DV, input_gate=input_gate, hard=True, with_state=True, dtype=torch.float32)
    token = [inputs[name][:, :, 0] for name in "qkvif"]
    state = (inputs["c0"], inputs["n0"], inputs.get("m0"))
    h, new_state = mlstm_step(*token, *state, input_gate=input_gate, impl="triton")
    h_ref, ref_state = mlstm_step(*token, *state, input_gate=input_gate, impl="reference")
    torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    for actual, expected in zip(new_state, ref_state):
        if expected is None:
            assert actual is None
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5, msg=f"seed {seed}")


def test_prefill_then_step_kernel_generation_equals_full_forward(seed):
    B, NH, S, DQK, DV = 1, 2, 40, 16, 16
    inputs = make_inputs(B, NH, S, DQK, DV, input_gate="exp", hard=False, with_state=False, dtype=torch.float32)
    prompt = 33
    full = mlstm(**inputs, impl="triton", chunk_size=16)
    h, (c, n, m) = mlstm(**{k: t[:, :, :prompt] for k, t in inputs.items()}, impl="triton", chunk_size=16,
                         return_state=True)  # fmt: skip
    hs = [h]
    for t in range(prompt, S):
        h, (c, n, m) = mlstm_step(*[inputs[name][:, :, t] for name in "qkvif"], c, n, m, impl="triton")
        hs.append(h[:, :, None])
    torch.testing.assert_close(torch.cat(hs, dim=2), full, rtol=1e-4, atol=1e-5, msg=f"seed {seed}")


def test_triton_rejects_bad_chunk_size_and_dtype():
    inputs = make_inputs(1, 1, 8, 16, 16, input_gate="exp", hard=False, with_state=False, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size a power of two"):
        mlstm(**inputs, impl="triton", chunk_size=48)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        mlstm(**{k: t.double() for k, t in inputs.items()}, impl="triton")


@pytest.mark.parametrize("closed_input_gates", [False, True])
def test_stabiliser_gradient_crosses_blocks_of_tokens(monkeypatch, seed, closed_input_gates):
    """The input gates' kernel scans the stabiliser's gradient back over blocks of tokens. With the
    input gates closed, every m_t is the carried m0 + sum of log f: the final state's gradient
    reaches every forget gate and m0 only across all the blocks."""
    with_launch_variant(monkeypatch, "input_gates.BLOCK=16")
    inputs = make_inputs(1, 2, 45, 32, 16, input_gate="exp", hard=not closed_input_gates, with_state=True, dtype=torch.float32)
    if closed_input_gates:
        inputs["i"] = inputs["i"] - 30.0
    compare_with_reference(inputs, "exp", 1e-4, seed, chunk_size=16)


def test_triton_rejects_a_tile_that_does_not_divide_the_chunk(monkeypatch):
    inputs = make_inputs(1, 1, 8, 16, 16, input_gate="exp", hard=False, with_state=False, dtype=torch.float32)
    with_launch_variant(monkeypatch, "tile=32")
    with pytest.raises(ValueError, match="tile 32 must be a power of two >= 16 dividing the chunk size 16"):
        mlstm(**inputs, impl="triton", chunk_size=16)


GPU_HEAD_DIMS = [(64, 64), (128, 256), (256, 512), (512, 128), (512, 512)]


@pytest.mark.gpu
@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("DQK,DV", GPU_HEAD_DIMS)
def test_chunkwise_kernel_bf16_on_gpu(seed, input_gate, DQK, DV):
    S = 300  # not a multiple of the chunk
    inputs = make_inputs(2, 2, S, DQK, DV, input_gate=input_gate, hard=True, with_state=True, dtype=torch.bfloat16)
    compare_with_reference(inputs, input_gate, 1e-2, seed, doc_ids=random_doc_ids(2, S))


@pytest.mark.gpu
@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("chunk_size", [64, 128, 256])
def test_chunkwise_kernel_bf16_on_gpu_no_state_no_docs(seed, input_gate, chunk_size):
    inputs = make_inputs(2, 4, 517, 256, 512, input_gate=input_gate, hard=True, with_state=False, dtype=torch.bfloat16)
    compare_with_reference(inputs, input_gate, 1e-2, seed, chunk_size=chunk_size)


@pytest.mark.gpu
def test_chunkwise_kernel_fp32_on_gpu_multi_tile_head_dims(seed):
    inputs = make_inputs(1, 2, 200, 128, 256, input_gate="exp", hard=True, with_state=True, dtype=torch.float32)
    compare_with_reference(inputs, "exp", 1e-4, seed, doc_ids=random_doc_ids(1, 200))


# launch variants that scripts/bench_kernels.py compares (tc._Config.override): each must compute the
# same function as the default
LAUNCH_VARIANTS = [
    "dkdv.num_warps=8",
    "state_dtype=float32",
    "states.num_stages=3",
    "states.BK=128,states.num_warps=8",
    "bwd_states.num_warps=8,fwd_states.num_stages=3",
    "grads.num_warps=8",
]


def with_launch_variant(monkeypatch, settings):
    from xlstm_kernels.mlstm import triton_chunkwise as tc

    default_init = tc._Config.__init__

    def init(self, *args, **kwargs):
        default_init(self, *args, **kwargs)
        self.override(settings)

    monkeypatch.setattr(tc._Config, "__init__", init)


@pytest.mark.parametrize("settings", LAUNCH_VARIANTS)
def test_launch_variants_match_reference_fp32(monkeypatch, seed, settings):
    with_launch_variant(monkeypatch, settings)
    inputs = make_inputs(1, 2, 45, 32, 16, input_gate="exp", hard=True, with_state=True, dtype=torch.float32)
    compare_with_reference(inputs, "exp", 1e-4, seed, chunk_size=16, doc_ids=random_doc_ids(1, 45))


@pytest.mark.gpu
@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("settings", LAUNCH_VARIANTS + ["input_gates.BLOCK=64"])
def test_launch_variants_bf16_on_gpu(monkeypatch, seed, settings, input_gate):
    with_launch_variant(monkeypatch, settings)
    inputs = make_inputs(2, 2, 300, 256, 512, input_gate=input_gate, hard=True, with_state=True, dtype=torch.bfloat16)
    compare_with_reference(inputs, input_gate, 1e-2, seed, doc_ids=random_doc_ids(2, 300))


@pytest.mark.gpu
@pytest.mark.parametrize("DQK,DV", GPU_HEAD_DIMS)
def test_forward_is_deterministic(DQK, DV):
    """Identical calls give bitwise-identical outputs: no kernel races (a software-pipelined loop
    once did, in about 0.1% of h's entries, well inside the tolerance of the reference tests)."""
    inputs = make_inputs(4, 4, 1024, DQK, DV, input_gate="exp", hard=True, with_state=True, dtype=torch.bfloat16)
    doc_ids = random_doc_ids(4, 1024)
    first = mlstm(**inputs, impl="triton", doc_ids=doc_ids)
    for call in range(1, 6):
        again = mlstm(**inputs, impl="triton", doc_ids=doc_ids)
        assert torch.equal(first, again), f"h differs in call {call} at {(first != again).sum().item()} entries"


@pytest.mark.gpu
def test_backward_on_two_streams_equals_one_stream(monkeypatch, seed):
    """The backward runs its scores and dq kernels on a second stream: that may change when they run,
    never what they compute. Bitwise-equal gradients over repeated calls at a size where the streams
    overlap (freed buffers are reused between the calls)."""
    inputs = make_inputs(8, 4, 1024, 256, 512, input_gate="exp", hard=True, with_state=True, dtype=torch.bfloat16)
    doc_ids = random_doc_ids(8, 1024)
    weights = {
        "h": torch.randn(8, 4, 1024, 512, device=DEVICE),
        "c": torch.randn(8, 4, 256, 512, device=DEVICE),
        "n": torch.randn(8, 4, 256, device=DEVICE),
        "m": torch.randn(8, 4, 1, device=DEVICE),
    }

    def run(streams):
        with monkeypatch.context() as patch:
            with_launch_variant(patch, f"streams={streams}")
            return [outputs_and_grads(mlstm, inputs, weights, impl="triton", doc_ids=doc_ids) for _ in range(3)]

    one_stream, two_streams = run(1), run(2)
    for call, (expected, actual) in enumerate(zip(one_stream, two_streams)):
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{key} differs in call {call} (seed {seed})"
