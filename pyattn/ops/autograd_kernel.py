"""Autograd kernels of the pyattn ops, as ``torch.autograd.Function`` classes.

``torch.library.register_autograd`` gives an op reverse mode only: under
forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) such an op
returns outputs without a tangent, silently (``torch.func.jvp`` reports zeros).
A Function registered as the op's Autograd kernel has a ``jvp`` as well: the
op's forward-mode rule, or :func:`refuse_jvp`'s clear error where it has none.
Its ``forward`` runs the op below autograd, so the same kernel serves eager
calls, raw ``torch.ops.pyattn.*`` calls and ``torch.compile`` graphs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd import forward_ad
from torch._functorch.autograd_function import enable_single_level_autograd_function
from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

_library = torch.library.Library("pyattn", "IMPL")  # keeps the kernels registered


def function_class(op_name: str, setup_context, backward, jvp) -> type:
    """A Function whose forward is ``torch.ops.pyattn.<op_name>`` below autograd."""
    op = getattr(torch.ops.pyattn, op_name).default

    def forward(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    return type(f"AutogradOf_{op_name}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "setup_context": staticmethod(setup_context),
                 "backward": staticmethod(backward), "jvp": staticmethod(jvp),
                 "op_name": op_name})


def records_nothing(args: Sequence) -> bool:
    """Whether a call on `args` has nothing for autograd to record: no input
    needs a gradient, and no dual level or torch.func transform could carry a
    tangent. Such a call runs the op below autograd, without the Function's
    per-call cost (measured: 7-9 us)."""
    if forward_ad._current_level >= 0 or retrieve_all_functorch_interpreters():
        return False
    # torch's C++ scan (what torch.library's own autograd kernels use): 1 us for
    # nine arguments, where a Python isinstance loop took 2.5-3.5 us
    return not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args))


def call(op, *args):
    """``op(*args)`` from pyattn's Python API: where :func:`records_nothing`,
    straight below autograd, which skips the dispatcher's boxed call into the
    Python Autograd kernel and back (measured: 7 us of a 20 us call on a tiny
    input, 12 us left, as torch.sparse.mm's). ``torch.compile`` traces the
    plain call."""
    if not torch.compiler.is_compiling() and records_nothing(args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return op(*args)


def register(function: type, dispatch_keys: Sequence[str] = ("Autograd",)) -> None:
    """Make `function` the autograd kernel of its op for `dispatch_keys`
    (``AutogradCPU`` / ``AutogradCUDA`` take precedence over an ``Autograd``
    kernel an op already has, e.g. the one of a ``triton_op``)."""
    op = getattr(torch.ops.pyattn, function.op_name).default

    def autograd_kernel(*args):
        if records_nothing(args):
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)
        interpreters = retrieve_all_functorch_interpreters()
        # The C++ apply, not autograd.Function.apply: under torch.func transforms
        # the latter would re-enter the dispatcher as a higher-order op, but this
        # kernel already runs below the transforms (on their unwrapped tensors),
        # where autograd's own reverse and forward mode are what is needed.
        if len(interpreters) > 1:
            # One torch.func level works (its tensors are unwrapped once before this
            # kernel runs); with nested levels the outer tangents would be dropped.
            raise NotImplementedError(
                f"pyattn::{function.op_name}: nested torch.func transforms (e.g. jvp of "
                "grad, jacrev of grad) are not supported; use torch.autograd double "
                "backward or torch.autograd.forward_ad over "
                "torch.autograd.grad(create_graph=True)")
        with enable_single_level_autograd_function():
            return super(torch.autograd.Function, function).apply(*args)

    for key in dispatch_keys:
        _library.impl(function.op_name, autograd_kernel, key)


def no_context(ctx, inputs, output):
    """setup_context of a Function whose backward and jvp need nothing saved."""


def refuse_jvp(message: str):
    """A jvp that raises `message` (forward mode reaches it only with a tangent)."""
    def jvp(ctx, *tangents):
        raise RuntimeError(message)
    return jvp
