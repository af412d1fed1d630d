// launch.cuh: the sm80 path's launcher: which kernel variant a call runs and its grid. Included by the generated
// instantiation files (tools/kernel_matrix.py), one per (dtype, head dim), compiled for the path's architectures.
#pragma once

#include <cuda_runtime.h>

#include "../dispatch.h"
#include "../heuristics.h"
#include "kernel_traits.h"
#include "tile_scheduler.cuh"
#include "varlen_fwd_kernel.cuh"

namespace dmattn::cuda::sm80 {

template <typename Traits>
cudaError_t launch_variant(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  using Scheduler = VarlenTileScheduler<Traits::kBlockM>;
  if (Scheduler::query_tiles(p) == 0 || p.batch == 0 || p.num_heads == 0) return cudaSuccess;
  auto kernel = varlen_fwd_kernel<Traits>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  for (int64_t seq0 = 0; seq0 < p.batch; seq0 += Scheduler::kMaxSeqsPerLaunch) {
    kernel<<<Scheduler::grid(p, seq0), Traits::kThreads, Traits::kSmemBytes, stream>>>(p, keys, static_cast<int>(seq0));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Two kernels per (Elem, kHeadDim): calls with a query-side mask or bias (plan.query_operands) get the variant that
// reads them (a smaller query tile, to keep its per-element path within the register budget); all others the one
// that cannot.
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const KeyLists& keys,
                             cudaStream_t stream) {
  return plan.query_operands ? launch_variant<KernelTraits<Elem, kHeadDim, true>>(p, keys, stream)
                             : launch_variant<KernelTraits<Elem, kHeadDim, false>>(p, keys, stream);
}

}  // namespace dmattn::cuda::sm80
