"""The sm90a prefill kernel (wgmma + TMA; csrc/cuda/sm90a/) beside the sm80 one: calls without mask, bias or key pool
(causal or not, windows, key ranges, softcap, sinks, seqused_k) run on it on a cc 9.0 device, and so do key-side masks
of any heads (with or without a key-side bias), over their kept rows gathered into dense slots (a copy per list where
lists are finer than KV heads; D 64 / 128 / 256), query-side masks without a bias or with a key-side one (their block
map and bits), key-side masks beside a query-side bias, or at D = 256 where their kept rows are not gathered (beside
key ranges, or a copy past 4 GiB: their map and bits by sequence, beside a key-side bias too), a key-side bias alone
(over slots in place; beside a mask that is mapped too, in place), and query-side biases (q's dtype, or float32
on a CTA per unit at D <= 128) alone or beside a query-side mask (each row's elements of a live tile staged by its
threads); every other call (float32 query-side biases at D = 256 among them) runs on the sm80 kernels.
Every shape runs both ways, the sm80 path forced through the documented debug variable DMATTN_ARCH=sm80, each judged
by the float64 reference and the accuracy rule of tests/samples.py. GPU only; on devices other than cc 9.0 (or a
build without the sm90a path) the automatic choice is the sm80 kernel, which test_choice checks."""

import dataclasses
import math
import re

import pytest
import torch

import dmattn_ops
import kernel_matrix as km
from samples import Spec, assert_close_to_reference, make_sample, padded_reason, shared_reference, support_reason
from test_varlen_fwd import LYING, _lying, unread_keys

# Every test here is a CUDA test: the `cuda` mark makes `-k cuda` (tools/run_gpu.sh's default selection) select them
# all, not only those with "cuda" in their names (test_choice, the NaN-poison and non-finite-V tests have none: run
# CI's `-k cuda` left 413 of them out).
pytestmark = pytest.mark.cuda

# auto: the plan's choice (the dynamic scheduler where it applies); sm80: the sm80 kernels forced; persistent3: the
# sm90a kernel wherever it can run (narrow windows too), on a static persistent grid of 3 CTAs (DMATTN_SM90A_CTAS,
# DMATTN_SM90A_SCHED=static), so that each CTA walks many units in turn (empty ones and ones past their sequence
# included); the dynamic scheduler on 3 CTAs is DYNAMIC_GRIDS' dynamic3.
# per_unit: the sm90a kernel wherever it can run, a CTA per unit (DMATTN_SM90A_CTAS=0). narrow: the plain kernel on
# its 128-key tiles at D = 64 too (DMATTN_SM90A_WIDE=off; auto gives it 192-key ones there).
ARCHS = {"auto": {}, "sm80": {"DMATTN_ARCH": "sm80"},
         "persistent3": {"DMATTN_SM90A_CTAS": "3", "DMATTN_SM90A_SCHED": "static"},
         "per_unit": {"DMATTN_SM90A_CTAS": "0"}, "narrow": {"DMATTN_SM90A_WIDE": "off"}}


@pytest.fixture(params=list(ARCHS))
def arch(request, monkeypatch, cuda_device):
    for name, value in ARCHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _sm90a_built() -> bool:
    return bool(dmattn_ops.build_info().get("cuda_arch_paths", {}).get("sm90a", {}).get("head_dims"))


def _sm90a_device() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and _sm90a_built()


def _padded_plan_reason(head_dim: int) -> str:
    """Why the plan a test expects for head_dim does not hold in this build; "" where it does. The expected plans are
    a build's with every sm90a head dim (kernel_matrix.SM90A_HEAD_DIMS), where D runs at the smallest of them >= D; a
    build without that one runs D zero-padded to a larger head dim, whose plans differ (run EJ: a D = 256 build ran
    the D = 64 / 128 specs padded to 256, where a float32 query-side bias takes the sm80 kernels)."""
    built = (dmattn_ops.build_info().get("cuda_arch_paths", {}).get("sm90a", {}).get("head_dims") or ())
    runs_at = min((d for d in built if d >= head_dim), default=None)
    full = min(d for d in km.SM90A_HEAD_DIMS if d >= head_dim)
    if runs_at is None or runs_at == full:
        return ""
    return (f"D = {head_dim} runs zero-padded to {runs_at} in this build (a full build: {full}), whose plan is not "
            "the one asserted here (the result was checked against the reference)")


@pytest.mark.parametrize("built, expected", [((64, 128, 256), {64: "", 96: "", 128: "", 256: ""}),
                                             ((256,), {64: "256", 96: "256", 128: "256", 256: ""}),
                                             ((128,), {64: "128", 96: "", 128: "", 256: ""})],
                         ids=["full", "d256", "d128"])
def test_padded_plan_reason(built, expected, monkeypatch):
    """The plan assertions skip exactly where the build pads a head dim past where a full build runs it (no GPU)."""
    monkeypatch.setattr(dmattn_ops, "build_info", lambda: {"cuda_arch_paths": {"sm90a": {"head_dims": list(built)}}})
    for head_dim, padded_to in expected.items():
        reason = _padded_plan_reason(head_dim)
        assert (f"zero-padded to {padded_to} " in reason) if padded_to else reason == "", (head_dim, reason)


def _cuda_sample(spec, dtype, seed: int = 0):
    """spec's sample on the GPU, or a skip where this build cannot run it (support_reason: a head dim or dtype it was
    not built for)."""
    reason = support_reason(spec, dtype, "cuda")
    if reason:
        pytest.skip(reason)
    return make_sample(spec, dtype, "cuda", seed=seed)


def _check(spec, dtype, label=""):
    sample = _cuda_sample(spec, dtype)  # the same inputs for every path: make_sample's seed is fixed
    out, lse = sample.run()
    references = shared_reference((spec, dtype), lambda: (sample.reference(), sample.reference(sample.dtype)))
    assert_close_to_reference((out, lse), *references, label=label)
    return sample, (out, lse)


def _check_on_path(spec, dtype, path, monkeypatch, capfd, plan_field):
    r"""_check with ARCHS[path] set and the plan logged: the values `plan_field` (a regex of the prefill plan line, e.g.
    r"sm90a_query=(\d)") captured from the call's plan lines."""
    for name, value in ARCHS[path].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    _check(spec, dtype, label=path)
    torch.cuda.synchronize()
    if reason := _padded_plan_reason(spec.head_dim):
        pytest.skip(reason)
    return re.findall(r"kernel=prefill .*" + plan_field, capfd.readouterr().err)


# A skewed batch: one 5000-key sequence amid 129 short ones of odd lengths, for key-side masks mapped by sequence
# (passes.h BlockMap::sequence_row: each sequence's segment sized by its own keys, from after keys that are not
# multiples of 128, not a row of max_seqlen_k per sequence) or gathered (KeptRows::segment, after such keys too).
SKEWED_Q = tuple(i % 5 for i in range(60)) + (300,) + tuple(1 + i % 7 for i in range(69))
SKEWED_K = tuple(1 + (37 * i) % 190 for i in range(60)) + (5000,) + tuple(1 + (53 * i) % 250 for i in range(69))
# Like lengths: 40 sequences of 1 to 128 keys, where the map by sequence takes a stride per sequence (the smaller layout).
LIKE_K = tuple(128 - (29 * i) % 128 for i in range(40))
LIKE_Q = tuple(1 + (11 * i) % 70 for i in range(40))


# Dense shapes: query tiles of 128 rows and key tiles of 128 keys (64 at D = 256) cut everywhere, GQA / MQA / MHA,
# D 64 / 128 / 256 (and 96, padded to 128), causal with more keys than queries and more queries than keys, empty
# sequences, rows past the last sequence, many short sequences.
SPECS = [
    Spec("one_tile", heads=4, heads_k=2, seqlens_q=(37,), seqlens_k=(53,)),
    Spec("tiles_cut_everywhere", heads=8, heads_k=2, seqlens_q=(129, 300, 1), seqlens_k=(257, 128, 700)),
    Spec("causal_more_keys", heads=8, heads_k=8, seqlens_q=(200, 64), seqlens_k=(1000, 64), is_causal=True),
    Spec("causal_more_queries", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3), is_causal=True),
    Spec("causal_long", head_dim=128, heads=8, heads_k=2, seqlens_q=(1500, 513), seqlens_k=(1500, 513),
         is_causal=True),
    Spec("d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(250, 90), seqlens_k=(400, 90), is_causal=True),
    Spec("d96_padded", head_dim=96, heads=4, heads_k=2, seqlens_q=(140,), seqlens_k=(260,)),
    Spec("d256_causal", head_dim=256, heads=4, heads_k=2, seqlens_q=(300, 65, 1), seqlens_k=(400, 65, 130),
         is_causal=True),
    Spec("d256_tiles_cut_everywhere", head_dim=256, heads=4, heads_k=1, seqlens_q=(129, 0, 64), seqlens_k=(193, 5, 63)),
    Spec("empty_sequences", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0)),
    Spec("rows_past_the_end", heads=4, heads_k=2, seqlens_q=(100, 70), seqlens_k=(150, 90), extra_rows_q=9,
         extra_rows_k=13, slack_q=3, slack_k=5, is_causal=True),
    Spec("many_short", heads=4, heads_k=4, seqlens_q=tuple(range(1, 40)), seqlens_k=tuple(range(40, 1, -1))),
    Spec("scale", heads=4, heads_k=2, seqlens_q=(160,), seqlens_k=(160,), softmax_scale=0.5, is_causal=True),
    # More sequences than a persistent launch's unit table holds (255): the launcher splits them over launches.
    Spec("more_sequences_than_a_unit_table", heads=2, heads_k=1, seqlens_q=(300,) + tuple(i % 9 for i in range(299)),
         seqlens_k=(300,) + tuple(i % 13 for i in range(299)), is_causal=True),
]
CUDA_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dense_shapes_match_reference_on_each_path(spec, dtype, arch):
    _check(spec, dtype, label=arch)


# The plain kernel's wide tiles (FwdPlan::sm90a_wide: 192 keys at D = 64, causal or not, unless
# DMATTN_SM90A_WIDE=off): sequences of fewer keys than a tile, of exactly one and two tiles and one key past them, causal
# with more keys or more queries, empty sequences, rows past the last sequence, GQA / MQA / MHA, sinks and seqused_k
# (the plain kernel's extras), more sequences than a persistent launch's unit table, on the prefill kernel (many_short
# would take the decode kernel), each on every grid.
WIDE_SPECS = [
    Spec("one_short_tile", head_dim=64, heads=4, heads_k=2, seqlens_q=(37,), seqlens_k=(53,)),
    Spec("tile_edges", head_dim=64, heads=8, heads_k=2, seqlens_q=(129, 300, 1, 192), seqlens_k=(192, 193, 384, 700)),
    Spec("causal_more_keys", head_dim=64, heads=8, heads_k=8, seqlens_q=(200, 64), seqlens_k=(1000, 64),
         is_causal=True),
    Spec("causal_more_queries", head_dim=64, heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
         is_causal=True),
    Spec("causal_long", head_dim=64, heads=8, heads_k=2, seqlens_q=(1500, 513), seqlens_k=(1500, 513),
         is_causal=True),
    Spec("empty_sequences", head_dim=64, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0)),
    Spec("rows_past_the_end", head_dim=64, heads=4, heads_k=2, seqlens_q=(100, 70), seqlens_k=(150, 90),
         extra_rows_q=9, extra_rows_k=13, slack_q=3, slack_k=5),
    Spec("many_short", head_dim=64, heads=4, heads_k=4, seqlens_q=tuple(range(1, 40)),
         seqlens_k=tuple(range(40, 1, -1))),
    Spec("mqa_long_keys", head_dim=64, heads=8, heads_k=1, seqlens_q=(300,), seqlens_k=(4000,)),
    Spec("sinks", head_dim=64, heads=4, heads_k=2, seqlens_q=(200, 3), seqlens_k=(250, 0), sinks="float32"),
    Spec("seqused_k", head_dim=64, heads=4, heads_k=2, seqlens_q=(130, 1, 64, 0), seqlens_k=(400, 400, 400, 400),
         seqused_k=(300, 400, 0, 9), is_causal=True),
    Spec("more_sequences_than_a_unit_table", head_dim=64, heads=2, heads_k=1,
         seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299))),
]
WIDE_GRIDS = {"auto": {}, "per_unit": {"DMATTN_SM90A_CTAS": "0"}, "dynamic3": {"DMATTN_SM90A_CTAS": "3"},
              "static3": {"DMATTN_SM90A_CTAS": "3", "DMATTN_SM90A_SCHED": "static"}}


