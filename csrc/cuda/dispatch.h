// dispatch.h: the attention kernels by architecture path, and the generated registry that picks one.
//
// Each architecture path (tools/kernel_matrix.py, ARCH_PATHS) is a namespace with one launcher template, explicitly
// instantiated per (dtype, head dim) in files generated at build time and compiled only for that path's
// architectures:
//   sm80::launch_attention   mma.sync / ldmatrix / cp.async (csrc/cuda/sm80/): the prefill and decode kernels, any
//                            device with cc >= 80
//   sm90a::launch_attention  wgmma / TMA (csrc/cuda/sm90a/), cc == 90 only: dense prefill, every other call handed to
//                            sm80::launch_attention; sm90a::launch_backward, the backward the binding plans there
#pragma once

#include <cuda_runtime_api.h>

#include "../varlen_fwd_params.h"
#include "api.h"
#include "heuristics.h"

namespace dmattn::cuda {

namespace sm80 {
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws, cudaStream_t stream);
}  // namespace sm80

namespace sm90a {
template <typename Elem, int kHeadDim>
cudaError_t launch_attention(const VarlenFwdParams& p, const FwdPlan& plan, const Workspace& ws, cudaStream_t stream);
// The sm90a backward (bwd_launch.cuh), where the binding plans it: head dims 64 and 128.
template <typename Elem, int kHeadDim>
cudaError_t launch_backward(const bwd::BwdParams& p, cudaStream_t stream);
}  // namespace sm90a

// Generated (build/generated/kernel_registry.cu): the launcher of the first architecture path, in order of
// preference (sm90a, then sm80), that runs on cc and has a kernel for (p.dtype, p.head_dim); cudaErrorInvalidValue
// when none has.
cudaError_t dispatch_attention(ComputeCapability cc, const VarlenFwdParams& p, const FwdPlan& plan,
                               const Workspace& ws, cudaStream_t stream);

// Generated too: the call of the backward launcher of tools/kernel_matrix.py's BACKWARD list (the sm90a backward,
// sm90a/bwd_launch.cuh) that runs on cc for (p.f.dtype, p.f.head_dim) (api.h, has_backward_kernel);
// cudaErrorInvalidValue when none has.
cudaError_t dispatch_backward(ComputeCapability cc, const bwd::BwdParams& p, cudaStream_t stream);

}  // namespace dmattn::cuda
