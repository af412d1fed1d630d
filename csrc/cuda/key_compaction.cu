// key_compaction.cu: a key-side mask -> sorted lists of the key positions it keeps (passes.h, KeyLists), built on
// the device before the attention kernel so that it gathers only kept K / V rows. For the decode kernel with
// query-side operands the lists hold the keys some query of the sequence may see (the OR of a query-side mask's few
// rows; every key without a mask), and each query's operands are gathered along them (QueryTerms). Sequences longer
// than one chunk are compacted in parts (key-side lists: compact_key_parts_by_warps_kernel, or compact_key_parts_kernel
// under DMATTN_KEY_COMPACTION=chunks and with query-side terms), the rest (and the backward's lists) a CTA per list.
#include <cuda_runtime.h>

#include "passes.h"
#include "score_operand.cuh"

namespace dmattn::cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kCompactWarps = kCompactThreads / 32;
constexpr int kKeysPerThread = 8;  // consecutive keys per thread and chunk: a decode sequence of 8k keys is 4 chunks
constexpr int kChunk = kCompactThreads * kKeysPerThread;

// The term of a query row at a key, from what its loads brought: `shown`, whether its query-side mask shows the key
// (true without one), and `bits`, its query-side bias (0 without one): the bias where shown, the hidden pattern where
// not; a NaN bias as the canonical NaN, so that no bias value reads as hidden.
__device__ __forceinline__ uint32_t query_term(const VarlenFwdParams& p, const QueryTerms& terms, bool shown,
                                               uint32_t bits) {
  if (!shown) return terms.f32 ? QueryTerms::kHidden32 : QueryTerms::kHidden16;
  if (p.bias.layout != OperandLayout::kQuerySide || !isnan(bias_from_bits(p.bias.dtype, bits))) return bits;
  return terms.f32 ? QueryTerms::kNaN32
                   : (p.bias.dtype == ScalarType::kBFloat16 ? QueryTerms::kNaN16Bf16 : QueryTerms::kNaN16F16);
}

// The bits of a thread's kKeysPerThread mask bytes at base + e[i] x stride, for the keys i below `valid`: every load
// issued before any is tested, so that a thread waits on its loads once, not once per key (with a branch per key ptxas
// kept each load beside its test). `e` gives each key's element index (its row, or its position), read only below
// `valid`.
template <typename Element>
__device__ __forceinline__ unsigned mask_bits(const uint8_t* base, int64_t stride, int valid, Element e) {
  uint8_t byte[kKeysPerThread];
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) byte[i] = i < valid ? base[e(i) * stride] : 0;
  unsigned bits = 0;
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) bits |= (byte[i] != 0 ? 1u : 0u) << i;
  return bits;
}

// The keys of [first, first + kKeysPerThread) below len, as a count (0 .. kKeysPerThread).
__device__ __forceinline__ int keys_below(int64_t first, int64_t len) {
  const int64_t n = len - first;
  return n <= 0 ? 0 : (n >= kKeysPerThread ? kKeysPerThread : static_cast<int>(n));
}

// Bit i: whether key first + i (a position in the sequence) is kept by the key-side mask (every key without one).
// Head h's column of the mask is taken once: row r's element is at column + r * row_stride (ScoreOperand::offset,
// whose head term divides by head_group: a division per key cost this pass more than its loads). Packed keys are
// consecutive rows; a key pool's rows are read first (all kKeysPerThread slot loads in flight), then clamped.
__device__ __forceinline__ unsigned key_side_bits(const VarlenFwdParams& p, const KeyRows& rows, int h, int64_t first,
                                                  int64_t len, bool key_side) {
  const int valid = keys_below(first, len);
  if (!key_side) return (1u << valid) - 1u;  // no mask: every key
  const uint8_t* base = static_cast<const uint8_t*>(p.mask.ptr) + p.mask.row_start(0, h);
  if (rows.slots == nullptr) {
    const uint8_t* at = base + (rows.first + first) * p.mask.row_stride;
    return mask_bits(at, p.mask.row_stride, valid, [](int i) { return static_cast<int64_t>(i); });
  }
  int64_t slot[kKeysPerThread];
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) slot[i] = i < valid ? rows.unclamped(first + i) : 0;
  return mask_bits(base, p.mask.row_stride, valid, [&](int i) { return rows.clamp(slot[i]); });
}

