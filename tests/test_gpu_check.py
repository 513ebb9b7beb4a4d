"""The pieces of benchmarks/gpu_check.sh that need no GPU: the summary writer
(benchmarks/summarize.py) and the capped pytest run whose JSON must survive the
cap (benchmarks/capped_pytest.py). The whole script's dry run is a CI step."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import summarize  # noqa: E402


def _bench(group, impl, median_s, **info):
    return {"group": group, "stats": {"median": median_s},
            "extra_info": dict(info, impl=impl)}


def test_benchmark_table_sets_rates_against_the_roofline():
    report = {"datetime": "2026-11-27T09:00:00",
              "machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2},
                               "roofline": {"device": "cpu", "threads": 2, "sgemm_gflops": 100.0,
                                            "copy_gbps": 10.0}},
              "benchmarks": [
                  _bench("conv", "torch", 0.04, device="cpu", flops=1e9, peak_memory_mb=3.5),
                  _bench("conv", "pyattn", 0.02, device="cpu", flops=1e9, peak_memory_mb=0.5),
                  _bench("spmm", "pyattn", 0.02, device="cpu", bytes=1e8, peak_memory_mb=0.0),
                  _bench("attn", "pyattn", 0.001, device="cuda:0", flops=1e11, dtype="bfloat16",
                         peak_memory_mb=0.5)]}
    lines = summarize.benchmark_table(report)
    assert "sgemm 100.0 GFLOP/s" in lines[0] and "copy 10.0 GB/s" in lines[0]
    rows = lines[4:]
    # pyattn first in its group; 1e9 flops in 20 ms = 50 GFLOP/s = 50% of sgemm
    assert rows[0] == "| conv | pyattn | 20.00 |  | 50.0 GFLOP/s (50% of sgemm) | < 1 |"
    assert rows[1] == "| conv | torch | 40.00 | 2.00x | 25.0 GFLOP/s (25% of sgemm) | 3.5 |"
    assert rows[2] == "| spmm | pyattn | 20.00 |  | 5.0 GB/s (50% of copy) | < 1 |"
    # a GPU bf16 row: no bf16 ceiling in this roofline, so no fraction; exact peak kept
    assert rows[3] == "| attn | pyattn | 1.00 |  | 100,000.0 GFLOP/s | 0.5 |"


def _bench_conftest():
    """benchmarks/conftest.py under another name: tests/ has a conftest of its own."""
    path = os.path.join(REPO, "benchmarks", "conftest.py")
    spec = importlib.util.spec_from_file_location("bench_conftest", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_speedup_is_the_median_of_per_round_ratios():
    paired_speedup = _bench_conftest().paired_speedup
    # rounds 2 and 4 ran on a slowed host (both sides alike): their ratios stay 2
    ours, partners = [1.0, 3.0, 1.0, 3.0, 1.0], [2.0, 6.0, 2.2, 6.0, 1.6]
    paired = paired_speedup(ours, partners)
    assert paired == {"speedup": 2.0, "speedup_q1": 2.0, "speedup_q3": 2.0, "rounds": 5,
                      "speedup_ci95": None, "median_s": 1.0, "partner_median_s": 2.2}
    assert paired_speedup([1.0], [3.0]) == {"speedup": 3.0, "speedup_q1": 3.0, "speedup_q3": 3.0,
                                            "rounds": 1, "speedup_ci95": None, "median_s": 1.0,
                                            "partner_median_s": 3.0}
    # 9 pairs: the 2nd and 8th smallest ratios (coverage 1 - 2 * 10 / 512 = 96%)
    ratios = [1.0, 1.9, 1.4, 1.5, 1.6, 0.5, 1.3, 1.2, 1.1]
    assert paired_speedup([1.0] * 9, ratios)["speedup_ci95"] == [1.0, 1.6]


def test_median_interval_matches_the_binomial_order_statistics():
    module = _bench_conftest()
    # textbook ranks of the distribution-free 95% interval of the median
    for n, (low, high) in {6: (1, 6), 9: (2, 8), 20: (6, 15), 100: (40, 61)}.items():
        assert module.median_interval(list(range(1, n + 1))) == (low, high)
    assert module.median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None


def test_benchmark_table_quotes_the_paired_speedup():
    paired = {"partner": "torch", "speedup": 1.5, "speedup_q1": 1.4, "speedup_q3": 1.7,
              "rounds": 9, "median_s": 0.02, "partner_median_s": 0.03}
    report = {"datetime": "2026-11-28T01:00:00", "machine_info": {},
              "benchmarks": [_bench("conv", "pyattn", 0.02, device="cpu", paired=paired),
                             _bench("conv", "torch", 0.06, device="cpu"),
                             _bench("conv", "naive", 0.08, device="cpu")]}
    rows = summarize.benchmark_table(report)[4:]
    # quartiles 20% of the median apart: flagged; the unpaired row keeps the ratio of medians
    assert rows[1] == ("| conv | torch | 60.00 | **1.50x** [1.40-1.70] in 9 pairs "
                       "(30.00 / 20.00 ms), spread 20% |  |  |")
    assert rows[2] == "| conv | naive | 80.00 | 4.00x |  |  |"
    paired.update(speedup_q1=1.45, speedup_q3=1.55)
    assert summarize.benchmark_table(report)[5].endswith("(30.00 / 20.00 ms) |  |  |")
    paired.update(speedup_ci95=[1.42, 1.61])  # reports older than this field have none
    assert summarize.benchmark_table(report)[5].endswith(
        "(30.00 / 20.00 ms), median 1.42-1.61 (95%) |  |  |")
    paired.update(rounds=40, added=31)  # pairs added until steady (conftest)
    assert "**1.50x** [1.45-1.55] in 40 pairs, 31 added (30.00" in summarize.benchmark_table(report)[5]



def test_run_roofline_takes_each_rate_at_its_better_measurement():
    spec = importlib.util.spec_from_file_location("bench_conftest",
                                                  os.path.join(REPO, "benchmarks", "conftest.py"))
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    start = {"device": "cpu", "threads": 2, "gemm_n": 2048, "sgemm_gflops": 149.7,
             "copy_gbps": 9.4}
    end = dict(start, sgemm_gflops=237.1, copy_gbps=8.0)
    best = conftest.best_roofline(start, end)
    assert best == dict(start, sgemm_gflops=237.1, copy_gbps=9.4,
                        measurements={"start": start, "end": end})
    assert start["sgemm_gflops"] == 149.7  # the measurements themselves unchanged
    report = {"datetime": "2026-11-28T21:12:00", "machine_info": {"roofline": best}}
    assert summarize.describe_machine(report).endswith(
        "sgemm 237.1 GFLOP/s, copy 9.4 GB/s (the better of start: sgemm 149.7, copy 9.4; "
        "end: sgemm 237.1, copy 8.0)")


def test_benchmark_table_gives_a_partner_timed_only_in_pairs_its_own_row():
    paired = {"partner": "pyattn zeros", "speedup": 0.98, "speedup_q1": 0.97,
              "speedup_q3": 0.99, "rounds": 9, "median_s": 0.1, "partner_median_s": 0.098}
    report = {"datetime": "2026-11-28T01:00:00",
              "machine_info": {"roofline": {"device": "cpu", "threads": 2,
                                            "sgemm_gflops": 100.0, "copy_gbps": 10.0}},
              "benchmarks": [_bench("padding cost reflect", "pyattn", 0.1, device="cpu",
                                    paired=paired, flops=4.9e9)]}
    rows = summarize.benchmark_table(report)[4:]
    assert len(rows) == 2
    # the partner's rate from the row's flops and the partner's median: 4.9e9 / 0.098 s
    assert rows[1] == ("| padding cost reflect | pyattn zeros (in the pairs) | 98.00 | "
                       "**0.98x** [0.97-0.99] in 9 pairs (98.00 / 100.00 ms) | "
                       "50.0 GFLOP/s (50% of sgemm) |  |")

PAIRED_BENCH_FILE = """
import time
calls = []
def test_pair(measure, benchmark):
    measure(lambda: (calls.append("F"), time.sleep(0.002)), "pair", "pyattn", rounds=3,
            partner=("torch", lambda: (calls.append("P"), time.sleep(0.008))))
    rounds = len(benchmark.stats.stats.data)
    # the timed calls: the partner before pyattn's call in even rounds, after it in odd
    assert "".join(calls[-2 * rounds:]) == "".join("PF" if r % 2 == 0 else "FP"
                                                   for r in range(rounds))
