"""FlashAttention-style Triton kernels: forward, backward preprocess, dk/dv, dq.

Math (per batch b, head h, query row i, key j; scale s; dropout probability p):
    P[i, j] = exp(s * q_i . k_j - lse_i)        lse_i = log sum_j exp(s * q_i . k_j)
    keep[i, j] = u(seed, b, h, i, j) >= p        u uniform in [0, 1): ``tl.rand`` (Philox)
    out_i = sum_j keep[i, j] * P[i, j] / (1 - p) * v_j
lse is that of the undropped P. The uniform for element (b, h, i, j) uses the
64-bit counter ((b * H + h) * N_Q + i) * N_K + j, so the backward regenerates the
mask tile by tile and nothing of size seq x seq is stored (``_dropout_keep``).

Forward: queries are tiled in BLOCK_M rows that stream over BLOCK_N keys with an
online softmax kept in base 2 (exp2 of scores times scale * log2 e); only the
row log-sum-exp is saved. Backward: two kernels recompute P tile by tile. dk/dv
runs per (key block, query head) over its query blocks, with the transposed
tile S^T = K Q^T so P^T and dS^T feed the dk / dv dots without a transpose
(grouped-query heads write per-head shares that the op sums in float32, as
FlashAttention-2 does); dq runs per (query block, head). Each output tile has
one writer: no atomics, deterministic.

Causal loops run in two stages: tiles wholly below the diagonal without any
mask, then the tiles that cross it (and the sequence tail) with the mask.
Causal masking aligns the last query with the last key, as the CPU kernels do
(csrc/include/pyattn/attention_tiles.h). Rows past the sequence end load zeros
and an lse of +inf, so their P is 0 and they need no mask in the backward.

Offsets are 64-bit; head_dim is padded to BLOCK_D (a power of two) and masked;
rows that see no key give zeros and lse = -inf, never NaN. Programs are laid
out on grid axis 0 only (blocks of one head consecutive, then the next head),
so batch * heads is bounded by the 2^31 - 1 programs of that axis, not by the
65,535 of axes 1 and 2. ``DOT_PRECISION`` is ``"ieee"`` for float32 inputs
(exact float32 products, as the tests compare) and ``"tf32"`` otherwise (where
Triton ignores it: float16 / bfloat16 products are exact in float32).
"""
import math

import triton
import triton.language as tl

