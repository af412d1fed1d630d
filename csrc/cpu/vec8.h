// vec8.h: eight float32 lanes for the CPU forward kernel (varlen_fwd_cpu_kernel.cpp): loads and stores, eight K / V
// elements of any storage type read as float32, exp of non-positive scores and tanh (the softcap) without libm, and
// a row's cache lines prefetched. Every helper is always inlined, so each clone of run_block compiles them in its own
// instruction set.
#pragma once

#include <cstdint>
#include <cstring>

#include "../varlen_fwd_params.h"
#include "elements.h"

namespace dmattn::cpu {

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

}  // namespace dmattn::cpu
