// kv_tiles.cuh: moving K, V and key-side bias tiles from global to shared memory (cp.async, 16 bytes per thread per
// row), densely or gathered at the slots' keys (key-side mask, kv_slots pool), plus the Q tile.
//
// Per KV tile the loader also keeps the tile's metadata, double-buffered in shared memory (kernel_traits.h,
// SharedStorage::key_pos / key_bias, and in the decode kernel key_row): the key position of each slot (-1 past the
// last visible slot), its key-side bias and (decode) the row of k / v that holds it. Thread tid < kBlockN fetches
// slot tid of the next tile into registers (position first, bias once the position has arrived) during the current
// tile's Q K^T and stores it before the barrier that precedes the next K load, so neither the gather nor the score
// modification waits on a global load inside the loop.
#pragma once

#include <cuda_runtime.h>

#include <cute/arch/copy_sm80.hpp>
#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../score_operand.cuh"
#include "tile_scheduler.cuh"

namespace dmattn::cuda::sm80 {

// Thread t moves 16-byte column chunk t % kLoadCols of rows t / kLoadCols + i * kRowStep.
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
// of this head). Rows at or past valid_rows are zero-filled without reading global memory; `fallback` is any
// readable address, passed for them.
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

// One KV head of K or V as the loaders see it: row(j) is row first_row + j. The prefill kernel: first_row is the
// sequence's key 0 (its keys are consecutive rows) and j a key position. The decode kernel (Traits::kSlotRows):
// first_row is 0 and j a row of the tensor (a pool row, or the packed row of a key), resolved per slot in the tile
// metadata.
template <typename Elem>
struct KvSource {
  const Elem* key0;    // column 0 of this head in row first_row
  int64_t row_stride;  // elements per row

  __device__ __forceinline__ KvSource(const void* base, int64_t head_offset, int64_t row_stride_, int64_t first_row)
      : key0(static_cast<const Elem*>(base) + first_row * row_stride_ + head_offset), row_stride(row_stride_) {}
  __device__ __forceinline__ const Elem* row(int64_t j) const { return key0 + j * row_stride; }
};

// Gathered rows (the prefill kernel): tile row r is key position pos[r] of the source (a list in shared memory,
// clamped into [0, seq_len) here so a lying list cannot leave the sequence).
template <typename Traits, int kRows>
__device__ __forceinline__ void gather_rows(typename Traits::Elem* smem, const KvSource<typename Traits::Elem>& src,
                                            const int32_t* pos, int valid_rows, int seq_len, const void* fallback) {
  using L = RowLoader<Traits>;
  const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
#pragma unroll
  for (int r = r0, i = 0; i < (kRows + L::kRowStep - 1) / L::kRowStep; ++i, r += L::kRowStep) {
    if (kRows % L::kRowStep != 0 && r >= kRows) break;
    const bool valid = r < valid_rows;
    const int j = valid ? KeyLists::clamp_pos(pos[r], seq_len) : 0;
    cp_async_16(smem + Traits::template smem_offset<kRows>(r, col),
                valid ? static_cast<const void*>(src.row(j) + col) : fallback, valid);
  }
}

// The K and V rows of one KV tile gathered at rows[r] (the decode kernel): tensor rows that the tile metadata already
// resolved into the tensor (KvTiles::resolve clamps them), so a row costs a shared load, one 32 x 32 -> 64-bit
// multiply-add per tensor and the two copies: no clamp, no branch. Rows at or past valid_rows read nothing and are
// zero-filled (their entry is row 0). Byte strides fit in 32 bits (decode_supports).
template <typename Traits>
__device__ __forceinline__ void gather_kv_rows(typename Traits::Elem* k_smem, typename Traits::Elem* v_smem,
                                               const typename Traits::Elem* k_row0, int32_t k_stride_bytes,
                                               const typename Traits::Elem* v_row0, int32_t v_stride_bytes,
                                               const int32_t* rows, int valid_rows) {
  using L = RowLoader<Traits>;
  constexpr int kRows = Traits::kBlockN;
  const int r0 = threadIdx.x / L::kLoadCols, col = (threadIdx.x % L::kLoadCols) * 8;
  if (col >= Traits::kHeadDim) return;
  const char* k_col = reinterpret_cast<const char*>(k_row0 + col);
  const char* v_col = reinterpret_cast<const char*>(v_row0 + col);
  const int at0 = Traits::template smem_offset<kRows>(r0, col);
#pragma unroll
  for (int r = r0, i = 0; i < (kRows + L::kRowStep - 1) / L::kRowStep; ++i, r += L::kRowStep) {
    if (kRows % L::kRowStep != 0 && r >= kRows) break;
    const int row = rows[r];
    const bool valid = r < valid_rows;
    // The swizzle repeats every kSwizzleRows rows: a step of whole periods moves the offset by whole rows.
    const int at = L::kRowStep % Traits::kSwizzleRows == 0 ? at0 + i * L::kRowStep * Traits::kGroup
                                                           : Traits::template smem_offset<kRows>(r, col);
    cp_async_16(k_smem + at, k_col + static_cast<int64_t>(row) * k_stride_bytes, valid);
    cp_async_16(v_smem + at, v_col + static_cast<int64_t>(row) * v_stride_bytes, valid);
  }
}

// The KV-tile side of one CTA: K / V tile loads and the per-tile slot metadata (see the top of this file). The decode
// kernel uses it too, with its own ring of metadata slots (`buffer`) and K / V stages (load_kv_into).
template <typename Traits>
struct KvTiles {
  using Elem = typename Traits::Elem;
  static constexpr int kBlockN = Traits::kBlockN;

