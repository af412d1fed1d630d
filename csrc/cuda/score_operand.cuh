// score_operand.cuh: reading one bias element on the device, whatever its stored dtype.
//
// Where an element lives (ScoreOperand::offset) and how a mask byte reads (ScoreOperand::mask_allows) are in
// varlen_fwd_params.h, shared with the CPU kernel:
//   key-side   (total_k, Hm):                element [key row, h / head_group]       row = packed key index
//   query-side (total_q, Hm, max_seqlen_k):  element [query row, h / head_group, j]  j = key position in sequence
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// A bias element as float32, whatever its stored dtype (float32, float16 or bfloat16).
__device__ __forceinline__ float bias_value(const ScoreOperand& b, int64_t offset) {
  switch (b.dtype) {
    case ScalarType::kFloat16:
      return __half2float(static_cast<const __half*>(b.ptr)[offset]);
    case ScalarType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(b.ptr)[offset]);
    default:
      return static_cast<const float*>(b.ptr)[offset];
  }
}

}  // namespace dmattn::cuda
