// passes.h: the small kernels around the attention kernel, and the workspace pieces they share with it; torch-free.
//
//   before: compact_keys     a key-side mask -> per (sequence, mask head) sorted lists of kept key positions, so the
//                            attention kernel gathers only kept K / V rows; for the decode kernel with query-side
//                            operands, also those operands gathered along the lists (QueryTerms; key_compaction.cu)
//           build_block_map  a query-side mask -> per (mask head, block of query rows, block of key positions) a
//                            summary (no key visible / every key visible / some), so the prefill kernel skips dead
//                            tiles and runs whole-visible ones without reading the mask; for the sm90a kernel also
//                            the mask as bits (block_map.cu)
//           gather_kept_rows  after compact_keys, for the sm90a kernel: the kept keys' K / V rows (and key-side bias)
//                            copied into dense slots, so TMA reads them as whole tiles (kept_rows.cu)
//           fill_slots_in_place  a key-side bias without a mask, for the sm90a kernel: every key a slot, read in
//                            place; the slots' positions, counts, limits and float32 biases (kept_rows.cu)
//           order_decode_units  the decode kernel's (sequence, KV head) units sorted longest first (decode_order.cu);
//                            where the kernel merges its own splits (FwdPlan::combine_in_kernel), also its tickets
//                            zeroed and finish_rows' work, in its stead
//   after:  combine_splits   the decode kernel's per-split partial results -> out and lse (split_combine.cu); where
//                            the plan says so (FwdPlan::combine_finishes), finish_rows' work too, in its stead
//           finish_rows      the cu_seqlens contract check, and 0 / -inf for query rows no sequence owns; NaN in every
//                            element of out and lse when the contract is broken (unowned_rows.cu, row_contract.cuh)
// None synchronises the device, and all clamp sequence ranges exactly as the attention kernel does (clamp_seq).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "../varlen_fwd_params.h"

namespace dmattn::cuda {

// The decode kernel's query-side operands, gathered by compact_keys along the kept-key lists, so that the terms of
// a KV tile are one contiguous, aligned run per query instead of scattered 1- and 2-byte reads per (row, key):
//   term(l, i, c) = values[(l * queries + i) * extent + segment(b) + c]
// for list head l, query i of sequence b and its c-th listed key: the query-side bias of (i, that key) (0 without a
// query-side bias) where the query-side mask (if any) shows it, else the hidden pattern (a NaN no bias value carries:
// compact_keys writes a NaN bias as the canonical NaN). 16-bit elements in q's dtype, or float32 for a float32
// query-side bias. segment(b) = 64 * ceil(k_start / 64) + 64 * b: each sequence's runs start 128-byte aligned and
// never overlap (segment(b + 1) - segment(b) >= len_b), and a tile's 64 terms past its last listed key stay inside
// extent >= total_k + 64 * (B + 1), a multiple of 64. Null values when the call has none.
struct QueryTerms {
  static constexpr int kAlign = 64;  // terms: one KV tile of the decode kernel
  static constexpr uint32_t kHidden16 = 0xffffu, kHidden32 = 0xffffffffu;  // negative NaNs, all payload bits set
  static constexpr uint32_t kNaN16Bf16 = 0x7fc0u, kNaN16F16 = 0x7e00u, kNaN32 = 0x7fc00000u;  // canonical NaNs
  void* values = nullptr;
  int64_t extent = 0;   // terms per (list head, query) run
  int32_t queries = 0;  // runs per list head: max_seqlen_q
  bool f32 = false;     // float32 terms (else 16-bit, q's dtype)

