// varlen_fwd_cpu.cpp: registers the CPU kernels of dmattn::varlen_fwd and of its backward, dmattn::varlen_bwd.
//
// Validates once (tensors_to_params.cpp, plus the cu_seqlens data checks that are cheap here), lists the work items
// (sequence, KV group heads, query block) and runs them with at::parallel_for. The backward runs one sequence per
// work item on float32 copies of its inputs (varlen_bwd_cpu_kernel.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <vector>

#include "../blockwise_bwd.h"
#include "../tensors_to_params.h"
#include "varlen_bwd_cpu_kernel.h"
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

// kv_slots: every slot a sequence uses (its first key_seq(p, b).len entries) names a row of the pool.
// (CUDA clamps instead.)
void check_slots_data(const VarlenFwdParams& p) {
  if (p.kv_slots == nullptr) return;
  for (int32_t b = 0; b < p.batch; ++b) {
    const SeqRange sk = key_seq(p, b);
    for (int64_t r = sk.start; r < sk.start + sk.len; ++r) {
      TORCH_CHECK_VALUE(p.kv_slots[r] >= 0 && p.kv_slots[r] < p.pool_rows, "dmattn.varlen_fwd: kv_slots[", r,
                        "] (key ", r - sk.start, " of sequence ", b, ") must be a row of the key pool, in [0, ",
                        p.pool_rows, "), got ", p.kv_slots[r]);
    }
  }
}

// seqused_k[b] counts keys of sequence b's cu_seqlens_k range: 0 .. its length. (CUDA clamps instead.)
void check_seqused_data(const std::optional<at::Tensor>& seqused_k, const at::Tensor& cu_seqlens_k) {
  if (!seqused_k) return;
  const int32_t* used = seqused_k->data_ptr<int32_t>();
  const int32_t* c = cu_seqlens_k.data_ptr<int32_t>();
  for (int64_t b = 0; b < seqused_k->size(0); ++b) {
    TORCH_CHECK_VALUE(used[b] >= 0 && used[b] <= c[b + 1] - c[b], "dmattn.varlen_fwd: seqused_k[", b,
                      "] must be in [0, ", c[b + 1] - c[b], "] (the keys of sequence ", b, " in cu_seqlens_k), got ",
                      used[b]);
  }
}

