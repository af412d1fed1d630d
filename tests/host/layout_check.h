// layout_check.h: what the host-side layout checks (sm90a_fwd_layouts.cu, sm90a_bwd_layouts.cu) share: a failure
// counter with EXPECT, which prints the first ten mismatches, and the m16n8 mapping of a 64-row wgmma fragment.
#pragma once

#include <cstdio>

#include <cute/tensor.hpp>

inline int failures = 0;
#define EXPECT(cond, ...)                            \
  do {                                               \
    if (!(cond)) {                                   \
      if (failures++ < 10) std::printf(__VA_ARGS__); \
    }                                                \
  } while (0)

// The m16n8 mapping the sm90a kernels assume for a 64-row wgmma accumulator (or register A operand) of `cols` columns
// (warpgroups.cuh, as_m16n8): thread t holds rows 16 (t / 32) + (t % 32) / 4 + 8 half, columns 8 nt + 2 (t % 4) + e, at
// flat index e + 2 half + 4 nt.
template <class Fragment>
void check_m16n8(const Fragment& f, int t, int cols, const char* what) {
  using cute::get;
  EXPECT(cute::size(f) == cols / 2, "%s: %d values a thread, expected %d\n", what, int(cute::size(f)), cols / 2);
  for (int i = 0; i < cute::size(f); ++i) {
    const int e = i % 2, half = (i / 2) % 2, nt = i / 4;
    const int row = 16 * (t / 32) + (t % 32) / 4 + 8 * half, col = 8 * nt + 2 * (t % 4) + e;
    const auto c = f(i);
    EXPECT(get<0>(c) == row && get<1>(c) == col, "%s: thread %d element %d is (%d, %d), expected (%d, %d)\n", what, t,
           i, int(get<0>(c)), int(get<1>(c)), row, col);
  }
}
