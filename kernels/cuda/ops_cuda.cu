// CUDA kernels for the weightops operators: one thread per element, the same
// arithmetic as weightops/ops/reference.py. Every product and sum goes through
// __fmul_rn / __fadd_rn (never contracted into an FMA, also guaranteed by
// -fmad=false) and division is __fdiv_rn, so results match the CPU bit for bit.
// Model arguments travel by value in the launch parameters, which caps a call
// at kMaxModels models; the Python wrapper sends larger merges to the reference.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cmath>

#include "weightops/dtypes.h"
#include "weightops/philox.h"

namespace weightops {
namespace {

constexpr int kMaxModels = 16;
constexpr int kThreads = 256;

struct Src {
  const void* p;
  int code;
};

struct MergeArgs {
  Src base, x[kMaxModels];
  float w[kMaxModels], r[kMaxModels], lo[kMaxModels], hi[kMaxModels];
  uint32_t k0[kMaxModels], k1[kMaxModels];
  int flags[kMaxModels];  // 4: lo cut, 2: hi cut, 1: philox drop
  int K, out_code;
  bool ties;
  uint32_t thr;
  uint64_t offset;
  float lam;
  void* out;
  int64_t n;
};

__device__ __forceinline__ float load1(Src s, int64_t i) {
  if (s.code == kF32) return static_cast<const float*>(s.p)[i];
  const uint16_t h = static_cast<const uint16_t*>(s.p)[i];
  if (s.code == kBF16) return __uint_as_float(uint32_t(h) << 16);
  return __half2float(__ushort_as_half(h));  // exact widening
}

__device__ __forceinline__ void store1(void* p, int code, int64_t i, float v) {
  if (code == kF32) {
    static_cast<float*>(p)[i] = v;
  } else if (code == kBF16) {  // round to nearest even, as the CPU kernels and Tensor.to()
    const uint32_t u = __float_as_uint(v);
    static_cast<uint16_t*>(p)[i] = v != v ? uint16_t(0x7FC0) : uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  } else {
    static_cast<uint16_t*>(p)[i] = __half_as_ushort(__float2half_rn(v));
  }
}

__device__ __forceinline__ float masked_delta(const MergeArgs& a, int i, int64_t e, float b) {
  const float d = __fsub_rn(load1(a.x[i], e), b);
  const float ad = fabsf(d);
  bool keep = true;
  if (a.flags[i] & 4) keep = keep && !(ad < a.lo[i]);
  if (a.flags[i] & 2) keep = keep && (ad < a.hi[i]);
  if (a.flags[i] & 1) keep = keep && philox_keep_at(a.k0[i], a.k1[i], a.offset + uint64_t(e), a.thr);
  return keep ? __fmul_rn(d, a.r[i]) : 0.0f;
}

__global__ void delta_merge_kernel(const MergeArgs a) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < a.n; e += int64_t(gridDim.x) * blockDim.x) {
    const float b = load1(a.base, e);
    float m = 0.0f;
    if (!a.ties) {
      for (int i = 0; i < a.K; ++i) m = __fadd_rn(m, __fmul_rn(a.w[i], masked_delta(a, i, e, b)));
    } else {
      float s = 0.0f, den = 0.0f;
      for (int i = 0; i < a.K; ++i) s = __fadd_rn(s, __fmul_rn(a.w[i], masked_delta(a, i, e, b)));
      for (int i = 0; i < a.K; ++i) {  // recomputing the delta is cheaper than storing K of them
        const float d = masked_delta(a, i, e, b);
        if (s >= 0.0f ? d > 0.0f : d < 0.0f) {
          m = __fadd_rn(m, __fmul_rn(a.w[i], d));
          den = __fadd_rn(den, a.w[i]);
        }
      }
      m = den != 0.0f ? __fdiv_rn(m, den) : 0.0f;
    }
    store1(a.out, a.out_code, e, __fadd_rn(b, __fmul_rn(a.lam, m)));
  }
}

__global__ void abs_histogram_kernel(Src x, Src base, bool has_base, int64_t n, int prefix,
                                     unsigned long long* hist) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
    const float v = has_base ? __fsub_rn(load1(x, e), load1(base, e)) : load1(x, e);
    const uint32_t u = __float_as_uint(v) & 0x7FFFFFFFu;
    if (prefix < 0)
      atomicAdd(hist + (u >> 16), 1ull);
    else if ((u >> 16) == uint32_t(prefix))
      atomicAdd(hist + (u & 0xFFFFu), 1ull);
  }
}

__global__ void philox_keep_kernel(bool* out, int64_t n, uint32_t k0, uint32_t k1, uint64_t offset, uint32_t thr) {
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x)
    out[e] = philox_keep_at(k0, k1, offset + uint64_t(e), thr);
}

int code_of(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), "weightops: ", what, " must be on ", like.device());
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "weightops: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

int blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return int(b < 65535 ? (b > 0 ? b : 1) : 65535);
}

}  // namespace

