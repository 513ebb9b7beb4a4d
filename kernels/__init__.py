"""Triton kernels of pyattn, installed as ``pyattn.kernels``.

Each kernel lives in its own module, imported by the op that launches it. pyattn
imports and runs its C++ backends without Triton installed; the Triton backend
is then unavailable (``python -m pyattn info`` says so).
"""
