// block_map.cu: a query-side mask -> its block summary (passes.h, BlockMap), read once at the start of a call so the
// prefill kernel skips the tiles it hides whole and runs the tiles it shows whole without reading it.
#include <cuda_runtime.h>

#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kMapWarps = 8;
constexpr int kMapThreads = kMapWarps * 32;
static_assert(BlockMap::kCols == 32, "a warp's lanes are the key positions of one block");

// Grid (row blocks, chunks of kMapWarps key blocks, mask heads); a CTA takes every gridDim.y-th chunk. Lane l of
// warp w walks the kRows rows of its row block at key position (chunk * kMapWarps + w) * kCols + l, so a warp's loads
// are one row's 32 consecutive bytes; the warp's votes are its block's state. No shared memory, no barrier.
__global__ void __launch_bounds__(kMapThreads)
block_map_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ BlockMap map) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rb = blockIdx.x;
  const int hm = blockIdx.z;
  const int64_t row0 = rb * BlockMap::kRows;
  const int64_t rows = min(static_cast<int64_t>(BlockMap::kRows), p.total_q - row0);
  const int64_t extent = BlockMap::key_extent(p);
  const int h = hm * p.mask.head_group;  // any query head of mask head hm reads the same elements
  uint8_t* line = map.state + (static_cast<int64_t>(hm) * map.row_blocks + rb) * map.col_blocks;
  for (int64_t cb = static_cast<int64_t>(blockIdx.y) * kMapWarps + warp; cb < map.col_blocks;
       cb += static_cast<int64_t>(gridDim.y) * kMapWarps) {  // a whole warp's condition: its votes stay converged
    const int64_t j = cb * BlockMap::kCols + lane;
    bool some_true = false, some_false = false;
    if (j < extent) {
      for (int64_t r = 0; r < rows; ++r) {
        const bool keep = p.mask.mask_allows(p.mask.offset(row0 + r, h, j));
        some_true |= keep;
        some_false |= !keep;
      }
    }
    const bool any_true = __any_sync(0xffffffffu, some_true), any_false = __any_sync(0xffffffffu, some_false);
    if (lane == 0) line[cb] = (any_true ? BlockMap::kSomeTrue : 0) | (any_false ? BlockMap::kSomeFalse : 0);
  }
}

}  // namespace

cudaError_t build_block_map(const VarlenFwdParams& p, const BlockMap& map, cudaStream_t stream) {
  if (map.state == nullptr || map.row_blocks == 0 || map.col_blocks == 0 || map.mask_heads == 0) return cudaSuccess;
  const int64_t chunks = (map.col_blocks + kMapWarps - 1) / kMapWarps;
  const dim3 grid(map.row_blocks, static_cast<unsigned>(chunks < 65535 ? chunks : 65535), map.mask_heads);
  block_map_kernel<<<grid, kMapThreads, 0, stream>>>(p, map);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
