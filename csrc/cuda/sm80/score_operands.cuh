// score_operands.cuh: turning the raw Q K^T tile into scores: the softmax scale, the softcap, the bias and the mask
// (key-side, query-side or absent; ../../varlen_fwd_params.h holds the one addressing rule, ScoreOperand::offset)
// and the window (the causal limit is its right side), plus the tile-level questions they answer: can any row see
// this KV tile at all (a query-side mask may hide it whole: then it is skipped before K / V are loaded), and does it
// hide some key from some row.
//
// Key-side operands arrive per slot through the tile metadata (kv_tiles.cuh): the mask as the kept-key list that
// defines the slots, the bias in key_bias. Query-side ones are read here by the kernel variants built for them
// (Traits::kQueryOperands): the prefill kernel reads them per element, a query-side mask only on the tiles its block
// map (../passes.h) cannot decide (a tile whose blocks hold no True is skipped unread, one whose blocks hold no False
// is run as if unmasked); the decode kernel reads them as terms gathered along its kept-key lists (QueryTerms), one
// contiguous run per query and tile.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "../../varlen_fwd_params.h"
#include "../score_operand.cuh"
#include "kv_tiles.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

// A decode CTA's query-side terms (../passes.h, QueryTerms) and their ring in shared memory. In global memory the
// term of query i of the sequence at key slot c is element i * extent + c from base (its list head's runs, from its
// sequence's segment on). The row tile's queries are the n_queries queries (first_query + k) % q_len, k < n_queries
// (a run of rows within one head, or past its end into the next head's first queries); each KV tile's terms for them
// are copied with the tile's K / V (cp.async, the same commit group) into its stage: smem + ((stage * queries + k) *
// kBlockN + slot in tile) elements, so the score step reads shared memory.
// Packed row r's query is first_query + r (mod q_len), so its ring row is r % q_len. With two row fragments per
// thread (head dims up to 128) each thread's are found once (set_ring_rows), where a remainder per row and tile cost
// the score step a division's worth of instructions each; at D = 256 (one fragment, 255 registers already) the word
// would spill, so the remainder stays.
struct TermRuns {
  const char* base;
  int64_t extent;
  char* smem;
  bool f32;
  int first_query, n_queries, q_len, queries;  // queries: the ring's rows per stage
  uint32_t ring_rows;  // byte 2 mt + half: the ring row of this thread's packed row mt 16 + g + 8 half

  __device__ __forceinline__ int esize() const { return f32 ? 4 : 2; }
  // The ring row of this thread's packed row mt 16 + g + 8 half.
  __device__ __forceinline__ int ring_row(int mt, int half, int g) const { return (mt * 16 + g + half * 8) % q_len; }
  template <int kMTiles>
  __device__ __forceinline__ void set_ring_rows(int g) {
    static_assert(kMTiles <= 2, "a byte per row of the thread, in one word");
    ring_rows = 0;
    if constexpr (kMTiles == 2) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          ring_rows |= static_cast<uint32_t>(ring_row(mt, half, g)) << (8 * (2 * mt + half));
        }
    }
  }
  // This stage's terms of this thread's packed row mt 16 + g + 8 half, from the tile's first slot.
  template <int kMTiles, int kBlockN>
  __device__ __forceinline__ const char* staged(int stage, int mt, int half, int g) const {
    const int ring = kMTiles == 2 ? (ring_rows >> (8 * (2 * mt + half))) & 0xff : ring_row(mt, half, g);
    return smem + (static_cast<int64_t>(stage * queries + ring) * kBlockN) * esize();
  }
  // Issues the copies of KV tile n's terms into stage (16-byte chunks; runs are 128-byte aligned). CTA-wide.
  template <int kThreads, int kBlockN>
  __device__ __forceinline__ void load(int stage, int n) const {
    if (f32) {
      load_chunks<kThreads, kBlockN, 4>(stage, n);
    } else {
      load_chunks<kThreads, kBlockN, 2>(stage, n);
    }
  }
  // load() for terms of kSize bytes: the chunks per query a constant, so that finding a thread's (query, chunk) is
  // no division.
  template <int kThreads, int kBlockN, int kSize>
  __device__ __forceinline__ void load_chunks(int stage, int n) const {
    constexpr int kChunks = kBlockN * kSize / 16;  // per query
    static_assert(kChunks * 16 == kBlockN * kSize, "a tile's terms of a query: whole 16-byte chunks");
    for (int e = threadIdx.x; e < n_queries * kChunks; e += kThreads) {
      const int k = e / kChunks, chunk = e % kChunks;
      int i = first_query + k;
      i = i >= q_len ? i - q_len : i;
      const char* src = base + (static_cast<int64_t>(i) * extent + static_cast<int64_t>(n) * kBlockN) * kSize +
                        chunk * 16;
      cp_async_16(smem + (static_cast<int64_t>(stage * queries + k) * kBlockN) * kSize + chunk * 16, src, true);
    }
  }
};