"""


def _run_paired_bench(tmp_path, text: str, steady_s: str) -> dict:
    """Run a benchmark file with the real fixture (benchmarks/conftest.py as a
    plugin) and PYATTN_BENCH_STEADY_S; return the JSON report."""
    (tmp_path / "bench_pair.py").write_text(text)
    report = tmp_path / "report.json"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "conftest", "bench_pair.py", f"--benchmark-json={report}"], cwd=tmp_path,
                   env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "benchmarks"),
                            PYATTN_BENCH_STEADY_S=steady_s),
                   check=True, stdout=subprocess.DEVNULL)
    return json.loads(report.read_text())


def test_measure_alternates_rounds_with_the_partner(tmp_path):
    """The real fixture (benchmarks/conftest.py): the partner runs next to each
    of pyattn's rounds, before and after in turn, as many as PAIRED_BUDGET_S
    holds (at most MAX_ROUNDS), and the speedup is theirs."""
    written = _run_paired_bench(tmp_path, PAIRED_BENCH_FILE, steady_s="0")
    bench, = written["benchmarks"]
    # the roofline measured at the start and again after the last benchmark, each rate the better
    roofline = written["machine_info"]["roofline"]
    start, end = roofline["measurements"]["start"], roofline["measurements"]["end"]
    for key in ("sgemm_gflops", "copy_gbps"):
        assert roofline[key] == max(start[key], end[key]) > 0
    # a smoke run (--benchmark-disable: each call once, no statistics) has no pairs to record
    (tmp_path / "bench_smoke.py").write_text(
        "def test_smoke(measure):\n"
        "    measure(lambda: None, 'smoke', 'pyattn', partner=('torch', lambda: None))\n")
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "conftest", "bench_smoke.py", "--benchmark-disable"], cwd=tmp_path,
                   env=dict(os.environ, PYTHONPATH=os.path.join(REPO, "benchmarks")),
                   check=True, stdout=subprocess.DEVNULL)
    paired = bench["extra_info"]["paired"]
    assert paired["partner"] == "torch"
    # pairs of about 10 ms: PAIRED_BUDGET_S (6 s) holds more than MAX_ROUNDS (100) of them;
    # PYATTN_BENCH_STEADY_S=0 adds none for steadiness
    assert paired["rounds"] == bench["stats"]["rounds"] == 100 and paired["added"] == 0
    # sleeps of 8 ms against 2 ms: the ratio is about 4 whatever the scheduler adds
    assert 2.0 < paired["speedup_q1"] <= paired["speedup"] <= paired["speedup_q3"] < 5.0


class _FakePairs:
    """Pairs on a clock that only their calls move: pyattn's call takes 1 s,
    the partner's the next of ``partner_s``; ``calls`` logs their order. Starts
    with the pairs a fixture's pedantic rounds would have left."""

    def __init__(self, done_partner_s, partner_s):
        self.now, self.partner_s, self.calls = 0.0, list(partner_s), []
        self.stats = type("Stats", (), {})()
        self.stats.data = [1.0] * len(done_partner_s)
        self.partner_times = list(done_partner_s)

    def clock(self):
        return self.now

    def fn(self):
        self.calls.append("F")
        self.now += 1.0

    def timed_partner(self):
        self.calls.append("P")
        seconds = self.partner_s.pop(0)
        self.partner_times.append(seconds)
        self.now += seconds

    def update(self, seconds):
        self.stats.data.append(seconds)

    def add(self, conftest):
        return conftest.add_pairs_until_steady(self.fn, self.timed_partner, self,
                                               self.partner_times, clock=self.clock)

    def ratios(self):
        return [p / o for p, o in zip(self.partner_times, self.stats.data)]


