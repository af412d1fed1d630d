// varlen_fwd_kernel.cuh: the sm80-path attention kernel, FlashAttention-2 style on SM80 tensor-core atoms (runs on
// SM80+), composed from one header per concern:
//   tile_scheduler.cuh   which sequence, head and query tile a CTA owns; which key slots it can see
//   kv_tiles.cuh         Q / K / V tile loads (dense or gathered at kept keys) and the per-tile slot metadata
//   tile_mma.cuh         S = Q K^T and O += P V on the shared-memory tiles (warp_mma.cuh: the pipelined warp MMA)
//   score_operands.cuh   scale, mask, bias and causal limit on S; tiles skipped whole
//   online_softmax.cuh   running max / sum and the rescale of O
//   nonfinite_v.cuh      hidden keys' inf / NaN V kept out of rows that cannot see them
//   epilogue.cuh         out and lse
// One CTA computes one query tile (kBlockM rows) of one query head of one sequence, walking its key slots in tiles
// of kBlockN. Per KV tile (the V load overlaps Q K^T, the next K load overlaps softmax + P V):
//   wait K -> issue V load -> S = Q K^T -> score operands -> wait V, issue next K -> online softmax -> O += P V
// (the query-side variant copies the next tile's operand rows with its K: ScoreOperands::stage)
// Measured design notes (tile shapes tried, what did and did not pay): benchmarks/results/NOTES.md.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>

#include "../passes.h"
#include "epilogue.cuh"
#include "kernel_traits.h"
#include "kv_tiles.cuh"
#include "nonfinite_v.cuh"
#include "online_softmax.cuh"
#include "score_operands.cuh"
#include "tile_mma.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
varlen_fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
                  const __grid_constant__ BlockMap blocks, int seq0) {
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN;
  constexpr int kMTiles = Traits::kMTiles, kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;
  const int warp_row0 = warp * kMTiles * 16;  // this warp's first query row in the tile

  TileContext c;
  if (!VarlenTileScheduler<kBlockM>::template tile<Traits::kKeyRanges>(p, keys, seq0, lane, c)) return;
  const int n_tiles = (c.slots_end + kBlockN - 1) / kBlockN;
  // Query-side operand tiles are staged in shared memory up to head dim 128 (Traits::kStagedOperands): at 256 (O
  // alone 128 registers) the copies of the next tile beside the scores spilled.
  const ScoreOperands<Traits> ops(p, c, blocks, Traits::kStagedOperands);
  KvTiles<Traits> kv(p, c, smem);
  if constexpr (Traits::kKeyRanges) {  // visible before its first use: the barriers ahead of every ops.apply
    if (p.key_range != nullptr) {
      for (int r = tid; r < kBlockM; r += Traits::kThreads) {
        const KeyRange kr = r < c.rows ? key_range_of(p, static_cast<int64_t>(c.q_start) + c.m0 + r) : KeyRange{0, 0};
        smem.row_range[r][0] = static_cast<int32_t>(kr.begin);
        smem.row_range[r][1] = static_cast<int32_t>(kr.end);
      }
    }
  }

  // ---- Prologue: Q tile, the metadata and K tile of the first live KV tile ----
  kv.load_q();
  // The block map's state of tile n (ScoreOperands::mask_state): where operands are staged it comes with the tile
  // from next_live, one tile ahead (stage() needs it), and is carried; elsewhere it is found in the tile's own
  // iteration (a register less through softmax and P V).
  uint8_t mask_state = ops.kUndecided;
  int n = Traits::kStagedOperands ? ops.next_live(c.first_tile(kBlockN), n_tiles, mask_state)
                                  : ops.next_live(c.first_tile(kBlockN), n_tiles);
  // Query-side operands: the block map's v flags of tile n (whether its V scan can find an inf / NaN), loaded a tile
  // ahead and carried like the mask state.
  auto v_flags = ops.v_flags(n * kBlockN);
  int buf = 0;
  if (n < n_tiles) {
    kv.fetch_pos(n);
    kv.fetch_bias();
    kv.store(buf);
    __syncthreads();  // the gather reads the positions
    kv.load_k(n, buf);
    ops.stage(n, mask_state);
  }
  cute::cp_async_fence();

  float o[kMTiles][kDTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
  OnlineSoftmax<kMTiles, kNTiles> softmax;
  unsigned poisoned_rows = 0;  // bit 2 mt + half: this lane saw that row give weight to a key whose V held inf / NaN

  // Per-lane ldmatrix byte addresses of the first fragment of each operand; the others are smem_step away.
  const uint32_t q_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.q)) +
                          2 * Traits::template smem_offset<kBlockM>(warp_row0 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                                    (lane >> 4) * 8);
  const uint32_t k_lane =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem.k)) +
      2 * Traits::template smem_offset<kBlockN>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
  const uint32_t v_lane =
      static_cast<uint32_t>(__cvta_generic_to_shared(smem.v)) +
      2 * Traits::template smem_offset<kBlockN>((lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8);

  while (n < n_tiles) {
    const int n0 = n * kBlockN;
    cute::cp_async_wait<0>();
    __syncthreads();  // K tile n (and Q) landed; every warp is done with V and the metadata of the previous tile
    kv.load_v(n, buf);
    cute::cp_async_fence();
    uint8_t next_state = ops.kUndecided;
    const int next =
        Traits::kStagedOperands ? ops.next_live(n + 1, n_tiles, next_state) : ops.next_live(n + 1, n_tiles);
    if (next < n_tiles) kv.fetch_pos(next);  // issued now, consumed after Q K^T
    const auto next_v_flags = ops.v_flags(next * kBlockN);  // issued now, asked at the next tile's V scan
    if constexpr (!Traits::kStagedOperands) mask_state = ops.mask_state(n0);  // likewise

    // ---- S = Q K^T: s[mt][nt] is the m16n8 fragment (rows warp_row0 + 16 mt, slots 8 nt) ----
    float s[kMTiles][kNTiles][4];
    score_tile<Traits>(s, q_lane, k_lane, 0);

    // ---- Scores: scale, bias, and -inf where a key is not visible ----
    const float score_mul =
        ops.apply(s, n0, smem.key_pos[buf], smem.key_bias[buf], smem.row_range, mask_state, warp_row0, g, t);

    if (next < n_tiles) {
      kv.fetch_bias();
      kv.store(buf ^ 1);  // free: its last readers (the previous tile) finished before the barrier at the top
    }
    cute::cp_async_wait<0>();
    __syncthreads();  // V tile n landed; every warp is done with K tile n; the next tile's metadata is visible
    if (next < n_tiles) {
      kv.load_k(next, buf ^ 1);
      ops.stage(next, next_state);  // free: every warp's pass 2 of this tile is done
    }
    cute::cp_async_fence();
    const bool v_fix =
        ops.hides_keys(n0, mask_state) && v_flags.may_be_nonfinite() && tile_has_nonfinite<Traits>(smem.v);
    if (v_fix) {
      zero_nonfinite_rows<Traits>(smem.v, smem.v_bad);
      __syncthreads();
    }

    // ---- P = exp(S - max), O rescaled ----
    softmax.update(s, score_mul, o);
    if (v_fix) mark_poisoned_rows(s, smem.v_bad, t, poisoned_rows);

    // ---- O += P V ----
    accumulate_pv<Traits>(o, s, v_lane, 0);
    buf ^= 1;
    n = next;
    mask_state = next_state;
    v_flags = next_v_flags;
  }
  cute::cp_async_wait<0>();

  store_tile<Traits>(p, c, o, softmax, poisoned_rows, warp_row0, lane);
}

}  // namespace dmattn::cuda::sm80