// A chunk's scan: each thread holds the bits of its kKeysPerThread consecutive keys; returns {the chunk's kept keys
// before this thread's first, the chunk's kept keys}. A warp scan, then the warps' totals through shared memory (one
// barrier; the caller's next chunk must pass another before it rewrites warp_total).
__device__ __forceinline__ int2 scan_chunk(unsigned bits, int* warp_total) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int n = __popc(bits);
  int inclusive = n;  // kept keys of this lane and the lanes before it in the warp
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int before = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += before;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  int before = inclusive - n, total = 0;
#pragma unroll
  for (int w = 0; w < kCompactWarps; ++w) {
    const int t = warp_total[w];
    before += w < warp ? t : 0;
    total += t;
  }
  return make_int2(before, total);
}

// The kept bits of a thread's kKeysPerThread keys from first on (positions in the sequence): a query-side mask's OR
// over the sequence's query rows sq (row r of mask head h at mask_head + r x row_stride), else key_side_bits.
template <bool kTerms>
__device__ __forceinline__ unsigned chunk_bits(const VarlenFwdParams& p, const KeyRows& rows, const SeqRange& sk,
                                               const SeqRange& sq, int h, int64_t mask_head, int64_t first) {
  const bool query_side = kTerms && p.mask.layout == OperandLayout::kQuerySide;
  if (!query_side) return key_side_bits(p, rows, h, first, sk.len, !kTerms || p.mask.layout == OperandLayout::kKeySide);
  // Column j of each query row (a position: no pool row), query by query.
  const int valid = keys_below(first, sk.len);
  const uint8_t* base = static_cast<const uint8_t*>(p.mask.ptr) + mask_head + sq.start * p.mask.row_stride;
  unsigned bits = 0;
  for (int64_t q = 0; q < sq.len; ++q, base += p.mask.row_stride) {  // row_start(sq.start + q, h)
    bits |= mask_bits(base + first * p.mask.col_stride, p.mask.col_stride, valid,
                      [](int i) { return static_cast<int64_t>(i); });
  }
  return bits;
}

// Where the decode kernel reads the query-side terms of one (sequence, list head) list.
struct TermsOfList {
  int64_t term0;      // the run of the sequence's first query (QueryTerms::run)
  int64_t mask_head;  // head h's part of the query-side operands' row starts (row r's: this + r x row_stride)
  int64_t bias_head;
};

__device__ __forceinline__ TermsOfList terms_of_list(const VarlenFwdParams& p, const KeyLists& keys, const SeqRange& sk,
                                                     int b, int hm) {
  const int h = hm * keys.heads_per_list;  // every query head of list head hm reads the same operand columns
  TermsOfList t;
  t.term0 = keys.terms.run(hm, 0, QueryTerms::segment(sk.start, b));
  t.mask_head = p.mask.layout == OperandLayout::kQuerySide ? p.mask.row_start(0, h) : 0;
  t.bias_head = p.bias.layout == OperandLayout::kQuerySide ? p.bias.row_start(0, h) : 0;
  return t;
}

// The terms of a chunk's chunk_kept listed keys (positions in chunk_pos, list slots kept + c), every query of sq:
// (query q, listed key c) in q-major order, kCompactThreads apart, so consecutive threads write consecutive terms of a
// query's run. Each thread finds its first (q, c) with one division per chunk and steps on by (dq, dc) with a carry,
// where a division per term (and one per operand row's head) made this pass cost a third of the query-side decode
// call. kTermSteps steps at a time: their mask and bias loads are all issued before any term is formed (one at a time,
// each step waited on its own loads).
constexpr int kTermSteps = 4;

