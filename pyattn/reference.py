"""Pure-PyTorch references that pyattn's kernels are tested against."""
import math

import torch
import torch.nn.functional as F


def padded_conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1,
                  padding_mode="zeros"):
    """``F.conv2d`` of the input padded by ``F.pad`` (a padded copy, as nn.Conv2d does).

    ``padding`` is an int, an ``(h, w)`` pair or ``(top, bottom, left, right)``.
    """
    if isinstance(padding, int):
        padding = (padding, padding)
    if len(padding) == 2:
        padding = (padding[0], padding[0], padding[1], padding[1])
    top, bottom, left, right = padding
    mode = "constant" if padding_mode == "zeros" else padding_mode
    padded = F.pad(input, (left, right, top, bottom), mode=mode)
    return F.conv2d(padded, weight, bias, stride, 0, dilation, groups)


def attention(q, k, v, causal=False, scale=None, dropout_p=0.0, seed=0):
    """Math attention softmax(q k^T * scale) v with materialised scores, in float64.

    q: (B, H, Nq, D); k, v: (B, KVH, Nk, D) with KVH dividing H (grouped-query).
    Causal masking aligns the last query with the last key; a row that sees no
    key gives zeros and lse = -inf. With ``dropout_p > 0`` the probabilities P
    (of which lse is the log normaliser, before dropout) are multiplied by
    ``flash_dropout_keep(seed, ...) / (1 - dropout_p)``: the mask the C++ kernel
    draws for that seed. Returns (out in q's dtype, lse float64).

    For finite inputs. Masked-out scores enter the matrix products as zeros, so
    a NaN at a masked-out position leaks here (0 * NaN); see
    :func:`attention_visible_only` for non-finite inputs.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    if kv_heads != heads:
        kd = kd.repeat_interleave(heads // kv_heads, dim=1)
        vd = vd.repeat_interleave(heads // kv_heads, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        scores = scores.masked_fill(~causal_visible(q.shape[2], k.shape[2], q.device),
                                    float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(lse[..., None].isinf(), 0.0))
    if dropout_p > 0:
        keep = flash_dropout_keep(seed, dropout_p, *q.shape[:3], k.shape[2], q.device)
        probs = probs * keep / (1.0 - dropout_p)
    out = probs @ vd
    return out.to(q.dtype), lse


def causal_visible(seq_q, seq_k, device=None):
    """(seq_q, seq_k) bool: query i sees key j iff j <= i + seq_k - seq_q."""
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    return cols <= rows + (seq_k - seq_q)


def attention_visible_only(q, k, v, causal=False, scale=None):
    """:func:`attention` computed row by row over the keys each query sees, in
    float64, so that nothing at a masked-out position (NaN, Inf) can reach a
    result, in the forward or (through autograd) the backward. Softmax as
    PyTorch's SDPA math backend: a row whose visible scores are all -inf, or
    that sees no key, gives zeros; NaN propagates. Slow: for small tests."""
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kd = k.double().repeat_interleave(heads // kv_heads, dim=1)
    vd = v.double().repeat_interleave(heads // kv_heads, dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    rows = []
    for i in range(seq_q):
        end = min(max(i + 1 + seq_k - seq_q, 0), seq_k) if causal else seq_k
        scores = q[:, :, i:i + 1].double() @ kd[:, :, :end].transpose(-1, -2) * scale
        all_neg_inf = torch.isneginf(scores).all(-1, keepdim=True)
        probs = torch.softmax(scores, -1).masked_fill(all_neg_inf, 0.0)
        rows.append(probs @ vd[:, :, :end])
    return torch.cat(rows, dim=2).to(q.dtype) if rows else torch.zeros_like(q)


# Philox4x32-10 (csrc/include/pyattn/philox.h) on int64 tensors holding uint32 values.
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_U32 = 0xFFFFFFFF


def _mulhilo32(a, m):
    """(high, low) 32-bit halves of a * m without int64 overflow: m in 16-bit halves."""
    p_lo, p_hi = a * (m & 0xFFFF), a * (m >> 16)
    return (p_hi + (p_lo >> 16)) >> 16, (p_lo + ((p_hi & 0xFFFF) << 16)) & _U32


def philox4x32(counter, key):
    """Philox4x32-10 of ``counter`` (4 broadcastable int64 tensors of uint32
    values) under ``key`` (2 ints); returns the 4 output words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_MUL[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_MUL[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_WEYL[0]) & _U32, (k1 + _PHILOX_WEYL[1]) & _U32
    return c0, c1, c2, c3


def flash_dropout_keep(seed, dropout_p, batch, heads, seq_q, seq_k, device=None):
    """The dropout keep mask (batch, heads, seq_q, seq_k) of the C++ kernel:
    element (b, h, i, j) takes word j % 4 of Philox4x32-10 at counter
    (j // 4, i, bh mod 2^32, bh // 2^32), bh = b * heads + h, key (seed mod 2^32,
    seed // 2^32), and is kept iff that word >= ceil(dropout_p * 2^32)."""
    quads = (seq_k + 3) // 4
    bh = torch.arange(batch * heads, device=device).view(batch, heads, 1, 1)
    i = torch.arange(seq_q, device=device).view(1, 1, seq_q, 1)
    quad = torch.arange(quads, device=device).view(1, 1, 1, quads)
    words = philox4x32((quad, i, bh & _U32, bh >> 32), (seed & _U32, seed >> 32))
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1).flatten(-2)[..., :seq_k]
    return words >= math.ceil(dropout_p * 2 ** 32)


def naive_attention(q, k, v, causal=False, dropout_p=0.0):
    """dropout(softmax(mask(q k^T / sqrt(d)))) v in the inputs' dtype, with the
    (seq_q x seq_k) scores materialised (softmax in float32 at least); equal heads.
    Causal masking aligns the last query with the last key, as
    pyattn.flash_attention; dropout is ``F.dropout`` (torch's own RNG stream)."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32))
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs.to(q.dtype) @ v


def spmm(rowptr, col, x, values=None, reduce="sum"):
    """CSR x dense by ``scatter_reduce`` over edges (empty rows give 0; max / min
    propagate NaN as ``torch.amax`` / ``amin``)."""
    rows = rowptr.numel() - 1
    lengths = rowptr.diff().long()
    row_of_edge = torch.repeat_interleave(torch.arange(rows, device=x.device), lengths)
    col = col.long()
    terms = x[col] if values is None else values[:, None] * x[col]
    if reduce in ("max", "min"):
        index = row_of_edge[:, None].expand_as(terms)
        out = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device)
        out = out.scatter_reduce(0, index, terms, reduce="a" + reduce, include_self=False)
        return torch.where(lengths[:, None] > 0, out, torch.zeros_like(out))
    out = torch.zeros(rows, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, row_of_edge, terms)
    if reduce == "mean":
        out = out / lengths.clamp(min=1).to(x.dtype)[:, None]
    return out


def csr_transpose(rowptr, col, num_cols):
    """(csc_ptr, csc_row, csc_perm) of the transposed CSR by a stable sort of the
    edges by column (pyattn.ops.spmm.csr_transpose's contract)."""
    rows = torch.repeat_interleave(
        torch.arange(rowptr.numel() - 1, device=rowptr.device, dtype=rowptr.dtype),
        rowptr.diff().long(), output_size=col.numel())
    perm = torch.sort(col, stable=True).indices
    counts = torch.bincount(col, minlength=num_cols)
    csc_ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(rowptr.dtype)
    return csc_ptr, rows[perm], perm
