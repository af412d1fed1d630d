// launch.cuh: the sm80 path's launcher: which kernel a call runs (the plan's prefill or decode kernel, and the
// prefill variant) and its grid. Included by the generated instantiation files (tools/kernel_matrix.py), one per
// (dtype, head dim), compiled for the path's architectures.
#pragma once

#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../heuristics.h"
#include "decode_kernel.cuh"
#include "kernel_traits.h"
#include "tile_scheduler.cuh"
#include "varlen_fwd_kernel.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
cudaError_t launch_variant(const VarlenFwdParams& p, const Workspace& ws, cudaStream_t stream) {
  using Scheduler = VarlenTileScheduler<Traits::kBlockM>;
  if (Scheduler::query_tiles(p) == 0 || p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  auto kernel = varlen_fwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  for (int64_t seq0 = 0; seq0 < p.batch; seq0 += Scheduler::kMaxSeqsPerLaunch) {
    kernel<<<Scheduler::grid(p, seq0), Traits::kThreads, Traits::kSmemBytes, stream>>>(p, ws.keys, ws.blocks,
                                                                                       static_cast<int>(seq0));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Traits>
cudaError_t launch_decode(const VarlenFwdParams& p, const Workspace& ws, bool dependent, cudaStream_t stream) {
  using Scheduler = DecodeTileScheduler<Traits::kBlockM, Traits::kBlockN>;
  if (p.batch == 0 || p.num_heads == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  auto kernel = decode_kernel<Traits>;
  const int smem = Traits::smem_bytes(p);  // the query-side variant's ring of terms on top
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  for (int64_t seq0 = 0; seq0 < p.batch; seq0 += Scheduler::kMaxSeqsPerLaunch) {
    err = launch_kernel(kernel, Scheduler::grid(p, ws.splits, seq0), dim3(Traits::kThreads), smem, stream, dependent, p,
                        ws.keys, ws.splits, static_cast<int>(seq0));
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Five kernels per (Elem, kHeadDim): the decode kernel where the plan picked it (with or without query-side
// operands); else the prefill kernel in one of
// three variants (plan.prefill): the one that reads query-side masks / biases (a smaller query tile, to keep its
// per-element path within the register budget), the one that keeps per-row lower key bounds for a window's left
// edge or per-query key ranges, and the plain one for all other calls.
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws,
                             cudaStream_t stream) {
  // These kernels apply a key-side mask only through its kept-key lists (compact_keys); a plan without them (the
  // sm90a query-side variant's, which maps the mask per sequence instead) must never reach here, or the mask would be
  // ignored.
  if (p.mask.layout == OperandLayout::kKeySide && plan.key_lists_heads == 0) return cudaErrorInvalidValue;
  if (plan.kernel == FwdKernel::kDecode) {
    if (plan.query_terms) {
      return launch_decode<DecodeKernelTraits<Elem, kHeadDim, true>>(p, ws, plan.dependent_launch, stream);
    }
    return launch_decode<DecodeKernelTraits<Elem, kHeadDim>>(p, ws, plan.dependent_launch, stream);
  }
  switch (plan.prefill) {
    case PrefillVariant::kQueryOperands:
      return launch_variant<KernelTraits<Elem, kHeadDim, true>>(p, ws, stream);
    case PrefillVariant::kWindowLeft:
      return launch_variant<KernelTraits<Elem, kHeadDim, false, true>>(p, ws, stream);
    case PrefillVariant::kPlain:
      break;
  }
  return launch_variant<KernelTraits<Elem, kHeadDim, false>>(p, ws, stream);
}

}  // namespace dmattn::cuda::sm80
