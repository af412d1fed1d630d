// key_compaction.cu: a key-side mask -> sorted lists of the key positions it keeps (passes.h, KeyLists), built on
// the device before the attention kernel so that it gathers only kept K / V rows.
#include <cuda_runtime.h>

#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kCompactThreads = 256;

// Grid (batch, mask heads). Stream compaction of one sequence's key-side mask column: chunks of 256 keys, each
// warp counts its kept keys with a ballot, a CTA-wide exclusive scan over the 8 warp counts gives the offsets.
__global__ void __launch_bounds__(kCompactThreads)
compact_keys_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_base[kCompactThreads / 32 + 1];
  const int b = blockIdx.x, hm = blockIdx.y;
  const SeqRange sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  const DenseKeyRows rows{sk.start};
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Any query head of mask head hm reads the same column: h = hm * head_group.
  const int h = hm * p.mask.head_group;
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int64_t kept = 0;
  for (int64_t j0 = 0; j0 < sk.len; j0 += kCompactThreads) {
    const int64_t j = j0 + threadIdx.x;
    const bool keep = j < sk.len && p.mask.mask_allows(p.mask.offset(rows.row(j), h, 0));
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_base[warp] = __popc(ballot);
    __syncthreads();
    if (threadIdx.x == 0) {
      int run = 0;
      for (int w = 0; w < kCompactThreads / 32; ++w) {
        const int n = warp_base[w];
        warp_base[w] = run;
        run += n;
      }
      warp_base[kCompactThreads / 32] = run;
    }
    __syncthreads();
    if (keep) index[kept + warp_base[warp] + __popc(ballot & ((1u << lane) - 1u))] = static_cast<int32_t>(j);
    kept += warp_base[kCompactThreads / 32];
    __syncthreads();  // warp_base is rewritten by the next chunk
  }
  if (threadIdx.x == 0) keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm] = static_cast<int32_t>(kept);
}

}  // namespace

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  if (p.batch == 0 || keys.mask_heads == 0) return cudaSuccess;
  compact_keys_kernel<<<dim3(p.batch, keys.mask_heads), kCompactThreads, 0, stream>>>(p, keys);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
