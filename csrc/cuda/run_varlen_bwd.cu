// run_varlen_bwd.cu: the fused backward on one stream (api.h): delta_kernel, compact_keys where the call has kept-key
// lists (BwdParams::keys; the forward's pass, key_compaction.cu), dkdv_kernel, then dq_kernel unless dkdv_kernel adds
// dQ itself (bwd/bwd_traits.h), for float16 / bfloat16 at head dims 64 and 128, with and without a softcap. The
// kernels are the sm80 path's mma.sync code, compiled for every architecture of the build. Calls the binding plans
// for the sm90a backward go, after delta_kernel, compact_keys and the order of its CTAs (order_ctas_kernel), to its
// generated dispatch (dispatch.h, dispatch_backward) instead of the pair, then, where its dQ is in tiles
// (BwdParams::dq_tiles), to dq_convert_kernel.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "api.h"
#include "dispatch.h"
#include "longest_first.cuh"
#include "bwd/delta_kernel.cuh"
#include "bwd/dq_convert.cuh"
#include "bwd/dkdv_kernel.cuh"
#include "bwd/dq_kernel.cuh"

namespace dmattn::cuda {
namespace {

constexpr int64_t kMaxGridYZ = 65535;  // sequences are grid.y, tiles grid.z

// The sm90a backward's units (bwd::CtaOrder), longest first, into p.cta_order: a unit's work is its query tiles per
// head (bwd::key_tile, as the kernel computes them; times the group's query heads, the same for every unit, so left
// out), from the kept-key lists where the call has them (hence after compact_keys). With p.order_band > 1 in runs of
// that many key tiles of one (sequence, KV head), each ranked by its longest tile and launched in tile order (a band:
// CtaOrder). One CTA, a few microseconds.
constexpr int kOrderThreads = 1024;
constexpr int kOrderPerThread = static_cast<int>(bwd::CtaOrder::kMaxUnits / kOrderThreads);
static_assert(kOrderPerThread * kOrderThreads == bwd::CtaOrder::kMaxUnits, "every unit has a thread");

__global__ void __launch_bounds__(kOrderThreads)
order_ctas_kernel(const __grid_constant__ bwd::BwdParams p, int units) {
  const int group = p.f.num_heads / p.f.num_heads_k;
  const int pairs = p.f.batch * p.f.num_heads_k;  // <= units <= kMaxUnits
  const int band = min(max(p.order_band, 1), bwd::CtaOrder::kMaxBand);
  auto tiles = [&](int u) {
    int hk, b, tile;
    bwd::CtaOrder::coords(p.f, u, hk, b, tile);
    const bwd::Seq s(p.f, b);
    const bwd::KeySlots ks(p, s, b, hk * group);
    return bwd::key_tile<bwd::CtaOrder::kTileRows, bwd::CtaOrder::kTileKeys>(p.f, s, ks, tile).tiles_per_head;
  };
  auto width = [&](int r) { return bwd::CtaOrder::run_width(r, units, pairs, band); };
  auto longest = [&](int r) {  // the run's longest tile (under causality its first)
    int most = 0;
    for (int k = 0; k < width(r); ++k) most = max(most, tiles(bwd::CtaOrder::run_unit(r, k, pairs, band)));
    return most;
  };
  auto emit = [&](int r, int at) {
    for (int k = 0; k < width(r); ++k) p.cta_order[at + k] = bwd::CtaOrder::run_unit(r, k, pairs, band);
  };
  order_runs_longest_first<kOrderThreads, kOrderPerThread>(bwd::CtaOrder::runs(units, pairs, band), longest, width,
                                                           emit);
}

template <typename Elem, int kHeadDim, bool kSoftcap>
cudaError_t launch_bwd(const bwd::BwdParams& p, cudaStream_t stream) {
  using Traits = bwd::BwdTraits<Elem, kHeadDim>;
  constexpr int kBlock = Traits::kBlockM;
  auto dkdv = bwd::dkdv_kernel<Traits, kSoftcap>;
  auto dq = bwd::dq_kernel<Traits, kSoftcap>;
  cudaError_t err;
  for (auto kernel : {dkdv, dq}) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Traits::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  const int64_t key_tiles = (p.f.max_seqlen_k + kBlock - 1) / kBlock;
  const int64_t query_tiles = p.dq_accum == nullptr ? (p.f.max_seqlen_q + kBlock - 1) / kBlock : 0;
  // Grids (heads, sequences, tiles): sequences and tiles in chunks of the grid's y / z limit.
  for (int64_t seq0 = 0; seq0 < p.f.batch; seq0 += kMaxGridYZ) {
    const auto seqs = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, p.f.batch - seq0));
    for (int64_t tile0 = 0; tile0 < key_tiles; tile0 += kMaxGridYZ) {
      const auto tiles = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, key_tiles - tile0));
      dkdv<<<dim3(p.f.num_heads_k, seqs, tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<int>(seq0), static_cast<int>(tile0));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    for (int64_t tile0 = 0; tile0 < query_tiles; tile0 += kMaxGridYZ) {
      const auto tiles = static_cast<unsigned>(std::min<int64_t>(kMaxGridYZ, query_tiles - tile0));
      dq<<<dim3(p.f.num_heads, seqs, tiles), Traits::kThreads, Traits::kSmemBytes, stream>>>(
          p, static_cast<int>(seq0), static_cast<int>(tile0));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
  }
  return cudaSuccess;
}

