"""The three mLSTM references agree in fp64 (outputs, final states, every gradient) on fresh random
inputs, including saturated gates, initial states, document resets and odd chunk sizes."""

import random

import pytest
import torch

from xlstm_kernels import mlstm, mlstm_step
from xlstm_kernels.mlstm.reference import mlstm_chunkwise, mlstm_parallel, mlstm_recurrent

TOL = 1e-10


@pytest.fixture
def seed():
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    return seed


def make_inputs(B, NH, S, DQK, DV, *, input_gate, gates="normal", with_state=False, dtype=torch.float64):
    """Random inputs. gates: "normal", "hard" (forget pre-activations near -20, input up to +15)."""
    q = torch.randn(B, NH, S, DQK, dtype=dtype)
    k = torch.randn(B, NH, S, DQK, dtype=dtype)
    v = torch.randn(B, NH, S, DV, dtype=dtype)
    if gates == "hard":
        i = torch.empty(B, NH, S, dtype=dtype).uniform_(-5.0, 15.0)
        f = torch.where(torch.rand(B, NH, S) < 0.5, -20.0 + torch.randn(B, NH, S), 3.0 * torch.randn(B, NH, S))
        f = f.to(dtype)
    else:
        i = 2.0 * torch.randn(B, NH, S, dtype=dtype)
        f = 3.0 + 2.0 * torch.randn(B, NH, S, dtype=dtype)
    inputs = dict(q=q, k=k, v=v, i=i, f=f)
    if with_state:
        inputs["c0"] = torch.randn(B, NH, DQK, DV, dtype=dtype)
        inputs["n0"] = torch.randn(B, NH, DQK, dtype=dtype)
        if input_gate == "exp":
            inputs["m0"] = 2.0 * torch.randn(B, NH, 1, dtype=dtype)
    return inputs


def random_doc_ids(B, S):
    """Documents of random lengths, including length 1, packed back to back."""
    ids = torch.zeros(B, S, dtype=torch.int64)
    for b in range(B):
        ids[b] = torch.cumsum((torch.rand(S) < 0.15).long(), 0)
    return ids


