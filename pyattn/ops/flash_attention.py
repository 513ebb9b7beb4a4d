"""``pyattn.flash_attention``: FlashAttention-style attention, O(seq) memory.

Backends, one torch op pair (forward, backward) each:
- ``cpp``: ``torch.ops.pyattn.flash_attention_forward/backward``, tiled C++
  kernels for CPU tensors (float32, float64), schemas in ``csrc/pyattn.cpp``.
- ``triton``: ``torch.ops.pyattn.flash_attention_triton_forward/backward``,
  Triton kernels (``pyattn.kernels.flash_attention``) for CUDA tensors
  (float16, bfloat16, float32 with exact float32 dots), or CPU tensors under
  ``TRITON_INTERPRET=1`` (how CI tests them).
- ``reference``: math attention with materialised scores (pyattn.reference).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os

import torch
from torch.library import triton_op, wrap_triton

from pyattn import reference
from pyattn.backends import triton_interpret
from pyattn.ops import autograd_kernel

BACKENDS = ("auto", "triton", "cpp", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CPP_DTYPES = (torch.float32, torch.float64)


def _check_inputs(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"flash_attention: `{name}` must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            shape = "(batch, heads, seq_q, head_dim)" if name == "q" else \
                "(batch, kv_heads, seq_k, head_dim)"
            raise ValueError(f"flash_attention: `{name}` must be a 4-D tensor {shape}, "
                             f"got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"flash_attention: `q`, `k`, `v` must have one dtype, got "
                        f"{q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"flash_attention: `q`, `k`, `v` must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: `k` and `v` must have the same shape, got "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"flash_attention: batch of `q` ({q.shape[0]}) and `k` ({k.shape[0]}) differ")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: head_dim of `q` ({q.shape[3]}) and `k` "
                         f"({k.shape[3]}) differ")
    # heads = kv_heads = 0 is an empty problem (as in SDPA).
    if (q.shape[1] % k.shape[1] != 0) if k.shape[1] else q.shape[1] != 0:
        raise ValueError(f"flash_attention: heads of `q` ({q.shape[1]}) must be a multiple of "
                         f"kv_heads of `k` ({k.shape[1]})")
    head_dim = q.shape[3]
    if head_dim == 0 or head_dim % 8 != 0 or head_dim > 256:
        raise ValueError(f"flash_attention: head_dim must be a multiple of 8 up to 256, got {head_dim}")


def _check_dropout(dropout_p) -> float:
    p = float(dropout_p)
    if not (math.isfinite(p) and 0.0 <= p < 1.0):
        raise ValueError(f"flash_attention: `dropout_p` must be in [0, 1), got {dropout_p}")
    return p


def _draw_seed(generator: torch.Generator | None) -> int:
    """A dropout seed in [0, 2^62) from ``generator`` (the default CPU generator if None)."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator, dtype=torch.int64))


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"flash_attention: `backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if q.is_cuda else "cpp"
    if backend == "cpp":
        if q.device.type != "cpu":
            raise ValueError(f"flash_attention: the 'cpp' backend runs on CPU tensors, got "
                             f"{q.device}; use backend='triton' on CUDA")
        if q.dtype not in CPP_DTYPES:
            raise TypeError(f"flash_attention: the 'cpp' backend supports float32 and float64, "
                            f"got {q.dtype}")
    if backend == "triton":
        if q.device.type == "cpu" and not triton_interpret():
            raise RuntimeError("flash_attention: the 'triton' backend needs a CUDA tensor, or "
                               "TRITON_INTERPRET=1 (set before triton is imported) to interpret "
                               "its kernels on CPU tensors")
        if q.device.type not in ("cpu", "cuda"):
            raise ValueError(f"flash_attention: the 'triton' backend runs on CUDA, got {q.device}")
        if q.dtype not in TRITON_DTYPES:
            raise TypeError(f"flash_attention: the 'triton' backend supports float16, bfloat16 "
                            f"and float32, got {q.dtype}")
    return backend


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, dropout_p: float = 0.0,
                    generator: torch.Generator | None = None, return_lse: bool = False,
                    backend: str = "auto"):
    r"""Attention :math:`\mathrm{dropout}(\mathrm{softmax}(q k^\top \cdot \text{scale}))\, v`
    in O(seq) memory.

    Args:
        q: ``(batch, heads, seq_q, head_dim)``.
        k, v: ``(batch, kv_heads, seq_k, head_dim)``; ``kv_heads`` divides
            ``heads`` (grouped-query / multi-query attention).
        causal: mask keys after the query, aligning the last query with the
            last key when ``seq_q != seq_k`` (FlashAttention 2). A query that
            sees no key gets zeros.
        scale: defaults to ``1 / sqrt(head_dim)``.
        dropout_p: probability of zeroing each attention probability; kept
            ones are scaled by ``1 / (1 - dropout_p)``. In ``[0, 1)``; 0 (the
            default) is exactly attention without dropout. The mask is drawn
            per element by a counter-based generator (Philox4x32-10) from a
            seed, so the backward regenerates it and nothing of size
            ``seq_q x seq_k`` is stored; the same seed gives the same result on
            every run and thread count. The cpp and triton masks differ.
        generator: the ``torch.Generator`` one seed per call is drawn from
            when ``dropout_p > 0`` (default: PyTorch's default CPU generator,
            so ``torch.manual_seed`` reproduces the masks).
        return_lse: also return the row log-sum-exp ``(batch, heads, seq_q)``
            (float32; float64 for float64 inputs; ``-inf`` for rows that see no
            key or whose scores are all ``-inf``) of the probabilities before
            dropout. The lse carries no gradient.
        backend: ``'auto'`` (triton on CUDA, cpp on CPU), ``'triton'``,
            ``'cpp'`` or ``'reference'``.

    head_dim: any multiple of 8 up to 256. Inputs may have any strides; batch,
    heads and sequence lengths may be 0 (empty outputs; zeros where no key).
    The backward is deterministic on every backend (no atomics); it is not
    itself differentiable (second derivatives raise), and forward-mode AD
    raises. NaN / Inf at masked-out (future) positions do not reach any
    result on the cpp backend; NaN in a visible score gives a NaN row. Same
    calling convention as ``F.scaled_dot_product_attention(q, k, v,
    is_causal=causal, scale=scale, dropout_p=dropout_p)`` for equal heads.
    """
    _check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"flash_attention: `scale` must be finite, got {scale}")
    dropout_p = _check_dropout(dropout_p)
    backend = _resolve_backend(backend, q)
    seed = _draw_seed(generator) if dropout_p > 0 else 0
    if backend == "reference":  # differentiable in every mode (math in float64)
        out, lse = reference.attention(q, k, v, causal, scale, dropout_p, seed)
        return (out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)) \
            if return_lse else out
    if backend == "cpp":
        op = torch.ops.pyattn.flash_attention_forward.default
    else:
        op = torch.ops.pyattn.flash_attention_triton_forward.default
    out, lse = autograd_kernel.call(op, q, k, v, causal, scale, dropout_p, seed)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- C++ backend

