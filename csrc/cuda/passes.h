// passes.h: the small kernels around the attention kernel, and the workspace pieces they share with it; torch-free.
//
//   before: compact_keys     a key-side mask -> per (sequence, mask head) sorted lists of kept key positions, so the
//                            attention kernel gathers only kept K / V rows (key_compaction.cu)
//           build_block_map  a query-side mask -> per (mask head, block of query rows, block of key positions) a
//                            summary (no key visible / every key visible / some), so the prefill kernel skips dead
//                            tiles and runs whole-visible ones without reading the mask (block_map.cu)
//   after:  combine_splits   the decode kernel's per-split partial results -> out and lse (split_combine.cu)
//           finish_rows      the cu_seqlens contract check, and 0 / -inf for query rows no sequence owns; NaN in every
//                            element of out and lse when the contract is broken (unowned_rows.cu)
// None synchronises the device, and all clamp sequence ranges exactly as the attention kernel does (clamp_seq).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// Per (sequence, mask head) list of the key positions a key-side mask keeps, in ascending order.
//   index (mask_heads, total_k) int32: index[hm, cu_k[b] + c] = position (in sequence b) of its c-th kept key
//   count (batch, mask_heads)   int32: number of kept keys
// All null / 0 when the call has no key-side mask. Lives in the call's workspace (heuristics.h).
struct KeyLists {
  int32_t* index = nullptr;
  int32_t* count = nullptr;
  int32_t mask_heads = 0;
};

// The decode kernel's key splits (heuristics.h plans them): split s of a (sequence, KV head, row tile) covers KV
// tiles [s * tiles_per_split, (s + 1) * tiles_per_split) of its key slots. With num_splits > 1 each split writes,
// per (query head h, query row i), its own lse and its O normalized by its own sum, float32:
//   lse[(s * H + h) * total_q + i]            -inf: the split saw no key of the row (its O is then not written)
//   o[((s * H + h) * total_q + i) * D + d]
// and combine_splits merges them. lse / o are null when num_splits == 1 (the kernel writes out and lse itself).
struct SplitPartials {
  float* lse = nullptr;
  float* o = nullptr;
  int32_t num_splits = 1;
  int32_t tiles_per_split = 0;
  int32_t row_tiles = 1;  // packed-row tiles per (sequence, KV head)
};

// A query-side mask summarized by blocks of kRows packed query rows (rows r with r / kRows = rb, in packed q order,
// so a block may hold rows of two sequences) and kCols key positions (j / kCols = cb, positions inside each row's own
// sequence, as the mask's last dimension counts them): state[(hm * row_blocks + rb) * col_blocks + cb] has kSomeTrue
// where some element of the block is True and kSomeFalse where some is False. A block holds every element of the
// mask, padding past a sequence's keys and rows of a neighbouring sequence included, so a summary only ever
// understates what is known: no kSomeTrue proves a tile dead, no kSomeFalse proves it whole-visible, and anything else
// is read per element. Null state when the call has no query-side mask.
struct BlockMap {
  static constexpr int kRows = 64;  // the query-side prefill variant's query tile (tile_shape_sm80)
  static constexpr int kCols = 32;  // divides its key tile (64, or 32 at D = 256)
  static constexpr uint8_t kSomeTrue = 1, kSomeFalse = 2;
  uint8_t* state = nullptr;
  int32_t row_blocks = 0;  // ceil(total_q / kRows)
  int32_t col_blocks = 0;  // ceil(key_extent(p) / kCols)
  int32_t mask_heads = 0;

  static int64_t blocks(int64_t rows, int64_t per) { return (rows + per - 1) / per; }
  // The key positions a kernel can reach: below every sequence's clamped key count, so below max_seqlen_k, total_k
  // and 2^31 (cu_seqlens are int32). A max_seqlen_k of 2^40 over an expanded (stride-0) mask column costs the map
  // nothing.
  DMATTN_HOST_DEVICE static int64_t key_extent(const VarlenFwdParams& p) {
    int64_t extent = p.max_seqlen_k < p.total_k ? p.max_seqlen_k : p.total_k;
    return extent < INT32_MAX ? extent : INT32_MAX;
  }
  // Bytes of the map of a call with that many mask heads.
  static int64_t bytes(const VarlenFwdParams& p, int64_t heads) {
    return heads * blocks(p.total_q, kRows) * blocks(key_extent(p), kCols);
  }
  // The union of the states of the blocks covering packed rows [row0, row0 + rows) and key positions [j0, j1)
  // (rows >= 1, j0 < j1) of mask head hm. Every index stays inside the map for rows within total_q and positions
  // within max_seqlen_k, which the kernels' clamped sequence ranges guarantee.
  DMATTN_HOST_DEVICE uint8_t covering(int hm, int64_t row0, int rows, int j0, int j1) const {
    uint8_t s = 0;
    for (int64_t rb = row0 / kRows; rb <= (row0 + rows - 1) / kRows; ++rb) {
      const uint8_t* line = state + (static_cast<int64_t>(hm) * row_blocks + rb) * col_blocks;
      for (int cb = j0 / kCols; cb <= (j1 - 1) / kCols; ++cb) s |= line[cb];
    }
    return s;
  }
};

// Everything a call's kernels find in its workspace (heuristics.h: workspace_layout, carve_workspace).
struct Workspace {
  KeyLists keys;
  SplitPartials splits;
  BlockMap blocks;
};

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);

// Fills map.state from the query-side mask (nothing when map.state is null).
cudaError_t build_block_map(const VarlenFwdParams& p, const BlockMap& map, cudaStream_t stream);

// out and lse of the query rows [0, cu_seqlens_q[B]) from the partials of splits.num_splits > 1 splits. Runs after
// the decode kernel and before finish_rows.
cudaError_t combine_splits(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream);

// Runs after the attention kernel (it may overwrite that kernel's rows with NaN).
cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream);

}  // namespace dmattn::cuda
