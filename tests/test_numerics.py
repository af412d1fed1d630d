"""The numeric contract of dmattn::varlen_fwd (docs/contract.md), on every device this build has.

- mask bytes: any nonzero byte is True (a uint8 tensor viewed as bool), in every layout and head broadcast;
- small weights: exp(s - max) is the real value down to float32's subnormal range and exactly 0 below it;
- overflow and NaN: a visible score of +inf or NaN makes the row's out and lse NaN (also across the CPU's key
  splits), one of -inf gets weight 0, a row whose visible scores are all -inf gets 0 and lse -inf;
- huge equal scores (a bias of finfo(float32).min on every key): the mean of V and a finite lse;
- hidden keys: NaN or inf in the K, V and bias entries of keys a row cannot see leave that row bit-identical;
- the float64 reference itself, against plain Python arithmetic on tiny cases.
"""

import contextlib
import math
from typing import List, Optional

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import causal_mask, materialize_mask, reference_varlen_attention
from packed_batch import one_thread
from samples import (ALL_DTYPES, Sample, Spec, assert_close_to_reference, make_sample, noncanonical_mask,
                     support_reason)

DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in ALL_DTYPES]
FLOAT32_MIN = torch.finfo(torch.float32).min


def _float32(x: float) -> float:
    """x rounded to float32 (what a float32 bias holds)."""
    return float(torch.tensor(x, dtype=torch.float32))


def _skip_unsupported(spec: Spec, dtype: torch.dtype, device: str) -> None:
    reason = support_reason(spec, dtype, device)
    if reason:
        pytest.skip(reason)


