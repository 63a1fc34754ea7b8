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

// Counter (c0, c1, c2, 0) -> four words.
WO_HD void philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t k0, uint32_t k1, uint32_t out[4]) {
  uint32_t c3 = 0;
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

// The DARE keep rule. Element e draws a 24-bit uniform v = B * 2^16 + L and is
// kept iff v >= thr (keep probability exactly 1 - thr / 2^24; thr = 0 keeps all,
// thr = 2^24 drops all). B is byte e & 15 of counter (e >> 4, 0, 0)'s four
// little-endian words, so one Philox call decides 16 elements; L (low 16 bits of
// word 0 of counter (e, 1, 0)) is drawn only when B equals thr's high byte.

// The rule once B is known: the rare tie needs the second draw.
WO_HD bool philox_keep_byte(uint32_t b, uint64_t e, uint32_t k0, uint32_t k1, uint32_t thr) {
  const uint32_t hi = thr >> 16;
  if (b != hi) return b > hi;
  uint32_t w[4];
  philox4x32_10(uint32_t(e), uint32_t(e >> 32), 1u, k0, k1, w);
  return (w[0] & 0xFFFFu) >= (thr & 0xFFFFu);
}

WO_HD bool philox_keep_at(uint32_t k0, uint32_t k1, uint64_t e, uint32_t thr) {
  uint32_t w[4];
  philox4x32_10(uint32_t(e >> 4), uint32_t(e >> 36), 0u, k0, k1, w);
  return philox_keep_byte((w[(e >> 2) & 3] >> (8 * (e & 3))) & 0xFFu, e, k0, k1, thr);
}

}  // namespace weightops
