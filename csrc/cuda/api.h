// api.h: what the CUDA binding (varlen_fwd_cuda.cpp) calls, torch-free.
//
// The binding validates, asks for workspace_bytes, allocates out / lse and that workspace through torch, fills a
// VarlenFwdParams and calls run_varlen_fwd on the current stream. Which kernels run, their tiles and their scratch
// are decided below this line (heuristics.h). Nothing here synchronises the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// Compute capability as an int (major * 10 + minor): 80 for A100, 90 for H100 / H200.
using ComputeCapability = int32_t;

// Generated from tools/kernel_matrix.py (build/generated/kernel_registry.cu). The smallest head dim >= head_dim that
// has a compiled kernel for dtype on a device of compute capability cc, or -1. The binding pads q / k / v with zeros
// up to it (exact: zero columns add nothing to q . k, and the padded output columns are dropped).
int32_t kernel_head_dim(ComputeCapability cc, ScalarType dtype, int32_t head_dim);
int32_t max_kernel_head_dim(ComputeCapability cc, ScalarType dtype);

// Bytes of device scratch run_varlen_fwd needs for p (0 when it needs none).
size_t workspace_bytes(const VarlenFwdParams& p);

// The whole forward on stream: kept-key compaction (key-side mask), the attention kernel of the best compiled
// architecture path for cc, and the rows no sequence owns / the cu_seqlens contract check. p.head_dim must be a
// kernel_head_dim; workspace holds workspace_bytes(p) bytes, 256-byte aligned. Returns the first CUDA error.
cudaError_t run_varlen_fwd(const VarlenFwdParams& p, ComputeCapability cc, void* workspace, cudaStream_t stream);

}  // namespace dmattn::cuda
