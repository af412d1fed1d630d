// varlen_fwd_launch.h: the torch-free entry points of the CUDA backend, called by varlen_fwd_cuda.cpp.
//
// The registration file validates, allocates out / lse and the scratch buffers through torch, fills a
// VarlenFwdParams and calls run_varlen_fwd on the current stream. Nothing here synchronises the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// Per (sequence, mask head) list of the key positions a key-side mask keeps, in ascending order. Built on the
// device by a pre-pass (compact_keys_kernel in varlen_fwd_run.cu) so the main kernel gathers only kept K/V rows.
//   index (mask_heads, total_k) int32: index[hm, cu_k[b] + c] = position (in sequence b) of its c-th kept key
//   count (batch, mask_heads)   int32: number of kept keys
struct KeyLists {
  int32_t* index = nullptr;
  int32_t* count = nullptr;
  int32_t mask_heads = 0;  // Hm of the mask; 0 when there is no key-side mask
};

// Scratch the binding allocates through torch for one call.
struct Workspace {
  KeyLists keys;              // only with a key-side mask
  int32_t* status = nullptr;  // one int: 0 when cu_seqlens / max_seqlen keep the contract, else 1 (NaN result)
};

// Generated from tools/kernel_matrix.py (build/generated/kernel_registry.cu), like dispatch_attention below.
// The smallest head dim >= head_dim that has a compiled kernel for dtype, or -1. The binding pads q / k / v with
// zeros up to it (exact: zero columns add nothing to q . k, and the padded output columns are dropped).
int32_t kernel_head_dim(ScalarType dtype, int32_t head_dim);
int32_t max_kernel_head_dim(ScalarType dtype);

// Runs the whole forward on stream: the cu_seqlens check, key compaction (key-side mask), the attention kernel, and
// 0 / -inf for the query rows no sequence owns (NaN everywhere if cu_seqlens break the contract). p.head_dim must be
// a kernel_head_dim. Returns the first CUDA error.
cudaError_t run_varlen_fwd(const VarlenFwdParams& p, const Workspace& ws, cudaStream_t stream);

// The attention kernel alone, one instantiation per (Elem, kHeadDim) of tools/kernel_matrix.py.
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);

// Generated from tools/kernel_matrix.py (build/generated/kernel_registry.cu): calls the matching instantiation.
cudaError_t dispatch_attention(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);

}  // namespace dmattn::cuda
