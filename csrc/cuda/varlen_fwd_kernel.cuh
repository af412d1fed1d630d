// varlen_fwd_kernel.cuh: the attention kernel, FlashAttention-2 style on SM80 tensor-core atoms (runs on SM80+).
//
// One CTA computes one query tile (kBlockM rows) of one query head of one sequence. It walks the sequence's key
// *slots* in tiles of kBlockN: without a key-side mask slot c is key position c; with one, slot c is the c-th key
// the mask keeps (KeyLists, built by varlen_fwd_run.cu), so masked keys are never loaded nor multiplied, and the
// causal limit becomes a prefix of the slots (found by a warp-wide search of the sorted list).
//
// Per KV tile (pipeline as in FlashAttention-2: the V load overlaps Q K^T, the next K load overlaps softmax + P V):
//   gather K rows (cp.async, zero-fill past the end) -> S = Q K^T (ldmatrix + mma.sync, fp32)
//   -> scale, bias, causal / query-side mask -> online softmax in registers -> O += P V (ldmatrix.trans + mma.sync)
// A KV tile whose query-side mask is False for every row of the query tile is skipped before K / V are loaded.
// The kept-key positions and key-side bias of the next tile are fetched into registers one stage ahead, so neither
// the gather nor the score modification waits on a global load inside the loop.
// Measured design notes (tile shapes tried, what did and did not pay): benchmarks/results/NOTES.md.
//
// Fragment coordinates (mma.sync m16n8k16, lane = 4 * g + t): accumulator element e of an m16n8 fragment sits at
// row g + 8 * (e / 2), column 2 * t + e % 2.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>
#include <cmath>

#include "kernel_traits.h"
#include "score_operand.cuh"
#include "varlen_fwd_launch.h"

namespace dmattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Everything one CTA knows about its tile, computed once at entry.
struct TileContext {
  SeqRange sq, sk;
  int64_t m0;              // first query position of the tile in its sequence
  int rows;                // valid query rows in the tile (<= kBlockM)
  int h, hk;               // query head, KV head
  const int32_t* key_index;  // sorted kept key positions of this (sequence, mask head); null without a key-side mask
  int64_t n_keys;          // slots: kept keys, or sk.len
  int64_t slots_end;       // slots any row of the tile can see (causal prefix)
  int64_t slots_full;      // slots every row of the tile sees: tiles below this need no per-element check
  int64_t causal_shift;    // query i sees key j iff j < i + causal_shift (sk.len - sq.len + 1), or all keys

  __device__ __forceinline__ int64_t key_pos(int64_t slot) const {
    if (key_index == nullptr) return slot;
    const int64_t pos = key_index[slot];  // clamped: cannot leave the sequence even if cu_seqlens lie
    return pos < 0 ? 0 : (pos >= sk.len ? sk.len - 1 : pos);
  }
};

// Number of slots whose key position is < limit (lower_bound on the sorted list), searched by one whole warp:
// each round probes 32 evenly spaced slots and keeps the gap where the predicate flips.
__device__ __forceinline__ int64_t slots_before(const TileContext& c, int64_t limit, int lane) {
  if (limit <= 0) return 0;
  if (c.key_index == nullptr) return limit < c.n_keys ? limit : c.n_keys;
  int64_t lo = 0, hi = c.n_keys;  // answer in [lo, hi]
  while (lo < hi) {
    const int64_t step = (hi - lo + 31) / 32;
    const int64_t probe = lo + lane * step;
    const bool below = probe < hi && c.key_index[probe] < limit;
    const int n_below = __popc(__ballot_sync(0xffffffffu, below));
    if (n_below == 0) return lo;
    const int64_t last_below = lo + (n_below - 1) * step;
    if (step == 1) return last_below + 1;
    lo = last_below + 1;
    const int64_t first_not = lo - 1 + step;
    hi = first_not < hi ? first_not : hi;
  }
  return lo;
}

