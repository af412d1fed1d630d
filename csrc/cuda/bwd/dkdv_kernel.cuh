// dkdv_kernel.cuh: dK, dV and the key-side bias gradient of one key tile (bwd_traits.h has the whole design).
//
// A CTA owns key slots [c0, c0 + 64) of one KV head of one sequence (slot c: key position c, or with kept-key lists
// the c-th key the mask keeps, its K / V rows gathered); warp w owns slots c0 + 16 w + [0, 16). With sK, sV in
// shared memory for the whole CTA it walks the query heads of the KV group and, per head, the query tiles whose rows
// can see one of its keys (the window bounds them; tiles no row of which sees a key are skipped after their loads),
// two tiles in flight (sQ / sdO of the next tile load while the current one computes). Per query tile:
//   S^T = K Q^T -> P^T (each row's lse; hidden pairs 0) -> dV += P^T dO -> dP^T = V dO^T
//   -> dS^T = P^T (dP^T - delta) -> dbias += sum over the queries of dS^T -> dK += dS^T Q (softcap: times its slope)
//   [-> with BwdParams::dq_accum: dQ += dS K, added with atomics (add_dq)]
// so dK, dV of a key are summed in one fixed order (deterministic) and written once, dK times the softmax scale.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>

#include "../sm80/tile_mma.cuh"
#include "bwd_common.cuh"

namespace dmattn::cuda::bwd {

// dQ += dS K for the query tile from m0 (BwdParams::dq_accum, DMATTN_BWD_DQ=atomic): dS^T goes through shared
// memory (sdS, keys x queries), then warp w multiplies queries 16 w + [0, 16) of it (read transposed) by sK, 32
// columns of D at a time (16 accumulators, not 64: dK and dV hold the registers), and adds the result, times the
// softmax scale, into dq_accum with atomics.
template <typename Traits>
__device__ __forceinline__ void add_dq(const BwdParams& p, const Seq& s, typename Traits::SharedStorage& smem,
                                       const float (&ds)[1][Traits::kNTiles][4], int h, int m0, int warp_row0,
                                       int lane) {
  using Elem = typename Traits::Elem;
  constexpr int kBlock = Traits::kBlockM, kChunk = 32;
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int nt = 0; nt < Traits::kNTiles; ++nt) {
    *reinterpret_cast<uint32_t*>(smem.ds + Traits::template smem_offset<kBlock>(warp_row0 + g, nt * 8 + 2 * t)) =
        sm80::ElemTraits<Elem>::pack(ds[0][nt][0], ds[0][nt][1]);
    *reinterpret_cast<uint32_t*>(smem.ds + Traits::template smem_offset<kBlock>(warp_row0 + g + 8, nt * 8 + 2 * t)) =
        sm80::ElemTraits<Elem>::pack(ds[0][nt][2], ds[0][nt][3]);
  }
  __syncthreads();  // every warp's keys of sdS are written
  // A = dS (queries x keys): 8 x 8 blocks of sdS read transposed; B = sK (keys x D) read transposed, as V is in P V.
  const uint32_t ds_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.ds)) +
                           2 * Traits::template smem_offset<kBlock>((lane & 7) + (lane >> 4) * 8,
                                                                    warp_row0 + ((lane >> 3) & 1) * 8);
  const uint32_t k_lane = LaneAddress<Traits>::b_trans(smem.a0, lane);
  // This lane's two rows of dQ (queries m0 + warp_row0 + g, + 8), as element offsets into dq_accum; -1: past the
  // sequence.
  const int row_a = warp_row0 + g, rows_left = s.q_len - m0;
  const int64_t at_a = ((static_cast<int64_t>(s.q_start) + m0 + row_a) * p.f.num_heads + h) * Traits::kHeadDim + 2 * t;
  const int64_t row_step = static_cast<int64_t>(8) * p.f.num_heads * Traits::kHeadDim;
#pragma unroll
  for (int c0 = 0; c0 < Traits::kHeadDim; c0 += kChunk) {
    float acc[1][kChunk / 8][4];
#pragma unroll
    for (int nt = 0; nt < kChunk / 8; ++nt) acc[0][nt][0] = acc[0][nt][1] = acc[0][nt][2] = acc[0][nt][3] = 0.f;
    sm80::warp_mma<typename Traits::Mma, 1, kBlock / 16, kChunk / 16, Traits::kPrefetch, /*kAAhead=*/true>(
        acc,
        [&](int kk, uint32_t(&a)[1][4]) {
          sm80::ldmatrix_x4_trans(Traits::template smem_step<kBlock>(ds_lane, kk, 0), a[0]);
        },
        [&](int kk, int j, uint32_t(&b)[4]) {
          sm80::ldmatrix_x4_trans(Traits::template smem_step<kBlock>(k_lane, kk, c0 + j * 16), b);
        });
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      if (row_a + 8 * half >= rows_left) continue;
      float* row = p.dq_accum + at_a + half * row_step + c0;
#pragma unroll
      for (int nt = 0; nt < kChunk / 8; ++nt) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
        atomicAdd(reinterpret_cast<float2*>(row + nt * 8),
                  make_float2(acc[0][nt][2 * half] * p.f.softmax_scale, acc[0][nt][2 * half + 1] * p.f.softmax_scale));
#else
        atomicAdd(row + nt * 8, acc[0][nt][2 * half] * p.f.softmax_scale);
        atomicAdd(row + nt * 8 + 1, acc[0][nt][2 * half + 1] * p.f.softmax_scale);
#endif
      }
    }
  }
}