@contextlib.contextmanager
def _threads(n: int):
    """Runs the CPU kernel with ``n`` threads: with one long sequence and more threads than (sequence, head block,
    query block) items, it splits the key range (see test_cpu_key_splits in test_varlen_fwd.py)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _assert_identical(a, b, what: str) -> None:
    for name, x, y in (("out", a[0], b[0]), ("lse", a[1], b[1])):
        assert torch.equal(x, y), f"{name} differs {what}"


def _assert_matches_reference(result, sample: Sample, same_dtype=None) -> None:
    """The accuracy rule, where rows the reference makes NaN must be NaN in every element of out and in lse (contract
    point 3), and the other rows meet assert_close_to_reference. ``same_dtype``: the yardstick (default: the
    reference in the inputs' dtype)."""
    ref64 = sample.reference()
    same_dtype = same_dtype if same_dtype is not None else sample.reference(sample.dtype)
    out, lse = (t.detach().cpu() for t in result)
    nan_rows = ref64[1].isnan()  # (H, total_q)
    assert torch.equal(lse.isnan(), nan_rows), "lse is NaN exactly where a visible score is +inf or NaN"
    assert out.permute(1, 0, 2)[nan_rows].isnan().all(), "out rows with a +inf or NaN visible score must be NaN"
    assert not same_dtype[1][~nan_rows].isnan().any(), "test set-up: the yardstick is NaN-free on the other rows"

    def without_nan_rows(o, l):
        o, l = o.clone(), l.clone()
        o.permute(1, 0, 2)[nan_rows] = 0
        l[nan_rows] = 0
        return o, l

    assert_close_to_reference(without_nan_rows(out, lse), without_nan_rows(*ref64), without_nan_rows(*same_dtype))


# ---------------------------------------------------------------------------------------------------------------
# 1. Mask bytes other than 0 and 1.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("layout", ["key", "query"])
def test_noncanonical_mask_bytes(layout, mask_heads, is_causal, dtype, device):
    """A mask whose True bytes are 2..255 gives results identical to the same mask stored as 0 / 1, and matches the
    reference. Sequences span two CPU key chunks and three CUDA tiles; Hm = H key-side masks and query-side masks
    take the kernels' per-row path, Hm in {1, Hk} key-side ones the shared candidate-list path."""
    spec = Spec(f"bytes_{layout}_{mask_heads}", seqlens_q=(5, 3, 17), seqlens_k=(7, 0, 150), mask=layout,
                mask_heads=mask_heads, keep=0.5, bias="key", is_causal=is_causal)
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    odd = sample.replace(mask=noncanonical_mask(sample.mask))
    assert not torch.equal(odd.mask.view(torch.uint8), sample.mask.view(torch.uint8))
    result = odd.run()
    _assert_identical(sample.run(), result, "between a mask stored as 0 / 1 and the same mask stored as 0 / 2..255")
    assert_close_to_reference(result, odd.reference(), odd.reference(dtype))


# ---------------------------------------------------------------------------------------------------------------
# 2. Small weights: no exp floor.


def _one_query(bias: List[float], v: torch.Tensor, dtype: torch.dtype, device: str) -> Sample:
    """One query against len(bias) keys with q = 0, so that the scores are exactly the key-side (float32) bias."""
    n, d = v.shape
    spec = Spec("one_query", seqlens_q=(1,), seqlens_k=(n,), heads=1, heads_k=1, head_dim=d)
    return Sample(
        spec=spec, q=torch.zeros(1, 1, d, dtype=dtype, device=device),
        k=torch.zeros(n, 1, d, dtype=dtype, device=device), v=v.to(dtype).view(n, 1, d).to(device),
        cu_seqlens_q=dmattn_ops.cu_seqlens([1], device=device),
        cu_seqlens_k=dmattn_ops.cu_seqlens([n], device=device), max_seqlen_q=1, max_seqlen_k=n,
        bias=torch.tensor(bias, dtype=torch.float32, device=device).view(n, 1),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gap", [104.0, 200.0, 1e4])
def test_far_below_max_weighs_exactly_zero(gap, dtype, device):
    """A key whose score is more than ~103.97 below the row max has weight exp(-gap) < 2^-150, which rounds to 0 in
    float32: it must not move out at all, however large its V (the issue's case: v = [1, 3e38], bias = [0, -1e4]
    gave 5.94 when exp was floored at exp(-87))."""
    _skip_unsupported(Spec("one_query", seqlens_q=(1,), seqlens_k=(2,), head_dim=64), dtype, device)
    big = torch.finfo(dtype).max * 0.88  # 3e38 in float32 and bfloat16, 57,600 in float16
    sample = _one_query([0.0, -gap], torch.tensor([[1.0] * 64, [big] * 64]), dtype, device)
    out, lse = sample.run()
    assert (out.cpu() == 1).all(), f"out must be exactly 1 (the far key weighs 0), got {out.flatten()[:4].tolist()}"
    assert (lse.cpu() == 0).all(), f"lse must be exactly 0, got {lse.tolist()}"


def test_subnormal_weights_match_reference():
    """CPU float32: keys 88-103.5 below the row max have weights exp(-gap) in float32's subnormal range (down to the
    smallest, 2^-149 = e^-103.28). Key j puts a V of 3e38 in column j only, so out[j] = exp(-gap_j) * 3e38 / sum
    reads each weight on its own (about 1e-7 to 2; a floor at exp(-87) gives 4.9 for every one).

    Tolerance: a subnormal weight carries an absolute error of up to one subnormal step, 2^-149 (the last
    rounding), plus the ~1 ulp relative error of exp; then out is rounded to float32. So for column d,
        |out - ref| <= (2^-149 * sum_j |v_jd| + 4 eps sum_j w_j |v_jd|) / sum_j w_j + 4 eps |ref_d|,
    with w the float64 weights and eps float32's. The float64 reference has no subnormal rounding, so it also gives
    the keys beyond -103.97 (weight 0 in float32) their tiny real weight: 2^-149 * 3e38 covers it."""
    gaps = [88.0, 90.0, 95.0, 100.0, 102.0, 103.0, 103.5, 104.0, 110.0]
    n, d = len(gaps) + 1, 16
    big = 3e38
    v = torch.zeros(n, d)
    v[0, 0] = 1.0  # the max key: weight 1
    for j in range(1, n):
        v[j, j] = big
    sample = _one_query([0.0] + [-g for g in gaps], v, torch.float32, "cpu")
    out, lse = sample.run()
    ref_out, ref_lse = sample.reference()
    w = torch.tensor([1.0] + [math.exp(-g) for g in gaps], dtype=torch.float64)
    eps = torch.finfo(torch.float32).eps
    v64 = v.double().abs()
    tol = (2.0**-149 * v64.sum(0) + 4 * eps * (w[:, None] * v64).sum(0)) / w.sum() + 4 * eps * ref_out[0, 0].abs()
    err = (out[0, 0].double() - ref_out[0, 0]).abs()
    assert (err <= tol).all(), f"subnormal weights off: error {err.tolist()} vs tolerance {tol.tolist()}"
    assert out[0, 0, 1].item() > 1.0, "the weight e^-88 (subnormal) must count"
    assert out[0, 0, n - 1].item() == 0.0, "the weight e^-110 rounds to 0"
    assert lse.item() == 0.0 and ref_lse.item() == 0.0


# ---------------------------------------------------------------------------------------------------------------
# 3. Scores that overflow float32, NaN scores.

_OVERFLOW_KEYS = (5, 40, 66)  # in the first and second CUDA tile; one CPU chunk


def _overflow_sample(route: str, sign: float, dtype: torch.dtype, device: str) -> Sample:
    """One sequence of 3 queries and 70 keys, H = 2, Hk = 1, D = 64. Keys _OVERFLOW_KEYS have q . k * scale beyond
    float32's range (sign +1: +inf, -1: -inf); the others have finite scores. Two routes there:
    "values": q = 1e20, k = +-1e20 (float32 and bfloat16 hold 1e20), finite keys k = randn * 1e-20;
    "scale": softmax_scale = 1e31 (finite in float32), q = 1000, k = +-1000, finite keys k = 0 (score = bias).
    A query-side mask (H heads): query 0 sees every key; query 1 sees every key in head 0 and only the finite ones in
    head 1; query 2 sees only the overflowing keys."""
    lk, H, D = 70, 2, 64
    gen = torch.Generator().manual_seed(11)
    over = torch.zeros(lk, dtype=torch.bool)
    over[list(_OVERFLOW_KEYS)] = True
    if route == "values":
        q = torch.full((3, H, D), 1e20)
        k = torch.randn(lk, 1, D, generator=gen) * 1e-20
        k[over] = sign * 1e20
        scale = None
    else:
        q = torch.full((3, H, D), 1000.0)
        k = torch.zeros(lk, 1, D)
        k[over] = sign * 1000.0
        scale = 1e31
    mask = torch.ones(3, H, lk, dtype=torch.bool)
    mask[1, 1, over] = False
    mask[2, :, ~over] = False
    spec = Spec(f"overflow_{route}", seqlens_q=(3,), seqlens_k=(lk,), heads=H, heads_k=1, head_dim=D)
    sample = Sample(
        spec=spec, q=q.to(dtype), k=k.to(dtype), v=torch.randn(lk, 1, D, generator=gen).to(dtype),
        cu_seqlens_q=dmattn_ops.cu_seqlens([3]), cu_seqlens_k=dmattn_ops.cu_seqlens([lk]), max_seqlen_q=3,
        max_seqlen_k=lk, mask=mask, bias=torch.randn(lk, 1, generator=gen), softmax_scale=scale,
    )
    return sample.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["to_plus_inf", "to_minus_inf"])
@pytest.mark.parametrize("route", ["values", "scale"])
def test_score_overflow(route, sign, dtype, device):
    """Scores that overflow float32 are +-inf (the reference models that): +inf makes every row that sees the key
    NaN in out and lse (rows (q0, h0), (q0, h1), (q1, h0), (q2, both)); -inf gives the key weight 0, and query 2,
    which sees only such keys, gets out 0 and lse -inf. Row (q1, h1) never sees an overflowing key and is normal."""
    if route == "values" and dtype == torch.float16:
        pytest.skip("float16 cannot hold 1e20: the scale route covers it")
    sample = _overflow_sample(route, sign, dtype, device)
    _skip_unsupported(sample.spec, dtype, device)
    ref_lse = sample.reference()[1]
    if sign > 0:
        assert ref_lse.isnan().sum() == 5 and ref_lse[1, 1].isfinite(), "test set-up: five NaN rows"
    else:
        assert (ref_lse[:, 2] == -math.inf).all() and ref_lse[:, :2].isfinite().all(), "test set-up"
    _assert_matches_reference(sample.run(), sample)


@pytest.mark.parametrize("threads", [1, 16])
@pytest.mark.parametrize(
    "case",
    ["nan_bias", "nan_bias_alone_in_split", "nan_bias_only_key", "inf_bias", "inf_bias_only_key", "neg_inf_bias"],
)
def test_nan_and_inf_scores_through_key_splits(case, threads, device):
    """One query, 3000 keys, one head: with 16 threads the CPU kernel splits the keys into 5 ranges of 600 and
    merges them (combine_splits). Key 1000 (in the second range) gets a NaN or +inf bias: the row is NaN in out and
    lse, also when every other key of its range is masked out ("alone_in_split": that range's running max is the
    NaN) and when it is the row's only visible key ("only_key"). A -inf bias on that lone key gives it weight 0."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    lk, poisoned = 3000, 1000
    spec = Spec(f"splits_{case}", seqlens_q=(1,), seqlens_k=(lk,), heads=1, heads_k=1, mask="key", keep=1.0,
                bias="key")
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, "cpu", seed=3)
    mask, bias = sample.mask.clone(), sample.bias.clone()
    bias[poisoned] = {"nan": math.nan, "inf": math.inf, "neg": -math.inf}[case.split("_")[0]]
    if case.endswith("alone_in_split") or case == "neg_inf_bias":
        mask[600:1200] = False
    elif case.endswith("only_key"):
        mask[:] = False
    mask[poisoned] = True
    sample = sample.replace(mask=mask, bias=bias).to(device)
    with _threads(threads):
        result = sample.run()
    expect_nan = not case.startswith("neg")
    assert sample.reference()[1].isnan().all() == expect_nan, "test set-up"
    _assert_matches_reference(result, sample)


# ---------------------------------------------------------------------------------------------------------------
# 4. Huge equal scores.


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", [FLOAT32_MIN, 1e30], ids=["finfo_min", "1e30"])
@pytest.mark.parametrize(
    "spec",
    [
        Spec("huge_key_mask", seqlens_q=(3, 1, 5), seqlens_k=(7, 130, 9), mask="key", mask_heads="Hk", keep=0.6,
             bias="key"),
        Spec("huge_causal", seqlens_q=(4, 70), seqlens_k=(9, 70), is_causal=True, bias="key", bias_heads="H"),
    ],
    ids=lambda s: s.name,
)
def test_huge_bias_on_every_key(spec, fill, dtype, device):
    """A float32 bias of finfo(float32).min (what some libraries pass as an additive full mask) or of 1e30 on every
    key swamps q . k: every visible score is the same float32 number. Every row that sees a key gets the plain mean
    of V over its visible keys and a finite lse = fill + log(n); for finfo.min that rounds to finfo.min itself in
    float32, and the lse must be exactly that (the next float32 down is -inf).

    The yardstick of the accuracy rule is the reference in float32: q's dtype cannot hold the bias (float16 rounds
    finfo(float32).min to -inf), and the contract computes scores in float32."""
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    sample = sample.replace(bias=torch.full_like(sample.bias, fill))
    out, lse = sample.run()
    ref_out, ref_lse = sample.reference()
    seen = ref_lse.isfinite()
    assert seen.any() and (ref_lse[seen] == _float32(fill)).all(), "test set-up: the reference lse is the fill"
    lse = lse.cpu()
    assert lse[seen].isfinite().all(), f"lse must be finite where a key is visible, got {lse[seen].unique()}"
    if fill == FLOAT32_MIN:
        assert (lse[seen] == fill).all(), f"lse must be finfo(float32).min, got {lse[seen].unique()}"
    assert_close_to_reference((out, lse), (ref_out, ref_lse), sample.reference(torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16_bit_value_of_k_and_v_is_read_exactly(dtype, device):
    """Every 16-bit pattern of the dtype, read as K and as V, in sequences of one key each (8,192 of them, D = 8), with
    8 query heads sharing one KV head and query head h the unit vector along column h, softmax_scale 1:
    - V: each head's one key weighs 1, so out is V itself: bit for bit where finite, NaN where NaN, the same inf;
    - K: a single key's score is the lse, here q_h . k = k[h] exactly (the other products are exact zeros), so lse is
      K itself, bit for bit (the patterns that are not finite are replaced by 0 in K: NaN or inf there makes 0 * k
      NaN, a case of contract point 3 tested elsewhere).
    This pins the kernels' 16-bit to float32 conversions against torch's own (the CPU kernel converts eight elements
    at a time by bit arithmetic: subnormals, infinities and NaN are cases of their own there).
    On CUDA the kernels' fast math flushes float32 subnormals (bfloat16's subnormal V come out as zeros), and a row's
    lse takes the fused exp2 form (docs/contract.md, "Exponent range"): V is checked bit for bit above float32's
    smallest normal, and lse within a few float32 ulps of K."""
    patterns = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    D = 8
    n = patterns.numel() // D
    rows = patterns.reshape(n, 1, D)
    finite = torch.isfinite(rows)
    q = torch.eye(D, dtype=dtype).expand(n, D, D).contiguous()  # (n, 8 heads, D): head h is e_h
    k = torch.where(finite, rows, torch.zeros((), dtype=dtype))
    cu = torch.arange(n + 1, dtype=torch.int32, device=device)
    out, lse = dmattn_ops.varlen_attention(q.to(device), k.to(device), rows.to(device), cu, cu, 1, 1,
                                           softmax_scale=1.0, return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    expected = rows.expand(n, D, D)  # every head's out is its key's V row
    want_lse = k.reshape(n, D).t().float()  # lse (heads, total_q): head h's score is k[h]
    if device == "cuda":  # (torch.equal compares values: a flushed -0 equals 0)
        expected = torch.where(expected.float().abs() < torch.finfo(torch.float32).tiny, 0, expected)
    assert torch.equal(out[expected.isfinite()], expected[expected.isfinite()])
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out == float("inf"), expected == float("inf"))
    assert torch.equal(out == float("-inf"), expected == float("-inf"))
    if device == "cuda":
        torch.testing.assert_close(lse, want_lse, rtol=4 * torch.finfo(torch.float32).eps, atol=1e-6)
    else:
        assert torch.equal(lse, want_lse)


def test_long_mean_at_head_dim_one_keeps_float32_accuracy(device):
    """Every key the same (k of row stride 0), so every weight is 1 and out is the plain mean of 1100 values of v of
    magnitude ~100 whose mean is ~-1.85, at head dim 1 in float32: within 2 float32 ulps of the float64 mean, and
    within the accuracy rule. The CPU kernel's float32 running sum over each 128-key chunk was 6 ulps off here
    (tests/test_fuzz.py found such a case, past the rule's 2x PyTorch's error, where PyTorch's float32 dot product
    erred by under one ulp); its columns past the last multiple of eight now sum each key chunk in float64."""
    spec = Spec("long_mean_d1", heads=2, heads_k=2, head_dim=1, seqlens_q=(4,), seqlens_k=(1100,))
    _skip_unsupported(spec, torch.float32, device)
    sample = make_sample(spec, torch.float32, device)
    gen = torch.Generator().manual_seed(11)
    v = (torch.randn(1100, 1, 1, generator=gen) * 100).expand(1100, 2, 1).to(device)  # heavy cancellation
    sample = sample.replace(k=sample.k[:1].expand_as(sample.k), v=v)  # one key, 1100 times
    out, lse = sample.run()
    ref_out, ref_lse = sample.reference()
    mean = v[:, 0, 0].double().mean().item()
    assert torch.allclose(ref_out, torch.full_like(ref_out, mean)), "test set-up: the reference is the plain mean"
    ulp = 2.0 ** (math.frexp(mean)[1] - 24)  # of a float32 near the mean
    err = (out.double().cpu() - mean).abs().max().item()
    assert err <= 2 * ulp, f"out is {err / ulp:.1f} float32 ulps from the float64 mean"
    assert_close_to_reference((out, lse), (ref_out, ref_lse), sample.reference(torch.float32))


# ---------------------------------------------------------------------------------------------------------------
# 5. Hidden keys never influence a row.


def _visibility(sample: Sample) -> List[torch.Tensor]:
    """Per sequence, the (H, Lq, Lk) bool of which keys each (head, query) row sees (mask and causal rule)."""
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    H = sample.q.shape[1]
    seen = []
    for b in range(len(cu_q) - 1):
        vis = materialize_mask(sample.mask, sample.cu_seqlens_q, sample.cu_seqlens_k, b, H)
        if sample.is_causal:
            vis = vis & causal_mask(cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b])
        seen.append(vis)
    return seen


def _poison_hidden(sample: Sample, poisoned_keys: torch.Tensor, fill: str):
    """Poisons the K and V rows of ``poisoned_keys`` (bool (total_k, Hk)) and every bias entry that no unaffected row
    reads. A row is affected when it sees a poisoned key (through its KV head). Returns the poisoned sample and the
    (H, total_q) bool of unaffected rows, whose out and lse must not change."""
    H, Hk = sample.q.shape[1], sample.k.shape[1]
    group = H // Hk
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    clean = torch.zeros(H, sample.q.shape[0], dtype=torch.bool)
    read = torch.zeros_like(sample.bias, dtype=torch.bool)  # bias entries some unaffected row reads
    hm = sample.bias.shape[1]
    for b, vis in enumerate(_visibility(sample)):
        (q0, q1), (k0, k1) = cu_q[b : b + 2], cu_k[b : b + 2]
        bad = poisoned_keys[k0:k1].t().repeat_interleave(group, 0)  # (H, Lk)
        rows_clean = ~(vis & bad[:, None, :]).any(-1)  # (H, Lq)
        clean[:, q0:q1] = rows_clean
        reads = (vis & rows_clean[:, :, None]).view(hm, H // hm, q1 - q0, k1 - k0).any(1)  # (Hm, Lq, Lk)
        if sample.bias.dim() == 2:
            read[k0:k1] = reads.any(1).t()
        else:
            read[q0:q1, :, : k1 - k0] = reads.permute(1, 0, 2)
    nonfinite = {"nan": (math.nan, math.nan, math.nan), "inf": (math.inf, -math.inf, math.inf)}[fill]
    k, v, bias = sample.k.clone(), sample.v.clone(), sample.bias.clone()
    k[poisoned_keys] = nonfinite[0]
    v[poisoned_keys] = nonfinite[1]
    bias[~read] = nonfinite[2]
    return sample.replace(k=k, v=v, bias=bias), clean


def _hidden_key_case(name: str):
    """A sample (on the CPU) and its poisoned keys (bool (total_k, Hk)); each puts keys hidden from some rows and keys
    visible to them into one CPU chunk (128 keys) and one CUDA tile (64 keys)."""
    if name == "causal_prefill":
        # 100 queries on their own 100 keys: query i < 56 never sees keys 56..99, which are poisoned (keys 56..63
        # share the first CUDA tile with keys 0..55; the CPU's block of queries 48..63 gathers keys 0..63 into one
        # chunk); query i >= 56 sees some and is affected.
        spec = Spec(name, seqlens_q=(100,), seqlens_k=(100,), is_causal=True, bias="key", bias_heads="H")
        sample = make_sample(spec, torch.float32)
        keys = torch.zeros(100, spec.heads_k, dtype=torch.bool)
        keys[56:] = True
        return sample, keys
    if name == "query_mask":
        # Query-side mask: queries 0..3 of sequence 0 hide keys j % 3 == 0, queries 0..2 of sequence 1 hide keys
        # j % 4 == 1 (every head); the other queries see them. Those keys are poisoned.
        spec = Spec(name, seqlens_q=(8, 5), seqlens_k=(90, 70), mask="query", mask_heads="Hk", keep=0.8,
                    bias="query")
        sample = make_sample(spec, torch.float32)
        mask = sample.mask.clone()
        keys = torch.zeros(160, spec.heads_k, dtype=torch.bool)
        keys[0:90:3] = True
        keys[91:160:4] = True
        mask[0:4, :, 0:90:3] = False
        mask[8:11, :, 1:70:4] = False
        mask[4:8, :, 0:90:3] = True
        mask[11:13, :, 1:70:4] = True
        return sample.replace(mask=mask), keys
    if name == "per_head_key_mask":
        # Key-side mask with Hm = H, GQA (H = 4, Hk = 2): head 1 hides keys j % 4 == 1 that head 0 sees; head 3
        # hides keys j % 5 == 2 that head 2 sees. Those keys are poisoned in their KV head; heads 1 and 3 stay clean.
        spec = Spec(name, seqlens_q=(3, 6), seqlens_k=(100, 40), mask="key", mask_heads="H", keep=0.7,
                    bias="key", bias_heads="H")
        sample = make_sample(spec, torch.float32)
        mask = sample.mask.clone()
        keys = torch.zeros(140, 2, dtype=torch.bool)
        keys[1::4, 0] = True
        keys[2::5, 1] = True
        mask[keys[:, 0], 0], mask[keys[:, 0], 1] = True, False
        mask[keys[:, 1], 2], mask[keys[:, 1], 3] = True, False
        return sample.replace(mask=mask), keys
    # "split_decode": one long sequence, two queries (CPU key splits with 16 threads): query 0 hides keys
    # j % 7 == 0 through a query-side mask and key 2999 through the causal rule; query 1 sees them all.
    spec = Spec(name, seqlens_q=(2,), seqlens_k=(3000,), heads=2, heads_k=1, mask="query", keep=1.0,
                bias="key", is_causal=True)
    sample = make_sample(spec, torch.float32)
    mask = sample.mask.clone()
    keys = torch.zeros(3000, 1, dtype=torch.bool)
    keys[::7] = True
    keys[2999] = True
    mask[0, :, ::7] = False
    return sample.replace(mask=mask), keys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", ["nan", "inf"])
@pytest.mark.parametrize("case", ["causal_prefill", "query_mask", "per_head_key_mask", "split_decode"])
def test_hidden_keys_never_influence_a_row(case, fill, dtype, device):
    """Keys a row cannot see (causal future keys, keys a query-side mask hides, keys a per-head key-side mask hides
    from some heads of a GQA group) get NaN (fill "nan") or +inf / -inf / +inf (fill "inf") in their K, V and bias
    entries; every row that sees none of them keeps out and lse bit-identical to the clean call, even though those
    keys sit in the same CPU chunk / CUDA tile as keys it does see (0 * NaN in P . V would poison it). Rows that do
    see a poisoned key are not compared. "split_decode" runs with 16 threads: the CPU splits its 3000 keys."""
    base, keys = _hidden_key_case(case)
    spec = base.spec
    _skip_unsupported(spec, dtype, device)
    base = base.replace(q=base.q.to(dtype), k=base.k.to(dtype), v=base.v.to(dtype))
    poisoned, clean = _poison_hidden(base, keys, fill)
    assert clean.any() and (~clean).any(), "test set-up: both clean and affected rows"
    with _threads(16 if case == "split_decode" else torch.get_num_threads()):
        want = base.to(device).run()
        got = poisoned.to(device).run()
    rows_want, rows_got = (r[0].cpu().permute(1, 0, 2)[clean] for r in (want, got))
    assert torch.equal(rows_want, rows_got), "out of a row changed when keys it cannot see were poisoned"
    assert torch.equal(want[1].cpu()[clean], got[1].cpu()[clean]), "lse of a row changed likewise"


# 16-bit patterns of non-finite values: every sign, a quiet NaN, the NaN with the lowest payload (exponent all ones,
# mantissa 1: the one a test of the exponent alone must still catch), and an all-ones NaN.
_NONFINITE_BITS = {
    torch.bfloat16: {"+inf": 0x7F80, "-inf": 0xFF80, "nan": 0x7FC0, "nan_payload_1": 0x7F81, "nan_all_ones": 0xFFFF},
    torch.float16: {"+inf": 0x7C00, "-inf": 0xFC00, "nan": 0x7E00, "nan_payload_1": 0x7C01, "nan_all_ones": 0xFFFF},
}


@pytest.mark.parametrize("column", [0, 1, 62, 63])
@pytest.mark.parametrize("value", ["+inf", "-inf", "nan", "nan_payload_1", "nan_all_ones"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_one_nonfinite_v_element_of_a_hidden_key(dtype, value, column, device):
    """Causal, two queries and two keys: query 0 cannot see key 1, whose V holds one inf or NaN, in an even or an odd
    column (the low or the high half of a 32-bit word: the CUDA kernels test two 16-bit elements at once when they
    scan a tile's V). Query 0's row stays exactly key 0's V; query 1, which sees key 1, is not compared."""
    spec = Spec("one_nonfinite_v", seqlens_q=(2,), seqlens_k=(2,), heads=1, heads_k=1, head_dim=64, is_causal=True)
    _skip_unsupported(spec, dtype, device)
    v = torch.tensor([[0.5] * 64, [2.0] * 64]).to(dtype)
    v.view(torch.int16)[1, column] = torch.tensor(_NONFINITE_BITS[dtype][value], dtype=torch.int32).to(torch.int16)
    assert not v[1, column].isfinite(), "test set-up: the element is not finite"
    sample = Sample(
        spec=spec, q=torch.zeros(2, 1, 64, dtype=dtype, device=device),
        k=torch.zeros(2, 1, 64, dtype=dtype, device=device), v=v.view(2, 1, 64).to(device),
        cu_seqlens_q=dmattn_ops.cu_seqlens([2], device=device), cu_seqlens_k=dmattn_ops.cu_seqlens([2], device=device),
        max_seqlen_q=2, max_seqlen_k=2, is_causal=True,
    )
    out, lse = (t.cpu() for t in sample.run())
    assert (out[0] == 0.5).all(), f"query 0 cannot see key 1: exactly key 0's V, got {out[0, 0, :4].tolist()}"
    assert lse[0, 0].item() == 0.0, f"query 0 sees one key of score 0: lse 0, got {lse[0, 0].item()}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_v_of_a_key_weighing_almost_nothing(dtype, device):
    """Causal, two queries and two keys: query 1 sees key 1, whose score is 75 below key 0's (weight e^-75, about
    2^-108: nonzero in float32, 0 once rounded to float16) and whose V holds NaN in column 0; query 0 cannot see key
    1, so on CUDA the tile scans and fixes its V. Query 1's lse is exactly 0, its other columns are exactly key 0's V
    (the weight is below their rounding), or, on CUDA, the whole row may be NaN (a key of nonzero weight whose V held
    a NaN). Found by test_fuzz on the H200, where the whole NaN row was not yet allowed for such light keys."""
    spec = Spec("causal_light_key", seqlens_q=(2,), seqlens_k=(2,), heads=1, heads_k=1, head_dim=64, is_causal=True)
    _skip_unsupported(spec, dtype, device)
    v = torch.tensor([[0.5] * 64, [2.0] * 64])
    v[1, 0] = math.nan
    sample = Sample(
        spec=spec, q=torch.zeros(2, 1, 64, dtype=dtype, device=device),
        k=torch.zeros(2, 1, 64, dtype=dtype, device=device), v=v.to(dtype).view(2, 1, 64).to(device),
        cu_seqlens_q=dmattn_ops.cu_seqlens([2], device=device), cu_seqlens_k=dmattn_ops.cu_seqlens([2], device=device),
        max_seqlen_q=2, max_seqlen_k=2, bias=torch.tensor([0.0, -75.0], device=device).view(2, 1), is_causal=True,
    )
    out, lse = (t.cpu() for t in sample.run())
    assert (lse == 0).all(), f"lse must be exactly 0 for both queries, got {lse.tolist()}"
    assert (out[0] == 0.5).all(), f"query 0 cannot see key 1: exactly key 0's V, got {out[0, 0, :4].tolist()}"
    row = out[1, 0]
    whole_row_nan = device == "cuda" and row.isnan().all()
    assert whole_row_nan or (row[1:] == 0.5).all(), f"query 1: key 0's V outside column 0, got {row[:4].tolist()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill", ["nan", "inf"])
