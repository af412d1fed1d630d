// packed_rows.cpp: the checks of the mask_mod adapter's passes (both backends) and their CPU kernels
// (csrc/packed_rows.h). The CUDA kernels: csrc/cuda/packed_rows.cu.
#include "packed_rows_op.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "packed_rows.h"

namespace dmattn {

void check_packed_rows_args(const at::Tensor& cu, const at::Tensor& other, int64_t total) {
  constexpr const char* kOp = "dmattn.packed_rows: ";
  const auto check = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 1 && t.size(0) >= 2, kOp, name, " must be a (B + 1,) tensor with B >= 1, got shape ",
                t.sizes());
    TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, kOp, name,
                " must be int32 or int64, got ", t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), kOp, name, " must be contiguous");
  };
  check("cu_seqlens", cu);
  check("cu_seqlens_other", other);
  TORCH_CHECK(cu.size(0) == other.size(0), kOp, "cu_seqlens and cu_seqlens_other must have the same length B + 1, got ",
              cu.size(0), " and ", other.size(0));
  TORCH_CHECK(cu.device() == other.device(), kOp, "cu_seqlens and cu_seqlens_other must be on one device, got ",
              cu.device(), " and ", other.device());
  TORCH_CHECK(total >= 0, kOp, "total must be >= 0, got ", total);
}

void check_zero_unseen_args(const at::Tensor& grid, const at::Tensor& counts) {
  constexpr const char* kOp = "dmattn.zero_unseen_: ";
  TORCH_CHECK(grid.dim() == 3, kOp, "grid must be a 3-d (rows, heads, width) tensor, got shape ", grid.sizes());
  TORCH_CHECK(grid.is_contiguous(), kOp, "grid must be contiguous");
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == grid.size(0), kOp, "counts must be a (", grid.size(0),
              ",) tensor, one count per row of grid, got shape ", counts.sizes());
  TORCH_CHECK(counts.scalar_type() == at::kLong, kOp, "counts must be int64, got ", counts.scalar_type());
  TORCH_CHECK(counts.is_contiguous(), kOp, "counts must be contiguous");
  TORCH_CHECK(counts.device() == grid.device(), kOp, "grid and counts must be on one device, got ", grid.device(),
              " and ", counts.device());
}

namespace {

template <typename Index, typename Other>
void compute(const Index* cu, const Other* other, int64_t batch, int64_t total, int64_t* rows, int64_t* anchor) {
  int64_t best = 0, best_score = anchor_score(cu, other, 0);
  for (int64_t b = 1; b < batch; ++b) {
    const int64_t score = anchor_score(cu, other, b);
    if (score > best_score) best = b, best_score = score;  // the first of equal maxima stays
  }
  anchor[0] = best;
  anchor[1] = 0;
  // Rows in parallel: a key-side build has one per cached key (337k rows of a decode-like batch: 5.1 ms on one
  // thread, 1.2 ms on two, where the tensor ops it replaces took 7.1 and 3.5; this project's 2-core VM).
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) write_row(row_facts(cu, other, batch, i), best, total, i, rows);
  });
}

std::tuple<at::Tensor, at::Tensor> packed_rows_cpu(const at::Tensor& cu, const at::Tensor& other, int64_t total) {
  check_packed_rows_args(cu, other, total);
  auto rows = at::empty({4, total}, cu.options().dtype(at::kLong));
  auto anchor = at::empty({2}, cu.options().dtype(at::kLong));
  const int64_t batch = cu.size(0) - 1;
  int64_t* r = rows.data_ptr<int64_t>();
  int64_t* a = anchor.data_ptr<int64_t>();
  const bool cu64 = cu.scalar_type() == at::kLong, other64 = other.scalar_type() == at::kLong;
  if (cu64 && other64) compute(cu.data_ptr<int64_t>(), other.data_ptr<int64_t>(), batch, total, r, a);
  if (cu64 && !other64) compute(cu.data_ptr<int64_t>(), other.data_ptr<int32_t>(), batch, total, r, a);
  if (!cu64 && other64) compute(cu.data_ptr<int32_t>(), other.data_ptr<int64_t>(), batch, total, r, a);
  if (!cu64 && !other64) compute(cu.data_ptr<int32_t>(), other.data_ptr<int32_t>(), batch, total, r, a);
  return {rows, anchor};
}

void zero_unseen_cpu(const at::Tensor& grid, const at::Tensor& counts) {
  check_zero_unseen_args(grid, counts);
  const int64_t heads = grid.size(1), width = grid.size(2), element = grid.element_size();
  auto* bytes = static_cast<char*>(grid.data_ptr());
  const int64_t* count = counts.data_ptr<int64_t>();
  // A row's unseen entries are one run of bytes per head: zeroed by memset, rows in parallel.
  at::parallel_for(0, grid.size(0), 256, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t kept = kept_entries(count[r], width);
      if (kept == width) continue;
      for (int64_t h = 0; h < heads; ++h) {
        std::memset(bytes + ((r * heads + h) * width + kept) * element, 0,
                    static_cast<size_t>((width - kept) * element));
      }
    }
  });
}

}  // namespace
}  // namespace dmattn

TORCH_LIBRARY_IMPL(dmattn, CPU, m) {
  m.impl("packed_rows", &dmattn::packed_rows_cpu);
  m.impl("zero_unseen_", &dmattn::zero_unseen_cpu);
}
