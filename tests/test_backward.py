"""The backward of dmattn.varlen_fwd (issue 14): the float64 CPU kernel, and the blockwise backward (ATen operations a
block of query rows at a time, float32; csrc/blockwise_bwd.cpp) that the CUDA backend runs and the CPU runs under
DMATTN_BWD=blockwise, so that both are checked here on the CPU and the second on CUDA too.

- Gradients of q, k, v and the bias for every sample of tests/samples.py (every layout and head broadcast of mask and
  bias, causal, GQA / MQA, empty sequences, fully masked rows, -inf biases, odd head dims), in every dtype, against
  the float64 reference differentiated by autograd, by the forward's accuracy rule: at most 2x the error of the same
  reference run in the inputs' dtype, plus a few ulps. The loss weighs both outputs (out and softmax_lse), so the
  gradient through softmax_lse is checked too.
- Keys a mask removes get dk = dv = 0 and a bias gradient of 0; rows with no visible key produce no NaN.
- A bias that does not require grad is not differentiated (varlen_bwd's bias_grad is False).
- A compiled training step (fullgraph, dynamic) is one graph across batch shapes and matches eager.
- Deterministic: two runs give the same bits (torch.use_deterministic_algorithms(True) is accepted).
"""

import dataclasses
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention
from samples import (ALL_DTYPES, SAMPLES, Sample, Spec, assert_gradients_close, make_sample, shared_reference,
                     support_reason)

DTYPES = [pytest.param(d, id=str(d).replace("torch.", "")) for d in ALL_DTYPES]
SAMPLE_IDS = [s.name for s in SAMPLES]
BACKWARDS = {"kernel": {}, "blockwise": {"DMATTN_BWD": "blockwise"}}


@pytest.fixture(params=list(BACKWARDS))
def backward_path(request, monkeypatch):
    """The CPU backward to run: the float64 kernel, or the blockwise one (the CUDA backend's)."""
    for name, value in BACKWARDS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _differentiable(sample: Sample):
    """Leaf copies of the sample's float inputs (q, k, v, a bias, sinks), requiring grad, and the sample using them."""
    leaves = {name: getattr(sample, name).detach().clone().requires_grad_() for name in ("q", "k", "v")}
    for name in ("bias", "sinks"):
        if getattr(sample, name) is not None:
            leaves[name] = getattr(sample, name).detach().clone().requires_grad_()
    return leaves, sample.replace(**leaves)


def _loss(out, lse, seed):
    """A fixed random weighting of out and of the finite entries of softmax_lse (float64)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    u = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    finite = lse.detach().isfinite()
    w, u = w.to(out.device), u.to(lse.device)
    return (out.double() * w).sum() + (torch.where(finite, lse.double(), 0.0) * u).sum()


def _total_loss(out, lse, leaves, seed):
    """The loss the gradient tests differentiate. + 0 * each input: calls with no query or no key have outputs that do
    not depend on the inputs at all."""
    return _loss(out, lse, seed) + sum(0.0 * t.sum() for t in leaves.values())


def _gradients(sample: Sample, compute, seed=1):
    leaves, s = _differentiable(sample)
    out, lse = compute(s)
    _total_loss(out, lse, leaves, seed).backward()
    return {name: t.grad for name, t in leaves.items()}


def _op(s: Sample):
    return s.run()


def _reference(dtype):
    def compute(s: Sample):
        return reference_varlen_attention(
            s.q, s.k, s.v, s.cu_seqlens_q, s.cu_seqlens_k, s.max_seqlen_q, s.max_seqlen_k, mask=s.mask, bias=s.bias,
            softmax_scale=s.softmax_scale, is_causal=s.is_causal, window_size=s.window_size, softcap=s.softcap,
            sinks=s.sinks, seqused_k=s.seqused_k, dtype=dtype,
        )

    return compute


def _check_gradients(spec, dtype, device):
    """The op's gradients on ``device`` against the float64 reference's, by the accuracy rule; the two reference
    gradients are computed once per sample in a test function (samples.shared_reference), for tests that check one
    sample many ways."""
    reason = support_reason(spec, dtype, device)
    if reason:
        pytest.skip(reason)
    sample = make_sample(spec, dtype, device)
    got = {name: g.cpu() for name, g in _gradients(sample, _op).items()}

    def references():
        cpu_sample = make_sample(spec, dtype, "cpu")  # the same numbers (make_sample draws them on the CPU)
        want = _gradients(cpu_sample, _reference(torch.float64))
        return want, _gradients(cpu_sample, _reference(dtype))  # and "a PyTorch implementation in the same dtype"

    want, base = shared_reference((spec, dtype), references)
    for name, g in got.items():
        assert g is not None and g.dtype == getattr(sample, name).dtype, f"d{name}: missing or of the wrong dtype"
    assert_gradients_close(got, want, base, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec", SAMPLES, ids=SAMPLE_IDS)
def test_gradients_match_reference(spec, dtype, backward_path):
    _check_gradients(spec, dtype, "cpu")


# The CUDA backwards: the fused kernels as planned (the default, DMATTN_BWD_DQ=auto: the sm90a backward where it
# covers the call on a cc 9.0 device, else the sm80 pair with dQ by its own kernel, in order), the sm80 pair asked for
# (DMATTN_BWD_DQ=ordered, so that a cc 9.0 device tests it too), the sm80 pair with dQ summed by atomics
# (DMATTN_BWD_DQ=atomic), the same under torch's deterministic mode (which keeps dQ in order), and the blockwise path
# forced: {name: (environment, deterministic mode)}.
CUDA_BACKWARDS = {"kernel": ({}, False), "kernel_ordered": ({"DMATTN_BWD_DQ": "ordered"}, False),
                  "kernel_atomic": ({"DMATTN_BWD_DQ": "atomic"}, False),
                  "kernel_deterministic": ({"DMATTN_BWD_DQ": "atomic"}, True),
                  "blockwise": ({"DMATTN_BWD": "blockwise"}, False)}


@pytest.fixture
def deterministic_mode():
    """Sets torch's deterministic mode for one test and puts the previous one back."""
    previous = torch.are_deterministic_algorithms_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("spec", SAMPLES, ids=SAMPLE_IDS)
