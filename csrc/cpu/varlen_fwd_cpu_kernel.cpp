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

void load_row(const void* base, int64_t offset, int64_t n, ScalarType dtype, float* dst) {
  switch (dtype) {
    case ScalarType::kFloat32:
      std::memcpy(dst, static_cast<const float*>(base) + offset, n * sizeof(float));
      return;
    case ScalarType::kFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = half_to_float(src[i]);
      return;
    }
    case ScalarType::kBFloat16: {
      const uint16_t* src = static_cast<const uint16_t*>(base) + offset;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
      return;
    }
  }
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
  float f;
  load_row(b.ptr, operand_offset(b, row, h, j), 1, b.dtype, &f);
  return f;
}

// Eight independent partial sums let the compiler vectorize without reassociating on its own.
float dot(const float* a, const float* b, int64_t n) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) part[l] += a[i + l] * b[i + l];
  }
  float sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

void write_empty_rows(const VarlenFwdParams& p, int32_t h, int64_t row_begin, int64_t row_end) {
  std::vector<float> zeros(p.head_dim, 0.f);
  for (int64_t row = row_begin; row < row_end; ++row) {
    store_row(zeros.data(), p.head_dim, p.dtype, p.out, row * p.out_row_stride + h * p.out_head_stride);
    p.lse[h * p.total_q + row] = kNegInf;
  }
}

void run_block(const VarlenFwdParams& p, int32_t b, int32_t h, int64_t q_begin, int64_t q_end, Scratch& s) {
  const int64_t D = p.head_dim;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const SeqRange sk = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  const int64_t nq = q_end - q_begin;
  const int32_t hk = h / (p.num_heads / p.num_heads_k);
  const bool key_mask = p.mask.layout == OperandLayout::kKeySide;
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;

  // Keys [0, visible[r]) are in reach of query r of the block (causal limit); the block reaches max_visible.
  int64_t visible[kQueryBlock];
  int64_t max_visible = 0;
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t limit = p.is_causal ? causal_visible_keys(q_begin + r, sq.len, sk.len) : sk.len;
    visible[r] = std::clamp<int64_t>(limit, 0, sk.len);
    max_visible = std::max(max_visible, visible[r]);
  }

  // 1. Candidate keys.
  s.keys.clear();
  for (int64_t j = 0; j < max_visible; ++j) {
    if (key_mask && !mask_at(p.mask, sk.start + j, h, 0)) continue;
    if (query_mask) {
      bool any = false;
      for (int64_t r = 0; r < nq && !any; ++r) any = j < visible[r] && mask_at(p.mask, sq.start + q_begin + r, h, j);
      if (!any) continue;
    }
    s.keys.push_back(j);
  }
  const int64_t n = static_cast<int64_t>(s.keys.size());

  // 2. Scaled scores of the block against the candidates.
  s.q.resize(nq * D);
  s.row.resize(D);
  s.scores.resize(nq * n);
  s.acc.assign(nq * D, 0.f);
  for (int64_t r = 0; r < nq; ++r) {
    float* qr = s.q.data() + r * D;
    load_row(p.q, (sq.start + q_begin + r) * p.q_row_stride + h * p.q_head_stride, D, p.dtype, qr);
    for (int64_t d = 0; d < D; ++d) qr[d] *= p.softmax_scale;
  }
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = s.keys[c];
    load_row(p.k, (sk.start + j) * p.k_row_stride + hk * p.k_head_stride, D, p.dtype, s.row.data());
    const float key_bias = p.bias.layout == OperandLayout::kKeySide ? bias_at(p.bias, sk.start + j, h, 0) : 0.f;
    for (int64_t r = 0; r < nq; ++r) {
      float score = kNegInf;
      const int64_t qrow = sq.start + q_begin + r;
      if (j < visible[r] && (!query_mask || mask_at(p.mask, qrow, h, j))) {
        score = dot(s.q.data() + r * D, s.row.data(), D) + key_bias;
        if (p.bias.layout == OperandLayout::kQuerySide) score += bias_at(p.bias, qrow, h, j);
      }
      s.scores[r * n + c] = score;
    }
  }

  // 3. Softmax per query, then the V accumulation (one V row read serves the block).
  float row_max[kQueryBlock], row_sum[kQueryBlock];
  for (int64_t r = 0; r < nq; ++r) {
    float* sr = s.scores.data() + r * n;
    float m = kNegInf;
    for (int64_t c = 0; c < n; ++c) m = std::max(m, sr[c]);
    float l = 0.f;
    if (m != kNegInf) {
      for (int64_t c = 0; c < n; ++c) {
        sr[c] = std::exp(sr[c] - m);
        l += sr[c];
      }
    }
    row_max[r] = m;
    row_sum[r] = l;
  }
  for (int64_t c = 0; c < n; ++c) {
    bool used = false;
    for (int64_t r = 0; r < nq && !used; ++r) used = row_max[r] != kNegInf && s.scores[r * n + c] != 0.f;
    if (!used) continue;
    load_row(p.v, (sk.start + s.keys[c]) * p.v_row_stride + hk * p.v_head_stride, D, p.dtype, s.row.data());
    for (int64_t r = 0; r < nq; ++r) {
      const float weight = s.scores[r * n + c];
      if (row_max[r] != kNegInf && weight != 0.f) axpy(weight, s.row.data(), s.acc.data() + r * D, D);
    }
  }
  for (int64_t r = 0; r < nq; ++r) {
    const int64_t qrow = sq.start + q_begin + r;
    float* ar = s.acc.data() + r * D;
    if (row_max[r] == kNegInf) {  // no visible key: output 0, lse -inf (never NaN)
      std::fill(ar, ar + D, 0.f);
      p.lse[h * p.total_q + qrow] = kNegInf;
    } else {
      const float inv = 1.f / row_sum[r];
      for (int64_t d = 0; d < D; ++d) ar[d] *= inv;
      p.lse[h * p.total_q + qrow] = row_max[r] + std::log(row_sum[r]);
    }
    store_row(ar, D, p.dtype, p.out, qrow * p.out_row_stride + h * p.out_head_stride);
  }
}

}  // namespace dmattn::cpu