  const VarlenFwdParams& p;
  const TileContext& c;
  typename Traits::SharedStorage& smem;
  KvSource<Elem> k, v;
  bool key_bias;  // a key-side bias, read per slot into the metadata
  int meta_pos = -1;
  int meta_row = 0;  // the decode kernel: the row of k / v holding meta_pos
  uint32_t meta_bias = 0;  // its key-side bias's bits (bias_bits), converted by store(): the load is not waited on
  // fetch_pipelined: the next tile's position (clamped) and row (not yet clamped), the position of the tile after.
  int ahead_pos = -1, ahead_row = 0, ahead2_pos = -1;

  __device__ __forceinline__ KvTiles(const VarlenFwdParams& p_, const TileContext& c_,
                                     typename Traits::SharedStorage& smem_)
      : p(p_),
        c(c_),
        smem(smem_),
        k(p_.k, static_cast<int64_t>(c_.hk) * p_.k_head_stride, p_.k_row_stride, Traits::kSlotRows ? 0 : c_.k_start),
        v(p_.v, static_cast<int64_t>(c_.hk) * p_.v_head_stride, p_.v_row_stride, Traits::kSlotRows ? 0 : c_.k_start),
        key_bias(p_.bias.layout == OperandLayout::kKeySide) {}

  // The Q tile (kBlockM rows of this head from the tile's first query).
  __device__ __forceinline__ void load_q() {
    load_rows<Traits, Traits::kBlockM>(smem.q,
                                       static_cast<const Elem*>(p.q) +
                                           static_cast<int64_t>(c.q_start + c.m0) * p.q_row_stride +
                                           static_cast<int64_t>(c.h) * p.q_head_stride,
                                       p.q_row_stride, c.rows, p.q);
  }

  // Metadata of tile n, step 1 (issued early): the slot's key position.
  __device__ __forceinline__ void fetch_pos(int n) {
    if (threadIdx.x < kBlockN) meta_pos = position_of(n * kBlockN + threadIdx.x);
  }
  // Step 2 (once the position has arrived): its pool row and key-side bias.
  __device__ __forceinline__ void fetch_bias() {
    if (threadIdx.x < kBlockN) meta_bias = resolve(meta_pos, meta_row);
  }
  // Step 3: into metadata buffer `buffer`, for the loads and score modification of that tile.
  __device__ __forceinline__ void store(int buffer) {
    if (threadIdx.x < kBlockN) {
      smem.key_pos[buffer][threadIdx.x] = meta_pos;
      smem.key_bias[buffer][threadIdx.x] = bias_from_bits(p.bias.dtype, meta_bias);
      if constexpr (Traits::kSlotRows) smem.key_row[buffer][threadIdx.x] = meta_row;
    }
  }
  // The decode ring's metadata, a pipeline three tiles deep with one load per tile and step: called once per
  // iteration (after the barrier) for the tile whose metadata is stored at the iteration's end, n_store, it issues the
  // bias load of n_store (its row loaded in the previous iteration), the kv_slots load of n_store + 1 (its position
  // loaded then) and the kept-key list load of n_store + 2. What depends on a load (a clamp, a conversion) runs an
  // iteration or a compute phase later, so no warp waits on a load in the iteration that issues it. The pipeline
  // starts as prime_ahead() leaves it.
  __device__ __forceinline__ void fetch_pipelined(int n_store, int n_end) {
    if (threadIdx.x < kBlockN) {
      meta_pos = ahead_pos;
      meta_row = clamp_row(ahead_row);
      meta_bias = meta_pos >= 0 ? bias_bits_of_row(meta_row) : 0u;
      ahead_pos = min(ahead2_pos, c.k_len - 1);
      ahead_row = unclamped_row(ahead_pos);
      ahead2_pos = n_store + 2 < n_end ? position_of((n_store + 2) * kBlockN + threadIdx.x) : -1;
    }
  }
  // The first fetch_pipelined's state: the position and row of tile n, the position of n + 1 (past n_end: none).
  __device__ __forceinline__ void prime_ahead(int n, int n_end) {
    if (threadIdx.x < kBlockN) {
      ahead_pos = n < n_end ? min(position_of(n * kBlockN + threadIdx.x), c.k_len - 1) : -1;
      ahead2_pos = n + 1 < n_end ? position_of((n + 1) * kBlockN + threadIdx.x) : -1;
      ahead_row = unclamped_row(ahead_pos);
    }
  }

