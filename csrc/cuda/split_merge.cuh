// split_merge.cuh: the arithmetic that merges one (query row, head) pair's split partials (passes.h, SplitPartials)
// into its out and lse, shared by the two places that run it: combine_splits (split_combine.cu, its own launch) and
// the decode kernel's last split CTA of a unit (sm80/decode_kernel.cuh, FwdPlan::combine_in_kernel). Both run it with
// the same lane group (combine_lanes, passes.h), so a call's result is the same bits either way.
//
// Split s of a row saw the keys of its KV tiles and left its score max m_s (-inf: it saw none), its sum l_s of
// exp(score - m_s) and O_s, normalized by l_s. With M = max_s m_s, split s weighs w_s = exp(m_s - M) l_s; the row's
// lse is M + log(sum_s w_s) and out = sum_s w_s O_s / sum_s w_s: exact in exact arithmetic, float32 here. Keeping m_s
// and l_s apart (not lse_s = m_s + log l_s) keeps the weights exact where log l_s vanishes next to |m_s| (every score
// near finfo.min: an lse weighs splits of 1024 and 76 keys alike). The contract's special rows come through as the
// unsplit kernel writes them:
//   no split saw a key            out 0, lse -inf
//   a split's max or sum is NaN   (a NaN or +inf score) out and lse NaN
//   a split's O holds NaN         (a poisoned row, or NaN V times weight 0) out NaN, lse kept
// A head's sink logit (VarlenFwdParams::sinks) joins here, once per row, as one more split with O = 0: a row no split
// saw gets out 0 and lse = sink; a NaN or +inf sink makes the row NaN, as in the unsplit kernels.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda::split_merge {

constexpr float kLog2e = 1.4426950408889634f;

// exp(m_s - M) times the split's sum (1 for the sink), 0 for a split that saw nothing.
__device__ __forceinline__ float split_weight(float m_s, float l_s, float m) {
  return m_s == -INFINITY ? 0.f : (m_s == m ? 1.f : exp2f((m_s - m) * kLog2e)) * l_s;
}

template <typename Elem>
__device__ __forceinline__ void store_pair(Elem* dst, float x0, float x1);
template <>
__device__ __forceinline__ void store_pair<__half>(__half* dst, float x0, float x1) {
  *reinterpret_cast<__half2*>(dst) = __floats2half2_rn(x0, x1);
}
template <>
__device__ __forceinline__ void store_pair<__nv_bfloat16>(__nv_bfloat16* dst, float x0, float x1) {
  *reinterpret_cast<__nv_bfloat162*>(dst) = __floats2bfloat162_rn(x0, x1);
}

// *ptr where pred holds, else zeros; a predicated load, not a branch, so that a batch of them is in flight together.
// kFromL2: past L1 (ld.global.cg), for a reader in the kernel that wrote the partials, whose SM's L1 may hold a line
// of them from before another CTA wrote it; else an evict-first load (ld.global.cs: partials are read once).
template <bool kFromL2>
__device__ __forceinline__ float4 load_partial_if(const float4* ptr, bool pred) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  if constexpr (kFromL2) {
    asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n @p ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%5];\n}\n"
                 : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
                 : "r"(static_cast<int>(pred)), "l"(ptr));
  } else {
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n @p ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%5];\n}\n"
        : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
        : "r"(static_cast<int>(pred)), "l"(ptr));
  }
  return v;
}

// The reduction of a value over the kGroup lanes of this lane's group.
template <int kGroup, typename Op>
__device__ __forceinline__ float group_reduce(float x, Op op) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) x = op(x, __shfl_xor_sync(0xffffffffu, x, off, kGroup));
  return x;
}

// What passes 1 and 2 leave of a (row, head) pair: the max m over its splits and its sink, whether the row is NaN, its
// lse, and 1 / the sum of the weights (split s weighs split_weight(m_s, l_s, m)).
struct PairTotals {
  float m, lse, inv_total;
  bool nan;
};

// Passes 1 and 2 of a pair over its splits first, first + step, ... below n (none where !active): each thread's share,
// combined by reduce(x, op) over the threads that share the pair (a lane group, or the CTA), every one of them
// calling it. max_s[s * stride] and sum_s[s * stride] are split s's max and sum (global memory, or a copy in shared
// memory). Pass 1: the max, and whether any max or sum is NaN (fmaxf would drop it); a split that saw nothing wrote
// no sum. The head's sink joins the denominator once, as a split of lse = sink and O = 0 (the decode kernel's splits
// leave it out). Pass 2: the sum of the splits' weights, reading the same few floats again (from L1, or shared
// memory). kPassUnroll: the loops' unroll (1 in the lane-group combine, at its 80 registers; 4 in the CTA-per-pair
// one, where 1 cost 8 bytes of spill on sm_80).
template <int kPassUnroll, typename Reduce>
__device__ __forceinline__ PairTotals pair_totals(const float* max_s, const float* sum_s, int64_t stride, int n,
                                                  int first, int step, bool active, float sink, Reduce reduce) {
  const auto max_op = [](float a, float b) { return fmaxf(a, b); };
  float m = -INFINITY;
  bool nan = false;
#pragma unroll kPassUnroll
  for (int s = first; active && s < n; s += step) {
    const float m_s = max_s[s * stride];
    const float l_s = m_s == -INFINITY ? 0.f : sum_s[s * stride];
    nan |= m_s != m_s || l_s != l_s;
    m = fmaxf(m, m_s);
  }
  m = reduce(m, max_op);
  nan = reduce(nan ? 1.f : 0.f, max_op) != 0.f || sink != sink || sink == INFINITY;
  m = fmaxf(m, sink);
  float total = 0.f;
#pragma unroll kPassUnroll
  for (int s = first; active && !nan && s < n; s += step) {
    const float m_s = max_s[s * stride];
    total += split_weight(m_s, m_s == -INFINITY ? 0.f : sum_s[s * stride], m);
  }
  total = reduce(total, [](float a, float b) { return a + b; }) + split_weight(sink, 1.f, m);
  PairTotals t;
  t.m = m;
  t.nan = nan;
  t.lse = nan ? __int_as_float(0x7fc00000) : m == -INFINITY ? -INFINITY : m + logf(total);
  t.inv_total = m == -INFINITY ? 0.f : 1.f / total;
  return t;
}

