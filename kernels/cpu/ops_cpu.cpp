// CPU kernels for the weightops operators (schemas: weightops/ops/_ops.py).
//
// Bit-identity with the pure-torch reference rests on three rules:
//  * every fp32 multiply and add is a separate rounding: built with
//    -ffp-contract=off so a*b+c is never fused into an FMA;
//  * the same operation order as reference.py (models folded in list order,
//    accumulators starting at +0.0, `b + lam * m` last);
//  * scalars arrive already rounded to fp32 by the Python wrapper.
// Work is split by element only, so thread count never changes a result;
// histograms are integer counts merged after the parallel loop.
//
// Inner loops run on fixed tiles converted to fp32 in a thread-local buffer:
// simple enough loops for the compiler to vectorise at the baseline ISA, with
// the Philox generator (the hot spot) cloned for AVX2 and AVX-512.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "weightops/philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(WEIGHTOPS_NO_CLONES)
#define WO_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#define WO_CLONES_NAME "default, avx2, avx512f (runtime selected)"
#else
#define WO_CLONES
#define WO_CLONES_NAME "baseline only"
#endif

namespace weightops {

constexpr int64_t kTile = 2048;        // elements per tile: a few tiles of fp32 stay in L1/L2
constexpr int64_t kGrainTiles = 16;    // at::parallel_for grain, in tiles (32K elements)
constexpr int kPhiloxLanes = 16;

// Philox words for counters ctr0 .. ctr0+nctr-1 (second and third counter words
// zero), interleaved four per counter. Counters are processed as 16 lanes in
// structure-of-arrays form so the 32x32->64 multiplies vectorise.
WO_CLONES void philox_words(uint64_t ctr0, int64_t nctr, uint32_t k0, uint32_t k1, uint32_t* out) {
  for (int64_t j = 0; j < nctr; j += kPhiloxLanes) {
    uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
    for (int l = 0; l < kPhiloxLanes; ++l) {
      uint64_t c = ctr0 + uint64_t(j + l);
      c0[l] = uint32_t(c);
      c1[l] = uint32_t(c >> 32);
      c2[l] = 0;
      c3[l] = 0;
    }
    uint32_t a = k0, b = k1;
    for (int r = 0; r < 10; ++r) {
      for (int l = 0; l < kPhiloxLanes; ++l) {
        uint64_t p0 = uint64_t(kPhiloxM0) * c0[l], p1 = uint64_t(kPhiloxM1) * c2[l];
        uint32_t n0 = uint32_t(p1 >> 32) ^ c1[l] ^ a, n2 = uint32_t(p0 >> 32) ^ c3[l] ^ b;
        c1[l] = uint32_t(p1);
        c3[l] = uint32_t(p0);
        c0[l] = n0;
        c2[l] = n2;
      }
      a += kPhiloxW0;
      b += kPhiloxW1;
    }
    int64_t m = std::min<int64_t>(kPhiloxLanes, nctr - j);
    for (int64_t l = 0; l < m; ++l) {
      uint32_t* o = out + 4 * (j + l);
      o[0] = c0[l]; o[1] = c1[l]; o[2] = c2[l]; o[3] = c3[l];
    }
  }
}

namespace {

// Words for global elements g0 .. g0+len-1: returns a pointer p with p[i] the
// word of element g0+i. `buf` holds kTile + 8 words.
const uint32_t* element_words(uint64_t g0, int64_t len, uint32_t k0, uint32_t k1, uint32_t* buf) {
  uint64_t first = g0 >> 2, last = (g0 + uint64_t(len) - 1) >> 2;
  philox_words(first, int64_t(last - first + 1), k0, k1, buf);
  return buf + (g0 & 3);
}

inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

void check_dtype(const at::Tensor& t, const char* what) {
  auto s = t.scalar_type();
  TORCH_CHECK(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf,
              "weightops: ", what, " must be float32, bfloat16 or float16, got ", s);
  TORCH_CHECK(t.device().is_cpu(), "weightops: ", what, " must be a CPU tensor");
}

// Exact widening of a tile to fp32.
void load_f32(const at::Tensor& t, int64_t start, int64_t len, float* dst) {
  switch (t.scalar_type()) {
    case at::kFloat:
      std::memcpy(dst, t.const_data_ptr<float>() + start, len * sizeof(float));
      break;
    case at::kBFloat16: {
      auto src = reinterpret_cast<const uint16_t*>(t.const_data_ptr<c10::BFloat16>()) + start;
      auto d = reinterpret_cast<uint32_t*>(dst);
      for (int64_t i = 0; i < len; ++i) d[i] = uint32_t(src[i]) << 16;
      break;
    }
    case at::kHalf: {
      auto src = t.const_data_ptr<c10::Half>() + start;
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "weightops: unsupported dtype ", t.scalar_type());
  }
}

// Round-to-nearest-even narrowing, as Tensor.to() does (NaN payloads aside).
void store_f32(const float* src, int64_t len, at::Tensor& out, int64_t start) {
  switch (out.scalar_type()) {
    case at::kFloat:
      std::memcpy(out.mutable_data_ptr<float>() + start, src, len * sizeof(float));
      break;
    case at::kBFloat16: {
      auto d = reinterpret_cast<uint16_t*>(out.mutable_data_ptr<c10::BFloat16>()) + start;
      for (int64_t i = 0; i < len; ++i) {
        uint32_t u = f2u(src[i]);
        uint16_t r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        d[i] = src[i] != src[i] ? uint16_t(0x7FC0) : r;
      }
      break;
    }
    case at::kHalf: {
      auto d = out.mutable_data_ptr<c10::Half>() + start;
      for (int64_t i = 0; i < len; ++i) d[i] = c10::Half(src[i]);
      break;
    }
    default:
      TORCH_CHECK(false, "weightops: unsupported output dtype ", out.scalar_type());
  }
}

// x <- keep ? (x - b) * r : 0, with keep = lo <= |d| (LO), |d| < hi (HI) and the
// Philox draw (DROP). Compiled per flag combination so the loop has no branches.
template <bool LO, bool HI, bool DROP>
void masked_delta(float* x, const float* b, int64_t len, float r, float lo, float hi, const uint32_t* w,
                  uint32_t thr) {
  for (int64_t i = 0; i < len; ++i) {
    float d = x[i] - b[i];
    float a = std::fabs(d);
    bool keep = true;
    if (LO) keep = keep && !(a < lo);
    if (HI) keep = keep && (a < hi);
    if (DROP) keep = keep && ((w[i] >> 8) >= thr);
    x[i] = keep ? d * r : 0.0f;
  }
}

using MaskFn = void (*)(float*, const float*, int64_t, float, float, float, const uint32_t*, uint32_t);
MaskFn pick_mask(bool lo, bool hi, bool drop) {
  static const MaskFn table[8] = {
      masked_delta<false, false, false>, masked_delta<false, false, true>, masked_delta<false, true, false>,
      masked_delta<false, true, true>,   masked_delta<true, false, false>, masked_delta<true, false, true>,
      masked_delta<true, true, false>,   masked_delta<true, true, true>};
  return table[(lo ? 4 : 0) | (hi ? 2 : 0) | (drop ? 1 : 0)];
}

std::vector<at::Tensor> contiguous_inputs(at::TensorList xs, int64_t n, const char* what) {
  std::vector<at::Tensor> out;
  out.reserve(xs.size());
  for (const auto& x : xs) {
    check_dtype(x, what);
    TORCH_CHECK(x.numel() == n, "weightops: block size mismatch (", x.numel(), " vs ", n, ")");
    out.push_back(x.contiguous());
  }
  return out;
}

}  // namespace

at::Tensor delta_merge_cpu(const at::Tensor& base, at::TensorList models, c10::ArrayRef<double> weights,
                           int64_t offset, c10::IntArrayRef keys, int64_t drop_threshold,
                           c10::ArrayRef<double> rescales, std::optional<c10::ArrayRef<double>> lo,
                           std::optional<c10::ArrayRef<double>> hi, c10::string_view consensus, double lam,
                           at::ScalarType out_dtype) {
  check_dtype(base, "base");
  const int64_t n = base.numel();
  const int64_t K = int64_t(models.size());
  const bool ties = consensus == "ties";
  TORCH_CHECK(ties || consensus == "sum", "weightops: consensus must be 'sum' or 'ties'");
  TORCH_CHECK(int64_t(weights.size()) == K && int64_t(rescales.size()) == K, "weightops: one weight and rescale per model");
  TORCH_CHECK(!lo || int64_t(lo->size()) == K, "weightops: one lo per model");
  TORCH_CHECK(!hi || int64_t(hi->size()) == K, "weightops: one hi per model");
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= kDropOne, "weightops: drop_threshold out of range");
  TORCH_CHECK(offset >= 0, "weightops: offset must be non-negative");
  const bool drop = drop_threshold > 0;
  TORCH_CHECK(!drop || int64_t(keys.size()) == 2 * K, "weightops: one philox key per model");
  at::Tensor b = base.contiguous();
  auto xs = contiguous_inputs(models, n, "models");
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype));
  check_dtype(out, "out_dtype");

  std::vector<float> w(K), r(K), vlo(K, 0.f), vhi(K, 0.f);
  std::vector<MaskFn> mask(K);
  for (int64_t i = 0; i < K; ++i) {
    w[i] = float(weights[i]);
    r[i] = float(rescales[i]);
    if (lo) vlo[i] = float((*lo)[i]);
    if (hi) vhi[i] = float((*hi)[i]);
    mask[i] = pick_mask(lo.has_value(), hi.has_value() && !std::isinf(vhi[i]), drop);
  }
  const float flam = float(lam);
  const uint32_t thr = uint32_t(drop_threshold);
  const int64_t ntiles = (n + kTile - 1) / kTile;

  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf((4 + K) * kTile);
    std::vector<uint32_t> words(kTile + 8);
    float *bb = buf.data(), *m = bb + kTile, *s = m + kTile, *den = s + kTile, *d0 = den + kTile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      load_f32(b, start, len, bb);
      for (int64_t i = 0; i < K; ++i) {
        float* d = d0 + i * kTile;
        load_f32(xs[i], start, len, d);
        const uint32_t* wd = drop ? element_words(uint64_t(offset + start), len, uint32_t(keys[2 * i]),
                                                  uint32_t(keys[2 * i + 1]), words.data())
                                  : nullptr;
        mask[i](d, bb, len, r[i], vlo[i], vhi[i], wd, thr);
      }
      for (int64_t e = 0; e < len; ++e) m[e] = 0.0f;
      if (!ties) {
        for (int64_t i = 0; i < K; ++i) {
          const float wi = w[i], *d = d0 + i * kTile;
          for (int64_t e = 0; e < len; ++e) m[e] = m[e] + wi * d[e];
        }
      } else {
        // s: signed weighted sum (the elected sign); m: numerator; den: agreeing weights.
        for (int64_t e = 0; e < len; ++e) s[e] = 0.0f, den[e] = 0.0f;
        for (int64_t i = 0; i < K; ++i) {
          const float wi = w[i], *d = d0 + i * kTile;
          for (int64_t e = 0; e < len; ++e) s[e] = s[e] + wi * d[e];
        }
        for (int64_t i = 0; i < K; ++i) {
          const float wi = w[i], *d = d0 + i * kTile;
          for (int64_t e = 0; e < len; ++e) {
            bool agree = s[e] >= 0.0f ? d[e] > 0.0f : d[e] < 0.0f;
            float nm = m[e] + wi * d[e], nd = den[e] + wi;
            m[e] = agree ? nm : m[e];
            den[e] = agree ? nd : den[e];
          }
        }
        for (int64_t e = 0; e < len; ++e) {
          float q = m[e] / den[e];
          m[e] = den[e] != 0.0f ? q : 0.0f;
        }
      }
      for (int64_t e = 0; e < len; ++e) m[e] = bb[e] + flam * m[e];
      store_f32(m, len, out, start);
    }
  });
  return out;
}