__device__ __forceinline__ void write_chunk_terms(const VarlenFwdParams& p, const QueryTerms& terms,
                                                  const TermsOfList& list, const SeqRange& sq, int kept,
                                                  int chunk_kept, const int32_t* chunk_pos) {
  if (chunk_kept <= 0) return;
  const bool query_mask = p.mask.layout == OperandLayout::kQuerySide;
  const bool query_bias = p.bias.layout == OperandLayout::kQuerySide;
  const int q_len = static_cast<int>(sq.len);  // <= max_seqlen_q, an int
  const int dq = kCompactThreads / chunk_kept, dc = kCompactThreads - dq * chunk_kept;
  int q = static_cast<int>(threadIdx.x) / chunk_kept;
  int c = static_cast<int>(threadIdx.x) - q * chunk_kept;
  while (q < q_len) {
    int step_q[kTermSteps], step_c[kTermSteps];
#pragma unroll
    for (int u = 0; u < kTermSteps; ++u) {
      step_q[u] = q, step_c[u] = c;
      q += dq, c += dc;
      if (c >= chunk_kept) c -= chunk_kept, ++q;  // the carry (dc < chunk_kept)
    }
    bool shown[kTermSteps];
    uint32_t bits[kTermSteps];
#pragma unroll
    for (int u = 0; u < kTermSteps; ++u) {
      const bool mine = step_q[u] < q_len;
      const int64_t row = sq.start + step_q[u];
      const int64_t j = mine ? chunk_pos[step_c[u]] : 0;
      shown[u] = !(mine && query_mask) ||
                 p.mask.mask_allows(p.mask.column(list.mask_head + row * p.mask.row_stride, j));
      bits[u] = mine && query_bias ? bias_bits(p.bias, p.bias.column(list.bias_head + row * p.bias.row_stride, j)) : 0;
    }
#pragma unroll
    for (int u = 0; u < kTermSteps; ++u) {
      if (step_q[u] >= q_len) break;
      const uint32_t term = query_term(p, terms, shown[u], bits[u]);
      const int64_t at = list.term0 + static_cast<int64_t>(step_q[u]) * terms.extent + kept + step_c[u];
      if (terms.f32) {
        static_cast<uint32_t*>(terms.values)[at] = term;
      } else {
        static_cast<uint16_t*>(terms.values)[at] = static_cast<uint16_t>(term);
      }
    }
  }
}

// Writes a chunk's kept keys (bits, this thread's from first on) to the list at slot (the thread's first), and with
// query-side terms their positions to chunk_pos at the slot less the chunk's first (chunk_slot).
template <bool kTerms>
__device__ __forceinline__ void write_chunk_index(int32_t* index, int32_t* chunk_pos, unsigned bits, int64_t first,
                                                  int slot, int chunk_slot) {
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    if (!((bits >> i) & 1u)) continue;
    index[slot++] = static_cast<int32_t>(first + i);
    if constexpr (kTerms) chunk_pos[chunk_slot++] = static_cast<int32_t>(first + i);
  }
}

