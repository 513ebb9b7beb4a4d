"""The pyattn torch ops: Python wrappers, fake kernels and autograd.

Schemas and kernels are compiled in ``pyattn._C``; each module here adds the
fake (meta) kernel and autograd formula of one op, so that the ops work under
``torch.compile(fullgraph=True)`` and ``torch.library.opcheck``.
"""
import torch  # noqa: F401  (loads libtorch, which pyattn._C links against)

try:
    from pyattn import _C  # noqa: F401  (registers torch.ops.pyattn.*)
except ImportError as error:  # pragma: no cover - only without a build
    raise ImportError(
        "pyattn's compiled extension pyattn._C is missing or broken "
        f"({error}). Build it with `pip install --no-build-isolation -e .` "
        "from the pyattn checkout (see README.md)."
    ) from error

from pyattn.ops import flash_attention, padded_conv, spmm  # noqa: E402,F401
