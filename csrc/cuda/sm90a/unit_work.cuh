// unit_work.cuh: the sm90a forward's work units (fwd_kernel.cuh): which units a launch covers (UnitGrid), where a
// kSlots launch's kept-key lists are (SlotLists), and what both roles know of one unit (UnitWork: its sequence, head,
// rows and KV tiles, from unit_work), with the key ranges of a kRanged unit's rows reduced to tile bounds (TileKeys).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include <cutlass/fast_math.h>

#include "../../varlen_fwd_params.h"
#include "../passes.h"

namespace dmattn::cuda::sm90a {

// The keys the rows of a kRanged CTA see, as tile bounds: every row's interval (row_keys: window and key_range) lies
// in [lowest, highest); a tile inside [inner_begin, inner_end) is seen whole by every row (empty when some row's
// interval is empty or the intervals do not overlap).
struct TileKeys {
  int lowest, highest, inner_begin, inner_end;
};

// TileKeys of the tile's query rows [m0, m0 + rows) of sequence (sq, k_len): the producer warpgroup's 128 threads
// take a row each and reduce over their warp; each warp leaves its four bounds in part[warp] for the CTA to combine
// after the next __syncthreads (combine_tile_keys). Rows past the tile take no part.
__device__ __forceinline__ void reduce_tile_keys(const VarlenFwdParams& p, const SeqRange& sq, int k_len, int m0,
                                                 int rows, int (*part)[4]) {
  const int r = threadIdx.x;  // < 128
  int lo = INT_MAX, hi = INT_MIN, in_lo = INT_MIN, in_hi = INT_MAX;
  if (r < rows) {
    const int i = m0 + r;
    const KeyRange keys = row_keys(p, sq.start + i, i, sq.len, k_len);
    if (keys.end > keys.begin) {
      lo = static_cast<int>(keys.begin);
      hi = static_cast<int>(keys.end);
      in_lo = lo;
      in_hi = hi;
    } else {
      in_lo = INT_MAX;  // a row that sees nothing: no tile is seen whole
    }
  }
  lo = __reduce_min_sync(0xffffffffu, lo);
  hi = __reduce_max_sync(0xffffffffu, hi);
  in_lo = __reduce_max_sync(0xffffffffu, in_lo);
  in_hi = __reduce_min_sync(0xffffffffu, in_hi);
  if (r % 32 == 0) {
    int* w = part[r / 32];
    w[0] = lo;
    w[1] = hi;
    w[2] = in_lo;
    w[3] = in_hi;
  }
}

__device__ __forceinline__ TileKeys combine_tile_keys(const int (*part)[4]) {
  TileKeys t{INT_MAX, INT_MIN, INT_MIN, INT_MAX};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    t.lowest = min(t.lowest, part[w][0]);
    t.highest = max(t.highest, part[w][1]);
    t.inner_begin = max(t.inner_begin, part[w][2]);
    t.inner_end = min(t.inner_end, part[w][3]);
  }
  return t;
}

// Which work units (query tile, query head, sequence) a launch covers: the sequences [seq0, seq0 + seqs), each cut
// into tiles of kBlockM rows, every head. A CTA per unit: grid (query_tiles, heads, seqs), query_tiles the longest
// sequence's; persistent (kPersistent, at most kUnitTableSeqs sequences): a grid of fewer CTAs, each walking units
// blockIdx.x, blockIdx.x + gridDim.x, ... of the sequences' own tiles (fwd_kernel: the unit table).
struct UnitGrid {
  int32_t seq0, seqs, query_tiles;
  cutlass::FastDivmod heads;  // persistent: p.num_heads (a unit number's head and query tile without a division)
  // kDynamic: the launch's unit counter (zero at the launch; each CTA's first unit is its blockIdx.x, its next ones
  // gridDim.x + the counter's old value), and the sections' size in key rows x KV heads (launch.cuh, section_keys;
  // INT32_MAX for windows: a section is a whole sequence's heads)
  uint32_t* next_unit = nullptr;
  int32_t section_keys = 0;
#if DMATTN_UNIT_STAMPS
  unsigned long long* stamps = nullptr;  // the measuring build's records (unit_stamps.cuh), or null
#endif
};

// kSlots: where the kept keys' lists and gathered operands are (passes.h KeyLists, KeptRows; null otherwise). Query
// head h reads list h / heads_per_list and bias head h / bias_group; a KV tile's positions and biases are copied into
// shared memory with its K (one bulk copy each, on K's full barrier).
struct SlotLists {
  const int32_t* count = nullptr;   // (B, mask_heads): KeyLists::count
  const int32_t* pos = nullptr;     // (mask_heads, extent): KeptRows::pos
  const float* bias = nullptr;      // (H / bias_group, extent) float32 per slot, or null
  const int32_t* limits = nullptr;  // causal / windowed: (mask_heads, B, query_tiles, 4) slot counts, or null
  int64_t extent = 0;
  int32_t mask_heads = 0, heads_per_list = 1, bias_group = 1, query_tiles = 0;
  // K / V's TMA views: heads, and whether a unit reads its list's head (a kept copy per list: lists finer than KV
  // heads) rather than its KV head.
  int32_t kv_heads = 0;
  bool kv_per_list = false;
};

// What both roles know of one unit: its sequence, head and rows, and its KV tiles: [n_begin, n_end) hold every key
// some row sees, tiles in [whole_begin, whole_end) are seen whole by every row (the others are limited per element).
struct UnitWork {
  SeqRange sq;
  int64_t k_start;
  int b, q_len, k_len, h, hk, m_block, m0, rows;
  int n_begin, n_end, whole_begin, whole_end;
  int kept, list;  // kSlots: the unit's kept keys (slots) and its list head
  int64_t seg;     // kSlots: its sequence's segment in the slot positions and biases (KeptRows::segment)
};

