// split_combine.cu: the decode kernel's key splits merged into out and lse (passes.h, SplitPartials).
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
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "heuristics.h"
#include "passes.h"
#include "row_contract.cuh"

namespace dmattn::cuda {
namespace {

// Eight lanes per (query row, head) pair, four pairs per warp: a batch of decode rows is one wave of CTAs (where a
// warp per pair needed two), and a pair's O loads of several splits are in flight at once (where each waited on
// the last).
constexpr int kCombineThreads = 256;
// A call of few rows (a long context: 18 rows x 32 heads over 80 splits) takes a whole warp per pair instead, so
// that its few pairs still spread over the GPU (kWideGroup: head dims of at least 128, one float4 per lane).
constexpr int kWideGroup = 32;
constexpr int64_t kMaxWidePairs = 8192;
// A call of few pairs over many splits takes a CTA per pair (combine_deep_kernel): its eight warps share the splits,
// where a warp per pair left the long-context batch (576 pairs over ~65 splits) four warps per SM.
constexpr int kDeepWarps = kCombineThreads / 32;
constexpr int64_t kMaxDeepPairs = 4096;
constexpr int kMinDeepSplits = 16;
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

// *ptr where pred holds (an evict-first load: partials are read once), else zeros; a predicated load, not a branch,
// so that a batch of them is in flight together.
__device__ __forceinline__ float4 load_streaming_if(const float4* ptr, bool pred) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  asm("{\n .reg .pred p;\n setp.ne.b32 p, %4, 0;\n @p ld.global.cs.v4.f32 {%0, %1, %2, %3}, [%5];\n}\n"
      : "+f"(v.x), "+f"(v.y), "+f"(v.z), "+f"(v.w)
      : "r"(static_cast<int>(pred)), "l"(ptr));
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
// calling it. Pass 1: the max, and whether any max or sum is NaN (fmaxf would drop it); a split that saw nothing wrote
// no sum. The head's sink joins the denominator once, as a split of lse = sink and O = 0 (the decode kernel's splits
// leave it out). Pass 2: the sum of the splits' weights, reading the same few floats again, from L1. kPassUnroll: the
// loops' unroll (1 in the lane-group combine, at its 80 registers; 4 in the CTA-per-pair one, where 1 cost 8 bytes of
// spill on sm_80).
template <int kPassUnroll, typename Reduce>
__device__ __forceinline__ PairTotals pair_totals(const float* max_s, const float* sum_s, int64_t split_stride, int n,
                                                  int first, int step, bool active, float sink, Reduce reduce) {
  const auto max_op = [](float a, float b) { return fmaxf(a, b); };
  float m = -INFINITY;
  bool nan = false;
#pragma unroll kPassUnroll
  for (int s = first; active && s < n; s += step) {
    const float m_s = max_s[s * split_stride];
    const float l_s = m_s == -INFINITY ? 0.f : sum_s[s * split_stride];
    nan |= m_s != m_s || l_s != l_s;
    m = fmaxf(m, m_s);
  }
  m = reduce(m, max_op);
  nan = reduce(nan ? 1.f : 0.f, max_op) != 0.f || sink != sink || sink == INFINITY;
  m = fmaxf(m, sink);
  float total = 0.f;
#pragma unroll kPassUnroll
  for (int s = first; active && !nan && s < n; s += step) {
    const float m_s = max_s[s * split_stride];
    total += split_weight(m_s, m_s == -INFINITY ? 0.f : sum_s[s * split_stride], m);
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

// finish_rows' work in a combine that finishes the rows. Not inlined: its code would cost the combine loop registers
// (80 at three CTAs per SM), and spills, at some head dims.
__device__ __noinline__ void finish_rows_apart(const VarlenFwdParams& p, int64_t block, int64_t blocks) {
  finish_rows_block(p, block, blocks);
}

// Grid-stride over (query row, head) pairs, kGroup lanes each, kVecs float4 columns of O per lane (the head dim is
// 4 x kGroup x kVecs), on the grid's first `combining` CTAs. Rows past cu_seqlens_q[B] (the decode kernel wrote no
// partials for them) are finish_rows': its own launch, or (finishing, FwdPlan::combine_finishes) the CTAs after the
// first `combining`, which do its work here (row_contract.cuh) while the combining CTAs check the contract too and
// combine no row of a call that breaks it. A separate branch, so that the combine loop keeps its registers.
template <typename Elem, int kGroup, int kVecs>
__global__ void __launch_bounds__(kCombineThreads, 3)
combine_splits_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ SplitPartials sp,
                      int combining) {
  static_assert(kCombineThreads == kFinishThreads, "the finishing CTAs are finish_rows' CTAs");
  const bool finishing = gridDim.x > static_cast<unsigned>(combining);
  if (blockIdx.x >= static_cast<unsigned>(combining)) {
    finish_rows_apart(p, blockIdx.x - combining, gridDim.x - combining);
    return;
  }
  constexpr int kPairsPerBlock = kCombineThreads / kGroup;
  const int gl = threadIdx.x % kGroup;
  const int64_t pairs = owned_rows(p, finishing && contract_broken(p)) * p.num_heads;
  const int64_t split_stride = static_cast<int64_t>(p.num_heads) * p.total_q;  // rows between splits
  const int n = sp.num_splits;
  const float nan_value = __int_as_float(0x7fc00000);
  // The loop runs warp by warp (the shuffles need every lane of the warp); a group past the last pair idles along.
  for (int64_t warp_pair = static_cast<int64_t>(blockIdx.x) * kPairsPerBlock + threadIdx.x / 32 * (32 / kGroup);
       warp_pair < pairs; warp_pair += static_cast<int64_t>(combining) * kPairsPerBlock) {
    const int64_t pair = warp_pair + threadIdx.x % 32 / kGroup;
    const bool mine = pair < pairs;
    const int64_t row = mine ? pair / p.num_heads : 0;
    const int h = mine ? static_cast<int>(pair % p.num_heads) : 0;
    const int64_t at = static_cast<int64_t>(h) * p.total_q + row;  // split 0's index of the pair

    // Passes 1 and 2, lane gl taking splits gl, gl + kGroup, ... (pass 3 reads the same few floats again, from L1).
    const float* max_s = sp.max + at;
    const float* sum_s = sp.sum + at;
    const PairTotals t = pair_totals<1>(max_s, sum_s, split_stride, n, gl, kGroup, mine, p.sink(h),
                                     [](float x, auto op) { return group_reduce<kGroup>(x, op); });
    const float m = t.m, lse = t.lse, inv_total = t.inv_total;
    const bool nan = t.nan;

    // Pass 3: out = sum over the splits that saw a key of weight x O, kGroup splits at a time, lane gl holding the
    // weight of the chunk's split gl and owning O's float4 columns gl, gl + kGroup, ... The loads of kUnroll splits
    // (8 float4 per lane at most, so that three CTAs fit an SM) are issued before any is used.
    constexpr int kUnroll = kVecs <= 1 ? 8 : kVecs <= 2 ? 4 : kVecs <= 4 ? 2 : 1;
    static_assert(kGroup % kUnroll == 0, "whole batches of splits per chunk");
    float4 x[kVecs];
#pragma unroll
    for (int v = 0; v < kVecs; ++v) x[v] = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4* o_s = reinterpret_cast<const float4*>(sp.o + at * p.head_dim) + gl;
    const int64_t o_stride = split_stride * p.head_dim / 4;  // float4s between splits
#pragma unroll 1
    for (int s0 = 0; s0 < n; s0 += kGroup) {  // every group of the warp alike: the shuffles need all its lanes
      const int own = s0 + gl;
      const float m_own = mine && !nan && own < n ? max_s[own * split_stride] : -INFINITY;
      const float l_own = m_own == -INFINITY ? 0.f : sum_s[own * split_stride];  // 0: no O (saw nothing, or past n)
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
          for (int v = 0; v < kVecs; ++v) o[u][v] = load_streaming_if(o_s + (s0 + src0 + u) * o_stride + v * kGroup, saw);
        }
        add_weighted(x, w, o);
      }
    }
    if (!mine) continue;
    Elem* out = static_cast<Elem*>(p.out) + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int col = 4 * (gl + v * kGroup);
      if (nan) x[v] = make_float4(nan_value, nan_value, nan_value, nan_value);
      store_pair<Elem>(out + col, x[v].x, x[v].y);
      store_pair<Elem>(out + col + 2, x[v].z, x[v].w);
    }
    if (gl == 0) p.lse[at] = lse;
  }
}