// ldmatrix of four 8x8 matrices from shared memory, at a 32-bit shared-space byte address.
__device__ __forceinline__ void ldmatrix_x4(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t addr, uint32_t (&r)[4]) {
  asm volatile("ldmatrix.sync.aligned.x4.trans.m8n8.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename Traits>
__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  Traits::Mma::fma(d[0], d[1], d[2], d[3], a[0], a[1], a[2], a[3], b0, b1, d[0], d[1], d[2], d[3]);
}

// Tile loads (cp.async, 16 bytes per thread per row): thread t moves column chunk t % kLoadCols of rows
// t / kLoadCols + i * kRowStep. Rows at or past valid_rows are zero-filled without reading global memory.
template <typename Traits>
struct RowLoader {
  // Chunks per row rounded up to a power of two (D = 96: 12 -> 16, the last 4 lanes of each row idle).
  static constexpr int kLoadCols = Traits::kChunksPerRow <= 4    ? 4
                                   : Traits::kChunksPerRow <= 8  ? 8
                                   : Traits::kChunksPerRow <= 16 ? 16
                                                                 : 32;
  static constexpr int kRowStep = Traits::kThreads / kLoadCols;
  static_assert(Traits::kThreads % kLoadCols == 0, "whole rows per load step");
};

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(*reinterpret_cast<const cute::uint128_t*>(gmem),
                                                               *reinterpret_cast<cute::uint128_t*>(smem), valid);
}

// Rows [0, kRows) of a tile whose row r is at first_row + r * row_stride (elements; first_row points at column 0
// of this head). `fallback` is any readable address, passed for zero-filled rows.
template <typename Traits, int kRows>
__device__ __forceinline__ void load_rows(typename Traits::Elem* smem, const typename Traits::Elem* first_row,
                                          int64_t row_stride, int valid_rows, const void* fallback) {
  using L = RowLoader<Traits>;
  const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
  const typename Traits::Elem* src = first_row + r0 * row_stride + col;
  const int64_t step = L::kRowStep * row_stride;
#pragma unroll
  for (int r = r0, i = 0; i < (kRows + L::kRowStep - 1) / L::kRowStep; ++i, r += L::kRowStep, src += step) {
    if (kRows % L::kRowStep != 0 && r >= kRows) break;
    const bool valid = r < valid_rows;
    cp_async_16(smem + Traits::template smem_offset<kRows>(r, col), valid ? src : fallback, valid);
  }
}

// Gathered rows: tile row r0 + i * kRowStep is key position pos[i] (from fetch_positions) of a sequence whose
// position 0 is at seq_row0 (column 0 of this head).
template <typename Traits, int kRows>
struct GatherPositions {
  static constexpr int kIters = (kRows + RowLoader<Traits>::kRowStep - 1) / RowLoader<Traits>::kRowStep;
  int pos[kIters];

