// CPU kernels for the weightops operators (schemas: weightops/ops/_ops.py).
//
// This file does the orchestration: argument checks, tiles of kTile elements,
// at::parallel_for, dtype codes. The arithmetic lives in tile_impl.h, compiled
// for the baseline ISA, AVX2 and AVX-512 and picked at run time by cpuid, so the
// binary runs on any x86-64 without -march flags.
//
// Bit-identity with the pure-torch reference rests on three rules:
//  * every fp32 multiply and add is a separate rounding: built with
//    -ffp-contract=off so a*b+c is never fused into an FMA;
//  * the same operation order as reference.py (models folded in list order,
//    accumulators starting at +0.0, `b + lam * m` last);
//  * scalars arrive already rounded to fp32 by the Python wrapper.
// Work is split by element only, so thread count never changes a result;
// histograms are integer counts merged after the parallel loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <sstream>
#include <string>
#include <vector>

#include "tile.h"

namespace weightops {

constexpr int64_t kTile = 2048;      // elements per tile: the fp32 working set stays in L1/L2
constexpr int64_t kGrainTiles = 16;  // at::parallel_for grain, in tiles (32K elements)

namespace {

bool isa_supported(const std::string& isa) {
  if (isa == "baseline") return true;
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx2") return __builtin_cpu_supports("avx2");
  if (isa == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#endif
  return false;
}

const TileKernels* table_for(const std::string& isa) {
#if defined(__x86_64__)
  if (isa == "avx512") return tile_kernels_avx512();
  if (isa == "avx2") return tile_kernels_avx2();
#endif
  return tile_kernels_base();
}

// The widest ISA the CPU has, unless WEIGHTOPS_CPU_ISA asks for a narrower one.
const TileKernels* default_table() {
  const char* env = std::getenv("WEIGHTOPS_CPU_ISA");
  if (env && *env) {
    TORCH_CHECK(isa_supported(env), "weightops: WEIGHTOPS_CPU_ISA=", env, " is not supported by this CPU");
    return table_for(env);
  }
  for (const char* isa : {"avx512", "avx2"})
    if (isa_supported(isa)) return table_for(isa);
  return tile_kernels_base();
}

std::atomic<const TileKernels*> g_tiles{nullptr};

const TileKernels& tiles() {
  const TileKernels* t = g_tiles.load();
  if (!t) {
    t = default_table();
    g_tiles.store(t);
  }
  return *t;
}

int dtype_code(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "weightops: ", what, " must be a CPU tensor");
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "weightops: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

struct Block {  // a contiguous input and its dtype code
  at::Tensor t;
  int code;
  const char* at(int64_t start) const {
    return static_cast<const char*>(t.const_data_ptr()) + start * int64_t(t.element_size());
  }
};

std::vector<Block> blocks(at::TensorList xs, int64_t n, const char* what) {
  std::vector<Block> out;
  out.reserve(xs.size());
  for (const auto& x : xs) {
    TORCH_CHECK(x.numel() == n, "weightops: block size mismatch (", x.numel(), " vs ", n, ")");
    out.push_back({x.contiguous(), dtype_code(x, what)});
  }
  return out;
}

// fp32 tile of a block: a pointer into the block itself when it is fp32 (no copy), else widened into buf.
const float* f32_tile(const TileKernels& T, const Block& blk, int64_t start, int64_t len, float* buf) {
  if (blk.code == kF32) return reinterpret_cast<const float*>(blk.at(start));
  T.load(blk.code, blk.at(start), len, buf);
  return buf;
}

void* out_at(at::Tensor& out, int64_t start) {
  return static_cast<char*>(out.mutable_data_ptr()) + start * int64_t(out.element_size());
}

// Keep bytes of global elements g0 .. g0+len-1 (len <= kTile): p[i] != 0 iff element
// g0+i survives (weightops/philox.h). The random byte of element g is byte (g & 15)
// of counter g >> 4 (x86 is little-endian, as the rule wants); the 1-in-256 ties with
// the threshold's high byte (listed by classify_draws) take the second draw, all of the
// tile's ties in one batch.
constexpr int64_t kDrawWords = kTile / 4 + 8;
const uint8_t* element_keep(const TileKernels& T, uint64_t g0, int64_t len, uint32_t k0, uint32_t k1, uint32_t thr,
                            uint32_t* buf) {
  uint64_t first = g0 >> 4, last = (g0 + uint64_t(len) - 1) >> 4;
  T.philox_words(first, int64_t(last - first + 1), k0, k1, buf);
  uint8_t* kb = reinterpret_cast<uint8_t*>(buf) + (g0 & 15);
  const uint32_t hi = thr >> 16;
  uint32_t idx[kTile + 2], low[kTile + 2];  // classify_draws may write two entries past its count
  const int64_t nt = T.classify_draws(kb, kb, len, hi, idx);
  if (nt == 0) return kb;
  T.tie_draws(g0, idx, nt, k0, k1, low);
  for (int64_t j = 0; j < nt; ++j) kb[idx[j]] = low[j] >= (thr & 0xFFFFu) ? 1 : 0;
  return kb;
}

// The "sum" consensus: out = b + lam * sum_i w_i * keep_i * r_i * (x_i - b).
// The keep bytes are drawn per tile (so a tile's ~8 ties per model settle in one
// batch); the arithmetic runs in steps of kChunk elements whose scratch (widened
// base, accumulator) stays in L1, each input read once and the output written
// once. Whole-tile passes (one stream after the other, 4 KiB each) stalled on
// memory at every pass; 256-element steps keep all the streams moving together
// (2 x 64M bf16 task arithmetic, 1 thread: 65 -> 31 ms). Software prefetching
// measured no gain for DARE and a loss for task arithmetic, so there is none.
// When every input and the output share a dtype and there are no magnitude cuts
// (task arithmetic, DARE), TileKernels::sum_fused does the tile in one pass with
// no scratch at all (1 thread, same benchmark: 23 ms). Tried for DARE and slower
// (1 thread): drawing tile t+1's words between the steps of tile t's pass, in 4
// parts or in groups of 8 or 32 counters inside it; classifying the bytes in
// registers as Philox makes them; non-temporal output stores; 4096-element tiles.
constexpr int64_t kChunk = 256;

void sum_consensus(const TileKernels& T, const Block& b, const std::vector<Block>& xs, const std::vector<float>& w,
                   const std::vector<float>& r, const std::vector<int>& flags, const std::vector<float>& lo,
                   const std::vector<float>& hi, const int64_t* keys, uint32_t thr, int64_t offset, float lam,
                   at::Tensor& out, int out_code) {
  const int64_t n = b.t.numel(), K = int64_t(xs.size()), ntiles = (n + kTile - 1) / kTile;
  bool fused = K >= 1 && K <= kFusedModels && out_code == b.code;
  for (int64_t i = 0; i < K; ++i) fused &= xs[i].code == b.code && (flags[i] & 6) == 0;
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    alignas(64) float bb[kChunk], m[kChunk];
    const void* xp[kFusedModels];
    std::vector<uint32_t> words(keys ? K * kDrawWords : 0);  // the tile's keep bytes, one run per model
    std::vector<const uint8_t*> kb(K, nullptr);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t tstart = t * kTile, tlen = std::min(kTile, n - tstart);
      for (int64_t i = 0; keys && i < K; ++i)
        kb[i] = element_keep(T, uint64_t(offset + tstart), tlen, uint32_t(keys[2 * i]), uint32_t(keys[2 * i + 1]),
                             thr, words.data() + i * kDrawWords);
      if (fused) {
        for (int64_t i = 0; i < K; ++i) xp[i] = xs[i].at(tstart);
        T.sum_fused(out_code, int(K), keys != nullptr, b.at(tstart), xp, kb.data(), w.data(), r.data(), lam, tlen,
                    out_at(out, tstart));
        continue;
      }
      for (int64_t c = 0; c < tlen; c += kChunk) {
        const int64_t start = tstart + c, len = std::min(kChunk, tlen - c);
        const float* bv = f32_tile(T, b, start, len, bb);
        T.fill_zero(m, len);
        for (int64_t i = 0; i < K; ++i)
          T.accum_delta(xs[i].code, m, xs[i].at(start), bv, len, w[i], r[i], flags[i], lo[i], hi[i],
                        keys ? kb[i] + c : nullptr);
        T.finish_store(out_code, m, bv, lam, len, out_at(out, start));
      }
    }
  });
}

}  // namespace

