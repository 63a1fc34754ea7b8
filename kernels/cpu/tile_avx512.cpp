// Tile loops for AVX-512 CPUs, with the hand-vectorised Philox generator.
#if defined(__x86_64__)
#include <immintrin.h>

#include "tile.h"

#pragma GCC push_options
// GCC 12 flags _mm512_undefined_* inside its own intrinsic headers as maybe-uninitialized.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#define WO_ISA avx512
#define WO_ISA_NAME "avx512"
#define WO_TABLE_FN tile_kernels_avx512
#define WO_PHILOX_AVX512 1
#include "tile_impl.h"
#pragma GCC pop_options
#endif
