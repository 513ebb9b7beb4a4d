"""Load a pyattn._C built by CMake and check it: ops registered, CPU result right.

Usage: python .ci/check_extension.py PATH_TO_C_SO [--cuda]
"""
import argparse
import importlib.util

import torch
import torch.nn.functional as F

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("library")
parser.add_argument("--cuda", action="store_true", help="also require the CUDA kernels")
args = parser.parse_args()

spec = importlib.util.spec_from_file_location("pyattn._C", args.library)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
info = module.build_info()
print(f"{args.library}: {info}")

keys = ["CPU"] + (["CUDA"] if args.cuda else [])
both = ["padded_conv2d", "padded_conv2d_grad_input", "padded_conv2d_grad_weight",
        "spmm_csr", "spmm_csr_edge_grad", "spmm_csr_max_backward"]
cpu_only = ["flash_attention_forward", "flash_attention_backward"]  # GPU: Triton, from Python
for op in both + cpu_only:
    for key in keys if op in both else ["CPU"]:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pyattn::{op}", key), (op, key)
assert info["cuda"] == args.cuda, info

x = torch.randn(2, 3, 9, 8, dtype=torch.float64)
w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
got = torch.ops.pyattn.padded_conv2d(x, w, None, [1, 1], [2, 2, 1, 1], [1, 1], 1, "circular")
want = F.conv2d(F.pad(x, (1, 1, 2, 2), mode="circular"), w)
torch.testing.assert_close(got, want)
print("ok: ops registered for", ", ".join(keys), "and the CPU kernel matches F.conv2d")
