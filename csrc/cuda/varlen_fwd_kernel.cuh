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
// The kept-key positions and key-side bias of the next tile are fetched one stage ahead into a second shared-memory
// metadata buffer, so neither the gather nor the score modification waits on a global load inside the loop.
// Two variants per (element type, head dim), chosen at launch: one for calls with a query-side mask or bias, one
// without (kernel_traits.h, tile_shape).
// Measured design notes (tile shapes tried, what did and did not pay): benchmarks/results/NOTES.md.
//
// Fragment coordinates (mma.sync m16n8k16, lane = 4 * g + t): accumulator element e of an m16n8 fragment sits at
// row g + 8 * (e / 2), column 2 * t + e % 2.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernel_traits.h"
#include "score_operand.cuh"
#include "varlen_fwd_launch.h"

namespace dmattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
// Scores are kept in natural units (scale * q.k + bias) and exponentiated as exp2((s - max) * log2 e). The fused
// form exp2(fma(s, log2 e, -round(max * log2 e))) saves an instruction, but its error, the rounding of max * log2 e,
// grows with |max| (and overflows past FLT_MAX / log2 e): about |max| * 2^-24, a common factor of the row's weights
// that shows in lse and, when the max moves, in out. So only rows with |max| <= kFusedExpLimit take it (error under
// 1e-4); others (a bias of 1e30 or finfo.min on every key, say) take the unfused form, exact for the max itself.
constexpr float kFusedExpLimit = 1024.f;

// Everything one CTA knows about its tile, computed once at entry. Positions and lengths are int32: cu_seqlens are
// int32, so every clamped sequence start and length fits; only element offsets (row * stride) need 64 bits.
struct TileContext {
  int q_start, q_len, k_start, k_len;  // the sequence's rows in q / k (clamped, see clamp_seq)
  int m0;                    // first query position of the tile in its sequence
  int rows;                  // valid query rows in the tile (<= kBlockM)
  int h, hk;                 // query head, KV head
  const int32_t* key_index;  // sorted kept key positions of this (sequence, mask head); null without a key-side mask
  int n_keys;                // slots: kept keys, or k_len
  int slots_end;             // slots any row of the tile can see (causal prefix)
  int slots_full;            // slots every row of the tile sees: tiles below this need no per-element check
  int causal_shift;          // query i sees key j iff j < i + causal_shift (k_len - q_len + 1), or all keys

  __device__ __forceinline__ int clamp_pos(int pos) const { return pos < 0 ? 0 : (pos >= k_len ? k_len - 1 : pos); }
  // Key position of a slot: clamped, so lying cu_seqlens cannot move a read out of the sequence.
  __device__ __forceinline__ int key_pos(int slot) const {
    return key_index == nullptr ? slot : clamp_pos(key_index[slot]);
  }
};

