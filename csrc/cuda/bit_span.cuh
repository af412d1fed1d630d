// bit_span.cuh: a run of key positions as the bits of a 32-bit mask word, shared by the block map's pass
// (block_map.cu: each row's visible keys) and the sm90a kernel's query-side tiles (sm90a/fwd_kernel.cuh: each row's
// position limits), so that both cut a word the same way.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dmattn::cuda {

// The bits [lo, hi) of a 32-bit word, each bound clamped to [0, 32] (none where hi <= lo): a row's positions
// [low, limit) over the word of keys [base, base + 32), given low - base and limit - base.
__device__ __forceinline__ uint32_t shown_span(int lo, int hi) {
  // __funnelshift_lc(~0, 0, s): the high word of (0 : ~0) << min(s, 32), the s low bits set
  const uint32_t below_hi = __funnelshift_lc(~0u, 0u, static_cast<uint32_t>(hi > 0 ? hi : 0));
  const uint32_t below_lo = __funnelshift_lc(~0u, 0u, static_cast<uint32_t>(lo > 0 ? lo : 0));
  return below_hi & ~below_lo;
}

}  // namespace dmattn::cuda
