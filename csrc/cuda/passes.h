// passes.h: the small kernels around the attention kernel, and the workspace pieces they share with it; torch-free.
//
//   before: compact_keys     a key-side mask -> per (sequence, mask head) sorted lists of kept key positions, so the
//                            attention kernel gathers only kept K / V rows (key_compaction.cu)
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

// Everything a call's kernels find in its workspace (heuristics.h: workspace_layout, carve_workspace).
struct Workspace {
  KeyLists keys;
  SplitPartials splits;
};

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);

// out and lse of the query rows [0, cu_seqlens_q[B]) from the partials of splits.num_splits > 1 splits. Runs after
// the decode kernel and before finish_rows.
cudaError_t combine_splits(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream);

// Runs after the attention kernel (it may overwrite that kernel's rows with NaN).
cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream);

}  // namespace dmattn::cuda