@pytest.mark.parametrize("mode", list(CUDA_BACKWARDS))
def test_cuda_gradients_match_reference(spec, dtype, mode, cuda_device, monkeypatch, deterministic_mode):
    """The CUDA backward on every sample, judged on the CPU by the same rule: the fused kernels (where they cover the
    call, else the blockwise path) with and without torch's deterministic mode, and the blockwise path forced."""
    env, deterministic = CUDA_BACKWARDS[mode]
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    deterministic_mode(deterministic)
    _check_gradients(spec, dtype, "cuda")


def _sm90a_backward_device() -> bool:
    """A cc 9.0 device and a build with the sm90a kernels at head dim 128 (the sm90a backward's)."""
    built = dmattn_ops.build_info().get("cuda_arch_paths", {}).get("sm90a", {}).get("head_dims", [])
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and 128 in built


@pytest.fixture
def sm90a_backward(cuda_device, monkeypatch):
    """A cc 9.0 device with the sm90a kernels built, and DMATTN_BWD_DQ unset: its default, `auto`, runs the sm90a
    backward on every call it covers."""
    if not _sm90a_backward_device():
        pytest.skip("the sm90a backward runs on a cc 9.0 device with the sm90a kernels built (DMATTN_CUDA_ARCHS 90)")
    monkeypatch.delenv("DMATTN_BWD_DQ", raising=False)
    return cuda_device


def _at_head_dim_128(spec):
    """The sample at head dim 128, the sm90a backward's."""
    return dataclasses.replace(spec, name=f"{spec.name}_d128", head_dim=128)


