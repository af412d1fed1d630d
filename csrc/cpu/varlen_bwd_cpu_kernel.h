// varlen_bwd_cpu_kernel.h: the CPU backward of dmattn::varlen_fwd, one sequence at a time.
//
// Torch-free. The registration file (varlen_fwd_cpu.cpp) hands it float32 copies of q, k, v, out, dout and the bias
// (so p.fwd.dtype is kFloat32) and zeroed float64 gradient buffers, and runs the sequences in parallel: every gradient
// element belongs to exactly one sequence (its query row, key row, or bias row), so no two work items write the same
// element, and each is summed in a fixed order (deterministic).
//
// Per (head h, query i), in float64 (the gradients sum many more products than the forward; float32 sums fell
// outside the forward's accuracy rule), two passes over the keys the row can see:
//   1. scores s_j = scale * q_i . k_j + bias and dp_j = dout_i . v_j; from them the row's lse and
//      delta = sum_j p_j dp_j - dlse_i, recomputed rather than read from the forward's float32 lse and rounded out
//   2. p_j = exp(s_j - lse);  ds_j = p_j (dp_j - delta);  dv_j += p_j dout_i;  dq_i += scale ds_j k_j;
//      dk_j += scale ds_j q_i;  dbias[element of (i, h, j)] += ds_j
// Keys a row cannot see (mask, causal) and keys of weight exactly 0 contribute nothing, whatever their K, V and bias
// hold; a row with no visible key (lse = -inf) contributes nothing; a NaN row (lse NaN) gives NaN gradients.
#pragma once

#include "../varlen_bwd_params.h"

namespace dmattn::cpu {

void varlen_bwd_sequence(const VarlenBwdParams& p, int32_t b);

}  // namespace dmattn::cpu
