// varlen_fwd_params.h: the plain description of one dmattn::varlen_fwd call.
//
// Kernels (CPU and CUDA) see only this struct: pointers, element strides and sizes. No torch header may be
// included here or by any kernel source; the binding layer (csrc/tensors_to_params.cpp) is the only place that turns
// tensors into a VarlenFwdParams, after the one validation pass.
//
// Shapes (element strides, innermost head-dim stride is always 1):
//   q    (total_q, H,  D)     out (total_q, H, D)     lse (H, total_q) float32, contiguous
//   k, v (total_k, Hk, D)
//   cu_seqlens_q (B + 1) int32, cu_seqlens_k (B + 1) int32
//   mask / bias, key-side   (total_k, Hm)              element [key, hm]
//               query-side (total_q, Hm, max_seqlen_k) element [query, hm, j], j = key position in the sequence
//   With kv_slots (a KV-cache pool): k, v (pool_rows, Hk, D) and key-side mask / bias (pool_rows, Hm), one row per
//   cache slot; kv_slots (total_k,) int32 maps packed key row r (as cu_seqlens_k counts them) to its slot.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define DMATTN_HOST_DEVICE __host__ __device__ __forceinline__
#define DMATTN_UNROLL _Pragma("unroll")  // in DMATTN_HOST_DEVICE code, which host compilers also see (-Wunknown-pragmas)
#else
#define DMATTN_HOST_DEVICE inline
#define DMATTN_UNROLL
#endif

namespace dmattn {

enum class ScalarType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// How a mask or bias tensor is laid out; told apart by rank in the binding (2 = key-side, 3 = query-side).
enum class OperandLayout : int32_t { kAbsent = 0, kKeySide = 1, kQuerySide = 2 };

// A mask (bool) or bias (float32 or q's dtype) operand.
struct ScoreOperand {
  const void* ptr = nullptr;
  OperandLayout layout = OperandLayout::kAbsent;
  ScalarType dtype = ScalarType::kFloat32;  // bias only; a mask is always bool (1 byte)
  // Query head h reads operand head h / head_group. head_group = H / Hm, so Hm = 1 gives head 0 for every h,
  // Hm = Hk gives the KV group of h, Hm = H gives h itself.
  int32_t head_group = 1;
  int64_t row_stride = 0;   // per key (key-side) or per query (query-side)
  int64_t head_stride = 0;  // per operand head
  int64_t col_stride = 0;   // per key position j (query-side only)

  DMATTN_HOST_DEVICE bool present() const { return layout != OperandLayout::kAbsent; }
  // Element offset of (row, query head h, key position j), in elements: row is the packed key (key-side) or query
  // (query-side) index; j is ignored key-side (col_stride = 0). The one addressing rule every kernel reads by.
  DMATTN_HOST_DEVICE int64_t offset(int64_t row, int32_t h, int64_t j) const { return column(row_start(row, h), j); }
  // The same rule in two steps, for loops that walk one row's key positions: row_start(row, h) once, then
  // column(start, j) per key.
  DMATTN_HOST_DEVICE int64_t row_start(int64_t row, int32_t h) const {
    return row * row_stride + static_cast<int64_t>(h / head_group) * head_stride;
  }
  DMATTN_HOST_DEVICE int64_t column(int64_t start, int64_t j) const { return start + j * col_stride; }
  // A mask element: any nonzero byte is True (a uint8 tensor viewed as bool may hold 2..255).
  DMATTN_HOST_DEVICE bool mask_allows(int64_t element) const {
    return static_cast<const uint8_t*>(ptr)[element] != 0;
  }
};

struct VarlenFwdParams {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const int32_t* cu_seqlens_q = nullptr;
  const int32_t* cu_seqlens_k = nullptr;

  ScalarType dtype = ScalarType::kFloat32;  // of q, k, v and out

  int64_t q_row_stride = 0, q_head_stride = 0;
  int64_t k_row_stride = 0, k_head_stride = 0;
  int64_t v_row_stride = 0, v_head_stride = 0;
  int64_t out_row_stride = 0, out_head_stride = 0;
  // lse is (H, total_q) contiguous: element [h, i] at h * total_q + i.