# Longer sequences for the sm90a backward's tiles (128 key slots per CTA, query tiles of 64 rows): tiles cut
# everywhere, empty sequences, GQA / MQA, causal with more keys than queries and the reverse, a window, kept-key lists
# (mask heads 1 and Hk) with a key-side bias whose gradient is taken, a -inf bias, the softcap (kSoftcap), and masks
# of H heads read per key (in runs of 128 keys, some query heads see none of a CTA's keys: their items are skipped).
_long = dict(head_dim=128, heads=8, heads_k=2, seqlens_q=(129, 300, 1, 0, 64), seqlens_k=(257, 128, 700, 9, 0))
SM90A_BACKWARD_SPECS = [
    Spec("sm90a_dense", **_long),
    Spec("sm90a_causal", is_causal=True, **_long),
    Spec("sm90a_causal_more_queries", head_dim=128, heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
         is_causal=True),
    Spec("sm90a_window", window=(100, 20), **_long),
    Spec("sm90a_lists_bias", mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H", is_causal=True,
         **_long),
    Spec("sm90a_lists_1_block_sparse", mask="key", keep=0.4, mask_runs=64, bias="key", bias_neg_inf=True, **_long),
    Spec("sm90a_bias_q_dtype", bias="key", bias_heads="Hk", bias_dtype="q", **_long),
    Spec("sm90a_softcap", softcap=2.5, is_causal=True, bias="key", bias_heads="H", **_long),
    Spec("sm90a_softcap_lists_window", softcap=4.0, window=(100, 20), mask="key", mask_heads="1", keep=0.5,
         bias="key", **_long),
    Spec("sm90a_key_mask_H", mask="key", mask_heads="H", keep=0.5, bias="key", bias_heads="Hk", is_causal=True,
         **_long),
    Spec("sm90a_key_mask_H_runs", mask="key", mask_heads="H", keep=0.3, mask_runs=128, bias="key", bias_heads="H",
         **_long),
    Spec("sm90a_softcap_key_mask_H_runs", softcap=3.0, mask="key", mask_heads="H", keep=0.3, mask_runs=128,
         bias="key", bias_heads="H", **_long),
    # 32 query heads per KV head (live_heads' last bit) and 40 (more than the word holds: every item computed)
    Spec("sm90a_key_mask_H_runs_group_32", head_dim=64, heads=32, heads_k=1, seqlens_q=(130, 40),
         seqlens_k=(300, 129), mask="key", mask_heads="H", keep=0.3, mask_runs=128, bias="key", bias_heads="H"),
    Spec("sm90a_key_mask_H_runs_group_40", head_dim=64, heads=40, heads_k=1, seqlens_q=(130, 40),
         seqlens_k=(300, 129), mask="key", mask_heads="H", keep=0.3, mask_runs=128, bias="key", bias_heads="H"),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("spec", SM90A_BACKWARD_SPECS, ids=[s.name for s in SM90A_BACKWARD_SPECS])
def test_cuda_sm90a_backward_tiles_match_reference(spec, dtype, sm90a_backward):
    """The sm90a backward over many tiles: every gradient against the float64 reference."""
    _check_gradients(spec, dtype, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("spec", SAMPLES, ids=SAMPLE_IDS)
def test_cuda_sm90a_backward_matches_reference(spec, dtype, sm90a_backward):
    """Every sample at head dim 128 on a cc 9.0 device, as planned: the sm90a backward where it covers the call
    (test_cuda_backward_arch_is_the_documented_one says which), judged by the same rule as every backward (at their
    own head dims, mostly 64, test_cuda_gradients_match_reference runs them through it too)."""
    if spec.head_dim > 128:
        pytest.skip("the fused backward is built for head dims up to 128")
    _check_gradients(_at_head_dim_128(spec), dtype, "cuda")


# The sm90a backward's launch orders (DMATTN_BWD_ORDER): causal key tiles of unequal work, kept-key lists, a window
# with the softcap, and masks of H heads read per key (the dead-heads variant), each over empty sequences, on a batch
# of 12 sequences of up to 1,500 keys: 12 x 2 KV heads x 12 key tiles = 288 CTAs, more than one wave of an H100 /
# H200 (132 SMs), since the binding orders only calls of more CTAs than SMs (one wave starts every CTA at once).
_order_batch = dict(seqlens_q=(1500, 40, 900, 0, 1, 700, 1300, 64, 257, 1100, 3, 600),
                    seqlens_k=(1400, 129, 900, 9, 0, 700, 1500, 64, 300, 1000, 3, 650))
SM90A_ORDER_SPECS = [dataclasses.replace(s, name=f"{s.name}_waves", **_order_batch) for s in SM90A_BACKWARD_SPECS
                     if s.name in ("sm90a_causal", "sm90a_lists_bias", "sm90a_softcap_lists_window",
                                   "sm90a_key_mask_H_runs")]


def _order_units(spec):
    """bwd::CtaOrder::units of a spec: (sequences, KV heads, key tiles of 128 over min(max_seqlen_k, total_k))."""
    keys = min(max(spec.seqlens_k) + spec.slack_k, spec.total_k)
    return len(spec.seqlens_k) * spec.heads_k * -(-keys // 128)


# (DMATTN_BWD_ORDER, DMATTN_BWD_BAND) and the plan's order and band: the grid's order, each CTA longest first, and
# bands of a (sequence, KV head)'s key tiles longest first (the default width 8, a width that leaves a short last band
# of each pair's 12 tiles, and one wider than half of them).
_ORDERS = [("grid", None, "grid", 0), ("longest", None, "longest", 1), ("banded", None, "banded", 8),
           ("banded", "2", "banded", 2), ("banded", "16", "banded", 16), ("banded", "6", "banded", 6)]


@pytest.mark.parametrize("walk", ["tile_major", "head_major"])
@pytest.mark.parametrize("spec", SM90A_ORDER_SPECS, ids=[s.name for s in SM90A_ORDER_SPECS])
def test_cuda_sm90a_backward_order_keeps_every_cta_s_work(spec, walk, sm90a_backward, capfd, monkeypatch):
    """DMATTN_BWD_ORDER: the sm90a backward's CTAs in bands of a pair's key tiles (the default), each longest first,
    or in the grid's order run the same work each, so under either walk dk, dv and the bias gradient keep their bits
    (a band's run that the order pass lost or doubled would leave a key tile's gradients zero or written twice); dq,
    summed by reduce-adds whose order varies either way, agrees to a rounding of its float32 sum. The batch is more
    than one wave, so that the order pass runs and its order differs from the grid's."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    units = _order_units(spec)
    if units <= sms:
        pytest.skip(f"{units} CTAs are one wave on this device's {sms} SMs: the binding does not order them")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    monkeypatch.setenv("DMATTN_BWD_WALK", walk)
    grads = {}
    for order, band, logged, width in _ORDERS:
        monkeypatch.setenv("DMATTN_BWD_ORDER", order)
        if band is None:
            monkeypatch.delenv("DMATTN_BWD_BAND", raising=False)
        else:
            monkeypatch.setenv("DMATTN_BWD_BAND", band)
        plan = _logged_backward_plan(sample, capfd, monkeypatch)
        assert (plan["order"], int(plan["band"]), int(plan["order_units"]), int(plan["sms"]), plan["walk"]) == (
            logged, width, units, sms, walk)
        grads[(order, band)] = _gradients(sample, _op)
    for key, got in grads.items():
        _assert_same_work(got, grads[("grid", None)])


# The sm90a backward's walks (DMATTN_BWD_WALK): each CTA's query tiles head by head, or from the last tile down with the
# group's heads inside each tile (the default for groups of at most 8 query heads, bwd::TileMajorWalk; the two specs of
# 32 and 40 query heads per KV head walk head by head under either setting). The walk orders the sums of dk, dv and
# the bias gradient over a CTA's items (and the tile-major walk adds the bias gradient per tile, through shared memory),
# so the two agree to a rounding, and each against the float64 reference.
# TileMajorWalk's edge: 8 query heads per KV head (key_heads' bit 7, the tables' last row) on the dead-heads kernel and
# on kept-key lists, and 9, one past it, which walks head by head under either setting.
SM90A_WALK_EDGE_SPECS = [
    Spec("sm90a_walk_group_8_key_mask_H_runs", head_dim=128, heads=16, heads_k=2, seqlens_q=(129, 300, 1, 0, 64),
         seqlens_k=(257, 128, 700, 9, 0), mask="key", mask_heads="H", keep=0.3, mask_runs=128, bias="key",
         bias_heads="H", is_causal=True),
    Spec("sm90a_walk_group_8_lists_bias", head_dim=128, heads=8, heads_k=1, seqlens_q=(129, 300, 1, 0, 64),
         seqlens_k=(257, 128, 700, 9, 0), mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H",
         is_causal=True),
    Spec("sm90a_walk_group_9_key_mask_H_runs", head_dim=128, heads=18, heads_k=2, seqlens_q=(129, 300, 1, 0, 64),
         seqlens_k=(257, 128, 700, 9, 0), mask="key", mask_heads="H", keep=0.3, mask_runs=128, bias="key",
         bias_heads="H"),
]
SM90A_WALK_SPECS = SM90A_BACKWARD_SPECS + SM90A_ORDER_SPECS + SM90A_WALK_EDGE_SPECS


def _expected_walk(spec, walk):
    return walk if spec.heads // spec.heads_k <= 8 else "head_major"


@pytest.mark.parametrize("walk", ["tile_major", "head_major"])
@pytest.mark.parametrize("spec", SM90A_WALK_SPECS, ids=[s.name for s in SM90A_WALK_SPECS])
def test_cuda_sm90a_backward_walk_matches_reference(spec, walk, sm90a_backward, capfd, monkeypatch):
    """Either walk, on lists, masks read per key (dead heads), the softcap, windows, causal, empty sequences and a
    batch of more than one wave (the _waves specs, in bands), against the float64 reference; the plan says which
    walk ran."""
    monkeypatch.setenv("DMATTN_BWD_WALK", walk)
    plan = _logged_backward_plan(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch)
    assert plan["walk"] == _expected_walk(spec, walk)
    _check_gradients(spec, torch.bfloat16, "cuda")


@pytest.mark.parametrize("spec", SM90A_WALK_SPECS, ids=[s.name for s in SM90A_WALK_SPECS])
def test_cuda_sm90a_backward_walks_agree(spec, sm90a_backward, monkeypatch):
    """The two walks sum the same terms: every gradient agrees to a rounding (bf16 outputs: a unit in the last place;
    the bias gradient's float32 sums in another order); and each walk gives the same bits twice (its order of the sums
    is fixed; dq aside, whose reduce-adds run in a varying order)."""
    sample = make_sample(spec, torch.bfloat16, "cuda")
    grads = {}
    for walk in ("tile_major", "head_major"):
        monkeypatch.setenv("DMATTN_BWD_WALK", walk)
        grads[walk] = _gradients(sample, _op)
        _assert_same_work(_gradients(sample, _op), grads[walk])
    assert grads["tile_major"].keys() == grads["head_major"].keys()
    for name, head in grads["head_major"].items():
        scale = head.abs().max().item()
        torch.testing.assert_close(grads["tile_major"][name], head, rtol=2**-7, atol=1e-3 * scale, msg=name)


def test_cuda_sm90a_backward_order_and_walk_variables_are_checked(sm90a_backward, monkeypatch):
    """A misspelt DMATTN_BWD_ORDER, DMATTN_BWD_BAND or DMATTN_BWD_WALK is an error naming the choices."""
    spec = SM90A_ORDER_SPECS[0]
    sample = make_sample(spec, torch.bfloat16, "cuda")
    for name, value, choices in (("DMATTN_BWD_ORDER", "fast", "banded, longest or grid"),
                                 ("DMATTN_BWD_BAND", "3", "8, 2, 4, 6, 12 or 16"),
                                 ("DMATTN_BWD_WALK", "rows", "tile_major or head_major")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            if name == "DMATTN_BWD_BAND":
                m.setenv("DMATTN_BWD_ORDER", "banded")
            with pytest.raises(ValueError, match=f"{name} must be {choices}, got '{value}'"):
                _gradients(sample, _op)


def test_cuda_sm90a_backward_one_wave_keeps_the_grid_order(sm90a_backward, capfd, monkeypatch):
    """A call of no more CTAs than the device has SMs runs them all at once, so the binding skips the order pass
    (its launch would buy nothing) even under DMATTN_BWD_ORDER=longest, and says so on the plan line."""
    spec = SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index("sm90a_causal")]
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    units = _order_units(spec)  # 5 x 2 x 6 = 60
    if units > sms:
        pytest.skip(f"{units} CTAs are more than one wave on this device's {sms} SMs")
    monkeypatch.setenv("DMATTN_BWD_ORDER", "longest")
    plan = _logged_backward_plan(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch)
    assert (plan["order"], int(plan["order_units"]), int(plan["sms"])) == ("grid", units, sms)


# The sm90a backward's row statistics (DMATTN_BWD_ROW_STATS): by TMA on the Q / dO barrier, the consumers finding each
# row's keys from its index, or by the producer threads (RowStats). Rows the forward found no key for (causal with
# more queries than keys; a key-side mask hiding a whole sequence), windows with the softcap and kept-key lists, and
# masks of H heads read per key (dead heads).
SM90A_ROW_STATS_SPECS = [s for s in SM90A_BACKWARD_SPECS if s.name in (
    "sm90a_causal_more_queries", "sm90a_window", "sm90a_softcap_lists_window", "sm90a_key_mask_H_runs")] + [
    dataclasses.replace(SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index("sm90a_lists_bias")],
                        name="sm90a_lists_bias_masked_rows", masked_rows=True)]


def _spy_backward(monkeypatch, change):
    """Replaces torch.ops.dmattn.varlen_bwd by one that calls it with change(args), a list of the 22 positional
    arguments the autograd formula passes (meta/fake.py: lse is args[6], key_range args[21])."""
    real = torch.ops.dmattn.varlen_bwd

    class Spy:
        def __call__(self, *args):
            assert len(args) == 22
            return real(*change(list(args)))

    monkeypatch.setattr(torch.ops.dmattn, "varlen_bwd", Spy())


def _assert_same_work(got, want):
    """dk, dv and the bias gradient bit for bit; dq, summed by reduce-adds in a varying order, to a float32 rounding."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        if name == "q":
            torch.testing.assert_close(got[name], w, rtol=2**-7, atol=1e-3 * w.abs().max().item())
        else:
            assert torch.equal(got[name], w), name


@pytest.mark.parametrize("spec", SM90A_ROW_STATS_SPECS, ids=[s.name for s in SM90A_ROW_STATS_SPECS])
def test_cuda_sm90a_backward_row_stats_by_tma_or_threads(spec, sm90a_backward, capfd, monkeypatch):
    """lse and delta by TMA (the default where they fit) and by the producer threads (DMATTN_BWD_ROW_STATS=threads)
    give every visible pair the same probability and dS bits: dk, dv and the bias gradient are equal."""
    sample = make_sample(spec, torch.bfloat16, "cuda")
    grads = _gradients_under(sample, "DMATTN_BWD_ROW_STATS", "row_stats", {"threads": "threads", "auto": "tma"},
                             capfd, monkeypatch)
    _assert_same_work(grads["tma"], grads["threads"])


@pytest.mark.parametrize("change", ["full_key_range", "unaligned_lse"])
def test_cuda_sm90a_backward_row_stats_key_ranges_or_unaligned_lse(change, sm90a_backward, capfd, monkeypatch):
    """Where the bulk copies cannot bring the statistics the threads do, with the same result: a call with per-row key
    ranges (here [0, 2^31 - 1) for every row, which hides nothing: the same pairs as without). An lse whose address is
    not 16-byte aligned (a contiguous view 4 bytes into its storage) keeps the bulk copies, which read delta_kernel's
    aligned copy of it, with the same result."""
    spec = SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index("sm90a_lists_bias")]
    sample = make_sample(spec, torch.bfloat16, "cuda")
    monkeypatch.setenv("DMATTN_BWD_ROW_STATS", "auto")
    assert _logged_backward_plan(sample, capfd, monkeypatch)["row_stats"] == "tma"
    by_tma = _gradients(sample, _op)

    def alter(args):
        if change == "full_key_range":
            args[21] = torch.tensor([[0, 2**31 - 1]], dtype=torch.int32, device="cuda").expand(
                args[2].shape[0], 2).contiguous()
        else:
            lse = args[6].contiguous()
            storage = torch.empty(lse.numel() + 1, dtype=lse.dtype, device=lse.device)
            args[6] = storage[1:].view(lse.shape).copy_(lse)
            assert args[6].data_ptr() % 16 != 0
        return args

    _spy_backward(monkeypatch, alter)
    want = "threads" if change == "full_key_range" else "tma"
    assert _logged_backward_plan(sample, capfd, monkeypatch)["row_stats"] == want
    _assert_same_work(_gradients(sample, _op), by_tma)


# Rows the forward gave no weight although the window and the mask let them see keys: every such key's bias is -inf
# (bias head `head` over the first sequence's keys), so their lse is -inf. On the TMA path rows_seeing knows no lse
# and marks those pairs visible; only lse2 = +inf makes their probability exp2(-inf) = 0. The threads' path hides
# them by the row's empty interval. No spec of SM90A_ROW_STATS_SPECS has such rows (masked_rows hides keys, not rows).
@pytest.mark.parametrize("name, head", [("sm90a_lists_bias", 1), ("sm90a_softcap_lists_window", 0)])
def test_cuda_sm90a_backward_row_stats_rows_of_no_weight(name, head, sm90a_backward, capfd, monkeypatch):
    """Rows of lse -inf whose window holds kept keys (all of bias -inf): the same bits by TMA and by the threads,
    every gradient finite and within the float64 reference's rule."""
    spec = SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index(name)]

    def rows_of_no_weight(sample):
        bias = sample.bias.clone()
        bias[: spec.seqlens_k[0], head] = -math.inf
        return sample.replace(bias=bias)

    sample = rows_of_no_weight(make_sample(spec, torch.bfloat16, "cuda"))
    assert torch.isneginf(sample.run()[1]).any()
    grads = _gradients_under(sample, "DMATTN_BWD_ROW_STATS", "row_stats", {"threads": "threads", "auto": "tma"},
                             capfd, monkeypatch)
    _assert_same_work(grads["tma"], grads["threads"])
    cpu = rows_of_no_weight(make_sample(spec, torch.bfloat16, "cpu"))
    want = _gradients(cpu, lambda s: s.reference(torch.float64))
    base = _gradients(cpu, lambda s: s.reference(torch.bfloat16))
    assert_gradients_close({n: t.cpu() for n, t in grads["tma"].items()}, want, base, torch.bfloat16)


def test_cuda_sm90a_backward_l2_policy_changes_no_bits(sm90a_backward, capfd, monkeypatch):
    """DMATTN_BWD_L2: evict-last hints (the default) on the query tiles' loads and dQ's reduce-adds, or L2's default
    policy; a hint moves no data, so dk, dv and the bias gradient keep their bits."""
    spec = SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index("sm90a_key_mask_H_runs")]
    sample = make_sample(spec, torch.bfloat16, "cuda")
    grads = _gradients_under(sample, "DMATTN_BWD_L2", "l2", {"normal": "normal", "evict_last": "evict_last"}, capfd,
                             monkeypatch)
    _assert_same_work(grads["evict_last"], grads["normal"])


