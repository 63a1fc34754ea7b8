// Element type codes shared by the CPU and CUDA kernels.
#pragma once

namespace weightops {
enum : int { kF32 = 0, kBF16 = 1, kF16 = 2 };
}  // namespace weightops
