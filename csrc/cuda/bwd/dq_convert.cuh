// dq_convert.cuh: dQ from the sm90a backward's float32 tiles (BwdParams::dq_tiles): dq = dq_accum x the softmax
// scale, in q's dtype, every element of (total_q, H, D), with DqTiles' permutation of each row undone.
//
// A thread per 16-byte chunk of dq_accum, in dq_accum's order (a warp reads 512 contiguous bytes: two rows of a
// column block), writing the chunk's two column pairs (16 j + 2 t, + 1 and 16 j + 8 + 2 t, + 1) as two 16-bit
// pairs; a row's 16 chunks cover its 64 columns, 128 contiguous bytes of dq. Rows no sequence owns and rows the
// kernel never added to hold the zeros the binding filled dq_accum with, so dq needs no zero fill.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../sm80/kernel_traits.h"
#include "bwd_params.h"

namespace dmattn::cuda::bwd {

constexpr int kDqConvertThreads = 256;

template <typename Elem, int kHeadDim>
__global__ void __launch_bounds__(kDqConvertThreads) dq_convert_kernel(const __grid_constant__ BwdParams p) {
  constexpr int kBlocks = kHeadDim / DqTiles::kCols, kChunks = DqTiles::kCols / 4;
  const int64_t total_q = p.f.total_q, heads = p.f.num_heads, chunks = total_q * kChunks;
  const float scale = p.f.softmax_scale;
  // grid.y strides over (head, column block) pairs, grid.x over one pair's chunks: no division by a runtime value
  for (int64_t hb = blockIdx.y; hb < heads * kBlocks; hb += gridDim.y) {
    const int64_t h = hb / kBlocks;
    const int cb = static_cast<int>(hb % kBlocks);
    const float* src = p.dq_accum + DqTiles::offset(h, cb, 0, kBlocks, total_q);
    Elem* dst0 = static_cast<Elem*>(p.dq) + h * kHeadDim + cb * DqTiles::kCols;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * kDqConvertThreads + threadIdx.x; i < chunks;
         i += static_cast<int64_t>(gridDim.x) * kDqConvertThreads) {
      const int64_t row = i / kChunks;
      const int chunk = static_cast<int>(i % kChunks);
      const float4 v = *reinterpret_cast<const float4*>(src + 4 * i);
      const int c = DqTiles::column(4 * chunk, row);  // the chunk holds columns c, c + 1, c + 8, c + 9
      Elem* dst = dst0 + row * heads * kHeadDim + c;
      *reinterpret_cast<uint32_t*>(dst) = sm80::ElemTraits<Elem>::pack(v.x * scale, v.y * scale);
      *reinterpret_cast<uint32_t*>(dst + 8) = sm80::ElemTraits<Elem>::pack(v.z * scale, v.w * scale);
    }
  }
}

// dq from dq_accum's tiles on `stream` (grid-stride in both dimensions: at most ~65,536 blocks).
template <typename Elem, int kHeadDim>
cudaError_t launch_dq_convert(const BwdParams& p, cudaStream_t stream) {
  if (p.dq == nullptr || p.dq_accum == nullptr) return cudaErrorInvalidValue;
  const int64_t pairs = static_cast<int64_t>(p.f.num_heads) * (kHeadDim / DqTiles::kCols);
  const int64_t per_pair = (p.f.total_q * (DqTiles::kCols / 4) + kDqConvertThreads - 1) / kDqConvertThreads;
  if (pairs == 0 || per_pair == 0) return cudaSuccess;
  constexpr int64_t kMaxBlocks = 65536, kMaxGridY = 65535;
  const int64_t y = std::min(pairs, kMaxGridY);
  const int64_t x = std::min(per_pair, std::max<int64_t>(1, kMaxBlocks / y));
  dq_convert_kernel<Elem, kHeadDim>
      <<<dim3(static_cast<unsigned>(x), static_cast<unsigned>(y)), kDqConvertThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda::bwd
