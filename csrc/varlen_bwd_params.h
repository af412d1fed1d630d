// varlen_bwd_params.h: the plain description of one dmattn::varlen_bwd call (the gradients of varlen_fwd).
//
// Shapes (element strides, as VarlenFwdParams; every gradient buffer is float64 and contiguous):
//   fwd                 the forward call: q, k, v, the forward's out (read), its lse (read), cu_seqlens, mask, bias
//   dout   (total_q, H, D)   dlse (H, total_q) or null
//   dq     (total_q, H, D)   dk, dv (total_k, Hk, D)   dbias: the bias's shape, or null when not wanted
//   dsinks (H,), or null without sinks
#pragma once

#include "varlen_fwd_params.h"

namespace dmattn {

struct VarlenBwdParams {
  VarlenFwdParams fwd;
  const void* dout = nullptr;  // fwd.dtype
  int64_t dout_row_stride = 0, dout_head_stride = 0;
  const float* dlse = nullptr;  // (H, total_q) contiguous, or null: no gradient through softmax_lse
  double* dq = nullptr;
  double* dk = nullptr;
  double* dv = nullptr;
  double* dbias = nullptr;  // element offsets by fwd.bias's strides (dbias is laid out like the bias it is for)
  double* dsinks = nullptr;  // (H,): d loss / d sinks[h], when fwd.sinks is set
};

}  // namespace dmattn
