// varlen_fwd_cpu_kernel.h: the CPU kernel of dmattn::varlen_fwd, one work item at a time.
//
// Torch-free: it sees a VarlenFwdParams and plain scratch buffers; the registration file
// (varlen_fwd_cpu.cpp) spreads work items over threads. A work item is (sequence, a range of query heads of one
// KV group, a block of queries of that sequence): its rows are every (head, query) pair, so one K or V row read
// serves all query heads that share it (GQA/MQA decode reads each KV row once per item, not once per head).
// For that item the kernel
//   1. lists the candidate keys: those visible to at least one row (its window, key-side mask, query-side mask).
//      Every other key costs nothing: no dot product, no bias read, no K or V read;
//   2. runs an online softmax over chunks of kKeyChunk candidates: scores (scaled q . k, capped when softcap > 0,
//      + bias; -inf where the row may not attend), running max and sum, weights exp(score - max) (vectorized; the
//      real value down to float32's subnormal range, 0 below), then the V accumulation, which skips weights of
//      exactly 0. The two products are small register-blocked loops (four rows at a time) over the chunk's K rows,
//      transposed into scratch as they are read, and its V rows, read in place; 16-bit K and V are converted to
//      float32 eight elements at a time on the way. The next chunk's rows are prefetched into L2 meanwhile;
//   3. normalizes and stores out and lse, the head's attention sink (if any) joining the softmax denominator.
// Accumulation is float32 for every input dtype. A key a row may not attend never touches that row, whatever its
// K, V and bias hold: its score is replaced by -inf and its weight 0 is skipped. A NaN or +inf score among the keys
// a row attends makes that row's out and lse NaN (the running max keeps a NaN, also across key splits); so does a NaN
// or +inf sink, for every row of its head.
#pragma once

#include <cstdint>
#include <vector>

#include "../varlen_fwd_params.h"

namespace dmattn::cpu {

constexpr int64_t kQueryBlock = 16;  // queries per work item, at most
constexpr int64_t kMaxRows = 64;     // (head, query) rows per work item, at most
// Candidate keys per online-softmax step: at D = 64 a chunk's transposed K and its scores stay in a 48 KB L1 (128
// ran a 16-bit decode call 1.15x slower).
constexpr int64_t kKeyChunk = 64;

constexpr int64_t kMinKeysPerSplit = 512;  // a key range long enough to be worth a thread of its own

struct WorkItem {
  int32_t batch;
  int32_t head_begin, head_end;  // query heads, all in one KV group
  int64_t q_begin, q_end;        // query positions inside the sequence
  int64_t key_begin, key_end;    // key positions inside the sequence this item covers: all those in reach of its
                                 // rows' windows, or a split of them
  int64_t partial;               // -1: the item writes out / lse; else where its partial result goes (floats)
};

// Key splits of one block of rows: partial results at partials + first_partial + s * rows * (D + 2) for
// s < num_splits, each row as (running max, running sum, unnormalized P . V of D floats).
struct SplitCombine {
  WorkItem rows;  // which rows (its key range is irrelevant)
  int64_t first_partial;
  int64_t num_splits;
};

struct WorkPlan {
  std::vector<WorkItem> items;          // largest first
  std::vector<SplitCombine> combines;   // run after every item
  int64_t partial_floats = 0;           // scratch the split items write
};

// Splits the call into work items: per sequence, per KV group, blocks of heads x queries of at most kMaxRows rows.
// When that gives fewer items than threads (a few long sequences, as in single-batch decode), the key range of each
// block is split too (flash-decoding style), and combine_splits merges the partial softmax results. The plan, and
// so the float32 rounding of split blocks, depends on the thread count; it is fixed for a given thread count.
WorkPlan plan_work(const VarlenFwdParams& p, int64_t num_threads);

// Per-thread scratch, reused across work items.
struct Scratch {
  std::vector<float> q;       // (rows, D) queries as float32, pre-scaled by softmax_scale
  std::vector<float> kt;      // (D, kKeyChunk) the chunk's K rows, transposed
  std::vector<int64_t> krow;  // (kKeyChunk) where the chunk's K rows start in k (elements)
  std::vector<int64_t> vrow;  // (kKeyChunk) where the chunk's V rows start in v (elements)
  std::vector<float> key_bias;  // (kKeyChunk) the chunk's key-side bias, when every row of the item shares it
  std::vector<float> scores;  // (rows, kKeyChunk)
  std::vector<float> acc;     // (rows, D) running P . V
  std::vector<int64_t> keys;  // candidate key positions inside the sequence
  std::vector<uint8_t> seen;  // (keys in the item's range) whether some row's query-side mask keeps each key
};

// Runs one work item; a split item writes its partial result into partials (see SplitCombine).
void run_block(const VarlenFwdParams& p, const WorkItem& item, Scratch& s, float* partials);

// Merges the partial results of one block's key splits and writes its out / lse rows (the sink joins here).
void combine_splits(const VarlenFwdParams& p, const SplitCombine& c, const float* partials);

// Writes 0 to out and -inf to lse for packed query rows [row_begin, row_end) of head h: rows no sequence owns.
void write_empty_rows(const VarlenFwdParams& p, int32_t h, int64_t row_begin, int64_t row_end);

}  // namespace dmattn::cpu
