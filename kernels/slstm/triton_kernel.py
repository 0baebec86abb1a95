"""The sLSTM cell as two persistent Triton kernels: one launch for the forward, one for the backward.

The sLSTM is sequential: y_t feeds the next step's gates through the block-diagonal recurrent
weights R. A launch per time step (the official CUDA kernel: a GEMM and a pointwise kernel per
step) is bound by launch latency, so both kernels here loop over time inside the kernel.

Work split. A program owns one head, one tile of batch rows (the M dimension of the matmuls, at
least 16) and a slice of W output units of that head, for all four gates. It keeps its slice of
R, (DH, 4 gates, W), in registers for the whole sequence. Each step needs the head's full
y_{t-1} (all DH units), so the NUM_SPLITS = DH / W programs of a (head, batch tile) group
exchange y through global memory and wait for each other at a counter in global memory once
per step. They must all be resident at once, which the launcher checks (grid <= SM count).
With NUM_SPLITS == 1 (small DH, and always under the Triton interpreter, which runs programs
one after another) no exchange or wait is compiled in.

Forward (per step, per program):
    raw_g = keep_t * (y_{t-1} @ R[:, g, slice]) + x_t[g, slice] + b[g, slice]     (fp32 accumulate)
    pointwise gate math in fp32, y_t[slice] stored in x's dtype (it is both the output and the
    next step's matmul input), c, n, m stored in fp32 for the backward.
Backward (reverse loop): raw_t is recomputed with the same matmul, the pointwise backward runs
in fp32 on the program's slice, d raw_t is stored (it is d x_gates), and the recurrent gradient
d y_{t-1} = sum_g d raw_g @ R[:, g, :]^T is a sum over the group's programs: each stores its
partial (B, DH) product, and after the wait every program sums the slices it owns. dR and db are
reductions over (B, t) of d raw done outside the loop (one batched matmul; per-program sums).

Document resets: where a token starts a new document, the previous state (y, c, n, m) is
replaced by zeros, so raw loses its recurrent term and the gradient stops there.
"""

import torch
import triton
import triton.language as tl

# Registers one program may spend on its slice of R (bytes). Beyond this the slice is re-read
# from cache every step instead of being held.
_HELD_R_BYTES = 64 * 1024
_DEFAULT_COLUMNS = 32


