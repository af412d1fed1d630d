// varlen_fwd_run.cu: the small kernels around the attention kernel, and run_varlen_fwd that strings them together.
//
//   compact_keys_kernel  key-side mask -> per (sequence, mask head) sorted list of kept key positions (KeyLists)
//   mark_rows_kernel     flags the query rows some (clamped) sequence owns
//   fill_rows_kernel     writes out = 0, lse = -inf on every row no sequence owns
// All of them clamp cu_seqlens exactly as the attention kernel does (clamp_seq), so lying cu_seqlens can neither
// send a read or write out of bounds nor leave a row unwritten.
#include <cuda_runtime.h>

#include <cmath>

#include "score_operand.cuh"
#include "varlen_fwd_launch.h"

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
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Any query head of mask head hm reads the same column: h = hm * head_group.
  const int h = hm * p.mask.head_group;
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int64_t kept = 0;
  for (int64_t j0 = 0; j0 < sk.len; j0 += kCompactThreads) {
    const int64_t j = j0 + threadIdx.x;
    const bool keep = j < sk.len && mask_value(p.mask, operand_offset(p.mask, sk.start + j, h, 0));
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

// Grid (row chunks, batch): row_owned[r] = 1 for the rows of each clamped query range.
__global__ void mark_rows_kernel(const int32_t* cu_seqlens_q, int64_t total_q, int64_t max_seqlen_q,
                                 uint8_t* row_owned) {
  const SeqRange sq = clamp_seq(cu_seqlens_q, blockIdx.y, total_q, max_seqlen_q);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < sq.len;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    row_owned[sq.start + i] = 1;
  }
}

// One warp per query row: rows nobody owns get out = 0 on every head and lse = -inf. (0.0 is all-zero bits in
// float16 and bfloat16 alike.)
__global__ void fill_rows_kernel(const __grid_constant__ VarlenFwdParams p, const uint8_t* row_owned) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.total_q || row_owned[row]) return;
  uint16_t* out = static_cast<uint16_t*>(p.out);
  for (int h = 0; h < p.num_heads; ++h) {
    uint16_t* dst = out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
    for (int d = lane; d < p.head_dim; d += 32) dst[d] = 0;
    if (lane == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = -INFINITY;
  }
}

}  // namespace

cudaError_t run_varlen_fwd(const VarlenFwdParams& p, const Workspace& ws, cudaStream_t stream) {
  cudaError_t err;
  if (p.mask.layout == OperandLayout::kKeySide && p.batch > 0) {
    compact_keys_kernel<<<dim3(p.batch, ws.keys.mask_heads), kCompactThreads, 0, stream>>>(p, ws.keys);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if ((err = dispatch_attention(p, ws.keys, stream)) != cudaSuccess) return err;
  if (p.total_q == 0) return cudaSuccess;

  if ((err = cudaMemsetAsync(ws.row_owned, 0, p.total_q, stream)) != cudaSuccess) return err;
  if (p.batch > 0 && p.max_seqlen_q > 0) {
    const int64_t chunks = (p.max_seqlen_q + 255) / 256;
    mark_rows_kernel<<<dim3(static_cast<unsigned>(chunks < 64 ? chunks : 64), p.batch), 256, 0, stream>>>(
        p.cu_seqlens_q, p.total_q, p.max_seqlen_q, ws.row_owned);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  const unsigned fill_blocks = static_cast<unsigned>((p.total_q * 32 + 255) / 256);
  fill_rows_kernel<<<fill_blocks, 256, 0, stream>>>(p, ws.row_owned);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
