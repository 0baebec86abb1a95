"""The sLSTM cell as two persistent Triton kernels: one launch for the forward, one for the backward.

The sLSTM is sequential: y_t feeds the next step's gates through the block-diagonal recurrent
weights R. A launch per time step (the official CUDA kernel: a GEMM and a pointwise kernel per
step) is bound by launch latency, so both kernels here loop over time inside the kernel.

Work split. A program owns one head, one tile of batch rows (the M dimension of the matmuls, at
least 16) and a slice of W output units of that head, for all four gates. It keeps its slice of
R, (DH, 4 gates, W), on chip for the whole sequence. Each step needs the head's full y_{t-1}
(all DH units), so the NUM_SPLITS = DH / W programs of a (head, batch tile) group exchange their
slices through global memory every step. They must all be resident at once, which the launcher
checks (grid <= SM count). With NUM_SPLITS == 1 (small DH, and always under the Triton
interpreter, which runs programs one after another) y stays in registers and nothing is
exchanged.

The exchange carries its own readiness: each value travels as one 64-bit word, the step's tag
in the high half and the fp32 bits in the low half. An aligned 64-bit store is seen whole or not
at all (the premise of NCCL's low-latency protocol too), so a reader polls the words it needs with
gpu-scope loads until every tag is the step it waits for: no fence, counter or second round
trip. (Measured against a counter with release/acquire atomics: the backward took half the time.)
Two slots (even and odd steps) suffice: a program can only overwrite a slot after every program
of its group has read it, because it needs their next slice first.

Numerics. R and x are used as given (bf16 on the GPU); the states, y included, stay fp32. The
recurrent matmul takes y as a pair of bf16 matrices, hi = bf16(y) and lo = bf16(y - hi), and
adds both products (fp32 accumulate), so feeding y back costs no bf16 rounding: without it the
rounding is amplified through long recurrences, most visibly in the gradients. The backward's
recurrent product d raw_t @ R^T is split the same way.

Forward (per step, per program):
    raw_g = keep_t * (y_{t-1} @ R[:, g, slice]) + x_t[g, slice] + b[g, slice]
    pointwise gate math in fp32; y_t stored in x's dtype (the output), and with SAVE_STATES the
    fp32 pre-activations raw and states y, c, n, m for the backward (O(B S 4 DH) per head).
Backward (reverse loop): the gate values are recomputed pointwise from the saved raw_t and
state_{t-1}, the pointwise backward runs in fp32 on the program's slice, d raw_t is stored (it
is d x_gates), and d y_{t-1} = sum_g d raw_g @ R[:, g, :]^T is a sum over the group: each
program publishes its partial (B, DH) product and sums the peers' partials for the units it
owns. dR is one batched matmul over (B, t) after the loop; db is summed per program.

Document resets: where a token starts a new document the previous state (y, c, n, m) is
replaced by zeros, so raw loses its recurrent term and the gradient stops there.
"""

import torch
import triton
import triton.language as tl

# On-chip bytes one program may spend on its slice of R; beyond this the slice is re-read from
# cache every step instead of being held.
_HELD_R_BYTES = 128 * 1024
# A head whose whole R is at most this is one program (no exchange). The backward keeps R in two
# layouts, so a 128 KiB R would overflow shared memory.
_SINGLE_PROGRAM_R_BYTES = 64 * 1024
_DEFAULT_COLUMNS = 32


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _pack(values, tag):
    """fp32 values -> int64 words: tag in the high 32 bits, the float's bits in the low 32."""
    bits = values.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
    return bits | (tag.to(tl.int64) << 32)


@triton.jit
def _load_relaxed(ptrs):
    """gpu-scope relaxed 64-bit loads: served by L2 (never a stale L1 line) and, not being pure,
    never hoisted out of a polling loop. Every pointer must be valid."""
    return tl.inline_asm_elementwise(
        "ld.relaxed.gpu.global.b64 $0, [$1];", "=l,l", [ptrs], dtype=tl.int64, is_pure=False, pack=1
    )


@triton.jit
def _receive(ptrs, mask, tag):
    """Poll the words at `ptrs` until every one under `mask` carries `tag`; return their fp32
    values (0 outside `mask`)."""
    words = _load_relaxed(ptrs)
    while tl.min(tl.where(mask, (words >> 32).to(tl.int32), tag)) != tag:
        words = _load_relaxed(ptrs)
    values = words.to(tl.int32).to(tl.float32, bitcast=True)
    return tl.where(mask, values, 0.0)


