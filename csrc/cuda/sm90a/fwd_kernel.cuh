// fwd_kernel.cuh: the sm90a prefill kernel (wgmma + TMA, warp-specialized): dense attention over packed varlen
// sequences, causal or not, any GQA ratio (the plan sends it no mask, bias, window edge, key range, softcap, sink or
// key pool: heuristics.h, sm90a_supports; those take the sm80 kernels).
//
// Grid (query tiles, query heads, sequences), longest query tiles first as in the sm80 prefill kernel. Per CTA:
//   producer (warpgroup 0, one thread)   Q once, then K and V of each visible KV tile, last tile first, through two
//                                        PipelineTmaAsync rings (the copy engine signals the tile's full barrier,
//                                        the consumers its empty one)
//   consumers (warpgroups 1, 2)          per KV tile: S = Q K^T (wgmma), the causal / sequence-end limit on the tiles
//                                        that need it, the online softmax (../sm80/online_softmax.cuh: the wgmma
//                                        accumulator holds each row as four lanes of a quad, as mma.sync's does),
//                                        O += P V (wgmma, P from registers); then out and lse of their 64 rows.
// TMA reads whole tiles: a tile's rows past the sequence belong to the next sequence or to nothing (zero-filled past
// the tensor). Their scores are hidden (-inf); their V rows, like any hidden key's, must not turn 0 * inf into NaN,
// so the tiles that hide keys run the scan of ../sm80/nonfinite_v.cuh over V (zero the inf / NaN elements, poison a
// row that gives such a key weight).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../../varlen_fwd_params.h"
#include "../sm80/nonfinite_v.cuh"
#include "../sm80/online_softmax.cuh"
#include "kernel_traits.h"

namespace dmattn::cuda::sm90a {

// The consumer warpgroups' named barriers (0 is __syncthreads): 1 for both, 2 + w for consumer warpgroup w's turn to
// issue its S GEMM (ping-pong).
constexpr int kConsumerBarrier = 1;
constexpr int kTurnBarrier = 2;

// Ping-pong of the two consumer warpgroups: warpgroup w waits for its turn before it issues a tile's S = Q K^T and
// hands the turn over once issued, so that one warpgroup's GEMMs run while the other's softmax does (the tensor
// cores and the exp units each busy). Per tile the other warpgroup arrives once on w's barrier: warpgroup 1 opens
// the first turn of warpgroup 0 and skips handing over after its last tile, so no arrival is left pending.
__device__ __forceinline__ void wait_turn(int cw) {
  asm volatile("bar.sync %0, %1;" ::"r"(kTurnBarrier + cw), "r"(256) : "memory");
}
__device__ __forceinline__ void hand_turn(int cw) {
  asm volatile("bar.arrive %0, %1;" ::"r"(kTurnBarrier + (1 - cw)), "r"(256) : "memory");
}

__device__ __forceinline__ void consumer_sync(int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(kConsumerBarrier), "r"(threads) : "memory");
}
// Whether pred holds for any consumer thread (a barrier with an OR reduction).
__device__ __forceinline__ bool consumer_any(bool pred, int threads) {
  uint32_t any;
  asm volatile(
      "{\n\t.reg .pred p, q;\n\tsetp.ne.u32 p, %1, 0;\n\tbar.red.or.pred q, %2, %3, p;\n\tselp.u32 %0, 1, 0, q;\n\t}"
      : "=r"(any)
      : "r"(static_cast<uint32_t>(pred)), "r"(kConsumerBarrier), "r"(threads)
      : "memory");
  return any != 0;
}