// Grid (batch, list heads). Stream compaction of one sequence's mask column, in chunks of kChunk keys: each thread
// reads its kKeysPerThread mask bytes (independent loads in flight together), a warp scan of the kept counts and the
// CTA's warp totals give each thread its first output slot; one barrier pair per chunk. With query-side terms (kTerms:
// its own instantiation, so the key-side one keeps its registers and occupancy) the chunk's listed positions go to
// shared memory too, and the CTA then writes their terms (write_chunk_terms). Sequences of several chunks are
// compacted in parts instead (compact_key_parts_kernel) unless the statuses would pass KeyParts::kMaxStatuses.
template <bool kTerms>
__global__ void __launch_bounds__(kCompactThreads)
compact_keys_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  __shared__ int32_t chunk_pos[kTerms ? kChunk : 1];  // the chunk's listed key positions, in list order
  const int b = blockIdx.x, hm = blockIdx.y;
  const SeqRange sk = key_seq(p, b);
  const KeyRows rows = key_rows_of(p, sk);
  const int h = hm * keys.heads_per_list;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const TermsOfList list = kTerms ? terms_of_list(p, keys, sk, b, hm) : TermsOfList{};
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int kept = 0;  // a sequence has < 2^31 keys (cu_seqlens are int32)
  for (int64_t j0 = 0; j0 < sk.len; j0 += kChunk) {
    const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kKeysPerThread;
    const unsigned bits = chunk_bits<kTerms>(p, rows, sk, sq, h, list.mask_head, first);
    const int2 scan = scan_chunk(bits, warp_total);
    write_chunk_index<kTerms>(index, chunk_pos, bits, first, kept + scan.x, scan.x);
    if constexpr (kTerms) {
      __syncthreads();  // chunk_pos is complete
      write_chunk_terms(p, keys.terms, list, sq, kept, scan.y, chunk_pos);
    }
    kept += scan.y;
    __syncthreads();  // warp_total (and chunk_pos) are rewritten by the next chunk
  }
  if (threadIdx.x == 0) keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm] = kept;
}

// A mask's lists, one chunk (a part) per CTA: the parts of a (sequence, list head) chain are compacted side by side and
// learn the kept keys before them by a decoupled look-back (each part publishes its own count, then the count up to and
// including itself, in one 64-bit status word per part: kPartCount / kPartPrefix in the top bits). A CTA takes its part
// by a ticket (KeyParts::ticket), part-major, so every part it looks back on took its ticket earlier and is running or
// done: the wait always ends. The chain's last part writes the count. Where one CTA per sequence walked a 126k-key
// sequence chunk by chunk (147 us on the H200), its 62 parts run at once; with query-side terms (kTerms) each part
// writes its own chunk's terms once the look-back has placed it, where a CTA per list walked the decode batch's
// 8k-key lists in 71 us.
constexpr uint64_t kPartCount = uint64_t{1} << 32, kPartPrefix = uint64_t{2} << 32;
static_assert(KeyParts::kPartKeys == kChunk, "a part is one chunk");

// The part a compaction ticket stands for, in both part kernels: ticket t is part t / chains of chain t % chains
// (chain b Hm + hm: sequence b, list head hm), so the first tickets start every chain's first part. 32-bit
// arithmetic: the tickets number the statuses, at most KeyParts::kMaxStatuses.
struct TicketPart {
  uint32_t chain;
  int part, b, hm;
};
__device__ __forceinline__ TicketPart ticket_part(uint32_t ticket, const VarlenFwdParams& p, const KeyLists& keys) {
  const uint32_t chains = static_cast<uint32_t>(p.batch) * static_cast<uint32_t>(keys.mask_heads);
  const uint32_t heads = static_cast<uint32_t>(keys.mask_heads);
  const uint32_t chain = ticket % chains;
  return {chain, static_cast<int>(ticket / chains), static_cast<int>(chain / heads), static_cast<int>(chain % heads)};
}

