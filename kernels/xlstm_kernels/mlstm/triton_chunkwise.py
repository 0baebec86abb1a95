"""Chunkwise mLSTM in Triton: forward and backward, exp and sigmoid input gates, document resets.

Two levels, as in TFLA: the sequence is cut into chunks of L tokens (default 128), at whose
boundaries the recurrent state (C, n, m) is materialised, and every chunk into tiles of T tokens
(default 64) for the work inside it. Large chunks keep the state traffic down (C is DQK x DV per
chunk and head, 256 KB at the xLSTM-7B shape), tiles keep each program's L x L pieces small. Kernels:

* ``_chunk_summary_kernel``: per chunk, the gate sums the other kernels need (computed once),
  including each token's intra-chunk stabiliser.
* ``_fwd_states_kernel``: the inter-chunk recurrence. One program per (head, DQK tile, DV tile) walks
  the chunks in order, in fp32, and writes the state (C, n, m) before every chunk (C in the input
  dtype: the chunk kernels round it to that for their products anyway) and the final state (fp32).
* ``_fwd_output_kernel``: one program per (query tile, head): the contribution of the state before
  the chunk plus the causal part over the chunk's keys up to the tile, as one T x L block; writes
  h and, per token, the stabiliser m and the signed normaliser q.n (the backward's only per-token
  extras).
* ``_bwd_states_kernel``: the reverse recurrence for dC, dn, written before every chunk.
* ``_bwd_scores_kernel``: one program per (query tile, head): for each key tile of the chunk up to
  it, the T x T scores P and their gradients dS (written in the input dtype) and the gate
  gradients of those terms that stay inside the query tile.
* ``_bwd_dq_kernel`` (per query tile), ``_bwd_dkdv_kernel`` (per key tile): they load P and dS, so
  that next to their state tiles they hold no score recomputation.
* ``_gate_grads_kernel``: per chunk, sums the per-token pieces of the gate gradients over the
  intervals of gates each term spans; ``_input_gate_grads_kernel``, per head, adds the
  stabiliser's part and applies the gates' activations.

Gate gradients: with the stabilisers held fixed, every term's log-weight is a sum of log forget
gates over an interval plus the source's log input gate, so the kernels sum the gradients of the
log-weights (intra-chunk, origin state, chunk-end state, carried state) over the intervals that
contain each gate. (The shortcut ``dL/dB_t = q_t.dq_t - k_t.dk_t`` loses all relative precision
when forget gates are closed: the diagonal terms cancel.) The stabilisers matter only through eps
and the final state's scale: the per-token m is the max-plus scan ``m_t = max(log f_t + m_{t-1},
log i_t)``, whose gradient is routed back through its argmax (``_input_gate_grads_kernel``).

Document resets are exact: inside a chunk the tokens form segments split at resets; a token sees
only keys of its own segment and, in the first segment only, the state before the chunk. Later
segments start from the zero state with m = 0, whose only effect is on the stabiliser.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xlstm_kernels.documents import document_resets

DEFAULT_CHUNK_SIZE = 128
DEFAULT_TILE_SIZE = 64


@triton.jit
def _log_sigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _log_input_gate(i, IS_EXP: tl.constexpr):
    if IS_EXP:
        return i
    else:
        return _log_sigmoid(i)


@triton.jit
def _tile_gates(
    I, F, RESET, gate_base, reset_base, tile_start, chunk_start, S,
    IS_EXP: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
):  # fmt: skip
    """Per-token log gates of a tile and its tokens' segment ids counted from the chunk's start
    (split at resets). Tokens past the end get log f = 0 and log i = -inf: they change nothing."""
    t = tile_start + tl.arange(0, T)
    valid = t < S
    f = tl.load(F + gate_base + t, mask=valid, other=0.0).to(tl.float32)
    i = tl.load(I + gate_base + t, mask=valid, other=0.0).to(tl.float32)
    log_f = tl.where(valid, _log_sigmoid(f), 0.0)
    log_i = tl.where(valid, _log_input_gate(i, IS_EXP), float("-inf"))
    segment = tl.cumsum(tl.load(RESET + reset_base + t, mask=valid, other=0).to(tl.int32), 0)
    if L > T:  # resets in the chunk's earlier tiles
        lanes = chunk_start + tl.arange(0, L)
        earlier = tl.load(RESET + reset_base + lanes, mask=(lanes < tile_start) & (lanes < S), other=0)
        segment += tl.sum(earlier.to(tl.int32), 0)
    return log_f, log_i, segment


# Sums of log forget gates over intervals are formed as sums of terms of one sign (log f <= 0),
# never as differences of running totals: with closed gates (log f ~ -20) those totals reach
# thousands and their difference would lose the small intervals' precision.


@triton.jit
def _log_weights(
    I, F, RESET, gate_base, reset_base, tile_start, chunk_start, t, s, S,
    IS_EXP: tl.constexpr, T: tl.constexpr, L: tl.constexpr,
):  # fmt: skip
    """T x L log-weights of a query tile's tokens t for the chunk's keys s: the log forget gates over
    (s, t] plus log i_s for keys s <= t of t's segment, -inf elsewhere. The gates over (s, t] are
    those over [tile start, t] (a cumsum down each column) plus, for keys before the tile, those
    over (s, tile start) (a reverse cumsum of the following tokens' gates)."""
    log_f_q, _, segment_q = _tile_gates(I, F, RESET, gate_base, reset_base, tile_start, chunk_start, S, IS_EXP, T, L)
    _, log_i_k, segment_k = _tile_gates(I, F, RESET, gate_base, reset_base, chunk_start, chunk_start, S, IS_EXP, L, L)
    before_tile = s + 1 < tile_start
    f_next = tl.load(F + gate_base + s + 1, mask=before_tile, other=0.0).to(tl.float32)
    to_tile = tl.cumsum(tl.where(before_tile, _log_sigmoid(f_next), 0.0), 0, reverse=True)
    decay = tl.cumsum(tl.where(t[:, None] > s[None, :], log_f_q[:, None], 0.0), 0) + to_tile[None, :]
    visible = (segment_q[:, None] == segment_k[None, :]) & (t[:, None] >= s[None, :])
    return tl.where(visible, decay + log_i_k[None, :], float("-inf"))


@triton.jit
def _scale_rows(x, w):
    """x * w[:, None] in x's dtype, for a tensor-core operand. bf16 tiles are scaled in bf16: the
    weight's extra rounding stays within bf16's tolerance, and a tile converted to fp32 would
    take twice the registers, which the state kernels spill. fp16 (whose range a weight may
    exceed) and fp32 go through fp32."""
    if x.dtype == tl.bfloat16:
        return x * w.to(tl.bfloat16)[:, None]
    else:
        return (x.to(tl.float32) * w[:, None]).to(x.dtype)


@triton.jit
def _compose_max_plus(shift_a, floor_a, shift_b, floor_b):
    """The map m -> max(m + shift, floor) of applying a, then b."""
    return shift_a + shift_b, tl.maximum(floor_a + shift_b, floor_b)


@triton.jit
def _chunk_summary_kernel(
    I, F, RESET, LOG_W, ORIGIN_FIRST, INTRA_MAX, CHUNK_DECAY, CHUNK_RESET, CHUNK_MAX, S, NH, NC,
    IS_EXP: tl.constexpr, L: tl.constexpr,
):  # fmt: skip
    """Per chunk, once, the gate sums the state and tile kernels need: per token the log-weight of
    its key in the state after the chunk (stabiliser excluded), the log-weight of the state before
    the chunk in its output (-inf after a reset) and (exp gate) the largest log-weight of its other
    sources in the chunk; per chunk the log decay over its last segment, whether it has a reset and
    the largest log-weight of its keys (so that the state kernels need no reduction over the chunk)."""
    chunk = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // NH
    gate_base = pid_bh * S
    reset_base = batch * S
    lanes = tl.arange(0, L)
    chunk_start = chunk * L
    t = chunk_start + lanes
    log_f, log_i, segment = _tile_gates(I, F, RESET, gate_base, reset_base, chunk_start, chunk_start, S, IS_EXP, L, L)
    # the log forget gates over (t, chunk end]: a reverse cumsum of the next tokens' gates
    next_valid = (lanes + 1 < L) & (t + 1 < S)
    log_f_next = tl.where(next_valid, _log_sigmoid(tl.load(F + gate_base + t + 1, mask=next_valid, other=0.0).to(tl.float32)), 0.0)
    after = tl.cumsum(log_f_next, 0, reverse=True)
    origin = tl.cumsum(log_f, 0)  # over [chunk start, t]
    last_segment = tl.max(segment, 0)
    in_last = segment == last_segment
    valid = t < S
    log_w = tl.where(in_last, after + log_i, float("-inf"))
    tl.store(LOG_W + gate_base + t, log_w, mask=valid)
    tl.store(CHUNK_MAX + pid_bh * NC + chunk, tl.max(log_w, 0))
    tl.store(ORIGIN_FIRST + gate_base + t, tl.where(segment == 0, origin, float("-inf")), mask=valid)
    tl.store(CHUNK_DECAY + pid_bh * NC + chunk, tl.sum(tl.where(in_last, log_f, 0.0), 0))
    tl.store(CHUNK_RESET + pid_bh * NC + chunk, (last_segment > 0).to(tl.int32))
    if IS_EXP:
        # the stabiliser's part inside the chunk: the largest log-weight of the token's keys and,
        # after a reset, of the zero state (m = 0) its segment starts from. That is the max-plus scan
        # m_t = max(m_{t-1} + log f_t, log i_t) over the chunk from m = -inf (the state before the
        # chunk is the output kernel's part), restarted from m = 0 at a reset: O(L) as an
        # associative scan of the maps m -> max(m + a, b).
        is_reset = tl.load(RESET + reset_base + t, mask=valid, other=0) != 0
        shift = tl.where(is_reset, float("-inf"), log_f)
        floor = tl.where(is_reset, tl.maximum(log_f, log_i), log_i)
        _, intra_max = tl.associative_scan((shift, floor), 0, _compose_max_plus)
        tl.store(INTRA_MAX + gate_base + t, intra_max, mask=valid)


@triton.jit
def _carry(CHUNK_DECAY, CHUNK_RESET, pid_bh, chunk, NC, m_prev, m_next):
    """The carried state's weight over one chunk: zero after a reset (the state is dropped)."""
    decay = tl.load(CHUNK_DECAY + pid_bh * NC + chunk)
    has_reset = tl.load(CHUNK_RESET + pid_bh * NC + chunk) > 0
    return tl.where(has_reset, 0.0, tl.exp(decay + m_prev - m_next))


@triton.jit
def _state_update(
    LOG_W, CHUNK_DECAY, CHUNK_RESET, CHUNK_MAX, pid_bh, chunk, t, valid, S, NC, m_prev, IS_EXP: tl.constexpr
):  # fmt: skip
    """Weights of the state update over one chunk: C_next = carry * C_prev + sum_s w_s k_s v_s^T.
    Only the chunk's last segment reaches the next state. The keys' largest log-weight comes from the
    summary: a reduction over the chunk here would put a barrier into every step of the recurrence."""
    log_w = tl.load(LOG_W + pid_bh * S + t, mask=valid, other=float("-inf"))
    has_reset = tl.load(CHUNK_RESET + pid_bh * NC + chunk) > 0
    m_origin = tl.where(has_reset, 0.0, m_prev)
    if IS_EXP:
        m_next = tl.maximum(tl.load(CHUNK_DECAY + pid_bh * NC + chunk) + m_origin, tl.load(CHUNK_MAX + pid_bh * NC + chunk))
    else:
        m_next = m_origin
    carry = _carry(CHUNK_DECAY, CHUNK_RESET, pid_bh, chunk, NC, m_prev, m_next)
    return carry, tl.exp(log_w - m_next), m_next


@triton.jit
def _fwd_states_kernel(
    K, V, LOG_W, CHUNK_DECAY, CHUNK_RESET, CHUNK_MAX, C0, N0, M0, C_STATES, N_STATES, M_STATES, C_LAST,
    S, DQK, DV, NC,
    HAS_INIT: tl.constexpr, IS_EXP: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # the tiles of one head are neighbouring programs, so that they walk its chunks together and
    # read each chunk's keys and values from L2 rather than once per tile from memory
    tile_id = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_k = tile_id // tl.cdiv(DV, BV)
    pid_v = tile_id % tl.cdiv(DV, BV)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DQK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    tau = tl.arange(0, L)
    tile_kv = offs_k[:, None] * DV + offs_v[None, :]

    m = tl.load(M0 + pid_bh).to(tl.float32)
    if HAS_INIT:
        c = tl.load(C0 + pid_bh * DQK * DV + tile_kv, mask=mask_kv, other=0.0).to(tl.float32)
        n = tl.load(N0 + pid_bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BK, BV], dtype=tl.float32)
        n = tl.zeros([BK], dtype=tl.float32)

    for chunk in range(NC):
        state_index = pid_bh * (NC + 1) + chunk
        tl.store(C_STATES + state_index * DQK * DV + tile_kv, c.to(C_STATES.dtype.element_ty), mask=mask_kv)
        if pid_v == 0:
            tl.store(N_STATES + state_index * DQK + offs_k, n, mask=mask_k)
            if pid_k == 0:
                tl.store(M_STATES + state_index, m)
        t = chunk * L + tau
        valid = t < S
        carry, w, m = _state_update(LOG_W, CHUNK_DECAY, CHUNK_RESET, CHUNK_MAX, pid_bh, chunk, t, valid, S, NC, m, IS_EXP)
        rows = pid_bh * S + t
        k_chunk = tl.load(K + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        v_chunk = tl.load(V + rows[:, None] * DV + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        v_weighted = _scale_rows(v_chunk, w)
        c = carry * c + tl.dot(tl.trans(k_chunk), v_weighted, input_precision=DOT_PRECISION)
        if pid_v == 0:  # the other DV tiles' programs neither need n nor store it
            n = carry * n + tl.sum(k_chunk.to(tl.float32) * w[:, None], 0)

    # the final state is an output: kept in fp32 (C_STATES may hold a narrower copy)
    state_index = pid_bh * (NC + 1) + NC
    tl.store(C_LAST + pid_bh * DQK * DV + tile_kv, c, mask=mask_kv)
    if pid_v == 0:
        tl.store(N_STATES + state_index * DQK + offs_k, n, mask=mask_k)
        if pid_k == 0:
            tl.store(M_STATES + state_index, m)


@triton.jit
def _bwd_states_kernel(
    Q, DH, LOG_W, ORIGIN_FIRST, CHUNK_DECAY, CHUNK_RESET, M_TOKENS, DEN, DQN, C_STATES, N_STATES, M_STATES,
    DC_LAST, DN_LAST, DC_STATES, DN_STATES, DC_FIRST, CARRY_DOTS,
    S, DQK, DV, NC, scale,
    HAS_DLAST: tl.constexpr, IS_EXP: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    # the tiles of one head are neighbouring programs, so that they walk its chunks together and
    # read each chunk's keys and values from L2 rather than once per tile from memory
    tile_id = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_k = tile_id // tl.cdiv(DV, BV)
    pid_v = tile_id % tl.cdiv(DV, BV)
    offs_k = pid_k * BK + tl.arange(0, BK)
    offs_v = pid_v * BV + tl.arange(0, BV)
    mask_k = offs_k < DQK
    mask_v = offs_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    tau = tl.arange(0, L)
    tile_kv = offs_k[:, None] * DV + offs_v[None, :]

    if HAS_DLAST:
        dc = tl.load(DC_LAST + pid_bh * DQK * DV + tile_kv, mask=mask_kv, other=0.0).to(tl.float32)
        dn = tl.load(DN_LAST + pid_bh * DQK + offs_k, mask=mask_k, other=0.0).to(tl.float32)
    else:
        dc = tl.zeros([BK, BV], dtype=tl.float32)
        dn = tl.zeros([BK], dtype=tl.float32)

    # <state before the chunk, its gradient after the chunk> per chunk: the gradient of the carried
    # state's log-weight. Summed here, where dC is at hand in fp32, so that the dk/dv kernel does not
    # read C; each program stores its BK row sums and the gate kernel adds them up (summing over the
    # rows as well would need a barrier across warps in every step of the recurrence).
    n_tiles = tl.num_programs(0)
    for step in range(NC):
        chunk = NC - 1 - step
        state_index = pid_bh * (NC + 1) + chunk
        tl.store(DC_STATES + (state_index + 1) * DQK * DV + tile_kv, dc.to(DC_STATES.dtype.element_ty), mask=mask_kv)
        c_tile = tl.load(C_STATES + state_index * DQK * DV + tile_kv, mask=mask_kv, other=0.0).to(tl.float32)
        carry_dots = tl.sum(c_tile * dc, 1)
        if pid_v == 0:
            tl.store(DN_STATES + (state_index + 1) * DQK + offs_k, dn, mask=mask_k)
            n_tile = tl.load(N_STATES + state_index * DQK + offs_k, mask=mask_k, other=0.0)
            carry_dots += n_tile * dn
        tl.store(CARRY_DOTS + ((pid_bh * NC + chunk) * n_tiles + tile_id) * BK + tl.arange(0, BK), carry_dots)
        t = chunk * L + tau
        valid = t < S
        rows = pid_bh * S + t
        m_prev = tl.load(M_STATES + state_index)
        carry = _carry(CHUNK_DECAY, CHUNK_RESET, pid_bh, chunk, NC, m_prev, tl.load(M_STATES + state_index + 1))
        m = tl.load(M_TOKENS + rows, mask=valid, other=0.0)
        den = tl.load(DEN + rows, mask=valid, other=1.0)
        dqn = tl.load(DQN + rows, mask=valid, other=0.0)
        origin = tl.load(ORIGIN_FIRST + rows, mask=valid, other=float("-inf"))
        w_origin = tl.exp(origin + m_prev - m)  # zero after a reset

        q_tile = tl.load(Q + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        dh_tile = tl.load(DH + rows[:, None] * DV + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        dh_weighted = _scale_rows(dh_tile, w_origin * scale / den)
        dc = carry * dc + tl.dot(tl.trans(q_tile), dh_weighted, input_precision=DOT_PRECISION)
        if pid_v == 0:
            dn = carry * dn + tl.sum(q_tile.to(tl.float32) * (w_origin * scale * dqn)[:, None], 0)

    # the gradient of the initial state is an output: fp32
    state_index = pid_bh * (NC + 1)
    tl.store(DC_FIRST + pid_bh * DQK * DV + tile_kv, dc, mask=mask_kv)
    if pid_v == 0:
        tl.store(DN_STATES + state_index * DQK + offs_k, dn, mask=mask_k)


@triton.jit
def _fwd_output_kernel(
    Q, K, V, I, F, RESET, ORIGIN_FIRST, INTRA_MAX, C_STATES, N_STATES, M_STATES, H, M_TOKENS, QN_TOKENS,
    S, NH, DQK, DV, NC, scale, eps,
    IS_EXP: tl.constexpr, L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """h of one query tile: the state before the chunk plus the chunk's keys up to the tile, as one
    T x L block of weighted scores computed once (keys after the tile get weight zero) and applied
    to each DV slice of the values."""
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // NH
    chunk = tile // (L // T)
    chunk_start = chunk * L
    tile_start = tile * T
    tau = tl.arange(0, T)
    t = tile_start + tau
    valid = t < S
    rows = pid_bh * S + t
    s = chunk_start + tl.arange(0, L)  # the chunk's keys
    key_valid = (s < S) & (s < tile_start + T)
    key_rows = pid_bh * S + s
    state_index = pid_bh * (NC + 1) + chunk

    scores = tl.zeros([T, L], dtype=tl.float32)
    q_n = tl.zeros([T], dtype=tl.float32)
    # Not software-pipelined: q_tile feeds both the tensor cores and the q.n sum in registers, and
    # with 2 or 3 stages Triton 3.6 raced on it (H100, 4 warps: h differed between identical calls
    # in about 0.1% of its entries). Unpipelined, this loop costs no measurable time.
    for k0 in tl.range(0, DQK, BK, num_stages=1):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        q_tile = tl.load(Q + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        k_tile = tl.load(K + key_rows[:, None] * DQK + offs_k[None, :], mask=key_valid[:, None] & mask_k[None, :], other=0.0)
        scores = tl.dot(q_tile, tl.trans(k_tile), scores, input_precision=DOT_PRECISION)
        n_tile = tl.load(N_STATES + state_index * DQK + offs_k, mask=mask_k, other=0.0)
        q_n += tl.sum(q_tile.to(tl.float32) * n_tile[None, :], 1)

    # the stabiliser from the summary's gate sums (no pass over the keys needed)
    m_prev = tl.load(M_STATES + state_index)
    origin = tl.load(ORIGIN_FIRST + rows, mask=valid, other=float("-inf"))
    if IS_EXP:
        m = tl.maximum(origin + m_prev, tl.load(INTRA_MAX + rows, mask=valid, other=0.0))
        lower = tl.exp(-m)
    else:
        m = tl.zeros([T], dtype=tl.float32)
        lower = tl.full([T], 1.0, dtype=tl.float32)
    w_origin = tl.exp(origin + m_prev - m)  # zero after a reset and past the end

    log_d = _log_weights(I, F, RESET, pid_bh * S, batch * S, tile_start, chunk_start, t, s, S, IS_EXP, T, L)
    p = tl.where(valid[:, None], scores * scale * tl.exp(log_d - m[:, None]), 0.0)
    q_n = w_origin * scale * q_n + tl.sum(p, 1)
    den = tl.maximum(tl.abs(q_n), lower) + eps
    tl.store(M_TOKENS + rows, m, mask=valid)
    tl.store(QN_TOKENS + rows, q_n, mask=valid)

    p = p.to(Q.dtype.element_ty)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask_v = offs_v < DV
        # accumulate through tl.dot's acc argument, starting from zeros: Triton 3.6 miscompiled
        # `acc = tl.dot(p, v)` followed by a loop of `acc += tl.dot(...)` (wrong rows on H200)
        acc = tl.zeros([T, BV], dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < DQK
            q_tile = tl.load(
                Q + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0
            )
            c_tile = tl.load(
                C_STATES + state_index * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )
            acc = tl.dot(q_tile, c_tile.to(q_tile.dtype), acc, input_precision=DOT_PRECISION)
        # the state's weight is one number per query: applied to the product, not to its operands
        acc = acc * (w_origin * scale)[:, None]
        v_tile = tl.load(V + key_rows[:, None] * DV + offs_v[None, :], mask=key_valid[:, None] & mask_v[None, :], other=0.0)
        acc = tl.dot(p, v_tile, acc, input_precision=DOT_PRECISION)
        h = acc / den[:, None]
        tl.store(H + rows[:, None] * DV + offs_v[None, :], h.to(H.dtype.element_ty), mask=valid[:, None] & mask_v[None, :])


@triton.jit
def _bwd_scores_kernel(
    Q, K, V, I, F, RESET, DH, M_TOKENS, DEN, DQN, P_OUT, DS_OUT, DLOG_F, COL_SUMS,
    S, NH, DQK, DV, NC, scale,
    IS_EXP: tl.constexpr, L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Per (query tile, head), the T x L pieces of the backward, once: the weighted scores P and their
    gradients dS = dP * d in the input dtype, rows of an (S, L) matrix per head (the dq and dk/dv
    kernels load them instead of recomputing them next to their state tiles); the gradients of
    the log-weights' gates inside the query tile (DLOG_F) and, for the gates kernel, the column
    sums of the log-weight gradients (COL_SUMS, one L-vector per tile)."""
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // NH
    chunk = tile // (L // T)
    chunk_start = chunk * L
    tile_start = tile * T
    tau = tl.arange(0, T)
    t = tile_start + tau
    valid = t < S
    rows = pid_bh * S + t
    s = chunk_start + tl.arange(0, L)
    key_valid = (s < S) & (s < tile_start + T)
    key_rows = pid_bh * S + s
    m = tl.load(M_TOKENS + rows, mask=valid, other=0.0)
    den = tl.load(DEN + rows, mask=valid, other=1.0)
    dqn = tl.load(DQN + rows, mask=valid, other=0.0)

    scores = tl.zeros([T, L], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        q_tile = tl.load(Q + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        k_tile = tl.load(K + key_rows[:, None] * DQK + offs_k[None, :], mask=key_valid[:, None] & mask_k[None, :], other=0.0)
        scores = tl.dot(q_tile, tl.trans(k_tile), scores, input_precision=DOT_PRECISION)
    d_scores = tl.zeros([T, L], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask_v = offs_v < DV
        dh_tile = tl.load(DH + rows[:, None] * DV + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
        v_tile = tl.load(V + key_rows[:, None] * DV + offs_v[None, :], mask=key_valid[:, None] & mask_v[None, :], other=0.0)
        d_scores = tl.dot(dh_tile, tl.trans(v_tile), d_scores, input_precision=DOT_PRECISION)

    log_d = _log_weights(I, F, RESET, pid_bh * S, batch * S, tile_start, chunk_start, t, s, S, IS_EXP, T, L)
    # rows past the end have no stabiliser: keep their weights at zero, not exp(large)
    d = tl.where(valid[:, None], tl.exp(log_d - m[:, None]), 0.0)
    p = scores * scale * d
    d_p = d_scores / den[:, None] + dqn[:, None]  # the normaliser sums the same scores
    block = (pid_bh * tl.num_programs(0) + tile) * T * L + tau[:, None] * L + tl.arange(0, L)[None, :]
    tl.store(P_OUT + block, p.to(P_OUT.dtype.element_ty))
    tl.store(DS_OUT + block, (d_p * d).to(DS_OUT.dtype.element_ty))

    # Gate u of this tile lies in the interval (s, t] of the terms with queries t >= u of the tile
    # and keys s < u: a reverse cumsum down the columns sums the queries, a masked row sum the keys.
    # (Not as q.dq - k.dk, whose diagonal terms cancel when the forget gates are closed.)
    d_log_d = p * d_p
    queries_from = tl.cumsum(d_log_d, 0, reverse=True)
    tl.store(DLOG_F + rows, tl.sum(tl.where(s[None, :] < t[:, None], queries_from, 0.0), 1), mask=valid)
    tl.store(COL_SUMS + (pid_bh * tl.num_programs(0) + tile) * L + tl.arange(0, L), tl.sum(d_log_d, 0))


@triton.jit
def _bwd_dq_kernel(
    Q, K, DH, ORIGIN_FIRST, M_TOKENS, DEN, DQN, DS, C_STATES, N_STATES, M_STATES, DQ, DLOG_ORIGIN,
    S, DQK, DV, NC, scale,
    L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of one query tile, and per query the gradient of the incoming state's log-weight."""
    tile = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    chunk = tile // (L // T)
    tau = tl.arange(0, T)
    t = tile * T + tau
    valid = t < S
    rows = pid_bh * S + t
    s = chunk * L + tl.arange(0, L)
    key_valid = (s < S) & (s < tile * T + T)
    key_rows = pid_bh * S + s
    state_index = pid_bh * (NC + 1) + chunk  # the state before this chunk
    m_prev = tl.load(M_STATES + state_index)
    m = tl.load(M_TOKENS + rows, mask=valid, other=0.0)
    den = tl.load(DEN + rows, mask=valid, other=1.0)
    dqn = tl.load(DQN + rows, mask=valid, other=0.0)
    origin = tl.load(ORIGIN_FIRST + rows, mask=valid, other=float("-inf"))
    w_origin = tl.exp(origin + m_prev - m)  # zero after a reset and past the end
    d_scores = tl.load(DS + (pid_bh * tl.num_programs(0) + tile) * T * L + tau[:, None] * L + tl.arange(0, L)[None, :])

    d_log_origin = tl.zeros([T], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        q_tile = tl.load(Q + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        n_tile = tl.load(N_STATES + state_index * DQK + offs_k, mask=mask_k, other=0.0)
        # accumulated through tl.dot's acc argument from zeros, as in _fwd_output_kernel
        dq_state = tl.zeros([T, BK], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < DV
            dh_tile = tl.load(DH + rows[:, None] * DV + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
            c_tile = tl.load(
                C_STATES + state_index * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )
            dq_state = tl.dot(dh_tile, tl.trans(c_tile.to(q_tile.dtype)), dq_state, input_precision=DOT_PRECISION)
        dq_state = (w_origin / den)[:, None] * dq_state + (w_origin * dqn)[:, None] * n_tile[None, :]
        d_log_origin += tl.sum(q_tile.to(tl.float32) * dq_state, 1) * scale
        k_tile = tl.load(K + key_rows[:, None] * DQK + offs_k[None, :], mask=key_valid[:, None] & mask_k[None, :], other=0.0)
        dq = tl.dot(d_scores, k_tile, dq_state, input_precision=DOT_PRECISION) * scale
        tl.store(DQ + rows[:, None] * DQK + offs_k[None, :], dq.to(DQ.dtype.element_ty), mask=valid[:, None] & mask_k[None, :])
    tl.store(DLOG_ORIGIN + rows, d_log_origin, mask=valid)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DH, DEN, LOG_W, P, DS, M_STATES, DC_STATES, DN_STATES, DK, DV_OUT, DLOG_W,
    S, DQK, DV, NC, scale,
    L: tl.constexpr, T: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile, and per key the gradient of its log-weight in the state after the chunk.
    The intra-chunk parts loop over the chunk's query tiles from this one on (earlier ones do not
    see its keys), each a T x T block of P and dS."""
    tile = tl.program_id(0)
    n_tiles = tl.num_programs(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    chunk = tile // (L // T)
    last_query_tile = tl.minimum(chunk * (L // T) + L // T, n_tiles)  # the last chunk may be short
    tau = tl.arange(0, T)
    t = tile * T + tau
    valid = t < S
    rows = pid_bh * S + t
    # block (query tile a, this key tile) of P and dS: rows a*T + tau, columns of this tile's keys
    block = (pid_bh * n_tiles * T + tau)[:, None] * L + (tile * T - chunk * L + tau)[None, :]
    next_index = pid_bh * (NC + 1) + chunk + 1  # the state after this chunk
    # the key's weight in the state after the chunk, with that state's stabiliser
    w = tl.exp(tl.load(LOG_W + rows, mask=valid, other=float("-inf")) - tl.load(M_STATES + next_index))

    d_log_w = tl.zeros([T], dtype=tl.float32)
    for k0 in range(0, DQK, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_k = offs_k < DQK
        k_tile = tl.load(K + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        dn_tile = tl.load(DN_STATES + next_index * DQK + offs_k, mask=mask_k, other=0.0)
        dk_state = tl.zeros([T, BK], dtype=tl.float32)
        for v0 in range(0, DV, BV):
            offs_v = v0 + tl.arange(0, BV)
            mask_v = offs_v < DV
            v_tile = tl.load(V + rows[:, None] * DV + offs_v[None, :], mask=valid[:, None] & mask_v[None, :], other=0.0)
            dc_tile = tl.load(
                DC_STATES + next_index * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )
            dk_state = tl.dot(v_tile, tl.trans(dc_tile.to(k_tile.dtype)), dk_state, input_precision=DOT_PRECISION)
        # the key's weight is one number per row: applied to the products, not to their operands
        dk_state = w[:, None] * (dk_state + dn_tile[None, :])
        d_log_w += tl.sum(k_tile.to(tl.float32) * dk_state, 1)
        dk_queries = tl.zeros([T, BK], dtype=tl.float32)
        for a in range(tile, last_query_tile):
            query_t = a * T + tau
            q_tile = tl.load(
                Q + (pid_bh * S + query_t)[:, None] * DQK + offs_k[None, :],
                mask=(query_t < S)[:, None] & mask_k[None, :],
                other=0.0,
            )
            d_scores = tl.load(DS + block + a * T * L)
            dk_queries = tl.dot(tl.trans(d_scores), q_tile, dk_queries, input_precision=DOT_PRECISION)
        dk = dk_queries * scale + dk_state
        tl.store(DK + rows[:, None] * DQK + offs_k[None, :], dk.to(DK.dtype.element_ty), mask=valid[:, None] & mask_k[None, :])

    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask_v = offs_v < DV
        dv = tl.zeros([T, BV], dtype=tl.float32)
        for k0 in range(0, DQK, BK):
            offs_k = k0 + tl.arange(0, BK)
            mask_k = offs_k < DQK
            k_tile = tl.load(K + rows[:, None] * DQK + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
            dc_tile = tl.load(
                DC_STATES + next_index * DQK * DV + offs_k[:, None] * DV + offs_v[None, :],
                mask=mask_k[:, None] & mask_v[None, :],
                other=0.0,
            )
            dv = tl.dot(k_tile, dc_tile.to(k_tile.dtype), dv, input_precision=DOT_PRECISION)
        dv = dv * w[:, None]
        for a in range(tile, last_query_tile):
            query_t = a * T + tau
            query_valid = query_t < S
            query_rows = pid_bh * S + query_t
            p = tl.load(P + block + a * T * L)
            den = tl.load(DEN + query_rows, mask=query_valid, other=1.0)
            dh_tile = tl.load(DH + query_rows[:, None] * DV + offs_v[None, :], mask=query_valid[:, None] & mask_v[None, :], other=0.0)
            dh_scaled = _scale_rows(dh_tile, 1.0 / den)
            dv = tl.dot(tl.trans(p), dh_scaled, dv, input_precision=DOT_PRECISION)
        tl.store(DV_OUT + rows[:, None] * DV + offs_v[None, :], dv.to(DV_OUT.dtype.element_ty), mask=valid[:, None] & mask_v[None, :])
    tl.store(DLOG_W + rows, d_log_w, mask=valid)


@triton.jit
def _gate_grads_kernel(
    DLOG_F, DLOG_I, DLOG_ORIGIN, DLOG_W, COL_SUMS, CARRY_DOTS, CHUNK_DECAY, CHUNK_RESET, M_STATES,
    S, NC, N_TILES, N_CARRY_DOTS,
    L: tl.constexpr, T: tl.constexpr, CARRY_DOTS_POW2: tl.constexpr,
):  # fmt: skip
    """Per chunk: adds to the gate gradients of the scores kernel (DLOG_F: the terms of each gate's
    own query tile) the terms of the other intervals that contain each gate u:
    - the incoming-state terms of the queries t >= u (DLOG_ORIGIN),
    - the outgoing-state terms of the keys s < u (DLOG_W, which also adds to log i_s),
    - the carried state's term (every gate of the chunk),
    - the terms (t, s) of queries t in a later tile and keys s < u (COL_SUMS of that tile).
    Prefix sums exclude the token itself by loading the previous one, not by a subtraction."""
    chunk = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    NT: tl.constexpr = L // T
    lanes = tl.arange(0, L)
    t = chunk * L + lanes
    valid = t < S
    rows = pid_bh * S + t
    has_previous = valid & (lanes > 0)

    state_index = pid_bh * (NC + 1) + chunk
    carry = _carry(CHUNK_DECAY, CHUNK_RESET, pid_bh, chunk, NC, tl.load(M_STATES + state_index), tl.load(M_STATES + state_index + 1))
    parts = tl.arange(0, CARRY_DOTS_POW2)
    carry_dots = tl.load(CARRY_DOTS + (pid_bh * NC + chunk) * N_CARRY_DOTS + parts, mask=parts < N_CARRY_DOTS, other=0.0)

    d_log_f = tl.load(DLOG_F + rows, mask=valid, other=0.0) + carry * tl.sum(carry_dots, 0)
    d_log_f += tl.cumsum(tl.load(DLOG_ORIGIN + rows, mask=valid, other=0.0), 0, reverse=True)
    d_log_f += tl.cumsum(tl.load(DLOG_W + rows - 1, mask=has_previous, other=0.0), 0)
    d_log_i = tl.load(DLOG_W + rows, mask=valid, other=0.0)
    for a in tl.static_range(NT):
        tile = chunk * NT + a
        col_sums = COL_SUMS + (pid_bh * N_TILES + tile) * L + lanes
        exists = tile * L + lanes < N_TILES * L  # this query tile is not past the end
        d_log_i += tl.load(col_sums, mask=exists, other=0.0)
        keys_before = tl.cumsum(tl.load(col_sums - 1, mask=exists & (lanes > 0), other=0.0), 0)
        d_log_f += tl.where(lanes < a * T, keys_before, 0.0)
    tl.store(DLOG_F + rows, d_log_f, mask=valid)
    tl.store(DLOG_I + rows, d_log_i, mask=valid)


# --------------------------------------------------------------------------------------------------
# Host side


def _tile(dim: int, cap: int) -> int:
    """Head-dim tile: a power of two, at least 16 (tl.dot's minimum) and at most ``cap``."""
    return max(16, min(cap, triton.next_power_of_2(dim)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get true fp32 products; bf16/fp16 inputs are exact in any mode
    return "ieee" if dtype == torch.float32 else "tf32"


class _Config:
    """Shapes and launch parameters of one call. Each kernel's tiles and warps are plain attributes
    so that ``scripts/bench_kernels.py mlstm --breakdown`` can time variants."""

    def __init__(self, q, v, chunk_size, input_gate, eps):
        self.B, self.NH, self.S, self.DQK = q.shape
        self.DV = v.shape[-1]
        self.L = chunk_size
        self.T = min(DEFAULT_TILE_SIZE, chunk_size)
        self.NC = triton.cdiv(self.S, chunk_size)
        self.is_exp = input_gate == "exp"
        self.eps = eps
        self.scale = self.DQK**-0.5
        self.dot_precision = _dot_precision(q.dtype)
        # The tile kernels round C and dC to the input dtype before their tensor-core products, so
        # the states they read are stored in it: half the bytes of fp32 for bf16 inputs. The
        # recurrences run in fp32, and the final state and the initial state's gradient are fp32
        # outputs of their own.
        self.state_dtype = q.dtype
        # state kernels: one program per (head, DQK tile, DV tile) walking the chunks
        self.fwd_states = dict(BK=_tile(self.DQK, 64), BV=_tile(self.DV, 128), num_warps=4, num_stages=2)
        # no software pipelining in the backward recurrence: its registers go to the carried-state
        # term instead
        self.bwd_states = dict(self.fwd_states, num_stages=1)
        # tile kernels: one program per (tile, head) looping over head-dim slices; three pipeline
        # stages where state tiles stream through the inner loop (faster in the output and dq kernels
        # at the 7B layer's shape, no different elsewhere: docs/benchmarks.md, mLSTM runs)
        tile_kernels = dict(BK=_tile(self.DQK, 64), BV=_tile(self.DV, 128), num_warps=4, num_stages=2)
        self.output = dict(tile_kernels, num_stages=3)
        self.scores = dict(tile_kernels)
        self.dq = dict(tile_kernels, num_stages=3)
        self.dkdv = dict(tile_kernels, num_stages=3)
        # the input gates' gradients: one program per head scanning blocks of tokens from the end;
        # few programs at long sequences, so each takes wide blocks and many warps (measured against
        # narrower blocks on fewer warps in docs/benchmarks.md, mLSTM run G)
        self.input_gates = dict(BLOCK=4096, num_warps=16)
        # 2: the backward runs the scores and dq kernels on a second CUDA stream, beside the reverse
        # recurrence, which hides them (docs/benchmarks.md, mLSTM run H); 1: every kernel on the
        # caller's stream
        self.streams = 2

    def override(self, settings: str) -> None:
        """Apply launch settings such as ``"tile=32,states.num_stages=3,dkdv.num_warps=8"`` (for
        benchmarks and tests of the variants; ``states`` sets both state kernels, ``grads`` the three
        backward tile kernels, ``tile`` the tile size T, ``state_dtype`` the stored states' dtype,
        ``streams=1`` the backward on one stream)."""
        for item in settings.split(","):
            key, value = item.split("=")
            if key == "state_dtype":
                self.state_dtype = getattr(torch, value)
            elif key == "tile":
                self.T = int(value)
            elif key == "streams":
                self.streams = int(value)
            else:
                group, name = key.split(".")
                groups = {"states": ("fwd_states", "bwd_states"), "grads": ("scores", "dq", "dkdv")}.get(group, (group,))
                for group in groups:
                    getattr(self, group)[name] = int(value)
        if self.T < 16 or self.L % self.T or self.T & (self.T - 1):
            raise ValueError(f"mlstm: tile {self.T} must be a power of two >= 16 dividing the chunk size {self.L}")

    @property
    def n_tiles(self) -> int:
        return triton.cdiv(self.S, self.T)


class _ChunkSummary:
    """Gate sums per chunk (see ``_chunk_summary_kernel``), computed once per call."""

    @classmethod
    def saved(cls, log_w, origin_first, decay, has_reset) -> _ChunkSummary:
        """The parts the backward reads, as the forward saved them."""
        summary = cls.__new__(cls)
        summary.log_w, summary.origin_first, summary.decay, summary.has_reset = log_w, origin_first, decay, has_reset
        return summary

    def __init__(self, i, f, reset, cfg: _Config):
        BH = cfg.B * cfg.NH
        self.log_w = torch.empty(BH, cfg.S, device=i.device, dtype=torch.float32)
        self.origin_first = torch.empty_like(self.log_w)
        self.intra_max = torch.empty_like(self.log_w) if cfg.is_exp else self.log_w  # not read
        self.decay = torch.empty(BH, cfg.NC, device=i.device, dtype=torch.float32)
        self.has_reset = torch.empty(BH, cfg.NC, device=i.device, dtype=torch.int32)
        self.chunk_max = torch.empty_like(self.decay)
        _chunk_summary_kernel[(cfg.NC, BH)](
            i, f, reset, self.log_w, self.origin_first, self.intra_max, self.decay, self.has_reset, self.chunk_max,
            cfg.S, cfg.NH, cfg.NC, IS_EXP=cfg.is_exp, L=cfg.L, num_warps=4,
        )  # fmt: skip


def _launch_fwd_states(k, v, summary: _ChunkSummary, c0, n0, m0, cfg: _Config):
    BH = cfg.B * cfg.NH
    dev = k.device
    # slot NC of c_states stays unwritten: the final state goes to c_last
    c_states = torch.empty(BH, cfg.NC + 1, cfg.DQK, cfg.DV, device=dev, dtype=cfg.state_dtype)
    c_last = torch.empty(BH, cfg.DQK, cfg.DV, device=dev, dtype=torch.float32)
    n_states = torch.empty(BH, cfg.NC + 1, cfg.DQK, device=dev, dtype=torch.float32)
    m_states = torch.empty(BH, cfg.NC + 1, device=dev, dtype=torch.float32)
    has_init = c0 is not None
    m0_flat = m0.reshape(BH).float().contiguous() if m0 is not None else torch.zeros(BH, device=dev)
    c0_arg = c0.float().contiguous() if has_init else c_last
    n0_arg = n0.float().contiguous() if has_init else n_states
    launch = cfg.fwd_states
    grid = (triton.cdiv(cfg.DQK, launch["BK"]) * triton.cdiv(cfg.DV, launch["BV"]), BH)
    _fwd_states_kernel[grid](
        k, v, summary.log_w, summary.decay, summary.has_reset, summary.chunk_max, c0_arg, n0_arg, m0_flat,
        c_states, n_states, m_states, c_last, cfg.S, cfg.DQK, cfg.DV, cfg.NC,
        HAS_INIT=has_init, IS_EXP=cfg.is_exp, L=cfg.L, DOT_PRECISION=cfg.dot_precision, **launch,
    )  # fmt: skip
    return c_states, n_states, m_states, c_last


def _launch_fwd_output(q, k, v, i, f, reset, summary: _ChunkSummary, c_states, n_states, m_states, cfg: _Config):
    dev = q.device
    h = torch.empty(cfg.B, cfg.NH, cfg.S, cfg.DV, device=dev, dtype=q.dtype)
    m_tokens = torch.empty(cfg.B, cfg.NH, cfg.S, device=dev, dtype=torch.float32)
    qn_tokens = torch.empty(cfg.B, cfg.NH, cfg.S, device=dev, dtype=torch.float32)
    _fwd_output_kernel[(cfg.n_tiles, cfg.B * cfg.NH)](
        q, k, v, i, f, reset, summary.origin_first, summary.intra_max, c_states, n_states, m_states,
        h, m_tokens, qn_tokens, cfg.S, cfg.NH, cfg.DQK, cfg.DV, cfg.NC, cfg.scale, cfg.eps,
        IS_EXP=cfg.is_exp, L=cfg.L, T=cfg.T, DOT_PRECISION=cfg.dot_precision, **cfg.output,
    )  # fmt: skip
    return h, m_tokens, qn_tokens


def _forward(q, k, v, i, f, reset, c0, n0, m0, cfg: _Config):
    summary = _ChunkSummary(i, f, reset, cfg)
    c_states, n_states, m_states, c_last = _launch_fwd_states(k, v, summary, c0, n0, m0, cfg)
    h, m_tokens, qn_tokens = _launch_fwd_output(q, k, v, i, f, reset, summary, c_states, n_states, m_states, cfg)
    return h, summary, c_states, n_states, m_states, c_last, m_tokens, qn_tokens


def _launch_bwd_states(q, dh, summary, m_tokens, den, dqn, states, dc_last, dn_last, cfg: _Config):
    BH = cfg.B * cfg.NH
    c_states, n_states, m_states = states
    has_dlast = dc_last is not None or dn_last is not None
    # slot 0 of dc_states stays unwritten: the initial state's gradient goes to dc_first
    dc_states = torch.empty(BH, cfg.NC + 1, cfg.DQK, cfg.DV, device=q.device, dtype=cfg.state_dtype)
    dc_first = torch.empty(BH, cfg.DQK, cfg.DV, device=q.device, dtype=torch.float32)
    dn_states = torch.empty(BH, cfg.NC + 1, cfg.DQK, device=q.device, dtype=torch.float32)
    if has_dlast:  # autograd passes None for an output without a gradient
        dc_last = torch.zeros_like(dc_first) if dc_last is None else dc_last.float().contiguous()
        dn_last = torch.zeros_like(dn_states[:, -1]) if dn_last is None else dn_last.float().contiguous()
    else:
        dc_last, dn_last = dc_first, dn_states  # not read
    launch = cfg.bwd_states
    grid = (triton.cdiv(cfg.DQK, launch["BK"]) * triton.cdiv(cfg.DV, launch["BV"]), BH)
    carry_dots = torch.empty(BH, cfg.NC, grid[0] * launch["BK"], device=q.device, dtype=torch.float32)
    _bwd_states_kernel[grid](
        q, dh, summary.log_w, summary.origin_first, summary.decay, summary.has_reset, m_tokens, den, dqn,
        c_states, n_states, m_states, dc_last, dn_last, dc_states, dn_states, dc_first, carry_dots,
        cfg.S, cfg.DQK, cfg.DV, cfg.NC, cfg.scale,
        HAS_DLAST=has_dlast, IS_EXP=cfg.is_exp, L=cfg.L, DOT_PRECISION=cfg.dot_precision, **launch,
    )  # fmt: skip
    return dc_states, dn_states, dc_first, carry_dots


def _launch_bwd_query_grads(q, k, v, i, f, reset, dh, m_tokens, den, dqn, summary, states, cfg: _Config):
    """The backward's tile kernels that need neither dC nor dn: the scores (P, dS and the gates'
    in-tile terms) and dq."""
    BH = cfg.B * cfg.NH
    dq = torch.empty_like(q)
    d_log_f = torch.empty(BH, cfg.S, device=q.device, dtype=torch.float32)
    d_log_origin = torch.empty_like(d_log_f)
    c_states, n_states, m_states = states
    # P and dS: per head an (S, L) matrix, the row of each query over its chunk's keys
    p = torch.empty(BH, cfg.n_tiles * cfg.T, cfg.L, device=q.device, dtype=q.dtype)
    d_scores = torch.empty_like(p)
    col_sums = torch.empty(BH, cfg.n_tiles, cfg.L, device=q.device, dtype=torch.float32)
    launch = dict(L=cfg.L, T=cfg.T, DOT_PRECISION=cfg.dot_precision)
    grid = (cfg.n_tiles, BH)
    _bwd_scores_kernel[grid](
        q, k, v, i, f, reset, dh, m_tokens, den, dqn, p, d_scores, d_log_f, col_sums,
        cfg.S, cfg.NH, cfg.DQK, cfg.DV, cfg.NC, cfg.scale, IS_EXP=cfg.is_exp, **launch, **cfg.scores,
    )  # fmt: skip
    _bwd_dq_kernel[grid](
        q, k, dh, summary.origin_first, m_tokens, den, dqn, d_scores, c_states, n_states, m_states, dq, d_log_origin,
        cfg.S, cfg.DQK, cfg.DV, cfg.NC, cfg.scale, **launch, **cfg.dq,
    )  # fmt: skip
    return dq, p, d_scores, d_log_f, d_log_origin, col_sums


def _launch_bwd_key_grads(q, k, v, dh, den, summary, m_states, query_grads, d_states, cfg: _Config):
    """dk, dv and the gate gradients, once the scores and the states' gradients are there."""
    dq, p, d_scores, d_log_f, d_log_origin, col_sums = query_grads
    dc_states, dn_states, carry_dots = d_states
    BH = cfg.B * cfg.NH
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    d_log_i, d_log_w = torch.empty_like(d_log_f), torch.empty_like(d_log_f)
    _bwd_dkdv_kernel[(cfg.n_tiles, BH)](
        q, k, v, dh, den, summary.log_w, p, d_scores, m_states, dc_states, dn_states, dk, dv, d_log_w,
        cfg.S, cfg.DQK, cfg.DV, cfg.NC, cfg.scale, L=cfg.L, T=cfg.T, DOT_PRECISION=cfg.dot_precision, **cfg.dkdv,
    )  # fmt: skip
    n_carry_dots = carry_dots.shape[-1]
    _gate_grads_kernel[(cfg.NC, BH)](
        d_log_f, d_log_i, d_log_origin, d_log_w, col_sums, carry_dots, summary.decay, summary.has_reset, m_states,
        cfg.S, cfg.NC, cfg.n_tiles, n_carry_dots,
        L=cfg.L, T=cfg.T, CARRY_DOTS_POW2=triton.next_power_of_2(n_carry_dots), num_warps=4,
    )  # fmt: skip
    shape = (cfg.B, cfg.NH, cfg.S)
    return dq, dk, dv, d_log_f.view(shape), d_log_i.view(shape)


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """A second stream per device, made once: creating streams per call would cost a driver call."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


def _launch_bwd_grads(q, k, v, i, f, reset, dh, m_tokens, den, dqn, summary, states, dc_last, dn_last, cfg: _Config):
    """The backward after the normaliser: the reverse recurrence, then dq, dk, dv and the gates'
    gradients. The recurrence (few programs, each bound by memory latency) does not depend on the
    scores and dq kernels (tensor-core tiles): on a GPU those run on a second stream, so that their
    programs fill the SMs the recurrence leaves idle. Returns those gradients and the initial
    state's (dc_first, dn_states)."""
    main = torch.cuda.current_stream(q.device) if q.is_cuda and cfg.streams > 1 else None
    if main is not None:
        side = _side_stream(q.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            query_grads = _launch_bwd_query_grads(q, k, v, i, f, reset, dh, m_tokens, den, dqn, summary, states, cfg)
        for tensor in query_grads:  # allocated on the side stream, used and freed on the main one
            tensor.record_stream(main)
    else:
        query_grads = _launch_bwd_query_grads(q, k, v, i, f, reset, dh, m_tokens, den, dqn, summary, states, cfg)
    dc_states, dn_states, dc_first, carry_dots = _launch_bwd_states(
        q, dh, summary, m_tokens, den, dqn, states, dc_last, dn_last, cfg
    )
    if main is not None:
        main.wait_stream(side)
    grads = _launch_bwd_key_grads(q, k, v, dh, den, summary, states[2], query_grads, (dc_states, dn_states, carry_dots), cfg)
    return grads, dc_first, dn_states


@triton.jit
def _normaliser_grads_kernel(
    DH, H, M_TOKENS, QN_TOKENS, DEN, DELTA, DQN, ROWS, DV, eps,
    IS_EXP: tl.constexpr, BR: tl.constexpr, BV: tl.constexpr,
):  # fmt: skip
    """Per token: den = max(|qn|, lower) + eps, delta = sum_d dh * h, and the gradient of qn."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    valid = rows < ROWS
    delta = tl.zeros([BR], dtype=tl.float32)
    for v0 in range(0, DV, BV):
        offs_v = v0 + tl.arange(0, BV)
        mask = valid[:, None] & (offs_v < DV)[None, :]
        dh = tl.load(DH + rows[:, None] * DV + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * DV + offs_v[None, :], mask=mask, other=0.0).to(tl.float32)
        delta += tl.sum(dh * h, 1)
    qn = tl.load(QN_TOKENS + rows, mask=valid, other=0.0)
    if IS_EXP:
        lower = tl.exp(-tl.load(M_TOKENS + rows, mask=valid, other=0.0))
    else:
        lower = tl.full([BR], 1.0, dtype=tl.float32)
    den = tl.maximum(tl.abs(qn), lower) + eps
    sign = tl.where(qn >= 0, 1.0, -1.0)
    dqn = tl.where(tl.abs(qn) >= lower, -delta / den * sign, 0.0)
    tl.store(DEN + rows, den, mask=valid)
    tl.store(DELTA + rows, delta, mask=valid)
    tl.store(DQN + rows, dqn, mask=valid)


def _normaliser_grads(dh, h, m_tokens, qn_tokens, cfg: _Config):
    """den = max(|qn|, lower) + eps with h = num / den: the per-token pieces the backward needs."""
    den, delta, dqn = (torch.empty_like(qn_tokens) for _ in range(3))
    rows = qn_tokens.numel()
    block_rows = 32
    _normaliser_grads_kernel[(triton.cdiv(rows, block_rows),)](
        dh, h, m_tokens, qn_tokens, den, delta, dqn, rows, cfg.DV, cfg.eps,
        IS_EXP=cfg.is_exp, BR=block_rows, BV=_tile(cfg.DV, 128), num_warps=4,
    )  # fmt: skip
    return den, delta, dqn


@triton.jit
def _compose_affine(scale_a, shift_a, scale_b, shift_b):
    """The map x -> shift + scale * x of applying a, then b."""
    return scale_a * scale_b, shift_b + scale_b * shift_a


@triton.jit
def _carried(F, I, RESET, M_TOKENS, m0, rows, batch, t, S, valid):
    """Whether the stabiliser m_t = max(log f_t + m_{t-1}, log i_t) took the carried value, and
    whether that value was m_{t-1} (m0 for t = 0) rather than the zero a reset starts from."""
    log_f = _log_sigmoid(tl.load(F + rows, mask=valid, other=0.0).to(tl.float32))
    log_i = tl.load(I + rows, mask=valid, other=0.0).to(tl.float32)
    reset = tl.load(RESET + batch * S + t, mask=valid, other=0) != 0
    m_before = tl.load(M_TOKENS + rows - 1, mask=valid & (t > 0), other=0.0)
    m_before = tl.where(reset, 0.0, tl.where(t > 0, m_before, m0))
    carried = log_f + m_before >= log_i
    return carried, carried & ~reset & valid


@triton.jit
def _input_gate_grads_kernel(
    DLOG_F, DLOG_I, F, I, RESET, M_TOKENS, M0, DELTA, DEN, GRAD_M_LAST, DF, DI, DM0, S, NH, eps,
    IS_EXP: tl.constexpr, HAS_M0: tl.constexpr, HAS_GRAD_M_LAST: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per head: the gradients of the gate pre-activations from those of the log gates, with (exp
    gate) the stabiliser's part. The stabilisers enter the function only through eps (h_t depends
    on m_t as dh/dm = -h eps / den, so dL/dm_t = -eps delta_t / den_t) and the final state's scale
    (GRAD_M_LAST). m_t = max(log f_t + m_{t-1}, log i_t) routes its gradient to the winner, so the
    gradient reaching m_t is G_t = dL/dm_t + [m_{t+1} took m_t] G_{t+1}: a reverse affine
    recurrence, scanned block by block from the end (each block's tokens in descending order, so
    that a forward scan runs it)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    batch = pid_bh // NH
    m0 = tl.load(M0 + pid_bh) if HAS_M0 else 0.0
    g_after = 0.0  # G of the token after the block
    for block in range(tl.cdiv(S, BLOCK)):
        t = S - 1 - block * BLOCK - tl.arange(0, BLOCK)
        valid = t >= 0
        rows = pid_bh * S + t
        d_log_f = tl.load(DLOG_F + rows, mask=valid, other=0.0)
        d_log_i = tl.load(DLOG_I + rows, mask=valid, other=0.0)
        f = tl.load(F + rows, mask=valid, other=0.0).to(tl.float32)
        i = tl.load(I + rows, mask=valid, other=0.0).to(tl.float32)
        if IS_EXP:
            carried, linked = _carried(F, I, RESET, M_TOKENS, m0, rows, batch, t, S, valid)
            _, next_linked = _carried(F, I, RESET, M_TOKENS, m0, rows + 1, batch, t + 1, S, valid & (t + 1 < S))
            grad_m = -eps * tl.load(DELTA + rows, mask=valid, other=0.0) / tl.load(DEN + rows, mask=valid, other=1.0)
            if HAS_GRAD_M_LAST:
                grad_m += tl.where(t == S - 1, tl.load(GRAD_M_LAST + pid_bh), 0.0)
            through, g_block = tl.associative_scan((tl.where(next_linked, 1.0, 0.0), grad_m), 0, _compose_affine)
            g = g_block + through * g_after
            g_after = tl.sum(tl.where(tl.arange(0, BLOCK) == BLOCK - 1, g, 0.0), 0)
            d_log_f += tl.where(carried, g, 0.0)
            d_log_i += tl.where(carried, 0.0, g)
            if HAS_M0:
                tl.store(DM0 + pid_bh + t, tl.where(linked, g, 0.0), mask=t == 0)
            di = d_log_i
        else:
            di = d_log_i * tl.sigmoid(-i)
        tl.store(DF + rows, (d_log_f * tl.sigmoid(-f)).to(DF.dtype.element_ty), mask=valid)
        tl.store(DI + rows, di.to(DI.dtype.element_ty), mask=valid)


# The kernels as torch.library custom ops, so that torch.compile keeps a block that calls them in one
# graph: it sees each op through its fake (shapes only) and calls it as it is, never tracing into
# our host code (grids and buffers sized on the host, launch settings in _Config) or handing the
# Triton kernels to inductor (whose user-kernel path passes Python floats as fp64, which changes
# the kernels' loop-carried types). The forward returns what the backward needs as extra outputs.

_FWD_OUTPUTS = tuple[(torch.Tensor,) * 13]
_BWD_OUTPUTS = tuple[(torch.Tensor,) * 8]


@torch.library.custom_op("xlstm_kernels::mlstm_chunkwise_fwd", mutates_args=())
def _mlstm_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
    c0: torch.Tensor | None, n0: torch.Tensor | None, m0: torch.Tensor | None, reset: torch.Tensor,
    input_gate: str, chunk_size: int, eps: float,
) -> _FWD_OUTPUTS:  # fmt: skip
    """h, the final state (c, n, m) and, for the backward, the chunk states, the per-token
    stabiliser and normaliser and the chunk summary."""
    cfg = _Config(q, v, chunk_size, input_gate, eps)
    h, summary, c_states, n_states, m_states, c_last, m_tokens, qn_tokens = _forward(q, k, v, i, f, reset, c0, n0, m0, cfg)
    # an op's outputs may not alias each other: the final n and m are copied out of the state buffers
    n_last = n_states[:, -1].reshape(cfg.B, cfg.NH, cfg.DQK).clone()
    m_last = m_states[:, -1].reshape(cfg.B, cfg.NH, 1).clone()
    return (
        h, c_last.view(cfg.B, cfg.NH, cfg.DQK, cfg.DV), n_last, m_last, c_states, n_states, m_states,
        m_tokens, qn_tokens, summary.log_w, summary.origin_first, summary.decay, summary.has_reset,
    )  # fmt: skip


@_mlstm_fwd_op.register_fake
def _(q, k, v, i, f, c0, n0, m0, reset, input_gate, chunk_size, eps):
    cfg = _Config(q, v, chunk_size, input_gate, eps)
    B, NH, S, DQK, DV, NC = cfg.B, cfg.NH, cfg.S, cfg.DQK, cfg.DV, cfg.NC
    f32, BH = torch.float32, B * NH
    return (
        q.new_empty(B, NH, S, DV),  # h
        q.new_empty(B, NH, DQK, DV, dtype=f32), q.new_empty(B, NH, DQK, dtype=f32), q.new_empty(B, NH, 1, dtype=f32),
        q.new_empty(BH, NC + 1, DQK, DV, dtype=cfg.state_dtype), q.new_empty(BH, NC + 1, DQK, dtype=f32),
        q.new_empty(BH, NC + 1, dtype=f32),  # chunk states
        q.new_empty(B, NH, S, dtype=f32), q.new_empty(B, NH, S, dtype=f32),  # m_tokens, qn_tokens
        q.new_empty(BH, S, dtype=f32), q.new_empty(BH, S, dtype=f32),  # summary: log_w, origin_first
        q.new_empty(BH, NC, dtype=f32), q.new_empty(BH, NC, dtype=torch.int32),  # decay, has_reset
    )  # fmt: skip


@torch.library.custom_op("xlstm_kernels::mlstm_chunkwise_bwd", mutates_args=())
def _mlstm_bwd_op(
    dh: torch.Tensor | None, dc_last: torch.Tensor | None, dn_last: torch.Tensor | None, dm_last: torch.Tensor | None,
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, i: torch.Tensor, f: torch.Tensor,
    c0: torch.Tensor | None, n0: torch.Tensor | None, m0: torch.Tensor | None, reset: torch.Tensor,
    h: torch.Tensor, c_last: torch.Tensor, c_states: torch.Tensor, n_states: torch.Tensor, m_states: torch.Tensor,
    m_tokens: torch.Tensor, qn_tokens: torch.Tensor, log_w: torch.Tensor, origin_first: torch.Tensor,
    decay: torch.Tensor, has_reset: torch.Tensor, input_gate: str, chunk_size: int, eps: float,
) -> _BWD_OUTPUTS:  # fmt: skip
    """Gradients of q, k, v, i, f and of c0, n0, m0 (empty tensors for those not given)."""
    cfg = _Config(q, v, chunk_size, input_gate, eps)
    dev = q.device
    dh = dh.contiguous() if dh is not None else torch.zeros_like(h)

    den, delta, dqn = _normaliser_grads(dh, h, m_tokens, qn_tokens, cfg)
    summary = _ChunkSummary.saved(log_w, origin_first, decay, has_reset)
    states = (c_states, n_states, m_states)
    (dq, dk, dv, d_log_f, d_log_i), dc_first, dn_states = _launch_bwd_grads(
        q, k, v, i, f, reset, dh, m_tokens, den, dqn, summary, states, dc_last, dn_last, cfg
    )
    dc0 = dc_first.view(cfg.B, cfg.NH, cfg.DQK, cfg.DV)
    dn0 = dn_states[:, 0].reshape(cfg.B, cfg.NH, cfg.DQK)
    # the final state (c, n) is stored relative to exp(m_last): its gradients reach m_last
    grad_m_last = None
    if cfg.is_exp and (dc_last is not None or dn_last is not None or dm_last is not None):
        grad_m_last = torch.zeros(cfg.B, cfg.NH, device=dev, dtype=torch.float64)
        if dc_last is not None:
            grad_m_last -= (dc_last.double() * c_last.double()).sum((-1, -2))
        if dn_last is not None:
            grad_m_last -= (dn_last.double() * n_states[:, -1].view(cfg.B, cfg.NH, -1).double()).sum(-1)
        if dm_last is not None:
            grad_m_last += dm_last.reshape(cfg.B, cfg.NH).double()
        grad_m_last = grad_m_last.float()
    has_m0 = cfg.is_exp and m0 is not None
    m0_flat = m0.reshape(-1).float().contiguous() if has_m0 else den  # not read without
    dm0 = torch.empty(cfg.B * cfg.NH, device=dev, dtype=torch.float32) if has_m0 else None
    di, df = torch.empty_like(i), torch.empty_like(f)
    _input_gate_grads_kernel[(cfg.B * cfg.NH,)](
        d_log_f, d_log_i, f, i, reset, m_tokens, m0_flat, delta, den,
        grad_m_last if grad_m_last is not None else den, df, di, dm0 if has_m0 else den,
        cfg.S, cfg.NH, cfg.eps,
        IS_EXP=cfg.is_exp, HAS_M0=has_m0, HAS_GRAD_M_LAST=grad_m_last is not None,
        **dict(cfg.input_gates, BLOCK=min(cfg.input_gates["BLOCK"], triton.next_power_of_2(cfg.S))),
    )  # fmt: skip
    if has_m0:
        dm0 = dm0.double().view(cfg.B, cfg.NH)
        if c0 is not None:  # c0, n0 are stored relative to exp(m0)
            dm0 = dm0 + (dc0.double() * c0.double()).sum((-1, -2)) + (dn0.double() * n0.double()).sum(-1)
        dm0 = dm0.reshape(cfg.B, cfg.NH, 1).to(m0.dtype)
    dc0 = dc0.to(c0.dtype) if c0 is not None else q.new_empty(0)
    dn0 = dn0.to(n0.dtype) if n0 is not None else q.new_empty(0)
    return dq, dk, dv, di, df, dc0, dn0, dm0 if has_m0 else q.new_empty(0)


@_mlstm_bwd_op.register_fake
def _(dh, dc_last, dn_last, dm_last, q, k, v, i, f, c0, n0, m0, *saved_and_settings):
    has_m0 = saved_and_settings[-3] == "exp" and m0 is not None
    dc0, dn0, dm0 = (torch.empty_like(t) if t is not None else q.new_empty(0) for t in (c0, n0, m0 if has_m0 else None))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(i), torch.empty_like(f), dc0, dn0, dm0


def _mlstm_setup_context(ctx, inputs, output):
    q, k, v, i, f, c0, n0, m0, reset, input_gate, chunk_size, eps = inputs
    h, c_last, _n_last, _m_last, *saved = output
    # outputs nobody differentiates (the final state, in training) get None rather than a
    # materialised zero gradient: the backward then skips their terms
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(q, k, v, i, f, c0, n0, m0, reset, h, c_last, *saved)
    ctx.settings = (input_gate, chunk_size, eps)
    ctx.initial_given = (c0 is not None, n0 is not None, m0 is not None and input_gate == "exp")


def _mlstm_backward(ctx, dh, dc_last, dn_last, dm_last, *_saved_grads):
    dq, dk, dv, di, df, dc0, dn0, dm0 = _mlstm_bwd_op(dh, dc_last, dn_last, dm_last, *ctx.saved_tensors, *ctx.settings)
    dc0, dn0, dm0 = (g if given else None for g, given in zip((dc0, dn0, dm0), ctx.initial_given))
    return dq, dk, dv, di, df, dc0, dn0, dm0, None, None, None, None


_mlstm_fwd_op.register_autograd(_mlstm_backward, setup_context=_mlstm_setup_context)


def mlstm_chunkwise_triton(
    q, k, v, i, f, *, c0=None, n0=None, m0=None, input_gate="exp", chunk_size=None, doc_ids=None,
    return_state=False, eps=1e-6,
):  # fmt: skip
    """The chunkwise mLSTM on Triton kernels; same contract as ``xlstm_kernels.mlstm``."""
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"mlstm: impl='triton' takes float32, bfloat16 or float16 inputs, got {q.dtype}")
    chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    if not isinstance(chunk_size, int) or chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"mlstm: impl='triton' needs chunk_size a power of two >= 16, got {chunk_size!r}")
    B, NH, S, _ = q.shape
    if (c0 is None) != (n0 is None):
        # the kernels take the initial state whole: a missing half is zeros
        c0 = torch.zeros(B, NH, q.shape[-1], v.shape[-1], device=q.device) if c0 is None else c0
        n0 = torch.zeros(B, NH, q.shape[-1], device=q.device) if n0 is None else n0
    reset = document_resets(doc_ids, B, S, q.device).to(torch.int8)
    q, k, v = (x.contiguous() for x in (q, k, v))
    k, v = k.to(q.dtype), v.to(q.dtype)
    i, f = i.contiguous(), f.contiguous()
    h, c, n, m, *_saved = _mlstm_fwd_op(q, k, v, i, f, c0, n0, m0, reset, input_gate, chunk_size, eps)
    if not return_state:
        return h
    return h, (c, n, m if input_gate == "exp" else None)
