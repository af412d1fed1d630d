// blockwise_bwd.cpp: see blockwise_bwd.h.
#include "blockwise_bwd.h"

#include "env_choice.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace dmattn {
namespace {

// The largest (H, rows, keys) float32 scratch tensor of one block.
constexpr int64_t kBlockBytes = int64_t{64} << 20;

// A (total, Hm, ...) operand's rows [start, start + rows), as (H, rows or 1, keys): operand head h / head_group for
// query head h. Key-side (rows of keys, Hm): (H, 1, keys). Query-side (rows of queries, Hm, max_seqlen_k): the first
// `keys` columns, (H, rows, keys).
at::Tensor per_head(const at::Tensor& op, bool key_side, int64_t key_start, int64_t q_start, int64_t rows,
                    int64_t keys, int64_t heads) {
  const int64_t group = heads / op.size(1);
  if (key_side) return op.narrow(0, key_start, keys).t().repeat_interleave(group, 0).unsqueeze(1);
  return op.narrow(0, q_start, rows).narrow(2, 0, keys).permute({1, 0, 2}).repeat_interleave(group, 0);
}

// t with its inf / NaN elements zeroed: the right factor of a product whose left factor is 0 exactly where a key
// weighs nothing (and NaN where a visible key or row is), so that a hidden key's or a dead row's non-finite values
// reach no gradient, as in the CPU kernel, which never visits them.
at::Tensor finite_or_zero(const at::Tensor& t) { return at::where(at::isfinite(t), t, at::zeros({}, t.options())); }

}  // namespace