// Issues one warpgroup GEMM, C (+)= A B, without waiting (the caller fences the operands, calls warpgroup_arrive
// before the first of a batch and warpgroup_wait after): one commit group per GEMM.
template <bool kZero, typename Mma, typename TA, typename TB, typename TC>
__device__ __forceinline__ void warpgroup_issue(Mma& mma, const TA& a, const TB& b, TC& c) {
  using namespace cute;
  mma.accumulate_ = kZero ? GMMA::ScaleOut::Zero : GMMA::ScaleOut::One;
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(a); ++kb) {
    gemm(mma, a(_, _, kb), b(_, _, kb), c);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

// One warpgroup GEMM, C (+)= A B, issued (warpgroup_issue) and waited for. kZero: C = A B; kRegA: A is a register
// fragment (else, like B, shared memory descriptors); issued() runs once the GEMM is issued, before the wait.
struct NothingIssued {
  __device__ void operator()() const {}
};
template <bool kZero, bool kRegA, typename Mma, typename TA, typename TB, typename TC, typename Issued = NothingIssued>
__device__ __forceinline__ void warpgroup_gemm(Mma& mma, const TA& a, const TB& b, TC& c, Issued&& issued = {}) {
  using namespace cute;
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
  warpgroup_fence_operand(c);
  warpgroup_arrive();
  warpgroup_issue<kZero>(mma, a, b, c);
  issued();
  warpgroup_wait<0>();
  warpgroup_fence_operand(c);
  if constexpr (kRegA) warpgroup_fence_operand(const_cast<TA&>(a));
}

// The wgmma accumulator of a 64-row warpgroup tile as the m16n8 fragments the sm80 helpers take: thread t holds
// rows 16 (t / 32) + (t % 32) / 4 + 8 half, columns 8 nt + 2 (t % 4) + e, at flat index e + 2 half + 4 nt.
template <int kN8, typename Fragment>
__device__ __forceinline__ float (&as_m16n8(Fragment& f))[1][kN8][4] {
  static_assert(cute::size_v<typename Fragment::layout_type> == kN8 * 4, "a 64-row accumulator, 4 values per n8");
  return *reinterpret_cast<float(*)[1][kN8][4]>(f.data());
}

// Rare path of the V scan: the CTA's consumers found an inf / NaN in the V tile of a tile that hides keys. Flag the
// slots holding one and zero those elements (read by wgmma next: a proxy fence), consumers only.
template <typename Traits, typename SmemV>
__device__ void zero_nonfinite_v(SmemV& sv, uint8_t* v_bad, int ctid) {
  using Elem = typename Traits::Elem;
  constexpr uint16_t kExp = static_cast<uint16_t>(sm80::ElemTraits<Elem>::kExpBits);
  consumer_sync(Traits::kConsumerThreads);  // every consumer has scanned the tile before it changes
  if (ctid < Traits::kBlockN) {
    bool bad = false;
    for (int d = 0; d < Traits::kHeadDim; ++d) {
      uint16_t& bits = reinterpret_cast<uint16_t&>(sv(ctid, d));
      if ((bits & kExp) == kExp) {
        bits = 0;
        bad = true;
      }
    }
    v_bad[ctid] = bad;
  }
  cutlass::arch::fence_view_async_shared();
  consumer_sync(Traits::kConsumerThreads);
}

template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1)
fwd_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ TmaParams<Traits> tma, int seq0) {
  using namespace cute;
  using Elem = typename Traits::Elem;
  using Pipeline = typename Traits::Pipeline;
  using PipelineState = typename cutlass::PipelineState<Traits::kStages>;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kN8 = kBlockN / 8, kD8 = kHeadDim / 8;

  extern __shared__ __align__(1024) char smem_raw[];
  auto& smem = *reinterpret_cast<typename Traits::SharedStorage*>(smem_raw);

  // ---- The tile: sequence b, query head h, query rows [m0, m0 + kBlockM) of the sequence ----
  const int b = seq0 + blockIdx.z, h = blockIdx.y;
  const int hk = h / (p.num_heads / p.num_heads_k);
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const SeqRange sk = key_seq(p, b);
  const int q_len = static_cast<int>(sq.len), k_len = static_cast<int>(sk.len);
  const int m_block = gridDim.x - 1 - blockIdx.x;
  const int m0 = m_block * kBlockM;
  if (m0 >= q_len) return;
  const int rows = min(kBlockM, q_len - m0);
  // Causal (window_right = 0; the plan sends no other window): query i sees keys j <= i + k_len - q_len.
  const bool causal = p.window_right >= 0;
  const int shift = k_len - q_len;
  const int limit_last = causal ? min(k_len, max(m0 + rows - 1 + shift + 1, 0)) : k_len;  // the tile's last row
  const int limit_first = causal ? min(k_len, max(m0 + shift + 1, 0)) : k_len;            // its first row
  const int n_tiles = (limit_last + kBlockN - 1) / kBlockN;  // tiles some row sees
  // Tiles from here on hide some key from some row (the causal diagonal, the sequence's end).
  const int first_hiding = limit_first / kBlockN;

  // ---- Barriers ----
  const int warpgroup = threadIdx.x / 128;
  typename Pipeline::Params pipe_params;
  pipe_params.transaction_bytes = Traits::kKVBytes;
  pipe_params.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = threadIdx.x == 0;
  pipe_params.num_consumers = Traits::kConsumerThreads;
  Pipeline pipe_k(smem.pipe_k, pipe_params, Shape<_1, _1, _1>{});
  Pipeline pipe_v(smem.pipe_v, pipe_params, Shape<_1, _1, _1>{});
  auto& q_full = *reinterpret_cast<cutlass::arch::ClusterTransactionBarrier*>(&smem.q_full);
  if (threadIdx.x == 0) q_full.init(1);
  cutlass::arch::fence_barrier_init();
  __syncthreads();

  Tensor sQ = make_tensor(make_smem_ptr(smem.q.data()), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem.k.data()), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem.v.data()), typename Traits::SmemLayoutVt{});

  if (warpgroup == 0) {
    // ---- Producer ----
    cutlass::arch::warpgroup_reg_dealloc<24>();
    if (threadIdx.x == 0 && n_tiles > 0) {  // the pipelines' leader: it arms each full barrier with the tile bytes
      Tensor mQ = tma.q.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_q), kHeadDim, p.num_heads));
      Tensor mK = tma.k.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_k), kHeadDim, p.num_heads_k));
      Tensor mV = tma.v.get_tma_tensor(make_shape(static_cast<int32_t>(p.total_k), kHeadDim, p.num_heads_k));
      Tensor gQ = local_tile(domain_offset(make_coord(static_cast<int32_t>(sq.start), _0{}), mQ(_, _, h)),
                             Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, _0{}));
      Tensor gK = local_tile(domain_offset(make_coord(static_cast<int32_t>(sk.start), _0{}), mK(_, _, hk)),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));  // (N, D, tiles)
      Tensor gV = local_tile(domain_offset(make_coord(static_cast<int32_t>(sk.start), _0{}), mV(_, _, hk)),
                             Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, _0{}));
      auto [tQg, tQs] = tma_partition(tma.q, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sQ), group_modes<0, 2>(gQ));
      auto [tKg, tKs] = tma_partition(tma.k, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sK), group_modes<0, 2>(gK));
      auto [tVg, tVs] = tma_partition(tma.v, Int<0>{}, Layout<_1>{}, group_modes<0, 2>(sV), group_modes<0, 2>(gV));
      q_full.arrive_and_expect_tx(Traits::kQBytes);
      copy(tma.q.with(reinterpret_cast<uint64_t&>(q_full)), tQg, tQs);
      PipelineState state = cutlass::make_producer_start_state<Pipeline>();
      for (int n = n_tiles - 1; n >= 0; --n) {
        pipe_k.producer_acquire(state);
        copy(tma.k.with(*pipe_k.producer_get_barrier(state)), tKg(_, n), tKs(_, state.index()));
        pipe_v.producer_acquire(state);
        copy(tma.v.with(*pipe_v.producer_get_barrier(state)), tVg(_, n), tVs(_, state.index()));
        ++state;
      }
    }
    return;
  }

  // ---- Consumers ----
  cutlass::arch::warpgroup_reg_alloc<240>();
  const int cw = warpgroup - 1;       // consumer warpgroup: rows [64 cw, 64 cw + 64) of the tile
  const int ctid = threadIdx.x - 128;  // consumer thread index
  const int wtid = threadIdx.x % 128;  // thread in its warpgroup
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int row0 = m0 + 64 * cw + 16 * (wtid / 32) + g;  // this thread's rows: row0 and row0 + 8 (sequence positions)

  typename Traits::MmaQK mma_qk;
  typename Traits::MmaPV mma_pv;
  auto thr_qk = mma_qk.get_thread_slice(wtid);
  auto thr_pv = mma_pv.get_thread_slice(wtid);
  Tensor sQw = local_tile(sQ, Shape<_64, Int<kHeadDim>>{}, make_coord(cw, _0{}));
  Tensor tSrQ = thr_qk.partition_fragment_A(sQw);                 // (MMA, 1, D / 16)
  Tensor tSrK = thr_qk.partition_fragment_B(sK);                  // (MMA, 1, D / 16, stages)
  Tensor tOrV = thr_pv.partition_fragment_B(sVt);                 // (MMA, 1, N / 16, stages)
  Tensor tSrS = partition_fragment_C(mma_qk, Shape<_64, Int<kBlockN>>{});
  Tensor tOrO = partition_fragment_C(mma_pv, Shape<_64, Int<kHeadDim>>{});
  Tensor tOrP = make_tensor<typename Traits::CuteElem>(partition_shape_A(mma_pv, Shape<_64, Int<kBlockN>>{}));
  clear(tOrO);

  float(&s)[1][kN8][4] = as_m16n8<kN8>(tSrS);
  float(&o)[1][kD8][4] = as_m16n8<kD8>(tOrO);
  sm80::OnlineSoftmax<1, kN8> softmax;
  unsigned poisoned_rows = 0;
  const float scale = p.softmax_scale;

  // Per KV tile n (last first): S_n = Q K_n^T, its limits, softmax (P_n and the rows' rescale factors), then
  // O += P_n V_n. The GEMMs overlap the softmax: S_n is issued together with the previous tile's P V and waited for
  // alone, so the exponentials of tile n run while the tensor cores finish P_{n+1} V_{n+1}; O is rescaled once that
  // product has landed.
  auto scores = [&](int n) {  // S_n -> scale and limits (raw scores where every row sees every key)
    const bool hiding = n >= first_hiding;
    float score_mul = scale;
    if (hiding || !(scale > 0.f)) {  // the softmax may fold only a positive scale
      score_mul = 1.f;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int i = row0 + 8 * half;
        const int limit = causal ? min(k_len, i + shift + 1) : k_len;
#pragma unroll
        for (int nt = 0; nt < kN8; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[0][nt][2 * half + e];
            const int pos = n * kBlockN + nt * 8 + 2 * t + e;
            x = pos < limit ? x * scale : -INFINITY;
          }
      }
    }
    return score_mul;
  };
  // V_n landed; on a tile that hides keys, its inf / NaN elements zeroed and flagged (before any P V reads it).
  auto check_v = [&](int n, int stage) {
    const bool hiding = n >= first_hiding;
    // This thread's share of the V tile: whether it holds an inf / NaN; the consumers' vote.
    constexpr int kVecs = kBlockN * kHeadDim / 8;  // 16-byte vectors in a V tile
    const bool v_fix =
        hiding && consumer_any(sm80::share_has_nonfinite<Elem, kVecs, Traits::kConsumerThreads>(
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

  PipelineState state, v_state;  // v_state: the stage of the tile whose P V is pending
  float alpha[1][2];
  if (n_tiles > 0) {
    q_full.wait(0);
    if (cw == 1) hand_turn(cw);  // warpgroup 0 goes first
    // The first tile: nothing to overlap with yet (O is zero: no rescale).
    const int n = n_tiles - 1;
    pipe_k.consumer_wait(state);
    wait_turn(cw);
    warpgroup_gemm<true, false>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS, [&] {
      if (cw == 0 || n > 0) hand_turn(cw);  // issued: the other warpgroup's turn (none after warpgroup 1's last)
    });
    pipe_k.consumer_release(state);
    const float score_mul = scores(n);
    pipe_v.consumer_wait(state);
    const bool v_fix = check_v(n, state.index());
    softmax.update_scores(s, score_mul, alpha);
    if (v_fix) sm80::mark_poisoned_rows<1, kN8>(s, smem.v_bad, t, poisoned_rows);
    convert_p();
    v_state = state;
    ++state;
  }
  for (int n = n_tiles - 2; n >= 0; --n) {
    pipe_k.consumer_wait(state);
    wait_turn(cw);
    warpgroup_fence_operand(tSrS);
    warpgroup_fence_operand(tOrO);
    warpgroup_fence_operand(tOrP);
    warpgroup_arrive();
    warpgroup_issue<true>(mma_qk, tSrQ, tSrK(_, _, _, state.index()), tSrS);         // S_n
    warpgroup_issue<false>(mma_pv, tOrP, tOrV(_, _, _, v_state.index()), tOrO);     // O += P_{n+1} V_{n+1}
    if (cw == 0 || n > 0) hand_turn(cw);
    warpgroup_wait<1>();  // S_n landed; the P V may still run
    warpgroup_fence_operand(tSrS);
    pipe_k.consumer_release(state);
    const float score_mul = scores(n);
    pipe_v.consumer_wait(state);
    const bool v_fix = check_v(n, state.index());
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
    warpgroup_gemm<false, true>(mma_pv, tOrP, tOrV(_, _, _, v_state.index()), tOrO);
    pipe_v.consumer_release(v_state);
  }

  // ---- Epilogue: out and lse of this thread's two rows ----
  Elem* out = static_cast<Elem*>(p.out);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = row0 + 8 * half;
    const float l = softmax.row_total(0, half);
    const bool poisoned = sm80::quad_poisoned(poisoned_rows, half, lane);
    const sm80::RowEnd end = sm80::finish_row(softmax.row_max[0][half], l, poisoned, -INFINITY);
    if (i >= q_len) continue;
    const int64_t row = sq.start + i;
    if (t == 0) p.lse[static_cast<int64_t>(h) * p.total_q + row] = end.lse;
    Elem* dst = out + row * p.out_row_stride + static_cast<int64_t>(h) * p.out_head_stride;
#pragma unroll
    for (int dt = 0; dt < kD8; ++dt) {
      const uint32_t pair = sm80::ElemTraits<Elem>::pack(o[0][dt][2 * half] * end.inv, o[0][dt][2 * half + 1] * end.inv);
      *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * t) = pair;
    }
  }
}

}  // namespace dmattn::cuda::sm90a