@pytest.mark.parametrize("grid", list(WIDE_GRIDS))
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", WIDE_SPECS, ids=lambda s: s.name)
def test_wide_tiles_match_reference(spec, dtype, grid, monkeypatch, capfd, cuda_device):
    """Each spec on wide tiles against the reference, on every grid: the plan's, a CTA per unit, the dynamic and
    static persistent grids of 3 CTAs."""
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    if reason := _padded_plan_reason(spec.head_dim):
        pytest.skip(reason)
    env = {"DMATTN_SM90A_WIDE": "auto", "DMATTN_KERNEL": "prefill", "DMATTN_LOG_PLAN": "1", **WIDE_GRIDS[grid]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    _check(spec, dtype, label="wide")
    torch.cuda.synchronize()
    assert re.findall(r"kernel=prefill .*sm90a_wide=(\d)", capfd.readouterr().err) == ["1"]


# The kernel's ranged variant (a key interval per row: windows, key ranges; the softcap) and what the plain one takes
# on top of dense: sinks, seqused_k. Windows straddle the 128-key tiles on both sides, rows see nothing (windows past
# the sequence, more queries than keys), tiles are seen whole between two edges.
RANGED_SPECS = [
    Spec("window_left_causal", heads=8, heads_k=2, seqlens_q=(700, 129, 1), seqlens_k=(700, 129, 1),
         window=(255, 0), is_causal=True),
    Spec("window_left_not_causal", heads=4, heads_k=2, seqlens_q=(400,), seqlens_k=(520,), window=(130, -1)),
    Spec("window_right_only", heads=4, heads_k=1, seqlens_q=(300, 50), seqlens_k=(260, 400), window=(-1, 70)),
    Spec("window_both_sides", heads=4, heads_k=4, seqlens_q=(333, 90), seqlens_k=(333, 200), window=(100, 40)),
    Spec("window_zero", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(200,), window=(0, 0)),
    Spec("window_more_queries", heads=4, heads_k=2, seqlens_q=(300, 40), seqlens_k=(150, 10), window=(20, 0),
         is_causal=True),
    Spec("window_empty_sequences", heads=4, heads_k=2, seqlens_q=(0, 140, 7, 0), seqlens_k=(30, 0, 300, 0),
         window=(64, 0), is_causal=True, extra_rows_q=5, extra_rows_k=9),
    Spec("window_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(500,), seqlens_k=(500,), window=(96, 0),
         is_causal=True),
    Spec("window_softcap_sinks_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(500, 70), seqlens_k=(520, 90),
         window=(150, 0), is_causal=True, softcap=3.0, sinks="float32"),
    Spec("softcap", heads=4, heads_k=2, seqlens_q=(260, 31), seqlens_k=(300, 31), softcap=2.0),
    Spec("softcap_causal_window", heads=4, heads_k=2, seqlens_q=(400,), seqlens_k=(400,), softcap=5.0,
         window=(150, 0), is_causal=True),
    Spec("sinks", heads=4, heads_k=2, seqlens_q=(200, 3), seqlens_k=(250, 0), sinks="float32", is_causal=True),
    Spec("sinks_q_dtype", heads=4, heads_k=2, seqlens_q=(150,), seqlens_k=(150,), sinks="q", sinks_neg_inf=True),
    Spec("window_softcap_sinks", heads=8, heads_k=2, seqlens_q=(600, 70), seqlens_k=(600, 90), window=(200, 0),
         is_causal=True, softcap=4.0, sinks="float32"),
    Spec("seqused_k", heads=4, heads_k=2, seqlens_q=(130, 1, 64, 0), seqlens_k=(400, 400, 400, 400),
         seqused_k=(300, 400, 0, 9), is_causal=True),
    Spec("seqused_k_window", heads=4, heads_k=2, seqlens_q=(200, 9), seqlens_k=(512, 512), seqused_k=(450, 33),
         window=(128, 0), is_causal=True),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", RANGED_SPECS, ids=lambda s: s.name)
def test_windows_softcap_sinks_match_reference_on_each_path(spec, dtype, arch):
    _check(spec, dtype, label=arch)


@pytest.mark.parametrize("kind", ["window", "prefix", "documents", "random"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_key_ranges_match_reference_on_each_path(kind, causal, arch):
    """Per-query key intervals (key_range) across query and key tiles, against the float64 reference and the same
    intervals as a query-side mask (which always takes the sm80 kernels)."""
    from test_key_range import as_query_mask, make_call, reference, run

    lens = [300, 130, 0, 513, 5]
    call = make_call(lens, [n + 7 if n else 0 for n in lens], kind, H=4, Hk=2, D=128, dtype=torch.bfloat16,
                     device="cuda", seed=3)
    out, lse = run(call, is_causal=causal)
    ref_out, ref_lse = reference(call, is_causal=causal)
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1.6e-2, rtol=1.6e-2)
    m_out, m_lse = run(as_query_mask(call), is_causal=causal)
    torch.testing.assert_close(out, m_out, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(lse, m_lse, atol=1.6e-2, rtol=1.6e-2)


def _plan_sm90a(capfd):
    return [int(x) for x in re.findall(r"kernel=prefill .*sm90a=(\d)", capfd.readouterr().err)]


@pytest.mark.parametrize(
    "spec, sm90a",
    [
        (SPECS[2], True),
        (Spec("window", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), window=(200, 0)), True),
        (Spec("narrow_window", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), window=(100, 0)), False),
        (Spec("softcap", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), softcap=30.0), True),
        (Spec("key_mask", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key"), True),
        (Spec("key_mask_per_head", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key",
              mask_heads="H"), True),
        (Spec("key_bias", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), bias="key"), True),
        (Spec("query_bias", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), bias="query"), True),
        (Spec("d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), is_causal=True), True),
        (Spec("d256_key_mask", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key"),
         True),  # its kept rows gathered into slots (64-key tiles)
        (Spec("d256_key_mask_per_head", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="key", mask_heads="H"), True),  # a kept copy per list
        (Spec("d256_key_mask_key_bias", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="key", bias="key"), True),  # the mask's kept rows and the bias gathered into slots
        (Spec("d256_key_bias", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), bias="key"),
         True),  # slots in place
        (Spec("d256_query_bias_q_dtype", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              bias="query", bias_dtype="q"), True),
        (Spec("d256_query_bias_float32", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              bias="query"), False),  # its terms do not fit beside D = 256's tiles
        (Spec("query_mask", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="query", mask_heads="H"),
         True),
        (Spec("query_mask_key_bias", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="query",
              bias="key"), True),
        (Spec("query_mask_query_bias", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="query",
              bias="query"), True),  # a float32 query-side bias: a CTA per unit
        (Spec("query_mask_query_bias_q_dtype", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="query", bias="query", bias_dtype="q"), True),  # in q's dtype: the consumers read it
        (Spec("query_bias_q_dtype", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), bias="query",
              bias_heads="H", bias_dtype="q"), True),
        (Spec("query_bias_q_dtype_odd_extent", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(301,), bias="query",
              bias_heads="Hk", bias_dtype="q"), True),  # rows of odd length: rows starting at odd elements
        (Spec("d256_query_mask", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="query"), True),
        (Spec("d256_query_mask_key_bias", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="query", bias="key"), True),
        (Spec("key_mask_query_bias", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key",
              bias="query"), True),  # the key-side mask mapped by sequence
        (Spec("key_mask_query_bias_q_dtype", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key",
              mask_heads="H", bias="query", bias_dtype="q"), True),
        (Spec("d256_key_mask_query_bias", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
              mask="key", bias="query", bias_dtype="q"), True),
        (Spec("d256_key_mask_query_bias_float32", head_dim=256, heads=4, heads_k=2, seqlens_q=(200,),
              seqlens_k=(300,), mask="key", bias="query"), False),
    ],
    ids=lambda x: x.name if isinstance(x, Spec) else str(x),
)
def test_choice(spec, sm90a, monkeypatch, capfd, cuda_device):
    """Prefill without mask, bias or key pool, or with a key-side mask, a query-side mask (without bias, with a
    key-side one or with a query-side one), a key-side bias alone or a query-side one (alone or beside a key-side
    mask) (D 64 / 128 / 256), takes the sm90a kernel on a cc 9.0 device with the sm90a path built, and never
    elsewhere; a float32 query-side bias at D = 256 and windows of at most 128 keys take the sm80 kernels;
    DMATTN_ARCH=sm80 forces them."""
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    _check(spec, torch.bfloat16)
    torch.cuda.synchronize()
    if reason := _padded_plan_reason(spec.head_dim):
        pytest.skip(reason)
    assert _plan_sm90a(capfd) == [int(sm90a and _sm90a_device())]
    monkeypatch.setenv("DMATTN_ARCH", "sm80")
    _check(spec, torch.bfloat16)
    torch.cuda.synchronize()
    assert _plan_sm90a(capfd) == [0]


def _assert_variable_refused(monkeypatch, name, value, message):
    """A call under the debug variable `name` set to a bad `value` is a ValueError matching `message`."""
    sample = make_sample(SPECS[0], torch.float16, "cuda")
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        sample.run()


def test_bad_arch_variable_is_a_clear_error(monkeypatch, cuda_device):
    _assert_variable_refused(monkeypatch, "DMATTN_ARCH", "sm100", "DMATTN_ARCH must be auto or sm80, got 'sm100'")


@pytest.mark.parametrize("value", ["gather", "MAP", "1"])
def test_bad_key_mask_variable_is_a_clear_error(value, monkeypatch, cuda_device):
    _assert_variable_refused(monkeypatch, "DMATTN_KEY_MASK", value,
                             f"DMATTN_KEY_MASK must be auto or map, got '{value}'")


@pytest.mark.parametrize("value", ["-2", "many", "70000"])
def test_bad_ctas_variable_is_a_clear_error(value, monkeypatch, cuda_device):
    _assert_variable_refused(monkeypatch, "DMATTN_SM90A_CTAS", value,
                             f"DMATTN_SM90A_CTAS must be an integer in \\[0, 65535\\], got '{value}'")


def test_windowed_calls_run_persistent(monkeypatch, capfd, cuda_device):
    """The static grids (DMATTN_SM90A_SCHED=static; test_dynamic_scheduler_grids has the default's): a windowed call
    (short, alike units) takes a persistent grid of one CTA per SM on the sm90a kernel; a plain causal call and a call
    with key ranges a CTA per unit."""
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    monkeypatch.setenv("DMATTN_SM90A_SCHED", "static")
    sms = torch.cuda.get_device_properties(0).multi_processor_count

    def ctas(spec):
        capfd.readouterr()
        _check(spec, torch.bfloat16)
        torch.cuda.synchronize()
        return [int(x) for x in re.findall(r"sm90a=1 sm90a_slots=\d sm90a_query=\d sm90a_ctas=(\d+)",
                                           capfd.readouterr().err)]

    assert ctas(RANGED_SPECS[0]) == [sms]
    assert ctas(SPECS[2]) == [0]
    monkeypatch.setenv("DMATTN_SM90A_CTAS", "0")
    assert ctas(RANGED_SPECS[0]) == [0]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_v_of_hidden_keys(dtype, arch):
    """Keys a row cannot see never reach it, even with inf / NaN in their V (0 * inf is NaN in the tensor cores): the
    causal diagonal's later keys and the rows past a sequence's end. A visible key's NaN V makes its rows NaN."""
    spec = Spec("nonfinite_v", heads=4, heads_k=2, seqlens_q=(200, 150), seqlens_k=(200, 150), is_causal=True,
                extra_rows_k=7)
    sample = make_sample(spec, dtype, "cuda")
    v = sample.v.clone()
    v[199, 0, 3] = math.inf  # the last key of sequence 0: only its last query (199) sees it
    v[120, 1, 0] = math.nan  # seen by queries 120.. of sequence 0, hidden from 0..119
    v[350:, :, :] = math.nan  # the rows past the last sequence
    out, lse = sample.replace(v=v).run()
    clean, clean_lse = sample.run()
    assert torch.equal(lse, clean_lse)  # lse does not read V
    assert torch.equal(out[:120], clean[:120])  # rows that see neither key: as without them
    assert out[120:199, 1 * 2:2 * 2].isnan().any()  # KV head 1's query heads see the NaN
    assert torch.equal(out[120:199, 0:2], clean[120:199, 0:2])  # KV head 0's do not
    assert not out[199, 0:2].isfinite().all()  # the inf reaches the one row that sees it
    assert torch.equal(out[200:350], clean[200:350])  # sequence 1: untouched by the rows past it


# Ragged sequence ends beside sequences whose rows see no key: 100 rows (one full 64-row half of a query tile, one
# partial), 37 (a partial first half), 64 (one full half, the second past the end) and 200, each followed by a
# sequence without keys.
RAGGED_ENDS_Q = (100, 150, 37, 150, 64, 150, 200, 70)
RAGGED_ENDS_K = (300, 0, 90, 0, 64, 0, 260, 0)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_ragged_ends_leave_the_next_sequence_alone(dtype, head_dim, arch):
    """The sm90a kernel stores a consumer warpgroup's 64 rows by TMA (a whole box) only where all of them lie in the
    sequence; a ragged end's rows go from registers. Each sequence here is followed by one without keys, whose rows
    are exactly 0 (lse -inf) and whose units load nothing, so they finish first: a box stored past a ragged end would
    overwrite them afterwards."""
    spec = Spec("ragged_ends", head_dim=head_dim, heads=4, heads_k=2, seqlens_q=RAGGED_ENDS_Q,
                seqlens_k=RAGGED_ENDS_K)
    _, (out, lse) = _check(spec, dtype, label=arch)
    start = 0
    for q_len, k_len in zip(RAGGED_ENDS_Q, RAGGED_ENDS_K):
        if k_len == 0:
            assert torch.equal(out[start:start + q_len], torch.zeros_like(out[start:start + q_len]))
            assert torch.isneginf(lse[:, start:start + q_len]).all()
        start += q_len


# The dynamic scheduler (DMATTN_SM90A_SCHED=dynamic, here at every head dim; the default but at D = 256, test_plan;
# fwd_kernel.cuh, kDynamic): the plain kernel on a persistent grid whose CTAs take their next unit from a counter,
# longest first within L2 sections. A unit runs the same KV tiles in the same order wherever it runs, so its outputs are
# bitwise those of a CTA per unit (DMATTN_SM90A_CTAS=0). Grids: one CTA per SM; 3 CTAs, each taking many units in turn;
# sections of 1 MB (a KV head or a few per section, so that a sequence's units are numbered over several sections).
# Specs: causal and not, GQA, ragged varlen ends, sequences without keys or queries, causal units whose rows see nothing
# (no Q load, published alone), D 64 / 128 / 256, and more sequences than a launch's unit table (several launches, a
# counter each).
DYNAMIC_GRIDS = {"dynamic": {"DMATTN_SM90A_SCHED": "dynamic"},
                 "dynamic3": {"DMATTN_SM90A_SCHED": "dynamic", "DMATTN_SM90A_CTAS": "3"},
                 "dynamic_1mb": {"DMATTN_SM90A_SCHED": "dynamic", "DMATTN_SM90A_SECTION_MB": "1"}}
DYNAMIC_SPECS = [
    Spec("dense_causal", heads=8, heads_k=2, seqlens_q=(1024, 1024), seqlens_k=(1024, 1024), is_causal=True),
    Spec("dense", heads=8, heads_k=2, seqlens_q=(700, 1024), seqlens_k=(700, 1024)),
    Spec("long_keys", heads=16, heads_k=2, seqlens_q=(300,), seqlens_k=(9000,), is_causal=True),
    Spec("ragged_ends", heads=4, heads_k=2, seqlens_q=RAGGED_ENDS_Q, seqlens_k=RAGGED_ENDS_K, is_causal=True),
    # 1 MB sections of ~1000 keys hold 2 of its 3 KV heads: sections of 4 query heads, then a narrower one of 2
    Spec("uneven_sections", heads=6, heads_k=3, seqlens_q=(1000, 900), seqlens_k=(1000, 900), is_causal=True),
] + [s for s in SPECS if s.name in ("tiles_cut_everywhere", "causal_more_queries", "d64", "d256_causal",
                                     "empty_sequences", "many_short", "more_sequences_than_a_unit_table")]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (NaNs and signed zeros compared exactly)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _run_logged(sample, monkeypatch, capfd, env):
    """sample.run() with env set (and every sm90a grid variable not in it unset), on the prefill kernel (a batch of
    short queries, many_short, would take the decode kernel and log no sm90a grid: run CY), and the grids of its plan
    lines [(sm90a_ctas, sm90a_sched)]. The 128-key tiles unless env asks for wide ones: the grids compared bitwise
    here must run the same tiles."""
    for name in ("DMATTN_SM90A_CTAS", "DMATTN_SM90A_SCHED", "DMATTN_SM90A_SECTION_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DMATTN_SM90A_WIDE", "off")
    monkeypatch.setenv("DMATTN_KERNEL", "prefill")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    out = sample.run()
    torch.cuda.synchronize()
    plans = re.findall(r"kernel=prefill .*sm90a=1 .*sm90a_ctas=(\d+) sm90a_sched=(\w+)", capfd.readouterr().err)
    return out, [(int(c), s) for c, s in plans]


def _assert_dynamic_grid_gives(sample, grid, ref_out, ref_lse, reference, monkeypatch, capfd):
    """sample under DYNAMIC_GRIDS[grid], twice (the second call's counters start from zero too: each call's
    workspace, zeroed before its launches): every plan line on the dynamic scheduler, out and lse bitwise ref_out and
    ref_lse (`reference` names them in the message)."""
    for _ in range(2):
        (out, lse), plans = _run_logged(sample, monkeypatch, capfd, DYNAMIC_GRIDS[grid])
        assert plans and all(c > 0 and s == "dynamic" for c, s in plans), plans
        assert torch.equal(_bits(out), _bits(ref_out)), f"{grid}: out differs from {reference}"
        assert torch.equal(_bits(lse), _bits(ref_lse)), f"{grid}: lse differs from {reference}"


@pytest.mark.parametrize("grid", list(DYNAMIC_GRIDS))
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", DYNAMIC_SPECS, ids=lambda s: s.name)
def test_dynamic_scheduler_is_bitwise_the_cta_per_unit_grid(spec, dtype, grid, monkeypatch, capfd, cuda_device):
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    sample = _cuda_sample(spec, dtype)
    (ref_out, ref_lse), plans = _run_logged(sample, monkeypatch, capfd, {"DMATTN_SM90A_CTAS": "0"})
    assert plans and all(p == (0, "static") for p in plans)
    references = shared_reference((spec, dtype), lambda: (sample.reference(), sample.reference(sample.dtype)))
    assert_close_to_reference((ref_out, ref_lse), *references, label="per_unit")
    _assert_dynamic_grid_gives(sample, grid, ref_out, ref_lse, "a CTA per unit's", monkeypatch, capfd)


@pytest.mark.parametrize("kernels", ["plain", "masked_windowed"])
def test_dynamic_scheduler_in_cuda_graphs_and_on_two_streams(kernels, monkeypatch, capfd, cuda_device):
    """The counter is zeroed in every replay of a captured call (a memset node before the kernel), and two calls on
    two streams at once take units from counters of their own (each call's workspace). masked_windowed: a key-side
    mask's call (the gather, then the kSlots kernel) and a windowed one."""
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    from packed_batch import capture_cuda_graph

    specs = (DYNAMIC_SPECS[0], DYNAMIC_SPECS[1]) if kernels == "plain" else (SLOT_SPECS[4], RANGED_SPECS[0])
    a = make_sample(specs[0], torch.bfloat16, "cuda")
    b = make_sample(specs[1], torch.bfloat16, "cuda")
    (ref_a, ref_a_lse), _ = _run_logged(a, monkeypatch, capfd, {"DMATTN_SM90A_CTAS": "0"})
    (ref_b, ref_b_lse), _ = _run_logged(b, monkeypatch, capfd, {"DMATTN_SM90A_CTAS": "0"})
    monkeypatch.delenv("DMATTN_SM90A_CTAS")  # (set by the reference runs)
    for name, value in {**DYNAMIC_GRIDS["dynamic"], "DMATTN_LOG_PLAN": "1"}.items():
        monkeypatch.setenv(name, value)
    capfd.readouterr()
    graph, (out, lse) = capture_cuda_graph(a.run)
    torch.cuda.synchronize()
    assert "sm90a_sched=dynamic" in capfd.readouterr().err
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(out), _bits(ref_a)) and torch.equal(_bits(lse), _bits(ref_a_lse))
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    s1.wait_stream(torch.cuda.current_stream())
    s2.wait_stream(torch.cuda.current_stream())
    results = []
    for _ in range(3):
        with torch.cuda.stream(s1):
            ra = a.run()
        with torch.cuda.stream(s2):
            rb = b.run()
        results.append((ra, rb))
    torch.cuda.synchronize()
    for (oa, la), (ob, lb) in results:
        assert torch.equal(_bits(oa), _bits(ref_a)) and torch.equal(_bits(la), _bits(ref_a_lse))
        assert torch.equal(_bits(ob), _bits(ref_b)) and torch.equal(_bits(lb), _bits(ref_b_lse))


def test_dynamic_scheduler_grids(monkeypatch, capfd, cuda_device):
    """The dynamic scheduler (the default at D = 128, and DMATTN_SM90A_SCHED=dynamic) gives the plain, windowed and
    kSlots kernels its grid (one CTA per SM; DMATTN_SM90A_CTAS=0 keeps a CTA per unit): a key-side mask's gathered
    slots and a windowed call take their units from the counter too; a query-side mask keeps its static grid
    (persistent at D = 128, a CTA per unit at D = 64). DMATTN_SM90A_SCHED=static: the static grids."""
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    plain = make_sample(DYNAMIC_SPECS[0], torch.bfloat16, "cuda")
    windowed = make_sample(RANGED_SPECS[0], torch.bfloat16, "cuda")
    masked = make_sample(SLOT_SPECS[0], torch.bfloat16, "cuda")
    static = {"DMATTN_SM90A_SCHED": "static"}
    assert _run_logged(plain, monkeypatch, capfd, DYNAMIC_GRIDS["dynamic"])[1] == [(sms, "dynamic")]
    assert _run_logged(plain, monkeypatch, capfd, {})[1] == [(sms, "dynamic")]
    assert _run_logged(plain, monkeypatch, capfd, static)[1] == [(0, "static")]
    assert _run_logged(plain, monkeypatch, capfd, {**DYNAMIC_GRIDS["dynamic"], "DMATTN_SM90A_CTAS": "0"})[1] == \
        [(0, "static")]
    for sample in (windowed, masked):
        assert _run_logged(sample, monkeypatch, capfd, static)[1] == [(sms, "static")]
        assert _run_logged(sample, monkeypatch, capfd, {})[1] == [(sms, "dynamic")]
        assert _run_logged(sample, monkeypatch, capfd, DYNAMIC_GRIDS["dynamic"])[1] == [(sms, "dynamic")]
        assert _run_logged(sample, monkeypatch, capfd, {**DYNAMIC_GRIDS["dynamic"], "DMATTN_SM90A_CTAS": "0"})[1] == \
            [(0, "static")]
    # heuristics.h: a query-side mask alone persistent at D = 128, a CTA per unit at D = 64 (run EF)
    for head_dim, ctas in ((128, sms), (64, 0)):
        if _padded_plan_reason(head_dim):
            continue
        query_masked = make_sample(Spec("query_mask", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,),
                                        head_dim=head_dim, mask="query", mask_heads="H"), torch.bfloat16, "cuda")
        assert _run_logged(query_masked, monkeypatch, capfd, {})[1] == [(ctas, "static")], head_dim
        assert _run_logged(query_masked, monkeypatch, capfd, DYNAMIC_GRIDS["dynamic"])[1] == [(ctas, "static")], \
            head_dim


