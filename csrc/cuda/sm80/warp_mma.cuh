// warp_mma.cuh: the one warp-level matrix product of the sm80 path, used for both S = Q K^T and O += P V.
//
// Atoms: mma.sync m16n8k16 (fp32 accumulators) fed by ldmatrix x4 from swizzled shared memory (kernel_traits.h).
// Accumulator element e of an m16n8 fragment sits at row g + 8 * (e / 2), column 2 * t + e % 2 (lane = 4 * g + t).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dmattn::cuda::sm80 {

// ldmatrix of four 8x8 matrices from shared memory, at a 32-bit shared-space byte address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename Mma>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Mma::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

// acc[mt][n] += A[mt] B over kKSteps k16 steps, for kMTiles m16 row fragments and 2 * kNPairs n8 column fragments.
//   load_a(kk, a)     the A fragments of k-step kk, uint32_t a[kMTiles][4]
//   load_b(kk, j, b)  the B fragments of k-step kk, n8 columns 2j and 2j + 1 (one ldmatrix x4), uint32_t b[4]
// Software-pipelined so that ldmatrix latency hides behind tensor-core work: the B fragments of the (kk, j) step
// kPrefetch steps ahead are loaded before the MMAs of the current step are issued; with kAAhead, A comes from shared
// memory too and the A fragments of k-step kk + 1 are loaded before the MMAs of kk (else load_a builds them from
// registers at the start of each k-step).
template <typename Mma, int kMTiles, int kKSteps, int kNPairs, int kPrefetch, bool kAAhead, typename LoadA,
          typename LoadB>
__device__ __forceinline__ void warp_mma(float (&acc)[kMTiles][2 * kNPairs][4], LoadA&& load_a, LoadB&& load_b) {
  constexpr int kSteps = kKSteps * kNPairs;
  uint32_t a[kAAhead ? 2 : 1][kMTiles][4];
  uint32_t b[kPrefetch + 1][4];
  if constexpr (kAAhead) load_a(0, a[0]);
#pragma unroll
  for (int i = 0; i < kPrefetch && i < kSteps; ++i) load_b(i / kNPairs, i % kNPairs, b[i]);
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk) {
    if constexpr (kAAhead) {
      if (kk + 1 < kKSteps) load_a(kk + 1, a[(kk + 1) % 2]);
    } else {
      load_a(kk, a[0]);
    }
    const uint32_t(&ak)[kMTiles][4] = a[kAAhead ? kk % 2 : 0];
#pragma unroll
    for (int j = 0; j < kNPairs; ++j) {
      const int i = kk * kNPairs + j, ahead = i + kPrefetch;
      if (ahead < kSteps) load_b(ahead / kNPairs, ahead % kNPairs, b[ahead % (kPrefetch + 1)]);
      const uint32_t(&bi)[4] = b[i % (kPrefetch + 1)];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        mma<Mma>(acc[mt][2 * j], ak[mt], bi[0], bi[1]);
        mma<Mma>(acc[mt][2 * j + 1], ak[mt], bi[2], bi[3]);
      }
    }
  }
}

}  // namespace dmattn::cuda::sm80
