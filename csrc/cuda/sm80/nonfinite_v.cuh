// nonfinite_v.cuh: keys a row cannot see never reach it, even when their V holds inf or NaN.
//
// In P V a hidden key has weight 0, but 0 * inf = NaN. So a KV tile that hides some key from some row (the causal
// diagonal, a query-side mask: ScoreOperands::hides_keys) scans its V tile; in the rare case it finds inf / NaN it
// zeroes those elements and flags their slots, and a row that does give such a key a nonzero weight is marked
// poisoned, its out set to NaN by the epilogue, as the product would have made it (its lse is unaffected).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../nonfinite_bits.cuh"
#include "kernel_traits.h"

namespace dmattn::cuda::sm80 {

// Whether thread `tid`'s share of a tile of kVecs 16-byte vectors of 16-bit Elem in shared memory (vectors tid,
// tid + kThreads, ...: conflict-free) holds an inf or NaN: two elements per word tested at once (NonfiniteBits).
template <typename Elem, int kVecs, int kThreads>
__device__ __forceinline__ bool share_has_nonfinite(const void* tile, int tid) {
  constexpr NonfiniteBits kBits = NonfiniteBits::of(ElemTraits<Elem>::kExpBits);
  static_assert(kVecs % kThreads == 0, "the scan splits evenly over the threads");
  const uint4* vecs = reinterpret_cast<const uint4*>(tile);
  uint32_t tops = 0;
#pragma unroll 2  // two 16-byte reads in flight, a few registers: this runs beside O and S
  for (int i = 0; i < kVecs / kThreads; ++i) {
    const uint4 w = vecs[i * kThreads + tid];
    tops |= kBits.tops(w.x) | kBits.tops(w.y) | kBits.tops(w.z) | kBits.tops(w.w);
  }
  return NonfiniteBits::any(tops);
}

// Whether the (kBlockN, D) V tile in shared memory holds an inf or NaN; every thread scans an equal share and the
// answer is the CTA's vote.
template <typename Traits>
__device__ __forceinline__ bool tile_has_nonfinite(const typename Traits::Elem* tile) {
  constexpr int kVecs = Traits::kBlockN * Traits::kHeadDim / 8;  // 16-byte vectors in the tile
  return __syncthreads_or(share_has_nonfinite<typename Traits::Elem, kVecs, Traits::kThreads>(tile, threadIdx.x)) != 0;
}

// Rare path of tile_has_nonfinite: zeroes the inf / NaN elements of the V tile and flags their slots in v_bad.
template <typename Traits>
__device__ void zero_nonfinite_rows(typename Traits::Elem* tile, uint8_t* v_bad) {
  constexpr uint32_t kLo = ElemTraits<typename Traits::Elem>::kExpBits, kHi = kLo << 16;
  if (threadIdx.x >= Traits::kBlockN) return;
  const int slot = threadIdx.x;
  bool bad = false;
#pragma unroll 1
  for (int col = 0; col < Traits::kHeadDim; col += 2) {
    uint32_t& x = *reinterpret_cast<uint32_t*>(tile + Traits::template smem_offset<Traits::kBlockN>(slot, col));
    const uint32_t keep = ((x & kLo) == kLo ? 0u : 0xffffu) | ((x & kHi) == kHi ? 0u : 0xffff0000u);
    bad |= keep != 0xffffffffu;
    x &= keep;
  }
  v_bad[slot] = bad;
}

// After the softmax of a tile whose V was fixed: bit 2 mt + half of `poisoned` is set when this lane's share of that
// row gives a flagged slot a nonzero float32 weight (p: the probabilities, m16n8 fragments). Judged before P is
// rounded to Elem, as in a tile that needs no fixing, where 0 * NaN in the MMA makes even a weight that rounds to 0
// (say 2^-50 in float16) give NaN; only a weight of exactly 0 (a hidden key, or one far below the row max) does not.
template <int kMTiles, int kNTiles>
__device__ __forceinline__ void mark_poisoned_rows(const float (&p)[kMTiles][kNTiles][4], const uint8_t* v_bad, int t,
                                                   unsigned& poisoned) {
#pragma unroll
  for (int e = 0; e < kMTiles * kNTiles * 4; ++e) {
    const int mt = e / (kNTiles * 4), nt = (e / 4) % kNTiles, i = e % 4;
    if (v_bad[nt * 8 + 2 * t + i % 2] && p[mt][nt][i] > 0.f) poisoned |= 1u << (2 * mt + i / 2);
  }
}

// Whether row `bit` of mark_poisoned_rows is poisoned for this lane's row: the four lanes of a quad hold one row, and
// any of them may have seen it. Warp-wide (a ballot): call it before any lane leaves.
__device__ __forceinline__ bool quad_poisoned(unsigned poisoned_rows, int bit, int lane) {
  const unsigned poisoned = __ballot_sync(0xffffffffu, (poisoned_rows >> bit) & 1u);
  return ((poisoned >> (lane & ~3)) & 0xfu) != 0;
}

}  // namespace dmattn::cuda::sm80
