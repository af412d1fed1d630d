// tensors_to_params.cpp: the one place where tensors become a VarlenFwdParams.
#include "tensors_to_params.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <string>

#include "env_choice.h"

namespace dmattn {
namespace {

constexpr const char* kOp = "dmattn.varlen_fwd: ";

// Messages read exactly as meta/rules.py writes them (tests/test_errors.py holds the two to one text): dtypes by
// their torch names, sizes and strides as Python tuples, floats in Python's shortest round-trip form.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

std::string tuple_str(at::IntArrayRef values) {
  std::string s = "(";
  for (size_t i = 0; i < values.size(); ++i) s += (i ? ", " : "") + std::to_string(values[i]);
  return s + (values.size() == 1 ? ",)" : ")");
}

std::string float_str(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  char buf[32];
  std::string s(buf, std::to_chars(buf, buf + sizeof(buf), x).ptr);
  // Python's repr of a float: an integral value keeps its ".0" (-1.0), an exponent does not (1e+39).
  if (s.find_first_of(".e") == std::string::npos) s += ".0";
  return s;
}

ScalarType to_scalar_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return ScalarType::kFloat32;
    case at::kHalf: return ScalarType::kFloat16;
    case at::kBFloat16: return ScalarType::kBFloat16;
    default: TORCH_CHECK_TYPE(false, kOp, "q must be float32, float16 or bfloat16, got ", dtype_name(t));
  }
}

// Sizes the kernels keep in 32 bits (the int32_t fields of VarlenFwdParams, grid indices); `what` names the size.
template <typename... What>
void check_int32(int64_t size, const What&... what) {
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  TORCH_CHECK_VALUE(size <= kMax, kOp, what..., " must be at most ", kMax, " (the kernels keep it in 32 bits), got ",
                    size);
}

void check_device(const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_VALUE(t.device() == q.device(), kOp, name, " must be on q's device ", q.device(), ", got ", t.device());
}

// Checks the rank, rows, head count and (query-side) width of a mask or bias; returns its layout.
OperandLayout check_operand(const char* name, const at::Tensor& t, const VarlenFwdArgs& a) {
  const int64_t H = a.q.size(1), Hk = a.k.size(1);
  check_device(name, t, a.q);
  TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, kOp, name,
                    " must be key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k), got shape ",
                    tuple_str(t.sizes()));
  const bool key_side = t.dim() == 2;
  const int64_t rows = key_side ? a.k.size(0) : a.q.size(0);
  TORCH_CHECK_VALUE(t.size(0) == rows, kOp, name,
                    !key_side    ? " is query-side (rank 3), so it must have total_q = "
                    : a.kv_slots ? " is key-side (rank 2) with kv_slots, so it must have a row per slot of the pool, "
                                   "k.shape[0] = "
                                 : " is key-side (rank 2), so it must have total_k = ",
                    rows, " rows, got ", t.size(0));
  const int64_t hm = t.size(1);
  TORCH_CHECK_VALUE(hm == 1 || hm == Hk || hm == H, kOp, name, " head dim Hm must be 1, Hk = ", Hk, " or H = ", H,
                    ", got ", hm);
  if (!key_side) {
    TORCH_CHECK_VALUE(t.size(2) == a.max_seqlen_k, kOp, name, " is query-side, so its last dim must be max_seqlen_k = ",
                      a.max_seqlen_k, ", got ", t.size(2));
  }
  return key_side ? OperandLayout::kKeySide : OperandLayout::kQuerySide;
}

// The layout is told by rank alone: 2 is key-side, 3 is query-side (check_operand has checked the rank).
ScoreOperand make_operand(const at::Tensor& t, int64_t num_heads) {
  const int64_t hm = t.size(1);
  const OperandLayout layout = t.dim() == 2 ? OperandLayout::kKeySide : OperandLayout::kQuerySide;
  ScoreOperand op;
  op.ptr = t.data_ptr();
  op.layout = layout;
  op.dtype = t.scalar_type() == at::kBool ? ScalarType::kFloat32 : to_scalar_type(t.scalar_type());
  // H / Hm; with no query heads (H = 0, so Hm may be 0) no head reads the operand, and 1 keeps h / head_group defined.
  op.head_group = num_heads == 0 ? 1 : static_cast<int32_t>(num_heads / hm);
  op.row_stride = t.stride(0);
  op.head_stride = hm == 1 ? 0 : t.stride(1);
  op.col_stride = layout == OperandLayout::kQuerySide ? t.stride(2) : 0;
  return op;
}

}  // namespace

