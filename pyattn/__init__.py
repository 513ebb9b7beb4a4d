"""pyattn: hand-written CPU/CUDA and Triton kernels exposed as torch ops.

- :func:`pyattn.padded_conv2d` — conv2d with zeros / reflect / replicate /
  circular padding fused into the kernel (no padded copy of the input).
- :func:`pyattn.flash_attention` — FlashAttention-style attention (tiled C++
  on CPU, Triton on GPU), forward and backward in O(seq) memory.
- :func:`pyattn.spmm` — CSR sparse x dense products (sum / mean / max / min) for
  graph convolutions.
- :mod:`pyattn.nn` — modules built on the ops (``PaddedConv2d``).

Importing pyattn loads the compiled extension ``pyattn._C`` (which registers
the ``torch.ops.pyattn.*`` schemas and kernels); it does no other work.
"""
from pyattn import ops
from pyattn.ops.flash_attention import flash_attention
from pyattn.ops.padded_conv import padded_conv2d
from pyattn.ops.spmm import spmm
from pyattn import nn

__version__ = "0.1.0"
__all__ = ["flash_attention", "padded_conv2d", "spmm", "nn", "ops", "__version__"]