bool blockwise_backward_requested() {
  return env_choice("dmattn.varlen_bwd: ", "DMATTN_BWD", {"kernel", "blockwise"}) == "blockwise";
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blockwise_varlen_bwd(
    const VarlenFwdArgs& a, const at::Tensor& dout, const at::Tensor& dlse, const at::Tensor& out,
    const at::Tensor& lse, bool bias_grad) {
  const at::Tensor& q = a.q;
  const at::Tensor& k = a.k;
  const at::Tensor& v = a.v;
  const std::optional<at::Tensor>& mask = a.mask;
  const std::optional<at::Tensor>& bias = a.bias;
  const std::optional<at::Tensor>& sinks = a.sinks;
  const double softcap = a.softcap;
  const int64_t H = q.size(1), Hk = k.size(1), group = Hk > 0 ? H / Hk : 1;
  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
  at::Tensor dbias = bias && bias_grad ? at::zeros(bias->sizes(), f32) : at::empty({0}, f32);
  at::Tensor dsinks = sinks ? at::zeros({H}, f32) : at::empty({0}, f32);

  // The call's window (is_causal folded in), scale and max_seqlen as every kernel reads them.
  at::Tensor out_ref = out, lse_ref = lse;
  const VarlenFwdParams p = make_params(sinks_as_float32(a), out_ref, lse_ref);

  if (p.batch > 0 && q.size(0) > 0 && H > 0) {
    const at::Tensor cu_q = a.cu_seqlens_q.to(at::kCPU).contiguous(), cu_k = a.cu_seqlens_k.to(at::kCPU).contiguous();
    const std::optional<at::Tensor> used =
        a.seqused_k ? std::optional<at::Tensor>(a.seqused_k->to(at::kCPU).contiguous()) : std::nullopt;
    const at::Tensor q32 = q.to(at::kFloat), k32 = k.to(at::kFloat), v32 = v.to(at::kFloat);
    const at::Tensor do32 = dout.to(at::kFloat);
    const bool dout_nonfinite = do32.numel() > 0 && !at::isfinite(do32).all().item<bool>();
    const std::optional<at::Tensor> bias32 = bias ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
    const at::Tensor sink = sinks ? sinks->to(at::kFloat).view({H, 1}) : at::Tensor();
    const bool key_mask = mask && mask->dim() == 2, key_bias = bias && bias->dim() == 2;
    const float inf = std::numeric_limits<float>::infinity();

    for (int32_t b = 0; b < p.batch; ++b) {
      const SeqRange sq = clamp_seq(cu_q.data_ptr<int32_t>(), b, p.total_q, p.max_seqlen_q);
      SeqRange sk = clamp_seq(cu_k.data_ptr<int32_t>(), b, p.total_k, p.max_seqlen_k);
      if (used) sk.len = std::clamp<int64_t>(used->data_ptr<int32_t>()[b], 0, sk.len);
      const int64_t lq = sq.len, lk = sk.len;
      if (lq == 0 || (lk == 0 && !sinks)) continue;
      // K and V of the sequence, (lk, Hk, D). The query heads of KV head hk are hk * group .. + group: products run
      // over q viewed (rows, Hk, group, D) and scores (Hk, group, rows, lk), so K and V are never expanded per head.
      const at::Tensor ks = k32.narrow(0, sk.start, lk), vs = v32.narrow(0, sk.start, lk);
      const at::Tensor ks_finite = finite_or_zero(ks);
      at::Tensor dks = at::zeros_like(ks), dvs = at::zeros_like(vs);
      // (H, a, b) <-> (Hk, group, a, b), and (rows, H, D) -> (rows, Hk, group, D).
      auto grouped = [&](const at::Tensor& t) { return t.reshape({Hk, group, t.size(1), t.size(2)}); };
      auto by_head = [&](const at::Tensor& t) { return t.reshape({H, t.size(2), t.size(3)}); };
      auto rows_grouped = [&](const at::Tensor& t) { return t.reshape({t.size(0), Hk, group, t.size(2)}); };
      const at::Tensor j = at::arange(lk, q.options().dtype(at::kLong));
      const int64_t block =
          std::max<int64_t>(1, std::min<int64_t>(lq, kBlockBytes / (4 * H * std::max<int64_t>(lk, 1))));
      for (int64_t i0 = 0; i0 < lq; i0 += block) {
        const int64_t rows = std::min(block, lq - i0), q0 = sq.start + i0;
        const at::Tensor qb = q32.narrow(0, q0, rows), dob = do32.narrow(0, q0, rows);
        // Scores (H, rows, lk): scale * q.k, capped, + bias; -inf where the row cannot see the key.
        at::Tensor s = by_head(at::einsum("qhgd,khd->hgqk", {rows_grouped(qb), ks})) * p.softmax_scale;
        at::Tensor cap_slope;
        if (softcap > 0.0) {
          const at::Tensor t = at::tanh(s / softcap);
          s = t * softcap;
          cap_slope = 1 - t * t;
        }
        if (bias32) s = s + per_head(*bias32, key_bias, sk.start, q0, rows, lk, H);
        const at::Tensor i = at::arange(i0, i0 + rows, j.options());
        const at::Tensor aligned = i + (lk - lq);
        at::Tensor begin = p.window_left < 0 ? at::zeros_like(i) : aligned - p.window_left;
        at::Tensor end = p.window_right < 0 ? at::full_like(i, lk) : aligned + p.window_right + 1;
        if (a.key_range) {
          const at::Tensor given = a.key_range->narrow(0, q0, rows).to(at::kLong);
          begin = at::maximum(begin, given.select(1, 0));
          end = at::minimum(end, given.select(1, 1));
        }
        // (1, rows, lk): the key positions each row's window and key range keep, then the mask's.
        at::Tensor visible = (j.unsqueeze(0) >= begin.unsqueeze(1)) & (j.unsqueeze(0) < end.unsqueeze(1));
        visible = visible.unsqueeze(0);
        if (mask) visible = visible & per_head(*mask, key_mask, sk.start, q0, rows, lk, H).to(at::kBool);
        s = s.masked_fill(visible.logical_not(), -inf);
        // The rows' lse recomputed in float32 (the sink in the sum), NaN where the forward's is; rows the forward
        // left at -inf (no visible key, no sink) take no part.
        const at::Tensor lse_fwd = lse.narrow(1, q0, rows);                                  // (H, rows)
        at::Tensor lse_row = sinks ? at::logsumexp(at::cat({s, sink.unsqueeze(2).expand({H, rows, 1})}, 2), 2)
                                   : at::logsumexp(s, 2);
        lse_row = at::where(at::isnan(lse_fwd), lse_fwd, lse_row);
        const at::Tensor live = lse_fwd != -inf;                                             // (H, rows)
        // P: 0 for hidden keys and -inf scores (even in a NaN row), and in dead rows.
        at::Tensor pr = at::exp(s - lse_row.unsqueeze(2)).masked_fill(live.logical_not().unsqueeze(2), 0.f);
        pr = pr.masked_fill(s == -inf, 0.f);
        const at::Tensor dob_live = dob.masked_fill(live.t().unsqueeze(2).logical_not(), 0.f);  // (rows, H, D)
        const at::Tensor weighs = pr != 0;
        const at::Tensor zero = at::zeros({}, s.options());
        // dout . v per (row, key), over the keys that weigh something (a hidden key's inf / NaN v is not read).
        const at::Tensor dp =
            at::where(weighs, by_head(at::einsum("qhgd,khd->hgqk", {rows_grouped(dob_live), vs})), zero);
        at::Tensor delta = (pr * dp).sum(2);
        if (dlse.numel() > 0) delta = delta - dlse.narrow(1, q0, rows).masked_fill(live.logical_not(), 0.f);
        // d loss / d score where the key weighs something (the bias's gradient); 0 elsewhere.
        const at::Tensor ds = at::where(weighs, pr * (dp - delta.unsqueeze(2)), zero);
        at::Tensor dqk = ds * p.softmax_scale;
        if (cap_slope.defined()) dqk = dqk * cap_slope;
        dq.narrow(0, q0, rows) += at::einsum("hgqk,khd->qhgd", {grouped(dqk), ks_finite}).reshape({rows, H, -1});
        dks += at::einsum("hgqk,qhgd->khd", {grouped(dqk), rows_grouped(finite_or_zero(qb))});
        // dv: P^T dout, with a row's inf / NaN dout reaching only the keys that row weighs.
        dvs += at::einsum("hgqk,qhgd->khd", {grouped(pr), rows_grouped(finite_or_zero(dob_live))});
        if (dout_nonfinite) {
          const at::Tensor dob_bad = at::isfinite(dob_live).logical_not();
          const at::Tensor reached =
              at::einsum("hgqk,qhgd->khd", {grouped(weighs.to(at::kFloat)), rows_grouped(dob_bad.to(at::kFloat))}) > 0;
          dvs = at::where(reached, at::full({}, std::numeric_limits<float>::quiet_NaN(), s.options()), dvs);
        }
        if (dbias.numel() > 0) {
          const int64_t hm = bias->size(1);
          if (key_bias) {  // (lk, Hm): summed over the block's rows and the heads of each operand head
            dbias.narrow(0, sk.start, lk) += ds.sum(1).view({hm, H / hm, lk}).sum(1).t();
          } else {  // (rows, Hm, lk) of the (total_q, Hm, max_seqlen_k) gradient
            dbias.narrow(0, q0, rows).narrow(2, 0, lk) += ds.view({hm, H / hm, rows, lk}).sum(1).permute({1, 0, 2});
          }
        }
        if (sinks) {  // the sink is one more score with dp = 0: ds = p_sink (0 - delta); a -inf sink weighs nothing
          const at::Tensor p_sink = at::exp(sink - lse_row).masked_fill(live.logical_not(), 0.f);
          const at::Tensor term = at::where(sink == -inf, at::zeros({}, s.options()), p_sink * delta);
          dsinks -= term.sum(1);
        }
      }
      if (lk > 0) {  // (a sequence with no key still has rows: with sinks, their lse)
        dk.narrow(0, sk.start, lk) += dks;
        dv.narrow(0, sk.start, lk) += dvs;
      }
    }
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()),
          bias && bias_grad ? dbias.to(bias->scalar_type()) : dbias,
          sinks ? dsinks.to(sinks->scalar_type()) : dsinks};
}

}  // namespace dmattn
