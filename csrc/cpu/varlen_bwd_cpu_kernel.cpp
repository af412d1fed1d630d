// varlen_bwd_cpu_kernel.cpp: see varlen_bwd_cpu_kernel.h.
#include "varlen_bwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace dmattn::cpu {
namespace {

// Keys per block of pass 1: a row's q and dout are loaded once per kBlock keys.
constexpr int kBlock = 4;

// Four float64 lanes (GCC / Clang vector extensions: AVX registers in the AVX2 clone, SSE2 pairs in the baseline), so
// that the loops below run along d. Written as plain loops, GCC vectorized them across a block's rows instead, one
// scalar load per row and lane, and the block ran slower than one key at a time.
typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
__attribute__((always_inline)) inline v4d load4(const double* p) {
  v4d x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
__attribute__((always_inline)) inline v4d load4(const float* p) {
  v4f x;
  std::memcpy(&x, p, sizeof(x));
  return __builtin_convertvector(x, v4d);
}

// out[c] = a . b[c] for kBlock rows b[c] at once. Each sum keeps four partial sums (one per lane: element d goes to
// lane d % 4), combined in a fixed order, so a key's product does not depend on its block.
template <typename T>
__attribute__((always_inline)) inline void dot_block(const double* a, const T* const* b, int64_t n,
                                                     double* out) {
  v4d s[kBlock] = {};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    const v4d x = load4(a + d);
    for (int c = 0; c < kBlock; ++c) s[c] += x * load4(b[c] + d);
  }
  for (; d < n; ++d)
    for (int c = 0; c < kBlock; ++c) s[c][0] += a[d] * b[c][d];
  for (int c = 0; c < kBlock; ++c) out[c] = (s[c][0] + s[c][1]) + (s[c][2] + s[c][3]);
}

// Query rows per block of pass 2: the K / V rows a block's rows share are updated once per block, not once per row.
constexpr int kRows = 4;

// A sequence's float64 copy of one KV head's K and V, at most (per thread).
constexpr int64_t kMaxConvertedBytes = int64_t{32} << 20;

// y += alpha[0] x[0] + ... + alpha[kCount - 1] x[kCount - 1], added to each y[d] in that order (as kCount axpy calls
// one after another would add them).
template <int kCount>
__attribute__((always_inline)) inline void axpy_rows(const double* alpha, const double* const* x, double* y,
                                                     int64_t n) {
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    v4d acc = load4(y + d);
    for (int c = 0; c < kCount; ++c) acc += alpha[c] * load4(x[c] + d);
    std::memcpy(y + d, &acc, sizeof(acc));
  }
  for (; d < n; ++d) {
    double acc = y[d];
    for (int c = 0; c < kCount; ++c) acc += alpha[c] * x[c][d];
    y[d] = acc;
  }
}

// y[c] += alpha[c] x for c < kCount: one x, several rows y (a key's K row into the dq of each block row that sees it).
template <int kCount, typename T>
__attribute__((always_inline)) inline void axpy_into_rows(const double* alpha, const T* x, double* const* y,
                                                          int64_t n) {
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    const v4d xd = load4(x + d);
    for (int c = 0; c < kCount; ++c) {
      v4d acc = load4(y[c] + d);
      acc += alpha[c] * xd;
      std::memcpy(y[c] + d, &acc, sizeof(acc));
    }
  }
  for (; d < n; ++d)
    for (int c = 0; c < kCount; ++c) y[c][d] += alpha[c] * x[d];
}

// f(std::integral_constant<int, count>) for count in [1, kRows]: a key's updates with the number of rows that share
// it as a constant (their loops unrolled).
template <typename F>
__attribute__((always_inline)) inline void with_count(int count, F&& f) {
  static_assert(kRows == 4, "one case per count");
  switch (count) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

}  // namespace

