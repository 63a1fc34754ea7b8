// Philox4x32-10 (Salmon et al., Random123) and the DARE keep rule, shared by
// the CPU and CUDA kernels. The Python reference (weightops/ops/reference.py)
// is the specification; this must reproduce it exactly.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define WO_HD __host__ __device__ __forceinline__
#else
#define WO_HD inline
#endif

namespace weightops {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int64_t kDropOne = int64_t(1) << 24;  // drop_threshold for p = 1

// Counter (c0, c1, 0, 0) -> four words. The element with global index e uses
// counter (e >> 2) and word (e & 3), so a block's result does not depend on
// where the block starts.
WO_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c2 = 0, c3 = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    uint64_t p0 = uint64_t(kPhiloxM0) * c0, p1 = uint64_t(kPhiloxM1) * c2;
    uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c1 = uint32_t(p1);
    c3 = uint32_t(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

// An element survives a drop with threshold thr iff its 24 high random bits
// are >= thr: keep probability exactly 1 - thr / 2^24, and thr = 0 keeps all.
WO_HD bool philox_keep(uint32_t word, uint32_t thr) { return (word >> 8) >= thr; }

WO_HD bool philox_keep_at(uint32_t k0, uint32_t k1, uint64_t e, uint32_t thr) {
  uint32_t w[4];
  philox4x32_10(uint32_t(e >> 2), uint32_t(e >> 34), k0, k1, w);
  return philox_keep(w[e & 3], thr);
}

}  // namespace weightops
