// kernel_traits.h: the compile-time shape of one varlen forward kernel (element type x head dim).
//
// The tile policy (tile_shape) is the one constexpr function that both the kernel and its launcher read, so the
// grid, the shared-memory size and the register fragments can never disagree. Everything that does not change the
// inner loop (mask / bias layouts, causal, GQA ratio, strides) is a runtime field of VarlenFwdParams.
//
// Warp layout: kWarps warps split the kBlockM query rows of a tile; warp w owns rows
// [w * kMTiles * 16, (w + 1) * kMTiles * 16) as kMTiles m16 fragments of the SM80 mma.sync m16n8k16 atom.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/mma_sm80.hpp>
#include <cute/tensor.hpp>

namespace dmattn::cuda {

struct TileShape {
  int block_m;  // query rows per CTA
  int block_n;  // key slots per KV tile
  int warps;
};

// The tile policy. Register budget per thread (fp32): O accumulator kMTiles * D / 2, scores kMTiles * block_n / 4.
constexpr TileShape tile_shape(int head_dim) {
  return head_dim <= 128 ? TileShape{128, 64, 4} : TileShape{64, 64, 4};
}

// What differs between fp16 and bf16: the MMA atom and the fp32 -> 16-bit packing of probabilities / outputs.
template <typename Elem>
struct ElemTraits;

template <>
struct ElemTraits<__nv_bfloat16> {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct ElemTraits<__half> {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <typename Elem_, int kHeadDim_>
struct KernelTraits {
  using Elem = Elem_;
  using Mma = typename ElemTraits<Elem>::Mma;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr TileShape kTile = tile_shape(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);  // m16 fragments per warp
  static constexpr int kNTiles = kBlockN / 8;              // n8 score fragments per KV tile
  static constexpr int kDTiles = kHeadDim / 8;             // n8 output fragments
  static constexpr int kChunksPerRow = kHeadDim / 8;       // 16-byte chunks per q/k/v row

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are multiples of 32 up to 256");
  static_assert(kBlockM % (16 * kWarps) == 0 && kMTiles >= 1, "each warp owns whole m16 fragments");
  static_assert(kBlockN % 16 == 0 && kBlockN <= kThreads, "one thread per key slot fills the tile metadata");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0 && (kBlockM * kChunksPerRow) % kThreads == 0,
                "tile loads split evenly over the threads");

  // Shared-memory tiles are row-major [rows][kHeadDim] with the 16-byte chunks of each 8-row group XOR-swizzled
  // (CuTe Swizzle<B, 3, 3> over 8 x kGroup atoms), so that ldmatrix reads of 8 rows at one column and cp.async
  // writes of one row are both free of bank conflicts.
  static constexpr int kGroup = kHeadDim % 64 == 0 ? 64 : 32;
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<kGroup == 64 ? 3 : 2, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kGroup>>, cute::Stride<cute::Int<kGroup>, cute::_1>>{}));
  using SmemLayoutQ = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(SmemAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));

  struct alignas(128) SharedStorage {
    Elem q[kBlockM * kHeadDim];   // sQ (kBlockM, D), SmemLayoutQ
    Elem k[kBlockN * kHeadDim];   // sK (kBlockN, D), SmemLayoutKV
    Elem v[kBlockN * kHeadDim];   // sV (kBlockN, D), SmemLayoutKV
    int32_t key_pos[kBlockN];     // key position in its sequence of each slot of the K tile, -1 = no key
    float key_bias[kBlockN];      // key-side bias of each slot, times log2(e); 0 without one
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

}  // namespace dmattn::cuda