# The sm90a backward's dQ stores (DMATTN_BWD_DQ_STORE): `tile` (the default, which every sm90a test above runs against
# the float64 reference) has a producer warp add each warpgroup's staged part of a query tile with one bulk reduce-add
# into dq_accum in tiles (bwd::DqTiles: rows permuted by their parity, converted and scaled by dq_convert); `rows` has
# the consumer threads add it row by row into (total_q, H, D). Tiles starting at rows of both parities (odd sequence
# starts, causal and windowed spans), partial tiles, dead heads (skipped items the writer must skip too), kept-key
# lists, the softcap, D = 64 (both warpgroups add into the same column block), and a batch of more CTAs than SMs.
SM90A_DQ_STORE_SPECS = [s for s in SM90A_BACKWARD_SPECS if s.name in (
    "sm90a_causal", "sm90a_causal_more_queries", "sm90a_window", "sm90a_lists_bias", "sm90a_softcap_lists_window",
    "sm90a_key_mask_H_runs", "sm90a_key_mask_H_runs_group_32")] + [
    s for s in SM90A_ORDER_SPECS if s.name == "sm90a_lists_bias_waves"]


@pytest.mark.parametrize("spec", SM90A_DQ_STORE_SPECS, ids=[s.name for s in SM90A_DQ_STORE_SPECS])
def test_cuda_sm90a_backward_dq_tiles_match_rows(spec, sm90a_backward, capfd, monkeypatch):
    """dQ added in tiles and in rows: dk, dv and the bias gradient bit for bit (nothing else changes), dq to a float32
    rounding of each other (the reduce-adds' order varies, and the tiles scale the sum where the rows scale each
    addend), and both against the float64 reference."""
    if spec.head_dim not in dmattn_ops.build_info()["cuda_backward"].get("sm90a", []):
        pytest.skip(f"this build has no sm90a backward at head dim {spec.head_dim} (DMATTN_HEAD_DIMS)")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    grads = _gradients_under(sample, "DMATTN_BWD_DQ_STORE", "dq_store", {"rows": "rows", "tile": "tile"}, capfd,
                             monkeypatch)
    _assert_same_work(grads["tile"], grads["rows"])
    cpu = make_sample(spec, torch.bfloat16, "cpu")
    want = _gradients(cpu, _reference(torch.float64))
    base = _gradients(cpu, _reference(torch.bfloat16))
    for store, got in grads.items():
        assert_gradients_close({name: g.cpu() for name, g in got.items()}, want, base, torch.bfloat16)


