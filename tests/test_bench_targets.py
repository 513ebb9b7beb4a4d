"""benchmarks/targets.py: issue 12's targets read from a benchmark report."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import targets  # noqa: E402


def _row(group, impl, median_s, paired=None, **info):
    info = dict(info, impl=impl)
    if paired:
        speedup, partner_s = paired
        info["paired"] = {"partner": "torch", "speedup": speedup, "speedup_q1": speedup - 0.1,
                          "speedup_q3": speedup + 0.1, "rounds": 9, "median_s": median_s,
                          "partner_median_s": partner_s}
    return {"group": group, "stats": {"median": median_s}, "extra_info": info}


REPORT = {"machine_info": {"roofline": {"sgemm_gflops": 100.0, "copy_gbps": 10.0}},
          "benchmarks": [
              _row("padded_conv Net1 training step zeros", "pyattn", 0.1, (1.05, 0.105),
                   flops=4e9),
              _row("padded_conv Net1 training step zeros", "torch", 0.1),
              _row("padded_conv Net1 training step reflect", "pyattn", 0.12, (1.6, 0.192),
                   flops=4e9),
              _row("padded_conv Net1 training step replicate", "pyattn", 0.09, (1.4, 0.126),
                   flops=4e9),
              _row("attention seq 256 d 64 forward full", "pyattn", 0.01, (0.5, 0.005)),
              _row("attention seq 1024 d 64 forward full", "pyattn", 0.01),
              _row("spmm cora F16 mean forward", "pyattn", 0.001, (1.3, 0.0013), bytes=1e6)]}


def test_speedup_table_counts_each_target_against_its_bar():
    lines = targets.speedup_table(REPORT)
    text = "\n".join(lines)
    assert "| **Net1 training step, zeros: >= 1.1x** | **0 of 1** |" in text
    assert "| **Net1 training step, reflect / replicate: >= 1.5x** | **1 of 2** |" in text
    # 4e9 flops in 0.1 s = 40 GFLOP/s = 40% of sgemm; the partner's 0.105 s = 38%
    assert ("|  | no | padded_conv Net1 training step zeros | 1.05x [0.95-1.15] | "
            "100.00 ms, 40.0 GFLOP/s (40% of sgemm) | "
            "torch 105.00 ms, 38.1 GFLOP/s (38% of sgemm) |") in lines
    # seq 256 is outside the 512-8192; a row without a pair counts as a miss
    assert "seq 256" not in text
    assert "| **attention forward, seq 1024 / 4096, d 64 / 128, causal or not: >= 1.1x** | " \
        "**0 of 1** |" in text
    assert "|  | ? | attention seq 1024 d 64 forward full | not paired |" in text
    assert ("|  | yes | spmm cora F16 mean forward | 1.30x [1.20-1.40] | "
            "1.00 ms, 1.0 GB/s (10% of copy) |") in text


def test_padding_cost_rows_are_a_target_against_pyattns_zeros_mode():
    report = {"benchmarks": [
        _row("padded_conv padding cost Net1 training step reflect", "pyattn", 0.1, (1.01, 0.101)),
        _row("padded_conv padding cost large forward circular", "pyattn", 0.5, (0.97, 0.485)),
        _row("padded_conv large forward reflect", "pyattn", 0.5, (1.2, 0.6))]}
    text = "\n".join(targets.speedup_table(report))
    assert ("| **padding costs nothing: reflect / replicate / circular against pyattn's zeros "
            "mode: >= 1.0x** | **1 of 2** |") in text
    assert "|  | no | padded_conv padding cost large forward circular | 0.97x [0.87-1.07] |" in text
    # the large layer's own target does not take the padding-cost rows
    assert "| **large layer, every mode, forward and forward+backward: >= 1.0x** | **1 of 1** |" \
        in text
