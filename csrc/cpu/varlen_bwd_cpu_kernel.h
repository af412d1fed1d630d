// varlen_bwd_cpu_kernel.h: the CPU backward of dmattn::varlen_fwd, one sequence at a time.
//
// Torch-free. The registration file (varlen_fwd_cpu.cpp) hands it float32 copies of q, k, v, out, dout and the bias
// (so p.fwd.dtype is kFloat32) and zeroed float64 gradient buffers, and runs the
// sequences in parallel: every gradient element belongs to exactly one sequence (its query row, key row, or bias
// row), so no two work items write the same element.
//
// The standard recomputation from softmax_lse, per (head h, query i, visible key j), in float64 (the gradients sum
// many more products than the forward; float32 sums fell outside the forward's accuracy rule):
//   p = exp(scale * q_i . k_j + bias - lse_i)            the forward's weight
//   dv_j += p * dout_i;  dp = dout_i . v_j;  ds = p * (dp - dout_i . out_i + dlse_i)
//   dq_i += scale * ds * k_j;  dk_j += scale * ds * q_i;  dbias[element of (i, h, j)] += ds
// Keys a row cannot see (mask, causal) and keys of weight exactly 0 contribute nothing, whatever their K, V and bias
// hold; a row with no visible key (lse = -inf) contributes nothing; a NaN row (lse NaN) gives NaN gradients.
#pragma once

#include "../varlen_bwd_params.h"

namespace dmattn::cpu {

void varlen_bwd_sequence(const VarlenBwdParams& p, int32_t b);

}  // namespace dmattn::cpu
