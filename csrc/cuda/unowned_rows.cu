// unowned_rows.cu: the pass after the attention kernel. It checks the cu_seqlens contract on the device and
//   - when it holds: writes out = 0, lse = -inf on the query rows no sequence owns, [cu_seqlens_q[B], total_q)
//     (the attention kernel wrote every other row);
//   - when it is broken: writes NaN to every element of out and lse, so the lie shows instead of a silently wrong
//     result (the CPU raises instead; dmattn_ops.check_cu_seqlens is the synchronous check).
// The host never reads cu_seqlens (no device sync).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kFinishThreads = 256;

// Whether cu_seqlens entries b and b + 1 describe a sequence the contract allows: non-decreasing, within the total,
// at most max_seqlen long. (p.max_seqlen_* are the caller's values capped at the totals, which is the same test: a
// sequence inside [0, total] is never longer than total.)
__device__ __forceinline__ bool sequence_ok(const int32_t* cu, int64_t b, int64_t total, int64_t max_seqlen) {
  const int64_t start = cu[b], end = cu[b + 1];
  return start <= end && end <= total && end - start <= max_seqlen;
}

// Grid-stride over query rows, one warp per row. Every CTA checks the whole contract itself (B + 1 entries of each
// cu_seqlens, from L2), so no CTA waits on another and no status word needs initialising; the launcher bounds the
// grid so that the redundant reads stay small.
__global__ void __launch_bounds__(kFinishThreads) finish_rows_kernel(const __grid_constant__ VarlenFwdParams p) {
  bool bad = threadIdx.x == 0 && (p.cu_seqlens_q[0] != 0 || p.cu_seqlens_k[0] != 0);  // also when B = 0
  for (int64_t b = threadIdx.x; b < p.batch; b += kFinishThreads) {
    bad |= !sequence_ok(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q) ||
           !sequence_ok(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  }
  const bool broken = __syncthreads_or(bad) != 0;
  const int64_t owned_end = broken ? 0 : std::min<int64_t>(p.cu_seqlens_q[p.batch], p.total_q);
  // 0.0 is all-zero bits in float16 and bfloat16 alike; the NaNs are the canonical quiet ones.
  const uint16_t out_value = !broken ? 0 : (p.dtype == ScalarType::kFloat16 ? 0x7e00u : 0x7fc0u);
  const float lse_value = broken ? __int_as_float(0x7fc00000) : -INFINITY;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kFinishThreads / 32;
  uint16_t* out = static_cast<uint16_t*>(p.out);
  for (int64_t row = owned_end + (static_cast<int64_t>(blockIdx.x) * kFinishThreads + threadIdx.x) / 32;
       row < p.total_q; row += warps) {
    for (int h = 0; h < p.num_heads; ++h) {
      uint16_t* dst = out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
      for (int d = lane; d < p.head_dim; d += 32) dst[d] = out_value;
      if (lane == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = lse_value;
    }
  }
}

}  // namespace

cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream) {
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
  // One warp per row up to 1024 CTAs, and at most ~4M redundant cu_seqlens reads over all CTAs (a decode batch of 64
  // sequences: 8 CTAs reading 65 entries each).
  constexpr int64_t kMaxCheckReads = int64_t{1} << 22;
  int64_t blocks = (p.total_q * 32 + kFinishThreads - 1) / kFinishThreads;
  blocks = std::min<int64_t>({blocks, 1024, std::max<int64_t>(1, kMaxCheckReads / (p.batch + 1))});
  finish_rows_kernel<<<static_cast<unsigned>(blocks), kFinishThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
