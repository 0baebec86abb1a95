"""Pure-PyTorch mLSTM references: recurrent, parallel (quadratic) and chunkwise.

All three compute the same function and serve as oracles for the Triton kernels (in fp64 they agree
to rounding, gradients included, because they are plain differentiable torch ops). Conventions,
following the official mlstm_kernels:

* q, k ``(B, NH, S, DQK)``, v ``(B, NH, S, DV)``, gate pre-activations i, f ``(B, NH, S)``.
* The 1/sqrt(DQK) scale multiplies q; the states C ``(B, NH, DQK, DV)`` and n ``(B, NH, DQK)`` are unscaled.
* Exponential input gate: log-space stabiliser m ``(B, NH, 1)``,
  ``m_t = max(logsigmoid(f_t) + m_{t-1}, i_t)``, ``h_t = q_t C_t / (max(|q_t n_t|, exp(-m_t)) + eps)``.
* Sigmoid input gate: ``C_t = sigmoid(f_t) C_{t-1} + sigmoid(i_t) k_t v_t^T``, no stabiliser,
  ``h_t = q_t C_t / (max(|q_t n_t|, 1) + eps)``.
* The default initial state is C=0, n=0, m=0. A document boundary (doc_ids changes between t-1 and
  t) replaces the state before token t by that same zero state.

Gate math, cumulative sums and states are computed in fp32, or in fp64 when an input is fp64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from xlstm_kernels.documents import document_resets

INPUT_GATES = ("exp", "sigmoid")
DEFAULT_CHUNK_SIZE = 64

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 when any input is fp64, else fp32: the precision of gate math and states."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _expect_shape(name: str, tensor: torch.Tensor | None, shape: tuple[int, ...]) -> None:
    if tensor is not None and tuple(tensor.shape) != shape:
        raise ValueError(f"mlstm: {name} must have shape {shape}, got {tuple(tensor.shape)}")


def check_inputs(q, k, v, i, f, c0, n0, m0, input_gate: str, doc_ids=None) -> None:
    """Validates shapes and options of a sequence call; raises ValueError naming the bad argument."""
    if input_gate not in INPUT_GATES:
        raise ValueError(f"mlstm: input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
    if q.dim() != 4:
        raise ValueError(f"mlstm: q must have shape (B, NH, S, DQK), got {tuple(q.shape)}")
    B, NH, S, DQK = q.shape
    if v.dim() != 4:
        raise ValueError(f"mlstm: v must have shape (B, NH, S, DV), got {tuple(v.shape)}")
    DV = v.shape[-1]
    _expect_shape("k", k, (B, NH, S, DQK))
    _expect_shape("v", v, (B, NH, S, DV))
    _expect_shape("i", i, (B, NH, S))
    _expect_shape("f", f, (B, NH, S))
    _expect_shape("c0", c0, (B, NH, DQK, DV))
    _expect_shape("n0", n0, (B, NH, DQK))
    _expect_shape("m0", m0, (B, NH, 1))
    if input_gate == "sigmoid" and m0 is not None:
        raise ValueError("mlstm: m0 must be None with input_gate='sigmoid' (that gate has no stabiliser state)")
    if doc_ids is not None:
        _expect_shape("doc_ids", doc_ids, (B, S))
        if doc_ids.dtype.is_floating_point or doc_ids.dtype == torch.bool:
            raise ValueError(f"mlstm: doc_ids must be an integer tensor, got {doc_ids.dtype}")


def check_step_inputs(q, k, v, i, f, c, n, m, input_gate: str) -> None:
    """Validates a one-token call; raises ValueError naming the bad argument."""
    if input_gate not in INPUT_GATES:
        raise ValueError(f"mlstm_step: input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
    if q.dim() != 3 or v.dim() != 3:
        raise ValueError(
            f"mlstm_step: q, k must have shape (B, NH, DQK) and v (B, NH, DV), got q {tuple(q.shape)}, "
            f"v {tuple(v.shape)}"
        )
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    _expect_shape("k", k, (B, NH, DQK))
    _expect_shape("v", v, (B, NH, DV))
    _expect_shape("i", i, (B, NH))
    _expect_shape("f", f, (B, NH))
    _expect_shape("c", c, (B, NH, DQK, DV))
    _expect_shape("n", n, (B, NH, DQK))
    _expect_shape("m", m, (B, NH, 1))
    if input_gate == "sigmoid" and m is not None:
        raise ValueError("mlstm_step: m must be None with input_gate='sigmoid'")


def _initial_state(B, NH, DQK, DV, c0, n0, m0, input_gate, dtype, device) -> State:
    c = torch.zeros(B, NH, DQK, DV, dtype=dtype, device=device) if c0 is None else c0.to(dtype)
    n = torch.zeros(B, NH, DQK, dtype=dtype, device=device) if n0 is None else n0.to(dtype)
    if input_gate == "sigmoid":
        return c, n, None
    m = torch.zeros(B, NH, 1, dtype=dtype, device=device) if m0 is None else m0.to(dtype)
    return c, n, m


# --------------------------------------------------------------------------------------------------
# Recurrent form


def mlstm_step_reference(q, k, v, i, f, c, n, m, *, input_gate: str = "exp", eps: float = 1e-6):
    """One token: q, k (B, NH, DQK), v (B, NH, DV), i, f (B, NH); state (c, n, m) or Nones for zeros.

    Returns ``(h (B, NH, DV) in q's dtype, (c, n, m))`` with states in fp32 (fp64 for fp64 inputs).
    """
    check_step_inputs(q, k, v, i, f, c, n, m, input_gate)
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    dtype = compute_dtype(q, k, v, i, f, c, n, m)
    c, n, m = _initial_state(B, NH, DQK, DV, c, n, m, input_gate, dtype, q.device)
    h, state = _step(q.to(dtype), k.to(dtype), v.to(dtype), i.to(dtype), f.to(dtype), c, n, m, input_gate, eps)
    return h.to(q.dtype), state


def _step(q, k, v, i, f, c, n, m, input_gate, eps):
    q = q * q.shape[-1] ** -0.5
    if input_gate == "exp":
        log_f = F.logsigmoid(f)
        m_new = torch.maximum(log_f + m[..., 0], i)
        f_gate = torch.exp(log_f + m[..., 0] - m_new)
        i_gate = torch.exp(i - m_new)
        lower = torch.exp(-m_new)
        m_new = m_new[..., None]
    else:
        f_gate, i_gate = torch.sigmoid(f), torch.sigmoid(i)
        lower = torch.ones_like(f)
        m_new = None
    c_new = f_gate[..., None, None] * c + i_gate[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_new = f_gate[..., None] * n + i_gate[..., None] * k
    num = torch.einsum("bhd,bhde->bhe", q, c_new)
    qn = (q * n_new).sum(-1)
    den = torch.maximum(qn.abs(), lower) + eps
    return num / den[..., None], (c_new, n_new, m_new)


def mlstm_recurrent(
    q, k, v, i, f, *, c0=None, n0=None, m0=None, input_gate="exp", doc_ids=None, return_state=False, eps=1e-6
):
    """Loop over time with the step; the slowest and most literal form."""
    check_inputs(q, k, v, i, f, c0, n0, m0, input_gate, doc_ids)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    dtype = compute_dtype(q, k, v, i, f, c0, n0, m0)
    state = _initial_state(B, NH, DQK, DV, c0, n0, m0, input_gate, dtype, q.device)
    reset = document_resets(doc_ids, B, S, q.device)
    qd, kd, vd, id_, fd = (x.to(dtype) for x in (q, k, v, i, f))
    hs = []
    for t in range(S):
        if doc_ids is not None and t > 0:
            r = reset[:, t].view(B, 1, 1, 1)
            c, n, m = state
            state = (
                torch.where(r, torch.zeros_like(c), c),
                torch.where(r[..., 0], torch.zeros_like(n), n),
                None if m is None else torch.where(r[..., 0], torch.zeros_like(m), m),
            )
        h, state = _step(qd[:, :, t], kd[:, :, t], vd[:, :, t], id_[:, :, t], fd[:, :, t], *state, input_gate, eps)
        hs.append(h)
    h = torch.stack(hs, dim=2).to(q.dtype)
    return (h, state) if return_state else h


# --------------------------------------------------------------------------------------------------
# Parallel form


def _parallel(q, k, v, i, f, c0, n0, m0, reset, input_gate, eps):
    """Quadratic form over one block of tokens, starting from state (c0, n0, m0); all in one dtype.

    Row t sees keys j <= t of its own segment (segments split at ``reset``) and an "origin" state:
    (c0, n0, m0) for the first segment, the zero state with m = 0 for later ones. The origin's
    log-weight is the sum of log forget gates from the segment start up to t, plus its m.
    Returns h and the state after the last token.
    """
    S = q.shape[2]
    q = q * q.shape[-1] ** -0.5
    log_f = F.logsigmoid(f)
    log_i = i if input_gate == "exp" else F.logsigmoid(i)

    segment = torch.cumsum(reset.to(torch.int64), dim=-1)  # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    visible = ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]  # (B, 1, S_t, S_j)
    in_first_segment = (segment == 0)[:, None, :]  # (B, 1, S)

    # log_decay[t, j] = sum_{j < s <= t} log_f[s], as a masked cumsum over s for each j: summing
    # terms of one sign never cancels, unlike b_t - b_j with b the running total.
    later = torch.ones(S, S, dtype=torch.bool, device=q.device).triu(diagonal=1)  # [j, s]: s > j
    log_decay = torch.where(later, log_f[..., None, :], 0.0).cumsum(-1).transpose(-1, -2)
    log_d = torch.where(visible, log_decay + log_i[..., None, :], -math.inf)
    log_origin = torch.where(visible, log_f[..., None, :], 0.0).sum(-1)  # (B, NH, S)

    if input_gate == "exp":
        log_origin = log_origin + torch.where(in_first_segment, m0, 0.0)
        m = torch.maximum(log_origin, log_d.amax(-1))
        lower = torch.exp(-m)
    else:
        m = torch.zeros_like(log_origin)
        lower = torch.ones_like(log_origin)
    d = torch.exp(log_d - m[..., None])
    w_origin = torch.where(in_first_segment, torch.exp(log_origin - m), 0.0)  # later origins are zero states

    scores = (q @ k.transpose(-1, -2)) * d
    num = w_origin[..., None] * (q @ c0) + scores @ v
    qn = w_origin * (q @ n0[..., None])[..., 0] + scores.sum(-1)
    den = torch.maximum(qn.abs(), lower) + eps
    h = num / den[..., None]

    w_last = d[:, :, -1]  # (B, NH, S): weight of each token in the state after the block
    c = w_origin[:, :, -1, None, None] * c0 + torch.einsum("bhs,bhsd,bhse->bhde", w_last, k, v)
    n = w_origin[:, :, -1, None] * n0 + torch.einsum("bhs,bhsd->bhd", w_last, k)
    return h, (c, n, m[:, :, -1:] if input_gate == "exp" else None)


def mlstm_parallel(
    q, k, v, i, f, *, c0=None, n0=None, m0=None, input_gate="exp", doc_ids=None, return_state=False, eps=1e-6
):
    """Quadratic (S x S) form, including the initial-state term."""
    check_inputs(q, k, v, i, f, c0, n0, m0, input_gate, doc_ids)
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    dtype = compute_dtype(q, k, v, i, f, c0, n0, m0)
    c, n, m = _initial_state(B, NH, DQK, DV, c0, n0, m0, input_gate, dtype, q.device)
    reset = document_resets(doc_ids, B, S, q.device)
    h, state = _parallel(*(x.to(dtype) for x in (q, k, v, i, f)), c, n, m, reset, input_gate, eps)
    h = h.to(q.dtype)
    return (h, state) if return_state else h


# --------------------------------------------------------------------------------------------------
# Chunkwise form


def mlstm_chunkwise(
    q,
    k,
    v,
    i,
    f,
    *,
    c0=None,
    n0=None,
    m0=None,
    input_gate="exp",
    chunk_size=DEFAULT_CHUNK_SIZE,
    doc_ids=None,
    return_state=False,
    eps=1e-6,
):
    """Chunks of ``chunk_size`` tokens (the last may be shorter): the parallel form inside a chunk,
    starting from the state materialised at the chunk boundary; O(S * chunk_size) memory."""
    check_inputs(q, k, v, i, f, c0, n0, m0, input_gate, doc_ids)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"mlstm: chunk_size must be a positive integer, got {chunk_size!r}")
    B, NH, S, DQK = q.shape
    DV = v.shape[-1]
    dtype = compute_dtype(q, k, v, i, f, c0, n0, m0)
    state = _initial_state(B, NH, DQK, DV, c0, n0, m0, input_gate, dtype, q.device)
    reset = document_resets(doc_ids, B, S, q.device)
    qd, kd, vd, id_, fd = (x.to(dtype) for x in (q, k, v, i, f))
    hs = []
    for start in range(0, S, chunk_size):
        chunk = slice(start, min(start + chunk_size, S))
        h, state = _parallel(
            qd[:, :, chunk], kd[:, :, chunk], vd[:, :, chunk], id_[:, :, chunk], fd[:, :, chunk],
            *state, reset[:, chunk], input_gate, eps,
        )  # fmt: skip
        hs.append(h)
    if hs:
        h = torch.cat(hs, dim=2).to(q.dtype)
    else:
        h = q.new_zeros(B, NH, 0, DV)
    return (h, state) if return_state else h
