// fwd_kernel.cuh: the sm90a prefill kernel (wgmma + TMA, warp-specialized): attention over packed varlen sequences
// without mask or bias operands, causal or not, any GQA ratio, sinks and seqused_k; its kRanged variant adds what
// gives each query row its own key interval (a sliding window, per-query key ranges) and the softcap; its kSlots
// variant runs a key-side mask (and key-side bias) over the kept keys gathered into dense slots before it (passes.h
// KeptRows: TMA reads whole tiles of consecutive rows; every head dim), so a mask that keeps half the keys costs about
// half the tiles, and a key-side bias over slots that are its keys (in place, every head dim); its kQuery variant runs
// a query-side mask over its block map and bits (passes.h BlockMap: a tile the map shows dead is neither loaded nor
// computed, one it shows whole runs without the mask, the others read each row's kBlockN bits of the tile in one
// load, 16 bytes, 8 at D = 256), at D = 256 also a key-side mask whose kept rows are not gathered (key ranges, kept
// rows past the cap: mapped by sequence, BlockMap::by_sequence), with
// kSlots in place for a key-side bias beside either mask, and with kQueryBias a query-side bias in q's dtype (or
// float32: kBias32, a CTA per unit, D <= 128) beside such a mask, beside a key-side mask (mapped by sequence) or alone
// (every tile live), each row's elements of a tile staged in shared memory by its threads. The plan sends it no other
// mask, bias or key pool (heuristics.h, sm90a_supports, sm90a_slots_supports, sm90a_bias_supports,
// sm90a_query_supports); those take the sm80 kernels.
//
// Its helpers, by concern: warpgroups.cuh (named barriers, ping-pong turns, warpgroup GEMMs), unit_work.cuh (the
// units and their KV tiles), tile_list.cuh (kQuery's live tiles), tile_operands.cuh (what a tile reads beside S).
//
// Work units are (query tile, query head, sequence), a sequence's last query tiles first as in the sm80 prefill
// kernel: a CTA per unit (grid (query tiles, heads, sequences)), or kPersistent, a CTA per SM walking every
// gridDim.x-th unit (windowed calls: short, alike units), or with kDynamic (the plain, windowed and kSlots variants,
// not kQuery; the default but for D = 256 calls of a CTA per unit) taking its next unit from a counter, longest first
// within L2 sections (dynamic_unit), the producer publishing each unit's bounds to the consumers with its Q buffer.
// Per unit:
//   producer (warpgroup 0, one thread)   Q (double-buffered when persistent: the next unit's loads during this one),
//                                        then K and V of each KV tile some row sees, last first, through two
//                                        PipelineTmaAsync rings (the copy engine signals the tile's full barrier,
//                                        the consumers its empty one)
//   consumers (warpgroups 1, 2)          per KV tile: S = Q K^T (wgmma), the limits on the tiles that need them, the
//                                        online softmax (../sm80/online_softmax.cuh: the wgmma accumulator holds each
//                                        row as four lanes of a quad, as mma.sync's does), O += P V (wgmma, P from
//                                        registers); then out and lse of their 64 rows (out through the warpgroup's
//                                        dead half of the Q buffer and a TMA store where all 64 lie in the sequence).
// The tiles of a unit (unit_work): plain, from key 0 to the causal limit of its last row; kRanged, from the lowest
// key any of its rows sees to the highest (the first and last rows' windows, or TileKeys: key ranges reduced over the
// rows). Tiles that every row sees whole take raw scores; the others (the causal diagonal, a window's edges, the
// sequence's end) are limited per element. kSlots: tile n holds slots [n kBlockN, (n + 1) kBlockN) of the unit's
// kept-key list; the causal limits of the unit's first and last rows, as slot counts, come from the gather
// (KeptRows::limits); a tile that hides keys compares its slots' key positions (the list) with each row's limit, and
// a key-side bias is added per slot on every tile. kQuery: the producer warpgroup lists the unit's live tiles of
// [n_begin, n_end) in shared memory (list_live_tiles: TileEntry, the tile and what it needs: position limits, the
// mask's bits, a V scan), published by the unit's Q barrier; producer and consumers walk that list.
// TMA reads whole tiles: a tile's rows past the sequence belong to the next sequence or to nothing (zero-filled past
// the tensor). Their scores are hidden (-inf); their V rows, like any hidden key's, must not turn 0 * inf into NaN,
// so the tiles that hide keys run the scan of ../sm80/nonfinite_v.cuh over V (zero the inf / NaN elements, poison a
// row that gives such a key weight).
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../../varlen_fwd_params.h"
#include "../bit_span.cuh"
#include "../heuristics.h"
#include "../score_operand.cuh"
#include "../sm80/nonfinite_v.cuh"
#include "../sm80/online_softmax.cuh"
#include "kernel_traits.h"
#include "tile_list.cuh"
#include "tile_operands.cuh"
#include "unit_stamps.cuh"
#include "unit_work.cuh"
#include "warpgroups.cuh"

