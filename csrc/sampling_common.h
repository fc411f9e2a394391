// Shared by the CPU and CUDA sampling ops: the counter-based RNG and the order-preserving float key.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ERPO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Forced: GCC declined to inline these into the AVX-512 clones of the hot loops, which then ran scalar.
#define ERPO_HD inline __attribute__((always_inline))
#else
#define ERPO_HD inline
#endif

namespace erpo_fast {
namespace sampling {

// SplitMix64 finaliser: turns (seed, row) into a per-row 64-bit stream key.
ERPO_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// "lowbias32" integer hash (Wellons): a 32-bit bijection with good avalanche; 32-bit ops so CPU loops vectorise.
ERPO_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x846CA68BU;
  x ^= x >> 16;
  return x;
}

struct RowKey {
  uint32_t lo, hi;
};

ERPO_HD RowKey row_key(uint64_t seed, uint64_t row) {
  uint64_t k = splitmix64(seed ^ splitmix64(row));
  return RowKey{static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32)};
}

// Uniform in (0, 1) for (row key, column): 23 random bits at cell centres, so the values are exactly
// representable, never 0 and never 1 (both -log(u) and log(-log(u)) stay finite).
ERPO_HD float uniform01(RowKey key, uint32_t col) {
  uint32_t h = mix32(mix32(col ^ key.lo) + key.hi);
  return (static_cast<float>(static_cast<int32_t>(h >> 9)) + 0.5f) * (1.0f / 8388608.0f);
}

// Order-preserving map float -> int32 (for bisection over values); -0.0 must be folded to +0.0 by the caller.
ERPO_HD int32_t float_key(int32_t bits) { return bits >= 0 ? bits : bits ^ 0x7FFFFFFF; }

}  // namespace sampling
}  // namespace erpo_fast
