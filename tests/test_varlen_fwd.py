"""Correctness of dmattn::varlen_fwd against the float64 reference, on every device this build has.

- every named sample (tests/samples.py) in every dtype, by the accuracy rule;
- hypothesis property tests over random shapes, layouts, head broadcasting, dtypes and edge cases;
- NaN padding (xformers): every input embedded in a larger NaN-filled buffer, and every entry the contract says is
  unused poisoned, must give a bit-identical result (catches out-of-bounds and out-of-sequence reads);
- operand strides: non-contiguous, transposed and stride-0 masks/biases;
- a key-side mask/bias is never expanded to the query-side layout, and the keys it masks out are never read;
- rows after cu_seqlens_q[-1]; lying cu_seqlens or max_seqlen (CPU: ValueError; CUDA: NaN everywhere, in bounds);
  honest but extreme sizes: max_seqlen far above the real lengths, more sequences than a grid dimension holds;
- CPU vs CUDA agreement, and the CUDA build's clear errors for what it was not built for;
- the reference itself: the causal alignment and head broadcast by hand, and the output against torch SDPA.
"""

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

import dmattn_ops
from dmattn_ops.reference import causal_mask, materialize_bias, materialize_mask, reference_varlen_attention
from samples import (
    ALL_DTYPES,
    SAMPLES,
    Sample,
    Spec,
    assert_close_to_reference,
    assert_devices_agree,
    make_sample,
    support_reason,
)

SAMPLE_DTYPES = [
    pytest.param(spec, dtype, id=f"{spec.name}-{str(dtype).replace('torch.', '')}")
    for spec in SAMPLES
    for dtype in spec.dtypes
]


def _run_checked(sample: Sample, label: str = ""):
    """Runs the public API, checks the output metadata and the accuracy rule; returns (out, lse)."""
    out, lse = sample.run()
    total_q, H, D = sample.q.shape
    assert out.shape == (total_q, H, D) and out.dtype == sample.dtype and out.device == sample.device
    assert lse.shape == (H, total_q) and lse.dtype == torch.float32 and lse.device == sample.device
    assert_close_to_reference((out, lse), sample.reference(), sample.reference(sample.dtype), label=label)
    return out, lse


def _skip_unsupported(spec: Spec, dtype: torch.dtype, device: str) -> None:
    reason = support_reason(spec, dtype, device)
    if reason:
        pytest.skip(reason)  # test_cuda_rejects_what_it_was_not_built_for checks these give a clear error


@pytest.mark.parametrize("spec, dtype", SAMPLE_DTYPES)
def test_sample_matches_reference(spec, dtype, device):
    _skip_unsupported(spec, dtype, device)
    _run_checked(make_sample(spec, dtype, device))


# ---------------------------------------------------------------------------------------------------------------
# NaN padding: the same values at other addresses, surrounded by NaN, with every unused entry poisoned.


