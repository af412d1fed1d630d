// tile_scheduler.cuh: which (sequence, query head, query tile) a CTA owns, and which key slots that tile can see.
//
// Grid (query tiles, query heads, sequences), one launch per kMaxSeqsPerLaunch sequences (grid.z's limit); query
// tiles are walked longest-first, so under a causal mask the CTAs with the most work start first.
// Key *slots*: without a key-side mask slot c is key position c; with one, slot c is the c-th key the mask keeps
// (KeyLists, ../passes.h), so masked keys are never loaded nor multiplied, and the causal limit becomes a prefix of
// the slots (found by a warp-wide search of the sorted list).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../passes.h"

namespace dmattn::cuda::sm80 {

// Everything one CTA knows about its tile, computed once at entry. Positions and lengths are int32: cu_seqlens are
// int32, so every clamped sequence start and length fits; only element offsets (row * stride) need 64 bits.
struct TileContext {
  int q_start, q_len, k_start, k_len;  // the sequence's rows in q / packed keys (clamped, see clamp_seq)
  int m0;                    // first query position of the tile in its sequence
  int rows;                  // valid query rows in the tile (<= kBlockM)
  int h, hk;                 // query head, KV head
  const int32_t* key_index;  // sorted kept key positions of this (sequence, mask head); null without a key-side mask
  int n_keys;                // slots: kept keys, or k_len
  int aligned_shift;         // k_len - q_len: query i's aligned key position is i + aligned_shift (the window's centre)
  int slots_begin;           // slots before this are hidden from every row of the tile (the window's left edge)
  int slots_low_full;        // slots from here on are past every row's left edge
  int slots_end;             // slots any row of the tile can see (its right edge)
  int slots_full;            // slots before this are within every row's right edge
  // Slots in [slots_low_full, slots_full) are seen by every row: tiles there need no per-element check.

  // Key position of a slot: clamped, so lying cu_seqlens cannot move a read out of the sequence. KeyLists::clamp_pos's
  // rule as a compare chain: through the helper ptxas made the query-operand kernel ~200 instructions longer.
  __device__ __forceinline__ int key_pos(int slot) const {
    if (key_index == nullptr) return slot;
    const int pos = key_index[slot];
    return pos < 0 ? 0 : (pos >= k_len ? k_len - 1 : pos);
  }
  // The key positions [low, limit) query i of the sequence sees by the window (VarlenFwdParams::window_left /
  // window_right; is_causal is window_right = 0) and its key_range (row_keys of ../../varlen_fwd_params.h); masks
  // come on top. The sides are read from the kernel parameters (constant memory): no register holds them through the
  // key loop. make_params turned a side no sequence reaches into -1, so they fit in 32 bits. kRanges: the caller is
  // a kernel variant built for key ranges (Traits::kKeyRanges; the plan sends calls with them nowhere else), so the
  // others keep their registers. A query past the sequence (a row past a short tile) reads no key_range row.
  template <bool kRanges = true>
  __device__ __forceinline__ int window_low(const VarlenFwdParams& p, int i) const {
    const int low = p.window_left < 0 ? 0 : max(i + aligned_shift - static_cast<int>(p.window_left), 0);
    return kRanges && p.key_range != nullptr && i < q_len
               ? max(low, static_cast<int>(key_range_of(p, static_cast<int64_t>(q_start) + i).begin))
               : low;
  }
  template <bool kRanges = true>
  __device__ __forceinline__ int window_limit(const VarlenFwdParams& p, int i) const {
    const int limit = p.window_right < 0 ? k_len : min(i + aligned_shift + 1 + static_cast<int>(p.window_right), k_len);
    return kRanges && p.key_range != nullptr && i < q_len
               ? min(limit, static_cast<int>(key_range_of(p, static_cast<int64_t>(q_start) + i).end))
               : limit;
  }
  // The first KV tile any row can see (tiles before it are not loaded).
  __device__ __forceinline__ int first_tile(int block_n) const {
    return slots_begin < slots_end ? slots_begin / block_n : (slots_end + block_n - 1) / block_n;
  }
  // Where key position j lives in k, v and key-side operands (the accessor of ../../varlen_fwd_params.h).
  __device__ __forceinline__ KeyRows key_rows(const VarlenFwdParams& p) const {
    return key_rows_of(p, SeqRange{k_start, k_len});
  }
};

// Number of the n_keys slots whose key position is < limit (lower_bound on the sorted list key_index; null: slot c is
// position c), searched by one whole warp: each round probes 32 evenly spaced slots and keeps the gap where the
// predicate flips.
__device__ __forceinline__ int slots_before(const int32_t* key_index, int n_keys, int limit, int lane) {
  if (limit <= 0) return 0;
  if (key_index == nullptr) return limit < n_keys ? limit : n_keys;
  int lo = 0, hi = n_keys;  // answer in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int probe = lo + lane * step;
    const bool below = probe < hi && key_index[probe] < limit;
    const int n_below = __popc(__ballot_sync(0xffffffffu, below));
    if (n_below == 0) return lo;
    const int last_below = lo + (n_below - 1) * step;
    if (step == 1) return last_below + 1;
    lo = last_below + 1;
    const int first_not = lo - 1 + step;
    hi = first_not < hi ? first_not : hi;
  }
  return lo;
}
__device__ __forceinline__ int slots_before(const TileContext& c, int limit, int lane) {
  return slots_before(c.key_index, c.n_keys, limit, lane);
}