  static int64_t extent_of(const VarlenFwdParams& p) {  // a multiple of kAlign: every run starts aligned
    return (p.total_k + int64_t{kAlign} * (p.batch + 2) - 1) / kAlign * kAlign;
  }
  static int64_t bytes(const VarlenFwdParams& p, int64_t heads, bool f32) {
    return heads * p.max_seqlen_q * extent_of(p) * (f32 ? 4 : 2);
  }
  DMATTN_HOST_DEVICE static int64_t segment(int64_t k_start, int64_t b) {
    return (k_start + kAlign - 1) / kAlign * kAlign + kAlign * b;
  }
  // Element index of the first term of list head l, query i, sequence b (segment(b) of its k_start).
  DMATTN_HOST_DEVICE int64_t run(int64_t l, int64_t i, int64_t seg) const { return (l * queries + i) * extent + seg; }
};

// compact_keys in parts (key_compaction.cu): per (sequence, list head) chain, per_chain parts of one chunk (2048 keys)
// each, every part a 64-bit look-back status; after them, the ticket counter. Zeroed by compact_keys before its
// kernel. Null status: one CTA per chain (the backward's lists, sequences of one part, and calls whose statuses
// would pass kMaxStatuses).
struct KeyParts {
  static constexpr int64_t kPartKeys = 2048;
  static constexpr int64_t kWarpPartKeys = 4096;  // by_warps: parts of this many keys (status stride still per_chain)
  static constexpr int64_t kMaxStatuses = int64_t{1} << 22;  // 32 MB
  unsigned long long* status = nullptr;
  unsigned int* ticket = nullptr;
  int32_t per_chain = 0;
  // Key-side lists (no query-side terms) by the warp-ballot kernel in parts of kWarpPartKeys, ceil(max_seqlen_k /
  // kWarpPartKeys) <= per_chain per chain (FwdPlan::compact_by_warps; the same lists bit for bit); else parts of
  // kPartKeys, a thread's consecutive keys scanned by shuffles (DMATTN_KEY_COMPACTION=chunks).
  bool by_warps = false;
  // Parts per chain, or 0 where the call keeps one CTA per chain.
  static int64_t parts(const VarlenFwdParams& p, int64_t mask_heads) {
    const int64_t per_chain = (p.max_seqlen_k + kPartKeys - 1) / kPartKeys;
    return per_chain > 1 && statuses(p, mask_heads, per_chain) <= kMaxStatuses ? per_chain : 0;
  }
  // One status, and one CTA of the compaction, per part of each (sequence, list head) chain.
  static int64_t statuses(const VarlenFwdParams& p, int64_t mask_heads, int64_t per_chain) {
    return static_cast<int64_t>(p.batch) * mask_heads * per_chain;
  }
  static int64_t bytes(const VarlenFwdParams& p, int64_t mask_heads, int64_t per_chain) {
    return statuses(p, mask_heads, per_chain) * 8 + 4;  // statuses, then the ticket
  }
};

// Per (sequence, list head) list of the key positions a key-side mask keeps, in ascending order.
//   index (mask_heads, total_k) int32: index[l, cu_k[b] + c] = position (in sequence b) of its c-th kept key
//   count (batch, mask_heads)   int32: number of kept keys
// List head l serves query heads [l * H / mask_heads, (l + 1) * H / mask_heads): the mask's heads, or in the decode
// kernel with query-side operands the finer of the mask's and the query-side bias's (a query-side mask lists the keys
// some query of the sequence may see: the OR of its rows; without a mask every key is listed), with their terms.
// All null / 0 when the plan has no lists (FwdPlan::key_lists_heads). Lives in the call's workspace (heuristics.h).
struct KeyLists {
  int32_t* index = nullptr;
  int32_t* count = nullptr;
  int32_t mask_heads = 0;      // list heads
  int32_t heads_per_list = 1;  // H / mask_heads: query head h reads list h / heads_per_list
  QueryTerms terms;  // the decode kernel's query-side operands along the lists (null values otherwise)
  KeyParts parts;    // the lists' compaction in parts (null status: one CTA per list)

