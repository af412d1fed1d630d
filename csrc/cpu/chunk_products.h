// chunk_products.h: the CPU forward's two products over one chunk of kKeyChunk keys (varlen_fwd_cpu_kernel.cpp):
// Q . K over the chunk's K rows, transposed in registers as they are read (transpose_keys, qk_chunk), and P . V over
// its V rows read in place (pv_chunk); each compiled once per storage type of K and V (with_dtype).
#pragma once

#include <cstdint>
#include <type_traits>

#include "../varlen_fwd_params.h"
#include "elements.h"
#include "varlen_fwd_cpu_kernel.h"
#include "vec8.h"

namespace dmattn::cpu {

// raw[r * kKeyChunk + c] = q_r . k_c for R rows from q (raw's rows likewise) and chunk keys [0, cn_pad), cn_pad % 16
// == 0. kt: the chunk's keys transposed, kt[d * kKeyChunk + c]. R rows x 16 keys a step: each K element loaded
// serves every row, and four rows keep eight independent accumulators, enough to cover the FMA latency.
template <int R>
__attribute__((always_inline)) inline void qk_rows(const float* q, int64_t D, const float* kt, int64_t cn_pad,
                                                   float* raw) {
  for (int64_t c = 0; c < cn_pad; c += 16) {
    v8f a[R][2] = {};
    for (int64_t d = 0; d < D; ++d) {
      const v8f k0 = load8(kt + d * kKeyChunk + c), k1 = load8(kt + d * kKeyChunk + c + 8);
      for (int r = 0; r < R; ++r) {
        const float x = q[r * D + d];
        a[r][0] += x * k0;
        a[r][1] += x * k1;
      }
    }
    for (int r = 0; r < R; ++r) {
      store8(raw + r * kKeyChunk + c, a[r][0]);
      store8(raw + r * kKeyChunk + c + 8, a[r][1]);
    }
  }
}

// qk_rows over all rows: four at a time, then a pair, then one.
__attribute__((always_inline)) inline void qk_chunk(const float* q, int64_t rows, int64_t D, const float* kt,
                                                    int64_t cn_pad, float* raw) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) qk_rows<4>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
  if (r + 2 <= rows) {
    qk_rows<2>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
    r += 2;
  }
  if (r < rows) qk_rows<1>(q + r * D, D, kt, cn_pad, raw + r * kKeyChunk);
}

#if defined(__clang__)
#define DMATTN_SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define DMATTN_SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, v8i{__VA_ARGS__})
#endif