def test_wide_tiles_choice(monkeypatch, capfd, cuda_device):
    """The plain kernel's wide tiles (heuristics.h, FwdPlan::sm90a_wide; test_plan has the whole rule): a dense call at
    D = 64, causal or not, takes them by default, on the dynamic scheduler's grid; with DMATTN_SM90A_WIDE=off never;
    D = 128 never. Each result is checked against the reference."""
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    if reason := _padded_plan_reason(64):
        pytest.skip(reason)
    dense = Spec("dense", head_dim=64, heads=8, heads_k=2, seqlens_q=(700, 1024), seqlens_k=(700, 1300))
    causal = dataclasses.replace(dense, is_causal=True)
    sms = str(torch.cuda.get_device_properties(0).multi_processor_count)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")

    def plan(spec, wide):
        monkeypatch.setenv("DMATTN_SM90A_WIDE", wide)
        capfd.readouterr()
        _check(spec, torch.bfloat16, label=f"wide={wide}")
        torch.cuda.synchronize()
        return re.findall(r"kernel=prefill .*sm90a=1 .*sm90a_ctas=(\d+) .*sm90a_wide=(\d)", capfd.readouterr().err)

    assert plan(dense, "auto") == [(sms, "1")]
    assert plan(dense, "off") == [(sms, "0")]
    assert plan(causal, "auto") == [(sms, "1")]
    assert plan(causal, "off") == [(sms, "0")]
    if not _padded_plan_reason(128):
        assert all(w == "0" for _, w in plan(dataclasses.replace(dense, head_dim=128), "auto"))


def test_bad_wide_variable_is_a_clear_error(monkeypatch, cuda_device):
    _assert_variable_refused(monkeypatch, "DMATTN_SM90A_WIDE", "192", "DMATTN_SM90A_WIDE must be .*got '192'")


@pytest.mark.parametrize("name, value", [("DMATTN_SM90A_SCHED", "lpt"), ("DMATTN_SM90A_SECTION_MB", "0"),
                                         ("DMATTN_SM90A_SECTION_MB", "8MB")])
def test_bad_sched_variables_are_clear_errors(name, value, monkeypatch, cuda_device):
    _assert_variable_refused(monkeypatch, name, value, f"{name} must be .*got '{value}'")


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_v_outside_the_window(dtype, arch):
    """A window's left edge hides keys inside the tiles a CTA reads: inf / NaN in their V never reach a row whose
    window excludes them, and reach the rows that see them."""
    spec = Spec("nonfinite_v_window", heads=4, heads_k=2, seqlens_q=(400,), seqlens_k=(400,), is_causal=True,
                window=(100, 0))
    sample = make_sample(spec, dtype, "cuda")
    v = sample.v.clone()
    v[150, 1, 5] = math.nan  # seen by queries 150..250 only
    out, lse = sample.replace(v=v).run()
    clean, clean_lse = sample.run()
    assert torch.equal(lse, clean_lse)
    assert torch.equal(out[:150], clean[:150])
    assert torch.equal(out[251:], clean[251:])  # their windows start past key 150, in tiles that hold it
    assert out[150:251, 2:4, 5].isnan().all()
    assert torch.equal(out[150:251, 0:2], clean[150:251, 0:2])


# Three sequences each (the lies of test_varlen_fwd._lying rewrite three): the sm90a kernel's calls, a key-side mask
# (its kept rows gathered) among them.
LYING_SPECS = [
    Spec("lying_causal", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(140, 7, 300), is_causal=True),
    # D = 64: the plain kernel's 192-key tiles (FwdPlan::sm90a_wide)
    Spec("lying_wide", head_dim=64, heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401)),
    Spec("lying_wide_causal", head_dim=64, heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401),
         is_causal=True),
    Spec("lying_window", heads=4, heads_k=2, seqlens_q=(300, 1, 200), seqlens_k=(300, 64, 260), window=(64, 0),
         is_causal=True),
    Spec("lying_key_mask", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400), is_causal=True,
         mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H"),
    Spec("lying_query_mask", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400), is_causal=True,
         mask="query", mask_heads="Hk", keep=0.5),
    Spec("lying_key_bias", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400), is_causal=True,
         bias="key", bias_heads="H"),
    Spec("lying_query_bias", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400), is_causal=True,
         mask="query", mask_heads="Hk", keep=0.5, bias="query", bias_heads="H", bias_dtype="q"),
    # an odd extent (399): rows start at odd elements, so each copies the element before its first
    Spec("lying_query_bias_alone", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(301, 7, 399),
         bias="query", bias_heads="Hk", bias_dtype="q"),
    # and float32 (their own variant, a CTA per unit)
    Spec("lying_query_bias_float32", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400),
         is_causal=True, mask="query", mask_heads="Hk", keep=0.5, bias="query", bias_heads="H"),
    Spec("lying_query_bias_alone_float32", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(301, 7, 399),
         bias="query", bias_heads="Hk"),
    # beside a key-side mask (its map and bits by sequence, read with the clamped key ranges)
    Spec("lying_key_mask_query_bias", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401),
         is_causal=True, mask="key", mask_heads="H", keep=0.5, bias="query", bias_heads="Hk", bias_dtype="q"),
    Spec("lying_key_mask_query_bias_float32", heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 400),
         mask="key", mask_heads="1", keep=0.5, bias="query", bias_heads="H"),
    # D = 256 (64-key tiles): a query-side mask, and a key-side one over its gathered kept rows (mask heads 1 / Hk /
    # H, with a key-side bias or without, causal or windowed or neither: the gather's copies, positions, biases and
    # slot limits of clamped sequences)
    Spec("lying_query_mask_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401),
         is_causal=True, mask="query", mask_heads="H", keep=0.5),
    Spec("lying_key_mask_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401),
         is_causal=True, mask="key", mask_heads="Hk", keep=0.5),
    Spec("lying_key_mask_1_key_bias_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(300, 7, 401), window=(200, 0), is_causal=True, mask="key", mask_heads="1", keep=0.5, bias="key",
         bias_heads="H", bias_dtype="q"),
    Spec("lying_key_mask_h_d256", head_dim=256, heads=4, heads_k=1, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 399),
         mask="key", mask_heads="H", keep=0.5, mask_runs=8),
    # D = 256 biases: a key-side one over slots in place (alone, beside a query-side mask) or over a key-side mask's
    # gathered slots, a query-side one in q's dtype (alone, odd extent; beside a key-side mask, by sequence)
    Spec("lying_key_bias_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260), seqlens_k=(300, 7, 401),
         is_causal=True, bias="key", bias_heads="H"),
    Spec("lying_key_mask_key_bias_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(300, 7, 401), is_causal=True, mask="key", mask_heads="H", keep=0.5, bias="key", bias_heads="Hk"),
    Spec("lying_query_mask_key_bias_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(300, 7, 400), window=(200, 0), is_causal=True, mask="query", mask_heads="Hk", keep=0.5,
         bias="key", bias_heads="1", bias_dtype="q"),
    Spec("lying_query_bias_alone_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(301, 7, 399), bias="query", bias_heads="Hk", bias_dtype="q"),
    Spec("lying_key_mask_query_bias_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(300, 7, 401), is_causal=True, mask="key", mask_heads="1", keep=0.5, bias="query", bias_heads="H",
         bias_dtype="q"),
    # A key-side mask's map by sequence sized by the keys (BlockMap::sequence_extent, 4 (ceil(708 / 128) + 3) = 36
    # blocks a head): honest, the last sequence's segment (from key 130: block 4 ceil(130 / 128) + 8 = 16, 20 blocks)
    # ends at the extent; the lies clamp ranges that start mid-tile and overlap ("overlapping": keys [0, 708) and
    # [212, 708), "decreasing": [0, 708) and [1, 708)), each segment still inside the map. (At D = 256 without a
    # query-side bias the mask's kept rows are gathered instead: the same clamped ranges over KeptRows' segments.)
    Spec("lying_key_mask_query_bias_segment_at_the_extent", heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(100, 30, 578), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="query",
         bias_heads="H", bias_dtype="q"),
    Spec("lying_key_mask_d256_segment_at_the_extent", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 7, 260),
         seqlens_k=(100, 30, 578), mask="key", mask_heads="H", keep=0.5, mask_runs=16),
]


