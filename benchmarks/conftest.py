"""Shared pieces of the pyattn benchmarks (pytest-benchmark).

Every benchmark times pyattn and its PyTorch counterpart in the same run and
records peak memory in ``extra_info``; pyattn's rows also time the counterpart
the issues name in rounds alternating with their own (``partner``: the speedup
RESULTS.md quotes, robust to a noisy host). ``benchmarks/summarize.py`` turns
the JSON report into the tables of RESULTS.md.

The machine's roofline (float32 matrix-product rate through torch's BLAS or
cuBLAS, and memory copy bandwidth) is measured when the first benchmark runs
and again after the last, printed at the end of the run and stored in the JSON
report's ``machine_info["roofline"]`` (each rate the better of the two), so
every row that records ``flops`` or ``bytes`` can be set against the machine's
own limit.
"""
import math
import os
import statistics
import time
from fractions import Fraction

import pytest
import torch

from pyattn.profiling import peak_memory

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROOFLINE, ROOFLINE_END = pytest.StashKey[dict](), pytest.StashKey[dict]()
ROUND_BUDGET_S, MAX_ROUNDS, PAIRED_ROUNDS = 0.5, 100, 9
# Seconds of pairs a paired row may spend in all (at least PAIRED_ROUNDS): the
# 95% interval of a median narrows as 1 / sqrt(pairs), and on this noisy host
# 9-11 pairs of a 45 ms case left it wider than 10% of the median (the run of
# 2026-11-28: 32 of 158 paired rows under 10%); 6 s adds about 5 minutes to
# `make bench` and gives cases up to 60 ms 100 pairs.
PAIRED_BUDGET_S = 6.0
# Then a paired row adds pairs until the 95% interval of its median is
# narrower than STEADY_WIDTH of it, for about STEADY_BUDGET_S more seconds
# (PYATTN_BENCH_STEADY_S; 0: none) and MAX_PAIRS pairs in all. In the run of
# 2026-11-29 48 of 158 rows were wider after 6 s; 40 rows rerun with this rule
# took 6 min, Cora's forward rows (calls under 0.2 ms, quartiles 20-60% apart)
# 1280-2000 pairs in under a second each, and 39 of the 40 ended under 10%.
STEADY_WIDTH, MAX_PAIRS = 0.10, 2000


def steady_budget_s(environ=os.environ) -> float:
    """PYATTN_BENCH_STEADY_S as seconds (60 unset); a value that is not a
    non-negative number stops the run with an error that names the variable."""
    text = environ.get("PYATTN_BENCH_STEADY_S", "60")
    error = f"PYATTN_BENCH_STEADY_S must be a number of seconds >= 0, got {text!r}"
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(error) from None
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ValueError(error)
    return seconds


STEADY_BUDGET_S = steady_budget_s()


def synchronized(fn):
    if DEVICE.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize()
        return result
    return run


def _best_seconds(fn, repeats: int) -> float:
    """Shortest of `repeats` timed calls after one warm-up (a ceiling wants the best)."""
    fn = synchronized(fn)
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_roofline(device: torch.device = DEVICE) -> dict:
    """This machine's limits: GFLOP/s of a large float32 ``torch.mm`` (all of
    torch's threads on CPU), GB/s of a large tensor copy (bytes read + written),
    and on CUDA also the bfloat16 matrix-product rate (the ceiling of half-
    precision rows). Sizes: n = 2048 and a 256 MiB copy on CPU (about 1 s on 2
    cores); n = 8192 and a 1 GiB copy on a GPU."""
    cuda = device.type == "cuda"
    n = 8192 if cuda else 2048
    copy_elements = 2 ** 28 if cuda else 2 ** 26
    result = {"device": str(device), "threads": torch.get_num_threads(), "gemm_n": n}
    dtypes = {"sgemm_gflops": torch.float32}
    if cuda:
        result["device_name"] = torch.cuda.get_device_name(device)
        dtypes["bf16_gemm_gflops"] = torch.bfloat16
    for key, dtype in dtypes.items():
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        result[key] = 2 * n ** 3 / _best_seconds(lambda: torch.mm(a, b), 5) / 1e9
        del a, b
    src = torch.randn(copy_elements, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), 5)
    result["copy_gbps"] = 2 * src.numel() * src.element_size() / seconds / 1e9
    return result