// The sum (or max) of x over the CTA, in every thread; `scratch` holds kDeepWarps floats and is free again on return.
template <typename Op>
__device__ __forceinline__ float cta_reduce(float x, Op op, float* scratch) {
  x = group_reduce<32>(x, op);
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
  __syncthreads();
  x = scratch[0];
#pragma unroll
  for (int w = 1; w < kDeepWarps; ++w) x = op(x, scratch[w]);
  __syncthreads();  // scratch is rewritten by the next reduction
  return x;
}

// A CTA per (query row, head) pair, for calls of few pairs over many splits; the same arithmetic as
// combine_splits_kernel (passes 1 and 2 over the splits by thread, then reduced over the CTA). Pass 3: warp w takes
// splits w, w + kDeepWarps, ..., four at a time with their loads in flight together, lane l owning O's float4 columns
// l, l + 32, ... (kVecs of them: head dim 128 kVecs); the warps' sums meet in shared memory. The CTAs after the first
// `combining` do finish_rows' work, as in combine_splits_kernel.
template <typename Elem, int kVecs>
__global__ void __launch_bounds__(kCombineThreads)
combine_deep_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ SplitPartials sp,
                    int combining) {
  static_assert(kCombineThreads == kFinishThreads, "the finishing CTAs are finish_rows' CTAs");
  constexpr int kUnroll = 4;
  __shared__ float scratch[kDeepWarps];
  __shared__ float4 warp_o[kDeepWarps][32 * kVecs];
  const bool finishing = gridDim.x > static_cast<unsigned>(combining);
  if (blockIdx.x >= static_cast<unsigned>(combining)) {
    finish_rows_apart(p, blockIdx.x - combining, gridDim.x - combining);
    return;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t pairs = owned_rows(p, finishing && contract_broken(p)) * p.num_heads;
  const int64_t split_stride = static_cast<int64_t>(p.num_heads) * p.total_q;  // rows between splits
  const int n = sp.num_splits;
  const float nan_value = __int_as_float(0x7fc00000);
  for (int64_t pair = blockIdx.x; pair < pairs; pair += combining) {  // CTA-uniform
    const int64_t row = pair / p.num_heads;
    const int h = static_cast<int>(pair % p.num_heads);
    const int64_t at = static_cast<int64_t>(h) * p.total_q + row;  // split 0's index of the pair
    const float* max_s = sp.max + at;
    const float* sum_s = sp.sum + at;

    // Passes 1 and 2, thread i taking splits i, i + kCombineThreads, ...
    const PairTotals t = pair_totals<4>(max_s, sum_s, split_stride, n, threadIdx.x, kCombineThreads, true, p.sink(h),
                                     [&](float x, auto op) { return cta_reduce(x, op, scratch); });
    const float m = t.m, lse = t.lse, inv_total = t.inv_total;
    const bool nan = t.nan;

    // Pass 3: this warp's splits, kUnroll at a time: each split's weight (its max and sum read by every lane: one
    // transaction) and its O columns, loaded only where the split saw a key.
    float4 x[kVecs];
#pragma unroll
    for (int v = 0; v < kVecs; ++v) x[v] = make_float4(0.f, 0.f, 0.f, 0.f);
    const float4* o_s = reinterpret_cast<const float4*>(sp.o + at * p.head_dim) + lane;
    const int64_t o_stride = split_stride * p.head_dim / 4;  // float4s between splits
    for (int s0 = warp; !nan && s0 < n; s0 += kUnroll * kDeepWarps) {
      float w[kUnroll];
      float4 o[kUnroll][kVecs];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int s = s0 + u * kDeepWarps;
        const float m_s = s < n ? max_s[s * split_stride] : -INFINITY;
        const float l_s = m_s == -INFINITY ? 0.f : sum_s[s * split_stride];  // 0: saw nothing, or past n
        w[u] = split_weight(m_s, l_s, m) * inv_total;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) o[u][v] = load_streaming_if(o_s + s * o_stride + v * 32, l_s != 0.f);
      }
      add_weighted(x, w, o);
    }
#pragma unroll
    for (int v = 0; v < kVecs; ++v) warp_o[warp][lane + v * 32] = x[v];
    __syncthreads();
    if (threadIdx.x < 32 * kVecs) {  // one float4 column of out per thread: the warps' sums added
      const int c = threadIdx.x;
      float4 y = warp_o[0][c];
#pragma unroll
      for (int w = 1; w < kDeepWarps; ++w) {
        const float4 z = warp_o[w][c];
        y.x += z.x, y.y += z.y, y.z += z.z, y.w += z.w;
      }
      if (nan) y = make_float4(nan_value, nan_value, nan_value, nan_value);
      Elem* out = static_cast<Elem*>(p.out) + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
      store_pair<Elem>(out + 4 * c, y.x, y.y);
      store_pair<Elem>(out + 4 * c + 2, y.z, y.w);
    }
    if (threadIdx.x == 0) p.lse[at] = lse;
    __syncthreads();  // warp_o is rewritten by the next pair
  }
}