void check_args(const VarlenFwdArgs& a, c10::DeviceType device_type) {
  const at::Tensor& q = a.q;
  TORCH_CHECK_VALUE(q.device().type() == device_type, kOp, "q is on ", q.device(), ", expected ", device_type);
  const std::pair<const char*, const at::Tensor*> qkv[] = {{"q", &a.q}, {"k", &a.k}, {"v", &a.v}};
  for (auto [name, t] : qkv) {
    TORCH_CHECK_VALUE(t->dim() == 3, kOp, name, " must have shape (tokens, heads, head_dim), got shape ",
                      tuple_str(t->sizes()));
  }
  to_scalar_type(q.scalar_type());
  for (auto [name, t] : {qkv[1], qkv[2]}) {
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kOp, name, " must have q's dtype ",
                     dtype_name(q.scalar_type()), ", got ", dtype_name(t->scalar_type()));
    check_device(name, *t, q);
  }
  TORCH_CHECK_VALUE(a.k.sizes() == a.v.sizes(), kOp, "k and v must have the same shape (total_k, Hk, D), got ",
                    tuple_str(a.k.sizes()), " and ", tuple_str(a.v.sizes()));
  TORCH_CHECK_VALUE(q.size(2) == a.k.size(2), kOp, "q and k must have the same head_dim D, got ", q.size(2), " and ",
                    a.k.size(2));
  TORCH_CHECK_VALUE(q.size(2) >= 1, kOp, "head_dim D must be >= 1, got ", q.size(2));
  // Sizes before strides: an expanded tensor (stride 0) of a size past int32 gets the size error. Hm needs no check
  // of its own: it must be 1, Hk or H.
  check_int32(q.size(1), "the number of query heads H (q.shape[1])");
  check_int32(a.k.size(1), "the number of key/value heads Hk (k.shape[1])");
  check_int32(q.size(2), "head_dim D");
  TORCH_CHECK_VALUE(a.k.size(1) >= 1 && q.size(1) % a.k.size(1) == 0, kOp,
                    "the number of query heads H must be a multiple of the number of key/value heads Hk, got H = ",
                    q.size(1), ", Hk = ", a.k.size(1));
  for (auto [name, t] : qkv) {  // a head dim of 1 is read at element 0 only: any stride will do
    TORCH_CHECK_VALUE(t->size(2) <= 1 || t->stride(2) == 1, kOp, name,
                      " must have a contiguous head_dim (stride 1), got strides ", tuple_str(t->strides()));
  }
  for (auto [name, t] : {std::pair<const char*, const at::Tensor*>{"cu_seqlens_q", &a.cu_seqlens_q},
                         {"cu_seqlens_k", &a.cu_seqlens_k}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == at::kInt, kOp, name, " must be int32 (convert with .int()), got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) >= 1, kOp, name, " must have shape (B + 1,), got shape ",
                      tuple_str(t->sizes()));
    check_int32(t->size(0), "the length B + 1 of ", name);
    TORCH_CHECK_VALUE(t->size(0) == 1 || t->stride(0) == 1, kOp, name, " must be contiguous, got stride ",
                      t->stride(0));  // a single entry is read at element 0 only
    check_device(name, *t, q);
  }
  TORCH_CHECK_VALUE(a.cu_seqlens_q.size(0) == a.cu_seqlens_k.size(0), kOp,
                    "cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got ", a.cu_seqlens_q.size(0),
                    " and ", a.cu_seqlens_k.size(0));
  TORCH_CHECK_VALUE(a.max_seqlen_q >= 0, kOp, "max_seqlen_q must be >= 0, got ", a.max_seqlen_q);
  TORCH_CHECK_VALUE(a.max_seqlen_k >= 0, kOp, "max_seqlen_k must be >= 0, got ", a.max_seqlen_k);
  if (a.mask) {
    TORCH_CHECK_TYPE(a.mask->scalar_type() == at::kBool, kOp, "mask must be bool (True = attend), got ",
                     dtype_name(a.mask->scalar_type()));
    check_operand("mask", *a.mask, a);
  }
  if (a.bias) {
    const auto bt = a.bias->scalar_type();
    TORCH_CHECK_TYPE(bt == at::kFloat || bt == q.scalar_type(), kOp, "bias must be float32 or q's dtype ",
                     dtype_name(q.scalar_type()), ", got ", dtype_name(bt));
    check_operand("bias", *a.bias, a);
  }
  if (a.softmax_scale) {
    // The kernels use it as float32 (IEEE conversion: a double past float32's range becomes inf).
    TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(*a.softmax_scale)), kOp,
                      "softmax_scale must be finite in float32 (the kernels use it as float32), got ",
                      float_str(*a.softmax_scale));
  }
  TORCH_CHECK_VALUE(a.window_left >= -1, kOp, "window_left must be >= -1 (-1: no limit), got ", a.window_left);
  TORCH_CHECK_VALUE(a.window_right >= -1, kOp, "window_right must be >= -1 (-1: no limit), got ", a.window_right);
  TORCH_CHECK_VALUE(std::isfinite(static_cast<float>(a.softcap)) && a.softcap >= 0, kOp,
                    "softcap must be >= 0 and finite in float32 (0: no softcap), got ", float_str(a.softcap));
  if (a.sinks) {
    const at::Tensor& t = *a.sinks;
    const auto st = t.scalar_type();
    TORCH_CHECK_TYPE(st == at::kFloat || st == q.scalar_type(), kOp, "sinks must be float32 or q's dtype ",
                     dtype_name(q.scalar_type()), ", got ", dtype_name(st));
    check_device("sinks", t, q);
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == q.size(1), kOp, "sinks must have shape (H,) = (", q.size(1),
                      ",), got shape ", tuple_str(t.sizes()));
  }
  if (a.seqused_k) {
    const at::Tensor& t = *a.seqused_k;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOp, "seqused_k must be int32 (convert with .int()), got ",
                     dtype_name(t.scalar_type()));
    check_device("seqused_k", t, q);
    const int64_t batch = a.cu_seqlens_k.size(0) - 1;
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == batch, kOp, "seqused_k must have shape (B,) = (", batch,
                      ",), got shape ", tuple_str(t.sizes()));
    TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) == 1, kOp, "seqused_k must be contiguous, got stride ",
                      t.stride(0));
  }
  if (a.kv_slots) {
    const at::Tensor& t = *a.kv_slots;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOp, "kv_slots must be int32 (convert with .int()), got ",
                     dtype_name(t.scalar_type()));
    check_device("kv_slots", t, q);
    TORCH_CHECK_VALUE(t.dim() == 1, kOp, "kv_slots must have shape (total_k,), got shape ", tuple_str(t.sizes()));
    TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) == 1, kOp, "kv_slots must be contiguous, got stride ",
                      t.stride(0));
    TORCH_CHECK_VALUE(a.k.size(0) > 0 || t.size(0) == 0, kOp,
                      "kv_slots must be empty when the key pool is (k.shape[0] = 0), got shape ", tuple_str(t.sizes()));
    check_int32(a.k.size(0), "the rows of the key pool (k.shape[0] with kv_slots)");
  }
  if (a.key_range) {
    const at::Tensor& t = *a.key_range;
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, kOp, "key_range must be int32 (convert with .int()), got ",
                     dtype_name(t.scalar_type()));
    check_device("key_range", t, q);
    TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == q.size(0) && t.size(1) == 2, kOp,
                      "key_range must have shape (total_q, 2) = (", q.size(0), ", 2), got shape ",
                      tuple_str(t.sizes()));
    TORCH_CHECK_VALUE(t.is_contiguous(), kOp, "key_range must be contiguous, got strides ", tuple_str(t.strides()));
  }
}