# Globals read inside @triton.jit must be constexpr (a plain float fails to compile).
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _split_program(NUM_BLOCKS):
    """(block index, batch * heads index) of this program on the flat grid axis 0."""
    pid = tl.program_id(0)
    return pid % NUM_BLOCKS, (pid // NUM_BLOCKS).to(tl.int64)


@triton.jit
def _load_rows(base, rows, stride_r, offs_d, stride_d, n_rows,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A [len(rows), BLOCK_D] tile; zeros past n_rows and past HEAD_DIM."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    if HEAD_DIM == BLOCK_D:
        mask = (rows < n_rows)[:, None]
    else:
        mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store_rows(base, rows, stride_r, offs_d, stride_d, n_rows, tile,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = base + rows[:, None].to(tl.int64) * stride_r + offs_d[None, :] * stride_d
    if HEAD_DIM == BLOCK_D:
        mask = (rows < n_rows)[:, None]
    else:
        mask = (rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :]
    tl.store(ptrs, tile.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _visible(rows, cols, N_Q, N_K, CAUSAL: tl.constexpr):
    """Whether query `rows` sees key `cols` (broadcast shapes): key in range and,
    if causal, at most the query's position counted from the end."""
    visible = cols < N_K
    if CAUSAL:
        visible = visible & (cols < rows + 1 + (N_K - N_Q))
    return visible


@triton.jit
def _dropout_keep(seed, bh, rows, cols, N_Q, N_K, dropout_p):
    """keep = u >= dropout_p, u uniform from Philox at counter (bh * N_Q + row) * N_K + col."""
    offset = (bh * N_Q + rows.to(tl.int64)) * N_K + cols.to(tl.int64)
    return tl.rand(seed, offset) >= dropout_p


@triton.jit
def _query_block_stages(m0, N_Q, N_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    """Key ranges of query block [m0, m0 + BLOCK_M): [0, diag) needs no mask,
    [diag, end) does (diagonal tiles, key tail). Both multiples of BLOCK_N at diag."""
    full_end = N_K // BLOCK_N * BLOCK_N
    if CAUSAL:
        end = tl.minimum(N_K, tl.maximum(m0 + BLOCK_M + N_K - N_Q, 0))
        diag = tl.minimum(tl.maximum(m0 + 1 + N_K - N_Q, 0) // BLOCK_N * BLOCK_N, full_end)
    else:
        end = N_K
        diag = full_end
    return diag, end


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
               rows, offs_n, offs_d, lo, hi, bh, N_Q, N_K, qk_scale, dropout_p, seed,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kn, offs_d, stride_kd, N_K, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, stride_vn, offs_d, stride_vd, N_K, HEAD_DIM, BLOCK_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(_visible(rows[:, None], cols[None, :], N_Q, N_K, CAUSAL), s,
                         float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp2(-inf - -inf)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_dropout_keep(seed, bh, rows[:, None], cols[None, :], N_Q, N_K,
                                       dropout_p), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, N_Q, N_K, scale, dropout_p, seed, SEQ_BUCKET,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(N_Q, BLOCK_M) * B * H,). SEQ_BUCKET only keys the autotuner."""
    pid_m, bh = _split_program(tl.cdiv(N_Q, BLOCK_M))
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, N_Q,
                   HEAD_DIM, BLOCK_D)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag, end = _query_block_stages(pid_m * BLOCK_M, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                               stride_vd, rows, offs_n, offs_d, 0, diag, bh, N_Q, N_K, qk_scale,
                               dropout_p, seed, False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn,
                               stride_vd, rows, offs_n, offs_d, diag, end, bh, N_Q, N_K, qk_scale,
                               dropout_p, seed, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D,
                               BLOCK_N, DOT_PRECISION)

    has_key = l_i > 0.0
    inv_l = 1.0 / tl.where(has_key, l_i, 1.0)
    if DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    _store_rows(O + b * stride_ob + h * stride_oh, rows, stride_om, offs_d, stride_od, N_Q,
                acc * inv_l[:, None], HEAD_DIM, BLOCK_D)
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2,
                   float("-inf"))
    tl.store(LSE + bh * N_Q + rows, lse, mask=rows < N_Q)


@triton.jit
def _flash_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in float32 (also right with dropout: O is the dropped output).
    Grid: (cdiv(N_Q, BLOCK_M) * B * H,)."""
    pid_m, bh = _split_program(tl.cdiv(N_Q, BLOCK_M))
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(O + b * stride_ob + h * stride_oh, rows, stride_om, offs_d, stride_od, N_Q,
                   HEAD_DIM, BLOCK_D).to(tl.float32)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, rows, stride_gm, offs_d, stride_gd, N_Q,
                    HEAD_DIM, BLOCK_D).to(tl.float32)
    tl.store(DELTA + bh * N_Q + rows, tl.sum(o * do, 1), mask=rows < N_Q)


@triton.jit
def _load_row_stats(LSE, DELTA, bh, rows, N_Q):
    """lse in base 2 (+inf past N_Q and for rows that see no key, so P = 0) and delta."""
    mask = rows < N_Q
    lse = tl.load(LSE + bh * N_Q + rows, mask=mask, other=float("inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=mask, other=0.0)
    return lse_log2, delta


@triton.jit
def _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qm, stride_qd, stride_gm, stride_gd,
                LSE, DELTA, bh, cols, offs_m, offs_d, lo, hi, N_Q, N_K, qk_scale, dropout_p, seed,
                MASKED: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv of keys `cols` over query blocks [lo, hi) of one head, on
    transposed tiles [keys, queries]. MASKED applies the causal mask."""
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + offs_m
        q = _load_rows(q_base, rows, stride_qm, offs_d, stride_qd, N_Q, HEAD_DIM, BLOCK_D)
        do = _load_rows(do_base, rows, stride_gm, offs_d, stride_gd, N_Q, HEAD_DIM, BLOCK_D)
        lse_log2, delta = _load_row_stats(LSE, DELTA, bh, rows, N_Q)
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
                           - lse_log2[None, :])
        if MASKED:
            p_t = tl.where(_visible(rows[None, :], cols[:, None], N_Q, N_K, True), p_t, 0.0)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep_t = _dropout_keep(seed, bh, rows[None, :], cols[:, None], N_Q, N_K, dropout_p)
            dv = tl.dot(tl.where(keep_t, p_t, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dp_t = tl.where(keep_t, dp_t, 0.0) / (1.0 - dropout_p)
        else:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, GROUP, N_Q, N_K, scale, dropout_p, seed, SEQ_BUCKET,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(N_K, BLOCK_N) * B * H,); BLOCK_N keys per program, BLOCK_M
    queries per step. DK, DV are (B, H, N_K, D): query head h's share of the
    gradient of its kv head h // GROUP (the op sums the shares of a group; a
    loop over the group here costs ~100 registers and spills)."""
    pid_n, bh = _split_program(tl.cdiv(N_K, BLOCK_N))
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K + b * stride_kb + kvh * stride_kh, cols, stride_kn, offs_d, stride_kd, N_K,
                   HEAD_DIM, BLOCK_D)
    v = _load_rows(V + b * stride_vb + kvh * stride_vh, cols, stride_vn, offs_d, stride_vd, N_K,
                   HEAD_DIM, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_gb + h * stride_gh
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    full = 0
    if CAUSAL:
        # Queries before `start` see none of these keys; from `full` on they see all.
        start = tl.maximum(n0 - (N_K - N_Q), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - (N_K - N_Q), 0), BLOCK_M) * BLOCK_M,
                          tl.cdiv(N_Q, BLOCK_M) * BLOCK_M)
        dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qm, stride_qd, stride_gm,
                             stride_gd, LSE, DELTA, bh, cols, offs_m, offs_d, start, full, N_Q, N_K,
                             qk_scale, dropout_p, seed, True, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M,
                             DOT_PRECISION)
    dk, dv = _dkdv_tiles(dk, dv, k, v, q_base, do_base, stride_qm, stride_qd, stride_gm,
                         stride_gd, LSE, DELTA, bh, cols, offs_m, offs_d, full, N_Q, N_Q, N_K,
                         qk_scale, dropout_p, seed, False, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_M,
                         DOT_PRECISION)
    if DROPOUT:
        dv = dv / (1.0 - dropout_p)
    _store_rows(DK + b * stride_dkb + h * stride_dkh, cols, stride_dkn, offs_d, stride_dkd, N_K,
                dk * scale, HEAD_DIM, BLOCK_D)
    _store_rows(DV + b * stride_dvb + h * stride_dvh, cols, stride_dvn, offs_d, stride_dvd, N_K,
                dv, HEAD_DIM, BLOCK_D)


@triton.jit
def _dq_tiles(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
              stride_vd, bh, rows, offs_n, offs_d, lo, hi, N_Q, N_K, qk_scale, dropout_p, seed,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k = _load_rows(k_base, cols, stride_kn, offs_d, stride_kd, N_K, HEAD_DIM, BLOCK_D)
        v = _load_rows(v_base, cols, stride_vn, offs_d, stride_vd, N_K, HEAD_DIM, BLOCK_D)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
                         - lse_log2[:, None])
        if MASKED:
            p = tl.where(_visible(rows[:, None], cols[None, :], N_Q, N_K, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], N_Q, N_K, dropout_p)
            dp = tl.where(keep, dp, 0.0) / (1.0 - dropout_p)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, N_Q, N_K, scale, dropout_p, seed, SEQ_BUCKET,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (cdiv(N_Q, BLOCK_M) * B * H,)."""
    pid_m, bh = _split_program(tl.cdiv(N_Q, BLOCK_M))
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, rows, stride_qm, offs_d, stride_qd, N_Q,
                   HEAD_DIM, BLOCK_D)
    do = _load_rows(DO + b * stride_gb + h * stride_gh, rows, stride_gm, offs_d, stride_gd, N_Q,
                    HEAD_DIM, BLOCK_D)
    lse_log2, delta = _load_row_stats(LSE, DELTA, bh, rows, N_Q)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag, end = _query_block_stages(pid_m * BLOCK_M, N_Q, N_K, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_tiles(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                   stride_vd, bh, rows, offs_n, offs_d, 0, diag, N_Q, N_K, qk_scale, dropout_p,
                   seed, False, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    dq = _dq_tiles(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_kd, stride_vn,
                   stride_vd, bh, rows, offs_n, offs_d, diag, end, N_Q, N_K, qk_scale, dropout_p,
                   seed, True, CAUSAL, DROPOUT, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION)
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, rows, stride_dqm, offs_d, stride_dqd, N_Q,
                dq * scale, HEAD_DIM, BLOCK_D)


@triton.jit
def _dropout_mask_kernel(KEEP, N_Q, N_K, dropout_p, seed,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """KEEP[bh, i, j] = the keep decision the attention kernels make (testing aid).
    Grid: (cdiv(N_Q, BLOCK_M), cdiv(N_K, BLOCK_N), B * H)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], N_Q, N_K, dropout_p)
    tl.store(KEEP + (bh * N_Q + rows[:, None].to(tl.int64)) * N_K + cols[None, :], keep.to(tl.int8),
             mask=(rows < N_Q)[:, None] & (cols < N_K)[None, :])