  // The list query head h reads (list heads split the query heads evenly).
  DMATTN_HOST_DEVICE int list(int h) const { return h / heads_per_list; }
  // A list entry (a key position) of a sequence of k_len >= 1 keys, clamped into the sequence: where lying cu_seqlens
  // overlap two sequences, their compactions write each other's entries, and an unclamped entry would address rows
  // past k and v. Every reader that turns an entry into a row goes through here.
  DMATTN_HOST_DEVICE static int clamp_pos(int pos, int k_len) {
    const int low = pos > 0 ? pos : 0;  // max(pos, 0), then min with k_len - 1: two integer min / max instructions
    return low < k_len - 1 ? low : k_len - 1;
  }
  // The kept keys of list l in sequence b, clamped to [0, k_len] as every reader takes them: a count can then never
  // move a read past the sequence's keys.
  DMATTN_HOST_DEVICE int kept(int b, int l, int k_len) const {
    const int n = count[static_cast<int64_t>(b) * mask_heads + l];
    return n < 0 ? 0 : (n < k_len ? n : k_len);
  }
};

// The decode kernel's key splits (heuristics.h plans them): split s of a (sequence, KV head, row tile) covers KV
// tiles [s * tiles_per_split, (s + 1) * tiles_per_split) of its key slots. With num_splits > 1 each split writes,
// per (query head h, query row i), its score max m, its sum l of exp(score - m) and its O normalized by l, float32:
//   max[(s * H + h) * total_q + i]            -inf: the split saw no key of the row (sum and O are then not written)
//   sum[(s * H + h) * total_q + i]
//   o[((s * H + h) * total_q + i) * D + d]
// and combine_splits merges them. The max and the sum stay apart (not an lse m + log l) so that splits weigh by
// their sums even where log l vanishes next to |m| (a bias near finfo.min). Null when num_splits == 1 (the kernel
// writes out and lse itself).
struct SplitPartials {
  float* max = nullptr;
  float* sum = nullptr;
  float* o = nullptr;
  int32_t num_splits = 1;
  int32_t tiles_per_split = 0;
  int32_t row_tiles = 1;  // packed-row tiles per (sequence, KV head)
  // Null, or the (sequence, KV head) units in the order the kernel runs them (order_decode_units): the CTAs of grid
  // position (y, z) take unit unit_order[z * Hk + y], which is b * Hk + hk.
  int32_t* unit_order = nullptr;
  // Where the decode kernel merges its own splits (FwdPlan::combine_in_kernel; null tickets: combine_splits does):
  //   tickets[(b * Hk + hk) * row_tiles + row_tile]   per (sequence, KV head, row tile) unit, its splits that have
  //                                                   arrived; zero before the kernel (order_decode_units zeroes
  //                                                   them), counted up by the unit's splits
  //   contract_broken                                 nonzero: the call breaks the cu_seqlens contract (written by
  //                                                   order_decode_units' finishing CTAs; the merges write nothing)
  // A unit's splits that have KV tiles (split 0 where none has) each write their partials, fence them and take a
  // ticket; the one that takes the last merges the unit's rows with merge_lanes lanes per (row, head) pair
  // (combine_lanes: the lanes combine_splits would take, so the bits are the same).
  uint32_t* tickets = nullptr;
  int32_t* contract_broken = nullptr;
  int32_t merge_lanes = 0;

