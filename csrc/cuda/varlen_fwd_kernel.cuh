// varlen_fwd_kernel.cuh: the attention kernel, FlashAttention-2 style on SM80 tensor-core atoms (runs on SM80+).
//
// One CTA computes one query tile (kBlockM rows) of one query head of one sequence. It walks the sequence's key
// *slots* in tiles of kBlockN: without a key-side mask slot c is key position c; with one, slot c is the c-th key
// the mask keeps (KeyLists, built by compact_keys.cu), so masked keys are never loaded nor multiplied, and the
// causal limit becomes a prefix of the slots (found by a warp-wide search of the sorted list).
//
// Per KV tile (pipeline as in FlashAttention-2: the V load overlaps Q K^T, the next K load overlaps softmax + P V):
//   gather K rows (cp.async, zero-fill past the end) -> S = Q K^T (ldmatrix + mma.sync, fp32)
//   -> scale, bias, causal / query-side mask -> online softmax in registers -> O += P V (ldmatrix.trans + mma.sync)
// A KV tile whose query-side mask is False for every row of the query tile is skipped before K / V are loaded.
//
// Fragment coordinates (mma.sync m16n8k16, lane = 4 * g + t): accumulator element e of an m16n8 fragment sits at
// row g + 8 * (e / 2), column 2 * t + e % 2.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm75.hpp>
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

