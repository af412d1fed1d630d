// packed_rows.cu: dmattn::packed_rows on the GPU (csrc/packed_rows.h): every packed row's facts and the anchor, one
// launch. Reads cu_seqlens only at indices [0, B]: lying values move a row to another sequence, never a read out of
// bounds; rows are written only below total. The host never reads cu_seqlens (no device sync).
#include <cuda_runtime.h>

#include <cstdint>

#include "../packed_rows.h"

namespace dmattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

template <typename Index, typename Other>
__global__ void __launch_bounds__(kThreads)
    packed_rows_kernel(const Index* __restrict__ cu, const Other* __restrict__ cu_other, int64_t batch, int64_t total,
                       int64_t* __restrict__ rows, int64_t* __restrict__ anchor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < total; i += stride) {
    packed_row(cu, cu_other, batch, total, i, rows);
  }
  if (blockIdx.x != 0) return;
  // Block 0: the anchor, an argmax over the sequences, the first of equal maxima.
  __shared__ int64_t best_score[kThreads];
  __shared__ int64_t best_index[kThreads];
  int64_t score = INT64_MIN, index = 0;
  for (int64_t b = threadIdx.x; b < batch; b += kThreads) {
    const int64_t s = anchor_score(cu, cu_other, b);
    if (s > score) score = s, index = b;  // b ascends: the first maximum of this thread's share
  }
  best_score[threadIdx.x] = score;
  best_index[threadIdx.x] = index;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) {
      const int64_t s = best_score[threadIdx.x + width], k = best_index[threadIdx.x + width];
      if (s > best_score[threadIdx.x] || (s == best_score[threadIdx.x] && k < best_index[threadIdx.x])) {
        best_score[threadIdx.x] = s;
        best_index[threadIdx.x] = k;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) *anchor = best_index[0];
}

template <typename Index, typename Other>
cudaError_t launch(const void* cu, const void* cu_other, int64_t batch, int64_t total, int64_t* rows,
                   int64_t* anchor, cudaStream_t stream) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);  // at least block 0, for the anchor
  packed_rows_kernel<Index, Other><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const Index*>(cu), static_cast<const Other*>(cu_other), batch, total, rows, anchor);
  return cudaGetLastError();
}

}  // namespace

int packed_rows(const void* cu, bool index_64, const void* cu_other, bool other_64, int64_t batch, int64_t total,
                int64_t* rows, int64_t* anchor, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (index_64) {
    return other_64 ? launch<int64_t, int64_t>(cu, cu_other, batch, total, rows, anchor, s)
                    : launch<int64_t, int32_t>(cu, cu_other, batch, total, rows, anchor, s);
  }
  return other_64 ? launch<int32_t, int64_t>(cu, cu_other, batch, total, rows, anchor, s)
                  : launch<int32_t, int32_t>(cu, cu_other, batch, total, rows, anchor, s);
}

}  // namespace dmattn::cuda
