"""Compile every Triton attention kernel configuration for Hopper (sm_90), no GPU needed.

For each kernel of kernels/flash_attention.py and each launch configuration the
op can choose (dtype float16 / bfloat16 / float32; head_dim 16..256 through its
BLOCK_D, with head_dim == BLOCK_D and a masked head_dim below it; causal or not;
dropout on or off; every tile configuration of kernels/flash_attention_configs.py)
this compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``
and checks:
- it compiles;
- shared memory <= 227 KB (232,448 bytes, the sm_90 per-block opt-in maximum);
- no register spills (ptxas -v: "bytes spill stores/loads");
- float16 / bfloat16 at head_dim 64 and 128: every tl.dot of the forward, dk/dv
  and dq kernels lowers to wgmma (``ttng.warp_group_dot`` in the TTGIR).
It prints, per compile, shared memory, registers, spills and each dot as
MxNxK:wgmma or MxNxK:mma (mma.sync / FMA), and exits 1 if any check fails.

Needs only triton (and numpy) — no torch, no GPU:
    python tools/triton_hopper_check.py [--jobs N] [--filter forward] [--markdown out.md]
``make triton-check`` runs it with the project venv; ``make triton-check
TRITON_CHECK_PYTHON=/path/python`` with another triton (e.g. 3.6.0, the GPU
machine's). Compiles go to a temporary Triton cache that is deleted afterwards.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import re
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from kernels import flash_attention_configs as cfg  # noqa: E402  (pure Python)

SMEM_LIMIT = 232_448  # 227 KB
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
BLOCK_DS = (16, 32, 64, 128, 256)
WGMMA_REQUIRED_BLOCK_DS = (64, 128)
ATTENTION_KERNELS = {"forward": "_flash_fwd_kernel", "dkdv": "_flash_bwd_dkdv_kernel",
                     "dq": "_flash_bwd_dq_kernel"}
# Tensor arguments: input-dtype tensors, float32 row statistics, the int8 mask.
POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "LSE", "DELTA", "KEEP"}
FLOAT32_POINTERS = {"LSE", "DELTA"}
INT8_POINTERS = {"KEEP"}


class Job(NamedTuple):
    kernel: str          # forward, dkdv, dq, preprocess, dropout_mask
    dtype: str           # fp16, bf16, fp32
    head_dim: int
    causal: bool
    dropout: bool
    config: cfg.TileConfig

    def label(self) -> str:
        return (f"{self.kernel:<12} {self.dtype} d={self.head_dim:<3} "
                f"{'causal' if self.causal else 'full  '} {'drop' if self.dropout else 'nodp'} "
                f"{self.config}")


def masked_head_dim(block_d: int) -> int:
    """The largest multiple of 8 below block_d that pads up to it (8 for BLOCK_D 16)."""
    return max(8, block_d - 8) if block_d > 16 else 8


def jobs(everything: bool = False, kernel_filter: str | None = None) -> list[Job]:
    """The compiles to run. Default (CI): every configuration of every list
    (kernel x dtype x BLOCK_D x dropout) causal at head_dim = BLOCK_D, the worst
    case for registers (both loop stages); bfloat16 compiles like float16, so its
    lists are compiled at BLOCK_D 64 and 128 only (wgmma proof), and once per
    kernel non-causal at a masked head_dim, as every other code path is.
    everything=True: the full product (causal x head_dim = BLOCK_D or masked)."""
    out = []
    for kernel, dtype, block_d, dropout in itertools.product(ATTENTION_KERNELS, DTYPES, BLOCK_DS,
                                                             (False, True)):
        if not everything and dtype == "bf16" and block_d not in WGMMA_REQUIRED_BLOCK_DS:
            continue
        for config in cfg.configs(kernel, block_d, dtype == "fp32", dropout):
            variants = [(block_d, True)]
            if everything:
                variants += [(block_d, False), (masked_head_dim(block_d), True),
                             (masked_head_dim(block_d), False)]
            for head_dim, causal in variants:
                out.append(Job(kernel, dtype, head_dim, causal, dropout, config))
    if not everything:
        for kernel, dtype, dropout in itertools.product(ATTENTION_KERNELS, DTYPES, (False, True)):
            config = cfg.configs(kernel, 64, dtype == "fp32", dropout)[0]
            out.append(Job(kernel, dtype, masked_head_dim(64), False, dropout, config))
    for dtype, block_d in itertools.product(DTYPES, BLOCK_DS if everything else (256,)):
        preprocess = cfg.TileConfig(cfg.preprocess_block_m(block_d), 0, 4, 1)
        for head_dim in (block_d, masked_head_dim(block_d)):
            out.append(Job("preprocess", dtype, head_dim, False, False, preprocess))
    out.append(Job("dropout_mask", "fp32", 0, False, True, cfg.TileConfig(32, 32, 4, 1)))
    if kernel_filter:
        out = [j for j in out if kernel_filter in j.label()]
    # The wgmma-proof compiles first (a run cut short has checked those).
    return sorted(out, key=lambda j: j.head_dim not in WGMMA_REQUIRED_BLOCK_DS
                  or j.dtype == "fp32")


def _signature(fn, job: Job):
    """(signature, constexprs, attrs) of a launch on contiguous tensors."""
    import triton.language as tl  # noqa: F401  (imported in the worker)

    block_d = cfg.block_d(job.head_dim) if job.head_dim else 0
    constexprs = dict(CAUSAL=job.causal, DROPOUT=job.dropout, HEAD_DIM=job.head_dim,
                      BLOCK_D=block_d, BLOCK_M=job.config.BLOCK_M, BLOCK_N=job.config.BLOCK_N,
                      DOT_PRECISION="ieee" if job.dtype == "fp32" else "tf32")
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs or (name.startswith("stride_") and name.endswith("d")):
            signature[name] = "constexpr"
            constexprs.setdefault(name, 1)  # contiguous head_dim
        elif name in POINTERS:
            element = "fp32" if name in FLOAT32_POINTERS else "i8" if name in INT8_POINTERS \
                else job.dtype
            signature[name] = "*" + element
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in ("scale", "dropout_p"):
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        else:  # sizes and strides
            signature[name] = "i32"
            if name.startswith("stride_") and job.head_dim % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    return signature, constexprs, attrs


_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*?-> tensor<(\d+)x(\d+)x")
_DOT_OPERAND = re.compile(r": (?:tensor|!ttg\.memdesc)<(\d+)x(\d+)x")
_PTXAS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _dots(ttgir: str) -> list[str]:
    """Each dot of the TTGIR as 'MxNxK:wgmma' or 'MxNxK:mma'."""
    found = []
    for line in ttgir.splitlines():
        match = _DOT.search(line)
        if not match:
            continue
        op, m, n = match.groups()
        operand = _DOT_OPERAND.search(line)
        k = operand.group(2) if operand else "?"
        found.append(f"{m}x{n}x{k}:{'wgmma' if op == 'ttng.warp_group_dot' else 'mma'}")
    return found


def compile_job(job: Job) -> dict:
    """Compile one job for sm_90 in a throw-away cache; collect resources."""
    import triton
    from triton.backends.compiler import GPUTarget

    from kernels import flash_attention as kernels

    name = {"preprocess": "_flash_bwd_preprocess_kernel",
            "dropout_mask": "_dropout_mask_kernel"}.get(job.kernel) or ATTENTION_KERNELS[job.kernel]
    fn = getattr(kernels, name)
    signature, constexprs, attrs = _signature(fn, job)
    result = dict(job=job, error=None, shared=None, registers=None, spills=None, dots=[])
    log = io.StringIO()
    start = time.time()
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: ptxas runs and prints its log
        try:
            with contextlib.redirect_stdout(log), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                compiled = triton.compile(
                    triton.compiler.ASTSource(fn, signature, constexprs, attrs),
                    target=GPUTarget("cuda", 90, 32),
                    options=dict(num_warps=job.config.num_warps,
                                 num_stages=job.config.num_stages))
        except Exception as exc:  # reported, counted as a failure
            result["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
            result["seconds"] = time.time() - start
            return result
    spills = _PTXAS.findall(log.getvalue())
    regs = _REGS.findall(log.getvalue())
    result.update(shared=compiled.metadata.shared,
                  spills=sum(int(s) + int(l) for s, l in spills) if spills else None,
                  registers=int(regs[0]) if regs else None,
                  dots=_dots(compiled.asm["ttgir"]), seconds=time.time() - start)
    return result


def problems(result: dict) -> list[str]:
    job = result["job"]
    if result["error"]:
        return [result["error"]]
    found = []
    if result["shared"] > SMEM_LIMIT:
        found.append(f"shared memory {result['shared']} > {SMEM_LIMIT}")
    if result["spills"] is None:
        found.append("no ptxas log (spills unknown)")
    elif result["spills"]:
        found.append(f"{result['spills']} bytes of register spills")
    if (job.kernel in ATTENTION_KERNELS and job.dtype in ("fp16", "bf16")
            and job.head_dim in WGMMA_REQUIRED_BLOCK_DS):
        if not result["dots"] or any(not d.endswith(":wgmma") for d in result["dots"]):
            found.append("not every dot is wgmma")
    return found


HEADER = (f"{'kernel / dtype / head_dim / mask / dropout / tiles':<58} {'smem':>7} {'regs':>4} "
          f"{'spill':>5}  dots")


def _row(result: dict, bad: list[str]) -> str:
    spills = result["spills"] if result["spills"] is not None else "?"
    return (f"{result['job'].label():<58} {result['shared'] or 0:>7} {result['registers'] or 0:>4} "
            f"{spills:>5}  {' '.join(result['dots'])}{'  FAIL: ' + '; '.join(bad) if bad else ''}")


def _init_worker():
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence triton 3.9's notice


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--all", action="store_true",
                        help="every causal x head_dim variant of every configuration")
    parser.add_argument("--filter", help="only compiles whose label contains this text")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args(argv)

    import triton

    todo = jobs(args.all, args.filter)
    print(f"triton {triton.__version__}: {len(todo)} compiles for sm_90 on {args.jobs} processes",
          flush=True)
    start = time.time()
    print(HEADER, flush=True)
    rows, failed = [], 0
    with ProcessPoolExecutor(args.jobs, initializer=_init_worker) as pool:
        for result in pool.map(compile_job, todo, chunksize=1):
            bad = problems(result)
            failed += bool(bad)
            rows.append(_row(result, bad))
            print(rows[-1], flush=True)
    summary = (f"triton {triton.__version__}: {len(rows) - failed}/{len(rows)} compiles pass "
               f"(sm_90, smem <= {SMEM_LIMIT}, no spills, wgmma where required) in "
               f"{time.time() - start:.0f} s")
    print(summary)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write("```\n" + HEADER + "\n" + "\n".join(rows) + "\n" + summary + "\n```\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