@torch.library.register_fake("pyattn::flash_attention_forward")
def _forward_fake(q, k, v, causal, scale, dropout_p, seed):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return (q.new_empty(q.shape),
            q.new_empty(q.shape[:3], dtype=lse_dtype))


@torch.library.register_fake("pyattn::flash_attention_backward")
def _backward_fake(grad_out, q, k, v, out, lse, causal, scale, dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


# ------------------------------------------ autograd (shared by both backends)

def _setup_context(ctx, inputs, output):
    q, k, v, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.causal, ctx.scale, ctx.dropout_p, ctx.seed = causal, scale, dropout_p, seed
    ctx.mark_non_differentiable(lse)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.causal, ctx.scale,
                                 ctx.dropout_p, ctx.seed)
        return dq, dk, dv, None, None, None, None
    return backward


def _refuse_double_backward(backward_op_name: str):
    """Autograd of a backward op: recorded when the first backward builds a graph
    (create_graph=True), raising when that graph is differentiated."""
    def backward(ctx, *grads):
        raise RuntimeError(
            f"flash_attention: double backward is not supported: {backward_op_name} (the "
            f"gradient of pyattn.flash_attention) is not differentiable. For second "
            f"derivatives use F.scaled_dot_product_attention or backend='reference'.")
    return backward


_NO_FORWARD_AD = ("flash_attention: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
                  "is not supported; use F.scaled_dot_product_attention or backend='reference'")