template <bool kTerms>
__global__ void __launch_bounds__(kCompactThreads)
compact_key_parts_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  __shared__ uint32_t ticket;
  __shared__ int before_part;
  __shared__ int32_t chunk_pos[kTerms ? kChunk : 1];  // the part's listed key positions, in list order
  if (threadIdx.x == 0) ticket = atomicAdd(keys.parts.ticket, 1u);
  __syncthreads();
  const auto [chain, part, b, hm] = ticket_part(ticket, p, keys);
  const SeqRange sk = key_seq(p, b);
  const int64_t j0 = static_cast<int64_t>(part) * kChunk;
  if (part > 0 && j0 >= sk.len) return;  // past the sequence: no part after it has keys either
  const KeyRows rows = key_rows_of(p, sk);
  const int h = hm * keys.heads_per_list;
  const SeqRange sq = kTerms ? clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q) : SeqRange{};
  const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kKeysPerThread;
  const int64_t mask_head = kTerms && p.mask.layout == OperandLayout::kQuerySide ? p.mask.row_start(0, h) : 0;
  const unsigned bits = chunk_bits<kTerms>(p, rows, sk, sq, h, mask_head, first);
  const int2 scan = scan_chunk(bits, warp_total);
  if (threadIdx.x == 0) {
    unsigned long long* status = keys.parts.status + static_cast<int64_t>(chain) * keys.parts.per_chain;
    int before = 0;
    if (part > 0) {
      atomicExch(status + part, kPartCount | static_cast<uint32_t>(scan.y));
      for (int q = part - 1;; --q) {
        uint64_t s;
        while (((s = *reinterpret_cast<volatile unsigned long long*>(status + q)) >> 32) == 0) __nanosleep(32);
        before += static_cast<int>(s & 0xffffffffu);
        if ((s & kPartPrefix) != 0) break;
      }
    }
    atomicExch(status + part, kPartPrefix | static_cast<uint32_t>(before + scan.y));
    before_part = before;
    if (j0 + kChunk >= sk.len) keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm] = before + scan.y;
  }
  __syncthreads();
  const int before = before_part;
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  write_chunk_index<kTerms>(index, chunk_pos, bits, first, before + scan.x, scan.x);
  if constexpr (kTerms) {
    __syncthreads();  // chunk_pos is complete
    write_chunk_terms(p, keys.terms, terms_of_list(p, keys, sk, b, hm), sq, before, scan.y, chunk_pos);
  }
}

// The key-side lists in parts again, read across the lanes of a warp (KeyParts::by_warps; the kernel above is
// DMATTN_KEY_COMPACTION=chunks): a part is kWarpPartKeys keys, warp w of its CTA takes kWarpKeys of them in
// kWarpSteps steps of 32, lane l key 32 s + l of step s. Where a thread read 8 consecutive keys (a load 64 bytes
// from its neighbour's at Hm = 8: 16 cache lines per warp load, each load's 64-bit address rebuilt per key) and
// scanned them with a shuffle chain, a warp load covers 32 consecutive keys (32 x row_stride bytes: one or two
// lines for Hm <= 8), a ballot gives the warp the step's kept keys and each lane its place among them (popc), and
// the stores of a step are consecutive slots. One thread takes the ticket, the sequence and the mask column for the
// CTA (the other warps wait on the barrier they passed anyway): the part's fixed work once, not per warp. The same
// statuses, look-back and ticket order as the kernel above (KeyParts: the statuses of per_chain parts of 2048 keys
// per chain hold the fewer parts of 4096), the same lists: keys in ascending order, bit for bit.
constexpr int kWarpSteps = 16;                               // a lane's mask loads in flight together
constexpr int kWarpKeys = 32 * kWarpSteps;                   // keys per warp and part
constexpr int64_t kWarpPartKeys = kCompactWarps * kWarpKeys;  // keys per part (one CTA)
static_assert(KeyParts::kWarpPartKeys == kWarpPartKeys && kWarpPartKeys % KeyParts::kPartKeys == 0,
              "the statuses of 2048-key parts hold the parts of 4096");

// What thread 0 learns for its CTA: the part its ticket names and where its keys, mask column and list slots are.
// The other threads read it where they use it (after a barrier), so it does not stay in their registers across the
// mask loads: 32 registers hold a lane's kWarpSteps loads in flight without a spill.
struct WarpPart {
  int64_t k_len;    // the sequence's clamped keys (key_seq)
  int64_t row;      // packed row of the part's first key: k_start + j0 (a key pool's slots are indexed by it)
  int64_t column;   // byte offset of the mask column of the list's head (row_start(0, h))
  int64_t index;    // the list's first slot in keys.index: hm total_k + k_start
  int64_t count;    // the list's count in keys.count: b Hm + hm
  int chain, part;  // chain b Hm + hm
  int before;       // kept keys of the chain's parts before this one (the look-back)
};

