// row_contract.cuh: the cu_seqlens contract as the pass that finishes a call's rows checks it on the device:
// finish_rows (unowned_rows.cu), or combine_splits where it finishes the rows itself (split_combine.cu,
// FwdPlan::combine_finishes), or order_decode_units where the decode kernel merges its own splits (decode_order.cu,
// FwdPlan::combine_in_kernel). When the contract holds, the rows no sequence owns, [cu_seqlens_q[B], total_q), get
// out = 0 and lse = -inf; when it is broken every element of out and lse is NaN, so the lie shows instead of a
// silently wrong result (the CPU raises instead; dmattn_ops.check_cu_seqlens is the synchronous check).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "passes.h"

namespace dmattn::cuda {

// Whether cu_seqlens entries b and b + 1 describe a sequence the contract allows: non-decreasing, within the total,
// at most max_seqlen long. (p.max_seqlen_* are the caller's values capped at the totals, which is the same test: a
// sequence inside [0, total] is never longer than total.)
__device__ __forceinline__ bool sequence_ok(const int32_t* cu, int64_t b, int64_t total, int64_t max_seqlen) {
  const int64_t start = cu[b], end = cu[b + 1];
  return start <= end && end <= total && end - start <= max_seqlen;
}

// Whether the call breaks the contract. Every CTA reads the whole contract itself (B + 1 entries of each cu_seqlens,
// from L2), so no CTA waits on another and no status word needs initialising; the launchers bound their grids so that
// the redundant reads stay within kMaxContractReads (finish_blocks, FwdPlan::combine_finishes). CTA-wide (a
// barrier): every thread of the CTA calls it.
__device__ __forceinline__ bool contract_broken(const VarlenFwdParams& p) {
  bool bad = threadIdx.x == 0 && (p.cu_seqlens_q[0] != 0 || p.cu_seqlens_k[0] != 0);  // also when B = 0
  for (int64_t b = threadIdx.x; b < p.batch; b += blockDim.x) {
    bad |= !sequence_ok(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q) ||
           !sequence_ok(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  }
  return __syncthreads_or(bad) != 0;
}

// The query rows the attention kernels own, [0, owned_rows): none when the contract is broken.
__device__ __forceinline__ int64_t owned_rows(const VarlenFwdParams& p, bool broken) {
  if (broken) return 0;
  const int64_t end = p.cu_seqlens_q[p.batch];
  return end < 0 ? 0 : (end > p.total_q ? p.total_q : end);
}

// What a row past owned_rows holds: 0 / -inf, or the canonical quiet NaN in both when the contract is broken. 0.0 is
// all-zero bits in float16 and bfloat16 alike.
__device__ __forceinline__ uint16_t unowned_out_bits(const VarlenFwdParams& p, bool broken) {
  return !broken ? 0 : (p.dtype == ScalarType::kFloat16 ? 0x7e00u : 0x7fc0u);
}
__device__ __forceinline__ float unowned_lse(bool broken) { return broken ? __int_as_float(0x7fc00000) : -INFINITY; }

constexpr int kFinishThreads = 256;

// The CTAs of finish_rows' work, `threads` each: a warp per query row up to 256K threads, and at most
// kMaxContractReads / 2 redundant cu_seqlens reads over all of them (a decode batch of 64 sequences: 39 CTAs of 256
// threads reading 65 entries each).
inline int64_t finish_blocks(const VarlenFwdParams& p, int threads = kFinishThreads) {
  const int64_t blocks = (p.total_q * 32 + threads - 1) / threads;
  const int64_t by_reads = kMaxContractReads / 2 / (static_cast<int64_t>(p.batch) + 1);
  return std::min<int64_t>(std::min<int64_t>(blocks, 1024 * kFinishThreads / threads),
                           std::max<int64_t>(1, by_reads));
}

// finish_rows' work as CTA `block` of `blocks` does it, the contract's verdict given (contract_broken): a warp per
// query row past the owned ones (every row when the contract is broken), grid-stride.
__device__ __forceinline__ void finish_rows_given(const VarlenFwdParams& p, bool broken, int64_t block,
                                                  int64_t blocks) {
  const int64_t owned_end = owned_rows(p, broken);
  const uint16_t out_value = unowned_out_bits(p, broken);
  const float lse_value = unowned_lse(broken);
  const int lane = threadIdx.x % 32;
  const int64_t warps = blocks * blockDim.x / 32;
  uint16_t* out = static_cast<uint16_t*>(p.out);
  for (int64_t row = owned_end + (block * blockDim.x + threadIdx.x) / 32; row < p.total_q; row += warps) {
    for (int h = 0; h < p.num_heads; ++h) {
      uint16_t* dst = out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
      for (int d = lane; d < p.head_dim; d += 32) dst[d] = out_value;
      if (lane == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = lse_value;
    }
  }
}

// finish_rows' work as CTA `block` of `blocks` does it: the contract checked, then finish_rows_given.
__device__ __forceinline__ void finish_rows_block(const VarlenFwdParams& p, int64_t block, int64_t blocks) {
  finish_rows_given(p, contract_broken(p), block, blocks);
}

}  // namespace dmattn::cuda
