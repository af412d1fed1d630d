// kernel_traits.h: the compile-time shape of the sm90a prefill kernel (element type x head dim): its tile, its
// warpgroup MMAs, its shared-memory layouts and its TMA copy types.
//
// A CTA is three warpgroups: warpgroup 0 loads (one elected thread issues the TMA copies of Q once and of K / V tile
// by tile into a kStages-deep ring), warpgroups 1 and 2 compute, each owning 64 of the tile's kBlockM = 128 query
// rows. S = Q K^T is a wgmma with both operands in shared memory; O += P V takes P from registers (the S accumulator,
// rounded to Elem, is already laid out as a wgmma A operand) and V from shared memory, read transposed through
// SmemLayoutVt (no copy). Every smem tile is in the 128-byte-swizzled K-major layout that both TMA and wgmma read.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

// cute/tensor.hpp first: the atom headers below build on it.
#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/copy_traits_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include "../heuristics.h"

namespace dmattn::cuda::sm90a {

// kBlockN_: keys per KV tile, the head dim's tile_shape_sm90a unless a kernel asks for another (launch.cuh: the plain
// kernel's wide tiles, FwdPlan::sm90a_wide).
template <typename Elem_, int kHeadDim_, int kBlockN_ = tile_shape_sm90a(kHeadDim_).block_n>
struct FwdTraits {
  using Elem = Elem_;  // __half or __nv_bfloat16, as the sm80 path and the binding spell them
  // The same type as CuTe's MMA and TMA atoms spell it.
  using CuteElem = std::conditional_t<std::is_same_v<Elem, __nv_bfloat16>, cutlass::bfloat16_t, cutlass::half_t>;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr TileShape kTile = tile_shape_sm90a(kHeadDim);
  static constexpr int kBlockM = kTile.block_m;  // query rows per CTA: 64 per consumer warpgroup
  static constexpr int kBlockN = kBlockN_;  // keys per KV tile
  static constexpr int kStages = kSm90aStages;   // K / V tiles in flight
  static constexpr int kConsumerWarpgroups = kBlockM / 64;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);
  static constexpr int kConsumerThreads = 128 * kConsumerWarpgroups;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256, "whole 128-byte swizzle atoms (64 elements)");
  // Q tiles of a persistent CTA: two where they fit (it loads its next unit's Q during this one); D = 256's one, so
  // its next Q is loaded once this unit's last S has read the tile.
  static constexpr int kPersistentQBuffers = kHeadDim <= 128 ? 2 : 1;
  // The Q tiles of a CTA: persistent, kPersistentQBuffers, but one at D = 128 beside a query-side bias, whose terms'
  // 34 KB take the second's room (227 KB per CTA).
  template <bool kPersistent, bool kQueryBias>
  static constexpr int kQBuffers = !kPersistent ? 1 : kQueryBias && kHeadDim > 64 ? 1 : kPersistentQBuffers;

  // One consumer warpgroup's MMAs: S (64 x kBlockN) = Q (64 x D) K^T, and O (64 x D) += P (64 x kBlockN) V. S is one
  // wgmma of N = kBlockN per 16 of D: CuTe's selector takes a tile width it has an instruction for (not 176, say,
  // which it covers with eleven 16-wide ones unless CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED: eleven times the A reads).
  using MmaQK = decltype(cute::make_tiled_mma(
      cute::GMMA::ss_op_selector<CuteElem, CuteElem, float, cute::Shape<cute::_64, cute::Int<kBlockN>, cute::Int<kHeadDim>>>()));
  static_assert(cute::size<1>(typename MmaQK::AtomShape_MNK{}) == kBlockN, "S: one wgmma across the tile's keys");
  using MmaPV = decltype(cute::make_tiled_mma(
      cute::GMMA::rs_op_selector<CuteElem, CuteElem, float, cute::Shape<cute::_64, cute::Int<kHeadDim>, cute::Int<kBlockN>>,
                                 cute::GMMA::Major::K, cute::GMMA::Major::MN>()));

  using SmemLayoutQ = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CuteElem>{},
                                                   cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(cute::tile_to_shape(
      cute::GMMA::Layout_K_SW128_Atom<CuteElem>{},
      cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>, cute::Int<kStages>>{}));
  // V^T (D x kBlockN x stages) over V's own bytes: P V reads it as an MN-major B operand.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{}, cute::make_ordered_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>, cute::Int<kStages>>{},
                                                cute::Step<cute::_2, cute::_1, cute::_3>{})));

  // The global tensors TMA reads: (rows, D, heads) with the row and head strides of the call.
  using GmemShape = cute::Shape<int32_t, int32_t, int32_t>;
  using GmemStride = cute::Stride<int64_t, cute::_1, int64_t>;
  using GmemLayout = cute::Layout<GmemShape, GmemStride>;
  using TmaQ = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<const CuteElem*>(nullptr)), GmemLayout{}),
      SmemLayoutQ{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}, cute::_1{}));
  using TmaKV = decltype(cute::make_tma_copy(
      cute::SM90_TMA_LOAD{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<const CuteElem*>(nullptr)), GmemLayout{}),
      cute::take<0, 2>(SmemLayoutKV{}), cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}, cute::_1{}));

  // The output tile of one consumer warpgroup, its 64 rows x D, staged in that warpgroup's half of its Q buffer (Q's
  // swizzled layout) and stored by TMA (fwd_kernel.cuh, the epilogue): out's (rows, D, heads) view with the call's
  // strides; the box is the half's 64 rows x 64 columns (one 128-byte swizzle span), stored D / 64 times.
  using SmemLayoutOutHalf = decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<CuteElem>{},
                                                         cute::Shape<cute::_64, cute::Int<kHeadDim>>{}));
  using TmaOut = decltype(cute::make_tma_copy(
      cute::SM90_TMA_STORE{}, cute::make_tensor(cute::make_gmem_ptr(static_cast<CuteElem*>(nullptr)), GmemLayout{}),
      SmemLayoutOutHalf{}, cute::Shape<cute::_64, cute::Int<kHeadDim>>{}, cute::_1{}));
  // The warpgroup's O (the P V accumulator, rounded to Elem) into that half: stmatrix, four 8 x 8 tiles at a time.
  using SmemCopyOut = cute::Copy_Atom<cute::SM90_U32x4_STSM_N, CuteElem>;

  using Pipeline = cutlass::PipelineTmaAsync<kStages>;
  static constexpr uint32_t kQBytes = kBlockM * kHeadDim * sizeof(Elem);
  static constexpr uint32_t kKVBytes = kBlockN * kHeadDim * sizeof(Elem);

  // a persistent launch's sequences that its unit table holds, at most
  static constexpr int kUnitTableSeqs = static_cast<int>(kSm90aUnitTableSeqs);

  // kQuery: a unit's live KV tiles, 16 bits each (tile_list.cuh, TileEntry), one list per Q buffer: the
  // kSm90aQueryMaxTiles 128-key tiles of the longest sequence the plan sends, as kBlockN-key tiles (2048 at D = 256).
  // Only tiles that divide the map's 128-key tiles can be listed (the kQuery variants; wide tiles are never listed).
  static constexpr bool kListable = BlockMap::kBitTileKeys % kBlockN == 0;
  static constexpr int kListTiles =
      kListable ? static_cast<int>(kSm90aQueryMaxTiles) * (BlockMap::kBitTileKeys / kBlockN) : 1;
  // kQuery: a masked tile's bits of one query row (BlockMap::bits: 32 keys a word, laid out per 128-key tile), one
  // aligned load: a 128-key tile's four words (16 bytes), or a 64-key tile n's two, words [2 n, 2 n + 2) (8 bytes).
  static constexpr int kBitWords = kBlockN / BlockMap::kCols;
  static_assert(!kListable || kBitWords == 4 || kBitWords == 2, "one aligned load");
  using RowBits = std::conditional_t<kBitWords == 4, uint4, uint2>;

  // kQueryBias: the aligned 16-byte chunks (eight elements) of a row's kBlockN 16-bit bias elements from any element
  // on (one more than kBlockN / 8: a row may start anywhere in a chunk), and the row's pitch in shared memory, in
  // words: the chunks' words, 4 mod 32, so that the eight rows of a warp's quads reading one column pair each (banks
  // 4 row + t, where the rows start alike in their chunks) are 32 different banks, and a multiple of four (16-byte
  // copies). 34 KB for a tile of 128 rows x 128 keys; 18 KB at D = 256 (64-key tiles), whose kernel then holds
  // 221 KB of the 227 a CTA may have.
  static constexpr int kTermChunks = kBlockN / 8 + 1;
  static constexpr int kTermPitch = kBlockN / 2 + 4;
  static_assert(!kListable || (kTermPitch % 32 == 4 && kTermPitch == 4 * kTermChunks),
                "conflict-free reads of the staged terms");
  // kBias32 (a float32 query-side bias): a row's kBlockN elements are its words, kBlockN apart, column c of row r at
  // word c ^ 8 (r % 8) (a column pair stays one aligned 8-byte read; the eight rows of a warp's quads reading one pair
  // each touch 32 different banks per half warp). 64 KB at kBlockN = 128: a CTA per unit (no persistent unit table,
  // one Q buffer) and no slots, so that it fits beside Q, K and V: at D = 128 exactly the 227 KB a CTA may have, the
  // last 512 bytes the struct's rounding to 1 KB. A field growing by more fails launch_kernel's static_assert. At
  // D = 256 a 64-key tile's 32 KB beside Q (64 KB), K / V (128 KB) and the 2,048-entry tile list take 229 KB: no
  // kBias32 there (heuristics.h, sm90a_query_bias_fits).
  static constexpr int kTermWords32 = kBlockN;

  // kQBuffers Q tiles (kQBuffers above). kQuery: the tile lists; kQueryBias: the consumer threads' terms, as
  // float32 words where kBias32.
  template <int kQBuffers, bool kQuery = false, bool kQueryBias = false, bool kBias32 = false>
  struct SharedStorage {
    cute::array_aligned<CuteElem, kQBuffers * cute::cosize_v<SmemLayoutQ>, 1024> q;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutKV>, 1024> k;
    cute::array_aligned<CuteElem, cute::cosize_v<SmemLayoutKV>, 1024> v;
    typename Pipeline::SharedStorage pipe_k, pipe_v;
    alignas(8) uint64_t q_full[kQBuffers];   // Q landed (transaction barriers)
    alignas(8) uint64_t q_empty[kQBuffers];  // the consumers are done with that Q buffer
    // kSlots: each K stage's slot positions and biases (bulk copies on K's full barrier; fwd_kernel.cuh); kBias32
    // has none (its terms take the room)
    alignas(128) int32_t slot_pos[kBias32 ? 1 : kStages][kBias32 ? 1 : kBlockN];
    alignas(128) float slot_bias[kBias32 ? 1 : kStages][kBias32 ? 1 : kBlockN];
    uint8_t v_bad[kBlockN];      // slots of the current V tile whose row held inf / NaN (rare path)
    union {
      int tile_keys[4][4];  // kRanged with key ranges: the producer warps' parts of the unit's TileKeys
      // The dynamic scheduler's kernels (kDynamic: persistent, never with key ranges, so tile_keys is never read
      // there): the unit of Q buffer qb (at most two), published by the producer with that buffer's q_full arrival
      // (fwd_kernel.cuh, kUnitWords): its sequence and query tile, head, number, kept slots and KV tile bounds.
      int32_t unit_of_q[2][8];
    };
    // Persistent CTAs of a launch of at most kUnitTableSeqs sequences: query tiles of sequences [0, z) in entry z
    // (z <= seqs), so units are numbered over the sequences' own tiles (fwd_kernel.cuh, sequence_of).
    // (kBias32 runs a CTA per unit: none.)
    int32_t unit_tiles[kBias32 ? 1 : kUnitTableSeqs + 1];
    int32_t seq_rows[kBias32 ? 1 : kUnitTableSeqs][4];  // and each one's {q start, q len, k start, k len}, clamped
                                                         // (unit_work)
    // kQuery: the live KV tiles of the unit of each Q buffer, their count, and the producer warps' counts while the
    // list is built (one element elsewhere).
    uint16_t tile_list[kQuery ? kQBuffers : 1][kQuery ? kListTiles : 1];
    int32_t list_len[kQBuffers];
    int32_t list_warps[4];
    // kQueryBias: a KV tile's query-side bias, staged per query row as the kTermChunks aligned 16-byte chunks that
    // hold its elements, kTermPitch words apart (fwd_kernel.cuh, copy_terms); 16-byte aligned rows.
    alignas(kQueryBias ? 128 : 4) uint32_t terms[!kQueryBias ? 1 : kBias32 ? kBlockM * kTermWords32
                                                                           : kBlockM * kTermPitch];
  };
  template <int kQBuffers, bool kQuery = false, bool kQueryBias = false, bool kBias32 = false>
  static constexpr int kSmemBytes = sizeof(SharedStorage<kQBuffers, kQuery, kQueryBias, kBias32>);
};

// The TMA copies of one call (built on the host: they hold the tensor maps), a __grid_constant__ kernel parameter.
template <typename Traits>
struct TmaParams {
  typename Traits::TmaQ q;
  typename Traits::TmaKV k, v;
  typename Traits::TmaOut out;  // built where store_out holds
  // Whether out takes TMA stores (launch.cuh, out_takes_tma): else every row is stored from registers.
  bool store_out = false;
};

}  // namespace dmattn::cuda::sm90a