def _register_autograd(forward_op: str, backward_op: str, dispatch_keys=("Autograd",)):
    """The forward op's backward is `backward_op`, which is not differentiable;
    forward mode raises at both (instead of returning outputs without a tangent)."""
    refuse_jvp = autograd_kernel.refuse_jvp(_NO_FORWARD_AD)
    backward = _make_backward(getattr(torch.ops.pyattn, backward_op))
    for function in (
            autograd_kernel.function_class(forward_op, _setup_context, backward, refuse_jvp),
            autograd_kernel.function_class(backward_op, autograd_kernel.no_context,
                                           _refuse_double_backward(f"pyattn::{backward_op}"),
                                           refuse_jvp)):
        autograd_kernel.register(function, dispatch_keys)


_register_autograd("flash_attention_forward", "flash_attention_backward")


# ------------------------------------------------------------- Triton backend
# Kernels: pyattn.kernels.flash_attention; tile configurations, grid and FLOP
# counts: pyattn.kernels.flash_attention_configs (compile-checked for sm_90 by
# tools/triton_hopper_check.py).

def _tile_configs(kernel: str, head_dim: int, dtype: torch.dtype, dropout: bool,
                  device: torch.device) -> list:
    """Tile configurations `kernel` may run with: CUDA, the autotuning space (its
    first entry alone with PYATTN_TRITON_AUTOTUNE=0); the interpreter, one fixed
    configuration (deterministic; tests swap in the CUDA ones)."""
    from pyattn.kernels import flash_attention_configs as configs

    if device.type == "cpu":
        return [configs.INTERPRETER_CONFIG]
    space = configs.configs(kernel, head_dim, dtype == torch.float32, dropout)
    return space if os.environ.get("PYATTN_TRITON_AUTOTUNE", "1") != "0" else space[:1]


@functools.cache
def _autotuned(kernel_name: str, tile_configs: tuple):
    """The kernel autotuned over tile_configs, keyed on head_dim, causal, dropout,
    the rounded sequence length and (by Triton) the tensors' dtypes. Every
    configuration writes each output element once: rerunning one is harmless."""
    import triton

    from pyattn.kernels import flash_attention as kernels

    return triton.autotune(
        configs=[triton.Config(c.meta(), num_warps=c.num_warps, num_stages=c.num_stages)
                 for c in tile_configs],
        key=["HEAD_DIM", "CAUSAL", "DROPOUT", "SEQ_BUCKET"])(getattr(kernels, kernel_name))


def _launch(kernel_name: str, tile_configs: list, tiled_block: str, tiled_len: int,
            batch_heads: int, args: tuple, constexprs: dict) -> None:
    """Launch over cdiv(tiled_len, tiled_block) * batch_heads programs, autotuned
    when there is more than one configuration."""
    from pyattn.kernels import flash_attention as kernels
    from pyattn.kernels import flash_attention_configs as configs

    if len(tile_configs) == 1:
        (config,) = tile_configs
        kernel = getattr(kernels, kernel_name)
        constexprs = dict(constexprs, **config.meta(), num_warps=config.num_warps,
                          num_stages=config.num_stages)
    else:
        kernel = _autotuned(kernel_name, tuple(tile_configs))

    def grid(meta):
        return configs.grid(triton_cdiv(tiled_len, meta[tiled_block]), batch_heads)

    _traceable(kernel)[grid](*args, **constexprs)