@triton.jit
def _arrive(counter_ptr):
    """Publish this program's stores of the step, then count it in."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter_ptr, target):
    """Spin until `target` arrivals have been counted (all programs of the group finished a step)."""
    count = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while count < target:
        count = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _logsigmoid(x):
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _upcast(x):
    return x.to(tl.float32)


@triton.jit
def _load_r_slices(r_ptr, r_offsets, r_mask, DH: tl.constexpr):
    r_i = tl.load(r_ptr + r_offsets, mask=r_mask, other=0.0)
    r_f = tl.load(r_ptr + r_offsets + DH, mask=r_mask, other=0.0)
    r_z = tl.load(r_ptr + r_offsets + 2 * DH, mask=r_mask, other=0.0)
    r_o = tl.load(r_ptr + r_offsets + 3 * DH, mask=r_mask, other=0.0)
    return r_i, r_f, r_z, r_o


@triton.jit
def _recurrent_gates(y_prev, r_i, r_f, r_z, r_o, PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        y_prev, r_i, r_f, r_z, r_o = _upcast(y_prev), _upcast(r_i), _upcast(r_f), _upcast(r_z), _upcast(r_o)
    acc_i = tl.dot(y_prev, r_i, input_precision=PRECISION)
    acc_f = tl.dot(y_prev, r_f, input_precision=PRECISION)
    acc_z = tl.dot(y_prev, r_z, input_precision=PRECISION)
    acc_o = tl.dot(y_prev, r_o, input_precision=PRECISION)
    return acc_i, acc_f, acc_z, acc_o


@triton.jit
def slstm_forward_kernel(
    x_ptr,  # (B, S, NH, 4, DH) gate inputs
    r_ptr,  # (NH, DH, 4, DH) recurrent weights, x's dtype
    b_ptr,  # (NH, 4, DH) fp32 biases
    starts_ptr,  # (B, S) int8, 1 where a document starts (read only with HAS_RESETS)
    y_ptr,  # (B, S + 1, NH, DH) x's dtype; [:, 0] holds y0, the kernel writes [:, 1:]
    c_ptr,  # (B, T_STATES, NH, DH) fp32; [:, 0] holds c0; with SAVE_STATES [:, t + 1] = c_t,
    n_ptr,  #   else T_STATES = 2 and [:, 1] receives the final state
    m_ptr,
    y_last_ptr,  # (B, NH, DH) fp32 final y
    counter_ptr,  # (groups,) int32 zeros
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
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    group = pid // NUM_SPLITS
    tile = group % NUM_BATCH_TILES
    head = group // NUM_BATCH_TILES

    rows = tile * BLOCK_B + tl.arange(0, BLOCK_B)
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
    b_offsets = head * (4 * DH) + cols
    b_i = tl.load(b_ptr + b_offsets, mask=col_ok, other=0.0)[None, :]
    b_f = tl.load(b_ptr + b_offsets + DH, mask=col_ok, other=0.0)[None, :]
    b_z = tl.load(b_ptr + b_offsets + 2 * DH, mask=col_ok, other=0.0)[None, :]
    b_o = tl.load(b_ptr + b_offsets + 3 * DH, mask=col_ok, other=0.0)[None, :]

    state_offsets = (rows[:, None] * T_STATES * NH + head) * DH + cols[None, :]
    c = tl.load(c_ptr + state_offsets, mask=slice_mask, other=0.0)
    n = tl.load(n_ptr + state_offsets, mask=slice_mask, other=0.0)
    m = tl.load(m_ptr + state_offsets, mask=slice_mask, other=0.0)
    y = tl.zeros((BLOCK_B, W), dtype=tl.float32)

    x_row_offsets = rows[:, None] * S * NH * 4 * DH + head * 4 * DH + cols[None, :]
    y_row_offsets = rows[:, None] * (S + 1) * NH * DH + head * DH
    for t in range(S):
        # Loads that do not depend on the other programs go first, to overlap with the wait.
        x_offsets = x_row_offsets + t * NH * 4 * DH
        x_i = tl.load(x_ptr + x_offsets, mask=slice_mask, other=0.0).to(tl.float32)
        x_f = tl.load(x_ptr + x_offsets + DH, mask=slice_mask, other=0.0).to(tl.float32)
        x_z = tl.load(x_ptr + x_offsets + 2 * DH, mask=slice_mask, other=0.0).to(tl.float32)
        x_o = tl.load(x_ptr + x_offsets + 3 * DH, mask=slice_mask, other=0.0).to(tl.float32)
        if not HOLD_R:
            r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
        if NUM_SPLITS > 1:
            _wait(counter_ptr + group, NUM_SPLITS * t)
        # .cg: read y_{t-1} from L2, where the other programs' stores landed, never from L1.
        y_prev = tl.load(
            y_ptr + y_row_offsets + t * NH * DH + k[None, :], mask=row_mask, other=0.0, cache_modifier=".cg"
        )
        acc_i, acc_f, acc_z, acc_o = _recurrent_gates(y_prev, r_i, r_f, r_z, r_o, PRECISION, UPCAST_DOT)
        if HAS_RESETS:
            start = tl.load(starts_ptr + rows * S + t, mask=row_ok, other=0) != 0
            keep = tl.where(start, 0.0, 1.0)[:, None]
            acc_i, acc_f, acc_z, acc_o = acc_i * keep, acc_f * keep, acc_z * keep, acc_o * keep
            c, n, m = c * keep, n * keep, m * keep
        raw_i = acc_i + x_i + b_i
        raw_f = acc_f + x_f + b_f
        raw_z = acc_z + x_z + b_z
        raw_o = acc_o + x_o + b_o

        log_f_plus_m = m + _logsigmoid(raw_f)
        m_new = tl.where(n == 0.0, raw_i, tl.maximum(raw_i, log_f_plus_m))
        i_gate = tl.minimum(tl.exp(raw_i - m_new), 1.0)
        f_gate = tl.minimum(tl.exp(log_f_plus_m - m_new), 1.0)
        c = f_gate * c + i_gate * _tanh(raw_z)
        n = f_gate * n + i_gate
        m = m_new
        y = tl.sigmoid(raw_o) * c / n

        tl.store(
            y_ptr + y_row_offsets + (t + 1) * NH * DH + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=slice_mask
        )
        if SAVE_STATES:
            step_offsets = state_offsets + (t + 1) * NH * DH
            tl.store(c_ptr + step_offsets, c, mask=slice_mask)
            tl.store(n_ptr + step_offsets, n, mask=slice_mask)
            tl.store(m_ptr + step_offsets, m, mask=slice_mask)
        if NUM_SPLITS > 1:
            _arrive(counter_ptr + group)

    if not SAVE_STATES:
        tl.store(c_ptr + state_offsets + NH * DH, c, mask=slice_mask)
        tl.store(n_ptr + state_offsets + NH * DH, n, mask=slice_mask)
        tl.store(m_ptr + state_offsets + NH * DH, m, mask=slice_mask)
    last_offsets = (rows[:, None] * NH + head) * DH + cols[None, :]
    tl.store(y_last_ptr + last_offsets, y, mask=slice_mask)


@triton.jit
def slstm_backward_kernel(
    x_ptr,  # (B, S, NH, 4, DH)
    r_ptr,  # (NH, DH, 4, DH)
    b_ptr,  # (NH, 4, DH) fp32
    starts_ptr,  # (B, S) int8
    y_ptr,  # (B, S + 1, NH, DH) from the forward ([:, 0] = y0)
    c_ptr,  # (B, S + 1, NH, DH) fp32 from the forward ([:, 0] = state0)
    n_ptr,
    m_ptr,
    dy_ptr,  # (B, S, NH, DH) gradient of the output y
    d_last_ptr,  # (4, B, NH, DH) fp32 gradients of the final (y, c, n, m)
    dx_ptr,  # (B, S, NH, 4, DH) out: gradient of x_gates (= of the raw gates)
    d_first_ptr,  # (4, B, NH, DH) fp32 out: gradients of state0 (y, c, n, m)
    db_ptr,  # (NUM_BATCH_TILES, NH, 4, DH) fp32 out: per-tile bias gradients
    exchange_ptr,  # (groups, 2, NUM_SPLITS, BLOCK_B, BLOCK_DH) fp32 scratch
    counter_ptr,  # (groups,) int32 zeros
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
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
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
    # The matmul operand type: x's dtype on the GPU; fp32 under the interpreter (UPCAST_DOT), whose
    # dot does not handle 16-bit floats. bf16 products are exact in fp32, so the math is the same.
    dot_dtype = tl.float32 if UPCAST_DOT else x_ptr.dtype.element_ty

    r_offsets = head * (DH * 4 * DH) + k[:, None] * (4 * DH) + cols[None, :]
    r_mask = k_ok[:, None] & col_ok[None, :]
    if HOLD_R:
        r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
    b_offsets = head * (4 * DH) + cols
    b_i = tl.load(b_ptr + b_offsets, mask=col_ok, other=0.0)[None, :]
    b_f = tl.load(b_ptr + b_offsets + DH, mask=col_ok, other=0.0)[None, :]
    b_z = tl.load(b_ptr + b_offsets + 2 * DH, mask=col_ok, other=0.0)[None, :]
    b_o = tl.load(b_ptr + b_offsets + 3 * DH, mask=col_ok, other=0.0)[None, :]

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

    # Exchange slots: this program writes [parity, split, :, :]; it reads [parity, :, :, cols].
    group_base = exchange_ptr + group * (2 * NUM_SPLITS * BLOCK_B * BLOCK_DH)
    write_offsets = split * (BLOCK_B * BLOCK_DH) + local_rows[:, None] * BLOCK_DH + k[None, :]
    peers = tl.arange(0, SPLITS_POW2)
    read_offsets = (
        peers[:, None, None] * (BLOCK_B * BLOCK_DH) + local_rows[None, :, None] * BLOCK_DH + cols[None, None, :]
    )
    read_mask = (peers < NUM_SPLITS)[:, None, None] & col_ok[None, None, :]

    x_row_offsets = rows[:, None] * S * NH * 4 * DH + head * 4 * DH + cols[None, :]
    y_row_offsets = rows[:, None] * (S + 1) * NH * DH + head * DH
    state_row_offsets = (rows[:, None] * (S + 1) * NH + head) * DH + cols[None, :]
    dy_row_offsets = (rows[:, None] * S * NH + head) * DH + cols[None, :]
    for step in range(S):
        t = S - 1 - step
        # Everything up to the wait depends only on the forward's stored results.
        x_offsets = x_row_offsets + t * NH * 4 * DH
        x_i = tl.load(x_ptr + x_offsets, mask=slice_mask, other=0.0).to(tl.float32)
        x_f = tl.load(x_ptr + x_offsets + DH, mask=slice_mask, other=0.0).to(tl.float32)
        x_z = tl.load(x_ptr + x_offsets + 2 * DH, mask=slice_mask, other=0.0).to(tl.float32)
        x_o = tl.load(x_ptr + x_offsets + 3 * DH, mask=slice_mask, other=0.0).to(tl.float32)
        state_offsets = state_row_offsets + t * NH * DH
        c_prev = tl.load(c_ptr + state_offsets, mask=slice_mask, other=0.0)
        n_prev = tl.load(n_ptr + state_offsets, mask=slice_mask, other=0.0)
        m_prev = tl.load(m_ptr + state_offsets, mask=slice_mask, other=0.0)
        dy_out = tl.load(dy_ptr + dy_row_offsets + t * NH * DH, mask=slice_mask, other=0.0).to(tl.float32)
        y_prev = tl.load(y_ptr + y_row_offsets + t * NH * DH + k[None, :], mask=row_mask, other=0.0)
        if not HOLD_R:
            r_i, r_f, r_z, r_o = _load_r_slices(r_ptr, r_offsets, r_mask, DH)
        acc_i, acc_f, acc_z, acc_o = _recurrent_gates(y_prev, r_i, r_f, r_z, r_o, PRECISION, UPCAST_DOT)
        if HAS_RESETS:
            start = tl.load(starts_ptr + rows * S + t, mask=row_ok, other=0) != 0
            keep = tl.where(start, 0.0, 1.0)[:, None]
            acc_i, acc_f, acc_z, acc_o = acc_i * keep, acc_f * keep, acc_z * keep, acc_o * keep
            c_prev, n_prev, m_prev = c_prev * keep, n_prev * keep, m_prev * keep
        raw_i = acc_i + x_i + b_i
        raw_f = acc_f + x_f + b_f
        raw_z = acc_z + x_z + b_z
        raw_o = acc_o + x_o + b_o

        # The forward step again, in the same fp32 operations.
        log_f_plus_m = m_prev + _logsigmoid(raw_f)
        fresh = n_prev == 0.0
        m_new = tl.where(fresh, raw_i, tl.maximum(raw_i, log_f_plus_m))
        i_gate = tl.minimum(tl.exp(raw_i - m_new), 1.0)
        f_gate = tl.minimum(tl.exp(log_f_plus_m - m_new), 1.0)
        tanh_z = _tanh(raw_z)
        c_new = f_gate * c_prev + i_gate * tanh_z
        n_new = f_gate * n_prev + i_gate
        o_gate = tl.sigmoid(raw_o)

        if NUM_SPLITS > 1:
            if step > 0:
                _wait(counter_ptr + group, NUM_SPLITS * step)
                partials = tl.load(
                    group_base + ((step - 1) % 2) * (NUM_SPLITS * BLOCK_B * BLOCK_DH) + read_offsets,
                    mask=read_mask,
                    other=0.0,
                    cache_modifier=".cg",
                )
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
        m_is_i = fresh | (raw_i > log_f_plus_m)
        di_raw = d_i_arg + tl.where(m_is_i, dm_new, 0.0)
        d_log_f_plus_m = d_f_arg + tl.where(m_is_i, 0.0, dm_new)
        df_raw = d_log_f_plus_m * tl.sigmoid(-raw_f)

        dc = dc * f_gate
        dn = dn * f_gate
        dm = d_log_f_plus_m
        if HAS_RESETS:
            dc, dn, dm = dc * keep, dn * keep, dm * keep

        out = dx_ptr.dtype.element_ty
        tl.store(dx_ptr + x_offsets, di_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + DH, df_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + 2 * DH, dz_raw.to(out), mask=slice_mask)
        tl.store(dx_ptr + x_offsets + 3 * DH, do_raw.to(out), mask=slice_mask)
        db_i += di_raw
        db_f += df_raw
        db_z += dz_raw
        db_o += do_raw

        # d y_{t-1} = sum_g d raw_g @ R[:, g, :]^T, this program's share of it.
        operand = x_ptr.dtype.element_ty  # rounded like the GPU's operands, also when upcast
        partial = tl.dot(di_raw.to(operand).to(dot_dtype), tl.trans(r_i.to(dot_dtype)), input_precision=PRECISION)
        partial = tl.dot(
            df_raw.to(operand).to(dot_dtype), tl.trans(r_f.to(dot_dtype)), acc=partial, input_precision=PRECISION
        )
        partial = tl.dot(
            dz_raw.to(operand).to(dot_dtype), tl.trans(r_z.to(dot_dtype)), acc=partial, input_precision=PRECISION
        )
        partial = tl.dot(
            do_raw.to(operand).to(dot_dtype), tl.trans(r_o.to(dot_dtype)), acc=partial, input_precision=PRECISION
        )
        if HAS_RESETS:
            partial = partial * keep
        if NUM_SPLITS > 1:
            tl.store(group_base + (step % 2) * (NUM_SPLITS * BLOCK_B * BLOCK_DH) + write_offsets, partial)
            _arrive(counter_ptr + group)
        else:
            dy_rec = partial

    if NUM_SPLITS > 1:
        _wait(counter_ptr + group, NUM_SPLITS * S)
        partials = tl.load(
            group_base + ((S - 1) % 2) * (NUM_SPLITS * BLOCK_B * BLOCK_DH) + read_offsets,
            mask=read_mask,
            other=0.0,
            cache_modifier=".cg",
        )
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
    """Batch tile, columns per program W, programs per group, whether R is held in registers."""
    block_b = min(max(16, triton.next_power_of_2(batch)), 64)
    num_batch_tiles = triton.cdiv(batch, block_b)
    block_dh = max(16, triton.next_power_of_2(head_dim))
    r_bytes = lambda w: block_dh * 4 * w * torch.finfo(dtype).bits // 8  # noqa: E731
    if device.type != "cuda":
        # The interpreter runs programs one after another: a group must be a single program.
        width = block_dh
    elif columns is not None:
        width = columns
    elif r_bytes(block_dh) <= _HELD_R_BYTES:
        width = block_dh
    else:
        width = min(_DEFAULT_COLUMNS, block_dh)
        max_programs = torch.cuda.get_device_properties(device).multi_processor_count
        # Every program of a group must be resident at once; widen the slices until they fit.
        while width < block_dh and num_heads * num_batch_tiles * triton.cdiv(head_dim, width) > max_programs:
            width *= 2
    if width < 16 or width & (width - 1) or width > block_dh:
        raise ValueError(f"slstm: columns per program must be a power of two in [16, {block_dh}], got {width}")
    num_splits = triton.cdiv(head_dim, width)
    if num_splits == 1:
        width = block_dh
    elif device.type == "cuda":
        grid = num_heads * num_batch_tiles * num_splits
        max_programs = torch.cuda.get_device_properties(device).multi_processor_count
        if grid > max_programs:
            raise ValueError(
                f"slstm: {grid} programs (heads {num_heads} x batch tiles {num_batch_tiles} x splits "
                f"{num_splits}) exceed the {max_programs} SMs that must hold them at once; use fewer "
                f"heads or batch rows per call"
            )
    return dict(
        BLOCK_B=block_b,
        BLOCK_DH=block_dh,
        W=width,
        NUM_SPLITS=num_splits,
        NUM_BATCH_TILES=num_batch_tiles,
        HOLD_R=r_bytes(width) <= _HELD_R_BYTES,
        # A held slice of 32 KiB or more needs 8 warps' registers to stay out of local memory.
        num_warps=8 if r_bytes(width) >= 32 * 1024 else 4,
        PRECISION="ieee" if dtype == torch.float32 or device.type != "cuda" else "tf32",
        UPCAST_DOT=device.type != "cuda",
    )


def slstm_forward(x_gates, R, b, state0, starts, *, save_states: bool, columns=None):
    """Launch the forward kernel. Returns (y buffer (B, S+1, NH, DH), c, n, m buffers, y_last)."""
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    plan = _launch_plan(batch, head_dim, num_heads, x_gates.dtype, x_gates.device, columns)
    y0, c0, n0, m0 = state0
    y_buf = x_gates.new_empty((batch, seq_len + 1, num_heads, head_dim))
    y_buf[:, 0] = y0
    time_states = seq_len + 1 if save_states else 2
    states = []
    for s0 in (c0, n0, m0):
        buf = torch.empty((batch, time_states, num_heads, head_dim), dtype=torch.float32, device=x_gates.device)
        buf[:, 0] = s0
        states.append(buf)
    y_last = torch.empty((batch, num_heads, head_dim), dtype=torch.float32, device=x_gates.device)
    groups = num_heads * plan["NUM_BATCH_TILES"]
    counters = torch.zeros(groups, dtype=torch.int32, device=x_gates.device)
    grid = (groups * plan["NUM_SPLITS"],)
    slstm_forward_kernel[grid](
        x_gates,
        R,
        b,
        starts if starts is not None else counters,
        y_buf,
        *states,
        y_last,
        counters,
        batch,
        seq_len,
        time_states,
        NH=num_heads,
        DH=head_dim,
        HAS_RESETS=starts is not None,
        SAVE_STATES=save_states,
        **plan,
    )
    return y_buf, states, y_last


def slstm_backward(x_gates, R, b, starts, y_buf, states, dy, d_last, *, columns=None):
    """Launch the backward kernel. Returns (dx_gates, d_state0 (4, B, NH, DH), db)."""
    batch, seq_len, num_heads, _, head_dim = x_gates.shape
    plan = _launch_plan(batch, head_dim, num_heads, x_gates.dtype, x_gates.device, columns)
    groups = num_heads * plan["NUM_BATCH_TILES"]
    dx = torch.empty_like(x_gates)
    d_first = torch.empty((4, batch, num_heads, head_dim), dtype=torch.float32, device=x_gates.device)
    db = torch.empty((plan["NUM_BATCH_TILES"], num_heads, 4, head_dim), dtype=torch.float32, device=x_gates.device)
    exchange = torch.empty(
        (groups, 2, plan["NUM_SPLITS"], plan["BLOCK_B"], plan["BLOCK_DH"]), dtype=torch.float32, device=x_gates.device
    )
    counters = torch.zeros(groups, dtype=torch.int32, device=x_gates.device)
    slstm_backward_kernel[(groups * plan["NUM_SPLITS"],)](
        x_gates,
        R,
        b,
        starts if starts is not None else counters,
        y_buf,
        *states,
        dy,
        d_last,
        dx,
        d_first,
        db,
        exchange,
        counters,
        batch,
        seq_len,
        NH=num_heads,
        DH=head_dim,
        SPLITS_POW2=triton.next_power_of_2(plan["NUM_SPLITS"]),
        HAS_RESETS=starts is not None,
        **plan,
    )
    return dx, d_first, db.sum(dim=0)


class SLSTMTritonFunction(torch.autograd.Function):
    """Autograd over the two kernels. Inputs must be contiguous; R in x_gates' dtype, b in fp32."""

    @staticmethod
    def forward(ctx, x_gates, R, b, y0, c0, n0, m0, starts, columns):
        save = any(ctx.needs_input_grad)
        y_buf, states, y_last = slstm_forward(
            x_gates, R, b, (y0, c0, n0, m0), starts, save_states=save, columns=columns
        )
        ctx.columns = columns
        if save:
            ctx.save_for_backward(x_gates, R, b, starts, y_buf, *states)
        final = [s[:, -1] for s in states]
        y = y_buf[:, 1:]
        return y, y_last, *final

    @staticmethod
    def backward(ctx, dy, dy_last, dc_last, dn_last, dm_last):
        x_gates, R, b, starts, y_buf, c_buf, n_buf, m_buf = ctx.saved_tensors
        batch, seq_len, num_heads, _, head_dim = x_gates.shape
        if dy is None:
            dy = torch.zeros_like(y_buf[:, 1:])
        d_last = torch.stack(
            [
                torch.zeros((batch, num_heads, head_dim), dtype=torch.float32, device=x_gates.device)
                if g is None
                else g.float()
                for g in (dy_last, dc_last, dn_last, dm_last)
            ]
        )
        dx, d_first, db = slstm_backward(
            x_gates, R, b, starts, y_buf, (c_buf, n_buf, m_buf), dy.contiguous(), d_last, columns=ctx.columns
        )
        dR = None
        if ctx.needs_input_grad[1]:
            # dR[h] = sum over (b, t) of y_{t-1}^T d raw_t, with y_{t-1} zero where a document starts.
            y_prev = y_buf[:, :-1]
            if starts is not None:
                y_prev = y_prev.masked_fill(starts.bool()[:, :, None, None], 0.0)
            dR = torch.einsum("bshk,bshgj->hkgj", y_prev, dx)
        return dx, dR, db, d_first[0], d_first[1], d_first[2], d_first[3], None, None


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
    y, *final = SLSTMTritonFunction.apply(
        x_gates.contiguous(),
        R.to(x_gates.dtype).contiguous(),
        b.to(torch.float32).contiguous(),
        *states,
        starts,
        columns,
    )
    return y, tuple(final)