def describe_rates(roofline: dict) -> str:
    text = f"sgemm {roofline['sgemm_gflops']:.1f} GFLOP/s"
    if "bf16_gemm_gflops" in roofline:
        text += f", bf16 gemm {roofline['bf16_gemm_gflops']:.0f} GFLOP/s"
    return text + f", copy {roofline['copy_gbps']:.1f} GB/s"


def describe_roofline(roofline: dict) -> str:
    text = f"roofline ({roofline['device']}, {roofline['threads']} threads): "
    text += describe_rates(roofline)
    measurements = roofline.get("measurements", {})
    if measurements:
        text += " (the better of " + "; ".join(
            f"{when}: {describe_rates(rates)}" for when, rates in measurements.items()) + ")"
    return text


@pytest.fixture(scope="session")
def roofline(request):
    """The roofline, measured once per session when the first benchmark asks for it."""
    result = measure_roofline()
    request.config.stash[ROOFLINE] = result
    return result


def best_roofline(start: dict, end: dict) -> dict:
    """The roofline of a whole run from its measurements at the start and at
    the end: each rate the higher of the two (what the machine showed it can
    do; on a shared host the start alone may fall in a slow spell: sgemm 150
    GFLOP/s at one run's start, 237 at another's), both kept under
    ``measurements``."""
    result = dict(start)
    for key, value in end.items():
        if key.endswith(("_gflops", "_gbps")):
            result[key] = max(start[key], value)
    result["measurements"] = {"start": start, "end": end}
    return result


def run_roofline(config) -> dict:
    """best_roofline of this session (the end measured on the first call)."""
    if ROOFLINE_END not in config.stash:
        config.stash[ROOFLINE_END] = measure_roofline()
    return best_roofline(config.stash[ROOFLINE], config.stash[ROOFLINE_END])


def pytest_benchmark_update_machine_info(config, machine_info):
    # pytest-benchmark asks for machine_info when it writes the report, after the last benchmark
    if ROOFLINE in config.stash:
        machine_info["roofline"] = run_roofline(config)


def pytest_terminal_summary(terminalreporter, config):
    if ROOFLINE in config.stash:
        terminalreporter.write_line(describe_roofline(run_roofline(config)))


def median_interval(ordered: list, confidence: float = 0.95):
    """Distribution-free confidence interval of the median of sorted values:
    (x_(k), x_(n+1-k)) for the largest k with P(Binomial(n, 1/2) < k) <= (1 -
    confidence) / 2, which covers the median with at least that probability
    whatever the distribution. None below 6 values (no such k). In integers
    (2^n P(Binomial <= k), one binomial coefficient from the last): it runs
    after every few added pairs, and floats of math.comb took 78 ms at 2000."""
    n = len(ordered)
    limit = math.floor(Fraction((1 - confidence) / 2) * 2 ** n)
    k, term, tail = 0, 1, 1  # C(n, 0)
    while tail <= limit:
        term = term * (n - k) // (k + 1)
        k += 1
        tail += term
    return (ordered[k - 1], ordered[n - k]) if k >= 1 else None


def paired_speedup(ours: list, partners: list) -> dict:
    """Median and quartiles of partner / ours over rounds timed back to back:
    noise that lasts longer than a round (another tenant, clock changes) slows
    both sides of a round alike and cancels in its ratio. The quartiles say how
    much single rounds vary; ``speedup_ci95`` how well the median is known,
    which narrows as rounds are added."""
    ratios = sorted(p / o for p, o in zip(partners, ours))
    q1, median, q3 = (statistics.quantiles(ratios, n=4, method="inclusive")
                      if len(ratios) > 1 else ratios * 3)
    interval = median_interval(ratios)
    return {"speedup": median, "speedup_q1": q1, "speedup_q3": q3, "rounds": len(ratios),
            "speedup_ci95": list(interval) if interval else None,
            "median_s": statistics.median(ours), "partner_median_s": statistics.median(partners)}


def is_steady(ratios: list) -> bool:
    """Whether the 95% interval of the median of these per-pair ratios is
    narrower than STEADY_WIDTH of the median."""
    ordered = sorted(ratios)
    interval = median_interval(ordered)
    return bool(interval) and interval[1] - interval[0] < STEADY_WIDTH * statistics.median(ordered)


