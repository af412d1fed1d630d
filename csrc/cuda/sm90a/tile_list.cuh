// tile_list.cuh: a kQuery unit's list of live KV tiles (fwd_kernel.cuh): what each entry tells the consumers
// (TileEntry) and how the producer warpgroup builds the list from the block map (list_live_tiles).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../heuristics.h"
#include "../passes.h"
#include "unit_work.cuh"
#include "warpgroups.cuh"

namespace dmattn::cuda::sm90a {

// kQuery: one live KV tile of a unit in its list (shared memory, built by the producer warpgroup from the block map
// before the unit's Q is armed): the tile's number and what its consumers must do on it.
struct TileEntry {
  static constexpr uint16_t kTileBits = 0x0fff;  // the tile's number: below FwdTraits::kListTiles
  static constexpr uint16_t kLimits = 1u << 12;  // some row's position limits hide keys of it (the causal diagonal,
                                                 // a window's edges, the sequence's end)
  static constexpr uint16_t kMasked = 1u << 13;  // the mask hides keys of it: read the rows' bits
  static constexpr uint16_t kCheckV = 1u << 14;  // it hides keys and its V rows may hold an inf / NaN: scan them
  static_assert(2 * kSm90aQueryMaxTiles <= kTileBits + 1, "a tile's number fits its bits (64-key tiles: twice)");
};

// kQuery: the unit's live tiles in [w.n_begin, w.n_end), ascending, into list, and their count into *len; the 128
// threads of the producer warpgroup each take a tile per step. A tile is live where the block map sees some True in
// it for the unit's rows; it is masked where the map sees some False; it needs its V scanned where it hides keys
// unless v's flags show its rows finite. Without a map (a query-side bias alone) every tile is live and none masked.
// kQueryBias: a -inf bias element hides its key, so every tile may hide keys (the V scan, unless v's flags show its
// rows finite). kKeyMask: the map may be a key-side mask's, by sequence (heuristics.h sm90a_query_key_mask); the
// other kernels never read map.by_sequence. Ends with the warpgroup's barrier: the list is written.
template <int kBlockM, int kBlockN, bool kQueryBias, bool kKeyMask>
__device__ __forceinline__ void list_live_tiles(const VarlenFwdParams& p, const BlockMap& map, const UnitWork& w,
                                                uint16_t* list, int32_t* len, int32_t* warp_counts) {
  // A tile's map block columns: 4 (128 keys), or 2 at D = 256 (64 keys), from a multiple of them.
  constexpr int kTileCols = kBlockN / BlockMap::kCols;
  static_assert(kBlockM == 2 * BlockMap::kRows && kBlockN % BlockMap::kCols == 0 && kTileCols <= 4,
                "a unit's tile: at most 3 x 4 map blocks");
  __syncwarp();  // warp 0 may come from its own branch of the last unit (its leader issued the copies): whole again
  const int ptid = threadIdx.x, lane = ptid % 32, warp = ptid / 32;
  // The map blocks of the unit's packed rows (at most three: 128 rows from any row) and mask head. Read here rather
  // than by BlockMap::covering_tile (64 rows, any key span): two of those loaded 20 blocks per tile, where a tile of
  // 128 keys from a multiple of 128 spans 4 block columns, and spilled the producer's registers.
  // A key-side mask (beside a query-side bias, or at D = 256 ungathered) is mapped by sequence: one row of blocks, the
  // sequence's segment or stride (BlockMap::sequence_row, once per unit; the blocks of tile n, below the sequence's
  // tiles, lie in it).
  const bool by_sequence = kKeyMask && map.by_sequence;
  const int64_t rb0 = (w.sq.start + w.m0) / BlockMap::kRows;
  const int row_blocks =
      by_sequence ? 1 : static_cast<int>((w.sq.start + w.m0 + w.rows - 1) / BlockMap::kRows - rb0) + 1;
  // A map comes with every mask (the plan's sm90a_query_supports); a query-side bias alone has none.
  const bool mapped = !kQueryBias || p.mask.present();
  const uint8_t* lines = nullptr;
  if (mapped) {
    const int hm = w.h / p.mask.head_group;
    lines = map.state + (by_sequence ? map.sequence_row(hm, w.b, w.k_start)
                                     : (static_cast<int64_t>(hm) * map.row_blocks + rb0) * map.col_blocks);
  }
  int total = 0;
#pragma unroll 1
  for (int n0 = w.n_begin; n0 < w.n_end; n0 += 128) {  // the same bound for every thread: the barriers below
    const int n = n0 + ptid;
    bool live = false;
    uint16_t entry = 0;
    if (n < w.n_end) {
      const int j0 = n * kBlockN;  // n < n_end: j0 < k_len; the tile's blocks are [kTileCols n, last]
      const int last = (min(j0 + kBlockN, w.k_len) - 1) / BlockMap::kCols;
      uint8_t state = BlockMap::kSomeTrue;  // no mask: every key shown
      if (mapped) {
        state = 0;
#pragma unroll
        for (int r = 0; r < 3; ++r)
#pragma unroll
          for (int c = 0; c < kTileCols; ++c) {
            if (r < row_blocks && kTileCols * n + c <= last) state |= lines[r * map.col_blocks + kTileCols * n + c];
          }
      }
      live = (state & BlockMap::kSomeTrue) != 0;
      const bool limits = n < w.whole_begin || n >= w.whole_end;
      const bool masked = (state & BlockMap::kSomeFalse) != 0;
      bool check_v = limits || masked || kQueryBias;
      if (check_v && map.v_nonfinite != nullptr) {  // the v blocks of the rows TMA reads (zero past total_k)
        const int64_t first = w.k_start + j0, last = min(first + kBlockN, p.total_k) - 1;
        const uint8_t* line = map.v_nonfinite + static_cast<int64_t>(w.hk) * map.v_blocks;
        uint8_t bad = 0;
        for (int64_t b = first / BlockMap::kVRows; b <= last / BlockMap::kVRows; ++b) bad |= line[b];
        check_v = bad != 0;
      }
      entry = static_cast<uint16_t>(n) | (limits ? TileEntry::kLimits : 0) | (masked ? TileEntry::kMasked : 0) |
              (check_v ? TileEntry::kCheckV : 0);
    }
    const unsigned votes = __ballot_sync(0xffffffffu, live);
    if (lane == 0) warp_counts[warp] = __popc(votes);
    asm volatile("bar.sync %0, %1;" ::"r"(kProducerBarrier), "r"(128) : "memory");
    int at = total + __popc(votes & ((1u << lane) - 1));
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      if (v < warp) at += warp_counts[v];
      total += warp_counts[v];
    }
    if (live) list[at] = entry;
    asm volatile("bar.sync %0, %1;" ::"r"(kProducerBarrier), "r"(128) : "memory");  // counts read: the next step's
  }
  if (ptid == 0) *len = total;
  asm volatile("bar.sync %0, %1;" ::"r"(kProducerBarrier), "r"(128) : "memory");  // the list and its length written
}

}  // namespace dmattn::cuda::sm90a
