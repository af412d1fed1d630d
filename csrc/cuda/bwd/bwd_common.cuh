// bwd_common.cuh: what both backward kernels share: the sequence's clamped rows, one query row's visible keys and
// softmax statistics, one key's mask bit and bias, tile loads, and the per-element probability rule.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../score_operand.cuh"
#include "../sm80/kv_tiles.cuh"
#include "../sm80/tile_scheduler.cuh"
#include "bwd_traits.h"

namespace dmattn::cuda::bwd {

constexpr float kLog2e = 1.4426950408889634f;

// A sequence's rows in q / k, clamped exactly as the forward clamps them (clamp_seq, key_seq), so lying cu_seqlens
// cannot move a read or write out of the tensors. int32: cu_seqlens are int32.
struct Seq {
  int q_start, q_len, k_start, k_len;
  __device__ __forceinline__ Seq(const VarlenFwdParams& p, int b) {
    const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
    const SeqRange sk = key_seq(p, b);
    q_start = static_cast<int>(sq.start);
    q_len = static_cast<int>(sq.len);
    k_start = static_cast<int>(sk.start);
    k_len = static_cast<int>(sk.len);
  }
};

// What the probability of query row i (a position in the sequence) needs: the key positions [low, limit) it sees
// (window and key_range, row_keys of varlen_fwd_params.h), its lse in base 2 and its delta. A row past the sequence,
// or one the forward found no key for (lse -inf), sees nothing: low = INT_MAX, and lse2 = +inf so that exp2(x -
// lse2) is 0 for every finite x.
struct RowInfo {
  int low, limit;
  float lse2, delta;
};

// Every load of a row (lse, delta, its key range) is issued before any is used: the rule for a row the forward found
// no key for is applied by selects, since a load behind a branch on lse would wait for lse first (the sm90a backward's
// row producers, run CR).
__device__ __forceinline__ RowInfo row_info(const BwdParams& p, const Seq& s, int h, int i) {
  if (i >= s.q_len) return RowInfo{INT_MAX, 0, INFINITY, 0.f};
  const int64_t row = static_cast<int64_t>(s.q_start) + i, at = static_cast<int64_t>(h) * p.f.total_q + row;
  const float lse = p.f.lse[at];
  const float delta = p.delta[at];  // delta_kernel writes every row
  const KeyRange keys = row_keys(p.f, row, i, s.q_len, s.k_len);
  const bool seen = lse != -INFINITY;
  return RowInfo{seen ? static_cast<int>(keys.begin) : INT_MAX, seen ? static_cast<int>(keys.end) : 0,
                 seen ? lse * kLog2e : INFINITY, seen ? delta : 0.f};
}

// The rows [lo, hi] of a query tile (first row m0, its `rows` rows in the sequence, 1 <= rows <= 64) that a window lets
// see key position j (0 <= j < k_len where `kept`; empty, lo > hi, where not): row_keys without key ranges, turned
// around for one key.
// Query i sees j when i + shift - window_left <= j <= i + shift + window_right (visible_keys; shift = k_len - q_len),
// so tile row r = i - m0 sees it when d - window_right <= r <= d + window_left, d = j - shift - m0. The sm90a
// backward's consumers use it where the row statistics come by TMA and no thread computes each row's interval.
struct RowSpan {
  int lo, hi;
};

__device__ __forceinline__ RowSpan rows_seeing(const VarlenFwdParams& f, const Seq& s, int m0, int rows, int j,
                                               bool kept) {
  const int64_t d = static_cast<int64_t>(j) - (s.k_len - s.q_len) - m0;  // int64: windows are int64
  int64_t lo = f.window_right < 0 ? 0 : d - f.window_right;
  int64_t hi = f.window_left < 0 ? rows - 1 : d + f.window_left;
  lo = lo < 0 ? 0 : lo;
  hi = hi > rows - 1 ? rows - 1 : hi;
  if (!kept || lo > hi) return RowSpan{1, 0};
  return RowSpan{static_cast<int>(lo), static_cast<int>(hi)};
}

// Key position j of the sequence for query head h: in the sequence and kept by a key-side mask (any nonzero byte; a
// `listed` key, read from the mask's kept-key list, is kept without reading the mask again), and its key-side bias in
// base 2 (0 without one).
struct KeyInfo {
  bool visible;
  float bias2;
};

__device__ __forceinline__ KeyInfo key_info(const BwdParams& p, const Seq& s, int h, int j, bool listed = false) {
  KeyInfo k{false, 0.f};
  if (j >= s.k_len) return k;
  const int64_t row = static_cast<int64_t>(s.k_start) + j;
  k.visible = listed || !p.f.mask.present() || p.f.mask.mask_allows(p.f.mask.offset(row, h, 0));
  if (p.f.bias.present()) k.bias2 = bias_value(p.f.bias, p.f.bias.offset(row, h, 0)) * kLog2e;
  return k;
}

// The query rows [begin, end) of sequence s that a window lets see a key in positions [pos_lo, pos_hi]: query i sees
// key j only if i + shift - window_left <= j and j <= i + shift + window_right (shift = k_len - q_len).
struct QuerySpan {
  int begin, end;
};

__device__ __forceinline__ QuerySpan query_span(const VarlenFwdParams& f, const Seq& s, int pos_lo, int pos_hi) {
  const int shift = s.k_len - s.q_len;
  QuerySpan q;
  q.begin = f.window_right < 0 ? 0 : max(0, pos_lo - shift - static_cast<int>(f.window_right));
  q.end = f.window_left < 0 ? s.q_len : min(s.q_len, pos_hi - shift + static_cast<int>(f.window_left) + 1);
  return q;
}

// The key slots query head h walks in sequence b: with kept-key lists (BwdParams::keys) slot c is the c-th key the mask
// keeps, else slot c is key position c.
struct KeySlots {
  const int32_t* list = nullptr;  // the sorted kept key positions of the sequence, or null
  int n;                          // slots: kept keys, or k_len

