// packed_rows.cu: the mask_mod adapter's two passes on the GPU (csrc/packed_rows.h), one launch each. packed_rows
// reads cu_seqlens only at indices [0, B]: lying values move a row to another sequence, never a read out of bounds;
// rows are written only below total. zero_unseen writes only inside its grid, whatever the counts. The host never
// reads a device value (no device sync).
#include <cuda_runtime.h>

#include <cstdint>

#include "../packed_rows.h"

namespace dmattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;

// Blocks for `items` work items, `per_block` a block: at least 1, at most `cap` (a grid-stride loop does the rest).
int64_t blocks_for(int64_t items, int64_t per_block, int64_t cap) {
  const int64_t blocks = (items + per_block - 1) / per_block;
  return blocks < 1 ? 1 : (blocks > cap ? cap : blocks);
}

// The anchor (packed_rows.h): an argmax over the sequences, the first of equal maxima, reduced by the whole block.
template <typename Index, typename Other>
__device__ int64_t block_anchor(const Index* cu, const Other* cu_other, int64_t batch) {
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
  return best_index[0];
}

// Rows with a count are written at once. Only a block that holds a row without one (rows past cu_seqlens[-1], a
// sequence with nothing on the other side), and block 0 for the anchor output, reduces the anchor: over B sequences,
// which most blocks of a batch never need.
template <typename Index, typename Other>
__global__ void __launch_bounds__(kThreads)
    packed_rows_kernel(const Index* __restrict__ cu, const Other* __restrict__ cu_other, int64_t batch, int64_t total,
                       int64_t* __restrict__ rows, int64_t* __restrict__ anchor) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  bool unseen = false;
  for (int64_t i = first; i < total; i += stride) {
    const RowFacts f = row_facts(cu, cu_other, batch, i);
    if (f.count > 0) {
      write_row(f, 0, total, i, rows);
    } else {
      unseen = true;
    }
  }
  if (!__syncthreads_or(unseen || blockIdx.x == 0)) return;
  const int64_t a = block_anchor(cu, cu_other, batch);
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    anchor[0] = a;
    anchor[1] = 0;
  }
  if (!unseen) return;
  for (int64_t i = first; i < total; i += stride) {
    const RowFacts f = row_facts(cu, cu_other, batch, i);
    if (f.count <= 0) write_row(f, a, total, i, rows);
  }
}

template <typename Index, typename Other>
cudaError_t launch_rows(const void* cu, const void* cu_other, int64_t batch, int64_t total, int64_t* rows,
                        int64_t* anchor, cudaStream_t stream) {
  // at least block 0, for the anchor
  packed_rows_kernel<Index, Other><<<static_cast<unsigned>(blocks_for(total, kThreads, kMaxBlocks)), kThreads, 0,
                                     stream>>>(
      static_cast<const Index*>(cu), static_cast<const Other*>(cu_other), batch, total, rows, anchor);
  return cudaGetLastError();
}

// One warp per (row, head) line of the grid: its lanes zero the line's bytes from the row's count on, 16 bytes at a
// time where the run is 16-byte aligned, single bytes at its ends. A line whose row sees every column writes nothing.
__global__ void __launch_bounds__(kThreads)
    zero_unseen_kernel(unsigned char* __restrict__ grid, int64_t element_size, const int64_t* __restrict__ counts,
                       int64_t rows, int64_t heads, int64_t width) {
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32;
  const int64_t lines = rows * heads;
  const int64_t line_bytes = width * element_size;
  for (int64_t line = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32; line < lines;
       line += static_cast<int64_t>(gridDim.x) * kWarps) {
    const int64_t kept = kept_entries(counts[line / heads], width);
    if (kept == width) continue;
    unsigned char* begin = grid + line * line_bytes + kept * element_size;
    unsigned char* end = grid + (line + 1) * line_bytes;
    // [begin, head): bytes up to the first 16-byte boundary; [head, tail): 16-byte words; [tail, end): bytes.
    const uintptr_t b = reinterpret_cast<uintptr_t>(begin), e = reinterpret_cast<uintptr_t>(end);
    uintptr_t head = (b + 15) & ~uintptr_t{15};
    uintptr_t tail = e & ~uintptr_t{15};
    if (head > tail) head = tail = e;  // a run within one 16-byte word: bytes only
    for (uintptr_t p = b + lane; p < head; p += 32) *reinterpret_cast<unsigned char*>(p) = 0;
    for (uintptr_t p = head + 16 * static_cast<uintptr_t>(lane); p < tail; p += 16 * 32) {
      *reinterpret_cast<uint4*>(p) = make_uint4(0, 0, 0, 0);
    }
    for (uintptr_t p = tail + lane; p < e; p += 32) *reinterpret_cast<unsigned char*>(p) = 0;
  }
}

}  // namespace

int packed_rows(const void* cu, bool index_64, const void* cu_other, bool other_64, int64_t batch, int64_t total,
                int64_t* rows, int64_t* anchor, void* stream) {
  const auto s = static_cast<cudaStream_t>(stream);
  if (index_64) {
    return other_64 ? launch_rows<int64_t, int64_t>(cu, cu_other, batch, total, rows, anchor, s)
                    : launch_rows<int64_t, int32_t>(cu, cu_other, batch, total, rows, anchor, s);
  }
  return other_64 ? launch_rows<int32_t, int64_t>(cu, cu_other, batch, total, rows, anchor, s)
                  : launch_rows<int32_t, int32_t>(cu, cu_other, batch, total, rows, anchor, s);
}

int zero_unseen(void* grid, int64_t element_size, const int64_t* counts, int64_t rows, int64_t heads, int64_t width,
                void* stream) {
  if (rows == 0 || heads == 0 || width == 0) return cudaSuccess;
  const int64_t blocks = blocks_for(rows * heads, kThreads / 32, 4 * kMaxBlocks);  // a warp a (row, head) line
  zero_unseen_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<unsigned char*>(grid), element_size, counts, rows, heads, width);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