def test_minus_inf_score_takes_its_query_side_bias(fill, dtype, device):
    """A visible key whose q . k is -inf (an inf in k) plus a query-side bias of NaN or +inf is a NaN score, so the
    row is NaN: the kernels may skip the bias of keys a row cannot see, never of keys it can (CUDA skipped it for any
    -inf score; found by test_fuzz on the H200)."""
    spec = Spec("minus_inf_score", seqlens_q=(1,), seqlens_k=(2,), heads=1, heads_k=1, head_dim=64, bias="query")
    _skip_unsupported(spec, dtype, device)
    q = torch.zeros(1, 1, 64)
    q[0, 0, 0] = -1.0
    k = torch.zeros(2, 1, 64)
    k[1, 0, 0] = math.inf  # q . k1 = -inf, and no 0 * inf anywhere
    bias = torch.zeros(1, 1, 2)
    bias[0, 0, 1] = math.nan if fill == "nan" else math.inf
    sample = Sample(
        spec=spec, q=q.to(dtype).to(device), k=k.to(dtype).to(device),
        v=torch.ones(2, 1, 64, dtype=dtype, device=device),
        cu_seqlens_q=dmattn_ops.cu_seqlens([1], device=device), cu_seqlens_k=dmattn_ops.cu_seqlens([2], device=device),
        max_seqlen_q=1, max_seqlen_k=2, bias=bias.to(device),
    )
    out, lse = (t.cpu() for t in sample.run())
    assert out.isnan().all() and lse.isnan().all(), f"a NaN score: got {out[0, 0, :4]}, lse {lse}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_its_neighbours_exponent_form(dtype, device):
    """CUDA exponentiates rows with |max| <= 1024 in a fused form and others exactly. Rows share warps, so a
    neighbour's huge max must not change a row's form: query 0 (one visible key, causal) keeps out and lse
    bit-identical whether query 1's scores are ordinary or near float16's lowest (found by test_fuzz on the H200,
    an ulp of lse)."""
    spec = Spec("neighbours", seqlens_q=(2,), seqlens_k=(2,), heads=1, heads_k=1, head_dim=64, bias="query",
                is_causal=True)
    _skip_unsupported(spec, dtype, device)
    g = torch.Generator().manual_seed(0)

    def run(neighbour_bias: float):
        bias = torch.randn(2, 1, 2, generator=g.manual_seed(1)) * 3
        bias[1] = neighbour_bias
        return Sample(
            spec=spec, q=torch.randn(2, 1, 64, generator=g.manual_seed(2)).to(dtype).to(device),
            k=torch.randn(2, 1, 64, generator=g.manual_seed(3)).to(dtype).to(device),
            v=torch.randn(2, 1, 64, generator=g.manual_seed(4)).to(dtype).to(device),
            cu_seqlens_q=dmattn_ops.cu_seqlens([2], device=device),
            cu_seqlens_k=dmattn_ops.cu_seqlens([2], device=device), max_seqlen_q=2, max_seqlen_k=2,
            bias=bias.to(device), is_causal=True,
        ).run()

    (out_a, lse_a), (out_b, lse_b) = run(0.5), run(-65504.0)
    assert torch.equal(out_a[0].cpu(), out_b[0].cpu()), "query 0's out changed with its neighbour's scores"
    assert torch.equal(lse_a[:, 0].cpu(), lse_b[:, 0].cpu()), "query 0's lse changed with its neighbour's scores"