def _embed(t: torch.Tensor, fill, *, before: int = 2, after: int = 3, extra: int = 8, align: int = 0) -> torch.Tensor:
    """A view holding t's values inside a larger buffer filled with ``fill``: ``before``/``after`` extra rows, and
    ``extra`` extra entries on each side of every other dim (heads, columns). The last dim keeps stride 1.

    extra = 8 keeps every q/k/v row 16-byte aligned when D % 8 == 0, as slices of a packed qkv projection are;
    misaligned views are a different question from out-of-bounds reads. ``align`` > 0: the view's first element sits
    at a multiple of ``align`` bytes, as a fresh tensor's does (where it is not, a 16-bit query-side bias takes the sm80
    kernels, docs/contract.md, whose bits are not the sm90a kernel's)."""
    pads = [(before, after)] + [(extra, extra)] * (t.dim() - 1)
    shape = [n + a + b for n, (a, b) in zip(t.shape, pads)]
    numel = math.prod(shape)
    first = sum(a * math.prod(shape[d + 1 :]) for d, (a, _) in enumerate(pads))  # the view's first element
    slack = max(align // t.element_size(), 1)
    flat = torch.full([numel + slack], fill, dtype=t.dtype, device=t.device)
    shift = (-(flat.data_ptr() // t.element_size() + first)) % slack if align else 0
    buf = flat[shift : shift + numel].view(shape)
    view = buf[tuple(slice(a, a + n) for n, (a, _) in zip(t.shape, pads))]
    view.copy_(t)
    return view


def _poison(t: torch.Tensor):
    """The fill for entries nobody may read: NaN for floats, True for a mask, a huge value for cu_seqlens."""
    if t.dtype == torch.bool:
        return True
    if t.dtype == torch.int32:
        return 2**30
    return math.nan


def _padded(sample: Sample) -> Sample:
    """``sample`` with every tensor embedded in a poisoned buffer, and, inside the views, every entry the contract
    leaves unused poisoned too: q rows after cu_seqlens_q[-1], k/v rows after cu_seqlens_k[-1], mask/bias rows
    owned by no sequence, and query-side columns j >= the row's sequence length Lk."""
    owned_q = int(sample.cu_seqlens_q[-1])
    owned_k = int(sample.cu_seqlens_k[-1])
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()

    def pad(t, owned_rows, align=0):
        view = _embed(t, _poison(t), align=align)
        view[owned_rows:] = _poison(t)
        return view

    def pad_operand(t):
        if t is None:
            return None
        if t.dim() == 2:  # key-side (total_k, Hm)
            return pad(t, owned_k)
        # query-side (total_q, Hm, max_seqlen_k); a bias's first element aligned, so that it keeps its kernel (_embed)
        view = pad(t, owned_q, align=16 if t.is_floating_point() else 0)
        for b in range(len(cu_q) - 1):
            view[cu_q[b] : cu_q[b + 1], :, cu_k[b + 1] - cu_k[b] :] = _poison(t)
        return view

    return sample.replace(
        q=pad(sample.q, owned_q), k=pad(sample.k, owned_k), v=pad(sample.v, owned_k),
        cu_seqlens_q=_embed(sample.cu_seqlens_q, _poison(sample.cu_seqlens_q)),
        cu_seqlens_k=_embed(sample.cu_seqlens_k, _poison(sample.cu_seqlens_k)),
        mask=pad_operand(sample.mask), bias=pad_operand(sample.bias),
    )


def _assert_identical(a, b, what: str):
    for name, x, y in (("out", a[0], b[0]), ("lse", a[1], b[1])):
        assert torch.equal(x, y), f"{name} differs {what}: max diff {(x.double() - y.double()).abs().max().item()}"


@pytest.mark.parametrize("spec, dtype", SAMPLE_DTYPES)
def test_nan_padding_gives_identical_result(spec, dtype, device):
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    padded = _padded(sample)
    assert padded.q.stride() != sample.q.stride()  # really a view into a larger buffer
    _assert_identical(sample.run(), padded.run(), "when the inputs sit in NaN-filled buffers")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_nan_padding_keeps_a_query_side_bias_on_its_kernel(dtype, device, monkeypatch, capfd):
    """Run EL's hypothesis draw: 7 keys, a key-side mask of every head and a 16-bit query-side bias of one. Padded by
    the old rule, the bias's first element sat 12 bytes past a 16-byte boundary, which sends such a bias to the sm80
    kernels (docs/contract.md), and the comparison compared two kernels. The padded call now runs the same plan
    (DMATTN_LOG_PLAN: no plan lines on the CPU) and gives the same bits."""
    spec = Spec("padded_qbias", seqlens_q=(0, 0, 7), seqlens_k=(0, 0, 7), heads=2, heads_k=1, mask="key",
                mask_heads="H", keep=0.2, bias="query", bias_dtype="q", extra_rows_q=1, extra_rows_k=1, packed_qkv=True)
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    padded = _padded(sample)
    assert padded.bias.data_ptr() % 16 == 0 and padded.bias.stride() != sample.bias.stride()
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    runs = []
    for s in (sample, padded):
        capfd.readouterr()
        out = s.run()
        if device == "cuda":
            torch.cuda.synchronize()
        runs.append((out, re.findall(r"kernel=\S+.*", capfd.readouterr().err)))
    assert runs[0][1] == runs[1][1], "the padded call took another plan"
    _assert_identical(runs[0][0], runs[1][0], "when the inputs sit in NaN-filled buffers")


# ---------------------------------------------------------------------------------------------------------------
# Operand strides: the same mask/bias values through other strides.


def _every_other(t: torch.Tensor) -> torch.Tensor:
    """Same values, stride 2 on the last dim."""
    buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    buf[..., ::2] = t
    return buf[..., ::2]


def _reversed_strides(t: torch.Tensor) -> torch.Tensor:
    """Same values, stored with the dims in reverse order (a transposed view)."""
    dims = list(range(t.dim()))[::-1]
    out = torch.empty(t.shape[::-1], dtype=t.dtype, device=t.device).permute(dims)
    out.copy_(t)
    return out


STRIDED_SPECS = [s for s in SAMPLES if s.name in ("key_mask_query_bias", "query_mask_key_bias", "trailing_rows")]


def _run_with_plan(sample: Sample, arch: str, monkeypatch, capfd):
    """The sample's (out, lse) with DMATTN_ARCH=arch, and the plan line the CUDA op logged for it (None on the CPU)."""
    monkeypatch.setenv("DMATTN_ARCH", arch)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    result = sample.run()
    plans = re.findall(r"dmattn\.varlen_fwd plan: .*", capfd.readouterr().err)
    return result, (plans[-1] if plans else None)


@pytest.mark.parametrize("spec", STRIDED_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("restride", [_every_other, _reversed_strides], ids=["every_other", "reversed"])
def test_operand_strides_give_identical_result(spec, restride, device, monkeypatch, capfd):
    """The same mask / bias values through other strides give the same bits on the same kernel. On CUDA a stride can
    change the kernel: the sm90a kernel reads a query-side bias only with adjacent keys (col_stride 1), so a strided
    one takes the sm80 kernels, which read any stride. Then the strided call's plan is the one DMATTN_ARCH=sm80 gives
    the contiguous call, and its bits are that call's."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    strided = sample.replace(mask=restride(sample.mask), bias=restride(sample.bias))
    assert strided.mask.stride() != sample.mask.stride() and strided.bias.stride() != sample.bias.stride()
    what = f"with {restride.__name__} mask/bias strides"
    if device != "cuda":
        _assert_identical(sample.run(), strided.run(), what)
        return
    for arch in ("auto", "sm80"):
        want, plan = _run_with_plan(sample, arch, monkeypatch, capfd)
        got, strided_plan = _run_with_plan(strided, arch, monkeypatch, capfd)
        if strided_plan != plan:
            assert arch == "auto" and " sm90a=1 " in plan and " sm90a=0 " in strided_plan, (plan, strided_plan)
            want, plan = _run_with_plan(sample, "sm80", monkeypatch, capfd)
            assert strided_plan == plan, f"a strided operand took a plan no arch gives the contiguous call: {strided_plan}"
        _assert_identical(want, got, f"{what} (DMATTN_ARCH={arch}: {plan})")


@pytest.mark.parametrize("layout", ["key", "query"])
def test_stride_zero_operands(layout, device):
    """Masks and biases broadcast with expand(): stride 0 over heads, and (query-side) over query rows."""
    dtype = torch.float16 if device == "cuda" else torch.float32
    spec = Spec(f"stride_zero_{layout}", seqlens_q=(4, 6), seqlens_k=(9, 5), is_causal=True)
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    H, total_q, total_k, max_k = spec.heads, spec.total_q, spec.total_k, sample.max_seqlen_k
    gen = torch.Generator().manual_seed(7)
    if layout == "key":
        mask = (torch.rand(total_k, 1, generator=gen) < 0.7).to(device).expand(total_k, H)
        bias = torch.randn(total_k, 1, generator=gen).to(device).expand(total_k, H)
    else:
        mask = (torch.rand(1, 1, max_k, generator=gen) < 0.7).to(device).expand(total_q, H, max_k)
        bias = torch.randn(1, 1, max_k, generator=gen).to(device).expand(total_q, H, max_k)
    assert 0 in mask.stride() and 0 in bias.stride()
    _run_checked(sample.replace(mask=mask, bias=bias))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_long_sequence_accuracy(dtype, device):
    """32,768 keys with a peaky key-side bias (|out| ~ 1): accumulation over many keys stays within the rule."""
    spec = Spec("long_keys", seqlens_q=(8,), seqlens_k=(32_768,), heads=2, heads_k=1, head_dim=64, bias="key")
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device, seed=1)
    _run_checked(sample.replace(bias=3 * sample.bias))


# ---------------------------------------------------------------------------------------------------------------
# Property tests.

_HEADS = [(1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 2), (6, 3)]
_CPU_HEAD_DIMS = [1, 2, 3, 5, 8, 16, 24]


def _supported(device: str):
    """(dtypes, head dims) to draw from on ``device``."""
    if device == "cpu":
        return list(ALL_DTYPES), _CPU_HEAD_DIMS
    info = dmattn_ops.build_info()
    dtypes = [d for d in ALL_DTYPES if str(d).replace("torch.", "") in info["cuda_dtypes"]]
    return dtypes, sorted(info["cuda_head_dims"])


@st.composite
def specs(draw, device: str):
    """A random Spec and dtype: 0-3 sequences of 0-12 tokens on each side, every layout and head broadcast,
    GQA/MQA, causal, masked rows, -inf bias, trailing rows, max_seqlen slack, packed qkv views."""
    dtypes, head_dims = _supported(device)
    batch = draw(st.integers(0, 3))
    lengths = st.lists(st.integers(0, 12), min_size=batch, max_size=batch)
    seqlens_q = tuple(draw(lengths))
    packed = draw(st.booleans())
    seqlens_k = seqlens_q if packed else tuple(draw(lengths))
    extra_q = draw(st.integers(0, 3))
    heads, heads_k = draw(st.sampled_from(_HEADS))
    layouts = st.sampled_from([None, "key", "query"])
    head_kinds = st.sampled_from(["1", "Hk", "H"])
    mask, bias = draw(layouts), draw(layouts)
    spec = Spec(
        "hypothesis",
        seqlens_q=seqlens_q,
        seqlens_k=seqlens_k,
        heads=heads,
        heads_k=heads_k,
        head_dim=draw(st.sampled_from(head_dims)),
        mask=mask,
        mask_heads=draw(head_kinds),
        keep=draw(st.sampled_from([0.0, 0.2, 0.6, 1.0])),
        masked_rows=mask is not None and draw(st.booleans()),
        bias=bias,
        bias_heads=draw(head_kinds),
        bias_dtype=draw(st.sampled_from(["float32", "q"])),
        bias_neg_inf=bias is not None and draw(st.booleans()),
        is_causal=draw(st.booleans()),
        extra_rows_q=extra_q,
        extra_rows_k=extra_q if packed else draw(st.integers(0, 3)),
        slack_q=draw(st.integers(0, 3)),
        slack_k=draw(st.integers(0, 3)),
        packed_qkv=packed,
        softmax_scale=draw(st.none() | st.floats(0.05, 2.0)),
    )
    return spec, draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16))


@settings(max_examples=120)
@given(data=st.data())
def test_random_calls_match_reference(device, data):
    if not all(_supported(device)):
        pytest.skip("this build's CUDA backend has no kernel instantiations")
    spec, dtype, seed = data.draw(specs(device), label="spec, dtype, seed")
    sample = make_sample(spec, dtype, device, seed=seed)
    result = _run_checked(sample)
    _assert_identical(result, _padded(sample).run(), "when the inputs sit in NaN-filled buffers")


# ---------------------------------------------------------------------------------------------------------------
# The key-side layout stays key-side.


def _bytes_allocated(sample: Sample):
    """(result, bytes the call allocated): peak CUDA allocator growth, or on the CPU every allocation the profiler
    sees (an upper bound on the peak)."""
    if sample.device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        result = sample.run()
        torch.cuda.synchronize()
        return result, torch.cuda.max_memory_allocated() - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = sample.run()
    return result, sum(max(e.self_cpu_memory_usage, 0) for e in prof.events())


@pytest.mark.parametrize("mask_heads", [1, 8])
def test_key_side_operand_is_never_expanded(mask_heads, device):
    """One sequence of 8 queries and 50,000 keys, key-side mask (keeping ~1%) and bias of Hm heads. A query-side
    copy would hold total_q * Hm * max_seqlen_k elements, 8x the operands; what the call allocates because of the
    operands (with them minus without them) must stay within O(total_k * Hm): the operands' own size."""
    dtype = torch.float16  # on every device; float32 accuracy over many keys is test_long_sequence_accuracy's
    lq, lk, H, Hk, D = 8, 50_000, 8, 2, 64
    spec = Spec("huge_key_side", seqlens_q=(lq,), seqlens_k=(lk,), heads=H, heads_k=Hk, head_dim=D)
    _skip_unsupported(spec, dtype, device)
    gen = torch.Generator().manual_seed(3)
    mask = (torch.rand(lk, mask_heads, generator=gen) < 0.01).to(device)  # (total_k, Hm)
    bias = torch.randn(lk, mask_heads, generator=gen).to(device)  # (total_k, Hm) float32
    dense = make_sample(spec, dtype, device)
    sample = dense.replace(mask=mask, bias=bias)

    budget = mask.nbytes + bias.nbytes
    query_side = lq * mask_heads * lk * (mask.element_size() + bias.element_size())
    assert query_side >= 8 * budget, "the shape must make an expansion stand out"
    _, without = _bytes_allocated(dense)
    result, with_operands = _bytes_allocated(sample)
    extra = with_operands - without
    assert extra <= budget, f"the mask and bias cost {extra} extra bytes, more than their own {budget} bytes " \
        f"(a query-side copy: {query_side})"
    assert_close_to_reference(result, sample.reference(), sample.reference(dtype))


def unread_keys(mask, heads, heads_k):
    """(total_k, Hk) bool: the keys of a key-side mask (total_k, Hm) that no query head of KV head hk may attend,
    checked to hold both read and unread keys."""
    heads_of_group = torch.arange(heads).view(heads_k, heads // heads_k)
    head_to_mask_head = torch.arange(heads) // (heads // mask.shape[1])
    unread = ~mask[:, head_to_mask_head][:, heads_of_group].any(dim=2)
    assert unread.any() and (~unread).any(), "the sample must have both read and unread keys"
    return unread


@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_key_side_masked_keys_are_never_read(mask_heads, is_causal, device):
    """The contract's skipping promise, seen from outside: with a key-side mask, the K and V rows (and bias entries)
    of keys that no query head of their KV group attends are never loaded or multiplied. Poisoning exactly those
    with NaN must leave out and lse bit-identical (a kernel that computed them and masked the scores afterwards
    would still multiply 0 by a NaN V row)."""
    dtype = torch.float16
    spec = Spec("skip_masked", seqlens_q=(3, 1, 5, 0), seqlens_k=(40, 9, 130, 6), heads=4, heads_k=2, mask="key",
                mask_heads=mask_heads, keep=0.4, bias="key", bias_heads=mask_heads, is_causal=is_causal)
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device, seed=7)
    mask = sample.mask.cpu()  # (total_k, Hm)
    unread = unread_keys(mask, spec.heads, spec.heads_k)

    k, v, bias = sample.k.clone(), sample.v.clone(), sample.bias.clone()
    k[unread.to(device)] = float("nan")
    v[unread.to(device)] = float("nan")
    unread_bias = ~mask  # a bias entry is read only for kept (key, mask head) pairs
    bias[unread_bias.to(device)] = float("nan")
    expected = sample.run()
    poisoned = sample.replace(k=k, v=v, bias=bias).run()
    for want, got in zip(expected, poisoned):
        assert torch.equal(want, got), "a masked-out key's K, V or bias was read"


@pytest.mark.parametrize("window", [(64, -1), (20, 5)], ids=["left_64_causal", "left_20_right_5"])
def test_keys_outside_every_window_are_never_read(window, device):
    """The window's skipping promise, as for masks: K, V and key-side bias rows of keys outside every query's window
    (before the earliest window start, after the latest window end) can hold NaN without changing out or lse (the
    kernels skip those key tiles and hide the window's edge keys per element)."""
    dtype = torch.float16
    causal = window[1] < 0
    spec = Spec("skip_window", seqlens_q=(3, 1, 5, 0), seqlens_k=(400, 9, 300, 6), heads=4, heads_k=2, bias="key",
                bias_heads="Hk", is_causal=causal, window=window)
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device, seed=7)
    left, right = window
    unread = torch.ones(spec.total_k, dtype=torch.bool)
    k0 = 0
    for lq, lk in zip(spec.seqlens_q, spec.seqlens_k):
        if lq:
            first = max(0, lk - lq - left)  # the first query's window start
            last = lk - 1 if causal else min(lk - 1, lk - 1 + right)  # the last query's window end
            unread[k0 + first:k0 + last + 1] = False
        k0 += lk
    assert unread.any() and (~unread).any(), "the sample must have both read and unread keys"
    k, v, bias = sample.k.clone(), sample.v.clone(), sample.bias.clone()
    where = unread.to(device)
    k[where], v[where], bias[where] = float("nan"), float("nan"), float("nan")
    expected = sample.run()
    poisoned = sample.replace(k=k, v=v, bias=bias).run()
    for want, got in zip(expected, poisoned):
        assert torch.equal(want, got), "a key outside every window was read"


@pytest.mark.parametrize("threads", [1, 3, 16])
@pytest.mark.parametrize(
    "spec",
    [
        Spec("one_long_decode", seqlens_q=(2,), seqlens_k=(4100,), heads=4, heads_k=1, mask="key", bias="key",
             is_causal=True),
        Spec("long_and_empty", seqlens_q=(5, 3), seqlens_k=(3000, 0), heads=2, heads_k=1, mask="query",
             mask_heads="H", masked_rows=True),
    ],
    ids=lambda s: s.name,
)
def test_cpu_key_splits(spec, threads):
    """Fewer (sequence, head block, query block) items than threads: the CPU kernel splits key ranges and merges
    the partial softmax results. Every thread count, and so every split count, must meet the accuracy rule."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            _run_checked(make_sample(spec, dtype, "cpu", seed=threads), label=f"{threads} threads")
    finally:
        torch.set_num_threads(saved)


# ---------------------------------------------------------------------------------------------------------------
# Rows no sequence owns; lying cu_seqlens.


@pytest.mark.parametrize("name", ["trailing_rows", "no_sequences"])
def test_rows_after_last_sequence_are_zero(name, device):
    spec = next(s for s in SAMPLES if s.name == name)
    dtype = torch.bfloat16
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    out, lse = sample.run()
    owned = int(sample.cu_seqlens_q[-1])
    assert owned < out.shape[0]
    assert (out[owned:] == 0).all()
    assert (lse[:, owned:] == -math.inf).all()


def _lying(sample: Sample, case: str) -> Sample:
    """``sample`` (3 sequences) with cu_seqlens or max_seqlen that break the contract."""
    total_q, total_k = sample.q.shape[0], sample.k.shape[0]
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    return with_lies(sample, {
        "last_past_total": dict(cu_q=cu_q[:-1] + [total_q + 5], cu_k=cu_k[:-1] + [total_k + 1000]),
        "decreasing": dict(cu_q=[0, cu_q[2], cu_q[1], cu_q[3]], cu_k=[0, cu_k[3], 1, cu_k[3]]),
        "longer_than_max_seqlen": dict(max_q=1, max_k=2),
        "negative": dict(cu_q=[-7] + cu_q[1:], cu_k=[0, -3] + cu_k[2:]),
        "int32_min_inside": dict(cu_q=[0, cu_q[1], -(2**31), cu_q[3]]),
        "max_seqlen_k_zero": dict(max_k=0),
        # The first sequence holds every key and the last starts inside it: their key-side lists overlap.
        "overlapping": dict(cu_k=[0, total_k, int(0.3 * total_k), total_k], max_k=total_k),
    }[case])


def with_lies(sample: Sample, lies: dict) -> Sample:
    """``sample`` with the lies given: cu_q / cu_k (lists for cu_seqlens_q / _k), max_q / max_k (max_seqlen_q / _k);
    a query-side operand is cut or zero-padded to the new max_seqlen_k."""
    max_k = lies.get("max_k", sample.max_seqlen_k)

    def cu(values):
        return torch.tensor(values, dtype=torch.int32).to(sample.device)

    def narrow(t):  # a query-side operand is (total_q, Hm, max_seqlen_k) wide, whatever the lengths say
        if t is None or t.dim() != 3:
            return t
        if t.shape[-1] < max_k:  # a lie that raises max_seqlen_k: columns no key fills
            t = torch.cat([t, t.new_zeros(*t.shape[:-1], max_k - t.shape[-1])], dim=-1)
        return t[..., :max_k]

    return sample.replace(
        cu_seqlens_q=cu(lies.get("cu_q", sample.cu_seqlens_q.tolist())),
        cu_seqlens_k=cu(lies.get("cu_k", sample.cu_seqlens_k.tolist())),
        max_seqlen_q=lies.get("max_q", sample.max_seqlen_q),
        max_seqlen_k=max_k,
        mask=narrow(sample.mask),
        bias=narrow(sample.bias),
    )


LYING = ["last_past_total", "decreasing", "longer_than_max_seqlen", "negative", "int32_min_inside",
         "max_seqlen_k_zero", "overlapping"]


@pytest.mark.parametrize("case", LYING)
@pytest.mark.parametrize("name", ["key_mask_query_bias", "causal_mqa_mixed", "decode_key_side"])
def test_lying_cu_seqlens(name, case, device):
    """CPU: a ValueError from the data checks. CUDA (no host sync): the kernels clamp lengths, so nothing is read
    or written out of bounds (compute-sanitizer runs this test), and the device-side check makes the lie visible:
    every element of out and lse is NaN, never a plausible wrong answer. dmattn_ops.check_cu_seqlens reports it
    synchronously, with the CPU's message."""
    spec = next(s for s in SAMPLES if s.name == name)
    dtype = torch.float32 if device == "cpu" else torch.float16
    _skip_unsupported(spec, dtype, device)
    sample = _lying(make_sample(spec, dtype, device), case)
    if device == "cpu":
        with pytest.raises(ValueError, match=r"dmattn\.varlen_fwd: .*(cu_seqlens|max_seqlen)"):
            sample.run()
        with pytest.raises(ValueError, match=r"dmattn\.varlen_fwd: "):
            torch.ops.dmattn.varlen_fwd(*sample.args())
        return
    out, lse = sample.run()
    assert out.isnan().all() and lse.isnan().all()
    out, lse = torch.ops.dmattn.varlen_fwd(*sample.args())
    assert out.isnan().all() and lse.isnan().all()
    with pytest.raises(ValueError, match=r"dmattn\.varlen_fwd: .*(cu_seqlens|max_seqlen)"):
        dmattn_ops.check_cu_seqlens(sample.cu_seqlens_q, sample.cu_seqlens_k, sample.q.shape[0], sample.k.shape[0],
                                    sample.max_seqlen_q, sample.max_seqlen_k)


@pytest.mark.parametrize("name", ["key_mask_query_bias", "causal_mqa_mixed", "decode_key_side"])
def test_max_seqlen_far_above_the_lengths(name, device):
    """max_seqlen is an upper bound: 2**62 is honest (a launch sized by it was impossible on CUDA before)."""
    spec = next(s for s in SAMPLES if s.name == name)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    _skip_unsupported(spec, dtype, device)
    sample = make_sample(spec, dtype, device)
    if sample.mask is not None and sample.mask.dim() == 3 or sample.bias is not None and sample.bias.dim() == 3:
        sample = sample.replace(max_seqlen_q=2**62)  # query-side operands are max_seqlen_k wide
    else:
        sample = sample.replace(max_seqlen_q=2**62, max_seqlen_k=2**62 - 1)
    _run_checked(sample)


def test_more_sequences_than_a_grid_dimension(device):
    """70,000 one-query decode sequences (CUDA grids hold at most 65,535 in one dimension): a valid call runs, on
    the CPU and CUDA alike, and agrees with the reference on a sample of its sequences."""
    batch, H, Hk, D = 70_000, 2, 1, 32
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    lengths_k = torch.randint(1, 5, (batch,), generator=gen)
    q = torch.randn(batch, H, D, generator=gen).to(dtype)
    k = torch.randn(int(lengths_k.sum()), Hk, D, generator=gen).to(dtype)
    v = torch.randn(int(lengths_k.sum()), Hk, D, generator=gen).to(dtype)
    keep = torch.rand(k.shape[0], Hk, generator=gen) < 0.7
    cu_q, cu_k = dmattn_ops.cu_seqlens([1] * batch), dmattn_ops.cu_seqlens(lengths_k)
    out, lse = dmattn_ops.varlen_attention(
        *(t.to(device) for t in (q, k, v, cu_q, cu_k)), 1, 4, mask=keep.to(device), return_lse=True
    )
    out, lse = out.cpu(), lse.cpu()
    for b in (0, 1, 65_534, 65_535, 65_536, batch - 1):  # both sides of every launch boundary
        k0, k1 = int(cu_k[b]), int(cu_k[b + 1])
        one = (q[b : b + 1], k[k0:k1], v[k0:k1], dmattn_ops.cu_seqlens([1]), dmattn_ops.cu_seqlens([k1 - k0]), 1, 4)
        assert_close_to_reference(
            (out[b : b + 1], lse[:, b : b + 1]),
            reference_varlen_attention(*one, mask=keep[k0:k1]),
            reference_varlen_attention(*one, mask=keep[k0:k1], dtype=dtype),
            label=f"sequence {b}",
        )


# ---------------------------------------------------------------------------------------------------------------
# CUDA: agreement with the CPU, and clear errors for what the build does not cover.


@pytest.mark.parametrize("spec, dtype", SAMPLE_DTYPES)
def test_cpu_and_cuda_agree(spec, dtype, cuda_device):
    """Both devices pass the rule on their own (test_sample_matches_reference); here they must also see the same
    keys (identical 0 / -inf rows) and differ by no more than the rule allows both together."""
    _skip_unsupported(spec, dtype, cuda_device)
    cpu = make_sample(spec, dtype, "cpu")
    assert_devices_agree(cpu.run(), make_sample(spec, dtype, cuda_device).run(), cpu.reference(), cpu.reference(dtype))


def test_cuda_rejects_what_it_was_not_built_for(cuda_device):
    """float32 and head dims past the largest in build_info()["cuda_head_dims"] get an error naming the op, never
    garbage."""
    info = dmattn_ops.build_info()
    spec = next(s for s in SAMPLES if s.name == "key_mask_query_bias")
    cases = []
    if "float32" not in info["cuda_dtypes"]:
        cases.append((spec, torch.float32, r"float32|Float"))
    too_large = max(info["cuda_head_dims"]) + 8  # smaller head dims run padded; past the largest built one, an error
    cases.append((Spec("huge_head_dim", (3, 4), (5, 2), head_dim=too_large, mask="key"), torch.float16, r"head.?dim"))
    for case_spec, dtype, what in cases:
        sample = make_sample(case_spec, dtype, cuda_device)
        for call in (sample.run, lambda: torch.ops.dmattn.varlen_fwd(*sample.args())):
            with pytest.raises((TypeError, ValueError, NotImplementedError, RuntimeError)) as err:
                call()
            message = str(err.value)
            assert message.startswith("dmattn.varlen_fwd: "), message
            assert re.search(what, message), message


# ---------------------------------------------------------------------------------------------------------------
# The reference itself.


def test_reference_causal_alignment_by_hand():
    # Bottom-right: with Lq = 2, Lk = 4, query 0 sees keys 0..2 and query 1 sees keys 0..3.
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]
    # Lq > Lk: the first Lq - Lk queries see nothing.
    assert causal_mask(3, 1).tolist() == [[False], [False], [True]]


def test_reference_head_broadcast_by_hand():
    # H = 4, Hk = 2; one sequence of 1 query and 2 keys. Key-side mask with Hm = Hk: heads 0, 1 read column 0,
    # heads 2, 3 read column 1.
    cu_q, cu_k = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    mask = torch.tensor([[True, False], [False, True]])  # (total_k = 2, Hm = 2)
    dense = materialize_mask(mask, cu_q, cu_k, 0, num_heads=4)  # (H, Lq, Lk)
    assert dense[:, 0].tolist() == [[True, False], [True, False], [False, True], [False, True]]
    # Query-side bias with Hm = H: head h reads its own slice; columns past Lk are ignored.
    bias = torch.arange(12.0).reshape(1, 4, 3)  # (total_q = 1, Hm = 4, max_seqlen_k = 3)
    assert materialize_bias(bias, cu_q, cu_k, 0, num_heads=4)[:, 0].tolist() == [[0, 1], [3, 4], [6, 7], [9, 10]]


def test_reference_by_hand():
    # One query, two keys, D = 1, scale 1: scores 1 and 3, plus a key-side bias of -1 on the second key.
    q = torch.tensor([[[1.0]]])
    k = torch.tensor([[[1.0]], [[3.0]]])
    v = torch.tensor([[[10.0]], [[20.0]]])
    cu = torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0, 2], dtype=torch.int32)
    bias = torch.tensor([[0.0], [-1.0]])
    out, lse = reference_varlen_attention(q, k, v, *cu, 1, 2, bias=bias, softmax_scale=1.0)
    p = 1 / (1 + math.exp(1.0))  # weight of the first key: e^1 / (e^1 + e^2)
    assert out.item() == pytest.approx(10 * p + 20 * (1 - p))
    assert lse.item() == pytest.approx(math.log(math.exp(1.0) + math.exp(2.0)))


