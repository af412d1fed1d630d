// tile_mma.cuh: the two products of the attention loop on the swizzled shared-memory tiles of kernel_traits.h, one
// code for the prefill and the decode kernel (which differ only in whose key rows a warp multiplies).
//   score_tile       S = Q K^T: the warp's Q rows (q_lane) against key rows 16 key16 + [0, 8 kNTiles) of a K tile
//   accumulate_pv    O += P V: those probabilities against the same key rows of a V tile
// q_lane / k_lane / v_lane: the lane's ldmatrix byte address of the first fragment (the kernels compute them).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_traits.h"
#include "warp_mma.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
__device__ __forceinline__ void score_tile(float (&s)[Traits::kMTiles][Traits::kNTiles][4], uint32_t q_lane,
                                           uint32_t k_lane, int key16) {
  constexpr int kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
  warp_mma<typename Traits::Mma, kMTiles, Traits::kHeadDim / 16, kNTiles / 2, Traits::kPrefetch, /*kAAhead=*/true>(
      s,
      [&](int kk, uint32_t(&a)[kMTiles][4]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          ldmatrix_x4(Traits::template smem_step<Traits::kBlockM>(q_lane, mt, kk * 16), a[mt]);
        }
      },
      [&](int kk, int j, uint32_t(&b)[4]) {
        ldmatrix_x4(Traits::template smem_step<Traits::kBlockN>(k_lane, key16 + j, kk * 16), b);
      });
}

// p: score_tile's fragments after the softmax; two n8 fragments of probabilities are the A operand of one k16 step.
template <typename Traits>
__device__ __forceinline__ void accumulate_pv(float (&o)[Traits::kMTiles][Traits::kDTiles][4],
                                              const float (&p)[Traits::kMTiles][Traits::kNTiles][4], uint32_t v_lane,
                                              int key16) {
  using Elem = typename Traits::Elem;
  constexpr int kMTiles = Traits::kMTiles;
  warp_mma<typename Traits::Mma, kMTiles, Traits::kNTiles / 2, Traits::kDTiles / 2, Traits::kPrefetch,
           /*kAAhead=*/false>(
      o,
      [&](int kk, uint32_t(&a)[kMTiles][4]) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          a[mt][0] = ElemTraits<Elem>::pack(p[mt][2 * kk][0], p[mt][2 * kk][1]);
          a[mt][1] = ElemTraits<Elem>::pack(p[mt][2 * kk][2], p[mt][2 * kk][3]);
          a[mt][2] = ElemTraits<Elem>::pack(p[mt][2 * kk + 1][0], p[mt][2 * kk + 1][1]);
          a[mt][3] = ElemTraits<Elem>::pack(p[mt][2 * kk + 1][2], p[mt][2 * kk + 1][3]);
        }
      },
      [&](int kk, int j, uint32_t(&b)[4]) {
        ldmatrix_x4_trans(Traits::template smem_step<Traits::kBlockN>(v_lane, key16 + kk, j * 16), b);
      });
}

}  // namespace dmattn::cuda::sm80