// Number of slots whose key position is < limit (lower_bound on the sorted list), searched by one whole warp:
// each round probes 32 evenly spaced slots and keeps the gap where the predicate flips.
__device__ __forceinline__ int slots_before(const TileContext& c, int limit, int lane) {
  if (limit <= 0) return 0;
  if (c.key_index == nullptr) return limit < c.n_keys ? limit : c.n_keys;
  int lo = 0, hi = c.n_keys;  // answer in [lo, hi]
  while (lo < hi) {
    const int step = (hi - lo + 31) / 32;
    const int probe = lo + lane * step;
    const bool below = probe < hi && c.key_index[probe] < limit;
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

// Gathered rows: tile row r is key position pos[r] (a list in shared memory, clamped into [0, seq_len) here so a
// lying list cannot leave the sequence) of a sequence whose position 0 is at seq_row0 (column 0 of this head).
template <typename Traits, int kRows>
__device__ __forceinline__ void gather_rows(typename Traits::Elem* smem, const typename Traits::Elem* seq_row0,
                                            int64_t row_stride, const int32_t* pos, int valid_rows, int seq_len,
                                            const void* fallback) {
  using L = RowLoader<Traits>;
  const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
#pragma unroll
  for (int r = r0, i = 0; i < (kRows + L::kRowStep - 1) / L::kRowStep; ++i, r += L::kRowStep) {
    if (kRows % L::kRowStep != 0 && r >= kRows) break;
    const bool valid = r < valid_rows;
    const int j = valid ? min(max(pos[r], 0), seq_len - 1) : 0;
    cp_async_16(smem + Traits::template smem_offset<kRows>(r, col),
                valid ? static_cast<const void*>(seq_row0 + j * row_stride + col) : fallback, valid);
  }
}

// Whether the (kBlockN, D) V tile in shared memory holds an inf or NaN; every thread scans an equal share (16-byte
// reads, conflict-free) and the answer is the CTA's vote. Two 16-bit elements per 32-bit word.
template <typename Traits>
__device__ __forceinline__ bool tile_has_nonfinite(const typename Traits::Elem* tile) {
  constexpr uint32_t kLo = ElemTraits<typename Traits::Elem>::kExpBits, kHi = kLo << 16;
  constexpr int kVecs = Traits::kBlockN * Traits::kHeadDim / 8;  // 16-byte vectors in the tile
  static_assert(kVecs % Traits::kThreads == 0, "the scan splits evenly over the threads");
  const uint4* vecs = reinterpret_cast<const uint4*>(tile);
  bool bad = false;
#pragma unroll 1  // a few registers, not one 16-byte vector per iteration: this runs beside O and S
  for (int i = 0; i < kVecs / Traits::kThreads; ++i) {
    const uint4 w = vecs[i * Traits::kThreads + threadIdx.x];
    for (const uint32_t x : {w.x, w.y, w.z, w.w}) bad |= (x & kLo) == kLo || (x & kHi) == kHi;
  }
  return __syncthreads_or(bad) != 0;
}

// Rare path of tile_has_nonfinite: zeroes the inf / NaN elements of the V tile and flags their slots in v_bad, so
// that a row which cannot see such a key gets 0 * 0 from it in the P V product instead of 0 * NaN. (Rows that do
// give it a nonzero weight are set to NaN by the caller, as the product would have made them.)
template <typename Traits>
__device__ void zero_nonfinite_rows(typename Traits::Elem* tile, uint8_t* v_bad) {
  constexpr uint32_t kLo = ElemTraits<typename Traits::Elem>::kExpBits, kHi = kLo << 16;
  if (threadIdx.x >= Traits::kBlockN) return;
  const int slot = threadIdx.x;
  bool bad = false;
#pragma unroll 1
  for (int col = 0; col < Traits::kHeadDim; col += 2) {
    uint32_t& x = *reinterpret_cast<uint32_t*>(tile + Traits::template smem_offset<Traits::kBlockN>(slot, col));
    const uint32_t keep = ((x & kLo) == kLo ? 0u : 0xffffu) | ((x & kHi) == kHi ? 0u : 0xffff0000u);
    bad |= keep != 0xffffffffu;
    x &= keep;
  }
  v_bad[slot] = bad;
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
varlen_fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys, int batch_offset) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kMTiles = Traits::kMTiles;
  constexpr int kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles, kHeadDim = Traits::kHeadDim;
  constexpr int kPrefetch = Traits::kPrefetch;

  extern __shared__ __align__(128) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  // ---- The tile: sequence, head, query rows, and the key slots it can see ----
  TileContext c;
  const int b = batch_offset + blockIdx.z;
  c.h = blockIdx.y;
  c.hk = c.h / (p.num_heads / p.num_heads_k);
  {
    const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
    const SeqRange sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
    c.q_start = static_cast<int>(sq.start);
    c.q_len = static_cast<int>(sq.len);
    c.k_start = static_cast<int>(sk.start);
    c.k_len = static_cast<int>(sk.len);
  }
  const int64_t m0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kBlockM;  // longest tiles (causal) first
  if (m0 >= c.q_len) return;
  c.m0 = static_cast<int>(m0);
  c.rows = min(kBlockM, c.q_len - c.m0);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, t = lane % 4;

  c.key_index = nullptr;
  c.n_keys = c.k_len;
  if (p.mask.layout == OperandLayout::kKeySide) {
    const int hm = c.h / p.mask.head_group;
    c.key_index = keys.index + static_cast<int64_t>(hm) * p.total_k + c.k_start;
    c.n_keys = min(max(keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm], 0), c.k_len);
  }
  c.causal_shift = c.k_len - c.q_len + 1;
  if (p.is_causal) {
    c.slots_end = slots_before(c, min(c.m0 + c.rows - 1 + c.causal_shift, c.k_len), lane);
    c.slots_full = slots_before(c, min(c.m0 + c.causal_shift, c.k_len), lane);
  } else {
    c.slots_end = c.slots_full = c.n_keys;
  }
  const int n_tiles = (c.slots_end + kBlockN - 1) / kBlockN;

  const int64_t q_head = static_cast<int64_t>(c.h) * p.q_head_stride;
  const int64_t k_head = static_cast<int64_t>(c.hk) * p.k_head_stride;
  const int64_t v_head = static_cast<int64_t>(c.hk) * p.v_head_stride;
  const bool query_mask = Traits::kQueryOperands && p.mask.layout == OperandLayout::kQuerySide;
  const bool query_bias = Traits::kQueryOperands && p.bias.layout == OperandLayout::kQuerySide;
  const bool key_bias = p.bias.layout == OperandLayout::kKeySide;
  const float scale = p.softmax_scale;
  const int mask_head = c.h / p.mask.head_group, bias_head = c.h / p.bias.head_group;

  const Elem* k_seq = static_cast<const Elem*>(p.k) + c.k_start * p.k_row_stride + k_head;
  const Elem* v_seq = static_cast<const Elem*>(p.v) + c.k_start * p.v_row_stride + v_head;

  // Tile metadata, double-buffered in shared memory (buffer `buf` is the current tile's, buf ^ 1 the next one's):
  // the key position of each slot (-1 past the last visible slot) and its key-side bias. Thread
  // tid < kBlockN fetches slot tid of the next tile into registers (position first, bias once the position has
  // arrived) during the current tile's Q K^T and stores it before the barrier that precedes the next K load, so
  // neither the gather nor the score modification waits on a global load inside the loop.
  int meta_pos = -1;
  float meta_bias = 0.f;
  auto fetch_meta_pos = [&](int n) {
    if (tid < kBlockN) {
      const int slot = n * kBlockN + tid;
      meta_pos = slot < c.slots_end ? (c.key_index ? c.key_index[slot] : slot) : -1;
    }
  };
  auto fetch_meta_bias = [&]() {
    if (tid < kBlockN) {
      meta_pos = min(meta_pos, c.k_len - 1);  // a negative position (a corrupt list) stays "no key"
      meta_bias = key_bias && meta_pos >= 0
                      ? bias_value(p.bias, p.bias.offset(c.k_start + meta_pos, c.h, 0))
                      : 0.f;
    }
  };
  auto store_meta = [&](int buffer) {
    if (tid < kBlockN) {
      smem.key_pos[buffer][tid] = meta_pos;
      smem.key_bias[buffer][tid] = meta_bias;
    }
  };
  // K or V rows of the slots of tile n: contiguous key positions, or gathered at the positions of metadata buffer
  // `buffer` (key-side mask).
  auto load_kv = [&](Elem* dst, const Elem* seq, int64_t row_stride, const void* base, int n, int buffer) {
    const int valid = min(kBlockN, c.slots_end - n * kBlockN);
    if (c.key_index == nullptr) {
      load_rows<Traits, kBlockN>(dst, seq + static_cast<int64_t>(n) * kBlockN * row_stride, row_stride, valid, base);
    } else {
      gather_rows<Traits, kBlockN>(dst, seq, row_stride, smem.key_pos[buffer], valid, c.k_len, base);
    }
  };
  // A KV tile is live unless a query-side mask is False for every (row, key) of it the rows can see.
  auto tile_live = [&](int n) -> bool {
    if (!query_mask) return true;
    bool any = false;
    const int n0 = n * kBlockN;
    for (int e = tid; e < c.rows * kBlockN && !any; e += Traits::kThreads) {
      const int r = e / kBlockN, slot = n0 + e % kBlockN;
      if (slot >= c.slots_end) continue;
      const int pos = c.key_pos(slot), i = c.m0 + r;
      if (p.is_causal && pos >= i + c.causal_shift) continue;
      any = p.mask.mask_allows(p.mask.offset(static_cast<int64_t>(c.q_start) + i, c.h, pos));
    }
    return __syncthreads_or(any) != 0;
  };
  auto next_live = [&](int n) {
    while (n < n_tiles && !tile_live(n)) ++n;
    return n;
  };

  // ---- Prologue: Q tile, the metadata and K tile of the first live KV tile ----
  load_rows<Traits, kBlockM>(smem.q,
                             static_cast<const Elem*>(p.q) + static_cast<int64_t>(c.q_start + c.m0) * p.q_row_stride +
                                 q_head,
                             p.q_row_stride, c.rows, p.q);
  int n = next_live(0), buf = 0;
  if (n < n_tiles) {
    fetch_meta_pos(n);
    fetch_meta_bias();
    store_meta(buf);
    __syncthreads();  // the gather reads the positions
    load_kv(smem.k, k_seq, p.k_row_stride, p.k, n, buf);
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
    load_kv(smem.v, v_seq, p.v_row_stride, p.v, n, buf);
    cute::cp_async_fence();
    const int next = next_live(n + 1);
    if (next < n_tiles) fetch_meta_pos(next);  // issued now, consumed after Q K^T
    const int32_t* key_pos = smem.key_pos[buf];
    const float* slot_bias = smem.key_bias[buf];

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

    // ---- Scores: scale, bias, and -inf where a key is not visible ----
    // A tile every row sees whole, with no bias, keeps raw scores: the scale is folded into the softmax FFMAs
    // (exp2(s * scale * log2e - max * log2e)); score_mul says whether s is raw or already scaled.
    const bool whole_tile = n0 + kBlockN <= c.slots_full && !query_mask && !query_bias;
    const bool raw_scores = whole_tile && !key_bias && scale > 0.f;
    const float score_mul = raw_scores ? scale : 1.f;
    if (whole_tile && !raw_scores) {
      // Every row sees every slot of this tile: only the scale and a key-side bias.
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[mt][nt][e] = s[mt][nt][e] * scale + slot_bias[nt * 8 + 2 * t + (e % 2)];
          }
    } else if (!whole_tile) {
      // Causal diagonal, the last (partial) tile, or query-side operands: per element, in two passes that keep
      // few registers live beside O and S. Pass 1 (key slots outer, so each slot's position and bias are read
      // once): scale, key-side bias, -inf where the slot is empty or past the row's causal limit.
      int limit[kMTiles][2];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int r = warp_row0 + mt * 16 + g + half * 8, i = c.m0 + r;
          limit[mt][half] = r < c.rows ? (p.is_causal ? i + c.causal_shift : c.k_len) : 0;
        }
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
      // Pass 2, query-side operands only: a score still finite has a visible key, so its mask / bias element is in
      // bounds (a -inf key bias skips the read, which changes nothing).
      if constexpr (Traits::kQueryOperands) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int64_t qrow = static_cast<int64_t>(c.q_start) + c.m0 + warp_row0 + mt * 16 + g + half * 8;
            const int64_t mask_row = query_mask ? qrow * p.mask.row_stride + mask_head * p.mask.head_stride : 0;
            const int64_t bias_row = query_bias ? qrow * p.bias.row_stride + bias_head * p.bias.head_stride : 0;
#pragma unroll
            for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
              for (int e2 = 0; e2 < 2; ++e2) {
                float& x = s[mt][nt][2 * half + e2];
                if (x == -INFINITY) continue;
                const int64_t pos = key_pos[nt * 8 + 2 * t + e2];
                if (query_mask && !p.mask.mask_allows(mask_row + pos * p.mask.col_stride)) {
                  x = -INFINITY;  // hidden: its bias is not read (it may be NaN)
                } else if (query_bias) {
                  x += bias_value(p.bias, bias_row + pos * p.bias.col_stride);
                }
              }
          }
      }
    }

    if (next < n_tiles) {
      fetch_meta_bias();
      store_meta(buf ^ 1);  // free: its last readers (the previous tile) finished before the barrier at the top
    }
    cute::cp_async_wait<0>();
    __syncthreads();  // V tile n landed; every warp is done with K tile n; the next tile's metadata is visible
    if (next < n_tiles) load_kv(smem.k, k_seq, p.k_row_stride, p.k, next, buf ^ 1);
    cute::cp_async_fence();
    // A tile where some row cannot see some key (the causal diagonal, a query-side mask): that key's V must not reach
    // the row even if it is inf / NaN. (Slots past the last one are zero-filled, so a tail tile needs no scan.)
    const bool hidden_keys = query_mask || (p.is_causal && n0 + kBlockN > c.slots_full && c.slots_full < c.slots_end);
    const bool v_fix = hidden_keys && tile_has_nonfinite<Traits>(smem.v);
    if (v_fix) {
      zero_nonfinite_rows<Traits>(smem.v, smem.v_bad);
      __syncthreads();
    }

    // ---- Online softmax: per row, rescale O by exp(old max - new max), P = exp(S - new max) ----
    // Row maxima first, then the exponentials of every row in one straight run (so the MUFU latency of one row hides
    // behind the others), in the fused form unless some row's max is past kFusedExpLimit (warp-uniform choice).
    float alpha[kMTiles][2], base_log2[kMTiles][2];
    bool max_moved = false, fused = true;
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
        base_log2[mt][half] = base * kLog2e;  // inf when |base| > kFusedExpLimit: then the unfused form runs
        alpha[mt][half] = exp2f((row_max[mt][half] - base) * kLog2e);  // old max <= base: no overflow
        max_moved |= new_max != row_max[mt][half];
        // A row with a +inf max is NaN on either form: it must not move the rest of the warp off the fused one.
        fused &= fabsf(base) <= kFusedExpLimit || base == INFINITY;
        row_max[mt][half] = new_max;
      }
    }
    // Both forms turn a +inf or NaN score into a NaN row sum (a NaN row).
    const float mul_log2 = score_mul * kLog2e;
    auto exponentiate = [&](auto fused_form) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float base = row_max[mt][half] == -INFINITY ? 0.f : row_max[mt][half];  // for the unfused form
          float sum = 0.f;
