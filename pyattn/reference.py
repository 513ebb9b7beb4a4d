"""Pure-PyTorch references that pyattn's kernels are tested against."""
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


def attention(q, k, v, causal=False, scale=None):
    """Math attention softmax(q k^T * scale) v with materialised scores, in float64.

    q: (B, H, Nq, D); k, v: (B, KVH, Nk, D) with KVH dividing H (grouped-query).
    Causal masking aligns the last query with the last key; a row that sees no
    key gives zeros and lse = -inf. Returns (out in q's dtype, lse float64).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qd, kd, vd = q.double(), k.double(), v.double()
    if kv_heads != heads:
        kd = kd.repeat_interleave(heads // kv_heads, dim=1)
        vd = vd.repeat_interleave(heads // kv_heads, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        seq_q, seq_k = q.shape[2], k.shape[2]
        rows = torch.arange(seq_q, device=q.device)[:, None]
        cols = torch.arange(seq_k, device=q.device)[None, :]
        scores = scores.masked_fill(cols > rows + (seq_k - seq_q), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(lse[..., None].isinf(), 0.0))
    out = probs @ vd
    return out.to(q.dtype), lse


def naive_attention(q, k, v, causal=False):
    """softmax(mask(q k^T / sqrt(d))) v in the inputs' dtype, with the (seq_q x seq_k)
    scores materialised (softmax in float32 at least); equal heads. Causal masking
    aligns the last query with the last key, as pyattn.flash_attention."""
    seq_q, seq_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        keep = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device).tril(seq_k - seq_q)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(q.dtype) @ v


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
