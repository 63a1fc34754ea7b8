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

// ---- Philox4x32-10 on kLanes counters at once, in structure-of-arrays form so the multiplies vectorise.
constexpr int kLanes = 16;
static inline void philox_lanes(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    for (int l = 0; l < kLanes; ++l) {
      uint64_t p0 = uint64_t(kPhiloxM0) * c0[l], p1 = uint64_t(kPhiloxM1) * c2[l];
      uint32_t n0 = uint32_t(p1 >> 32) ^ c1[l] ^ k0, n2 = uint32_t(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = uint32_t(p1), c3[l] = uint32_t(p0), c0[l] = n0, c2[l] = n2;
    }
    k0 += kPhiloxW0, k1 += kPhiloxW1;
  }
}

// The four words of nctr consecutive counters (c, 0, 0), counter after counter.
[[maybe_unused]] static void philox_words_generic(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1,
                                                  uint32_t* out) {
  for (int64_t j = 0; j < nctr; j += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      uint64_t c = ctr0 + uint64_t(j + l);
      c0[l] = uint32_t(c), c1[l] = uint32_t(c >> 32), c2[l] = 0, c3[l] = 0;
    }
    philox_lanes(c0, c1, c2, c3, k0, k1);
    int64_t m = nctr - j < kLanes ? nctr - j : kLanes;
    for (int64_t l = 0; l < m; ++l) {
      uint32_t* o = out + 4 * (j + l);
      o[0] = c0[l], o[1] = c1[l], o[2] = c2[l], o[3] = c3[l];
    }
  }
}

// The second draw of the keep rule for n tied elements g0 + idx[j]: the low 16 bits of word 0 of
// counter (e, 1, 0). About 8 ties per 2048-element tile at any p, so batching them into vector
// lanes costs a fraction of one scalar Philox call each (they were ~1/3 of DARE's generator time).
[[maybe_unused]] static void tie_draws_generic(uint64_t g0, const uint32_t* idx, int64_t n, uint32_t k0, uint32_t k1,
                                               uint32_t* low) {
  for (int64_t j = 0; j < n; j += kLanes) {
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    const int64_t m = n - j < kLanes ? n - j : kLanes;
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t e = g0 + (l < m ? idx[j + l] : 0u);
      c0[l] = uint32_t(e), c1[l] = uint32_t(e >> 32), c2[l] = 1, c3[l] = 0;
    }
    philox_lanes(c0, c1, c2, c3, k0, k1);
    for (int64_t l = 0; l < m; ++l) low[j + l] = c0[l] & 0xFFFFu;
  }
}

#if defined(WO_PHILOX_AVX512)
// Eight counters in the 64-bit lanes of each register: vpmuludq reads only the
// low 32 bits of a lane, so the high halves may hold garbage and no masking or
// blending is needed between rounds.
struct Philox8 {
  __m512i c0, c1, c2, c3;
};

// Ten rounds on G groups, round by round so that the groups' chains (mul 3 cycles, shift, xor)
// overlap. ZERO23: every group starts with c2 = c3 = 0 (the keep bytes' counters), so round 1
// needs no M1 * c2.
template <int G, bool ZERO23>
static inline void philox8_rounds(Philox8* g, uint32_t k0, uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  for (int r = 0; r < 10; ++r, k0 += kPhiloxW0, k1 += kPhiloxW1) {
    const __m512i a = _mm512_set1_epi32(int(k0)), b = _mm512_set1_epi32(int(k1));
    for (int i = 0; i < G; ++i) {
      Philox8& s = g[i];
      const __m512i p0 = _mm512_mul_epu32(s.c0, m0);
      if (ZERO23 && r == 0) {
        s.c0 = _mm512_xor_si512(s.c1, a);
        s.c2 = _mm512_xor_si512(_mm512_srli_epi64(p0, 32), b);
        s.c1 = _mm512_setzero_si512();
      } else {
        const __m512i p1 = _mm512_mul_epu32(s.c2, m1);
        s.c0 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p1, 32), s.c1, a, 0x96);  // 3-way xor
        s.c2 = _mm512_ternarylogic_epi32(_mm512_srli_epi64(p0, 32), s.c3, b, 0x96);
        s.c1 = p1;
      }
      s.c3 = p0;
    }
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

