// packed_rows_cuda.cpp: registers dmattn::packed_rows's CUDA kernel (packed_rows.cu) on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "../packed_rows.h"
#include "../packed_rows_op.h"

namespace dmattn {
namespace {

std::tuple<at::Tensor, at::Tensor> packed_rows_cuda(const at::Tensor& cu, const at::Tensor& other, int64_t total) {
  check_packed_rows_args(cu, other, total);
  const c10::cuda::CUDAGuard guard(cu.device());
  auto rows = at::empty({3, total}, cu.options().dtype(at::kLong));
  auto anchor = at::empty({}, cu.options().dtype(at::kLong));
  const int error = cuda::packed_rows(cu.data_ptr(), cu.scalar_type() == at::kLong, other.data_ptr(),
                                      other.scalar_type() == at::kLong, cu.size(0) - 1, total,
                                      rows.data_ptr<int64_t>(), anchor.data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  return {rows, anchor};
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CUDA, m) {
  m.impl("packed_rows", &dmattn::packed_rows_cuda);
}