@pytest.mark.parametrize("case", LYING)
@pytest.mark.parametrize("spec", LYING_SPECS, ids=lambda s: s.name)
def test_cuda_lying_cu_seqlens_stay_in_bounds_on_each_path(spec, case, arch):
    """cu_seqlens or max_seqlen that break the contract, on the sm90a kernel (a CTA per unit and persistent) and the
    sm80 one: nothing is read or written out of bounds (compute-sanitizer runs this test: every sequence range is
    clamped as the sm80 kernels clamp it), and the call's every out and lse element is NaN, the lie made visible."""
    sample = _lying(_cuda_sample(spec, torch.bfloat16), case)
    out, lse = sample.run()
    assert out.isnan().all() and lse.isnan().all(), f"{arch}: a broken contract must give NaN everywhere"


# Key-side masks on the sm90a kernel (kept rows gathered into dense slots, passes.h KeptRows): list heads 1 / Hk / H, biases
# of every head broadcast in float32 and q's dtype (-inf entries too), causal with more keys or more queries than the
# other, tiles of kept slots cut everywhere, block-sparse runs, fully masked rows and sequences, empty sequences, rows
# past the last sequence, seqused_k, sinks, windows, softcap, D 64 / 128, MQA and MHA.
SLOT_SPECS = [
    Spec("slots_causal_hk", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260), is_causal=True,
         mask="key", mask_heads="Hk", keep=0.5),
    Spec("slots_bias_h", heads=8, heads_k=2, seqlens_q=(200, 64), seqlens_k=(1000, 64), is_causal=True, mask="key",
         keep=0.4, bias="key", bias_heads="H"),
    Spec("slots_bias_hk_q_dtype", heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 90), mask="key",
         mask_heads="Hk", keep=0.7, bias="key", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True),
    Spec("slots_bias_1_more_queries", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3), is_causal=True,
         mask="key", keep=0.6, bias="key"),
    Spec("slots_runs", heads=8, heads_k=2, seqlens_q=(1500, 513), seqlens_k=(1500, 513), is_causal=True, mask="key",
         mask_heads="Hk", keep=0.3, mask_runs=64, bias="key", bias_heads="Hk"),
    Spec("slots_masked_rows", heads=4, heads_k=2, seqlens_q=(130, 40, 70), seqlens_k=(300, 40, 90), is_causal=True,
         mask="key", mask_heads="Hk", keep=0.5, masked_rows=True, bias="key", bias_heads="H"),
    Spec("slots_empty_and_past_the_end", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0),
         mask="key", keep=0.5, bias="key", bias_heads="Hk", extra_rows_q=9),
    Spec("slots_seqused_sinks_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(250, 90), seqlens_k=(400, 300),
         seqused_k=(333, 120), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H",
         sinks="float32"),
    # Windows and softcap (the kRanged variant over slots): a window's edges cut slot tiles on both sides.
    Spec("slots_window", heads=8, heads_k=2, seqlens_q=(700, 130, 1000), seqlens_k=(700, 300, 1000), window=(300, 0),
         is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H"),
    Spec("slots_window_both_softcap", heads=4, heads_k=2, seqlens_q=(500, 64), seqlens_k=(900, 64), window=(200, 50),
         softcap=30.0, mask="key", keep=0.6, bias="key", bias_heads="Hk", bias_dtype="q"),
    Spec("slots_window_sinks_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(260, 40), seqlens_k=(600, 300),
         seqused_k=(555, 280), window=(150, -1), is_causal=True, sinks="q", mask="key", mask_heads="Hk", keep=0.4),
    # Lists per query head (Hm = H > Hk): a kept copy of K / V per list.
    Spec("slots_per_head_causal_bias_hk", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260),
         is_causal=True, mask="key", mask_heads="H", keep=0.5, bias="key", bias_heads="Hk"),
    Spec("slots_per_head_window_bias_h_q_dtype", heads=4, heads_k=1, seqlens_q=(500, 64), seqlens_k=(900, 64),
         window=(200, 50), mask="key", mask_heads="H", keep=0.4, mask_runs=64, bias="key", bias_heads="H",
         bias_dtype="q"),
    Spec("slots_per_head_masked_rows_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(130, 40, 70),
         seqlens_k=(300, 40, 90), is_causal=True, mask="key", mask_heads="H", keep=0.5, masked_rows=True),
    # More query tiles (67) than one gather CTA finds limits for (64) while the keys give the pass a single CTA.
    Spec("slots_query_tiles_past_a_gather_cta", heads=4, heads_k=2, seqlens_q=(8500, 40), seqlens_k=(100, 60),
         is_causal=True, mask="key", mask_heads="Hk", keep=0.7, bias="key", bias_heads="Hk"),
    # The same with keys for two gather CTAs: the second one writes the limits of query tiles 64-66.
    Spec("slots_query_tiles_two_gather_ctas", heads=4, heads_k=2, seqlens_q=(8500, 40), seqlens_k=(300, 60),
         is_causal=True, mask="key", mask_heads="Hk", keep=0.7, bias="key", bias_heads="Hk"),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SLOT_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_key_side_masks_over_kept_slots_match_reference(spec, dtype, path, monkeypatch, capfd, cuda_device):
    """A key-side mask (with its bias) runs on the sm90a kernel over its kept rows gathered into dense slots
    (persistent on a CTA per SM, on 3 CTAs or a CTA per unit through DMATTN_SM90A_CTAS), and on the sm80 kernels
    forced; each matches the float64 reference, and the plan names the path it took."""
    slots = _check_on_path(spec, dtype, path, monkeypatch, capfd, r"sm90a_slots=(\d)")
    assert slots == [str(int(path != "sm80" and _sm90a_device()))]


# Key-side masks at D = 256 on the sm90a kernel over their kept rows gathered into dense slots (as at D <= 128, in
# 64-key tiles of slots; gather_kept_rows copies rows of 32 vectors in two passes): mask heads 1 / Hk / H (a kept copy
# per list), random and block-sparse masks, causal with more keys or more queries than the other, a sequence whose
# keys are all masked, empty sequences, rows and keys past the end, odd key counts, windows, softcap, sinks,
# seqused_k, lists of more than 1024 64-key tiles, more sequences than a persistent launch's unit table (255), a skewed
# batch (KeptRows segments after key counts that are not multiples of 32), sequences of like lengths, MQA and MHA;
# and beside a key-side bias (heads 1 / Hk / H, float32 and q's dtype, -inf entries too), gathered with the slots.
SLOT_D256_SPECS = [
    Spec("slots_d256_causal_hk", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
         seqlens_k=(700, 128, 260), is_causal=True, mask="key", mask_heads="Hk", keep=0.5),
    Spec("slots_d256_runs_h_odd_keys", head_dim=256, heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 91),
         mask="key", mask_heads="H", keep=0.4, mask_runs=64, slack_k=3),
    Spec("slots_d256_1_more_queries_all_masked", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17, 70),
         seqlens_k=(130, 3, 90), is_causal=True, mask="key", keep=0.6, masked_rows=True),
    Spec("slots_d256_empty_and_past_the_end", head_dim=256, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
         seqlens_k=(20, 0, 141, 0), mask="key", mask_heads="H", keep=0.5, extra_rows_q=9, extra_rows_k=7),
    Spec("slots_d256_window_softcap_sinks_seqused", head_dim=256, heads=4, heads_k=2, seqlens_q=(500, 64),
         seqlens_k=(900, 301), seqused_k=(870, 255), window=(200, 50), softcap=30.0, sinks="q", mask="key",
         mask_heads="Hk", keep=0.6, mask_runs=16),
    Spec("slots_d256_window_causal_h", head_dim=256, heads=4, heads_k=1, seqlens_q=(700, 130), seqlens_k=(700, 300),
         window=(300, 0), is_causal=True, mask="key", mask_heads="H", keep=0.5, mask_runs=32),
    Spec("slots_d256_many_tiles", head_dim=256, heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(9000, 5),
         mask="key", mask_heads="1", keep=0.3, mask_runs=300),
    # a list of more than 2048 64-key tiles of slots (140,001 keys, 97% kept: past the 131,072 keys of the query-side
    # variant's tile list, which the slots do not have), a last tile of odd length, and a window whose tiles are past
    # 1000 (40 queries x 2 heads: more packed rows than the decode kernel takes)
    Spec("slots_d256_past_tile_1024", head_dim=256, heads=2, heads_k=1, seqlens_q=(40, 3), seqlens_k=(140_001, 5),
         mask="key", mask_heads="1", keep=0.97, mask_runs=64),
    Spec("slots_d256_window_past_tile_1024", head_dim=256, heads=2, heads_k=1, seqlens_q=(65,),
         seqlens_k=(66_000,), window=(6_000, 0), is_causal=True, mask="key", mask_heads="1", keep=0.5, mask_runs=16),
    Spec("slots_d256_more_sequences_than_a_unit_table", head_dim=256, heads=2, heads_k=1,
         seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299)),
         is_causal=True, mask="key", mask_heads="H", keep=0.5),
    Spec("slots_d256_all_kept_tails", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 70, 1),
         seqlens_k=(161, 33, 300), mask="key", mask_heads="Hk", keep=1.0, extra_rows_k=9),
    Spec("slots_d256_seqused", head_dim=256, heads=4, heads_k=2, seqlens_q=(200, 40, 130),
         seqlens_k=(300, 140, 90), seqused_k=(400, 0, 57), mask="key", mask_heads="1", keep=0.5, mask_runs=32),
    Spec("slots_d256_more_queries_negative_scale", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17),
         seqlens_k=(130, 3), is_causal=True, softmax_scale=-0.4, mask="key", mask_heads="H", keep=0.5),
    Spec("slots_d256_skewed_batch", head_dim=256, heads=4, heads_k=2, seqlens_q=SKEWED_Q, seqlens_k=SKEWED_K,
         is_causal=True, mask="key", mask_heads="Hk", keep=0.5, mask_runs=16, extra_rows_k=5),
    Spec("slots_d256_like_lengths", head_dim=256, heads=4, heads_k=2, seqlens_q=LIKE_Q, seqlens_k=LIKE_K,
         seqused_k=tuple(max(k - i % 3 * 20, 0) for i, k in enumerate(LIKE_K)), is_causal=True, mask="key",
         mask_heads="Hk", keep=0.5, mask_runs=16),
    # More query tiles (67) than one gather CTA finds limits for (64) while the keys give the pass a single CTA.
    Spec("slots_d256_query_tiles_past_a_gather_cta", head_dim=256, heads=4, heads_k=2, seqlens_q=(8500, 40),
         seqlens_k=(100, 60), is_causal=True, mask="key", mask_heads="Hk", keep=0.7),
    # With a key-side bias: its values gathered beside the kept rows (bias heads 1 / Hk / H, float32 and q's dtype)
    Spec("slots_bias_d256_causal_hk_h", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
         seqlens_k=(700, 128, 260), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key",
         bias_heads="H"),
    Spec("slots_bias_d256_runs_h_odd_keys_neg_inf", head_dim=256, heads=4, heads_k=4, seqlens_q=(257, 90),
         seqlens_k=(513, 91), mask="key", mask_heads="H", keep=0.4, mask_runs=64, slack_k=3, bias="key",
         bias_heads="1", bias_dtype="q", bias_neg_inf=True),
    Spec("slots_bias_d256_1_more_queries_all_masked", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17, 70),
         seqlens_k=(130, 3, 90), is_causal=True, mask="key", keep=0.6, masked_rows=True, bias="key",
         bias_heads="Hk"),
    Spec("slots_bias_d256_empty_and_past_the_end", head_dim=256, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
         seqlens_k=(20, 0, 141, 0), mask="key", mask_heads="H", keep=0.5, bias="key", bias_heads="H",
         extra_rows_q=9, extra_rows_k=7),
    Spec("slots_bias_d256_window_softcap_sinks_seqused", head_dim=256, heads=4, heads_k=2, seqlens_q=(500, 64),
         seqlens_k=(900, 301), seqused_k=(870, 255), window=(200, 50), softcap=30.0, sinks="q", mask="key",
         mask_heads="Hk", keep=0.6, mask_runs=16, bias="key", bias_heads="Hk", bias_dtype="q"),
    Spec("slots_bias_d256_past_tile_1024", head_dim=256, heads=2, heads_k=1, seqlens_q=(40, 3),
         seqlens_k=(66_001, 5), mask="key", mask_heads="1", keep=0.5, mask_runs=64, bias="key", bias_heads="H"),
    Spec("slots_bias_d256_more_sequences_than_a_unit_table", head_dim=256, heads=2, heads_k=1,
         seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299)),
         is_causal=True, mask="key", mask_heads="H", keep=0.5, bias="key", bias_heads="1"),
    Spec("slots_bias_d256_all_kept_tails_negative_scale", head_dim=256, heads=4, heads_k=2, seqlens_q=(130, 70, 1),
         seqlens_k=(161, 33, 300), softmax_scale=-0.4, mask="key", mask_heads="Hk", keep=1.0, extra_rows_k=9,
         bias="key", bias_heads="Hk"),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SLOT_D256_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_d256_key_side_masks_over_kept_slots_match_reference(spec, dtype, path, monkeypatch, capfd,
                                                                  cuda_device):
    """A key-side mask at D = 256 (with its key-side bias or without) runs on the sm90a kernel over its kept rows
    gathered into dense slots, not on its query-side variant (persistent on a CTA per SM, on 3 CTAs or a CTA per unit
    through DMATTN_SM90A_CTAS), and on the sm80 kernels forced (over its kept-key lists); each matches the float64
    reference, and the plan names the path."""
    plan = _check_on_path(spec, dtype, path, monkeypatch, capfd,
                          r"sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)")
    assert plan == [(str(int(path != "sm80" and _sm90a_device())), "0", "0")]