void check_bwd_args(const VarlenFwdArgs& a, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out,
                    const at::Tensor& lse) {
  constexpr const char* kBwd = "dmattn.varlen_bwd: ";
  const at::Tensor& q = a.q;
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"dout", &dout}, {"out", &out}}) {
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), kBwd, name, " must have q's shape ", tuple_str(q.sizes()), ", got ",
                      tuple_str(t->sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), kBwd, name, " must have q's dtype ",
                     dtype_name(q.scalar_type()), ", got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == q.device(), kBwd, name, " must be on q's device ", q.device(), ", got ",
                      t->device());
  }
  const std::vector<int64_t> lse_shape{q.size(1), q.size(0)};
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"softmax_lse", &lse}, {"dsoftmax_lse", &dlse}}) {
    if (t == &dlse && dlse.numel() == 0) continue;  // no gradient through softmax_lse
    TORCH_CHECK_VALUE(t->sizes() == at::IntArrayRef(lse_shape), kBwd, name, " must have shape (H, total_q) = ",
                      tuple_str(lse_shape), ", got ", tuple_str(t->sizes()));
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, kBwd, name, " must be float32, got ",
                     dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->device() == q.device(), kBwd, name, " must be on q's device ", q.device(), ", got ",
                      t->device());
  }
}

