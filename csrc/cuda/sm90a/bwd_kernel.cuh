// bwd_kernel.cuh: the sm90a backward (wgmma + TMA, warp-specialized): dK, dV, the key-side bias gradient and dQ of
// one key tile in one kernel, five products per (key tile, query tile) where the sm80 pair of kernels (../bwd/) needs
// seven. What it runs is planned by the binding (varlen_fwd_cuda.cpp, sm90a_backward): float16 / bfloat16 at head
// dims 64 and 128, with a softcap or not (kSoftcap), no query-side operand, a key-side mask through kept-key lists
// (Hm divides Hk) or read per key (a finer one: the query heads that see none of a CTA's keys are skipped), outside
// torch's deterministic mode (dQ is summed by reduce-adds whose order varies).
//
// A CTA owns kBlockN = 128 key slots of one KV head of one sequence (slot c: key position c, or with kept-key lists
// the c-th key the mask keeps; ../bwd/bwd_common.cuh KeySlots), and walks the query heads of its KV group and, per
// head, the query tiles of kBlockM = 64 rows whose rows a window lets see one of its keys (query_span, bwd::key_tile;
// the launcher runs the CTAs with the most tiles first, bwd::CtaOrder, where the binding ordered them):
//   producer (warpgroup 0)    thread 0 issues the TMA copies of Q and dO of each query tile into a kStages ring
//                             (PipelineTmaAsync) from the start, and on the same barriers bulk copies of its rows'
//                             lse and delta (kRowTma, where bwd::RowStatsTma fits the call); warps 1-3 gather the
//                             CTA's K and V rows once (cp.async into the swizzled tiles, zero past the last slot), then
//                             without kRowTma warps 1-2 write each tile row's visible keys, lse and delta beside its Q
//                             (RowStats, a PipelineAsync ring as deep); with BwdParams::dq_tiles warp 3 then writes dQ
//                             (below)
//   consumers (warpgroups 1-2) each owns 64 of the keys (the M rows of every product but dQ's) and, per query tile:
//     S^T = K Q^T, dP^T = V dO^T              (both operands in shared memory)
//     P^T = exp2(S^T scale log2(e) + bias - lse) on visible pairs, 0 elsewhere
//     dV += P^T dO                              (P^T from registers, dO read transposed: no copy)
//     dS^T = P^T (dP^T - delta), and the key-side bias gradient as each key row's sum of dS^T
//     dK += dS^T Q                              (dS^T from registers)
//     dQ[:, half w] = dS K[:, half w]           (dS^T through shared memory, read transposed; at D = 128 warpgroup w
//                                                takes half of D over all 128 keys, so both must have written their
//                                                dS^T; at D = 64, where half of D would be less than a swizzle atom,
//                                                all of D over its own 64 keys)
//   and stages its float32 dQ part in shared memory, which BwdParams::dq_tiles (the default) has producer warp 3 add
//   into dq_accum with one bulk reduce-add (cp.reduce.async.bulk) per warpgroup and tile, in bwd::DqTiles' layout
//   (run_varlen_bwd's dq_convert then scales and converts it), and otherwise (DMATTN_BWD_DQ_STORE=rows) the
//   warpgroup itself, times the softmax scale, with one per row. A tile's dQ product runs one computed tile late,
//   issued just before the next tile's dK product (so that staging its part runs beside dK's): at D = 128 a warpgroup
//   then waits for the other's dS^T of the tile before (ds_ready, one tile of slack) where a barrier of both
//   warpgroups in every tile would hold them in lockstep, their exponentials and dS passes at the same time and the
//   tensor cores idle through both (run CB).
// The walk: head by head (item j = query tile j % tiles_per_head of head j / tiles_per_head), or with
// BwdParams::walk_tile_major (bwd::TileMajorWalk) from the last query tile down with the group's heads inside each
// tile, so that the CTAs of a band of key tiles (bwd::CtaOrder), launched together, read the same rows of Q, dO and
// dq_accum at about the same time (L2 hits); its per-head key state comes from shared tables.
// dK and dV stay in registers for the CTA's whole walk and are written once, so they need no atomics (GQA included).
// Query rows past the sequence are zeroed in the tile before any product reads them (another sequence's rows could
// hold inf, and 0 x inf is NaN), their P is 0 (RowStats: no visible key), and their dQ is not added.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "../bwd/bwd_common.cuh"
#include "bwd_traits.h"
#include "warpgroups.cuh"

namespace dmattn::cuda::sm90a {

// The named barrier of consumer warpgroup cw alone (ids 0-3: __syncthreads, consumer_sync's and the ping-pong turns of
// warpgroups.cuh).
constexpr int kWarpgroupBarrier = 4;
__device__ __forceinline__ void warpgroup_sync(int cw) {
  asm volatile("bar.sync %0, 128;" ::"r"(kWarpgroupBarrier + cw) : "memory");
}

// The producer's gather warps (1-3) alone: their slot positions are written before any of them reads one.
constexpr int kGatherBarrier = 6;

// At D = 128 a consumer warpgroup's dQ reads the other's dS^T: consumer warpgroup cw arrives on ds_ready(cw, n) once
// it has written computed tile n's dS^T, and the other waits on it (bar.sync: all 256 threads, so it also orders the
// waiting warpgroup's own writes) before it writes tile n + 1's and issues tile n's dQ. Two barriers per warpgroup,
// by the tile's parity: a warpgroup can arrive for tile n + 2 only after waiting for the other's tile n + 1, which the
// other arrived for after waiting on tile n's barrier, so a barrier's phases never mix two tiles.
__device__ __forceinline__ int ds_ready(int cw, int n) { return 7 + 2 * cw + (n & 1); }
__device__ __forceinline__ void ds_arrive(int cw, int n) {
  asm volatile("bar.arrive %0, 256;" ::"r"(ds_ready(cw, n)) : "memory");
}
__device__ __forceinline__ void ds_wait(int cw, int n) {
  asm volatile("bar.sync %0, 256;" ::"r"(ds_ready(cw, n)) : "memory");
}
// Consumer warpgroup 1 issues its first tile's S^T and dP^T once warpgroup 0's S^T has landed, so that one's
// exponentials run beside the other's products from the start (the forward's ping-pong; ds_ready's slack keeps it),
// and again after every partial tile, whose consumer_sync brings the two back into step (on the prefill batch, the
// last tile of nearly every query head). rows is the same in both warpgroups, so the barrier stays paired, and its
// phases cannot mix: warpgroup 0 reaches its next arrival only through the next partial tile's consumer_sync, which
// warpgroup 1 reaches only after its wait on this one.
constexpr int kStaggerBarrier = 11;

// BwdParams::dq_tiles: producer warp 3 (the dQ writer, free after the K / V gather) adds each consumer warpgroup's
// staged dQ part with one bulk reduce-add. dq_empty(cw): the writer has seen that bulk operation read the staging
// (bar.arrive), and warpgroup cw may write it again (bar.sync); dq_full(cw): warpgroup cw has written and fenced it
// (bar.arrive) and the writer may issue the reduce-add (bar.sync). 128 consumer threads and the writer's whole warp.
constexpr int kDqEmptyBarrier = 12;  // + cw
constexpr int kDqFullBarrier = 14;   // + cw
constexpr int kDqBarrierThreads = 128 + 32;
__device__ __forceinline__ void dq_barrier_sync(int id) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(kDqBarrierThreads) : "memory");
}
__device__ __forceinline__ void dq_barrier_arrive(int id) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(kDqBarrierThreads) : "memory");
}

