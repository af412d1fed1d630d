// packed_rows_op.h: the torch side of the mask_mod adapter's passes, dmattn::packed_rows and dmattn::zero_unseen_
// (csrc/packed_rows.h has what they compute): the checks both backends run on their tensors before computing.
#pragma once

#include <ATen/ATen.h>

namespace dmattn {

// cu_seqlens and cu_seqlens_other: 1-d, the same length B + 1 >= 2, int32 or int64, contiguous, on one device;
// total >= 0. Raises a c10::Error naming the argument, what was expected and what was given.
void check_packed_rows_args(const at::Tensor& cu_seqlens, const at::Tensor& cu_seqlens_other, int64_t total);

// grid: 3-d (R, M, W), contiguous; counts: (R,) int64, contiguous, on grid's device. Raises likewise.
void check_zero_unseen_args(const at::Tensor& grid, const at::Tensor& counts);

}  // namespace dmattn