at::Tensor delta_merge_cpu(const at::Tensor& base, at::TensorList models, c10::ArrayRef<double> weights,
                           int64_t offset, c10::IntArrayRef keys, int64_t drop_threshold,
                           c10::ArrayRef<double> rescales, std::optional<c10::ArrayRef<double>> lo,
                           std::optional<c10::ArrayRef<double>> hi, c10::string_view consensus, double lam,
                           at::ScalarType out_dtype) {
  const int64_t n = base.numel();
  const int64_t K = int64_t(models.size());
  const bool ties = consensus == "ties";
  TORCH_CHECK(ties || consensus == "sum", "weightops: consensus must be 'sum' or 'ties'");
  TORCH_CHECK(int64_t(weights.size()) == K && int64_t(rescales.size()) == K,
              "weightops: one weight and one rescale per model");
  TORCH_CHECK(!lo || int64_t(lo->size()) == K, "weightops: one lo per model");
  TORCH_CHECK(!hi || int64_t(hi->size()) == K, "weightops: one hi per model");
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= kDropOne, "weightops: drop_threshold out of range");
  TORCH_CHECK(offset >= 0, "weightops: offset must be non-negative");
  const bool drop = drop_threshold > 0;
  TORCH_CHECK(!drop || int64_t(keys.size()) == 2 * K, "weightops: one philox key per model");
  const Block b{base.contiguous(), dtype_code(base, "base")};
  const auto xs = blocks(models, n, "models");
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype));
  const int out_code = dtype_code(out, "out_dtype");

  std::vector<float> w(K), r(K), vlo(K, 0.f), vhi(K, 0.f);
  std::vector<int> flags(K);
  for (int64_t i = 0; i < K; ++i) {
    w[i] = float(weights[i]);
    r[i] = float(rescales[i]);
    if (lo) vlo[i] = float((*lo)[i]);
    if (hi) vhi[i] = float((*hi)[i]);
    flags[i] = (lo ? 4 : 0) | (hi && !std::isinf(vhi[i]) ? 2 : 0) | (drop ? 1 : 0);  // hi = +inf: no upper cut
  }
  const float flam = float(lam);
  const uint32_t thr = uint32_t(drop_threshold);
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const TileKernels& T = tiles();

  if (!ties) {
    sum_consensus(T, b, xs, w, r, flags, vlo, vhi, drop ? keys.data() : nullptr, thr, offset, flam, out, out_code);
    return out;
  }
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    // bb: base; m: TIES numerator; s: TIES signed sum; den: TIES weights; then one delta per model.
    std::vector<float> buf((4 + K) * kTile);
    std::vector<uint32_t> words(kDrawWords);
    float *bb = buf.data(), *m = bb + kTile, *s = m + kTile, *den = s + kTile, *d0 = den + kTile;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      const float* bv = f32_tile(T, b, start, len, bb);
      const uint64_t g0 = uint64_t(offset + start);
      for (int64_t i = 0; i < K; ++i) {
        const uint8_t* kb =
            drop ? element_keep(T, g0, len, uint32_t(keys[2 * i]), uint32_t(keys[2 * i + 1]), thr, words.data())
                 : nullptr;
        float* d = d0 + i * kTile;
        T.masked_delta(d, f32_tile(T, xs[i], start, len, d), bv, len, r[i], flags[i], vlo[i], vhi[i], kb);
      }
      T.fill_zero(m, len);
      T.fill_zero(s, len);
      T.fill_zero(den, len);
      for (int64_t i = 0; i < K; ++i) T.axpy(s, w[i], d0 + i * kTile, len);
      for (int64_t i = 0; i < K; ++i) T.ties_vote(m, den, s, w[i], d0 + i * kTile, len);
      T.ties_mean(m, den, len);
      T.finish_store(out_code, m, bv, flam, len, out_at(out, start));
    }
  });
  return out;
}