def test_cuda_sm90a_backward_key_ranges_match_reference(sm90a_backward, capfd, monkeypatch):
    """Per-row key ranges that narrow the causal window (and some empty) on the sm90a backward, which reads them on
    its threads' path: every gradient against the float64 reference given the same ranges."""
    spec = SM90A_BACKWARD_SPECS[[s.name for s in SM90A_BACKWARD_SPECS].index("sm90a_lists_bias")]
    g = torch.Generator().manual_seed(14)
    ranges = []
    for lq, lk in zip(spec.seqlens_q, spec.seqlens_k):
        for _ in range(lq):
            a, b = sorted(torch.randint(-3, lk + 4, (2,), generator=g).tolist())
            ranges.append((a, b) if torch.rand(1, generator=g).item() > 0.1 else (b, a))  # a tenth empty
    key_range = torch.tensor(ranges, dtype=torch.int32).view(-1, 2)
    sample = make_sample(spec, torch.bfloat16, "cuda").replace(key_range=key_range.cuda())
    assert _logged_backward_plan(sample, capfd, monkeypatch)["row_stats"] == "threads"
    got = {name: t.cpu() for name, t in _gradients(sample, _op).items()}
    cpu = make_sample(spec, torch.bfloat16, "cpu").replace(key_range=key_range)
    want = _gradients(cpu, lambda s: s.reference(torch.float64))
    base = _gradients(cpu, lambda s: s.reference(torch.bfloat16))
    assert_gradients_close(got, want, base, torch.bfloat16)