# A few of SLOT_D256_SPECS with DMATTN_KEY_MASK=map: the mask mapped by sequence on the sm90a kernel's query-side
# variant instead of gathered (the plan the binding falls back to where the kept rows' copy cannot be allocated):
# heads 1 / Hk / H, causal, empty sequences and rows past the end, a window with softcap, sinks and seqused_k, a
# skewed batch, more sequences than a unit table, and beside a key-side bias (heads Hk / H / 1, -inf entries, q's
# dtype and float32) over slots in place. All within the map's tile list (131,072 keys).
MAP_D256_SPECS = [spec for spec in SLOT_D256_SPECS if spec.name in (
    "slots_d256_causal_hk", "slots_d256_runs_h_odd_keys", "slots_d256_1_more_queries_all_masked",
    "slots_d256_empty_and_past_the_end", "slots_d256_window_softcap_sinks_seqused", "slots_d256_skewed_batch",
    "slots_d256_more_sequences_than_a_unit_table", "slots_bias_d256_causal_hk_h",
    "slots_bias_d256_runs_h_odd_keys_neg_inf", "slots_bias_d256_window_softcap_sinks_seqused")]
assert len(MAP_D256_SPECS) == 10


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", MAP_D256_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_d256_key_side_masks_mapped_by_sequence_when_forced(spec, dtype, path, monkeypatch, capfd,
                                                                 cuda_device):
    """DMATTN_KEY_MASK=map: a key-side mask at D = 256 that the plan would gather runs mapped by sequence on the sm90a
    kernel's query-side variant (its map and bits, no kept rows; a key-side bias beside it over slots in place;
    persistent on a CTA per SM, on 3 CTAs or a CTA per unit through DMATTN_SM90A_CTAS), and on the sm80 kernels where
    DMATTN_ARCH=sm80 forces them; each matches the float64 reference, and the plan names the path."""
    monkeypatch.setenv("DMATTN_KEY_MASK", "map")
    plan = _check_on_path(spec, dtype, path, monkeypatch, capfd,
                          r"sm90a=(\d) sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)")
    on = str(int(path != "sm80" and _sm90a_device()))
    in_place = on if spec.bias == "key" else "0"  # a key-side bias over slots in place; no kept rows gathered
    assert plan == [(on, in_place, on, in_place)]


# Beside the mask past the cap: nothing, or a key-side bias (q's dtype, -inf entries, a bias head per query head)
# with a window, which takes the query-side variant with the bias over slots in place (kQuery + kSlots beside a map by
# sequence; kRanged): at D = 256 that kernel runs only past the cap now, where SLOT_D256_SPECS gather the mask.
PAST_THE_CAP_OPERANDS = {
    "alone": {},
    "key_bias_window": dict(bias="key", bias_heads="H", bias_dtype="q", bias_neg_inf=True, window=(20_000, 0)),
}


@pytest.mark.parametrize("operands", list(PAST_THE_CAP_OPERANDS))
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_d256_key_side_mask_past_the_kept_row_cap_is_mapped_by_sequence(path, operands, monkeypatch, capfd,
                                                                             cuda_device):
    """At D = 256 a key-side mask whose kept rows' copy would pass kMaxKeptRowBytes (4 GiB: a copy per list of H = 64
    mask heads over 67,500 keys, 4.4 GB, of k and v of 35 MB each) is not gathered: the sm90a kernel's query-side
    variant maps it by sequence (its map and bits; persistent, or as DMATTN_SM90A_CTAS asks), the one way left to that
    variant at D = 256 without key ranges or a query-side bias, and beside a key-side bias (windowed here) the bias
    over slots in place; it matches the float64 reference, as the sm80 kernels do when forced."""
    spec = Spec("key_map_d256_past_the_kept_row_cap", head_dim=256, heads=64, heads_k=1, seqlens_q=(129, 40),
                seqlens_k=(67_000, 500), is_causal=True, mask="key", mask_heads="H", keep=0.5, mask_runs=16,
                **PAST_THE_CAP_OPERANDS[operands])
    assert 2 * sum(spec.seqlens_k) * 64 * 256 * 2 > 4 << 30  # heuristics.h kept_row_bytes > kMaxKeptRowBytes
    plan = _check_on_path(spec, torch.bfloat16, path, monkeypatch, capfd,
                          r"sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)")
    on = str(int(path != "sm80" and _sm90a_device()))
    in_place = on if spec.bias == "key" else "0"  # the bias over slots in place; no kept rows gathered either way
    assert plan == [(in_place, on, in_place)]


@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_key_side_masked_keys_at_d256_never_reach_a_row(mask_heads, is_causal, arch, monkeypatch, capfd):
    """At D = 256 the sm90a kernel gathers a key-side mask's kept rows into dense slots, as at D <= 128, so a masked
    key is neither loaded nor multiplied (docs/contract.md): NaN in the K and V rows of the keys no query head of their
    KV group attends must leave out and lse bit-identical, on the sm90a kernel (a CTA per unit and persistent; the plan
    must show its gathered slots) as on the sm80 one (which never reads them)."""
    dtype = torch.bfloat16
    spec = Spec("skip_masked_d256", head_dim=256, seqlens_q=(130, 1, 200, 0), seqlens_k=(300, 9, 331, 6), heads=4,
                heads_k=2, mask="key", mask_heads=mask_heads, keep=0.4, is_causal=is_causal)
    sample = _cuda_sample(spec, dtype, seed=7)
    unread = unread_keys(sample.mask.cpu(), spec.heads, spec.heads_k)  # (total_k, Hk)
    k, v = sample.k.clone(), sample.v.clone()
    k[unread.to("cuda")] = float("nan")
    v[unread.to("cuda")] = float("nan")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    expected = sample.run()
    poisoned = sample.replace(k=k, v=v).run()
    torch.cuda.synchronize()
    on = str(int(arch != "sm80" and _sm90a_device()))
    plans = re.findall(r"kernel=prefill .*sm90a_slots=(\d) sm90a_query=(\d)", capfd.readouterr().err)
    assert plans == [(on, "0"), (on, "0")]
    for want, got in zip(expected, poisoned):
        assert torch.equal(want, got), f"{arch}: a masked-out key's K or V reached a row"


@pytest.mark.parametrize("key_bias", [False, True], ids=["alone", "key_bias"])
@pytest.mark.parametrize("head_dim", [64, 256])
def test_cuda_key_side_mask_without_room_for_kept_rows_is_mapped_at_d256_else_takes_the_sm80_kernels(
        head_dim, key_bias, monkeypatch, capfd, cuda_device):
    """Where the sm90a kernel's copy of the kept K / V rows (as large as k and v) does not fit in memory, the call runs
    without it instead of failing: at D = 256 on the sm90a kernel's query-side variant, the mask mapped by sequence
    (its map and bits, 90 KB here; a key-side bias over slots in place, 2.4 MB), as DMATTN_KEY_MASK=map would plan
    it; at D = 64 on the sm80 kernels, which gather the kept rows where they are (the kernels there read a map by
    sequence only beside a query-side bias). The allocator is held here to what the inputs, the outputs and the
    kept-key lists or the map need (torch.cuda.set_per_process_memory_fraction)."""
    if not _sm90a_device():
        pytest.skip("the kept rows are copied for the sm90a kernel only (a cc 9.0 device with the sm90a path built)")
    padded = padded_reason(head_dim)
    if padded:
        # (run EB: a build of D = 128 alone ran D = 64 zero-padded, whose padded copies of k and v are themselves
        # more than the room below, and planned it as D = 128)
        pytest.skip(f"{padded}: the room and plans here are those of kernels built at this head dim")
    spec = Spec("slots_without_room", head_dim=head_dim, heads=8, heads_k=8, seqlens_q=(256,) * 4,
                seqlens_k=(16384,) * 4, mask="key", mask_heads="Hk", keep=0.5,
                **(dict(bias="key", bias_heads="Hk") if key_bias else {}))
    sample = _cuda_sample(spec, torch.bfloat16)
    # out, lse (2 MB; 5 MB at D = 256) and the lists (2 MB) or the map's workspace (0.1 MB; 2.4 MB with the bias's
    # slots in place) fit; the kept rows' copy (as large as k and v: 128 MiB, 512 MiB at D = 256) does not
    room = 48 << 20
    assert sample.k.numel() * sample.k.element_size() * 2 > 2 * room
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(sample.q.device).total_memory
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + room) / total))
    try:
        out, lse = sample.run()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    # D = 256: the map by sequence (sm90a=1 sm90a_query=1; no kept rows: sm90a_slots=0, or with the key-side bias
    # sm90a_slots=1 slots_in_place=1, its values over slots in place); D = 64: the sm80 kernels (sm90a=0), not only
    # no gathered slots
    mapped = "1" if head_dim == 256 else "0"
    in_place = mapped if key_bias else "0"
    plan = re.findall(r"kernel=prefill .*sm90a=(\d) sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)",
                      capfd.readouterr().err)
    assert plan == [(mapped, in_place, mapped, in_place)]
    assert_close_to_reference((out, lse), sample.reference(), sample.reference(sample.dtype))


# Query-side masks on the sm90a kernel (its block map and bits, passes.h BlockMap::bits; the producer lists each unit's
# live tiles): mask heads 1 / Hk / H, random and block-sparse masks (dead and whole tiles), causal with more keys or
# more queries than the other, fully masked rows and sequences, empty sequences, rows past the last sequence, an odd
# key extent (the bits' rows of any stride), a sequence of more KV tiles than the producer lists at once (128),
# windows, softcap, sinks, seqused_k, D 64 / 128 / 256 (64-key tiles: half of a 128-key tile's bits), MQA and MHA;
# and with a key-side bias beside the mask (D <= 128).
QUERY_SPECS = [
    Spec("query_causal_hk", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260), is_causal=True,
         mask="query", mask_heads="Hk", keep=0.5),
    Spec("query_runs_h", heads=8, heads_k=2, seqlens_q=(1500, 513), seqlens_k=(1500, 513), is_causal=True,
         mask="query", mask_heads="H", keep=0.3, mask_runs=128),
    Spec("query_runs_1_odd_extent", heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 90), mask="query",
         keep=0.5, mask_runs=200, slack_k=3),
    Spec("query_1_more_queries", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3), is_causal=True,
         mask="query", keep=0.6),
    Spec("query_masked_rows", heads=4, heads_k=2, seqlens_q=(130, 40, 70), seqlens_k=(300, 40, 90), is_causal=True,
         mask="query", mask_heads="Hk", keep=0.5, masked_rows=True),
    Spec("query_empty_and_past_the_end", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0),
         mask="query", mask_heads="H", keep=0.5, extra_rows_q=9, extra_rows_k=5),
    Spec("query_seqused_sinks_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(250, 90), seqlens_k=(400, 300),
         seqused_k=(333, 120), is_causal=True, mask="query", mask_heads="Hk", keep=0.5, sinks="float32"),
    Spec("query_many_tiles", heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(17000, 5), mask="query",
         mask_heads="Hk", keep=0.4, mask_runs=300),
    Spec("query_window", heads=8, heads_k=2, seqlens_q=(700, 130, 1000), seqlens_k=(700, 300, 1000),
         window=(300, 0), is_causal=True, mask="query", mask_heads="Hk", keep=0.5),
    # a negative scale (its own pass over the scores: it cannot fold into the exponent over -inf), limits and mask
    Spec("query_window_negative_scale", heads=4, heads_k=2, seqlens_q=(300, 17), seqlens_k=(400, 3), window=(200, 50),
         softmax_scale=-0.4, mask="query", mask_heads="Hk", keep=0.5),
    Spec("query_window_both_softcap", heads=4, heads_k=2, seqlens_q=(500, 64), seqlens_k=(900, 64), window=(200, 50),
         softcap=30.0, mask="query", mask_heads="H", keep=0.6, mask_runs=40),
    # A key-side bias beside the query-side mask (its values per key over slots in place).
    Spec("query_key_bias_causal", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260),
         is_causal=True, mask="query", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H"),
    Spec("query_runs_key_bias_q_dtype", heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 90), mask="query",
         mask_heads="H", keep=0.4, mask_runs=128, bias="key", bias_dtype="q", bias_neg_inf=True, slack_k=3),
    Spec("query_key_bias_window_sinks_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(260, 40),
         seqlens_k=(600, 300), seqused_k=(555, 280), window=(150, -1), is_causal=True, sinks="q", mask="query",
         keep=0.6, bias="key", bias_heads="Hk"),
    # D = 256: 64-key tiles, each reading words [2 n, 2 n + 2) of the bits' 128-key layout.
    Spec("query_d256_causal_hk", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
         seqlens_k=(700, 128, 260), is_causal=True, mask="query", mask_heads="Hk", keep=0.5),
    Spec("query_d256_runs_h_odd_keys", head_dim=256, heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 91),
         mask="query", mask_heads="H", keep=0.4, mask_runs=64, slack_k=3),
    Spec("query_d256_1_more_queries_masked_rows", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17, 70),
         seqlens_k=(130, 3, 90), is_causal=True, mask="query", keep=0.6, masked_rows=True),
    Spec("query_d256_empty_and_past_the_end", head_dim=256, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
         seqlens_k=(20, 0, 140, 0), mask="query", mask_heads="H", keep=0.5, extra_rows_q=9, extra_rows_k=5),
    Spec("query_d256_window_softcap_sinks_seqused", head_dim=256, heads=4, heads_k=2, seqlens_q=(500, 64),
         seqlens_k=(900, 301), seqused_k=(870, 255), window=(200, 50), softcap=30.0, sinks="float32", mask="query",
         mask_heads="Hk", keep=0.6, mask_runs=40),
    Spec("query_d256_many_tiles", head_dim=256, heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(9000, 5),
         mask="query", mask_heads="1", keep=0.4, mask_runs=300),
    # more than 1024 64-key tiles (a mask per query head: not the decode kernel's); a negative scale
    Spec("query_d256_past_tile_1024", head_dim=256, heads=2, heads_k=1, seqlens_q=(40, 3), seqlens_k=(66_001, 5),
         is_causal=True, mask="query", mask_heads="H", keep=0.5, mask_runs=64),
    Spec("query_d256_negative_scale", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
         is_causal=True, softmax_scale=-0.4, mask="query", mask_heads="H", keep=0.5),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", QUERY_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_query_side_masks_match_reference(spec, dtype, path, monkeypatch, capfd, cuda_device):
    """A query-side mask, without bias or with a key-side one, runs on the sm90a kernel (a CTA per unit, or
    persistent where the plan or DMATTN_SM90A_CTAS says so) over its block map and bits, and on the sm80 kernels
    forced; each matches the float64 reference, and the plan names the path it took."""
    query = _check_on_path(spec, dtype, path, monkeypatch, capfd, r"sm90a_query=(\d)")
    assert query == [str(int(path != "sm80" and _sm90a_device()))]