# ---------------------------------------------------------------------------------------------------------------
# 6. The reference itself, against plain Python arithmetic.


def _softmax_by_hand(scores: List[float], values: List[List[float]]):
    """out and lse of one row in plain Python floats: weights exp(s - max) over the keys with s > -inf."""
    top = max(scores)
    if top == -math.inf:
        return [0.0] * len(values[0]), -math.inf
    weights = [math.exp(s - top) for s in scores]
    total = math.fsum(weights)
    out = [math.fsum(w * v[d] for w, v in zip(weights, values) if w != 0) / total for d in range(len(values[0]))]
    return out, top + math.log(total)


def _reference_one_row(bias: List[float], values: List[List[float]], mask: Optional[torch.Tensor] = None,
                       k: Optional[torch.Tensor] = None, q_value: float = 0.0):
    """The reference for one query (q = q_value in every dim) against len(bias) keys (k = 0 unless given), scale 1."""
    n, d = len(values), len(values[0])
    out, lse = reference_varlen_attention(
        torch.full((1, 1, d), q_value), torch.zeros(n, 1, d) if k is None else k, torch.tensor(values).view(n, 1, d),
        dmattn_ops.cu_seqlens([1]), dmattn_ops.cu_seqlens([n]), 1, n,
        mask=mask, bias=torch.tensor(bias, dtype=torch.float32).view(n, 1), softmax_scale=1.0,
    )
    return out[0, 0].tolist(), lse.item()