__global__ void __launch_bounds__(kCompactThreads, 2048 / kCompactThreads)
compact_key_parts_by_warps_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  __shared__ WarpPart at;
  if (threadIdx.x == 0) {
    const auto [chain, part, b, hm] = ticket_part(atomicAdd(keys.parts.ticket, 1u), p, keys);
    const SeqRange sk = key_seq(p, b);
    at.k_len = sk.len;
    at.row = sk.start + static_cast<int64_t>(part) * kWarpPartKeys;
    at.column = p.mask.row_start(0, hm * keys.heads_per_list);
    at.index = static_cast<int64_t>(hm) * p.total_k + sk.start;
    at.count = static_cast<int64_t>(b) * keys.mask_heads + hm;
    at.chain = static_cast<int>(chain), at.part = part;
  }
  __syncthreads();
  const int64_t j0 = static_cast<int64_t>(at.part) * kWarpPartKeys;
  if (at.part > 0 && j0 >= at.k_len) return;  // past the sequence: no part after it has keys either
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  // The warp's keys below the sequence's end, less the lane: key 32 s + lane of step s is in it iff 32 s < valid.
  const int64_t left = at.k_len - j0 - static_cast<int64_t>(warp) * kWarpKeys;
  const int valid = (left <= 0 ? 0 : (left >= kWarpKeys ? kWarpKeys : static_cast<int>(left))) - lane;
  const int64_t row = at.row + warp * kWarpKeys + lane;  // packed row of the lane's key of step 0
  const uint8_t* column = static_cast<const uint8_t*>(p.mask.ptr) + at.column;
  const int64_t stride = p.mask.row_stride;
  uint8_t byte[kWarpSteps];
  if (p.kv_slots == nullptr) {  // packed keys: consecutive rows, a warp load covers 32 of them
    const uint8_t* key = column + row * stride;
    const int64_t step = 32 * stride;
#pragma unroll
    for (int s = 0; s < kWarpSteps; ++s, key += step) byte[s] = 32 * s < valid ? *key : 0;  // stepped, not s x step
  } else {  // a key pool: the slots first (consecutive, a warp load each), all in flight, then the mask bytes
    const KeyRows rows{0, p.kv_slots, p.pool_rows};  // row(r) of packed row r (key_rows_of's, from row 0)
    int32_t slot[kWarpSteps];
#pragma unroll
    for (int s = 0; s < kWarpSteps; ++s) slot[s] = 32 * s < valid ? rows.slots[row + 32 * s] : 0;
#pragma unroll
    for (int s = 0; s < kWarpSteps; ++s) byte[s] = 32 * s < valid ? column[rows.clamp(slot[s]) * stride] : 0;
  }
  // Step s's kept keys as one ballot, which lane s keeps for the writes (one register, not kWarpSteps).
  unsigned held = 0;
  int total = 0;
#pragma unroll
  for (int s = 0; s < kWarpSteps; ++s) {
    const unsigned kept = __ballot_sync(0xffffffffu, byte[s] != 0);
    total += __popc(kept);
    if (lane == s) held = kept;
  }
  if (lane == 0) warp_total[warp] = total;
  __syncthreads();
  int before_warp = 0, part_total = 0;