// G groups of 8 counters from c on: 32 * G words. Up to four groups in flight: one round is a chain
// of mul (3 cycles), shift and xor, so fewer left the multipliers idle.
template <int G>
static inline void philox_groups(uint64_t c, uint32_t k0, uint32_t k1, uint32_t* out) {
  Philox8 g[G];
  for (int i = 0; i < G; ++i) g[i] = philox8_counters(c + 8 * uint64_t(i));
  philox8_rounds<G, true>(g, k0, k1);
  for (int i = 0; i < G; ++i) philox8_store(g[i], out + 32 * i);
}

static void philox_words(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out) {
  int64_t j = 0;
  for (; j + 32 <= nctr; j += 32) philox_groups<4>(ctr0 + uint64_t(j), k0, k1, out + 4 * j);
  for (; j + 16 <= nctr; j += 16) philox_groups<2>(ctr0 + uint64_t(j), k0, k1, out + 4 * j);
  for (; j < nctr; j += 8) {  // a partial group (unaligned or short spans): 8 counters, the first ones kept
    uint32_t tmp[32];
    philox_groups<1>(ctr0 + uint64_t(j), k0, k1, tmp);
    for (int64_t i = 0; i < 4 * (nctr - j < 8 ? nctr - j : 8); ++i) out[4 * j + i] = tmp[i];
  }
}

// tie_draws_generic with two groups of eight ties per batch (the generic lanes compile to 64-bit
// multiplies and store-forwarding stalls).
static void tie_draws(uint64_t g0, const uint32_t* idx, int64_t n, uint32_t k0, uint32_t k1, uint32_t* low) {
  for (int64_t j = 0; j < n; j += 16) {
    Philox8 g[2];
    __mmask8 mask[2];
    for (int i = 0; i < 2; ++i) {
      const int64_t m = n - j - 8 * i;
      mask[i] = __mmask8(m >= 8 ? 0xFF : m > 0 ? (1u << m) - 1 : 0);
      const __m512i e = _mm512_add_epi64(_mm512_set1_epi64(int64_t(g0)),
                                         _mm512_cvtepu32_epi64(_mm256_maskz_loadu_epi32(mask[i], idx + j + 8 * i)));
      g[i] = Philox8{e, _mm512_srli_epi64(e, 32), _mm512_set1_epi64(1), _mm512_setzero_si512()};
    }
    philox8_rounds<2, false>(g, k0, k1);
    for (int i = 0; i < 2; ++i)
      _mm256_mask_storeu_epi32(low + j + 8 * i, mask[i],
                               _mm256_and_si256(_mm512_cvtepi64_epi32(g[i].c0), _mm256_set1_epi32(0xFFFF)));
  }
}
#else
static void tie_draws(uint64_t g0, const uint32_t* idx, int64_t n, uint32_t k0, uint32_t k1, uint32_t* low) {
  tie_draws_generic(g0, idx, n, k0, k1, low);
}
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

// One fp32 value narrowed to DT's bits (fp32: the value's own bits), rounding to nearest even.
template <int DT>
static inline uint32_t narrow(float f) {
  const uint32_t u = f2u(f);
  if (DT == kF32) return u;
  if (DT == kBF16) {  // NaN -> the canonical quiet NaN (its payload is the one allowed difference, see docs)
    const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return f != f ? 0x7FC0u : r;
  }
  // fp16: fp16_ieee_from_fp32_value of the FP16 library, which c10::Half uses
  uint32_t shl1 = u + u, sign = u & 0x80000000u;
  float base = (u2f(u & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
  uint32_t bias = shl1 & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  uint32_t bits = f2u(u2f((bias >> 1) + 0x07800000u) + base);
  uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  return (sign >> 16) | (shl1 > 0xFF000000u ? 0x7E00u : nonsign);
}

template <int DT>
static void store_dt(const float* src, int64_t len, void* dst) {
  if (DT == kF32) {
    __builtin_memcpy(dst, src, size_t(len) * 4);
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < len; ++i) d[i] = uint16_t(narrow<DT>(src[i]));
  }
}

static void store(int dtype, const float* src, int64_t len, void* dst) {
  if (dtype == kF32) store_dt<kF32>(src, len, dst);
  else if (dtype == kBF16) store_dt<kBF16>(src, len, dst);
  else store_dt<kF16>(src, len, dst);
}

// dst <- narrow(b + lam * m) in one pass over the tile.
template <int DT>
static void finish_store_dt(const float* m, const float* b, float lam, int64_t len, void* dst) {
  if (DT == kF32) {
    float* d = static_cast<float*>(dst);
    for (int64_t i = 0; i < len; ++i) d[i] = b[i] + lam * m[i];
  } else {
    uint16_t* d = static_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < len; ++i) d[i] = uint16_t(narrow<DT>(b[i] + lam * m[i]));
  }
}

