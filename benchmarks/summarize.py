"""Turn pytest-benchmark JSON reports into Markdown tables: per group, pyattn
against the other implementations (median time, speedup, achieved rate, peak
memory), with the rate set against the machine's roofline where the report
holds one (``machine_info["roofline"]``, measured by benchmarks/conftest.py):
rows that record ``flops`` show GFLOP/s and their fraction of the matrix-product
rate (bfloat16 for half-precision rows on a GPU when known, else float32);
rows that record ``bytes`` show GB/s and their fraction of copy bandwidth.
CPU peak memory under 1 MiB is below the measurement's resolution and reads
"< 1". The speedup over the counterpart that pyattn's row was paired with
(``extra_info["paired"]``) is in bold: the median of per-round ratios of
alternating rounds, with its quartiles, both sides' medians over those
rounds and, where recorded, the median's distribution-free 95% confidence
interval (a partner with no row of its own, such as pyattn's zeros mode in the
padding-cost rows, gets one from the pairs); other speedups are ratios of medians of separately timed rows. With
``--steps`` (written by benchmarks/gpu_check.sh) a table of the steps comes
first: pass / fail counts read from each step's pytest log.

    python benchmarks/summarize.py report.json > table.md
    python benchmarks/summarize.py --steps steps.tsv --output results.md a.json b.json

Only the standard library: the summary must be written even when pyattn
failed to build.
"""
import argparse
import collections
import csv
import json
import os
import re

CPU_RESOLUTION_MIB = 1.0
SPREAD_FLAG = 0.10  # interquartile range / median of a paired speedup worth a flag
HALF_DTYPES = ("float16", "bfloat16", "torch.float16", "torch.bfloat16")
OUTCOMES = ("passed", "failed", "errors", "skipped", "deselected")
STATUS = {0: "ok", 5: "nothing selected", 124: "TIMED OUT (stopped at its cap)",
          137: "KILLED at its cap"}


def format_peak(info: dict) -> str:
    peak = info.get("peak_memory_mb")
    if peak is None:
        return ""
    if info.get("device", "cpu").startswith("cpu") and peak < CPU_RESOLUTION_MIB:
        return f"< {CPU_RESOLUTION_MIB:.0f}"
    return f"{peak:.1f}"


def format_rate(info: dict, median_s: float, roofline: dict) -> str:
    """Achieved rate of one row, with its fraction of the roofline where known."""
    if info.get("flops"):
        gflops = info["flops"] / median_s / 1e9
        text = f"{gflops:,.1f} GFLOP/s"
        dtype = str(info.get("dtype", ""))
        on_cpu = info.get("device", "cpu").startswith("cpu")
        if dtype in HALF_DTYPES:
            peak, name = roofline.get("bf16_gemm_gflops"), "bf16 gemm"
        elif dtype.endswith("float32") or (not dtype and on_cpu):
            peak, name = roofline.get("sgemm_gflops"), "sgemm"
        else:  # a GPU row of unknown dtype, or float64: no ceiling measured for it
            peak = None
        return text + (f" ({100 * gflops / peak:.0f}% of {name})" if peak else "")
    if info.get("bytes"):
        gbps = info["bytes"] / median_s / 1e9
        copy = roofline.get("copy_gbps") or info.get("copy_bandwidth_gbps")
        return f"{gbps:.1f} GB/s" + (f" ({100 * gbps / copy:.0f}% of copy)" if copy else "")
    if info.get("tokens"):
        return f"{info['tokens'] / median_s:,.0f} tok/s"
    return ""


def format_paired(paired: dict) -> str:
    """A paired speedup (benchmarks/conftest.py): median [quartiles] over its
    rounds (and how many of them were added for steadiness), flagged where the
    quartiles lie 10% of the median or more apart, then the median's 95%
    confidence interval where the run recorded one."""
    spread = (paired["speedup_q3"] - paired["speedup_q1"]) / paired["speedup"]
    added = f", {paired['added']} added" if paired.get("added") else ""
    text = (f"**{paired['speedup']:.2f}x** [{paired['speedup_q1']:.2f}-"
            f"{paired['speedup_q3']:.2f}] in {paired['rounds']} pairs{added} "
            f"({paired['partner_median_s'] * 1e3:.2f} / {paired['median_s'] * 1e3:.2f} ms)")
    text += f", spread {100 * spread:.0f}%" if spread >= SPREAD_FLAG else ""
    interval = paired.get("speedup_ci95")
    return text + (f", median {interval[0]:.2f}-{interval[1]:.2f} (95%)" if interval else "")


