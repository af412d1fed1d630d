// key_compaction.cu: a key-side mask -> sorted lists of the key positions it keeps (passes.h, KeyLists), built on
// the device before the attention kernel so that it gathers only kept K / V rows. For the decode kernel with
// query-side operands the lists hold the keys some query of the sequence may see (the OR of a query-side mask's few
// rows; every key without a mask), and each query's operands are gathered along them (QueryTerms). A key-side mask
// of sequences longer than one chunk is compacted in parts (compact_key_parts_kernel), the rest a CTA per list.
#include <cuda_runtime.h>

#include "passes.h"
#include "score_operand.cuh"

namespace dmattn::cuda {
namespace {

constexpr int kCompactThreads = 256;
constexpr int kCompactWarps = kCompactThreads / 32;
constexpr int kKeysPerThread = 8;  // consecutive keys per thread and chunk: a decode sequence of 8k keys is 4 chunks
constexpr int kChunk = kCompactThreads * kKeysPerThread;

// The term of a query row at key position j: its query-side bias where its query-side mask shows the key (0 without a
// bias), the hidden pattern where it does not; a NaN bias as the canonical NaN, so that no bias value reads as hidden.
// mask_row / bias_row: the row's ScoreOperand::row_start in each (read only where the call has the operand
// query-side). Both loads are issued whatever the mask says (they are in bounds), so a thread's terms are independent
// loads.
__device__ __forceinline__ uint32_t query_term(const VarlenFwdParams& p, const QueryTerms& terms, int64_t mask_row,
                                               int64_t bias_row, int64_t j) {
  const bool shown = p.mask.layout != OperandLayout::kQuerySide || p.mask.mask_allows(p.mask.column(mask_row, j));
  const bool biased = p.bias.layout == OperandLayout::kQuerySide;
  const uint32_t bits = biased ? bias_bits(p.bias, p.bias.column(bias_row, j)) : 0;  // 0: +0 in every dtype
  if (!shown) return terms.f32 ? QueryTerms::kHidden32 : QueryTerms::kHidden16;
  if (!biased || !isnan(bias_from_bits(p.bias.dtype, bits))) return bits;
  return terms.f32 ? QueryTerms::kNaN32
                   : (p.bias.dtype == ScalarType::kBFloat16 ? QueryTerms::kNaN16Bf16 : QueryTerms::kNaN16F16);
}

// Bit i: whether key first + i (a position in the sequence) is kept by the key-side mask (every key without one).
// Head h's column of the mask is taken once: row r's element is at column + r * row_stride (ScoreOperand::offset,
// whose head term divides by head_group: a division per key cost this pass more than its loads).
__device__ __forceinline__ unsigned key_side_bits(const VarlenFwdParams& p, const KeyRows& rows, int h, int64_t first,
                                                  int64_t len, bool key_side) {
  const int64_t column = key_side ? p.mask.row_start(0, h) : 0;  // no key-side mask: unused
  unsigned bits = 0;
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    const int64_t j = first + i;
    if (j >= len) continue;
    if (!key_side || p.mask.mask_allows(column + rows.row(j) * p.mask.row_stride)) bits |= 1u << i;  // no mask: all
  }
  return bits;
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

// Grid (batch, list heads). Stream compaction of one sequence's key-side mask column, in chunks of kChunk keys:
// each thread reads its kKeysPerThread mask bytes (independent loads in flight together), a warp scan of the kept
// counts and the CTA's warp totals give each thread its first output slot; one barrier pair per chunk. With
// query-side terms (kTerms: its own instantiation, so the key-side one keeps its registers and occupancy), the
// chunk's listed positions go to shared memory too, and the CTA then writes their terms, one (query, listed key) per
// thread and step: consecutive threads, consecutive terms of a query's run.
template <bool kTerms>
__global__ void __launch_bounds__(kCompactThreads)
compact_keys_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  __shared__ int32_t chunk_pos[kTerms ? kChunk : 1];  // the chunk's listed key positions, in list order
  const int b = blockIdx.x, hm = blockIdx.y;
  const SeqRange sk = key_seq(p, b);
  const KeyRows rows = key_rows_of(p, sk);
  // Every query head of list head hm reads the same mask and bias columns (list heads are at least as fine as both).
  const int h = hm * keys.heads_per_list;
  const bool query_side = kTerms && p.mask.layout == OperandLayout::kQuerySide;
  const bool key_side = !kTerms || p.mask.layout == OperandLayout::kKeySide;
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  const QueryTerms& terms = keys.terms;
  const int64_t term0 = terms.run(hm, 0, QueryTerms::segment(sk.start, b));
  // Head h's part of the query-side operands' row starts (row r's: this + r x row_stride), taken once.
  const int64_t mask_head = query_side ? p.mask.row_start(0, h) : 0;
  const int64_t bias_head = kTerms && p.bias.layout == OperandLayout::kQuerySide ? p.bias.row_start(0, h) : 0;
  int kept = 0;  // a sequence has < 2^31 keys (cu_seqlens are int32)
  for (int64_t j0 = 0; j0 < sk.len; j0 += kChunk) {
    const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kKeysPerThread;
    unsigned bits = 0;
    if (query_side) {
      // Column j of each query row (a position: no pool row), query by query: the kKeysPerThread loads of a query
      // are in flight together.
      for (int64_t q = 0; q < sq.len; ++q) {
        const int64_t row = mask_head + (sq.start + q) * p.mask.row_stride;  // row_start(sq.start + q, h)
#pragma unroll
        for (int i = 0; i < kKeysPerThread; ++i) {
          const int64_t j = first + i;
          if (j < sk.len && p.mask.mask_allows(p.mask.column(row, j))) bits |= 1u << i;
        }
      }
    } else {
      bits = key_side_bits(p, rows, h, first, sk.len, key_side);
    }
    const int2 scan = scan_chunk(bits, warp_total);
    int slot = kept + scan.x;
    const int chunk_kept = scan.y;
#pragma unroll
    for (int i = 0; i < kKeysPerThread; ++i) {
      if (!((bits >> i) & 1u)) continue;
      index[slot] = static_cast<int32_t>(first + i);
      if constexpr (kTerms) chunk_pos[slot - kept] = static_cast<int32_t>(first + i);
      ++slot;
    }
    if constexpr (kTerms) {
      __syncthreads();  // chunk_pos is complete
      // Terms (query q, listed key c) in q-major order, kCompactThreads apart: each thread finds its first (q, c)
      // with one division per chunk and steps on by (dq, dc) with a carry, where a division per term (and one per
      // operand row's head) made this pass cost a third of the query-side decode call. A query's rows start at
      // row_start(0, h) + row x row_stride in each operand (ScoreOperand::row_start).
      if (chunk_kept > 0) {
        const int dq = kCompactThreads / chunk_kept, dc = kCompactThreads - dq * chunk_kept;
        int64_t q = threadIdx.x / chunk_kept;
        int c = static_cast<int>(threadIdx.x - q * chunk_kept);
#pragma unroll 4
        for (; q < sq.len; q += dq, c += dc) {
          if (c >= chunk_kept) c -= chunk_kept, ++q;  // the carry (dc < chunk_kept)
          if (q >= sq.len) break;
          const int64_t row = sq.start + q;
          const uint32_t term = query_term(p, terms, mask_head + row * p.mask.row_stride,
                                           bias_head + row * p.bias.row_stride, chunk_pos[c]);
          const int64_t at = term0 + q * terms.extent + kept + c;
          if (terms.f32) {
            static_cast<uint32_t*>(terms.values)[at] = term;
          } else {
            static_cast<uint16_t*>(terms.values)[at] = static_cast<uint16_t>(term);
          }
        }
      }
    }
    kept += chunk_kept;
    __syncthreads();  // warp_total is rewritten by the next chunk
  }
  if (threadIdx.x == 0) keys.count[static_cast<int64_t>(b) * keys.mask_heads + hm] = kept;
}

// A key-side mask's lists, one chunk (a part) per CTA: the parts of a (sequence, list head) chain are compacted side
// by side and learn the kept keys before them by a decoupled look-back (each part publishes its own count, then the
// count up to and including itself, in one 64-bit status word per part: kPartCount / kPartPrefix in the top bits).
// A CTA takes its part by a ticket (KeyParts::ticket), part-major, so every part it looks back on took its ticket
// earlier and is running or done: the wait always ends. The chain's last part writes the count. Where one CTA per
// sequence walked a 126k-key sequence chunk by chunk (147 us on the H200), its 62 parts run at once.
constexpr uint64_t kPartCount = uint64_t{1} << 32, kPartPrefix = uint64_t{2} << 32;
static_assert(KeyParts::kPartKeys == kChunk, "a part is one chunk");

__global__ void __launch_bounds__(kCompactThreads)
compact_key_parts_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys) {
  __shared__ int warp_total[kCompactWarps];
  __shared__ uint32_t ticket;
  __shared__ int before_part;
  if (threadIdx.x == 0) ticket = atomicAdd(keys.parts.ticket, 1u);
  __syncthreads();
  // 32-bit arithmetic: the tickets number the statuses, at most KeyParts::kMaxStatuses.
  const uint32_t chains = static_cast<uint32_t>(p.batch) * static_cast<uint32_t>(keys.mask_heads);
  const uint32_t chain = ticket % chains;
  const int part = static_cast<int>(ticket / chains);
  const int b = static_cast<int>(chain / static_cast<uint32_t>(keys.mask_heads));
  const int hm = static_cast<int>(chain % static_cast<uint32_t>(keys.mask_heads));
  const SeqRange sk = key_seq(p, b);
  const int64_t j0 = static_cast<int64_t>(part) * kChunk;
  if (part > 0 && j0 >= sk.len) return;  // past the sequence: no part after it has keys either
  const KeyRows rows = key_rows_of(p, sk);
  const int h = hm * keys.heads_per_list;
  const int64_t first = j0 + static_cast<int64_t>(threadIdx.x) * kKeysPerThread;
  const unsigned bits = key_side_bits(p, rows, h, first, sk.len, true);
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
  int32_t* index = keys.index + static_cast<int64_t>(hm) * p.total_k + sk.start;
  int slot = before_part + scan.x;
#pragma unroll
  for (int i = 0; i < kKeysPerThread; ++i) {
    if ((bits >> i) & 1u) index[slot++] = static_cast<int32_t>(first + i);
  }
}

}  // namespace

cudaError_t compact_keys(const VarlenFwdParams& p, const KeyLists& keys, cudaStream_t stream) {
  if (p.batch == 0 || keys.mask_heads == 0) return cudaSuccess;
  if (keys.parts.status != nullptr) {  // key-side lists in parts (KeyParts); the ticket and statuses start at 0
    const size_t bytes = KeyParts::bytes(p, keys.mask_heads, keys.parts.per_chain);
    if (cudaError_t err = cudaMemsetAsync(keys.parts.status, 0, bytes, stream); err != cudaSuccess) return err;
    const int64_t ctas = KeyParts::statuses(p, keys.mask_heads, keys.parts.per_chain);  // a CTA per part
    compact_key_parts_kernel<<<static_cast<unsigned>(ctas), kCompactThreads, 0, stream>>>(p, keys);
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