@pytest.mark.parametrize("name, head_dim, env, deterministic, arch, dq", [
    ("dense_gqa", 128, {}, False, "sm90a", "reduce_add"),
    ("dense_gqa", 64, {}, False, "sm90a", "reduce_add"),
    ("key_mask_Hk", 128, {}, False, "sm90a", "reduce_add"),       # kept-key lists
    ("key_mask_H", 128, {}, False, "sm90a", "reduce_add"),        # a mask finer than the KV heads: read per key
    ("window_softcap_sinks", 128, {}, False, "sm90a", "reduce_add"),  # the softcap (kSoftcap)
    ("dense_gqa", 128, {"DMATTN_ARCH": "sm80"}, False, "sm80", "ordered"),
    ("dense_gqa", 128, {"DMATTN_BWD_DQ": "ordered"}, False, "sm80", "ordered"),
    ("dense_gqa", 128, {"DMATTN_BWD_DQ": "atomic"}, False, "sm80", "atomic"),
    ("dense_gqa", 128, {}, True, "sm80", "ordered"),              # torch's deterministic mode
    ("dense_gqa", 128, {"DMATTN_BWD_DQ_STORE": "rows"}, False, "sm90a", "reduce_add"),  # dQ by rows
    ("dense_gqa", 128, {"DMATTN_BWD_DQ_STORE": "tile"}, True, "sm80", "ordered"),  # deterministic: the pair still
])  # each as planned (DMATTN_BWD_DQ unset: the sm90a_backward fixture) unless env names a summation
def test_cuda_backward_arch_is_the_documented_one(name, head_dim, env, deterministic, arch, dq, sm90a_backward, capfd,
                                                  monkeypatch, deterministic_mode):
    """On a cc 9.0 device the fused backward is by default the sm90a one (dQ by reduce-adds, whose order varies)
    unless DMATTN_ARCH=sm80 or DMATTN_BWD_DQ names an sm80 summation, or torch's deterministic mode is on
    (DMATTN_LOG_PLAN names the arch and the summation)."""
    if arch == "sm90a" and head_dim not in dmattn_ops.build_info()["cuda_backward"].get("sm90a", []):
        pytest.skip(f"this build has no sm90a backward at head dim {head_dim} (DMATTN_HEAD_DIMS)")
    spec = dataclasses.replace(SAMPLES[SAMPLE_IDS.index(name)], head_dim=head_dim)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    deterministic_mode(deterministic)
    plan = _logged_backward_plan(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch)
    assert plan["arch"] == arch
    assert plan["dq"] == dq
    # the sm90a backward's dQ in tiles unless DMATTN_BWD_DQ_STORE=rows; the sm80 pair has neither
    assert plan["dq_store"] == (env.get("DMATTN_BWD_DQ_STORE", "tile") if arch == "sm90a" else "none")


@pytest.mark.parametrize("mask", [None, "key"], ids=["no_mask", "kept_key_lists"])
def test_cuda_whole_visible_tiles_match_reference(mask, cuda_device):
    """Long causal sequences at head dim 128: most (key tile, query tile) pairs are visible in every element, which
    the fused kernels run without the per-element check; with a key-side mask, through its kept-key lists."""
    base = SAMPLES[SAMPLE_IDS.index("block_sparse_key_mask")]
    spec = dataclasses.replace(base, name=f"whole_tiles_{mask}", seqlens_q=(200, 333), seqlens_k=(200, 333),
                               head_dim=128, is_causal=True, mask=mask)
    _check_gradients(spec, torch.bfloat16, "cuda")


def _logged_backward_plan(sample, capfd, monkeypatch):
    """Runs the sample's backward with DMATTN_LOG_PLAN=1 and returns the fields (name=value) of the one plan line it
    logged."""
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    leaves, s = _differentiable(sample)
    out, _ = s.run()
    capfd.readouterr()
    out.float().sum().backward()
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("dmattn.varlen_bwd plan:")]
    assert len(lines) == 1, lines
    return dict(word.split("=", 1) for word in lines[0].split() if "=" in word)


def _gradients_under(sample, variable, field, values, capfd, monkeypatch):
    """The sample's gradients with the environment variable set to each key of `values` in turn, keyed by the value
    its plan line's `field` must log (values[key])."""
    grads = {}
    for value, logged in values.items():
        monkeypatch.setenv(variable, value)
        assert _logged_backward_plan(sample, capfd, monkeypatch)[field] == logged
        grads[logged] = _gradients(sample, _op)
    return grads


def _logged_backward_path(sample, capfd, monkeypatch, field="path"):
    """`field` of the plan line the sample's backward logs (_logged_backward_plan)."""
    return _logged_backward_plan(sample, capfd, monkeypatch)[field]


def test_cuda_dq_summation_is_the_documented_one(cuda_device, capfd, monkeypatch, deterministic_mode):
    """The sm80 pair (DMATTN_ARCH=sm80: the only backward on devices other than cc 9.0) sums dQ in order by default;
    DMATTN_BWD_DQ=atomic adds it with atomics, except in torch's deterministic mode, which keeps it in order
    (DMATTN_LOG_PLAN says which; test_deterministic checks the bits)."""
    spec = SAMPLES[SAMPLE_IDS.index("key_mask_key_bias_mqa")]

    def plan():
        return _logged_backward_plan(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch)

    monkeypatch.delenv("DMATTN_BWD_DQ", raising=False)
    monkeypatch.setenv("DMATTN_ARCH", "sm80")
    deterministic_mode(False)
    default = plan()
    assert default["dq"] == "ordered"
    assert default["arch"] == "sm80"
    monkeypatch.setenv("DMATTN_BWD_DQ", "atomic")
    assert plan()["dq"] == "atomic"
    deterministic_mode(True)
    assert plan()["dq"] == "ordered"


def test_cuda_dq_summation_variable_is_checked(cuda_device, monkeypatch):
    """A DMATTN_BWD_DQ value that names no summation is an error naming the variable, not a silent default."""
    monkeypatch.setenv("DMATTN_BWD_DQ", "fast")
    leaves, s = _differentiable(make_sample(SAMPLES[SAMPLE_IDS.index("key_mask_key_bias_mqa")], torch.bfloat16,
                                            "cuda"))
    out, _ = s.run()
    with pytest.raises(ValueError, match="DMATTN_BWD_DQ must be auto, ordered or atomic, got 'fast'"):
        out.float().sum().backward()


@pytest.mark.parametrize("name, path", [("key_mask_key_bias_mqa", "fused"), ("window_softcap_sinks", "fused"),
                                        ("head_dim_128_causal", "fused"), ("query_mask_H", "blockwise"),
                                        ("head_dim_256", "blockwise")])