def run_with_grads(fn, inputs, weights, **kwargs):
    """Outputs, final states and the gradients of a random linear functional of all of them."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in inputs.items()}
    h, (c, n, m) = fn(**leaves, return_state=True, **kwargs)
    loss = (h * weights["h"]).sum() + (c * weights["c"]).sum() + (n * weights["n"]).sum()
    if m is not None:
        loss = loss + (m * weights["m"]).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    results = {"h": h, "c": c, "n": n}
    if m is not None:
        results["m"] = m
    results.update({f"d{name}": g for name, g in zip(leaves, grads)})
    return results


def loss_weights(B, NH, S, DQK, DV):
    return {
        "h": torch.randn(B, NH, S, DV, dtype=torch.float64),
        "c": torch.randn(B, NH, DQK, DV, dtype=torch.float64),
        "n": torch.randn(B, NH, DQK, dtype=torch.float64),
        "m": torch.randn(B, NH, 1, dtype=torch.float64),
    }


def assert_close(actual, expected, seed, what):
    for key in expected:
        a, e = actual[key], expected[key]
        err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-300)).item()
        assert err <= TOL, f"{what}: {key} relative error {err:.3g} > {TOL} (seed {seed})"


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
@pytest.mark.parametrize("gates", ["normal", "hard"])
@pytest.mark.parametrize("with_state", [False, True])
def test_three_forms_agree(seed, input_gate, gates, with_state):
    B, NH, S, DQK, DV = 2, 2, 23, 8, 6
    inputs = make_inputs(B, NH, S, DQK, DV, input_gate=input_gate, gates=gates, with_state=with_state)
    weights = loss_weights(B, NH, S, DQK, DV)
    expected = run_with_grads(mlstm_recurrent, inputs, weights, input_gate=input_gate)
    parallel = run_with_grads(mlstm_parallel, inputs, weights, input_gate=input_gate)
    assert_close(parallel, expected, seed, "parallel vs recurrent")
    for chunk_size in (1, 5, 16, 64):  # 5 and 16 do not divide 23; 64 is longer than the sequence
        chunkwise = run_with_grads(mlstm_chunkwise, inputs, weights, input_gate=input_gate, chunk_size=chunk_size)
        assert_close(chunkwise, expected, seed, f"chunkwise({chunk_size}) vs recurrent")


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_doc_ids_all_forms_agree(seed, input_gate):
    B, NH, S, DQK, DV = 2, 2, 29, 8, 8
    inputs = make_inputs(B, NH, S, DQK, DV, input_gate=input_gate, gates="hard", with_state=True)
    doc_ids = random_doc_ids(B, S)
    weights = loss_weights(B, NH, S, DQK, DV)
    kwargs = dict(input_gate=input_gate, doc_ids=doc_ids)
    expected = run_with_grads(mlstm_recurrent, inputs, weights, **kwargs)
    assert_close(run_with_grads(mlstm_parallel, inputs, weights, **kwargs), expected, seed, "parallel, doc_ids")
    for chunk_size in (4, 7):
        chunkwise = run_with_grads(mlstm_chunkwise, inputs, weights, chunk_size=chunk_size, **kwargs)
        assert_close(chunkwise, expected, seed, f"chunkwise({chunk_size}), doc_ids")


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_packed_documents_equal_separate_sequences(seed, input_gate):
    NH, DQK, DV = 2, 8, 4
    lengths = [5, 1, 11, 7]
    S = sum(lengths)
    inputs = make_inputs(1, NH, S, DQK, DV, input_gate=input_gate, gates="hard", with_state=True)
    doc_ids = torch.repeat_interleave(torch.tensor([3, 9, 4, 3]), torch.tensor(lengths))[None]
    for form in (mlstm_recurrent, mlstm_parallel, mlstm_chunkwise):
        packed, (c, n, m) = form(**inputs, input_gate=input_gate, doc_ids=doc_ids, return_state=True)
        start = 0
        for index, length in enumerate(lengths):
            piece = {name: t[:, :, start : start + length] for name, t in inputs.items() if name in "qkvif"}
            if index == 0:  # only the first document starts from the given initial state
                piece.update({name: inputs[name] for name in ("c0", "n0", "m0") if name in inputs})
            alone, state = form(**piece, input_gate=input_gate, return_state=True)
            torch.testing.assert_close(packed[:, :, start : start + length], alone, rtol=TOL, atol=TOL)
            start += length
        # the final state is the last document's own final state
        torch.testing.assert_close(c, state[0], rtol=TOL, atol=TOL)
        torch.testing.assert_close(n, state[1], rtol=TOL, atol=TOL)
        if m is not None:
            torch.testing.assert_close(m, state[2], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("input_gate", ["exp", "sigmoid"])
def test_step_by_step_generation_equals_full_forward(seed, input_gate):
    B, NH, S, DQK, DV = 2, 3, 13, 8, 16
    inputs = make_inputs(B, NH, S, DQK, DV, input_gate=input_gate, gates="hard")
    prompt = 6
    head = {name: t[:, :, :prompt] for name, t in inputs.items()}
    full, full_state = mlstm(**inputs, input_gate=input_gate, impl="reference", return_state=True)
    h_prompt, (c, n, m) = mlstm(**head, input_gate=input_gate, impl="reference", chunk_size=4, return_state=True)
    hs = [h_prompt]
    for t in range(prompt, S):
        token = [inputs[name][:, :, t] for name in "qkvif"]
        h, (c, n, m) = mlstm_step(*token, c, n, m, input_gate=input_gate, impl="reference")
        hs.append(h[:, :, None])
    torch.testing.assert_close(torch.cat(hs, dim=2), full, rtol=TOL, atol=TOL)
    for actual, expected in zip((c, n, m), full_state):
        if expected is not None:
            torch.testing.assert_close(actual, expected, rtol=TOL, atol=TOL)


def test_fp32_inputs_give_fp32_states_and_input_dtype_output():
    inputs = make_inputs(1, 2, 9, 8, 8, input_gate="exp", dtype=torch.bfloat16)
    h, (c, n, m) = mlstm(**inputs, impl="reference", return_state=True)
    assert h.dtype == torch.bfloat16
    assert c.dtype == n.dtype == m.dtype == torch.float32
    assert (c.shape, n.shape, m.shape) == ((1, 2, 8, 8), (1, 2, 8), (1, 2, 1))
    _, (_, _, m_sig) = mlstm(**inputs, impl="reference", input_gate="sigmoid", return_state=True)
    assert m_sig is None


def test_bad_arguments_are_rejected_with_a_clear_message():
    inputs = make_inputs(1, 2, 5, 8, 4, input_gate="exp")
    with pytest.raises(ValueError, match="input_gate"):
        mlstm(**inputs, input_gate="relu")
    with pytest.raises(ValueError, match="impl"):
        mlstm(**inputs, impl="cuda")
    with pytest.raises(ValueError, match=r"k must have shape \(1, 2, 5, 8\)"):
        mlstm(**{**inputs, "k": inputs["k"][..., :4]})
    with pytest.raises(ValueError, match="f must have shape"):
        mlstm(**{**inputs, "f": inputs["f"][..., :3]})
    with pytest.raises(ValueError, match="c0 must have shape"):
        mlstm(**inputs, c0=torch.zeros(1, 2, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="doc_ids must have shape"):
        mlstm(**inputs, doc_ids=torch.zeros(1, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="m0 must be None"):
        mlstm(**inputs, input_gate="sigmoid", m0=torch.zeros(1, 2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm(**inputs, impl="reference", chunk_size=0)
    token = [inputs[name][:, :, 0] for name in "qkvif"]
    with pytest.raises(ValueError, match="input_gate"):
        mlstm_step(*token, None, None, None, input_gate="tanh")
    with pytest.raises(ValueError, match="c must have shape"):
        mlstm_step(*token, torch.zeros(1, 2, 8, 8), None, None)
