// tile_operands.cuh: what the sm90a forward's consumers read of a KV tile beside its S = Q K^T (fwd_kernel.cuh): a
// key-side bias over kept slots (kSlots), the words of a query-side bias (kQueryBias) and mask bits (kQuery) staged in
// shared memory, and the rare path of the V scan that zeroes a hidden key's inf / NaN V elements.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include <cutlass/arch/barrier.h>

#include "../sm80/kernel_traits.h"
#include "warpgroups.cuh"

namespace dmattn::cuda::sm90a {

// A slot tile's key-side bias in shared memory, as KeptRows::bias_slot orders it: the pairs of columns 8 nt + 2 t
// (and the next) of fragments nt = 2 k and 2 k + 1 lie side by side, so that thread t of a quad reads both with one
// 16-byte load (slot_bias_pairs), where two 8-byte loads read them in slot order; one pair alone: slot_bias_pair.
__device__ __forceinline__ float4 slot_bias_pairs(const float* slot_bias, int k, int t) {
  return *reinterpret_cast<const float4*>(slot_bias + 16 * k + 4 * t);
}
__device__ __forceinline__ float2 slot_bias_pair(const float* slot_bias, int nt, int t) {
  return *reinterpret_cast<const float2*>(slot_bias + 16 * (nt / 2) + 4 * t + 2 * (nt % 2));
}

// kSlots without kQuery: the first kAhead fragment pairs' bias of a tile that every row sees whole, read ahead of
// its scores (prefetch_bias); an empty struct for the other variants. kMost: at most that many.
template <int kN8, bool kHeld, int kMost = 2>
struct SlotBiasAhead {
  // Two 16-byte loads (four fragments) while S is computed: ptxas spilled 8-164 bytes in the persistent slot kernels
  // when more were held across the S GEMM's wait (D = 128, sm_90a); at D = 256 (64-key tiles, kN8 = 8: O takes 128
  // registers) one, where two spilled 4 bytes in the windowed kernel.
  static constexpr int kAhead = kN8 >= 16 && kMost >= 2 ? 2 : 1;
  float4 pairs[kAhead];
};
template <int kN8, int kMost>
struct SlotBiasAhead<kN8, false, kMost> {
  static constexpr int kAhead = 0;
};

// kQueryBias: copies one aligned 32-bit word of a row of a float32 query-side bias (kBias32) into shared memory, bytes
// of it (4, or 0 for none: then from is only a valid address, not read, and the word is zero-filled). Asynchronous
// (cp.async): a thread's copies of a tile are issued together and waited for where the scores read them, so no
// register holds a term meanwhile.
__device__ __forceinline__ void copy_term_word(uint32_t* word, const void* from, int bytes) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(word));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(to), "l"(from), "r"(bytes) : "memory");
}
// The same for one aligned 16-byte chunk of a row of a 16-bit query-side bias (eight elements): bytes of it (16; fewer
// where the row's keys end inside it, the rest zero-filled; 0 for none).
__device__ __forceinline__ void copy_term_chunk(uint32_t* chunk, const void* from, int bytes) {
  const uint32_t to = static_cast<uint32_t>(__cvta_generic_to_shared(chunk));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(to), "l"(from), "r"(bytes) : "memory");
}

// Two elements of q's dtype in a 32-bit word (x: the low half) as float32 values.
template <typename Elem>
__device__ __forceinline__ float2 term_pair(uint32_t word) {
  if constexpr (std::is_same_v<Elem, __nv_bfloat16>) {
    return make_float2(__uint_as_float(word << 16), __uint_as_float(word & 0xffff0000u));
  } else {
    return __half22float2(*reinterpret_cast<const __half2*>(&word));
  }
}

// kQuery: a row's bits of a masked tile (FwdTraits::RowBits, as loaded) as its words: bit c % 32 of word c / 32 is
// column c's.
__device__ __forceinline__ void bit_words(const uint4& bits, uint32_t (&words)[4]) {
  words[0] = bits.x;
  words[1] = bits.y;
  words[2] = bits.z;
  words[3] = bits.w;
}
__device__ __forceinline__ void bit_words(const uint2& bits, uint32_t (&words)[2]) {
  words[0] = bits.x;
  words[1] = bits.y;
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

}  // namespace dmattn::cuda::sm90a