def test_cuda_backward_path_is_the_documented_one(name, path, cuda_device, capfd, monkeypatch):
    """The fused kernels run every float16 / bfloat16 call with head dim <= 128 and no query-side operand; the
    others take the blockwise path (DMATTN_LOG_PLAN names the path taken)."""
    if name not in SAMPLE_IDS:
        pytest.skip(f"no sample named {name}")
    spec = SAMPLES[SAMPLE_IDS.index(name)]
    reason = support_reason(spec, torch.bfloat16, "cuda")
    if reason:
        pytest.skip(reason)
    assert _logged_backward_path(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch) == path
    monkeypatch.setenv("DMATTN_BWD", "blockwise")
    assert _logged_backward_path(make_sample(spec, torch.bfloat16, "cuda"), capfd, monkeypatch) == "blockwise"


@pytest.mark.parametrize("path", ["blockwise", "sm80"])
def test_cuda_backward_sm90a_variables_are_checked_on_every_path(path, cuda_device, monkeypatch):
    """The sm90a backward's debug variables are read on every backward call, so a misspelt one is an error naming the
    choices on the blockwise and sm80 paths too, not only where the sm90a kernel runs."""
    spec = SAMPLES[SAMPLE_IDS.index("key_mask_Hk")]
    sample = make_sample(spec, torch.bfloat16, "cuda")
    if path == "blockwise":
        monkeypatch.setenv("DMATTN_BWD", "blockwise")
    else:
        monkeypatch.setenv("DMATTN_ARCH", "sm80")
    for name, value, choices in (("DMATTN_BWD_ORDER", "fast", "banded, longest or grid"),
                                 ("DMATTN_BWD_WALK", "rows", "tile_major or head_major"),
                                 ("DMATTN_BWD_ROW_STATS", "tma", "auto or threads"),
                                 ("DMATTN_BWD_L2", "evict_first", "evict_last or normal"),
                                 ("DMATTN_BWD_DQ_STORE", "atomic", "tile or rows")):
        with monkeypatch.context() as m:
            m.setenv(name, value)
            with pytest.raises(ValueError, match=f"{name} must be {choices}, got '{value}'"):
                _gradients(sample, _op)


@pytest.mark.parametrize("name, lists", [("key_mask_Hk", "1"), ("key_mask_1", "1"), ("block_sparse_key_mask", "1"),
                                         ("key_mask_H", "0"), ("key_mask_key_bias_mqa", "0"), ("dense_gqa", "0")])
def test_cuda_backward_walks_kept_key_lists(name, lists, cuda_device, capfd, monkeypatch):
    """A key-side mask whose heads the query heads of each KV group share (Hm divides Hk) is compacted into kept-key
    lists, so the fused kernels load and multiply only the keys it keeps; finer masks (and no mask) are read per key
    (DMATTN_LOG_PLAN's key_lists; the gradients of both are checked by test_cuda_gradients_match_reference)."""
    spec = SAMPLES[SAMPLE_IDS.index(name)]
    sample = make_sample(spec, torch.bfloat16, "cuda")
    assert _logged_backward_path(sample, capfd, monkeypatch, "key_lists") == lists


