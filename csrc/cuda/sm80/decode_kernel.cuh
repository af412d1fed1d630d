// decode_kernel.cuh: the sm80-path decode kernel (flash-decoding on SM80 tensor-core atoms): few queries per
// sequence, many keys. Three things make it read K / V at bandwidth where the prefill kernel cannot:
//   packed GQA   one CTA holds the G = H / Hk query heads of a KV head times the sequence's queries as its rows
//                (DecodeTileScheduler, tile_scheduler.cuh), so each K / V row is read once per KV head, not per query
//                head; the key-side mask and bias are then one per tile (the plan sends Hm = H to the prefill
//                kernel, heuristics.h); query-side ones are read by their own variant (Traits::kQueryOperands) as
//                terms gathered along the kept-key lists (QueryTerms, ../passes.h: one aligned run per query and
//                tile, copied into the tile's stage with its K / V), the keys no query may see skipped as a
//                key-side mask's
//   split-KV     the key slots of a (sequence, KV head) are cut into splits of whole KV tiles, one CTA each, so a
//                batch of a few long sequences still fills the GPU; splits write float32 partials that
//                combine_splits (../split_combine.cu) merges through their maxima and sums, or (where the plan
//                says so: FwdPlan::combine_in_kernel) the unit's last split CTA merges itself, with the same
//                arithmetic (../split_merge.cuh), while the partials are in L2
//   a deep ring  kStages K / V tiles in flight (cp.async), gathered at the kept keys of a key-side mask, so the time
//                falls with the kept fraction
// The warps split each KV tile (16 keys each, every warp holding all the tile's rows) and keep their own running
// max / sum / O, merged once at the end through shared memory. The per-concern pieces are the prefill kernel's:
// KvTiles (loads and slot metadata), tile_mma, ScoreOperands, OnlineSoftmax, nonfinite_v.
//
// Per KV tile n (ring stage n % kStages, metadata slot n % kMetaSlots):
//   wait tile n -> issue the loads of tile n + kStages - 1 and the metadata loads of tiles n + kStages (bias) and
//   n + kStages + 1 (position) -> S = Q K^T (this warp's keys) -> score operands -> online softmax -> O += P V
//   -> store the metadata of tile n + kStages
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>

#include "../dependent_launch.cuh"
#include "../heuristics.h"
#include "../passes.h"
#include "../split_merge.cuh"
#include "kernel_traits.h"
#include "kv_tiles.cuh"
#include "nonfinite_v.cuh"
#include "online_softmax.cuh"
#include "score_operands.cuh"
#include "tile_mma.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

// The Q tile: packed row r is query d.query(r) of head d.head(r), so each row has its own address.
template <typename Traits>
__device__ __forceinline__ void load_packed_q(const VarlenFwdParams& p, const DecodeTile& d,
                                              typename Traits::Elem* smem) {
  using Elem = typename Traits::Elem;
  using L = RowLoader<Traits>;
  const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
  const Elem* q = static_cast<const Elem*>(p.q);
#pragma unroll 1
  for (int r = r0; r < Traits::kBlockM; r += L::kRowStep) {
    const bool valid = r < d.c.rows;
    const Elem* src = valid ? q + static_cast<int64_t>(d.c.q_start + d.query(r)) * p.q_row_stride +
                                  static_cast<int64_t>(d.head(r)) * p.q_head_stride + col
                            : q;
    cp_async_16(smem + Traits::template smem_offset<Traits::kBlockM>(r, col), src, valid);
  }
}