  __device__ __forceinline__ KeySlots(const BwdParams& p, const Seq& s, int b, int h) : n(s.k_len) {
    if (p.keys.index == nullptr) return;
    const int l = p.keys.list(h);
    list = p.keys.index + static_cast<int64_t>(l) * p.f.total_k + s.k_start;
    n = p.keys.kept(b, l, s.k_len);
  }
  // Key position of slot c < n, clamped into the sequence (KeyLists::clamp_pos): no list moves a read out of it.
  __device__ __forceinline__ int pos(int c, int k_len) const {
    if (list == nullptr) return c;
    return KeyLists::clamp_pos(list[c], k_len);
  }
  // Slots whose key position is < limit (a whole warp calls it: sm80::slots_before).
  __device__ __forceinline__ int before(int limit, int lane) const { return sm80::slots_before(list, n, limit, lane); }
};

// Key tile `tile` (slots [tile kBlockN, + kBlockN)) of a KV head in sequence s, ks that head's slots: its first slot
// c0, its slots `keys` (<= 0: past the last slot), and the query rows [span.begin, span.end) a window lets see one of
// them (query_span of its first and last slots' positions), walked as tiles_per_head query tiles of kBlockM rows from
// span.begin per query head (0: the tile sees no query, or has no slot). The sm90a backward's CTA runs it, and its
// launch order (bwd::CtaOrder, run_varlen_bwd.cu) ranks the CTAs by it: one source for both.
struct KeyTile {
  int c0, keys;
  QuerySpan span;
  int tiles_per_head;
};

template <int kBlockM, int kBlockN>
__device__ __forceinline__ KeyTile key_tile(const VarlenFwdParams& f, const Seq& s, const KeySlots& ks, int tile) {
  KeyTile kt;
  kt.c0 = tile * kBlockN;
  kt.keys = min(kBlockN, ks.n - kt.c0);
  if (kt.keys <= 0) {  // no slot: no list entry read
    kt.span = QuerySpan{0, 0};
    kt.tiles_per_head = 0;
    return kt;
  }
  kt.span = query_span(f, s, ks.pos(kt.c0, s.k_len), ks.pos(kt.c0 + kt.keys - 1, s.k_len));
  kt.tiles_per_head = kt.span.end > kt.span.begin ? (kt.span.end - kt.span.begin + kBlockM - 1) / kBlockM : 0;
  return kt;
}

// A thread's shares of two keys' bias gradient summed across its quad (the four lanes t holding the keys' columns);
// every lane gets the sums. A whole warp calls it.
__device__ __forceinline__ void quad_sum(float& db_a, float& db_b) {
  db_a += __shfl_xor_sync(0xffffffffu, db_a, 1);
  db_a += __shfl_xor_sync(0xffffffffu, db_a, 2);
  db_b += __shfl_xor_sync(0xffffffffu, db_b, 1);
  db_b += __shfl_xor_sync(0xffffffffu, db_b, 2);
}

// Query head h's key-side bias gradient of a thread's two keys (its accumulator rows key_a and key_b, -1 or past
// k_len: none), whose columns the four lanes t of a quad hold in shares: the shares are summed across the quad and lane
// t == 0 writes dbias[(k_start + key) * H + h]. A whole warp calls it.
__device__ __forceinline__ void store_dbias_pair(const BwdParams& p, const Seq& s, int h, int t, int key_a, int key_b,
                                                 float db_a, float db_b) {
  quad_sum(db_a, db_b);
  const int64_t heads = p.f.num_heads;
  if (t == 0 && key_a < s.k_len) p.dbias[(static_cast<int64_t>(s.k_start) + key_a) * heads + h] = db_a;
  if (t == 0 && key_b < s.k_len) p.dbias[(static_cast<int64_t>(s.k_start) + key_b) * heads + h] = db_b;
}

// The key positions of the rows of a 64-slot tile that this thread copies (sm80::RowLoader's rows r0 + i * kStep),
// fetched ahead of the copy so that the gather does not wait on the list; -1: past the tile's last slot (zero-filled).
template <typename Traits>
struct SlotRows {
  using Loader = sm80::RowLoader<Traits>;
  static constexpr int kStep = Loader::kRowStep, kCount = Traits::kBlockN / kStep;
  static_assert(Traits::kBlockN % kStep == 0, "every thread copies the same number of rows");
  int pos[kCount];

