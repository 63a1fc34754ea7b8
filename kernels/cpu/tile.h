// Table of tile-level loops, one per ISA (see tile_impl.h); chosen at run time.
#pragma once
#include <cstddef>
#include <cstdint>

#include "weightops/dtypes.h"
#include "weightops/philox.h"

namespace weightops {

constexpr int kFusedModels = 4;  // most models TileKernels::sum_fused takes

struct TileKernels {
  const char* name;
  void (*philox_words)(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out);
  // low 16 bits of word 0 of counter (g0 + idx[j], 1, 0): the keep rule's second draw for ties
  void (*tie_draws)(uint64_t g0, const uint32_t* idx, int64_t n, uint32_t k0, uint32_t k1, uint32_t* low);
  void (*load)(int dtype, const void* src, int64_t len, float* dst);
  void (*store)(int dtype, const float* src, int64_t len, void* dst);
  void (*masked_delta)(float* out, const float* x, const float* b, int64_t len, float r, int flags, float lo,
                       float hi, const uint8_t* keep);  // flags: 4 lo, 2 hi, 1 drop (keep: 0 = dropped)
  void (*accum_delta)(int dtype, float* m, const void* x, const float* b, int64_t len, float w, float r, int flags,
                      float lo, float hi, const uint8_t* keep);  // m += w * masked delta, x in its dtype
  // random bytes -> 0 drop, 1 keep (keep may be draws); ties with thr_hi (to settle by the second draw) -> idx
  // (room for len + 2 entries), their count returned
  int64_t (*classify_draws)(const uint8_t* draws, uint8_t* keep, int64_t len, uint32_t thr_hi, uint32_t* idx);
  void (*fill_zero)(float* m, int64_t len);
  void (*axpy)(float* m, float w, const float* d, int64_t len);
  void (*ties_vote)(float* num, float* den, const float* s, float w, const float* d, int64_t len);
  void (*ties_mean)(float* num, const float* den, int64_t len);
  void (*finish_store)(int dtype, const float* m, const float* b, float lam, int64_t len, void* dst);  // narrow(b + lam*m)
  void (*philox_keep)(const uint8_t* keep, int64_t len, bool* out);
  void (*abs_bits)(const float* x, const float* b, int64_t len, uint32_t* u);
  // the "sum" consensus of one span in one pass: every input and out in dtype, 1 <= k <= kFusedModels,
  // no magnitude cuts; keep[i]: model i's keep bytes (read only when drop)
  void (*sum_fused)(int dtype, int k, bool drop, const void* b, const void* const* xs, const uint8_t* const* keep,
                    const float* w, const float* r, float lam, int64_t len, void* out);
};

const TileKernels* tile_kernels_base();
#if defined(__x86_64__)
const TileKernels* tile_kernels_avx2();
const TileKernels* tile_kernels_avx512();
#endif

}  // namespace weightops