// The work of the unit of query tile m_block, head h and sequence seq0 + z. Plain: from key 0 to the causal limit of
// the last row, whole up to the first row's. kRanged: the rows' intervals (row_keys) rise with the row, so the first
// and last rows bound them (visible_keys); with key_range they are reduced over the rows (reduce_tile_keys, a CTA per
// unit) and read from tile_keys. kSlots (no key ranges): in slots of the unit's list, from the gather's limits.
// seq_rows (persistent CTAs): each sequence's clamped query and key ranges, read once per CTA into shared memory
// ({q start, q len, k start, k len}: the sm90a path's totals fit in int32), else read from cu_seqlens here.
template <int kBlockM, int kBlockN, bool kRanged, bool kSlots = false>
__device__ __forceinline__ UnitWork unit_work(const VarlenFwdParams& p, const UnitGrid& grid, int m_block, int h,
                                              int z, const int (*tile_keys)[4], const SlotLists& slots = {},
                                              const int32_t (*seq_rows)[4] = nullptr) {
  UnitWork w;
  const int b = grid.seq0 + z;
  w.h = h;
  w.hk = w.h / (p.num_heads / p.num_heads_k);
  SeqRange sk;
  if (seq_rows != nullptr) {
    w.sq = SeqRange{seq_rows[z][0], seq_rows[z][1]};
    sk = SeqRange{seq_rows[z][2], seq_rows[z][3]};
  } else {
    w.sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
    sk = key_seq(p, b);
  }
  w.k_start = sk.start;
  w.b = b;
  w.q_len = static_cast<int>(w.sq.len);
  w.k_len = static_cast<int>(sk.len);
  w.m_block = m_block;
  w.m0 = w.m_block * kBlockM;
  w.rows = min(kBlockM, w.q_len - w.m0);
  const int shift = w.k_len - w.q_len;
  w.kept = w.list = 0;
  w.seg = 0;
  if constexpr (kSlots) {
    static_assert(kBlockM == KeptRows::kTileRows, "the gather's limits are per query tile of the kernel");
    w.list = w.h / slots.heads_per_list;
    const int n = slots.count[static_cast<int64_t>(b) * slots.mask_heads + w.list];
    w.kept = n < 0 ? 0 : min(n, w.k_len);  // KeyLists::kept
    w.seg = KeptRows::segment(w.k_start, b);
    // Slots below the first / last row's window edge and below their limits (KeptRows::limits); without a window or
    // causal limit every row sees every slot.
    int edge_first = 0, edge_last = 0, limit_first = w.kept, limit_last = w.kept;
    if (slots.limits != nullptr && w.m0 < w.q_len) {
      const int32_t* lim = slots.limits + ((static_cast<int64_t>(w.list) * p.batch + b) * slots.query_tiles + m_block) *
                                              KeptRows::kLimits;
      edge_first = min(max(lim[0], 0), w.kept);
      edge_last = min(max(lim[1], 0), w.kept);
      limit_first = min(max(lim[2], 0), w.kept);
      limit_last = min(max(lim[3], 0), w.kept);
    }
    w.n_begin = w.n_end = w.whole_begin = w.whole_end = 0;
    if (limit_last > edge_first) {
      w.n_begin = edge_first / kBlockN;
      w.n_end = (limit_last + kBlockN - 1) / kBlockN;
    }
    if (limit_first > edge_last) {
      w.whole_begin = (edge_last + kBlockN - 1) / kBlockN;
      w.whole_end = limit_first / kBlockN;
    }
  } else if constexpr (!kRanged) {
    // Causal is window_right = 0 here (the plain variant has no other window): query i sees keys j <= i + shift.
    const bool causal = p.window_right >= 0;
    const int limit_last = causal ? min(w.k_len, max(w.m0 + w.rows - 1 + shift + 1, 0)) : w.k_len;
    const int limit_first = causal ? min(w.k_len, max(w.m0 + shift + 1, 0)) : w.k_len;
    w.n_begin = 0;
    w.n_end = (limit_last + kBlockN - 1) / kBlockN;
    w.whole_begin = 0;
    w.whole_end = limit_first / kBlockN;
  } else {
    TileKeys keys;
    if (p.key_range != nullptr) {
      keys = combine_tile_keys(tile_keys);
    } else {
      const KeyRange first = visible_keys(w.m0, w.q_len, w.k_len, p.window_left, p.window_right);
      const KeyRange last = visible_keys(w.m0 + w.rows - 1, w.q_len, w.k_len, p.window_left, p.window_right);
      keys = {static_cast<int>(first.begin), static_cast<int>(last.end), static_cast<int>(last.begin),
              static_cast<int>(first.end)};
    }
    w.n_begin = w.n_end = w.whole_begin = w.whole_end = 0;
    if (keys.highest > keys.lowest) {
      w.n_begin = keys.lowest / kBlockN;
      w.n_end = (keys.highest + kBlockN - 1) / kBlockN;
    }
    if (keys.inner_end > keys.inner_begin) {
      w.whole_begin = (keys.inner_begin + kBlockN - 1) / kBlockN;
      w.whole_end = keys.inner_end / kBlockN;
    }
  }
  if (w.m0 >= w.q_len) w.n_end = w.n_begin;  // a tile past the sequence: nothing to do
  return w;
}

}  // namespace dmattn::cuda::sm90a