at::Tensor delta_merge_cuda(const at::Tensor& base, at::TensorList models, c10::ArrayRef<double> weights,
                            int64_t offset, c10::IntArrayRef keys, int64_t drop_threshold,
                            c10::ArrayRef<double> rescales, std::optional<c10::ArrayRef<double>> lo,
                            std::optional<c10::ArrayRef<double>> hi, c10::string_view consensus, double lam,
                            at::ScalarType out_dtype) {
  const c10::cuda::CUDAGuard guard(base.device());
  const int64_t n = base.numel(), K = int64_t(models.size());
  TORCH_CHECK(K <= kMaxModels, "weightops: the CUDA delta_merge takes at most ", kMaxModels, " models");
  TORCH_CHECK(consensus == "sum" || consensus == "ties", "weightops: consensus must be 'sum' or 'ties'");
  TORCH_CHECK(int64_t(weights.size()) == K && int64_t(rescales.size()) == K, "weightops: one weight/rescale per model");
  TORCH_CHECK((!lo || int64_t(lo->size()) == K) && (!hi || int64_t(hi->size()) == K), "weightops: one lo/hi per model");
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= kDropOne && offset >= 0, "weightops: bad threshold or offset");
  const bool drop = drop_threshold > 0;
  TORCH_CHECK(!drop || int64_t(keys.size()) == 2 * K, "weightops: one philox key per model");

  const at::Tensor b = base.contiguous();
  std::vector<at::Tensor> xs;
  MergeArgs a{};
  a.base = {b.const_data_ptr(), code_of(b, base, "base")};
  for (int64_t i = 0; i < K; ++i) {
    TORCH_CHECK(models[i].numel() == n, "weightops: block size mismatch");
    xs.push_back(models[i].contiguous());
    a.x[i] = {xs.back().const_data_ptr(), code_of(xs.back(), base, "models")};
    a.w[i] = float(weights[i]);
    a.r[i] = float(rescales[i]);
    a.lo[i] = lo ? float((*lo)[i]) : 0.0f;
    a.hi[i] = hi ? float((*hi)[i]) : 0.0f;
    a.k0[i] = drop ? uint32_t(keys[2 * i]) : 0u;
    a.k1[i] = drop ? uint32_t(keys[2 * i + 1]) : 0u;
    a.flags[i] = (lo ? 4 : 0) | (hi && !std::isinf(a.hi[i]) ? 2 : 0) | (drop ? 1 : 0);
  }
  at::Tensor out = at::empty(base.sizes(), base.options().dtype(out_dtype));
  a.K = int(K);
  a.out_code = code_of(out, base, "out_dtype");
  a.ties = consensus == "ties";
  a.thr = uint32_t(drop_threshold);
  a.offset = uint64_t(offset);
  a.lam = float(lam);
  a.out = out.mutable_data_ptr();
  a.n = n;
  if (n > 0) {
    delta_merge_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

at::Tensor weighted_sum_cuda(at::TensorList xs, c10::ArrayRef<double> weights, at::ScalarType out_dtype) {
  // A weighted sum is delta_merge with base +0, rescale 1 and lam 1, bit for bit: x - 0 == x and
  // 1 * y == y exactly, and the final +0 + m == m because an accumulator that starts at +0 can
  // never become -0 under round-to-nearest.
  TORCH_CHECK(!xs.empty() && xs.size() == weights.size(), "weightops: weighted_sum needs one weight per tensor");
  at::Tensor zero = at::zeros(xs[0].sizes(), xs[0].options().dtype(at::kFloat));
  std::vector<double> ones(xs.size(), 1.0);
  return delta_merge_cuda(zero, xs, weights, 0, {}, 0, ones, std::nullopt, std::nullopt, "sum", 1.0, out_dtype);
}

at::Tensor abs_histogram_cuda(const at::Tensor& x, const std::optional<at::Tensor>& base, int64_t prefix) {
  const c10::cuda::CUDAGuard guard(x.device());
  TORCH_CHECK(prefix < 65536, "weightops: prefix must be < 65536");
  const at::Tensor xc = x.contiguous();
  const bool has_base = base && base->defined();
  const at::Tensor bc = has_base ? base->contiguous() : xc;
  TORCH_CHECK(bc.numel() == xc.numel(), "weightops: x and base differ in size");
  at::Tensor hist = at::zeros({65536}, x.options().dtype(at::kLong));
  const int64_t n = xc.numel();
  if (n > 0) {
    abs_histogram_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        {xc.const_data_ptr(), code_of(xc, x, "x")}, {bc.const_data_ptr(), code_of(bc, x, "base")}, has_base, n,
        int(prefix), reinterpret_cast<unsigned long long*>(hist.mutable_data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return hist;
}

void philox_keep_mask_out_cuda(const at::Tensor& out, int64_t k0, int64_t k1, int64_t offset, int64_t drop_threshold) {
  const c10::cuda::CUDAGuard guard(out.device());
  TORCH_CHECK(out.scalar_type() == at::kBool && out.is_contiguous(), "weightops: out must be a contiguous bool tensor");
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold <= kDropOne && offset >= 0, "weightops: bad threshold or offset");
  const int64_t n = out.numel();
  if (n > 0) {
    philox_keep_kernel<<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        out.mutable_data_ptr<bool>(), n, uint32_t(k0), uint32_t(k1), uint64_t(offset), uint32_t(drop_threshold));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace weightops

TORCH_LIBRARY_IMPL(weightops, CUDA, m) {
  m.impl("delta_merge", &weightops::delta_merge_cuda);
  m.impl("weighted_sum", &weightops::weighted_sum_cuda);
  m.impl("abs_histogram", &weightops::abs_histogram_cuda);
  m.impl("philox_keep_mask_out", &weightops::philox_keep_mask_out_cuda);
}