// Stores to shared memory through a shared-window address (a generic pointer into a CuTe tile compiles to a generic
// store, which the hardware must first resolve).
__device__ __forceinline__ void st_shared(void* ptr, uint32_t v) {
  asm volatile("st.shared.b32 [%0], %1;" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(ptr))), "r"(v));
}
__device__ __forceinline__ void st_shared_v4(void* ptr, float a, float b, float c, float d) {
  asm volatile("st.shared.v4.f32 [%0], {%1, %2, %3, %4};" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(ptr))),
               "f"(a), "f"(b), "f"(c), "f"(d));
}
__device__ __forceinline__ void st_shared_zero16(void* ptr) {
  asm volatile("st.shared.v4.b32 [%0], {%1, %1, %1, %1};" ::"r"(static_cast<uint32_t>(__cvta_generic_to_shared(ptr))),
               "r"(0));
}

// The L2 policy of the query tiles' traffic (the 64-bit operand of .L2::cache_hint, as CUTLASS encodes it): Q, dO,
// lse and delta are read, and dq_accum's rows added to, by every CTA of a KV head's key tiles in turn, a few tiles
// apart when their CTAs run together; evict-last keeps those lines in L2 ahead of the K / V gathers and the dK / dV
// stores, which each CTA touches once (FlashAttention-3 marks the same three streams). BwdParams::l2_evict_normal
// (DMATTN_BWD_L2=normal, for A/B runs): the default policy instead.
constexpr uint64_t kEvictLast = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_LAST);
constexpr uint64_t kEvictNormal = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);
__device__ __forceinline__ uint64_t query_l2_policy(const bwd::BwdParams& p) {
  return p.l2_evict_normal ? kEvictNormal : kEvictLast;
}

// bytes (a multiple of 16) of float32 at src (shared memory) added into dst (global) element by element, as one bulk
// operation of this thread's bulk group, its L2 lines under `policy`.
__device__ __forceinline__ void bulk_reduce_add(float* dst, const float* src, uint32_t bytes, uint64_t policy) {
  const uint32_t smem = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.L2::cache_hint.add.f32 [%0], [%1], %2, %3;\n\t"
               "cp.async.bulk.commit_group;" ::"l"(dst),
               "r"(smem), "r"(bytes), "l"(policy)
               : "memory");
}
// This thread's bulk operations have read their shared memory (it may be written again) / are complete.
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
// All but this thread's most recent bulk group have read their shared memory.
__device__ __forceinline__ void bulk_wait_read_but_last() {
  asm volatile("cp.async.bulk.wait_group.read 1;" ::: "memory");
}
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;" ::: "memory"); }

// bytes (a multiple of 16) of global memory at src (16-byte aligned) copied into shared memory at dst (16-byte
// aligned) by the TMA unit, completing that many transaction bytes on the mbarrier at `full`, its L2 lines under
// `policy`.
__device__ __forceinline__ void bulk_load(void* dst, const void* src, uint32_t bytes, uint64_t* full,
                                          uint64_t policy) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1], %2, [%3], %4;" ::
          "r"(static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
      "l"(src), "r"(bytes), "r"(static_cast<uint32_t>(__cvta_generic_to_shared(full))), "l"(policy)
      : "memory");
}

// The rows of a tile span (bwd::rows_seeing) among a consumer thread's 16 accumulator rows as bits: bit 2 nt + b for
// tile row 8 nt + 2 t + b (as_m16n8's columns of S^T, nt < 8, b < 2). The span as a 64-bit mask, shifted by 2 t, then
// bits 0-1 of each byte packed together.
__device__ __forceinline__ uint32_t fragment_rows(bwd::RowSpan span, int t) {
  if (span.lo > span.hi) return 0u;
  const uint64_t tile = (~0ull << span.lo) & (~0ull >> (63 - span.hi));  // 0 <= lo <= hi < 64
  uint64_t x = (tile >> (2 * t)) & 0x0303030303030303ull;
  x = (x | x >> 6) & 0x000f000f000f000full;
  x = (x | x >> 12) & 0x000000ff000000ffull;
  return static_cast<uint32_t>((x | x >> 24) & 0xffffull);
}

