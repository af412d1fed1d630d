// kept_rows.cu: a key-side mask's kept K / V rows gathered into dense slots (passes.h, KeptRows), after compact_keys
// and before the sm90a kernel, whose TMA loads read whole tiles of consecutive rows and cannot gather. A mask that
// keeps half the keys then costs the kernel about half its tiles; the copy reads and writes the kept rows once. And
// for a key-side bias without a mask, slots that are the keys themselves (fill_slots_in_place: no copy of K / V).
#include <cuda_runtime.h>

#include <algorithm>

#include "passes.h"
#include "score_operand.cuh"

namespace dmattn::cuda {
namespace {

constexpr int kGatherThreads = 256;
constexpr int kSlotsPerCta = 64;
constexpr int kChunksPerCta = 4;  // the most chunks of kSlotsPerCta slots a CTA copies (a list keeping every key)
constexpr int kMaxGridZ = 65535;
// Three CTAs per SM where the pass runs (cc 9.0, for the sm90a kernel: 80 registers, no spill); the sm_80 build, which
// never runs it, asks for two (three would spill there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kGatherCtasPerSm = 2;
#else
constexpr int kGatherCtasPerSm = 3;
#endif
constexpr int kLimitTiles = kGatherThreads / KeptRows::kLimits;  // query tiles whose limits a CTA computes

// The slots of list `list` below `limit` (key positions ascending: the count of positions < limit).
__device__ __forceinline__ int slots_below(const int32_t* list, int count, int64_t limit) {
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (list[mid] < limit) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// The key position of slot c of a sequence's list, clamped into the sequence (KeyLists::clamp_pos).
__device__ __forceinline__ int slot_key(const int32_t* list, int c, int k_len) {
  return KeyLists::clamp_pos(list[c], k_len);
}

// The K / V rows, positions and biases of slots [c0, c0 + slots) of list l into kept head kh (sequence b, its rows
// from KV head hk; the sequence's k_len keys start at k_start); `first_of_list`: kh is the list's first kept head,
// which writes its positions. kRowVecs: the 16-byte vectors of a row, at most (16: D <= 128; 32: D = 256).
template <int kRowVecs>
__device__ __forceinline__ void copy_slots(const VarlenFwdParams& p, const KeptRows& rows, const int32_t* list,
                                           int64_t k_start, int k_len, int b, int hk, int kh, int l,
                                           bool first_of_list, int c0, int slots) {
  const int vecs = p.head_dim / 8;  // 16-byte vectors per row
  // K and V: slot c's row is the packed key row k_start + list[c]; every load of a pass issued before its stores.
  // A pass is kMaxVecs vectors of K and of V per thread, the chunk's rows of D <= 128 in one, D = 256's in two (rows
  // [0, 32) then [32, 64)): D = 256 keeps D <= 128's 80 registers (sm_90, three CTAs per SM) and makes two of its
  // round trips per chunk, each moving as many bytes; D <= 128's instantiation is the code of one pass as before (the
  // same PTX). One pass of eight vectors of each spilled 108 bytes there (ptxas, sm_90).
  constexpr int kMaxVecs = kSlotsPerCta * 16 / kGatherThreads;  // 4: a pass covers kSlotsPerCta rows of 16 vectors
  static_assert(kRowVecs == 16 || kRowVecs == 32, "rows of D <= 128 or D = 256");
  constexpr int kPasses = kRowVecs / 16;
#pragma unroll
  for (int pass = 0; pass < kPasses; ++pass) {
    uint4 kv[2][kMaxVecs];
    int64_t dst[kMaxVecs];
#pragma unroll
    for (int i = 0; i < kMaxVecs; ++i) {
      const int e = threadIdx.x + (pass * kMaxVecs + i) * kGatherThreads;
      const int r = e / vecs, c = e - r * vecs;
      dst[i] = -1;
      if (r < slots) {
        const int64_t key = k_start + slot_key(list, c0 + r, k_len);
        const char* k = static_cast<const char*>(p.k) + 2 * (key * p.k_row_stride + hk * p.k_head_stride) + 16 * c;
        const char* v = static_cast<const char*>(p.v) + 2 * (key * p.v_row_stride + hk * p.v_head_stride) + 16 * c;
        kv[0][i] = *reinterpret_cast<const uint4*>(k);
        kv[1][i] = *reinterpret_cast<const uint4*>(v);
        dst[i] = 2 * (((k_start + c0 + r) * rows.heads + kh) * p.head_dim) + 16 * c;
      }
    }
#pragma unroll
    for (int i = 0; i < kMaxVecs; ++i) {
      if (dst[i] < 0) continue;
      *reinterpret_cast<uint4*>(static_cast<char*>(rows.k) + dst[i]) = kv[0][i];
      *reinterpret_cast<uint4*>(static_cast<char*>(rows.v) + dst[i]) = kv[1][i];
    }
  }

  const int64_t seg = KeptRows::segment(k_start, b);
  // The positions, once per list (its first kept head).
  if (first_of_list) {
    for (int r = threadIdx.x; r < slots; r += kGatherThreads) {
      rows.pos[l * rows.extent + seg + c0 + r] = slot_key(list, c0 + r, k_len);  // the position of the row copied
    }
  }
  // The bias of the bias heads g whose query heads are kept head kh's: [kh G / KH, (kh + 1) G / KH) for KH =
  // rows.heads kept heads where G >= KH, else (G = 1) head 0 from kept head 0. Query head g (H / G) stands for g's
  // heads in the operand's head rule.
  if (rows.bias != nullptr) {
    const int g_per_k = rows.bias_heads >= rows.heads ? rows.bias_heads / rows.heads : (kh == 0 ? 1 : 0);
    const int g0 = rows.bias_heads >= rows.heads ? kh * g_per_k : 0;
    const int query_heads_per_g = p.num_heads / rows.bias_heads;
    for (int e = threadIdx.x; e < slots * g_per_k; e += kGatherThreads) {
      const int gi = e / slots, r = e - gi * slots;
      const int g = g0 + gi;
      const int64_t key = k_start + slot_key(list, c0 + r, k_len);
      const float value = bias_value(p.bias, p.bias.offset(key, g * query_heads_per_g, 0));
      rows.bias[g * rows.extent + KeptRows::bias_slot(seg + c0 + r)] = value;  // (the kernel's read order)
    }
  }
}

// The slot limits of list l in sequence b (KeptRows::limits): query tile m's first and last rows' windows
// (visible_keys: with window_right = 0 the causal limit), each edge as slots_of(edge), the slots below that position.
// A thread per (tile, limit), the tiles spread over the CTAs x of a grid of `ctas` (kLimitTiles each): one thread
// doing a tile's four binary searches in turn made ~48 dependent loads in a row, about as long as the whole copy, on
// the pass's critical path.
template <typename SlotsOf>
__device__ __forceinline__ void write_limits(const VarlenFwdParams& p, const KeptRows& rows, int b, int l,
                                             const SeqRange& sk, int x, int ctas, SlotsOf slots_of) {
  const SeqRange sq = clamp_seq(p.cu_seqlens_q, b, p.total_q, p.max_seqlen_q);
  const int tiles = static_cast<int>((sq.len + KeptRows::kTileRows - 1) / KeptRows::kTileRows);
  int32_t* out = rows.limits + (static_cast<int64_t>(l) * p.batch + b) * rows.query_tiles * KeptRows::kLimits;
  const int j = threadIdx.x % KeptRows::kLimits;
  for (int m = x * kLimitTiles + static_cast<int>(threadIdx.x) / KeptRows::kLimits; m < tiles;
       m += ctas * kLimitTiles) {
    const int64_t row = min(static_cast<int64_t>(m) * KeptRows::kTileRows + (j % 2) * (KeptRows::kTileRows - 1),
                            sq.len - 1);  // j even: the tile's first row, odd: its last
    const KeyRange range = visible_keys(row, sq.len, sk.len, p.window_left, p.window_right);
    // out[4 m + j]: the slots below the first / last rows' window starts (j = 0, 1), then their ends (2, 3)
    out[KeptRows::kLimits * m + j] = slots_of(j < 2 ? range.begin : range.end);
  }
}

// Grid (a quarter of the longest list's chunks of kSlotsPerCta slots, kept heads, sequences): the CTA x of kept head
// kh and sequence b copies the K and V rows of kh's list's chunks x, x + gridDim.x, ... (the slots below its count),
// their bias for the bias heads of kh's query heads, and (the list's first kept head, causal or windowed calls) the
// list's slot limits of query tiles [64 x, 64 x + 64), ... Sequences past gridDim.z are taken in further rounds.
// Kept heads (KeptRows::heads_of): the KV heads, each list serving whole KV groups (Hm in {1, Hk}: kh = hk, its list
// hk / (Hk / Hm)), or the lists themselves where finer (Hm > Hk: list l = kh, its rows from KV head kh Hk / Hm).
// kRowVecs: 16 for D <= 128, 32 for D = 256 (copy_slots; gather_kept_rows picks one by the call's head dim).
template <int kRowVecs>
__global__ void __launch_bounds__(kGatherThreads, kGatherCtasPerSm)
gather_kept_rows_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
                        const __grid_constant__ KeptRows rows) {
  const int kh = blockIdx.y;
  const bool per_list = keys.mask_heads > p.num_heads_k;
  const int heads_per_list = per_list ? 1 : p.num_heads_k / keys.mask_heads;  // kept heads per list
  const int l = kh / heads_per_list;
  const int hk = per_list ? kh / (keys.mask_heads / p.num_heads_k) : kh;
  const bool first_of_list = kh % heads_per_list == 0;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const SeqRange sk = key_seq(p, b);
    const int k_len = static_cast<int>(sk.len);
    const int count = keys.kept(b, l, k_len);
    const int32_t* list = keys.index + static_cast<int64_t>(l) * p.total_k + sk.start;
    // Chunks x, x + gridDim.x, ... of the list: the grid has a quarter of the longest list's chunks, so a list
    // keeping a quarter of the keys or more leaves no CTA without a chunk (a CTA per chunk of max_seqlen_k left
    // three of four CTAs of a half-kept batch with nothing to copy, each still loading cu_seqlens and the count).
    const int x = static_cast<int>(blockIdx.x), ctas = static_cast<int>(gridDim.x);
    for (int c0 = x * kSlotsPerCta; c0 < count; c0 += ctas * kSlotsPerCta) {
      copy_slots<kRowVecs>(p, rows, list, sk.start, k_len, b, hk, kh, l, first_of_list, c0,
                           min(kSlotsPerCta, count - c0));
    }
    if (rows.limits != nullptr && first_of_list) {
      write_limits(p, rows, b, l, sk, x, ctas, [&](int64_t edge) { return slots_below(list, count, edge); });
    }
  }
}

// Slots in place (KeptRows::count set): grid (chunks of kGatherThreads keys, 1, sequences): sequence b's keys c of
// chunks x, x + gridDim.x, ... get position c and, per bias head g, their float32 bias; the CTA x = 0 writes the
// count; the limits of query tile m's first and last rows are their windows' edges clamped to the keys (the slots
// below a position, in a list of every position). Sequences past gridDim.z are taken in further rounds.
__global__ void __launch_bounds__(kGatherThreads)
fill_slots_in_place_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeptRows rows) {
  const int x = static_cast<int>(blockIdx.x), ctas = static_cast<int>(gridDim.x);
  const int query_heads_per_g = rows.bias_heads > 0 ? p.num_heads / rows.bias_heads : 1;
  for (int b = blockIdx.z; b < p.batch; b += gridDim.z) {
    const SeqRange sk = key_seq(p, b);
    const int k_len = static_cast<int>(sk.len);
    const int64_t seg = KeptRows::segment(sk.start, b);
    if (x == 0 && threadIdx.x == 0) rows.count[b] = k_len;
    for (int c = x * kGatherThreads + static_cast<int>(threadIdx.x); c < k_len; c += ctas * kGatherThreads) {
      rows.pos[seg + c] = c;
      for (int g = 0; g < rows.bias_heads; ++g) {
        rows.bias[g * rows.extent + KeptRows::bias_slot(seg + c)] =
            bias_value(p.bias, p.bias.offset(sk.start + c, g * query_heads_per_g, 0));
      }
    }
    if (rows.limits != nullptr) {  // in a list of every position, the slots below a position are the position
      write_limits(p, rows, b, 0, sk, x, ctas, [&](int64_t edge) {
        return static_cast<int32_t>(edge < 0 ? 0 : edge < k_len ? edge : k_len);
      });
    }
  }
}

}  // namespace

