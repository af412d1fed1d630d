// varlen_fwd_cpu.cpp: registers the CPU kernel of dmattn::varlen_fwd.
//
// Validates once (tensors_to_params.cpp, plus the cu_seqlens data checks that are cheap here), lists the work items
// (sequence, KV group heads, query block) and runs them with at::parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../tensors_to_params.h"
#include "varlen_fwd_cpu_kernel.h"

namespace dmattn {
namespace {

// cu_seqlens must start at 0, never decrease, end at or before the total, and no sequence may be longer than
// max_seqlen. (The CUDA path cannot afford a device sync for this and clamps instead.)
void check_cu_seqlens_data(const char* name, const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                           const char* total_name, const char* max_name) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t n = cu.size(0);
  TORCH_CHECK_VALUE(c[0] == 0, "dmattn.varlen_fwd: ", name, "[0] must be 0, got ", c[0]);
  for (int64_t b = 0; b + 1 < n; ++b) {
    TORCH_CHECK_VALUE(c[b + 1] >= c[b], "dmattn.varlen_fwd: ", name, " must be non-decreasing, got ", name, "[", b,
                      "] = ", c[b], " > ", name, "[", b + 1, "] = ", c[b + 1]);
    TORCH_CHECK_VALUE(c[b + 1] - c[b] <= max_seqlen, "dmattn.varlen_fwd: sequence ", b, " has ", c[b + 1] - c[b],
                      " tokens in ", name, ", more than ", max_name, " = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(c[n - 1] <= total, "dmattn.varlen_fwd: ", name, "[-1] must be <= ", total_name, " = ", total,
                    ", got ", c[n - 1]);
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::optional<double> softmax_scale, bool is_causal) {
  const VarlenFwdArgs args{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           mask, bias, softmax_scale, is_causal};
  check_args(args, c10::DeviceType::CPU);
  check_cu_seqlens_data("cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q, "total_q", "max_seqlen_q");
  check_cu_seqlens_data("cu_seqlens_k", cu_seqlens_k, k.size(0), max_seqlen_k, "total_k", "max_seqlen_k");

  auto [out, lse] = allocate_outputs(args);
  if (out.numel() == 0) return {out, lse};  // no query rows or no heads (H = 0): nothing to compute
  const VarlenFwdParams p = make_params(args, out, lse);

  const int64_t threads = at::get_num_threads();
  const cpu::WorkPlan plan = cpu::plan_work(p, threads);
  std::vector<float> partials(plan.partial_floats);
  // Items come largest first; each thread takes the next one as it finishes (a static split of items whose key
  // counts differ 4x leaves threads idle).
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  at::parallel_for(0, std::min(threads, n_items), 1, [&](int64_t, int64_t) {
    cpu::Scratch scratch;
    for (int64_t i = next++; i < n_items; i = next++) cpu::run_block(p, plan.items[i], scratch, partials.data());
  });
  at::parallel_for(0, static_cast<int64_t>(plan.combines.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) cpu::combine_splits(p, plan.combines[i], partials.data());
  });
  const int64_t owned_end = p.cu_seqlens_q[p.batch];
  if (owned_end < p.total_q) {
    for (int32_t h = 0; h < p.num_heads; ++h) cpu::write_empty_rows(p, h, owned_end, p.total_q);
  }
  return {out, lse};
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CPU, m) { m.impl("varlen_fwd", &dmattn::varlen_fwd_cpu); }