  DMATTN_HOST_DEVICE static int64_t ticket_count(const VarlenFwdParams& p, int64_t row_tiles) {
    return static_cast<int64_t>(p.batch) * p.num_heads_k * row_tiles;
  }
};

// A query-side mask summarized by blocks of kRows packed query rows (rows r with r / kRows = rb, in packed q order, so
// a block may hold rows of two sequences) and kCols key positions (j / kCols = cb, positions inside each row's own
// sequence, as the mask's last dimension counts them): state[(hm * row_blocks + rb) * col_blocks + cb] has kSomeTrue
// where some element of the block that its row can see is True and kSomeFalse where some such element is False. "Can
// see" is the kernels' own bound on a row's keys (row_keys: the window, the causal limit, its key_range, its sequence's
// keys), which the kernels apply by position on every tile that bound cuts; the elements outside it vote for nothing (a
// causal call's upper triangle, a window's outside, the padding past a short sequence's keys), the pass reads none of a
// 512-key chunk that no row of the block sees, and a block no row can see has state 0. A block holds rows of a
// neighbouring sequence too, so a summary only ever understates what is known: no kSomeTrue proves a tile dead, no
// kSomeFalse proves every key its rows can see visible, and anything else is read per element. Null state when the call
// has no query-side mask.
// A key-side mask beside a query-side bias, or at D = 256 where its kept rows are not gathered (the sm90a kernel's
// query-side variant, FwdPlan::sm90a_query) is summarized the same way with sequences for rows (by_sequence): every
// query of sequence b reads the same values, the mask's column of the sequence's keys (key_seq, clamped: nothing past
// them), so the state and the bits hold one row per (mask head, sequence), never O(total_q). Both are indexed by
// 32-key blocks from the row's first block, sequence_row(hm, b, k_start) (every reader goes through it):
//   state[sequence_row(hm, b, k_start) + cb], bits[sequence_row(hm, b, k_start) + cb]     cb < 4 ceil(k_len / 128)
//   sequence_row = hm * seq_extent + (seq_stride > 0 ? b * seq_stride : segment(k_start, b))
// a multiple of 4 blocks either way, so a 128-key tile's 4 words are one aligned 16-byte load (a 64-key tile's 2
// words, at D = 256, one aligned 8-byte load). The host picks the smaller of two layouts per call (sequence_layout):
// - segments (seq_stride 0): segment(k_start, b) = 4 ceil(k_start / 128) + 4 b, seq_extent = 4 (ceil(total_k / 128)
//   + B), O(total_k + B) whatever max_seqlen_k: a skewed batch (one long sequence beside many short ones);
// - a stride per sequence (seq_stride = bit_words = 4 ceil(key_extent / 128)), seq_extent = B x bit_words: a batch of
//   many short sequences of like length, where the segments' slack tile per sequence would cost up to twice as much
//   (4096 sequences of 128 keys: 8 blocks a sequence against 4).
// Segments are in bounds for any cu_seqlens: a clamped sequence has 0 <= k_start, k_start + k_len <= total_k
// (clamp_seq), so its last block is below 4 (ceil(k_start / 128) + ceil(k_len / 128) + b) <= 4 (ceil(total_k / 128) +
// 1 + b) <= seq_extent for b < B (ceil(x) + ceil(y) <= ceil(x + y) + 1). Disjoint for sequences the contract allows
// (row_contract.cuh: cu_seqlens_k non-decreasing in [0, total_k], so clamping changes no start and sequence b + 1
// starts at or after b's end): segment(b + 1) >= 4 ceil((k_start + k_len) / 128) + 4 b + 4 >= segment(b) +
// 4 ceil(k_len / 128). The stride is in bounds and disjoint for any cu_seqlens: a clamped k_len is at most
// max_seqlen_k, total_k and 2^31 - 1 (clamp_seq; cu_seqlens are int32), so at most key_extent, and a sequence's
// 4 ceil(k_len / 128) blocks fit in its own bit_words = 4 ceil(key_extent / 128); b * bit_words + bit_words <=
// seq_extent for b < B. Only cu_seqlens that break the contract (not non-decreasing), in the segment layout, can make
// two segments overlap; key_map_kernel then writes the shared words from two CTAs, each an aligned 32-bit word or a
// byte written whole, so every word holds one of the values written, inside the map, though a shared block's state
// byte and its bit word may come from different sequences (harmless: the kernels read in-bounds garbage for those
// rows, and finish_rows writes NaN over every element of out and lse of such a call).
struct BlockMap {
  static constexpr int kRows = 64;  // the query-side prefill variant's query tile (tile_shape_sm80)
  static constexpr int kCols = 32;  // divides its key tile (64, or 32 at D = 256)
  static constexpr uint8_t kSomeTrue = 1, kSomeFalse = 2;
  uint8_t* state = nullptr;
  int32_t row_blocks = 0;  // ceil(total_q / kRows); by_sequence: the batch (row_blocks_of)
  int32_t col_blocks = 0;  // ceil(key_extent(p) / kCols) (by_sequence: the longest row's, not a stride)
  int32_t mask_heads = 0;
  bool by_sequence = false;  // a key-side mask: row b is sequence b's segment (above), for the state and the bits alike
  int64_t seq_extent = 0;    // by_sequence: 32-key blocks per mask head in state and bits (sequence_layout)
  int32_t seq_stride = 0;    // by_sequence: blocks per sequence (bit_words), or 0 for segments (sequence_layout)
  // Beside the map, where the call's key slots are packed key rows (no kv_slots): per (KV head, block of kVRows rows
  // of v), nonzero where some element of the block is inf or NaN. Every tile a query-side mask hides keys in scans its
  // V (nonfinite_v.cuh), each (query tile, head) CTA again; a tile whose blocks hold only finite values skips it.
  // Null: scan every such tile.
  static constexpr int kVRows = 64;
  uint8_t* v_nonfinite = nullptr;
  int32_t v_blocks = 0;  // ceil(total_k / kVRows)
  // Beside the map, for the sm90a kernel (FwdPlan::sm90a_query): the mask itself as bits, one 32-bit word per (mask
  // head, packed query row, block of kCols key positions): bit l of bits[(hm * total_q + row) * bit_words + cb] is
  // element (row, hm, kCols cb + l) where the row can see that key (row_keys, above), else 0 (by_sequence: a row per
  // sequence, at sequence_row, 0 past its keys).
  // bit_words = 4 ceil(key extent / 128): the words of a 128-key tile are one aligned 16-byte load whatever the mask's
  // strides, an eighth of the mask's bytes (a 64-key tile's, at D = 256, one aligned 8-byte load: half of one).
  // by_sequence: bit_words is the longest sequence's words (key_map_kernel's grid), and the stride only where
  // seq_stride says so. Null: none.
  static constexpr int kBitTileKeys = 128;  // the sm90a kernel's KV tile at D <= 128 (KeptRows::kTileKeys)
  static constexpr int kTileBlocks = kBitTileKeys / kCols;  // a 128-key tile's blocks: 4 words, 16 bytes
  uint32_t* bits = nullptr;
  int32_t bit_words = 0;

