// unowned_rows.cu: the pass after the attention kernel (and the split combine, unless that finished the rows): the
// cu_seqlens contract checked on the device, 0 / -inf for the query rows no sequence owns, NaN in every element of
// out and lse when the contract is broken (row_contract.cuh). The host never reads cu_seqlens (no device sync).
#include <cuda_runtime.h>

#include "passes.h"
#include "row_contract.cuh"

namespace dmattn::cuda {
namespace {

__global__ void __launch_bounds__(kFinishThreads) finish_rows_kernel(const __grid_constant__ VarlenFwdParams p) {
  finish_rows_block(p, blockIdx.x, gridDim.x);
}

}  // namespace

cudaError_t finish_rows(const VarlenFwdParams& p, cudaStream_t stream) {
  if (p.total_q == 0 || p.num_heads == 0) return cudaSuccess;  // out and lse are empty
  finish_rows_kernel<<<static_cast<unsigned>(finish_blocks(p)), kFinishThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
