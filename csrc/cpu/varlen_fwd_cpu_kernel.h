// varlen_fwd_cpu_kernel.h: the CPU kernel of dmattn::varlen_fwd, one work item at a time.
//
// Torch-free: it sees a VarlenFwdParams and plain scratch buffers; the registration file
// (varlen_fwd_cpu.cpp) spreads work items over threads. A work item is (sequence b, query head h, block of up to
// kQueryBlock queries of that sequence). For that item the kernel
//   1. lists the candidate keys: those visible to at least one query of the block (causal limit, key-side mask,
//      and for a query-side mask a True for at least one query of the block). Every other key costs nothing:
//      no dot product, no bias read, no V read;
//   2. computes the scaled scores of the block's queries against the candidates (one K row read serves the
//      whole block);
//   3. adds the bias, applies the per-query causal limit and query-side mask, then a float32 softmax and the
//      V accumulation.
// Accumulation is float32 for every input dtype.
#pragma once

#include <cstdint>
#include <vector>

#include "../varlen_fwd_params.h"

namespace dmattn::cpu {

constexpr int64_t kQueryBlock = 16;

// Per-thread scratch, reused across work items.
struct Scratch {
  std::vector<float> q;       // (kQueryBlock, D) queries as float32, pre-scaled by softmax_scale
  std::vector<float> row;     // (D) one K or V row as float32
  std::vector<float> scores;  // (kQueryBlock, n_candidates)
  std::vector<float> acc;     // (kQueryBlock, D)
  std::vector<int64_t> keys;  // candidate key positions inside the sequence
};

// Runs one work item: sequence b, query head h, queries [q_begin, q_end) (positions inside the sequence).
void run_block(const VarlenFwdParams& p, int32_t b, int32_t h, int64_t q_begin, int64_t q_end, Scratch& s);

// Writes 0 to out and -inf to lse for packed query rows [row_begin, row_end) of head h: rows no sequence owns.
void write_empty_rows(const VarlenFwdParams& p, int32_t h, int64_t row_begin, int64_t row_end);

}  // namespace dmattn::cpu