  DMATTN_HOST_DEVICE static int64_t blocks(int64_t rows, int64_t per) { return (rows + per - 1) / per; }
  // The key positions a kernel can reach: below every sequence's clamped key count, so below max_seqlen_k, total_k
  // and 2^31 (cu_seqlens are int32). A max_seqlen_k of 2^40 over an expanded (stride-0) mask column costs the map
  // nothing.
  DMATTN_HOST_DEVICE static int64_t key_extent(const VarlenFwdParams& p) {
    int64_t extent = p.max_seqlen_k < p.total_k ? p.max_seqlen_k : p.total_k;
    return extent < INT32_MAX ? extent : INT32_MAX;
  }
  // The map's row blocks: blocks of packed query rows for a query-side mask, the sequences for a key-side one
  // (by_sequence).
  static int64_t row_blocks_of(const VarlenFwdParams& p) {
    return p.mask.layout == OperandLayout::kKeySide ? p.batch : blocks(p.total_q, kRows);
  }
  // by_sequence: the first block of sequence b's segment (a multiple of kTileBlocks), from its clamped key start.
  DMATTN_HOST_DEVICE static int64_t segment(int64_t k_start, int64_t b) {
    return (k_start + kBitTileKeys - 1) / kBitTileKeys * kTileBlocks + kTileBlocks * b;
  }
  // by_sequence: the layout of a call (the comment above the struct): blocks per mask head (a multiple of
  // kTileBlocks; every clamped sequence's tile blocks lie below it) and blocks per sequence, 0 for segments. The
  // smaller of the two layouts; segments where they tie.
  struct SequenceLayout {
    int64_t extent;
    int32_t stride;
  };
  static SequenceLayout sequence_layout(const VarlenFwdParams& p) {
    const int64_t segments = (blocks(p.total_k, kBitTileKeys) + p.batch) * kTileBlocks;
    const int64_t words = bit_words_of(p);  // <= 4 ceil((2^31 - 1) / 128) = 2^26: an int32
    const int64_t strided = p.batch * words;
    if (strided < segments) return {strided, static_cast<int32_t>(words)};
    return {segments, 0};
  }
  static int64_t sequence_extent(const VarlenFwdParams& p) { return sequence_layout(p).extent; }
  // by_sequence: the first block of mask head hm's row of sequence b (its clamped keys from k_start, key_seq), in
  // state and bits alike: the one place a by-sequence row's base is computed. Once per unit (or per sequence in
  // key_map_kernel), never per tile: the layout's branch stays out of the tile loops.
  DMATTN_HOST_DEVICE int64_t sequence_row(int hm, int b, int64_t k_start) const {
    return static_cast<int64_t>(hm) * seq_extent +
           (seq_stride > 0 ? static_cast<int64_t>(b) * seq_stride : segment(k_start, b));
  }
  // Bytes of the map of a call with that many mask heads: a byte per block (by sequence, per mask head
  // sequence_extent of them).
  static int64_t bytes(const VarlenFwdParams& p, int64_t heads) {
    if (p.mask.layout == OperandLayout::kKeySide) return heads * sequence_extent(p);
    return heads * blocks(p.total_q, kRows) * blocks(key_extent(p), kCols);
  }
  static int64_t v_bytes(const VarlenFwdParams& p) { return p.num_heads_k * blocks(p.total_k, kVRows); }
  static int64_t bit_words_of(const VarlenFwdParams& p) {
    return blocks(key_extent(p), kBitTileKeys) * kTileBlocks;
  }
  // Bytes of the mask's bits with that many mask heads: a word per block of the map.
  static int64_t bits_bytes(const VarlenFwdParams& p, int64_t heads) {
    if (p.mask.layout == OperandLayout::kKeySide) return heads * sequence_extent(p) * 4;
    return heads * p.total_q * bit_words_of(p) * 4;
  }
  // The flags of the two blocks covering v rows [row0, row1) of KV head hk (0 <= row0 < row1 <= total_k, which
  // clamped sequences guarantee; a KV tile's rows are at most kVRows, so two blocks cover them), loaded but not
  // combined: a reader ORs them where it needs the answer, so their latency is not waited on where they are issued.
  // int32 throughout: rows are below total_k < 2^31 (cu_seqlens are int32), and v_bytes(p) < 2^31 (the plan).
  DMATTN_HOST_DEVICE void v_flags(int hk, int row0, int row1, uint8_t& first, uint8_t& last) const {
    const uint8_t* line = v_nonfinite + hk * v_blocks;
    first = line[row0 / kVRows];
    last = line[(row1 - 1) / kVRows];
  }
  // The union of the states of the blocks covering packed rows [row0, row0 + rows) and key positions [j0, j1) of
  // mask head hm, for one KV tile of a query tile: 1 <= rows <= kRows (two row blocks at most) and
  // 0 < j1 - j0 <= kMaxCols, so the blocks are at most 2 x (kMaxCols / kCols + 1), their loads all issued before any
  // is used (a loop over the blocks waited on each in turn: a dependent L2 round trip per block on the kernel's path
  // to its next tile). Every index stays inside the map for rows within total_q and positions within max_seqlen_k,
  // which the kernels' clamped sequence ranges guarantee.
  template <int kMaxCols>
  DMATTN_HOST_DEVICE uint8_t covering_tile(int hm, int64_t row0, int rows, int j0, int j1) const {
    constexpr int kColBlocks = kMaxCols / kCols + 1;
    const int64_t rb0 = row0 / kRows, rb1 = (row0 + rows - 1) / kRows;
    const int cb0 = j0 / kCols, cb1 = (j1 - 1) / kCols;
    const uint8_t* line = state + (static_cast<int64_t>(hm) * row_blocks + rb0) * col_blocks + cb0;
    uint8_t v[2][kColBlocks];
    DMATTN_UNROLL
    for (int i = 0; i < 2; ++i)
      DMATTN_UNROLL
      for (int j = 0; j < kColBlocks; ++j) {
        v[i][j] = rb0 + i <= rb1 && cb0 + j <= cb1 ? line[i * col_blocks + j] : 0;
      }
    uint8_t s = 0;
    DMATTN_UNROLL
    for (int i = 0; i < 2; ++i)
      DMATTN_UNROLL
      for (int j = 0; j < kColBlocks; ++j) s |= v[i][j];
    return s;
  }
};

// A key-side mask's kept keys as dense slots, for the sm90a kernel (TMA reads whole tiles of consecutive rows and
// cannot gather): gather_kept_rows copies, for sequence b (keys from k_start), each kept head kh (heads_of: the KV
// head hk = kh where lists serve whole KV groups, with list l = the list of hk's query heads; else the list l = kh,
// of KV head hk = kh Hk / Hm) and each c < keys.kept(b, l, k_len),
//   k[((k_start + c) * heads + kh) * D + d] = K[k_start + index[l, k_start + c], hk, d]       (v alike)
//   pos[l * extent + segment(k_start, b) + c]  = index[l, k_start + c], the slot's key position
//   bias[g * extent + bias_slot(segment(k_start, b) + c)] = the key-side bias of that key for bias head g, float32
//                                                (bias_slot: slot order within each 16 slots, permuted for the kernel)
// (bias heads: the finer of the bias's and the lists' heads; query head h reads g = h / (H / bias_heads)). Segments
// start 128-byte aligned, so the kernel copies a KV tile's positions and biases with one bulk copy each, and a tile
// read past a list's end stays inside extent. For a causal or windowed call, per (list, sequence, query tile m of
// kTileRows rows), the slots whose positions lie below the window's lower edge and below its limit (visible_keys:
// the causal limit with window_right = 0), of the tile's first row and of its last row:
//   limits[((l * B + b) * query_tiles + m) * 4 + {0: first row's edge, 1: last row's edge, 2: first row's limit,
//                                                 3: last row's limit}]
// Slots past a list's count are not written: the kernel hides them, and scans their V rows as it scans any hidden
// key's. Null k when the plan gathers nothing (FwdPlan::sm90a_slots).
// In place (FwdPlan::slots_in_place: a key-side bias without a mask or beside a mask mapped by BlockMap, any head
// dim), every key is a slot and K / V are read where they are: fill_slots_in_place writes one list (l = 0) of
// positions c -> c, its counts (count[b] = the sequence's keys), its limits and the float32 biases, and k and v stay
// null.
struct KeptRows {
  static constexpr int kTileRows = 128;  // the sm90a kernel's query tile (tile_shape_sm90a)
  static constexpr int kTileKeys = 128;  // and its KV tile at D <= 128 (at D = 256, 64 keys: a tile reading half
                                         // as far past a list's end, 256-byte aligned in its segment)
  static constexpr int kAlign = 32;      // slots: a segment starts 128-byte aligned
  static constexpr int kLimits = 4;      // slot counts per query tile in limits
  void* k = nullptr;
  void* v = nullptr;
  int32_t* pos = nullptr;
  float* bias = nullptr;      // null: no bias
  int32_t bias_heads = 0;
  int64_t extent = 0;         // slots per list head / bias head in pos and bias
  int32_t* limits = nullptr;  // null: neither causal nor windowed
  int32_t query_tiles = 0;    // ceil(max_seqlen_q / kTileRows)
  int32_t* count = nullptr;   // in place: (B) the keys of each sequence (the list's count); null otherwise
  int32_t heads = 0;          // k and v's heads: Hk, or the lists' heads where they are finer (heads_of)

