// varlen_fwd_cpu_kernel.cpp: see varlen_fwd_cpu_kernel.h for what one work item does.
#include "varlen_fwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "chunk_products.h"
#include "elements.h"
#include "vec8.h"

namespace dmattn::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

bool mask_at(const ScoreOperand& m, int64_t row, int32_t h, int64_t j) { return m.mask_allows(m.offset(row, h, j)); }

float bias_at(const ScoreOperand& b, int64_t row, int32_t h, int64_t j) {
  return load_scalar(b.ptr, b.offset(row, h, j), b.dtype);
}

// One online-softmax step of one row over one chunk. sr[0, cn) holds the row's scores (-inf where it may not
// attend) and becomes its weights exp(s - max); the row's running max and sum, and its running P . V (acc, D
// floats), move to the new max. sr must have room up to cn rounded up to 8. A NaN score, or a +inf one (through
// inf - inf), makes max or sum NaN, and so the row's out and lse.
__attribute__((always_inline)) inline void softmax_chunk(float* sr, int64_t cn, int64_t D, float& row_max,
                                                         float& row_sum, float* acc) {
  const int64_t c8 = (cn + 7) / 8 * 8;
  std::fill(sr + cn, sr + c8, kNegInf);  // padding lanes: weight 0
  v8f mv = splat8(row_max);
  for (int64_t c = 0; c < c8; c += 8) {
    const v8f x = load8(sr + c);
    mv = (x > mv) | (x != x) ? x : mv;
  }
  float m = row_max;
  for (int i = 0; i < 8; ++i) m = max_keep_nan(m, mv[i]);
  if (m == kNegInf) {  // nothing visible yet: weights 0
    std::fill(sr, sr + cn, 0.f);
    return;
  }
  if (m != row_max) {  // also when m is NaN
    const float rescale = std::exp(row_max - m);  // exp(-inf) = 0 on the first visible chunk
    row_sum *= rescale;
    for (int64_t d = 0; d < D; ++d) acc[d] *= rescale;
    row_max = m;
  }
  const v8f m8 = splat8(m);
  v8f sum = {};
  for (int64_t c = 0; c < c8; c += 8) {
    const v8f w = exp_nonpositive(load8(sr + c) - m8);
    store8(sr + c, w);
    sum += w;
  }
  for (int i = 0; i < 8; ++i) row_sum += sum[i];
}

// Normalizes one row's P . V by its softmax sum, with the sink logit joining the denominator, and stores out and
// lse. The sink joins here and only here, once per row (never per key split). A row with no visible key (max =
// -inf) gets out 0 and lse = sink (-inf without a sink), never NaN. A NaN max or sum (the row had a NaN or +inf
// score), or a NaN or +inf sink (through inf - inf), gives NaN out and lse. acc is overwritten.
void finish_row(const VarlenFwdParams& p, int32_t h, int64_t qrow, float row_max, float row_sum, float sink,
                float* acc) {
  const int64_t D = p.head_dim;
  const float m = max_keep_nan(row_max, sink);
  if (m == kNegInf) {
    std::fill(acc, acc + D, 0.f);
    p.lse[h * p.total_q + qrow] = kNegInf;
  } else {
    // The keys' sum and P . V move from row_max to m. Without a sink (-inf) m = row_max, keys_scale = 1 and the sink
    // adds exactly 0: the same rounding as a plain softmax.
    const float keys_scale = row_max == kNegInf ? 0.f : std::exp(row_max - m);
    const float sum = row_sum * keys_scale + std::exp(sink - m);
    const float inv = keys_scale / sum;
    for (int64_t d = 0; d < D; ++d) acc[d] *= inv;
    p.lse[h * p.total_q + qrow] = m + std::log(sum);
  }
  store_row(acc, D, p.dtype, p.out, qrow * p.out_row_stride + h * p.out_head_stride);
}

}  // namespace