at::Tensor weighted_sum_cpu(at::TensorList xs_in, c10::ArrayRef<double> weights, at::ScalarType out_dtype) {
  TORCH_CHECK(!xs_in.empty() && xs_in.size() == weights.size(), "weightops: weighted_sum needs one weight per tensor");
  const int64_t n = xs_in[0].numel();
  const auto xs = blocks(xs_in, n, "xs");
  at::Tensor out = at::empty(xs_in[0].sizes(), xs_in[0].options().dtype(out_dtype));
  const int out_code = dtype_code(out, "out_dtype");
  const int64_t K = int64_t(xs.size()), ntiles = (n + kTile - 1) / kTile;
  const TileKernels& T = tiles();
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kTile), x(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      T.fill_zero(acc.data(), len);
      for (int64_t i = 0; i < K; ++i) {
        T.axpy(acc.data(), float(weights[i]), f32_tile(T, xs[i], start, len, x.data()), len);
      }
      T.store(out_code, acc.data(), len, out_at(out, start));
    }
  });
  return out;
}

at::Tensor abs_histogram_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& base_in, int64_t prefix) {
  const int64_t n = x_in.numel();
  TORCH_CHECK(prefix < 65536, "weightops: prefix must be < 65536");
  const Block x{x_in.contiguous(), dtype_code(x_in, "x")};
  const bool has_base = base_in && base_in->defined();
  Block b{};
  if (has_base) {
    TORCH_CHECK(base_in->numel() == n, "weightops: x and base differ in size");
    b = Block{base_in->contiguous(), dtype_code(*base_in, "base")};
  }
  at::Tensor hist = at::zeros({65536}, x_in.options().dtype(at::kLong));
  int64_t* total = hist.mutable_data_ptr<int64_t>();
  std::mutex merge;
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const TileKernels& T = tiles();
  // One private histogram per task (about one task per thread with this
  // grain), summed under a lock: integer sums, the same for any thread count.
  at::parallel_for(0, ntiles, 256, [&](int64_t t0, int64_t t1) {
    std::vector<int64_t> h(65536, 0);
    std::vector<float> v(kTile), vb(has_base ? kTile : 0);
    std::vector<uint32_t> u(kTile);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      T.abs_bits(f32_tile(T, x, start, len, v.data()), has_base ? f32_tile(T, b, start, len, vb.data()) : nullptr,
                 len, u.data());
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
  const TileKernels& T = tiles();
  at::parallel_for(0, ntiles, kGrainTiles, [&](int64_t t0, int64_t t1) {
    std::vector<uint32_t> words(kDrawWords);
    const uint32_t thr = uint32_t(drop_threshold);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t start = t * kTile, len = std::min(kTile, n - start);
      const uint64_t g0 = uint64_t(offset + start);
      if (len < 64) {  // short blocks: the shared scalar rule, the one the CUDA kernels run
        for (int64_t i = 0; i < len; ++i) o[start + i] = philox_keep_at(uint32_t(k0), uint32_t(k1), g0 + uint64_t(i), thr);
        continue;
      }
      T.philox_keep(element_keep(T, g0, len, uint32_t(k0), uint32_t(k1), thr, words.data()), len, o + start);
    }
  });
}

// Selects the tile loops ("baseline", "avx2", "avx512"; "" keeps the current
// choice) and returns the one in use: lets tests check every ISA against the
// reference in one process.
std::string cpu_isa(c10::string_view want) {
  if (!want.empty()) {
    std::string isa(want);
    TORCH_CHECK(isa_supported(isa), "weightops: ISA ", isa, " not supported by this CPU (or unknown)");
    g_tiles.store(table_for(isa));
  }
  return tiles().name;
}

std::string build_info() {
  std::ostringstream s;
  s << "built against torch " << TORCH_VERSION_MAJOR << "." << TORCH_VERSION_MINOR << "." << TORCH_VERSION_PATCH
    << "; cpu tile loops: baseline";
#if defined(__x86_64__)
  s << ", avx2, avx512";
#endif
  s << " (in use: " << tiles().name << ")";
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

TORCH_LIBRARY_FRAGMENT(weightops, m) {
  m.def("_build_info() -> str", &weightops::build_info);
  m.def("_cpu_isa(str isa) -> str", &weightops::cpu_isa);
}

TORCH_LIBRARY_IMPL(weightops, CPU, m) {
  m.impl("delta_merge", &weightops::delta_merge_cpu);
  m.impl("weighted_sum", &weightops::weighted_sum_cpu);
  m.impl("abs_histogram", &weightops::abs_histogram_cpu);
  m.impl("philox_keep_mask_out", &weightops::philox_keep_mask_out_cpu);
}
