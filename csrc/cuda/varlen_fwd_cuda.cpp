// varlen_fwd_cuda.cpp: registers the CUDA kernels of dmattn::varlen_fwd.
//
// Validates once (tensors_to_params.cpp: the same shape / dtype / device rules as the CPU path; no cu_seqlens data
// checks on the host, which would need a device sync: the kernels clamp lying cu_seqlens to the tensor extents and
// return NaN everywhere when they break the contract, see varlen_fwd_run.cu), prepares q / k / v for the kernels
// (zero-padded to a compiled head dim, 16-byte aligned rows), allocates out, lse and the scratch through torch, and
// runs everything on the current stream (varlen_fwd_launch.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../tensors_to_params.h"
#include "varlen_fwd_launch.h"

namespace dmattn {
namespace {

constexpr const char* kOp = "dmattn.varlen_fwd: ";
constexpr int64_t kMaxGridDim = 65535;  // query heads are a grid dimension

// cp.async moves 16-byte chunks: the base and the token / head strides must keep every row 16-byte aligned.
bool rows_aligned(const at::Tensor& t) {
  const int64_t vec = 16 / t.element_size();
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % vec == 0 && t.stride(1) % vec == 0;
}

// q / k / v as the kernels read them: the head dim zero-padded to a compiled one (zero columns add nothing to any
// q . k, and the padded output columns are dropped), or an aligned copy of a view whose rows are not 16-byte aligned.
at::Tensor for_kernel(const at::Tensor& t, int64_t head_dim) {
  if (t.size(2) != head_dim) return at::constant_pad_nd(t, {0, head_dim - t.size(2)}, 0);
  if (t.numel() > 0 && !rows_aligned(t)) return at::empty_like(t, at::MemoryFormat::Contiguous).copy_(t);
  return t;
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                   const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                   int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                   const std::optional<at::Tensor>& mask,
                                                   const std::optional<at::Tensor>& bias,
                                                   std::optional<double> softmax_scale, bool is_causal) {
  check_args({q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal},
             c10::DeviceType::CUDA);
  TORCH_CHECK_TYPE(q.scalar_type() != at::kFloat, kOp,
                   "float32 q, k, v are not supported on CUDA (the kernels run float16 / bfloat16 tensor cores), "
                   "got q of dtype float32; convert q, k and v to float16 or bfloat16, or run on the CPU");
  const int64_t batch = cu_seqlens_q.size(0) - 1;
  TORCH_CHECK_VALUE(q.size(1) <= kMaxGridDim, kOp, "at most ", kMaxGridDim, " query heads on CUDA, got H = ",
                    q.size(1));

  const ScalarType dtype = q.scalar_type() == at::kHalf ? ScalarType::kFloat16 : ScalarType::kBFloat16;
  const int64_t head_dim = q.size(2);
  const int32_t kernel_dim = cuda::kernel_head_dim(dtype, static_cast<int32_t>(std::min<int64_t>(head_dim, 1 << 20)));
  TORCH_CHECK_VALUE(kernel_dim > 0, kOp, "head_dim D must be at most ", cuda::max_kernel_head_dim(dtype),
                    " on CUDA (the largest compiled head dim), got ", head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor qk = for_kernel(q, kernel_dim), kk = for_kernel(k, kernel_dim), vk = for_kernel(v, kernel_dim);
  const double scale = resolve_softmax_scale(softmax_scale, head_dim);  // of the real D, not the padded one
  const VarlenFwdArgs args{qk, kk, vk, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           mask, bias, scale, is_causal};
  auto [out, lse] = allocate_outputs(args);
  const VarlenFwdParams p = make_params(args, out, lse);

  cuda::Workspace ws;
  at::Tensor key_index, key_count;
  if (mask && mask->dim() == 2) {  // key-side mask: kept-key lists, (Hm, total_k) + (B, Hm) int32
    const int64_t mask_heads = mask->size(1);
    key_index = at::empty({mask_heads, k.size(0)}, q.options().dtype(at::kInt));
    key_count = at::empty({batch, mask_heads}, q.options().dtype(at::kInt));
    ws.keys = {key_index.data_ptr<int32_t>(), key_count.data_ptr<int32_t>(), static_cast<int32_t>(mask_heads)};
  }
  at::Tensor status = at::empty({1}, q.options().dtype(at::kInt));
  ws.status = status.data_ptr<int32_t>();
  C10_CUDA_CHECK(cuda::run_varlen_fwd(p, ws, c10::cuda::getCurrentCUDAStream()));

  if (kernel_dim != head_dim) out = out.narrow(2, 0, head_dim).contiguous();
  return {out, lse};
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CUDA, m) { m.impl("varlen_fwd", &dmattn::varlen_fwd_cuda); }