WorkPlan plan_work(const VarlenFwdParams& p, int64_t num_threads) {
  const int32_t group = p.num_heads / p.num_heads_k;
  WorkPlan plan;
  for (int32_t b = 0; b < p.batch; ++b) {
    const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
    const int64_t lq = sq.len;
    if (lq == 0) continue;
    const int64_t lk = key_seq(p, b).len;
    const int64_t q_block = std::min(kQueryBlock, lq);
    const int32_t head_block = static_cast<int32_t>(std::clamp<int64_t>(kMaxRows / q_block, 1, group));
    for (int32_t hk = 0; hk < p.num_heads_k; ++hk) {
      for (int32_t g = 0; g < group; g += head_block) {
        for (int64_t q0 = 0; q0 < lq; q0 += q_block) {
          const int64_t q1 = std::min(lq, q0 + q_block);
          // The block's keys in reach: the span of its queries' non-empty key ranges.
          int64_t first = lk, last = 0;
          for (int64_t i = q0; i < q1; ++i) {
            const KeyRange r = row_keys(p, sq.start + i, i, lq, lk);
            if (r.end > r.begin) {
              first = std::min(first, r.begin);
              last = std::max(last, r.end);
            }
          }
          if (last <= first) first = last = 0;
          plan.items.push_back({b, hk * group + g, hk * group + std::min(group, g + head_block), q0, q1, first, last,
                                -1});
        }
      }
    }
  }
  // Too few blocks for the threads: split key ranges, aiming at about two items per thread.
  const int64_t n_blocks = static_cast<int64_t>(plan.items.size());
  if (n_blocks > 0 && n_blocks < num_threads) {
    const int64_t want = (2 * num_threads + n_blocks - 1) / n_blocks;
    std::vector<WorkItem> items;
    for (const WorkItem& w : plan.items) {
      const int64_t keys = w.key_end - w.key_begin;
      const int64_t splits = std::min(want, keys / kMinKeysPerSplit);
      if (splits <= 1) {
        items.push_back(w);
        continue;
      }
      const int64_t row_floats = (w.q_end - w.q_begin) * (w.head_end - w.head_begin) * (p.head_dim + 2);
      plan.combines.push_back({w, plan.partial_floats, splits});
      for (int64_t s = 0; s < splits; ++s) {
        WorkItem part = w;
        part.key_begin = w.key_begin + keys * s / splits;
        part.key_end = w.key_begin + keys * (s + 1) / splits;
        part.partial = plan.partial_floats + s * row_floats;
        items.push_back(part);
      }
      plan.partial_floats += splits * row_floats;
    }
    plan.items = std::move(items);
  }
  // Largest first (rows x keys in reach), so that dynamic hand-out balances the threads.
  auto cost = [](const WorkItem& w) {
    return (w.q_end - w.q_begin) * (w.head_end - w.head_begin) * (w.key_end - w.key_begin + 1);
  };
  std::stable_sort(plan.items.begin(), plan.items.end(),
                   [&](const WorkItem& a, const WorkItem& b) { return cost(a) > cost(b); });
  return plan;
}

void write_empty_rows(const VarlenFwdParams& p, int32_t h, int64_t row_begin, int64_t row_end) {
  std::vector<float> acc(p.head_dim);
  // Not rows of any sequence, so no sink joins them.
  for (int64_t row = row_begin; row < row_end; ++row) finish_row(p, h, row, kNegInf, 0.f, kNegInf, acc.data());
}

