// dkdv_kernel.cuh: dK, dV and the key-side bias gradient of one key tile (bwd_traits.h has the whole design).
//
// A CTA owns keys [j0, j0 + 64) of one KV head of one sequence; warp w owns keys j0 + 16 w + [0, 16). With sK, sV in
// shared memory for the whole CTA it walks the query heads of the KV group and, per head, the query tiles whose rows
// can see one of its keys (the window bounds them; tiles no row of which sees a key are skipped after their loads),
// two tiles in flight (sQ / sdO of the next tile load while the current one computes). Per query tile:
//   S^T = K Q^T -> P^T (each row's lse; hidden pairs 0) -> dV += P^T dO -> dP^T = V dO^T
//   -> dS^T = P^T (dP^T - delta) -> dbias += sum over the queries of dS^T -> dK += dS^T Q (softcap: times its slope)
// so dK, dV of a key are summed in one fixed order (deterministic) and written once, dK times the softmax scale.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>

#include "../sm80/tile_mma.cuh"
#include "bwd_common.cuh"

namespace dmattn::cuda::bwd {

template <typename Traits, bool kSoftcap>
__global__ void __launch_bounds__(Traits::kThreads, 2) dkdv_kernel(const __grid_constant__ BwdParams p, int seq0) {
  constexpr int kBlock = Traits::kBlockM, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;
  const int b = seq0 + static_cast<int>(blockIdx.z), hk = blockIdx.y;
  const Seq s(p.f, b);
  const int j0 = static_cast<int>(blockIdx.x) * kBlock;
  if (j0 >= s.k_len) return;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * 16;
  const int group = p.f.num_heads / p.f.num_heads_k;
  const int keys_here = min(kBlock, s.k_len - j0);

  // ---- sK, sV: (64 keys, D) of this KV head ----
  load_tile<Traits>(smem.a0, p.f.k, p.f.k_row_stride, p.f.k_head_stride, s.k_start + j0, hk, keys_here);
  load_tile<Traits>(smem.a1, p.f.v, p.f.v_row_stride, p.f.v_head_stride, s.k_start + j0, hk, keys_here);
  cute::cp_async_fence();

  using Lane = LaneAddress<Traits>;
  const uint32_t k_lane = Lane::a(smem.a0, warp_row0, lane), v_lane = Lane::a(smem.a1, warp_row0, lane);

  float dk[1][kDTiles][4], dv[1][kDTiles][4];
  zero(dk);
  zero(dv);
  // The window's bounds on the queries that can see a key of [j0, j0 + 64): query i sees key j only if
  // i + shift - window_left <= j and j <= i + shift + window_right (shift = k_len - q_len).
  const int shift = s.k_len - s.q_len;
  const int i_begin = p.f.window_right < 0 ? 0 : max(0, j0 - shift - static_cast<int>(p.f.window_right));
  const int i_end = p.f.window_left < 0
                        ? s.q_len
                        : min(s.q_len, j0 + kBlock - 1 - shift + static_cast<int>(p.f.window_left) + 1);
  const int n_tiles = i_end > i_begin ? (i_end - i_begin + kBlock - 1) / kBlock : 0;
  const int key_a = j0 + warp_row0 + g, key_b = key_a + 8;  // the two keys (accumulator rows) of this lane

  for (int hh = 0; hh < group; ++hh) {
    const int h = hk * group + hh;
    const KeyInfo ka = key_info(p, s, h, key_a), kb = key_info(p, s, h, key_b);
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
      if (tid < kBlock) sees = smem.low[buf][tid] < min(j0 + kBlock, s.k_len) && smem.limit[buf][tid] > j0 &&
                               smem.low[buf][tid] < smem.limit[buf][tid];
      if (__syncthreads_or(sees)) {
        const uint32_t q_lane = Lane::b(smem.b0[buf], lane), do_lane = Lane::b(smem.b1[buf], lane);
        // ---- S^T = K Q^T: rows = the warp's keys, columns = the tile's queries ----
        float pt[1][kNTiles][4];
        sm80::score_tile<Traits>(pt, k_lane, q_lane, 0);
        float slope[1][kSoftcap ? kNTiles : 1][4];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = nt * 8 + 2 * t + (e & 1);  // query row of the tile
            const int j = e < 2 ? key_a : key_b;
            const KeyInfo& key = e < 2 ? ka : kb;
            const bool visible = key.visible && j >= smem.low[buf][i] && j < smem.limit[buf][i];
            float sl = 1.f;
            const float prob =
                probability<kSoftcap>(p.f, pt[0][nt][e] * p.f.softmax_scale, key.bias2, smem.lse2[buf][i], sl);
            pt[0][nt][e] = visible ? prob : 0.f;
            if constexpr (kSoftcap) slope[0][nt][e] = sl;
          }
        }
        // ---- dV += P^T dO ----
        sm80::accumulate_pv<Traits>(dv, pt, Lane::b_trans(smem.b1[buf], lane), 0);
        // ---- dP^T = V dO^T, then dS^T = P^T (dP^T - delta) in place ----
        float ds[1][kNTiles][4];
        sm80::score_tile<Traits>(ds, v_lane, do_lane, 0);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float prob = pt[0][nt][e];
            const float d = prob != 0.f ? prob * (ds[0][nt][e] - smem.delta[buf][nt * 8 + 2 * t + (e & 1)]) : 0.f;
            if (e < 2) db_a += d; else db_b += d;
            if constexpr (kSoftcap) ds[0][nt][e] = d * slope[0][nt][e]; else ds[0][nt][e] = d;
          }
        }
        // ---- dK += dS^T Q ----
        sm80::accumulate_pv<Traits>(dk, ds, Lane::b_trans(smem.b0[buf], lane), 0);
      }
      __syncthreads();  // every warp is done with buffer buf before tile n + 2 loads into it
    }
    if (p.dbias != nullptr) {  // the quad's four column shares of each key, then one lane writes
      db_a += __shfl_xor_sync(0xffffffffu, db_a, 1);
      db_a += __shfl_xor_sync(0xffffffffu, db_a, 2);
      db_b += __shfl_xor_sync(0xffffffffu, db_b, 1);
      db_b += __shfl_xor_sync(0xffffffffu, db_b, 2);
      const int64_t heads = p.f.num_heads;
      if (t == 0 && key_a < s.k_len) p.dbias[(static_cast<int64_t>(s.k_start) + key_a) * heads + h] = db_a;
      if (t == 0 && key_b < s.k_len) p.dbias[(static_cast<int64_t>(s.k_start) + key_b) * heads + h] = db_b;
    }
  }
  cute::cp_async_wait<0>();  // a CTA whose heads all skipped still has sK / sV in flight

  store_rows<Traits>(p.dk, s.k_start + j0, p.f.num_heads_k, hk, keys_here, dk, p.f.softmax_scale, warp_row0, lane);
  store_rows<Traits>(p.dv, s.k_start + j0, p.f.num_heads_k, hk, keys_here, dv, 1.f, warp_row0, lane);
}

}  // namespace dmattn::cuda::bwd
