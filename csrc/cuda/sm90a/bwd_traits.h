// bwd_traits.h: the sm90a backward's tile, MMAs, shared-memory layouts and storage (BwdTraits) and its TMA
// descriptors (BwdTma), for bwd_kernel.cuh, its launcher and the host-compiled layout check
// (tests/host/sm90a_bwd_layouts.cu). The design is in bwd_kernel.cuh's opening comment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "../bwd/bwd_common.cuh"

namespace dmattn::cuda::sm90a {

template <typename Elem_, int kHeadDim_>
struct BwdTraits {
  using Elem = Elem_;
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __nv_bfloat16>, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = bwd::CtaOrder::kTileRows;  // query rows per tile: 64
  static constexpr int kBlockN = bwd::CtaOrder::kTileKeys;  // key slots per CTA: 128, 64 per consumer warpgroup
  static constexpr int kStages = 2;    // query tiles in flight
  static constexpr int kThreads = 384;
  static constexpr int kConsumerThreads = 256;
  static constexpr int kGatherThreads = 96;  // producer warps 1-3
  // dQ = dS K per consumer warpgroup: at D = 128 half of D (one 128-byte swizzle atom of K^T) over all the CTA's keys;
  // at D = 64 all of D over its own 64 keys (both warpgroups add into the same rows).
  static constexpr bool kDqSplitsD = kHeadDim >= 128;
  static constexpr int kDqCols = kDqSplitsD ? kHeadDim / 2 : kHeadDim;
  static constexpr int kDqKeys = kDqSplitsD ? kBlockN : 64;
  static constexpr int kDqStride = kDqCols + 8;  // floats per staged dQ row: 16-byte aligned, no bank conflict
  static_assert(kDqCols == bwd::DqTiles::kCols, "a warpgroup's dQ part is one column block of dq_accum's tiles");
  // dS^T buffers: a tile's dQ product runs one computed tile late (the kernel's comment), so three are in use at once:
  // the tile being written, the one its dQ reads, and the one the other warpgroup's late dQ may still read.
  static constexpr int kDsBuffers = 3;
  static_assert(kHeadDim == 64 || kHeadDim == 128, "the swizzle atom is 64 elements wide");

  using Tile64 = cute::Int<64>;
  using M = cute::Int<kBlockM>;
  using N = cute::Int<kBlockN>;
  using D = cute::Int<kHeadDim>;
  using DqCols = cute::Int<kDqCols>;
  using DqKeys = cute::Int<kDqKeys>;
  using Stages = cute::Int<kStages>;
  using DsBuffers = cute::Int<kDsBuffers>;