def test_is_steady_needs_an_interval_under_a_tenth_of_the_median():
    conftest = _bench_conftest()
    assert conftest.is_steady([2.0] * 9)
    assert not conftest.is_steady([2.0] * 5)  # too few pairs for a 95% interval
    assert not conftest.is_steady([1.0, 3.0] * 10)

    def spread(half_range):  # 100 ratios evenly over 2 +- half_range, shuffled
        return [2.0 + half_range * (2 * ((i * 37) % 100) / 99 - 1) for i in range(100)]
    # the interval is the 40th to 61st of 100: 21 / 99 of the range wide
    assert conftest.is_steady(spread(0.38))  # 0.161, 8% of 2
    assert not conftest.is_steady(spread(0.56))  # 0.238, 12% of 2


def test_pairs_are_added_until_steady_in_the_same_order(monkeypatch):
    """A row whose 9 pairs disagree (ratios 1 and 3) gets pairs added, partner
    before pyattn in even rounds and after it in odd ones as in the pedantic
    rounds, and stops at the first steady count."""
    conftest = _bench_conftest()
    monkeypatch.setattr(conftest, "STEADY_BUDGET_S", 1000.0)
    pairs = _FakePairs([1.0, 3.0] * 4 + [1.0], [2.0] * 100)
    added = pairs.add(conftest)
    assert added > 0 and len(pairs.stats.data) == len(pairs.partner_times) == 9 + added
    assert conftest.is_steady(pairs.ratios()) and not conftest.is_steady(pairs.ratios()[:-1])
    # round 9 (odd) first: pyattn then partner, then round 10: partner then pyattn
    assert "".join(pairs.calls) == "".join("FP" if r % 2 else "PF" for r in range(9, 9 + added))


