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

namespace dmattn::cuda {
namespace {

constexpr int kCombineThreads = 256;
constexpr int kRowsPerBlock = kCombineThreads / 32;  // one warp per (query row, head)
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

// One warp per (query row, head), grid-stride. Lane i holds the max and sum of splits i, i + 32, ...
// (kMaxDecodeSplits = 128: four registers each); the O pass shuffles each split's weight to the whole warp and keeps
// four O loads in flight.
// Rows past cu_seqlens_q[B] are finish_rows' (the decode kernel wrote no partials for them).
constexpr int kLsePerLane = 4;
static_assert(kLsePerLane * 32 >= kMaxDecodeSplits, "every split has a lane");

template <typename Elem>
__global__ void __launch_bounds__(kCombineThreads)
combine_splits_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ SplitPartials sp) {
  const int lane = threadIdx.x % 32;
  const int64_t owned = std::min<int64_t>(std::max<int32_t>(p.cu_seqlens_q[p.batch], 0), p.total_q);
  const int64_t split_stride = static_cast<int64_t>(p.num_heads) * p.total_q;  // rows between splits
  const float nan_value = __int_as_float(0x7fc00000);
  for (int64_t pair = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
       pair < owned * p.num_heads; pair += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = pair / p.num_heads;
    const int h = static_cast<int>(pair % p.num_heads);
    const float* max_s = sp.max + static_cast<int64_t>(h) * p.total_q + row;
    const float* sum_s = sp.sum + static_cast<int64_t>(h) * p.total_q + row;

    // The max over the splits, and whether any max or sum is NaN (fmaxf would drop it). A split that saw nothing
    // wrote no sum.
    float mine[kLsePerLane], sums[kLsePerLane];
    float m = -INFINITY;
    bool nan = false;
#pragma unroll
    for (int i = 0; i < kLsePerLane; ++i) {
      const int s = lane + 32 * i;
      mine[i] = s < sp.num_splits ? max_s[s * split_stride] : -INFINITY;
      sums[i] = mine[i] == -INFINITY ? 0.f : sum_s[s * split_stride];
      nan |= mine[i] != mine[i] || sums[i] != sums[i];
      m = fmaxf(m, mine[i]);
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    // The head's sink joins the denominator once, as a split of lse = sink and O = 0 (the decode kernel's splits
    // leave it out).
    const float sink = p.sink(h);
    nan = __any_sync(0xffffffffu, nan) || sink != sink || sink == INFINITY;
    m = fmaxf(m, sink);
    float total = 0.f;
#pragma unroll
    for (int i = 0; i < kLsePerLane; ++i) {
      mine[i] = nan ? 0.f : split_weight(mine[i], sums[i], m);  // from here on: each split's weight
      total += mine[i];
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) total += __shfl_xor_sync(0xffffffffu, total, off);
    total += split_weight(sink, 1.f, m);
    const float lse = nan ? nan_value : m == -INFINITY ? -INFINITY : m + logf(total);
    const float inv_total = m == -INFINITY ? 0.f : 1.f / total;

    Elem* out = static_cast<Elem*>(p.out) + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
    const float* o_s = sp.o + (static_cast<int64_t>(h) * p.total_q + row) * p.head_dim;
    for (int col = 2 * lane; col < p.head_dim; col += 64) {
      float x0 = nan_value, x1 = nan_value;
      if (!nan) {
        x0 = x1 = 0.f;
#pragma unroll
        for (int i = 0; i < kLsePerLane; ++i) {
          if (32 * i >= sp.num_splits) break;
#pragma unroll 4
          for (int src = 0; src < 32; ++src) {
            const int s = 32 * i + src;
            const float w = __shfl_sync(0xffffffffu, mine[i], src) * inv_total;
            const float saw = __shfl_sync(0xffffffffu, sums[i], src);
            // A split that saw nothing wrote no O; one that weighs 0 still brings a NaN O (a poisoned row) along.
            if (s >= sp.num_splits || saw == 0.f) continue;
            const float2 v = *reinterpret_cast<const float2*>(o_s + s * split_stride * p.head_dim + col);
            x0 += w * v.x;
            x1 += w * v.y;
          }
        }
      }
      store_pair<Elem>(out + col, x0, x1);
    }
    if (lane == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = lse;
  }
}

}  // namespace

cudaError_t combine_splits(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream) {
  if (splits.num_splits <= 1 || p.total_q == 0 || p.num_heads == 0 || p.batch == 0) return cudaSuccess;
  // One pass over the rows up to 64k CTAs; past that the warps stride (the kernel reads the row count on the device).
  const int64_t blocks = (p.total_q * p.num_heads + kRowsPerBlock - 1) / kRowsPerBlock;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(blocks, 65535)));
  if (p.dtype == ScalarType::kFloat16) {
    combine_splits_kernel<__half><<<grid, kCombineThreads, 0, stream>>>(p, splits);
  } else {
    combine_splits_kernel<__nv_bfloat16><<<grid, kCombineThreads, 0, stream>>>(p, splits);
  }
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