def _assert_hidden_nan_v_stays_out(sample, **hiding):
    """Key 150's V holds a NaN at KV head 1, column 7, and `hiding` (the sample's mask or bias, replaced) hides the key
    from queries 0..199 of every head: those rows, and every lse, are bit-identical to the call with a finite V; the
    rows it is shown to get the NaN in KV head 1's query heads (2, 3) and nothing in the others."""
    v = sample.v.clone()
    v[150, 1, 7] = math.nan
    clean, clean_lse = sample.replace(**hiding).run()
    out, lse = sample.replace(v=v, **hiding).run()
    assert torch.equal(lse, clean_lse)
    assert torch.equal(out[:200], clean[:200])
    assert out[200:, 2:4, 7].isnan().all()
    assert torch.equal(out[200:, 0:2], clean[200:, 0:2])


@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_v_of_query_masked_keys(dtype, head_dim, arch):
    """A key a query-side mask hides from some rows, with NaN in its V, never reaches those rows (its tile is masked:
    the V scan zeroes it for them), and reaches the rows the mask shows it to (128-key tiles, and D = 256's 64)."""
    spec = Spec("nonfinite_v_query_mask", head_dim=head_dim, heads=4, heads_k=2, seqlens_q=(300,), seqlens_k=(300,),
                mask="query", mask_heads="H", keep=1.0)
    sample = _cuda_sample(spec, dtype)
    mask = sample.mask.clone()
    mask[:200, :, 150] = False  # key 150 hidden from queries 0..199 of every head
    _assert_hidden_nan_v_stays_out(sample, mask=mask)


# Query-side biases in q's dtype on the sm90a kernel (its consumers stage the words of each live tile's rows in
# shared memory): alone (every tile live, no map) and beside a query-side mask, bias heads 1 / Hk / H, -inf entries,
# rows starting at odd elements (an odd extent) and sequences of odd key counts (a row's last word half outside it: a
# 2-byte copy), causal with more keys or more queries, empty sequences and rows past the end, windows, softcap,
# sinks, seqused_k, a sequence of many KV tiles, D 64 / 128 / 256; float32 biases (their own variant, a CTA per unit:
# alone and with a mask, -inf entries, windows, D 64 / 128; at D = 256 the sm80 kernels).
QUERY_BIAS_SPECS = [
    (Spec("qbias_alone_causal_h", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260),
          is_causal=True, bias="query", bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_mask_hk_neg_inf_odd_keys", heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 91),
          slack_k=1, mask="query", mask_heads="Hk", keep=0.5, mask_runs=64, bias="query", bias_heads="Hk",
          bias_dtype="q", bias_neg_inf=True), True),
    (Spec("qbias_1_more_queries_negative_scale", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
          is_causal=True, softmax_scale=-0.4, bias="query", bias_dtype="q"), True),
    (Spec("qbias_mask_h_empty_and_past_the_end", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
          seqlens_k=(20, 0, 140, 0), mask="query", mask_heads="H", keep=0.5, bias="query", bias_heads="H",
          bias_dtype="q", extra_rows_q=9, extra_rows_k=5), True),
    (Spec("qbias_window_softcap_sinks_seqused_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(260, 40),
          seqlens_k=(600, 300), seqused_k=(555, 281), window=(150, -1), is_causal=True, softcap=30.0,
          sinks="float32", bias="query", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True), True),
    (Spec("qbias_mask_window_both_softcap", heads=4, heads_k=2, seqlens_q=(500, 64), seqlens_k=(900, 64),
          window=(200, 50), softcap=30.0, mask="query", mask_heads="H", keep=0.6, mask_runs=40, bias="query",
          bias_heads="1", bias_dtype="q", head_dim=128), True),
    (Spec("qbias_many_tiles", heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(17000, 5), bias="query",
          bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_float32", heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(300, 90), is_causal=True,
          bias="query", bias_heads="H"), True),
    (Spec("qbias_float32_mask_neg_inf_d128", head_dim=128, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
          seqlens_k=(701, 128, 260), is_causal=True, mask="query", mask_heads="Hk", keep=0.5, mask_runs=64,
          bias="query", bias_heads="Hk", bias_neg_inf=True, extra_rows_q=3), True),
    (Spec("qbias_float32_window_softcap_sinks", head_dim=128, heads=4, heads_k=2, seqlens_q=(500, 64),
          seqlens_k=(900, 64), window=(200, 0), is_causal=True, softcap=30.0, sinks="float32", bias="query",
          bias_heads="1"), True),
    (Spec("qbias_float32_mask_d64_many_tiles", head_dim=64, heads=2, heads_k=1, seqlens_q=(130, 3),
          seqlens_k=(17000, 5), mask="query", mask_heads="H", keep=0.4, mask_runs=300, bias="query",
          bias_heads="H"), True),
    (Spec("qbias_odd_extent", heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(301, 90), is_causal=True,
          mask="query", bias="query", bias_heads="Hk", bias_dtype="q"), True),
    (Spec("qbias_odd_extent_h_neg_inf", heads=8, heads_k=2, seqlens_q=(129, 3, 300), seqlens_k=(257, 1, 129),
          bias="query", bias_heads="H", bias_dtype="q", bias_neg_inf=True, extra_rows_q=3), True),
    # Beside a key-side mask (its map and bits by sequence): mask heads 1 / Hk / H, runs of kept keys (whole tiles
    # dead, whole tiles shown) and scattered ones, a sequence whose keys are all masked, empty sequences, rows and keys
    # past the end, windows, softcap, sinks, seqused_k, many KV tiles, D 64 / 128, both bias dtypes.
    (Spec("qbias_key_mask_1_causal", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260),
          is_causal=True, mask="key", mask_heads="1", keep=0.5, bias="query", bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_key_mask_hk_runs_all_masked", heads=4, heads_k=2, seqlens_q=(257, 90, 40), seqlens_k=(513, 91, 200),
          mask="key", mask_heads="Hk", keep=0.5, mask_runs=128, masked_rows=True, bias="query", bias_heads="Hk",
          bias_dtype="q", bias_neg_inf=True, extra_rows_q=5, extra_rows_k=7), True),
    (Spec("qbias_key_mask_h_empty_window_softcap", heads=4, heads_k=2, seqlens_q=(0, 330, 5, 0),
          seqlens_k=(20, 0, 640, 0), window=(200, 50), softcap=30.0, mask="key", mask_heads="H", keep=0.4,
          mask_runs=16, bias="query", bias_heads="1", bias_dtype="q", head_dim=128), True),
    (Spec("qbias_key_mask_sinks_seqused_d64_many_tiles", head_dim=64, heads=2, heads_k=1, seqlens_q=(130, 3),
          seqlens_k=(17000, 5), seqused_k=(16001, 4), sinks="float32", mask="key", mask_heads="H", keep=0.3,
          mask_runs=300, bias="query", bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_float32_key_mask_hk_neg_inf_d128", head_dim=128, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
          seqlens_k=(701, 128, 260), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, mask_runs=64,
          bias="query", bias_heads="Hk", bias_neg_inf=True), True),
    (Spec("qbias_float32_key_mask_1_all_masked", heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(300, 90),
          mask="key", keep=0.6, masked_rows=True, bias="query", bias_heads="H"), True),
    # more sequences than a persistent launch's unit table (255): the map's sequence is the launch's seq0 + z
    (Spec("qbias_key_mask_more_sequences_than_a_unit_table", heads=2, heads_k=1,
          seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299)),
          is_causal=True, mask="key", mask_heads="H", keep=0.5, bias="query", bias_heads="H", bias_dtype="q"), True),
    # every key kept: live tiles the map shows whole, the last ones cut by the sequence's end
    (Spec("qbias_key_mask_all_kept_tails", heads=4, heads_k=2, seqlens_q=(130, 70, 1), seqlens_k=(161, 33, 300),
          mask="key", mask_heads="Hk", keep=1.0, bias="query", bias_heads="H", bias_dtype="q", extra_rows_k=9), True),
    # seqused_k above, at none of and below its range: the map reads key_seq's keys, not cu_seqlens_k's
    (Spec("qbias_key_mask_seqused", heads=4, heads_k=2, seqlens_q=(200, 40, 130), seqlens_k=(300, 140, 90),
          seqused_k=(400, 0, 57), mask="key", mask_heads="1", keep=0.5, mask_runs=32, bias="query", bias_heads="Hk",
          bias_dtype="q"), True),
    (Spec("qbias_key_mask_more_queries_negative_scale", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
          is_causal=True, softmax_scale=-0.4, mask="key", mask_heads="H", keep=0.5, bias="query", bias_dtype="q"),
     True),
    # a skewed batch: one long sequence amid 129 short ones of odd lengths (each sequence's map segment sized by its
    # own keys, BlockMap::sequence_row); and a last segment that ends exactly at the map's extent (708 keys, B = 3)
    (Spec("qbias_key_mask_skewed_batch", heads=4, heads_k=2, seqlens_q=SKEWED_Q, seqlens_k=SKEWED_K, is_causal=True,
          mask="key", mask_heads="H", keep=0.5, mask_runs=16, bias="query", bias_heads="Hk", bias_dtype="q",
          extra_rows_k=5), True),
    (Spec("qbias_key_mask_segment_at_the_extent", heads=4, heads_k=2, seqlens_q=(130, 7, 260),
          seqlens_k=(100, 30, 578), mask="key", mask_heads="Hk", keep=0.5, bias="query", bias_heads="H",
          bias_dtype="q"), True),
    (Spec("qbias_d256_key_mask_skewed_batch", head_dim=256, heads=4, heads_k=2, seqlens_q=SKEWED_Q,
          seqlens_k=SKEWED_K, mask="key", mask_heads="1", keep=0.5, mask_runs=16, bias="query", bias_heads="H",
          bias_dtype="q"), True),
    # windowed in q's dtype: the one mixed call the plan runs persistent
    (Spec("qbias_key_mask_window_persistent", heads=8, heads_k=2, seqlens_q=(500, 64), seqlens_k=(900, 64),
          window=(255, 0), is_causal=True, mask="key", mask_heads="H", keep=0.5, mask_runs=16, bias="query",
          bias_heads="1", bias_dtype="q"), True),
    # D = 256 (64-key tiles: a row's 33 words of a tile staged, 18 KB): q's dtype alone, beside a query-side mask and
    # beside a key-side one (by sequence), the cases above at its tile size; float32 takes the sm80 kernels there
    (Spec("qbias_d256_alone_causal_h", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
          seqlens_k=(700, 128, 260), is_causal=True, bias="query", bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_d256_mask_hk_neg_inf_odd_keys", head_dim=256, heads=4, heads_k=4, seqlens_q=(257, 90),
          seqlens_k=(513, 91), slack_k=1, mask="query", mask_heads="Hk", keep=0.5, mask_runs=64, bias="query",
          bias_heads="Hk", bias_dtype="q", bias_neg_inf=True), True),
    (Spec("qbias_d256_1_more_queries_negative_scale", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17),
          seqlens_k=(130, 3), is_causal=True, softmax_scale=-0.4, bias="query", bias_dtype="q"), True),
    (Spec("qbias_d256_mask_h_empty_and_past_the_end", head_dim=256, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
          seqlens_k=(20, 0, 140, 0), mask="query", mask_heads="H", keep=0.5, bias="query", bias_heads="H",
          bias_dtype="q", extra_rows_q=9, extra_rows_k=5), True),
    (Spec("qbias_d256_window_softcap_sinks_seqused", head_dim=256, heads=6, heads_k=3, seqlens_q=(260, 40),
          seqlens_k=(600, 300), seqused_k=(555, 281), window=(150, -1), is_causal=True, softcap=30.0,
          sinks="float32", bias="query", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True), True),
    (Spec("qbias_d256_odd_extent_h_neg_inf", head_dim=256, heads=8, heads_k=2, seqlens_q=(129, 3, 300),
          seqlens_k=(257, 1, 129), bias="query", bias_heads="H", bias_dtype="q", bias_neg_inf=True, extra_rows_q=3),
     True),
    (Spec("qbias_d256_many_tiles", head_dim=256, heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(17000, 5),
          bias="query", bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_d256_key_mask_hk_runs_all_masked", head_dim=256, heads=4, heads_k=2, seqlens_q=(257, 90, 40),
          seqlens_k=(513, 91, 200), mask="key", mask_heads="Hk", keep=0.5, mask_runs=64, masked_rows=True,
          bias="query", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True, extra_rows_q=5, extra_rows_k=7), True),
    (Spec("qbias_d256_key_mask_window_persistent", head_dim=256, heads=8, heads_k=2, seqlens_q=(500, 64),
          seqlens_k=(900, 64), window=(255, 0), is_causal=True, mask="key", mask_heads="H", keep=0.5, mask_runs=16,
          bias="query", bias_heads="1", bias_dtype="q"), True),
    (Spec("qbias_d256_query_mask_causal_window_h", head_dim=256, heads=8, heads_k=2, seqlens_q=(500, 129, 1),
          seqlens_k=(900, 128, 260), window=(300, 0), is_causal=True, mask="query", mask_heads="H", keep=0.5,
          mask_runs=16, bias="query", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True), True),
    (Spec("qbias_d256_query_mask_causal_1", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17),
          seqlens_k=(400, 3), is_causal=True, mask="query", mask_heads="1", keep=0.6, bias="query",
          bias_heads="H", bias_dtype="q"), True),
    (Spec("qbias_d256_float32", head_dim=256, heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(300, 90),
          is_causal=True, mask="query", bias="query", bias_heads="H"), False),
    (Spec("qbias_d256_float32_key_mask", head_dim=256, heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(300, 90),
          mask="key", keep=0.6, bias="query", bias_heads="Hk"), False),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec, on_sm90a", QUERY_BIAS_SPECS, ids=lambda x: x.name if isinstance(x, Spec) else "")
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_query_side_biases_match_reference(spec, on_sm90a, dtype, path, monkeypatch, capfd, cuda_device):
    """A query-side bias (q's dtype or float32), alone or beside a query-side or key-side mask, runs on the sm90a
    kernel's query-side variants (a CTA per unit, or persistent for 16-bit biases), and on the sm80 kernels forced; each
    matches the float64 reference, and the plan names the path it took (a float32 bias: a CTA per unit, even where
    DMATTN_SM90A_CTAS asks for a persistent grid)."""
    plan = _check_on_path(spec, dtype, path, monkeypatch, capfd, r"sm90a_query=(\d) sm90a_ctas=(\d+)")
    on = on_sm90a and path != "sm80" and _sm90a_device()
    assert [query for query, _ in plan] == [str(int(on))]
    if on and spec.bias_dtype == "float32":
        assert plan[0][1] == "0"