namespace dmattn::cuda::sm90a {

template <typename Traits, bool kRanged, bool kPersistent, bool kSlots, bool kQuery, bool kQueryBias = false,
          bool kBias32 = false, bool kDynamic = false>
__global__ void __launch_bounds__(Traits::kThreads, 1)
fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ TmaParams<Traits> tma,
           const UnitGrid grid, const __grid_constant__ SlotLists slots, const __grid_constant__ BlockMap map) {
  using namespace cute;
  static_assert(!kQueryBias || (kQuery && !kSlots), "a query-side bias rides on the tile lists and is the only bias");
  static_assert(!kBias32 || (kQueryBias && !kPersistent), "a float32 query-side bias: a CTA per unit (shared memory)");
  // kDynamic: persistent (never with key ranges, whose tile_keys share unit_of_q's words), and not kQuery, whose Q
  // barrier publishes a tile list built by the whole producer warpgroup
  static_assert(!kDynamic || (kPersistent && !kQuery), "the dynamic scheduler: persistent plain, kRanged, kSlots");
  using Elem = typename Traits::Elem;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename cutlass::PipelineState<Traits::kStages>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kN8 = kBlockN / 8, kD8 = kHeadDim / 8;
  // kQuery: whether the block map may be a key-side mask's, by sequence (beside a query-side bias, or at D = 256
  // where its kept rows are not gathered); elsewhere map.by_sequence is never read.
  constexpr bool kKeyMask = kQuery && sm90a_query_key_mask(kHeadDim, kQueryBias);
  static_assert(!kQuery || (Traits::kListable && Traits::kListTiles <= TileEntry::kTileBits + 1),
                "tiles of the map's 128-key tiles, whose listed numbers fit their bits");
  using RowBits = typename Traits::RowBits;  // kQuery: a masked tile's bits of one row
  // (kDynamic windowed slots: one, where two spilled 24 bytes in its consumers at 232 registers, below)
  using SlotBias = SlotBiasAhead<kN8, kSlots && !kQuery, kDynamic && kRanged ? 1 : 2>;
  // Registers per thread of the producer and consumer warpgroups (setmaxnreg): the producer needs few, but kQuery's
  // lists tiles (list_live_tiles). At D = 256 the consumers' O takes 128 of theirs: with kQuery's 216 of D <= 128
  // ptxas spilled 64-96 bytes in the consumers (persistent kernels), with 232 nothing there (its producer, at 40,
  // spills 20-44 bytes instead; none a CTA per unit).
  // kDynamic: its producer (a unit's publication and the next unit's decode beside the K / V loop) spilled in that
  // loop at 24 registers, 116 / 172 bytes at D = 64 and 8 / 8 at D = 256 (none at D = 128; ptxas): 40 at D = 64 (its
  // consumers' O is 32 registers: 224 for them), 32 at D = 256 (consumers 232, as kQuery's there). Its windowed and
  // kSlots kernels (bf16, D = 128; the K / V loop not unrolled) spilled 136-256 bytes in the producer at 24
  // registers, kSlots' 32 / 40 at 32: 40 for their producers, their consumers 224 (windowed: no spill) or 232 (kSlots:
  // at 224 they spilled 12 bytes; and D = 256). D = 64's wide tiles (192 keys: 96 score registers a thread) spilled
  // 20 / 44 bytes in their dynamic kernel's consumers at 224, none at 232.
  constexpr int kProducerRegs = kDynamic && (kRanged || kSlots || kHeadDim == 64) ? 40
                                : kDynamic && kHeadDim == 256                     ? 32
                                : !kQuery                                         ? 24
                                : kHeadDim > 128                                  ? 40
                                                                                  : 72;
  constexpr int kConsumerRegs = kDynamic && (kSlots || kHeadDim == 256 || kBlockN > 128) ? 232
                                : kDynamic && (kRanged || kHeadDim == 64)         ? 224
                                : !kQuery                                         ? 240
                                : kHeadDim > 128                                  ? 232
                                                                                  : 216;
  static_assert(128 * kProducerRegs + 256 * kConsumerRegs <= 384 * 168, "the registers of a CTA of 384 threads");

  constexpr int kQBuffers = Traits::template kQBuffers<kPersistent, kQueryBias>;
  // Out through shared memory (the consumers' epilogue): a consumer warpgroup whose 64 rows all lie in the sequence
  // writes its output tile into its own half of the unit's Q buffer, which nothing reads once its last S has landed,
  // and one of its threads stores the tile by TMA (a box of 64 rows: a partial one would write the next sequence's
  // rows, so those warpgroups, units without a Q load, and out strides a tensor map cannot take store from
  // registers). Persistent, only with two Q buffers: the buffer's release (q_empty) then waits for the store to have
  // read it, which the next unit's start does while the producer loads the other buffer; with one buffer the next
  // unit's Q load would wait for this unit's epilogue. Not in the persistent kQuery + kSlots kernels either: their
  // consumers (216 registers) spill already, and 12-24 bytes more with it (ptxas, D = 128).
  constexpr bool kStagedOut = !kPersistent || (kQBuffers == 2 && !(kQuery && kSlots));
  // The measuring build (unit_stamps.cuh): the CTA's entry is its first unit's start.
  DMATTN_UNIT_STAMP(uint64_t stamp_time = stamp_globaltimer(), stamp_clk = stamp_clock(); int stamp_order = 0;)
  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem =
      *reinterpret_cast<typename Traits::template SharedStorage<kQBuffers, kQuery, kQueryBias, kBias32>*>(smem_raw);

  // ---- This CTA's units: its own (a CTA per unit), or every gridDim.x-th (persistent) ----
  // Persistent units are numbered over the launch's sequences' own query tiles: u = j * H + h for the j-th of them
  // (each sequence's from its last, the most keys, to its first) and head h, through a table of the sequences'
  // cumulative tiles in shared memory (warp 0 builds it below), so no unit lies past its sequence. The grid's
  // numbering (max_seqlen_q / kBlockM tiles of every sequence) left about half of a packed batch's units empty, each
  // paid for with its sequence's loads and three 64-bit divisions. The launcher keeps a persistent launch to at most
  // kUnitTableSeqs sequences and its units within an int.
  // This CTA's first unit, read where each role's loop starts: a value kept from here across the roles' register
  // reconfiguration was spilled (kQuery's persistent kernels).
  auto first_unit = [] {
    uint32_t cta = 0;
    if constexpr (kPersistent) asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(cta));
    return static_cast<int64_t>(cta);
  };
  const int64_t unit_step = kPersistent ? gridDim.x : 1;
  // The sequence z of the unit table's query tile j: unit_tiles[z] <= j < unit_tiles[z + 1], by bisection.
  auto sequence_of = [&](int j) {
    int lo = 0, hi = grid.seqs;
#pragma unroll 1
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (smem.unit_tiles[mid] <= j) lo = mid; else hi = mid;
    }
    return lo;
  };
  auto work = [&](int64_t u) {
    if constexpr (kPersistent) {
      int j, h;
      grid.heads(j, h, static_cast<int>(u));
      const int lo = sequence_of(j);
      // kSlots: the unit's start reads its list's count and limits from global memory all the same, so its sequence
      // ranges come from cu_seqlens too (with the unit overlap, the table's reads spilled that kernel's registers).
      return unit_work<kBlockM, kBlockN, kRanged, kSlots>(p, grid, smem.unit_tiles[lo + 1] - 1 - j, h, lo,
                                                          smem.tile_keys, slots, kSlots ? nullptr : smem.seq_rows);
    } else {
      return unit_work<kBlockM, kBlockN, kRanged, kSlots>(p, grid, grid.query_tiles - 1 - static_cast<int>(blockIdx.x),
                                                          blockIdx.y, blockIdx.z, smem.tile_keys, slots);
    }
  };

  // kDynamic: units are numbered longest first within sections: a sequence's heads are cut into sections of
  // section_keys / k_len KV heads (at least one; their query heads) whose K / V the units in flight share in L2, and
  // within a section the query tile runs from the sequence's last (the most keys under a causal mask) to its first,
  // heads fastest. Unit u of sequence z (units [unit_tiles[z] H, unit_tiles[z + 1] H)): its place l in the
  // sequence, section c = l / (tiles S) of S query heads (the last one narrower where S does not divide H), then the
  // query tile and the head within the section. Bounds: l < tiles H <= units (an int, launch_units).
  // kSlots: a unit's work is its kept slots under its rows' limits, which only the gather knows (KeptRows::limits, in
  // global memory); within a sequence and list they grow with the query tile, so its last tile first is longest first
  // there too, and a section's K / V are its lists' kept rows, at most k_len each (the sections err small). K / V
  // copies per list (lists finer than KV heads): a list's query heads share one. Windows (kRanged): section_keys is
  // INT32_MAX, so a section is the sequence's every head (the static grid's order): units of about equal tiles, whose
  // K / V reach is a few tiles, so the order only keeps a query tile's heads together.
  auto dynamic_unit = [&](int64_t u, int& z, int& m_block, int& h) {
    int j, r;
    grid.heads(j, r, static_cast<int>(u));
    const int lo = sequence_of(j);
    z = lo;
    const int tiles = smem.unit_tiles[lo + 1] - smem.unit_tiles[lo];
    const int l = static_cast<int>(u) - smem.unit_tiles[lo] * p.num_heads;
    const int kv_heads = min(max(grid.section_keys / max(smem.seq_rows[lo][3], 1), 1), p.num_heads_k);
    const int group = kSlots && slots.kv_per_list ? slots.heads_per_list : p.num_heads / p.num_heads_k;
    const int width = kv_heads * group;  // query heads of a full section
    const int c = l / (tiles * width);
    const int rest = l - c * tiles * width;
    const int here = min(width, p.num_heads - c * width);  // this section's
    const int i = rest / here;
    m_block = tiles - 1 - i;
    h = c * width + (rest - i * here);
  };
  // kDynamic: the next unit, taken once the producer has issued its current unit's last K (or at once where the unit
  // has no KV tile), so that CTAs free soonest take the longest units left.
  // 32 bits: units <= INT32_MAX (launch_units) and the counter passes them by at most gridDim.x.
  auto take_unit = [&] { return gridDim.x + atomicAdd(grid.next_unit, 1u); };
  // kDynamic: a published unit's words (SharedStorage::unit_of_q[qb]): its sequence z and query tile as
  // z | m_block << 8 (z < kUnitTableSeqs <= 255; m_block < 2^24, a sequence's rows being fewer than 2^31 and
  // kBlockM >= 128), all ones for the end (z = 255 is no sequence); its head; its number (the measuring build's
  // records); and, kSlots only, unit_work's kept slots and tile bounds n_begin, n_end, whole_begin, whole_end.
  constexpr int kUnitAt = 0, kHeadAt = 1, kNumberAt = 2, kKeptAt = 3, kTilesAt = 4, kUnitWords = 8;
  constexpr int32_t kNoUnit = -1;
  static_assert(!kDynamic || (Traits::kUnitTableSeqs <= 255 && kBlockM >= 128 && kQBuffers <= 2 &&
                              sizeof(smem.unit_of_q[0]) == kUnitWords * sizeof(int32_t)),
                "a published unit: z and m_block in one word, a word set per Q buffer");
  // kDynamic, consumers: the published unit (its words read into registers), as unit_work gives it, the sequence's
  // ranges from the table in shared memory: the plain and windowed kernels work its bounds out there (arithmetic);
  // kSlots takes the producer's, so that the gather's count and limits (global memory) are read once per unit, by the
  // producer, and no consumer waits on them at its unit's start.
  auto published_work = [&](const int32_t (&words)[kUnitWords]) {
    const uint32_t zm = static_cast<uint32_t>(words[kUnitAt]);
    UnitWork w = unit_work<kBlockM, kBlockN, kRanged>(p, grid, static_cast<int>(zm >> 8), words[kHeadAt],
                                                      static_cast<int>(zm & 0xffu), smem.tile_keys, {}, smem.seq_rows);
    if constexpr (kSlots) {
      w.kept = words[kKeptAt];
      w.n_begin = words[kTilesAt];
      w.n_end = words[kTilesAt + 1];
      w.whole_begin = words[kTilesAt + 2];
      w.whole_end = words[kTilesAt + 3];
      w.list = w.h / slots.heads_per_list;
      w.seg = KeptRows::segment(w.k_start, w.b);
    }
    return w;
  };

  if constexpr (!kPersistent) {  // a tile past its sequence: nothing to do, not even the barriers
    const SeqRange sq = clamp_seq(p.cu_seqlens_q, grid.seq0 + static_cast<int>(blockIdx.z), p.total_q, p.max_seqlen_q);
    if (static_cast<int64_t>(grid.query_tiles - 1 - static_cast<int>(blockIdx.x)) * kBlockM >= sq.len) return;
  }

  // ---- Barriers ----
  const int warpgroup = threadIdx.x / 128;
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kKVBytes;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipe_v(smem.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  // kSlots: a K tile's full barrier also counts the bulk copies of its slots' positions and biases.
  constexpr uint32_t kSlotBytes = kBlockN * 4;
  // kQuery + kSlots runs only over slots in place (the plan: a key-side bias beside a query-side mask, or at D = 256
  // beside a key-side one mapped by sequence, ungathered), whose positions are the tile's keys: their biases alone
  // come.
  if constexpr (kSlots) {
    pipe_params.transaction_bytes += kSlotBytes * ((kQuery ? 0 : 1) + (slots.bias != nullptr ? 1 : 0));
  }
  Pipeline pipe_k(smem.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  // The CTA's k-th Q load goes to buffer k % kQBuffers: its q_full barrier says it landed (a transaction barrier),
  // its q_empty (persistent CTAs) that every consumer thread's last S GEMM of that unit is done with it. A buffer's
  // i-th use has phase i % 2.
  auto q_full = [&](int qb) -> auto& {
    return *reinterpret_cast<cutlass::arch::ClusterTransactionBarrier*>(&smem.q_full[qb]);
  };
  auto q_empty = [&](int qb) -> auto& { return *reinterpret_cast<cutlass::arch::ClusterBarrier*>(&smem.q_empty[qb]); };
  if (threadIdx.x == 0) {
#pragma unroll
    for (int qb = 0; qb < kQBuffers; ++qb) {
      q_full(qb).init(kQuery ? 2 : 1);  // kQuery: Q's bytes and the unit's tile list
      // kStagedOut, persistent: each consumer warpgroup's store thread arrives once more, late (release_last_q)
      q_empty(qb).init(Traits::kConsumerThreads + (kPersistent && kStagedOut ? Traits::kConsumerWarpgroups : 0));
    }
  }
  if constexpr (kRanged && !kPersistent) {
    // Key ranges: the CTA's unit's rows reduced to tile bounds (the plan never runs such calls persistent).
    if (p.key_range != nullptr && warpgroup == 0) {
      const int m_block = grid.query_tiles - 1 - static_cast<int>(blockIdx.x);
      const UnitWork w = unit_work<kBlockM, kBlockN, false>(p, grid, m_block, blockIdx.y, blockIdx.z, nullptr);
      reduce_tile_keys(p, w.sq, w.k_len, w.m0, w.rows, smem.tile_keys);
    }
  }
  if constexpr (kPersistent) {
    if (threadIdx.x < 32) {
      // Warp 0: the unit table, 32 sequences per step (a warp's inclusive scan), and each sequence's query and key
      // ranges (seq_rows; not kSlots' static grid, see work), so that a unit's start reads shared memory, not
      // cu_seqlens.
      const int lane = threadIdx.x;
      int before = 0;
      for (int z0 = 0; z0 < grid.seqs; z0 += 32) {
        const int z = z0 + lane;
        int tiles = 0;
        if (z < grid.seqs) {
          const SeqRange sq = clamp_seq(p.cu_seqlens_q, grid.seq0 + z, p.total_q, p.max_seqlen_q);
          tiles = static_cast<int>((sq.len + kBlockM - 1) / kBlockM);
          if constexpr (!kSlots || kDynamic) {
            const SeqRange sk = key_seq(p, grid.seq0 + z);
            smem.seq_rows[z][0] = static_cast<int32_t>(sq.start);
            smem.seq_rows[z][1] = static_cast<int32_t>(sq.len);
            smem.seq_rows[z][2] = static_cast<int32_t>(sk.start);
            smem.seq_rows[z][3] = static_cast<int32_t>(sk.len);
          }
        }
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
          const int v = __shfl_up_sync(0xffffffffu, tiles, d);
          if (lane >= d) tiles += v;
        }
        if (z < grid.seqs) smem.unit_tiles[z + 1] = before + tiles;
        before += __shfl_sync(0xffffffffu, tiles, 31);
      }
      if (lane == 0) smem.unit_tiles[0] = 0;
    }
  }
  cutlass::arch::fence_barrier_init();
  __syncthreads();
  const int64_t units = kPersistent ? static_cast<int64_t>(smem.unit_tiles[grid.seqs]) * p.num_heads : 1;

  // Q buffer qb.
  auto smem_q = [&](int qb) {
    return make_tensor(make_smem_ptr(smem.q.data() + qb * cosize_v<typename Traits::SmemLayoutQ>),
                       typename Traits::SmemLayoutQ{});
  };
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

  if (warpgroup == 0) {
    // ---- Producer ----
    // kQuery: the warpgroup lists tiles (list_live_tiles), with registers the consumers can spare.
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    // Thread 0 is the pipelines' leader: it arms each full barrier with the tile bytes. kQuery: the warpgroup lists
    // each unit's live tiles first (list_live_tiles), and the Q buffer's full barrier publishes the list.
    if (kQuery || threadIdx.x == 0) {
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      int q_loads = 0;
      for (int64_t u = first_unit();;) {
        UnitWork w;
        int qb;
        if constexpr (kDynamic) {
          // Every unit takes the next Q buffer, with a Q load or (no KV tile) without, and so does the end: the unit
          // and its bounds are published in the buffer's unit_of_q words (kUnitWords), written before its q_full
          // arrival (release; the consumers read them after their wait: acquire), once q_empty says the buffer's
          // last unit is done. The unit is worked out after that wait (before it, the plain dynamic kernel's producer
          // spilled 168 / 208 bytes).
          qb = q_loads % kQBuffers;
          if (q_loads >= kQBuffers) q_empty(qb).wait((q_loads / kQBuffers - 1) % 2);
          ++q_loads;
          int32_t* const published = smem.unit_of_q[qb];
          if (u >= units) {  // the end: the consumers stop here
            published[kUnitAt] = kNoUnit;
            asm volatile("" ::: "memory");  // the word's store before the arrival (CUTLASS's arrive has no clobber)
            q_full(qb).arrive();
            break;
          }
          int z, m_block, h;
          dynamic_unit(u, z, m_block, h);
          w = unit_work<kBlockM, kBlockN, kRanged, kSlots>(p, grid, m_block, h, z, smem.tile_keys, slots,
                                                           smem.seq_rows);
          published[kUnitAt] = static_cast<int32_t>(static_cast<uint32_t>(z) | static_cast<uint32_t>(m_block) << 8);
          published[kHeadAt] = h;
          published[kNumberAt] = static_cast<int32_t>(u);
          if constexpr (kSlots) {  // the others' consumers work their bounds out from the table (published_work)
            published[kKeptAt] = w.kept;
            published[kTilesAt] = w.n_begin;
            published[kTilesAt + 1] = w.n_end;
            published[kTilesAt + 2] = w.whole_begin;
            published[kTilesAt + 3] = w.whole_end;
          }
          // the words' stores before either q_full arrival below (CUTLASS's arrives have no memory clobber: without
          // this the compiler may sink them past the release; ptxas keeps the order it is given)
          asm volatile("" ::: "memory");
          if (w.n_end <= w.n_begin) {  // no KV tile: the rows see nothing, no Q to load
            q_full(qb).arrive();
            u = take_unit();
            continue;
          }
        } else {
          if (u >= units) break;
          w = work(u);
          u += unit_step;
          if (w.n_end <= w.n_begin) continue;
          qb = q_loads % kQBuffers;
          if (kPersistent && q_loads >= kQBuffers) q_empty(qb).wait((q_loads / kQBuffers - 1) % 2);  // its last unit's
          ++q_loads;
        }
        int tiles = w.n_end - w.n_begin;
        if (threadIdx.x == 0) {  // Q first: kQuery's list below is built while it loads
          Tensor mQ = tma.q.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_q), kHeadDim, p.num_heads));
          Tensor gQ = local_tile(domain_offset(make_coord(static_cast<int32_t>(w.sq.start), _0{}), mQ(_, _, w.h)),
                                 Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(w.m_block, _0{}));
          auto [tQg, tQs] =
              tma_partition(tma.q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(smem_q(qb)), group_modes<0, 2>(gQ));
          q_full(qb).arrive_and_expect_tx(Traits::kQBytes);
          copy(tma.q.with(reinterpret_cast<uint64_t&>(q_full(qb))), tQg, tQs);
        }
        if constexpr (kQuery) {  // the unit's live tiles, published by the Q barrier's second arrival
          list_live_tiles<kBlockM, kBlockN, kQueryBias, kKeyMask>(p, map, w, smem.tile_list[qb],
                                                                  &smem.list_len[qb], smem.list_warps);
          if (threadIdx.x != 0) continue;
          tiles = smem.list_len[qb];
          q_full(qb).arrive();
        }
        // kSlots with a kept copy per list: the unit's list head is its K / V head in the copies.
        const int kv_heads = kSlots && slots.kv_heads > 0 ? slots.kv_heads : p.num_heads_k;
        const int kv = kSlots && slots.kv_per_list ? w.list : w.hk;
        Tensor mK = tma.k.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_k), kHeadDim, kv_heads));
        Tensor mV = tma.v.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_k), kHeadDim, kv_heads));
        Tensor gK = local_tile(domain_offset(make_coord(static_cast<int32_t>(w.k_start), _0{}), mK(_, _, kv)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (N, D, tiles)
        Tensor gV = local_tile(domain_offset(make_coord(static_cast<int32_t>(w.k_start), _0{}), mV(_, _, kv)),
                               Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
        auto [tKg, tKs] = tma_partition(tma.k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
        auto [tVg, tVs] = tma_partition(tma.v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
        int v_n = 0;                    // the tile whose V is issued next,
        PipelineState v_state = state;  // and its stage: K's of that tile (V one tile behind K within the unit)
        // KV tile i of the unit's tiles (from the last); the copies' views as arguments (C++17 lambdas capture no
        // structured bindings).
        auto issue_tile = [&](int i, const auto& tKg, const auto& tKs, const auto& tVg, const auto& tVs) {
          const int n = kQuery ? smem.tile_list[qb][i] & TileEntry::kTileBits : w.n_begin + i;
          pipe_k.producer_acquire(state);
          copy(tma.k.with(*pipe_k.producer_get_barrier(state)), tKg(_, n), tKs(_, state.index()));
          if constexpr (kSlots) {
            const int64_t at = w.seg + static_cast<int64_t>(n) * kBlockN;
            if constexpr (!kQuery) {
              SM90_BULK_COPY_G2S::copy(slots.pos + w.list * slots.extent + at, pipe_k.producer_get_barrier(state),
                                       smem.slot_pos[state.index()], kSlotBytes);
            }
            if (slots.bias != nullptr) {
              SM90_BULK_COPY_G2S::copy(slots.bias + (w.h / slots.bias_group) * slots.extent + at,
                                       pipe_k.producer_get_barrier(state), smem.slot_bias[state.index()], kSlotBytes);
            }
          }
          // V one tile behind K: V_n's stage frees only once P V_{n-2} has run, and K_{n+1} (for S_{n+1}, wanted
          // first) no longer waits behind that acquire. The unit's last V follows its loop.
          if (i < tiles - 1) {
            pipe_v.producer_acquire(v_state);
            copy(tma.v.with(*pipe_v.producer_get_barrier(v_state)), tVg(_, v_n), tVs(_, v_state.index()));
          }
          v_n = n;
          v_state = state;
          ++state;
        };
        if constexpr (kDynamic && (kRanged || kSlots)) {
          // not unrolled: ptxas unrolled it by two, and these kernels' producers spilled 120-230 bytes more at 40
          // registers (the plain dynamic kernel spills 8 bytes at 24 when it is not unrolled: left to ptxas)
#pragma unroll 1
          for (int i = tiles - 1; i >= 0; --i) issue_tile(i, tKg, tKs, tVg, tVs);
        } else {
          for (int i = tiles - 1; i >= 0; --i) issue_tile(i, tKg, tKs, tVg, tVs);
        }
        // kDynamic: the unit after this one, taken once its last K is issued (the loop's last copy but the V behind
        // it); its value is waited for only after the last V's copy (with a K inside the loop, the producer's 24
        // registers spilled).
        uint32_t next = 0;
        if constexpr (kDynamic) next = take_unit();
        if (tiles > 0) {
          pipe_v.producer_acquire(v_state);
          copy(tma.v.with(*pipe_v.producer_get_barrier(v_state)), tVg(_, v_n), tVs(_, v_state.index()));
        }
        if constexpr (kDynamic) u = next;
      }
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
  const int cw = warpgroup - 1;       // consumer warpgroup: rows [64 cw, 64 cw + 64) of the tile
  const int ctid = threadIdx.x - 128;  // consumer thread index
  const int wtid = threadIdx.x % 128;  // thread in its warpgroup
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  Tensor tSrK = thr_qk.partition_fragment_B(sK);                  // (MMA, 1, D / 16, stages)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);                 // (MMA, 1, N / 16, stages)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<kHeadDim>>{});
  Tensor tOrP = make_tensor<typename Traits::CuteElem>(partition_shape_A(mma_pv, Shape<_64, Int<kBlockN>>{}));
  float(&s)[1][kN8][4] = as_m16n8<kN8>(tSrS);
  float(&o)[1][kD8][4] = as_m16n8<kD8>(tOrO);
  const float scale = p.softmax_scale;

  // The ping-pong turns. A CTA per unit: warpgroup 1 opens warpgroup 0's first turn once Q landed, and skips handing
  // over after its last tile. Persistent, the turns run across the CTA's units as one stream of tiles: warpgroup 1
  // opens warpgroup 0's first turn here, both hand over after every S issue, and warpgroup 0 takes the last hand-over
  // at the end. Either way no arrival is left pending.
  if (kPersistent && cw == 1) hand_turn(cw);
  PipelineState state, v_state;  // v_state: the stage of the tile whose P V is pending
  int q_uses = 0;
  // The epilogue's TMA stores (kStagedOut, above) are issued by each consumer warpgroup's first thread. Persistent,
  // it arrives once more on a unit's q_empty when the store has read the buffer (whether its warpgroup stored through
  // it or not: no register says which units did), at the start of its next unit with a Q load.
  const bool store_thread = wtid == 0;
  auto release_last_q = [&] {  // q_uses: this unit's Q load not counted yet
    if constexpr (kPersistent && kStagedOut) {
      if (store_thread && q_uses > 0) {
        tma_store_wait<0>();  // the last store (if any) has read its tile: that buffer may be reloaded
        q_empty((q_uses + kQBuffers - 1) % kQBuffers).arrive();
      }
    }
  };
  for (int64_t u = first_unit();; u += unit_step) {
    UnitWork w;
    // The measuring build: when the unit became known (kDynamic: its words and Q landed; else: the loop's turn).
    DMATTN_UNIT_STAMP(uint64_t known_time = stamp_globaltimer(), known_clk = stamp_clock();)
    if constexpr (kDynamic) {
      // The unit published with the next Q buffer (its Q landed, or it has none), or the end.
      const int qb = q_uses % kQBuffers;
      q_full(qb).wait((q_uses / kQBuffers) % 2);
      DMATTN_UNIT_STAMP(known_time = stamp_globaltimer(); known_clk = stamp_clock();)
      asm volatile("" ::: "memory");  // the words' reads after the wait (CUTLASS's wait has no memory clobber)
      int32_t words[kUnitWords];
#pragma unroll
      for (int k = 0; k < kUnitWords; ++k) words[k] = smem.unit_of_q[qb][k];
      DMATTN_UNIT_STAMP(u = words[kNumberAt];)
      // read here, before this unit's q_empty arrival (after which the producer rewrites them for a later unit)
      asm volatile("" ::: "memory");
      if (words[kUnitAt] == kNoUnit) break;
      w = published_work(words);
    } else {
      if (u >= units) break;
      w = work(u);
      if (w.m0 >= w.q_len) continue;
    }
    DMATTN_UNIT_STAMP(
        UnitStampRecord stamp;
        if (store_thread && grid.stamps != nullptr) {
          stamp.rec = grid.stamps +
                      (((static_cast<int64_t>(w.b) * p.num_heads + w.h) * grid.query_tiles + w.m_block) * 2 + cw) *
                          UnitStamps::kWords;
        }
        stamp.point_at(UnitStamps::kStart, stamp_time, stamp_clk);
        stamp.point_at(UnitStamps::kKnown, known_time, known_clk);)
    const int row0 = w.m0 + 64 * cw + 16 * (wtid / 32) + g;  // this thread's rows: row0, row0 + 8 (in the sequence)
    int n_tiles = w.n_end - w.n_begin;
    // Whether tile n hides some key from some row of the unit.
    auto hides_keys = [&](int n) { return n < w.whole_begin || n >= w.whole_end; };
    // kRanged: this thread's two rows' key intervals [low, limit) (empty for rows past the sequence).
    int row_low[2] = {0, 0}, row_limit[2] = {0, 0};
    if constexpr (kRanged) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = row0 + 8 * half;
        if (i < w.q_len) {
          const KeyRange keys = row_keys(p, w.sq.start + i, i, w.q_len, w.k_len);
          row_low[half] = static_cast<int>(keys.begin);
          row_limit[half] = static_cast<int>(keys.end);
        }
      }
    }
    const bool causal = p.window_right >= 0;
    const int shift = w.k_len - w.q_len;

    const int qb = q_uses % kQBuffers;
    // kQuery: the unit's live tiles, listed by the producer warpgroup and published with its Q.
    const uint16_t* tile_list = smem.tile_list[kQuery ? qb : 0];
    if constexpr (kQuery) {
      if (n_tiles > 0) {
        q_full(qb).wait((q_uses / kQBuffers) % 2);
        asm volatile("" ::: "memory");  // the list's reads after the wait (CUTLASS's wait has no memory clobber)
        n_tiles = smem.list_len[qb];
        if (n_tiles == 0) {  // every tile dead: the rows see nothing
          release_last_q();
          if (kPersistent) q_empty(qb).arrive();
          ++q_uses;
        }
      }
    }
    if constexpr (kDynamic) {
      if (n_tiles == 0) {  // published without a Q load (the rows see nothing): its buffer is free at once
        release_last_q();
        q_empty(qb).arrive();
        ++q_uses;
      }
    }
    // Tile j of the unit (j = n_tiles - 1 first): its entry (kQuery) and its number.
    auto entry_of = [&](int j) -> uint16_t {
      if constexpr (kQuery) return tile_list[j];
      return 0;
    };
    auto tile_of = [&](int j, uint16_t entry) -> int {
      if constexpr (kQuery) return entry & TileEntry::kTileBits;
      return w.n_begin + j;
    };
    // kQuery: the mask's bits of this thread's two rows over tile n, for a masked tile (none past the sequence's
    // rows: they see nothing there), loaded before the tile's S is waited for: Traits::kBitWords words from word
    // n kBitWords of the row (BlockMap::bits, laid out per 128-key tile: a 64-key tile is half of one). A key-side
    // mask's row is its sequence's segment or stride (BlockMap::sequence_row, chosen per call and computed here once
    // per unit; tile n is below the sequence's tiles, so its words lie in the sequence's row, which starts 16-byte
    // aligned). kKeyMask (the kernels that may read a map by sequence): the thread's first row's word once per unit,
    // in int32 (every word read lies below bits_bytes / 4 <= 2^28: the plan's kMaxMaskBitsBytes, asserted below; rows
    // past the sequence read nothing), one register in the tile loop where int64 or per-tile row math spilled more
    // there (ptxas); the other kernels keep the per-row int64 form.
    static_assert(kMaxMaskBitsBytes / 4 <= INT32_MAX && kMaxBlockMapBytes <= INT32_MAX,
                  "load_bits' int32 word indices (and list_live_tiles' block offsets) need the plan's caps below 2^31");
    const int hm = kQuery ? w.h / p.mask.head_group : 0;
    const bool by_sequence = kKeyMask && map.by_sequence;
    const int bit_row =
        !kKeyMask ? 0
                  : static_cast<int>(by_sequence ? map.sequence_row(hm, w.b, w.k_start)
                                                 : (static_cast<int64_t>(hm) * p.total_q + w.sq.start + row0) *
                                                       map.bit_words);
    // to the thread's second word: 8 rows on for a query-side mask; 0 by sequence: both rows read the sequence's words
    const int bit_step = kKeyMask && !by_sequence ? 8 * map.bit_words : 0;
    auto load_bits = [&](uint16_t entry, int n, RowBits (&bits)[2]) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = row0 + 8 * half;
        bits[half] = RowBits{};
        if (kQuery && (entry & TileEntry::kMasked) != 0 && i < w.q_len) {
          int64_t word;
          if constexpr (kKeyMask) {
            word = bit_row + half * bit_step + n * Traits::kBitWords;
          } else {
            word = (static_cast<int64_t>(hm) * p.total_q + w.sq.start + i) * map.bit_words +
                   static_cast<int64_t>(n) * Traits::kBitWords;
          }
          bits[half] = __ldg(reinterpret_cast<const RowBits*>(map.bits + word));
        }
      }
    };
    // kQueryBias: this thread's two rows of the bias over tile n, staged in shared memory (Traits::kTermPitch words
    // a row) as the aligned 16-byte chunks that hold its kBlockN elements: 8 kTermChunks elements from the chunk
    // holding element n kBlockN on (off: that element's place in its chunk, 0-7), so any row stride and head stride
    // serve. The quad of a row's four threads copies its chunks together when the mask's bits are loaded (chunk c by
    // thread c % 4), and each thread reads its column pairs (two words from word off / 2 on, shifted by 16 (off % 2))
    // where the scores need them, after the copies' wait and a warp barrier. Only elements of keys below the
    // sequence's are read (past them the row ends or holds no key; the elements before the first one, where off > 0,
    // lie in the tensor: its first element is 16-byte aligned, heuristics.h sm90a_query_bias_fits); rows past the
    // sequence read nothing.
    // kBias32: a float32 bias, each element a word of its own (no off), column c at word c ^ 8 g of its row
    // (Traits::kTermWords32), elements at or past the row's keys zero-filled.
    const int hb = kQueryBias ? w.h / p.bias.head_group : 0;
    auto term_row = [&](int half) {  // the row's words in shared memory
      return smem.terms + (cw * 64 + 16 * (wtid / 32) + g + 8 * half) *
                              (kBias32 ? Traits::kTermWords32 : Traits::kTermPitch);
    };
    auto term_elem = [&](int half) {  // the row's first element in the bias (key position 0)
      return (w.sq.start + row0 + 8 * half) * p.bias.row_stride + static_cast<int64_t>(hb) * p.bias.head_stride;
    };
    auto term_off = [&](int half) {  // 16-bit elements: the row's first one's place in its 16-byte chunk
      return static_cast<int>((reinterpret_cast<uintptr_t>(p.bias.ptr) / 2 + term_elem(half)) & 7);
    };
    // Issued at the top of each tile, where S is dead (converted into P): issued earlier, right after the previous
    // tile's scores (its words read), they would fly through that tile's softmax too, but S is live there, and ptxas
    // spilled 100 bytes in the kernel that had none (D = 128, a CTA per unit).
    auto copy_terms = [&](int n) {
      if constexpr (kBias32) {
        __syncwarp();  // the quad's reads of the last tile's words are done
        const char* bias = static_cast<const char*>(p.bias.ptr);
        const int j0 = n * kBlockN;
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = row0 + 8 * half, left = i < w.q_len ? w.k_len - j0 : 0;  // elements of the tile in the row
          const char* from = bias + 4 * (term_elem(half) + j0);
          uint32_t* words = term_row(half);
          if (left >= kBlockN) {  // every element of the tile in the row
#pragma unroll
            for (int k = t; k < kBlockN; k += 4) copy_term_word(words + (k ^ (8 * g)), from + 4 * k, 4);
          } else {
#pragma unroll 1
            for (int k = t; k < kBlockN; k += 4) {
              const bool in = k < left;
              copy_term_word(words + (k ^ (8 * g)), in ? from + 4 * k : bias, in ? 4 : 0);
            }
          }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
      } else if constexpr (kQueryBias) {
        constexpr int kChunks = Traits::kTermChunks;
        __syncwarp();  // the quad's reads of the last tile's words are done
        const char* bias = static_cast<const char*>(p.bias.ptr);
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int i = row0 + 8 * half, off = term_off(half), j0 = n * kBlockN;
          // chunk c holds elements j0 - off + 8 c to + 8: whole while they lie below the row's keys
          const int left = i < w.q_len ? w.k_len - (j0 - off) : 0;
          const char* from = bias + 2 * (term_elem(half) + j0 - off);
          uint32_t* words = term_row(half);
          if (left >= 8 * kChunks) {  // the row holds every element the tile's chunks cover: fixed offsets
#pragma unroll
            for (int c = t; c < kChunks; c += 4) copy_term_chunk(words + 4 * c, from + 16 * c, 16);
          } else {  // the sequence's last tile, or a row past the sequence (few): per chunk, with few registers
#pragma unroll 1
            for (int c = t; c < kChunks; c += 4) {
              const int bytes = min(max(2 * (left - 8 * c), 0), 16);
              copy_term_chunk(words + 4 * c, bytes > 0 ? from + 16 * c : bias, bytes);
            }
          }
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
      }
    };
    Tensor tSrQ =
        thr_qk.partition_fragment_A(local_tile(smem_q(qb), Shape<_64, Int<kHeadDim>>{}, make_coord(cw, _0{})));
    clear(tOrO);
    sm80::OnlineSoftmax<1, kN8> softmax;
    unsigned poisoned_rows = 0;

    // kSlots: a tile that every row sees whole adds each column's bias (one FMA per element). Its first loads are
    // issued while S_n is computed (between the GEMM's issue and its wait), so that the scores' FMAs do not start by
    // waiting on them (run CQ: the bias reads' latency was ~7% of the masked call's stall samples, with the loads
    // four 8-byte pairs at a time and each batch waited for).
    auto prefetch_bias = [&](int n, int stage, SlotBias& pre) {
      if constexpr (SlotBias::kAhead > 0) {
        if (slots.bias == nullptr || hides_keys(n)) return;
#pragma unroll
        for (int k = 0; k < SlotBias::kAhead; ++k) pre.pairs[k] = slot_bias_pairs(smem.slot_bias[stage], k, t);
      }
    };

    // Per KV tile n (last first): S_n = Q K_n^T, its limits, softmax (P_n and the rows' rescale factors), then
    // O += P_n V_n. The GEMMs overlap the softmax: S_n is issued together with the previous tile's P V and waited
    // for alone, so the exponentials of tile n run while the tensor cores finish P_{n+1} V_{n+1}; O is rescaled once
    // that product has landed.
    // S_n (in K stage `stage`) -> scale, softcap and limits (raw scores where every row sees every key).
    // This thread's row (half 0: row0, 1: row0 + 8) sees key positions [low, limit).
    auto row_bounds = [&](int half, int& low, int& limit) {
      low = kRanged ? row_low[half] : 0;
      limit = kRanged ? row_limit[half] : causal ? min(w.k_len, row0 + 8 * half + shift + 1) : w.k_len;
    };
    auto scores = [&](int n, int stage, uint16_t entry, const RowBits (&bits)[2], const SlotBias& pre) {
      if constexpr (kQuery) {  // position limits and mask bits where the entry says so; a key-side or query-side bias
        const bool limits = (entry & TileEntry::kLimits) != 0, masked = (entry & TileEntry::kMasked) != 0;
        if constexpr (kQueryBias) {  // first, so that no return below can leave the tile's copies outstanding
          asm volatile("cp.async.wait_group 0;\n" ::: "memory");
          __syncwarp();  // the quad's copies of its rows' words landed
        }
        // kSlots beside kQuery: slots in place (slot c is key c), whose per-slot biases are the key-side bias's
        const bool biased = (kSlots && slots.bias != nullptr) || kQueryBias;
        const float* slot_bias = kSlots ? smem.slot_bias[stage] : nullptr;
        const bool capped = kRanged && p.softcap > 0.f;
        if (!limits && !masked && !biased && !capped && scale > 0.f) return scale;  // folded into the exponent
        float mul = scale;
        if (capped) {  // its own pass, so the limits below stay one select per element
#pragma unroll
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) = capped_score(p, tSrS(i) * scale);
          mul = 1.f;
        }
        if (!limits && !masked && !biased) {
#pragma unroll
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= mul;
          return 1.f;
        }
        // A bias's value per element: a pair of keys' per slot, or this thread's query-side terms (both in shared
        // memory).
        // kQueryBias: a row's first element's word in its staged chunks, and 16 where it is that word's high half
        uint32_t term_shift[2] = {0u, 0u};
        int term_word[2] = {0, 0};
        if constexpr (kQueryBias && !kBias32) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int off = term_off(half);
            term_word[half] = off / 2;
            term_shift[half] = 16 * (off % 2);
          }
        }
        auto bias_pair = [&](int half, int nt) {
          if constexpr (kBias32) {  // column 8 nt + 2 t and the next: one aligned pair of words, swizzled by row
            return *reinterpret_cast<const float2*>(term_row(half) + ((8 * nt + 2 * t) ^ (8 * g)));
          } else if constexpr (kQueryBias) {
            // column 8 nt + 2 t: its element's word, and the next
            const uint32_t* words = term_row(half) + term_word[half] + 4 * nt + t;
            return term_pair<Elem>(__funnelshift_r(words[0], words[1], term_shift[half]));
          }
          return biased ? slot_bias_pair(slot_bias, nt, t) : make_float2(0.f, 0.f);
        };
        if (kQueryBias && !limits && !masked) {  // every key of the tile shown to every row: the bias alone
#pragma unroll
          for (int half = 0; half < 2; ++half)
#pragma unroll
            for (int nt = 0; nt < kN8; ++nt) {
              if (nt % 4 == 0) asm volatile("" ::: "memory");  // four column pairs' reads at a time
              const float2 b2 = bias_pair(half, nt);
              s[0][nt][2 * half] = s[0][nt][2 * half] * mul + b2.x;
              s[0][nt][2 * half + 1] = s[0][nt][2 * half + 1] * mul + b2.y;
            }
          return 1.f;
        }
        // Without a bias the scale folds into the exponent (raw scores; a hidden key's -inf stays -inf), unless it is
        // not positive: then its own pass, as a cap's.
        if (!biased && !(mul > 0.f)) {
#pragma unroll
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= mul;
          mul = 1.f;
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          // The keys this row sees in the tile as bit words: the mask's bits where it is masked, ANDed with its
          // positions [low, limit) where limits hide keys (shown_span: a few operations per 32-key word, where
          // comparing each key's position cost two per key). Each word is then shifted right by 2 t, so that the
          // thread's column 8 nt + 2 t + e is bit 8 (nt % 4) + e of word nt / 4, a constant: one test and one select
          // an element.
          uint32_t words[Traits::kBitWords];
          if (masked) {
            bit_words(bits[half], words);
          } else {
#pragma unroll
            for (int k = 0; k < Traits::kBitWords; ++k) words[k] = ~0u;
          }
          if (limits) {
            int low, limit;
            row_bounds(half, low, limit);
#pragma unroll
            for (int k = 0; k < Traits::kBitWords; ++k) {
              const int base = n * kBlockN + 32 * k;  // the word's first key
              words[k] &= shown_span(low - base, limit - base);
            }
          }
#pragma unroll
          for (int k = 0; k < Traits::kBitWords; ++k) words[k] >>= 2 * t;
#pragma unroll
          for (int nt = 0; nt < kN8; ++nt) {
            if (biased && nt % 4 == 0) asm volatile("" ::: "memory");  // four column pairs' bias reads at a time
            const float2 b2 = bias_pair(half, nt);
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[0][nt][2 * half + e];
              const bool shown = (words[nt / 4] & (1u << (8 * (nt % 4) + e))) != 0;
              const float scored = biased ? x * mul + (e ? b2.y : b2.x) : x;
              x = shown ? scored : -INFINITY;
            }
          }
        }
        return biased ? 1.f : mul;
      }
      if constexpr (kSlots && !kQuery) {  // bias per slot; on a tile that hides keys, each slot's position against the
                                          // rows' limits (beside kQuery, whose branch above returns, slots are in place)
        const bool hides = hides_keys(n), biased = slots.bias != nullptr;
        const int32_t* slot_pos = smem.slot_pos[stage];
        const float* slot_bias = smem.slot_bias[stage];
        const bool capped = kRanged && p.softcap > 0.f;
        if (capped) {  // its own pass (cap(scale x), then the bias), as in the other variants
#pragma unroll
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) = capped_score(p, tSrS(i) * scale);
        }
        const float mul = capped ? 1.f : scale;
        if (!hides) {  // every slot seen by every row: the bias alone, one FMA per element
          if (!biased) {
            if (mul > 0.f) return mul;  // folded into the exponent
#pragma unroll
            for (int i = 0; i < size(tSrS); ++i) tSrS(i) *= mul;
            return 1.f;
          }
#pragma unroll
          for (int k = 0; k < kN8 / 2; ++k) {  // fragments 2 k and 2 k + 1
            if (k >= SlotBias::kAhead && (k - SlotBias::kAhead) % 2 == 0) asm volatile("" ::: "memory");  // 2 loads
            float4 b4;
            if constexpr (SlotBias::kAhead > 0) {
              b4 = k < SlotBias::kAhead ? pre.pairs[k < SlotBias::kAhead ? k : 0] : slot_bias_pairs(slot_bias, k, t);
            } else {
              b4 = slot_bias_pairs(slot_bias, k, t);
            }
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              s[0][2 * k][2 * half] = s[0][2 * k][2 * half] * mul + b4.x;
              s[0][2 * k][2 * half + 1] = s[0][2 * k][2 * half + 1] * mul + b4.y;
              s[0][2 * k + 1][2 * half] = s[0][2 * k + 1][2 * half] * mul + b4.z;
              s[0][2 * k + 1][2 * half + 1] = s[0][2 * k + 1][2 * half + 1] * mul + b4.w;
            }
          }
          return 1.f;
        }
        int low[2], limit[2];