// The end of a CTA: the warps' rows merged (max, sum, O rescaled to the CTA's max), then out and lse, or this split's
// partial max, sum and O (normalized by the split's own sum). Every warp reaches it after the last barrier of the loop.
template <typename Traits>
__device__ __forceinline__ void store_decode_tile(const VarlenFwdParams& p, const DecodeTile& d,
                                                  const SplitPartials& splits,
                                                  const float (&o)[Traits::kMTiles][Traits::kDTiles][4],
                                                  const OnlineSoftmax<Traits::kMTiles, Traits::kNTiles>& softmax,
                                                  unsigned poisoned_rows, typename Traits::SharedStorage& smem) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM, kHeadDim = Traits::kHeadDim, kWarps = Traits::kWarps;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const TileContext& c = d.c;
  const bool split = splits.num_splits > 1;

  // 1. Each warp's view of its rows: max, sum, poisoned, and O (unnormalized, relative to its own max).
#pragma unroll
  for (int mt = 0; mt < Traits::kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = softmax.row_total(mt, half);
      const bool poisoned = quad_poisoned(poisoned_rows, 2 * mt + half, lane);
      const int r = mt * 16 + g + half * 8;
      if (t == 0) {
        smem.row_max[warp][r] = softmax.row_max[mt][half];
        smem.row_sum[warp][r] = l;
        smem.row_poisoned[warp][r] = poisoned;
      }
      float* dst = smem.reduce.o[warp][r];
#pragma unroll
      for (int dt = 0; dt < Traits::kDTiles; ++dt) {
        *reinterpret_cast<float2*>(dst + dt * 8 + 2 * t) = make_float2(o[mt][dt][2 * half], o[mt][dt][2 * half + 1]);
      }
    }
  }
  __syncthreads();

  // 2. Per row: the CTA's max m, each warp's factor exp(m_w - m), the sum l; lse; each warp's coefficient in out.
  //    A warp that saw nothing (m_w = -inf) has factor 0, which keeps a NaN sum (a NaN score) NaN: 0 * NaN.
  if (tid < kBlockM) {
    const int r = tid;
    float m = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, smem.row_max[w][r]);
    float f[kWarps], l = 0.f;
    bool poisoned = false;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float mw = smem.row_max[w][r];
      f[w] = mw == -INFINITY ? 0.f : mw == m ? 1.f : exp2f((mw - m) * kLog2e);
      l += f[w] * smem.row_sum[w][r];
      poisoned |= smem.row_poisoned[w][r] != 0;
    }
    // A split leaves the sink to combine_splits (it joins once per row); an unsplit row takes it here.
    const RowEnd end = finish_row(m, l, poisoned, split || r >= c.rows ? -INFINITY : p.sink(d.head(r)));
#pragma unroll
    for (int w = 0; w < kWarps; ++w) smem.row_coef[w][r] = f[w] * end.inv;
    const float lse = end.lse;
    smem.row_lse[r] = lse;
    if (r < c.rows) {
      const int64_t row = static_cast<int64_t>(c.q_start) + d.query(r);
      const int h = d.head(r);
      if (split) {  // max and sum apart: combine_splits weighs the splits by their sums (passes.h)
        const int64_t at = (static_cast<int64_t>(d.split) * p.num_heads + h) * p.total_q + row;
        // -inf: saw nothing; NaN: a NaN score (m may still be -inf then: fmaxf drops NaN, so the max alone would
        // read as a split that saw nothing).
        splits.max[at] = lse == -INFINITY || lse != lse ? lse : m;
        splits.sum[at] = l;
      } else {
        p.lse[static_cast<int64_t>(h) * p.total_q + row] = lse;
      }
    }
  }
  __syncthreads();

  // 3. out (or the split's O), two columns per thread and step: sum over the warps of coefficient x O.
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll 1
  for (int e = tid; e < kBlockM * kHeadDim / 2; e += Traits::kThreads) {
    const int r = e / (kHeadDim / 2), col = e % (kHeadDim / 2) * 2;
    if (r >= c.rows || (split && smem.row_lse[r] == -INFINITY)) continue;  // a split that saw nothing: lse only
    float x0 = 0.f, x1 = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float coef = smem.row_coef[w][r];
      const float2 v = *reinterpret_cast<const float2*>(&smem.reduce.o[w][r][col]);
      x0 += coef * v.x;
      x1 += coef * v.y;
    }
    const int64_t row = static_cast<int64_t>(c.q_start) + d.query(r);
    const int h = d.head(r);
    if (split) {
      const int64_t at = ((static_cast<int64_t>(d.split) * p.num_heads + h) * p.total_q + row) * kHeadDim + col;
      *reinterpret_cast<float2*>(splits.o + at) = make_float2(x0, x1);
    } else {
      *reinterpret_cast<uint32_t*>(out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride + col) =
          ElemTraits<Elem>::pack(x0, x1);
    }
  }
}

