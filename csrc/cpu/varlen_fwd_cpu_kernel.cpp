// varlen_fwd_cpu_kernel.cpp: see varlen_fwd_cpu_kernel.h for what one work item does.
#include "varlen_fwd_cpu_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>

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

// Round to nearest even, as torch does.
uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40u);  // quiet nan
  return static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

#if defined(__FLT16_MAX__)
// The compiler's _Float16: F16C instructions (vectorizable) in the x86-64-v3 clone, an exact library routine in the
// baseline one.
inline float half_to_float(uint16_t h) {
  _Float16 f;
  std::memcpy(&f, &h, sizeof(f));
  return static_cast<float>(f);
}

inline uint16_t float_to_half(float f) {  // round to nearest even; NaN stays NaN
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}
#else
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
#endif  // __FLT16_MAX__

// Float32 view of element i of a q/k/v/bias buffer of the given storage type.
inline float load_scalar(const void* base, int64_t i, ScalarType dtype) {
  switch (dtype) {
    case ScalarType::kFloat16: return half_to_float(static_cast<const uint16_t*>(base)[i]);
    case ScalarType::kBFloat16: return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
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

bool mask_at(const ScoreOperand& m, int64_t row, int32_t h, int64_t j) { return m.mask_allows(m.offset(row, h, j)); }

float bias_at(const ScoreOperand& b, int64_t row, int32_t h, int64_t j) {
  return load_scalar(b.ptr, b.offset(row, h, j), b.dtype);
}

// Asks for the cache lines of one K or V row, into L2 (the next chunk's rows: an L1 of 32-48 KB would lose them to
// the current chunk's work).
__attribute__((always_inline)) inline void prefetch_row(const void* base, int64_t offset, int64_t n, ScalarType dtype) {
  const int64_t bytes = dtype == ScalarType::kFloat32 ? 4 : 2;
  const char* row = static_cast<const char*>(base) + offset * bytes;
  for (int64_t b = 0; b < n * bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
}

// Eight floats, as GCC/Clang vector extensions: AVX in the x86-64-v3 clone of run_block, two SSE halves in the
// baseline one. Unaligned loads and stores go through memcpy. The helpers below are always inlined, so no v8f ever
// crosses a call boundary and GCC's note about the AVX calling convention (-Wpsabi) does not apply.
using v8f = float __attribute__((vector_size(32)));
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void add_store8(float* p, v8f v) {
  v8f old;
  std::memcpy(&old, p, sizeof(old));
  old += v;
  std::memcpy(p, &old, sizeof(old));
}

__attribute__((always_inline)) inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

__attribute__((always_inline)) inline v8f splat8(float x) { return v8f{} + x; }

using v8i = int32_t __attribute__((vector_size(32)));
using v8u = uint32_t __attribute__((vector_size(32)));
using v8h = uint16_t __attribute__((vector_size(16)));

// 2^n for integer n in [-126, 127] (a normal float32), built from its exponent bits.
__attribute__((always_inline)) inline v8f pow2(v8i n) { return (v8f)(((v8u)n + 127u) << 23); }

// exp(x) for eight x <= 0 (scores minus their running max), branch-free. libm's expf is a scalar call; this runs
// on whole vectors. Range reduction x = n ln2 + r (n rounded to nearest by the 1.5 * 2^23 trick, ln2 split in two
// parts), then a degree-6 polynomial for e^r on |r| <= ln2 / 2 (the classic Cephes single-precision coefficients):
// about 1 ulp. 2^n is applied as 2^n1 * 2^n2 with n1, n2 >= -75, both normal, so results in float32's subnormal
// range come out right (one rounding, at the last product) instead of being cut off. Below -104, exp(x) < 2^-150
// rounds to 0 and the lane is set to exactly 0 (it computes exp(0) meanwhile: an underflowing product would cost a
// microcode assist on every masked key). So exp(-inf) = 0 (a key a row may not attend gets weight 0); NaN stays NaN.
__attribute__((always_inline)) inline v8f exp_nonpositive(v8f x) {
  const v8i zero = x < splat8(-104.f);  // false for NaN
  x = zero ? splat8(0.f) : x;
  constexpr float kRound = 12582912.f;  // 1.5 * 2^23: y + kRound holds round(y) in its low mantissa bits
  const v8f t = x * 1.44269504088896341f + kRound;
  const v8f n = t - kRound;
  const v8f r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v8f poly = splat8(1.9875691500e-4f);
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const v8f er = poly * r * r + r + 1.0f;
  const v8i ni = (v8i)((v8u)t - float_to_bits(kRound));  // n in [-150, 0] (any value for NaN: er is NaN then)
  const v8i n1 = ni >> 1;
  return zero ? splat8(0.f) : er * pow2(n1) * pow2(ni - n1);
}

// tanh(x) for eight x, branch-free: below |x| = 0.625 an odd polynomial x + x^3 P(x^2) (Cephes' single-precision
// tanhf coefficients, about 1 ulp there), above it (1 - e) / (1 + e) with e = exp(-2 |x|) <= 0.29, so no
// cancellation; the sign restored last. tanh(+-inf) = +-1, NaN stays NaN.
__attribute__((always_inline)) inline v8f tanh8(v8f x) {
  const v8i negative = x < splat8(0.f);
  const v8f ax = negative ? -x : x;
  const v8f z = x * x;
  v8f poly = splat8(-5.70498872745e-3f);
  poly = poly * z + 2.06390887954e-2f;
  poly = poly * z + -5.37397155531e-2f;
  poly = poly * z + 1.33314422036e-1f;
  poly = poly * z + -3.33332819422e-1f;
  const v8f small = poly * z * x + x;
  const v8f e = exp_nonpositive(-2.f * ax);
  const v8f large_abs = (1.f - e) / (1.f + e);
  const v8f large = negative ? -large_abs : large_abs;
  return ax < splat8(0.625f) ? small : large;
}

// Attention logit softcapping of n scores in place: cap * tanh(x / cap). sr must have room up to n rounded up to 8.
__attribute__((always_inline)) inline void softcap_scores(float* sr, int64_t n, float cap) {
  const float inv = 1.f / cap;
  for (int64_t c = 0; c < n; c += 8) store8(sr + c, tanh8(load8(sr + c) * inv) * cap);
}

// Running max that keeps a NaN: once m or x is NaN the result is NaN (std::max(m, x) would drop a NaN x).
__attribute__((always_inline)) inline float max_keep_nan(float m, float x) { return x > m || x != x ? x : m; }

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

// raw[r * kKeyChunk + c] = q_r . k_c for R rows from q (raw's rows likewise) and chunk keys [0, cn_pad), cn_pad % 16
// == 0. kt: the chunk's keys transposed, kt[d * kKeyChunk + c]. R rows x 16 keys a step: each K element loaded
// serves every row, and four rows keep eight independent accumulators, enough to cover the FMA latency.
template <int R>
__attribute__((always_inline)) inline void qk_rows(const float* q, int64_t D, const float* kt, int64_t cn_pad,
                                                   float* raw) {
  for (int64_t c = 0; c < cn_pad; c += 16) {
    v8f a[R][2] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8f k0 = load8(kt + d * kKeyChunk + c), k1 = load8(kt + d * kKeyChunk + c + 8);
      for (int r = 0; r < R; ++r) {
        const float x = q[r * D + d];
        a[r][0] += x * k0;
        a[r][1] += x * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store8(raw + r * kKeyChunk + c, a[r][0]);
      store8(raw + r * kKeyChunk + c + 8, a[r][1]);
    }
  }
}

// qk_rows over all rows: four at a time, then a pair, then one.
__attribute__((always_inline)) inline void qk_chunk(const float* q, int64_t rows, int64_t D, const float* kt,
                                                    int64_t cn_pad, float* raw) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows<4>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
  if (r + 2 <= rows) {
    qk_rows<2>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
    r += 2;
  }
  if (r < rows) qk_rows<1>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
}

#if defined(__clang__)
#define DMATTN_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DMATTN_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// Eight float16 values as float32, exactly, by bit arithmetic (GCC 12 converts a _Float16 vector one element at a
// time, with F16C or without): a normal half moves its exponent and mantissa into place and rebiases the exponent by
// 127 - 15 = 112; a subnormal one (or zero) is its mantissa times 2^-24, converted as an integer; inf and NaN keep an
// all-ones exponent and their mantissa. The sign goes back last.
__attribute__((always_inline)) inline v8f half8_to_float(v8h h) {
  const v8u x = __builtin_convertvector(h, v8u);
  const v8u magnitude = x & 0x7fffu;
  const v8u normal = (magnitude << 13) + (112u << 23);
  const v8u subnormal = (v8u)(__builtin_convertvector((v8i)magnitude, v8f) * 0x1p-24f);
  const v8u special = (magnitude << 13) | 0x7f800000u;
  const v8u bits = magnitude < 0x400u ? subnormal : magnitude >= 0x7c00u ? special : normal;
  return (v8f)(bits | ((x & 0x8000u) << 16));
}

// Eight consecutive elements from element i of a q/k/v buffer, as float32: bfloat16's bits shifted into a float's
// upper half, float16 by half8_to_float. (Element by element, through load_scalar, the conversion cost a 16-bit
// decode call three times SDPA's time.)
__attribute__((always_inline)) inline v8f load8_as_float(const void* base, int64_t i, ScalarType dtype) {
  if (dtype == ScalarType::kFloat32) return load8(static_cast<const float*>(base) + i);
  v8h h;
  std::memcpy(&h, static_cast<const uint16_t*>(base) + i, sizeof(h));
  if (dtype == ScalarType::kBFloat16) return (v8f)(__builtin_convertvector(h, v8u) << 16);
  return half8_to_float(h);
}

// kt[d * kKeyChunk + c] = K[row[c] + d] as float32, for every d < D and keys c < cn_pad (0 for the padding keys from
// cn on): the chunk's K rows, read where they lie (row: each key's first element) and transposed. Eight keys by eight
// columns a step through an in-register transpose (interleave pairs of rows, then pairs of pairs, then swap 128-bit
// halves: AVX's unpack / shuffle / lane-permute ladder), so a key's columns go out as whole vectors, not one
// scattered float each, and a 16-bit K is converted on the way (no float32 copy of its rows); the leftover keys and
// columns element by element.
template <ScalarType kDtype>
__attribute__((always_inline)) inline void transpose_keys(const void* k, const int64_t* row, int64_t cn,
                                                          int64_t cn_pad, int64_t D, float* kt) {
  const int64_t D8 = D / 8 * 8;
  int64_t c = 0;
  for (; c + 8 <= cn; c += 8) {
    for (int64_t d = 0; d < D8; d += 8) {
      v8f t[8], u[8];
      for (int i = 0; i < 8; i += 2) {  // t[i]: rows i, i + 1 interleaved, columns 0 1 | 4 5; t[i + 1]: 2 3 | 6 7
        const v8f a = load8_as_float(k, row[c + i] + d, kDtype), b = load8_as_float(k, row[c + i + 1] + d, kDtype);
        t[i] = DMATTN_SHUFFLE8(a, b, 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = DMATTN_SHUFFLE8(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int half = 0; half < 8; half += 4) {  // u[half + j]: column j | j + 4 of rows half .. half + 3
        u[half + 0] = DMATTN_SHUFFLE8(t[half], t[half + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[half + 1] = DMATTN_SHUFFLE8(t[half], t[half + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[half + 2] = DMATTN_SHUFFLE8(t[half + 1], t[half + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[half + 3] = DMATTN_SHUFFLE8(t[half + 1], t[half + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
      for (int j = 0; j < 4; ++j) {
        store8(kt + (d + j) * kKeyChunk + c, DMATTN_SHUFFLE8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        store8(kt + (d + j + 4) * kKeyChunk + c, DMATTN_SHUFFLE8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
      }
    }
    for (int64_t d = D8; d < D; ++d) {
      for (int64_t i = 0; i < 8; ++i) kt[d * kKeyChunk + c + i] = load_scalar(k, row[c + i] + d, kDtype);
    }
  }
  for (; c < cn_pad; ++c) {
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyChunk + c] = c < cn ? load_scalar(k, row[c] + d, kDtype) : 0.f;
  }
}
#undef DMATTN_SHUFFLE8

// acc[r * D + d] += sum_c w[r * kKeyChunk + c] * V[row[c] + d] for R rows (w's and acc's rows from the pointers
// given) and columns [d0, d0 + C) over one chunk of cn keys, V read where it lies and converted to float32 on the way.
// R x C / 8 accumulators stay in registers (eight for four rows x 16 columns, two rows x 32), and each V element
// loaded serves all R rows. The chunk's sum is formed apart and then added to acc, which bounds float32 rounding
// growth over long sequences. A weight of exactly 0 (a key the row may not attend, or one whose weight underflows)
// adds nothing, not 0 * V: a NaN or inf in the V row of a key hidden from this row but visible to another row of the
// item never reaches it.
template <ScalarType kDtype, int R, int C>
__attribute__((always_inline)) inline void pv_columns(const float* w, const void* v, const int64_t* row, int64_t cn,
                                                      int64_t D, int64_t d0, float* acc) {
  v8f a[R][C / 8] = {};
  for (int64_t c = 0; c < cn; ++c) {
    float x[R];
    bool all = true, any = false;
    for (int r = 0; r < R; ++r) {
      x[r] = w[r * kKeyChunk + c];
      all = all && x[r] != 0.f;
      any = any || x[r] != 0.f;
    }
    if (!any) continue;
    v8f vv[C / 8];
    for (int i = 0; i < C / 8; ++i) vv[i] = load8_as_float(v, row[c] + d0 + 8 * i, kDtype);
    for (int r = 0; r < R; ++r) {
      if (!all && x[r] == 0.f) continue;
      for (int i = 0; i < C / 8; ++i) a[r][i] += x[r] * vv[i];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < C / 8; ++i) add_store8(acc + r * D + d0 + 8 * i, a[r][i]);
  }
}

// pv_columns over R rows and every column: C at a time, then eight, then the columns past the last eight one scalar
// sum per row and column over the chunk's keys, in float64 (a D = 1 call is all tail: a float32 sum of 128 products in
// a row lost ~8 ulps of a 1100-key mean where PyTorch's vectorized dot product lost under one, tests/test_fuzz.py),
// rounded once into acc.
template <ScalarType kDtype, int R, int C>
__attribute__((always_inline)) inline void pv_rows(const float* w, const void* v, const int64_t* row, int64_t cn,
                                                   int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + C <= D; d += C) pv_columns<kDtype, R, C>(w, v, row, cn, D, d, acc);
  for (; d + 8 <= D; d += 8) pv_columns<kDtype, R, 8>(w, v, row, cn, D, d, acc);
  for (; d < D; ++d) {
    for (int r = 0; r < R; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < cn; ++c) {
        const float x = w[r * kKeyChunk + c];
        if (x != 0.f) sum += static_cast<double>(x) * load_scalar(v, row[c] + d, kDtype);
      }
      acc[r * D + d] = static_cast<float>(acc[r * D + d] + sum);
    }
  }
}

// The chunk's P . V for every row of the item: four rows at a time, then a pair, then one.
template <ScalarType kDtype>
__attribute__((always_inline)) inline void pv_chunk(const float* w, int64_t rows, int64_t D, const void* v,
                                                    const int64_t* row, int64_t cn, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<kDtype, 4, 16>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
  if (r + 2 <= rows) {
    pv_rows<kDtype, 2, 32>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
    r += 2;
  }
  if (r < rows) pv_rows<kDtype, 1, 32>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
}

// f(std::integral_constant<ScalarType, dtype>{}): the K / V reading loops compiled once per storage type, so that the
// type is not asked again for every eight elements.
template <typename F>
__attribute__((always_inline)) inline void with_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: f(std::integral_constant<ScalarType, ScalarType::kFloat32>{}); break;
    case ScalarType::kFloat16: f(std::integral_constant<ScalarType, ScalarType::kFloat16>{}); break;
    case ScalarType::kBFloat16: f(std::integral_constant<ScalarType, ScalarType::kBFloat16>{}); break;
  }
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