#pragma unroll
        for (int half = 0; half < 2; ++half) row_bounds(half, low[half], limit[half]);
        const int slot0 = n * kBlockN;
#pragma unroll
        for (int nt = 0; nt < kN8; ++nt) {
          // Four column pairs' reads at a time: ptxas hoisted every read of the loop otherwise, and 32 bias
          // values live at once spilled.
          if (nt % 4 == 0) asm volatile("" ::: "memory");
          const int col = nt * 8 + 2 * t;
          const float2 b2 = biased ? slot_bias_pair(slot_bias, nt, t) : make_float2(0.f, 0.f);
          const int2 p2 = *reinterpret_cast<const int2*>(slot_pos + col);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            // Past the unit's slots the copy brought what lies there: a position no row sees.
            const int pos = slot0 + col + e < w.kept ? (e ? p2.y : p2.x) : INT_MAX;
            const float b = e ? b2.y : b2.x;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              float& x = s[0][nt][2 * half + e];
              x = pos >= low[half] && pos < limit[half] ? x * mul + b : -INFINITY;
            }
          }
        }
        return 1.f;
      }
      const bool capped = kRanged && p.softcap > 0.f;
      float score_mul = scale;
      if (hides_keys(n) || capped || !(scale > 0.f)) {  // the softmax may fold only a positive scale
        score_mul = 1.f;
        float mul = scale;
        if (capped) {  // its own pass, so the limits below stay one select per element
#pragma unroll
          for (int i = 0; i < size(tSrS); ++i) tSrS(i) = capped_score(p, tSrS(i) * scale);
          mul = 1.f;
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          int low, limit;
          row_bounds(half, low, limit);
#pragma unroll
          for (int nt = 0; nt < kN8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              float& x = s[0][nt][2 * half + e];
              const int pos = n * kBlockN + nt * 8 + 2 * t + e;
              x = pos >= low && pos < limit ? x * mul : -INFINITY;
            }
        }
      }
      return score_mul;
    };
    // V_n landed; on a tile that hides keys, its inf / NaN elements zeroed and flagged (before any P V reads it).
    // V_n is read by its P V, issued with the next tile's S (or alone after the last tile), so a tile waits for it
    // there (wait_v); only a tile whose V is scanned waits here, before its softmax. Waiting for every V_n before
    // softmax_n held a warpgroup whenever V_n landed after S_n: the producer issues V_n only once P V_{n-2} has
    // released its stage (run CQ's profile: ~9% of the dense call's stall samples in the consumers' barrier waits).
    // A stage's phase cannot move between the two waits (the P V's release comes after both), so waiting twice is
    // harmless.
    auto wait_v = [&](const PipelineState& v) { pipe_v.consumer_wait(v); };
    auto check_v = [&](int n, const PipelineState& v, uint16_t entry) {
      // This thread's share of the V tile: whether it holds an inf / NaN; the consumers' vote. kQuery: the entry
      // says whether the tile hides keys and its V rows may hold one (v's flags).
      constexpr int kVecs = kBlockN * kHeadDim / 8;  // 16-byte vectors in a V tile
      const int stage = v.index();
      const bool scan = kQuery ? (entry & TileEntry::kCheckV) != 0 : hides_keys(n);
      if (scan) wait_v(v);
      const bool v_fix =
          scan && consumer_any(sm80::share_has_nonfinite<Elem, kVecs, Traits::kConsumerThreads>(
                                            smem.v.data() + stage * kBlockN * kHeadDim, ctid),
                                        Traits::kConsumerThreads);
      if (v_fix) {
        Tensor sVs = sV(_, _, stage);
        zero_nonfinite_v<Traits>(sVs, smem.v_bad, ctid);
      }
      return v_fix;
    };
    // P_n, rounded to Elem, in the A-operand layout of the P V wgmma (the same flat order as the accumulator).
    auto convert_p = [&] {
#pragma unroll
      for (int i = 0; i < size(tOrP); ++i) tOrP(i) = static_cast<typename Traits::CuteElem>(tSrS(i));
    };

    float alpha[1][2];
    if (n_tiles > 0) {
      if constexpr (!kDynamic) q_full(qb).wait((q_uses / kQBuffers) % 2);  // (kDynamic: waited for above)
      DMATTN_UNIT_STAMP(stamp.point(UnitStamps::kQLanded);)
      if (!kPersistent && cw == 1) hand_turn(cw);  // warpgroup 0 goes first
      // The first tile: nothing to overlap with yet (O is zero: no rescale). j counts the tiles left after it.
      const int j = n_tiles - 1;
      const uint16_t entry = entry_of(j);
      const int n = tile_of(j, entry);
      RowBits bits[2];
      load_bits(entry, n, bits);
      copy_terms(n);
      pipe_k.consumer_wait(state);
      wait_turn(cw);
      SlotBias pre;
      warpgroup_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS, [&] {
        if (kPersistent || cw == 0 || j > 0) hand_turn(cw);  // issued: the other warpgroup's turn
        DMATTN_UNIT_STAMP(stamp.point(UnitStamps::kFirstS);)
        prefetch_bias(n, state.index(), pre);
      });
      release_last_q();  // its store long since issued
      if (kPersistent && j == 0) q_empty(qb).arrive();
      if constexpr (!kSlots) pipe_k.consumer_release(state);
      const float score_mul = scores(n, state.index(), entry, bits, pre);
      if constexpr (kSlots) pipe_k.consumer_release(state);  // the stage's positions and biases read
      const bool v_fix = check_v(n, state, entry);
      softmax.update_scores(s, score_mul, alpha);
      if (v_fix) sm80::mark_poisoned_rows<1, kN8>(s, smem.v_bad, t, poisoned_rows);
      convert_p();
      v_state = state;
      ++state;
    }
    for (int j = n_tiles - 2; j >= 0; --j) {
      const uint16_t entry = entry_of(j);
      const int n = tile_of(j, entry);
      RowBits bits[2];
      load_bits(entry, n, bits);
      copy_terms(n);
      pipe_k.consumer_wait(state);
      wait_v(v_state);  // V_{n+1}, for the P V issued below
      wait_turn(cw);
      warpgroup_fence_operand(tSrS);
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      warpgroup_arrive();
      warpgroup_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS);      // S_n
      warpgroup_issue<false>(mma_pv, tOrP, tOrV(_, _, _, v_state.index()), tOrO);  // O += P_{n+1} V_{n+1}
      if (kPersistent || cw == 0 || j > 0) hand_turn(cw);
      SlotBias pre;
      prefetch_bias(n, state.index(), pre);
      warpgroup_wait<1>();  // S_n landed; the P V may still run
      warpgroup_fence_operand(tSrS);
      if (kPersistent && j == 0) q_empty(qb).arrive();
      if constexpr (!kSlots) pipe_k.consumer_release(state);
      const float score_mul = scores(n, state.index(), entry, bits, pre);
      if constexpr (kSlots) pipe_k.consumer_release(state);
      const bool v_fix = check_v(n, state, entry);
      const bool rescale = softmax.update_scores(s, score_mul, alpha);
      warpgroup_wait<0>();  // the P V landed: O and P are ours again
      warpgroup_fence_operand(tOrO);
      warpgroup_fence_operand(tOrP);
      pipe_v.consumer_release(v_state);
      if (rescale) softmax.rescale(o, alpha);
      if (v_fix) sm80::mark_poisoned_rows<1, kN8>(s, smem.v_bad, t, poisoned_rows);
      convert_p();
      v_state = state;
      ++state;
    }
    if (n_tiles > 0) {  // the last tile's P V
      wait_v(v_state);
      warpgroup_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, v_state.index()), tOrO);
      DMATTN_UNIT_STAMP(stamp.point(UnitStamps::kLastPV);)
      pipe_v.consumer_release(v_state);
      ++q_uses;
    }

    // ---- Epilogue: out and lse of this thread's two rows ----
    // This warpgroup's out tile through its Q half (above), warp-uniform. Its first row in the sequence, m0 + 64 cw,
    // from row0 (live here, where m0 would be one more register across the tile loop).
    const int wg_row0 = row0 - 16 * (wtid / 32) - g;
    const bool staged = kStagedOut && tma.store_out && n_tiles > 0 && wg_row0 + 64 <= w.q_len;
    // staged: the rows' pairs, the same values, into an Elem copy of the accumulator (its flat order: pair
    // dt 2 + half), written into the warpgroup's Q half and stored from there by TMA below.
    Tensor tOrOut = make_tensor<typename Traits::CuteElem>(tOrO.layout());
    uint32_t* out_pairs = reinterpret_cast<uint32_t*>(tOrOut.data());
    Elem* out = static_cast<Elem*>(p.out);
    const float row_sink = p.sink(w.h);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = row0 + 8 * half;
      const float l = softmax.row_total(0, half);
      const bool poisoned = sm80::quad_poisoned(poisoned_rows, half, lane);
      const sm80::RowEnd end = sm80::finish_row(softmax.row_max[0][half], l, poisoned, row_sink);
      if (i >= w.q_len) continue;
      const int64_t row = w.sq.start + i;
      if (t == 0) p.lse[static_cast<int64_t>(w.h) * p.total_q + row] = end.lse;
      Elem* dst = out + row * p.out_row_stride + static_cast<int64_t>(w.h) * p.out_head_stride;