// kDeadHeads (the launcher sets it for a key-side mask read per key, finer than the KV heads, at most 32 query heads
// per KV head): the gather warps find the query heads that see none of the CTA's keys, and the consumers skip their
// items. A template parameter, so that every other call runs the loop without the test (2.3% of the dense call when
// it was a runtime flag, run CD).
// kRowTma (the launcher sets it where bwd::RowStatsTma::fits: no per-row key ranges, delta_kernel filled row_stats):
// thread 0 bulk-copies each tile's lse and delta onto the Q / dO barrier, and the consumers find the rows that see
// each of their keys from the tile's first row (bwd::rows_seeing); without it producer warps 1-2 write every row's
// keys and statistics (bwd::row_info) into a ring of their own (RowStats, pipe_rows), which the consumers wait on
// too, about a tenth of their stall samples on the masked prefill batch (run CR).
template <typename Traits, bool kSoftcap, bool kDeadHeads, bool kRowTma>
__global__ void __launch_bounds__(Traits::kThreads, 1)
    bwd_kernel(const __grid_constant__ bwd::BwdParams p, const __grid_constant__ BwdTma<Traits> tma, int seq0,
               int tile0) {
  using namespace cute;
  using Elem = typename Traits::Elem;
  using CuteElem = typename Traits::CuteElem;
  using Pipeline = typename Traits::Pipeline;
  using RowPipeline = typename Traits::RowPipeline;
  using PipelineState = cutlass::PipelineState<Traits::kStages>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kM8 = kBlockM / 8, kD8 = kHeadDim / 8, kDq8 = Traits::kDqCols / 8;
  using M = typename Traits::M;
  using D = typename Traits::D;

  // ---- The CTA's keys and the query tiles that can see them (every thread, before any barrier) ----
  int hk, b, tile;
  if (p.cta_order != nullptr) {  // a 1-D grid, longest CTA first (bwd::CtaOrder; the order pass wrote a permutation)
    bwd::CtaOrder::coords(p.f, p.cta_order[blockIdx.x], hk, b, tile);
  } else {  // the grid (KV heads, sequences, key tiles)
    hk = blockIdx.x;
    b = seq0 + static_cast<int>(blockIdx.y);
    tile = tile0 + static_cast<int>(blockIdx.z);
  }
  const bwd::Seq s(p.f, b);
  const int group = p.f.num_heads / p.f.num_heads_k;
  const bwd::KeySlots ks(p, s, b, hk * group);  // lists serve whole KV groups (the binding plans only those)
  const bwd::KeyTile kt = bwd::key_tile<kBlockM, kBlockN>(p.f, s, ks, tile);
  const int c0 = kt.c0, keys_here = kt.keys, tiles_per_head = kt.tiles_per_head;
  const bwd::QuerySpan span = kt.span;
  const int items = tiles_per_head * group;
  if (items == 0) return;  // past the last slot, or no query sees a key: dK, dV and dbias stay 0 (zero-filled)
  // The walk (every role walks the same items): head by head, item j = query tile j % tiles_per_head of query head
  // j / tiles_per_head from span.begin; tile_major (bwd::TileMajorWalk, group <= kMaxGroup: the launcher checks),
  // item j = tile tiles_per_head - 1 - j / group of head j % group, from the last tile down.
  const bool tile_major = p.walk_tile_major;
  auto item_tile = [&](int item, int& h, int& m0) {
    int hh, ti;
    if (tile_major) {
      const int back = item / group;
      hh = item - back * group;
      ti = tiles_per_head - 1 - back;
    } else {
      hh = item / tiles_per_head;
      ti = item - hh * tiles_per_head;
    }
    h = hk * group + hh;
    m0 = span.begin + ti * kBlockM;
  };

  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);
  const int warpgroup = threadIdx.x / 128;

  // Q and dO of a tile on two rings (pipe_q, pipe_do), so that S^T starts once Q has landed and dO's stage is handed
  // back once dV has (its last reader), a dK product and the dQ staging before Q's; with kRowTma lse rides on Q's
  // barrier and delta on dO's (whole windows, bwd::RowStatsTma).
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kTileBytes + (kRowTma ? Traits::kStatsBytes : 0);
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipe_q(smem.pipe_q, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipe_do(smem.pipe_do, pipe_params, Shape<_1, _1, _1>{});
  typename RowPipeline::Params row_params;
  row_params.role = warpgroup == 0 ? RowPipeline::ThreadCategory::Producer : RowPipeline::ThreadCategory::Consumer;
  row_params.producer_arv_count = kBlockM;  // warps 1-2: a row each
  row_params.consumer_arv_count = Traits::kConsumerThreads;
  RowPipeline pipe_rows(smem.pipe_rows, row_params);
  auto& kv_full = *reinterpret_cast<cutlass::arch::ClusterBarrier*>(&smem.kv_full);
  if (threadIdx.x == 0) kv_full.init(Traits::kGatherThreads);
  // kDeadHeads: a key-side mask read per key can hide every key of the CTA from a query head; the gather warps find
  // the heads that see one (live_heads, ORed from 0), and the consumers skip the others' items.
  if (kDeadHeads && threadIdx.x == 0) smem.live_heads = 0u;
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKt{});
  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQt{});
  Tensor sdO = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQ{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem.dout.data()), typename Traits::SmemLayoutQt{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDst{});
  Tensor sdS = make_tensor(make_smem_ptr(smem.ds.data()), typename Traits::SmemLayoutDs{});

  if (warpgroup == 0) {
    // ---- Producer ----
    cutlass::arch::warpgroup_reg_dealloc<24>();
    const int ptid = threadIdx.x;
    if (ptid == 0) {  // Q and dO of each query tile, by TMA: dO first, so that it is not held behind Q's stage
      // (handed back after dK, where dO's is after dV); the first kStages tiles, whose stages are free, Q first.
      Tensor mQ = tma.q.get_tma_tensor(make_shape(static_cast<int32_t>(p.f.total_q), kHeadDim, p.f.num_heads));
      Tensor mdO = tma.dout.get_tma_tensor(make_shape(static_cast<int32_t>(p.f.total_q), kHeadDim, p.f.num_heads));
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      for (int item = 0; item < items; ++item) {
        int h, m0;
        item_tile(item, h, m0);
        const auto at = make_coord(static_cast<int32_t>(s.q_start + m0), _0{});
        Tensor gQ = local_tile(domain_offset(at, mQ(_, _, h)), Shape<M, D>{}, make_coord(_0{}, _0{}));
        Tensor gdO = local_tile(domain_offset(at, mdO(_, _, h)), Shape<M, D>{}, make_coord(_0{}, _0{}));
        auto [tQg, tQs] = tma_partition(tma.q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ(_, _, state.index())),
                                        group_modes<0, 2>(gQ));
        auto [tdOg, tdOs] = tma_partition(tma.dout, Int<0>{}, Layout<_1>{},
                                          group_modes<0, 2>(sdO(_, _, state.index())), group_modes<0, 2>(gdO));
        // (kRowTma) the window of the tile's rows in head h's row of lse2 (plane 0 of row_stats) and of delta
        const float* stats = kRowTma ? p.row_stats + static_cast<int64_t>(h) * p.row_stats_stride +
                                           bwd::RowStatsTma::window_start(static_cast<int64_t>(s.q_start) + m0)
                                     : nullptr;
        const int64_t plane = static_cast<int64_t>(p.f.num_heads) * p.row_stats_stride;
        const auto hint = static_cast<TMA::CacheHintSm90>(query_l2_policy(p));
        for (int k = 0; k < 2; ++k) {
          if ((k == 0) == (item < Traits::kStages)) {  // Q (and lse)
            pipe_q.producer_acquire(state);
            uint64_t* full = pipe_q.producer_get_barrier(state);
            copy(tma.q.with(*full, 0, hint), tQg, tQs);
            if constexpr (kRowTma) {
              bulk_load(smem.stats[state.index()].tma.lse2, stats, Traits::kStatsBytes, full, query_l2_policy(p));
            }
          } else {  // dO (and delta)
            pipe_do.producer_acquire(state);
            uint64_t* full = pipe_do.producer_get_barrier(state);
            copy(tma.dout.with(*full, 0, hint), tdOg, tdOs);
            if constexpr (kRowTma) {
              bulk_load(smem.stats[state.index()].tma.delta, stats + plane, Traits::kStatsBytes, full,
                        query_l2_policy(p));
            }
          }
        }
        ++state;
      }
    } else if (ptid >= 32) {
      // K and V of the CTA's slots, by warps 1-3: their positions first, then 16-byte chunks (the gather thread's i-th
      // chunk is chunk gtid + i kGatherThreads of the tile, row-major).
      const int gtid = ptid - 32;
      for (int c = gtid; c < kBlockN; c += Traits::kGatherThreads) {
        smem.key_pos[c] = c < keys_here ? ks.pos(c0 + c, s.k_len) : INT_MAX;
      }
      asm volatile("bar.sync %0, %1;" ::"r"(kGatherBarrier), "r"(Traits::kGatherThreads) : "memory");
      if (tile_major) {  // each slot's visibility and bias per query head (key_info: what the head walk reads per head)
        uint32_t live = 0;
        for (int c = gtid; c < kBlockN; c += Traits::kGatherThreads) {
          uint32_t heads = 0;
          for (int hh = 0; hh < group; ++hh) {
            const bwd::KeyInfo key = bwd::key_info(p, s, hk * group + hh, smem.key_pos[c], ks.list != nullptr);
            heads |= static_cast<uint32_t>(key.visible) << hh;
            smem.key_bias2[hh][c] = key.bias2;
            smem.key_dbias[hh][c] = 0.f;
          }
          smem.key_heads[c] = static_cast<uint8_t>(heads);
          live |= heads;
        }
        // kDeadHeads (no lists, the mask read per key): a head that sees one of the keys is live, as below
        if (kDeadHeads && live != 0) atomicOr(&smem.live_heads, live);
      } else if constexpr (kDeadHeads) {  // the heads that see one of this thread's keys, ORed into live_heads
        uint32_t live = 0;
        for (int c = gtid; c < keys_here; c += Traits::kGatherThreads) {
          const int64_t row = static_cast<int64_t>(s.k_start) + smem.key_pos[c];
          for (int hh = 0; hh < group; ++hh) {
            if (p.f.mask.mask_allows(p.f.mask.offset(row, hk * group + hh, 0))) live |= 1u << hh;
          }
        }
        if (live != 0) atomicOr(&smem.live_heads, live);
      }
      constexpr int kChunks = kHeadDim / 8;
      const Elem* k_head = static_cast<const Elem*>(p.f.k) + static_cast<int64_t>(hk) * p.f.k_head_stride;
      const Elem* v_head = static_cast<const Elem*>(p.f.v) + static_cast<int64_t>(hk) * p.f.v_head_stride;
#pragma unroll 4
      for (int i = gtid; i < kBlockN * kChunks; i += Traits::kGatherThreads) {
        const int r = i / kChunks, col = (i % kChunks) * 8;
        const bool valid = r < keys_here;
        const int64_t row = static_cast<int64_t>(s.k_start) + (valid ? smem.key_pos[r] : 0);
        sm80::cp_async_16(&sK(r, col), valid ? k_head + row * p.f.k_row_stride + col : p.f.k, valid);
        sm80::cp_async_16(&sV(r, col), valid ? v_head + row * p.f.v_row_stride + col : p.f.v, valid);
      }
      cute::cp_async_wait<0>();
      cutlass::arch::fence_view_async_shared();  // the copies are read by wgmma (the async proxy)
      kv_full.arrive();
      if (ptid >= 96) {  // warp 3: the dQ writer where dq_accum is in tiles (bwd::DqTiles), else done
        if (!p.dq_tiles) return;
        // The computed tiles, in the consumers' order: their items less, with kDeadHeads, those of heads that see none
        // of the CTA's keys (live_heads complete once every gather thread has arrived on kv_full).
        uint32_t live = ~0u;
        if constexpr (kDeadHeads) {
          kv_full.wait(0);
          asm volatile("" ::: "memory");
          live = smem.live_heads;
        }
        const bool leader = ptid == 96;  // issues and waits for the bulk operations (a thread's bulk groups)
        bool first = true;
        for (int item = 0; item < items; ++item) {
          int h, m0;
          item_tile(item, h, m0);
          if (kDeadHeads && ((live >> (h - hk * group)) & 1u) == 0) continue;
          // Each warpgroup's staging is free: at the first tile from the start, later once the last tile's reduce-add
          // from it has read it (warpgroup 0's was issued first: its read is waited for, and handed back, first).
          if (!first && leader) bulk_wait_read_but_last();
          __syncwarp();
          dq_barrier_arrive(kDqEmptyBarrier + 0);
          if (!first && leader) bulk_wait_read();
          __syncwarp();
          dq_barrier_arrive(kDqEmptyBarrier + 1);
          first = false;
          const int rows = min(kBlockM, s.q_len - m0);  // >= 1: m0 < span.end <= q_len
          for (int w = 0; w < 2; ++w) {  // at D = 64 both add into the same column block
            dq_barrier_sync(kDqFullBarrier + w);
            if (leader) {
              float* dst = p.dq_accum + bwd::DqTiles::offset(h, Traits::kDqSplitsD ? w : 0, s.q_start + m0,
                                                             kHeadDim / bwd::DqTiles::kCols, p.f.total_q);
              bulk_reduce_add(dst, &smem.dq[w][0][0], rows * bwd::DqTiles::kCols * sizeof(float), query_l2_policy(p));
            }
            __syncwarp();
          }
        }
        if (leader) bulk_wait_all();  // the reduce-adds read shared memory until they complete
        return;
      }
      if (kRowTma) return;
      // Warps 1-2: row r's statistics of each query tile.
      const int r = ptid - 32;
      PipelineState state = cutlass::make_producer_start_state<RowPipeline>();
      for (int item = 0; item < items; ++item) {
        int h, m0;
        item_tile(item, h, m0);
        const bwd::RowInfo info = bwd::row_info(p, s, h, m0 + r);
        pipe_rows.producer_acquire(state);
        typename Traits::RowStats& st = smem.stats[state.index()].rows;
        st.low[r] = info.low;
        st.limit[r] = info.limit;
        st.lse2[r] = info.lse2;
        st.delta[r] = info.delta;
        pipe_rows.producer_commit(state);
        ++state;
      }
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int cw = warpgroup - 1;  // consumer warpgroup: key slots [64 cw, 64 cw + 64) of the CTA
  const int ctid = threadIdx.x - 128, wtid = threadIdx.x % 128;
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaDkv mma_dkv;
  typename Traits::MmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(wtid);
  auto thr_dkv = mma_dkv.get_thread_slice(wtid);
  auto thr_dq = mma_dq.get_thread_slice(wtid);
  Tensor tSrK = thr_sdp.partition_fragment_A(local_tile(sK, Shape<_64, D>{}, make_coord(cw, _0{})));  // (MMA, 1, D/16)
  Tensor tdPrV = thr_sdp.partition_fragment_A(local_tile(sV, Shape<_64, D>{}, make_coord(cw, _0{})));
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);     // (MMA, 1, D / 16, stages)
  Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);  // (MMA, 1, D / 16, stages)
  Tensor tdVrdO = thr_dkv.partition_fragment_B(sdOt);  // (MMA, 1, kBlockM / 16, stages)
  Tensor tdKrQ = thr_dkv.partition_fragment_B(sQt);    // (MMA, 1, kBlockM / 16, stages)
  // dQ's operands: dS (queries, the warpgroup's dQ keys, buffer) and K^T (its dQ columns, those keys).
  constexpr bool kDqSplitsD = Traits::kDqSplitsD;
  using DqCols = typename Traits::DqCols;
  using DqKeys = typename Traits::DqKeys;
  Tensor tdQrdS = thr_dq.partition_fragment_A(
      local_tile(sdS, Shape<M, DqKeys, typename Traits::DsBuffers>{},
                 make_coord(_0{}, kDqSplitsD ? 0 : cw, _0{})));  // (MMA, 1, K, buffers)
  Tensor tdQrK = thr_dq.partition_fragment_B(
      local_tile(sKt, Shape<DqCols, DqKeys>{}, make_coord(kDqSplitsD ? cw : 0, kDqSplitsD ? 0 : cw)));
  Tensor tSrS = partition_fragment_C(mma_sdp, Shape<_64, M>{});
  Tensor tdPrdP = partition_fragment_C(mma_sdp, Shape<_64, M>{});
  Tensor tdVrdV = partition_fragment_C(mma_dkv, Shape<_64, D>{});
  Tensor tdKrdK = partition_fragment_C(mma_dkv, Shape<_64, D>{});
  Tensor tdQrdQ = partition_fragment_C(mma_dq, Shape<M, DqCols>{});
  Tensor tOrP = make_tensor<CuteElem>(partition_shape_A(mma_dkv, Shape<_64, M>{}));
  Tensor tOrdS = make_tensor<CuteElem>(partition_shape_A(mma_dkv, Shape<_64, M>{}));
  // The accumulators as m16n8 fragments (warpgroups.cuh, as_m16n8): thread rows 16 (wtid / 32) + g (+ 8), columns
  // 8 nt + 2 t (+ 1). Rows are keys in S^T, dP^T, dV and dK, queries in dQ.
  float(&pt)[1][kM8][4] = as_m16n8<kM8>(tSrS);
  float(&dpt)[1][kM8][4] = as_m16n8<kM8>(tdPrdP);
  float(&dv)[1][kD8][4] = as_m16n8<kD8>(tdVrdV);
  float(&dk)[1][kD8][4] = as_m16n8<kD8>(tdKrdK);
  float(&dq)[1][kDq8][4] = as_m16n8<kDq8>(tdQrdQ);
  clear(tdVrdV);
  clear(tdKrdK);

  const int slot_a = 64 * cw + 16 * (wtid / 32) + g;  // this thread's two key slots: slot_a, slot_a + 8
  const bool listed = ks.list != nullptr;
  const float scale2 = p.f.softmax_scale * bwd::kLog2e;
  kv_full.wait(0);
  asm volatile("" ::: "memory");  // key_pos and live_heads read after the wait (CUTLASS's wait has no memory clobber)
  const int key_a = smem.key_pos[slot_a], key_b = smem.key_pos[slot_a + 8];
  const uint32_t live_heads = kDeadHeads ? smem.live_heads : ~0u;
  int computed = 0;  // the tiles computed so far (kDeadHeads: skipped items aside)
  int late = -1;     // the item of the last computed tile, whose dQ product is still to issue (-1: none yet)
  bwd::KeyInfo ka{false, 0.f}, kb{false, 0.f};
  float db_a = 0.f, db_b = 0.f;  // this thread's share of the two keys' bias gradient for the current head
  // Item it's dQ part (in tdQrdQ) into the warpgroup's staging (once the last reduce-add from it has read it).
  // BwdParams::dq_tiles: unscaled, as 16-byte chunks in bwd::DqTiles' order (no padding, no bank conflict), for the
  // dQ writer's one bulk reduce-add (the conversion scales). Else times the softmax scale into padded rows, then a bulk
  // reduce-add per row of the sequence from 64 of the threads. At D = 64 both warpgroups add into the whole row.
  auto add_dq = [&](int it) {
    int h, m0;
    item_tile(it, h, m0);
    if (p.dq_tiles) {
      const int64_t row0 = static_cast<int64_t>(s.q_start) + m0 + g;  // the thread's rows: + 16 (wtid / 32) (+ 8)
      float* stage_dq = &smem.dq[cw][0][0];
      dq_barrier_sync(kDqEmptyBarrier + cw);
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float* row = stage_dq + (16 * (wtid / 32) + g + 8 * half) * bwd::DqTiles::kCols;
#pragma unroll
        for (int j = 0; j < kDq8 / 2; ++j) {  // chunk j: fragments 2 j and 2 j + 1
          st_shared_v4(row + bwd::DqTiles::position(16 * j + 2 * t, row0), dq[0][2 * j][2 * half],
                       dq[0][2 * j][2 * half + 1], dq[0][2 * j + 1][2 * half], dq[0][2 * j + 1][2 * half + 1]);
        }
      }
      cutlass::arch::fence_view_async_shared();  // read by the bulk operation (the async proxy)
      dq_barrier_arrive(kDqFullBarrier + cw);
      return;
    }
    if (wtid < kBlockM) bulk_wait_read();  // returns at once where no reduce-add is pending
    warpgroup_sync(cw);
    float(*stage_dq)[Traits::kDqStride] = smem.dq[cw];
