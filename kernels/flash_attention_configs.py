"""Launch configurations, grids and FLOP counts of the Triton attention kernels.

Pure Python (no triton, no torch), shared by the op (pyattn.ops.flash_attention),
the Hopper compile check (benchmarks/triton_hopper_check.py) and the benchmarks.

Tile configurations: on CUDA each kernel is autotuned over ``*_configs(block_d,
float32)`` (Triton's fused-attention tutorial space: BLOCK_M 64/128, BLOCK_N
32-128, 2-5 stages, 4/8 warps), keyed on head_dim, causal, dropout, dtypes and
the sequence length rounded up to a power of two. The entries were picked from
sm_90 compiles with triton 3.6 and 3.9 (candidates that spilled registers were
dropped); ``make triton-check`` recompiles every entry and fails if one spills,
needs more than 227 KB of shared memory, or (float16 / bfloat16 at head_dim 64
and 128) runs a dot without wgmma. Speed on a GPU is unmeasured.
The first configuration of each list is the deterministic choice when autotuning
is off (``PYATTN_TRITON_AUTOTUNE=0``). The interpreter (CPU tensors) uses
``INTERPRETER_CONFIG`` unless a test asks for a CUDA configuration.

float32 inputs use exact float32 dots (``input_precision="ieee"``), which Triton
runs on FMA units, not tensor cores: small tiles, one configuration each.
"""
from __future__ import annotations

from typing import NamedTuple

GRID_AXIS0_LIMIT = 2 ** 31 - 1  # CUDA: x up to 2^31 - 1 blocks; y and z up to 65,535
GRID_AXIS12_LIMIT = 65_535
KERNELS = ("forward", "dkdv", "dq")


class TileConfig(NamedTuple):
    """BLOCK_M: query rows per tile; BLOCK_N: keys per tile. In the dk/dv kernel
    a program owns BLOCK_N keys and steps over BLOCK_M queries."""
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int

    def meta(self) -> dict:
        return dict(BLOCK_M=self.BLOCK_M, BLOCK_N=self.BLOCK_N)

    def __str__(self) -> str:
        return f"{self.BLOCK_M}x{self.BLOCK_N}w{self.num_warps}s{self.num_stages}"


C = TileConfig
# (kernel, block_d) -> configurations for float16 / bfloat16, the deterministic
# choice first. Dropout's Philox adds ~60 registers per thread: its own lists.
_HALF = {
    ("forward", 16): [C(128, 64, 4, 3)],
    ("forward", 32): [C(128, 64, 4, 3)],
    ("forward", 64): [C(128, 64, 8, 3), C(128, 128, 8, 3)],  # 128x64w4s3: 32 B spills at 56 (3.9)
    ("forward", 128): [C(128, 64, 8, 3), C(128, 128, 8, 3)],
    ("forward", 256): [C(64, 64, 8, 2)],
    ("dkdv", 16): [C(64, 128, 8, 3)],
    ("dkdv", 32): [C(64, 128, 8, 3)],
    ("dkdv", 64): [C(64, 128, 8, 3), C(64, 64, 8, 3)],
    ("dkdv", 128): [C(32, 128, 8, 3)],  # 64x64w8s3: 0 spills in triton 3.9, 104 B in 3.6
    ("dkdv", 256): [C(32, 32, 8, 1)],
    ("dq", 16): [C(128, 64, 8, 3)],
    ("dq", 32): [C(128, 64, 8, 3)],
    ("dq", 64): [C(128, 64, 8, 3), C(64, 64, 4, 3)],
    ("dq", 128): [C(128, 64, 8, 3), C(64, 64, 4, 3)],
    ("dq", 256): [C(64, 32, 8, 2)],
}
_HALF_DROPOUT = {
    ("forward", 16): [C(128, 64, 8, 3)],
    ("forward", 32): [C(128, 64, 8, 3)],
    ("forward", 64): [C(128, 64, 8, 3)],
    ("forward", 128): [C(128, 32, 8, 3)],
    ("forward", 256): [C(64, 16, 8, 2)],
    ("dkdv", 16): [C(32, 64, 4, 3)],
    ("dkdv", 32): [C(32, 64, 4, 3)],
    ("dkdv", 64): [C(32, 64, 4, 3)],
    ("dkdv", 128): [C(32, 64, 8, 3)],
    ("dkdv", 256): [C(32, 32, 8, 1)],
    ("dq", 16): [C(128, 64, 8, 3)],
    ("dq", 32): [C(128, 64, 8, 3)],
    ("dq", 64): [C(128, 64, 8, 3)],
    ("dq", 128): [C(128, 64, 8, 3)],
    ("dq", 256): [C(32, 32, 4, 2)],  # 64x32w8s2, 32x32w8s2: spills (3.9)
}
# float32: FMA dots, small tiles; one list with and without dropout. Register
# allocation of these is erratic across triton versions (e.g. 16x16w4s2 spilled at
# head_dim 56 in 3.6, 32x16w4s2 with dropout in 3.9): every entry is checked in both.
_FLOAT32 = {
    ("forward", 16): [C(64, 32, 4, 2)], ("forward", 32): [C(64, 32, 4, 2)],
    ("forward", 64): [C(16, 16, 8, 2)], ("forward", 128): [C(16, 16, 4, 2)],
    ("forward", 256): [C(16, 16, 4, 1)],
    ("dkdv", 16): [C(32, 32, 4, 2)], ("dkdv", 32): [C(32, 32, 4, 2)],
    ("dkdv", 64): [C(16, 32, 4, 2)], ("dkdv", 128): [C(16, 16, 4, 2)],
    ("dkdv", 256): [C(16, 16, 8, 1)],
    ("dq", 16): [C(32, 32, 4, 2)], ("dq", 32): [C(32, 32, 4, 2)],
    ("dq", 64): [C(16, 16, 8, 2)], ("dq", 128): [C(16, 16, 4, 2)],
    ("dq", 256): [C(16, 16, 4, 1)],
}
del C

