// Tile-level loops of the CPU kernels, compiled once per ISA.
//
// tile_base.cpp, tile_avx2.cpp and tile_avx512.cpp include this file inside a
// `#pragma GCC target` region with WO_ISA set to their namespace; ops_cpu.cpp
// picks one table at run time (cpuid). That gives the auto-vectoriser wide
// registers without -march flags on the whole build. Rules for this file:
//  * no calls into std:: or c10 inline functions: a header function
//    instantiated here would be compiled for this ISA and could be chosen by
//    the linker for every caller (illegal instruction on older CPUs);
//  * every fp32 multiply and add rounds separately (-ffp-contract=off), in the
//    order of weightops/ops/reference.py; each ISA gives identical bits.
#ifndef WO_ISA
#error "define WO_ISA before including tile_impl.h"
#endif

#include "tile.h"

namespace weightops {
namespace WO_ISA {

static inline uint32_t f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

// ---- Philox4x32-10 over nctr consecutive counters, four words per counter.
static void philox_words_generic(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out) {
  constexpr int L = 16;  // lanes in structure-of-arrays form so the multiplies vectorise
  for (int64_t j = 0; j < nctr; j += L) {
    uint32_t c0[L], c1[L], c2[L], c3[L];
    for (int l = 0; l < L; ++l) {
      uint64_t c = ctr0 + uint64_t(j + l);
      c0[l] = uint32_t(c), c1[l] = uint32_t(c >> 32), c2[l] = 0, c3[l] = 0;
    }
    uint32_t a = k0, b = k1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < L; ++l) {
        uint64_t p0 = uint64_t(kPhiloxM0) * c0[l], p1 = uint64_t(kPhiloxM1) * c2[l];
        uint32_t n0 = uint32_t(p1 >> 32) ^ c1[l] ^ a, n2 = uint32_t(p0 >> 32) ^ c3[l] ^ b;
        c1[l] = uint32_t(p1), c3[l] = uint32_t(p0), c0[l] = n0, c2[l] = n2;
      }
      a += kPhiloxW0, b += kPhiloxW1;
    }
    int64_t m = nctr - j < L ? nctr - j : L;
    for (int64_t l = 0; l < m; ++l) {
      uint32_t* o = out + 4 * (j + l);
      o[0] = c0[l], o[1] = c1[l], o[2] = c2[l], o[3] = c3[l];
    }
  }
}

#if defined(WO_PHILOX_AVX512)
// Eight counters in the 64-bit lanes of each register: vpmuludq reads only the
// low 32 bits of a lane, so the high halves may hold garbage and no masking or
// blending is needed between rounds. Two groups (A, B) in flight for ILP.
struct Philox8 {
  __m512i c0, c1, c2, c3;
};

static inline void philox8_rounds(Philox8& s, uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  // Round 1 has c2 = c3 = 0, so M1 * c2 = 0.
  __m512i p0 = _mm512_mul_epu32(s.c0, m0);
  s.c0 = _mm512_xor_si512(s.c1, _mm512_set1_epi32(int(k0)));
  s.c2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), _mm512_set1_epi32(int(k1)));
  s.c1 = _mm512_setzero_si512();
  s.c3 = p0;
  for (int r = 1; r < 10; ++r) {
    k0 += kPhiloxW0, k1 += kPhiloxW1;
    p0 = _mm512_mul_epu32(s.c0, m0);
    __m512i p1 = _mm512_mul_epu32(s.c2, m1);
    s.c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s.c1, _mm512_set1_epi32(int(k0)), 0x96);  // 3-way xor
    s.c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s.c3, _mm512_set1_epi32(int(k1)), 0x96);
    s.c1 = p1;
    s.c3 = p0;
  }
}

// Writes the 32 words of the 8 counters in element order: w0 w1 w2 w3 of counter 0, then counter 1...
static inline void philox8_store(const Philox8& s, uint32_t* out) {
  __m512i w01 = _mm512_mask_blend_epi32(0xAAAA, s.c0, _mm512_slli_epi64(s.c1, 32));  // lane j: (w0, w1)
  __m512i w23 = _mm512_mask_blend_epi32(0xAAAA, s.c2, _mm512_slli_epi64(s.c3, 32));  // lane j: (w2, w3)
  __m512i even = _mm512_unpacklo_epi64(w01, w23), odd = _mm512_unpackhi_epi64(w01, w23);  // counters 0,2,4,6 | 1,3,5,7
  _mm512_storeu_si512(out, _mm512_permutex2var_epi64(even, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11), odd));
  _mm512_storeu_si512(out + 16, _mm512_permutex2var_epi64(even, _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15), odd));
}

static inline Philox8 philox8_counters(uint64_t c) {
  const __m512i ctr = _mm512_add_epi64(_mm512_set1_epi64(int64_t(c)), _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7));
  return Philox8{ctr, _mm512_srli_epi64(ctr, 32), _mm512_setzero_si512(), _mm512_setzero_si512()};
}

