// launch.cuh: the sm90a path's launcher. Calls the plan gives to this path (FwdPlan::sm90a: prefill without mask,
// bias or key pool, heuristics.h sm90a_supports) run the wgmma / TMA kernel of fwd_kernel.cuh, in its kRanged
// variant where a row has its own key interval (sm90a_ranged); every other call (masks, biases, decode, key pools)
// runs the sm80 path's kernels, which run on every cc >= 8.0.
// Included by the generated instantiation files (tools/kernel_matrix.py), compiled for sm_90a only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>

#include "../dispatch.h"
#include "../heuristics.h"
#include "fwd_kernel.cuh"
#include "kernel_traits.h"

namespace dmattn::cuda::sm90a {

// The TMA view of q, k or v: (rows, D, heads) with the call's strides (elements).
template <typename Elem>
auto gmem_rows(const void* ptr, int64_t rows, int32_t head_dim, int32_t heads, int64_t row_stride,
               int64_t head_stride) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(static_cast<const Elem*>(ptr)),
                     make_layout(make_shape(static_cast<int32_t>(rows), head_dim, heads),
                                 make_stride(row_stride, _1{}, head_stride)));
}

// The kernel of kRanged / kPersistent for this call, with its shared memory allowed.
template <typename Traits, bool kRanged, bool kPersistent>
cudaError_t launch_kernel(const VarlenFwdParams& p, const TmaParams<Traits>& tma, dim3 grid, UnitGrid units,
                          cudaStream_t stream) {
  auto kernel = fwd_kernel<Traits, kRanged, kPersistent>;
  constexpr int kSmem = Traits::template kSmemBytes<kPersistent ? 2 : 1>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p, tma, units);
  return cudaGetLastError();
}

template <typename Traits, bool kRanged>
cudaError_t launch_fwd(const VarlenFwdParams& p, const FwdPlan& plan, cudaStream_t stream) {
  using namespace cute;
  constexpr int D = Traits::kHeadDim;
  const TmaParams<Traits> tma{
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_rows<typename Traits::CuteElem>(p.q, p.total_q, D, p.num_heads, p.q_row_stride, p.q_head_stride),
                    typename Traits::SmemLayoutQ{}, Shape<Int<Traits::kBlockM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_rows<typename Traits::CuteElem>(p.k, p.total_k, D, p.num_heads_k, p.k_row_stride, p.k_head_stride),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{},
                    gmem_rows<typename Traits::CuteElem>(p.v, p.total_k, D, p.num_heads_k, p.v_row_stride, p.v_head_stride),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{})};
  const int32_t query_tiles = static_cast<int32_t>((p.max_seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM);
  // Persistent (never with key ranges: their bounds are reduced once per CTA): a launch per kUnitTableSeqs
  // sequences, whose units the kernel numbers in an int: at most query_tiles per sequence (clamp_seq: lying
  // cu_seqlens included), times the sequences and heads; calls that could pass it take a CTA per unit.
  constexpr int64_t kTableSeqs = Traits::kUnitTableSeqs;
  const int64_t most_units = static_cast<int64_t>(query_tiles) * std::min<int64_t>(p.batch, kTableSeqs) * p.num_heads;
  if (plan.sm90a_ctas > 0 && p.key_range == nullptr && most_units <= INT32_MAX) {
    for (int64_t seq0 = 0; seq0 < p.batch; seq0 += kTableSeqs) {
      const int32_t seqs = static_cast<int32_t>(std::min<int64_t>(p.batch - seq0, kTableSeqs));
      const int64_t grid_units = static_cast<int64_t>(query_tiles) * p.num_heads * seqs;
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(grid_units, plan.sm90a_ctas)));
      const cudaError_t err = launch_kernel<Traits, kRanged, true>(
          p, tma, grid, UnitGrid{static_cast<int32_t>(seq0), seqs, query_tiles, cutlass::FastDivmod(p.num_heads)},
          stream);
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  }
  constexpr int64_t kMaxSeqsPerLaunch = 65535;
  for (int64_t seq0 = 0; seq0 < p.batch; seq0 += kMaxSeqsPerLaunch) {
    const int32_t seqs = static_cast<int32_t>(std::min<int64_t>(p.batch - seq0, kMaxSeqsPerLaunch));
    const dim3 grid(static_cast<unsigned>(query_tiles), static_cast<unsigned>(p.num_heads),
                    static_cast<unsigned>(seqs));
    const cudaError_t err = launch_kernel<Traits, kRanged, false>(
        p, tma, grid, UnitGrid{static_cast<int32_t>(seq0), seqs, query_tiles, cutlass::FastDivmod()}, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws,
                             cudaStream_t stream) {
  if (!plan.sm90a || plan.kernel != FwdKernel::kPrefill || p.head_dim != kHeadDim) {
    return sm80::launch_attention<Elem, kHeadDim>(p, plan, ws, stream);
  }
  if (p.batch == 0 || p.num_heads == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  using Traits = FwdTraits<Elem, kHeadDim>;
  return sm90a_ranged(p) ? launch_fwd<Traits, true>(p, plan, stream) : launch_fwd<Traits, false>(p, plan, stream);
}

}  // namespace dmattn::cuda::sm90a
