// launch.cuh: the sm90a path's launcher. Calls the plan gives to this path (FwdPlan::sm90a: prefill without mask,
// bias or key pool, heuristics.h sm90a_supports) run the wgmma / TMA kernel of fwd_kernel.cuh, in its kRanged
// variant where a row has its own key interval (sm90a_ranged), in its kSlots variant over a key-side mask's kept keys
// gathered into dense slots (FwdPlan::sm90a_slots: K / V's TMA views are over the gathered rows), in its kQuery
// variant with a query-side mask's block map and bits (FwdPlan::sm90a_query; at D = 256 also a key-side mask's, by
// sequence, where its kept rows are not gathered), with kQueryBias for a query-side bias beside such a mask or alone
// (float32's kBias32: D <= 128), and over slots in place for a key-side bias (FwdPlan::slots_in_place); gathered and
// in-place slots at every head dim; the plain variant on wide KV tiles at D = 64 where the plan says so
// (FwdPlan::sm90a_wide); every other call (other masks and biases, decode, key pools) runs the sm80 path's
// kernels, which run on every cc >= 8.0.
// Included by the generated instantiation files (tools/kernel_matrix.py), compiled for sm_90a only.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "../dispatch.h"
#include "../heuristics.h"
#include "fwd_kernel.cuh"
#include "kernel_traits.h"

namespace dmattn::cuda::sm90a {

// The TMA view of q, k or v: (rows, D, heads) with the call's strides (elements).
template <typename Elem>
auto gmem_rows(const void* ptr, int64_t rows, int32_t head_dim, int32_t heads, int64_t row_stride,
               int64_t head_stride) {
  using namespace cute;
  return make_tensor(make_gmem_ptr(static_cast<const Elem*>(ptr)),
                     make_layout(make_shape(static_cast<int32_t>(rows), head_dim, heads),
                                 make_stride(row_stride, _1{}, head_stride)));
}

// The kernel of kRanged / kPersistent / kSlots / kQuery / kQueryBias / kDynamic for this call, with its shared memory
// allowed.
template <typename Traits, bool kRanged, bool kPersistent, bool kSlots, bool kQuery, bool kQueryBias, bool kBias32,
          bool kDynamic = false>
cudaError_t launch_kernel(const VarlenFwdParams& p, const TmaParams<Traits>& tma, dim3 grid, UnitGrid units,
                          cudaStream_t stream, const SlotLists& slots, const BlockMap& map) {
  auto kernel = fwd_kernel<Traits, kRanged, kPersistent, kSlots, kQuery, kQueryBias, kBias32, kDynamic>;
  constexpr int kSmem =
      Traits::template kSmemBytes<Traits::template kQBuffers<kPersistent, kQueryBias>, kQuery, kQueryBias, kBias32>;
  static_assert(kSmem <= 227 * 1024, "more shared memory than a cc 9.0 CTA may have");
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Traits::kThreads, kSmem, stream>>>(p, tma, units, slots, map);
  return cudaGetLastError();
}

// Whether out can take the epilogue's TMA stores: a tensor map needs its start and strides in multiples of 16 bytes
// (the binding allocates out contiguous, so this holds there; a caller with other strides gets register stores) and
// its row count positive and within int32 (the kernel's row coordinates).
inline bool out_takes_tma(const VarlenFwdParams& p) {
  constexpr int64_t kElems16 = 8;            // 16 bytes of a 16-bit element type
  constexpr int64_t kMaxStride = 1ll << 36;  // elements: the tensor map's 2^40-byte stride limit, with room
  auto stride_ok = [&](int64_t s) { return s > 0 && s % kElems16 == 0 && s < kMaxStride; };
  return reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && stride_ok(p.out_row_stride) &&
         stride_ok(p.out_head_stride) && p.total_q > 0 && p.total_q <= INT32_MAX;
}

// The TMA copies of a call: q, and K / V from k and v with those row and head strides (elements) and kv_heads heads
// (k and v's own, or the kept copies'); out's stores where out_takes_tma.
template <typename Traits>
TmaParams<Traits> make_tma(const VarlenFwdParams& p, const void* k, int64_t k_row, int64_t k_head, const void* v,
                           int64_t v_row, int64_t v_head, int32_t kv_heads) {
  using namespace cute;
  using CuteElem = typename Traits::CuteElem;
  constexpr int D = Traits::kHeadDim;
  TmaParams<Traits> tma{
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows<CuteElem>(p.q, p.total_q, D, p.num_heads, p.q_row_stride, p.q_head_stride),
                    typename Traits::SmemLayoutQ{}, Shape<Int<Traits::kBlockM>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows<CuteElem>(k, p.total_k, D, kv_heads, k_row, k_head),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{}),
      make_tma_copy(SM90_TMA_LOAD{}, gmem_rows<CuteElem>(v, p.total_k, D, kv_heads, v_row, v_head),
                    take<0, 2>(typename Traits::SmemLayoutKV{}), Shape<Int<Traits::kBlockN>, Int<D>>{}, _1{}),
      {},
      false};
  if (out_takes_tma(p)) {
    Tensor out = make_tensor(make_gmem_ptr(static_cast<CuteElem*>(p.out)),
                             make_layout(make_shape(static_cast<int32_t>(p.total_q), int32_t{D}, p.num_heads),
                                         make_stride(p.out_row_stride, _1{}, p.out_head_stride)));
    tma.out = make_tma_copy(SM90_TMA_STORE{}, out, typename Traits::SmemLayoutOutHalf{}, Shape<_64, Int<D>>{}, _1{});
    tma.store_out = true;
  }
  return tma;
}