static void philox_words(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out) {
  int64_t j = 0;
  for (; j + 16 <= nctr; j += 16) {
    Philox8 a = philox8_counters(ctr0 + uint64_t(j)), b = philox8_counters(ctr0 + uint64_t(j) + 8);
    philox8_rounds(a, k0, k1);
    philox8_rounds(b, k0, k1);
    philox8_store(a, out + 4 * j);
    philox8_store(b, out + 4 * j + 32);
  }
  if (j < nctr) philox_words_generic(ctr0 + uint64_t(j), nctr - j, k0, k1, out + 4 * j);
}
#else
static void philox_words(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out) {
  philox_words_generic(ctr0, nctr, k0, k1, out);
}
#endif

// ---- exact widening to fp32 and round-to-nearest-even narrowing.
// One element of a bf16/fp16/fp32 block, widened exactly to fp32.
template <int DT>
static inline float widen(const void* src, int64_t i) {
  if (DT == kF32) return static_cast<const float*>(src)[i];
  const uint16_t h = static_cast<const uint16_t*>(src)[i];
  if (DT == kBF16) return u2f(uint32_t(h) << 16);
  // fp16: rebias the exponent (inf/NaN: exponent 255); subnormals are exact as int * 2^-24
  uint32_t em = h & 0x7FFFu, sign = uint32_t(h & 0x8000u) << 16;
  uint32_t normal = (em << 13) + 0x38000000u + (em >= 0x7C00u ? 0x38000000u : 0u);
  float sub = float(int32_t(em)) * 5.9604644775390625e-8f;
  return u2f((em < 0x400u ? f2u(sub) : normal) | sign);
}

static void load(int dtype, const void* src, int64_t len, float* dst) {
  if (dtype == kF32) {
    __builtin_memcpy(dst, src, size_t(len) * 4);
  } else if (dtype == kBF16) {
    for (int64_t i = 0; i < len; ++i) dst[i] = widen<kBF16>(src, i);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i] = widen<kF16>(src, i);
  }
}

static void store(int dtype, const float* src, int64_t len, void* dst) {
  if (dtype == kF32) {
    __builtin_memcpy(dst, src, size_t(len) * 4);
  } else if (dtype == kBF16) {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < len; ++i) {
      uint32_t u = f2u(src[i]);
      uint16_t r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
      d[i] = src[i] != src[i] ? uint16_t(0x7FC0) : r;
    }
  } else {  // fp16: fp16_ieee_from_fp32_value of the FP16 library, which c10::Half uses
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < len; ++i) {
      uint32_t w = f2u(src[i]), shl1 = w + w, sign = w & 0x80000000u;
      float base = (u2f(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
      uint32_t bias = shl1 & 0xFF000000u;
      bias = bias < 0x71000000u ? 0x71000000u : bias;
      uint32_t bits = f2u(u2f((bias >> 1) + 0x07800000u) + base);
      uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
      d[i] = uint16_t((sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign));
    }
  }
}

// ---- delta_merge pieces. out <- keep ? (x - b) * r : +0, keep = [lo <= |d|] [|d| < hi] [draw]; out may be x.
// kb: one keep byte per element (0: dropped), see classify_draws.
template <bool LO, bool HI, bool DROP>
static void masked_delta_t(float* out, const float* x, const float* b, int64_t len, float r, float lo, float hi,
                           const uint8_t* w) {
  for (int64_t i = 0; i < len; ++i) {
    float d = x[i] - b[i];
    float a = __builtin_fabsf(d);
    bool keep = true;  // bitwise &, not &&: no branches, so the loop vectorises
    if (LO) keep &= !(a < lo);
    if (HI) keep &= a < hi;
    if (DROP) keep &= w[i] != 0;
    out[i] = keep ? d * r : 0.0f;
  }
}

static void masked_delta(float* out, const float* x, const float* b, int64_t len, float r, int flags, float lo,
                         float hi, const uint8_t* w) {
  switch (flags) {
    case 0: masked_delta_t<false, false, false>(out, x, b, len, r, lo, hi, w); break;
    case 1: masked_delta_t<false, false, true>(out, x, b, len, r, lo, hi, w); break;
    case 2: masked_delta_t<false, true, false>(out, x, b, len, r, lo, hi, w); break;
    case 3: masked_delta_t<false, true, true>(out, x, b, len, r, lo, hi, w); break;
    case 4: masked_delta_t<true, false, false>(out, x, b, len, r, lo, hi, w); break;
    case 5: masked_delta_t<true, false, true>(out, x, b, len, r, lo, hi, w); break;
    case 6: masked_delta_t<true, true, false>(out, x, b, len, r, lo, hi, w); break;
    default: masked_delta_t<true, true, true>(out, x, b, len, r, lo, hi, w); break;
  }
}

