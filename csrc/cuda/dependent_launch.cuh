// dependent_launch.cuh: programmatic dependent launch (compute capability 9.0). A kernel launched by launch_kernel
// with `dependent` set may be scheduled while the kernel before it in the stream is still draining, instead of after
// that kernel's completion has reached the host-side queue: its launch and CTA ramp overlap its predecessor's tail.
// It must therefore call wait_for_prior_grid() before its first global-memory access that depends on earlier work in
// the stream: griddepcontrol.wait returns once every prior grid has completed and its memory is visible. Without the
// launch attribute (or below sm_90) the wait is a no-op and the launch an ordinary one.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace dmattn::cuda {

__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the previous kernel where
// `dependent` (FwdPlan::dependent_launch: the caller checked the device's compute capability).
template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool dependent, Args&&... args) {
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace dmattn::cuda