#pragma unroll
    for (int dt = 0; dt < kDq8; ++dt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = 16 * (wtid / 32) + g + 8 * half;
        *reinterpret_cast<float2*>(&stage_dq[r][dt * 8 + 2 * t]) =
            make_float2(dq[0][dt][2 * half] * p.f.softmax_scale, dq[0][dt][2 * half + 1] * p.f.softmax_scale);
      }
    }
    cutlass::arch::fence_view_async_shared();
    warpgroup_sync(cw);
    if (wtid < min(kBlockM, s.q_len - m0)) {
      const int64_t row = static_cast<int64_t>(s.q_start) + m0 + wtid;
      float* dst = p.dq_accum + (row * p.f.num_heads + h) * kHeadDim + (kDqSplitsD ? cw * Traits::kDqCols : 0);
      bulk_reduce_add(dst, stage_dq[wtid], Traits::kDqCols * sizeof(float), query_l2_policy(p));
    }
  };
  PipelineState state;
  for (int item = 0; item < items; ++item) {
    int h, m0;
    item_tile(item, h, m0);
    if constexpr (kDeadHeads) {
      if (((live_heads >> (h - hk * group)) & 1u) == 0) {  // no key of the CTA visible to head h: nothing to add
        pipe_q.consumer_wait(state);  // the stage's copies have landed before it is handed back
        pipe_do.consumer_wait(state);
        if constexpr (!kRowTma) pipe_rows.consumer_wait(state);
        pipe_q.consumer_release(state);
        pipe_do.consumer_release(state);
        if constexpr (!kRowTma) pipe_rows.consumer_release(state);
        ++state;
        continue;
      }
    }
    const int stage = state.index(), n = computed++;
    if (tile_major) {  // the item's head, from the gather warps' table
      const int hh = h - hk * group;
      ka = bwd::KeyInfo{((smem.key_heads[slot_a] >> hh) & 1u) != 0, smem.key_bias2[hh][slot_a]};
      kb = bwd::KeyInfo{((smem.key_heads[slot_a + 8] >> hh) & 1u) != 0, smem.key_bias2[hh][slot_a + 8]};
    } else if (m0 == span.begin) {  // a new query head
      ka = bwd::key_info(p, s, h, key_a, listed);
      kb = bwd::key_info(p, s, h, key_b, listed);
      db_a = db_b = 0.f;
    }
    const int rows = min(kBlockM, s.q_len - m0);
    pipe_q.consumer_wait(state);
    if constexpr (!kRowTma) pipe_rows.consumer_wait(state);
    if (rows < kBlockM) {  // rows past the sequence (another sequence's, or TMA's zeros) become zeros
      pipe_do.consumer_wait(state);  // here for both (waited again below, at once)
      constexpr int kChunks = kHeadDim / 8;
      for (int i = ctid; i < (kBlockM - rows) * kChunks; i += Traits::kConsumerThreads) {
        const int r = rows + i / kChunks, col = (i % kChunks) * 8;
        st_shared_zero16(&sQ(r, col, stage));
        st_shared_zero16(&sdO(r, col, stage));
      }
      cutlass::arch::fence_view_async_shared();
      consumer_sync(Traits::kConsumerThreads);
    }
    const typename Traits::StageStats& st = smem.stats[stage];
    // kRowTma: which of the thread's 16 tile rows a window lets see each of its two keys (none for a key not kept,
    // nor for rows past the sequence), one bit each (fragment_rows), where the threads' path reads each row's [low,
    // limit) from RowStats: a register for both keys instead of four at the kernel's peak (the accumulators of S^T,
    // dP^T, dV, dK and the late dQ), where every register more spills.
    uint32_t sees = 0;
    int window = 0;  // kRowTma: tile row i's statistics at window + i (bwd::RowStatsTma)
    if constexpr (kRowTma) {
      window = bwd::RowStatsTma::window_offset(static_cast<int64_t>(s.q_start) + m0);
      sees = fragment_rows(bwd::rows_seeing(p.f, s, m0, rows, key_a, ka.visible), t) |
             fragment_rows(bwd::rows_seeing(p.f, s, m0, rows, key_b, kb.visible), t) << 16;
    }

    // S^T = K Q^T once Q has landed and dP^T = V dO^T once dO has, issued back to back; S^T waited for alone.
    const bool stagger = n == 0 || rows < kBlockM;  // the first tile, or one after a consumer_sync
    if (stagger && cw == 1) asm volatile("bar.sync %0, 256;" ::"r"(kStaggerBarrier) : "memory");
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tdPrdP);
    warpgroup_arrive();
    warpgroup_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), tSrS);
    pipe_do.consumer_wait(state);
    warpgroup_arrive();
    warpgroup_issue<true>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), tdPrdP);
    warpgroup_wait<1>();
    warpgroup_fence_operand(tSrS);
    if (stagger && cw == 0) asm volatile("bar.arrive %0, 256;" ::"r"(kStaggerBarrier) : "memory");
    // P^T: a pair (key j, query i) is visible when the key is (kept, in the sequence) and within the row's interval.
    // kSoftcap: the score is capped first (bwd::probability), and the cap's slope (in [0, 1]) kept for dS as float16
    // pairs: float32 slopes spilled 350 bytes at D = 128; dS is rounded to 16 bits for its products anyway.
    uint32_t slope[kSoftcap ? kM8 : 1][2];