VALUES = [[1.0, -2.0], [3.0, 0.5], [-4.0, 8.0]]


@pytest.mark.parametrize("fill", [FLOAT32_MIN, 1e30, 0.0], ids=["finfo_min", "1e30", "zero"])
def test_reference_equal_scores_give_the_mean(fill):
    """Equal scores, however large: every weight is 1, out is the mean of V and lse = fill + log(3) (a softmax
    through exp(s - logsumexp(s)) gave weights summing to 3 when fill swamps log(3) in float64)."""
    out, lse = _reference_one_row([fill] * 3, VALUES)
    assert out == pytest.approx([0.0, 6.5 / 3], rel=1e-12, abs=1e-12)
    assert lse == _float32(fill) + math.log(3)


def test_reference_by_hand_mixed_and_all_neg_inf():
    scores = [0.5, -math.inf, 2.0]
    out, lse = _reference_one_row(scores, VALUES)
    want_out, want_lse = _softmax_by_hand(scores, VALUES)
    assert out == pytest.approx(want_out, rel=1e-12) and lse == pytest.approx(want_lse, rel=1e-12)
    out, lse = _reference_one_row([-math.inf] * 3, VALUES)
    assert out == [0.0, 0.0] and lse == -math.inf


def test_reference_subnormal_and_far_weights():
    """The reference has no exp floor: a key 95 below the max counts with its real weight, times a large V."""
    values = [[1.0, 0.0], [0.0, 2.0**127]]
    out, lse = _reference_one_row([0.0, -95.0], values)
    want_out, want_lse = _softmax_by_hand([0.0, -95.0], values)
    assert out == pytest.approx(want_out, rel=1e-12) and lse == pytest.approx(want_lse, abs=1e-15)
    assert out[1] == pytest.approx(2.0**127 * math.exp(-95.0), rel=1e-12)