// The (row, head) pairs of a unit merged kLanes lanes each (split_merge.cuh, as combine_splits merges them with the
// same lanes), kThreads / kLanes pairs per pass: the maxima and sums from the unit's copy in shared memory (split s,
// row r at s * kBlockM + r), O from global memory past L1.
template <typename Traits, int kLanes>
__device__ __forceinline__ void merge_unit_rows(const VarlenFwdParams& p, const DecodeTile& d,
                                                const SplitPartials& splits, const float* unit_max,
                                                const float* unit_sum) {
  constexpr int kBlockM = Traits::kBlockM, kHeadDim = Traits::kHeadDim;
  constexpr int kPairsPerPass = Traits::kThreads / kLanes, kVecs = kHeadDim / (4 * kLanes);
  static_assert(kBlockM % kPairsPerPass == 0 && kVecs * 4 * kLanes == kHeadDim, "whole passes, whole columns");
  const TileContext& c = d.c;
  const int gl = threadIdx.x % kLanes;
  const int64_t split_stride = static_cast<int64_t>(p.num_heads) * p.total_q;  // rows between splits
#pragma unroll 1
  for (int r0 = 0; r0 < c.rows; r0 += kPairsPerPass) {  // CTA-uniform: every lane of a warp calls merge_pair
    const int r = r0 + static_cast<int>(threadIdx.x) / kLanes;  // < kBlockM: passes divide the tile
    const bool mine = r < c.rows;
    const int64_t row = mine ? static_cast<int64_t>(c.q_start) + d.query(r) : 0;
    const int h = mine ? d.head(r) : 0;
    const int64_t at = static_cast<int64_t>(h) * p.total_q + row;  // split 0's index of the pair
    const split_merge::PairPartials pp{unit_max + r, unit_sum + r, kBlockM,
                                       reinterpret_cast<const float4*>(splits.o + at * kHeadDim),
                                       split_stride * kHeadDim / 4, row, h};
    split_merge::merge_pair<typename Traits::Elem, kLanes, kVecs, true>(p, pp, splits.num_splits, mine, gl);
  }
}

