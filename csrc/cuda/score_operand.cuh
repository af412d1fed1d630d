// score_operand.cuh: reading one element of a mask or bias operand on the device.
//
// Both layouts share one addressing rule (see varlen_fwd_params.h):
//   key-side   (total_k, Hm):                element [key row, h / head_group]       row = packed key index
//   query-side (total_q, Hm, max_seqlen_k):  element [query row, h / head_group, j]  j = key position in sequence
// so an element is base + row * row_stride + (h / head_group) * head_stride + j * col_stride (col_stride = 0 for
// key-side operands).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// Element offset of operand head h's row `row` (plus key position j for query-side operands).
__device__ __forceinline__ int64_t operand_offset(const ScoreOperand& op, int64_t row, int h, int64_t j) {
  return row * op.row_stride + static_cast<int64_t>(h / op.head_group) * op.head_stride + j * op.col_stride;
}

__device__ __forceinline__ bool mask_value(const ScoreOperand& m, int64_t offset) {
  return static_cast<const uint8_t*>(m.ptr)[offset] != 0;
}

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
