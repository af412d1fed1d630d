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
//   0..4   %globaltimer (ns, one clock for the device) at: unit start (the CTA's entry for its first unit, else the
//          end of its previous unit), Q landed (its q_full wait returned), first S issued, last P V landed (its wait
//          returned), epilogue done (out stored or its TMA store issued)
//   5..9   clock64 (the SM's cycle counter, finer; comparable within one SM only) at the same five points
//   10     the SM (%smid)      11  the CTA (linear block index)   12  the unit's KV tiles
//   13     the unit's place in its CTA's walk (0: its first)      14  the scheduler's unit number (persistent; else -1)
//   15     1: written
// Points a unit does not reach (no KV tile: no Q, no S) stay 0. The binding allocates the records zeroed per call and
// keeps the last call's (torch.ops.dmattn.unit_stamps(), varlen_fwd_cuda.cpp).
#pragma once

#include <cstdint>

namespace dmattn::cuda::sm90a {

struct UnitStamps {
  static constexpr int kWords = 16;
  static constexpr int kPoints = 5;  // start, Q landed, first S issued, last P V landed, epilogue done
  enum Point : int { kStart = 0, kQLanded = 1, kFirstS = 2, kLastPV = 3, kDone = 4 };
};

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
