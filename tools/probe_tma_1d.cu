// probe_tma_1d.cu: does a 1-D tensor TMA of float32 rows fault when its box starts at an element that is not 16-byte
// aligned? (Run CX: the pending backward's copy of a tile's lse rows from h * total_q + row died with "illegal
// instruction" on every call; benchmarks/results/NOTES.md, "Thirteenth session".) One copy per process, since a
// fault kills the context:
//
//   nvcc -std=c++17 -arch=sm_90a --expt-relaxed-constexpr -I<cutlass>/include -o /tmp/probe tools/probe_tma_1d.cu
//   for start in 0 4 64 1 129 494 999; do for how in ptx ptx_hint cute; do /tmp/probe $start $how; done; done
//
// Each line: the box's first element, how the copy was made, and "ok" (the 64 values arrived, zeros past the end),
// "WRONG" or the CUDA error. `ptx`: a map encoded here (rank 1, a 64-element box: what CuTe builds for the backward's
// (_64):(_1@0)) and the copy in PTX, without / with (`ptx_hint`) the evict-last L2 hint; `cute`: the backward's own
// way, the map from cute::make_tma_copy and the copy by cute::SM90_TMA_LOAD_1D with the hint (only where the CUTLASS
// headers are on the include path). CuTe asserts that its encode succeeded: a map the driver refuses aborts the
// process with "Failed to initialize the TMA descriptor" instead of faulting on the device.
#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#if __has_include(<cute/tensor.hpp>)
#include <cute/tensor.hpp>
#define PROBE_WITH_CUTE 1
#endif

constexpr int kBox = 64;
constexpr int kElements = 1000;
// The createpolicy encoding of evict-last that CUTLASS names TMA::CacheHintSm90::EVICT_LAST.
constexpr uint64_t kEvictLast = 0x14F0000000000000ull;

// One box of kBox floats into shared memory by issue(rows, &full) (thread 0: a TMA on the barrier `full`, which
// expects the box's bytes), then written to out.
template <typename Issue>
__device__ void load_box(Issue issue, float* out) {
  __shared__ alignas(128) float rows[kBox];
  __shared__ alignas(8) uint64_t full;
  const uint32_t bar = static_cast<uint32_t>(__cvta_generic_to_shared(&full));
  if (threadIdx.x == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bar));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(kBox * 4) : "memory");
    issue(rows, &full);
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n\tselp.u32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(bar)
          : "memory");
    }
  }
  __syncthreads();
  if (threadIdx.x < kBox) out[threadIdx.x] = rows[threadIdx.x];
}

__global__ void copy_box(const __grid_constant__ CUtensorMap map, int start, bool hint, float* out) {
  load_box([&](float* rows, uint64_t* full) {
    const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(rows));
    const uint32_t bar = static_cast<uint32_t>(__cvta_generic_to_shared(full));
    if (hint) {
      asm volatile(
          "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
          " [%0], [%1, {%2}], [%3], %4;" ::"r"(dst),
          "l"(&map), "r"(start), "r"(bar), "l"(kEvictLast)
          : "memory");
    } else {
      asm volatile(
          "cp.async.bulk.tensor.1d.shared::cluster.global.mbarrier::complete_tx::bytes"
          " [%0], [%1, {%2}], [%3];" ::"r"(dst),
          "l"(&map), "r"(start), "r"(bar)
          : "memory");
    }
  }, out);
}

#if PROBE_WITH_CUTE
// The map of bwd_launch.cuh's make_stats_tma: `elements` floats as one dimension, a 64-element box.
auto make_cute_map(const float* src, int elements) {
  using namespace cute;
  auto gmem = make_tensor(make_gmem_ptr(src), make_layout(make_shape(elements), Stride<_1>{}));
  return make_tma_copy(SM90_TMA_LOAD{}, gmem, Layout<Shape<Int<kBox>>, Stride<_1>>{});
}
using CuteMap = decltype(make_cute_map(nullptr, 0));

__global__ void copy_box_cute(const __grid_constant__ CuteMap map, int start, float* out) {
  load_box([&](float* rows, uint64_t* full) {
    cute::SM90_TMA_LOAD_1D::copy(map.get_tma_descriptor(), full, kEvictLast, rows, start);
  }, out);
}
#endif

int main(int argc, char** argv) {
  const char* how = argc == 3 ? argv[2] : "";
  const bool cute_way = std::strcmp(how, "cute") == 0;
  if (argc != 3 || !(cute_way || std::strcmp(how, "ptx") == 0 || std::strcmp(how, "ptx_hint") == 0)) {
    std::fprintf(stderr, "usage: %s START ptx|ptx_hint|cute\n", argv[0]);
    return 2;
  }
  const int start = std::atoi(argv[1]);
  const bool hint = std::strcmp(how, "ptx_hint") == 0;
  std::vector<float> host(kElements);
  for (int i = 0; i < kElements; ++i) host[i] = static_cast<float>(i + 1);
  float *src = nullptr, *out = nullptr;
  cudaMalloc(&src, kElements * sizeof(float));
  cudaMalloc(&out, kBox * sizeof(float));
  cudaMemcpy(src, host.data(), kElements * sizeof(float), cudaMemcpyHostToDevice);

  if (cute_way) {
#if PROBE_WITH_CUTE
    copy_box_cute<<<1, 128>>>(make_cute_map(src, kElements), start, out);
#else
    std::printf("start %d %s: built without the CUTLASS headers\n", start, how);
    return 1;
#endif
  } else {
    // the driver's encode through the runtime (no -lcuda at link time)
    using Encode = decltype(&cuTensorMapEncodeTiled);
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found;
    const cudaError_t looked_up =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault, &found);
    if (looked_up != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      std::printf("start %d %s: no cuTensorMapEncodeTiled in the driver\n", start, how);
      return 1;
    }
    CUtensorMap map;
    const cuuint64_t dim[1] = {kElements};
    const cuuint32_t box[1] = {kBox}, element_stride[1] = {1};
    const CUresult encoded = reinterpret_cast<Encode>(entry)(
        &map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 1, src, dim, nullptr, box, element_stride, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    if (encoded != CUDA_SUCCESS) {
      std::printf("start %d %s: the encode failed (%d)\n", start, how, static_cast<int>(encoded));
      return 1;
    }
    copy_box<<<1, 128>>>(map, start, hint, out);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    std::printf("start %d %s: %s\n", start, how, cudaGetErrorString(err));
    return 1;
  }
  std::vector<float> got(kBox);
  cudaMemcpy(got.data(), out, kBox * sizeof(float), cudaMemcpyDeviceToHost);
  bool right = true;
  for (int i = 0; i < kBox; ++i) {
    const int e = start + i;
    right = right && got[i] == (e >= 0 && e < kElements ? host[e] : 0.f);
  }
  std::printf("start %d %s: %s\n", start, how, right ? "ok" : "WRONG");
  return right ? 0 : 1;
}
