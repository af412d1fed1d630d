// varlen_fwd_run.cu: the small kernels around the attention kernel, and run_varlen_fwd that strings them together.
//
//   check_seqlens_kernel  checks the cu_seqlens contract on the device: status = 0 when it holds, 1 when not
//   compact_keys_kernel   key-side mask -> per (sequence, mask head) sorted list of kept key positions (KeyLists)
//   fill_rows_kernel      out = 0, lse = -inf on the query rows no sequence owns; NaN everywhere when status != 0
// The host never reads cu_seqlens (no device sync). Every kernel clamps sequence ranges exactly as the attention
// kernel does (clamp_seq), so lying cu_seqlens can neither send a read or write out of bounds nor leave a row
// unwritten; check_seqlens_kernel makes the lie visible (a NaN result) instead of a silently wrong one.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "score_operand.cuh"
#include "varlen_fwd_launch.h"

namespace dmattn::cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kCheckThreads = 1024;

// Whether cu_seqlens entries b and b + 1 describe a sequence the contract allows (with cu[0] = 0): non-decreasing, within
// the total, at most max_seqlen long. (p.max_seqlen_* are the caller's values capped at the totals, which is the
// same test: a sequence inside [0, total] is never longer than total.)
__device__ __forceinline__ bool sequence_ok(const int32_t* cu, int64_t b, int64_t total, int64_t max_seqlen) {
  const int64_t start = cu[b], end = cu[b + 1];
  return start <= end && end <= total && end - start <= max_seqlen;
}

// One CTA: status = 1 if any sequence of cu_seqlens_q or cu_seqlens_k breaks the contract, else 0. Written
// unconditionally, so the status word needs no memset.
__global__ void __launch_bounds__(kCheckThreads) check_seqlens_kernel(const __grid_constant__ VarlenFwdParams p,
                                                                      int32_t* status) {
  bool bad = threadIdx.x == 0 && (p.cu_seqlens_q[0] != 0 || p.cu_seqlens_k[0] != 0);  // also when B = 0
  for (int64_t b = threadIdx.x; b < p.batch; b += kCheckThreads) {
    bad |= !sequence_ok(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q) ||
           !sequence_ok(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  }
  bad = __syncthreads_or(bad) != 0;
  if (threadIdx.x == 0) *status = bad ? 1 : 0;
}

// Grid (batch, mask heads). Stream compaction of one sequence's key-side mask column: chunks of 256 keys, each
// warp counts its kept keys with a ballot, a CTA-wide exclusive scan over the 8 warp counts gives the offsets.
__global__ void __launch_bounds__(kCompactThreads)
compact_keys_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_base[kCompactThreads / 32 + 1];
  const int b = blockIdx.x, hm = blockIdx.y;
  const SeqRange sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Any query head of mask head hm reads the same column: h = hm * head_group.
  const int h = hm * p.mask.head_group;
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int64_t kept = 0;
  for (int64_t j0 = 0; j0 < sk.len; j0 += kCompactThreads) {
    const int64_t j = j0 + threadIdx.x;
    const bool keep = j < sk.len && p.mask.mask_allows(p.mask.offset(sk.start + j, h, 0));
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

// One warp per query row, grid-stride. With valid cu_seqlens the rows sequences own are exactly [0, cu_seqlens_q[B])
// and the attention kernel wrote them; the rest get out = 0 on every head and lse = -inf (0.0 is all-zero bits in
// float16 and bfloat16 alike). With status != 0 every row gets NaN in out and lse.
__global__ void fill_rows_kernel(const __grid_constant__ VarlenFwdParams p, const int32_t* status) {
  const bool broken = *status != 0;
  const int64_t owned_end = broken ? 0 : std::min<int64_t>(p.cu_seqlens_q[p.batch], p.total_q);
  const uint16_t out_value = !broken ? 0 : (p.dtype == ScalarType::kFloat16 ? 0x7e00u : 0x7fc0u);  // 0 or NaN
  const float lse_value = broken ? __int_as_float(0x7fc00000) : -INFINITY;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  uint16_t* out = static_cast<uint16_t*>(p.out);
  for (int64_t row = owned_end + (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; row < p.total_q;
       row += warps) {
    for (int h = 0; h < p.num_heads; ++h) {
      uint16_t* dst = out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
      for (int d = lane; d < p.head_dim; d += 32) dst[d] = out_value;
      if (lane == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = lse_value;
    }
  }
}

}  // namespace

cudaError_t run_varlen_fwd(const VarlenFwdParams& p, const Workspace& ws, cudaStream_t stream) {
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
  cudaError_t err;
  check_seqlens_kernel<<<1, kCheckThreads, 0, stream>>>(p, ws.status);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (p.mask.layout == OperandLayout::kKeySide && p.batch > 0 && ws.keys.mask_heads > 0) {
    compact_keys_kernel<<<dim3(p.batch, ws.keys.mask_heads), kCompactThreads, 0, stream>>>(p, ws.keys);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if ((err = dispatch_attention(p, ws.keys, stream)) != cudaSuccess) return err;
  constexpr int kFillThreads = 256;
  const int64_t fill_blocks = std::min<int64_t>((p.total_q * 32 + kFillThreads - 1) / kFillThreads, 1024);
  fill_rows_kernel<<<static_cast<unsigned>(fill_blocks), kFillThreads, 0, stream>>>(p, ws.status);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
