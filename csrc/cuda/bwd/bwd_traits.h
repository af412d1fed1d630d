// bwd_traits.h: the fused backward's parameters and the compile-time shape of its two kernels (bwd/README below).
//
// The fused backward is FlashAttention-2's recomputation split into two deterministic kernels that never hold a
// (total_q x max_seqlen_k) intermediate and, by default, use no atomics:
//   dkdv_kernel.cuh   a CTA per (key tile, KV head, sequence): walks the query heads of its KV group and their query
//                     tiles, recomputes S^T = K Q^T and P^T from the forward's lse, dP^T = V dO^T, and accumulates
//                     dV = P^T dO and dK = dS^T Q in registers; the key-side bias gradient (dS summed over the
//                     queries) per key and query head
//   dq_kernel.cuh     a CTA per (query tile, query head, sequence): walks the key tiles its rows can see and
//                     accumulates dQ = dS K
// with dS = P (dP - delta), delta = rowsum(dO * O) - dlse (delta_kernel.cuh, one float per row and head). The fast
// path (BwdParams::dq_accum set: DMATTN_BWD_DQ=atomic outside torch's deterministic mode) runs no dq_kernel:
// dkdv_kernel also adds dS K of each (key tile, query tile) into a float32 dQ with atomics. It is not the default: on
// the H200 it measured no faster (benchmarks/results/NOTES.md, run AK).
// A key-side mask that every query head of a KV group reads the same way (Hm divides Hk) is first compacted into
// kept-key lists (compact_keys, ../passes.h; BwdParams::keys): then a "key tile" is 64 consecutive slots of a list,
// K / V rows gathered, so the keys the mask removes cost nothing (key slots, as in the forward's tile_scheduler.cuh).
// Both kernels are the sm80 path's mma.sync / ldmatrix / cp.async code (../sm80/tile_mma.cuh, kv_tiles.cuh): 64 x 64
// tiles, 4 warps of 16 rows, so the forward's score_tile / accumulate_pv serve every product (the tile that is the
// A operand is "the query tile" there, the B operand "the KV tile").
#pragma once

#include <cstddef>
#include <cstdint>

#include "../sm80/kernel_traits.h"
#include "bwd_params.h"

namespace dmattn::cuda::bwd {

template <typename Elem_, int kHeadDim_>
struct BwdTraits : sm80::SwizzledTiles<kHeadDim_> {
  using Elem = Elem_;
  using Mma = typename sm80::ElemTraits<Elem>::Mma;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 64;  // rows of the A-operand tile (keys in dkdv_kernel, queries in dq_kernel)
  static constexpr int kBlockN = 64;  // rows of the B-operand tile
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = 1;                     // m16 fragments per warp: 16 rows
  static constexpr int kNTiles = kBlockN / 8;           // n8 score fragments of a tile
  static constexpr int kDTiles = kHeadDim / 8;          // n8 fragments of a gradient row
  static constexpr int kChunksPerRow = kHeadDim / 8;    // 16-byte chunks per row
  static constexpr int kPrefetch = 2;
  static constexpr int kTileElems = kBlockM * kHeadDim;

  static_assert(kBlockM == kBlockN, "the same smem_step serves both operands of every product");
  static_assert(kBlockM == 16 * kWarps * kMTiles, "each warp owns 16 rows of the A tile");
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the fused backward is built for head dims 64 and 128");

  // The A-operand tile stays for the whole CTA; the two B-operand tiles are double-buffered, with each row's (or
  // key's) metadata beside them.
  struct alignas(128) SharedStorage {
    Elem a0[kTileElems];     // dkdv: sK (keys, D);  dq: sQ (queries, D)
    Elem a1[kTileElems];     // dkdv: sV;            dq: sdO
    Elem b0[2][kTileElems];  // dkdv: sQ per query tile;  dq: sK per key tile
    Elem b1[2][kTileElems];  // dkdv: sdO;                dq: sV
    // dkdv with dq_accum: dS^T (keys, queries) of the current tile, for dQ += dS K. Kept among the tiles: ldmatrix
    // reads it, so it must start 16-byte aligned, which an array after the metadata below would not.
    Elem ds[kBlockM * kBlockN];
    // dkdv: per query row of a tile: its visible key positions [low, limit), lse * log2(e) (+inf for a row that saw
    // nothing, so its P is 0), delta. dq: per key of a tile: visible (in the sequence and kept by the mask) in low,
    // its key-side bias * log2(e) in lse2.
    int32_t low[2][kBlockN];
    int32_t limit[2][kBlockN];
    float lse2[2][kBlockN];
    float delta[2][kBlockN];
    int32_t pos[2][kBlockN];  // key positions of the tile's slots (INT_MAX past the last): dkdv pos[0], dq per buffer
    int32_t span[2];  // dq: the smallest low and the largest limit of the tile's rows
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(offsetof(SharedStorage, ds) % 16 == 0, "ldmatrix reads sdS by 16-byte rows");
};

}  // namespace dmattn::cuda::bwd
