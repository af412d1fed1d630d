// api.h: what the CUDA binding (varlen_fwd_cuda.cpp) calls, torch-free.
//
// The binding validates, plans the call once (heuristics.h: plan_varlen_fwd, from host-known ints only), allocates
// out / lse and workspace_bytes(plan, p) of scratch through torch, fills a VarlenFwdParams and calls run_varlen_fwd
// on the current stream. The plan says which kernels run with which tiles and splits; the binding only passes it on.
// Nothing here synchronises the device.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../varlen_fwd_params.h"
#include "bwd/bwd_params.h"
#include "workspace.h"

namespace dmattn::cuda {

// Generated from tools/kernel_matrix.py (build/generated/kernel_registry.cu). The smallest head dim >= head_dim that
// has a compiled kernel for dtype on a device of compute capability cc, or -1. The binding pads q / k / v with zeros
// up to it (exact: zero columns add nothing to q . k, and the padded output columns are dropped).
int32_t kernel_head_dim(ComputeCapability cc, ScalarType dtype, int32_t head_dim);
int32_t max_kernel_head_dim(ComputeCapability cc, ScalarType dtype);
// Generated too: the architecture path ("sm90a", "sm80": tools/kernel_matrix.py, ARCH_PATHS) whose launcher
// dispatch_attention calls for dtype at exactly head_dim on cc, or null where none has it.
const char* attention_path(ComputeCapability cc, ScalarType dtype, int32_t head_dim);
// Generated too: whether this build has a backward kernel of tools/kernel_matrix.py's BACKWARD list (the sm90a
// backward) that runs on cc for dtype at exactly head_dim.
bool has_backward_kernel(ComputeCapability cc, ScalarType dtype, int32_t head_dim);

// The whole forward on stream: kept-key compaction (key-side mask), the attention kernel the plan names from the best
// compiled architecture path for cc, the split combine (decode with splits), and the rows no sequence owns / the
// cu_seqlens contract check. p.head_dim must be a kernel_head_dim; plan = plan_varlen_fwd(p, ...); workspace holds
// workspace_bytes(plan, p) bytes, 256-byte aligned. Returns the first CUDA error.
cudaError_t run_varlen_fwd(const VarlenFwdParams& p, const FwdPlan& plan, ComputeCapability cc, void* workspace,
                           cudaStream_t stream);

#if DMATTN_UNIT_STAMPS
// The measuring build (DMATTN_UNIT_STAMPS=1 at build time; sm90a/unit_stamps.cuh): the records, zeroed, that this host
// thread's next run_varlen_fwd has the sm90a forward kernel write (null: none), unit_stamp_words(p) 64-bit words.
void set_unit_stamps(unsigned long long* records);
// Words of a call's records: kUnitStampWords per (sequence, head, query tile of kBlockM = 128 rows, consumer
// warpgroup).
inline int64_t unit_stamp_words(const VarlenFwdParams& p) {
  const int64_t block_m = tile_shape_sm90a(p.head_dim).block_m;
  return static_cast<int64_t>(p.batch) * p.num_heads * ((p.max_seqlen_q + block_m - 1) / block_m) * 2 *
         kUnitStampWords;
}
#endif

// The fused backward (bwd/bwd_traits.h): dk, dv and the per-head key-side bias gradient, then dq, into the zeroed
// buffers of p. p.f.head_dim must be bwd::bwd_head_dim of itself (64 or 128), p.f.dtype float16 or bfloat16, and the
// call must have no query-side mask or bias and no kv_slots (the binding checks). Returns the first CUDA error.
// sm90a: the sm90a backward (sm90a/bwd_kernel.cuh; dispatch.h, dispatch_backward) instead of the sm80 pair: where
// has_backward_kernel(cc, ...) holds and the binding planned it; it sums dQ into p.dq_accum, which must be set (and
// zeroed), and on the tile path (p.dq_tiles) converts it into dq itself.
cudaError_t run_varlen_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream);

}  // namespace dmattn::cuda