// cp.async of `rows` rows of a (tokens, heads, D) tensor into a swizzled smem tile; rows whose slot is invalid are
// zero-filled (nothing is read for them). row_of(r) returns the packed token row of tile row r, or -1.
template <typename Traits, int kRows, typename RowOf>
__device__ __forceinline__ void load_tile(typename Traits::Elem* smem, const void* gmem, int64_t row_stride,
                                          int64_t head_offset, RowOf row_of) {
  using Elem = typename Traits::Elem;
  constexpr int kChunks = kRows * Traits::kChunksPerRow;
  const Elem* base = static_cast<const Elem*>(gmem);
#pragma unroll
  for (int i = 0; i < kChunks / Traits::kThreads; ++i) {
    const int chunk = threadIdx.x + i * Traits::kThreads;
    const int r = chunk / Traits::kChunksPerRow;
    const int col = (chunk % Traits::kChunksPerRow) * 8;
    const int64_t row = row_of(r);
    const Elem* src = row >= 0 ? base + row * row_stride + head_offset + col : base;
    cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
        *reinterpret_cast<const cute::uint128_t*>(src),
        *reinterpret_cast<cute::uint128_t*>(smem + Traits::template smem_offset<kRows>(r, col)), row >= 0);
  }
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
varlen_fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  using Elem = typename Traits::Elem;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kMTiles = Traits::kMTiles;
  constexpr int kNTiles = Traits::kNTiles, kDTiles = Traits::kDTiles, kHeadDim = Traits::kHeadDim;

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

  auto kv_row = [&](int64_t n0) {
    return [&c, n0](int r) -> int64_t {
      const int64_t slot = n0 + r;
      return slot < c.slots_end ? c.sk.start + c.key_pos(slot) : -1;
    };
  };
  // Key positions and key-side bias of the slots of tile n, for the score modification.
  auto load_tile_meta = [&](int n) {
    if (tid < kBlockN) {
      const int64_t slot = static_cast<int64_t>(n) * kBlockN + tid;
      const int64_t pos = slot < c.slots_end ? c.key_pos(slot) : -1;
      smem.key_pos[tid] = static_cast<int32_t>(pos);
      smem.key_bias[tid] = key_bias && pos >= 0
                               ? bias_value(p.bias, operand_offset(p.bias, c.sk.start + pos, c.h, 0)) * kLog2e
                               : 0.f;
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
  load_tile<Traits, kBlockM>(smem.q, p.q, p.q_row_stride, q_head, [&c](int r) -> int64_t {
    return r < c.rows ? c.sq.start + c.m0 + r : -1;
  });
  int n = next_live(0);
  if (n < n_tiles) {
    load_tile<Traits, kBlockN>(smem.k, p.k, p.k_row_stride, k_head, kv_row(static_cast<int64_t>(n) * kBlockN));
    load_tile_meta(n);
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
  const uint32_t k_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.k)) +
                          2 * Traits::template smem_offset<kBlockN>((lane & 7) + (lane >> 4) * 8, ((lane >> 3) & 1) * 8);
  const uint32_t v_lane = static_cast<uint32_t>(__cvta_generic_to_shared(smem.v)) +
                          2 * Traits::template smem_offset<kBlockN>((lane & 7) + ((lane >> 3) & 1) * 8, (lane >> 4) * 8);

  while (n < n_tiles) {
    const int64_t n0 = static_cast<int64_t>(n) * kBlockN;
    cute::cp_async_wait<0>();
    __syncthreads();  // K tile n (and Q) landed; every warp is done with V of the previous tile
    load_tile<Traits, kBlockN>(smem.v, p.v, p.v_row_stride, v_head, kv_row(n0));
    cute::cp_async_fence();

    // ---- S = Q K^T: s[mt][nt] is the m16n8 fragment (rows warp_row0 + 16 mt, slots 8 nt) ----
    float s[kMTiles][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
      uint32_t a[kMTiles][4];
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
        ldmatrix_x4(Traits::template smem_step<kBlockM>(q_lane, mt, kk * 16), a[mt]);
      }
#pragma unroll
      for (int nt2 = 0; nt2 < kNTiles / 2; ++nt2) {
        uint32_t bk[4];
        ldmatrix_x4(Traits::template smem_step<kBlockN>(k_lane, nt2, kk * 16), bk);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma<Traits>(s[mt][2 * nt2], a[mt], bk[0], bk[1]);
          mma<Traits>(s[mt][2 * nt2 + 1], a[mt], bk[2], bk[3]);
        }
      }
    }

    // ---- Scores in the log2 domain: scale, bias, and -inf where a key is not visible ----
    const bool check = n0 + kBlockN > c.slots_full;  // causal diagonal or the last, partial tile
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = warp_row0 + mt * 16 + g + (e / 2) * 8;
          const int col = nt * 8 + 2 * t + (e % 2);
          float x = s[mt][nt][e] * scale_log2;
          if (key_bias) x += smem.key_bias[col];
          if (check || query_mask || query_bias) {
            const int64_t pos = smem.key_pos[col], i = c.m0 + r;
            const bool visible = pos >= 0 && r < c.rows && (!p.is_causal || pos < i + c.causal_shift);
            if (!visible) {
              x = -INFINITY;
            } else {
              if (query_mask && !mask_value(p.mask, operand_offset(p.mask, c.sq.start + i, c.h, pos))) x = -INFINITY;
              if (query_bias) x += bias_value(p.bias, operand_offset(p.bias, c.sq.start + i, c.h, pos)) * kLog2e;
            }
          }
          s[mt][nt][e] = x;
        }
      }
    }

    cute::cp_async_wait<0>();
    __syncthreads();  // V tile n landed; every warp is done with K tile n and its metadata
    const int next = next_live(n + 1);
    if (next < n_tiles) {
      load_tile<Traits, kBlockN>(smem.k, p.k, p.k_row_stride, k_head,
                                         kv_row(static_cast<int64_t>(next) * kBlockN));
      load_tile_meta(next);
    }
    cute::cp_async_fence();

    // ---- Online softmax: per row, rescale O by exp2(old max - new max), P = exp2(S - new max) ----
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float new_max = fmaxf(row_max[mt][half], mx);
        const float base = new_max == -INFINITY ? 0.f : new_max;  // a row with nothing visible yet stays at 0
        const float alpha = exp2f(row_max[mt][half] - base);
        row_max[mt][half] = new_max;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          s[mt][nt][2 * half] = exp2f(s[mt][nt][2 * half] - base);
          s[mt][nt][2 * half + 1] = exp2f(s[mt][nt][2 * half + 1] - base);
          sum += s[mt][nt][2 * half] + s[mt][nt][2 * half + 1];
        }
        row_sum[mt][half] = row_sum[mt][half] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kDTiles; ++dt) {
          o[mt][dt][2 * half] *= alpha;
          o[mt][dt][2 * half + 1] *= alpha;
        }
      }
    }

    // ---- O += P V: the S accumulators of two n8 fragments are the A operand of one k16 step ----
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
      for (int dt2 = 0; dt2 < kDTiles / 2; ++dt2) {
        uint32_t bv[4];
        ldmatrix_x4_trans(Traits::template smem_step<kBlockN>(v_lane, kk, dt2 * 16), bv);
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          mma<Traits>(o[mt][2 * dt2], a[mt], bv[0], bv[1]);
          mma<Traits>(o[mt][2 * dt2 + 1], a[mt], bv[2], bv[3]);
        }
      }
    }
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