#pragma unroll
          for (int e = 0; e < 2 * kNTiles; ++e) {
            float& x = s[mt][e / 2][2 * half + e % 2];
            x = decltype(fused_form)::value ? exp2f(fmaf(x, mul_log2, -base_log2[mt][half]))
                                            : exp2f((x * score_mul - base) * kLog2e);
            sum += x;
          }
          row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
        }
      }
    };
    if (__all_sync(0xffffffffu, fused)) {
      exponentiate(std::true_type{});
    } else {
      exponentiate(std::false_type{});
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

    if (v_fix) {  // rows that give a key whose V held inf / NaN a nonzero weight: NaN, as the product would be
#pragma unroll
      for (int e = 0; e < kMTiles * kNTiles * 4; ++e) {
        const int mt = e / (kNTiles * 4), nt = (e / 4) % kNTiles, i = e % 4;
        if (smem.v_bad[nt * 8 + 2 * t + i % 2] && s[mt][nt][i] > 0.f) poisoned_rows |= 1u << (2 * mt + i / 2);
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
    buf ^= 1;
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
      // The four lanes of a quad hold one row: its out is NaN (lse is not affected) if any of them saw it give weight
      // to a key whose V held inf / NaN in a tile where those values were zeroed.
      const unsigned poisoned = __ballot_sync(0xffffffffu, (poisoned_rows >> (2 * mt + half)) & 1u);
      const int r = warp_row0 + mt * 16 + g + half * 8;
      if (r >= c.rows) continue;
      const int64_t row = static_cast<int64_t>(c.q_start) + c.m0 + r;
      const bool seen = l != 0.f;  // 0: nothing visible (0 / -inf); NaN: a NaN or +inf score (NaN row)
      const float inv = (poisoned >> (lane & ~3)) & 0xfu ? __int_as_float(0x7fc00000) : seen ? 1.f / l : 0.f;
      Elem* dst = out + row * p.out_row_stride + static_cast<int64_t>(c.h) * p.out_head_stride + 2 * t;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        *reinterpret_cast<uint32_t*>(dst + dt * 8) =
            ElemTraits<Elem>::pack(o[mt][dt][2 * half] * inv, o[mt][dt][2 * half + 1] * inv);
      }
      if (t == 0) {
        p.lse[static_cast<int64_t>(c.h) * p.total_q + row] =
            seen ? row_max[mt][half] + logf(l) : -INFINITY;
      }
    }
  }
}