// x[v] += w[u] o[u][v] over a batch of kUnroll splits whose loads are in flight together.
template <int kUnroll, int kVecs>
__device__ __forceinline__ void add_weighted(float4 (&x)[kVecs], const float (&w)[kUnroll],
                                             const float4 (&o)[kUnroll][kVecs]) {
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      x[v].x += w[u] * o[u][v].x;
      x[v].y += w[u] * o[u][v].y;
      x[v].z += w[u] * o[u][v].z;
      x[v].w += w[u] * o[u][v].w;
    }
  }
}

// Where one pair's partials are: its split 0's max and sum (split s's at s * stat_stride from there) and O (split s's
// at s * o_stride float4s from there), and where its out and lse go.
struct PairPartials {
  const float* max;
  const float* sum;
  int64_t stat_stride;
  const float4* o;
  int64_t o_stride;
  int64_t row;  // the query row (out's row, lse's column)
  int h;        // the query head
};

// A (row, head) pair merged by the kGroup lanes of a group (lane gl of the group; the head dim is 4 x kGroup x kVecs,
// lane gl owning O's float4 columns gl, gl + kGroup, ...) over n splits, into out and lse. Every lane of the warp
// calls it (the shuffles need them all); a group whose pair is not `mine` idles along and writes nothing.
// Passes 1 and 2 take splits gl, gl + kGroup, ... per lane (pair_totals). Pass 3: out = sum over the splits that saw
// a key of weight x O, kGroup splits at a time, lane gl holding the weight of the chunk's split gl; the O loads of
// kUnroll splits (8 float4 per lane at most, so that three combine CTAs fit an SM) are issued before any is used.
template <typename Elem, int kGroup, int kVecs, bool kFromL2>
__device__ __forceinline__ void merge_pair(const VarlenFwdParams& p, const PairPartials& pp, int n, bool mine,
                                           int gl) {
  const float nan_value = __int_as_float(0x7fc00000);
  const PairTotals t = pair_totals<1>(pp.max, pp.sum, pp.stat_stride, n, gl, kGroup, mine, p.sink(pp.h),
                                      [](float x, auto op) { return group_reduce<kGroup>(x, op); });
  const float m = t.m, inv_total = t.inv_total;
  const bool nan = t.nan;

  constexpr int kUnroll = kVecs <= 1 ? 8 : kVecs <= 2 ? 4 : kVecs <= 4 ? 2 : 1;
  static_assert(kGroup % kUnroll == 0, "whole batches of splits per chunk");
  float4 x[kVecs];
#pragma unroll
  for (int v = 0; v < kVecs; ++v) x[v] = make_float4(0.f, 0.f, 0.f, 0.f);
  const float4* o_s = pp.o + gl;
#pragma unroll 1
  for (int s0 = 0; s0 < n; s0 += kGroup) {  // every group of the warp alike: the shuffles need all its lanes
    const int own = s0 + gl;
    const float m_own = mine && !nan && own < n ? pp.max[own * pp.stat_stride] : -INFINITY;
    const float l_own = m_own == -INFINITY ? 0.f : pp.sum[own * pp.stat_stride];  // 0: no O (saw nothing, past n)
    const float w_own = split_weight(m_own, l_own, m) * inv_total;
#pragma unroll 1
    for (int src0 = 0; src0 < kGroup; src0 += kUnroll) {
      float w[kUnroll];
      float4 o[kUnroll][kVecs];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        w[u] = __shfl_sync(0xffffffffu, w_own, src0 + u, kGroup);
        // A split that saw nothing wrote no O (zeros instead); one that weighs 0 still brings a NaN O (a poisoned
        // row) along.
        const bool saw = __shfl_sync(0xffffffffu, l_own, src0 + u, kGroup) != 0.f;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          o[u][v] = load_partial_if<kFromL2>(o_s + (s0 + src0 + u) * pp.o_stride + v * kGroup, saw);
        }
      }
      add_weighted(x, w, o);
    }
  }
  if (!mine) return;
  Elem* out = static_cast<Elem*>(p.out) + pp.row * p.out_row_stride + static_cast<int64_t>(pp.h) * p.out_head_stride;
#pragma unroll
  for (int v = 0; v < kVecs; ++v) {
    const int col = 4 * (gl + v * kGroup);
    if (nan) x[v] = make_float4(nan_value, nan_value, nan_value, nan_value);
    store_pair<Elem>(out + col, x[v].x, x[v].y);
    store_pair<Elem>(out + col + 2, x[v].z, x[v].w);
  }
  if (gl == 0) p.lse[static_cast<int64_t>(pp.h) * p.total_q + pp.row] = t.lse;
}

}  // namespace dmattn::cuda::split_merge
