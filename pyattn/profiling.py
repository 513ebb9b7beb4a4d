"""Peak-memory measurement for tests, benchmarks and reports."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from typing import Callable

import torch


@functools.lru_cache(maxsize=1)
def track_large_allocations() -> None:
    """Serve every allocation >= 128 KiB by mmap and give it back when freed.

    glibc raises its mmap threshold after large frees, after which big tensors
    reuse resident heap pages and a peak resident-set reading misses them.
    Setting the threshold explicitly turns that adjustment off. ``peak_memory``
    calls this; a long-running program that measures CPU memory late (after
    heavy work) should call it at its start.
    """
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        m_mmap_threshold = -3
        ctypes.CDLL(libc_name).mallopt(m_mmap_threshold, 128 * 1024)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``).
    CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset
    through ``/proc/self/clear_refs``); page-granular and includes everything
    the process touches, so compare figures measured the same way.
    The result of ``fn`` is dropped before returning.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    elif device.type == "cpu":
        track_large_allocations()
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # reset VmHWM to the current RSS
        except OSError as error:
            raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs") from error
        base = _proc_status("VmRSS:")
        result = fn()
        peak = _proc_status("VmHWM:") - base
    else:
        raise ValueError(f"peak_memory: unsupported device {device}")
    del result
    return max(peak, 0)