// The end of a split CTA where the kernel merges its own splits (SplitPartials::tickets): the unit's participants are
// its splits with KV tiles (split 0 alone where none has; it then wrote nothing). Where there are several, each
// fences its partials and takes a ticket, and the one that takes the last merges; a lone participant merges at once.
// The merge copies the unit's maxima and sums into shared memory (the tiles' memory: the loop is over), read past L1
// (another CTA of this SM may have brought a line of them into L1 before its writer wrote it: a neighbouring unit's
// rows share lines), then merges each (row, head) pair. The splits after the participants wrote nothing and read as
// splits that saw nothing (max -inf), as their -inf partials read in combine_splits: the same bits. Nothing is
// written where order_decode_units found the cu_seqlens contract broken (it wrote NaN over every row instead).
// Every thread of the CTA calls it, after its last write of partials.
template <typename Traits>
__device__ __forceinline__ void merge_unit_if_last(const VarlenFwdParams& p, const DecodeTile& d,
                                                   const SplitPartials& splits,
                                                   typename Traits::SharedStorage& smem) {
  constexpr int kBlockM = Traits::kBlockM;
  const TileContext& c = d.c;
  const int participants = d.busy_splits > 1 ? d.busy_splits : 1;
  if (participants > 1) {
    __threadfence();  // this thread's partials, device-wide, before the CTA's ticket
    __syncthreads();
    bool last = false;
    if (threadIdx.x == 0) {
      const int64_t unit = (static_cast<int64_t>(d.b) * p.num_heads_k + c.hk) * splits.row_tiles + c.m0 / kBlockM;
      last = atomicAdd(splits.tickets + unit, 1u) == static_cast<unsigned>(participants - 1);
      __threadfence();  // the other participants' partials are read after their tickets
    }
    if (__syncthreads_or(last) == 0) return;
  } else {
    __syncthreads();  // the CTA's own partials, written by all its threads, are read by others below
  }

  // The unit's maxima and sums, (split, row): thread t takes row t % kBlockM of splits t / kBlockM + k x kSplitStep,
  // kBatch of them with their loads in flight together. A sum is read beside its max, used only where the max is not
  // -inf (a split that saw nothing wrote no sum).
  static_assert(2 * kMaxDecodeSplits * kBlockM * sizeof(float) <= sizeof(typename Traits::Tiles),
                "the unit's maxima and sums fit the tiles' memory");
  float* unit_max = reinterpret_cast<float*>(&smem.tiles);
  float* unit_sum = unit_max + kMaxDecodeSplits * kBlockM;
  constexpr int kSplitStep = Traits::kThreads / kBlockM, kBatch = 4;
  const int n = splits.num_splits, r = static_cast<int>(threadIdx.x) % kBlockM;
  const bool row = r < c.rows;
  const int64_t split_stride = static_cast<int64_t>(p.num_heads) * p.total_q;  // rows between splits
  const int64_t at0 = row ? static_cast<int64_t>(d.head(r)) * p.total_q + c.q_start + d.query(r) : 0;
  const int broken = __ldcg(splits.contract_broken);
#pragma unroll 1
  for (int s0 = static_cast<int>(threadIdx.x) / kBlockM; s0 < n; s0 += kBatch * kSplitStep) {
    float m[kBatch], l[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int s = s0 + u * kSplitStep;
      const bool read = row && s < d.busy_splits;
      m[u] = read ? __ldcg(splits.max + at0 + s * split_stride) : -INFINITY;
      l[u] = read ? __ldcg(splits.sum + at0 + s * split_stride) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int s = s0 + u * kSplitStep;
      if (s < n) {
        unit_max[s * kBlockM + r] = m[u];
        unit_sum[s * kBlockM + r] = l[u];
      }
    }
  }
  __syncthreads();
  if (broken != 0) return;
  if constexpr (Traits::kHeadDim >= 128) {
    if (splits.merge_lanes == kCombineWideLanes) {
      merge_unit_rows<Traits, kCombineWideLanes>(p, d, splits, unit_max, unit_sum);
      return;
    }
  }
  merge_unit_rows<Traits, kCombineLanes>(p, d, splits, unit_max, unit_sum);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads)