constexpr int32_t kMaxGridZ = 65535;

template <typename Traits>
cudaError_t launch_kernel(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  const int64_t m_blocks = (p.max_seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_blocks == 0 || p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  auto kernel = varlen_fwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  // Grid (query tiles, heads, sequences). grid.z holds at most 65535 sequences, so larger batches take several
  // launches; grid.x (2^31 - 1) holds m_blocks, as the binding caps max_seqlen_q at total_q.
  for (int64_t b0 = 0; b0 < p.batch; b0 += kMaxGridZ) {
    const dim3 grid(static_cast<unsigned>(m_blocks), static_cast<unsigned>(p.num_heads),
                    static_cast<unsigned>(std::min<int64_t>(p.batch - b0, kMaxGridZ)));
    kernel<<<grid, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, keys, static_cast<int>(b0));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Two kernels per (Elem, kHeadDim): calls with a query-side mask or bias get the variant that reads them (a smaller
// query tile, to keep its per-element path within the register budget); all others the one that cannot.
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  const bool query_operands =
      p.mask.layout == OperandLayout::kQuerySide || p.bias.layout == OperandLayout::kQuerySide;
  return query_operands ? launch_kernel<KernelTraits<Elem, kHeadDim, true>>(p, keys, stream)
                        : launch_kernel<KernelTraits<Elem, kHeadDim, false>>(p, keys, stream);
}

}  // namespace dmattn::cuda