#pragma unroll
  for (int w = 0; w < kCompactWarps; ++w) {
    const int t = warp_total[w];
    before_warp += w < warp ? t : 0;
    part_total += t;
  }
  if (threadIdx.x == 0) {  // the look-back of compact_key_parts_kernel
    const int part = at.part;
    unsigned long long* status = keys.parts.status + static_cast<int64_t>(at.chain) * keys.parts.per_chain;
    int before = 0;
    if (part > 0) {
      atomicExch(status + part, kPartCount | static_cast<uint32_t>(part_total));
      for (int q = part - 1;; --q) {
        uint64_t s;
        while (((s = *reinterpret_cast<volatile unsigned long long*>(status + q)) >> 32) == 0) __nanosleep(32);
        before += static_cast<int>(s & 0xffffffffu);
        if ((s & kPartPrefix) != 0) break;
      }
    }
    atomicExch(status + part, kPartPrefix | static_cast<uint32_t>(before + part_total));
    at.before = before;
    if (static_cast<int64_t>(part) * kWarpPartKeys + kWarpPartKeys >= at.k_len) keys.count[at.count] = before + part_total;
  }
  __syncthreads();
  // Lane l writes key 32 s + l of step s, if kept, at the step's first slot plus the kept keys of the lanes below it:
  // from the warp's first slot of the list (a sequence has < 2^31 keys: cu_seqlens are int32), stepped by each
  // step's count.
  // The warp's first slot, opaque to the compiler (it otherwise folds the list's 64-bit offset into every store's
  // address: four instructions a store, where a 32-bit slot from a pointer is one wide multiply-add).
  int32_t* first = keys.index + (at.index + (at.before + before_warp));
  asm("" : "+l"(first));
  __builtin_assume(__isGlobal(first));
  unsigned slot = 0;
  const unsigned below = (1u << lane) - 1u;
  // Kept keys' positions are below the sequence's length (< 2^31); unsigned, so a warp past it wraps harmlessly.
  const unsigned key0 = static_cast<unsigned>(at.part) * kWarpPartKeys + warp * kWarpKeys + lane;
#pragma unroll
  for (int s = 0; s < kWarpSteps; ++s) {
    const unsigned kept = __shfl_sync(0xffffffffu, held, s);
    if ((kept >> lane) & 1u) first[slot + __popc(kept & below)] = static_cast<int32_t>(key0 + 32u * s);
    slot += __popc(kept);
  }
}

}  // namespace

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  if (p.batch == 0 || keys.mask_heads == 0) return cudaSuccess;
  if (keys.parts.status != nullptr) {  // key-side lists in parts (KeyParts); the ticket and statuses start at 0
    const size_t bytes = KeyParts::bytes(p, keys.mask_heads, keys.parts.per_chain);
    if (cudaError_t err = cudaMemsetAsync(keys.parts.status, 0, bytes, stream); err != cudaSuccess) return err;
    if (keys.terms.values != nullptr) {  // a CTA per part
      const auto ctas = static_cast<unsigned>(KeyParts::statuses(p, keys.mask_heads, keys.parts.per_chain));
      compact_key_parts_kernel<true><<<ctas, kCompactThreads, 0, stream>>>(p, keys);
    } else if (keys.parts.by_warps) {  // a CTA per part of kWarpPartKeys: at most per_chain of them per chain
      const int64_t parts = (p.max_seqlen_k + kWarpPartKeys - 1) / kWarpPartKeys;
      const auto ctas = static_cast<unsigned>(KeyParts::statuses(p, keys.mask_heads, parts));
      compact_key_parts_by_warps_kernel<<<ctas, kCompactThreads, 0, stream>>>(p, keys);
    } else {
      const auto ctas = static_cast<unsigned>(KeyParts::statuses(p, keys.mask_heads, keys.parts.per_chain));
      compact_key_parts_kernel<false><<<ctas, kCompactThreads, 0, stream>>>(p, keys);
    }
    return cudaGetLastError();
  }
  const dim3 grid(p.batch, keys.mask_heads);
  if (keys.terms.values != nullptr) {
    compact_keys_kernel<true><<<grid, kCompactThreads, 0, stream>>>(p, keys);
  } else {
    compact_keys_kernel<false><<<grid, kCompactThreads, 0, stream>>>(p, keys);
  }
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
