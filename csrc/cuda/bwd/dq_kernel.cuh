// dq_kernel.cuh: dQ of one query tile (bwd_traits.h has the whole design).
//
// A CTA owns queries [m0, m_end) (64, or fewer at a sequence's start) of one query head of one sequence; warp w owns
// rows m0 + 16 w + [0, 16). With sQ, sdO in shared memory for the whole CTA it walks the key tiles its rows can see
// (the smallest first visible key to the largest limit over its rows; tiles whose keys the mask hides all are skipped
// after their loads), two tiles in flight. With kept-key lists (BwdParams::keys) a tile is 64 consecutive slots of
// the list, its K / V rows gathered (each thread's row positions fetched a tile ahead), so keys the mask removes are
// neither loaded nor multiplied.
// Per key tile:
//   S = Q K^T -> P (the rows' lse; hidden pairs 0) -> dP = dO V^T -> dS = P (dP - delta) -> dQ += dS K
// and dQ, times the softmax scale, is written once (deterministic).
#pragma once

#include <cuda_runtime.h>

#include <type_traits>

#include <cute/arch/copy_sm80.hpp>

#include "../sm80/tile_mma.cuh"
#include "bwd_common.cuh"

namespace dmattn::cuda::bwd {

template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    dq_kernel(const __grid_constant__ BwdParams p, int seq0, int tile0) {
  constexpr int kBlock = Traits::kBlockM, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;
  // Grid (query heads, sequences, query tiles from tile0), tiles counted from the end of the sequence (the last one
  // may be short): the tile is the slowest index, so under a causal mask the CTAs of the last queries, which see the
  // most keys, start first.
  const int h = blockIdx.x, b = seq0 + static_cast<int>(blockIdx.y);
  const Seq s(p.f, b);
  const int m_end = s.q_len - (tile0 + static_cast<int>(blockIdx.z)) * kBlock;
  if (m_end <= 0) return;
  const int m0 = max(0, m_end - kBlock);

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16;
  const int hk = h / (p.f.num_heads / p.f.num_heads_k);
  const int rows_here = m_end - m0;

  // ---- sQ, sdO: (64 queries, D) of this head; the two rows of this lane ----
  load_tile<Traits>(smem.a0, p.f.q, p.f.q_row_stride, p.f.q_head_stride, s.q_start + m0, h, rows_here);
  load_tile<Traits>(smem.a1, p.dout, p.dout_row_stride, p.dout_head_stride, s.q_start + m0, h, rows_here);
  cute::cp_async_fence();
  // This lane's two rows (a short first tile's rows past rows_here belong to the next tile: they see nothing here).
  const int row_a = warp_row0 + g, row_b = row_a + 8;
  const RowInfo ra = row_info(p, s, h, row_a < rows_here ? m0 + row_a : INT_MAX);
  const RowInfo rb = row_info(p, s, h, row_b < rows_here ? m0 + row_b : INT_MAX);

  // The keys any row of the tile sees: [min low, max limit) over the rows.
  if (tid == 0) {
    smem.span[0] = INT_MAX;
    smem.span[1] = 0;
  }
  __syncthreads();
  if (t == 0 && ra.low < ra.limit) {
    atomicMin(&smem.span[0], ra.low);
    atomicMax(&smem.span[1], ra.limit);
  }
  if (t == 0 && rb.low < rb.limit) {
    atomicMin(&smem.span[0], rb.low);
    atomicMax(&smem.span[1], rb.limit);
  }
  __syncthreads();
  const int first = smem.span[0], limit = smem.span[1];
  // The slots of those keys: [slot_begin, slot_end), walked in tiles of 64 (without lists from a multiple of 64).
  const KeySlots ks(p, s, b, h);
  const bool listed = ks.list != nullptr;
  int slot_begin = 0, slot_end = 0;
  if (first < limit) {
    slot_begin = listed ? ks.before(first, lane) : first / kBlock * kBlock;
    slot_end = listed ? ks.before(limit, lane) : limit;
  }
  const int n_tiles = slot_end > slot_begin ? (slot_end - slot_begin + kBlock - 1) / kBlock : 0;

  using Lane = LaneAddress<Traits>;
  const uint32_t q_lane = Lane::a(smem.a0, warp_row0, lane), do_lane = Lane::a(smem.a1, warp_row0, lane);
  float dq[1][kDTiles][4];
  zero(dq);

  // With lists: the row positions this thread copies of the next tile to issue, and (threads < 64) its slot's position.
  SlotRows<Traits> ahead;
  int ahead_pos = INT_MAX;
  auto fetch = [&](int n) {
    const int slot0 = slot_begin + n * kBlock;
    ahead.fetch(ks, slot0, slot_end, s.k_len);
    if (tid < kBlock) ahead_pos = slot0 + tid < slot_end ? ks.pos(slot0 + tid, s.k_len) : INT_MAX;
  };
  auto issue = [&](int n, int buf) {  // sK, sV and the keys' metadata of key tile n into buffer buf
    const int slot0 = slot_begin + n * kBlock;
    if (listed) {
      gather_tile<Traits>(smem.b0[buf], p.f.k, p.f.k_row_stride, p.f.k_head_stride, s.k_start, hk, ahead);
      gather_tile<Traits>(smem.b1[buf], p.f.v, p.f.v_row_stride, p.f.v_head_stride, s.k_start, hk, ahead);
    } else {
      const int keys = min(kBlock, slot_end - slot0);
      load_tile<Traits>(smem.b0[buf], p.f.k, p.f.k_row_stride, p.f.k_head_stride, s.k_start + slot0, hk, keys);
      load_tile<Traits>(smem.b1[buf], p.f.v, p.f.v_row_stride, p.f.v_head_stride, s.k_start + slot0, hk, keys);
    }
    cute::cp_async_fence();
    if (tid < kBlock) {
      const int j = listed ? ahead_pos : (slot0 + tid < slot_end ? slot0 + tid : INT_MAX);
      const KeyInfo k = key_info(p, s, h, j, listed);
      smem.pos[buf][tid] = j;
      smem.low[buf][tid] = k.visible;
      smem.lse2[buf][tid] = k.bias2;
    }
    if (listed && n + 1 < n_tiles) fetch(n + 1);  // lands while tile n - 1 computes
  };
  if (n_tiles > 0) {
    if (listed) fetch(0);
    issue(0, 0);
  }
  for (int n = 0; n < n_tiles; ++n) {
    const int buf = n % 2;
    if (n + 1 < n_tiles) {
      issue(n + 1, buf ^ 1);  // its last readers finished before the barrier that ended tile n - 1
      cute::cp_async_wait<1>();
    } else {
      cute::cp_async_wait<0>();
    }
    // sK / sV of tile n (and sQ, sdO) landed and its key metadata is visible; does the mask keep any of its keys?
    const int kept = __syncthreads_count(tid < kBlock && smem.low[buf][tid] != 0);
    if (kept > 0) {
      const uint32_t k_lane = Lane::b(smem.b0[buf], lane), v_lane = Lane::b(smem.b1[buf], lane);
      const int slot0 = slot_begin + n * kBlock;
      // ---- S = Q K^T: rows = the warp's queries, columns = the tile's keys ----
      float pr[1][kNTiles][4];
      sm80::score_tile<Traits>(pr, q_lane, k_lane, 0);
      // Whole-visible: the mask keeps all 64 keys and each of the warp's rows sees every one of them (most tiles of a
      // causal batch), so the warp skips the per-element visibility check (warp-uniform).
      const int j_lo = smem.pos[buf][0], j_hi = smem.pos[buf][kBlock - 1];  // ascending; INT_MAX past the last
      const bool whole = kept == kBlock && __all_sync(0xffffffffu, ra.low <= j_lo && ra.limit > j_hi &&
                                                                       rb.low <= j_lo && rb.limit > j_hi);
      float slope[1][kSoftcap ? kNTiles : 1][4];
      auto probabilities = [&](auto whole_tag) {
        constexpr bool kWhole = decltype(whole_tag)::value;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = nt * 8 + 2 * t + (e & 1);  // key of the tile
            const RowInfo& r = e < 2 ? ra : rb;
            bool visible = true;
            if constexpr (!kWhole) {
              const int j = listed ? smem.pos[buf][c] : slot0 + c;  // its position
              visible = smem.low[buf][c] != 0 && j >= r.low && j < r.limit;
            }
            float sl = 1.f;
            const float prob =
                probability<kSoftcap>(p.f, pr[0][nt][e] * p.f.softmax_scale, smem.lse2[buf][c], r.lse2, sl);
            pr[0][nt][e] = visible ? prob : 0.f;
            if constexpr (kSoftcap) slope[0][nt][e] = sl;
          }
        }
      };
      if (whole) {
        probabilities(std::true_type{});
      } else {
        probabilities(std::false_type{});
      }
      // ---- dP = dO V^T, then dS = P (dP - delta) in place ----
      float ds[1][kNTiles][4];
      sm80::score_tile<Traits>(ds, do_lane, v_lane, 0);
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float prob = pr[0][nt][e];
          const float d = prob != 0.f ? prob * (ds[0][nt][e] - (e < 2 ? ra.delta : rb.delta)) : 0.f;
          if constexpr (kSoftcap) ds[0][nt][e] = d * slope[0][nt][e]; else ds[0][nt][e] = d;
        }
      }
      // ---- dQ += dS K ----
      sm80::accumulate_pv<Traits>(dq, ds, Lane::b_trans(smem.b0[buf], lane), 0);
    }
    __syncthreads();  // every warp is done with buffer buf before tile n + 2 loads into it
  }
  cute::cp_async_wait<0>();

  store_rows<Traits>(p.dq, s.q_start + m0, p.f.num_heads, h, rows_here, dq, p.f.softmax_scale, warp_row0, lane);
}

}  // namespace dmattn::cuda::bwd
