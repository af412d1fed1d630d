// bwd_params.h: the fused CUDA backward's description of one call (torch-free and CuTe-free, so the binding includes
// it); the kernels and their design are in bwd_traits.h.
#pragma once

#include <cstdint>

#include "../../varlen_fwd_params.h"
#include "../passes.h"

namespace dmattn::cuda::bwd {

// One backward call as the kernels see it. The forward's description (q, k, v, out, lse, cu_seqlens, key-side mask /
// bias, scale, window, softcap, seqused_k, key_range; no kv_slots: the autograd formula gathers a pool first, and no
// query-side operand: the binding sends those calls to the blockwise backward).
//   dout  (total_q, H, D)   dlse (H, total_q) float32 contiguous, or null (no gradient through softmax_lse)
//   delta (H, total_q) float32 contiguous scratch: delta_kernel writes rowsum(dout * out) - dlse there first
//   row_stats (2, H, row_stats_stride) float32 scratch, or null: where set (the sm90a backward, RowStatsTma),
//                           delta_kernel also writes each row's lse in base 2 (plane 0) and its delta (plane 1) there,
//                           in rows padded so that the kernel's bulk copies start 16-byte aligned
//   dq    (total_q, H, D)   dk, dv (total_k, Hk, D): contiguous, in q's dtype, zero-filled by the caller (rows no
//                           sequence owns, and keys past seqused_k, stay 0)
//   dq_accum (total_q, H, D) float32 contiguous, zero-filled, or null. Set (DMATTN_BWD_DQ=atomic, or the sm90a
//                           backward): dkdv_kernel also adds each key tile's dS K times the softmax scale into it with
//                           atomics (the order of the additions varies, so the bits of dq may differ between runs) and
//                           the binding converts it into dq; dq_kernel does not run. Null: dq_kernel computes dq on
//                           its own, every sum in a fixed order (deterministic).
//   dbias (total_k, H) float32 contiguous, zero-filled, or null: d loss / d key-side bias per query head (the binding
//                           sums the heads each bias head broadcasts to)
//   keys  the kept-key lists of a key-side mask whose heads the query heads of a KV group share (Hk % Hm == 0), built
//                           by compact_keys (../passes.h) before the kernels, or null: then both kernels walk key
//                           positions and read the mask per key. With lists, dkdv_kernel's CTAs own 64 kept keys
//                           (gathered) and dq_kernel walks kept keys only, so a mask keeping half the keys costs about
//                           half; dk, dv and dbias rows of the keys it removes stay 0.
//   cta_order (CtaOrder::units) int32, or null: the sm90a backward's CTAs in launch order, longest first (CtaOrder)
//   order_band        the runs of key tiles of one (sequence, KV head) that cta_order keeps together (CtaOrder): 1
//                           (DMATTN_BWD_ORDER=longest) every CTA ranked alone, CtaOrder::kBand (banded, the default)
//   walk_tile_major   the sm90a backward's CTAs walk their query tiles from the last one down with the group's query
//                           heads inside each tile (TileMajorWalk, DMATTN_BWD_WALK=tile_major), else head by head
//   row_stats_threads  the sm90a backward's row statistics by its producer threads even where RowStatsTma::fits
//                           (DMATTN_BWD_ROW_STATS=threads, for A/B runs)
//   l2_evict_normal    the sm90a backward's Q, dO, lse, delta loads and dq_accum reduce-adds under L2's default
//                           policy instead of evict-last (DMATTN_BWD_L2=normal, for A/B runs)
//   dq_tiles           (the sm90a backward only) dq_accum in DqTiles' layout, (H, D / 64, total_q, 64) float32 with
//                           each row's 64 floats permuted, unscaled, and dq (total_q, H, D) in q's dtype, which
//                           run_varlen_bwd writes from it after the kernel (dq_convert.cuh); false
//                           (DMATTN_BWD_DQ_STORE=rows): dq_accum (total_q, H, D) scaled, which the binding converts
struct BwdParams {
  VarlenFwdParams f;
  const void* dout = nullptr;
  int64_t dout_row_stride = 0, dout_head_stride = 0;
  const float* dlse = nullptr;
  float* delta = nullptr;
  float* row_stats = nullptr;
  int64_t row_stats_stride = 0;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* dq_accum = nullptr;
  float* dbias = nullptr;
  KeyLists keys;
  int32_t* cta_order = nullptr;
  int order_band = 1;
  bool walk_tile_major = false;
  bool row_stats_threads = false;
  bool l2_evict_normal = false;
  bool dq_tiles = false;
};

// dq_accum in tiles (BwdParams::dq_tiles): the sm90a backward's consumer warpgroups each stage their 64 query rows x
// 64 columns of a query tile's dQ (float32, unscaled) in shared memory, and a producer warp adds the staged rows
// [0, rows) into dq_accum with ONE bulk reduce-add (cp.reduce.async.bulk, rows x 256 bytes), where the rows layout
// takes one per row. So a tile's rows of one head and one block of 64 columns are contiguous: dq_accum is
// (H, D / kCols, total_q, kCols), row R of (head h, column block cb) at offset(h, cb, R). A tile starts at any row
// (the first query a key tile's window lets see, bwd::key_tile), so nothing is keyed to 64-row boundaries: no padding
// and no extra partial tiles; rows past the sequence are simply not added (the size is rows x 256 bytes).
// Inside a row the 64 floats are permuted so that the staging needs no padding and has no bank conflict: a consumer
// thread (quad lane t) holds columns 8 i + 2 t, + 1 of its rows (the m16n8 accumulator fragments, i < 8), and stores
// them as four 16-byte chunks, chunk j (< 4) = columns 16 j + 2 t, + 1, 16 j + 8 + 2 t, + 1, at chunk index
// (4 j + t) XOR 4 (R & 1): a quarter-warp's 16-byte stores (lanes g = 2 k, 2 k + 1 of rows R, R + 1, t < 4) then
// fill all eight 16-byte bank groups of a 128-byte line. dq_convert.cuh undoes it and applies the softmax scale while
// converting into dq. Host and device (the layout test compiles it on the host).
struct DqTiles {
  static constexpr int kCols = 64;
  // The float of row `row`'s 64 (in its column block) that holds column c < 64.
  DMATTN_HOST_DEVICE static int position(int c, int64_t row) {
    const int chunk = (4 * (c / 16) + (c % 8) / 2) ^ (4 * static_cast<int>(row & 1));
    return 4 * chunk + 2 * ((c % 16) / 8) + c % 2;
  }
  // The column held at float `pos` < 64 of row `row` (the inverse of position).
  DMATTN_HOST_DEVICE static int column(int pos, int64_t row) {
    const int chunk = (pos / 4) ^ (4 * static_cast<int>(row & 1));
    return 16 * (chunk / 4) + 8 * ((pos % 4) / 2) + 2 * (chunk % 4) + pos % 2;
  }
  // The first float of row `row` (of total_q) in column block cb (of `blocks` = D / kCols) of head h.
  DMATTN_HOST_DEVICE static int64_t offset(int64_t h, int cb, int64_t row, int blocks, int64_t total_q) {
    return ((h * blocks + cb) * total_q + row) * kCols;
  }
};

// The sm90a backward's CTAs in longest-first launch order (BwdParams::cta_order). A CTA owns key tile `tile` (kTileKeys
// slots) of KV head hk in sequence b, the unit u = (tile B + b) Hk + hk, and walks kTileRows-row query tiles of each
// query head of its group from the first row a window (or causality) lets see one of its keys (bwd::key_tile). In grid
// order (key tile slowest) a batch of mixed lengths ends on its long sequences' later key tiles, started in the last
// waves; run_varlen_bwd.cu's order pass (after compact_keys, one CTA, longest_first.cuh) writes the units sorted by
// their query tiles, and the kernel, launched over a 1-D grid of units(...) CTAs, takes unit cta_order[blockIdx.x].
// Bands (BwdParams::order_band > 1): the units are ranked in runs of `band` consecutive key tiles of one (sequence,
// KV head) pair, run r = (z B + b) Hk + hk holding tiles [z band, z band + width(r)), each run by its longest tile and
// its tiles launched together in tile order. Neighbouring key tiles of a pair read the same query rows (Q, dO, lse,
// delta, dq_accum): started together, and walking those rows in step (TileMajorWalk), each row is read from DRAM about
// once and hit in L2 by the band's other CTAs (FlashAttention-3's L2 sections; tools/model_bwd_l2_order.py: the
// masked prefill batch's modeled hit rate 0.34 -> 0.82 at band 8, for a tail 1.017x -> 1.056x the ideal).
// The order changes no CTA's work, so dK, dV and dbias keep their bits (dQ's reduce-adds run in an order that varies
// anyway). Units past the slots (tiles of a sequence shorter than the longest) count 0 and run last, exiting at once.
struct CtaOrder {
  static constexpr int kTileRows = 64;   // the sm90a backward's query tile (BwdTraits::kBlockM)
  static constexpr int kTileKeys = 128;  // and its key tile (BwdTraits::kBlockN)
  static constexpr int64_t kMaxUnits = 16384;  // one CTA of 1024 threads sorts them, 16 a thread
  static constexpr int kBand = 8;        // the default band (the model's choice: docs/pending/bwd_l2_order.md)
  static constexpr int kMaxBand = 64;    // DMATTN_BWD_BAND's largest
  // The units of a call from host-known ints: key tiles of the longest key range a clamped sequence can have
  // (min(max_seqlen_k, total_k) < 2^31: clamp_seq; cu_seqlens are int32) for each (sequence, KV head); 0 where they
  // would pass kMaxUnits (the launcher keeps the grid order then) or there is none.
  static int64_t units(int64_t batch, int64_t heads_k, int64_t total_k, int64_t max_seqlen_k) {
    const int64_t keys = max_seqlen_k < total_k ? max_seqlen_k : total_k;
    if (batch <= 0 || heads_k <= 0 || keys <= 0) return 0;
    const int64_t pairs = batch * heads_k;  // < 2^47: B < 2^31 and Hk <= 65,535 (the binding's head limit)
    if (pairs > kMaxUnits) return 0;
    const int64_t tiles = (keys + kTileKeys - 1) / kTileKeys;  // < 2^24
    return pairs * tiles <= kMaxUnits ? pairs * tiles : 0;
  }
  static int64_t units(const VarlenFwdParams& p) { return units(p.batch, p.num_heads_k, p.total_k, p.max_seqlen_k); }
  // Whether ordering units CTAs can pay for its pass (a launch, and a dependent load per CTA): only where they are
  // more than one wave. The kernel's shared memory (~225 KiB) holds one CTA per SM, so with units <= sms every CTA
  // starts at once and the order changes nothing. Host ints: the plan's SM count, no device synchronization.
  static bool pays(int64_t units, int64_t sms) { return units > 0 && units > sms; }
  static int64_t bytes(const VarlenFwdParams& p) { return units(p) * 4; }
  // The coordinates of unit u >= 0 (u < units: b < B and hk < Hk).
  DMATTN_HOST_DEVICE static void coords(const VarlenFwdParams& p, int u, int& hk, int& b, int& tile) {
    const int pair = u % (p.batch * p.num_heads_k);
    tile = u / (p.batch * p.num_heads_k);
    b = pair / p.num_heads_k;
    hk = pair % p.num_heads_k;
  }
  // Runs of `band` >= 1 key tiles over units > 0 (a multiple of the pairs B Hk): ceil(tiles / band) per pair; run r's
  // first tile is (r / pairs) band, its pair r % pairs, its width min(band, tiles - first) >= 1, and its k-th unit
  // (first + k) pairs + r % pairs. Every unit is in exactly one run.
  DMATTN_HOST_DEVICE static int runs(int units, int pairs, int band) {
    const int tiles = units / pairs;
    return (tiles + band - 1) / band * pairs;
  }
  DMATTN_HOST_DEVICE static int run_width(int r, int units, int pairs, int band) {
    const int rest = units / pairs - r / pairs * band;
    return rest < band ? rest : band;
  }
  DMATTN_HOST_DEVICE static int run_unit(int r, int k, int pairs, int band) {
    return (r / pairs * band + k) * pairs + r % pairs;
  }
};

// DMATTN_BWD_WALK=tile_major (BwdParams::walk_tile_major): the sm90a backward's CTA walks its query tiles from the
// last one down, the group's query heads inside each tile (item j: tile tiles_per_head - 1 - j / group of head
// j % group), so that the CTAs of a band (CtaOrder), which start together and whose tiles all end at the sequence's
// last row, read the same query rows at about the same time; head by head (item j: tile j % tiles_per_head of head
// j / tiles_per_head, from the first) neighbouring key tiles drift apart by their span's difference per head. A
// thread's keys then change query head every item, so their per-head visibility and bias (read once per head in the
// head-by-head walk) come from a table the gather warps fill, and their bias-gradient sums go to a shared table that
// is stored at the CTA's end: kMaxGroup query heads per KV head at most (the binding walks bigger groups head by head).
struct TileMajorWalk {
  static constexpr int kMaxGroup = 8;
  static bool fits(int64_t heads, int64_t heads_k) { return heads_k > 0 && heads / heads_k <= kMaxGroup; }
};

// Whether the sm90a backward brings each query tile's lse and delta by the TMA unit, on its Q / dO barrier, where its
// producer threads otherwise read them row by row into a ring of their own (bwd_kernel.cuh, kRowTma). The copies are
// plain bulk copies (cp.async.bulk, no tensor map) from BwdParams::row_stats, which delta_kernel fills: per head a row
// of `stride(total_q)` floats holding lse in base 2 (+inf for a row the forward found no key for) and, in a second
// plane, delta, at the row's index. A bulk copy needs its global address and size in multiples of 16 bytes, and a
// tile starts at any row, so each copy takes the kWindow floats from the 16-byte boundary at or below the tile's first
// row (window_start) and the consumers read from offset (first row) mod 4 (window_offset): the rows past a plane's
// last real one are padding that keeps the last window in bounds. (The 1-D tensor maps over the forward's lse that
// this replaced faulted on every call on the H100, run CX.) Per-row key ranges (VarlenFwdParams::key_range,
// intervals in memory) stay the threads' to read. Host and device.
struct RowStatsTma {
  static constexpr int kAlign = 4;                                  // floats in 16 bytes
  static constexpr int kWindow = CtaOrder::kTileRows + kAlign;      // floats copied per tile and statistic (272 bytes)
  static constexpr uint32_t kWindowBytes = kWindow * sizeof(float);
  static_assert(kWindowBytes % 16 == 0, "a bulk copy's size is a multiple of 16 bytes");
  // Floats per head and plane: every window of a row < total_q ends inside, and each head's row starts 16-byte aligned.
  DMATTN_HOST_DEVICE static int64_t stride(int64_t total_q) {
    return (total_q + kWindow + kAlign - 1) / kAlign * kAlign;
  }
  // The window of a tile whose first row is `row` (0 <= row < total_q): its first float, and the row's place in it.
  DMATTN_HOST_DEVICE static int64_t window_start(int64_t row) { return row / kAlign * kAlign; }
  DMATTN_HOST_DEVICE static int window_offset(int64_t row) { return static_cast<int>(row % kAlign); }
  static bool fits(bool key_range, int64_t heads, int64_t total_q) { return !key_range && heads > 0 && total_q > 0; }
  static bool fits(const BwdParams& p) {
    return p.row_stats != nullptr && (reinterpret_cast<uintptr_t>(p.row_stats) & 15u) == 0 &&
           p.row_stats_stride % kAlign == 0 && p.row_stats_stride >= stride(p.f.total_q) &&
           fits(p.f.key_range != nullptr, p.f.num_heads, p.f.total_q);
  }
};

// The head dims the fused backward is built for; the binding pads q, k, v, dout and out with zeros up to one.
constexpr int32_t bwd_head_dim(int32_t head_dim) { return head_dim <= 64 ? 64 : head_dim <= 128 ? 128 : -1; }

}  // namespace dmattn::cuda::bwd