static void finish_store(int dtype, const float* m, const float* b, float lam, int64_t len, void* dst) {
  if (dtype == kF32) finish_store_dt<kF32>(m, b, lam, len, dst);
  else if (dtype == kBF16) finish_store_dt<kBF16>(m, b, lam, len, dst);
  else finish_store_dt<kF16>(m, b, lam, len, dst);
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

// The whole "sum" consensus of one span in registers, for the common case (every input and the
// output in one dtype, no magnitude cuts, K <= kFusedModels): out = narrow(b + lam * m) with
// m = ((+0 + w_0 * dd_0) + w_1 * dd_1) + ..., dd_i = keep_i ? (x_i - b) * r_i : +0, the roundings
// and order of accum_delta + finish_store. K is a template parameter so the model loop unrolls and
// the element loop vectorises; no fp32 scratch goes through memory (the step-wise path's widened
// base and accumulator cost loads and stores per model and element).
template <int DT> struct OutBits { using type = uint16_t; };
template <> struct OutBits<kF32> { using type = uint32_t; };

template <int DT, int K, bool DROP>
static void sum_fused_t(const void* b, const void* const* xs, const uint8_t* const* keep, const float* w,
                        const float* r, float lam, int64_t len, void* out) {
  const void* x[K];
  const uint8_t* kb[K];
  float ww[K], rr[K];
  for (int j = 0; j < K; ++j) x[j] = xs[j], kb[j] = DROP ? keep[j] : nullptr, ww[j] = w[j], rr[j] = r[j];
  using Out = typename OutBits<DT>::type;
  Out* o = static_cast<Out*>(out);
#pragma GCC ivdep
  for (int64_t i = 0; i < len; ++i) {
    const float bv = widen<DT>(b, i);
    float m = 0.0f;
    for (int j = 0; j < K; ++j) {
      const float d = widen<DT>(x[j], i) - bv;
      const float dd = d * rr[j];
      m = m + ww[j] * (DROP && kb[j][i] == 0 ? 0.0f : dd);
    }
    o[i] = Out(narrow<DT>(bv + lam * m));
  }
}

template <int DT, int K>
static void sum_fused_k(bool drop, const void* b, const void* const* xs, const uint8_t* const* keep, const float* w,
                        const float* r, float lam, int64_t len, void* out) {
  if (drop) sum_fused_t<DT, K, true>(b, xs, keep, w, r, lam, len, out);
  else sum_fused_t<DT, K, false>(b, xs, keep, w, r, lam, len, out);
}

template <int DT>
static void sum_fused_dt(int k, bool drop, const void* b, const void* const* xs, const uint8_t* const* keep,
                         const float* w, const float* r, float lam, int64_t len, void* out) {
  static_assert(kFusedModels == 4, "one case per model count");
  switch (k) {
    case 1: sum_fused_k<DT, 1>(drop, b, xs, keep, w, r, lam, len, out); break;
    case 2: sum_fused_k<DT, 2>(drop, b, xs, keep, w, r, lam, len, out); break;
    case 3: sum_fused_k<DT, 3>(drop, b, xs, keep, w, r, lam, len, out); break;
    default: sum_fused_k<DT, 4>(drop, b, xs, keep, w, r, lam, len, out); break;
  }
}

static void sum_fused(int dtype, int k, bool drop, const void* b, const void* const* xs, const uint8_t* const* keep,
                      const float* w, const float* r, float lam, int64_t len, void* out) {
  if (dtype == kF32) sum_fused_dt<kF32>(k, drop, b, xs, keep, w, r, lam, len, out);
  else if (dtype == kBF16) sum_fused_dt<kBF16>(k, drop, b, xs, keep, w, r, lam, len, out);
  else sum_fused_dt<kF16>(k, drop, b, xs, keep, w, r, lam, len, out);
}

// Random bytes src -> dst: 0 (drop) or 1 (keep) (dst may be src); the positions of the bytes equal
// to the threshold's high byte (ties, about 1 in 256: the caller settles them with the second draw)
// go to idx, their number is returned. thr_hi = 256 (p = 1) drops everything and has no byte value.
#if defined(WO_PHILOX_AVX512)
// Two byte compares per 64 bytes. A block holds a tie 22% of the time, too often for a well
// predicted branch, so the first two ties of every block are written unconditionally (the count
// advances only for real ones) and only the rare third (0.2% of blocks) takes the loop.
static int64_t classify_draws(const uint8_t* src, uint8_t* kb, int64_t len, uint32_t thr_hi, uint32_t* idx) {
  const __m512i h = _mm512_set1_epi8(char(thr_hi > 255 ? 255 : thr_hi)), one = _mm512_set1_epi8(1);
  int64_t nt = 0;
  for (int64_t i = 0; i < len; i += 64) {
    const __mmask64 in = len - i >= 64 ? ~__mmask64(0) : (__mmask64(1) << (len - i)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(in, src + i);
    __mmask64 keep = _mm512_cmpgt_epu8_mask(v, h), tie = _mm512_mask_cmpeq_epu8_mask(in, v, h);
    if (thr_hi > 255) keep = tie = 0;
    _mm512_mask_storeu_epi8(kb + i, in, _mm512_maskz_mov_epi8(keep, one));
    for (int k = 0; k < 2; ++k) {  // idx has room: a write past the count is overwritten or ignored
      idx[nt] = uint32_t(i + __builtin_ctzll(tie | (__mmask64(1) << 63)));  // needs room for len + 2
      nt += tie != 0;
      tie &= tie - 1;
    }
    for (; tie; tie &= tie - 1) idx[nt++] = uint32_t(i + __builtin_ctzll(tie));
  }
  return nt;
}
#else
// Classified as 0, 1 or 2 (tie) in one vectorised pass, then the ties found eight bytes at a
// time (a tie is the only value with bit 1 set), skipping 64-byte blocks without any.
static int64_t classify_draws(const uint8_t* src, uint8_t* kb, int64_t len, uint32_t thr_hi, uint32_t* idx) {
  if (thr_hi > 255) {
    for (int64_t i = 0; i < len; ++i) kb[i] = 0;
    return 0;
  }
  const uint8_t h = uint8_t(thr_hi);
  for (int64_t i = 0; i < len; ++i) {  // compared as bytes so the loop vectorises 16-64 bytes at a time
    const uint8_t v = src[i];
    kb[i] = uint8_t(uint8_t(v > h) | uint8_t(uint8_t(v == h) << 1));
  }
  constexpr uint64_t kBit1 = 0x0202020202020202ull;
  int64_t nt = 0, i = 0;
  for (; i + 64 <= len; i += 64) {
    uint64_t v[8], any = 0;
    __builtin_memcpy(v, kb + i, 64);
    for (int j = 0; j < 8; ++j) any |= v[j];
    if (!(any & kBit1)) continue;
    for (int j = 0; j < 8; ++j)
      for (uint64_t t = v[j] & kBit1; t; t &= t - 1) idx[nt++] = uint32_t(i + 8 * j + (__builtin_ctzll(t) >> 3));
  }
  for (; i < len; ++i)
    if (kb[i] == 2) idx[nt++] = uint32_t(i);
  return nt;
}
#endif

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
    WO_ISA_NAME, philox_words, tie_draws, load, store, masked_delta, accum_delta, classify_draws, fill_zero, axpy, ties_vote,
    ties_mean, finish_store, philox_keep, abs_bits, sum_fused,
};

}  // namespace WO_ISA

const TileKernels* WO_TABLE_FN() { return &WO_ISA::table; }

}  // namespace weightops
