// score_operands.cuh: turning the raw Q K^T tile into scores: the softmax scale, the bias and the mask (key-side,
// query-side or absent; ../../varlen_fwd_params.h holds the one addressing rule, ScoreOperand::offset) and the
// causal limit, plus the tile-level questions they answer: can any row see this KV tile at all (a query-side mask
// may hide it whole: then it is skipped before K / V are loaded), and does it hide some key from some row.
//
// Key-side operands arrive per slot through the tile metadata (kv_tiles.cuh): the mask as the kept-key list that
// defines the slots, the bias in key_bias. Query-side ones are read here, per element, by the kernel variant built
// for them (Traits::kQueryOperands).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../score_operand.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
struct ScoreOperands {
  static constexpr int kBlockN = Traits::kBlockN, kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles;

  const VarlenFwdParams& p;
  const TileContext& c;
  bool query_mask, query_bias, key_bias;
  float scale;

  __device__ __forceinline__ ScoreOperands(const VarlenFwdParams& p_, const TileContext& c_)
      : p(p_),
        c(c_),
        query_mask(Traits::kQueryOperands && p_.mask.layout == OperandLayout::kQuerySide),
        query_bias(Traits::kQueryOperands && p_.bias.layout == OperandLayout::kQuerySide),
        key_bias(p_.bias.layout == OperandLayout::kKeySide),
        scale(p_.softmax_scale) {}

  // A KV tile is live unless a query-side mask is False for every (row, key) of it the rows can see. CTA-wide.
  __device__ __forceinline__ bool tile_live(int n) const {
    if (!query_mask) return true;
    bool any = false;
    const int n0 = n * kBlockN;
    for (int e = threadIdx.x; e < c.rows * kBlockN && !any; e += Traits::kThreads) {
      const int r = e / kBlockN, slot = n0 + e % kBlockN;
      if (slot >= c.slots_end) continue;
      const int pos = c.key_pos(slot), i = c.m0 + r;
      if (p.is_causal && pos >= i + c.causal_shift) continue;
      any = p.mask.mask_allows(p.mask.offset(static_cast<int64_t>(c.q_start) + i, c.h, pos));
    }
    return __syncthreads_or(any) != 0;
  }
  // The first live tile at or after n (n_tiles when none). CTA-wide.
  __device__ __forceinline__ int next_live(int n, int n_tiles) const {
    while (n < n_tiles && !tile_live(n)) ++n;
    return n;
  }

  // Whether some row of the tile starting at slot n0 cannot see some key of it (the causal diagonal, a query-side
  // mask). Slots past the last one are zero-filled, so a tail tile alone does not count.
  __device__ __forceinline__ bool hides_keys(int n0) const {
    return query_mask || (p.is_causal && n0 + kBlockN > c.slots_full && c.slots_full < c.slots_end);
  }

  // s[mt][nt]: the m16n8 fragments of Q K^T for the tile starting at slot n0 (rows warp_row0 + 16 mt, slots 8 nt);
  // key_pos / slot_bias: its metadata buffer. Makes s scale * q.k + bias, -inf where the row cannot see the key, and
  // returns score_mul: a tile every row sees whole, with no bias, keeps its raw scores (the scale is folded into the
  // softmax FFMAs) and returns the scale; every other tile returns 1.
  __device__ __forceinline__ float apply(float (&s)[kMTiles][kNTiles][4], int n0, const int32_t* key_pos,
                                         const float* slot_bias, int warp_row0, int g, int t) const {
    return apply_tile(s, n0, slot_bias, t, [&] {
      // The causal diagonal, the last (partial) tile, or query-side operands: per element.
      int limit[kMTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp_row0 + mt * 16 + g + half * 8, i = c.m0 + r;
          limit[mt][half] = r < c.rows ? (p.is_causal ? i + c.causal_shift : c.k_len) : 0;
        }
      per_element(s, key_pos, slot_bias, limit, t);
      if constexpr (Traits::kQueryOperands) query_operands(s, key_pos, limit, warp_row0, g, t);
    });
  }

  // The same for a kernel whose rows are not a tile's consecutive queries (the decode kernel's packed rows): the
  // caller gives each row's key limit (keys at or past it are hidden; 0 for rows past the tile), and s / key_pos /
  // slot_bias cover the kNTiles * 8 slots of this warp.
  __device__ __forceinline__ float apply(float (&s)[kMTiles][kNTiles][4], int n0, const int32_t* key_pos,
                                         const float* slot_bias, const int (&limit)[kMTiles][2], int t) const {
    static_assert(!Traits::kQueryOperands, "query-side operands need the tile's query rows");
    return apply_tile(s, n0, slot_bias, t, [&] { per_element(s, key_pos, slot_bias, limit, t); });
  }

 private:
  // Tiles every row sees whole take the scale and a key-side bias (or nothing: raw_scores); others per_tile().
  template <typename PerElement>
  __device__ __forceinline__ float apply_tile(float (&s)[kMTiles][kNTiles][4], int n0, const float* slot_bias, int t,
                                              PerElement&& per_tile) const {
    const bool whole_tile = n0 + kBlockN <= c.slots_full && !query_mask && !query_bias;
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

  // Pass 1 (key slots outer, so each slot's position and bias are read once): scale, key-side bias, -inf where the
  // slot is empty or at / past the row's limit. Few registers live beside O and S.
  __device__ __forceinline__ void per_element(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                              const float* slot_bias, const int (&limit)[kMTiles][2], int t) const {
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
            x = pos < 0 || pos >= limit[mt][half] ? -INFINITY : x * scale + kb;
          }
      }
  }

  // Pass 2, query-side operands only, on the keys pass 1 left visible (in [0, limit): in bounds). A score that is
  // -inf by itself (an inf in k) still takes its bias: -inf + NaN or + inf is NaN, as the contract says.
  __device__ __forceinline__ void query_operands(float (&s)[kMTiles][kNTiles][4], const int32_t* key_pos,
                                                 const int (&limit)[kMTiles][2], int warp_row0, int g, int t) const {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t qrow = static_cast<int64_t>(c.q_start) + c.m0 + warp_row0 + mt * 16 + g + half * 8;
        const int64_t mask_row = query_mask ? p.mask.row_start(qrow, c.h) : 0;
        const int64_t bias_row = query_bias ? p.bias.row_start(qrow, c.h) : 0;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e2 = 0; e2 < 2; ++e2) {
            float& x = s[mt][nt][2 * half + e2];
            const int pos = key_pos[nt * 8 + 2 * t + e2];
            if (pos < 0 || pos >= limit[mt][half]) continue;  // hidden: x is -inf already
            if (query_mask && !p.mask.mask_allows(p.mask.column(mask_row, pos))) {
              x = -INFINITY;  // hidden: its bias is not read (it may be NaN)
            } else if (query_bias) {
              x += bias_value(p.bias, p.bias.column(bias_row, pos));
            }
          }
      }
  }
};

}  // namespace dmattn::cuda::sm80