def test_reference_nan_and_inf_scores():
    """A NaN or +inf visible score makes the row NaN; a NaN V row of a hidden key (or one of weight 0) does not."""
    for bad in (math.nan, math.inf):
        out, lse = _reference_one_row([0.0, bad, 1.0], VALUES)
        assert all(math.isnan(x) for x in out) and math.isnan(lse)
    hidden = torch.tensor([True, False, True]).view(3, 1)
    values = [VALUES[0], [math.nan, math.inf], VALUES[2]]
    out, lse = _reference_one_row([0.5, 7.0, 2.0], values, mask=hidden)
    want_out, want_lse = _softmax_by_hand([0.5, 2.0], [VALUES[0], VALUES[2]])
    assert out == pytest.approx(want_out, rel=1e-12) and lse == pytest.approx(want_lse, rel=1e-12)
    out, _ = _reference_one_row([0.5, -math.inf, 2.0], values)  # visible, weight exactly 0
    assert out == pytest.approx(want_out, rel=1e-12)


def test_reference_float32_score_range():
    """Scores are float32: q . k = 2 * 1e40 is +inf (NaN row), -2e40 is -inf (weight 0), though float64 holds both."""
    k = torch.zeros(3, 1, 2)
    k[1] = 1e20
    out, lse = _reference_one_row([0.0, 0.0, 1.0], VALUES, k=k, q_value=1e20)
    assert all(math.isnan(x) for x in out) and math.isnan(lse)
    out, lse = _reference_one_row([0.0, 0.0, 1.0], VALUES, k=-k, q_value=1e20)
    want_out, want_lse = _softmax_by_hand([0.0, 1.0], [VALUES[0], VALUES[2]])
    assert out == pytest.approx(want_out, rel=1e-12) and lse == pytest.approx(want_lse, rel=1e-12)


