// key_compaction.cu: a key-side mask -> sorted lists of the key positions it keeps (passes.h, KeyLists), built on
// the device before the attention kernel so that it gathers only kept K / V rows. For the decode kernel a query-side
// mask gets the same lists: the keys some query of the sequence may see (the OR of its few query rows).
#include <cuda_runtime.h>

#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kCompactWarps = kCompactThreads / 32;
constexpr int kKeysPerThread = 8;  // consecutive keys per thread and chunk: a decode sequence of 8k keys is 4 chunks
constexpr int kChunk = kCompactThreads * kKeysPerThread;

// Grid (batch, mask heads). Stream compaction of one sequence's key-side mask column, in chunks of kChunk keys:
// each thread reads its kKeysPerThread mask bytes (independent loads in flight together), a warp scan of the kept
// counts and the CTA's warp totals give each thread its first output slot; one barrier pair per chunk.
__global__ void __launch_bounds__(kCompactThreads)
compact_keys_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  const int b = blockIdx.x, hm = blockIdx.y;
  const SeqRange sk = key_seq(p, b);
  const KeyRows rows = key_rows_of(p, sk);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // Any query head of mask head hm reads the same column: h = hm * head_group.
  const int h = hm * p.mask.head_group;
  const bool query_side = p.mask.layout == OperandLayout::kQuerySide;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int kept = 0;  // a sequence has < 2^31 keys (cu_seqlens are int32)
  for (int64_t j0 = 0; j0 < sk.len; j0 += kChunk) {
    const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kKeysPerThread;
    unsigned bits = 0;
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      const int64_t j = first + i;
      if (j >= sk.len) continue;
      bool keep = false;
      if (query_side) {  // column j of each query row (a position: no pool row)
        for (int64_t q = 0; q < sq.len && !keep; ++q) keep = p.mask.mask_allows(p.mask.offset(sq.start + q, h, j));
      } else {
        keep = p.mask.mask_allows(p.mask.offset(rows.row(j), h, 0));
      }
      if (keep) bits |= 1u << i;
    }
    const int n = __popc(bits);
    int inclusive = n;  // kept keys of this lane and the lanes before it in the warp
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int before = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += before;
    }
    if (lane == 31) warp_total[warp] = inclusive;
    __syncthreads();
    int slot = kept + inclusive - n, chunk_kept = 0;
#pragma unroll
    for (int w = 0; w < kCompactWarps; ++w) {
      const int total = warp_total[w];
      slot += w < warp ? total : 0;
      chunk_kept += total;
    }
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      if ((bits >> i) & 1u) index[slot++] = static_cast<int32_t>(first + i);
    }
    kept += chunk_kept;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }
  if (threadIdx.x == 0) keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm] = kept;
}

}  // namespace

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  if (p.batch == 0 || keys.mask_heads == 0) return cudaSuccess;
  compact_keys_kernel<<<dim3(p.batch, keys.mask_heads), kCompactThreads, 0, stream>>>(p, keys);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
