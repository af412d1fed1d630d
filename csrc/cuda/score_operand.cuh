// score_operand.cuh: reading one bias element on the device, whatever its stored dtype.
//
// Where an element lives (ScoreOperand::offset) and how a mask byte reads (ScoreOperand::mask_allows) are in
// varlen_fwd_params.h, shared with the CPU kernel:
//   key-side   (total_k, Hm):                element [key row, h / head_group]       row = packed key index
//   query-side (total_q, Hm, max_seqlen_k):  element [query row, h / head_group, j]  j = key position in sequence
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// A bias element in two halves, for a kernel that issues the load early and converts where it uses the value (a
// conversion right after the load would wait for it there): its bits (a 16-bit element zero-extended), then their
// float32 value. Zero bits are 0.f in every dtype.
__device__ __forceinline__ uint32_t bias_bits(const ScoreOperand& b, int64_t offset) {
  switch (b.dtype) {
    case ScalarType::kFloat16:
    case ScalarType::kBFloat16:
      return static_cast<const uint16_t*>(b.ptr)[offset];
    default:
      return static_cast<const uint32_t*>(b.ptr)[offset];
  }
}
__device__ __forceinline__ float bias_from_bits(ScalarType dtype, uint32_t bits) {
  switch (dtype) {
    case ScalarType::kFloat16:
      return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    case ScalarType::kBFloat16:
      return __uint_as_float(bits << 16);
    default:
      return __uint_as_float(bits);
  }
}

// softcap * tanh(x / softcap) for x = scale * q.k (VarlenFwdParams::softcap > 0), with tanh(y) = 1 - 2 / (e^2y + 1)
// in five instructions (its absolute error, ~1e-7 times the softcap, is far below the 16-bit rounding of the scores;
// tanhf's inlined series would take registers the attention loops do not have). The softcap is read from the kernel
// parameters (constant memory), not kept in a register.
__device__ __forceinline__ float capped_score(const VarlenFwdParams& p, float x) {
  const float e = exp2f(x * p.softcap_log2e2);  // e^(2 x / softcap): inf for large x, 0 for very negative x
  return p.softcap - 2.f * p.softcap * __frcp_rn(e + 1.f);
}

// A bias element as float32, whatever its stored dtype (float32, float16 or bfloat16).
__device__ __forceinline__ float bias_value(const ScoreOperand& b, int64_t offset) {
  return bias_from_bits(b.dtype, bias_bits(b, offset));
}

}  // namespace dmattn::cuda
