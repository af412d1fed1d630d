// delta_kernel.cuh: the backward's first pass, delta = rowsum(dout * out) - dlse per (query row, head), float32.
//
// It is the softmax's backward term that every dS = P (dP - delta) of the row needs: d loss / d score_j = P_j (dP_j
// - sum_k P_k dP_k) + P_j dlse, and sum_k P_k dP_k = dout . out. kDeltaLanes<D> lanes per (row, head), each reading 16
// bytes of out and of dout (a warp covers two rows of heads at D = 128, four at D = 64: one 2-byte load per lane and
// element ran at ~60% of the copy bandwidth), every row of q (rows no sequence owns included: their P is 0 wherever
// they are read), so the pass needs no sequence bounds. A row whose out or dout is not 16-byte aligned (a view of odd
// strides) reads element by element. Where BwdParams::row_stats is set (the sm90a backward's bulk copies, RowStatsTma)
// it also writes the row's lse in base 2 and its delta there.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bwd_common.cuh"
#include "bwd_traits.h"

namespace dmattn::cuda::bwd {

constexpr int kDeltaWarps = 8;  // warps per block of delta_kernel
// Lanes per (row, head) item: a 16-byte vector of 16-bit elements each.
template <int kHeadDim>
constexpr int kDeltaLanes = kHeadDim / 8;
// (row, head) items per block of delta_kernel.
template <int kHeadDim>
constexpr int kDeltaItemsPerBlock = kDeltaWarps * (32 / kDeltaLanes<kHeadDim>);

// A 16-bit element as float32 (torch builds the hand-written .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so there is no implicit conversion).
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Traits>
__global__ void __launch_bounds__(kDeltaWarps * 32) delta_kernel(const __grid_constant__ BwdParams p) {
  using Elem = typename Traits::Elem;
  static_assert(sizeof(Elem) == 2, "16-bit elements: eight to a 16-byte vector");
  constexpr int kLanes = kDeltaLanes<Traits::kHeadDim>;
  static_assert(kLanes <= 32 && 32 % kLanes == 0, "a warp holds whole items");
  const int lane = threadIdx.x % 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kDeltaItemsPerBlock<Traits::kHeadDim> +
                       (threadIdx.x / 32) * (32 / kLanes) + lane / kLanes;  // row * H + h
  const bool live = item < p.f.total_q * p.f.num_heads;
  float acc = 0.f;
  if (live) {
    const int64_t row = item / p.f.num_heads, h = item % p.f.num_heads;
    const int col = (lane % kLanes) * 8;  // this lane's 8 consecutive elements
    const Elem* o = static_cast<const Elem*>(p.f.out) + row * p.f.out_row_stride + h * p.f.out_head_stride + col;
    const Elem* d = static_cast<const Elem*>(p.dout) + row * p.dout_row_stride + h * p.dout_head_stride + col;
    if (((reinterpret_cast<uintptr_t>(o) | reinterpret_cast<uintptr_t>(d)) & 15) == 0) {
      const uint4 ov = *reinterpret_cast<const uint4*>(o), dv = *reinterpret_cast<const uint4*>(d);
      const Elem* oe = reinterpret_cast<const Elem*>(&ov);
      const Elem* de = reinterpret_cast<const Elem*>(&dv);
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = fmaf(as_float(oe[e]), as_float(de[e]), acc);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) acc = fmaf(as_float(o[e]), as_float(d[e]), acc);
    }
  }
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (live && lane % kLanes == 0) {
    const int64_t row = item / p.f.num_heads, h = item % p.f.num_heads;
    const int64_t at = h * p.f.total_q + row;
    const float delta = p.dlse != nullptr ? acc - p.dlse[at] : acc;
    p.delta[at] = delta;
    if (p.row_stats != nullptr) {  // row_info's rule: lse -inf (the row saw no key) becomes lse2 = +inf
      const float lse = p.f.lse[at];
      float* stats = p.row_stats + h * p.row_stats_stride + row;
      stats[0] = lse != -INFINITY ? lse * kLog2e : INFINITY;
      stats[p.f.num_heads * p.row_stats_stride] = delta;
    }
  }
}

}  // namespace dmattn::cuda::bwd
