"""Shared pieces of the pyattn benchmarks (pytest-benchmark).

Every benchmark times pyattn and its PyTorch counterpart in the same run and
records peak memory in ``extra_info``; ``benchmarks/summarize.py`` turns the
JSON report into the tables of RESULTS.md.
"""
import time

import pytest
import torch

from pyattn.profiling import peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


@pytest.fixture
def measure(benchmark):
    """measure(fn, group, impl, rounds=5): time fn and record its peak memory."""
    def run(fn, group, impl, rounds=5, **info):
        fn = synchronized(fn)
        if DEVICE.type == "cpu":
            # let BLAS threads that spin after the previous benchmark go to sleep:
            # they would otherwise take the cores from this one's OpenMP threads
            time.sleep(0.5)
        fn()  # warm up (allocator, kernel caches)
        benchmark.group = group
        benchmark.extra_info.update(info, impl=impl, device=str(DEVICE),
                                    peak_memory_mb=peak_memory(fn, DEVICE) / 2**20)
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)
    return run
