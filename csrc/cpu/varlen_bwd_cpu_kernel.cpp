// varlen_bwd_cpu_kernel.cpp: see varlen_bwd_cpu_kernel.h.
#include "varlen_bwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmattn::cpu {
namespace {

// Four independent sums, so the compiler can keep several lanes busy without reassociating one sum.
__attribute__((always_inline)) inline double dot(const float* a, const float* b, int64_t n) {
  double s[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    for (int u = 0; u < 4; ++u) s[u] += static_cast<double>(a[d + u]) * b[d + u];
  }
  for (; d < n; ++d) s[0] += static_cast<double>(a[d]) * b[d];
  return (s[0] + s[1]) + (s[2] + s[3]);
}

__attribute__((always_inline)) inline void axpy(double alpha, const float* x, double* y, int64_t n) {
  for (int64_t d = 0; d < n; ++d) y[d] += alpha * x[d];
}

}  // namespace

// An AVX2 / FMA clone beside the baseline (as the forward's run_block; GCC on x86-64): the float64 products and sums
// of dot and axpy take four lanes, where the baseline build's SSE2 takes two.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void varlen_bwd_sequence(const VarlenBwdParams& bp, int32_t b, double* dsinks) {
  const VarlenFwdParams& p = bp.fwd;
  if (dsinks) std::fill(dsinks, dsinks + p.num_heads, 0.0);
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const SeqRange sk = key_seq(p, b);
  if (sq.len == 0) return;  // (a sequence with queries but no keys goes on: with a sink, its rows have an lse)
  const KeyRows key_rows = key_rows_of(p, sk);  // key j: row key_rows.row(j) of k, v and key-side operands
  const int64_t D = p.head_dim;
  const int32_t group = p.num_heads / p.num_heads_k;
  const bool key_side_mask = p.mask.layout == OperandLayout::kKeySide;
  const bool key_side_bias = p.bias.layout == OperandLayout::kKeySide;
  const double scale = p.softmax_scale;
  const double softcap = p.softcap;
  constexpr double kNegInf = -std::numeric_limits<double>::infinity();
  const float* q = static_cast<const float*>(p.q);
  const float* k = static_cast<const float*>(p.k);
  const float* v = static_cast<const float*>(p.v);
  const float* dout = static_cast<const float*>(bp.dout);

  struct Visited {
    int64_t row, bias_element;
    double score, dp;  // cap(scale * q . k) + bias, and dout . v
    double cap_slope;  // d score / d (scale * q . k): 1 - tanh^2 with a softcap, else 1
    double weight;     // exp(score - the row's max score)
  };
  std::vector<Visited> visited;
  for (int32_t h = 0; h < p.num_heads; ++h) {
    const int32_t hk = h / group;
    const double sink = p.sink(h);
    for (int64_t i = 0; i < sq.len; ++i) {
      const int64_t row = sq.start + i;
      const float lse_fwd = p.lse[h * p.total_q + row];
      if (lse_fwd == kNegInf) continue;  // no visible key and no sink: nothing to differentiate
      const float* q_i = q + row * p.q_row_stride + h * p.q_head_stride;
      const float* do_i = dout + row * bp.dout_row_stride + h * bp.dout_head_stride;
      double* dq_i = bp.dq + (row * p.num_heads + h) * D;
      const KeyRange window = row_keys(p, row, i, sq.len, sk.len);
      // Pass 1, in float64: every key the row can see with a score above -inf (the others weigh 0), its score and
      // dout_i . v_j; then the row's lse (the sink in its sum) and delta = sum_j p_j (dout_i . v_j) = dout_i .
      // out_i, recomputed rather than read from the forward's float32 lse and rounded out (whose rounding, in
      // dp - delta, would dominate the error of every gradient).
      visited.clear();
      double max = sink;
      for (int64_t j = window.begin; j < window.end; ++j) {
        const int64_t key = key_rows.row(j);
        if (p.mask.present() &&
            !p.mask.mask_allows(key_side_mask ? p.mask.offset(key, h, 0) : p.mask.offset(row, h, j))) {
          continue;
        }
        int64_t bias_element = 0;
        double s = scale * dot(q_i, k + key * p.k_row_stride + hk * p.k_head_stride, D);
        double cap_slope = 1.0;
        if (softcap > 0.0) {
          const double t = std::tanh(s / softcap);
          s = softcap * t;
          cap_slope = 1.0 - t * t;
        }
        if (p.bias.present()) {
          bias_element = key_side_bias ? p.bias.offset(key, h, 0) : p.bias.offset(row, h, j);
          s += static_cast<const float*>(p.bias.ptr)[bias_element];
        }
        if (s == kNegInf) continue;
        visited.push_back(
            {key, bias_element, s, dot(do_i, v + key * p.v_row_stride + hk * p.v_head_stride, D), cap_slope, 0.0});
        max = std::max(max, s);
      }
      double sum = std::exp(sink - max), weighted_dp = 0.0;  // exactly 0 without a sink
      for (Visited& key : visited) {
        key.weight = std::exp(key.score - max);  // NaN for a NaN score: the sums, and so the row, turn NaN
        sum += key.weight;
        weighted_dp += key.weight * key.dp;
      }
      // A NaN row of the forward (a NaN or +inf score, a NaN or +inf sink) keeps NaN gradients.
      const double lse = std::isnan(lse_fwd) ? lse_fwd : max + std::log(sum);
      const double delta = weighted_dp / sum - (bp.dlse ? bp.dlse[h * p.total_q + row] : 0.f);
      // Each key's probability exp(score - lse) as its pass-1 weight over the sum (one exponential per key, where a
      // second one per key was a third of this function's time); NaN throughout for a NaN row.
      const double inv_sum = std::isnan(lse) ? lse : 1.0 / sum;
      // Pass 2: the gradients, over the keys pass 1 kept, with their scores and dout . v.
      for (const Visited& key : visited) {
        const double w = key.weight * inv_sum;
        if (w == 0.0) continue;  // weight 0: nothing flows through this key
        const double ds = w * (key.dp - delta);  // d loss / d score: the bias's gradient, as the bias follows the cap
        const double dqk = scale * key.cap_slope * ds;
        axpy(w, do_i, bp.dv + (key.row * p.num_heads_k + hk) * D, D);
        axpy(dqk, k + key.row * p.k_row_stride + hk * p.k_head_stride, dq_i, D);
        axpy(dqk, q_i, bp.dk + (key.row * p.num_heads_k + hk) * D, D);
        if (bp.dbias) bp.dbias[key.bias_element] += ds;
      }
      // The sink is one more score of the row, with dp = 0 (it adds no value): ds = p_sink (0 - delta). A -inf sink
      // weighs 0 in every row (skipped, so that a NaN row cannot make its gradient NaN).
      if (dsinks && sink != kNegInf) dsinks[h] -= std::exp(sink - lse) * delta;
    }
  }
}

}  // namespace dmattn::cpu