#pragma unroll
    for (int nt = 0; nt < kM8; ++nt) {
      const int i0 = nt * 8 + 2 * t;  // the thread's two query rows of the tile: i0, i0 + 1
      bool row_visible[4];
      float2 lse2;
      if constexpr (kRowTma) {
        // as delta_kernel wrote it by row_info's rule (the same bits): a row the forward found no key for (lse -inf)
        // has lse2 = +inf, so that even a visible pair whose score is -inf (a -inf bias) has probability 0, as there
        // (two loads: the window may put the pair at an odd float)
        lse2 = make_float2(st.tma.lse2[window + i0], st.tma.lse2[window + i0 + 1]);
#pragma unroll
        for (int e = 0; e < 4; ++e) row_visible[e] = (sees >> ((e < 2 ? 0 : 16) + 2 * nt + (e & 1))) & 1u;
      } else {
        const int2 low = *reinterpret_cast<const int2*>(&st.rows.low[i0]);
        const int2 limit = *reinterpret_cast<const int2*>(&st.rows.limit[i0]);
        lse2 = *reinterpret_cast<const float2*>(&st.rows.lse2[i0]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int j = e < 2 ? key_a : key_b;
          const bwd::KeyInfo& key = e < 2 ? ka : kb;
          row_visible[e] = key.visible && j >= (e & 1 ? low.y : low.x) && j < (e & 1 ? limit.y : limit.x);
        }
      }
      float slopes[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bwd::KeyInfo& key = e < 2 ? ka : kb;
        const bool visible = row_visible[e];
        float x;
        if constexpr (kSoftcap) {
          x = bwd::probability<true>(p.f, pt[0][nt][e] * p.f.softmax_scale, key.bias2, e & 1 ? lse2.y : lse2.x,
                                     slopes[e]);
        } else {
          x = exp2f(fmaf(pt[0][nt][e], scale2, key.bias2) - (e & 1 ? lse2.y : lse2.x));
        }
        pt[0][nt][e] = visible ? x : 0.f;
      }
      if constexpr (kSoftcap) {
        slope[nt][0] = sm80::ElemTraits<__half>::pack(slopes[0], slopes[1]);
        slope[nt][1] = sm80::ElemTraits<__half>::pack(slopes[2], slopes[3]);
      }
    }