@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_reference_matches_sdpa(spec):
    """The reference against torch's scaled_dot_product_attention, one (sequence, head) at a time, in float64,
    on the rows that see at least one key. The window becomes part of the boolean mask and a sink one more key (K = 0,
    V = 0, its logit as the additive mask); SDPA has no softcap (test_softcap_closed_form covers it)."""
    if spec.softcap:
        pytest.skip("SDPA has no softcap")
    sample = make_sample(spec, torch.float32)
    out, _ = sample.reference()
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    H, Hk, D = spec.heads, spec.heads_k, spec.head_dim
    scale = spec.softmax_scale if spec.softmax_scale is not None else 1 / math.sqrt(D)
    for b in range(len(cu_q) - 1):
        (q0, q1), (k0, k1) = cu_q[b : b + 2], cu_k[b : b + 2]
        if spec.seqused_k is not None:
            k1 = k0 + spec.seqused_k[b]
        if q1 == q0 or k1 == k0:
            continue
        allowed = materialize_mask(sample.mask, sample.cu_seqlens_q, sample.cu_seqlens_k, b, H)[..., :k1 - k0]
        if spec.is_causal:
            allowed = allowed & causal_mask(q1 - q0, k1 - k0)
        if spec.window is not None:  # written here from the contract, apart from the reference's window_mask
            left, right = spec.window
            aligned = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)
            j = torch.arange(k1 - k0)[None, :]
            allowed = allowed & ((j >= aligned - left) | (left < 0)) & ((j <= aligned + right) | (right < 0))
        add = materialize_bias(sample.bias, sample.cu_seqlens_q, sample.cu_seqlens_k, b, H)[..., :k1 - k0].masked_fill(
            ~allowed, -math.inf
        )
        q = sample.q[q0:q1].double().transpose(0, 1)  # (H, Lq, D)
        k = sample.k[k0:k1].double().transpose(0, 1).repeat_interleave(H // Hk, 0)  # (H, Lk, D)
        v = sample.v[k0:k1].double().transpose(0, 1).repeat_interleave(H // Hk, 0)
        if sample.sinks is not None:
            sink = sample.sinks.double().view(H, 1, 1).expand(H, q1 - q0, 1)
            add = torch.cat([add, sink], dim=2)
            k = torch.cat([k, k.new_zeros(H, 1, D)], dim=1)
            v = torch.cat([v, v.new_zeros(H, 1, D)], dim=1)
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, scale=scale)
        seen = (add > -math.inf).any(-1)  # (H, Lq)
        got = out[q0:q1].transpose(0, 1)
        torch.testing.assert_close(got[seen], expected[seen], rtol=1e-10, atol=1e-12)


def test_softcap_closed_form():
    """Softcap on one query and two keys, by hand, on the op and the reference: scores c tanh(x / c) + bias, then
    the softmax."""
    c = 2.0
    q = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    k = torch.tensor([[[3.0, 0.0]], [[-1.0, 0.0]]])  # q . k = 3, -1
    v = torch.tensor([[[10.0, 0.0]], [[20.0, 0.0]]])
    bias = torch.tensor([[0.5], [0.0]])
    cu_q, cu_k = dmattn_ops.cu_seqlens([1]), dmattn_ops.cu_seqlens([2])
    s0, s1 = c * math.tanh(3.0 / c) + 0.5, c * math.tanh(-1.0 / c)
    p0 = math.exp(s0) / (math.exp(s0) + math.exp(s1))
    for out, lse in (
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 1, 2, bias=bias, softmax_scale=1.0, softcap=c,
                                    return_lse=True),
        reference_varlen_attention(q, k, v, cu_q, cu_k, 1, 2, bias=bias, softmax_scale=1.0, softcap=c),
    ):
        assert out[0, 0, 0].item() == pytest.approx(10 * p0 + 20 * (1 - p0))
        assert lse.item() == pytest.approx(math.log(math.exp(s0) + math.exp(s1)))