def _hidden_positions(sample, window_left):
    """(total_q, max_seqlen_k) bool: the (query, key position) entries no row can see in a causal call with that left
    window edge: past the causal limit, before the window, at or past the sequence's keys, and rows no sequence owns."""
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    hidden = torch.ones(sample.q.shape[0], sample.max_seqlen_k, dtype=torch.bool)
    j = torch.arange(sample.max_seqlen_k)
    for b in range(len(cu_q) - 1):
        lq, lk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        for i in range(lq):
            aligned = i + lk - lq
            hidden[cu_q[b] + i] = (j > aligned) | (j < aligned - window_left) | (j >= lk)
    return hidden


@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("bias_dtype", ["q", "float32"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_cuda_query_side_bias_of_hidden_entries_is_never_read_into_a_row(dtype, bias_dtype, head_dim, arch):
    """NaN in every query-side bias entry no row can see (past the causal limit, before a window's left edge, at or
    past its sequence's keys, in rows no sequence owns), at the prefill scale of the sm90a kernel's tiles (128 keys,
    D = 256's 64), with rows starting at odd elements (an odd extent): out and lse bit-identical to the call with
    finite values there."""
    spec = Spec("qbias_hidden_nan", head_dim=head_dim, heads=4, heads_k=2, seqlens_q=(300, 129, 40),
                seqlens_k=(701, 129, 300), window=(200, 0), is_causal=True, bias="query", bias_heads="H",
                bias_dtype=bias_dtype, extra_rows_q=5)
    sample = _cuda_sample(spec, dtype)
    hidden = _hidden_positions(sample, 200).to("cuda")
    assert hidden.any() and (~hidden).any()
    poisoned = sample.bias.clone()
    poisoned[hidden.unsqueeze(1).expand_as(poisoned)] = math.nan
    clean = sample.run()
    got = sample.replace(bias=poisoned).run()
    assert torch.equal(got[0], clean[0]) and torch.equal(got[1], clean[1])


@pytest.mark.parametrize("bias_dtype, head_dim", [("q", 128), ("float32", 128), ("q", 256)])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("path", ["auto", "sm80"])
def test_cuda_query_side_bias_with_key_ranges(dtype, bias_dtype, head_dim, path, monkeypatch, capfd, cuda_device):
    """Key ranges (one interval per query, the ranged variant with a CTA per unit) beside a query-side bias (q's
    dtype or float32) and a query-side mask: the sm90a kernel takes the call (the plan says so) and matches the
    reference, as the sm80 kernels do when forced."""
    spec = Spec("qbias_key_ranges", head_dim=head_dim, heads=8, heads_k=2, seqlens_q=(300, 129, 7),
                seqlens_k=(520, 129, 300), is_causal=True, mask="query", mask_heads="Hk", keep=0.7,
                bias="query", bias_heads="H", bias_dtype=bias_dtype, bias_neg_inf=True)
    sample = _cuda_sample(spec, dtype)
    g = torch.Generator().manual_seed(11)
    starts = torch.randint(0, 400, (sample.q.shape[0],), generator=g)
    lengths = torch.randint(0, 300, (sample.q.shape[0],), generator=g)
    ranged = sample.replace(key_range=torch.stack([starts, starts + lengths], dim=1).to(torch.int32).to("cuda"))
    for name, value in ARCHS[path].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    out, lse = ranged.run()
    torch.cuda.synchronize()
    query = re.findall(r"kernel=prefill .*sm90a_query=(\d)", capfd.readouterr().err)
    assert_close_to_reference((out, lse), ranged.reference(), ranged.reference(ranged.dtype), label=path)
    if reason := _padded_plan_reason(spec.head_dim):
        pytest.skip(reason)
    assert query == [str(int(path != "sm80" and _sm90a_device()))]


@pytest.mark.parametrize("mask", ["key", "query"])
@pytest.mark.parametrize("path", ["auto", "sm80"])
def test_cuda_d256_masks_with_key_ranges(mask, path, monkeypatch, capfd, cuda_device):
    """Key ranges beside a mask at D = 256: the sm90a kernel's query-side variant (ranged, a CTA per unit; a key-side
    mask mapped by sequence, since its gathered slots know no key ranges, and at D <= 128 takes the sm80 kernels with
    them) takes the call and matches the reference, as the sm80 kernels do when forced."""
    spec = Spec("d256_mask_key_ranges", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 7),
                seqlens_k=(520, 129, 300), is_causal=True, mask=mask, mask_heads="Hk", keep=0.6, mask_runs=16)
    sample = _cuda_sample(spec, torch.bfloat16)
    g = torch.Generator().manual_seed(13)
    starts = torch.randint(0, 400, (sample.q.shape[0],), generator=g)
    lengths = torch.randint(0, 300, (sample.q.shape[0],), generator=g)
    ranged = sample.replace(key_range=torch.stack([starts, starts + lengths], dim=1).to(torch.int32).to("cuda"))
    for name, value in ARCHS[path].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    out, lse = ranged.run()
    torch.cuda.synchronize()
    query = re.findall(r"kernel=prefill .*sm90a_query=(\d) sm90a_ctas=(\d+)", capfd.readouterr().err)
    assert query == [(str(int(path != "sm80" and _sm90a_device())), "0")]
    assert_close_to_reference((out, lse), ranged.reference(), ranged.reference(ranged.dtype), label=path)


@pytest.mark.parametrize("shift, bias_dtype, on_sm90a", [(1, "q", False), (2, "q", False), (8, "q", True),
                                                        (1, "float32", True)],
                         ids=["2_bytes", "4_bytes", "16_bytes", "float32_4_bytes"])
def test_cuda_query_side_bias_off_a_chunk_boundary_takes_the_sm80_kernels(shift, bias_dtype, on_sm90a, monkeypatch,
                                                                          capfd, cuda_device):
    """A 16-bit query-side bias whose first element is not 16-byte aligned (a view one or two elements into its
    storage) would make the sm90a kernel read the bytes before it in their 16-byte chunk for its first row: such a
    call takes the sm80 kernels; eight elements in (16 bytes) it runs on the sm90a kernel, as a float32 bias one
    element (4 bytes) in does (its words copied one by one). Every call matches the reference."""
    spec = Spec("qbias_unaligned", heads=4, heads_k=2, seqlens_q=(200, 70), seqlens_k=(300, 91), is_causal=True,
                bias="query", bias_heads="Hk", bias_dtype=bias_dtype)
    sample = make_sample(spec, torch.bfloat16, "cuda")
    storage = torch.empty(sample.bias.numel() + shift, dtype=sample.bias.dtype, device="cuda")
    shifted = storage[shift:].view(sample.bias.shape)
    shifted.copy_(sample.bias)
    assert shifted.data_ptr() % 16 == shift * sample.bias.element_size() % 16
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    want = sample.run()
    got = sample.replace(bias=shifted).run()
    torch.cuda.synchronize()
    plans = re.findall(r"kernel=prefill .*sm90a_query=(\d)", capfd.readouterr().err)
    for result in (want, got):
        assert_close_to_reference(result, sample.reference(), sample.reference(sample.dtype))
    if reason := _padded_plan_reason(spec.head_dim):
        pytest.skip(reason)
    assert plans == [str(int(_sm90a_device())), str(int(_sm90a_device() and on_sm90a))]


@pytest.mark.parametrize("bias_dtype, head_dim", [("q", 128), ("float32", 128), ("q", 256)])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_v_under_a_neg_inf_query_side_bias(dtype, bias_dtype, head_dim, arch):
    """On the sm90a kernel, a key that a -inf query-side bias element gives weight 0 in some rows, with NaN in its V,
    leaves those rows as they are with a finite V there (the V scan runs on every tile of a query-side bias, v's
    flags aside), and reaches the rows whose bias for it is finite."""
    if arch == "sm80" or not _sm90a_device():
        # docs/contract.md, "Non-finite q, k, V": V of a key of weight exactly 0 is unspecified when not finite. The
        # sm80 kernels scan V only on tiles where a mask or the bounds hide keys, so there such rows become NaN (run
        # CH); the sm90a kernel promises more.
        pytest.skip("the sm80 kernels leave a weight-0 key's non-finite V unspecified (docs/contract.md)")
    if reason := _padded_plan_reason(head_dim):  # padded to 256, a float32 bias takes the sm80 kernels
        pytest.skip(reason)
    spec = Spec("nonfinite_v_query_bias", head_dim=head_dim, heads=4, heads_k=2, seqlens_q=(300,), seqlens_k=(300,),
                bias="query", bias_heads="H", bias_dtype=bias_dtype)
    sample = _cuda_sample(spec, dtype)
    bias = sample.bias.clone()
    bias[:200, :, 150] = -math.inf  # key 150 weightless for queries 0..199 of every head
    _assert_hidden_nan_v_stays_out(sample, bias=bias)


@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_key_side_masked_keys_beside_a_query_side_bias_never_reach_a_row(mask_heads, is_causal, monkeypatch, capfd,
                                                                          cuda_device):
    """A key-side mask beside a query-side bias runs on the sm90a kernel's query-side variant, which loads the keys of
    every live tile, masked ones included (docs/contract.md): NaN in the K and V rows of the keys no query head of
    their KV group attends, and in the bias entries of masked keys, must leave out and lse bit-identical."""
    dtype = torch.bfloat16
    spec = Spec("skip_masked_qbias", seqlens_q=(130, 1, 200, 0), seqlens_k=(300, 9, 330, 6), heads=4, heads_k=2,
                mask="key", mask_heads=mask_heads, keep=0.4, bias="query", bias_heads="H", bias_dtype="q",
                is_causal=is_causal)
    sample = _cuda_sample(spec, dtype, seed=7)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    mask = sample.mask.cpu()  # (total_k, Hm)
    H = spec.heads
    unread = unread_keys(mask, H, spec.heads_k)
    k, v, bias = sample.k.clone(), sample.v.clone(), sample.bias.clone()
    k[unread.to("cuda")] = float("nan")
    v[unread.to("cuda")] = float("nan")
    # bias[q, h, j] of a key j its head's mask hides: the key's position in its sequence
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    for b in range(len(cu_q) - 1):
        for hb in range(H):
            hidden = ~mask[cu_k[b]:cu_k[b + 1], hb // (H // mask.shape[1])]
            bias[cu_q[b]:cu_q[b + 1], hb, :hidden.numel()][:, hidden.to("cuda")] = float("nan")
    capfd.readouterr()
    expected = sample.run()
    poisoned = sample.replace(k=k, v=v, bias=bias).run()
    torch.cuda.synchronize()
    if _sm90a_device():
        assert re.findall(r"kernel=prefill .*sm90a_query=(\d)", capfd.readouterr().err) == ["1", "1"]
    for want, got in zip(expected, poisoned):
        assert torch.equal(want, got), "a masked-out key's K, V or bias reached a row"


# A key-side bias without a mask on the sm90a kernel: its slots variant over slots that are the keys themselves (one
# list of every key, K / V read in place, the biases as float32 per slot): bias heads 1 / Hk / H in float32 and q's
# dtype (-inf entries too), causal with more keys or more queries, empty sequences and rows past the end, seqused_k,
# sinks, windows, softcap, D 64 / 128 / 256 (64-key tiles: half a tile's slots per bulk copy).
BIAS_SPECS = [
    Spec("bias_in_place_causal_h", heads=8, heads_k=2, seqlens_q=(300, 129, 1), seqlens_k=(700, 128, 260),
         is_causal=True, bias="key", bias_heads="H"),
    Spec("bias_in_place_1_q_dtype_neg_inf", heads=4, heads_k=4, seqlens_q=(257, 90), seqlens_k=(513, 90), bias="key",
         bias_dtype="q", bias_neg_inf=True),
    Spec("bias_in_place_hk_more_queries", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3),
         is_causal=True, bias="key", bias_heads="Hk"),
    Spec("bias_in_place_empty_and_past_the_end", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0),
         bias="key", bias_heads="Hk", extra_rows_q=9, extra_rows_k=5),
    Spec("bias_in_place_seqused_sinks_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(250, 90),
         seqlens_k=(400, 300), seqused_k=(333, 120), is_causal=True, bias="key", bias_heads="H", sinks="float32"),
    Spec("bias_in_place_window_softcap", heads=4, heads_k=2, seqlens_q=(500, 64), seqlens_k=(900, 64),
         window=(200, 50), softcap=30.0, bias="key", bias_heads="Hk", bias_dtype="q"),
    Spec("bias_in_place_d256_causal_h", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
         seqlens_k=(700, 128, 260), is_causal=True, bias="key", bias_heads="H"),
    Spec("bias_in_place_d256_1_q_dtype_neg_inf_odd_keys", head_dim=256, heads=4, heads_k=4, seqlens_q=(257, 90),
         seqlens_k=(513, 91), bias="key", bias_dtype="q", bias_neg_inf=True),
    Spec("bias_in_place_d256_hk_more_queries_negative_scale", head_dim=256, heads=4, heads_k=1, seqlens_q=(300, 17),
         seqlens_k=(130, 3), is_causal=True, softmax_scale=-0.4, bias="key", bias_heads="Hk"),
    Spec("bias_in_place_d256_empty_and_past_the_end", head_dim=256, heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0),
         seqlens_k=(20, 0, 141, 0), bias="key", bias_heads="Hk", extra_rows_q=9, extra_rows_k=7),
    Spec("bias_in_place_d256_seqused_sinks", head_dim=256, heads=6, heads_k=3, seqlens_q=(250, 90),
         seqlens_k=(400, 300), seqused_k=(333, 120), is_causal=True, bias="key", bias_heads="H", sinks="float32"),
    Spec("bias_in_place_d256_window_softcap", head_dim=256, heads=4, heads_k=2, seqlens_q=(500, 64),
         seqlens_k=(900, 64), window=(200, 50), softcap=30.0, bias="key", bias_heads="Hk", bias_dtype="q"),
    # more than 1024 64-key tiles in one sequence, and more sequences than a persistent launch's unit table
    Spec("bias_in_place_d256_many_tiles", head_dim=256, heads=2, heads_k=1, seqlens_q=(130, 3), seqlens_k=(66_001, 5),
         is_causal=True, bias="key", bias_heads="H"),
    Spec("bias_in_place_d256_more_sequences_than_a_unit_table", head_dim=256, heads=2, heads_k=1,
         seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299)),
         window=(255, 0), is_causal=True, bias="key", bias_heads="1"),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", BIAS_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_key_side_bias_alone_matches_reference(spec, dtype, path, monkeypatch, capfd, cuda_device):
    """A key-side bias without a mask runs on the sm90a kernel's slots variant in place (every key a slot, K / V
    where they are), and on the sm80 kernels forced; each matches the float64 reference, and the plan names the path."""
    plan = _check_on_path(spec, dtype, path, monkeypatch, capfd, r"sm90a_slots=(\d) .*slots_in_place=(\d)")
    on = str(int(path != "sm80" and _sm90a_device()))
    assert plan == [(on, on)]


