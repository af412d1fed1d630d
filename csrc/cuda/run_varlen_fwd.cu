// run_varlen_fwd.cu: one call, end to end, on one stream (api.h): carve the workspace, then
//   compact_keys (key-side mask) -> gather_kept_rows (its kept rows, for the sm90a kernel) / fill_slots_in_place (a
//   key-side bias alone, for the sm90a kernel)
//   / build_block_map (query-side mask) -> order_decode_units (split decode; where the decode kernel merges its own
//   splits, FwdPlan::combine_in_kernel, also finish_rows' work)
//   -> the attention kernel (dispatch.h)
//   -> combine_splits (decode with splits, unless the kernel merged them)
//   -> finish_rows (unless the combine or the order pass finished the rows: FwdPlan::combine_finishes,
//      combine_in_kernel)
// Every kernel clamps sequence ranges exactly as the others do (clamp_seq), so lying cu_seqlens can neither send a
// read or write out of bounds nor leave a row unwritten, and finish_rows makes the lie visible (NaN everywhere).
#include "api.h"
#include "dispatch.h"
#include "workspace.h"
#include "passes.h"

namespace dmattn::cuda {

#if DMATTN_UNIT_STAMPS
namespace {
thread_local unsigned long long* next_unit_stamps = nullptr;  // set_unit_stamps: for this thread's next call
}  // namespace

void set_unit_stamps(unsigned long long* records) { next_unit_stamps = records; }
#endif

cudaError_t run_varlen_fwd(const VarlenFwdParams& p, const FwdPlan& plan, ComputeCapability cc, void* workspace,
                           cudaStream_t stream) {
#if DMATTN_UNIT_STAMPS
  unsigned long long* const stamps = next_unit_stamps;  // this call's, whatever happens below
  next_unit_stamps = nullptr;
#endif
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
#if DMATTN_UNIT_STAMPS
  Workspace ws = carve_workspace(workspace, plan, p);
  ws.unit_stamps = stamps;
#else
  const Workspace ws = carve_workspace(workspace, plan, p);
#endif
  cudaError_t err;
  if ((err = compact_keys(p, ws.keys, stream)) != cudaSuccess) return err;
  if ((err = gather_kept_rows(p, ws.keys, ws.kept, stream)) != cudaSuccess) return err;
  if ((err = fill_slots_in_place(p, ws.kept, stream)) != cudaSuccess) return err;
  if ((err = order_decode_units(p, ws.keys, ws.splits, plan.dependent_launch, stream)) != cudaSuccess) return err;
  if ((err = build_block_map(p, ws.blocks, stream)) != cudaSuccess) return err;
  if ((err = dispatch_attention(cc, p, plan, ws, stream)) != cudaSuccess) return err;
  if (plan.kernel == FwdKernel::kDecode && !plan.combine_in_kernel &&
      (err = combine_splits(p, ws.splits, stream, plan.combine_finishes)) != cudaSuccess) {
    return err;
  }
  return plan.combine_finishes || plan.combine_in_kernel ? cudaSuccess : finish_rows(p, stream);
}

}  // namespace dmattn::cuda
