// split_combine.cu: the decode kernel's key splits merged into out and lse (passes.h, SplitPartials), as a launch of
// its own after the decode kernel: each (query row, head) pair by a group of lanes, or for calls of few pairs over
// many splits by a CTA. The per-pair arithmetic (the weights, the contract's special rows, the sink) is
// split_merge.cuh's, which the decode kernel's last split CTA of a unit runs too where it merges its own splits
// (FwdPlan::combine_in_kernel).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "heuristics.h"
#include "passes.h"
#include "row_contract.cuh"
#include "split_merge.cuh"

namespace dmattn::cuda {
namespace {

// Each (query row, head) pair by the lane group or the CTA that combine_lanes (passes.h) picks: eight lanes (a batch
// of decode rows is one wave of CTAs, where a warp per pair needed two), a warp (few rows: a long context, 18 rows x
// 32 heads over 80 splits, still spread over the GPU) or a CTA (few pairs over many splits: combine_deep_kernel, its
// eight warps sharing the splits, where a warp per pair left the long-context batch four warps per SM).
constexpr int kCombineThreads = 256;
constexpr int kDeepWarps = kCombineThreads / 32;
using split_merge::add_weighted;
using split_merge::group_reduce;
using split_merge::load_partial_if;
using split_merge::pair_totals;
using split_merge::PairTotals;
using split_merge::split_weight;
using split_merge::store_pair;

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
  // The loop runs warp by warp (the shuffles need every lane of the warp); a group past the last pair idles along.
  for (int64_t warp_pair = static_cast<int64_t>(blockIdx.x) * kPairsPerBlock + threadIdx.x / 32 * (32 / kGroup);
       warp_pair < pairs; warp_pair += static_cast<int64_t>(combining) * kPairsPerBlock) {
    const int64_t pair = warp_pair + threadIdx.x % 32 / kGroup;
    const bool mine = pair < pairs;
    const int64_t row = mine ? pair / p.num_heads : 0;
    const int h = mine ? static_cast<int>(pair % p.num_heads) : 0;
    const int64_t at = static_cast<int64_t>(h) * p.total_q + row;  // split 0's index of the pair
    // Passes 1 and 2 read the pair's maxima and sums; pass 3 reads them again from L1, and O past it.
    const split_merge::PairPartials pp{sp.max + at, sp.sum + at, split_stride,
                                       reinterpret_cast<const float4*>(sp.o + at * p.head_dim),
                                       split_stride * p.head_dim / 4, row, h};
    split_merge::merge_pair<Elem, kGroup, kVecs, false>(p, pp, sp.num_splits, mine, gl);
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
        for (int v = 0; v < kVecs; ++v) o[u][v] = load_partial_if<false>(o_s + s * o_stride + v * 32, l_s != 0.f);
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
    case 32: launch(combine_splits_kernel<Elem, kCombineLanes, 1>); break;
    case 64: launch(combine_splits_kernel<Elem, kCombineLanes, 2>); break;
    case 96: launch(combine_splits_kernel<Elem, kCombineLanes, 3>); break;
    case 128: launch(combine_splits_kernel<Elem, kGroup, kVecs>); break;
    case 256: launch(combine_splits_kernel<Elem, kGroup, 2 * kVecs>); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

template <typename Elem>
cudaError_t launch_deep(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish) {
  const int combining = static_cast<int>(std::min<int64_t>(p.total_q * p.num_heads, kMaxDeepCombinePairs));
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
  switch (combine_lanes(p, splits.num_splits)) {
    case 0: return launch_deep<Elem>(p, splits, stream, finish);
    case kCombineWideLanes: return launch_combine<Elem, kCombineWideLanes>(p, splits, stream, finish);
    default: return launch_combine<Elem, kCombineLanes>(p, splits, stream, finish);
  }
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
