// Tile loops for AVX2 CPUs (no FMA on purpose: products and sums round separately).
#if defined(__x86_64__)
#include "tile.h"

#pragma GCC push_options
#pragma GCC target("avx2")
#define WO_ISA avx2
#define WO_ISA_NAME "avx2"
#define WO_TABLE_FN tile_kernels_avx2
#include "tile_impl.h"
#pragma GCC pop_options
#endif