# A key-side bias beside a query-side mask at D = 256: the sm90a kernel's query-side variant over the mask's map and
# bits with the bias over slots in place (kQuery + kSlots): mask heads 1 / Hk / H, bias heads 1 / Hk / H in float32
# and q's dtype (-inf entries too), random and block-sparse masks, causal, fully masked rows, windows, sinks,
# seqused_k. (Beside a key-side mask the bias is gathered with the mask's kept rows: SLOT_D256_SPECS.)
MASKED_BIAS_D256_SPECS = [
    Spec("query_mask_key_bias_d256_causal_h", head_dim=256, heads=8, heads_k=2, seqlens_q=(300, 129, 1),
         seqlens_k=(700, 128, 260), is_causal=True, mask="query", mask_heads="H", keep=0.5, bias="key",
         bias_heads="Hk"),
    Spec("query_mask_key_bias_d256_runs_1_neg_inf", head_dim=256, heads=4, heads_k=1, seqlens_q=(257, 90),
         seqlens_k=(513, 91), mask="query", mask_heads="1", keep=0.4, mask_runs=64, masked_rows=True, bias="key",
         bias_heads="H", bias_dtype="q", bias_neg_inf=True),
    Spec("query_mask_key_bias_d256_window_sinks_seqused", head_dim=256, heads=6, heads_k=3, seqlens_q=(260, 40),
         seqlens_k=(600, 300), seqused_k=(555, 280), window=(150, -1), is_causal=True, sinks="q", mask="query",
         mask_heads="Hk", keep=0.6, bias="key", bias_heads="1"),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", MASKED_BIAS_D256_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("path", ["auto", "persistent3", "per_unit", "sm80"])
def test_cuda_d256_key_side_bias_beside_a_query_side_mask_matches_reference(spec, dtype, path, monkeypatch, capfd,
                                                                            cuda_device):
    """At D = 256 a key-side bias beside a query-side mask runs on the sm90a kernel's query-side variant with the
    bias over slots in place (persistent on a CTA per SM, on 3 CTAs or a CTA per unit through DMATTN_SM90A_CTAS), and
    on the sm80 kernels forced; each matches the float64 reference, and the plan names the path."""
    plan = _check_on_path(spec, dtype, path, monkeypatch, capfd,
                          r"sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)")
    on = str(int(path != "sm80" and _sm90a_device()))
    assert plan == [(on, on, on)]


@pytest.mark.parametrize("bias_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_key_side_masked_keys_and_their_key_side_bias_at_d256_never_reach_a_row(bias_heads, is_causal, arch, monkeypatch, capfd):
    """At D = 256 a key-side mask beside a key-side bias is gathered with it into dense slots, as at D <= 128, so a
    masked key's K, V and bias are never read (docs/contract.md): NaN in the K and V rows of the keys no query head of
    their KV group attends, and in the bias entries that no query head reading them attends, must leave out and lse
    bit-identical, on the sm90a kernel (a CTA per unit and persistent; the plan must show its gathered slots) as on
    the sm80 one (which never reads them)."""
    dtype = torch.bfloat16
    spec = Spec("skip_masked_key_bias_d256", head_dim=256, seqlens_q=(130, 1, 200, 0), seqlens_k=(300, 9, 331, 6),
                heads=4, heads_k=2, mask="key", mask_heads="H", keep=0.4, bias="key", bias_heads=bias_heads,
                is_causal=is_causal)
    sample = _cuda_sample(spec, dtype, seed=7)
    mask = sample.mask.cpu()  # (total_k, H)
    unread = unread_keys(mask, spec.heads, spec.heads_k)  # (total_k, Hk)
    k, v, bias = sample.k.clone(), sample.v.clone(), sample.bias.clone()
    k[unread.to("cuda")] = float("nan")
    v[unread.to("cuda")] = float("nan")
    # bias head g serves query heads [g H / Hb, (g + 1) H / Hb): its entry of a key no one of them attends is unread
    Hb = bias.shape[1]
    per = spec.heads // Hb
    unread_bias = ~mask.view(mask.shape[0], Hb, per).any(dim=2)  # (total_k, Hb)
    bias[unread_bias.to("cuda")] = float("nan")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    expected = sample.run()
    poisoned = sample.replace(k=k, v=v, bias=bias).run()
    torch.cuda.synchronize()
    on = str(int(arch != "sm80" and _sm90a_device()))
    plans = re.findall(r"kernel=prefill .*sm90a_slots=(\d) sm90a_query=(\d) .*slots_in_place=(\d)",
                       capfd.readouterr().err)
    assert plans == [(on, "0", "0"), (on, "0", "0")]
    for want, got in zip(expected, poisoned):
        assert torch.equal(want, got), f"{arch}: a masked-out key's K, V or bias reached a row"


# The dynamic scheduler on the windowed and kSlots kernels (DMATTN_SM90A_SCHED=dynamic; fwd_kernel.cuh, kDynamic): a
# key-side mask's gathered kept rows (a unit's tile bounds published by the producer with its Q), a key-side bias alone
# (slots in place), windows and softcap (a section a sequence). A unit runs the same tiles in the same order wherever it
# runs, so its outputs are bitwise those of the static grids (DMATTN_SM90A_SCHED=static): the plan's own (persistent for
# masks and windows, a CTA per unit for the bias alone and the softcap) and a CTA per unit. Specs: causal and not, mask
# heads 1 / Hk / H (a kept copy per list: sections of lists), biases of each head count, fully masked rows and
# sequences, empty sequences, rows past the end, ragged varlen ends beside sequences without keys, seqused_k, sinks,
# windows of more than 128 keys on one or both sides, softcap, more sequences than a launch's unit table (two launches,
# two counters), D 64 / 128 / 256. Windows of at most 128 keys run on the sm80 kernel unless DMATTN_SM90A_CTAS is set,
# so none is here.
_DYNAMIC_SLOTS = ("slots_causal_hk", "slots_bias_h", "slots_bias_hk_q_dtype", "slots_runs", "slots_masked_rows",
                  "slots_empty_and_past_the_end", "slots_seqused_sinks_d64", "slots_window", "slots_window_both_softcap",
                  "slots_window_sinks_d64", "slots_per_head_causal_bias_hk", "slots_per_head_window_bias_h_q_dtype",
                  "slots_query_tiles_two_gather_ctas")
_DYNAMIC_SLOTS_D256 = ("slots_d256_causal_hk", "slots_d256_empty_and_past_the_end", "slots_d256_window_causal_h",
                       "slots_d256_window_softcap_sinks_seqused")
_DYNAMIC_RANGED = ("window_left_causal", "window_left_not_causal", "window_right_only", "window_both_sides",
                   "window_softcap_sinks_d256", "softcap", "softcap_causal_window", "window_softcap_sinks",
                   "seqused_k_window")
DYNAMIC_MASKED_SPECS = [s for s in SLOT_SPECS if s.name in _DYNAMIC_SLOTS] + \
    [s for s in SLOT_D256_SPECS if s.name in _DYNAMIC_SLOTS_D256] + \
    [s for s in RANGED_SPECS if s.name in _DYNAMIC_RANGED] + [
    Spec("slots_ragged_ends", heads=4, heads_k=2, seqlens_q=RAGGED_ENDS_Q, seqlens_k=RAGGED_ENDS_K, is_causal=True,
         mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="H"),
    Spec("slots_ragged_ends_d64", head_dim=64, heads=6, heads_k=3, seqlens_q=RAGGED_ENDS_Q, seqlens_k=RAGGED_ENDS_K,
         mask="key", mask_heads="H", keep=0.4, mask_runs=16),
    Spec("slots_ragged_ends_d256", head_dim=256, heads=4, heads_k=2, seqlens_q=RAGGED_ENDS_Q, seqlens_k=RAGGED_ENDS_K,
         is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="Hk"),
    Spec("window_ragged_ends", heads=4, heads_k=2, seqlens_q=RAGGED_ENDS_Q, seqlens_k=RAGGED_ENDS_K, window=(200, 0),
         is_causal=True),
    # units of many lengths over sections of a few lists (1 MB): two sequences of ~16 query tiles, 8 heads
    Spec("slots_long_causal", head_dim=128, heads=8, heads_k=2, seqlens_q=(2000, 1500), seqlens_k=(2000, 1500),
         is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="Hk"),
    Spec("window_long", head_dim=128, heads=8, heads_k=2, seqlens_q=(2000, 1500), seqlens_k=(2000, 1500),
         window=(255, 0), is_causal=True),
    Spec("key_bias_alone", heads=8, heads_k=2, seqlens_q=(700, 300), seqlens_k=(700, 500), is_causal=True, bias="key",
         bias_heads="H"),
    Spec("slots_more_sequences_than_a_unit_table", heads=2, heads_k=1, seqlens_q=(300,) + tuple(i % 9 for i in range(299)),
         seqlens_k=(300,) + tuple(i % 13 for i in range(299)), is_causal=True, mask="key", keep=0.5, bias="key"),
    Spec("window_more_sequences_than_a_unit_table", heads=2, heads_k=1,
         seqlens_q=(300,) + tuple(i % 9 for i in range(299)), seqlens_k=(300,) + tuple(i % 13 for i in range(299)),
         window=(150, 0), is_causal=True),
]


@pytest.mark.parametrize("grid", list(DYNAMIC_GRIDS))
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", DYNAMIC_MASKED_SPECS, ids=lambda s: s.name)
def test_dynamic_scheduler_on_masks_and_windows_is_bitwise_the_static_grids(spec, dtype, grid, monkeypatch, capfd,
                                                                            cuda_device):
    if not _sm90a_device():
        pytest.skip("the sm90a kernel runs on cc 9.0 devices with the sm90a path built")
    sample = _cuda_sample(spec, dtype)
    # the plan's own static grid
    (ref_out, ref_lse), plans = _run_logged(sample, monkeypatch, capfd, {"DMATTN_SM90A_SCHED": "static"})
    assert plans and all(s == "static" for _, s in plans), plans
    references = shared_reference((spec, dtype), lambda: (sample.reference(), sample.reference(sample.dtype)))
    assert_close_to_reference((ref_out, ref_lse), *references, label="static")
    (unit_out, unit_lse), plans = _run_logged(sample, monkeypatch, capfd, {"DMATTN_SM90A_CTAS": "0"})
    assert plans and all(p == (0, "static") for p in plans), plans
    assert torch.equal(_bits(unit_out), _bits(ref_out)) and torch.equal(_bits(unit_lse), _bits(ref_lse)), \
        "a CTA per unit differs from the plan's static grid"
    _assert_dynamic_grid_gives(sample, grid, ref_out, ref_lse, "the static grid's", monkeypatch, capfd)
