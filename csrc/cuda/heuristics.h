// heuristics.h: every choice the CUDA backend makes for a call, in one place, torch-free.
//
//   tile_shape_sm80     the sm80 prefill kernel's tile policy (constexpr: its traits and its launcher read the same one)
//   decode_shape_sm80   the sm80 decode kernel's tile policy
//   plan_varlen_fwd     what a call runs: prefill or decode kernel, the passes around it, the decode kernel's packed
//                       row tiles and key splits; from host-known ints only (no device read, no sync)
// The scratch buffer a plan needs, and where each piece of it lives, is workspace.h's.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../varlen_fwd_params.h"
#include "passes.h"

namespace dmattn::cuda {

// Compute capability as an int (major * 10 + minor): 80 for A100, 90 for H100 / H200.
using ComputeCapability = int32_t;

struct DeviceInfo {
  ComputeCapability cc = 0;
  int32_t sm_count = 0;  // streaming multiprocessors; 0: unknown (the split heuristic assumes an H100's 132)
};

struct TileShape {
  int block_m;  // query rows per CTA
  int block_n;  // key slots per KV tile
  int warps;
};

// The sm80 prefill tile policy. Accumulators per thread (fp32): O kMTiles * D / 2, scores kMTiles * block_n / 4.
// query_operands: the kernel variant that reads a query-side mask or bias (a per-element path with 64-bit
// addressing that needs registers the 32-rows-per-warp tile does not have). Windowed calls keep the 128-row tile:
// the 64-row one reaches fewer keys past a window, but ran a 256-key window 1.45x slower on the H200.
constexpr TileShape tile_shape_sm80(int head_dim, bool query_operands) {
  // Measured on the H100 (benchmarks/results/NOTES.md): with 4 warps, 32 query rows per warp (two m16 fragments
  // sharing every K / V fragment) beat 16; D = 256 halves the KV tile to stay within 255 registers.
  if (head_dim > 128) return TileShape{64, 32, 4};
  return query_operands ? TileShape{64, 64, 4} : TileShape{128, 64, 4};
}

// The sm90a prefill tile policy (sm90a/kernel_traits.h): 128 query rows (two consumer warpgroups of 64) x 128-key
// tiles, kSm90aStages K / V tiles in flight, plus a producer warpgroup: 12 warps. D = 256 takes 64-key tiles: its
// Q tile (64 KB) and two stages of K and V (128 KB) fill the shared memory, and O is 128 floats per consumer thread.
constexpr TileShape tile_shape_sm90a(int head_dim) {
  return head_dim > 128 ? TileShape{128, 64, 12} : TileShape{128, 128, 12};
}
constexpr int kSm90aStages = 2;
// The plain sm90a kernel's wide KV tiles (FwdPlan::sm90a_wide): the keys of such a tile at head dim D, 0 where none
// is built. A tile's fixed work (the O rescale, the row max and sum exchanges, the ping-pong turns and the barrier
// waits) spreads over more keys: 192 at D = 64 (1.5x; its MMAs per tile are half of D = 128's, so that work weighs
// more there), on every grid (two Q buffers and two stages of K and V take 128 KB). None at D = 128: FlashAttention-3's
// 176-key tiles, there a CTA per unit (no room for a persistent CTA's second Q buffer; its persistent consumers
// spilled), ran 1.06x slower than the 128-key tiles on the dynamic grid (H100, benchmarks/results/README.md, run EP).
// At D = 256 the 64-key tiles already fill the shared memory.
constexpr int sm90a_wide_keys(int head_dim) { return head_dim == 64 ? 192 : 0; }
// A persistent sm90a launch's sequences, at most (its unit table in shared memory: sm90a/kernel_traits.h); the
// launcher splits a call into launches of at most this many.
constexpr int64_t kSm90aUnitTableSeqs = 255;
// The dynamic scheduler (FwdPlan::sm90a_dynamic) numbers a sequence's units in sections of heads whose K / V take at
// most this many bytes (at least one KV head a section), so that the units in flight share what L2 holds:
// FlashAttention-3 sizes its varlen sections from 8 MB ("an underestimate works better"). DMATTN_SM90A_SECTION_MB
// overrides it.
constexpr int64_t kSm90aSectionBytes = int64_t{8} << 20;
// Windows of at most this many keys (window_left + window_right + 1) take the sm80 kernel (plan_varlen_fwd).
constexpr int64_t kSm90aMinWindow = 128;

// The sm80 decode tile policy (sm80/decode_kernel.cuh). A tile is block_m packed rows (the query heads of one KV
// head x the sequence's queries) that every warp holds whole; the warps split each KV tile of block_n keys (16 keys
// each) and stages KV tiles are in flight. O per thread: block_m / 16 * D / 2 floats, so D = 256 takes 16 rows.
struct DecodeShape {
  int block_m, block_n, warps, stages;
};
constexpr DecodeShape decode_shape_sm80(int head_dim) {
  if (head_dim > 128) return DecodeShape{16, 64, 4, 2};  // 2 x 64 KB of K / V in flight
  return DecodeShape{32, 64, 4, head_dim <= 64 ? 4 : 3};  // D = 128: 3 x 32 KB, two CTAs per SM
}

enum class FwdKernel : int32_t { kPrefill = 0, kDecode = 1 };

// The prefill kernel's variants (sm80/launch.cuh): kQueryOperands reads query-side masks / biases (and serves windows
// and key ranges too), kWindowLeft keeps per-row lower key bounds for a window's left edge or per-query key ranges,
// kPlain neither (the registers of a kernel without windows).
enum class PrefillVariant : int32_t { kPlain = 0, kWindowLeft = 1, kQueryOperands = 2 };

// Debug overrides of the plan (the binding reads them from the DMATTN_* variables, varlen_fwd_cuda.cpp plan_overrides;
// the tests run every sample through each kernel with them). key_mask_map is also the binding's first fallback where
// the allocator cannot give the kept rows' copy (key_mask_map_fallback).
struct PlanOverrides {
  enum class Kernel : int32_t { kAuto = 0, kPrefill = 1, kDecode = 2 } kernel = Kernel::kAuto;
  int32_t tiles_per_split = 0;  // > 0: the decode kernel's KV tiles per split (the split caps still hold)
  bool sm80_only = false;       // the sm80 kernels even where an sm90a one could run (DMATTN_ARCH=sm80)
  int32_t sm90a_ctas = 0;       // set (DMATTN_SM90A_CTAS): the sm90a kernel wherever it can run, > 0 persistent on
                                // this many CTAs (calls with key ranges excepted), < 0 a CTA per unit; 0: the
                                // plan's choice
  // DMATTN_SM90A_SCHED: the sm90a kernel's plain, windowed and key-side (kSlots) variants persistent with their units
  // taken from a counter (FwdPlan::sm90a_dynamic; never the query-side variant, sm90a_query): kAuto (the default)
  // wherever it measured faster, kDynamic wherever it can run, kStatic nowhere (the static grids)
  enum class Sched : int32_t { kAuto = 0, kDynamic = 1, kStatic = 2 } sm90a_sched = Sched::kAuto;
  int64_t sm90a_section_bytes = 0;  // > 0 (DMATTN_SM90A_SECTION_MB): the dynamic scheduler's L2 sections' K / V
  // DMATTN_SM90A_WIDE: the plain kernel's wide tiles (FwdPlan::sm90a_wide): kAuto (the default) wherever they are
  // built (D = 64), kOff nowhere (the tests run every plain sample on the 128-key tiles too)
  enum class Wide : int32_t { kAuto = 0, kOff = 1 } sm90a_wide = Wide::kAuto;
  bool combine_launch = false;  // the split combine as its own launch even where the decode kernel could merge its
                                // own splits (DMATTN_DECODE_COMBINE=launch: the same bits, the path before it)
  bool compaction_chunks = false;  // key-side lists in parts by the chunk kernel, a thread's consecutive keys
                                   // (DMATTN_KEY_COMPACTION=chunks: the same lists, the pass before the warps')
  bool no_dependent_launch = false;  // DMATTN_DEPENDENT_LAUNCH=off: FwdPlan::dependent_launch never
  bool key_mask_map = false;    // a key-side mask's kept rows never gathered into slots (DMATTN_KEY_MASK=map): the
                                // sm90a kernel maps it by sequence where sm90a_query_supports takes it (D = 256, or
                                // beside a query-side bias as always), else the sm80 kernels over its lists
};

// What one call runs. The launchers choose a kernel from this and the params alone.
struct FwdPlan {
  FwdKernel kernel = FwdKernel::kPrefill;
  PrefillVariant prefill = PrefillVariant::kPlain;  // the prefill kernel's variant
  int32_t key_lists_heads = 0;  // > 0: a key-side mask with that many heads is compacted into kept-key lists first
                                // (the decode kernel with query-side operands: the lists of passes.h, KeyLists)
  bool compact_by_warps = true;  // lists compacted in parts (KeyParts) without query-side terms: by the warp-ballot
                                 // kernel, parts of KeyParts::kWarpPartKeys (KeyParts::by_warps)
  bool query_terms = false;     // decode kernel: query-side operands gathered along the lists (QueryTerms)
  bool sm90a = false;           // prefill on the sm90a path (wgmma + TMA) where it is compiled; else the sm80 one
  bool sm90a_slots = false;     // sm90a with a key-side mask: its kept K / V rows gathered into dense slots first
                                // (gather_kept_rows, passes.h KeptRows), which the kernel reads as whole tiles
  bool slots_in_place = false;  // sm90a_slots for a key-side bias without a mask or beside a mask the sm90a_query
                                // variant maps (query-side; at D = 256 key-side too, by sequence, where its kept
                                // rows are not gathered): every key a slot, K / V read in place
                                // (fill_slots_in_place, passes.h KeptRows), no compaction and no copy
  bool sm90a_query = false;     // sm90a with a query-side mask: its block map and its bits (BlockMap::bits) first,
                                // the kernel skipping dead tiles and reading the bits of the others; and / or a
                                // query-side bias (its elements read per live tile); at D = 256 also a key-side
                                // mask whose kept rows are not gathered (key ranges, past kMaxKeptRowBytes,
                                // PlanOverrides::key_mask_map), mapped by sequence (sm90a_query_supports)
  int32_t sm90a_ctas = 0;       // sm90a: > 0, a persistent grid of that many CTAs walks the work units (query tile,
                                // head, sequence); 0, a CTA per unit
  bool sm90a_dynamic = false;   // sm90a_ctas > 0, not sm90a_query: each CTA takes its next unit from a counter in
                                // the workspace (zeroed before the launch) when it has issued its unit's last K, the
                                // units numbered longest first within sections of a sequence's heads whose K / V fit
                                // sm90a_section_bytes (windowed calls: a section a sequence; fwd_kernel.cuh,
                                // kDynamic); else every sm90a_ctas-th unit
  int64_t sm90a_section_bytes = kSm90aSectionBytes;
  bool sm90a_wide = false;      // the plain variant (no mask, no bias, no window, key range or softcap) on
                                // sm90a_wide_keys(D)-key tiles (D = 64), causal or not, on whatever grid the plan
                                // gives the call; never with DMATTN_SM90A_WIDE=off
  int32_t block_map_heads = 0;  // > 0: a query-side mask with that many heads is summarized by blocks first (or a
                                // key-side one on sm90a's query-side variant, by sequence: BlockMap; beside a
                                // query-side bias, or at D = 256 where its kept rows are not gathered)
  bool v_flags = false;         // with the block map, or for a query-side bias alone on sm90a: v's blocks with an inf
                                // or NaN flagged (BlockMap::v_nonfinite)
  // Decode kernel only (1 / 0 otherwise):
  int32_t row_tiles = 1;        // tiles of packed rows per (sequence, KV head): ceil(H / Hk * max_seqlen_q / block_m)
  int32_t num_splits = 1;       // key splits per (sequence, KV head, row tile); > 1: partials + combine_splits
  int32_t tiles_per_split = 0;  // KV tiles per split
  bool unit_order = false;      // split, with lists: the units run longest first (order_decode_units, decode_order.cu)
  bool dependent_launch = false;  // decode on cc >= 9.0: the order pass and the decode kernel launched as programmatic
                                  // dependents of the launch before each (dependent_launch.cuh), each waiting for it
                                  // before its first read, so their launches overlap their predecessors' drain
  bool combine_finishes = false;  // split: combine_splits also finishes the rows (row_contract.cuh): a launch fewer
  bool combine_in_kernel = false;  // split, ordered: the last split CTA of each unit merges the unit's splits, and
                                   // order_decode_units zeroes their tickets and finishes the rows: neither
                                   // combine_splits nor finish_rows runs (passes.h, SplitPartials::tickets)
};

// Decode kernel policy constants.
constexpr int64_t kDecodeMaxPackedRows = 64;  // auto-chosen while H / Hk * max_seqlen_q <= this
constexpr int64_t kDecodeForcedMaxPackedRows = int64_t{1} << 20;  // DMATTN_KERNEL=decode up to this
constexpr int32_t kMaxDecodeSplits = 128;
constexpr int64_t kMaxSplitPartialBytes = int64_t{64} << 20;  // the split partials' share of the workspace
// The measuring build (DMATTN_UNIT_STAMPS=1; sm90a/unit_stamps.cuh): 64-bit words per unit record, the binding's
// allocation (api.h unit_stamp_words) and the kernel's layout (UnitStamps::kWords) alike.
constexpr int kUnitStampWords = 20;
constexpr int64_t kMaxBlockMapBytes = int64_t{64} << 20;      // a block map (query-side, or by sequence), at most
constexpr int64_t kMaxMaskBitsBytes = int64_t{1} << 30;       // its bits for the sm90a kernel, at most
// The sm90a kernel's query-side mask variant lists a unit's live KV tiles in shared memory (16 bits each): sequences
// of at most this many 128-key tiles (131,072 keys; at D = 256 twice as many 64-key tiles); longer ones take the sm80
// kernel.
constexpr int64_t kSm90aQueryMaxTiles = 1024;
// Whether the sm90a kernel's kQuery variant may meet a key-side mask, mapped by sequence (BlockMap::by_sequence):
// beside a query-side bias (kQueryBias), or at D = 256 without one where its kept slots are not gathered
// (sm90a_slots_supports refuses key ranges and kept rows past kMaxKeptRowBytes, PlanOverrides::key_mask_map skips the
// slots; the map needs neither). At D <= 128 such a mask without a query-side bias takes the sm80 kernels instead, so
// the kernels without a query-side bias there compile the by-sequence reads out (fwd_kernel.cuh).
constexpr bool sm90a_query_key_mask(int head_dim, bool query_bias) { return query_bias || head_dim > 128; }
// The query-side terms the decode kernel reads, at most; a call past it takes the prefill kernel. Within the auto
// choice (H / Hk * max_seqlen_q <= 64) the terms are at most about 2/3 of the bytes of the query-side operands they
// come from (twice a bool mask given alone), so this binds only calls forced onto the decode kernel.
constexpr int64_t kMaxQueryTermBytes = int64_t{1} << 30;
constexpr int64_t kDecodeMinTilesPerSplit = 4;
// A split decode call with kept-key lists and at most this many (sequence, KV head) units runs them longest first
// (decode_order.cu: one CTA orders them in shared memory); past it, in batch order.
constexpr int kMaxOrderedUnits = 4096;
// The tickets of a decode call that merges its own splits (one per (sequence, KV head, row tile) unit), at most: the
// ordering CTA zeroes them, 16 stores per thread at most (8,192 tickets where the plan chooses the decode kernel).
constexpr int64_t kMaxMergeTickets = 4 * int64_t{kMaxOrderedUnits};
// Four waves: longer splits write fewer float32 partials (each split of a unit writes every packed row's O) and pay
// fewer prologues; on the H200, 32-40 tiles per split beat 23 (six waves) in the decode kernel of every decode shape
// but the long masked one (benchmarks/results/README.md, runs BB, BC).
constexpr int64_t kDecodeCtasPerSm = 2, kDecodeWaves = 4;

// Whether the decode kernel can run p: one kept-key list and one key-side bias per packed tile, so mask and bias
// heads broadcast over the query heads of a KV head (Hm in {1, Hk}), key-side or query-side (the list of a query-side
// mask: the keys some query of the sequence may see); K / V rows whose byte strides fit in 32 bits (its gathers
// address a row with one 32 x 32-bit multiply; the CUDA kernels take 2-byte types).
inline bool decode_supports(const VarlenFwdParams& p) {
  if (p.num_heads <= 0 || p.num_heads_k <= 0 || p.num_heads % p.num_heads_k != 0) return false;
  if (p.k_row_stride > INT32_MAX / 2 || p.v_row_stride > INT32_MAX / 2) return false;
  const int32_t group = p.num_heads / p.num_heads_k;
  auto packable = [&](const ScoreOperand& op) {
    // head_group = H / Hm: Hm = 1 gives H, Hm = Hk gives the group; both are multiples of the group.
    return op.layout == OperandLayout::kAbsent || op.head_group % group == 0;
  };
  return packable(p.mask) && packable(p.bias);
}

// Whether the sm90a kernel's TMA can read p's tensors: 16-bit q / k / v whose base addresses and row / head strides
// are 16-byte multiples, head dims 64 / 128, and row counts TMA coordinates reach (int32).
inline bool sm90a_tensors_fit(const VarlenFwdParams& p) {
  auto aligned = [](const void* ptr, int64_t row_stride, int64_t head_stride) {
    return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && row_stride % 8 == 0 && head_stride % 8 == 0 &&
           row_stride > 0;
  };
  return (p.dtype == ScalarType::kFloat16 || p.dtype == ScalarType::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128 || p.head_dim == 256) && p.total_q > 0 && p.total_k > 0 &&
         p.total_q < INT32_MAX &&
         p.total_k < INT32_MAX && p.num_heads > 0 && p.num_heads_k > 0 && p.num_heads % p.num_heads_k == 0 &&
         aligned(p.q, p.q_row_stride, p.q_head_stride) && aligned(p.k, p.k_row_stride, p.k_head_stride) &&
         aligned(p.v, p.v_row_stride, p.v_head_stride);
}

// Whether the sm90a prefill kernel can run p on a cc 9.0 device as it is: no mask, bias or key pool (windows, key
// ranges, softcap, sinks and seqused_k are its own; causal or not).
inline bool sm90a_supports(const VarlenFwdParams& p) {
  return !p.mask.present() && !p.bias.present() && p.kv_slots == nullptr && sm90a_tensors_fit(p);
}

// The kept K / V rows a call may gather for the sm90a kernel, at most (KeptRows: a copy as large as k and v).
constexpr int64_t kMaxKeptRowBytes = int64_t{4} << 30;

// Bytes of the kept K / V rows (KeptRows::k and v together) of lists of that many heads: k's and v's packed shape,
// dense, with KeptRows::heads_of heads.
inline int64_t kept_row_bytes(const VarlenFwdParams& p, int64_t list_heads) {
  return 2 * p.total_k * KeptRows::heads_of(p, list_heads) * p.head_dim * 2;
}

// A key-side mask finer than the KV heads (Hm > Hk: a list per mask head) over sequences of at most one 128-row query
// tile: a decode-shaped call that the decode kernel does not take. The sm80 kernels run it over the kept rows where
// they are (sm90a_slots_supports makes no per-list copy for it, and sm90a_query_supports at D = 256 no map).
inline bool finer_key_mask_over_one_query_tile(const VarlenFwdParams& p) {
  return p.mask.layout == OperandLayout::kKeySide && p.mask.head_group > 0 &&
         p.mask.head_group < p.num_heads / p.num_heads_k && p.max_seqlen_q <= KeptRows::kTileRows;
}

// Whether the sm90a kernel can run p over gathered kept-key slots (FwdPlan::sm90a_slots, passes.h KeptRows): a
// key-side mask of any heads (Hm in {1, Hk, H}: a list per mask head; where lists are finer than KV heads, each gets
// its own copy of its kept rows), no bias or a key-side one (any heads), no key pool or key ranges (windows, causal and
// softcap are the kernel's), head dims 64 / 128 / 256, and kept rows within kMaxKeptRowBytes. A copy per list
// (Hm > Hk) is made only for sequences of more than one query tile: a list's copied row is read by its one head's
// query tiles, so with one tile the copy would write and read each kept row to save one read; the sm80 kernels then
// read the rows where they are, and the call allocates no O(total_k x Hm x D) copy for a decode-shaped batch.
// D = 256 gathers as D <= 128 does (64-key tiles of slots; the gather copies a chunk's 64 rows of 32 vectors in two
// passes of 32 rows, kept_rows.cu): the kernel then computes only tiles of kept keys, so a mask keeping half the
// keys costs about half the dense work, where its map by sequence (sm90a_query_supports, the fallback for what this
// refuses: key ranges, kept rows past the cap) computes every 64-key tile holding a kept key, all of them for a
// token-granular mask. The copy reads and writes the kept rows once (estimated, not measured: on the prefill batch
// at D = 256 with half the keys kept, 130 MB moved, some 35 us of the H200's bandwidth against its 1.40 ms dense
// call).
// Beside a query-side bias the map by sequence stays, at every head dim: every tile reads the bias anyway.
inline bool sm90a_slots_supports(const VarlenFwdParams& p) {
  if (!sm90a_tensors_fit(p) || p.kv_slots != nullptr || p.mask.layout != OperandLayout::kKeySide) return false;
  if (p.bias.present() && p.bias.layout != OperandLayout::kKeySide) return false;
  const int32_t group = p.num_heads / p.num_heads_k;
  const int32_t hg = p.mask.head_group;  // H / Hm
  // A list serves whole KV groups (hg a multiple of the group) or lies inside one (hg divides it).
  if (hg <= 0 || p.num_heads % hg != 0 || (hg % group != 0 && group % hg != 0)) return false;
  if (finer_key_mask_over_one_query_tile(p)) return false;
  // Any head dim sm90a_tensors_fit takes: the slots' segments and extent allow a 128-key tile past a list's end, so
  // D = 256's 64-key tiles fit them too, and the limits are per 128-row query tile at every head dim.
  return p.key_range == nullptr && kept_row_bytes(p, p.num_heads / hg) <= kMaxKeptRowBytes;
}

// Whether the sm90a kernel can run p's key-side bias without a mask over slots that are its keys (FwdPlan::
// slots_in_place): a key-side bias of any heads, no mask, key pool or key ranges; head dims 64 / 128 / 256 (no K / V
// copy, so D = 256 too: its 64-key tiles read half as many of a segment's slots, 256-byte aligned within it, and the
// slot limits are per 128-row query tile at every head dim).
inline bool sm90a_bias_supports(const VarlenFwdParams& p) {
  return sm90a_tensors_fit(p) && p.kv_slots == nullptr && !p.mask.present() &&
         p.bias.layout == OperandLayout::kKeySide && p.key_range == nullptr;
}

// Whether the sm90a kernel's kQueryBias variants can read p's query-side bias: in q's dtype or float32 (kBias32: a CTA
// per unit, its 64 KB tile of terms taking the persistent unit table's room; D <= 128), keys contiguous, any heads
// (Hb in {1, Hk, H}), any row and head strides, and its first element 16-byte aligned (float32: 4-byte): the kernel
// copies each row's 16-bit elements as the aligned 16-byte chunks holding them (float32 ones word by word), so a row
// that starts inside a chunk also reads the elements before it in that chunk, which then lie in the tensor (the
// row's first element is not the tensor's). At D = 256 a float32 bias takes the sm80 kernels: its 64-key tile of
// terms (32 KB) beside Q (64 KB), two stages of K / V (128 KB) and the 2,048-entry tile list (4 KB) passes the 227 KB
// a CTA may have (kernel_traits.h, kSmemBytes); the 16-bit one's 18 KB fits.
inline bool sm90a_query_bias_fits(const VarlenFwdParams& p) {
  const ScoreOperand& b = p.bias;
  const bool bias32 = b.dtype == ScalarType::kFloat32 && p.head_dim <= 128;
  return b.layout == OperandLayout::kQuerySide && (b.dtype == p.dtype || bias32) && b.col_stride == 1 &&
         b.head_group > 0 && p.num_heads % b.head_group == 0 &&
         reinterpret_cast<uintptr_t>(b.ptr) % (b.dtype == ScalarType::kFloat32 ? 4 : 16) == 0;
}

// Whether the sm90a kernel can run p with query-side operands (FwdPlan::sm90a_query): no key pool, head dims 64 /
// 128 / 256, and sequences of at most kSm90aQueryMaxTiles 128-key tiles. A query-side mask of any heads (Hm in {1,
// Hk, H}) with its block map and bits within their caps, and with no bias, a key-side one of any heads (then with
// slots in place for its per-key values, which know no key ranges) or a query-side one that sm90a_query_bias_fits;
// or such a query-side bias alone (no block map: every tile is live), or beside a key-side mask of any heads (its map
// and bits by sequence, BlockMap::by_sequence: the mask's keys are not compacted, since every tile reads its bias
// anyway). At D = 256 a key-side mask of any heads without a query-side bias is mapped by sequence where its kept
// rows are not gathered (plan_varlen_fwd asks sm90a_slots_supports first: so with key ranges, kept rows past
// kMaxKeptRowBytes, or PlanOverrides::key_mask_map; sm90a_query_key_mask), beside a key-side bias too (over slots in
// place, as beside a query-side mask; not with key ranges); a float32 query-side bias there takes the sm80 kernels
// (sm90a_query_bias_fits). Windows, key ranges, causal, softcap, sinks.
inline bool sm90a_query_supports(const VarlenFwdParams& p) {
  if (!sm90a_tensors_fit(p) || p.kv_slots != nullptr) return false;
  const bool query_bias = p.bias.layout == OperandLayout::kQuerySide;
  // A key-side mask: mapped by sequence where the kernel may meet one, else over its kept slots (sm90a_slots_supports).
  if (p.mask.layout == OperandLayout::kKeySide && !sm90a_query_key_mask(p.head_dim, query_bias)) return false;
  // D = 256, a key-side mask finer than the KV heads over sequences of one query tile (decode-shaped calls the decode
  // kernel does not take), with or without a bias: the sm80 kernels, as sm90a_slots_supports keeps them at every head
  // dim. The sm90a kernel would run a 128-row tile of a few rows over every 64-key tile holding a kept key, where the
  // sm80 kernels read the kept rows alone (unmeasured at D = 256: measure before moving it).
  if (p.head_dim > 128 && finer_key_mask_over_one_query_tile(p)) return false;
  if (!p.mask.present() && !query_bias) return false;
  if (query_bias && !sm90a_query_bias_fits(p)) return false;
  if (p.bias.layout == OperandLayout::kKeySide && p.key_range != nullptr) return false;
  const int64_t tiles = (BlockMap::key_extent(p) + BlockMap::kBitTileKeys - 1) / BlockMap::kBitTileKeys;
  if (tiles > kSm90aQueryMaxTiles || BlockMap::key_extent(p) <= 0) return false;
  if (!p.mask.present()) return true;
  if (p.mask.head_group <= 0 || p.num_heads % p.mask.head_group != 0) return false;
  const int64_t heads = p.num_heads / p.mask.head_group;
  return BlockMap::bytes(p, heads) <= kMaxBlockMapBytes && BlockMap::bits_bytes(p, heads) <= kMaxMaskBitsBytes;
}

// Whether an sm90a call takes the kernel's kRanged variant: some row has its own key interval (a window's left edge,
// a right edge other than the causal one, key ranges) or the scores are capped. The plain variant knows only the
// causal limit.
inline bool sm90a_ranged(const VarlenFwdParams& p) {
  return p.window_left >= 0 || p.window_right > 0 || p.key_range != nullptr || p.softcap > 0.f;
}

// Whether a plan's sm90a call runs the plain variant: no key-side slots, no query-side map, no key interval.
inline bool sm90a_plain(const FwdPlan& plan, const VarlenFwdParams& p) {
  return !plan.sm90a_slots && !plan.sm90a_query && !sm90a_ranged(p);
}

// The query-side terms are float32 for a float32 query-side bias, else 16-bit in q's dtype.
inline bool query_terms_f32(const VarlenFwdParams& p) {
  return p.bias.layout == OperandLayout::kQuerySide && p.bias.dtype == ScalarType::kFloat32;
}

// The launches of a persistent sm90a call: one per kSm90aUnitTableSeqs sequences (sm90a/launch.cuh, launch_units).
inline int64_t sm90a_launches(const VarlenFwdParams& p) {
  return (static_cast<int64_t>(p.batch) + kSm90aUnitTableSeqs - 1) / kSm90aUnitTableSeqs;
}

inline FwdPlan plan_varlen_fwd(const VarlenFwdParams& p, const DeviceInfo& dev, const PlanOverrides& o = {}) {
  FwdPlan plan;
  plan.compact_by_warps = !o.compaction_chunks;
  if (p.mask.layout == OperandLayout::kQuerySide || p.bias.layout == OperandLayout::kQuerySide) {
    plan.prefill = PrefillVariant::kQueryOperands;
  } else if (p.window_left >= 0 || p.key_range != nullptr) {
    plan.prefill = PrefillVariant::kWindowLeft;  // per-row lower key bounds: a window's left edge, or key ranges
  }
  if (p.mask.layout == OperandLayout::kKeySide && p.num_heads > 0) {
    plan.key_lists_heads = p.num_heads / p.mask.head_group;  // head_group = H / Hm
  }
  // The prefill kernel summarizes a query-side mask by blocks; a map past its cap (a mask far larger than memory,
  // made of expanded columns) is left out and the kernel scans its tiles instead.
  auto prefill = [&] {
    // A window of at most kSm90aMinWindow keys runs faster on the sm80 kernel (its units are a tile or two; measured
    // on an H200, benchmarks/results/README.md), with or without a mask, unless DMATTN_SM90A_CTAS asks for the sm90a
    // kernel.
    const bool narrow_window = p.window_left >= 0 && p.window_right >= 0 &&
                               p.window_left + p.window_right + 1 <= kSm90aMinWindow && o.sm90a_ctas == 0;
    const bool sm90a_device = dev.cc == 90 && !o.sm80_only && !narrow_window;
    plan.sm90a = sm90a_device && sm90a_supports(p);
    // The sm90a kernel's grid: persistent, one CTA per SM, where a CTA's next unit can start while it finishes the
    // one before: calls with masks (units of uneven, shorter work) and windowed calls (short, alike units; it loads a
    // unit's first tiles and its Q, double-buffered, meanwhile); else a CTA per unit. Key ranges always take a CTA per
    // unit (their tile bounds are reduced over the rows once per CTA). DMATTN_SM90A_CTAS overrides: N > 0 persistent
    // on N CTAs, 0 a CTA per unit.
    bool persistent = p.window_left >= 0;
    // DMATTN_KEY_MASK=map (or the binding's fallback when the kept rows' copy cannot be allocated): no gathered
    // slots for a key-side mask; the branches below then map it by sequence where they can (sm90a_query_key_mask:
    // at D = 256, the only head dim whose kernels read such a map without a query-side bias), else the sm80 kernels.
    const bool gather_key_mask = !(o.key_mask_map && p.mask.layout == OperandLayout::kKeySide);
    if (sm90a_device && gather_key_mask && sm90a_slots_supports(p)) {
      // A key-side mask: the kept keys as dense slots, so that a mask keeping half the keys costs about half the
      // work on the sm90a kernel (the compaction's lists, then gather_kept_rows; D 64 / 128 / 256); persistent, the
      // CTA overlapping a unit's start with the previous one's end (8.6% faster on the H200's masked prefill batch,
      // run BQ; D = 256 persistent as its map by sequence was).
      plan.sm90a = plan.sm90a_slots = true;
      persistent = true;
    } else if (sm90a_device && sm90a_bias_supports(p)) {
      // A key-side bias without a mask: the kSlots kernel over slots that are the keys themselves (each tile's
      // biases bulk-copied as a mask's kept keys' are), persistent or not as the same call without the bias.
      plan.sm90a = plan.sm90a_slots = plan.slots_in_place = true;
    } else if (sm90a_device && sm90a_query_supports(p)) {
      // A query-side mask: its bits and block map first (build_block_map, below), then the kernel reads the bits of
      // the tiles the map cannot decide and skips the dead ones; persistent, a unit's list of live tiles (read from
      // the map before its first tile can load) built while the CTA finishes the unit before. A query-side bias, with
      // such a mask or alone: each consumer thread copies its elements of every live tile.
      plan.sm90a = plan.sm90a_query = true;
      // a key-side bias: its values per slot in place
      plan.sm90a_slots = plan.slots_in_place = p.bias.layout == OperandLayout::kKeySide;
      // A query-side bias alone leaves units as even as the same call without it: a CTA per unit unless windowed (at
      // D = 128 a persistent CTA of this variant has one Q buffer, so no next-unit prefetch to win by). A key-side mask
      // here (beside a query-side bias, or at D = 256 where its kept rows are not gathered, with or without a key-side
      // bias) leaves units uneven: persistent, as key-side masks are over their slots (beside the query-side bias a CTA
      // per unit, as the bias alone). A query-side mask, on the prefill batch (H100): persistent at D = 128 alone (its
      // kernel 0.85 ms against 0.89 a CTA per unit, run EE) and beside a key-side bias (not measured), a CTA per unit
      // beside a query-side bias (the persistent kernel, one Q buffer, took 1.35x the time, runs DZ, EA); at D = 64 and
      // 256 a CTA per unit alone and beside a query-side bias (the mask alone 0.79 against 0.81 ms persistent at
      // D = 64, 1.41 against 1.53 at D = 256; with the bias 1.20 against 1.20 and 1.93 against 2.04; run EF), and
      // persistent beside a key-side bias (not measured, as before).
      const bool query_bias = p.bias.layout == OperandLayout::kQuerySide;
      const bool query_mask_persistent =
          p.mask.layout == OperandLayout::kQuerySide &&
          (p.head_dim == 128 ? !query_bias : p.bias.layout == OperandLayout::kKeySide);
      persistent = persistent || query_mask_persistent || (p.mask.layout == OperandLayout::kKeySide && !query_bias);
      // A key-side mask beside the query-side bias, or at D = 256 where its kept rows are not gathered (alone or
      // beside a key-side bias): its map and bits by sequence (below), no kept-key lists.
      if (p.mask.layout == OperandLayout::kKeySide) plan.key_lists_heads = 0;
    }
    // A float32 query-side bias on the sm90a kernel: a CTA per unit whatever was asked (sm90a_query_bias_fits).
    const bool bias32 = plan.sm90a_query && p.bias.layout == OperandLayout::kQuerySide &&
                        p.bias.dtype == ScalarType::kFloat32;
    if (plan.sm90a && p.key_range == nullptr && !bias32) {
      const int32_t sms = dev.sm_count > 0 ? dev.sm_count : 132;
      plan.sm90a_ctas = o.sm90a_ctas != 0 ? std::max(o.sm90a_ctas, 0) : (persistent ? sms : 0);
      // The dynamic scheduler: the plain kernel (dense, causal or not; sinks and seqused_k), the windowed one
      // (windows, softcap) and the kSlots one (a key-side mask's gathered kept rows, a key-side bias over slots in
      // place) persistent, on one CTA per SM unless DMATTN_SM90A_CTAS names a count (0 keeps a CTA per unit): 0.90-0.98x
      // the static grids' time on every dense, prefill and window row of the benchmark (H100, run DC). By default
      // (kAuto) not at D = 256 where the static grid is a CTA per unit: a persistent CTA there has one Q buffer, so no
      // next unit's Q loads during this one, and the dense calls ran 1.1-1.2% slower causal, up to 7% non-causal (H100,
      // runs DE, DG). The query-side variant (sm90a_query: its Q barrier publishes a tile list) and key ranges (a CTA
      // per unit, above) keep their grids.
      const bool one_q_buffer_per_unit = p.head_dim > 128 && !persistent && o.sm90a_ctas == 0;
      const bool dynamic = o.sm90a_sched == PlanOverrides::Sched::kDynamic ||
                           (o.sm90a_sched == PlanOverrides::Sched::kAuto && !one_q_buffer_per_unit);
      if (dynamic && !plan.sm90a_query) {
        if (o.sm90a_ctas == 0) plan.sm90a_ctas = sms;
        plan.sm90a_dynamic = plan.sm90a_ctas > 0;
        if (o.sm90a_section_bytes > 0) plan.sm90a_section_bytes = o.sm90a_section_bytes;
      }
      // The plain kernel's wide tiles (sm90a_wide_keys), on the grid chosen above, causal or not: at D = 64 on an
      // H100 the dense 4 x 4096 call took 0.92x the 128-key tiles' time non-causal, 0.94x causal, and the causal
      // prefill batch 0.97x (benchmarks/results/README.md, runs EQ, EU).
      plan.sm90a_wide =
          sm90a_plain(plan, p) && o.sm90a_wide == PlanOverrides::Wide::kAuto && sm90a_wide_keys(p.head_dim) > 0;
    }
    // Key slots are v's packed rows unless the keys live in a pool. 1 / 8 D bytes of v's size.
    const bool v_flags =
        p.kv_slots == nullptr && p.total_k > 0 && p.num_heads_k > 0 && BlockMap::v_bytes(p) < INT32_MAX;
    // A key-side mask has a map only on the sm90a query-side variant (sm90a_query_supports checked its size).
    const bool mapped_mask = p.mask.layout == OperandLayout::kQuerySide ||
                             (plan.sm90a_query && p.mask.layout == OperandLayout::kKeySide);
    if (mapped_mask && p.num_heads > 0 && p.total_q > 0 && BlockMap::key_extent(p) > 0 &&
        BlockMap::bytes(p, p.num_heads / p.mask.head_group) <= kMaxBlockMapBytes) {
      plan.block_map_heads = p.num_heads / p.mask.head_group;
      plan.v_flags = v_flags;
    } else if (plan.sm90a_query) {
      // A query-side bias alone on the sm90a kernel: no map, but v's flags (a -inf bias hides its key, so each tile
      // would otherwise scan its V).
      plan.v_flags = v_flags;
    }
    return plan;
  };
  if (o.kernel == PlanOverrides::Kernel::kPrefill || !decode_supports(p)) return prefill();
  const int64_t group = p.num_heads / p.num_heads_k;
  if (group * p.max_seqlen_q > kDecodeForcedMaxPackedRows) return prefill();  // even when forced: ints on the device
  if (o.kernel == PlanOverrides::Kernel::kAuto && group * p.max_seqlen_q > kDecodeMaxPackedRows) return prefill();
  // Query-side operands: compact_keys lists the keys some query of a sequence may see (the OR of a query-side mask's
  // rows; every key without a mask) per list head, the finer of the mask's and the query-side bias's heads, and
  // gathers each query's terms along the lists (QueryTerms), which the kernel reads one aligned run per query.
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;
  const bool query_bias = p.bias.layout == OperandLayout::kQuerySide;
  if (query_mask || query_bias) {
    const int32_t mask_heads = p.mask.present() ? p.num_heads / p.mask.head_group : 1;
    const int32_t heads = std::max(mask_heads, query_bias ? p.num_heads / p.bias.head_group : 1);
    if (QueryTerms::bytes(p, heads, query_terms_f32(p)) > kMaxQueryTermBytes) return prefill();
    plan.key_lists_heads = heads;
    plan.query_terms = true;
  }

  // Decode: grid (row tiles x splits, KV heads, sequences). Splits are whole KV tiles; every split of a sequence but
  // its last holds tiles_per_split of them, so the work of a CTA is bounded whatever the length spread. The host
  // knows only the totals: tiles_per_split aims at kDecodeWaves waves of CTAs over all (sequence, KV head, row tile)
  // key ranges, at least kDecodeMinTilesPerSplit tiles each (the prologue and the partial write amortized).
  const DecodeShape shape = decode_shape_sm80(p.head_dim);
  plan.kernel = FwdKernel::kDecode;
  plan.row_tiles = static_cast<int32_t>(std::max<int64_t>(1, (group * p.max_seqlen_q + shape.block_m - 1) / shape.block_m));
  // The keys a row tile can reach: all of a sequence's, or with a left window edge at most window_left +
  // max_seqlen_q + window_right of them (plus a tile, where the range straddles a tile boundary).
  int64_t max_tiles = (p.max_seqlen_k + shape.block_n - 1) / shape.block_n;
  int64_t batch_tiles = (p.total_k + shape.block_n - 1) / shape.block_n + p.batch;
  if (p.window_left >= 0) {
    const int64_t reach = p.window_left + p.max_seqlen_q + std::max<int64_t>(p.window_right, 0);
    max_tiles = std::min(max_tiles, (reach + shape.block_n - 1) / shape.block_n + 1);
    batch_tiles = std::min(batch_tiles, max_tiles * p.batch);
  }
  const int64_t all_tiles = batch_tiles * p.num_heads_k * plan.row_tiles;
  const int64_t sms = dev.sm_count > 0 ? dev.sm_count : 132;
  int64_t per_split = o.tiles_per_split > 0
                          ? o.tiles_per_split
                          : std::max(kDecodeMinTilesPerSplit,
                                     (all_tiles + sms * kDecodeCtasPerSm * kDecodeWaves - 1) /
                                         (sms * kDecodeCtasPerSm * kDecodeWaves));
  // At most kMaxDecodeSplits splits, and partials of at most kMaxSplitPartialBytes (a million-key sequence beside a
  // batch of short ones gets fewer, longer splits, not gigabytes of scratch).
  const int64_t row_bytes = p.total_q * p.num_heads * (p.head_dim + 2) * static_cast<int64_t>(sizeof(float));
  const int64_t max_splits =
      std::max<int64_t>(1, std::min<int64_t>(kMaxDecodeSplits, kMaxSplitPartialBytes / std::max<int64_t>(row_bytes, 1)));
  per_split = std::max<int64_t>(per_split, (max_tiles + max_splits - 1) / max_splits);
  plan.tiles_per_split = static_cast<int32_t>(std::min<int64_t>(per_split, INT32_MAX));

  plan.num_splits = static_cast<int32_t>(std::max<int64_t>(1, (max_tiles + per_split - 1) / per_split));
  // A key-side mask leaves units of unequal work that the host cannot see (the splits are sized by key positions,
  // not kept keys): longest first, so that the kernel does not end on a long unit that started last.
  plan.unit_order = plan.num_splits > 1 && plan.key_lists_heads > 0 &&
                    static_cast<int64_t>(p.batch) * p.num_heads_k <= kMaxOrderedUnits;
  // The combine finishes the rows where each of its combining CTAs can afford the contract check too: their count (at
  // most one per (row, head) pair) times the B + 1 entries each reads stays within half of kMaxContractReads (the
  // finishing CTAs read the other half at most: row_contract.cuh).
  // The last split CTA of each unit merges the unit (no combine launch, and its partials read while they are in L2)
  // where a pass before the kernel can zero the units' tickets and finish the rows: the ordered calls, whose order
  // pass takes both jobs (the other split calls have no pass before the kernel). Not the kernel with query-side
  // terms (its registers are at their limit: it keeps the combine), nor calls whose combine would take a CTA per
  // pair (the kernel's 128 threads cannot merge with the same bits).
  plan.dependent_launch = dev.cc >= 90 && !o.no_dependent_launch;
  plan.combine_in_kernel = !o.combine_launch && plan.unit_order && !plan.query_terms && p.batch > 0 &&
                           SplitPartials::ticket_count(p, plan.row_tiles) <= kMaxMergeTickets &&
                           combine_lanes(p, plan.num_splits) != 0;
  const int64_t combining = std::min<int64_t>(p.total_q * p.num_heads, kMaxCombineBlocks);
  plan.combine_finishes = !plan.combine_in_kernel && plan.num_splits > 1 &&
                          (static_cast<int64_t>(p.batch) + 1) * combining <= kMaxContractReads / 2;
  return plan;
}

}  // namespace dmattn::cuda
