// sm90a_bwd_layouts.cu: host-side checks of the sm90a backward's layouts (csrc/cuda/sm90a/bwd_kernel.cuh), which
// tests/test_sm90a_layouts.py compiles with nvcc and runs on the CPU: the transposed shared-memory views (the same
// bytes as the tiles they view), the 16-byte chunks and column pairs the kernel writes with plain stores, the
// accumulator and register-operand fragments as the m16n8 mapping the kernel indexes them by, and the shared-memory
// size. Prints "ok", or the first mismatches and "FAILED: <count>" (exit status 1).
#include <cstdio>

#include "cuda/sm90a/bwd_traits.h"
#include "layout_check.h"

using namespace cute;

template <class Elem, int kHeadDim>
void check() {
  using Tr = dmattn::cuda::sm90a::BwdTraits<Elem, kHeadDim>;
  constexpr int M = Tr::kBlockM, N = Tr::kBlockN, D = Tr::kHeadDim;
  // Transposed views: the same element for every coordinate (layout values before the swizzle, which the address
  // gets the same way for both).
  typename Tr::SmemLayoutKV kv;
  typename Tr::SmemLayoutKt kt;
  for (int key = 0; key < N; ++key)
    for (int d = 0; d < D; ++d) EXPECT(kt(d, key) == kv(key, d), "K^T (%d, %d)\n", d, key);
  typename Tr::SmemLayoutQ q;
  typename Tr::SmemLayoutQt qt;
  for (int s = 0; s < Tr::kStages; ++s)
    for (int r = 0; r < M; ++r)
      for (int d = 0; d < D; ++d) EXPECT(qt(d, r, s) == q(r, d, s), "Q^T (%d, %d, %d)\n", d, r, s);
  typename Tr::SmemLayoutDst dst;
  typename Tr::SmemLayoutDs ds;
  for (int b = 0; b < 2; ++b)
    for (int key = 0; key < N; ++key)
      for (int r = 0; r < M; ++r) EXPECT(ds(r, key, b) == dst(key, r, b), "dS (%d, %d, %d)\n", r, key, b);
  // Fragments, thread by thread of a warpgroup.
  typename Tr::MmaSdP sdp;
  typename Tr::MmaDkv dkv;
  typename Tr::MmaDq dq;
  for (int t = 0; t < 128; ++t) {
    check_m16n8(sdp.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<M>>{})), t, M,
                "S^T accumulator");
    check_m16n8(dkv.get_thread_slice(t).partition_C(make_identity_tensor(Shape<_64, Int<D>>{})), t, D,
                "dV accumulator");
    check_m16n8(dq.get_thread_slice(t).partition_C(make_identity_tensor(Shape<Int<M>, Int<Tr::kDqCols>>{})), t,
                Tr::kDqCols, "dQ accumulator");
    // The register A operand of dV / dK (64 keys x M queries) holds P^T / dS^T in the accumulator's own order.
    check_m16n8(dkv.get_thread_slice(t).partition_A(make_identity_tensor(Shape<_64, Int<M>>{})), t, M,
                "P^T operand");
  }
  // Addresses through tensors over 1024-byte-aligned buffers, as in the kernel (the swizzle acts on the address, not
  // on the layout's value).
  using E = typename Tr::CuteElem;
  alignas(1024) static E k_tile[cosize_v<typename Tr::SmemLayoutKV>];
  alignas(1024) static E q_tile[cosize_v<typename Tr::SmemLayoutQ>];
  alignas(1024) static E ds_tile[cosize_v<typename Tr::SmemLayoutDst>];
  Tensor sK = make_tensor(make_smem_ptr(&k_tile[0]), kv);
  Tensor sKt = make_tensor(make_smem_ptr(&k_tile[0]), kt);
  Tensor sQ = make_tensor(make_smem_ptr(&q_tile[0]), q);
  Tensor sdSt = make_tensor(make_smem_ptr(&ds_tile[0]), dst);
  Tensor sdS = make_tensor(make_smem_ptr(&ds_tile[0]), ds);
  // The 16-byte chunks of 8 elements the gather copies and the row zeroing clears are contiguous, and so are the
  // column pairs of dS^T its 32-bit stores write.
  for (int key = 0; key < N; ++key)
    for (int d = 0; d < D; d += 8)
      for (int j = 1; j < 8; ++j) EXPECT(&sK(key, d + j) == &sK(key, d) + j, "K chunk (%d, %d)\n", key, d);
  for (int s = 0; s < Tr::kStages; ++s)
    for (int r = 0; r < M; ++r)
      for (int d = 0; d < D; d += 8)
        for (int j = 1; j < 8; ++j) EXPECT(&sQ(r, d + j, s) == &sQ(r, d, s) + j, "Q chunk (%d, %d, %d)\n", r, d, s);
  for (int b = 0; b < 2; ++b)
    for (int key = 0; key < N; ++key)
      for (int r = 0; r < M; r += 2) {
        EXPECT(&sdSt(key, r + 1, b) == &sdSt(key, r, b) + 1, "dS^T pair (%d, %d)\n", key, r);
      }
  // dQ's operands as the kernel tiles them: warpgroup cw's K^T is its own half of D over every key (D = 128) or all
  // of D over its own 64 keys (D = 64), and its dS those keys' rows of dS^T.
  for (int cw = 0; cw < 2; ++cw) {
    Tensor k_part = local_tile(sKt, Shape<Int<Tr::kDqCols>, Int<Tr::kDqKeys>>{},
                               make_coord(Tr::kDqSplitsD ? cw : 0, Tr::kDqSplitsD ? 0 : cw));
    Tensor ds_part =
        local_tile(sdS, Shape<Int<M>, Int<Tr::kDqKeys>, _2>{}, make_coord(_0{}, Tr::kDqSplitsD ? 0 : cw, _0{}));
    const int d0 = Tr::kDqSplitsD ? cw * Tr::kDqCols : 0, key0 = Tr::kDqSplitsD ? 0 : cw * 64;
    for (int key = 0; key < Tr::kDqKeys; ++key) {
      for (int d = 0; d < Tr::kDqCols; ++d) {
        EXPECT(&k_part(d, key) == &sK(key0 + key, d0 + d), "dQ part %d of K^T at (%d, %d)\n", cw, d, key);
      }
      for (int b = 0; b < 2; ++b)
        for (int r = 0; r < M; ++r)
          EXPECT(&ds_part(r, key, b) == &sdSt(key0 + key, r, b), "dQ part %d of dS at (%d, %d, %d)\n", cw, r, key, b);
    }
  }
  EXPECT(Tr::kSmemBytes <= 227 * 1024, "shared memory %d bytes\n", Tr::kSmemBytes);
  std::printf("D = %d: shared memory %d bytes\n", D, Tr::kSmemBytes);
}

int main() {
  check<__nv_bfloat16, 64>();
  check<__nv_bfloat16, 128>();
  check<__half, 64>();
  check<__half, 128>();
  std::printf(failures ? "FAILED: %d\n" : "ok\n", failures);
  return failures != 0;
}