double resolve_softmax_scale(std::optional<double> softmax_scale, int64_t head_dim) {
  return softmax_scale ? *softmax_scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(head_dim, 1)));
}

at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  const std::string fill = env_choice("dmattn: ", "DMATTN_FILL_UNINITIALIZED", {"off", "nan", "large"});
  if (fill != "off" && t.numel() > 0) {
    // every byte the same, whatever the dtype (at::empty is contiguous): 0xFF reads as NaN in every float format and
    // -1 in every integer; 0x7F as 3.4e38 in float32 and bfloat16 (NaN in float16) and 2.1e9 in int32
    t.view({-1}).view(at::kByte).fill_(fill == "nan" ? 0xFF : 0x7F);
  }
  return t;
}

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const VarlenFwdArgs& a) {
  at::Tensor out = uninitialized({a.q.size(0), a.q.size(1), a.q.size(2)}, a.q.options());
  at::Tensor lse = uninitialized({a.q.size(1), a.q.size(0)}, a.q.options().dtype(at::kFloat));
  return {out, lse};
}

VarlenFwdParams make_params(const VarlenFwdArgs& a, at::Tensor& out, at::Tensor& lse) {
  VarlenFwdParams p;
  p.q = a.q.data_ptr();
  p.k = a.k.data_ptr();
  p.v = a.v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.cu_seqlens_q = a.cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = a.cu_seqlens_k.data_ptr<int32_t>();
  p.dtype = to_scalar_type(a.q.scalar_type());
  p.q_row_stride = a.q.stride(0);
  p.q_head_stride = a.q.stride(1);
  p.k_row_stride = a.k.stride(0);
  p.k_head_stride = a.k.stride(1);
  p.v_row_stride = a.v.stride(0);
  p.v_head_stride = a.v.stride(1);
  p.out_row_stride = out.stride(0);
  p.out_head_stride = out.stride(1);
  p.batch = static_cast<int32_t>(a.cu_seqlens_q.size(0) - 1);
  p.num_heads = static_cast<int32_t>(a.q.size(1));
  p.num_heads_k = static_cast<int32_t>(a.k.size(1));
  p.head_dim = static_cast<int32_t>(a.q.size(2));
  p.total_q = a.q.size(0);
  p.total_k = a.kv_slots ? a.kv_slots->size(0) : a.k.size(0);  // packed key rows, as cu_seqlens_k counts them
  p.pool_rows = a.k.size(0);
  // No sequence is longer than its total, so this is exact, and it sizes the CUDA grid by the rows that exist
  // (max_seqlen_q = 2^62 would be an impossible launch).
  p.max_seqlen_q = std::min(a.max_seqlen_q, p.total_q);
  p.max_seqlen_k = std::min(a.max_seqlen_k, p.total_k);
  p.softmax_scale = static_cast<float>(resolve_softmax_scale(a.softmax_scale, a.q.size(2)));
  // A limit no query of any sequence reaches is no limit: window_left >= max_seqlen_k keeps key 0 in every query's
  // reach, window_right >= max_seqlen_q the last key. So the kernels' positions stay 32-bit.
  p.window_left = a.window_left >= p.max_seqlen_k ? -1 : a.window_left;
  p.window_right = a.is_causal ? 0 : a.window_right >= p.max_seqlen_q ? -1 : a.window_right;
  p.softcap = static_cast<float>(a.softcap);
  p.softcap_log2e2 = a.softcap > 0 ? static_cast<float>(2.0 / std::log(2.0) / a.softcap) : 0.f;
  if (a.sinks) {
    TORCH_CHECK(a.sinks->scalar_type() == at::kFloat && a.sinks->is_contiguous(), kOp,
                "internal: make_params needs float32 contiguous sinks (sinks_as_float32)");
    p.sinks = a.sinks->data_ptr<float>();
  }
  if (a.seqused_k) p.seqused_k = a.seqused_k->data_ptr<int32_t>();
  if (a.kv_slots) p.kv_slots = a.kv_slots->data_ptr<int32_t>();
  if (a.key_range) p.key_range = a.key_range->data_ptr<int32_t>();
  if (a.mask) p.mask = make_operand(*a.mask, p.num_heads);
  if (a.bias) p.bias = make_operand(*a.bias, p.num_heads);
  return p;
}

VarlenFwdArgs sinks_as_float32(const VarlenFwdArgs& a) {
  VarlenFwdArgs b = a;
  if (b.sinks) b.sinks = b.sinks->to(at::kFloat).contiguous();
  return b;
}

}  // namespace dmattn
