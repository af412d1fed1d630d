// heuristics.h: every choice the CUDA backend makes for a call, in one place, torch-free.
//
//   tile_shape_sm80   the sm80 path's tile policy (constexpr: the kernel's traits and its launcher read the same one)
//   plan_varlen_fwd   what a call runs: the kernel variant, the passes around it, and (later) split count and GQA
//                     packing
//   workspace_layout  the one scratch buffer a call needs and where each piece of it lives (carve_key_lists)
// The binding asks for workspace_bytes(p), allocates that many bytes through torch and hands the pointer to
// run_varlen_fwd; it knows nothing of the pieces.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../varlen_fwd_params.h"
#include "passes.h"

namespace dmattn::cuda {

struct TileShape {
  int block_m;  // query rows per CTA
  int block_n;  // key slots per KV tile
  int warps;
};

// The sm80 path's tile policy. Accumulators per thread (fp32): O kMTiles * D / 2, scores kMTiles * block_n / 4.
// query_operands: the kernel variant that reads a query-side mask or bias (a per-element path with 64-bit
// addressing that needs registers the 32-rows-per-warp tile does not have).
constexpr TileShape tile_shape_sm80(int head_dim, bool query_operands) {
  // Measured on the H100 (benchmarks/results/NOTES.md): with 4 warps, 32 query rows per warp (two m16 fragments
  // sharing every K / V fragment) beat 16; D = 256 halves the KV tile to stay within 255 registers.
  if (head_dim > 128) return TileShape{64, 32, 4};
  return query_operands ? TileShape{64, 64, 4} : TileShape{128, 64, 4};
}

// What one call runs. The launchers choose a kernel from this and the params alone.
struct FwdPlan {
  bool query_operands = false;  // the kernel variant that reads query-side masks / biases
  int32_t key_lists_heads = 0;  // > 0: a key-side mask with that many heads is compacted into kept-key lists first
  int32_t num_splits = 1;       // key-range splits per query tile; 1 until split-KV decode fills it
  bool pack_gqa = false;        // query heads of one KV head in one tile; false until GQA packing fills it
};

inline FwdPlan plan_varlen_fwd(const VarlenFwdParams& p) {
  FwdPlan plan;
  plan.query_operands =
      p.mask.layout == OperandLayout::kQuerySide || p.bias.layout == OperandLayout::kQuerySide;
  if (p.mask.layout == OperandLayout::kKeySide && p.num_heads > 0) {
    plan.key_lists_heads = p.num_heads / p.mask.head_group;  // head_group = H / Hm
  }
  return plan;
}

// The workspace, in order: the kept-key index (Hm, total_k) then the counts (B, Hm), int32 each. 256-byte aligned
// pieces, so a new one can be appended without disturbing the alignment of the others.
constexpr size_t kWorkspaceAlign = 256;

inline size_t align_up(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

struct WorkspaceLayout {
  size_t key_index = 0, key_count = 0;  // byte offsets
  size_t total = 0;                     // bytes
};

inline WorkspaceLayout workspace_layout(const FwdPlan& plan, const VarlenFwdParams& p) {
  WorkspaceLayout w;
  if (plan.key_lists_heads > 0) {
    w.key_index = w.total;
    w.total += align_up(sizeof(int32_t) * static_cast<size_t>(plan.key_lists_heads) * static_cast<size_t>(p.total_k));
    w.key_count = w.total;
    w.total += align_up(sizeof(int32_t) * static_cast<size_t>(plan.key_lists_heads) * static_cast<size_t>(p.batch));
  }
  return w;
}

// The pieces of a workspace of workspace_bytes(p) bytes at base (any 256-byte aligned device pointer).
inline KeyLists carve_key_lists(void* base, const FwdPlan& plan, const VarlenFwdParams& p) {
  if (plan.key_lists_heads == 0) return {};
  const WorkspaceLayout w = workspace_layout(plan, p);
  char* bytes = static_cast<char*>(base);
  return {reinterpret_cast<int32_t*>(bytes + w.key_index), reinterpret_cast<int32_t*>(bytes + w.key_count),
          plan.key_lists_heads};
}

}  // namespace dmattn::cuda