template <typename Traits>
struct ScoreOperands {
  static constexpr int kBlockN = Traits::kBlockN, kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles;

  const VarlenFwdParams& p;
  const TileContext& c;
  const BlockMap& blocks;  // of a query-side mask; state null without one (and in the decode kernel)
  bool query_mask, query_bias, key_bias;
  float scale;
  // The query-side operands' head terms, taken once (row r's elements start at head + r x row_stride in each:
  // ScoreOperand::row_start), where a division per row and tile by head_group cost the prefill kernel's pass 2.
  int64_t mask_head, bias_head;
  // staged: this CTA copies each KV tile's query-side operand rows into shared memory (stage(): the prefill kernel's
  // KernelTraits::SharedStorage::op_mask / op_bias) and pass 2 reads them there. The caller offers it (can_stage);
  // it needs no key-side mask (slots are then key positions) and contiguous keys (a row's elements of a tile are one
  // run).
  bool staged;

  __device__ __forceinline__ ScoreOperands(const VarlenFwdParams& p_, const TileContext& c_, const BlockMap& blocks_,
                                           bool can_stage = false)
      : p(p_),
        c(c_),
        blocks(blocks_),
        query_mask(Traits::kQueryOperands && p_.mask.layout == OperandLayout::kQuerySide),
        query_bias(Traits::kQueryOperands && p_.bias.layout == OperandLayout::kQuerySide),
        key_bias(p_.bias.layout == OperandLayout::kKeySide),
        scale(p_.softmax_scale),
        mask_head(query_mask ? p_.mask.row_start(0, c_.h) : 0),
        bias_head(query_bias ? p_.bias.row_start(0, c_.h) : 0),
        staged(can_stage && (query_mask || query_bias) && c_.key_index == nullptr &&
               (!query_mask || p_.mask.col_stride == 1) && (!query_bias || p_.bias.col_stride == 1)) {}

  __device__ __forceinline__ float capped(float x) const { return capped_score(p, x); }

  // The block map's state (BlockMap::kSomeTrue / kSomeFalse) of the tile starting at slot n0, for the tile's rows and
  // the slots it holds (slots are key positions under a query-side mask: it comes with no key-side one). kSomeTrue |
  // kSomeFalse (decide per element) without a map or a query-side mask.
  static constexpr uint8_t kUndecided = BlockMap::kSomeTrue | BlockMap::kSomeFalse;
  __device__ __forceinline__ uint8_t mask_state(int n0) const {
    if constexpr (!Traits::kQueryOperands) {
      return kUndecided;
    } else {
      if (!query_mask || blocks.state == nullptr || n0 >= c.slots_end) return kUndecided;
      static_assert(Traits::kBlockM <= BlockMap::kRows, "a query tile spans two row blocks at most");
      return blocks.covering_tile<kBlockN>(c.h / p.mask.head_group, static_cast<int64_t>(c.q_start) + c.m0, c.rows,
                                           n0, min(n0 + kBlockN, c.slots_end));
    }
  }

