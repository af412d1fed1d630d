// bwd_launch.cuh: the sm90a backward's launcher (bwd_kernel.cuh), called by ../run_varlen_bwd.cu after the passes
// both backwards share (delta_kernel, compact_keys) and its CTA order (bwd::CtaOrder): bwd_kernel over a 1-D grid of
// (sequence, KV head, key tile of 128 slots) units in that order, longest first (in bands of a pair's key tiles with
// BwdParams::order_band > 1); without it (DMATTN_BWD_ORDER=grid, more units than one CTA sorts, or no more than one
// wave) over (KV heads, sequences, key tiles), the key tile slowest so that under a causal mask the first key tiles,
// which every later query sees, start first. dQ comes out in BwdParams::dq_accum (float32,
// zero-filled): on the tile path unscaled, in bwd::DqTiles' order, turned into dq by run_varlen_bwd.cu's conversion
// kernel; on the rows path (DMATTN_BWD_DQ_STORE=rows) scaled, (total_q, H, D), which the binding converts.
// Included by the generated instantiation files (tools/kernel_matrix.py, BACKWARD), compiled for sm_90a only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "bwd_kernel.cuh"

namespace dmattn::cuda::sm90a {

// The TMA view of q or dout: (rows, D, heads) with the call's strides (elements).
template <typename Traits>
typename Traits::TmaRows make_row_tma(const void* ptr, int64_t rows, int32_t heads, int64_t row_stride,
                                      int64_t head_stride) {
  using namespace cute;
  constexpr int D = Traits::kHeadDim;
  auto gmem = make_tensor(
      make_gmem_ptr(static_cast<const typename Traits::CuteElem*>(ptr)),
      make_layout(make_shape(static_cast<int32_t>(rows), D, heads), make_stride(row_stride, _1{}, head_stride)));
  return make_tma_copy(SM90_TMA_LOAD{}, gmem, take<0, 2>(typename Traits::SmemLayoutQ{}),
                       Shape<typename Traits::M, typename Traits::D>{}, _1{});
}

// The kernel of a call's variant: kSoftcap, kDeadHeads and kRowTma as runtime flags.
template <typename Traits, bool kSoftcap>
auto backward_kernel(bool dead_heads, bool row_tma) {
  return dead_heads ? (row_tma ? bwd_kernel<Traits, kSoftcap, true, true> : bwd_kernel<Traits, kSoftcap, true, false>)
                    : (row_tma ? bwd_kernel<Traits, kSoftcap, false, true> : bwd_kernel<Traits, kSoftcap, false, false>);
}

template <typename Elem, int kHeadDim>
cudaError_t launch_backward(const bwd::BwdParams& p, cudaStream_t stream) {
  using Traits = BwdTraits<Elem, kHeadDim>;
  if (p.dq_accum == nullptr || p.f.head_dim != kHeadDim) return cudaErrorInvalidValue;
  // the tile-major walk's tables hold TileMajorWalk::kMaxGroup query heads per KV head (the binding checks fits)
  if (p.walk_tile_major && !bwd::TileMajorWalk::fits(p.f.num_heads, p.f.num_heads_k)) return cudaErrorInvalidValue;
  // A key-side mask read per key (no kept-key lists), at most 32 query heads per KV head (live_heads is one word):
  // the kernel that skips the query heads seeing none of a CTA's keys (bwd_kernel.cuh, kDeadHeads).
  const bool dead_heads = p.f.mask.layout == OperandLayout::kKeySide && p.keys.index == nullptr &&
                          p.f.num_heads / p.f.num_heads_k <= 32;
  const bool softcap = p.f.softcap > 0.f;
  // lse and delta by bulk copies where delta_kernel wrote them into row_stats (else the producer threads read them)
  const bool row_tma = !p.row_stats_threads && bwd::RowStatsTma::fits(p);
  auto kernel = softcap ? backward_kernel<Traits, true>(dead_heads, row_tma)
                        : backward_kernel<Traits, false>(dead_heads, row_tma);
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
  if (err != cudaSuccess) return err;
  BwdTma<Traits> tma{};
  tma.q = make_row_tma<Traits>(p.f.q, p.f.total_q, p.f.num_heads, p.f.q_row_stride, p.f.q_head_stride);
  tma.dout = make_row_tma<Traits>(p.dout, p.f.total_q, p.f.num_heads, p.dout_row_stride, p.dout_head_stride);
  if (p.cta_order != nullptr) {  // units <= CtaOrder::kMaxUnits, far below grid.x's 2^31 - 1
    const auto units = static_cast<unsigned>(bwd::CtaOrder::units(p.f));
    if (units == 0) return cudaErrorInvalidValue;  // the binding sets cta_order only where there are units
    kernel<<<units, Traits::kThreads, Traits::kSmemBytes, stream>>>(p, tma, 0, 0);
    return cudaGetLastError();
  }
  constexpr int64_t kMaxGridYZ = 65535;  // sequences are grid.y, key tiles grid.z
  const int64_t key_tiles = (p.f.max_seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
  for (int64_t seq0 = 0; seq0 < p.f.batch; seq0 += kMaxGridYZ) {
    const auto seqs = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, p.f.batch - seq0));
    for (int64_t tile0 = 0; tile0 < key_tiles; tile0 += kMaxGridYZ) {
      const auto tiles = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, key_tiles - tile0));
      kernel<<<dim3(p.f.num_heads_k, seqs, tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, tma, static_cast<int>(seq0), static_cast<int>(tile0));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

}  // namespace dmattn::cuda::sm90a