// kt[d * kKeyChunk + c] = K[row[c] + d] as float32, for every d < D and keys c < cn_pad (0 for the padding keys from
// cn on): the chunk's K rows, read where they lie (row: each key's first element) and transposed. Eight keys by eight
// columns a step through an in-register transpose (interleave pairs of rows, then pairs of pairs, then swap 128-bit
// halves: AVX's unpack / shuffle / lane-permute ladder), so a key's columns go out as whole vectors, not one
// scattered float each, and a 16-bit K is converted on the way (no float32 copy of its rows); the leftover keys and
// columns element by element.
template <ScalarType kDtype>
__attribute__((always_inline)) inline void transpose_keys(const void* k, const int64_t* row, int64_t cn,
                                                          int64_t cn_pad, int64_t D, float* kt) {
  const int64_t D8 = D / 8 * 8;
  int64_t c = 0;
  for (; c + 8 <= cn; c += 8) {
    for (int64_t d = 0; d < D8; d += 8) {
      v8f t[8], u[8];
      for (int i = 0; i < 8; i += 2) {  // t[i]: rows i, i + 1 interleaved, columns 0 1 | 4 5; t[i + 1]: 2 3 | 6 7
        const v8f a = load8_as_float(k, row[c + i] + d, kDtype), b = load8_as_float(k, row[c + i + 1] + d, kDtype);
        t[i] = DMATTN_SHUFFLE8(a, b, 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = DMATTN_SHUFFLE8(a, b, 2, 10, 3, 11, 6, 14, 7, 15);
      }
      for (int half = 0; half < 8; half += 4) {  // u[half + j]: column j | j + 4 of rows half .. half + 3
        u[half + 0] = DMATTN_SHUFFLE8(t[half], t[half + 2], 0, 1, 8, 9, 4, 5, 12, 13);
        u[half + 1] = DMATTN_SHUFFLE8(t[half], t[half + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        u[half + 2] = DMATTN_SHUFFLE8(t[half + 1], t[half + 3], 0, 1, 8, 9, 4, 5, 12, 13);
        u[half + 3] = DMATTN_SHUFFLE8(t[half + 1], t[half + 3], 2, 3, 10, 11, 6, 7, 14, 15);
      }
      for (int j = 0; j < 4; ++j) {
        store8(kt + (d + j) * kKeyChunk + c, DMATTN_SHUFFLE8(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11));
        store8(kt + (d + j + 4) * kKeyChunk + c, DMATTN_SHUFFLE8(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15));
      }
    }
    for (int64_t d = D8; d < D; ++d) {
      for (int64_t i = 0; i < 8; ++i) kt[d * kKeyChunk + c + i] = load_scalar(k, row[c + i] + d, kDtype);
    }
  }
  for (; c < cn_pad; ++c) {
    for (int64_t d = 0; d < D; ++d) kt[d * kKeyChunk + c] = c < cn ? load_scalar(k, row[c] + d, kDtype) : 0.f;
  }
}
#undef DMATTN_SHUFFLE8

// acc[r * D + d] += sum_c w[r * kKeyChunk + c] * V[row[c] + d] for R rows (w's and acc's rows from the pointers
// given) and columns [d0, d0 + C) over one chunk of cn keys, V read where it lies and converted to float32 on the way.
// R x C / 8 accumulators stay in registers (eight for four rows x 16 columns, two rows x 32), and each V element
// loaded serves all R rows. The chunk's sum is formed apart and then added to acc, which bounds float32 rounding
// growth over long sequences. A weight of exactly 0 (a key the row may not attend, or one whose weight underflows)
// adds nothing, not 0 * V: a NaN or inf in the V row of a key hidden from this row but visible to another row of the
// item never reaches it.
template <ScalarType kDtype, int R, int C>
__attribute__((always_inline)) inline void pv_columns(const float* w, const void* v, const int64_t* row, int64_t cn,
                                                      int64_t D, int64_t d0, float* acc) {
  v8f a[R][C / 8] = {};
  for (int64_t c = 0; c < cn; ++c) {
    float x[R];
    bool all = true, any = false;
    for (int r = 0; r < R; ++r) {
      x[r] = w[r * kKeyChunk + c];
      all = all && x[r] != 0.f;
      any = any || x[r] != 0.f;
    }
    if (!any) continue;
    v8f vv[C / 8];
    for (int i = 0; i < C / 8; ++i) vv[i] = load8_as_float(v, row[c] + d0 + 8 * i, kDtype);
    for (int r = 0; r < R; ++r) {
      if (!all && x[r] == 0.f) continue;
      for (int i = 0; i < C / 8; ++i) a[r][i] += x[r] * vv[i];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int i = 0; i < C / 8; ++i) add_store8(acc + r * D + d0 + 8 * i, a[r][i]);
  }
}

// pv_columns over R rows and every column: C at a time, then eight, then the columns past the last eight one scalar
// sum per row and column over the chunk's keys, in float64 (a D = 1 call is all tail: a float32 sum of 128 products in
// a row lost ~8 ulps of a 1100-key mean where PyTorch's vectorized dot product lost under one, tests/test_fuzz.py),
// rounded once into acc.
template <ScalarType kDtype, int R, int C>
__attribute__((always_inline)) inline void pv_rows(const float* w, const void* v, const int64_t* row, int64_t cn,
                                                   int64_t D, float* acc) {
  int64_t d = 0;
  for (; d + C <= D; d += C) pv_columns<kDtype, R, C>(w, v, row, cn, D, d, acc);
  for (; d + 8 <= D; d += 8) pv_columns<kDtype, R, 8>(w, v, row, cn, D, d, acc);
  for (; d < D; ++d) {
    for (int r = 0; r < R; ++r) {
      double sum = 0.0;
      for (int64_t c = 0; c < cn; ++c) {
        const float x = w[r * kKeyChunk + c];
        if (x != 0.f) sum += static_cast<double>(x) * load_scalar(v, row[c] + d, kDtype);
      }
      acc[r * D + d] = static_cast<float>(acc[r * D + d] + sum);
    }
  }
}

// The chunk's P . V for every row of the item: four rows at a time, then a pair, then one.
template <ScalarType kDtype>
__attribute__((always_inline)) inline void pv_chunk(const float* w, int64_t rows, int64_t D, const void* v,
                                                    const int64_t* row, int64_t cn, float* acc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<kDtype, 4, 16>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
  if (r + 2 <= rows) {
    pv_rows<kDtype, 2, 32>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
    r += 2;
  }
  if (r < rows) pv_rows<kDtype, 1, 32>(w + r * kKeyChunk, v, row, cn, D, acc + r * D);
}

// f(std::integral_constant<ScalarType, dtype>{}): the K / V reading loops compiled once per storage type, so that the
// type is not asked again for every eight elements.
template <typename F>
__attribute__((always_inline)) inline void with_dtype(ScalarType dtype, F&& f) {
  switch (dtype) {
    case ScalarType::kFloat32: f(std::integral_constant<ScalarType, ScalarType::kFloat32>{}); break;
    case ScalarType::kFloat16: f(std::integral_constant<ScalarType, ScalarType::kFloat16>{}); break;
    case ScalarType::kBFloat16: f(std::integral_constant<ScalarType, ScalarType::kBFloat16>{}); break;
  }
}

}  // namespace dmattn::cpu
