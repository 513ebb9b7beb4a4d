#pragma once
// Tile bounds of causal attention, shared by the CPU kernels (and mirrored in
// the Triton kernels, kernels/flash_attention.py).
//
// Causal masking aligns the last query with the last key (FlashAttention 2):
// query i sees keys j < causal_key_end(i) = i + 1 + (seq_k - seq_q). When
// seq_q > seq_k the first seq_q - seq_k queries see no key: their output is 0.
#include <cstdint>

#include "pyattn/macros.h"

namespace pyattn {

// One past the last key that query i sees, clamped to [0, seq_k].
PYATTN_HOST_DEVICE int64_t causal_key_end(int64_t i, int64_t seq_q, int64_t seq_k) {
  const int64_t end = i + 1 + seq_k - seq_q;
  return end < 0 ? 0 : (end > seq_k ? seq_k : end);
}

// The first query that sees key j, clamped to [0, seq_q].
PYATTN_HOST_DEVICE int64_t causal_query_begin(int64_t j, int64_t seq_q, int64_t seq_k) {
  const int64_t begin = j - (seq_k - seq_q);
  return begin < 0 ? 0 : (begin > seq_q ? seq_q : begin);
}

}  // namespace pyattn
