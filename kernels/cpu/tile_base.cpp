// Tile loops at the baseline ISA of the build (SSE2 on x86-64).
#include "tile.h"

#define WO_ISA base
#define WO_ISA_NAME "baseline"
#define WO_TABLE_FN tile_kernels_base
#include "tile_impl.h"