  // One consumer warpgroup's products (M = its 64 keys, except dQ's M = the tile's queries).
  using MmaSdP = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<CuteElem, CuteElem, float, cute::Shape<Tile64, M, D>>()));
  using MmaDkv = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<CuteElem, CuteElem, float, cute::Shape<Tile64, D, M>, cute::GMMA::Major::K,
                                 cute::GMMA::Major::MN>()));
  using MmaDq = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<CuteElem, CuteElem, float, cute::Shape<M, DqCols, DqKeys>, cute::GMMA::Major::MN,
                                 cute::GMMA::Major::MN>()));

  // K, V: (keys, D); Q, dO: (queries, D, stage); dS^T: (keys, queries, buffer). Each in the 128-byte-swizzled K-major
  // layout, and read transposed through a view of the same bytes: K^T (D, keys), Q^T / dO^T (D, queries, stage), dS
  // (queries, keys, buffer).
  using SmemLayoutKV = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CuteElem>{}, cute::Shape<N, D>{}));
  using SmemLayoutKt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_ordered_layout(cute::Shape<D, N>{}, cute::Step<cute::_2, cute::_1>{})));
  using SmemLayoutQ =
      decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CuteElem>{}, cute::Shape<M, D, Stages>{}));
  using Transposed = cute::Step<cute::_2, cute::_1, cute::_3>;  // the first two modes swapped (the buffer mode last)
  using SmemLayoutQt =
      decltype(cute::composition(SmemLayoutQ{}, cute::make_ordered_layout(cute::Shape<D, M, Stages>{}, Transposed{})));
  using SmemLayoutDst =
      decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CuteElem>{}, cute::Shape<N, M, DsBuffers>{}));
  using SmemLayoutDs = decltype(cute::composition(
      SmemLayoutDst{}, cute::make_ordered_layout(cute::Shape<M, N, DsBuffers>{}, Transposed{})));

  // The TMA copies of Q and dO: (rows, D, heads) with the call's strides, a (kBlockM, D) box.
  using GmemLayout = cute::Layout<cute::Shape<int32_t, int32_t, int32_t>, cute::Stride<int64_t, cute::_1, int64_t>>;
  using TmaRows = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{},
      cute::make_tensor(cute::make_gmem_ptr(static_cast<const CuteElem*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutQ{}), cute::Shape<M, D>{}, cute::_1{}));

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  using RowPipeline = cutlass::PipelineAsync<kStages>;
  static constexpr uint32_t kTileBytes = kBlockM * kHeadDim * sizeof(Elem);
  static_assert(bwd::CtaOrder::kTileRows == kBlockM, "bwd::RowStatsTma's windows are of kBlockM rows");
  static constexpr uint32_t kStatsBytes = bwd::RowStatsTma::kWindowBytes;  // one of lse, delta of a tile (kRowTma)

  // Per query tile row, written by the producer's threads: the key positions [low, limit) it sees, its lse in base 2
  // (+inf: sees nothing) and delta.
  struct RowStats {
    int32_t low[kBlockM], limit[kBlockM];
    float lse2[kBlockM], delta[kBlockM];
  };
  // kRowTma: the window of the same rows' lse in base 2 and delta (bwd::RowStatsTma: tile row i at window_offset +
  // i), as the bulk copies brought them from BwdParams::row_stats; the consumers find each row's keys from its index.
  struct TmaRowStats {
    alignas(128) float lse2[bwd::RowStatsTma::kWindow];
    alignas(128) float delta[bwd::RowStatsTma::kWindow];
  };
  static_assert(sizeof(TmaRowStats) <= sizeof(RowStats), "the bulk copies' windows take no more shared memory");
  union StageStats {
    RowStats rows;
    TmaRowStats tma;
  };

  struct SharedStorage {
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutKV>, 1024> v;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutQ>, 1024> dout;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutDst>, 1024> ds;
    // Each consumer warpgroup's dQ part of the tile, for the reduce-adds: rows of kDqStride floats (BwdParams::dq_tiles
    // false), or the first kBlockM x kDqCols floats as rows in bwd::DqTiles' order (true; 2 x 4 KiB of padding unused
    // while both paths share the kernel).
    alignas(128) float dq[2][kBlockM][kDqStride];
    alignas(128) StageStats stats[kStages];         // the row statistics of the tile in each stage (kRowTma: bulk copies)
    int32_t key_pos[kBlockN];  // the slots' key positions (INT_MAX past the last)
    // BwdParams::walk_tile_major (bwd::TileMajorWalk): per query head hh of the group and slot, the key's bias in base
    // 2 and whether head hh sees it (bit hh of key_heads), written by the gather warps; and its bias gradient so far,
    // summed over the quad by the slot's thread of lane t == 0 (the only one to touch it) and stored at the CTA's end.
    float key_bias2[bwd::TileMajorWalk::kMaxGroup][kBlockN];
    float key_dbias[bwd::TileMajorWalk::kMaxGroup][kBlockN];
    uint8_t key_heads[kBlockN];
    static_assert(bwd::TileMajorWalk::kMaxGroup <= 8, "key_heads holds a bit per head");
    uint32_t live_heads;       // bit hh: query head hh of the KV group sees some key of the CTA (a mask read per key)
    typename Pipeline::SharedStorage pipe_q, pipe_do;  // Q (+ lse) and dO (+ delta): two rings, stage n % 2 each
    typename RowPipeline::SharedStorage pipe_rows;
    alignas(8) uint64_t kv_full;  // K, V and the positions gathered (kGatherThreads arrivals)
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
  static_assert(kSmemBytes <= 227 * 1024, "one CTA per SM: the opt-in limit of shared memory per block on sm_90");
};

// The kernel's TMA descriptors: Q and dO.
template <typename Traits>
struct BwdTma {
  typename Traits::TmaRows q, dout;
};

}  // namespace dmattn::cuda::sm90a