decode_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
              const __grid_constant__ SplitPartials splits, int seq0) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;
  constexpr int kStages = Traits::kStages, kMetaSlots = Traits::kMetaSlots, kWarpKeys = Traits::kWarpKeys;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  wait_for_prior_grid();  // the lists and the unit order come from the passes just before (dependent_launch.cuh)
  DecodeTile d;
  if (!DecodeTileScheduler<kBlockM, kBlockN>::template tile<!Traits::kQueryOperands>(p, keys, splits, seq0, lane, d)) {
    return;
  }
  const TileContext& c = d.c;
  // The kernel merges its own splits (SplitPartials::tickets): only in the variant without query-side terms.
  constexpr bool kMayMerge = !Traits::kQueryOperands;
  if (d.tile_begin >= d.tile_end && splits.num_splits > 1) {
    if constexpr (kMayMerge) {
      if (splits.tickets != nullptr) {  // nothing to write: the merge reads the splits past the busy ones as empty
        if (d.split == 0 && d.busy_splits == 0) merge_unit_if_last<Traits>(p, d, splits, smem);
        return;
      }
    }
    // A split with no KV tile (past its sequence's kept keys): its rows' partial max is -inf, sum and O unread.
    for (int r = tid; r < c.rows; r += Traits::kThreads) {
      splits.max[(static_cast<int64_t>(d.split) * p.num_heads + d.head(r)) * p.total_q + c.q_start + d.query(r)] =
          -INFINITY;
    }
    return;
  }
  const BlockMap no_block_map;  // a query-side mask's kept keys are its kept-key list here (compact_keys)
  const ScoreOperands<Traits> ops(p, c, no_block_map);
  KvTiles<Traits> kv(p, c, smem);
  // Query-side terms: the runs of this tile's list head from its sequence's segment on, for the row tile's queries
  // (a run of rows within one head, or every query once the rows wrap to the next head).
  TermRuns runs{};
  if constexpr (Traits::kQueryOperands) {
    const QueryTerms& terms = keys.terms;
    const int64_t first = terms.run(keys.list(c.h), 0, QueryTerms::segment(c.k_start, d.b));
    runs.f32 = terms.f32;
    runs.base = static_cast<const char*>(terms.values) + first * runs.esize();
    runs.extent = terms.extent;
    runs.smem = smem_raw + sizeof(typename Traits::SharedStorage);
    runs.first_query = c.m0 % c.q_len;
    runs.n_queries = min(c.rows, c.q_len);
    runs.q_len = c.q_len;
    runs.queries = Traits::term_queries(p);
    runs.template set_ring_rows<kMTiles>(g);
  }

  // Each row sees the key positions [low, limit) (its window; 0 / 0 for rows past the tile).
  int low[kMTiles][2], limit[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = mt * 16 + g + half * 8;
      const bool row = r < c.rows;
      low[mt][half] = row ? c.window_low(p, d.query(r)) : 0;
      limit[mt][half] = row ? c.window_limit(p, d.query(r)) : 0;
    }

  // ---- Prologue: Q, the metadata of the first kStages tiles, the K / V of the first kStages - 1 ----
  load_packed_q<Traits>(p, d, smem.tiles.q);
  kv.template fetch_store_first<kStages>(d.tile_begin, d.tile_end);
  kv.prime_ahead(d.tile_begin + kStages, d.tile_end);
  __syncthreads();  // the gathers read the positions
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (d.tile_begin + i < d.tile_end) {
      kv.load_kv_into(smem.tiles.k[i], smem.tiles.v[i], d.tile_begin + i, i);
      if constexpr (Traits::kQueryOperands) runs.template load<Traits::kThreads, kBlockN>(i, d.tile_begin + i);
    }
    cute::cp_async_fence();  // one group per stage, empty or not, so the wait below counts stages
  }

  float o[kMTiles][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  OnlineSoftmax<kMTiles, kNTiles> softmax;
  unsigned poisoned_rows = 0;  // bit 2 mt + half: this lane saw that row give weight to a key whose V held inf / NaN

  // Per-lane ldmatrix byte offsets of the first fragment: Q (all rows), and this warp's 16 keys of a K / V tile.
  constexpr uint32_t kTileBytes = kBlockN * kHeadDim * sizeof(typename Traits::Elem);
  const uint32_t q_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.tiles.q)) +
                          2 * Traits::template smem_offset<kBlockM>((lane & 7) + ((lane >> 3) & 1) * 8,
                                                                    (lane >> 4) * 8);
  const uint32_t k_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.tiles.k[0])) +
                          2 * Traits::template smem_offset<kBlockN>((lane & 7) + (lane >> 4) * 8,
                                                                    ((lane >> 3) & 1) * 8);
  const uint32_t v_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.tiles.v[0])) +
                          2 * Traits::template smem_offset<kBlockN>((lane & 7) + ((lane >> 3) & 1) * 8,
                                                                    (lane >> 4) * 8);