@pytest.mark.parametrize("dq", ["ordered", "auto"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask_heads", [0, 2, 4], ids=["no_mask", "kept_key_lists", "per_head"])
@pytest.mark.parametrize("lie", ["past_the_end", "negative", "decreasing"])
def test_cuda_backward_with_lying_cu_seqlens_stays_in_bounds(lie, mask_heads, head_dim, dq, cuda_device,
                                                            backward_path, monkeypatch):
    """cu_seqlens that break the contract: the backward clamps them as the forward does, so it reads and writes only
    inside the tensors (compute-sanitizer runs this on the GPU machine) and returns gradients of the inputs' shapes;
    with a key-side mask, through the kept-key lists too (a head per KV head), or read per key (a head per query
    head: on the sm90a backward, its dead-head scan); with DMATTN_BWD_DQ=auto on a cc 9.0 device, the sm90a
    backward."""
    monkeypatch.setenv("DMATTN_BWD_DQ", dq)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(70, 4, head_dim, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
    k = torch.randn(90, 2, head_dim, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
    v = torch.randn(90, 2, head_dim, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
    bias = torch.randn(90, 2, generator=g).to(cuda_device).requires_grad_()
    cu = {"past_the_end": [0, 40, 200], "negative": [-30, 20, 70], "decreasing": [0, 60, 10]}[lie]
    cu_q = torch.tensor(cu, dtype=torch.int32, device=cuda_device)
    cu_k = torch.tensor([0, 50, 90], dtype=torch.int32, device=cuda_device)
    mask = (torch.rand(90, mask_heads, generator=g) > 0.3).to(cuda_device) if mask_heads else None
    out = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 100, 100, mask=mask, bias=bias, is_causal=True)
    out.float().sum().backward()
    torch.cuda.synchronize()
    for t in (q, k, v, bias):
        assert t.grad is not None and t.grad.shape == t.shape


@pytest.mark.parametrize("dq", ["ordered", "auto"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_backward_of_an_expanded_dout(head_dim, dq, cuda_device, monkeypatch):
    """The loss out.sum() hands the backward an expanded dout (every stride 0, one element of storage): the fused
    kernels read it as rows of D elements, so it is copied first; its gradients are those of a materialized dout
    (DMATTN_BWD_DQ=auto: through the sm90a backward on a cc 9.0 device)."""
    monkeypatch.setenv("DMATTN_BWD_DQ", dq)
    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(n, h, head_dim, generator=g).to(cuda_device, torch.bfloat16).requires_grad_()
              for n, h in ((40, 4), (50, 2), (50, 2))]
    cu_q, cu_k = (dmattn_ops.cu_seqlens(x).to(cuda_device) for x in ([15, 25], [20, 30]))
    grads = []
    for loss in (lambda out: out.sum(), lambda out: (out * torch.ones_like(out)).sum()):
        out = dmattn_ops.varlen_attention(*leaves, cu_q, cu_k, 25, 30, is_causal=True)
        grads.append(torch.autograd.grad(loss(out), leaves))
    for name, a, b in zip("qkv", *grads):
        torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")


def test_masked_keys_get_no_gradient():
    """A key-side mask that removes some keys for every head: those keys' dk, dv and bias gradient are exactly 0."""
    g = torch.Generator().manual_seed(0)
    lengths = [6, 9]
    q = torch.randn(4, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(15, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(15, 2, 8, generator=g, requires_grad=True)
    bias = torch.randn(15, 1, generator=g, requires_grad=True)
    mask = torch.rand(15, 1, generator=g) > 0.5
    out = dmattn_ops.varlen_attention(q, k, v, dmattn_ops.cu_seqlens([2, 2]), dmattn_ops.cu_seqlens(lengths), 2, 9,
                                      mask=mask, bias=bias)
    out.pow(2).sum().backward()
    removed = ~mask[:, 0]
    assert removed.any() and (~removed).any()
    assert (k.grad[removed] == 0).all() and (v.grad[removed] == 0).all() and (bias.grad[removed] == 0).all()
    assert (v.grad[~removed] != 0).any()


def test_rows_with_no_visible_key_give_no_nan():
    """Causal with more queries than keys leaves the first queries without a key (out 0, lse -inf): their gradients
    are 0 and nothing is NaN, whatever weight the loss gives their lse."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 2, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 8, generator=g, requires_grad=True)
    out, lse = dmattn_ops.varlen_attention(q, k, v, dmattn_ops.cu_seqlens([5]), dmattn_ops.cu_seqlens([2]), 5, 2,
                                           is_causal=True, return_lse=True)
    assert (lse[:, :3] == -math.inf).all()
    (out.sum() + torch.where(lse.isfinite(), lse, 0.0).sum()).backward()
    for t in (q, k, v):
        assert t.grad.isfinite().all()
    assert (q.grad[:3] == 0).all()


def test_the_api_records_a_gradient_exactly_when_autograd_would():
    """varlen_attention calls the op below the autograd keys when nothing is to be differentiated (eager mode: grad
    disabled, or no input requiring grad), skipping the autograd registration's Python hop. Whatever the route, the
    outputs are the same bits, and a graph is recorded in exactly the cases where autograd would record one: an input
    requiring grad with grad enabled; not under no_grad or inference_mode, nor for inputs that need no gradient."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 4, 16, generator=g) for n in (5, 9, 9))
    k, v = k[:, :2], v[:, :2]
    bias = torch.randn(9, 2, generator=g)
    cu_q, cu_k = dmattn_ops.cu_seqlens([2, 3]), dmattn_ops.cu_seqlens([4, 5])

    def call(**changes):
        args = {**dict(q=q, k=k, v=v, bias=bias), **changes}
        return dmattn_ops.varlen_attention(args["q"], args["k"], args["v"], cu_q, cu_k, 3, 5, bias=args["bias"],
                                           is_causal=True, return_lse=True)

    plain_out, plain_lse = call()
    assert plain_out.grad_fn is None and not plain_out.requires_grad
    for name in ("q", "k", "v", "bias"):
        leaf = dict(q=q, k=k, v=v, bias=bias)[name].clone().requires_grad_()
        out, lse = call(**{name: leaf})
        assert out.requires_grad and out.grad_fn is not None, name
        assert torch.equal(out.detach(), plain_out) and torch.equal(lse.detach(), plain_lse), name
        (grad,) = torch.autograd.grad(out.sum(), leaf)
        assert torch.isfinite(grad).all(), name
        with torch.no_grad():
            out, _ = call(**{name: leaf})
        assert out.grad_fn is None and torch.equal(out, plain_out), name
        with torch.inference_mode():
            out, _ = call(**{name: leaf})
        assert out.grad_fn is None and torch.equal(out, plain_out), name


def test_frozen_bias_is_not_differentiated(monkeypatch):
    """A bias that does not require grad: varlen_bwd is called with bias_grad=False and returns no bias gradient."""
    calls = []
    real = torch.ops.dmattn.varlen_bwd

    class Spy:
        def __call__(self, *args):
            calls.append(args[15])  # bias_grad
            return real(*args)

    monkeypatch.setattr(torch.ops.dmattn, "varlen_bwd", Spy())
    sample = make_sample(SAMPLES[SAMPLE_IDS.index("key_bias_H")], torch.float32, "cpu")
    q = sample.q.detach().clone().requires_grad_()
    out, _ = sample.replace(q=q).run()
    out.sum().backward()
    assert calls == [False] and q.grad is not None


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_deterministic(device, backward_path):
    """Every gradient element is summed by one work item in a fixed order, whatever the thread count: two runs give
    the same bits, with torch.use_deterministic_algorithms(True) on (which both backwards accept)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("CUDA not available")
    sample = make_sample(SAMPLES[SAMPLE_IDS.index("long_sequences")], torch.float32 if device == "cpu" else
                         torch.bfloat16, device)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_gradients(sample, _op) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), f"d{name} differs between runs"


def _step_batch(seqlens_q, seqlens_k, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(
        q=torch.randn(sum(seqlens_q), 4, 16, generator=g),
        k=torch.randn(sum(seqlens_k), 2, 16, generator=g),
        v=torch.randn(sum(seqlens_k), 2, 16, generator=g),
        cu_seqlens_q=dmattn_ops.cu_seqlens(seqlens_q),
        cu_seqlens_k=dmattn_ops.cu_seqlens(seqlens_k),
        max_seqlen_q=max(seqlens_q),
        max_seqlen_k=max(seqlens_k),
        gate=torch.randn(sum(seqlens_k), 2, generator=g),
    )


def _loss_of_step(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate, weight):
    """A learnable key-side gate: its scaled score is the bias, its sign the mask; the loss depends on the output."""
    out = dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      mask=gate > -1.0, bias=gate * weight, is_causal=True)
    return out.pow(2).mean()


def test_compiled_training_step_is_one_graph():
    """The loss compiled (fullgraph, dynamic) across three batch shapes is one graph, and its backward (AOTAutograd,
    through dmattn::varlen_bwd) gives eager's gradients."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_loss_of_step, backend=counter, fullgraph=True, dynamic=True)
    for seed, (lq, lk) in enumerate([((3, 2), (5, 4)), ((2, 4, 3), (6, 7, 5)), ((5, 3, 2, 4), (9, 8, 7, 6))]):
        grads = []
        for fn in (compiled, _loss_of_step):
            batch = _step_batch(lq, lk, seed)
            leaves = [batch[name].requires_grad_() for name in ("q", "k", "v")]
            weight = torch.tensor(0.5, requires_grad=True)
            fn(**batch, weight=weight).backward()
            grads.append([t.grad for t in (*leaves, weight)])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_bad_backward_variable_is_a_clear_error(monkeypatch):
    sample = make_sample(SAMPLES[0], torch.float32, "cpu")
    leaves, s = _differentiable(sample)
    out, _ = s.run()
    monkeypatch.setenv("DMATTN_BWD", "fast")
    with pytest.raises(ValueError, match="DMATTN_BWD must be kernel or blockwise, got 'fast'"):
        out.sum().backward()