  __device__ __forceinline__ void fetch(const KeySlots& ks, int slot0, int end, int k_len) {
    const int r0 = static_cast<int>(threadIdx.x) / Loader::kLoadCols;
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      const int slot = slot0 + r0 + i * kStep;
      pos[i] = slot < end ? ks.pos(slot, k_len) : -1;
    }
  }
};

// Rows of head `head` of a (rows, heads, D) tensor gathered into a swizzled 64-row tile: tile row r0 + i * kStep is
// row first + rows.pos[i] (zero-filled without a read where pos is -1).
template <typename Traits>
__device__ __forceinline__ void gather_tile(typename Traits::Elem* smem, const void* base, int64_t row_stride,
                                            int64_t head_stride, int64_t first, int head,
                                            const SlotRows<Traits>& rows) {
  using Elem = typename Traits::Elem;
  using Loader = sm80::RowLoader<Traits>;
  const int r0 = static_cast<int>(threadIdx.x) / Loader::kLoadCols, col = (threadIdx.x % Loader::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
  const Elem* col0 = static_cast<const Elem*>(base) + first * row_stride + head * head_stride + col;
#pragma unroll
  for (int i = 0; i < SlotRows<Traits>::kCount; ++i) {
    const int r = r0 + i * SlotRows<Traits>::kStep;
    const bool valid = rows.pos[i] >= 0;
    sm80::cp_async_16(smem + Traits::template smem_offset<Traits::kBlockN>(r, col),
                      valid ? static_cast<const void*>(col0 + rows.pos[i] * row_stride) : base, valid);
  }
}

// Rows [first, first + kBlockM) of head `head` of a (rows, heads, D) tensor into a swizzled shared tile; rows at or
// past `valid` (relative to first) are zero-filled without a read.
template <typename Traits>
__device__ __forceinline__ void load_tile(typename Traits::Elem* smem, const void* base, int64_t row_stride,
                                          int64_t head_stride, int64_t first, int head, int valid) {
  using Elem = typename Traits::Elem;
  const Elem* first_row = static_cast<const Elem*>(base) + first * row_stride + head * head_stride;
  sm80::load_rows<Traits, Traits::kBlockM>(smem, first_row, row_stride, valid, base);
}

// The probability of one score (scale * q.k, before softcap and bias) of a visible (query, key) pair, and the
// softcap's slope d capped / d x (1 without one). Hidden pairs are 0 by the caller's select.
template <bool kSoftcap>
__device__ __forceinline__ float probability(const VarlenFwdParams& p, float x, float bias2, float lse2,
                                             float& slope) {
  if constexpr (kSoftcap) {
    const float capped = capped_score(p, x);
    const float t = capped / p.softcap;
    slope = 1.f - t * t;
    x = capped;
  }
  return exp2f(fmaf(x, kLog2e, bias2) - lse2);
}

// Per-lane ldmatrix byte addresses of the first fragment of a 64-row tile, for each role a tile plays in
// ../sm80/tile_mma.cuh: the A operand of score_tile (rows of the warp), the B operand of score_tile, and the B
// operand of accumulate_pv (read transposed).
template <typename Traits>
struct LaneAddress {
  static __device__ __forceinline__ uint32_t a(const void* tile, int warp_row0, int lane) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(tile)) +
           2 * Traits::template smem_offset<Traits::kBlockM>(warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                             (lane >> 4) * 8);
  }
  static __device__ __forceinline__ uint32_t b(const void* tile, int lane) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(tile)) +
           2 * Traits::template smem_offset<Traits::kBlockN>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
  }
  static __device__ __forceinline__ uint32_t b_trans(const void* tile, int lane) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(tile)) +
           2 * Traits::template smem_offset<Traits::kBlockN>((lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8);
  }
};

