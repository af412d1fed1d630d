// epilogue.cuh: a query tile's results to global memory: out = O / l (16-bit) and lse = max + ln l (float32).
//
// A row that saw no key gets out = 0 and lse = -inf (its head's sink, with sinks); a row with a +inf / NaN score (l
// is NaN) gets NaN in both; a poisoned row (nonfinite_v.cuh) gets NaN in out and keeps its lse (finish_row).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "kernel_traits.h"
#include "nonfinite_v.cuh"
#include "online_softmax.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
__device__ __forceinline__ void store_tile(const VarlenFwdParams& p, const TileContext& c,
                                           const float (&o)[Traits::kMTiles][Traits::kDTiles][4],
                                           const OnlineSoftmax<Traits::kMTiles, Traits::kNTiles>& softmax,
                                           unsigned poisoned_rows, int warp_row0, int lane) {
  using Elem = typename Traits::Elem;
  const int g = lane / 4, t = lane % 4;
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int mt = 0; mt < Traits::kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = softmax.row_total(mt, half);
      const bool poisoned = quad_poisoned(poisoned_rows, 2 * mt + half, lane);  // before any lane leaves
      const int r = warp_row0 + mt * 16 + g + half * 8;
      if (r >= c.rows) continue;
      const int64_t row = static_cast<int64_t>(c.q_start) + c.m0 + r;
      const RowEnd end = finish_row(softmax.row_max[mt][half], l, poisoned, p.sink(c.h));
      const float inv = end.inv;
      Elem* dst = out + row * p.out_row_stride + static_cast<int64_t>(c.h) * p.out_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < Traits::kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(dst + dt * 8) =
            ElemTraits<Elem>::pack(o[mt][dt][2 * half] * inv, o[mt][dt][2 * half + 1] * inv);
      }
      if (t == 0) {
        p.lse[static_cast<int64_t>(c.h) * p.total_q + row] = end.lse;
      }
    }
  }
}

}  // namespace dmattn::cuda::sm80
