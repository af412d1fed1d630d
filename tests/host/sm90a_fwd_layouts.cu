// sm90a_fwd_layouts.cu: host-side checks of the sm90a forward's layouts (csrc/cuda/sm90a/kernel_traits.h) at every
// tile the kernels are built with, the wide ones (heuristics.h sm90a_wide_keys) included, which
// tests/test_sm90a_layouts.py compiles with nvcc and runs on the CPU: V^T (the same bytes as V), the S accumulator, the
// P operand of P V and the O accumulator as the m16n8 mapping fwd_kernel.cuh indexes them by (as_m16n8; P is S rounded
// in its own flat order), and the shared memory of the kernels each tile runs.
// Prints "ok", or the first mismatches and "FAILED: <count>" (exit status 1).
#include <cstdio>

#include "cuda/sm90a/kernel_traits.h"
#include "layout_check.h"

using namespace cute;

// The shared memory of the kernel variants a tile runs in (launch.cuh's static_assert checks the same at build time).
template <class Tr, int kQBuffers, bool kQuery = false, bool kQueryBias = false, bool kBias32 = false>
void check_smem(const char* what) {
  constexpr int bytes = Tr::template kSmemBytes<kQBuffers, kQuery, kQueryBias, kBias32>;
  EXPECT(bytes <= 227 * 1024, "%s (D = %d, %d keys): %d bytes of shared memory\n", what, Tr::kHeadDim, Tr::kBlockN,
         bytes);
}

template <class Elem, int kHeadDim, int kBlockN>
void check() {
  using Tr = dmattn::cuda::sm90a::FwdTraits<Elem, kHeadDim, kBlockN>;
  constexpr int N = Tr::kBlockN, D = Tr::kHeadDim;
  // V^T: the same element as V for every coordinate (layout values before the swizzle, which the address gets the
  // same way for both).
  typename Tr::SmemLayoutKV kv;
  typename Tr::SmemLayoutVt vt;
  for (int s = 0; s < Tr::kStages; ++s)
    for (int key = 0; key < N; ++key)
      for (int d = 0; d < D; ++d) EXPECT(vt(d, key, s) == kv(key, d, s), "V^T (%d, %d, %d), %d keys\n", d, key, s, N);
  // The fragments, thread by thread of a warpgroup (that S is one wgmma across the tile's keys, the traits'
  // static_assert holds wherever this compiles).
  typename Tr::MmaQK qk;
  typename Tr::MmaPV pv;
  char s_what[64], p_what[64], o_what[64];
  std::snprintf(s_what, sizeof s_what, "S accumulator (D = %d, %d keys)", D, N);
  std::snprintf(p_what, sizeof p_what, "P operand (D = %d, %d keys)", D, N);
  std::snprintf(o_what, sizeof o_what, "O accumulator (D = %d, %d keys)", D, N);
  for (int t = 0; t < 128; ++t) {
    check_m16n8(qk.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<N>>{})), t, N, s_what);
    check_m16n8(pv.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, Int<N>>{})), t, N, p_what);
    check_m16n8(pv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<D>>{})), t, D, o_what);
  }
  // A CTA per unit (one Q buffer) with or without query-side operands where the tile can list them; persistent with
  // the tile's Q buffers.
  check_smem<Tr, 1>("a CTA per unit");
  check_smem<Tr, Tr::kPersistentQBuffers>("persistent");
  if constexpr (Tr::kListable) {
    check_smem<Tr, 1, true>("query-side mask, a CTA per unit");
    check_smem<Tr, Tr::template kQBuffers<true, true>, true, true>("query-side bias, persistent");
  }
  std::printf("D = %d, %d keys: shared memory %d bytes a CTA per unit, %d persistent\n", D, N,
              int(Tr::template kSmemBytes<1>), int(Tr::template kSmemBytes<Tr::kPersistentQBuffers>));
}

template <class Elem>
void check_every_tile() {
  using dmattn::cuda::sm90a_wide_keys;
  using dmattn::cuda::tile_shape_sm90a;
  check<Elem, 64, tile_shape_sm90a(64).block_n>();
  check<Elem, 128, tile_shape_sm90a(128).block_n>();
  check<Elem, 256, tile_shape_sm90a(256).block_n>();
  check<Elem, 64, sm90a_wide_keys(64)>();
}

int main() {
  check_every_tile<__nv_bfloat16>();
  check_every_tile<__half>();
  std::printf(failures ? "FAILED: %d\n" : "ok\n", failures);
  return failures != 0;
}
