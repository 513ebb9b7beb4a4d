"""Triton kernels of pyattn, installed as ``pyattn.kernels``.

Each kernel lives in its own module and is imported lazily by the op that uses
it, so importing pyattn never needs Triton.
"""
