// packed_rows.h: the mask_mod adapter's two passes (dmattn_ops/mods.py), each one launch where tensor ops took a
// dozen. Torch-free: the CPU and CUDA bindings check their tensors, then call these.
//
// dmattn::packed_rows(cu_seqlens, cu_seqlens_other, total): the per-row facts a mod is evaluated at. For one side's
// cu_seqlens (B + 1 entries) and packed rows 0 .. total-1, with b the sequence owning row i (the upper bound of i in
// cu_seqlens, minus 1, clamped to [0, B - 1]: torch.searchsorted(cu, i, right=True) - 1, by the same binary search,
// so equal even where cu lies) and count = the other side's count of sequence b, cu_other[b + 1] - cu_other[b], or 0
// for a row at or past cu_seqlens[B] (no sequence's):
//   rows[0][i] = b,           or the anchor where count <= 0;
//   rows[1][i] = i - cu[b],   or 0 where count <= 0;
//   rows[2][i] = count;
//   rows[3][i] = count - 1,   or 0 where count <= 0: the last position of the other side the row is evaluated at.
// A row with no count has only don't-care entries: it is evaluated at the anchor's first position, which is valid
// wherever any sequence has rows on both sides, so a mod reading memory at its indices stays in bounds.
// anchor = (a, 0): a is the sequence with the largest min(count, other count), the first of equals (torch.argmax's
// rule), a sequence with rows on both sides if any has them; 0 its first position (the probe's q_idx and kv_idx).
//
// dmattn::zero_unseen_(grid, counts): grid (R, M, W) contiguous, counts (R,) int64: zeroes grid[r, :, j] for every
// j >= counts[r] (every j where counts[r] <= 0), in place, byte-wise: False for a mask, +0.0 for a float bias, the
// adapter's don't-care entries. It writes only those entries: a batch whose rows all see W keys costs a read of counts.
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

// b (above): the sequence owning packed row i, the upper bound of i in cu minus 1, clamped to [0, batch - 1]
// (batch >= 1). Also how the block map's pass finds a query row's sequence (csrc/cuda/block_map.cu, row_reach).
template <typename Index>
DMATTN_HOST_DEVICE int64_t owning_sequence(const Index* cu, int64_t batch, int64_t i) {
  const int64_t b = upper_bound_of(cu, batch + 1, i) - 1;
  return b < 0 ? 0 : (b > batch - 1 ? batch - 1 : b);
}

// Row i's sequence b, its position i - cu[b] and its count (above), before the anchor replaces a row without count.
struct RowFacts {
  int64_t sequence, position, count;
};

template <typename Index, typename Other>
DMATTN_HOST_DEVICE RowFacts row_facts(const Index* cu, const Other* cu_other, int64_t batch, int64_t i) {
  const int64_t b = owning_sequence(cu, batch, i);
  const int64_t count = i < static_cast<int64_t>(cu[batch])
                            ? static_cast<int64_t>(cu_other[b + 1]) - static_cast<int64_t>(cu_other[b])
                            : 0;
  return {b, i - static_cast<int64_t>(cu[b]), count};
}

// Row i's four facts (above), written to rows[i], rows[total + i], rows[2 * total + i], rows[3 * total + i].
DMATTN_HOST_DEVICE void write_row(const RowFacts& f, int64_t anchor, int64_t total, int64_t i, int64_t* rows) {
  const bool seen = f.count > 0;
  rows[i] = seen ? f.sequence : anchor;
  rows[total + i] = seen ? f.position : 0;
  rows[2 * total + i] = f.count;
  rows[3 * total + i] = seen ? f.count - 1 : 0;
}

// min(count, other count) of sequence b: what the anchor maximizes.
template <typename Index, typename Other>
DMATTN_HOST_DEVICE int64_t anchor_score(const Index* cu, const Other* cu_other, int64_t b) {
  const int64_t n = static_cast<int64_t>(cu[b + 1]) - static_cast<int64_t>(cu[b]);
  const int64_t m = static_cast<int64_t>(cu_other[b + 1]) - static_cast<int64_t>(cu_other[b]);
  return n < m ? n : m;
}

// The number of a row's entries zero_unseen_ keeps: its count clamped to [0, width].
DMATTN_HOST_DEVICE int64_t kept_entries(int64_t count, int64_t width) {
  return count < 0 ? 0 : (count > width ? width : count);
}

namespace cuda {
// The CUDA passes (csrc/cuda/packed_rows.cu; their bindings csrc/cuda/packed_rows_cuda.cpp), one launch each on
// stream, returning the launch's cudaError_t.
// packed_rows: index_64 / other_64: whether cu / cu_other are int64 (else int32). rows: (4, total) int64, anchor: two
// int64. batch >= 1.
int packed_rows(const void* cu, bool index_64, const void* cu_other, bool other_64, int64_t batch, int64_t total,
                int64_t* rows, int64_t* anchor, void* stream);
// zero_unseen: grid of rows * heads * width elements of element_size bytes, counts (rows,) int64.
int zero_unseen(void* grid, int64_t element_size, const int64_t* counts, int64_t rows, int64_t heads, int64_t width,
                void* stream);
}  // namespace cuda

}  // namespace dmattn
