// bwd_params.h: the fused CUDA backward's description of one call (torch-free and CuTe-free, so the binding includes
// it); the kernels and their design are in bwd_traits.h.
#pragma once

#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../passes.h"

namespace dmattn::cuda::bwd {

// One backward call as the kernels see it. The forward's description (q, k, v, out, lse, cu_seqlens, key-side mask /
// bias, scale, window, softcap, seqused_k, key_range; no kv_slots: the autograd formula gathers a pool first, and no
// query-side operand: the binding sends those calls to the blockwise backward).
//   dout  (total_q, H, D)   dlse (H, total_q) float32 contiguous, or null (no gradient through softmax_lse)
//   delta (H, total_q) float32 contiguous scratch: delta_kernel writes rowsum(dout * out) - dlse there first
//   dq    (total_q, H, D)   dk, dv (total_k, Hk, D): contiguous, in q's dtype, zero-filled by the caller (rows no
//                           sequence owns, and keys past seqused_k, stay 0)
//   dq_accum (total_q, H, D) float32 contiguous, zero-filled, or null. Set (DMATTN_BWD_DQ=atomic, or the sm90a
//                           backward): dkdv_kernel also adds each key tile's dS K times the softmax scale into it with
//                           atomics (the order of the additions varies, so the bits of dq may differ between runs) and
//                           the binding converts it into dq; dq_kernel does not run. Null: dq_kernel computes dq on
//                           its own, every sum in a fixed order (deterministic).
//   dbias (total_k, H) float32 contiguous, zero-filled, or null: d loss / d key-side bias per query head (the binding
//                           sums the heads each bias head broadcasts to)
//   keys  the kept-key lists of a key-side mask whose heads the query heads of a KV group share (Hk % Hm == 0), built
//                           by compact_keys (../passes.h) before the kernels, or null: then both kernels walk key
//                           positions and read the mask per key. With lists, dkdv_kernel's CTAs own 64 kept keys
//                           (gathered) and dq_kernel walks kept keys only, so a mask keeping half the keys costs about
//                           half; dk, dv and dbias rows of the keys it removes stay 0.
struct BwdParams {
  VarlenFwdParams f;
  const void* dout = nullptr;
  int64_t dout_row_stride = 0, dout_head_stride = 0;
  const float* dlse = nullptr;
  float* delta = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dq_accum = nullptr;
  float* dbias = nullptr;
  KeyLists keys;
};

// The head dims the fused backward is built for; the binding pads q, k, v, dout and out with zeros up to one.
constexpr int32_t bwd_head_dim(int32_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : -1; }

}  // namespace dmattn::cuda::bwd
