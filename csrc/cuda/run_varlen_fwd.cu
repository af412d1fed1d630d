// run_varlen_fwd.cu: one call, end to end, on one stream (api.h): plan, carve the workspace, then
//   compact_keys (key-side mask only) -> the attention kernel (dispatch.h) -> finish_rows
// Every kernel clamps sequence ranges exactly as the others do (clamp_seq), so lying cu_seqlens can neither send a
// read or write out of bounds nor leave a row unwritten, and finish_rows makes the lie visible (NaN everywhere).
#include "api.h"
#include "dispatch.h"
#include "heuristics.h"
#include "passes.h"

namespace dmattn::cuda {

size_t workspace_bytes(const VarlenFwdParams& p) { return workspace_layout(plan_varlen_fwd(p), p).total; }

cudaError_t run_varlen_fwd(const VarlenFwdParams& p, ComputeCapability cc, void* workspace, cudaStream_t stream) {
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
  const FwdPlan plan = plan_varlen_fwd(p);
  const KeyLists keys = carve_key_lists(workspace, plan, p);
  cudaError_t err;
  if ((err = compact_keys(p, keys, stream)) != cudaSuccess) return err;
  if ((err = dispatch_attention(cc, p, plan, keys, stream)) != cudaSuccess) return err;
  return finish_rows(p, stream);
}

}  // namespace dmattn::cuda
