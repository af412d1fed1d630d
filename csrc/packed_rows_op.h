// packed_rows_op.h: the torch side of dmattn::packed_rows (csrc/packed_rows.h has the facts it computes): the checks
// both backends run on their tensors before computing.
#pragma once

#include <ATen/ATen.h>

namespace dmattn {

// cu_seqlens and cu_seqlens_other: 1-d, the same length B + 1 >= 2, int32 or int64, contiguous, on one device;
// total >= 0. Raises a c10::Error naming the argument, what was expected and what was given.
void check_packed_rows_args(const at::Tensor& cu_seqlens, const at::Tensor& cu_seqlens_other, int64_t total);

}  // namespace dmattn