// Compiled twice (AVX2+FMA and the baseline ISA) and picked at load time, so one binary is fast on current x86
// CPUs and still runs on older ones; the small helpers above are inlined into each version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void run_block(const VarlenFwdParams& p, const WorkItem& item, Scratch& s, float* partials) {
  const int64_t D = p.head_dim;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, item.batch, p.total_q, p.max_seqlen_q);
  const SeqRange sk = key_seq(p, item.batch);
  const KeyRows key_rows = key_rows_of(p, sk);  // key j: row key_rows.row(j) of k, v and key-side operands
  const int64_t nq = item.q_end - item.q_begin;
  const int64_t rows = nq * (item.head_end - item.head_begin);  // row r = (head item.head_begin + r / nq, query r % nq)
  const int32_t hk = item.head_begin / (p.num_heads / p.num_heads_k);
  const bool key_mask = p.mask.layout == OperandLayout::kKeySide;
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;
  // With Hm in {1, Hk} every head of the item reads the same key-side mask (and bias) column.
  const bool shared_key_mask =
      key_mask && item.head_begin / p.mask.head_group == (item.head_end - 1) / p.mask.head_group;
  const bool shared_key_bias = p.bias.layout == OperandLayout::kKeySide &&
                               item.head_begin / p.bias.head_group == (item.head_end - 1) / p.bias.head_group;
  // Row-by-row work that a shared key-side mask and bias do not cover: per-head masks or biases, query-side ones.
  const bool per_row_checks =
      (key_mask && !shared_key_mask) || query_mask || (p.bias.present() && !shared_key_bias);
  auto head_of = [&](int64_t r) { return static_cast<int32_t>(item.head_begin + r / nq); };
  auto query_row = [&](int64_t r) { return sq.start + item.q_begin + r % nq; };

  // Keys [window_begin[qi], window_end[qi]) are in reach of query qi of the block (its window; empty: begin = end);
  // the item reaches [reach_begin, reach_end), the span of its non-empty windows.
  int64_t window_begin[kQueryBlock], window_end[kQueryBlock];
  int64_t reach_begin = sk.len, reach_end = 0;
  for (int64_t qi = 0; qi < nq; ++qi) {
    const KeyRange window = row_keys(p, sq.start + item.q_begin + qi, item.q_begin + qi, sq.len, sk.len);
    window_begin[qi] = window.begin;
    window_end[qi] = std::max(window.begin, window.end);
    if (window.end > window.begin) {
      reach_begin = std::min(reach_begin, window.begin);
      reach_end = std::max(reach_end, window.end);
    }
  }
  auto in_window = [&](int64_t r, int64_t j) { return j >= window_begin[r % nq] && j < window_end[r % nq]; };
  // Whether row r may attend key j, apart from the shared key-side mask already applied to the candidates.
  auto attends = [&](int64_t r, int64_t j) {
    if (!in_window(r, j)) return false;
    if (key_mask && !shared_key_mask && !mask_at(p.mask, key_rows.row(j), head_of(r), 0)) return false;
    return !query_mask || mask_at(p.mask, query_row(r), head_of(r), j);
  };

  // 1. Candidate keys: visible to at least one row. All other keys cost nothing.
  s.keys.clear();
  const int64_t key_begin = std::max(reach_begin, item.key_begin);
  const int64_t key_end = std::min(reach_end, item.key_end);
  // A query-side mask read row by row: each distinct (query, mask head) row of the item ORs its visible mask
  // bytes into `seen`, one sequential pass over the row, instead of asking every row about every key (which cost
  // rows x keys scattered reads: a 256-key window over 2048 keys ran at 1.3x causal instead of 4x).
  const bool query_rows_first = query_mask && !key_mask && key_end > key_begin;
  if (query_rows_first) {
    s.seen.assign(key_end - key_begin, 0);
    for (int64_t r = 0; r < rows; ++r) {
      const int32_t h = head_of(r);
      if (r >= nq && h / p.mask.head_group == (h - 1) / p.mask.head_group) continue;  // the previous head's row
      const int64_t start = p.mask.row_start(query_row(r), h);
      const int64_t begin = std::max(window_begin[r % nq], key_begin);
      const int64_t end = std::min(window_end[r % nq], key_end);
      const uint8_t* bytes = static_cast<const uint8_t*>(p.mask.ptr);
      for (int64_t j = begin; j < end; ++j) s.seen[j - key_begin] |= bytes[p.mask.column(start, j)];
    }
  }
  for (int64_t j = key_begin; j < key_end; ++j) {
    if (query_rows_first) {
      if (s.seen[j - key_begin]) s.keys.push_back(j);
      continue;
    }
    if (shared_key_mask && !mask_at(p.mask, key_rows.row(j), item.head_begin, 0)) continue;
    if (!shared_key_mask && (key_mask || query_mask)) {
      bool any = false;
      for (int64_t r = 0; r < rows && !any; ++r) any = attends(r, j);
      if (!any) continue;
    }
    s.keys.push_back(j);
  }
  const int64_t n = static_cast<int64_t>(s.keys.size());

  s.q.resize(rows * D);
  s.kt.resize(D * kKeyChunk);
  s.krow.resize(kKeyChunk);
  s.vrow.resize(kKeyChunk);
  s.key_bias.resize(kKeyChunk);
  s.scores.resize(rows * kKeyChunk);
  s.acc.assign(rows * D, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = query_row(r) * p.q_row_stride + head_of(r) * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d) s.q[r * D + d] = load_scalar(p.q, offset + d, p.dtype) * p.softmax_scale;
  }
  float row_max[kMaxRows], row_sum[kMaxRows];
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.f);

  // 2. Online softmax over chunks of candidates. Per chunk: K rows gathered once (transposed) for every row of
  //    the item, scores, running max / sum, then the V rows gathered once for the P . V update.
  for (int64_t c0 = 0; c0 < n; c0 += kKeyChunk) {
    const int64_t cn = std::min(kKeyChunk, n - c0);
    const int64_t cn_pad = (cn + 15) / 16 * 16;
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t key_row = key_rows.row(s.keys[c0 + c]);
      // The next chunk's K and V rows asked for while this one computes: its reads are then L2 hits, gathered rows
      // or not (the hardware prefetcher follows neither a head's rows in the packed layout, a head's width apart,
      // nor the kept keys of a mask).
      if (c0 + kKeyChunk + c < n) {
        const int64_t ahead = key_rows.row(s.keys[c0 + kKeyChunk + c]);
        prefetch_row(p.k, ahead * p.k_row_stride + hk * p.k_head_stride, D, p.dtype);
        prefetch_row(p.v, ahead * p.v_row_stride + hk * p.v_head_stride, D, p.dtype);
      }
      s.krow[c] = key_row * p.k_row_stride + hk * p.k_head_stride;
      s.vrow[c] = key_row * p.v_row_stride + hk * p.v_head_stride;
    }
    with_dtype(p.dtype, [&](auto dtype) __attribute__((always_inline)) {
      transpose_keys<decltype(dtype)::value>(p.k, s.krow.data(), cn, cn_pad, D, s.kt.data());
    });
    qk_chunk(s.q.data(), rows, D, s.kt.data(), cn_pad, s.scores.data());
    if (shared_key_bias) {
      for (int64_t c = 0; c < cn; ++c) {
        s.key_bias[c] = bias_at(p.bias, key_rows.row(s.keys[c0 + c]), item.head_begin, 0);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {  // softcap, bias, and -inf where a row may not attend
      float* sr = s.scores.data() + r * kKeyChunk;
      const int64_t* keys = s.keys.data() + c0;
      const int64_t lo = window_begin[r % nq], hi = window_end[r % nq];
      if (p.softcap > 0.f) {  // on the scaled q . k (q is pre-scaled), before the bias
        softcap_scores(sr, cn, p.softcap);
      }
      if (shared_key_bias) {
        for (int64_t c = 0; c < cn; ++c) sr[c] = keys[c] >= lo && keys[c] < hi ? sr[c] + s.key_bias[c] : kNegInf;
      } else {
        for (int64_t c = 0; c < cn; ++c) sr[c] = keys[c] >= lo && keys[c] < hi ? sr[c] : kNegInf;
      }
      if (!per_row_checks) continue;
      const int32_t h = head_of(r);
      const int64_t qrow = query_row(r);
      // This row's start in a query-side mask / bias (ScoreOperand::row_start), once; then a column per key.
      const int64_t mask_start = query_mask ? p.mask.row_start(qrow, h) : 0;
      const bool key_side_bias = p.bias.layout == OperandLayout::kKeySide;
      const int64_t bias_start = p.bias.present() && !key_side_bias ? p.bias.row_start(qrow, h) : 0;
      for (int64_t c = 0; c < cn; ++c) {
        const int64_t j = keys[c];
        if (j < lo || j >= hi) continue;  // already -inf
        const bool keep = (!key_mask || shared_key_mask || mask_at(p.mask, key_rows.row(j), h, 0)) &&
                          (!query_mask || p.mask.mask_allows(p.mask.column(mask_start, j)));
        if (!keep) {
          sr[c] = kNegInf;
        } else if (p.bias.present() && !shared_key_bias) {
          sr[c] += key_side_bias ? bias_at(p.bias, key_rows.row(j), h, 0)
                                 : load_scalar(p.bias.ptr, p.bias.column(bias_start, j), p.bias.dtype);
        }
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      softmax_chunk(s.scores.data() + r * kKeyChunk, cn, D, row_max[r], row_sum[r], s.acc.data() + r * D);
    }
    with_dtype(p.dtype, [&](auto dtype) __attribute__((always_inline)) {
      pv_chunk<decltype(dtype)::value>(s.scores.data(), rows, D, p.v, s.vrow.data(), cn, s.acc.data());
    });
  }

  // 3. Normalize (the sink joins here) and store, or hand the unnormalized result of a key split, without the
  //    sink, to combine_splits.
  for (int64_t r = 0; r < rows; ++r) {
    float* ar = s.acc.data() + r * D;
    if (item.partial >= 0) {
      float* slot = partials + item.partial + r * (D + 2);
      slot[0] = row_max[r];
      slot[1] = row_sum[r];
      std::copy(ar, ar + D, slot + 2);
    } else {
      finish_row(p, head_of(r), query_row(r), row_max[r], row_sum[r], p.sink(head_of(r)), ar);
    }
  }
}

void combine_splits(const VarlenFwdParams& p, const SplitCombine& c, const float* partials) {
  const int64_t D = p.head_dim;
  const WorkItem& w = c.rows;
  const int64_t nq = w.q_end - w.q_begin;
  const int64_t rows = nq * (w.head_end - w.head_begin);
  const int64_t q_start = clamp_seq(p.cu_seqlens_q, w.batch, p.total_q, p.max_seqlen_q).start + w.q_begin;
  std::vector<float> acc(D);
  for (int64_t r = 0; r < rows; ++r) {
    auto split = [&](int64_t s) { return partials + c.first_partial + s * rows * (D + 2) + r * (D + 2); };
    float m = kNegInf;  // NaN when a split's max is NaN: the row is NaN
    for (int64_t s = 0; s < c.num_splits; ++s) m = max_keep_nan(m, split(s)[0]);
    float l = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    if (m != kNegInf) {
      for (int64_t s = 0; s < c.num_splits; ++s) {
        const float* part = split(s);
        if (part[0] == kNegInf) continue;  // this split saw no key of the row
        const float scale = std::exp(part[0] - m);
        l += part[1] * scale;
        for (int64_t d = 0; d < D; ++d) acc[d] += part[2 + d] * scale;
      }
    }
    const int32_t h = static_cast<int32_t>(w.head_begin + r / nq);
    finish_row(p, h, q_start + r % nq, m, l, p.sink(h), acc.data());
  }
}

}  // namespace dmattn::cpu