  int32_t batch = 0;       // B
  int32_t num_heads = 0;   // H
  int32_t num_heads_k = 0; // Hk, H % Hk == 0
  int32_t head_dim = 0;    // D
  int64_t total_q = 0;
  int64_t total_k = 0;
  int64_t max_seqlen_q = 0;
  int64_t max_seqlen_k = 0;

  float softmax_scale = 1.0f;
  // The key window of each query (FlashAttention's window_size), in key positions around the query's aligned
  // position a = i + lk - lq (query i of a sequence with lq queries and lk keys): it sees keys j with
  // a - window_left <= j <= a + window_right; -1 = no limit on that side. The op's is_causal is window_right = 0
  // (make_params folds it in, and turns a limit no sequence reaches into -1), so kernels read only the window:
  // visible_keys() below.
  int64_t window_left = -1;
  int64_t window_right = -1;
  // > 0: every score is capped as softcap * tanh(scale * q.k / softcap) before the bias is added (Gemma 2's attention
  // logit softcapping); 0: off.
  float softcap = 0.f;
  float softcap_log2e2 = 0.f;  // 2 log2(e) / softcap (0 when off): the kernels' tanh as exp2
  // (H,) float32, contiguous, or null: one logit per query head that joins the softmax denominator of every row of
  // that head (learned attention sinks, gpt-oss): out = sum_j exp(s_j) v_j / (exp(sink) + sum_j exp(s_j)), and lse =
  // log(exp(sink) + sum_j exp(s_j)). A row that sees no key gets out 0 and lse = sink.
  const float* sinks = nullptr;
  // (B,) int32, or null: sequence b uses only the first seqused_k[b] keys of its cu_seqlens_k range (FlashAttention's
  // seqused_k), so a padded cache seen as packed rows (sequence b at rows b * S ..) needs no mask for its unused slots.
  const int32_t* seqused_k = nullptr;
  // (total_k,) int32, or null: the keys live in a pool of pool_rows slots (k, v and key-side operands have a row per
  // slot; a paged cache (num_pages, page_size, Hk, D) flattened, or a token pool) and packed key row r of
  // cu_seqlens_k's ranges is slot kv_slots[r]. Kernels clamp slots into [0, pool_rows), so a lying entry reads some
  // slot of the pool, never past it.
  const int32_t* kv_slots = nullptr;
  int64_t pool_rows = 0;  // rows of k / v (total_k without kv_slots)
  // (total_q, 2) int32, contiguous, or null: query row r sees only the key positions [key_range[r][0],
  // key_range[r][1]) of its sequence, on top of the window (row_keys below): one interval per query, the compact form
  // of a mask that depends on positions only (a sliding window, a prefix-LM, causal documents of a packed sequence).
  const int32_t* key_range = nullptr;

  // The sink logit of query head h; -inf (weight 0 in every row, the same as no sink) without sinks.
  DMATTN_HOST_DEVICE float sink(int32_t h) const { return sinks != nullptr ? sinks[h] : -INFINITY; }