def test_sinks_closed_form():
    """A sink on one query and one key, by hand, on the op and the reference: out = e^s v / (e^s + e^sink), lse =
    log(e^s + e^sink); a query with no key: out 0, lse = sink."""
    q = torch.tensor([[[1.0]], [[1.0]]])  # two sequences, one query each
    k = torch.tensor([[[2.0]]])  # the first sequence's one key; the second has none
    v = torch.tensor([[[4.0]]])
    sinks = torch.tensor([1.0])
    cu_q, cu_k = dmattn_ops.cu_seqlens([1, 1]), dmattn_ops.cu_seqlens([1, 0])
    for out, lse in (
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 1, 1, softmax_scale=1.0, sinks=sinks, return_lse=True),
        reference_varlen_attention(q, k, v, cu_q, cu_k, 1, 1, softmax_scale=1.0, sinks=sinks),
    ):
        assert out[0, 0, 0].item() == pytest.approx(4 * math.exp(2) / (math.exp(2) + math.exp(1)))
        assert lse[0, 0].item() == pytest.approx(math.log(math.exp(2) + math.exp(1)))
        assert out[1].abs().sum().item() == 0 and lse[0, 1].item() == pytest.approx(1.0)


def test_reference_zero_heads_and_huge_broadcast_mask():
    """The reference takes what the op takes: no query heads (with a mask of Hm = 0), and a stride-0 query-side mask
    2**40 keys wide (it materializes each sequence's own slice only)."""
    k = torch.randn(3, 1, 4)
    cu_q, cu_k = dmattn_ops.cu_seqlens([1]), dmattn_ops.cu_seqlens([3])
    out, lse = reference_varlen_attention(torch.randn(1, 0, 4), k, k, cu_q, cu_k, 1, 3,
                                          mask=torch.ones(3, 0, dtype=torch.bool))
    assert out.shape == (1, 0, 4) and lse.shape == (0, 1)
    wide = torch.ones((), dtype=torch.bool).expand(1, 1, 2**40)
    q = torch.randn(1, 1, 4)
    out, lse = reference_varlen_attention(q, k, k, cu_q, cu_k, 1, 2**40, mask=wide)
    want, want_lse = reference_varlen_attention(q, k, k, cu_q, cu_k, 1, 3)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


def test_cu_seqlens_helper():
    """dmattn_ops.cu_seqlens: lengths -> (B + 1,) int32 running sums from 0, from a list or a tensor."""
    assert dmattn_ops.cu_seqlens([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert dmattn_ops.cu_seqlens([3, 0, 2]).dtype == torch.int32
    assert dmattn_ops.cu_seqlens(torch.tensor([4, 1])).tolist() == [0, 4, 5]
    assert dmattn_ops.cu_seqlens([]).tolist() == [0]
    with pytest.raises(ValueError, match="lengths must be 1-D"):
        dmattn_ops.cu_seqlens([[1, 2]])
