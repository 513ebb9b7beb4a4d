"""Peak-memory measurement for tests, benchmarks and reports."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
from typing import Callable

import torch


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc through ctypes, or None where there is none (then no allocator tuning)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


# glibc's thresholds start at 128 KiB and adapt upward after large frees, to at
# most these (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit, and twice it for trimming).
_TRACKED_THRESHOLD = 128 * 1024
_ADAPTED_MMAP_THRESHOLD = 32 * 1024 * 1024
_ADAPTED_TRIM_THRESHOLD = 64 * 1024 * 1024


@contextlib.contextmanager
def large_allocations_tracked():
    """Within: every allocation >= 128 KiB is served by mmap and freed memory is
    given back, so a peak resident-set reading sees every big tensor (with glibc's
    adaptive thresholds, big tensors reuse resident heap pages and read 0).

    After: the thresholds where glibc's adaptation ends (32 MiB mmap, 64 MiB trim),
    not 128 KiB: code timed later must not pay an mmap, munmap and page faults
    for every tensor (that slowed the report's training loops by half and
    penalised allocation-heavy code in the benchmarks)."""
    libc = _libc()
    m_trim_threshold, m_mmap_threshold = -1, -3
    if libc is not None:
        libc.mallopt(m_mmap_threshold, _TRACKED_THRESHOLD)
        libc.mallopt(m_trim_threshold, _TRACKED_THRESHOLD)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(m_mmap_threshold, _ADAPTED_MMAP_THRESHOLD)
            libc.mallopt(m_trim_threshold, _ADAPTED_TRIM_THRESHOLD)


def _release_free_heap() -> None:
    """Hand free heap pages back to the kernel (glibc ``malloc_trim``), so that a
    chunk freed earlier and re-used during a measurement faults in again and
    counts, instead of being resident already (a peak of 0 for a fresh output)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not found in /proc/self/status")


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu",
                readings: int = 2) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before.

    CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``),
    exact, from one call.
    CPU: the process's resident-set high-water mark (Linux ``VmHWM``, reset
    through ``/proc/self/clear_refs``), the maximum over ``readings`` calls of
    ``fn``, each after free heap pages are handed back to the kernel (a call
    that re-uses a chunk freed earlier would otherwise find it resident and
    read 0); the kernel's resident-set counters are folded per CPU in batches,
    so one reading can still fall short by a few hundred KiB. Page-granular and
    includes
    everything the process touches, so compare figures measured the same way;
    figures under 1 MiB are within the noise of the kernel's resident-set
    bookkeeping (``benchmarks/summarize.py`` prints them as "< 1").
    The results of ``fn`` are dropped before returning.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        if readings < 1:
            raise ValueError(f"peak_memory: `readings` must be >= 1, got {readings}")
        with large_allocations_tracked():
            return max(_cpu_peak(fn) for _ in range(readings))
    raise ValueError(f"peak_memory: unsupported device {device}")


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return max(peak, 0)


def _cpu_peak(fn: Callable[[], object]) -> int:
    gc.collect()
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS
    except OSError as error:
        raise RuntimeError("CPU peak memory needs Linux /proc/self/clear_refs") from error
    base = _proc_status("VmRSS:")
    result = fn()
    peak = _proc_status("VmHWM:") - base
    del result
    return max(peak, 0)