# CPU tensors under TRITON_INTERPRET=1: big enough for few programs, small enough
# that the tests' short sequences still cross tile edges.
INTERPRETER_CONFIG = TileConfig(32, 32, 4, 1)


def preprocess_block_m(block_d: int) -> int:
    """Rows per program of delta = rowsum(dO * O): 2048 elements of O and dO
    each (16 rows at head_dim 256 still spilled in triton 3.9 for float32)."""
    return max(8, min(64, 2048 // block_d))


def block_d(head_dim: int) -> int:
    """head_dim padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def configs(kernel: str, head_dim: int, float32: bool, dropout: bool) -> list[TileConfig]:
    """The autotuning space of `kernel` ('forward', 'dkdv', 'dq') on CUDA."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    table = _FLOAT32 if float32 else _HALF_DROPOUT if dropout else _HALF
    return list(table[kernel, block_d(head_dim)])


def seq_bucket(seq_q: int, seq_k: int) -> int:
    """The autotuning key's sequence length: max(seq_q, seq_k) rounded up to a power of 2."""
    return 1 << (max(seq_q, seq_k) - 1).bit_length()


def grid(num_blocks: int, batch_heads: int) -> tuple[int]:
    """The launch grid: every (block, batch * head) program on axis 0, blocks of
    one head consecutive. Raises if it exceeds CUDA's axis-0 limit."""
    programs = num_blocks * batch_heads
    if programs > GRID_AXIS0_LIMIT:
        raise ValueError(f"flash_attention: {num_blocks} blocks x {batch_heads} batch*heads = "
                         f"{programs} programs exceed CUDA's grid limit of {GRID_AXIS0_LIMIT}")
    return (programs,)


def visible_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """Number of (query, key) pairs attended: seq_q * seq_k, or with causal
    alignment of the last query with the last key, sum_i clamp(i + 1 + seq_k - seq_q, 0, seq_k)."""
    if not causal:
        return seq_q * seq_k
    offset = seq_k - seq_q
    # rows i with 0 < i + 1 + offset < seq_k see i + 1 + offset keys; later rows see all.
    first = max(0, -offset)               # first row that sees a key
    full = max(first, min(seq_q, seq_k - 1 - offset))  # first row that sees every key
    partial = sum_range(first + 1 + offset, full + offset) if full > first else 0
    return partial + (seq_q - full) * seq_k


def sum_range(lo: int, hi: int) -> int:
    """lo + (lo + 1) + ... + hi."""
    return (lo + hi) * (hi - lo + 1) // 2


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    kernel: str = "forward") -> int:
    """Matmul FLOPs (2 per multiply-add) of one launch over the visible pairs:
    forward 2 matmuls (QK^T, PV), dkdv 4 (S^T, dV, dP^T, dK), dq 3 (S, dP, dQ),
    'backward' = dkdv + dq. The masked halves of diagonal tiles are not counted;
    FlashAttention's TFLOP/s convention counts the backward as 2.5 forwards (5
    matmuls): use attention_flops(..., 'forward') * 2.5 for that."""
    per_matmul = 2 * batch * heads * visible_pairs(seq_q, seq_k, causal) * head_dim
    matmuls = {"forward": 2, "dkdv": 4, "dq": 3, "backward": 7}
    if kernel not in matmuls:
        raise ValueError(f"kernel must be one of {tuple(matmuls)}, got {kernel!r}")
    return matmuls[kernel] * per_matmul