cudaError_t fill_slots_in_place(const VarlenFwdParams& p, const KeptRows& rows, cudaStream_t stream) {
  if (rows.count == nullptr || p.batch == 0) return cudaSuccess;
  const int64_t most_keys = std::max<int64_t>(std::min(p.max_seqlen_k, p.total_k), 1);
  const int64_t chunks = (most_keys + kGatherThreads - 1) / kGatherThreads;
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(chunks, 65535)), 1u,
                  static_cast<unsigned>(std::min<int32_t>(p.batch, kMaxGridZ)));
  fill_slots_in_place_kernel<<<grid, kGatherThreads, 0, stream>>>(p, rows);
  return cudaGetLastError();
}

cudaError_t gather_kept_rows(const VarlenFwdParams& p, const KeyLists& keys, const KeptRows& rows,
                             cudaStream_t stream) {
  if (rows.k == nullptr || keys.index == nullptr || p.batch == 0 || rows.heads <= 0) return cudaSuccess;
  // A sequence's keys are at most min(max_seqlen_k, total_k) (clamp_seq), below 2^31.
  const int64_t most_keys = std::max<int64_t>(std::min(p.max_seqlen_k, p.total_k), 1);
  const int64_t chunks = (most_keys + kSlotsPerCta - 1) / kSlotsPerCta;
  const int64_t ctas = (chunks + kChunksPerCta - 1) / kChunksPerCta;
  const dim3 grid(static_cast<unsigned>(ctas), static_cast<unsigned>(rows.heads),
                  static_cast<unsigned>(std::min<int32_t>(p.batch, kMaxGridZ)));
  if (p.head_dim > 128) {  // D = 256 (sm90a_slots_supports: head dims 64 / 128 / 256)
    gather_kept_rows_kernel<32><<<grid, kGatherThreads, 0, stream>>>(p, keys, rows);
  } else {
    gather_kept_rows_kernel<16><<<grid, kGatherThreads, 0, stream>>>(p, keys, rows);
  }
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
