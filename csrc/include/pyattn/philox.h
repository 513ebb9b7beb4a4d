#pragma once
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy
// as 1, 2, 3", SC 2011), the counter-based generator behind attention dropout.
// A draw is a pure function of (key, counter): the backward regenerates the
// forward's dropout mask tile by tile, in any order, on any thread, so nothing
// of size seq_q x seq_k is stored and results do not depend on the schedule.
// pyattn.reference.philox4x32 is the same function in PyTorch (tested against
// Random123's known-answer vectors).
//
// Dropout counter layout: element (bh = batch * heads + head, query i, key j)
// takes word j % 4 of philox4x32_10(counter = (j / 4, i, bh low, bh high),
// key = (seed low, seed high)); it is kept iff that 32-bit word x satisfies
// x / 2^32 >= dropout_p, i.e. x >= ceil(dropout_p * 2^32).
#include <cstdint>

#include "pyattn/macros.h"

namespace pyattn {

struct Philox4x32 {
  uint32_t word[4];
};

PYATTN_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
  uint32_t* c = counter.word;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kMul0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kMul1) * c[2];
    const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
    const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
    c[0] = hi1 ^ c[1] ^ key0;
    c[1] = lo1;
    c[2] = hi0 ^ c[3] ^ key1;
    c[3] = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

// The four dropout draws of keys 4 * quad ... 4 * quad + 3 for query i of row bh.
PYATTN_HOST_DEVICE Philox4x32 dropout_draws(uint64_t seed, int64_t bh, int64_t i, int64_t quad) {
  const Philox4x32 counter{{static_cast<uint32_t>(quad), static_cast<uint32_t>(i),
                            static_cast<uint32_t>(bh), static_cast<uint32_t>(bh >> 32)}};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Draws x >= threshold survive: threshold = ceil(p * 2^32) for 0 < p < 1.
// Computed once on the host; the comparison is exact integer arithmetic, so the
// reference rebuilds the same mask bit for bit.
inline uint64_t dropout_threshold(double p) {
  const double scaled = p * 4294967296.0;
  const uint64_t floor = static_cast<uint64_t>(scaled);
  return static_cast<double>(floor) == scaled ? floor : floor + 1;
}

}  // namespace pyattn
