// delta_kernel.cuh: the backward's first pass, delta = rowsum(dout * out) - dlse per (query row, head), float32.
//
// It is the softmax's backward term that every dS = P (dP - delta) of the row needs: d loss / d score_j = P_j (dP_j
// - sum_k P_k dP_k) + P_j dlse, and sum_k P_k dP_k = dout . out. One warp per (row, head), every row of q (rows no
// sequence owns included: their P is 0 wherever they are read), so the pass needs no sequence bounds.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "bwd_traits.h"

namespace dmattn::cuda::bwd {

constexpr int kDeltaWarps = 8;  // warps per block of delta_kernel

// A 16-bit element as float32 (torch builds the hand-written .cu files with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so there is no implicit conversion).
__device__ __forceinline__ float as_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float as_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename Traits>
__global__ void __launch_bounds__(kDeltaWarps * 32) delta_kernel(const __grid_constant__ BwdParams p) {
  using Elem = typename Traits::Elem;
  constexpr int kPerLane = Traits::kHeadDim / 32;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kDeltaWarps + threadIdx.x / 32;  // row * H + h
  if (item >= p.f.total_q * p.f.num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t row = item / p.f.num_heads, h = item % p.f.num_heads;
  const Elem* o = static_cast<const Elem*>(p.f.out) + row * p.f.out_row_stride + h * p.f.out_head_stride;
  const Elem* d = static_cast<const Elem*>(p.dout) + row * p.dout_row_stride + h * p.dout_head_stride;
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int col = lane + 32 * e;  // consecutive lanes read consecutive elements
    acc = fmaf(as_float(o[col]), as_float(d[col]), acc);
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  if (lane == 0) {
    const int64_t at = h * p.f.total_q + row;
    p.delta[at] = p.dlse != nullptr ? acc - p.dlse[at] : acc;
  }
}

}  // namespace dmattn::cuda::bwd