// Accumulator fragments (rows warp_row0 + g (+ 8), columns 8 dt + 2 t (+ 1)) times `scale`, as 16-bit pairs into
// tile rows [0, valid) of head `head` of a contiguous (rows, heads, D) tensor: tile row r is row first + r, or with
// `pos` (a shared-memory list of the tile's key positions) row first + pos[r].
template <typename Traits>
__device__ __forceinline__ void store_rows(void* base, int64_t first, int heads, int head, int valid,
                                           const float (&acc)[1][Traits::kDTiles][4], float scale, int warp_row0,
                                           int lane, const int32_t* pos = nullptr) {
  using Elem = typename Traits::Elem;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp_row0 + g + 8 * half;
    if (r >= valid) continue;
    const int64_t row = first + (pos != nullptr ? pos[r] : r);
    Elem* dst = static_cast<Elem*>(base) + (row * heads + head) * Traits::kHeadDim + 2 * t;
#pragma unroll
    for (int dt = 0; dt < Traits::kDTiles; ++dt) {
      *reinterpret_cast<uint32_t*>(dst + dt * 8) =
          sm80::ElemTraits<Elem>::pack(acc[0][dt][2 * half] * scale, acc[0][dt][2 * half + 1] * scale);
    }
  }
}

// Element `high` (0 or 1) of a pair that ElemTraits<Elem>::pack made, as float32.
template <typename Elem>
__device__ __forceinline__ float unpack(uint32_t pair, int high);
template <>
__device__ __forceinline__ float unpack<__nv_bfloat16>(uint32_t pair, int high) {
  return __uint_as_float(high ? pair & 0xffff0000u : pair << 16);
}
template <>
__device__ __forceinline__ float unpack<__half>(uint32_t pair, int high) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(high ? pair >> 16 : pair & 0xffffu)));
}

template <int kDTiles>
__device__ __forceinline__ void zero(float (&acc)[1][kDTiles][4]) {
#pragma unroll
  for (int dt = 0; dt < kDTiles; ++dt) acc[0][dt][0] = acc[0][dt][1] = acc[0][dt][2] = acc[0][dt][3] = 0.f;
}

}  // namespace dmattn::cuda::bwd
