// varlen_bwd_cpu_kernel.cpp: see varlen_bwd_cpu_kernel.h.
#include "varlen_bwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmattn::cpu {
namespace {

// Four independent sums, so the compiler can keep several lanes busy without reassociating one sum.
double dot(const float* a, const float* b, int64_t n) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    for (int u = 0; u < 4; ++u) s[u] += static_cast<double>(a[d + u]) * b[d + u];
  }
  for (; d < n; ++d) s[0] += static_cast<double>(a[d]) * b[d];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

void axpy(double alpha, const float* x, double* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

}  // namespace

void varlen_bwd_sequence(const VarlenBwdParams& bp, int32_t b) {
  const VarlenFwdParams& p = bp.fwd;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const SeqRange sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  if (sq.len == 0 || sk.len == 0) return;
  const DenseKeyRows key_rows{sk.start};  // key j: packed row key_rows.row(j) of k, v and key-side operands
  const int64_t D = p.head_dim;
  const int32_t group = p.num_heads / p.num_heads_k;
  const bool key_side_mask = p.mask.layout == OperandLayout::kKeySide;
  const bool key_side_bias = p.bias.layout == OperandLayout::kKeySide;
  const double scale = p.softmax_scale;
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  const float* out = static_cast<const float*>(p.out);
  const float* dout = static_cast<const float*>(bp.dout);

  struct Visited {
    int64_t row, bias_element;
    double score, dp;  // scale * q . k + bias, and dout . v
  };
  std::vector<Visited> visited;
  for (int32_t h = 0; h < p.num_heads; ++h) {
    const int32_t hk = h / group;
    for (int64_t i = 0; i < sq.len; ++i) {
      const int64_t row = sq.start + i;
      const float lse_fwd = p.lse[h * p.total_q + row];
      if (lse_fwd == -std::numeric_limits<float>::infinity()) continue;  // no visible key: nothing to differentiate
      const float* q_i = q + row * p.q_row_stride + h * p.q_head_stride;
      const float* do_i = dout + row * bp.dout_row_stride + h * bp.dout_head_stride;
      double* dq_i = bp.dq + (row * p.num_heads + h) * D;
      int64_t visible = sk.len;
      if (p.is_causal) visible = std::max<int64_t>(0, std::min(causal_visible_keys(i, sq.len, sk.len), sk.len));
      // Pass 1, in float64: every key the row can see with a score above -inf (the others weigh 0), its score and
      // dout_i . v_j; then the row's lse and delta = sum_j p_j (dout_i . v_j) = dout_i . out_i, recomputed rather
      // than read from the forward's float32 lse and rounded out (whose rounding, in dp - delta, would dominate the
      // error of every gradient).
      visited.clear();
      double max = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        const int64_t key = key_rows.row(j);
        if (p.mask.present() &&
            !p.mask.mask_allows(key_side_mask ? p.mask.offset(key, h, 0) : p.mask.offset(row, h, j))) {
          continue;
        }
        int64_t bias_element = 0;
        double s = scale * dot(q_i, k + key * p.k_row_stride + hk * p.k_head_stride, D);
        if (p.bias.present()) {
          bias_element = key_side_bias ? p.bias.offset(key, h, 0) : p.bias.offset(row, h, j);
          s += static_cast<const float*>(p.bias.ptr)[bias_element];
        }
        if (s == -std::numeric_limits<double>::infinity()) continue;
        visited.push_back({key, bias_element, s, dot(do_i, v + key * p.v_row_stride + hk * p.v_head_stride, D)});
        max = std::max(max, s);
      }
      double sum = 0.0, weighted_dp = 0.0;
      for (const Visited& key : visited) {
        const double w = std::exp(key.score - max);  // NaN for a NaN score: the sums, and so the row, turn NaN
        sum += w;
        weighted_dp += w * key.dp;
      }
      // A NaN row of the forward (a NaN or +inf score) keeps NaN gradients.
      const double lse = std::isnan(lse_fwd) ? lse_fwd : max + std::log(sum);
      const double delta = weighted_dp / sum - (bp.dlse ? bp.dlse[h * p.total_q + row] : 0.f);
      // Pass 2: the gradients, over the keys pass 1 kept, with their scores and dout . v.
      for (const Visited& key : visited) {
        const double w = std::exp(key.score - lse);
        if (w == 0.0) continue;  // weight 0: nothing flows through this key
        const double ds = w * (key.dp - delta);
        axpy(w, do_i, bp.dv + (key.row * p.num_heads_k + hk) * D, D);
        axpy(scale * ds, k + key.row * p.k_row_stride + hk * p.k_head_stride, dq_i, D);
        axpy(scale * ds, q_i, bp.dk + (key.row * p.num_heads_k + hk) * D, D);
        if (bp.dbias) bp.dbias[key.bias_element] += ds;
      }
    }
  }
}

}  // namespace dmattn::cpu
