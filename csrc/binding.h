// binding.h: tensors -> VarlenFwdParams, shared by every backend's registration file.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <optional>
#include <tuple>

#include "varlen_fwd_params.h"

// DMATTN_CHECK_VALUE(cond, ...): TORCH_CHECK_VALUE (a Python ValueError) where that is safe to throw from an
// extension. On torch 2.11.0+cu130 (the H100 host) throwing c10::ValueError from this library segfaults the
// process, on the CPU as on CUDA, while c10::TypeError and torch 2.13's ValueError are fine; there the check raises
// c10::Error (a RuntimeError) with the same message instead. The Python API checks every rule before the op runs
// (meta/rules.py), so this only affects direct torch.ops.dmattn.varlen_fwd calls.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 13)
#define DMATTN_CHECK_VALUE(cond, ...) TORCH_CHECK_VALUE(cond, __VA_ARGS__)
#else
#define DMATTN_CHECK_VALUE(cond, ...) TORCH_CHECK(cond, __VA_ARGS__)
#endif

namespace dmattn {

// The arguments of dmattn::varlen_fwd, as the dispatcher hands them to a backend.
struct VarlenFwdArgs {
  const at::Tensor& q;
  const at::Tensor& k;
  const at::Tensor& v;
  const at::Tensor& cu_seqlens_q;
  const at::Tensor& cu_seqlens_k;
  int64_t max_seqlen_q;
  int64_t max_seqlen_k;
  const std::optional<at::Tensor>& mask;
  const std::optional<at::Tensor>& bias;
  std::optional<double> softmax_scale;
  bool is_causal;
};

// Checks every shape, dtype, stride and device invariant a kernel relies on for memory safety and raises a
// ValueError (see DMATTN_CHECK_VALUE) or TypeError naming the argument otherwise. The user-facing statement of these
// rules, used by the fake implementation and the Python API, is meta/rules.py; the two are kept in step by
// tests/test_errors.py.
void check_args(const VarlenFwdArgs& a, c10::DeviceType device_type);

// softmax_scale, or its default 1 / sqrt(D) for the caller's head dim D (before any padding a backend applies).
double resolve_softmax_scale(std::optional<double> softmax_scale, int64_t head_dim);

// Allocates out (total_q, H, D) and softmax_lse (H, total_q) and fills the params struct.
// Query rows no sequence owns are left for the kernel to write (0 and -inf).
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const VarlenFwdArgs& a);
VarlenFwdParams make_params(const VarlenFwdArgs& a, at::Tensor& out, at::Tensor& lse);

}  // namespace dmattn
