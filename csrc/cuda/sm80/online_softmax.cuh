// online_softmax.cuh: the running row max and row sum of a query tile, in registers, updated once per KV tile.
//
// Scores are kept in natural units (scale * q.k + bias) and exponentiated as exp2((s - max) * log2 e). The fused
// form exp2(fma(s, log2 e, -round(max * log2 e))) saves an instruction, but its error, the rounding of max * log2 e,
// grows with |max| (and overflows past FLT_MAX / log2 e): about |max| * 2^-24, a common factor of the row's weights
// that shows in lse and, when the max moves, in out. So only rows with |max| <= kFusedExpLimit take it (error under
// 1e-4); others (a bias of 1e30 or finfo.min on every key, say) take the unfused form, exact for the max itself.
// The choice is per row, so a row's result never depends on the other rows of its warp: while every row of the warp
// may take the fused form (almost always) the warp runs it alone; otherwise each row picks its own form.
// Both forms turn a +inf or NaN score into a NaN row sum (a NaN row).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <type_traits>

namespace dmattn::cuda::sm80 {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kFusedExpLimit = 1024.f;

// Rows are (mt, half): row warp_row0 + 16 mt + g + 8 half of the warp's accumulator fragments; the four lanes of a
// quad share a row and each holds a quarter of its columns.
template <int kMTiles, int kNTiles>
struct OnlineSoftmax {
  float row_max[kMTiles][2];  // -inf until the row sees a key
  float row_sum[kMTiles][2];  // this lane's share of sum exp(score - row_max)

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
      row_max[mt][0] = row_max[mt][1] = -INFINITY;
      row_sum[mt][0] = row_sum[mt][1] = 0.f;
    }
  }

  // One KV tile: s (scores times score_mul > 0, -inf where hidden) becomes P = exp(s * score_mul - new max), the
  // row sums take it in, and o (kDTiles n8 fragments per m16 fragment) is rescaled by exp(old max - new max).
  // Row maxima first, then the exponentials of every row in one straight run (so the MUFU latency of one row hides
  // behind the others), in the fused form where the whole warp may take it, else in each row's own form.
  template <int kDTiles>
  __device__ __forceinline__ void update(float (&s)[kMTiles][kNTiles][4], float score_mul,
                                         float (&o)[kMTiles][kDTiles][4]) {
    float alpha[kMTiles][2];
    if (update_scores(s, score_mul, alpha)) rescale(o, alpha);
  }

  // update() in two halves, for a kernel whose O is still being accumulated when the next tile's scores are ready
  // (the sm90a kernel overlaps them): update_scores turns s into P and takes it into the row sums, leaving in alpha
  // each row's factor exp(old max - new max) for O, and says whether some row of the warp needs it; rescale applies it.
  __device__ __forceinline__ bool update_scores(float (&s)[kMTiles][kNTiles][4], float score_mul,
                                                float (&alpha)[kMTiles][2]) {
    float base_log2[kMTiles][2];
    bool max_moved = false, fused = true, row_fused[kMTiles][2];
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2)) * score_mul;  // score_mul > 0 keeps the max
        const float new_max = fmaxf(row_max[mt][half], mx);
        const float base = new_max == -INFINITY ? 0.f : new_max;  // a row with nothing visible yet stays at 0
        base_log2[mt][half] = base * kLog2e;  // inf when |base| > kFusedExpLimit: then the unfused form runs
        alpha[mt][half] = exp2f((row_max[mt][half] - base) * kLog2e);  // old max <= base: no overflow
        max_moved |= new_max != row_max[mt][half];
        // A row with a +inf max is NaN on either form, so either will do.
        row_fused[mt][half] = fabsf(base) <= kFusedExpLimit || base == INFINITY;
        fused &= row_fused[mt][half];
        row_max[mt][half] = new_max;
      }
    }
    const float mul_log2 = score_mul * kLog2e;
    auto exponentiate = [&](auto warp_fused) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const bool fused_form = decltype(warp_fused)::value || row_fused[mt][half];
          const float base = row_max[mt][half] == -INFINITY ? 0.f : row_max[mt][half];  // for the unfused form
          float sum = 0.f;
#pragma unroll
          for (int e = 0; e < 2 * kNTiles; ++e) {
            float& x = s[mt][e / 2][2 * half + e % 2];
            x = exp2f(fused_form ? fmaf(x, mul_log2, -base_log2[mt][half]) : (x * score_mul - base) * kLog2e);
            sum += x;
          }
          row_sum[mt][half] = row_sum[mt][half] * alpha[mt][half] + sum;
        }
      }
    };
    if (__all_sync(0xffffffffu, fused)) {
      exponentiate(std::true_type{});
    } else {
      exponentiate(std::false_type{});
    }
    // Once the row maxima settle (most tiles after the first few), no row of the warp needs rescaling.
    return __any_sync(0xffffffffu, max_moved);
  }

  template <int kDTiles>
  __device__ __forceinline__ void rescale(float (&o)[kMTiles][kDTiles][4], const float (&alpha)[kMTiles][2]) const {
#pragma unroll
    for (int mt = 0; mt < kMTiles; ++mt)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[mt][dt][0] *= alpha[mt][0];
        o[mt][dt][1] *= alpha[mt][0];
        o[mt][dt][2] *= alpha[mt][1];
        o[mt][dt][3] *= alpha[mt][1];
      }
  }

  // The whole row's sum of exp(score - row_max), reduced over the quad (called by every lane).
  __device__ __forceinline__ float row_total(int mt, int half) const {
    float l = row_sum[mt][half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return l;
  }
};

// A row's end: its max m and sum l of exp(score - m) (l = 0: it saw no key; NaN: a NaN or +inf score) with the head's
// sink logit joined (-inf: no sink, VarlenFwdParams::sinks): inv, what its unnormalized O is multiplied by, and its
// lse. No key: out 0, lse = sink. A NaN or +inf sink makes the row NaN.
struct RowEnd {
  float inv;
  float lse;
};

__device__ __forceinline__ RowEnd finish_row(float m, float l, bool poisoned, float sink) {
  const float nan = __int_as_float(0x7fc00000);
  if (l == 0.f) {
    const bool bad_sink = sink != sink || sink == INFINITY;
    return {poisoned || bad_sink ? nan : 0.f, bad_sink ? nan : sink};
  }
  if (sink == -INFINITY) return {poisoned ? nan : 1.f / l, m + logf(l)};
  const float top = fmaxf(m, sink);  // m is finite or NaN here; a NaN m keeps l NaN, so the total is NaN
  const float f = exp2f((m - top) * kLog2e);
  const float total = l * f + exp2f((sink - top) * kLog2e);
  return {poisoned ? nan : f / total, top + logf(total)};
}

}  // namespace dmattn::cuda::sm80