  // A KV tile is live unless a query-side mask is False for every (row, key) of it the rows can see: its block map
  // says so, or (without one) a scan of the tile does. CTA-wide.
  __device__ __forceinline__ bool tile_live(int n) const {
    if (!query_mask) return true;
    if (blocks.state != nullptr) return (mask_state(n * kBlockN) & BlockMap::kSomeTrue) != 0;
    bool any = false;
    const int n0 = n * kBlockN;
    for (int e = threadIdx.x; e < c.rows * kBlockN && !any; e += Traits::kThreads) {
      const int r = e / kBlockN, slot = n0 + e % kBlockN;
      if (slot >= c.slots_end) continue;
      const int pos = c.key_pos(slot), i = c.m0 + r;
      if (pos < c.template window_low<Traits::kKeyRanges>(p, i) ||
          pos >= c.template window_limit<Traits::kKeyRanges>(p, i)) {
        continue;
      }
      any = p.mask.mask_allows(p.mask.offset(static_cast<int64_t>(c.q_start) + i, c.h, pos));
    }
    return __syncthreads_or(any) != 0;
  }
  // The first live tile at or after n (n_tiles when none). CTA-wide.
  __device__ __forceinline__ int next_live(int n, int n_tiles) const {
    while (n < n_tiles && !tile_live(n)) ++n;
    return n;
  }
  // The same, with the found tile's mask_state() (kUndecided at n_tiles), read once for both questions.
  __device__ __forceinline__ int next_live(int n, int n_tiles, uint8_t& state) const {
    state = kUndecided;
    if (!query_mask) return n;
    if (blocks.state == nullptr) return next_live(n, n_tiles);
    for (; n < n_tiles; ++n) {
      state = mask_state(n * kBlockN);
      if ((state & BlockMap::kSomeTrue) != 0) return n;
    }
    state = kUndecided;
    return n;
  }

  // Copies KV tile n's query-side operands into shared memory for pass 2 (staged calls; the mask only where state,
  // the tile's mask_state(), says it holds a False: apply() takes the same), as cp.async copies of the 16-byte
  // chunks that cover each row's run of elements (slots are key positions here: no key-side mask). A chunk
  // reads no byte past the run (the rest of it is zero-filled), and the first may start up to 15 bytes before it
  // (inside the allocation, which starts on a 16-byte boundary); pass 2 reads only the run. CTA-wide; the caller
  // commits the copies with the tile's K and waits for them with it.
  __device__ __forceinline__ void stage(int n, uint8_t state) const {
    if (!staged) return;
    const int n0 = n * kBlockN, keys = min(kBlockN, c.k_len - n0);
    if (query_mask && (state & BlockMap::kSomeFalse) != 0) {
      stage_rows<Traits::kMaskPitch, 1>(reinterpret_cast<char*>(staged_mask()), staged_mask_at(), p.mask.ptr,
                                        mask_head, p.mask.row_stride, n0, keys);
    }
    if (query_bias) {
      if (p.bias.dtype == ScalarType::kFloat32) {
        stage_rows<Traits::kBias32Pitch, 4>(staged_bias(), staged_bias_at(), p.bias.ptr, bias_head,
                                            p.bias.row_stride, n0, keys);
      } else {
        stage_rows<Traits::kBias16Pitch, 2>(staged_bias(), staged_bias_at(), p.bias.ptr, bias_head,
                                            p.bias.row_stride, n0, keys);
      }
    }
  }

  // Whether some row of the tile starting at slot n0 cannot see some key of it (a window edge, the causal diagonal, a
  // query-side mask where state, the tile's mask_state(), allows a False: a tile the block map shows whole hides only
  // what the bounds hide). Slots past the last one are zero-filled, so a tail tile alone does not count.
  __device__ __forceinline__ bool hides_keys(int n0, uint8_t state = kUndecided) const {
    return (query_mask && (state & BlockMap::kSomeFalse) != 0) || bounds_hide_keys(n0);
  }
  // Whether v's rows under a KV tile may hold an inf or NaN, from the block map's v flags (slots are v's packed rows
  // wherever the plan has them): loaded a tile ahead (v_flags()), asked at the tile's V scan (may_be_nonfinite()).
  struct VFlags {
    uint8_t first = 1, last = 1;  // without flags: may (scan)
    __device__ __forceinline__ bool may_be_nonfinite() const { return (first | last) != 0; }
  };
  __device__ __forceinline__ VFlags v_flags(int n0) const {
    VFlags f;
    if constexpr (Traits::kQueryOperands) {
      if (blocks.v_nonfinite != nullptr && c.key_index == nullptr && n0 < c.slots_end) {
        blocks.v_flags(c.hk, c.k_start + n0, c.k_start + min(n0 + kBlockN, c.slots_end), f.first, f.last);
      }
    }
    return f;
  }
  // The same, leaving the query-side mask out: a window edge or the causal diagonal (the decode kernel's query-side
  // variant asks its terms instead: apply's saw_hidden).
  __device__ __forceinline__ bool bounds_hide_keys(int n0) const {
    return (n0 + kBlockN > c.slots_full && c.slots_full < c.slots_end) ||
           (Traits::kWindowLeft && n0 < c.slots_low_full);
  }

