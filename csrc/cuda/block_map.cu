// block_map.cu: a query-side mask -> its block summary (passes.h, BlockMap), read once at the start of a call so the
// prefill kernel skips the tiles it hides whole and runs the tiles it shows whole without reading it.
#include <cuda_runtime.h>

#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kMapWarps = 8;
constexpr int kMapThreads = kMapWarps * 32;
static_assert(BlockMap::kCols == 32, "a warp's lanes are the key positions of one block");

// Grid (row blocks, chunks of kMapWarps key blocks, mask heads). Lane l of warp w walks the kRows rows of its row
// block at key position (chunk * kMapWarps + w) * kCols + l, so a warp's loads are one row's 32 consecutive bytes;
// the warp's votes are its block's state. No shared memory, no barrier.
__global__ void __launch_bounds__(kMapThreads)
block_map_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ BlockMap map) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t rb = blockIdx.x;
  const int cb = blockIdx.y * kMapWarps + warp, hm = blockIdx.z;
  if (cb >= map.col_blocks) return;  // a whole warp: no lane of it votes below
  const int64_t j = static_cast<int64_t>(cb) * BlockMap::kCols + lane;
  const int64_t row0 = rb * BlockMap::kRows;
  const int64_t rows = min(static_cast<int64_t>(BlockMap::kRows), p.total_q - row0);
  const int h = hm * p.mask.head_group;  // any query head of mask head hm reads the same elements
  bool some_true = false, some_false = false;
  if (j < p.max_seqlen_k) {
    for (int64_t r = 0; r < rows; ++r) {
      const bool keep = p.mask.mask_allows(p.mask.offset(row0 + r, h, j));
      some_true |= keep;
      some_false |= !keep;
    }
  }
  const bool any_true = __any_sync(0xffffffffu, some_true), any_false = __any_sync(0xffffffffu, some_false);
  if (lane == 0) {
    map.state[(static_cast<int64_t>(hm) * map.row_blocks + rb) * map.col_blocks + cb] =
        (any_true ? BlockMap::kSomeTrue : 0) | (any_false ? BlockMap::kSomeFalse : 0);
  }
}

}  // namespace

cudaError_t build_block_map(const VarlenFwdParams& p, const BlockMap& map, cudaStream_t stream) {
  if (map.state == nullptr || map.row_blocks == 0 || map.col_blocks == 0 || map.mask_heads == 0) return cudaSuccess;
  const dim3 grid(map.row_blocks, (map.col_blocks + kMapWarps - 1) / kMapWarps, map.mask_heads);
  block_map_kernel<<<grid, kMapThreads, 0, stream>>>(p, map);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
