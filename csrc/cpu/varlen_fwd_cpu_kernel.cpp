// varlen_fwd_cpu_kernel.cpp: see varlen_fwd_cpu_kernel.h for what one work item does.
#include "varlen_fwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dmattn::cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }

float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));  // inf, nan
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return bits_to_float(sign);
  uint32_t e = 113;  // subnormal: shift the leading 1 up to the implicit bit
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return bits_to_float(sign | (e << 23) | ((mant & 0x3ffu) << 13));
}

// Round to nearest even, as torch does.
uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // inf, nan
  if (x >= 0x477ff000u) return sign | 0x7c00u;                                    // rounds past 65504
  if (x < 0x38800000u) {                                                            // half subnormal or zero
    if (x < 0x33000000u) return sign;
    const uint32_t shift = 126u - (x >> 23);
    const uint32_t mant = (x & 0x7fffffu) | 0x800000u;
    uint32_t h = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return sign | static_cast<uint16_t>(h);
  }
  return sign | static_cast<uint16_t>(((x + 0xfffu + ((x >> 13) & 1u)) >> 13) - 0x1c000u);
}

// Float32 view of element i of a q/k/v/bias buffer of the given storage type.
inline float load_scalar(const void* base, int64_t i, ScalarType dtype) {
  switch (dtype) {
    case ScalarType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case ScalarType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

// A row of n elements as float32: float32 rows are used in place, others are converted into buf.
inline const float* row_as_float(const void* base, int64_t offset, int64_t n, ScalarType dtype, float* buf) {
  if (dtype == ScalarType::kFloat32) return static_cast<const float*>(base) + offset;
  for (int64_t i = 0; i < n; ++i) buf[i] = load_scalar(base, offset + i, dtype);
  return buf;
}

void store_row(const float* src, int64_t n, ScalarType dtype, void* base, int64_t offset) {
  switch (dtype) {
    case ScalarType::kFloat32:
      std::memcpy(static_cast<float*>(base) + offset, src, n * sizeof(float));
      return;
    case ScalarType::kFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
      return;
    }
    case ScalarType::kBFloat16: {
      uint16_t* dst = static_cast<uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = float_to_bf16(src[i]);
      return;
    }
  }
}

// Where element (row, query head h, key position j) of a mask or bias lives, in elements.
int64_t operand_offset(const ScoreOperand& op, int64_t row, int32_t h, int64_t j) {
  return row * op.row_stride + static_cast<int64_t>(h / op.head_group) * op.head_stride + j * op.col_stride;
}

bool mask_at(const ScoreOperand& m, int64_t row, int32_t h, int64_t j) {
  return static_cast<const bool*>(m.ptr)[operand_offset(m, row, h, j)];
}

float bias_at(const ScoreOperand& b, int64_t row, int32_t h, int64_t j) {
  return load_scalar(b.ptr, operand_offset(b, row, h, j), b.dtype);
}

// Eight independent partial sums let the compiler vectorize without reassociating on its own.
__attribute__((always_inline)) inline float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[i + l] * b[i + l];
  }
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

__attribute__((always_inline)) inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

std::vector<WorkItem> plan_work(const VarlenFwdParams& p) {
  const int32_t group = p.num_heads / p.num_heads_k;
  std::vector<WorkItem> items;
  for (int32_t b = 0; b < p.batch; ++b) {
    const int64_t lq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q).len;
    if (lq == 0) continue;
    const int64_t q_block = std::min(kQueryBlock, lq);
    const int32_t head_block = static_cast<int32_t>(std::clamp<int64_t>(kMaxRows / q_block, 1, group));
    for (int32_t hk = 0; hk < p.num_heads_k; ++hk) {
      for (int32_t g = 0; g < group; g += head_block) {
        for (int64_t q0 = 0; q0 < lq; q0 += q_block) {
          items.push_back({b, hk * group + g, hk * group + std::min(group, g + head_block), q0,
                           std::min(lq, q0 + q_block)});
        }
      }
    }
  }
  return items;
}

void write_empty_rows(const VarlenFwdParams& p, int32_t h, int64_t row_begin, int64_t row_end) {
  std::vector<float> zeros(p.head_dim, 0.f);
  for (int64_t row = row_begin; row < row_end; ++row) {
    store_row(zeros.data(), p.head_dim, p.dtype, p.out, row * p.out_row_stride + h * p.out_head_stride);
    p.lse[h * p.total_q + row] = kNegInf;
  }
}