  // s[mt][nt]: the m16n8 fragments of Q K^T for the tile starting at slot n0 (rows warp_row0 + 16 mt, slots 8 nt);
  // key_pos / slot_bias: its metadata buffer; row_range: the tile rows' key ranges in shared memory (kKeyRanges
  // variants, when the call has them); state: mask_state(n0). Makes s scale * q.k (capped) + bias, -inf where the
  // row cannot see the key, and returns score_mul: a tile every row sees whole, with no bias and no softcap, keeps
  // its raw scores (the scale is folded into the softmax FFMAs) and returns the scale; every other tile returns 1.
  __device__ __forceinline__ float apply(float (&s)[kMTiles][kNTiles][4], int n0, const int32_t* key_pos,
                                         const float* slot_bias, const int32_t (*row_range)[2], uint8_t state,
                                         int warp_row0, int g, int t) const {
    const bool read_mask = query_mask && (state & BlockMap::kSomeFalse) != 0;  // else every element is True
    return apply_tile(s, n0, slot_bias, t, read_mask, [&] {
      // A window edge (the causal diagonal), the last (partial) tile, or query-side operands: per element.
      int low[kMTiles][2], limit[kMTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp_row0 + mt * 16 + g + half * 8, i = c.m0 + r;
          low[mt][half] = Traits::kWindowLeft ? c.template window_low<false>(p, i) : 0;
          limit[mt][half] = r < c.rows ? c.template window_limit<false>(p, i) : 0;
          if (Traits::kKeyRanges && p.key_range != nullptr) {
            low[mt][half] = max(low[mt][half], row_range[r][0]);
            limit[mt][half] = min(limit[mt][half], row_range[r][1]);
          }
        }
      if constexpr (Traits::kQueryOperands) {
        if (staged) return staged_scores(s, key_pos, slot_bias, low, limit, read_mask, warp_row0, g, t);
      }
      per_element_any(s, key_pos, slot_bias, low, limit, t);
      if constexpr (Traits::kQueryOperands) query_operands(s, key_pos, low, limit, read_mask, warp_row0, g, t);
    });
  }

  // The same for a kernel whose rows are not a tile's consecutive queries (the decode kernel's packed rows): the
  // caller gives each row's key range [low, limit) (0 / 0 for rows past the tile), and s / key_pos / slot_bias cover
  // the kNTiles * 8 slots of this warp.
  __device__ __forceinline__ float apply(float (&s)[kMTiles][kNTiles][4], int n0, const int32_t* key_pos,
                                         const float* slot_bias, const int (&low)[kMTiles][2],
                                         const int (&limit)[kMTiles][2], int t) const {
    static_assert(!Traits::kQueryOperands, "query-side operands need each packed row's query and head");
    return apply_tile(s, n0, slot_bias, t, false, [&] { per_element_any(s, key_pos, slot_bias, low, limit, t); });
  }
  // And with query-side operands: each packed row r (query d.query(r)) reads its terms for this warp's slots
  // (from warp_col, the warp's first slot within the tile) in the tile's stage of the runs' ring. saw_hidden: some
  // term of this thread hid a key its row could see by position (then the tile's V must be checked).
  template <typename PackedRows>
  __device__ __forceinline__ float apply(float (&s)[kMTiles][kNTiles][4], int n0, const int32_t* key_pos,
                                         const float* slot_bias, const int (&low)[kMTiles][2],
                                         const int (&limit)[kMTiles][2], const TermRuns& runs, int stage,
                                         int warp_col, const PackedRows& d, int g, int t, bool& saw_hidden) const {
    static_assert(Traits::kQueryOperands, "the variant without query-side operands takes the overload above");
    return apply_tile(s, n0, slot_bias, t, query_mask, [&] {
      per_element_any(s, key_pos, slot_bias, low, limit, t);
      if (runs.f32) {
        packed_query_terms<true>(s, key_pos, low, limit, runs, stage, warp_col, d, g, t, saw_hidden);
      } else {
        packed_query_terms<false>(s, key_pos, low, limit, runs, stage, warp_col, d, g, t, saw_hidden);
      }
    });
  }