at::Tensor weighted_sum_cpu(at::TensorList xs_in, c10::ArrayRef<double> weights, at::ScalarType out_dtype) {
  TORCH_CHECK(!xs_in.empty() && xs_in.size() == weights.size(), "weightops: weighted_sum needs one weight per tensor");
  const int64_t n = xs_in[0].numel();
  auto xs = contiguous_inputs(xs_in, n, "xs");
  at::Tensor out = at::empty(xs_in[0].sizes(), xs_in[0].options().dtype(out_dtype));
  check_dtype(out, "out_dtype");
  const int64_t K = int64_t(xs.size()), ntiles = (n + kTile - 1) / kTile;
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kTile), x(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      for (int64_t e = 0; e < len; ++e) acc[e] = 0.0f;
      for (int64_t i = 0; i < K; ++i) {
        const float wi = float(weights[i]);
        load_f32(xs[i], start, len, x.data());
        for (int64_t e = 0; e < len; ++e) acc[e] = acc[e] + wi * x[e];
      }
      store_f32(acc.data(), len, out, start);
    }
  });
  return out;
}

at::Tensor abs_histogram_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& base_in, int64_t prefix) {
  check_dtype(x_in, "x");
  const int64_t n = x_in.numel();
  TORCH_CHECK(prefix < 65536, "weightops: prefix must be < 65536");
  at::Tensor x = x_in.contiguous(), b;
  if (base_in && base_in->defined()) {
    check_dtype(*base_in, "base");
    TORCH_CHECK(base_in->numel() == n, "weightops: x and base differ in size");
    b = base_in->contiguous();
  }
  at::Tensor hist = at::zeros({65536}, x_in.options().dtype(at::kLong));
  int64_t* total = hist.mutable_data_ptr<int64_t>();
  std::mutex merge;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  // One private histogram per task (at::parallel_for makes about one task per
  // thread with this grain), summed under a lock: integer sums, so the result
  // is the same for any thread count.
  at::parallel_for(0, ntiles, 256, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> h(65536, 0);
    std::vector<float> v(kTile), vb(b.defined() ? kTile : 0);
    std::vector<uint32_t> u(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      load_f32(x, start, len, v.data());
      if (b.defined()) {
        load_f32(b, start, len, vb.data());
        for (int64_t e = 0; e < len; ++e) v[e] = v[e] - vb[e];
      }
      for (int64_t e = 0; e < len; ++e) u[e] = f2u(v[e]) & 0x7FFFFFFFu;  // |v| as bits
      if (prefix < 0) {
        for (int64_t e = 0; e < len; ++e) ++h[u[e] >> 16];
      } else {
        const uint32_t p = uint32_t(prefix);
        for (int64_t e = 0; e < len; ++e)
          if ((u[e] >> 16) == p) ++h[u[e] & 0xFFFFu];
      }
    }
    std::lock_guard<std::mutex> g(merge);
    for (int64_t i = 0; i < 65536; ++i) total[i] += h[i];
  });
  return hist;
}

