// blockwise_bwd.h: dmattn::varlen_bwd computed with ATen operations, a block of query rows at a time, on whatever
// device the tensors are on. It is the CUDA backend's backward for the calls its fused kernels do not cover (query-side
// operands, head dims above 128) and, under DMATTN_BWD=blockwise, for every call on either backend, so that the CPU
// tests check it against the float64 reference and the CUDA ones beside the fused kernels.
//
// Per sequence and block of query rows it recomputes the scores (H, rows, keys) in float32 from q and k, with the
// softcap, bias, mask, window and key ranges of the call, their row's lse (and the sink), P, dP = dout V^T and dS = P
// (dP - delta), then accumulates dq, dk, dv, the bias gradient in the bias's layout and the sinks' gradient, all in
// float32. Scratch: a few (H, rows, keys) float32 tensors, rows chosen so one is at most kBlockBytes, and the
// sequence's dk, dv in float32; never (total_q, max_seqlen_k), and K / V are not expanded per query head (the products
// group a KV head's query heads). It reads cu_seqlens (and seqused_k) on the host, and asks once whether dout holds an
// inf / NaN: on a CUDA device, two synchronisations per call, so a backward cannot be captured in a CUDA graph.
// Deterministic (no atomics; every sum in a fixed order).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "tensors_to_params.h"

namespace dmattn {

// The results of dmattn::varlen_bwd (schema.cpp) for the forward call a (its key pool absent: the autograd formula
// gathers it first) and the backward's own arguments, all checked by the caller (check_args, check_bwd_args).
// cu_seqlens are clamped as the CUDA forward clamps them (clamp_seq, key_seq).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blockwise_varlen_bwd(
    const VarlenFwdArgs& a, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out,
    const at::Tensor& lse, bool bias_grad);

// DMATTN_BWD=blockwise: every backend runs its backward through blockwise_varlen_bwd (the CPU, so that its tests
// check this path; CUDA, as the reference beside the fused kernels). kernel (the default): each backend's own kernel
// (the float64 CPU kernel; on CUDA the fused kernels wherever they cover the call, this path elsewhere). Read per
// call; anything else raises a ValueError.
bool blockwise_backward_requested();

}  // namespace dmattn
