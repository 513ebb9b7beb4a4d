"""FlashAttention-style Triton kernels: forward, backward preprocess, dk/dv, dq.

Queries are tiled in BLOCK_M rows that stream over BLOCK_N keys with an online
softmax kept in base 2 (exp2 of scores pre-multiplied by scale * log2 e); only
the row log-sum-exp is saved. The backward recomputes the probabilities tile by
tile in two kernels: dk/dv per (key block, kv head), looping over the query
heads of its group and their query blocks, and dq per (query block, head).
Each output tile has one writer: no atomics, deterministic.

Offsets are 64-bit; head_dim is padded to the next power of two and masked;
sequence tails are masked; rows that see no key give zeros and lse = -inf,
never NaN. Causal masking aligns the last query with the last key, as the CPU
kernels do (csrc/include/pyattn/attention_tiles.h).
"""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _causal_key_end(row, N_Q, N_K):
    """One past the last key query `row` sees (may be <= 0)."""
    return row + 1 + N_K - N_Q


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, GROUP, N_Q, N_K, qk_scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :] * stride_qd, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = N_K
    if CAUSAL:
        end_n = tl.minimum(N_K, tl.maximum(_causal_key_end(pid_m * BLOCK_M + BLOCK_M - 1, N_Q, N_K), 0))
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None].to(tl.int64) * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] < _causal_key_end(offs_m[:, None], N_Q, N_K))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no exp(-inf - -inf)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_key = l_i > 0.0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
             + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    lse = tl.where(has_key, (m_i + tl.math.log2(tl.where(has_key, l_i, 1.0))) * LN2,
                   float("-inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=mask_m)


@triton.jit
def _flash_bwd_preprocess_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), in float32."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows = offs_m[:, None].to(tl.int64)
    o = tl.load(O + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.jit
def _probabilities(q, k, lse_log2, rows, cols, N_Q, N_K, qk_scale, CAUSAL: tl.constexpr):
    """P = exp(S - lse) of one tile, 0 where masked or where the row sees no key."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    visible = (rows[:, None] < N_Q) & (cols[None, :] < N_K)
    if CAUSAL:
        visible = visible & (cols[None, :] < _causal_key_end(rows[:, None], N_Q, N_K))
    # lse = -inf (no visible key) was turned into +inf by the caller: exp2(s - inf) = 0
    return tl.where(visible, tl.math.exp2(s - lse_log2[:, None]), 0.0)


@triton.jit
def _load_row_stats(LSE, DELTA, pid_bh, rows, N_Q):
    mask = rows < N_Q
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N_Q + rows, mask=mask, other=float("inf"))
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N_Q + rows, mask=mask, other=0.0)
    return lse_log2, delta


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, KV_H, GROUP, N_Q, N_K, qk_scale, scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bkv = tl.program_id(1)
    b = (pid_bkv // KV_H).to(tl.int64)
    kvh = (pid_bkv % KV_H).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (cols < N_K)[:, None] & (offs_d < HEAD_DIM)[None, :]
    cols64 = cols[:, None].to(tl.int64)
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols64 * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols64 * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start_m = 0
    if CAUSAL:  # the first query that sees key pid_n * BLOCK_N, rounded down to a block
        start_m = tl.maximum(pid_n * BLOCK_N - (N_K - N_Q), 0) // BLOCK_M * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    for h in range(kvh * GROUP, kvh * GROUP + GROUP):
        pid_bh = b * H + h
        for m0 in range(start_m, N_Q, BLOCK_M):
            rows = m0 + offs_m
            mask_md = (rows < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
            rows64 = rows[:, None].to(tl.int64)
            q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qm
                        + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
            do = tl.load(DO + b * stride_gb + h * stride_gh + rows64 * stride_gm
                         + offs_d[None, :] * stride_gd, mask=mask_md, other=0.0)
            lse_log2, delta = _load_row_stats(LSE, DELTA, pid_bh, rows, N_Q)
            p = _probabilities(q, k, lse_log2, rows, cols, N_Q, N_K, qk_scale, CAUSAL)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + b * stride_dkb + kvh * stride_dkh + cols64 * stride_dkn + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + kvh * stride_dvh + cols64 * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, GROUP, N_Q, N_K, qk_scale, scale,
    CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kvh = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_md = (rows < N_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
    rows64 = rows[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows64 * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows64 * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask_md, other=0.0)
    lse_log2, delta = _load_row_stats(LSE, DELTA, pid_bh, rows, N_Q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end_n = N_K
    if CAUSAL:
        end_n = tl.minimum(N_K, tl.maximum(_causal_key_end(pid_m * BLOCK_M + BLOCK_M - 1, N_Q, N_K), 0))
    for start_n in range(0, end_n, BLOCK_N):
        cols = start_n + offs_n
        mask_nd = (cols < N_K)[:, None] & (offs_d < HEAD_DIM)[None, :]
        cols64 = cols[:, None].to(tl.int64)
        k = tl.load(K + b * stride_kb + kvh * stride_kh + cols64 * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_nd, other=0.0)
        v = tl.load(V + b * stride_vb + kvh * stride_vh + cols64 * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_nd, other=0.0)
        p = _probabilities(q, k, lse_log2, rows, cols, N_Q, N_K, qk_scale, CAUSAL)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows64 * stride_dqm + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=mask_md)
