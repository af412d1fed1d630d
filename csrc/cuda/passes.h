// passes.h: the two small kernels around the attention kernel, torch-free.
//
//   before: compact_keys   a key-side mask -> per (sequence, mask head) sorted lists of kept key positions, so the
//                          attention kernel gathers only kept K / V rows (key_compaction.cu)
//   after:  finish_rows    the cu_seqlens contract check, and 0 / -inf for query rows no sequence owns; NaN in every
//                          element of out and lse when the contract is broken (unowned_rows.cu)
// Neither synchronises the device, and both clamp sequence ranges exactly as the attention kernel does (clamp_seq).
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

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);

// Runs after the attention kernel (it may overwrite that kernel's rows with NaN).
cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream);

}  // namespace dmattn::cuda