// The sequence's rows in q and k, clamped (clamp_seq) as every kernel clamps them.
__device__ __forceinline__ void load_sequence(const VarlenFwdParams& p, int b, TileContext& c) {
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const SeqRange sk = key_seq(p, b);
  c.q_start = static_cast<int>(sq.start);
  c.q_len = static_cast<int>(sq.len);
  c.k_start = static_cast<int>(sk.start);
  c.k_len = static_cast<int>(sk.len);
}

// The key slots of query head c.h in sequence b (a key-side mask: its kept-key list), and of those, the ones some
// query of [i_first, i_first + n_queries) can see ([slots_begin, slots_end)) and the ones all of them see
// ([slots_low_full, slots_full)). Called by every thread: the slot search needs whole warps.
template <bool kRanges>
__device__ __forceinline__ void find_slots(const VarlenFwdParams& p, const KeyLists& keys, int b, int i_first,
                                           int n_queries, int lane, TileContext& c) {
  c.key_index = nullptr;
  c.n_keys = c.k_len;
  // The plan's kept-key lists: a key-side mask's, or in the decode kernel those of its query-side operands (KeyLists).
  if (keys.index != nullptr) {
    const int hm = keys.list(c.h);
    c.key_index = keys.index + static_cast<int64_t>(hm) * p.total_k + c.k_start;
    c.n_keys = keys.kept(b, hm, c.k_len);
  }
  c.aligned_shift = c.k_len - c.q_len;
  // The rows' least and greatest key bounds: a window moves right with the query (both ends), so its first and last
  // rows have them; per-query key ranges need not, so every row is read (a warp-wide min / max).
  const int i_last = i_first + n_queries - 1;
  int low_least = c.window_low<false>(p, i_first), low_most = c.window_low<false>(p, i_last);
  int limit_least = c.window_limit<false>(p, i_first), limit_most = c.window_limit<false>(p, i_last);
  const bool ranges = kRanges && p.key_range != nullptr;
  if (ranges) {
    low_least = limit_least = INT_MAX;
    low_most = limit_most = INT_MIN;
    for (int i = i_first + lane; i <= i_last; i += 32) {
      const int low = c.window_low(p, i), limit = c.window_limit(p, i);
      low_least = min(low_least, low);
      low_most = max(low_most, low);
      limit_least = min(limit_least, limit);
      limit_most = max(limit_most, limit);
    }
    low_least = __reduce_min_sync(0xffffffffu, low_least);
    low_most = __reduce_max_sync(0xffffffffu, low_most);
    limit_least = __reduce_min_sync(0xffffffffu, limit_least);
    limit_most = __reduce_max_sync(0xffffffffu, limit_most);
  }
  if (p.window_right >= 0 || ranges) {
    c.slots_end = slots_before(c, limit_most, lane);
    c.slots_full = slots_before(c, limit_least, lane);
  } else {
    c.slots_end = c.slots_full = c.n_keys;
  }
  if (p.window_left >= 0 || ranges) {
    c.slots_begin = slots_before(c, min(low_least, c.k_len), lane);
    c.slots_low_full = slots_before(c, min(low_most, c.k_len), lane);
  } else {
    c.slots_begin = c.slots_low_full = 0;
  }
}