def describe_machine(report: dict) -> str:
    machine = report.get("machine_info", {})
    text = (f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
            f"{machine.get('cpu', {}).get('count', '?')} CPUs; "
            f"date {report.get('datetime', '?')[:10]}")
    roofline = machine.get("roofline")
    if roofline:
        text += (f". Roofline ({roofline.get('device_name', roofline['device'])}, "
                 f"{roofline['threads']} threads): sgemm {roofline['sgemm_gflops']:,.1f} GFLOP/s")
        if roofline.get("bf16_gemm_gflops"):
            text += f", bf16 gemm {roofline['bf16_gemm_gflops']:,.0f} GFLOP/s"
        text += f", copy {roofline['copy_gbps']:,.1f} GB/s"
        measurements = roofline.get("measurements", {})
        if measurements:  # benchmarks/conftest.py: the better of the run's start and end
            text += " (the better of " + "; ".join(
                f"{when}: sgemm {rates['sgemm_gflops']:,.1f}, copy {rates['copy_gbps']:,.1f}"
                for when, rates in measurements.items()) + ")"
    return text


def benchmark_table(report: dict) -> list:
    """Markdown lines: machine line, then one row per benchmark, pyattn first in its group."""
    roofline = report.get("machine_info", {}).get("roofline") or {}
    groups = collections.OrderedDict()
    for bench in report["benchmarks"]:
        groups.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = bench
    lines = [describe_machine(report), "",
             "| benchmark | impl | median ms | speedup of pyattn | rate | peak MiB |",
             "| --- | --- | --- | --- | --- | --- |"]
    for group, impls in groups.items():
        ours = impls.get("pyattn")
        for impl, bench in sorted(impls.items(), key=lambda kv: kv[0] != "pyattn"):
            info, median_s = bench["extra_info"], bench["stats"]["median"]
            speedup = ""
            if ours is not None and impl != "pyattn":
                paired = ours["extra_info"].get("paired")
                if paired and paired["partner"] == impl:
                    speedup = format_paired(paired)
                else:
                    speedup = f"{median_s / ours['stats']['median']:.2f}x"
            lines.append(f"| {group} | {impl} | {median_s * 1e3:.2f} | {speedup} | "
                         f"{format_rate(info, median_s, roofline)} | {format_peak(info)} |")
        paired = ours["extra_info"].get("paired") if ours is not None else None
        if paired and paired["partner"] not in impls:  # timed only in the pairs
            median_s = paired["partner_median_s"]
            lines.append(f"| {group} | {paired['partner']} (in the pairs) | {median_s * 1e3:.2f} | "
                         f"{format_paired(paired)} | "
                         f"{format_rate(ours['extra_info'], median_s, roofline)} |  |")
    return lines


def pytest_counts(log_text: str) -> dict:
    """Counts from pytest's last summary line ("3 passed, 1 failed in 2.0s",
    "5/40 tests collected (35 deselected) in 1.0s"); {} if there is none."""
    summary = None
    for line in log_text.splitlines():
        if re.search(r"\b(passed|failed|errors?|skipped|deselected|collected|no tests ran)\b"
                     r".* in [\d.]+s", line):
            summary = line
    if summary is None:
        return {}
    counts = {}
    for number, word in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)",
                                   summary):
        counts["errors" if word.startswith("error") else word] = int(number)
    collected = re.search(r"(\d+)(?:/\d+)? tests? collected", summary)
    if collected:
        counts["collected"] = int(collected.group(1))
    return counts


def steps_table(steps_path: str) -> list:
    lines = ["| step | status | collected | passed | failed | errors | skipped | seconds (cap) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    with open(steps_path) as f:
        for row in csv.DictReader(f, delimiter="\t"):
            code = int(row["exit"])
            log_path = row["log"]
            counts = {}
            if os.path.exists(log_path):
                with open(log_path, errors="replace") as log:
                    counts = pytest_counts(log.read())
            status = STATUS.get(code, f"FAILED (exit {code})")
            cells = [str(counts.get(key, "")) for key in ("collected",) + OUTCOMES[:4]]
            lines.append(f"| {row['step']} | {status} | {' | '.join(cells)} | "
                         f"{row['elapsed_s']} ({row['cap_s']}) |")
    return lines


def summarize(report_paths, steps_path=None) -> str:
    lines = []
    if steps_path:
        lines += ["## Steps", ""] + steps_table(steps_path) + [""]
    for path in report_paths:
        if steps_path or len(report_paths) > 1:
            lines += [f"## {os.path.basename(path)}", ""]
        if not os.path.exists(path):
            lines += ["No report: the step failed, timed out before its first benchmark "
                      "finished, or was a dry run.", ""]
            continue
        with open(path) as f:
            lines += benchmark_table(json.load(f)) + [""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="*", help="JSON written by pytest --benchmark-json")
    parser.add_argument("--steps", help="step table (TSV: step, cap_s, elapsed_s, exit, log)")
    parser.add_argument("--output", help="write here instead of standard output")
    args = parser.parse_args(argv)
    if not args.reports and not args.steps:
        parser.error("give at least one report or --steps")
    text = summarize(args.reports, args.steps)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