// Compiled twice (AVX2+FMA and the baseline ISA) and picked at load time, so one binary is fast on current x86
// CPUs and still runs on older ones; the small helpers above are inlined into each version.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v3", "default")))
#endif
void run_block(const VarlenFwdParams& p, const WorkItem& item, Scratch& s) {
  const int64_t D = p.head_dim;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, item.batch, p.total_q, p.max_seqlen_q);
  const SeqRange sk = clamp_seq(p.cu_seqlens_k, item.batch, p.total_k, p.max_seqlen_k);
  const int64_t nq = item.q_end - item.q_begin;
  const int64_t rows = nq * (item.head_end - item.head_begin);  // row r = (head item.head_begin + r / nq, query r % nq)
  const int32_t hk = item.head_begin / (p.num_heads / p.num_heads_k);
  const bool key_mask = p.mask.layout == OperandLayout::kKeySide;
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;
  // With Hm in {1, Hk} every head of the item reads the same key-side mask column.
  const bool shared_key_mask =
      key_mask && item.head_begin / p.mask.head_group == (item.head_end - 1) / p.mask.head_group;
  auto head_of = [&](int64_t r) { return static_cast<int32_t>(item.head_begin + r / nq); };
  auto query_row = [&](int64_t r) { return sq.start + item.q_begin + r % nq; };

  // Keys [0, visible[qi]) are in reach of query qi of the block (causal limit); the item reaches max_visible.
  int64_t visible[kQueryBlock];
  int64_t max_visible = 0;
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t limit = p.is_causal ? causal_visible_keys(item.q_begin + qi, sq.len, sk.len) : sk.len;
    visible[qi] = std::clamp<int64_t>(limit, 0, sk.len);
    max_visible = std::max(max_visible, visible[qi]);
  }
  // Whether row r may attend key j, apart from the shared key-side mask already applied to the candidates.
  auto attends = [&](int64_t r, int64_t j) {
    if (j >= visible[r % nq]) return false;
    if (key_mask && !shared_key_mask && !mask_at(p.mask, sk.start + j, head_of(r), 0)) return false;
    return !query_mask || mask_at(p.mask, query_row(r), head_of(r), j);
  };

  // 1. Candidate keys: visible to at least one row. All other keys cost nothing.
  s.keys.clear();
  for (int64_t j = 0; j < max_visible; ++j) {
    if (shared_key_mask && !mask_at(p.mask, sk.start + j, item.head_begin, 0)) continue;
    if (!shared_key_mask && (key_mask || query_mask)) {
      bool any = false;
      for (int64_t r = 0; r < rows && !any; ++r) any = attends(r, j);
      if (!any) continue;
    }
    s.keys.push_back(j);
  }
  const int64_t n = static_cast<int64_t>(s.keys.size());

  s.q.resize(rows * D);
  s.row.resize(D);
  s.scores.resize(rows * kKeyChunk);
  s.acc.assign(rows * D, 0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t offset = query_row(r) * p.q_row_stride + head_of(r) * p.q_head_stride;
    for (int64_t d = 0; d < D; ++d) s.q[r * D + d] = load_scalar(p.q, offset + d, p.dtype) * p.softmax_scale;
  }
  float row_max[kMaxRows], row_sum[kMaxRows];
  std::fill(row_max, row_max + rows, kNegInf);
  std::fill(row_sum, row_sum + rows, 0.f);

  // 2. Online softmax over chunks of candidates: one K row read serves every row of the item, then one V row.
  for (int64_t c0 = 0; c0 < n; c0 += kKeyChunk) {
    const int64_t cn = std::min(kKeyChunk, n - c0);
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t j = s.keys[c0 + c];
      const float* key =
          row_as_float(p.k, (sk.start + j) * p.k_row_stride + hk * p.k_head_stride, D, p.dtype, s.row.data());
      for (int64_t r = 0; r < rows; ++r) {
        float score = kNegInf;
        if (attends(r, j)) {
          score = dot(s.q.data() + r * D, key, D);
          if (p.bias.present()) {
            const bool key_side = p.bias.layout == OperandLayout::kKeySide;
            score += bias_at(p.bias, key_side ? sk.start + j : query_row(r), head_of(r), key_side ? 0 : j);
          }
        }
        s.scores[r * kKeyChunk + c] = score;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* sr = s.scores.data() + r * kKeyChunk;
      float m = row_max[r];
      for (int64_t c = 0; c < cn; ++c) m = std::max(m, sr[c]);
      if (m == kNegInf) continue;  // nothing visible yet: the weights below stay 0
      if (m != row_max[r]) {
        const float rescale = std::exp(row_max[r] - m);  // exp(-inf) = 0 on the first visible chunk
        row_sum[r] *= rescale;
        for (int64_t d = 0; d < D; ++d) s.acc[r * D + d] *= rescale;
        row_max[r] = m;
      }
      float l = 0.f;
      for (int64_t c = 0; c < cn; ++c) {
        sr[c] = std::exp(sr[c] - m);
        l += sr[c];
      }
      row_sum[r] += l;
    }
    s.chunk.assign(rows * D, 0.f);
    for (int64_t c = 0; c < cn; ++c) {
      const float* value = row_as_float(p.v, (sk.start + s.keys[c0 + c]) * p.v_row_stride + hk * p.v_head_stride,
                                        D, p.dtype, s.row.data());
      for (int64_t r = 0; r < rows; ++r) {
        const float weight = row_max[r] == kNegInf ? 0.f : s.scores[r * kKeyChunk + c];
        if (weight != 0.f) axpy(weight, value, s.chunk.data() + r * D, D);
      }
    }
    for (int64_t i = 0; i < rows * D; ++i) s.acc[i] += s.chunk[i];
  }

  // 3. Normalize and store. A row with no visible key gets 0 and lse -inf (never NaN).
  for (int64_t r = 0; r < rows; ++r) {
    float* ar = s.acc.data() + r * D;
    const int32_t h = head_of(r);
    if (row_max[r] == kNegInf) {
      std::fill(ar, ar + D, 0.f);
      p.lse[h * p.total_q + query_row(r)] = kNegInf;
    } else {
      const float inv = 1.f / row_sum[r];
      for (int64_t d = 0; d < D; ++d) ar[d] *= inv;
      p.lse[h * p.total_q + query_row(r)] = row_max[r] + std::log(row_sum[r]);
    }
    store_row(ar, D, p.dtype, p.out, query_row(r) * p.out_row_stride + h * p.out_head_stride);
  }
}

}  // namespace dmattn::cpu