// An AVX2 / FMA clone beside the baseline (as the forward's run_block; GCC on x86-64): the float64 products and sums
// of dot_block and the axpys take four lanes, where the baseline build's SSE2 takes two.
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

  struct Candidate {   // a key the row's window and mask show
    int64_t row, pos, bias_element;  // its row of k, v and key-side operands, its position j, its bias element
  };
  struct Visited : Candidate {  // one with a score above -inf
    double score, dp;  // cap(scale * q . k) + bias, and dout . v
    double cap_slope;  // d score / d (scale * q . k): 1 - tanh^2 with a softcap, else 1
    double p, ds;      // exp(score - the row's max), then the key's probability; d loss / d score
  };
  std::vector<Visited> visited[kRows];
  std::vector<Candidate> candidates;
  // K and V of the sequence's current KV head in float64, by key position, where they take at most
  // kMaxConvertedBytes: the products and sums of both passes then read float64 rows, where each (row, key) pair
  // converted its key's floats again (a quarter of the backward's time on the training step of
  // tools/bench_cpu_backward.py). Longer sequences read the float32 rows.
  const bool as_f64 = sk.len * D * 2 * static_cast<int64_t>(sizeof(double)) <= kMaxConvertedBytes;
  std::vector<double> k64(as_f64 ? sk.len * D : 0), v64(as_f64 ? sk.len * D : 0);
  // The block's rows' q and dout in float64, and their dq as it is summed.
  std::vector<double> q_rows(kRows * D), do_rows(kRows * D), dq_rows(kRows * D);
  for (int32_t h = 0; h < p.num_heads; ++h) {
    const int32_t hk = h / group;
    const double sink = p.sink(h);
    const float* k_head = k + hk * p.k_head_stride;
    const float* v_head = v + hk * p.v_head_stride;
    if (as_f64 && h % group == 0) {  // the KV head's rows by key position, once for its group of query heads
      for (int64_t j = 0; j < sk.len; ++j) {
        const int64_t key = key_rows.row(j);
        for (int64_t d = 0; d < D; ++d) {
          k64[j * D + d] = k_head[key * p.k_row_stride + d];
          v64[j * D + d] = v_head[key * p.v_row_stride + d];
        }
      }
    }
    // Head h's rows, with k_of / v_of (key row, key position) -> that key's K / V row, float64 or float32.
    auto run_head = [&](auto k_of, auto v_of) __attribute__((always_inline)) {
      for (int64_t i0 = 0; i0 < sq.len; i0 += kRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kRows, sq.len - i0));
        for (int r = 0; r < rows; ++r) {
          visited[r].clear();
          const int64_t i = i0 + r, row = sq.start + i;
          const float lse_fwd = p.lse[h * p.total_q + row];
          if (lse_fwd == kNegInf) continue;  // no visible key and no sink: nothing to differentiate
          double* q_row = q_rows.data() + r * D;
          double* do_row = do_rows.data() + r * D;
          const float* q_i = q + row * p.q_row_stride + h * p.q_head_stride;
          const float* do_i = dout + row * bp.dout_row_stride + h * bp.dout_head_stride;
          for (int64_t d = 0; d < D; ++d) {
            q_row[d] = q_i[d];
            do_row[d] = do_i[d];
          }
          const KeyRange window = row_keys(p, row, i, sq.len, sk.len);
          // Pass 1, in float64: every key the row can see with a score above -inf (the others weigh 0), its score and
          // dout_i . v_j; then the row's lse (the sink in its sum) and delta = sum_j p_j (dout_i . v_j) = dout_i .
          // out_i, recomputed rather than read from the forward's float32 lse and rounded out (whose rounding, in
          // dp - delta, would dominate the error of every gradient). The keys the window and mask show first, then
          // their products kBlock keys at a time.
          candidates.clear();
          for (int64_t j = window.begin; j < window.end; ++j) {
            const int64_t key = key_rows.row(j);
            if (p.mask.present() &&
                !p.mask.mask_allows(key_side_mask ? p.mask.offset(key, h, 0) : p.mask.offset(row, h, j))) {
              continue;
            }
            int64_t bias_element = 0;
            if (p.bias.present()) bias_element = key_side_bias ? p.bias.offset(key, h, 0) : p.bias.offset(row, h, j);
            candidates.push_back({key, j, bias_element});
          }
          double max = sink;
          const int64_t n = static_cast<int64_t>(candidates.size());
          for (int64_t c0 = 0; c0 < n; c0 += kBlock) {
            decltype(k_of(0, 0)) k_block[kBlock];
            decltype(v_of(0, 0)) v_block[kBlock];
            for (int c = 0; c < kBlock; ++c) {  // a short last block repeats its last key (its products unused)
              const Candidate& key = candidates[std::min(c0 + c, n - 1)];
              k_block[c] = k_of(key.row, key.pos);
              v_block[c] = v_of(key.row, key.pos);
            }
            double qk[kBlock], dp[kBlock];
            dot_block(q_row, k_block, D, qk);
            dot_block(do_row, v_block, D, dp);
            for (int c = 0; c < kBlock && c0 + c < n; ++c) {
              const Candidate& key = candidates[c0 + c];
              double s = scale * qk[c];
              double cap_slope = 1.0;
              if (softcap > 0.0) {
                const double t = std::tanh(s / softcap);
                s = softcap * t;
                cap_slope = 1.0 - t * t;
              }
              if (p.bias.present()) s += static_cast<const float*>(p.bias.ptr)[key.bias_element];
              if (s == kNegInf) continue;
              visited[r].push_back({key, s, dp[c], cap_slope, 0.0, 0.0});
              max = std::max(max, s);
            }
          }
          double sum = std::exp(sink - max), weighted_dp = 0.0;  // exactly 0 without a sink
          for (Visited& key : visited[r]) {
            key.p = std::exp(key.score - max);  // NaN for a NaN score: the sums, and so the row, turn NaN
            sum += key.p;
            weighted_dp += key.p * key.dp;
          }
          // A NaN row of the forward (a NaN or +inf score, a NaN or +inf sink) keeps NaN gradients.
          const double lse = std::isnan(lse_fwd) ? lse_fwd : max + std::log(sum);
          const double delta = weighted_dp / sum - (bp.dlse ? bp.dlse[h * p.total_q + row] : 0.f);
          // Each key's probability exp(score - lse) as its pass-1 weight over the sum (one exponential per key, where a
          // second one per key was a third of this function's time); NaN throughout for a NaN row. Pass 2 skips keys
          // of probability exactly 0: nothing flows through them.
          const double inv_sum = std::isnan(lse) ? lse : 1.0 / sum;
          for (Visited& key : visited[r]) {
            key.p *= inv_sum;
            key.ds = key.p * (key.dp - delta);  // d loss / d score: the bias's gradient, as the bias follows the cap
          }
          // The sink is one more score of the row, with dp = 0 (it adds no value): ds = p_sink (0 - delta). A -inf
          // sink weighs 0 in every row (skipped, so that a NaN row cannot make its gradient NaN).
          if (dsinks && sink != kNegInf) dsinks[h] -= std::exp(sink - lse) * delta;
        }
        // Pass 2, the block's rows together, key by key in position order (each row's list ascends): dv_j and dk_j take
        // every row's share in one pass over their D values (in row order, as one row at a time would add them), dq_i
        // each key's share in the row's own buffer, and the bias its ds.
        std::fill(dq_rows.begin(), dq_rows.end(), 0.0);
        size_t at[kRows] = {};
        for (;;) {
          int64_t pos = INT64_MAX;
          for (int r = 0; r < rows; ++r) {
            while (at[r] < visited[r].size() && visited[r][at[r]].p == 0.0) ++at[r];
            if (at[r] < visited[r].size()) pos = std::min(pos, visited[r][at[r]].pos);
          }
          if (pos == INT64_MAX) break;
          double dv_coef[kRows], dk_coef[kRows];
          const double* do_of[kRows];
          const double* q_of[kRows];
          double* dq_of[kRows];
          int sharing = 0;
          int64_t key_row = 0, key_pos = 0;
          for (int r = 0; r < rows; ++r) {
            if (at[r] >= visited[r].size() || visited[r][at[r]].pos != pos) continue;
            const Visited& key = visited[r][at[r]++];
            key_row = key.row;
            key_pos = key.pos;
            dv_coef[sharing] = key.p;
            do_of[sharing] = do_rows.data() + r * D;
            dk_coef[sharing] = scale * key.cap_slope * key.ds;
            q_of[sharing] = q_rows.data() + r * D;
            dq_of[sharing] = dq_rows.data() + r * D;
            ++sharing;
            if (bp.dbias) bp.dbias[key.bias_element] += key.ds;
          }
          double* dv_j = bp.dv + (key_row * p.num_heads_k + hk) * D;
          double* dk_j = bp.dk + (key_row * p.num_heads_k + hk) * D;
          const auto k_j = k_of(key_row, key_pos);
          with_count(sharing, [&](auto count) __attribute__((always_inline)) {
            axpy_rows<count()>(dv_coef, do_of, dv_j, D);
            axpy_rows<count()>(dk_coef, q_of, dk_j, D);
            axpy_into_rows<count()>(dk_coef, k_j, dq_of, D);
          });
        }
        for (int r = 0; r < rows; ++r) {
          double* dq_i = bp.dq + ((sq.start + i0 + r) * p.num_heads + h) * D;
          for (int64_t d = 0; d < D; ++d) dq_i[d] += dq_rows[r * D + d];
        }
      }
    };
    if (as_f64) {
      run_head([&](int64_t, int64_t pos) __attribute__((always_inline)) { return k64.data() + pos * D; },
               [&](int64_t, int64_t pos) __attribute__((always_inline)) { return v64.data() + pos * D; });
    } else {
      run_head([&](int64_t row, int64_t) __attribute__((always_inline)) { return k_head + row * p.k_row_stride; },
               [&](int64_t row, int64_t) __attribute__((always_inline)) { return v_head + row * p.v_row_stride; });
    }
  }
}

}  // namespace dmattn::cpu