void philox_keep_mask_out_cpu(const at::Tensor& out, int64_t k0, int64_t k1, int64_t offset, int64_t drop_threshold) {
  TORCH_CHECK(out.scalar_type() == at::kBool && out.is_contiguous() && out.device().is_cpu(),
              "weightops: out must be a contiguous CPU bool tensor");
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= kDropOne && offset >= 0, "weightops: bad threshold or offset");
  const int64_t n = out.numel(), ntiles = (n + kTile - 1) / kTile;
  bool* o = out.mutable_data_ptr<bool>();
  const uint32_t thr = uint32_t(drop_threshold);
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> words(kTile + 8);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      const uint32_t* w = element_words(uint64_t(offset + start), len, uint32_t(k0), uint32_t(k1), words.data());
      for (int64_t e = 0; e < len; ++e) o[start + e] = philox_keep(w[e], thr);
    }
  });
}

std::string build_info() {
  std::ostringstream s;
  s << "built against torch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH
    << "; philox clones: " << WO_CLONES_NAME;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  s << "; cpu has avx2=" << (__builtin_cpu_supports("avx2") ? "yes" : "no")
    << " avx512f=" << (__builtin_cpu_supports("avx512f") ? "yes" : "no");
#endif
#if defined(_OPENMP)
  s << "; openmp=yes";
#else
  s << "; openmp=no";
#endif
#if defined(WEIGHTOPS_WITH_CUDA)
  s << "; cuda kernels=yes";
#else
  s << "; cuda kernels=no";
#endif
  return s.str();
}

}  // namespace weightops

TORCH_LIBRARY_FRAGMENT(weightops, m) { m.def("_build_info() -> str", &weightops::build_info); }

TORCH_LIBRARY_IMPL(weightops, CPU, m) {
  m.impl("delta_merge", &weightops::delta_merge_cpu);
  m.impl("weighted_sum", &weightops::weighted_sum_cpu);
  m.impl("abs_histogram", &weightops::abs_histogram_cpu);
  m.impl("philox_keep_mask_out", &weightops::philox_keep_mask_out_cpu);
}
