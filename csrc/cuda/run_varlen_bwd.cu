// run_varlen_bwd.cu: the fused backward on one stream (api.h): delta_kernel, compact_keys where the call has kept-key
// lists (BwdParams::keys; the forward's pass, key_compaction.cu), dkdv_kernel, then dq_kernel unless dkdv_kernel adds
// dQ itself (bwd/bwd_traits.h), for float16 / bfloat16 at head dims 64 and 128, with and without a softcap. The
// kernels are the sm80 path's mma.sync code, compiled for every architecture of the build. Calls the binding plans
// for the sm90a backward go, after delta_kernel and compact_keys, to its generated dispatch (dispatch.h,
// dispatch_backward) instead of the pair.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "api.h"
#include "dispatch.h"
#include "bwd/delta_kernel.cuh"
#include "bwd/dkdv_kernel.cuh"
#include "bwd/dq_kernel.cuh"

namespace dmattn::cuda {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // sequences are grid.y, tiles grid.z

template <typename Elem, int kHeadDim, bool kSoftcap>
cudaError_t launch_bwd(const bwd::BwdParams& p, cudaStream_t stream) {
  using Traits = bwd::BwdTraits<Elem, kHeadDim>;
  constexpr int kBlock = Traits::kBlockM;
  auto dkdv = bwd::dkdv_kernel<Traits, kSoftcap>;
  auto dq = bwd::dq_kernel<Traits, kSoftcap>;
  cudaError_t err;
  for (auto kernel : {dkdv, dq}) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t key_tiles = (p.f.max_seqlen_k + kBlock - 1) / kBlock;
  const int64_t query_tiles = p.dq_accum == nullptr ? (p.f.max_seqlen_q + kBlock - 1) / kBlock : 0;
  // Grids (heads, sequences, tiles): sequences and tiles in chunks of the grid's y / z limit.
  for (int64_t seq0 = 0; seq0 < p.f.batch; seq0 += kMaxGridYZ) {
    const auto seqs = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, p.f.batch - seq0));
    for (int64_t tile0 = 0; tile0 < key_tiles; tile0 += kMaxGridYZ) {
      const auto tiles = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, key_tiles - tile0));
      dkdv<<<dim3(p.f.num_heads_k, seqs, tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<int>(seq0), static_cast<int>(tile0));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    for (int64_t tile0 = 0; tile0 < query_tiles; tile0 += kMaxGridYZ) {
      const auto tiles = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, query_tiles - tile0));
      dq<<<dim3(p.f.num_heads, seqs, tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<int>(seq0), static_cast<int>(tile0));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// What both backwards run first: delta_kernel, then the kept-key lists where the call has them (compact_keys); then
// the sm90a backward where the binding planned it (dispatch.h, dispatch_backward), else the sm80 pair.
template <typename Elem, int kHeadDim>
cudaError_t launch_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  cudaError_t err;
  const int64_t items = p.f.total_q * p.f.num_heads;
  if (items > 0) {
    constexpr int kPerBlock = bwd::kDeltaItemsPerBlock<kHeadDim>;
    const auto blocks = static_cast<unsigned>((items + kPerBlock - 1) / kPerBlock);
    bwd::delta_kernel<bwd::BwdTraits<Elem, kHeadDim>><<<blocks, bwd::kDeltaWarps * 32, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if ((err = compact_keys(p.f, p.keys, stream)) != cudaSuccess) return err;  // nothing without lists
  if (sm90a) return dispatch_backward(cc, p, stream);
  return p.f.softcap > 0.f ? launch_bwd<Elem, kHeadDim, true>(p, stream) : launch_bwd<Elem, kHeadDim, false>(p, stream);
}

template <typename Elem>
cudaError_t launch_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  switch (p.f.head_dim) {
    case 64:
      return launch_bwd<Elem, 64>(p, cc, sm90a, stream);
    case 128:
      return launch_bwd<Elem, 128>(p, cc, sm90a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t run_varlen_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  if (p.f.batch == 0 || p.f.num_heads == 0 || p.f.total_q == 0) return cudaSuccess;
  return p.f.dtype == ScalarType::kBFloat16 ? launch_bwd<__nv_bfloat16>(p, cc, sm90a, stream)
         : p.f.dtype == ScalarType::kFloat16 ? launch_bwd<__half>(p, cc, sm90a, stream)
                                             : cudaErrorInvalidValue;
}

}  // namespace dmattn::cuda
