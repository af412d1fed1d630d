// kernel_traits.h: the compile-time shape of one sm80-path forward kernel (element type x head dim x variant).
//
// The tile comes from the tile policy (tile_shape_sm80 / decode_shape_sm80 in ../heuristics.h), the one constexpr function that both the
// kernel and its launcher read, so the grid, the shared-memory size and the register fragments can never disagree.
// Everything that does not change the inner loop (mask / bias layouts, causal, GQA ratio, strides) is a runtime
// field of VarlenFwdParams.
//
// Warp layout: kWarps warps split the kBlockM query rows of a tile; warp w owns rows
// [w * kMTiles * 16, (w + 1) * kMTiles * 16) as kMTiles m16 fragments of the SM80 mma.sync m16n8k16 atom.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/arch/mma_sm80.hpp>

#include "../heuristics.h"

namespace dmattn::cuda::sm80 {

// What differs between fp16 and bf16: the MMA atom and the fp32 -> 16-bit packing of probabilities / outputs.
template <typename Elem>
struct ElemTraits;

template <>
struct ElemTraits<__nv_bfloat16> {
  using Mma = cute::SM80_16x8x16_F32BF16BF16F32_TN;
  static constexpr uint32_t kExpBits = 0x7f80u;  // exponent field: all ones for inf and NaN
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct ElemTraits<__half> {
  using Mma = cute::SM80_16x8x16_F32F16F16F32_TN;
  static constexpr uint32_t kExpBits = 0x7c00u;  // exponent field: all ones for inf and NaN
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// Shared-memory tiles of kHeadDim columns: the head dim is cut into column groups of kGroup elements (128 or 64
// bytes); each group is a row-major [rows][kGroup] block whose 16-byte chunks are XOR-swizzled by row (the CuTe
// Swizzle<3,3,3> / Swizzle<2,3,3> pattern), so ldmatrix reads of 8 rows at one column and cp.async writes of a row are
// free of bank conflicts. Because the swizzle only flips the chunk bits of a byte offset, moving a fragment by 16 rows
// is an add and moving it by a chunk is an XOR with a constant: no per-fragment address registers.
template <int kHeadDim>
struct SwizzledTiles {
  static constexpr int kGroup = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kGroupChunks = kGroup / 8;
  // The swizzle's period in rows: smem_offset(row + kSwizzleRows * m, col) = smem_offset(row, col) + kSwizzleRows *
  // m * kGroup.
  static constexpr int kSwizzleRows = 8;

  // Element offset of (row, col) in a tile of kRows rows.
  template <int kRows>
  static __device__ __forceinline__ int smem_offset(int row, int col) {
    const int swz = kGroup == 64 ? row % 8 : (row / 2) % 4;
    return (col / kGroup) * (kRows * kGroup) + row * kGroup + (((col % kGroup) / 8) ^ swz) * 8 + col % 8;
  }
  // Byte offset of the fragment at (row0 + 16 * m, col0 + c) given the byte offset of (row0, col0), where col0 is
  // within the first chunk of its group pair and c is a compile-time multiple of 8.
  template <int kRows>
  static __device__ __forceinline__ uint32_t smem_step(uint32_t base_bytes, int rows16, int c) {
    return ((base_bytes + rows16 * 16 * kGroup * 2 + (c / kGroup) * (kRows * kGroup * 2)) ^
            (((c % kGroup) / 8) << 4));
  }
};

template <typename Elem_, int kHeadDim_, bool kQueryOperands_, bool kWindowLeft_ = kQueryOperands_>
struct KernelTraits : SwizzledTiles<kHeadDim_> {
  using Elem = Elem_;
  using Mma = typename ElemTraits<Elem>::Mma;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kQueryOperands = kQueryOperands_;  // reads query-side masks / biases
  // Handles a window's left edge (per-row lower key bounds, which cost the 128-row tile a 16-byte spill): the plan
  // sends calls with a left edge to a variant that has them (heuristics.h), so calls without one keep the registers
  // of a kernel without windows.
  static constexpr bool kWindowLeft = kWindowLeft_;
  // Packed keys only (the binding gathers a kv_slots pool for this kernel); gathers at key positions (key_pos).
  static constexpr bool kSlotRows = false;
  // Reads per-query key ranges (VarlenFwdParams::key_range) where it keeps per-row lower key bounds anyway: the
  // windowed variants (a range is a per-row window read from memory); the plain 128-row variant spilled with it.
  static constexpr bool kKeyRanges = kWindowLeft;
  static_assert(kWindowLeft || !kQueryOperands, "the query-side variant also serves windowed calls");
  static constexpr TileShape kTile = tile_shape_sm80(kHeadDim, kQueryOperands);
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kWarps = kTile.warps;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = kBlockM / (16 * kWarps);  // m16 fragments per warp
  static constexpr int kNTiles = kBlockN / 8;              // n8 score fragments per KV tile
  static constexpr int kDTiles = kHeadDim / 8;             // n8 output fragments
  static constexpr int kChunksPerRow = kHeadDim / 8;       // 16-byte chunks per q/k/v row
  static constexpr int kPrefetch = 2;                      // ldmatrix steps loaded ahead of the MMAs

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are multiples of 32 up to 256");
  static_assert(kBlockM % (16 * kWarps) == 0 && kMTiles >= 1, "each warp owns whole m16 fragments");
  static_assert(kBlockN % 16 == 0 && kBlockN <= kThreads, "one thread per key slot fills the tile metadata");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0 && (kBlockM * kChunksPerRow) % kThreads == 0,
                "tile loads split evenly over the threads");

  // The query-side variant's operand tiles (score_operands.cuh, ScoreOperands::stage): a KV tile's mask bytes and
  // bias values of every row, copied with the tile's K as the 16-byte chunks that cover them (a row may start
  // anywhere in its first chunk: its offset there is kept in op_mask_at / op_bias_at). A row of kBlockN elements
  // spans one chunk more than it holds; the pitches leave that room and put the score step's reads (8 rows x 4
  // lanes) in distinct banks: a 20-word step per row for masks and 16-bit biases, 72 words (8 mod 32) for fp32 ones.
  // Up to head dim 128 (varlen_fwd_kernel.cuh says why).
  static constexpr bool kStagedOperands = kQueryOperands && kHeadDim <= 128;
  static constexpr int kMaskPitch = kBlockN + 16;
  static constexpr int kBias16Pitch = 2 * kBlockN + 16;
  static constexpr int kBias32Pitch = 4 * kBlockN + 32;

  struct alignas(128) SharedStorage {
    Elem q[kBlockM * kHeadDim];   // sQ (kBlockM, D), SmemLayoutQ
    Elem k[kBlockN * kHeadDim];   // sK (kBlockN, D), SmemLayoutKV
    Elem v[kBlockN * kHeadDim];   // sV (kBlockN, D), SmemLayoutKV
    int32_t key_pos[2][kBlockN];  // per metadata buffer: key position of each slot of a KV tile, -1 = no key
    float key_bias[2][kBlockN];   // per metadata buffer: key-side bias of each slot; 0 without one
    uint8_t v_bad[kBlockN];       // slots of the current V tile whose row held inf / NaN (rare path, see kernel)
    // Each row's key_range [begin, end), read once per CTA (kKeyRanges variants; {0, 0} for rows past the tile):
    // a shared-memory read in the per-element path costs no 64-bit address registers where a global one did.
    int32_t row_range[kKeyRanges ? kBlockM : 1][2];
    alignas(16) uint8_t op_mask[kStagedOperands ? kBlockM * kMaskPitch : 16];
    alignas(16) char op_bias[kStagedOperands ? kBlockM * kBias32Pitch : 16];
    uint8_t op_mask_at[kStagedOperands ? kBlockM : 1];  // byte offset of each row's first element in its row
    uint8_t op_bias_at[kStagedOperands ? kBlockM : 1];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);
};

// The decode kernel (decode_kernel.cuh): every warp holds all kBlockM packed rows (kMTiles m16 fragments) and its
// own 16 keys of each KV tile (kNTiles = 2 n8 fragments); kStages KV tiles in flight.
template <typename Elem_, int kHeadDim_, bool kQueryOperands_ = false>
struct DecodeKernelTraits : SwizzledTiles<kHeadDim_> {
  using Elem = Elem_;
  using Mma = typename ElemTraits<Elem>::Mma;
  static constexpr int kHeadDim = kHeadDim_;
  // Reads query-side masks / biases per element of its packed rows (its own instantiation: the registers of the
  // other stay as they were); the kept-key list it walks is then the union of the sequence's query rows.
  static constexpr bool kQueryOperands = kQueryOperands_;
  static constexpr bool kWindowLeft = true;       // windows of every kind
  static constexpr bool kKeyRanges = true;        // and per-query key ranges
  static constexpr bool kSlotRows = true;         // gathers K / V at each slot's row (key_row): a pool read in place
  static constexpr DecodeShape kShape = decode_shape_sm80(kHeadDim);
  static constexpr int kBlockM = kShape.block_m;
  static constexpr int kBlockN = kShape.block_n;
  static constexpr int kWarps = kShape.warps;
  static constexpr int kStages = kShape.stages;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kMTiles = kBlockM / 16;             // m16 fragments, in every warp
  static constexpr int kWarpKeys = kBlockN / kWarps;       // keys of a KV tile per warp
  static constexpr int kNTiles = kWarpKeys / 8;            // n8 score fragments per warp
  static constexpr int kDTiles = kHeadDim / 8;             // n8 output fragments
  static constexpr int kChunksPerRow = kHeadDim / 8;
  static constexpr int kPrefetch = 2;
  static constexpr int kMetaSlots = kStages + 1;           // tile metadata ring (decode_kernel.cuh)

  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "head dims are multiples of 32 up to 256");
  static_assert(kWarpKeys == 16, "a warp's keys are one k16 step of P V");
  static_assert(kBlockN <= kThreads && kBlockM <= kThreads, "one thread per key slot / per row of the metadata");
  static_assert((kBlockN * kChunksPerRow) % kThreads == 0, "tile loads split evenly over the threads");