def test_steady_budget_names_its_variable_when_it_is_not_seconds():
    conftest = _bench_conftest()
    assert conftest.steady_budget_s({}) == 60.0
    assert conftest.steady_budget_s({"PYATTN_BENCH_STEADY_S": "0"}) == 0.0
    assert conftest.steady_budget_s({"PYATTN_BENCH_STEADY_S": "2.5"}) == 2.5
    for bad in ("sixty", "", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match="PYATTN_BENCH_STEADY_S must be a number"):
            conftest.steady_budget_s({"PYATTN_BENCH_STEADY_S": bad})


def test_added_pairs_stop_at_the_time_and_pair_budgets(monkeypatch):
    conftest = _bench_conftest()
    monkeypatch.setattr(conftest, "STEADY_BUDGET_S", 20.0)
    noisy = [1.0, 3.0] * 100  # never steady
    pairs = _FakePairs(noisy[:9], noisy[9:])
    added = pairs.add(conftest)
    costs = [1.0 + seconds for seconds in pairs.partner_times[9:]]
    assert sum(costs[:-1]) < 20.0 <= sum(costs) and added == len(costs)
    monkeypatch.setattr(conftest, "STEADY_BUDGET_S", 1000.0)
    monkeypatch.setattr(conftest, "MAX_PAIRS", 30)
    pairs = _FakePairs(noisy[:9], noisy[9:])
    assert pairs.add(conftest) == 21 and len(pairs.stats.data) == 30
    monkeypatch.setattr(conftest, "STEADY_BUDGET_S", 0.0)
    pairs = _FakePairs(noisy[:9], noisy[9:])
    assert pairs.add(conftest) == 0 and pairs.calls == []