#pragma unroll
    for (int i = 0; i < size(tOrP); ++i) tOrP(i) = static_cast<CuteElem>(tSrS(i));
    // dV += P^T dO, issued; dP^T waited for.
    warpgroup_fence_operand(tOrP);
    warpgroup_fence_operand(tdVrdV);
    warpgroup_arrive();
    warpgroup_issue<false>(mma_dkv, tOrP, tdVrdO(_, _, _, stage), tdVrdV);
    warpgroup_wait<1>();
    warpgroup_fence_operand(tdPrdP);
    // dS^T = P^T (dP^T - delta) (a select where P is 0: dP^T may be inf there), and the bias gradient's row sums
    // (the bias is added after the cap); kSoftcap: dS^T times the cap's slope, the gradient of the raw score.
    // P^T from its 16-bit copy (element e of n8 fragment nt is tOrP(4 nt + e)), as the sm80 kernels do: the float32
    // one is dead once rounded, which keeps the accumulators of S^T, dP^T, dV and dK from being live together.
#pragma unroll
    for (int nt = 0; nt < kM8; ++nt) {
      // (kRowTma: a row that sees nothing may hold any delta, even the padding past a head's last row, never written;
      // its P is 0, and the select below drops it)
      const int i0 = nt * 8 + 2 * t;
      const float2 delta = kRowTma ? make_float2(st.tma.delta[window + i0], st.tma.delta[window + i0 + 1])
                                   : *reinterpret_cast<const float2*>(&st.rows.delta[i0]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = static_cast<float>(tOrP(4 * nt + e));
        const float d = prob != 0.f ? prob * (dpt[0][nt][e] - (e & 1 ? delta.y : delta.x)) : 0.f;
        if (e < 2) db_a += d; else db_b += d;
        if constexpr (kSoftcap) {
          dpt[0][nt][e] = d * bwd::unpack<__half>(slope[nt][e / 2], e & 1);
        } else {
          dpt[0][nt][e] = d;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < size(tOrdS); ++i) tOrdS(i) = static_cast<CuteElem>(tdPrdP(i));
    // dS^T into shared memory for dQ (buffer n % 3): slot row, query column pairs. The buffer's last reader was tile
    // n - 3's dQ product: this warpgroup's landed in tile n - 2, and at D = 128 the other's too once it has written
    // tile n - 1's dS^T (ds_wait, which also finds tile n - 1's dS^T of both warpgroups written for the late dQ below).
    // At D = 64 a warpgroup's dQ reads only its own rows.
    if (n > 0) {
      if constexpr (kDqSplitsD) {
        ds_wait(1 - cw, n - 1);
      } else {
        warpgroup_sync(cw);
      }
    }
#pragma unroll
    for (int nt = 0; nt < kM8; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int slot = slot_a + 8 * half, i0 = nt * 8 + 2 * t;
        st_shared(&sdSt(slot, i0, n % Traits::kDsBuffers),
                  sm80::ElemTraits<Elem>::pack(dpt[0][nt][2 * half], dpt[0][nt][2 * half + 1]));
      }
    }
    cutlass::arch::fence_view_async_shared();  // read by wgmma (the async proxy)
    if constexpr (kDqSplitsD) ds_arrive(cw, n);
    // dK += dS^T Q, and before it the last tile's dQ, so that it lands first and its staging runs while the tensor
    // cores do dK. In the first tile there is no last tile: its dQ product reads a buffer no tile wrote yet, and
    // its result is dropped (a branch around the product would make ptxas serialize every wgmma of the kernel).
    warpgroup_fence_operand(tdQrdQ);
    warpgroup_fence_operand(tOrdS);
    warpgroup_fence_operand(tdKrdK);
    warpgroup_arrive();
    warpgroup_issue<true>(mma_dq, tdQrdS(_, _, _, (n + Traits::kDsBuffers - 1) % Traits::kDsBuffers), tdQrK, tdQrdQ);
    warpgroup_issue<false>(mma_dkv, tOrdS, tdKrQ(_, _, _, stage), tdKrdK);
    warpgroup_wait<1>();  // dV and dQ landed; dK may still run
    warpgroup_fence_operand(tdQrdQ);
    pipe_do.consumer_release(state);  // dV was dO's last reader (and delta was read before dS^T)
    if (late >= 0) add_dq(late);
    warpgroup_wait<0>();  // dK landed: the tile's Q and statistics are free
    warpgroup_fence_operand(tdKrdK);
    warpgroup_fence_operand(tOrdS);
    warpgroup_fence_operand(tdVrdV);
    warpgroup_fence_operand(tOrP);
    pipe_q.consumer_release(state);
    if constexpr (!kRowTma) pipe_rows.consumer_release(state);
    late = item;

    if (p.dbias != nullptr) {
      if (tile_major) {  // the tile's shares summed over the quad, added to the head's sums in the table
        bwd::quad_sum(db_a, db_b);
        if (t == 0) {
          const int hh = h - hk * group;
          smem.key_dbias[hh][slot_a] += db_a;
          smem.key_dbias[hh][slot_a + 8] += db_b;
        }
        db_a = db_b = 0.f;
      } else if (m0 + kBlockM >= span.begin + tiles_per_head * kBlockM) {  // the head's last tile
        bwd::store_dbias_pair(p, s, h, t, key_a, key_b, db_a, db_b);
      }
    }
    ++state;
  }
  if (late >= 0) {  // the last computed tile's dQ
    if constexpr (kDqSplitsD) {
      ds_wait(1 - cw, computed - 1);
    } else {
      warpgroup_sync(cw);
    }
    warpgroup_fence_operand(tdQrdQ);
    warpgroup_arrive();
    warpgroup_issue<true>(mma_dq, tdQrdS(_, _, _, (computed - 1) % Traits::kDsBuffers), tdQrK, tdQrdQ);
    warpgroup_wait<0>();
    warpgroup_fence_operand(tdQrdQ);
    add_dq(late);
  }

  // tile_major: the bias gradient of the thread's keys for every head of the group (its own table entries: no barrier;
  // 0 for a head whose items kDeadHeads skipped, as the zero-filled dbias holds)
  if (tile_major && p.dbias != nullptr && t == 0) {
    for (int hh = 0; hh < group; ++hh) {
      const int h = hk * group + hh;
      if (key_a < s.k_len) {
        p.dbias[(static_cast<int64_t>(s.k_start) + key_a) * p.f.num_heads + h] = smem.key_dbias[hh][slot_a];
      }
      if (key_b < s.k_len) {
        p.dbias[(static_cast<int64_t>(s.k_start) + key_b) * p.f.num_heads + h] = smem.key_dbias[hh][slot_a + 8];
      }
    }
  }

  // ---- dK (times the softmax scale) and dV of the warpgroup's 64 slots, at their keys' rows ----
  const float scale = p.f.softmax_scale;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int j = half ? key_b : key_a;
    if (j >= s.k_len) continue;  // past the last slot
    const int64_t at = ((static_cast<int64_t>(s.k_start) + j) * p.f.num_heads_k + hk) * kHeadDim + 2 * t;
    Elem* dk_row = static_cast<Elem*>(p.dk) + at;
    Elem* dv_row = static_cast<Elem*>(p.dv) + at;
#pragma unroll
    for (int dt = 0; dt < kD8; ++dt) {
      *reinterpret_cast<uint32_t*>(dk_row + dt * 8) =
          sm80::ElemTraits<Elem>::pack(dk[0][dt][2 * half] * scale, dk[0][dt][2 * half + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv_row + dt * 8) =
          sm80::ElemTraits<Elem>::pack(dv[0][dt][2 * half], dv[0][dt][2 * half + 1]);
    }
  }
  if (wtid < kBlockM) bulk_wait_all();  // the rows' reduce-adds read shared memory until they complete (none: dq_tiles)
}

}  // namespace dmattn::cuda::sm90a
