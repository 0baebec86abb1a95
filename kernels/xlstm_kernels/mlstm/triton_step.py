"""One-token mLSTM step in Triton for generation: fp32 states in and out, no autograd.

One program per (head, DV tile) updates its columns of C in place of a fresh buffer and keeps a
private copy of the n update (cheap: DQK values) to form the normaliser q.n.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xlstm_kernels.mlstm.reference import INPUT_GATES


@triton.jit
def _step_kernel(
    Q, K, V, I, F, C, N, M, H, C_OUT, N_OUT, M_OUT,
    DQK, DV, scale, eps,
    IS_EXP: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_v = offs_v < DV

    f = tl.load(F + pid_bh).to(tl.float32)
    i = tl.load(I + pid_bh).to(tl.float32)
    log_f = tl.minimum(f, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(f)))
    if IS_EXP:
        m_prev = tl.load(M + pid_bh)
        m_new = tl.maximum(log_f + m_prev, i)
        f_gate = tl.exp(log_f + m_prev - m_new)
        i_gate = tl.exp(i - m_new)
        lower = tl.exp(-m_new)
    else:
        f_gate = tl.exp(log_f)
        i_gate = 1.0 / (1.0 + tl.exp(-i))
        lower = 1.0

    v = tl.load(V + pid_bh * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    num = tl.zeros([BV], dtype=tl.float32)
    q_n = tl.zeros([BK], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        q = tl.load(Q + pid_bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32) * scale
        k = tl.load(K + pid_bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        tile = pid_bh * DQK * DV + offs_k[:, None] * DV + offs_v[None, :]
        mask_kv = mask_k[:, None] & mask_v[None, :]
        c = tl.load(C + tile, mask=mask_kv, other=0.0)
        c = f_gate * c + i_gate * k[:, None] * v[None, :]
        tl.store(C_OUT + tile, c, mask=mask_kv)
        n = f_gate * tl.load(N + pid_bh * DQK + offs_k, mask=mask_k, other=0.0) + i_gate * k
        if pid_v == 0:
            tl.store(N_OUT + pid_bh * DQK + offs_k, n, mask=mask_k)
        num += tl.sum(q[:, None] * c, 0)
        q_n += q * n
    den = tl.maximum(tl.abs(tl.sum(q_n, 0)), lower) + eps
    tl.store(H + pid_bh * DV + offs_v, (num / den).to(H.dtype.element_ty), mask=mask_v)
    if IS_EXP:
        if pid_v == 0:
            tl.store(M_OUT + pid_bh, m_new)


def mlstm_step_triton(q, k, v, i, f, c, n, m, *, input_gate="exp", eps=1e-6):
    """One token on a Triton kernel; same contract as ``xlstm_kernels.mlstm_step`` (no gradients)."""
    if input_gate not in INPUT_GATES:
        raise ValueError(f"mlstm_step: input_gate must be one of {INPUT_GATES}, got {input_gate!r}")
    B, NH, DQK = q.shape
    DV = v.shape[-1]
    dev = q.device
    c = torch.zeros(B, NH, DQK, DV, device=dev) if c is None else c.float().contiguous()
    n = torch.zeros(B, NH, DQK, device=dev) if n is None else n.float().contiguous()
    m_in = torch.zeros(B, NH, 1, device=dev) if m is None else m.float().contiguous()
    h = torch.empty(B, NH, DV, device=dev, dtype=q.dtype)
    c_out, n_out, m_out = torch.empty_like(c), torch.empty_like(n), torch.empty_like(m_in)
    BK = max(16, min(64, triton.next_power_of_2(DQK)))
    BV = max(16, min(64, triton.next_power_of_2(DV)))
    _step_kernel[(B * NH, triton.cdiv(DV, BV))](
        q.contiguous(), k.contiguous(), v.contiguous(), i.contiguous(), f.contiguous(), c, n, m_in,
        h, c_out, n_out, m_out, DQK, DV, DQK**-0.5, eps,
        IS_EXP=input_gate == "exp", BK=BK, BV=BV,
    )  # fmt: skip
    return h, (c_out, n_out, m_out if input_gate == "exp" else None)
