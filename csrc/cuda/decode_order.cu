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
//
// Where the decode kernel merges its own splits (FwdPlan::combine_in_kernel), this launch also takes the two jobs that
// would otherwise need launches of their own: the ordering CTA zeroes the units' tickets (SplitPartials::tickets),
// and CTAs after it do finish_rows' work (row_contract.cuh: the contract check, the rows no sequence owns, NaN
// everywhere when the contract is broken), the first of them writing the verdict the kernel's merges read. Both need
// only be done before the decode kernel: its merges write the owned rows alone, and nothing where the verdict says
// the contract is broken.
#include <cuda_runtime.h>

#include <cstdint>

#include "dependent_launch.cuh"
#include "heuristics.h"
#include "longest_first.cuh"
#include "passes.h"
#include "row_contract.cuh"

namespace dmattn::cuda {
namespace {

constexpr int kOrderThreads = 1024;
constexpr int kUnitsPerThread = kMaxOrderedUnits / kOrderThreads;
static_assert(kUnitsPerThread * kOrderThreads == kMaxOrderedUnits, "every unit has a thread");

// CTA 0 orders the units (and zeroes the tickets, where there are); CTAs 1, 2, ... (only where there are tickets)
// finish the rows.
__global__ void __launch_bounds__(kOrderThreads)
order_decode_units_kernel(const __grid_constant__ VarlenFwdParams p, const __grid_constant__ KeyLists keys,
                          const __grid_constant__ SplitPartials splits) {
  wait_for_prior_grid();  // the lists come from the compaction just before (dependent_launch.cuh)
  if (blockIdx.x > 0) {
    const bool broken = contract_broken(p);
    if (blockIdx.x == 1 && threadIdx.x == 0) *splits.contract_broken = broken ? 1 : 0;
    finish_rows_given(p, broken, blockIdx.x - 1, gridDim.x - 1);
    return;
  }
  const int hk_count = p.num_heads_k, group = p.num_heads / p.num_heads_k;
  if (splits.tickets != nullptr) {  // the plan keeps them within kMaxMergeTickets: 16 stores per thread
    const int tickets = static_cast<int>(SplitPartials::ticket_count(p, splits.row_tiles));
    for (int i = threadIdx.x; i < tickets; i += kOrderThreads) splits.tickets[i] = 0;
  }
  // the kept keys of the unit's KV group's list (its first query head's, as the decode kernel reads it)
  auto kept = [&](int u) {
    const int b = u / hk_count, hk = u % hk_count;
    const int k_len = static_cast<int>(key_seq(p, b).len);  // < 2^31: cu_seqlens are int32
    return keys.kept(b, keys.list(hk * group), k_len);
  };
  order_longest_first<kOrderThreads, kUnitsPerThread>(p.batch * hk_count, kept, splits.unit_order);
}

}  // namespace

cudaError_t order_decode_units(const VarlenFwdParams& p, const KeyLists& keys, const SplitPartials& splits,
                               bool dependent, cudaStream_t stream) {
  // The plan orders only calls with kept-key lists (FwdPlan::unit_order), and merges in the kernel only calls it
  // orders, of at least one sequence (FwdPlan::combine_in_kernel): the finishing CTAs run wherever tickets do.
  if (splits.unit_order == nullptr || keys.index == nullptr || p.batch == 0 || p.num_heads_k == 0) return cudaSuccess;
  const int64_t finishing = splits.tickets != nullptr ? finish_blocks(p, kOrderThreads) : 0;
  return launch_kernel(order_decode_units_kernel, dim3(static_cast<unsigned>(1 + finishing)), dim3(kOrderThreads), 0,
                       stream, dependent, p, keys, splits);
}

}  // namespace dmattn::cuda