  // Loads (without waiting) the kept-key positions of slots [n0, n0 + kRows) this thread will gather, clamped into
  // [0, seq_len) when used, so lying cu_seqlens or a racing list cannot leave the sequence.
  __device__ __forceinline__ void fetch(const int32_t* key_index, int n0, int valid_rows) {
    using L = RowLoader<Traits>;
    const int r0 = threadIdx.x / L::kLoadCols;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int r = r0 + i * L::kRowStep;
      pos[i] = r < valid_rows ? key_index[n0 + r] : 0;
    }
  }

  __device__ __forceinline__ void gather(typename Traits::Elem* smem, const typename Traits::Elem* seq_row0,
                                         int64_t row_stride, int valid_rows, int seq_len, const void* fallback) const {
    using L = RowLoader<Traits>;
    const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
    if (col >= Traits::kHeadDim) return;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const int r = r0 + i * L::kRowStep;
      if (kRows % L::kRowStep != 0 && r >= kRows) break;
      const bool valid = r < valid_rows;
      const int j = pos[i] < 0 ? 0 : (pos[i] >= seq_len ? seq_len - 1 : pos[i]);
      cp_async_16(smem + Traits::template smem_offset<kRows>(r, col),
                  valid ? static_cast<const void*>(seq_row0 + j * row_stride + col) : fallback, valid);
    }
  }
};

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
varlen_fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kMTiles = Traits::kMTiles;
  constexpr int kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles, kHeadDim = Traits::kHeadDim;
  constexpr int kPrefetch = Traits::kPrefetch;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  // ---- The tile: sequence, head, query rows, and the key slots it can see ----
  TileContext c;
  const int b = blockIdx.z;
  c.h = blockIdx.y;
  c.hk = c.h / (p.num_heads / p.num_heads_k);
  c.sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  c.sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  c.m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest-running tiles (causal) first
  if (c.m0 >= c.sq.len) return;
  c.rows = static_cast<int>(min(static_cast<int64_t>(kBlockM), c.sq.len - c.m0));
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  c.key_index = nullptr;
  c.n_keys = c.sk.len;
  if (p.mask.layout == OperandLayout::kKeySide) {
    const int hm = c.h / p.mask.head_group;
    c.key_index = keys.index + static_cast<int64_t>(hm) * p.total_k + c.sk.start;
    const int64_t n = keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm];
    c.n_keys = n < 0 ? 0 : (n > c.sk.len ? c.sk.len : n);
  }
  c.causal_shift = c.sk.len - c.sq.len + 1;
  if (p.is_causal) {
    const int64_t last = c.m0 + c.rows - 1 + c.causal_shift, first = c.m0 + c.causal_shift;
    c.slots_end = slots_before(c, last < c.sk.len ? last : c.sk.len, lane);
    c.slots_full = slots_before(c, first < c.sk.len ? first : c.sk.len, lane);
  } else {
    c.slots_end = c.slots_full = c.n_keys;
  }
  const int n_tiles = static_cast<int>((c.slots_end + kBlockN - 1) / kBlockN);

  const int64_t q_head = static_cast<int64_t>(c.h) * p.q_head_stride;
  const int64_t k_head = static_cast<int64_t>(c.hk) * p.k_head_stride;
  const int64_t v_head = static_cast<int64_t>(c.hk) * p.v_head_stride;
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;
  const bool query_bias = p.bias.layout == OperandLayout::kQuerySide;
  const bool key_bias = p.bias.layout == OperandLayout::kKeySide;
  const float scale_log2 = p.softmax_scale * kLog2e;
  const int mask_head = c.h / p.mask.head_group, bias_head = c.h / p.bias.head_group;

  const Elem* k_seq = static_cast<const Elem*>(p.k) + c.sk.start * p.k_row_stride + k_head;
  const Elem* v_seq = static_cast<const Elem*>(p.v) + c.sk.start * p.v_row_stride + v_head;
  // K or V rows of the slots of tile n: contiguous key positions, or gathered through the kept-key list (the
  // positions of the next tile are fetched into registers one pipeline stage ahead, so no load waits on them).
  GatherPositions<Traits, kBlockN> gather_pos;
  auto valid_slots = [&](int n) {
    return static_cast<int>(min(static_cast<int64_t>(kBlockN), c.slots_end - static_cast<int64_t>(n) * kBlockN));
  };
  auto load_kv = [&](Elem* dst, const Elem* seq, int64_t row_stride, const void* base, int n) {
    if (c.key_index == nullptr) {
      load_rows<Traits, kBlockN>(dst, seq + n * kBlockN * row_stride, row_stride, valid_slots(n), base);
    } else {
      gather_pos.gather(dst, seq, row_stride, valid_slots(n), static_cast<int>(c.sk.len), base);
    }
  };
  auto fetch_positions = [&](int n) {
    if (c.key_index != nullptr) gather_pos.fetch(c.key_index, n * kBlockN, valid_slots(n));
  };
  // Key position and key-side bias (times log2 e) of slot tid of a tile, for the score modification: fetched into
  // registers (position first, bias once the position has arrived), stored to shared memory a stage later.
  int meta_pos = -1;
  float meta_bias = 0.f;
  auto fetch_meta_pos = [&](int n) {
    if (tid < kBlockN) {
      const int64_t slot = static_cast<int64_t>(n) * kBlockN + tid;
      meta_pos = slot < c.slots_end ? (c.key_index ? c.key_index[slot] : static_cast<int>(slot)) : -1;
    }
  };
  auto fetch_meta_bias = [&]() {
    if (tid < kBlockN) {
      if (meta_pos >= 0) meta_pos = meta_pos >= c.sk.len ? static_cast<int>(c.sk.len) - 1 : meta_pos;
      meta_bias = key_bias && meta_pos >= 0
                      ? bias_value(p.bias, operand_offset(p.bias, c.sk.start + meta_pos, c.h, 0)) * kLog2e
                      : 0.f;
    }
  };
  auto store_meta = [&]() {
    if (tid < kBlockN) {
      smem.key_pos[tid] = meta_pos;
      smem.key_bias[tid] = meta_bias;
    }
  };
  // A KV tile is live unless a query-side mask is False for every (row, key) of it the rows can see.
  auto tile_live = [&](int n) -> bool {
    if (!query_mask) return true;
    bool any = false;
    const int64_t n0 = static_cast<int64_t>(n) * kBlockN;
    for (int e = tid; e < c.rows * kBlockN && !any; e += Traits::kThreads) {
      const int r = e / kBlockN;
      const int64_t slot = n0 + e % kBlockN;
      if (slot >= c.slots_end) continue;
      const int64_t pos = c.key_pos(slot), i = c.m0 + r;
      if (p.is_causal && pos >= i + c.causal_shift) continue;
      any = mask_value(p.mask, operand_offset(p.mask, c.sq.start + i, c.h, pos));
    }
    return __syncthreads_or(any) != 0;
  };
  auto next_live = [&](int n) {
    while (n < n_tiles && !tile_live(n)) ++n;
    return n;
  };

  // ---- Prologue: Q tile and the first live K tile ----
  load_rows<Traits, kBlockM>(smem.q, static_cast<const Elem*>(p.q) + (c.sq.start + c.m0) * p.q_row_stride + q_head,
                             p.q_row_stride, c.rows, p.q);
  int n = next_live(0);
  if (n < n_tiles) {
    fetch_positions(n);
    load_kv(smem.k, k_seq, p.k_row_stride, p.k, n);
    fetch_meta_pos(n);
    fetch_meta_bias();
    store_meta();
  }
  cute::cp_async_fence();

  float o[kMTiles][kDTiles][4];
  float row_max[kMTiles][2], row_sum[kMTiles][2];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const int warp_row0 = warp * kMTiles * 16;
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
    const int64_t n0 = static_cast<int64_t>(n) * kBlockN;
    cute::cp_async_wait<0>();
    __syncthreads();  // K tile n (and Q) landed; every warp is done with V of the previous tile
    load_kv(smem.v, v_seq, p.v_row_stride, p.v, n);
    cute::cp_async_fence();
    const int next = next_live(n + 1);
    if (next < n_tiles) {  // loads issued now, consumed after Q K^T
      fetch_positions(next);
      fetch_meta_pos(next);
    }

    // ---- S = Q K^T: s[mt][nt] is the m16n8 fragment (rows warp_row0 + 16 mt, slots 8 nt) ----
    // Software-pipelined: the K fragments of step i + kPrefetch and the Q fragments of k-step kk + 1 are loaded
    // before the MMAs of step i / kk are issued, so ldmatrix latency hides behind tensor-core work.
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
    {
      constexpr int kSteps2 = kNTiles / 2, kSteps = kHeadDim / 16 * kSteps2;
      uint32_t qa[2][kMTiles][4];
      uint32_t kb[kPrefetch + 1][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) ldmatrix_x4(Traits::template smem_step<kBlockM>(q_lane, mt, 0), qa[0][mt]);
#pragma unroll
      for (int i = 0; i < kPrefetch && i < kSteps; ++i) {
        ldmatrix_x4(Traits::template smem_step<kBlockN>(k_lane, i % kSteps2, (i / kSteps2) * 16), kb[i]);
      }
#pragma unroll
      for (int kk = 0; kk < kHeadDim / 16; ++kk) {
        if (kk + 1 < kHeadDim / 16) {
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            ldmatrix_x4(Traits::template smem_step<kBlockM>(q_lane, mt, (kk + 1) * 16), qa[(kk + 1) % 2][mt]);
          }
        }
#pragma unroll
        for (int nt2 = 0; nt2 < kSteps2; ++nt2) {
          const int i = kk * kSteps2 + nt2, ahead = i + kPrefetch;
          if (ahead < kSteps) {
            ldmatrix_x4(Traits::template smem_step<kBlockN>(k_lane, ahead % kSteps2, (ahead / kSteps2) * 16),
                        kb[ahead % (kPrefetch + 1)]);
          }
          const uint32_t(&b)[4] = kb[i % (kPrefetch + 1)];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma<Traits>(s[mt][2 * nt2], qa[kk % 2][mt], b[0], b[1]);
            mma<Traits>(s[mt][2 * nt2 + 1], qa[kk % 2][mt], b[2], b[3]);
          }
        }
      }
    }

    // ---- Scores in the log2 domain: scale, bias, and -inf where a key is not visible ----
    // A tile every row sees whole, with no bias, keeps raw scores: the scale is folded into the softmax FFMAs
    // (exp2(s * scale - max)), score_mul says which domain s is in.
    const bool whole_tile = n0 + kBlockN <= c.slots_full && !query_mask && !query_bias;
    const bool raw_scores = whole_tile && !key_bias && scale_log2 > 0.f;
    const float score_mul = raw_scores ? scale_log2 : 1.f;
    if (whole_tile && !raw_scores) {
      // Every row sees every slot of this tile: only the scale and a key-side bias.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = s[mt][nt][e] * scale_log2 + smem.key_bias[nt * 8 + 2 * t + (e % 2)];
          }
    } else if (!whole_tile) {
      // Causal diagonal, the last (partial) tile, or query-side operands: per element.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp_row0 + mt * 16 + g + half * 8;
          const int64_t i = c.m0 + r, qrow = c.sq.start + i;
          const int64_t limit = r < c.rows ? (p.is_causal ? i + c.causal_shift : c.sk.len) : 0;
          const int64_t mask_row = query_mask ? qrow * p.mask.row_stride + mask_head * p.mask.head_stride : 0;
          const int64_t bias_row = query_bias ? qrow * p.bias.row_stride + bias_head * p.bias.head_stride : 0;
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
            for (int e = 2 * half; e < 2 * half + 2; ++e) {
              const int col = nt * 8 + 2 * t + (e % 2);
              const int64_t pos = smem.key_pos[col];
              float x = s[mt][nt][e] * scale_log2 + smem.key_bias[col];
              if (pos < 0 || pos >= limit) {
                x = -INFINITY;
              } else {
                if (query_mask && !mask_value(p.mask, mask_row + pos * p.mask.col_stride)) x = -INFINITY;
                if (query_bias) x += bias_value(p.bias, bias_row + pos * p.bias.col_stride) * kLog2e;
              }
              s[mt][nt][e] = x;
            }
          }
        }
      }
    }

    if (next < n_tiles) fetch_meta_bias();
    cute::cp_async_wait<0>();
    __syncthreads();  // V tile n landed; every warp is done with K tile n and its metadata
    if (next < n_tiles) load_kv(smem.k, k_seq, p.k_row_stride, p.k, next);
    cute::cp_async_fence();

    // ---- Online softmax: per row, rescale O by exp2(old max - new max), P = exp2(S - new max) ----
    float alpha[kMTiles][2];
    bool max_moved = false;
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2)) * score_mul;  // score_mul > 0 keeps the max
        const float new_max = fmaxf(row_max[mt][half], mx);
        const float base = new_max == -INFINITY ? 0.f : new_max;  // a row with nothing visible yet stays at 0
        alpha[mt][half] = exp2f(row_max[mt][half] - base);
        max_moved |= new_max != row_max[mt][half];
        row_max[mt][half] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          s[mt][nt][2 * half] = exp2f(fmaf(s[mt][nt][2 * half], score_mul, -base));
          s[mt][nt][2 * half + 1] = exp2f(fmaf(s[mt][nt][2 * half + 1], score_mul, -base));
          sum += s[mt][nt][2 * half] + s[mt][nt][2 * half + 1];
        }
        row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
      }
    }
    // Once the row maxima settle (most tiles after the first few), no row of the warp needs rescaling.
    if (__any_sync(0xffffffffu, max_moved)) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][0] *= alpha[mt][0];
          o[mt][dt][1] *= alpha[mt][0];
          o[mt][dt][2] *= alpha[mt][1];
          o[mt][dt][3] *= alpha[mt][1];
        }
    }

    // ---- O += P V: the S accumulators of two n8 fragments are the A operand of one k16 step; V fragments are
    // prefetched kPrefetch steps ahead as for K ----
    {
      constexpr int kSteps2 = kDTiles / 2, kSteps = kBlockN / 16 * kSteps2;
      uint32_t vb[kPrefetch + 1][4];
#pragma unroll
      for (int i = 0; i < kPrefetch && i < kSteps; ++i) {
        ldmatrix_x4_trans(Traits::template smem_step<kBlockN>(v_lane, i / kSteps2, (i % kSteps2) * 16), vb[i]);
      }
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[kMTiles][4];
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          a[mt][0] = ElemTraits<Elem>::pack(s[mt][2 * kk][0], s[mt][2 * kk][1]);
          a[mt][1] = ElemTraits<Elem>::pack(s[mt][2 * kk][2], s[mt][2 * kk][3]);
          a[mt][2] = ElemTraits<Elem>::pack(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
          a[mt][3] = ElemTraits<Elem>::pack(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
        }
#pragma unroll
        for (int dt2 = 0; dt2 < kSteps2; ++dt2) {
          const int i = kk * kSteps2 + dt2, ahead = i + kPrefetch;
          if (ahead < kSteps) {
            ldmatrix_x4_trans(Traits::template smem_step<kBlockN>(v_lane, ahead / kSteps2, (ahead % kSteps2) * 16),
                              vb[ahead % (kPrefetch + 1)]);
          }
          const uint32_t(&b)[4] = vb[i % (kPrefetch + 1)];
#pragma unroll
          for (int mt = 0; mt < kMTiles; ++mt) {
            mma<Traits>(o[mt][2 * dt2], a[mt], b[0], b[1]);
            mma<Traits>(o[mt][2 * dt2 + 1], a[mt], b[2], b[3]);
          }
        }
      }
    }
    if (next < n_tiles) store_meta();  // every warp is past this tile's score modification (barrier above)
    n = next;
  }
  cute::cp_async_wait<0>();

  // ---- Epilogue: O / l and lse = ln(sum exp(score)); a row that saw no key gets 0 and -inf ----
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float l = row_sum[mt][half];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const int r = warp_row0 + mt * 16 + g + half * 8;
      if (r >= c.rows) continue;
      const int64_t row = c.sq.start + c.m0 + r;
      const bool seen = l > 0.f;
      const float inv = seen ? 1.f / l : 0.f;
      Elem* dst = out + row * p.out_row_stride + static_cast<int64_t>(c.h) * p.out_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(dst + dt * 8) =
            ElemTraits<Elem>::pack(o[mt][dt][2 * half] * inv, o[mt][dt][2 * half + 1] * inv);
      }
      if (t == 0) {
        p.lse[static_cast<int64_t>(c.h) * p.total_q + row] =
            seen ? row_max[mt][half] * kLn2 + logf(l) : -INFINITY;
      }
    }
  }
}

template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  using Traits = KernelTraits<Elem, kHeadDim>;
  const int64_t m_blocks = (p.max_seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_blocks == 0 || p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  auto kernel = varlen_fwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.num_heads), static_cast<unsigned>(p.batch));
  kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, keys);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
