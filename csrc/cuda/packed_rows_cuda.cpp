// packed_rows_cuda.cpp: registers the CUDA kernels of the mask_mod adapter's passes, dmattn::packed_rows and
// dmattn::zero_unseen_ (packed_rows.cu), on the current stream.
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
  auto rows = at::empty({4, total}, cu.options().dtype(at::kLong));
  auto anchor = at::empty({2}, cu.options().dtype(at::kLong));
  const int error = cuda::packed_rows(cu.data_ptr(), cu.scalar_type() == at::kLong, other.data_ptr(),
                                      other.scalar_type() == at::kLong, cu.size(0) - 1, total,
                                      rows.data_ptr<int64_t>(), anchor.data_ptr<int64_t>(),
                                      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
  return {rows, anchor};
}

void zero_unseen_cuda(const at::Tensor& grid, const at::Tensor& counts) {
  check_zero_unseen_args(grid, counts);
  const c10::cuda::CUDAGuard guard(grid.device());
  const int error = cuda::zero_unseen(grid.data_ptr(), grid.element_size(), counts.data_ptr<int64_t>(), grid.size(0),
                                      grid.size(1), grid.size(2), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(error));
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CUDA, m) {
  m.impl("packed_rows", &dmattn::packed_rows_cuda);
  m.impl("zero_unseen_", &dmattn::zero_unseen_cuda);
}
