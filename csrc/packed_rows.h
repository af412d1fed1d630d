// packed_rows.h: dmattn::packed_rows, the per-row facts of a packed batch that the mask_mod adapter evaluates a mod
// at (dmattn_ops/mods.py), in one pass instead of a dozen tensor ops. Torch-free: the CPU and CUDA bindings check
// their tensors, then call these.
//
// For one side's cu_seqlens (B + 1 entries) and packed rows 0 .. total-1, row i's facts are
//   rows[0][i] = b, the sequence owning row i: the upper bound of i in cu_seqlens, minus 1, clamped to [0, B - 1]
//               (torch.searchsorted(cu, i, right=True) - 1, by the same binary search, so equal even where cu lies);
//   rows[1][i] = i - cu_seqlens[b], its position in that sequence;
//   rows[2][i] = the other side's count of sequence b, cu_other[b + 1] - cu_other[b], or 0 for a row at or past
//               cu_seqlens[B] (no sequence's);
// and anchor = the sequence with the largest min(count, other count), the first of equals (torch.argmax's rule): a
// sequence with rows on both sides, if any has them.
#pragma once

#include <cstdint>

#include "varlen_fwd_params.h"  // DMATTN_HOST_DEVICE

namespace dmattn {

// The upper bound of value in cu[0, n), as torch's searchsorted finds it (also on an unsorted cu).
template <typename Index>
DMATTN_HOST_DEVICE int64_t upper_bound_of(const Index* cu, int64_t n, int64_t value) {
  int64_t start = 0, end = n;
  while (start < end) {
    const int64_t mid = start + ((end - start) >> 1);
    if (!(static_cast<int64_t>(cu[mid]) > value)) {
      start = mid + 1;
    } else {
      end = mid;
    }
  }
  return start;
}

// rows[0][i] (above): the sequence owning packed row i, the upper bound of i in cu minus 1, clamped to [0, batch - 1]
// (batch >= 1). Also how the block map's pass finds a query row's sequence (csrc/cuda/block_map.cu, row_reach).
template <typename Index>
DMATTN_HOST_DEVICE int64_t owning_sequence(const Index* cu, int64_t batch, int64_t i) {
  const int64_t b = upper_bound_of(cu, batch + 1, i) - 1;
  return b < 0 ? 0 : (b > batch - 1 ? batch - 1 : b);
}

// Row i's three facts (above), written to rows[i], rows[total + i], rows[2 * total + i].
template <typename Index, typename Other>
DMATTN_HOST_DEVICE void packed_row(const Index* cu, const Other* cu_other, int64_t batch, int64_t total, int64_t i,
                                   int64_t* rows) {
  const int64_t b = owning_sequence(cu, batch, i);
  rows[i] = b;
  rows[total + i] = i - static_cast<int64_t>(cu[b]);
  rows[2 * total + i] = i < static_cast<int64_t>(cu[batch])
                            ? static_cast<int64_t>(cu_other[b + 1]) - static_cast<int64_t>(cu_other[b])
                            : 0;
}

// min(count, other count) of sequence b: what the anchor maximizes.
template <typename Index, typename Other>
DMATTN_HOST_DEVICE int64_t anchor_score(const Index* cu, const Other* cu_other, int64_t b) {
  const int64_t n = static_cast<int64_t>(cu[b + 1]) - static_cast<int64_t>(cu[b]);
  const int64_t m = static_cast<int64_t>(cu_other[b + 1]) - static_cast<int64_t>(cu_other[b]);
  return n < m ? n : m;
}

namespace cuda {
// The CUDA pass (csrc/cuda/packed_rows.cu; its binding csrc/cuda/packed_rows_cuda.cpp): one launch on stream;
// index_64 / other_64: whether cu / cu_other are int64 (else int32). rows: (3, total) int64, anchor: one int64.
// batch >= 1. Returns the launch's cudaError_t.
int packed_rows(const void* cu, bool index_64, const void* cu_other, bool other_64, int64_t batch, int64_t total,
                int64_t* rows, int64_t* anchor, void* stream);
}  // namespace cuda

}  // namespace dmattn
