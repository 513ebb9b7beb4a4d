"""Check issue 12's CPU targets against a pytest-benchmark JSON report of the
suites in this folder: per target, each case's paired speedup over the named
PyTorch counterpart (median [quartiles] of alternating rounds, see
conftest.measure), whether it meets the bar, and both sides' achieved rates
against the machine's roofline (% of sgemm, % of copy bandwidth), so that a
miss reads with its reason. Markdown on standard output.

    python benchmarks/targets.py report.json

"Padding costs nothing" reads the padding-cost rows of bench_padded_conv.py:
pyattn in each padding mode paired with pyattn's zeros mode of the same shape.
Only the standard library (as summarize.py).
"""
import argparse
import json
import re

from summarize import format_rate

# (title, bar, group pattern): the wording; sequence lengths 512-8192
# on the CPU suite are its 1024 and 4096.
SPEEDUP_TARGETS = [
    ("Net1 training step, zeros", 1.1, r"padded_conv Net1 training step zeros$"),
    ("Net1 training step, reflect / replicate", 1.5,
     r"padded_conv Net1 training step (reflect|replicate)$"),
    ("Net1 training step, circular", 2.5, r"padded_conv Net1 training step circular$"),
    ("large layer, every mode, forward and forward+backward", 1.0, r"padded_conv large "),
    ("attention forward, seq 1024 / 4096, d 64 / 128, causal or not", 1.1,
     r"attention seq (1024|4096) d (64|128) forward (full|causal)$"),
    ("attention forward+backward, same shapes", 1.2,
     r"attention seq (1024|4096) d (64|128) forward\+backward (full|causal)$"),
    ("attention GQA (8 / 2 heads, seq 1024) forward", 1.1, r"attention gqa .* forward causal$"),
    ("attention GQA forward+backward", 1.2, r"attention gqa .* forward\+backward causal$"),
    ("attention decode (1 query, 1024 / 4096 keys)", 1.0, r"attention decode "),
    ("spmm forward+backward, sum and mean, F 16-256 and Cora", 1.5,
     r"spmm .* (sum|mean) forward\+backward(\+transpose)?$"),
    ("spmm forward, sum and mean", 1.2, r"spmm .* (sum|mean) forward$"),
    ("padding costs nothing: reflect / replicate / circular against pyattn's zeros mode", 1.0,
     r"padded_conv padding cost "),
]


def pyattn_rows(report: dict) -> dict:
    return {b["group"]: b for b in report["benchmarks"] if b["extra_info"].get("impl") == "pyattn"}


def speedup_table(report: dict) -> list:
    roofline = report.get("machine_info", {}).get("roofline") or {}
    rows = pyattn_rows(report)
    lines = ["| target | met | case | paired speedup [quartiles] | pyattn | counterpart |",
             "| --- | --- | --- | --- | --- | --- |"]
    for title, bar, pattern in SPEEDUP_TARGETS:
        cases = [(group, bench) for group, bench in rows.items() if re.search(pattern, group)]
        met = sum(bench["extra_info"].get("paired", {}).get("speedup", 0) >= bar
                  for _, bench in cases)
        lines.append(f"| **{title}: >= {bar}x** | **{met} of {len(cases)}** |  |  |  |  |")
        for group, bench in cases:
            info = bench["extra_info"]
            if "paired" not in info:  # e.g. the counterpart does not take the case here
                lines.append(f"|  | ? | {group} | not paired |  |  |")
                continue
            paired = info["paired"]
            ours_s, theirs_s = paired["median_s"], paired["partner_median_s"]
            lines.append(
                f"|  | {'yes' if paired['speedup'] >= bar else 'no'} | {group} | "
                f"{paired['speedup']:.2f}x "
                f"[{paired['speedup_q1']:.2f}-{paired['speedup_q3']:.2f}] | "
                f"{ours_s * 1e3:.2f} ms, {format_rate(info, ours_s, roofline)} | "
                f"{paired['partner']} {theirs_s * 1e3:.2f} ms, "
                f"{format_rate(info, theirs_s, roofline)} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="JSON written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    print("\n".join(speedup_table(report)))


if __name__ == "__main__":
    main()