def test_reference_noncanonical_mask_bytes():
    """Bytes 2..255 in a bool mask are True: by hand for one row, and materialize_mask gives the canonical dense mask
    in every layout and head broadcast."""
    odd = torch.tensor([0, 2, 255, 128], dtype=torch.uint8).view(torch.bool).view(4, 1)
    values = VALUES + [[0.25, -1.0]]
    scores = [0.25, -0.75, 1.125, 0.0]  # exact in the float32 bias
    out, lse = _reference_one_row(scores, values, mask=odd)
    want_out, want_lse = _softmax_by_hand(scores[1:], values[1:])
    assert out == pytest.approx(want_out, rel=1e-12) and lse == pytest.approx(want_lse, rel=1e-12)
    for layout in ("key", "query"):
        for heads in ("1", "Hk", "H"):
            spec = Spec(f"ref_bytes_{layout}_{heads}", seqlens_q=(3, 2), seqlens_k=(5, 4), mask=layout,
                        mask_heads=heads, keep=0.5)
            sample = make_sample(spec, torch.float32)
            odd_mask = noncanonical_mask(sample.mask, seed=1)
            for b in range(2):
                dense = [materialize_mask(m, sample.cu_seqlens_q, sample.cu_seqlens_k, b, spec.heads)
                         for m in (sample.mask, odd_mask)]
                assert torch.equal(dense[0], dense[1]), f"{layout} {heads}: bytes 2..255 must read as True"