  // The kept K / V copies' heads: one per KV head where each list serves whole KV groups (Hm in {1, Hk}), else one
  // per list (Hm > Hk: a list's kept rows differ from its KV group's other lists').
  static int64_t heads_of(const VarlenFwdParams& p, int64_t list_heads) {
    return list_heads > p.num_heads_k ? list_heads : p.num_heads_k;
  }

  static int64_t bias_heads_of(const VarlenFwdParams& p, int64_t list_heads) {
    if (!p.bias.present()) return 0;
    const int64_t bias_heads = p.num_heads / p.bias.head_group;
    return bias_heads > list_heads ? bias_heads : list_heads;
  }
  static int64_t tiles_of(const VarlenFwdParams& p) { return (p.max_seqlen_q + kTileRows - 1) / kTileRows; }
  // Whether some row's keys end before the sequence's or start after its first (the limits are needed).
  static bool has_limits(const VarlenFwdParams& p) { return p.window_left >= 0 || p.window_right >= 0; }
  // segment(k_start, b) + k_len <= total_k + kAlign (b + 1) for clamped sequences, and a tile reads at most
  // kTileKeys - 1 slots past them.
  static int64_t extent_of(const VarlenFwdParams& p) {
    return (p.total_k + int64_t{kAlign} * (p.batch + 1) + kTileKeys + kAlign - 1) / kAlign * kAlign;
  }
  DMATTN_HOST_DEVICE static int64_t segment(int64_t k_start, int64_t b) {
    return (k_start + kAlign - 1) / kAlign * kAlign + kAlign * b;
  }
  // Where slot c's bias lies in its head's run of bias (segments and the kernel's tiles start at multiples of 16
  // slots): in each 16 slots, slot 8 a + 2 t + e (a, e in {0, 1}, t < 4) at 4 t + 2 a + e, so that the sm90a kernel's
  // thread t of a quad, whose columns are 8 nt + 2 t and the next, reads those of fragments nt = 2 k and 2 k + 1 with
  // one 16-byte load (sm90a/tile_operands.cuh: slot_bias_pairs).
  DMATTN_HOST_DEVICE static constexpr int64_t bias_slot(int64_t c) {
    return (c & ~int64_t{15}) | ((c & 6) << 1) | ((c & 8) >> 2) | (c & 1);
  }
};
static_assert(KeptRows::kAlign % 16 == 0 && KeptRows::bias_slot(16 + 8 + 2 * 3 + 1) == 16 + 4 * 3 + 2 + 1 &&
                  KeptRows::bias_slot(2) == 4,
              "bias_slot permutes within 16-slot groups, and segments start on one");

// Everything a call's kernels find in its workspace (workspace.h: workspace_layout, carve_workspace).
struct Workspace {
  KeyLists keys;
  SplitPartials splits;
  BlockMap blocks;
  KeptRows kept;
  // FwdPlan::sm90a_dynamic: the persistent sm90a kernel's unit counters, one per launch (sm90a_launches), zeroed by
  // the launcher before its first launch (sm90a/launch.cuh).
  uint32_t* unit_counters = nullptr;
#if DMATTN_UNIT_STAMPS
  // The measuring build's records of the sm90a forward's units (sm90a/unit_stamps.cuh; api.h, set_unit_stamps): not
  // in the workspace, the binding's own buffer; null: none.
  unsigned long long* unit_stamps = nullptr;
#endif
};

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream);
// Fills rows from the lists of compact_keys (nothing when rows.k is null).
cudaError_t gather_kept_rows(const VarlenFwdParams& p, const KeyLists& keys, const KeptRows& rows,
                             cudaStream_t stream);