#pragma unroll 1
  for (int n = d.tile_begin, it = 0; n < d.tile_end; ++n, ++it) {
    const int stage = it % kStages, meta = it % kMetaSlots;
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();  // tile n (and Q) landed; every warp is done with tile n - 1, whose stage is reloaded now
    {
      const int ahead = it + kStages - 1;
      if (n + kStages - 1 < d.tile_end) {
        kv.load_kv_into(smem.tiles.k[ahead % kStages], smem.tiles.v[ahead % kStages], n + kStages - 1,
                        ahead % kMetaSlots);
        if constexpr (Traits::kQueryOperands) {
          runs.template load<Traits::kThreads, kBlockN>(ahead % kStages, n + kStages - 1);
        }
      }
      cute::cp_async_fence();
    }
    // The metadata of tile n + kStages (its position arrived during the previous iteration): the bias load is issued
    // now and stored at the end of this iteration, into the slot of tile n - 1; a gathered tile's two dependent
    // loads never stall the compute (with a key-side mask and bias they cost a tile's time when they did).
    const bool fetch = n + kStages < d.tile_end;
    if (fetch) kv.fetch_pipelined(n + kStages, d.tile_end);

    // ---- S = Q K^T over this warp's keys: s[mt][nt] is the m16n8 fragment (rows 16 mt, keys 16 warp + 8 nt) ----
    float s[kMTiles][kNTiles][4];
    score_tile<Traits>(s, q_lane, k_lane + stage * kTileBytes, warp);

    // ---- Scores: scale, bias, and -inf where a key is not visible ----
    bool saw_hidden = false;  // query-side terms: this thread's terms hid a key from a row that could see it
    const float score_mul = [&] {
      const int32_t* key_pos = smem.key_pos[meta] + warp * kWarpKeys;
      const float* key_bias = smem.key_bias[meta] + warp * kWarpKeys;
      if constexpr (Traits::kQueryOperands) {
        return ops.apply(s, n * kBlockN, key_pos, key_bias, low, limit, runs, stage, warp * kWarpKeys, d, g, t,
                         saw_hidden);
      } else {
        return ops.apply(s, n * kBlockN, key_pos, key_bias, low, limit, t);
      }
    }();
    // A tile whose V must be checked: it hides a key from a row by position, or (query-side terms) by a term. The
    // terms' vote replaces scanning every tile: a query-side mask that hides nothing in the tile costs no scan.
    const bool v_check = Traits::kQueryOperands
                             ? __syncthreads_or(saw_hidden) != 0 || ops.bounds_hide_keys(n * kBlockN)
                             : ops.hides_keys(n * kBlockN);
    const bool v_fix = v_check && tile_has_nonfinite<Traits>(smem.tiles.v[stage]);
    if (v_fix) {
      zero_nonfinite_rows<Traits>(smem.tiles.v[stage], smem.v_bad);
      __syncthreads();
    }

    // ---- P = exp(S - max), O rescaled ----
    softmax.update(s, score_mul, o);
    if (v_fix) mark_poisoned_rows(s, smem.v_bad + warp * kWarpKeys, t, poisoned_rows);

    // ---- O += P V over this warp's keys (its 16 probabilities per row: one k16 step) ----
    accumulate_pv<Traits>(o, s, v_lane + stage * kTileBytes, warp);
    if (fetch) kv.store((it + kStages) % kMetaSlots);  // tile n - 1's slot: its readers passed the barrier above
  }
  cute::cp_async_wait<0>();
  __syncthreads();  // every warp is done with the tiles: the merge reuses their shared memory

  store_decode_tile<Traits>(p, d, splits, o, softmax, poisoned_rows, smem);
  if constexpr (kMayMerge) {
    if (splits.tickets != nullptr) merge_unit_if_last<Traits>(p, d, splits, smem);
  }
}

}  // namespace dmattn::cuda::sm80