  ScoreOperand mask;
  ScoreOperand bias;
};

// The extent of one sequence after clamping cu_seqlens to the tensor extents, so that lying cu_seqlens can never
// make a kernel read or write out of bounds: start <= end <= total and end - start <= max_seqlen.
struct SeqRange {
  int64_t start;
  int64_t len;
};

DMATTN_HOST_DEVICE SeqRange clamp_seq(const int32_t* cu, int32_t b, int64_t total, int64_t max_seqlen) {
  int64_t start = cu[b];
  int64_t end = cu[b + 1];
  start = start < 0 ? 0 : (start > total ? total : start);
  end = end < start ? start : (end > total ? total : end);
  int64_t len = end - start;
  return {start, len > max_seqlen ? max_seqlen : len};
}

// The keys sequence b uses: its clamped cu_seqlens_k range, cut to its first seqused_k[b] keys when the call has
// seqused_k (a negative count is none). Every kernel reads a sequence's keys through this.
DMATTN_HOST_DEVICE SeqRange key_seq(const VarlenFwdParams& p, int32_t b) {
  SeqRange s = clamp_seq(p.cu_seqlens_k, b, p.total_k, p.max_seqlen_k);
  if (p.seqused_k != nullptr) {
    const int64_t used = p.seqused_k[b];
    s.len = used < 0 ? 0 : (used < s.len ? used : s.len);
  }
  return s;
}

// Where key j (position in its sequence) of a sequence lives: the row of k, v and key-side operands that holds it.
// Every kernel finds key rows through this one accessor (the CPU kernels, the CUDA key compaction, the CUDA K / V
// tile loads and key-side operand reads). Packed K / V keep a sequence's keys in consecutive rows from its clamped
// cu_seqlens_k start; with kv_slots, packed row first + j names a slot of the pool (clamped into it).
struct KeyRows {
  int64_t first = 0;                 // packed row of key 0
  const int32_t* slots = nullptr;    // VarlenFwdParams::kv_slots
  int64_t pool_rows = 0;             // slots are clamped into [0, pool_rows)
  DMATTN_HOST_DEVICE int64_t row(int64_t j) const { return clamp(unclamped(j)); }
  // row(j) in two halves, for a kernel that issues the kv_slots load early and clamps where it uses the row.
  DMATTN_HOST_DEVICE int64_t unclamped(int64_t j) const { return slots == nullptr ? first + j : slots[first + j]; }
  DMATTN_HOST_DEVICE int64_t clamp(int64_t slot) const {
    if (slots == nullptr) return slot;
    return slot < 0 ? 0 : (slot >= pool_rows ? pool_rows - 1 : slot);
  }
};

// The key rows of a sequence whose clamped key range is sk (key_seq).
DMATTN_HOST_DEVICE KeyRows key_rows_of(const VarlenFwdParams& p, const SeqRange& sk) {
  return KeyRows{sk.start, p.kv_slots, p.pool_rows};
}

// The key positions [begin, end) that query i of a sequence with lq queries and lk keys may see by the window
// (VarlenFwdParams::window_left / window_right; bottom-right aligned like FlashAttention >= 2.1: the causal rule is
// j <= i + lk - lq). Clipped to [0, lk]; empty when end <= begin. Masks come on top.
struct KeyRange {
  int64_t begin;
  int64_t end;
};

DMATTN_HOST_DEVICE KeyRange visible_keys(int64_t i, int64_t lq, int64_t lk, int64_t window_left,
                                         int64_t window_right) {
  const int64_t aligned = i + lk - lq;
  int64_t begin = window_left < 0 ? 0 : aligned - window_left;
  int64_t end = window_right < 0 ? lk : aligned + window_right + 1;
  begin = begin < 0 ? 0 : begin;
  end = end > lk ? lk : end;
  return {begin, end};
}

// Packed query row q_row's interval of VarlenFwdParams::key_range (which the call has), as given: not clipped.
DMATTN_HOST_DEVICE KeyRange key_range_of(const VarlenFwdParams& p, int64_t q_row) {
  return {p.key_range[2 * q_row], p.key_range[2 * q_row + 1]};
}

// The key positions packed query row q_row (query i of a sequence with lq queries and lk keys) may see: its window,
// narrowed to its key_range when the call has one. Clipped to [0, lk]; empty when end <= begin.
DMATTN_HOST_DEVICE KeyRange row_keys(const VarlenFwdParams& p, int64_t q_row, int64_t i, int64_t lq, int64_t lk) {
  KeyRange r = visible_keys(i, lq, lk, p.window_left, p.window_right);
  if (p.key_range != nullptr) {
    const KeyRange given = key_range_of(p, q_row);
    r.begin = given.begin > r.begin ? given.begin : r.begin;
    r.end = given.end < r.end ? given.end : r.end;
  }
  return r;
}

}  // namespace dmattn