// Fills the slots of a call whose slots are its keys (rows.count set: KeptRows in place; nothing otherwise).
cudaError_t fill_slots_in_place(const VarlenFwdParams& p, const KeptRows& rows, cudaStream_t stream);
// Fills splits.unit_order, longest unit first, from the kept-key counts of compact_keys (nothing when either is
// null). Where the decode kernel merges its own splits (splits.tickets), also zeroes the tickets and does finish_rows'
// work (row_contract.cuh) in CTAs beside the ordering one, writing splits.contract_broken: the call then needs neither
// combine_splits nor finish_rows after the kernel.
cudaError_t order_decode_units(const VarlenFwdParams& p, const KeyLists& keys, const SplitPartials& splits,
                               bool dependent, cudaStream_t stream);

// Fills map.state and map.bits from the mask (query-side, or key-side by sequence: BlockMap::by_sequence) and
// map.v_nonfinite from v (nothing for any that is null).
cudaError_t build_block_map(const VarlenFwdParams& p, const BlockMap& map, cudaStream_t stream);

// The cu_seqlens entries that the CTAs of the pass finishing a call's rows read in all, at most (each reads B + 1 of
// each array: row_contract.cuh); finish_rows bounds its grid by it, and a combine whose grid could pass it leaves the
// rows to finish_rows.
constexpr int64_t kMaxContractReads = int64_t{1} << 22;
// combine_splits' CTAs that combine, at most (past that they stride over the rows).
constexpr int64_t kMaxCombineBlocks = 65535;
// The lanes that merge one (query row, head) pair's splits (split_merge.cuh), from host-known ints alone: eight, or a
// warp where a call has few pairs (at head dims of at least 128: one float4 of O per lane), or 0: a CTA per pair,
// for few pairs over many splits (combine_splits' deep kernel). combine_splits launches by it, and the decode kernel
// that merges its own splits (FwdPlan::combine_in_kernel) merges with the same lanes, so both give the same bits.
constexpr int kCombineLanes = 8, kCombineWideLanes = 32;
constexpr int64_t kMaxWideCombinePairs = 8192;
constexpr int64_t kMaxDeepCombinePairs = 4096;
constexpr int kMinDeepCombineSplits = 16;
inline int combine_lanes(const VarlenFwdParams& p, int num_splits) {
  const int64_t pairs = p.total_q * p.num_heads;
  const bool deep_dim = p.head_dim == 128 || p.head_dim == 256;
  if (deep_dim && pairs <= kMaxDeepCombinePairs && num_splits >= kMinDeepCombineSplits) return 0;
  return p.head_dim >= 128 && pairs <= kMaxWideCombinePairs ? kCombineWideLanes : kCombineLanes;
}

// out and lse of the query rows [0, cu_seqlens_q[B]) from the partials of splits.num_splits > 1 splits. Runs after
// the decode kernel. With `finish` it also does finish_rows' work (every row of out and lse written: the contract
// check, rows no sequence owns), and finish_rows is not run.
cudaError_t combine_splits(const VarlenFwdParams& p, const SplitPartials& splits, cudaStream_t stream, bool finish);

// Runs after the attention kernel and the split combine (it may overwrite their rows with NaN).
cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream);

}  // namespace dmattn::cuda
