// decode_order.cu: the order in which the decode kernel's CTAs take their (sequence, KV head) units, longest first
// (passes.h, SplitPartials::unit_order). The kernel's grid runs the units in launch order, and a split decode batch
// with a key-side mask leaves units of 4 to 30 kept tiles side by side: in batch order the longest ones start last
// and the kernel ends on them with a quarter of the SM cycles idle (76% active on the decode benchmark's 25%-kept
// batch, benchmarks/results/NOTES.md). Longest first, the last units to start are the shortest. Without a mask the
// units are the sequences' lengths, whose spread the splits already bound (93% active): the plan leaves them be.
//
// One CTA orders every unit of the call by its kept keys (KeyLists::kept, clamped as the kernel reads them) into
// kBuckets classes of equal width between 0 and the longest unit's count, longest class first: a histogram, a scan
// and a scatter in shared memory, a few microseconds where a full sort of 512 units took 13 (a bitonic sort, measured
// on the H200). Within a class the order is whatever the shared-memory atomics make it;
// no result depends on it, since each CTA computes its unit alone. The plan asks for it only while the units fit
// (kMaxOrderedUnits).
#include <cuda_runtime.h>

#include <cstdint>

#include "heuristics.h"
#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kOrderThreads = 1024;
constexpr int kUnitsPerThread = kMaxOrderedUnits / kOrderThreads;
constexpr int kBuckets = 64;
static_assert(kUnitsPerThread * kOrderThreads == kMaxOrderedUnits && kBuckets == 64, "two buckets per lane of warp 0");

__global__ void __launch_bounds__(kOrderThreads)
order_decode_units_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
                          int32_t* order) {
  __shared__ int count_in[kBuckets];  // units per bucket, then the next free position of each bucket
  __shared__ int longest;
  const int hk_count = p.num_heads_k, group = p.num_heads / p.num_heads_k;
  const int units = p.batch * hk_count;
  if (threadIdx.x < kBuckets) count_in[threadIdx.x] = 0;
  if (threadIdx.x == 0) longest = 0;
  int count[kUnitsPerThread];
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) {
    const int u = threadIdx.x + i * kOrderThreads;
    count[i] = 0;
    if (u < units) {
      const int b = u / hk_count, hk = u % hk_count;
      const int k_len = static_cast<int>(key_seq(p, b).len);  // < 2^31: cu_seqlens are int32
      // the kept keys of the KV group's list (its first query head's, as the decode kernel reads it)
      count[i] = keys.kept(b, keys.list(hk * group), k_len);
    }
  }
  __syncthreads();  // the counters are zeroed
  int mine = 0;
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) mine = max(mine, count[i]);
  mine = __reduce_max_sync(0xffffffffu, mine);
  if (threadIdx.x % 32 == 0) atomicMax(&longest, mine);
  __syncthreads();
  // Bucket 0 holds the longest units: kBuckets - 1 - floor(count * kBuckets / (longest + 1)).
  const int64_t width = static_cast<int64_t>(longest) + 1;
  int bucket[kUnitsPerThread];
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) {
    bucket[i] = kBuckets - 1 - static_cast<int>(static_cast<int64_t>(count[i]) * kBuckets / width);
    if (threadIdx.x + i * kOrderThreads < units) atomicAdd(&count_in[bucket[i]], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) {  // exclusive scan of the 64 counts, two per lane
    const int lane = threadIdx.x;
    const int c0 = count_in[2 * lane], c1 = count_in[2 * lane + 1];
    int sum = c0 + c1;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int up = __shfl_up_sync(0xffffffffu, sum, off);
      if (lane >= off) sum += up;
    }
    const int first = sum - c0 - c1;
    count_in[2 * lane] = first;
    count_in[2 * lane + 1] = first + c0;
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kUnitsPerThread; ++i) {
    const int u = threadIdx.x + i * kOrderThreads;
    if (u < units) order[atomicAdd(&count_in[bucket[i]], 1)] = u;
  }
}

}  // namespace

cudaError_t order_decode_units(const VarlenFwdParams& p, const KeyLists& keys, const SplitPartials& splits,
                               cudaStream_t stream) {
  // The plan orders only calls with kept-key lists (FwdPlan::unit_order).
  if (splits.unit_order == nullptr || keys.index == nullptr || p.batch == 0 || p.num_heads_k == 0) return cudaSuccess;
  order_decode_units_kernel<<<1, kOrderThreads, 0, stream>>>(p, keys, splits.unit_order);
  return cudaGetLastError();
}

}  // namespace dmattn::cuda