template <typename Elem, int kGroup>
cudaError_t launch_combine(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish) {
  // One pass over the rows up to 64k CTAs; past that the groups stride (the kernel reads the row count on the device).
  // Finishing, finish_rows' CTAs after them.
  constexpr int kPairsPerBlock = kCombineThreads / kGroup;
  const int64_t blocks = (p.total_q * p.num_heads + kPairsPerBlock - 1) / kPairsPerBlock;
  const int combining = static_cast<int>(std::min<int64_t>(blocks, kMaxCombineBlocks));
  const dim3 grid(static_cast<unsigned>(combining + (finish ? finish_blocks(p) : 0)));
  constexpr int kVecs = 128 / (4 * kGroup);  // at head dim 128
  auto launch = [&](auto kernel) { kernel<<<grid, kCombineThreads, 0, stream>>>(p, splits, combining); };
  switch (p.head_dim) {  // the compiled head dims (tools/kernel_matrix.py)
    case 32: launch(combine_splits_kernel<Elem, 8, 1>); break;
    case 64: launch(combine_splits_kernel<Elem, 8, 2>); break;
    case 96: launch(combine_splits_kernel<Elem, 8, 3>); break;
    case 128: launch(combine_splits_kernel<Elem, kGroup, kVecs>); break;
    case 256: launch(combine_splits_kernel<Elem, kGroup, 2 * kVecs>); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_deep(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish) {
  const int combining = static_cast<int>(std::min<int64_t>(p.total_q * p.num_heads, kMaxDeepPairs));
  const dim3 grid(static_cast<unsigned>(combining + (finish ? finish_blocks(p) : 0)));
  if (p.head_dim == 128) {
    combine_deep_kernel<Elem, 1><<<grid, kCombineThreads, 0, stream>>>(p, splits, combining);
  } else {
    combine_deep_kernel<Elem, 2><<<grid, kCombineThreads, 0, stream>>>(p, splits, combining);
  }
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_combine(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish) {
  const int64_t pairs = p.total_q * p.num_heads;
  if ((p.head_dim == 128 || p.head_dim == 256) && pairs <= kMaxDeepPairs && splits.num_splits >= kMinDeepSplits) {
    return launch_deep<Elem>(p, splits, stream, finish);
  }
  const bool wide = p.head_dim >= 128 && pairs <= kMaxWidePairs;
  return wide ? launch_combine<Elem, kWideGroup>(p, splits, stream, finish)
              : launch_combine<Elem, 8>(p, splits, stream, finish);
}

}  // namespace

cudaError_t combine_splits(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish) {
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
  if (splits.num_splits <= 1) return finish ? finish_rows(p, stream) : cudaSuccess;  // nothing to combine
  if (p.batch == 0 && !finish) return cudaSuccess;  // no row to combine; finish_rows writes them all
  return p.dtype == ScalarType::kFloat16 ? launch_combine<__half>(p, splits, stream, finish)
                                         : launch_combine<__nv_bfloat16>(p, splits, stream, finish);
}

}  // namespace dmattn::cuda