@pytest.fixture
def measure(benchmark, roofline):
    """measure(fn, group, impl, rounds=5, partner=None): time fn and record its
    peak memory. ``rounds`` is a minimum: fast cases run as many rounds as fit
    in ROUND_BUDGET_S (PAIRED_BUDGET_S for paired rows, both sides counted; at
    most MAX_ROUNDS before any pairs added for steadiness, below), so that
    their median is stable.

    ``partner=(name, fn)``, given to pyattn's rows: the PyTorch counterpart the
    issues set the targets against, run (and timed) next to each of fn's
    rounds, at least PAIRED_ROUNDS pairs, before fn in even rounds and after it
    in odd ones (P F F P P F ...), so that what one call leaves behind (cache
    contents, spinning threads) falls on both sides alike; extra_info["paired"]
    holds the per-round speedups' median and quartiles (:func:`paired_speedup`),
    the figure RESULTS.md quotes. Where their median's 95% interval is still
    STEADY_WIDTH of it or wider, pairs are added in the same order, timed the
    same way, until it is narrower or about STEADY_BUDGET_S more seconds or
    MAX_PAIRS pairs are spent (``paired["added"]`` counts them; pyattn's row statistics
    include them). The partner also has its own row (its own test), timed
    alone like every other implementation."""
    def run(fn, group, impl, rounds=5, partner=None, **info):
        fn = synchronized(fn)
        if DEVICE.type == "cpu":
            # let BLAS threads that spin after the previous benchmark go to sleep:
            # they would otherwise take the cores from this one's OpenMP threads
            time.sleep(0.5)
        start = time.perf_counter()
        fn()  # warm up (allocator, kernel caches)
        once = time.perf_counter() - start
        setup = teardown = None
        partner_times, round_index = [], [0]
        if partner is not None:
            partner_name, partner_fn = partner[0], synchronized(partner[1])
            start = time.perf_counter()
            partner_fn()
            once += time.perf_counter() - start
            rounds = max(rounds, PAIRED_ROUNDS)

            def timed_partner():
                start = time.perf_counter()
                partner_fn()
                partner_times.append(time.perf_counter() - start)

            def setup():  # pedantic calls it before each round, teardown after
                if round_index[0] % 2 == 0:
                    timed_partner()

            def teardown():
                if round_index[0] % 2 == 1:
                    timed_partner()
                round_index[0] += 1
        budget = PAIRED_BUDGET_S if partner is not None else ROUND_BUDGET_S
        rounds = max(rounds, min(MAX_ROUNDS, int(budget / max(once, 1e-6))))
        benchmark.group = group
        benchmark.extra_info.update(info, impl=impl, device=str(DEVICE),
                                    peak_memory_mb=peak_memory(fn, DEVICE) / 2**20)
        benchmark.pedantic(fn, setup=setup, teardown=teardown, rounds=rounds, warmup_rounds=0,
                           iterations=1)
        if partner is not None and benchmark.stats:  # no stats under --benchmark-disable
            ours = benchmark.stats.stats.data
            del partner_times[len(ours):]  # --benchmark-cprofile runs one more pair
            added = add_pairs_until_steady(fn, timed_partner, benchmark.stats, partner_times)
            benchmark.extra_info["paired"] = dict(
                paired_speedup(ours, partner_times), partner=partner_name, added=added)
    return run


def add_pairs_until_steady(fn, timed_partner, stats, partner_times: list,
                           clock=time.perf_counter) -> int:
    """Time more pairs, continuing the P F F P order, into ``stats`` (pyattn's
    rounds) and ``partner_times`` until their ratios are steady (is_steady) or
    the budget is spent (the last pair may overrun it); return how many were
    added. pyattn's added rounds are timed by ``clock`` (time.perf_counter, as
    the partner always is), not by --benchmark-timer. The check runs every len / 20 pairs:
    it costs more than a fast pair once pairs number hundreds. A row stops at
    its first interval under STEADY_WIDTH, so that interval covers a little
    less than its nominal 95%."""
    ours, added, next_check = stats.stats.data, 0, len(stats.stats.data)
    begin = clock()
    while len(ours) < MAX_PAIRS and clock() - begin < STEADY_BUDGET_S:
        if len(ours) >= next_check:
            if is_steady([p / o for p, o in zip(partner_times, ours)]):
                break
            next_check = len(ours) + max(1, len(ours) // 20)
        partner_first = len(ours) % 2 == 0
        if partner_first:
            timed_partner()
        start = clock()
        fn()
        stats.update(clock() - start)
        if not partner_first:
            timed_partner()
        added += 1
    return added
