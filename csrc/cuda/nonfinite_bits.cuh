// nonfinite_bits.cuh: whether either 16-bit float (fp16, bf16) of a 32-bit word is inf or NaN, for scans over many
// words: a half's exponent field plus the field's lowest bit reaches the half's top bit only when the field is all
// ones (inf, NaN), and never carries into the other half. So a scan ORs tops(word) over its words (three integer
// operations each) and tests the result once. Torch- and CuTe-free (block_map.cu's V scan uses it too).
#pragma once

#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

struct NonfiniteBits {
  uint32_t fields;  // both halves' exponent fields
  uint32_t carry;   // each field's lowest bit

  // exp_bits: one half's exponent field (0x7f80 for bf16, 0x7c00 for fp16), ending below the sign bit.
  static constexpr NonfiniteBits of(uint32_t exp_bits) {
    return {exp_bits * 0x10001u, (exp_bits & (0u - exp_bits)) * 0x10001u};
  }
  static constexpr NonfiniteBits of(ScalarType dtype) {
    return of(dtype == ScalarType::kBFloat16 ? 0x7f80u : 0x7c00u);
  }
  DMATTN_HOST_DEVICE constexpr uint32_t tops(uint32_t word) const { return (word & fields) + carry; }
  // Whether the OR of tops() over some words saw an inf or NaN.
  DMATTN_HOST_DEVICE static constexpr bool any(uint32_t ored_tops) { return (ored_tops & 0x80008000u) != 0; }
};

constexpr NonfiniteBits kBf16Bits = NonfiniteBits::of(0x7f80u), kF16Bits = NonfiniteBits::of(0x7c00u);
static_assert(NonfiniteBits::any(kBf16Bits.tops(0x00007f80u)) && NonfiniteBits::any(kBf16Bits.tops(0xff810000u)) &&
                  !NonfiniteBits::any(kBf16Bits.tops(0xff7f7f7fu)),
              "bf16: +inf low, a NaN high are seen; the largest finite magnitudes in both halves are not");
static_assert(NonfiniteBits::any(kF16Bits.tops(0xfc000000u)) && NonfiniteBits::any(kF16Bits.tops(0x00007c01u)) &&
                  !NonfiniteBits::any(kF16Bits.tops(0xfbff7bffu)),
              "fp16: -inf high, a NaN low are seen; the largest finite magnitudes in both halves are not");

}  // namespace dmattn::cuda
