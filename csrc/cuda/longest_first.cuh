// longest_first.cuh: one CTA's order of a launch's work units, longest first, for the kernels whose CTAs take their
// units from an array in launch order: the decode kernel's (sequence, KV head) units (decode_order.cu) and the sm90a
// backward's (sequence, KV head, key tile) CTAs (run_varlen_bwd.cu, bwd::CtaOrder). A grid runs its CTAs roughly in
// launch order, so a batch whose long units start last ends on them with most SMs idle; longest first, the last to
// start are the shortest.
//
// The units are sorted into kBuckets classes of equal width between 0 and the longest unit's count, longest class
// first: a histogram, a scan and a scatter in shared memory, a few microseconds where a full sort of 512 units took 13
// (a bitonic sort, measured on the H200). Within a class the order is whatever the shared-memory atomics make it; no
// result may depend on it (each CTA computes its unit alone).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace dmattn::cuda {

constexpr int kOrderBuckets = 64;  // two per lane of warp 0 in the scan

// The runs 0 .. runs - 1 (runs <= kThreads x kPerThread), the largest count_of(r) first, each given width_of(r) >= 0
// consecutive positions: emit(r, first) is called once per run with the first of its positions, the runs' positions
// tiling [0, sum of the widths). A run is a group of units that should start together (the sm90a backward's bands of
// one (sequence, KV head)'s key tiles, bwd::CtaOrder), ranked as one. Called by all kThreads threads of a one-CTA
// launch; count_of and width_of are evaluated once per run, every thread's kPerThread calls issued before any result
// is used (their loads overlap).
template <int kThreads, int kPerThread, typename CountOf, typename WidthOf, typename Emit>
__device__ __forceinline__ void order_runs_longest_first(int runs, CountOf count_of, WidthOf width_of, Emit emit) {
  static_assert(kThreads % 32 == 0 && kThreads >= kOrderBuckets, "the counters are zeroed by one pass");
  __shared__ int count_in[kOrderBuckets];  // positions per bucket, then the next free position of each bucket
  __shared__ int longest;
  if (threadIdx.x < kOrderBuckets) count_in[threadIdx.x] = 0;
  if (threadIdx.x == 0) longest = 0;
  int count[kPerThread], width[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int r = threadIdx.x + i * kThreads;
    count[i] = r < runs ? count_of(r) : 0;
    width[i] = r < runs ? width_of(r) : 0;
  }
  __syncthreads();  // the counters are zeroed
  int mine = 0;
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) mine = max(mine, count[i]);
  mine = __reduce_max_sync(0xffffffffu, mine);
  if (threadIdx.x % 32 == 0) atomicMax(&longest, mine);
  __syncthreads();
  // Bucket 0 holds the longest runs: kOrderBuckets - 1 - floor(count * kOrderBuckets / (longest + 1)).
  const int64_t classes = static_cast<int64_t>(longest) + 1;
  int bucket[kPerThread];
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    bucket[i] = kOrderBuckets - 1 - static_cast<int>(static_cast<int64_t>(count[i]) * kOrderBuckets / classes);
    if (width[i] > 0) atomicAdd(&count_in[bucket[i]], width[i]);
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
  for (int i = 0; i < kPerThread; ++i) {
    if (width[i] > 0) emit(threadIdx.x + i * kThreads, atomicAdd(&count_in[bucket[i]], width[i]));
  }
}

// Writes order[0, units) = the units 0 .. units - 1 (units <= kThreads x kPerThread), the largest count_of(u) first:
// runs of one unit each.
template <int kThreads, int kPerThread, typename CountOf>
__device__ __forceinline__ void order_longest_first(int units, CountOf count_of, int32_t* order) {
  order_runs_longest_first<kThreads, kPerThread>(
      units, count_of, [](int) { return 1; }, [&](int u, int at) { order[at] = u; });
}

}  // namespace dmattn::cuda
