// warpgroups.cuh: how the sm90a kernels' warpgroups meet (fwd_kernel.cuh; the backward, bwd_kernel.cuh, takes the
// GEMM helpers and consumer_sync): the CTA's named barriers, the two consumer warpgroups' ping-pong turns, one
// warpgroup GEMM issued and waited for, and a wgmma accumulator seen as the sm80 helpers' m16n8 fragments.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>

namespace dmattn::cuda::sm90a {

// The forward's named barriers (0 is __syncthreads): 1 for both consumer warpgroups (consumer_sync, which the backward
// uses too), 2 + w for consumer warpgroup w's turn to issue its S GEMM (ping-pong), then the producer's and the
// stores'. The backward numbers its own from 4 (bwd_kernel.cuh).
constexpr int kConsumerBarrier = 1;
constexpr int kTurnBarrier = 2;
constexpr int kProducerBarrier = 4;  // kQuery: the producer warpgroup's, while it lists a unit's tiles
constexpr int kStoreBarrier = 5;     // 5 + w: consumer warpgroup w's own, its out tile staged for the TMA store

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

}  // namespace dmattn::cuda::sm90a