 private:
  // The staged tiles, at fixed offsets of the kernel's shared memory (no registers hold their addresses).
  static __device__ __forceinline__ char* smem_base() {
    extern __shared__ __align__(128) char smem_raw[];
    return smem_raw;
  }
  static __device__ __forceinline__ uint8_t* staged_mask() {
    return reinterpret_cast<uint8_t*>(smem_base() + offsetof(typename Traits::SharedStorage, op_mask));
  }
  static __device__ __forceinline__ char* staged_bias() {
    return smem_base() + offsetof(typename Traits::SharedStorage, op_bias);
  }
  static __device__ __forceinline__ uint8_t* staged_mask_at() {
    return reinterpret_cast<uint8_t*>(smem_base() + offsetof(typename Traits::SharedStorage, op_mask_at));
  }
  static __device__ __forceinline__ uint8_t* staged_bias_at() {
    return reinterpret_cast<uint8_t*>(smem_base() + offsetof(typename Traits::SharedStorage, op_bias_at));
  }
  // stage() for one operand of kSize-byte elements: rows [0, c.rows) of the tile, keys [n0, n0 + keys), into rows of
  // kPitch bytes at dst, each row's offset in its first chunk into at[row]. A row's run spans kChunks 16-byte chunks
  // (kBlockN kSize / 16 + 1: it may start anywhere in the first); the tile's (row, chunk) pairs are numbered densely,
  // thread t taking pairs t, t + kThreads, ..., so no lane idles where a run's chunks are not a power of two (a lane
  // group per row left 3 of 8 lanes idle for a 64-key mask run, 7 of 16 for a 16-bit bias run: 12 copy rounds per
  // tile where 8 do).
  template <int kPitch, int kSize>
  __device__ __forceinline__ void stage_rows(char* dst, uint8_t* at, const void* src, int64_t head,
                                             int64_t row_stride, int n0, int keys) const {
    constexpr int kChunks = kBlockN * kSize / 16 + 1;
    constexpr int kPairs = Traits::kBlockM * kChunks;
    static_assert(kChunks * 16 <= kPitch, "a row's chunks fit its pitch");
    const int run = keys * kSize;
    const uintptr_t row0 = reinterpret_cast<uintptr_t>(src) +
                           (head + (static_cast<int64_t>(c.q_start) + c.m0) * row_stride + n0) * kSize;
    const int64_t row_bytes = row_stride * kSize;
#pragma unroll
    for (int i = 0; i < (kPairs + Traits::kThreads - 1) / Traits::kThreads; ++i) {
      const int pair = i * Traits::kThreads + static_cast<int>(threadIdx.x);
      const int r = pair / kChunks, chunk = pair - r * kChunks;  // a constant divisor: a multiply and a shift
      if (pair >= kPairs || r >= c.rows) continue;
      const uintptr_t from = row0 + r * row_bytes;
      const int offset = static_cast<int>(from & 15);
      if (chunk == 0) at[r] = static_cast<uint8_t>(offset);
      const int valid = min(max(offset + run - chunk * 16, 0), 16);
      cp_async_chunk(dst + r * kPitch + chunk * 16,
                     valid > 0 ? reinterpret_cast<const void*>((from & ~uintptr_t{15}) + chunk * 16) : src, valid);
    }
  }
  // A 16-byte cp.async that reads src_bytes (0-16) of it and zero-fills the rest.
  static __device__ __forceinline__ void cp_async_chunk(void* smem, const void* gmem, int src_bytes) {
    const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(gmem), "r"(src_bytes));
  }

  // Tiles every row sees whole take the scale and a key-side bias (or nothing: raw_scores); others per_tile().
  // read_mask: the tile's query-side mask must be read (false where the block map shows it all True).
  template <typename PerElement>
  __device__ __forceinline__ float apply_tile(float (&s)[kMTiles][kNTiles][4], int n0, const float* slot_bias, int t,
                                              bool read_mask, PerElement&& per_tile) const {
    // A softcap sends every tile down the per-element path (its one place that caps scores).
    const bool whole_tile = n0 + kBlockN <= c.slots_full && (!Traits::kWindowLeft || n0 >= c.slots_low_full) &&
                            !read_mask && !query_bias && p.softcap == 0.f;
    const bool raw_scores = whole_tile && !key_bias && scale > 0.f;
    if (whole_tile && !raw_scores) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = s[mt][nt][e] * scale + slot_bias[nt * 8 + 2 * t + (e % 2)];
          }
    } else if (!whole_tile) {
      per_tile();
    }
    return raw_scores ? scale : 1.f;
  }

  // Pass 1 (key slots outer, so each slot's position and bias are read once): scale (capped), key-side bias, -inf
  // where the slot is empty (position -1) or outside the row's [low, limit). Few registers live beside O and S.
  // A softcap is applied first, in place, in its own pass over the tile (one copy of the loop below, with a scale of
  // 1, instead of a second one that caps: fewer registers in the kernel's tightest spot).
  __device__ __forceinline__ void per_element_any(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                                  const float* slot_bias, const int (&low)[kMTiles][2],
                                                  const int (&limit)[kMTiles][2], int t) const {
    per_element(s, key_pos, slot_bias, low, limit, t, cap_first(s));
  }
  // The softcap's pass, where the call has one: caps scale * x in place and returns 1, the multiplier left for the
  // scores; else returns the scale.
  __device__ __forceinline__ float cap_first(float (&s)[kMTiles][kNTiles][4]) const {
    if (p.softcap > 0.f) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mt][nt][e] = capped(s[mt][nt][e] * scale);
      return 1.f;
    }
    return scale;
  }

  __device__ __forceinline__ void per_element(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                              const float* slot_bias, const int (&low)[kMTiles][2],
                                              const int (&limit)[kMTiles][2], int t, float mul) const {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int col = nt * 8 + 2 * t + e2;
        const int pos = key_pos[col];
        const float kb = slot_bias[col];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float& x = s[mt][nt][2 * half + e2];
            x = pos < low[mt][half] || pos >= limit[mt][half] ? -INFINITY : x * mul + kb;
          }
      }
  }

  // Pass 2 for packed rows: each visible (row, slot) takes its query-side term, two adjacent slots per read: -inf
  // where the term is the hidden pattern, else + the term (the query-side bias, or 0). A score that is -inf by itself
  // (an inf in k) still takes its bias: -inf + NaN or + inf is NaN, as the contract says.
  template <bool kF32, typename PackedRows>
  __device__ __forceinline__ void packed_query_terms(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                                     const int (&low)[kMTiles][2], const int (&limit)[kMTiles][2],
                                                     const TermRuns& runs, int stage, int warp_col,
                                                     const PackedRows& d, int g, int t, bool& saw_hidden) const {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = mt * 16 + g + half * 8;
        if (r >= c.rows) continue;  // limit 0: every key of it is hidden already
        const char* row = runs.template staged<kMTiles, kBlockN>(stage, mt, half, g);
        uint32_t bits[kNTiles][2];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int col = warp_col + nt * 8 + 2 * t;  // even: aligned pairs
          if constexpr (kF32) {
            const uint2 w = *reinterpret_cast<const uint2*>(row + col * 4);
            bits[nt][0] = w.x;
            bits[nt][1] = w.y;
          } else {
            const uint32_t w = *reinterpret_cast<const uint32_t*>(row + col * 2);
            bits[nt][0] = w & 0xffffu;
            bits[nt][1] = w >> 16;
          }
        }
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            float& x = s[mt][nt][2 * half + e2];
            const int pos = key_pos[nt * 8 + 2 * t + e2];
            if (pos < low[mt][half] || pos >= limit[mt][half]) continue;  // hidden: x is -inf already
            const uint32_t b = bits[nt][e2];
            if (b == (kF32 ? QueryTerms::kHidden32 : QueryTerms::kHidden16)) {
              x = -INFINITY;
              saw_hidden = true;
            } else {
              x += kF32 ? __uint_as_float(b) : term16(b);
            }
          }
      }
  }

  // A 16-bit term (q's dtype) as float32.
  static __device__ __forceinline__ float term16(uint32_t bits) {
    if constexpr (std::is_same_v<typename Traits::Elem, __nv_bfloat16>) {
      return __uint_as_float(bits << 16);
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }

  // Passes 1 and 2 in one for a staged tile: x = mul x + the key-side bias + the query-side term where the row sees
  // the key by position and the mask shows it, else -inf; the terms read from the staged tiles in shared memory. One
  // copy of the loop per bias kind (none, q's dtype, fp32), no branch per element: run BK's source profile had a
  // switch on the bias dtype and a branch around each hidden element's bias in every element's path (pass 2 was ~30%
  // of the query-side tile's instructions) and the position test done twice, once per pass.
  static constexpr int kNoBias = 0, kBias16 = 1, kBias32 = 2;
  __device__ __forceinline__ void staged_scores(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                                const float* slot_bias, const int (&low)[kMTiles][2],
                                                const int (&limit)[kMTiles][2], bool read_mask, int warp_row0, int g,
                                                int t) const {
    const float mul = cap_first(s);
    if (!query_bias) {
      staged_pass<kNoBias>(s, key_pos, slot_bias, low, limit, read_mask, mul, warp_row0, g, t);
    } else if (p.bias.dtype == ScalarType::kFloat32) {
      staged_pass<kBias32>(s, key_pos, slot_bias, low, limit, read_mask, mul, warp_row0, g, t);
    } else {
      staged_pass<kBias16>(s, key_pos, slot_bias, low, limit, read_mask, mul, warp_row0, g, t);
    }
  }
  template <int kBias>
  __device__ __forceinline__ void staged_pass(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                              const float* slot_bias, const int (&low)[kMTiles][2],
                                              const int (&limit)[kMTiles][2], bool read_mask, float mul,
                                              int warp_row0, int g, int t) const {
    // Each row's run starts at its offset in its first chunk (any byte for masks; 16-bit and fp32 biases are aligned
    // to their size, so each element is one aligned read). Offsets are below 16: a row's reads stay within its
    // pitch. Rows past the tile's last (not staged) read stale bytes of their pitch and discard them (limit 0): their
    // offsets are stale too, hence the bias offset's low bits cleared (an odd one misaligned the read).
    const uint8_t* mask_row[kMTiles][2];
    const char* bias_row[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp_row0 + mt * 16 + g + half * 8;
        mask_row[mt][half] = staged_mask() + r * Traits::kMaskPitch + (read_mask ? staged_mask_at()[r] & 15 : 0);
        bias_row[mt][half] = staged_bias() + r * (kBias == kBias32 ? Traits::kBias32Pitch : Traits::kBias16Pitch) +
                             (kBias != kNoBias ? staged_bias_at()[r] & (kBias == kBias32 ? 12 : 14) : 0);
      }
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
      for (int e2 = 0; e2 < 2; ++e2) {
        const int col = nt * 8 + 2 * t + e2, pos = key_pos[col];
        const float kb = slot_bias[col];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            float term = 0.f;
            if constexpr (kBias == kBias32) term = reinterpret_cast<const float*>(bias_row[mt][half])[col];
            if constexpr (kBias == kBias16) term = term16(reinterpret_cast<const uint16_t*>(bias_row[mt][half])[col]);
            const bool shown = pos >= low[mt][half] && pos < limit[mt][half] && (!read_mask || mask_row[mt][half][col]);
            // A key the mask hides takes -inf whatever its bias (which may be NaN); a score that is -inf by itself
            // (an inf in k) still takes its bias: -inf + NaN or + inf is NaN, as the contract says.
            float& x = s[mt][nt][2 * half + e2];
            x = shown ? x * mul + kb + term : -INFINITY;
          }
      }
  }

  // Pass 2, query-side operands only, on the keys pass 1 left visible (in [low, limit): in bounds). A score that is
  // -inf by itself (an inf in k) still takes its bias: -inf + NaN or + inf is NaN, as the contract says.
  __device__ __forceinline__ void query_operands(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                                 const int (&low)[kMTiles][2], const int (&limit)[kMTiles][2],
                                                 bool read_mask, int warp_row0, int g, int t) const {
    if (!read_mask && !query_bias) return;
    const bool bias32 = query_bias && p.bias.dtype == ScalarType::kFloat32;
    const uint8_t* mask = static_cast<const uint8_t*>(p.mask.ptr);
    // Row by row (a thread's 2 kNTiles elements of it), a batch of elements at a time: every mask and bias load of the
    // batch is issued before any is used, where a load, a test and a dependent load per element left a thread waiting
    // on each in turn. A hidden element's bias is read too (it is in bounds: the element is inside its row's window)
    // and not used (it may be NaN); elements outside the window are not read. The loads are written out here rather
    // than through bias_bits / mask_allows (score_operand.cuh), which read the same elements: with bias_bits' switch
    // on the dtype sm_80 spilled 36 bytes at head dim 256 (8 as written), with mask_allows sm_90 took 247 / 255
    // registers at head dims 128 / 256 (237 / 253 as written).
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t qrow = static_cast<int64_t>(c.q_start) + c.m0 + warp_row0 + mt * 16 + g + half * 8;
        const int64_t mask_row = read_mask ? mask_head + qrow * p.mask.row_stride : 0;  // row_start(qrow, c.h)
        const int64_t bias_row = query_bias ? bias_head + qrow * p.bias.row_stride : 0;
        // kLoadTiles n8 tiles (2 kLoadTiles elements, 4 kLoadTiles loads) at a time: all kNTiles at once held the
        // query-side prefill variant past 255 registers at head dim 128 (spills); beside the staged path's copies,
        // two spill on sm_80 at head dims 128 and 256 (20 bytes) and four on sm_90 at 256 (12 bytes).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        constexpr int kWanted = Traits::kHeadDim >= 256 ? 1 : 4;
#else
        constexpr int kWanted = Traits::kHeadDim >= 128 ? 1 : 2;
#endif
        constexpr int kLoadTiles = kNTiles >= kWanted ? kWanted : kNTiles;
        static_assert(kNTiles % kLoadTiles == 0, "whole batches of n8 tiles");
#pragma unroll
        for (int nt0 = 0; nt0 < kNTiles; nt0 += kLoadTiles) {
          uint8_t shown[kLoadTiles][2];
          uint32_t bits[kLoadTiles][2];
#pragma unroll
          for (int i = 0; i < kLoadTiles; ++i)
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
              const int pos = key_pos[(nt0 + i) * 8 + 2 * t + e2];
              const bool seen = pos >= low[mt][half] && pos < limit[mt][half];
              shown[i][e2] = seen && read_mask ? mask[p.mask.column(mask_row, pos)] : 1;
              const int64_t at = p.bias.column(bias_row, pos);
              bits[i][e2] = !(seen && query_bias) ? 0u
                            : bias32             ? static_cast<const uint32_t*>(p.bias.ptr)[at]
                                                 : static_cast<const uint16_t*>(p.bias.ptr)[at];
            }
#pragma unroll
          for (int i = 0; i < kLoadTiles; ++i)
#pragma unroll
            for (int e2 = 0; e2 < 2; ++e2) {
              float& x = s[mt][nt0 + i][2 * half + e2];
              const int pos = key_pos[(nt0 + i) * 8 + 2 * t + e2];
              if (pos < low[mt][half] || pos >= limit[mt][half]) continue;  // hidden: x is -inf already
              if (shown[i][e2] == 0) {
                x = -INFINITY;  // hidden by the mask: its bias is not used
              } else if (query_bias) {
                x += bias_from_bits(p.bias.dtype, bits[i][e2]);
              }
            }
        }
      }
  }
};

}  // namespace dmattn::cuda::sm80