@triton.jit
def _split_dot(a, b, acc, OPERAND: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b for fp32 `a` and `b` in OPERAND: a is split into OPERAND hi + lo parts.

    With an fp32 OPERAND (fp32 inputs, or the interpreter) it is one plain fp32 product.
    """
    if OPERAND == tl.float32:
        return tl.dot(a, b.to(tl.float32), acc=acc, input_precision=PRECISION)
    a_hi = a.to(OPERAND)
    a_lo = (a - a_hi.to(tl.float32)).to(OPERAND)
    acc = tl.dot(a_hi, b, acc=acc)
    return tl.dot(a_lo, b, acc=acc)


@triton.jit
def _load_r_slices(r_ptr, r_offsets, r_mask, DH: tl.constexpr):
    r_i = tl.load(r_ptr + r_offsets, mask=r_mask, other=0.0)
    r_f = tl.load(r_ptr + r_offsets + DH, mask=r_mask, other=0.0)
    r_z = tl.load(r_ptr + r_offsets + 2 * DH, mask=r_mask, other=0.0)
    r_o = tl.load(r_ptr + r_offsets + 3 * DH, mask=r_mask, other=0.0)
    return r_i, r_f, r_z, r_o


@triton.jit
def _load_gates(ptr, offsets, mask, DH: tl.constexpr):
    g_i = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    g_f = tl.load(ptr + offsets + DH, mask=mask, other=0.0).to(tl.float32)
    g_z = tl.load(ptr + offsets + 2 * DH, mask=mask, other=0.0).to(tl.float32)
    g_o = tl.load(ptr + offsets + 3 * DH, mask=mask, other=0.0).to(tl.float32)
    return g_i, g_f, g_z, g_o


@triton.jit
def _gate_step(raw_i, raw_f, raw_z, raw_o, c, n, m):
    """The official kernel's gate math (stabilized exp input gate, sigmoid forget gate)."""
    log_f_plus_m = m + _logsigmoid(raw_f)
    m_new = tl.where(n == 0.0, raw_i, tl.maximum(raw_i, log_f_plus_m))
    i_gate = tl.minimum(tl.exp(raw_i - m_new), 1.0)
    f_gate = tl.minimum(tl.exp(log_f_plus_m - m_new), 1.0)
    tanh_z = _tanh(raw_z)
    c_new = f_gate * c + i_gate * tanh_z
    n_new = f_gate * n + i_gate
    o_gate = tl.sigmoid(raw_o)
    return log_f_plus_m, m_new, i_gate, f_gate, tanh_z, c_new, n_new, o_gate


@triton.jit
def slstm_forward_kernel(
    x_ptr,  # (B, S, NH, 4, DH) gate inputs
    r_ptr,  # (NH, DH, 4, DH) recurrent weights, x's dtype
    b_ptr,  # (NH, 4, DH) fp32 biases
    starts_ptr,  # (B, S) int8, 1 where a document starts (read only with HAS_RESETS)
    out_ptr,  # (B, S, NH, DH) y in x's dtype
    raw_ptr,  # (B, S, NH, 4, DH) fp32 gate pre-activations, written with SAVE_STATES
    y_ptr,  # (B, T_STATES, NH, DH) fp32 states; [:, 0] holds state0. With SAVE_STATES
    c_ptr,  #   T_STATES = S + 1 and [:, t + 1] receives the state after step t, else
    n_ptr,  #   T_STATES = 2 and [:, 1] receives the final state.
    m_ptr,
    exchange_ptr,  # (groups, 2, BLOCK_B, BLOCK_DH) int64; slot 1 holds y0 with tag 0
    B,
    S,
    T_STATES,
    NH: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    W: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    NUM_BATCH_TILES: tl.constexpr,
    HOLD_R: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    SAVE_STATES: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    group = pid // NUM_SPLITS
    tile = group % NUM_BATCH_TILES
    head = group // NUM_BATCH_TILES

    local_rows = tl.arange(0, BLOCK_B)
    rows = tile * BLOCK_B + local_rows
    row_ok = rows < B
    rows = rows.to(tl.int64)
    cols = split * W + tl.arange(0, W)
    col_ok = cols < DH
    k = tl.arange(0, BLOCK_DH)
    k_ok = k < DH
    slice_mask = row_ok[:, None] & col_ok[None, :]
    row_mask = row_ok[:, None] & k_ok[None, :]

    r_offsets = head * (DH * 4 * DH) + k[:, None] * (4 * DH) + cols[None, :]
    r_mask = k_ok[:, None] & col_ok[None, :]
    if HOLD_R:
        r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
    b_i, b_f, b_z, b_o = _load_gates(b_ptr, head * (4 * DH) + cols[None, :], col_ok[None, :], DH)

    state_offsets = (rows[:, None] * T_STATES * NH + head) * DH + cols[None, :]
    c = tl.load(c_ptr + state_offsets, mask=slice_mask, other=0.0)
    n = tl.load(n_ptr + state_offsets, mask=slice_mask, other=0.0)
    m = tl.load(m_ptr + state_offsets, mask=slice_mask, other=0.0)
    y = tl.load(y_ptr + state_offsets, mask=slice_mask, other=0.0)

    slots = exchange_ptr + group * (2 * BLOCK_B * BLOCK_DH)
    slot_rows = local_rows[:, None] * BLOCK_DH
    x_row_offsets = rows[:, None] * S * NH * 4 * DH + head * 4 * DH + cols[None, :]
    out_row_offsets = (rows[:, None] * S * NH + head) * DH + cols[None, :]
    for t in range(S):
        # Loads that do not depend on the other programs go first, to overlap with the poll.
        x_offsets = x_row_offsets + t * NH * 4 * DH
        x_i, x_f, x_z, x_o = _load_gates(x_ptr, x_offsets, slice_mask, DH)
        if not HOLD_R:
            r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
        if NUM_SPLITS > 1:
            # y_{t-1} was published at step t - 1 with tag t, in slot (t - 1) % 2.
            y_prev = _receive(slots + ((t + 1) % 2) * (BLOCK_B * BLOCK_DH) + slot_rows + k[None, :], row_mask, t)
        else:
            y_prev = y
        acc_i = _split_dot(y_prev, r_i, tl.zeros((BLOCK_B, W), tl.float32), OPERAND, PRECISION)
        acc_f = _split_dot(y_prev, r_f, tl.zeros((BLOCK_B, W), tl.float32), OPERAND, PRECISION)
        acc_z = _split_dot(y_prev, r_z, tl.zeros((BLOCK_B, W), tl.float32), OPERAND, PRECISION)
        acc_o = _split_dot(y_prev, r_o, tl.zeros((BLOCK_B, W), tl.float32), OPERAND, PRECISION)
        if HAS_RESETS:
            start = tl.load(starts_ptr + rows * S + t, mask=row_ok, other=0) != 0
            keep = tl.where(start, 0.0, 1.0)[:, None]
            acc_i, acc_f, acc_z, acc_o = acc_i * keep, acc_f * keep, acc_z * keep, acc_o * keep
            c, n, m = c * keep, n * keep, m * keep
        raw_i = acc_i + x_i + b_i
        raw_f = acc_f + x_f + b_f
        raw_z = acc_z + x_z + b_z
        raw_o = acc_o + x_o + b_o
        _, m, _, _, _, c, n, o_gate = _gate_step(raw_i, raw_f, raw_z, raw_o, c, n, m)
        y = o_gate * c / n

        if NUM_SPLITS > 1:
            slot = slots + (t % 2) * (BLOCK_B * BLOCK_DH)
            tl.store(slot + slot_rows + cols[None, :], _pack(y, t + 1), mask=slice_mask)
        tl.store(out_ptr + out_row_offsets + t * NH * DH, y.to(out_ptr.dtype.element_ty), mask=slice_mask)
        if SAVE_STATES:
            tl.store(raw_ptr + x_offsets, raw_i, mask=slice_mask)
            tl.store(raw_ptr + x_offsets + DH, raw_f, mask=slice_mask)
            tl.store(raw_ptr + x_offsets + 2 * DH, raw_z, mask=slice_mask)
            tl.store(raw_ptr + x_offsets + 3 * DH, raw_o, mask=slice_mask)
            step_offsets = state_offsets + (t + 1) * NH * DH
            tl.store(y_ptr + step_offsets, y, mask=slice_mask)
            tl.store(c_ptr + step_offsets, c, mask=slice_mask)
            tl.store(n_ptr + step_offsets, n, mask=slice_mask)
            tl.store(m_ptr + step_offsets, m, mask=slice_mask)

    if not SAVE_STATES:
        tl.store(y_ptr + state_offsets + NH * DH, y, mask=slice_mask)
        tl.store(c_ptr + state_offsets + NH * DH, c, mask=slice_mask)
        tl.store(n_ptr + state_offsets + NH * DH, n, mask=slice_mask)
        tl.store(m_ptr + state_offsets + NH * DH, m, mask=slice_mask)


@triton.jit
def slstm_backward_kernel(
    raw_ptr,  # (B, S, NH, 4, DH) fp32 gate pre-activations from the forward
    r_ptr,  # (NH, DH, 4, DH)
    starts_ptr,  # (B, S) int8
    c_ptr,  # (B, S + 1, NH, DH) fp32 states from the forward ([:, 0] = state0)
    n_ptr,
    m_ptr,
    dy_ptr,  # (B, S, NH, DH) gradient of the output y
    d_last_ptr,  # (4, B, NH, DH) fp32 gradients of the final (y, c, n, m)
    dx_ptr,  # (B, S, NH, 4, DH) out: gradient of x_gates (= of the raw gates)
    d_first_ptr,  # (4, B, NH, DH) fp32 out: gradients of state0 (y, c, n, m)
    db_ptr,  # (NUM_BATCH_TILES, NH, 4, DH) fp32 out: per-tile bias gradients
    exchange_ptr,  # (groups, 2, NUM_SPLITS, BLOCK_B, BLOCK_DH) int64; slot 1, split 0 holds d y_T
    B,
    S,
    NH: tl.constexpr,
    DH: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_DH: tl.constexpr,
    W: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_POW2: tl.constexpr,
    NUM_BATCH_TILES: tl.constexpr,
    HOLD_R: tl.constexpr,
    HAS_RESETS: tl.constexpr,
    OPERAND: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    group = pid // NUM_SPLITS
    tile = group % NUM_BATCH_TILES
    head = group // NUM_BATCH_TILES

    local_rows = tl.arange(0, BLOCK_B)
    rows = tile * BLOCK_B + local_rows
    row_ok = rows < B
    rows = rows.to(tl.int64)
    cols = split * W + tl.arange(0, W)
    col_ok = cols < DH
    k = tl.arange(0, BLOCK_DH)
    k_ok = k < DH
    slice_mask = row_ok[:, None] & col_ok[None, :]
    row_mask = row_ok[:, None] & k_ok[None, :]

    r_offsets = head * (DH * 4 * DH) + k[:, None] * (4 * DH) + cols[None, :]
    r_mask = k_ok[:, None] & col_ok[None, :]
    if HOLD_R:
        r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)

    state_size = B * NH * DH
    last_offsets = (rows[:, None] * NH + head) * DH + cols[None, :]
    dy_rec = tl.load(d_last_ptr + last_offsets, mask=slice_mask, other=0.0)
    dc = tl.load(d_last_ptr + state_size + last_offsets, mask=slice_mask, other=0.0)
    dn = tl.load(d_last_ptr + 2 * state_size + last_offsets, mask=slice_mask, other=0.0)
    dm = tl.load(d_last_ptr + 3 * state_size + last_offsets, mask=slice_mask, other=0.0)
    db_i = tl.zeros((BLOCK_B, W), dtype=tl.float32)
    db_f = tl.zeros((BLOCK_B, W), dtype=tl.float32)
    db_z = tl.zeros((BLOCK_B, W), dtype=tl.float32)
    db_o = tl.zeros((BLOCK_B, W), dtype=tl.float32)

    # This program publishes its partial d y_{t-1} to [slot, split, :, :] and reads the group's
    # partials for its own units from [slot, :, :, cols].
    slots = exchange_ptr + group * (2 * NUM_SPLITS * BLOCK_B * BLOCK_DH)
    slot_size = NUM_SPLITS * BLOCK_B * BLOCK_DH
    write_offsets = split * (BLOCK_B * BLOCK_DH) + local_rows[:, None] * BLOCK_DH + k[None, :]
    peers = tl.minimum(tl.arange(0, SPLITS_POW2), NUM_SPLITS - 1)  # padding peers re-read the last
    read_offsets = (
        peers[:, None, None] * (BLOCK_B * BLOCK_DH) + local_rows[None, :, None] * BLOCK_DH + cols[None, None, :]
    )
    read_mask = (tl.arange(0, SPLITS_POW2)[:, None, None] < NUM_SPLITS) & slice_mask[None, :, :]

    x_row_offsets = rows[:, None] * S * NH * 4 * DH + head * 4 * DH + cols[None, :]
    state_row_offsets = (rows[:, None] * (S + 1) * NH + head) * DH + cols[None, :]
    dy_row_offsets = (rows[:, None] * S * NH + head) * DH + cols[None, :]
    for step in range(S):
        t = S - 1 - step
        # Everything up to the poll depends only on the forward's stored results.
        x_offsets = x_row_offsets + t * NH * 4 * DH
        raw_i, raw_f, raw_z, raw_o = _load_gates(raw_ptr, x_offsets, slice_mask, DH)
        state_offsets = state_row_offsets + t * NH * DH
        c_prev = tl.load(c_ptr + state_offsets, mask=slice_mask, other=0.0)
        n_prev = tl.load(n_ptr + state_offsets, mask=slice_mask, other=0.0)
        m_prev = tl.load(m_ptr + state_offsets, mask=slice_mask, other=0.0)
        dy_out = tl.load(dy_ptr + dy_row_offsets + t * NH * DH, mask=slice_mask, other=0.0).to(tl.float32)
        if not HOLD_R:
            r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
        if HAS_RESETS:
            start = tl.load(starts_ptr + rows * S + t, mask=row_ok, other=0) != 0
            keep = tl.where(start, 0.0, 1.0)[:, None]
            c_prev, n_prev, m_prev = c_prev * keep, n_prev * keep, m_prev * keep
        # The forward step again, pointwise, from its stored pre-activations.
        log_f_plus_m, m_new, i_gate, f_gate, tanh_z, c_new, n_new, o_gate = _gate_step(
            raw_i, raw_f, raw_z, raw_o, c_prev, n_prev, m_prev
        )

        if NUM_SPLITS > 1:
            # The partials of d y_t were published at step - 1 with tag `step`, in slot (step - 1) % 2.
            partials = _receive(slots + ((step + 1) % 2) * slot_size + read_offsets, read_mask, step)
            dy_rec = tl.sum(partials, axis=0)
        dy = dy_out + dy_rec

        # y = o * c / n
        do_raw = dy * (c_new / n_new) * o_gate * (1.0 - o_gate)
        dc = dc + dy * o_gate / n_new
        dn = dn - dy * o_gate * c_new / (n_new * n_new)
        # c = f' c_prev + i' tanh(z), n = f' n_prev + i'
        dz_raw = dc * i_gate * (1.0 - tanh_z * tanh_z)
        d_i_gate = dc * tanh_z + dn
        d_f_gate = dc * c_prev + dn * n_prev
        # i' = min(exp(i~ - m), 1) and f' = min(exp(lfpm - m), 1): no gradient where clamped, and
        # none through an exponent that is identically 0 (m is that very argument).
        d_i_arg = tl.where(raw_i < m_new, d_i_gate * i_gate, 0.0)
        d_f_arg = tl.where(log_f_plus_m < m_new, d_f_gate * f_gate, 0.0)
        dm_new = dm - d_i_arg - d_f_arg
        m_is_i = (n_prev == 0.0) | (raw_i > log_f_plus_m)
        di_raw = d_i_arg + tl.where(m_is_i, dm_new, 0.0)
        d_log_f_plus_m = d_f_arg + tl.where(m_is_i, 0.0, dm_new)
        df_raw = d_log_f_plus_m * tl.sigmoid(-raw_f)

        dc = dc * f_gate
        dn = dn * f_gate
        dm = d_log_f_plus_m
        if HAS_RESETS:
            dc, dn, dm = dc * keep, dn * keep, dm * keep

        out = dx_ptr.dtype.element_ty  # x's dtype
        tl.store(dx_ptr + x_offsets, di_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + DH, df_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + 2 * DH, dz_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + 3 * DH, do_raw.to(out), mask=slice_mask)
        db_i += di_raw
        db_f += df_raw
        db_z += dz_raw
        db_o += do_raw

        # This program's share of d y_{t-1} = sum_g d raw_g @ R[:, g, :]^T.
        partial = _split_dot(di_raw, tl.trans(r_i), tl.zeros((BLOCK_B, BLOCK_DH), tl.float32), OPERAND, PRECISION)
        partial = _split_dot(df_raw, tl.trans(r_f), partial, OPERAND, PRECISION)
        partial = _split_dot(dz_raw, tl.trans(r_z), partial, OPERAND, PRECISION)
        partial = _split_dot(do_raw, tl.trans(r_o), partial, OPERAND, PRECISION)
        if HAS_RESETS:
            partial = partial * keep
        if NUM_SPLITS > 1:
            slot = slots + (step % 2) * slot_size
            tl.store(slot + write_offsets, _pack(partial, step + 1), mask=row_mask)
        else:
            dy_rec = partial

    if NUM_SPLITS > 1:
        partials = _receive(slots + ((S + 1) % 2) * slot_size + read_offsets, read_mask, S)
        dy_rec = tl.sum(partials, axis=0)
    tl.store(d_first_ptr + last_offsets, dy_rec, mask=slice_mask)
    tl.store(d_first_ptr + state_size + last_offsets, dc, mask=slice_mask)
    tl.store(d_first_ptr + 2 * state_size + last_offsets, dn, mask=slice_mask)
    tl.store(d_first_ptr + 3 * state_size + last_offsets, dm, mask=slice_mask)
    db_offsets = (tile * NH + head) * (4 * DH) + cols
    tl.store(db_ptr + db_offsets, tl.sum(db_i, axis=0), mask=col_ok)
    tl.store(db_ptr + db_offsets + DH, tl.sum(db_f, axis=0), mask=col_ok)
    tl.store(db_ptr + db_offsets + 2 * DH, tl.sum(db_z, axis=0), mask=col_ok)
    tl.store(db_ptr + db_offsets + 3 * DH, tl.sum(db_o, axis=0), mask=col_ok)


def _launch_plan(batch: int, head_dim: int, num_heads: int, dtype: torch.dtype, device: torch.device, columns):
    """Batch tile, columns per program W, programs per group, whether R is held on chip."""
    block_b = min(max(16, triton.next_power_of_2(batch)), 64)
    num_batch_tiles = triton.cdiv(batch, block_b)
    block_dh = max(16, triton.next_power_of_2(head_dim))
    r_bytes = lambda w: block_dh * 4 * w * torch.finfo(dtype).bits // 8
    on_gpu = device.type == "cuda"
    max_programs = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else None
    if not on_gpu:
        # The interpreter runs programs one after another: a group must be a single program.
        width = block_dh
    elif columns is not None:
        width = columns
    elif r_bytes(block_dh) <= _SINGLE_PROGRAM_R_BYTES:
        width = block_dh
    else:
        width = min(_DEFAULT_COLUMNS, block_dh)
        # Every program of a group must be resident at once; widen the slices until they fit.
        while width < block_dh and num_heads * num_batch_tiles * triton.cdiv(head_dim, width) > max_programs:
            width *= 2
    if width < 16 or width & (width - 1) or width > block_dh:
        raise ValueError(f"slstm: columns per program must be a power of two in [16, {block_dh}], got {width}")
    num_splits = triton.cdiv(head_dim, width)
    if num_splits == 1:
        width = block_dh
    elif num_heads * num_batch_tiles * num_splits > max_programs:
        raise ValueError(
            f"slstm: {num_heads * num_batch_tiles * num_splits} programs (heads {num_heads} x batch tiles "
            f"{num_batch_tiles} x splits {num_splits}) exceed the {max_programs} SMs that must hold them at "
            f"once; use fewer heads or batch rows per call"
        )
    # The interpreter's dot takes no 16-bit floats: it multiplies in fp32, where bf16 products are
    # exact, so its results match the GPU's split products to fp32 rounding.
    operand = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32) if on_gpu else tl.float32
    return {
        "BLOCK_B": block_b,
        "BLOCK_DH": block_dh,
        "W": width,
        "NUM_SPLITS": num_splits,
        "NUM_BATCH_TILES": num_batch_tiles,
        "HOLD_R": r_bytes(width) <= _HELD_R_BYTES,
        # A held slice of 32 KiB or more needs 8 warps' registers to stay out of local memory.
        "num_warps": 8 if r_bytes(width) >= 32 * 1024 else 4,
        "OPERAND": operand,
        "PRECISION": "ieee",
    }


def _packed(values: torch.Tensor) -> torch.Tensor:
    """fp32 values -> int64 exchange words with tag 0 (see _pack)."""
    return values.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def slstm_forward(x_gates, R, b, state0, starts, *, save_states: bool, columns=None):
    """Launch the forward kernel. Returns y (B, S, NH, DH) and the fp32 state buffers (y, c, n, m),
    each (B, S + 1, NH, DH) with save_states (state0 first), else (B, 2, NH, DH) (state0, final)."""
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    if seq_len * num_heads * 4 * head_dim >= 2**31:
        # The kernels index one batch row of x_gates with 32-bit offsets.
        raise ValueError(
            f"slstm: S * 4 * E = {seq_len * num_heads * 4 * head_dim} must be below 2**31 for impl='triton'"
        )
    plan = _launch_plan(batch, head_dim, num_heads, x_gates.dtype, x_gates.device, columns)
    out = torch.empty((batch, seq_len, num_heads, head_dim), dtype=x_gates.dtype, device=x_gates.device)
    raw = torch.empty(x_gates.shape if save_states else (1,), dtype=torch.float32, device=x_gates.device)
    time_states = seq_len + 1 if save_states else 2
    states = []
    for s0 in state0:
        buf = torch.empty((batch, time_states, num_heads, head_dim), dtype=torch.float32, device=x_gates.device)
        buf[:, 0] = s0
        states.append(buf)
    groups = num_heads * plan["NUM_BATCH_TILES"]
    block_b, block_dh = plan["BLOCK_B"], plan["BLOCK_DH"]
    exchange = torch.zeros((groups, 2, block_b, block_dh), dtype=torch.int64, device=x_gates.device)
    if plan["NUM_SPLITS"] > 1:
        # y0 is read at t = 0 from slot 1 with tag 0: group g = head * tiles + tile.
        y0 = torch.zeros((plan["NUM_BATCH_TILES"] * block_b, num_heads, block_dh), device=x_gates.device)
        y0[:batch, :, :head_dim] = state0[0]
        y0 = y0.view(plan["NUM_BATCH_TILES"], block_b, num_heads, block_dh).permute(2, 0, 1, 3)
        exchange[:, 1] = _packed(y0).reshape(groups, block_b, block_dh)
    slstm_forward_kernel[(groups * plan["NUM_SPLITS"],)](
        x_gates,
        R,
        b,
        starts if starts is not None else exchange,
        out,
        raw,
        *states,
        exchange,
        batch,
        seq_len,
        time_states,
        NH=num_heads,
        DH=head_dim,
        HAS_RESETS=starts is not None,
        SAVE_STATES=save_states,
        **plan,
    )
    return out, raw, states


def slstm_backward(raw, R, starts, states, dy, d_last, *, columns=None):
    """Launch the backward kernel. Returns (d x_gates in R's dtype, d state0 (4, B, NH, DH), db)."""
    batch, seq_len, num_heads, _, head_dim = raw.shape
    plan = _launch_plan(batch, head_dim, num_heads, R.dtype, raw.device, columns)
    groups = num_heads * plan["NUM_BATCH_TILES"]
    block_b, block_dh, splits = plan["BLOCK_B"], plan["BLOCK_DH"], plan["NUM_SPLITS"]
    dx = torch.empty(raw.shape, dtype=R.dtype, device=raw.device)
    d_first = torch.empty((4, batch, num_heads, head_dim), dtype=torch.float32, device=raw.device)
    db = torch.empty((plan["NUM_BATCH_TILES"], num_heads, 4, head_dim), dtype=torch.float32, device=raw.device)
    exchange = torch.zeros((groups, 2, splits, block_b, block_dh), dtype=torch.int64, device=raw.device)
    if splits > 1:
        # d y_T enters as split 0's partial in slot 1 with tag 0 (the other splits add zeros).
        dy_last = torch.zeros((plan["NUM_BATCH_TILES"] * block_b, num_heads, block_dh), device=raw.device)
        dy_last[:batch, :, :head_dim] = d_last[0]
        dy_last = dy_last.view(plan["NUM_BATCH_TILES"], block_b, num_heads, block_dh).permute(2, 0, 1, 3)
        exchange[:, 1, 0] = _packed(dy_last).reshape(groups, block_b, block_dh)
    slstm_backward_kernel[(groups * splits,)](
        raw,
        R,
        starts if starts is not None else exchange,
        *states[1:],
        dy,
        d_last,
        dx,
        d_first,
        db,
        exchange,
        batch,
        seq_len,
        NH=num_heads,
        DH=head_dim,
        SPLITS_POW2=triton.next_power_of_2(splits),
        HAS_RESETS=starts is not None,
        **plan,
    )
    return dx, d_first, db.sum(dim=0)


# The kernels as torch.library custom ops, for the same reason as the mLSTM's
# (xlstm_kernels/mlstm/triton_chunkwise.py): a compiled block keeps them in its graph.


@torch.library.custom_op("xlstm_kernels::slstm_fwd", mutates_args=())
def _slstm_fwd_op(
    x_gates: torch.Tensor, R: torch.Tensor, b: torch.Tensor, y0: torch.Tensor, c0: torch.Tensor, n0: torch.Tensor,
    m0: torch.Tensor, starts: torch.Tensor | None, columns: int | None, save: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """y, the final state (y, c, n, m) and, for the backward, the raw gates and the state buffers.

    save: whether a backward can follow (the caller knows; inside the op grad mode is off). Without
    it the raw gates are a placeholder and the buffers hold only the first and last states."""
    y, raw, states = slstm_forward(x_gates, R, b, (y0, c0, n0, m0), starts, save_states=save, columns=columns)
    # an op's outputs may not alias each other: the final states are copied out of the buffers
    return y, *(s[:, -1].clone() for s in states), raw, *states


@_slstm_fwd_op.register_fake
def _(x_gates, R, b, y0, c0, n0, m0, starts, columns, save):
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    f32 = torch.float32
    buffers = [x_gates.new_empty(batch, seq_len + 1 if save else 2, num_heads, head_dim, dtype=f32) for _ in range(4)]
    finals = [x_gates.new_empty(batch, num_heads, head_dim, dtype=f32) for _ in range(4)]
    raw = x_gates.new_empty(x_gates.shape if save else (1,), dtype=f32)
    return x_gates.new_empty(batch, seq_len, num_heads, head_dim), *finals, raw, *buffers


@torch.library.custom_op("xlstm_kernels::slstm_bwd", mutates_args=())
def _slstm_bwd_op(
    raw: torch.Tensor, R: torch.Tensor, starts: torch.Tensor | None, y_states: torch.Tensor, c_states: torch.Tensor,
    n_states: torch.Tensor, m_states: torch.Tensor, dy: torch.Tensor, d_last: torch.Tensor, columns: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(d x_gates in R's dtype, d state0 (4, B, NH, DH), db)."""
    return slstm_backward(raw, R, starts, (y_states, c_states, n_states, m_states), dy, d_last, columns=columns)


@_slstm_bwd_op.register_fake
def _(raw, R, starts, y_states, c_states, n_states, m_states, dy, d_last, columns):
    batch, _, num_heads, _, head_dim = raw.shape
    return (
        raw.new_empty(raw.shape, dtype=R.dtype),
        raw.new_empty(4, batch, num_heads, head_dim),
        raw.new_empty(num_heads, 4, head_dim),
    )


def _slstm_setup_context(ctx, inputs, output):
    x_gates, R, b, y0, c0, n0, m0, starts, columns, save = inputs
    raw, *states = output[5:]
    ctx.mark_non_differentiable(raw, *states)
    ctx.set_materialize_grads(False)
    ctx.columns = columns
    if save:
        ctx.save_for_backward(raw, R, starts, *states)


def _slstm_backward(ctx, dy, *d_outputs):
    raw, R, starts, *states = ctx.saved_tensors
    batch, _, num_heads, _, head_dim = raw.shape
    zeros = torch.zeros((batch, num_heads, head_dim), dtype=torch.float32, device=raw.device)
    d_last = torch.stack([zeros if g is None else g.float() for g in d_outputs[:4]])
    dy = torch.zeros_like(raw[:, :, :, 0]) if dy is None else dy.contiguous()
    dx, d_first, db = _slstm_bwd_op(raw, R, starts, *states, dy, d_last, ctx.columns)
    dR = None
    if ctx.needs_input_grad[1]:
        # dR[h] = sum over (b, t) of y_{t-1}^T d raw_t, where y_{t-1} is zero at document starts.
        # y is fp32: take it as hi + lo in x's dtype, as the kernels do.
        y_prev = states[0][:, :-1]
        if starts is not None:
            y_prev = y_prev.masked_fill(starts.bool()[:, :, None, None], 0.0)
        y_hi = y_prev.to(dx.dtype)
        dR = torch.einsum("bshk,bshgj->hkgj", y_hi, dx)
        if dx.dtype != torch.float32:
            dR = dR + torch.einsum("bshk,bshgj->hkgj", (y_prev - y_hi.float()).to(dx.dtype), dx)
    return dx, dR, db, *d_first.unbind(0), None, None, None


_slstm_fwd_op.register_autograd(_slstm_backward, setup_context=_slstm_setup_context)


TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def slstm_triton(x_gates, R, b, state0, starts, columns=None):
    """The fused kernels behind autograd. R is cast to x_gates' dtype (the matmul operands), b to fp32.

    columns: output units per program (a power of two >= 16) instead of the launch heuristic; for
    tests and tuning.
    """
    if x_gates.dtype not in TRITON_DTYPES:
        raise ValueError(f"slstm: impl='triton' takes x_gates in {TRITON_DTYPES}, got {x_gates.dtype}")
    states = [s.to(torch.float32).contiguous() for s in state0]
    if starts is not None:
        starts = starts.to(torch.int8).contiguous()
    save = torch.is_grad_enabled() and any(t.requires_grad for t in (x_gates, R, b, *states))
    y, *final = _slstm_fwd_op(
        x_gates.contiguous(),
        R.to(x_gates.dtype).contiguous(),
        b.to(torch.float32).contiguous(),
        *states,
        starts,
        columns,
        save,
    )[:5]
    return y, tuple(final)