  struct Tiles {
    Elem q[kBlockM * kHeadDim];
    Elem k[kStages][kBlockN * kHeadDim];
    Elem v[kStages][kBlockN * kHeadDim];
  };
  struct Reduce {  // after the last KV tile, over the tiles: each warp's unnormalized O, for the cross-warp sum
    float o[kWarps][kBlockM][kHeadDim];
  };
  struct alignas(128) SharedStorage {
    union {
      Tiles tiles;
      Reduce reduce;
    };
    int32_t key_pos[kMetaSlots][kBlockN];  // per metadata slot: key position of each slot of a KV tile, -1 = none
    float key_bias[kMetaSlots][kBlockN];   // its key-side bias; 0 without one
    int32_t key_row[kMetaSlots][kBlockN];  // the row of k / v holding each slot's key (a pool row, or a packed row)
    float row_max[kWarps][kBlockM];        // cross-warp reduction: each warp's row max, row sum, poisoned flag
    float row_sum[kWarps][kBlockM];
    float row_coef[kWarps][kBlockM];       // each warp's factor in the CTA's normalized O
    float row_lse[kBlockM];
    uint8_t row_poisoned[kWarps][kBlockM];
    uint8_t v_bad[kBlockN];
  };
  static constexpr int kSmemBytes = sizeof(SharedStorage);

  // The query-side variant's ring of terms (score_operands.cuh, TermRuns), after SharedStorage in dynamic shared
  // memory: per stage, a row of kBlockN terms for each query a row tile can hold (its rows' distinct queries).
  static __host__ __device__ int term_queries(const VarlenFwdParams& p) {
    return static_cast<int>(p.max_seqlen_q < kBlockM ? p.max_seqlen_q : kBlockM);
  }
  static int smem_bytes(const VarlenFwdParams& p) {
    if (!kQueryOperands) return kSmemBytes;
    return kSmemBytes + kStages * term_queries(p) * kBlockN * (query_terms_f32(p) ? 4 : 2);
  }
};

}  // namespace dmattn::cuda::sm80