std::tuple<at::Tensor, at::Tensor> varlen_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                                  int64_t max_seqlen_q, int64_t max_seqlen_k,
                                                  const std::optional<at::Tensor>& mask,
                                                  const std::optional<at::Tensor>& bias,
                                                  std::optional<double> softmax_scale, bool is_causal,
                                                  int64_t window_left, int64_t window_right,
                                                  std::optional<double> softcap,
                                                  const std::optional<at::Tensor>& sinks,
                                                  const std::optional<at::Tensor>& seqused_k,
                                                  const std::optional<at::Tensor>& kv_slots,
                                                  const std::optional<at::Tensor>& key_range) {
  const VarlenFwdArgs given{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias,
                            softmax_scale, is_causal, window_left, window_right, softcap.value_or(0.0), sinks,
                            seqused_k, kv_slots, key_range};
  check_args(given, c10::DeviceType::CPU);
  const VarlenFwdArgs args = sinks_as_float32(given);
  check_cu_seqlens_data("cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q, "total_q", "max_seqlen_q");
  const int64_t total_k = kv_slots ? kv_slots->size(0) : k.size(0);
  check_cu_seqlens_data("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "total_k", "max_seqlen_k");
  check_seqused_data(seqused_k, cu_seqlens_k);

  auto [out, lse] = allocate_outputs(args);
  if (out.numel() == 0) return {out, lse};  // no query rows or no heads (H = 0): nothing to compute
  const VarlenFwdParams p = make_params(args, out, lse);
  check_slots_data(p);

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

// float32, contiguous: what the backward kernel reads.
at::Tensor as_float32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> varlen_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& bias, std::optional<double> softmax_scale, bool is_causal, bool bias_grad,
    int64_t window_left, int64_t window_right, std::optional<double> softcap_arg,
    const std::optional<at::Tensor>& sinks, const std::optional<at::Tensor>& seqused_k,
    const std::optional<at::Tensor>& key_range) {
  const double softcap = softcap_arg.value_or(0.0);
  const VarlenFwdArgs args{q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias,
                           softmax_scale, is_causal, window_left, window_right, softcap, sinks, seqused_k,
                           std::nullopt, key_range};
  check_args(args, c10::DeviceType::CPU);
  check_bwd_args(args, dout, dlse, out, lse);
  check_cu_seqlens_data("cu_seqlens_q", cu_seqlens_q, q.size(0), max_seqlen_q, "total_q", "max_seqlen_q");
  check_cu_seqlens_data("cu_seqlens_k", cu_seqlens_k, k.size(0), max_seqlen_k, "total_k", "max_seqlen_k");
  check_seqused_data(seqused_k, cu_seqlens_k);
  if (blockwise_backward_requested()) {
    return blockwise_varlen_bwd(args, dout, dlse, out, lse, bias_grad);
  }

  const auto f64 = q.options().dtype(at::kDouble);
  at::Tensor dq = at::zeros(q.sizes(), f64), dk = at::zeros(k.sizes(), f64), dv = at::zeros(v.sizes(), f64);
  const std::optional<at::Tensor> bias32 = bias ? std::optional<at::Tensor>(as_float32(*bias)) : std::nullopt;
  at::Tensor dbias = bias && bias_grad ? at::zeros(bias->sizes(), f64) : at::empty({0}, f64);
  at::Tensor dsinks = sinks ? at::zeros({q.size(1)}, f64) : at::empty({0}, f64);
  if (q.numel() > 0 && (k.numel() > 0 || sinks)) {  // with sinks, rows of no key still have an lse
    const at::Tensor q32 = as_float32(q), k32 = as_float32(k), v32 = as_float32(v), dout32 = as_float32(dout);
    at::Tensor out32 = as_float32(out), lse32 = lse.contiguous();
    const at::Tensor dlse32 = dlse.numel() > 0 ? dlse.contiguous() : dlse;
    const VarlenFwdArgs args32{q32, k32, v32, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               mask, bias32, softmax_scale, is_causal, window_left, window_right, softcap,
                               sinks ? std::optional<at::Tensor>(as_float32(*sinks)) : std::nullopt, seqused_k,
                               std::nullopt, key_range};
    VarlenBwdParams p;
    p.fwd = make_params(args32, out32, lse32);
    p.dout = dout32.data_ptr<float>();
    p.dout_row_stride = dout32.stride(0);
    p.dout_head_stride = dout32.stride(1);
    p.dlse = dlse32.numel() > 0 ? dlse32.data_ptr<float>() : nullptr;
    p.dq = dq.data_ptr<double>();
    p.dk = dk.data_ptr<double>();
    p.dv = dv.data_ptr<double>();
    p.dbias = dbias.numel() > 0 ? dbias.data_ptr<double>() : nullptr;  // laid out like bias32: contiguous
    p.dsinks = dsinks.numel() > 0 ? dsinks.data_ptr<double>() : nullptr;
    // Each sequence's share of dsinks apart (sequences run in parallel), summed in sequence order: deterministic.
    const int64_t H = p.fwd.num_heads;
    std::vector<double> dsinks_shares(p.dsinks ? p.fwd.batch * H : 0);
    at::parallel_for(0, p.fwd.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        cpu::varlen_bwd_sequence(p, static_cast<int32_t>(b), p.dsinks ? dsinks_shares.data() + b * H : nullptr);
      }
    });
    for (int64_t b = 0; p.dsinks && b < p.fwd.batch; ++b) {
      for (int64_t h = 0; h < H; ++h) p.dsinks[h] += dsinks_shares[b * H + h];
    }
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
          bias && bias_grad ? dbias.to(bias->scalar_type()) : dbias.to(at::kFloat),
          sinks ? dsinks.to(sinks->scalar_type()) : dsinks.to(at::kFloat)};
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CPU, m) {
  m.impl("varlen_fwd", &dmattn::varlen_fwd_cpu);
  m.impl("varlen_bwd", &dmattn::varlen_bwd_cpu);
}