#pragma unroll
      for (int dt = 0; dt < kD8; ++dt) {
        const uint32_t pair =
            sm80::ElemTraits<Elem>::pack(o[0][dt][2 * half] * end.inv, o[0][dt][2 * half + 1] * end.inv);
        if (kStagedOut && staged) {
          out_pairs[2 * dt + half] = pair;
        } else {
          *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * t) = pair;
        }
      }
    }
    if (kStagedOut && staged) {
      Tensor sOut = local_tile(smem_q(qb), Shape<_64, Int<kHeadDim>>{}, make_coord(cw, _0{}));  // (64, D) swizzled
      auto copy_out = make_tiled_copy_C(typename Traits::SmemCopyOut{}, mma_pv);
      auto thr_copy_out = copy_out.get_thread_slice(wtid);
      copy(copy_out, thr_copy_out.retile_S(tOrOut), thr_copy_out.partition_D(sOut));
      cutlass::arch::fence_view_async_shared();  // the tile's writes, seen by the TMA store (the async proxy)
      asm volatile("bar.sync %0, %1;" ::"r"(kStoreBarrier + cw), "r"(128) : "memory");  // the warpgroup's, written
      DMATTN_UNIT_STAMP(stamp.point(UnitStamps::kStaged);)
      if (store_thread) {
        Tensor mOut = tma.out.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_q), kHeadDim, p.num_heads));
        Tensor gOut = local_tile(domain_offset(make_coord(static_cast<int32_t>(w.sq.start), _0{}), mOut(_, _, w.h)),
                                 Shape<_64, Int<kHeadDim>>{}, make_coord(wg_row0 / 64, _0{}));
        auto [tOg, tOs] =
            tma_partition(tma.out, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sOut), group_modes<0, 2>(gOut));
        copy(tma.out, tOs, tOg);
        tma_store_arrive();
      }
    }
    DMATTN_UNIT_STAMP(
        if (!(kStagedOut && staged)) stamp.point(UnitStamps::kStaged);  // (register stores: staged is done)
        stamp_time = stamp_globaltimer();
        stamp_clk = stamp_clock();
        stamp.point_at(UnitStamps::kDone, stamp_time, stamp_clk);
        stamp.word(UnitStamps::kSm, stamp_smid());
        stamp.word(UnitStamps::kCta, blockIdx.x + static_cast<int64_t>(gridDim.x) *
                                                      (blockIdx.y + static_cast<int64_t>(gridDim.y) * blockIdx.z));
        stamp.word(UnitStamps::kTiles, n_tiles);
        stamp.word(UnitStamps::kOrder, stamp_order++);
        stamp.word(UnitStamps::kUnit, kPersistent ? u : -1);
        stamp.word(UnitStamps::kWritten, 1);)
  }
  if (kPersistent && cw == 0) wait_turn(cw);  // warpgroup 1's last hand-over
  // The CTA's shared memory stays until the stores have read it (a CTA per unit: its one store; persistent: its last).
  if (kStagedOut && store_thread) tma_store_wait<0>();
}

}  // namespace dmattn::cuda::sm90a