def _traceable(kernel):
    """wrap_triton(kernel); under TRITON_INTERPRET=1 @triton.jit gives an
    interpreter function, which torch < 2.13's wrap_triton refuses (torch 2.13
    returns it as is): launch that one directly, as torch 2.13 does."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, (JITFunction, Autotuner)):
        return wrap_triton(kernel)
    _interpreter_scalars_as_index()
    return kernel


@functools.cache
def _interpreter_scalars_as_index():
    """Let the interpreter take a loop bound computed from `tl.program_id`.

    The interpreter holds a scalar as an array of shape (1,); triton 3.6's
    interpreter turns it into a Python int with ``int(array)``, which numpy >= 2.4
    refuses ("only 0-dimensional arrays can be converted"), so every causal
    ``range(lo, hi)`` here fails there (the lent GPU machine has triton 3.6.0 and
    numpy 2.5). Later triton squeezes first; do the same, once, where the old
    code is."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if "int(self.handle.data))" not in inspect.getsource(patch_tensor):
        return

    def patch_tensor_squeezing_index(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_tensor_squeezing_index


def _device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _kernel_constexprs(q: torch.Tensor, causal: bool, dropout_p: float) -> dict:
    from pyattn.kernels import flash_attention_configs as configs

    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"flash_attention: `dropout_p` must be in [0, 1), got {dropout_p}")
    head_dim = q.shape[-1]
    return dict(CAUSAL=causal, DROPOUT=dropout_p > 0.0, HEAD_DIM=head_dim,
                BLOCK_D=configs.block_d(head_dim),
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32")


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


@triton_op("pyattn::flash_attention_triton_forward", mutates_args=())
def _triton_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    scale: float, dropout_p: float,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the Triton forward; dropout per pyattn.kernels.flash_attention."""
    from pyattn.kernels import flash_attention_configs as configs

    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    constexprs = _kernel_constexprs(q, causal, dropout_p)
    with _device_guard(q):
        _launch("_flash_fwd_kernel",
                _tile_configs("forward", head_dim, q.dtype, constexprs["DROPOUT"], q.device),
                "BLOCK_M", seq_q, batch * heads,
                (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                 heads, heads // kv_heads, seq_q, seq_k, scale, dropout_p, seed,
                 configs.seq_bucket(seq_q, seq_k)),
                constexprs)
    return out, lse


@triton_op("pyattn::flash_attention_triton_backward", mutates_args=())
def _triton_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                     dropout_p: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv): delta = rowsum(dO * O), then the dk/dv and dq kernels."""
    from pyattn.kernels import flash_attention_configs as configs

    batch, heads, seq_q, head_dim = q.shape
    kv_heads, seq_k = k.shape[1], k.shape[2]
    constexprs = _kernel_constexprs(q, causal, dropout_p)
    dropout, bucket = constexprs["DROPOUT"], configs.seq_bucket(seq_q, seq_k)
    group = heads // kv_heads
    delta = torch.empty((batch, heads, seq_q), dtype=torch.float32, device=q.device)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    # dk, dv per query head; grouped heads: float32 shares summed below (deterministic).
    share = (batch, heads, seq_k, head_dim)
    share_dtype = k.dtype if group == 1 else torch.float32
    dk = torch.empty(share, dtype=share_dtype, device=k.device)
    dv = torch.empty(share, dtype=share_dtype, device=v.device)
    lse = lse.contiguous()
    with _device_guard(q):
        preprocess = configs.TileConfig(configs.preprocess_block_m(constexprs["BLOCK_D"]), 0,
                                        4, 1)
        _launch("_flash_bwd_preprocess_kernel", [preprocess], "BLOCK_M", seq_q, batch * heads,
                (out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seq_q),
                dict(HEAD_DIM=head_dim, BLOCK_D=constexprs["BLOCK_D"]))
        _launch("_flash_bwd_dkdv_kernel",
                _tile_configs("dkdv", head_dim, q.dtype, dropout, q.device),
                "BLOCK_N", seq_k, batch * heads,
                (q, k, v, grad_out, lse, delta, dk, dv, *q.stride(), *k.stride(), *v.stride(),
                 *grad_out.stride(), *dk.stride(), *dv.stride(), heads, group, seq_q, seq_k,
                 scale, dropout_p, seed, bucket), constexprs)
        _launch("_flash_bwd_dq_kernel", _tile_configs("dq", head_dim, q.dtype, dropout, q.device),
                "BLOCK_M", seq_q, batch * heads,
                (q, k, v, grad_out, lse, delta, dq, *q.stride(), *k.stride(), *v.stride(),
                 *grad_out.stride(), *dq.stride(), heads, group, seq_q, seq_k,
                 scale, dropout_p, seed, bucket), constexprs)
    if group > 1:
        dk = dk.view(batch, kv_heads, group, seq_k, head_dim).sum(2).to(k.dtype)
        dv = dv.view(batch, kv_heads, group, seq_k, head_dim).sum(2).to(v.dtype)
    return dq, dk, dv


# The triton_ops come with an Autograd kernel (reverse mode only): these take
# precedence on the two devices the kernels run on.
_register_autograd("flash_attention_triton_forward", "flash_attention_triton_backward",
                   ("AutogradCPU", "AutogradCUDA"))


def triton_dropout_keep(batch: int, heads: int, seq_q: int, seq_k: int, dropout_p: float,
                        seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The keep mask (bool, (batch, heads, seq_q, seq_k)) the Triton kernels draw
    for (dropout_p, seed), from the same counter-based formula (for tests)."""
    from pyattn.kernels import flash_attention as kernels

    keep = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    block = 32
    with _device_guard(keep):
        kernels._dropout_mask_kernel[(triton_cdiv(seq_q, block), triton_cdiv(seq_k, block),
                                      batch * heads)](
            keep, seq_q, seq_k, dropout_p, seed, BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