template <int kBlockM>
struct VarlenTileScheduler {
  static constexpr int32_t kMaxSeqsPerLaunch = 65535;

  // Query tiles of the longest sequence (grid.x). The binding caps max_seqlen_q at total_q, so this fits in grid.x.
  static int64_t query_tiles(const VarlenFwdParams& p) { return (p.max_seqlen_q + kBlockM - 1) / kBlockM; }

  // The grid of the launch that starts at sequence seq0 (passed to the kernel as its batch offset).
  static dim3 grid(const VarlenFwdParams& p, int64_t seq0) {
    return dim3(static_cast<unsigned>(query_tiles(p)), static_cast<unsigned>(p.num_heads),
                static_cast<unsigned>(std::min<int64_t>(p.batch - seq0, kMaxSeqsPerLaunch)));
  }

  // This CTA's tile, and the key slots its rows can see; false when it owns none (a query tile past the end of a
  // shorter sequence). Called by every thread; the slot search needs whole warps.
  template <bool kRanges>
  static __device__ __forceinline__ bool tile(const VarlenFwdParams& p, const KeyLists& keys, int seq0, int lane,
                                              TileContext& c) {
    const int b = seq0 + blockIdx.z;
    c.h = blockIdx.y;
    c.hk = c.h / (p.num_heads / p.num_heads_k);
    load_sequence(p, b, c);
    const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest tiles first
    if (m0 >= c.q_len) return false;
    c.m0 = static_cast<int>(m0);
    c.rows = min(kBlockM, c.q_len - c.m0);
    find_slots<kRanges>(p, keys, b, c.m0, c.rows, lane, c);
    return true;
  }
};


// The decode kernel's tiles. Its rows are packed: the G = H / Hk query heads of one KV head times the sequence's
// q_len queries, head-major (packed row r is query head hk * G + r / q_len, query r % q_len), so one K / V tile serves
// every query head of its KV head. Grid (row tiles x splits, KV heads, sequences), row tile fastest so the CTAs that
// read the same keys run side by side; a split is a range of whole KV tiles of the (sequence, KV head)'s key slots
// (SplitPartials, ../passes.h), sized on the host, clipped to the slots on the device.
struct DecodeTile {
  TileContext c;  // c.m0 / c.rows: packed rows; c.h: the KV group's first query head (operand heads are per group)
  int b;          // the sequence (not blockIdx.z where the units run in SplitPartials::unit_order)
  int split;
  int tile_begin, tile_end;  // this split's KV tiles (an empty range still writes its rows' partial lse)
  int busy_splits;           // where the kernel merges its own splits (SplitPartials::tickets): the unit's splits
                             // with KV tiles, 0 .. num_splits (they are splits 0 .. busy_splits - 1); else 0

  // Query position in its sequence and query head of packed row m0 + r.
  __device__ __forceinline__ int query(int r) const { return (c.m0 + r) % c.q_len; }
  __device__ __forceinline__ int head(int r) const { return c.h + (c.m0 + r) / c.q_len; }
};

