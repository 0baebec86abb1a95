"""The sLSTM cell in plain PyTorch: a time loop with autograd, exact in fp64.

This is the oracle for the Triton kernel and the CPU implementation. It follows the code semantics
of the official CUDA kernel (gate order i, f, z, o; per-element "fresh state" test on n):

    raw   = x_t + y_{t-1} @ R + b                      (per head, R block-diagonal)
    lfpm  = m_{t-1} + logsigmoid(f~)
    m_t   = i~ if n_{t-1} == 0 else max(i~, lfpm)
    i'    = min(exp(i~ - m_t), 1);  f' = min(exp(lfpm - m_t), 1)
    c_t   = f' c_{t-1} + i' tanh(z~);  n_t = f' n_{t-1} + i'
    y_t   = sigmoid(o~) c_t / n_t

Gate math and states are fp32 (fp64 when the inputs are fp64).
"""

import torch
import torch.nn.functional as F


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and gate math run in fp32, or in fp64 when the inputs are fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def slstm_pointwise(
    raw: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step of the gate math. raw: (..., 4, DH) pre-activations; state (c, n, m): (..., DH)."""
    c, n, m = state
    i_raw, f_raw, z_raw, o_raw = raw.unbind(dim=-2)
    log_f_plus_m = m + F.logsigmoid(f_raw)
    m_new = torch.where(n == 0, i_raw, torch.maximum(i_raw, log_f_plus_m))
    one = torch.ones((), dtype=raw.dtype, device=raw.device)
    i_gate = torch.minimum(torch.exp(i_raw - m_new), one)
    f_gate = torch.minimum(torch.exp(log_f_plus_m - m_new), one)
    c_new = f_gate * c + i_gate * torch.tanh(z_raw)
    n_new = f_gate * n + i_gate
    y_new = torch.sigmoid(o_raw) * c_new / n_new
    return y_new, c_new, n_new, m_new


def slstm_step_reference(
    x_gates_t: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One token: x_gates_t (B, NH, 4, DH), state (y, c, n, m) each (B, NH, DH)."""
    compute = state_dtype(x_gates_t.dtype)
    y, c, n, m = (s.to(compute) for s in state)
    recurrent = torch.einsum("bhk,hkgj->bhgj", y, R.to(compute))
    raw = x_gates_t.to(compute) + recurrent + b.to(compute)
    y, c, n, m = slstm_pointwise(raw, (c, n, m))
    return y.to(x_gates_t.dtype), (y, c, n, m)


def slstm_reference(
    x_gates: torch.Tensor,
    R: torch.Tensor,
    b: torch.Tensor,
    state0: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    document_start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The whole sequence. x_gates (B, S, NH, 4, DH); state0 (y, c, n, m) each (B, NH, DH).

    document_start: optional bool (B, S), True where token t starts from the zero state.
    Returns y (B, S, NH, DH) in x_gates' dtype and the final state in the compute dtype.
    """
    compute = state_dtype(x_gates.dtype)
    R = R.to(compute)
    b = b.to(compute)
    y, c, n, m = (s.to(compute) for s in state0)
    outputs = []
    for t in range(x_gates.shape[1]):
        if document_start is not None:
            keep = (~document_start[:, t]).to(compute)[:, None, None]
            y, c, n, m = y * keep, c * keep, n * keep, m * keep
        raw = x_gates[:, t].to(compute) + torch.einsum("bhk,hkgj->bhgj", y, R) + b
        y, c, n, m = slstm_pointwise(raw, (c, n, m))
        outputs.append(y)
    return torch.stack(outputs, dim=1).to(x_gates.dtype), (y, c, n, m)
