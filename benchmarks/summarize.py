"""Turn a pytest-benchmark JSON report into a Markdown table: per group, pyattn
against the other implementations (median time, speedup, TFLOP/s where the
benchmark records its flops, tokens/s or GB/s where it records tokens or bytes
moved, peak memory).

    python benchmarks/summarize.py report.json > table.md
"""
import argparse
import collections
import json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", help="JSON written by pytest --benchmark-json")
    args = parser.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    groups = collections.OrderedDict()
    for bench in report["benchmarks"]:
        groups.setdefault(bench["group"], {})[bench["extra_info"]["impl"]] = bench
    machine = report.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, "
          f"{machine.get('cpu', {}).get('count', '?')} CPUs; "
          f"date {report.get('datetime', '?')[:10]}")
    print()
    print("| benchmark | impl | median ms | speedup of pyattn | rate | peak MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for group, impls in groups.items():
        ours = impls.get("pyattn")
        for impl, bench in sorted(impls.items(), key=lambda kv: kv[0] != "pyattn"):
            median = bench["stats"]["median"] * 1e3
            speedup = ""
            if ours is not None and impl != "pyattn":
                speedup = f"{bench['stats']['median'] / ours['stats']['median']:.2f}x"
            peak = bench["extra_info"].get("peak_memory_mb")
            peak_text = f"{peak:.1f}" if peak is not None else ""
            info, median_s = bench["extra_info"], bench["stats"]["median"]
            rate = ""
            if info.get("flops"):
                rate = f"{info['flops'] / median_s / 1e12:.3f} TFLOP/s"
            elif info.get("tokens"):
                rate = f"{info['tokens'] / median_s:,.0f} tok/s"
            elif info.get("bytes"):
                gbps = info["bytes"] / median_s / 1e9
                rate = f"{gbps:.1f} GB/s"
                if info.get("copy_bandwidth_gbps"):
                    rate += f" ({100 * gbps / info['copy_bandwidth_gbps']:.0f}% of copy)"
            print(f"| {group} | {impl} | {median:.2f} | {speedup} | {rate} | {peak_text} |")


if __name__ == "__main__":
    main()