// The "sum" consensus fused for one model, straight from its storage dtype:
// m <- m + w * (keep ? (x - b) * r : +0), the same roundings in the same order
// as load + masked_delta + axpy, without the three passes over the tile.
template <int DT, bool LO, bool HI, bool DROP>
static void accum_delta_t(float* m, const void* x, const float* b, int64_t len, float w, float r, float lo,
                          float hi, const uint8_t* kb) {
  for (int64_t i = 0; i < len; ++i) {
    float d = widen<DT>(x, i) - b[i];
    float a = __builtin_fabsf(d);
    bool keep = true;
    if (LO) keep &= !(a < lo);
    if (HI) keep &= a < hi;
    if (DROP) keep &= kb[i] != 0;
    float dd = keep ? d * r : 0.0f;
    m[i] = m[i] + w * dd;
  }
}

template <int DT>
static void accum_delta_dt(float* m, const void* x, const float* b, int64_t len, float w, float r, int flags,
                           float lo, float hi, const uint8_t* kb) {
  switch (flags) {
    case 0: accum_delta_t<DT, false, false, false>(m, x, b, len, w, r, lo, hi, kb); break;
    case 1: accum_delta_t<DT, false, false, true>(m, x, b, len, w, r, lo, hi, kb); break;
    case 2: accum_delta_t<DT, false, true, false>(m, x, b, len, w, r, lo, hi, kb); break;
    case 3: accum_delta_t<DT, false, true, true>(m, x, b, len, w, r, lo, hi, kb); break;
    case 4: accum_delta_t<DT, true, false, false>(m, x, b, len, w, r, lo, hi, kb); break;
    case 5: accum_delta_t<DT, true, false, true>(m, x, b, len, w, r, lo, hi, kb); break;
    case 6: accum_delta_t<DT, true, true, false>(m, x, b, len, w, r, lo, hi, kb); break;
    default: accum_delta_t<DT, true, true, true>(m, x, b, len, w, r, lo, hi, kb); break;
  }
}

static void accum_delta(int dtype, float* m, const void* x, const float* b, int64_t len, float w, float r, int flags,
                        float lo, float hi, const uint8_t* kb) {
  if (dtype == kF32) accum_delta_dt<kF32>(m, x, b, len, w, r, flags, lo, hi, kb);
  else if (dtype == kBF16) accum_delta_dt<kBF16>(m, x, b, len, w, r, flags, lo, hi, kb);
  else accum_delta_dt<kF16>(m, x, b, len, w, r, flags, lo, hi, kb);
}

// Random bytes -> 0 (drop), 1 (keep) or 2 (tie with the threshold's high byte: the caller settles it).
static void classify_draws(uint8_t* kb, int64_t len, uint32_t thr_hi) {
  for (int64_t i = 0; i < len; ++i) {
    const uint32_t v = kb[i];
    kb[i] = uint8_t((v > thr_hi ? 1 : 0) | (v == thr_hi ? 2 : 0));
  }
}

static void fill_zero(float* m, int64_t len) {
  for (int64_t i = 0; i < len; ++i) m[i] = 0.0f;
}

static void axpy(float* m, float w, const float* d, int64_t len) {  // m = m + w*d, two roundings
  for (int64_t i = 0; i < len; ++i) m[i] = m[i] + w * d[i];
}

// TIES: deltas agreeing in sign with the weighted sum s join the weighted mean num / den.
static void ties_vote(float* num, float* den, const float* s, float w, const float* d, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    const bool pos = s[i] >= 0.0f;
    const bool agree = (pos & (d[i] > 0.0f)) | (!pos & (d[i] < 0.0f));  // branch-free: vectorises
    float nn = num[i] + w * d[i], nd = den[i] + w;
    num[i] = agree ? nn : num[i];
    den[i] = agree ? nd : den[i];
  }
}

static void ties_mean(float* num, const float* den, int64_t len) {
  for (int64_t i = 0; i < len; ++i) {
    float q = num[i] / den[i];
    num[i] = den[i] != 0.0f ? q : 0.0f;
  }
}

static void finish(float* m, const float* b, float lam, int64_t len) {  // b + lam*m
  for (int64_t i = 0; i < len; ++i) m[i] = b[i] + lam * m[i];
}

static void philox_keep(const uint8_t* kb, int64_t len, bool* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = kb[i] != 0;
}

// |x - b| as fp32 bits (sign cleared); b may be null.
static void abs_bits(const float* x, const float* b, int64_t len, uint32_t* u) {
  if (b) {
    for (int64_t i = 0; i < len; ++i) u[i] = f2u(x[i] - b[i]) & 0x7FFFFFFFu;
  } else {
    for (int64_t i = 0; i < len; ++i) u[i] = f2u(x[i]) & 0x7FFFFFFFu;
  }
}

static const TileKernels table = {
    WO_ISA_NAME, philox_words, load, store, masked_delta, accum_delta, classify_draws, fill_zero, axpy, ties_vote,
    ties_mean, finish, philox_keep, abs_bits,
};

}  // namespace WO_ISA

const TileKernels* WO_TABLE_FN() { return &WO_ISA::table; }

}  // namespace weightops
