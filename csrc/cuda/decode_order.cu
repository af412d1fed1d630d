// decode_order.cu: the order in which the decode kernel's CTAs take their (sequence, KV head) units, longest first
// (passes.h, SplitPartials::unit_order). The kernel's grid runs the units in launch order, and a split decode batch
// with a key-side mask leaves units of 4 to 30 kept tiles side by side: in batch order the longest ones start last
// and the kernel ends on them with a quarter of the SM cycles idle (76% active on the decode benchmark's 25%-kept
// batch, benchmarks/results/NOTES.md). Longest first, the last units to start are the shortest. Without a mask the
// units are the sequences' lengths, whose spread the splits already bound (93% active): the plan leaves them be.
//
// One CTA orders every unit of the call by its kept keys (KeyLists::kept, clamped as the kernel reads them) with
// order_longest_first (longest_first.cuh: 64 classes of equal width, a few microseconds). The plan asks for it only
// while the units fit (kMaxOrderedUnits).
#include <cuda_runtime.h>

#include <cstdint>

#include "heuristics.h"
#include "longest_first.cuh"
#include "passes.h"

namespace dmattn::cuda {
namespace {

constexpr int kOrderThreads = 1024;
constexpr int kUnitsPerThread = kMaxOrderedUnits / kOrderThreads;
static_assert(kUnitsPerThread * kOrderThreads == kMaxOrderedUnits, "every unit has a thread");

__global__ void __launch_bounds__(kOrderThreads)
order_decode_units_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
                          int32_t* order) {
  const int hk_count = p.num_heads_k, group = p.num_heads / p.num_heads_k;
  // the kept keys of the unit's KV group's list (its first query head's, as the decode kernel reads it)
  auto kept = [&](int u) {
    const int b = u / hk_count, hk = u % hk_count;
    const int k_len = static_cast<int>(key_seq(p, b).len);  // < 2^31: cu_seqlens are int32
    return keys.kept(b, keys.list(hk * group), k_len);
  };
  order_longest_first<kOrderThreads, kUnitsPerThread>(p.batch * hk_count, kept, order);
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