// A window's slots renumbered from its first visible one (slots_begin becomes slot 0), so that the tiles start there:
// tiles aligned to the sequence's slot 0 read one more tile than the same keys given as a shorter sequence wherever
// the window's first key falls inside a tile (about half the sequences of a decode batch). Without a list the keys'
// positions move with the slots (k_start, k_len and the aligned shift by the same amount: every row's window bounds,
// key rows and operand rows stay where they were); with one, the list starts later and positions stay. Not for key
// ranges (absolute bounds read per row) or query-side terms (runs aligned to the sequence's segment).
__device__ __forceinline__ void start_at_first_slot(TileContext& c) {
  const int o = c.slots_begin < c.slots_end ? c.slots_begin : 0;
  if (o <= 0) return;
  if (c.key_index != nullptr) {
    c.key_index += o;
  } else {
    c.k_start += o;
    c.k_len -= o;
    c.aligned_shift -= o;
  }
  c.n_keys -= o;
  c.slots_begin = 0;
  c.slots_low_full -= o;
  c.slots_end -= o;
  c.slots_full -= o;
}

template <int kBlockM, int kBlockN>
struct DecodeTileScheduler {
  static constexpr int32_t kMaxSeqsPerLaunch = 65535;

  static dim3 grid(const VarlenFwdParams& p, const SplitPartials& s, int64_t seq0) {
    return dim3(static_cast<unsigned>(s.row_tiles) * static_cast<unsigned>(s.num_splits),
                static_cast<unsigned>(p.num_heads_k),
                static_cast<unsigned>(std::min<int64_t>(p.batch - seq0, kMaxSeqsPerLaunch)));
  }

  // This CTA's tile; false when it owns no rows (a row tile past a sequence's packed rows). Called by every thread.
  // kWindowFromFirstSlot: a window's tiles start at its first visible slot (start_at_first_slot; the kernel variant
  // without query-side terms).
  template <bool kWindowFromFirstSlot>
  static __device__ __forceinline__ bool tile(const VarlenFwdParams& p, const KeyLists& keys, const SplitPartials& s,
                                              int seq0, int lane, DecodeTile& d) {
    TileContext& c = d.c;
    int b = seq0 + blockIdx.z;
    c.hk = blockIdx.y;
    if (s.unit_order != nullptr) {  // longest first (the plan orders only calls of one launch: seq0 = 0)
      const int units = p.batch * p.num_heads_k;
      const int u = min(max(s.unit_order[blockIdx.z * gridDim.y + blockIdx.y], 0), units - 1);
      b = u / p.num_heads_k;
      c.hk = u % p.num_heads_k;
    }
    d.b = b;
    const int group = p.num_heads / p.num_heads_k;
    c.h = c.hk * group;
    load_sequence(p, b, c);
    const int row_tile = blockIdx.x % s.row_tiles;
    d.split = blockIdx.x / s.row_tiles;
    // q_len <= max_seqlen_q and group * max_seqlen_q fits the grid the host sized, so this is an int.
    const int packed = group * c.q_len;
    c.m0 = row_tile * kBlockM;
    if (c.m0 >= packed) return false;
    c.rows = min(kBlockM, packed - c.m0);
    {
      // The tile's queries: a run of rows within one head, or every query once it wraps to the next head. c.h, the
      // group's first head, names the one kept-key list of the group (plan: Hm in {1, Hk}).
      const int i0 = c.m0 % c.q_len;
      const bool wraps = i0 + c.rows > c.q_len;
      find_slots<true>(p, keys, b, wraps ? 0 : i0, wraps ? c.q_len : c.rows, lane, c);
    }
    if (kWindowFromFirstSlot && p.window_left >= 0 && p.key_range == nullptr) start_at_first_slot(c);
    const int tiles = (c.slots_end + kBlockN - 1) / kBlockN;
    const int64_t begin = c.first_tile(kBlockN) + static_cast<int64_t>(d.split) * s.tiles_per_split;
    d.tile_begin = static_cast<int>(begin < tiles ? begin : tiles);
    d.tile_end = static_cast<int>(begin + s.tiles_per_split < tiles ? begin + s.tiles_per_split : tiles);
    d.busy_splits = 0;
    if (s.tickets != nullptr) {  // split k has tiles iff first + k x tiles_per_split < tiles: the first ceil(rest / per)
      const int rest = tiles - c.first_tile(kBlockN);
      d.busy_splits = rest <= 0 ? 0 : min(1 + (rest - 1) / s.tiles_per_split, s.num_splits);
    }
    return true;
  }
};

}  // namespace dmattn::cuda::sm80
