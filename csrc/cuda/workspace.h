// workspace.h: the one scratch buffer a CUDA call needs, and where each piece of it lives, torch-free.
//
//   workspace_layout       each piece's bytes for a plan (heuristics.h: plan_varlen_fwd) and the call's params
//   workspace_bytes        their 256-byte aligned total
//   key_mask_map_fallback  the plan to try where the allocator cannot give that total
//   carve_workspace        the pieces (passes.h: Workspace) at a base pointer
// The binding plans once, asks workspace_bytes(plan, p), allocates that many bytes through torch and hands the plan and
// the pointer to run_varlen_fwd, which carves it; the binding knows nothing of the pieces.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../varlen_fwd_params.h"
#include "heuristics.h"
#include "passes.h"

namespace dmattn::cuda {

// The workspace, in order: the kept-key index (Hm, total_k) and counts (B, Hm), int32 each (key-side mask), then the
// compaction's look-back (KeyParts, passes.h: sequences longer than one part): (B, Hm, parts) uint64 and a ticket; the
// split partials (decode with num_splits > 1): max and sum (splits, H, total_q) and O (splits, H, total_q, D), float32;
// the decode units' order (decode with unit_order): (B, Hk) int32; the merge tickets (decode with
// combine_in_kernel): (B, Hk, row tiles) uint32 and the contract's verdict, int32; the block map (query-side mask):
// (Hm, ceil(total_q / 64), ceil(key extent / 32)) bytes, 1 / 2048 of the mask, and v's flags (Hk, ceil(total_k / 64))
// bytes, and for the sm90a kernel the mask's bits (Hm, total_q, 4 ceil(key extent / 128)) uint32 (a key-side mask
// beside a query-side bias, or at D = 256 where its kept rows are not gathered, BlockMap::by_sequence:
// (Hm, min(4 (ceil(total_k / 128) + B), B x 4 ceil(key extent / 128))) bytes and as many uint32, a segment per
// sequence or a stride, whichever is smaller: O(total_k + B) whatever max_seqlen_k); the query-side terms
// (decode with query-side operands): (list heads, max_seqlen_q, total_k + 64 (B + 1)), 2
// or 4 bytes; the kept K / V rows (sm90a with a key-side mask): k and v's packed shape each, their positions (Hm,
// extent) int32 and bias (bias heads, extent) float32 (extent = total_k + 32 (B + 1) + 128, rounded up to 32), and for a
// causal or windowed call the slot limits (Hm, B, ceil(max_seqlen_q / 128), 4) int32; in place (a key-side bias
// alone or beside a mapped mask: FwdPlan::slots_in_place), the same with Hm = 1, no K / V rows, and each sequence's
// key count (B) int32.
// 256-byte aligned pieces, so a new one can be appended without disturbing the alignment of the others.
constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

struct WorkspaceLayout {
  size_t key_index = 0, key_count = 0, split_max = 0, split_sum = 0, split_o = 0, unit_order = 0, block_map = 0;
  size_t query_terms = 0, key_parts = 0, v_nonfinite = 0, kept_k = 0, kept_v = 0, kept_pos = 0, kept_bias = 0, kept_limits = 0;
  size_t mask_bits = 0, slot_count = 0, unit_counters = 0, merge_tickets = 0;
  size_t total = 0;                                                 // bytes
};

inline WorkspaceLayout workspace_layout(const FwdPlan& plan, const VarlenFwdParams& p) {
  WorkspaceLayout w;
  if (plan.key_lists_heads > 0) {
    w.key_index = w.total;
    w.total += align_up(sizeof(int32_t) * static_cast<size_t>(plan.key_lists_heads) * static_cast<size_t>(p.total_k));
    w.key_count = w.total;
    w.total += align_up(sizeof(int32_t) * static_cast<size_t>(plan.key_lists_heads) * static_cast<size_t>(p.batch));
    if (const int64_t parts = KeyParts::parts(p, plan.key_lists_heads); parts > 0) {
      w.key_parts = w.total;
      w.total += align_up(static_cast<size_t>(KeyParts::bytes(p, plan.key_lists_heads, parts)));
    }
  }
  if (plan.kernel == FwdKernel::kDecode && plan.num_splits > 1) {
    const size_t rows = static_cast<size_t>(plan.num_splits) * static_cast<size_t>(p.num_heads) *
                        static_cast<size_t>(p.total_q);
    w.split_max = w.total;
    w.total += align_up(sizeof(float) * rows);
    w.split_sum = w.total;
    w.total += align_up(sizeof(float) * rows);
    w.split_o = w.total;
    w.total += align_up(sizeof(float) * rows * static_cast<size_t>(p.head_dim));
  }
  if (plan.kernel == FwdKernel::kDecode && plan.unit_order) {
    w.unit_order = w.total;
    w.total += align_up(sizeof(int32_t) * static_cast<size_t>(p.batch) * static_cast<size_t>(p.num_heads_k));
  }
  if (plan.kernel == FwdKernel::kDecode && plan.combine_in_kernel) {
    w.merge_tickets = w.total;
    w.total += align_up(sizeof(uint32_t) * static_cast<size_t>(SplitPartials::ticket_count(p, plan.row_tiles) + 1));
  }
  if (plan.block_map_heads > 0) {
    w.block_map = w.total;
    w.total += align_up(static_cast<size_t>(BlockMap::bytes(p, plan.block_map_heads)));
  }
  if (plan.sm90a_query && plan.block_map_heads > 0) {
    w.mask_bits = w.total;
    w.total += align_up(static_cast<size_t>(BlockMap::bits_bytes(p, plan.block_map_heads)));
  }
  if (plan.v_flags) {
    w.v_nonfinite = w.total;
    w.total += align_up(static_cast<size_t>(BlockMap::v_bytes(p)));
  }
  if (plan.sm90a_slots) {
    // In place: one list (every key), its counts, no K / V copy.
    const size_t lists = plan.slots_in_place ? 1 : static_cast<size_t>(plan.key_lists_heads);
    if (plan.slots_in_place) {
      w.slot_count = w.total;
      w.total += align_up(sizeof(int32_t) * static_cast<size_t>(p.batch));
    } else {
      const size_t rows = static_cast<size_t>(kept_row_bytes(p, plan.key_lists_heads) / 2);
      w.kept_k = w.total;
      w.total += align_up(rows);
      w.kept_v = w.total;
      w.total += align_up(rows);
    }
    const size_t extent = static_cast<size_t>(KeptRows::extent_of(p));
    w.kept_pos = w.total;
    w.total += align_up(sizeof(int32_t) * lists * extent);
    w.kept_bias = w.total;
    w.total += align_up(sizeof(float) * static_cast<size_t>(KeptRows::bias_heads_of(p, lists)) * extent);
    if (KeptRows::has_limits(p)) {
      w.kept_limits = w.total;
      w.total += align_up(KeptRows::kLimits * sizeof(int32_t) * lists * static_cast<size_t>(p.batch) *
                          static_cast<size_t>(KeptRows::tiles_of(p)));
    }
  }
  if (plan.sm90a_dynamic) {  // a unit counter per launch of at most kSm90aUnitTableSeqs sequences
    w.unit_counters = w.total;
    w.total += align_up(sizeof(uint32_t) * static_cast<size_t>(sm90a_launches(p)));
  }
  if (plan.query_terms) {
    w.query_terms = w.total;
    w.total += align_up(static_cast<size_t>(QueryTerms::bytes(p, plan.key_lists_heads, query_terms_f32(p))));
  }
  return w;
}

inline size_t workspace_bytes(const FwdPlan& plan, const VarlenFwdParams& p) { return workspace_layout(plan, p).total; }

// The binding's first fallback where the allocator cannot give a plan's workspace (varlen_fwd_cuda.cpp): the plan
// made with PlanOverrides::key_mask_map, into *mapped, where that is still an sm90a plan, differs from the failed one
// and needs less workspace: a key-side mask whose kept rows' copy does not fit, mapped by sequence instead (D = 256:
// the map and bits, no copy; with a key-side bias 0.87x the sm80 kernels' time on the H200's prefill batch, run CK).
// False where there is no such plan (D <= 128 without a query-side bias, where the flag leaves the sm80 kernels; a
// failed plan that gathered nothing; a map past its caps): the binding then takes the sm80 kernels as before. Host
// arithmetic only, run only after a failed allocation.
inline bool key_mask_map_fallback(const VarlenFwdParams& p, const DeviceInfo& dev, const PlanOverrides& o,
                                  const FwdPlan& failed, FwdPlan* mapped) {
  if (o.key_mask_map || !failed.sm90a_slots || failed.slots_in_place) return false;  // no kept rows were gathered
  PlanOverrides map = o;
  map.key_mask_map = true;
  const FwdPlan plan = plan_varlen_fwd(p, dev, map);
  if (!plan.sm90a || plan.sm90a_query == failed.sm90a_query) return false;
  if (workspace_bytes(plan, p) >= workspace_bytes(failed, p)) return false;
  *mapped = plan;
  return true;
}

// The pieces of a workspace of workspace_bytes(plan, p) bytes at base (any 256-byte aligned device pointer).
inline Workspace carve_workspace(void* base, const FwdPlan& plan, const VarlenFwdParams& p) {
  const WorkspaceLayout w = workspace_layout(plan, p);
  char* bytes = static_cast<char*>(base);
  Workspace ws;
  if (plan.key_lists_heads > 0) {
    ws.keys.index = reinterpret_cast<int32_t*>(bytes + w.key_index);
    ws.keys.count = reinterpret_cast<int32_t*>(bytes + w.key_count);
    ws.keys.mask_heads = plan.key_lists_heads;
    ws.keys.heads_per_list = p.num_heads / plan.key_lists_heads;
    if (const int64_t parts = KeyParts::parts(p, plan.key_lists_heads); parts > 0) {
      ws.keys.parts.status = reinterpret_cast<unsigned long long*>(bytes + w.key_parts);
      ws.keys.parts.ticket = reinterpret_cast<unsigned int*>(ws.keys.parts.status +
                                                             KeyParts::statuses(p, plan.key_lists_heads, parts));
      ws.keys.parts.per_chain = static_cast<int32_t>(parts);
      ws.keys.parts.by_warps = plan.compact_by_warps && !plan.query_terms;
    }
  }
  if (plan.query_terms) {
    ws.keys.terms.values = bytes + w.query_terms;
    ws.keys.terms.extent = QueryTerms::extent_of(p);
    ws.keys.terms.queries = static_cast<int32_t>(p.max_seqlen_q);
    ws.keys.terms.f32 = query_terms_f32(p);
  }
  ws.splits.num_splits = plan.num_splits;
  ws.splits.tiles_per_split = plan.tiles_per_split;
  ws.splits.row_tiles = plan.row_tiles;
  if (plan.kernel == FwdKernel::kDecode && plan.num_splits > 1) {
    ws.splits.max = reinterpret_cast<float*>(bytes + w.split_max);
    ws.splits.sum = reinterpret_cast<float*>(bytes + w.split_sum);
    ws.splits.o = reinterpret_cast<float*>(bytes + w.split_o);
  }
  if (plan.kernel == FwdKernel::kDecode && plan.unit_order) {
    ws.splits.unit_order = reinterpret_cast<int32_t*>(bytes + w.unit_order);
  }
  if (plan.kernel == FwdKernel::kDecode && plan.combine_in_kernel) {
    ws.splits.tickets = reinterpret_cast<uint32_t*>(bytes + w.merge_tickets);
    ws.splits.contract_broken =
        reinterpret_cast<int32_t*>(ws.splits.tickets + SplitPartials::ticket_count(p, plan.row_tiles));
    ws.splits.merge_lanes = combine_lanes(p, plan.num_splits);
  }
  if (plan.block_map_heads > 0) {
    ws.blocks = {reinterpret_cast<uint8_t*>(bytes + w.block_map),
                 static_cast<int32_t>(BlockMap::row_blocks_of(p)),
                 static_cast<int32_t>(BlockMap::blocks(BlockMap::key_extent(p), BlockMap::kCols)),
                 plan.block_map_heads, p.mask.layout == OperandLayout::kKeySide};
    if (ws.blocks.by_sequence) {
      const BlockMap::SequenceLayout layout = BlockMap::sequence_layout(p);
      ws.blocks.seq_extent = layout.extent;
      ws.blocks.seq_stride = layout.stride;
    }
  }
  if (plan.sm90a_slots) {
    if (plan.slots_in_place) {
      ws.kept.count = reinterpret_cast<int32_t*>(bytes + w.slot_count);
    } else {
      ws.kept.k = bytes + w.kept_k;
      ws.kept.v = bytes + w.kept_v;
    }
    ws.kept.pos = reinterpret_cast<int32_t*>(bytes + w.kept_pos);
    ws.kept.extent = KeptRows::extent_of(p);
    ws.kept.bias_heads =
        static_cast<int32_t>(KeptRows::bias_heads_of(p, plan.slots_in_place ? 1 : plan.key_lists_heads));
    ws.kept.heads =
        static_cast<int32_t>(plan.slots_in_place ? p.num_heads_k : KeptRows::heads_of(p, plan.key_lists_heads));
    if (ws.kept.bias_heads > 0) ws.kept.bias = reinterpret_cast<float*>(bytes + w.kept_bias);
    if (KeptRows::has_limits(p)) ws.kept.limits = reinterpret_cast<int32_t*>(bytes + w.kept_limits);
    ws.kept.query_tiles = static_cast<int32_t>(KeptRows::tiles_of(p));
  }
  if (plan.sm90a_query && plan.block_map_heads > 0) {
    ws.blocks.bits = reinterpret_cast<uint32_t*>(bytes + w.mask_bits);
    ws.blocks.bit_words = static_cast<int32_t>(BlockMap::bit_words_of(p));
  }
  if (plan.sm90a_dynamic) ws.unit_counters = reinterpret_cast<uint32_t*>(bytes + w.unit_counters);
  if (plan.v_flags) {
    ws.blocks.v_nonfinite = reinterpret_cast<uint8_t*>(bytes + w.v_nonfinite);
    ws.blocks.v_blocks = static_cast<int32_t>(BlockMap::blocks(p.total_k, BlockMap::kVRows));
  }
  return ws;
}

}  // namespace dmattn::cuda