// The TMA copies of a call that reads K / V where they are (k and v).
template <typename Traits>
TmaParams<Traits> make_tma(const VarlenFwdParams& p) {
  return make_tma<Traits>(p, p.k, p.k_row_stride, p.k_head_stride, p.v, p.v_row_stride, p.v_head_stride, p.num_heads_k);
}

// The dynamic scheduler's section size (FwdPlan::sm90a_section_bytes) in key rows x KV heads of K and V: a sequence
// of k_len keys gets max(1, section_keys / k_len) KV heads a section.
template <typename Traits>
int32_t section_keys(const FwdPlan& plan) {
  const int64_t per_key = 2 * Traits::kHeadDim * static_cast<int64_t>(sizeof(typename Traits::Elem));  // K and V
  return static_cast<int32_t>(std::clamp<int64_t>(plan.sm90a_section_bytes / per_key, 1, INT32_MAX));
}

// Every unit of the call, in the launches of one variant: persistent where the plan says so (never with key ranges:
// their bounds are reduced once per CTA), a launch per kUnitTableSeqs sequences, whose units the kernel numbers in an
// int: at most query_tiles per sequence (clamp_seq: lying cu_seqlens included), times the sequences and heads; calls
// that could pass it take a CTA per unit.
// kBias32 (a float32 query-side bias) always takes a CTA per unit: its staged terms leave no room for the persistent
// unit table. plan.sm90a_dynamic (the plain, windowed and kSlots variants; not kQuery: plan_varlen_fwd): the
// persistent launches take their units from ws.unit_counters, one per launch, zeroed here first (one memset node
// before the first launch: stream-ordered like the call's other work, so CUDA graph replays and calls on other
// streams each zero their own workspace's).
template <typename Traits, bool kRanged, bool kSlots, bool kQuery = false, bool kQueryBias = false,
          bool kBias32 = false>
