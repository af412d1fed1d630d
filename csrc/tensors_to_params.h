// tensors_to_params.h: tensors -> VarlenFwdParams, shared by every backend's registration file.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "varlen_fwd_params.h"

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
  int64_t window_left = -1;
  int64_t window_right = -1;
  double softcap = 0.0;
  std::optional<at::Tensor> sinks = std::nullopt;
  std::optional<at::Tensor> seqused_k = std::nullopt;
  std::optional<at::Tensor> kv_slots = std::nullopt;
  std::optional<at::Tensor> key_range = std::nullopt;
};

// Checks every shape, dtype, stride and device invariant a kernel relies on for memory safety (sizes the kernels
// keep in 32 bits included) and raises a ValueError/TypeError naming the argument otherwise. Python type mistakes
// never get here: the op's schema rejects them first. The same rules, with the same messages in the same order,
// are meta/rules.py's, which the fake implementation runs while tracing; an eager call is checked here only.
// tests/test_errors.py holds the two to one text for every case.
void check_args(const VarlenFwdArgs& a, c10::DeviceType device_type);

// The extra arguments of dmattn::varlen_bwd, checked after check_args: dout and out of q's shape and dtype,
// softmax_lse (H, total_q) float32, dsoftmax_lse the same or empty (no gradient through it), all on q's device.
void check_bwd_args(const VarlenFwdArgs& a, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out,
                    const at::Tensor& lse);

// softmax_scale, or its default 1 / sqrt(D) for the caller's head dim D (before any padding a backend applies).
double resolve_softmax_scale(std::optional<double> softmax_scale, int64_t head_dim);

// at::empty(sizes, options), which the caller's kernels must write wholly before they read it. Under the debug
// variable DMATTN_FILL_UNINITIALIZED (README "Runtime debug variables") it comes filled, every byte alike: `nan` 0xFF
// (NaN in every float format, -1 in every integer), `large` 0x7F (3.4e38 in float32 and bfloat16, which a max or a
// comparison does not hide as it hides a NaN; 2.1e9 in int32), so that a test can check that no result depends on
// an element no kernel wrote (tests/test_uninitialized.py). Every buffer the backends allocate uninitialized (out,
// lse, workspaces, the backward's scratch) comes from here.
at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options);

// Allocates out (total_q, H, D) and softmax_lse (H, total_q) (uninitialized) and fills the params struct.
// Query rows no sequence owns are left for the kernel to write (0 and -inf). The params hold max_seqlen capped at
// the totals, the window with is_causal folded in (window_right 0) and limits no sequence reaches as -1, and a batch
// of 0 when H = 0 (nothing to compute). Sinks must be float32 and contiguous here (sinks_as_float32).
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const VarlenFwdArgs& a);
VarlenFwdParams make_params(const VarlenFwdArgs& a, at::Tensor& out, at::Tensor& lse);

// The args with their sinks as the kernels read them: float32, contiguous (a no-op for such sinks).
VarlenFwdArgs sinks_as_float32(const VarlenFwdArgs& a);

}  // namespace dmattn