// What both backwards run first: delta_kernel, then the kept-key lists where the call has them (compact_keys); then
// the sm90a backward where the binding planned it (its CTA order where the binding asked for one, then dispatch.h,
// dispatch_backward, then dq from its float32 tiles where BwdParams::dq_tiles), else the sm80 pair.
template <typename Elem, int kHeadDim>
cudaError_t launch_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  cudaError_t err;
  const int64_t items = p.f.total_q * p.f.num_heads;
  if (items > 0) {
    constexpr int kPerBlock = bwd::kDeltaItemsPerBlock<kHeadDim>;
    const auto blocks = static_cast<unsigned>((items + kPerBlock - 1) / kPerBlock);
    bwd::delta_kernel<bwd::BwdTraits<Elem, kHeadDim>><<<blocks, bwd::kDeltaWarps * 32, 0, stream>>>(p);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if ((err = compact_keys(p.f, p.keys, stream)) != cudaSuccess) return err;  // nothing without lists
  if (sm90a) {
    if (p.cta_order != nullptr) {  // the binding sets it where units(...) > 0
      order_ctas_kernel<<<1, kOrderThreads, 0, stream>>>(p, static_cast<int>(bwd::CtaOrder::units(p.f)));
      if ((err = cudaGetLastError()) != cudaSuccess) return err;
    }
    if ((err = dispatch_backward(cc, p, stream)) != cudaSuccess) return err;
    return p.dq_tiles ? bwd::launch_dq_convert<Elem, kHeadDim>(p, stream) : cudaSuccess;
  }
  if (p.dq_tiles) return cudaErrorInvalidValue;  // the pair adds dQ in rows only
  return p.f.softcap > 0.f ? launch_bwd<Elem, kHeadDim, true>(p, stream) : launch_bwd<Elem, kHeadDim, false>(p, stream);
}

template <typename Elem>
cudaError_t launch_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  switch (p.f.head_dim) {
    case 64:
      return launch_bwd<Elem, 64>(p, cc, sm90a, stream);
    case 128:
      return launch_bwd<Elem, 128>(p, cc, sm90a, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace

cudaError_t run_varlen_bwd(const bwd::BwdParams& p, ComputeCapability cc, bool sm90a, cudaStream_t stream) {
  if (p.f.batch == 0 || p.f.num_heads == 0 || p.f.total_q == 0) return cudaSuccess;
  return p.f.dtype == ScalarType::kBFloat16 ? launch_bwd<__nv_bfloat16>(p, cc, sm90a, stream)
         : p.f.dtype == ScalarType::kFloat16 ? launch_bwd<__half>(p, cc, sm90a, stream)
                                             : cudaErrorInvalidValue;
}

}  // namespace dmattn::cuda
