"""What this pyattn install can run: compiled backends, GPU, Triton."""
from __future__ import annotations

import importlib.util
import os

import torch


def compiled_backends() -> dict:
    """Build facts of pyattn._C: {'cpu': True, 'openmp': bool, 'cuda': bool, 'cuda_archs': str}."""
    from pyattn import _C

    info = dict(_C.build_info())
    info["cpu"] = True
    return info


def triton_interpret() -> bool:
    """Whether Triton kernels are set to run in the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_status() -> tuple[bool, str]:
    """(can Triton kernels run here, why)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    if torch.cuda.is_available():
        return True, "on the GPU"
    if triton_interpret():
        return True, "in the interpreter on CPU tensors (TRITON_INTERPRET=1)"
    return False, "no GPU; set TRITON_INTERPRET=1 to interpret Triton kernels on the CPU"