template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kThreads, 2)
    dkdv_kernel(const __grid_constant__ BwdParams p, int seq0, int tile0) {
  constexpr int kBlock = Traits::kBlockM, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;
  // Grid (KV heads, sequences, key tiles from tile0): the key tile is the slowest index, so under a causal mask the
  // CTAs of every sequence's first key tiles, which every later query sees, start first.
  const int hk = blockIdx.x, b = seq0 + static_cast<int>(blockIdx.y);
  const Seq s(p.f, b);
  const int group = p.f.num_heads / p.f.num_heads_k;
  const KeySlots ks(p, s, b, hk * group);  // lists serve whole KV groups (the binding builds them only then)
  const int c0 = (tile0 + static_cast<int>(blockIdx.z)) * kBlock;
  if (c0 >= ks.n) return;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16;
  const int keys_here = min(kBlock, ks.n - c0);

  // ---- sK, sV: (64 keys, D) of this KV head, and the slots' key positions (INT_MAX past the last) ----
  if (ks.list != nullptr) {
    SlotRows<Traits> rows;
    rows.fetch(ks, c0, c0 + keys_here, s.k_len);
    gather_tile<Traits>(smem.a0, p.f.k, p.f.k_row_stride, p.f.k_head_stride, s.k_start, hk, rows);
    gather_tile<Traits>(smem.a1, p.f.v, p.f.v_row_stride, p.f.v_head_stride, s.k_start, hk, rows);
  } else {
    load_tile<Traits>(smem.a0, p.f.k, p.f.k_row_stride, p.f.k_head_stride, s.k_start + c0, hk, keys_here);
    load_tile<Traits>(smem.a1, p.f.v, p.f.v_row_stride, p.f.v_head_stride, s.k_start + c0, hk, keys_here);
  }
  cute::cp_async_fence();
  if (tid < kBlock) smem.pos[0][tid] = tid < keys_here ? ks.pos(c0 + tid, s.k_len) : INT_MAX;
  __syncthreads();
  const int32_t* key_pos = smem.pos[0];
  const int pos_lo = key_pos[0], pos_hi = key_pos[keys_here - 1];  // ascending

  using Lane = LaneAddress<Traits>;
  const uint32_t k_lane = Lane::a(smem.a0, warp_row0, lane), v_lane = Lane::a(smem.a1, warp_row0, lane);

  float dk[1][kDTiles][4], dv[1][kDTiles][4];
  zero(dk);
  zero(dv);
  // The queries that can see a key of [pos_lo, pos_hi] (the window's bounds).
  const QuerySpan span = query_span(p.f, s, pos_lo, pos_hi);
  const int i_begin = span.begin, i_end = span.end;
  const int n_tiles = i_end > i_begin ? (i_end - i_begin + kBlock - 1) / kBlock : 0;
  // The two keys (accumulator rows) of this lane, as positions (INT_MAX: no key).
  const int key_a = key_pos[warp_row0 + g], key_b = key_pos[warp_row0 + g + 8];
  const bool listed = ks.list != nullptr;

  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const KeyInfo ka = key_info(p, s, h, key_a, listed), kb = key_info(p, s, h, key_b, listed);
    // A head for which the mask keeps none of the tile's keys contributes nothing (dbias stays 0).
    if (!__syncthreads_or(ka.visible || kb.visible) || n_tiles == 0) continue;

    float db_a = 0.f, db_b = 0.f;  // this lane's share of the two keys' bias gradient for head h
    auto issue = [&](int n, int buf) {  // sQ, sdO and the rows' metadata of query tile n into buffer buf
      const int m0 = i_begin + n * kBlock;
      const int rows = min(kBlock, s.q_len - m0);
      load_tile<Traits>(smem.b0[buf], p.f.q, p.f.q_row_stride, p.f.q_head_stride, s.q_start + m0, h, rows);
      load_tile<Traits>(smem.b1[buf], p.dout, p.dout_row_stride, p.dout_head_stride, s.q_start + m0, h, rows);
      cute::cp_async_fence();
      if (tid < kBlock) {
        const RowInfo r = row_info(p, s, h, m0 + tid);
        smem.low[buf][tid] = r.low;
        smem.limit[buf][tid] = r.limit;
        smem.lse2[buf][tid] = r.lse2;
        smem.delta[buf][tid] = r.delta;
      }
    };
    issue(0, 0);
    for (int n = 0; n < n_tiles; ++n) {
      const int buf = n % 2;
      if (n + 1 < n_tiles) {
        issue(n + 1, buf ^ 1);  // its last readers finished before the barrier that ended tile n - 1
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
      // sQ / sdO of tile n (and sK, sV) landed, its row metadata is visible; does any row see a key of the tile?
      bool sees = false;
      if (tid < kBlock) sees = smem.low[buf][tid] <= pos_hi && smem.limit[buf][tid] > pos_lo &&
                               smem.low[buf][tid] < smem.limit[buf][tid];
      if (__syncthreads_or(sees)) {
        const uint32_t q_lane = Lane::b(smem.b0[buf], lane), do_lane = Lane::b(smem.b1[buf], lane);
        // ---- S^T = K Q^T: rows = the warp's keys, columns = the tile's queries ----
        float pt[1][kNTiles][4];
        sm80::score_tile<Traits>(pt, k_lane, q_lane, 0);
        float slope[1][kSoftcap ? kNTiles : 1][4];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const int i0 = nt * 8 + 2 * t;  // the lane's two query rows of the tile: i0, i0 + 1
          const int2 low = *reinterpret_cast<const int2*>(&smem.low[buf][i0]);
          const int2 limit = *reinterpret_cast<const int2*>(&smem.limit[buf][i0]);
          const float2 lse2 = *reinterpret_cast<const float2*>(&smem.lse2[buf][i0]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int j = e < 2 ? key_a : key_b;
            const KeyInfo& key = e < 2 ? ka : kb;
            const bool visible = key.visible && j >= (e & 1 ? low.y : low.x) && j < (e & 1 ? limit.y : limit.x);
            float sl = 1.f;
            const float prob = probability<kSoftcap>(p.f, pt[0][nt][e] * p.f.softmax_scale, key.bias2,
                                                     e & 1 ? lse2.y : lse2.x, sl);
            pt[0][nt][e] = visible ? prob : 0.f;
            if constexpr (kSoftcap) slope[0][nt][e] = sl;
          }
        }
        // P^T from here on as 16-bit pairs (the A operand of dV as it is, and half the registers through dP^T; dS
        // from the rounded P is within the accuracy rule, as the same-dtype reference rounds P too).
        uint32_t pp[kNTiles][2];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          pp[nt][0] = sm80::ElemTraits<typename Traits::Elem>::pack(pt[0][nt][0], pt[0][nt][1]);
          pp[nt][1] = sm80::ElemTraits<typename Traits::Elem>::pack(pt[0][nt][2], pt[0][nt][3]);
        }
        // ---- dV += P^T dO ----
        const uint32_t dot_lane = Lane::b_trans(smem.b1[buf], lane);
        sm80::warp_mma<typename Traits::Mma, 1, kNTiles / 2, kDTiles / 2, Traits::kPrefetch, /*kAAhead=*/false>(
            dv,
            [&](int kk, uint32_t(&a)[1][4]) {
              a[0][0] = pp[2 * kk][0];
              a[0][1] = pp[2 * kk][1];
              a[0][2] = pp[2 * kk + 1][0];
              a[0][3] = pp[2 * kk + 1][1];
            },
            [&](int kk, int j, uint32_t(&bf)[4]) {
              sm80::ldmatrix_x4_trans(Traits::template smem_step<kBlock>(dot_lane, kk, j * 16), bf);
            });
        // ---- dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place ----
        float ds[1][kNTiles][4];
        sm80::score_tile<Traits>(ds, v_lane, do_lane, 0);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          const float2 delta = *reinterpret_cast<const float2*>(&smem.delta[buf][nt * 8 + 2 * t]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float prob = unpack<typename Traits::Elem>(pp[nt][e / 2], e & 1);
            const float d = prob != 0.f ? prob * (ds[0][nt][e] - (e & 1 ? delta.y : delta.x)) : 0.f;
            if (e < 2) db_a += d; else db_b += d;
            if constexpr (kSoftcap) ds[0][nt][e] = d * slope[0][nt][e]; else ds[0][nt][e] = d;
          }
        }
        // ---- dK += dS^T Q ----
        sm80::accumulate_pv<Traits>(dk, ds, Lane::b_trans(smem.b0[buf], lane), 0);
        if (p.dq_accum != nullptr) add_dq<Traits>(p, s, smem, ds, h, i_begin + n * kBlock, warp_row0, lane);
      }
      __syncthreads();  // every warp is done with buffer buf before tile n + 2 loads into it
    }
    if (p.dbias != nullptr) store_dbias_pair(p, s, h, t, key_a, key_b, db_a, db_b);
  }
  cute::cp_async_wait<0>();  // a CTA whose heads all skipped still has sK / sV in flight

  store_rows<Traits>(p.dk, s.k_start, p.f.num_heads_k, hk, keys_here, dk, p.f.softmax_scale, warp_row0, lane, key_pos);
  store_rows<Traits>(p.dv, s.k_start, p.f.num_heads_k, hk, keys_here, dv, 1.f, warp_row0, lane, key_pos);
}

}  // namespace dmattn::cuda::bwd