cudaError_t launch_units(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws,
                         const TmaParams<Traits>& tma, const SlotLists& slots, cudaStream_t stream,
                         const BlockMap& map = {}) {
  const int32_t query_tiles = static_cast<int32_t>((p.max_seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM);
  constexpr int64_t kTableSeqs = Traits::kUnitTableSeqs;
  const int64_t most_units = static_cast<int64_t>(query_tiles) * std::min<int64_t>(p.batch, kTableSeqs) * p.num_heads;
  if constexpr (!kBias32) {
    if (plan.sm90a_ctas > 0 && p.key_range == nullptr && most_units <= INT32_MAX) {
      constexpr bool kDynamicVariant = !kQuery && !kQueryBias;  // the dynamic scheduler's variants (fwd_kernel.cuh)
      const bool dynamic = kDynamicVariant && plan.sm90a_dynamic && ws.unit_counters != nullptr;
      if (dynamic) {
        const cudaError_t err =
            cudaMemsetAsync(ws.unit_counters, 0, sizeof(uint32_t) * static_cast<size_t>(sm90a_launches(p)), stream);
        if (err != cudaSuccess) return err;
      }
      for (int64_t seq0 = 0; seq0 < p.batch; seq0 += kTableSeqs) {
        const int32_t seqs = static_cast<int32_t>(std::min<int64_t>(p.batch - seq0, kTableSeqs));
        const int64_t grid_units = static_cast<int64_t>(query_tiles) * p.num_heads * seqs;
        const dim3 grid(static_cast<unsigned>(std::min<int64_t>(grid_units, plan.sm90a_ctas)));
        UnitGrid units{static_cast<int32_t>(seq0), seqs, query_tiles, cutlass::FastDivmod(p.num_heads)};
        DMATTN_UNIT_STAMP(units.stamps = ws.unit_stamps;)
        if constexpr (kDynamicVariant) {
          if (dynamic) {
            units.next_unit = ws.unit_counters + seq0 / kTableSeqs;
            // windows: a section is a sequence's every head (dynamic_unit)
            units.section_keys = kRanged ? INT32_MAX : section_keys<Traits>(plan);
            const cudaError_t err = launch_kernel<Traits, kRanged, true, kSlots, kQuery, kQueryBias, kBias32, true>(
                p, tma, grid, units, stream, slots, map);
            if (err != cudaSuccess) return err;
            continue;
          }
        }
        const cudaError_t err = launch_kernel<Traits, kRanged, true, kSlots, kQuery, kQueryBias, kBias32>(
            p, tma, grid, units, stream, slots, map);
        if (err != cudaSuccess) return err;
      }
      return cudaSuccess;
    }
  }
  constexpr int64_t kMaxSeqsPerLaunch = 65535;
  for (int64_t seq0 = 0; seq0 < p.batch; seq0 += kMaxSeqsPerLaunch) {
    const int32_t seqs = static_cast<int32_t>(std::min<int64_t>(p.batch - seq0, kMaxSeqsPerLaunch));
    const dim3 grid(static_cast<unsigned>(query_tiles), static_cast<unsigned>(p.num_heads),
                    static_cast<unsigned>(seqs));
    UnitGrid units{static_cast<int32_t>(seq0), seqs, query_tiles, cutlass::FastDivmod()};
    DMATTN_UNIT_STAMP(units.stamps = ws.unit_stamps;)
    const cudaError_t err = launch_kernel<Traits, kRanged, false, kSlots, kQuery, kQueryBias, kBias32>(
        p, tma, grid, units, stream, slots, map);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

template <typename Traits, bool kRanged>
cudaError_t launch_fwd(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws, cudaStream_t stream) {
  if (plan.sm90a_query && !plan.sm90a_slots) {  // the mask's bits and block map (build_block_map), K / V in place
    if (p.bias.layout == OperandLayout::kQuerySide) {  // and a query-side bias (its elements read by the consumers)
      if (p.bias.dtype == ScalarType::kFloat32) {
        // kBias32's 32 KB of terms at D = 256 do not fit beside its Q, K / V and tile list (sm90a_query_bias_fits)
        if constexpr (Traits::kHeadDim > 128) return cudaErrorInvalidValue;
        else return launch_units<Traits, kRanged, false, true, true, true>(p, plan, ws, make_tma<Traits>(p), {},
                                                                           stream, ws.blocks);
      }
      return launch_units<Traits, kRanged, false, true, true>(p, plan, ws, make_tma<Traits>(p), {}, stream, ws.blocks);
    }
    // a mask alone: query-side, or key-side by sequence at D = 256 where its kept rows are not gathered
    // (BlockMap::by_sequence); never a key-side bias here, which this variant reads only over slots in place (below)
    if (p.bias.present()) return cudaErrorInvalidValue;
    return launch_units<Traits, kRanged, false, true>(p, plan, ws, make_tma<Traits>(p), {}, stream, ws.blocks);
  }
  if (plan.sm90a_slots) {
    // K / V from the gathered slots (k and v's packed shape, dense), or in place: every key a slot of one list. At
    // D = 256 the same kernels read 64-slot tiles (gather_kept_rows copies rows of 32 vectors there).
    const bool in_place = plan.slots_in_place;
    const int32_t kept_heads = in_place ? p.num_heads_k : ws.kept.heads;  // KeptRows::heads_of
    const int64_t row = static_cast<int64_t>(kept_heads) * Traits::kHeadDim;
    SlotLists slots;
    slots.count = in_place ? ws.kept.count : ws.keys.count;
    slots.pos = ws.kept.pos;
    slots.bias = ws.kept.bias;
    slots.limits = ws.kept.limits;
    slots.extent = ws.kept.extent;
    slots.mask_heads = in_place ? 1 : ws.keys.mask_heads;
    slots.heads_per_list = in_place ? p.num_heads : ws.keys.heads_per_list;
    slots.bias_group = ws.kept.bias_heads > 0 ? p.num_heads / ws.kept.bias_heads : 1;
    slots.query_tiles = ws.kept.query_tiles;
    slots.kv_heads = kept_heads;
    slots.kv_per_list = !in_place && ws.keys.mask_heads > p.num_heads_k;
    const TmaParams<Traits> tma =
        in_place ? make_tma<Traits>(p)
                 : make_tma<Traits>(p, ws.kept.k, row, Traits::kHeadDim, ws.kept.v, row, Traits::kHeadDim,
                                    kept_heads);
    // A mask beside a key-side bias (query-side; at D = 256 key-side too, by sequence, where its kept rows are not
    // gathered): both variants, the bias over slots in place.
    if (plan.sm90a_query) return launch_units<Traits, kRanged, true, true>(p, plan, ws, tma, slots, stream, ws.blocks);
    return launch_units<Traits, kRanged, true>(p, plan, ws, tma, slots, stream);
  }
  return launch_units<Traits, kRanged, false>(p, plan, ws, make_tma<Traits>(p), {}, stream);
}

template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws,
                             cudaStream_t stream) {
  // D = 256: no float32 query-side bias (sm90a_query_bias_fits: its tile of terms does not fit)
  if (!plan.sm90a || plan.kernel != FwdKernel::kPrefill || p.head_dim != kHeadDim ||
      (kHeadDim > 128 && query_terms_f32(p))) {
    return sm80::launch_attention<Elem, kHeadDim>(p, plan, ws, stream);
  }
  if (p.batch == 0 || p.num_heads == 0 || p.max_seqlen_q == 0) return cudaSuccess;
  using Traits = FwdTraits<Elem, kHeadDim>;
  if constexpr (sm90a_wide_keys(kHeadDim) > 0) {
    // The plain variant on wide KV tiles, on the plan's grid (FwdPlan::sm90a_wide: never masks, biases or key
    // intervals)
    if (plan.sm90a_wide) {
      using Wide = FwdTraits<Elem, kHeadDim, sm90a_wide_keys(kHeadDim)>;
      if (!sm90a_plain(plan, p)) return cudaErrorInvalidValue;
      return launch_units<Wide, false, false>(p, plan, ws, make_tma<Wide>(p), {}, stream);
    }
  }
  return sm90a_ranged(p) ? launch_fwd<Traits, true>(p, plan, ws, stream) : launch_fwd<Traits, false>(p, plan, ws, stream);
}

}  // namespace dmattn::cuda::sm90a