def test_measure_adds_pairs_while_unsteady(tmp_path):
    """The real fixture with no interval ever narrow enough (STEADY_WIDTH 0):
    pairs are added, in the same order, for PYATTN_BENCH_STEADY_S, and they
    are in pyattn's row statistics and in the paired figures."""
    written = _run_paired_bench(
        tmp_path, "import conftest\nconftest.STEADY_WIDTH = 0.0\n" + PAIRED_BENCH_FILE,
        steady_s="0.3")
    bench, = written["benchmarks"]
    paired = bench["extra_info"]["paired"]
    # pairs of about 10 ms: 0.3 s adds some 30
    assert 5 <= paired["added"] <= 60
    assert bench["stats"]["rounds"] == paired["rounds"] == 100 + paired["added"]


def test_step_table_reads_pytest_counts(tmp_path):
    logs = {"tests-spmm": "....F.s\n=== FAILURES ===\n1 failed, 5 passed, 1 skipped in 4.20s\n",
            "tests-other": "5/40 tests collected (35 deselected) in 1.00s\n",
            "bench-spmm": "..\n!!! KeyboardInterrupt !!!\n2 passed in 29.00s\n"}
    rows = ["step\tcap_s\telapsed_s\texit\tlog",
            f"build\t140\t61\t0\t{tmp_path}/missing.log"]
    for (name, text), code in zip(logs.items(), (1, 0, 124)):
        (tmp_path / f"{name}.log").write_text(text)
        rows.append(f"{name}\t30\t12\t{code}\t{tmp_path}/{name}.log")
    (tmp_path / "steps.tsv").write_text("\n".join(rows) + "\n")
    text = summarize.summarize([str(tmp_path / "absent.json")], str(tmp_path / "steps.tsv"))
    assert "| build | ok |  |  |  |  |  | 61 (140) |" in text
    assert "| tests-spmm | FAILED (exit 1) |  | 5 | 1 |  | 1 | 12 (30) |" in text
    assert "| tests-other | ok | 5 |  |  |  |  | 12 (30) |" in text
    assert "| bench-spmm | TIMED OUT (stopped at its cap) |  | 2 |" in text
    assert "## absent.json" in text and "No report" in text


BENCH_FILE = """
import os, time
def test_a_finishes(benchmark):
    benchmark.group = "finished case"
    benchmark.extra_info.update(impl="pyattn", device="cpu", peak_memory_mb=2.0)
    benchmark.pedantic(lambda: None, rounds=2)
def test_b_hangs(benchmark):
    open(os.environ["STARTED"], "w").close()
    time.sleep(60)
"""


def _interrupted_run(tmp_path, command, wait_s):
    """Run a two-case benchmark file with SIGINT ignored at start (as a background
    job of a non-interactive shell), send SIGINT once the second case hangs;
    return the exit code (None if SIGINT did not stop it) and the JSON path."""
    (tmp_path / "bench_hang.py").write_text(BENCH_FILE)
    started, report = tmp_path / "started", tmp_path / "report.json"
    proc = subprocess.Popen(
        command + ["bench_hang.py", "-q", "-p", "no:cacheprovider", f"--benchmark-json={report}"],
        cwd=tmp_path, env=dict(os.environ, STARTED=str(started)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.monotonic() + 120
    while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    return code, report


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_capped_pytest_writes_benchmark_json_when_interrupted(tmp_path):
    code, report = _interrupted_run(
        tmp_path, [sys.executable, os.path.join(REPO, "benchmarks", "capped_pytest.py")], 60)
    assert code == 2  # pytest's "interrupted"
    data = json.loads(report.read_text())
    assert [b["name"] for b in data["benchmarks"]] == ["test_a_finishes"]
    assert "| finished case | pyattn |" in summarize.summarize([str(report)])


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_plain_pytest_started_with_sigint_ignored_loses_the_json(tmp_path):
    # Why gpu_check.sh goes through capped_pytest.py: without it the cap's SIGINT
    # is ignored, KILL follows, and no figure survives.
    code, report = _interrupted_run(tmp_path, [sys.executable, "-m", "pytest"], 3)
    assert code is None and not report.exists()