def test_only_a_large_float64_reference_keeps_torchs_threads(monkeypatch):
    """PackedBatch.reference runs on one thread (its many tiny ops), but a float64 reference of more than
    MANY_PRODUCTS q . k products keeps torch's threads; a lower-precision one never does (its rounding would follow
    the split)."""
    import packed_batch

    sample = make_sample(Spec("threads", (5, 9), (7, 12), heads=4, heads_k=2, head_dim=16), torch.float16)
    assert sample.score_products() == (5 * 7 + 9 * 12) * 4 * 16
    entered = []

    @contextlib.contextmanager
    def recorded():
        entered.append(True)
        yield

    monkeypatch.setattr(packed_batch, "one_thread", recorded)
    sample.reference()
    sample.reference(torch.float16)
    assert len(entered) == 2
    monkeypatch.setattr(packed_batch, "MANY_PRODUCTS", sample.score_products() - 1)
    sample.reference()
    assert len(entered) == 2  # float64 past the bound: torch's threads
    sample.reference(torch.float16)
    assert len(entered) == 3


def test_float32_base_is_the_worse_of_two_plain_forms():
    """The accuracy rule's float32 base (PackedBatch.reference(float32)) is, element by element, whichever of two
    plain PyTorch forms lies farther from the float64 answer: the scale applied to q . k, or folded into q first. A
    fuzz draw (scores near 15, softmax_scale -3.5) had the first form 5x luckier than the second, and the CPU kernel,
    whose error was the second form's exactly, failed a rule set by the first."""
    sample = make_sample(Spec("scaled", (5, 9), (7, 12), mask="key", bias="key", softmax_scale=-3.5), torch.float32)
    exact = sample.reference()
    base = sample.reference(torch.float32)
    with one_thread():  # as the reference runs: float32 matmuls round by how they split over threads
        plain = sample._call(reference_varlen_attention, dtype=torch.float32)
        folded = sample.replace(q=sample.q * -3.5, softmax_scale=1.0)._call(reference_varlen_attention,
                                                                            dtype=torch.float32)
    for got, a, b, want in zip(base, plain, folded, exact):
        err = (got.double() - want).abs().nan_to_num(nan=0.0)
        worse = torch.maximum((a.double() - want).abs(), (b.double() - want).abs()).nan_to_num(nan=0.0)
        assert torch.equal(err, worse)
    assert not torch.equal(plain[0], folded[0])  # the two forms round differently here: the check means something