  // Steps 1-3 for kCount tiles at once, n0 + i into buffer i (tiles at or past n_end: no keys), with the kCount
  // position loads and then the kCount bias loads in flight together: a prologue pays two load latencies, not 2 kCount.
  template <int kCount>
  __device__ __forceinline__ void fetch_store_first(int n0, int n_end) {
    if (threadIdx.x >= kBlockN) return;
    int pos[kCount], row[kCount];
    uint32_t bias[kCount];
#pragma unroll
    for (int i = 0; i < kCount; ++i) pos[i] = n0 + i < n_end ? position_of((n0 + i) * kBlockN + threadIdx.x) : -1;
#pragma unroll
    for (int i = 0; i < kCount; ++i) bias[i] = resolve(pos[i], row[i]);
#pragma unroll
    for (int i = 0; i < kCount; ++i) {
      smem.key_pos[i][threadIdx.x] = pos[i];
      smem.key_bias[i][threadIdx.x] = bias_from_bits(p.bias.dtype, bias[i]);
      if constexpr (Traits::kSlotRows) smem.key_row[i][threadIdx.x] = row[i];
    }
  }

  // The prefill kernel: K / V of tile n into its one tile buffer, with the metadata of buffer `buffer`.
  __device__ __forceinline__ void load_k(int n, int buffer) { load(smem.k, k, p.k, n, buffer); }
  __device__ __forceinline__ void load_v(int n, int buffer) { load(smem.v, v, p.v, n, buffer); }
  // The decode kernel: K and V of tile n into a stage of its ring: consecutive rows, or gathered at the rows of
  // metadata slot `buffer` (a key-side mask's kept keys, a kv_slots pool).
  __device__ __forceinline__ void load_kv_into(Elem* k_dst, Elem* v_dst, int n, int buffer) {
    static_assert(Traits::kSlotRows, "the decode kernel's metadata carries each slot's row");
    const int valid = min(kBlockN, c.slots_end - n * kBlockN);
    if (pool(p) || c.key_index != nullptr) {
      gather_kv_rows<Traits>(k_dst, v_dst, k.key0, static_cast<int32_t>(k.row_stride * sizeof(Elem)), v.key0,
                             static_cast<int32_t>(v.row_stride * sizeof(Elem)), smem.key_row[buffer], valid);
    } else {
      const int64_t first = static_cast<int64_t>(c.k_start) + n * kBlockN;
      load_rows<Traits, kBlockN>(k_dst, k.row(first), k.row_stride, valid, p.k);
      load_rows<Traits, kBlockN>(v_dst, v.row(first), v.row_stride, valid, p.v);
    }
  }

 private:
  // The key position of a slot (-1: past the last visible slot), as the list or the dense order says.
  __device__ __forceinline__ int position_of(int slot) const {
    return slot < c.slots_end ? (c.key_index ? c.key_index[slot] : slot) : -1;
  }
  // Whether K / V are a kv_slots pool this kernel reads in place (the prefill kernel gets packed keys).
  static __device__ __forceinline__ bool pool(const VarlenFwdParams& params) {
    return Traits::kSlotRows && params.kv_slots != nullptr;
  }
  // The row of k, v and key-side operands holding key position pos >= 0 (-1: row 0, a readable row that the loads
  // zero-fill), in two halves as KeyRows has them: a pool row is clamped into the pool where it is used.
  __device__ __forceinline__ int unclamped_row(int pos) const {
    return pos < 0 ? 0 : pool(p) ? static_cast<int>(c.key_rows(p).unclamped(pos)) : c.k_start + pos;
  }
  __device__ __forceinline__ int clamp_row(int row) const {
    return pool(p) ? static_cast<int>(c.key_rows(p).clamp(row)) : row;
  }
  // Key position pos clamped to the sequence (a negative position, from a corrupt list, stays "no key" and reads
  // nothing) and its row.
  __device__ __forceinline__ int row_of(int& pos) const {
    pos = min(pos, c.k_len - 1);
    return clamp_row(unclamped_row(pos));
  }
  // The same plus the bits of the key-side bias at the row.
  __device__ __forceinline__ uint32_t resolve(int& pos, int& row) const {
    row = row_of(pos);
    return pos < 0 ? 0u : bias_bits_of_row(row);
  }
  // The bits of the key-side bias at a key's row (0, which is 0.f, without one).
  __device__ __forceinline__ uint32_t bias_bits_of_row(int row) const {
    return key_bias ? bias_bits(p.bias, p.bias.offset(row, c.h, 0)) : 0u;
  }

  // The prefill kernel's rows of the slots of tile n: contiguous key positions, or gathered at the positions of
  // metadata buffer `buffer` (key-side mask).
  __device__ __forceinline__ void load(Elem* dst, const KvSource<Elem>& src, const void* fallback, int n,
                                       int buffer) {
    static_assert(!Traits::kSlotRows, "the decode kernel loads through load_kv_into");
    const int valid = min(kBlockN, c.slots_end - n * kBlockN);
    if (c.key_index == nullptr) {
      load_rows<Traits, kBlockN>(dst, src.row(n * kBlockN), src.row_stride, valid, fallback);
    } else {
      gather_rows<Traits, kBlockN>(dst, src, smem.key_pos[buffer], valid, c.k_len, fallback);
    }
  }
};

}  // namespace dmattn::cuda::sm80
