// unit_stamps.cuh: a measuring build of the sm90a forward kernel (DMATTN_UNIT_STAMPS=1 in setup.py's environment;
// off by default, and then nothing of it is compiled): thread 0 of each consumer warpgroup writes, per work unit, the
// times at which the unit's boundaries pass, so that a GPU run can tell how much of a call its units' starts and ends
// cost where they are not overlapped with tiles (tools/unit_stamps.py reads them back; docs/pending/fa3_study.md,
// item C, step 0).
//
// One record of UnitStamps::kWords 64-bit words per (unit, consumer warpgroup), at
//   ((sequence * H + head) * query_tiles + m_block) * 2 + warpgroup
// (the same slot whichever grid ran the unit, so two runs of one call compare unit by unit; query_tiles is the
// launch's, from max_seqlen_q). Words:
//   0..6   %globaltimer (ns, one clock for the device) at the seven points of UnitStamps::Point: unit start (the
//          CTA's entry for its first unit, else the end of its previous unit), unit known (the dynamic scheduler's
//          q_full wait returned: its words and its Q; else the CTA's loop turned to it, before its work is worked
//          out), Q landed (the unit's set-up done and, the static grids, its q_full wait returned), first S issued,
//          last P V landed (its wait returned), out staged (the rows' values written: into shared memory past the
//          warpgroup's barrier, or stored from registers), epilogue done (its TMA store issued)
//   7..13  clock64 (the SM's cycle counter, finer; comparable within one SM only) at the same seven points
//   14..19 UnitStamps::Word: the SM (%smid), the CTA (linear block index), the unit's KV tiles, its place in its
//          CTA's walk (0: its first), the scheduler's unit number (persistent; else -1), 1: written
// Points a unit does not reach (no KV tile: no Q, no S) stay 0. The binding allocates the records zeroed per call and
// keeps the last call's (torch.ops.dmattn.unit_stamps(), varlen_fwd_cuda.cpp).
#pragma once

#include <cstdint>

#include "../heuristics.h"

namespace dmattn::cuda::sm90a {

struct UnitStamps {
  static constexpr int kPoints = 7;
  enum Point : int { kStart = 0, kKnown = 1, kQLanded = 2, kFirstS = 3, kLastPV = 4, kStaged = 5, kDone = 6 };
  enum Word : int { kSm = 2 * kPoints, kCta, kTiles, kOrder, kUnit, kWritten, kWords };
};
static_assert(UnitStamps::kWords == kUnitStampWords, "the record size the binding allocates (api.h)");

#if DMATTN_UNIT_STAMPS

__device__ __forceinline__ uint64_t stamp_globaltimer() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ uint64_t stamp_clock() {
  uint64_t c;
  asm volatile("mov.u64 %0, %%clock64;" : "=l"(c));
  return c;
}

__device__ __forceinline__ uint32_t stamp_smid() {
  uint32_t s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}

// One recording thread's record of its current unit (null: not recording).
struct UnitStampRecord {
  unsigned long long* rec = nullptr;
  __device__ __forceinline__ void point(int k) {
    if (rec != nullptr) {
      rec[k] = stamp_globaltimer();
      rec[UnitStamps::kPoints + k] = stamp_clock();
    }
  }
  __device__ __forceinline__ void point_at(int k, uint64_t time, uint64_t clock) {
    if (rec != nullptr) {
      rec[k] = time;
      rec[UnitStamps::kPoints + k] = clock;
    }
  }
  __device__ __forceinline__ void word(int k, long long v) {
    if (rec != nullptr) rec[k] = static_cast<unsigned long long>(v);
  }
};

#endif

}  // namespace dmattn::cuda::sm90a

// A statement of the measuring build only: nothing at all in the others.
#if DMATTN_UNIT_STAMPS
#define DMATTN_UNIT_STAMP(...) __VA_ARGS__
#else
#define DMATTN_UNIT_STAMP(...)
#endif
