// elements.h: the CPU kernels' element types, one value at a time: float32 <-> bfloat16 / float16 conversions
// (round to nearest even, NaN kept, subnormals exact) and a q / k / v / bias element read, or an out row written, in
// its storage type. Eight at a time: vec8.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "../varlen_fwd_params.h"

namespace dmattn::cpu {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof(bits));
  return bits;
}

inline float bf16_to_float(uint16_t v) { return bits_to_float(static_cast<uint32_t>(v) << 16); }

// Round to nearest even, as torch does.
inline uint16_t float_to_bf16(float f) {
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
inline float half_to_float(uint16_t h) {
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

inline uint16_t float_to_half(float f) {
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

inline void store_row(const float* src, int64_t n, ScalarType dtype, void* base, int64_t offset) {
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

}  // namespace dmattn::cpu
