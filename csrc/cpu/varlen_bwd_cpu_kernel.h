// varlen_bwd_cpu_kernel.h: the CPU backward of dmattn::varlen_fwd, one sequence at a time.
//
// Torch-free. The registration file (varlen_fwd_cpu.cpp) hands it float32 copies of q, k, v, out, dout and the bias
// (so p.fwd.dtype is kFloat32) and zeroed float64 gradient buffers, and runs the sequences in parallel: every gradient
// element belongs to exactly one sequence (its query row, key row, or bias row), so no two work items write the same
// element, and each is summed in a fixed order (deterministic). d loss / d sinks is the one gradient every sequence
// adds to: each sequence writes its own share, and the caller sums the shares in sequence order.
//
// Per (head h, query i), in float64 (the gradients sum many more products than the forward; float32 sums fell
// outside the forward's accuracy rule), two passes over the keys the row can see (its window, then the mask):
//   1. scores s_j = cap(scale * q_i . k_j) + bias (cap(x) = softcap * tanh(x / softcap) when softcap > 0, else x)
//      and dp_j = dout_i . v_j; from them the row's lse = log(e^sink_h + sum_j e^s_j) (no sink: e^sink = 0) and
//      delta = sum_j p_j dp_j - dlse_i, recomputed rather than read from the forward's float32 lse and rounded out
//   2. p_j = exp(s_j - lse);  ds_j = p_j (dp_j - delta);  dv_j += p_j dout_i;  dbias[element of (i, h, j)] += ds_j;
//      with cap'_j = d cap / d x (1 - tanh^2, or 1):  dq_i += scale cap'_j ds_j k_j;  dk_j += scale cap'_j ds_j q_i
//   and the sink's share: dsinks_h -= exp(sink_h - lse) delta (its weight in the row times the row's delta).
// Keys a row cannot see (window, mask) and keys of weight exactly 0 contribute nothing, whatever their K, V and bias
// hold; a row with no visible key and no sink (lse = -inf) contributes nothing, one with no visible key but a finite
// sink only its sink's share (dlse_i); a NaN row (lse NaN) gives NaN gradients.
// The work is blocked: pass 1 forms four keys' products at a time, and pass 2 runs four query rows of a head together,
// key by key, so that each dk_j and dv_j row takes the block's shares in one pass (added in row order, as one row at
// a time would add them); K and V are read as float64 copies per KV head where those fit.
#pragma once

#include "../varlen_bwd_params.h"

namespace dmattn::cpu {

// The gradients of sequence b, added to p.dq, p.dk, p.dv and p.dbias. dsinks: null without sinks (p.dsinks null);
// else p.fwd.num_heads doubles that receive (are overwritten with) this sequence's share of d loss / d sinks, for
// the caller to sum over the sequences into p.dsinks in a fixed order (sequences run in parallel).
void varlen_bwd_sequence(const VarlenBwdParams& p, int32_t b, double* dsinks);

}  // namespace dmattn::cpu
