"""The CUDA decode kernel (packed GQA, split-KV; csrc/cuda/sm80/decode_kernel.cuh) and its choice, beside the prefill
kernel: both run every sample, forced through the documented debug variables (README, "Debug variables"):

- DMATTN_KERNEL=prefill|decode forces a kernel (decode only where it can run: mask and bias heads shared by the query
  heads of a KV head, key-side or query-side; elsewhere the prefill kernel runs);
- DMATTN_DECODE_TILES_PER_SPLIT=1 makes every 64-key tile its own split, so the split combine runs on every sample
  with more than 64 keys;
- DMATTN_DECODE_COMBINE=launch merges a split call's partials by combine_splits' own launch where the kernel would
  merge them itself (the last split CTA of each unit): the tests compare the two paths bit for bit;
- DMATTN_LOG_PLAN=1 prints each call's plan to stderr: the tests read which kernel the automatic choice took.

Every case is judged by the same float64 reference and accuracy rule as every kernel (tests/samples.py). The plan
itself (split counts, workspace) is tested on the host in test_kernel_matrix.py; these tests need a GPU.
"""

import math
import re

import pytest
import torch

from samples import (SAMPLES, Spec, assert_close_to_reference, make_sample, noncanonical_mask, padded_reason,
                     support_reason)
from test_varlen_fwd import with_lies

# Every test here needs a CUDA device: the `cuda` mark makes `-k cuda` select them all (none has "cuda" in its name).
pytestmark = pytest.mark.cuda

KERNELS = {
    "prefill": {"DMATTN_KERNEL": "prefill"},
    "decode": {"DMATTN_KERNEL": "decode"},
    "decode_split_every_tile": {"DMATTN_KERNEL": "decode", "DMATTN_DECODE_TILES_PER_SPLIT": "1"},
}


@pytest.fixture(params=list(KERNELS))
def kernel(request, monkeypatch, cuda_device):
    for name, value in KERNELS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _checked(sample, label=""):
    out, lse = sample.run()
    assert_close_to_reference((out, lse), sample.reference(), sample.reference(sample.dtype), label=label)
    return out, lse


def _check_on_cuda(spec, dtype, kernel):
    """A spec's sample on CUDA, by the accuracy rule; skipped with the reason where this build cannot run it."""
    reason = support_reason(spec, dtype, "cuda")
    if reason:
        pytest.skip(reason)
    _checked(make_sample(spec, dtype, "cuda"), label=kernel)


CUDA_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_sample_matches_reference_on_each_kernel(spec, dtype, kernel):
    _check_on_cuda(spec, dtype, kernel)


# Decode shapes: few queries, many keys, every head broadcast the decode kernel packs, GQA / MQA / MHA, D 64-256.
DECODE_SPECS = [
    Spec("gqa4_key_mask_hk", heads=8, heads_k=2, seqlens_q=(1, 3, 8, 2), seqlens_k=(1500, 700, 2100, 90),
         mask="key", mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk"),
    Spec("gqa4_key_mask_1_bias_1", heads=8, heads_k=2, seqlens_q=(4, 1), seqlens_k=(3000, 64), mask="key",
         mask_heads="1", keep=0.5, bias="key", bias_heads="1"),
    Spec("mqa_q8", heads=8, heads_k=1, seqlens_q=(8, 5), seqlens_k=(1100, 600), mask="key", mask_heads="1",
         keep=0.3, bias="key", bias_heads="Hk"),
    Spec("mha_no_mask", heads=4, heads_k=4, seqlens_q=(1, 2, 1), seqlens_k=(2000, 129, 64)),
    Spec("causal_lq8_gqa", heads=8, heads_k=2, seqlens_q=(8, 3, 7), seqlens_k=(900, 3, 1300), is_causal=True,
         mask="key", mask_heads="Hk", keep=0.6, bias="key", bias_heads="Hk"),
    Spec("causal_rows_wrap_heads", heads=12, heads_k=2, seqlens_q=(6, 5), seqlens_k=(400, 6), is_causal=True),
    Spec("empty_and_masked_sequences", heads=8, heads_k=2, seqlens_q=(2, 0, 3, 1), seqlens_k=(500, 300, 0, 800),
         mask="key", mask_heads="Hk", keep=0.4, masked_rows=True, bias="key"),
    Spec("all_keys_masked", heads=8, heads_k=2, seqlens_q=(2, 3), seqlens_k=(700, 1200), mask="key", keep=0.0),
    Spec("bias_neg_inf", heads=8, heads_k=2, seqlens_q=(1, 4), seqlens_k=(900, 300), bias="key", bias_heads="Hk",
         bias_neg_inf=True, mask="key", mask_heads="Hk"),
    Spec("head_dim_64", head_dim=64, heads=16, heads_k=4, seqlens_q=(3, 1), seqlens_k=(2500, 400), mask="key",
         mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk"),
    Spec("head_dim_128", head_dim=128, heads=16, heads_k=4, seqlens_q=(3, 1), seqlens_k=(2500, 400), mask="key",
         mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk", bias_dtype="q"),
    Spec("head_dim_256", head_dim=256, heads=8, heads_k=2, seqlens_q=(2, 8), seqlens_k=(1000, 1500), is_causal=True,
         mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="1"),
    Spec("head_dim_96", head_dim=96, heads=8, heads_k=2, seqlens_q=(1, 2), seqlens_k=(800, 200), mask="key"),
    Spec("trailing_rows", heads=8, heads_k=2, seqlens_q=(2, 3), seqlens_k=(600, 900), extra_rows_q=3,
         extra_rows_k=5, slack_q=2, slack_k=40, mask="key", mask_heads="Hk", bias="key"),
    # a long sequence beside a short one: many splits, and a compaction over many 2048-key chunks
    Spec("long_beside_short", heads=4, heads_k=2, seqlens_q=(2, 1), seqlens_k=(40000, 300), mask="key",
         mask_heads="Hk", keep=0.3, bias="key", bias_heads="Hk", dtypes=(torch.float16, torch.bfloat16)),
    # Query-side operands (the decode kernel's own variant: the kept keys of a query-side mask are the OR of the
    # sequence's query rows, then each row its own).
    Spec("query_mask_hk_key_bias", heads=8, heads_k=2, seqlens_q=(1, 3, 8, 2), seqlens_k=(1500, 700, 2100, 90),
         mask="query", mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk"),
    Spec("query_mask_1_query_bias_1", heads=8, heads_k=2, seqlens_q=(4, 1), seqlens_k=(3000, 64), mask="query",
         mask_heads="1", keep=0.5, bias="query", bias_heads="1"),
    Spec("key_mask_query_bias_hk_causal", heads=8, heads_k=2, seqlens_q=(8, 3, 7), seqlens_k=(900, 3, 1300),
         is_causal=True, mask="key", mask_heads="Hk", bias="query", bias_heads="Hk"),
    Spec("query_mask_mqa_all_masked_rows", heads=8, heads_k=1, seqlens_q=(8, 5), seqlens_k=(1100, 600),
         mask="query", mask_heads="1", keep=0.02),
    # Lists for the terms of a query-side bias: alone (every key listed), beside a mask of fewer heads (lists per
    # bias head), 16-bit terms with -inf entries, odd total_k / rows past the last sequence (unaligned segments).
    Spec("query_bias_only_hk", heads=8, heads_k=2, seqlens_q=(3, 1, 6), seqlens_k=(777, 65, 1301),
         bias="query", bias_heads="Hk"),
    Spec("key_mask_1_query_bias_hk_q_dtype", heads=8, heads_k=2, seqlens_q=(2, 5), seqlens_k=(1201, 333),
         mask="key", mask_heads="1", keep=0.4, bias="query", bias_heads="Hk", bias_dtype="q", bias_neg_inf=True),
    Spec("query_mask_1_query_bias_hk_trailing", heads=12, heads_k=3, seqlens_q=(4, 2, 7), seqlens_k=(501, 2, 999),
         mask="query", mask_heads="1", keep=0.3, masked_rows=True, bias="query", bias_heads="Hk", bias_dtype="q",
         extra_rows_q=2, extra_rows_k=3, slack_q=1, slack_k=7),
    Spec("query_mask_causal_window_mha", heads=4, heads_k=4, seqlens_q=(8, 1, 4), seqlens_k=(600, 90, 1000),
         window=(300, 0), mask="query", mask_heads="Hk", keep=0.5, bias="key", bias_heads="1"),
] + [
    # Windows whose first visible key falls inside a tile (the decode kernel's tiles then start at it: tile_scheduler's
    # start_at_first_slot): no list (positions move with the slots), a key-side mask's list (the list starts later),
    # a kv_slots-free seqused_k, and a window wider than some sequences.
    Spec("window_unaligned_no_mask", heads=8, heads_k=2, seqlens_q=(1, 4, 8, 2), seqlens_k=(1500, 1037, 2100, 90),
         window=(300, 0), bias="key", bias_heads="Hk"),
    Spec("window_unaligned_key_mask", heads=8, heads_k=2, seqlens_q=(3, 8, 1), seqlens_k=(2000, 777, 4100),
         window=(517, 0), mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="1"),
    Spec("window_unaligned_seqused_sinks", heads=8, heads_k=2, seqlens_q=(2, 5), seqlens_k=(1800, 900),
         seqused_k=(1333, 899), window=(129, 3), is_causal=False, sinks="float32", mask="key", keep=0.7),
]
WINDOW_DECODE_SPECS = [s for s in DECODE_SPECS if s.name.startswith("window_unaligned")]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", DECODE_SPECS, ids=lambda s: s.name)
def test_decode_shapes_match_reference_on_each_kernel(spec, dtype, kernel):
    _check_on_cuda(spec, dtype, kernel)


@pytest.mark.parametrize("spec", DECODE_SPECS[:4] + WINDOW_DECODE_SPECS, ids=lambda s: s.name)
def test_split_counts_agree(spec, monkeypatch, cuda_device):
    """One split, a few and one per tile: the same result within the accuracy rule, and each deterministic."""
    sample = make_sample(spec, torch.bfloat16, "cuda")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    results = {}
    for tiles in ("100000", "3", "1"):
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", tiles)
        first = _checked(sample, label=f"{tiles} tiles per split")
        again = sample.run()
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1]), "not deterministic"
        results[tiles] = first
    assert results.keys() == {"100000", "3", "1"}


def _plan_lines(capfd):
    return re.findall(r"dmattn\.varlen_fwd plan: kernel=(\w+)", capfd.readouterr().err)


@pytest.mark.parametrize(
    "spec, expected",
    [
        (DECODE_SPECS[0], "decode"),  # 4 query heads per KV head x <= 8 queries: 32 packed rows
        (next(s for s in SAMPLES if s.name == "long_sequences"), "prefill"),  # 150 queries: too many packed rows
        (Spec("query_mask_decode", heads=8, heads_k=2, seqlens_q=(1, 2), seqlens_k=(500, 90), mask="query",
              mask_heads="Hk"), "decode"),
        (Spec("prefill_len", heads=8, heads_k=2, seqlens_q=(300, 40), seqlens_k=(300, 40), is_causal=True),
         "prefill"),
        (Spec("mask_per_query_head", heads=8, heads_k=2, seqlens_q=(1, 2), seqlens_k=(500, 90), mask="key",
              mask_heads="H"), "prefill"),  # each query head its own kept keys: rows of a tile would disagree
    ],
    ids=lambda x: x if isinstance(x, str) else x.name,
)
def test_automatic_choice(spec, expected, monkeypatch, capfd, cuda_device):
    monkeypatch.delenv("DMATTN_KERNEL", raising=False)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.float16, "cuda")
    capfd.readouterr()
    _checked(sample)
    torch.cuda.synchronize()
    assert _plan_lines(capfd) == [expected]


@pytest.mark.parametrize("mask", [None, "key"], ids=["no_mask", "kept_key_lists"])
def test_split_units_run_longest_first_with_a_mask(mask, monkeypatch, capfd, cuda_device):
    """A split call with a key-side mask runs its (sequence, KV head) units longest first by kept keys
    (order_decode_units), one without in batch order: the plan says which, and the result is the reference's. Lengths
    rise and fall, so the order is no identity."""
    spec = Spec("unequal_units", heads=8, heads_k=2, seqlens_q=(1, 3, 2, 1, 4, 2),
                seqlens_k=(90, 1500, 400, 2600, 20, 900), mask=mask, mask_heads="Hk", keep=0.3,
                bias="key" if mask else None, bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "4")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    capfd.readouterr()
    _checked(sample)
    torch.cuda.synchronize()
    assert re.findall(r"kernel=decode .*unit_order=(\d)", capfd.readouterr().err) == ["1" if mask else "0"]


@pytest.mark.parametrize("mask", [None, "key"], ids=["no_mask", "key_mask"])
def test_split_combine_of_many_rows(mask, monkeypatch, cuda_device):
    """combine_splits gives each (row, head) pair a warp while a call has at most 8192 pairs (at head dim >= 128) and
    eight lanes past that: 40 sequences x 8 queries x 32 heads = 10240 pairs take the eight-lane path."""
    lens_k = tuple(200 + 13 * i for i in range(40))
    spec = Spec("many_rows_d128", head_dim=128, heads=32, heads_k=8, seqlens_q=(8,) * 40, seqlens_k=lens_k, mask=mask,
                mask_heads="Hk", keep=0.5, bias="key" if mask else None, bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "1")
    _checked(make_sample(spec, torch.bfloat16, "cuda"))


# Where the split partials of a decode call are merged: by combine_splits' own launch (DMATTN_DECODE_COMBINE=launch),
# or where the plan can (a split call with a key-side mask's lists), by the kernel's last split CTA of each unit.
COMBINES = {"launch": "launch", "kernel": "auto"}


def _combine_flags(capfd):
    """(combine_finishes, combine_in_kernel) of each decode plan line printed since the last read."""
    return re.findall(r"kernel=decode .*combine_finishes=(\d) combine_in_kernel=(\d)", capfd.readouterr().err)


@pytest.mark.parametrize("combine", list(COMBINES))
@pytest.mark.parametrize("head_dim", [64, 128])
def test_split_combine_finishes_the_rows(head_dim, combine, monkeypatch, capfd, cuda_device):
    """A split call's combine does finish_rows' work too (the plan says so): rows no sequence owns get out 0 and
    lse -inf, the rest the reference's, through the eight-lane (64) and the warp-per-pair (128) combines. Where the
    kernel merges its own splits, the order pass before it does that work: the same rows."""
    spec = Spec("split_trailing", head_dim=head_dim, heads=8, heads_k=2, seqlens_q=(1, 4, 8),
                seqlens_k=(700, 1000, 300), extra_rows_q=3, extra_rows_k=4, mask="key", mask_heads="Hk", keep=0.5,
                bias="key", bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "2")
    monkeypatch.setenv("DMATTN_DECODE_COMBINE", COMBINES[combine])
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    capfd.readouterr()
    out, lse = _checked(sample)
    torch.cuda.synchronize()
    assert _combine_flags(capfd) == [("1", "0") if combine == "launch" else ("0", "1")]
    assert (out[13:] == 0).all() and (lse[:, 13:] == -math.inf).all()


@pytest.mark.parametrize("mask", [None, "key"])
def test_dependent_launches_change_no_bit(mask, monkeypatch, capfd, cuda_device):
    """On cc >= 9.0 the order pass and the decode kernel are launched as programmatic dependents of the launch before
    each (each waits for it before its first read): the bits of a split call with and without
    (DMATTN_DEPENDENT_LAUNCH=off), its out and lse NaN-filled reused blocks each time, and the plan says which ran."""
    spec = Spec("split_dependent", head_dim=128, heads=8, heads_k=2, seqlens_q=(1, 4, 8), seqlens_k=(700, 1000, 300),
                mask=mask, mask_heads="Hk", keep=0.5, bias="key" if mask else None, bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "2")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    runs, flags = {}, {}
    for switch in ("auto", "off"):
        monkeypatch.setenv("DMATTN_DEPENDENT_LAUNCH", switch)
        capfd.readouterr()
        runs[switch] = _poisoned_run(sample)
        torch.cuda.synchronize()
        flags[switch] = re.findall(r"kernel=decode .* dependent_launch=(\d)", capfd.readouterr().err)
    assert flags["off"] == ["0"]
    assert flags["auto"] == ["1" if torch.cuda.get_device_capability(cuda_device) >= (9, 0) else "0"]
    for a, b in zip(runs["auto"], runs["off"]):
        assert torch.equal(_bits(a), _bits(b))
    _checked(sample)


def _bits(t):
    """A tensor's bits (NaNs compare equal where their bits do)."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _poisoned_run(sample, fill=math.nan):
    """sample.run() right after blocks of out's and lse's sizes, filled with `fill`, were freed: the caching allocator
    hands them back to the call's own out and lse, so a row the call fails to write reads `fill` (NaN, or for a call
    whose every element must be NaN a number), not a correct result an earlier call left in a reused block (a unit
    that never merged would otherwise pass a bitwise comparison)."""
    total_q, heads, head_dim = sample.q.shape
    decoys = [torch.full((total_q, heads, head_dim), fill, dtype=sample.q.dtype, device=sample.q.device),
              torch.full((heads, total_q), fill, dtype=torch.float32, device=sample.q.device)]
    del decoys
    return sample.run()


def _skip_unless_compiled(head_dim):
    """Skips where this build has no CUDA kernel of head_dim: the plan's merge choice (passes.h combine_lanes) follows
    the padded head dim (run FF: D = 64 samples in a D = 128 build keep the combine launch), so a test of which path
    runs would not test it."""
    reason = padded_reason(head_dim)
    if reason:
        pytest.skip(f"{reason} (its own merge choice)")


def _merged_both_ways(sample, monkeypatch, capfd, label="", repeats=1, launch_finishes="1"):
    """(out, lse) of a split decode call whose kernel merges its own splits, checked to be the bits of the same call
    through combine_splits' launch (DMATTN_DECODE_COMBINE=launch) and the same bits again, `repeats` more times (the
    tickets are zeroed for every call); each call's out and lse start as NaN-filled reused blocks (_poisoned_run),
    and the plan lines say which path each call took (`launch_finishes`: whether the launch's combine finishes the
    rows too, "0" where its contract reads would pass kMaxContractReads / 2 and a finish launch does it)."""
    _skip_unless_compiled(sample.q.shape[-1])
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    results = {}
    for combine in ("launch",) + ("kernel",) * (1 + repeats):
        monkeypatch.setenv("DMATTN_DECODE_COMBINE", COMBINES[combine])
        capfd.readouterr()
        out, lse = _poisoned_run(sample)
        torch.cuda.synchronize()
        assert _combine_flags(capfd) == [(launch_finishes if combine == "launch" else "0",
                                          "0" if combine == "launch" else "1")], \
            f"{label}: the plan did not take the {combine} path"
        if combine in results:
            assert torch.equal(_bits(out), _bits(results[combine][0])), f"{label}: out differs from call to call"
            assert torch.equal(_bits(lse), _bits(results[combine][1])), f"{label}: lse differs from call to call"
        results[combine] = (out, lse)
    (out, lse), (want_out, want_lse) = results["kernel"], results["launch"]
    assert torch.equal(_bits(out), _bits(want_out)), f"{label}: out is not the combine launch's bits"
    assert torch.equal(_bits(lse), _bits(want_lse)), f"{label}: lse is not the combine launch's bits"
    return out, lse


# Split calls whose kernel merges its own splits, with the KV tiles per split that make each what it tests.
MERGE_CASES = [
    # units of one busy split (8 tiles per split at 25% kept: the later splits find no tile) and of several (1)
    (Spec("merge_gqa_sinks", heads=8, heads_k=2, seqlens_q=(1, 3, 8, 2), seqlens_k=(1500, 700, 2100, 90),
          mask="key", mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk", sinks="float32"), ("8", "1")),
    # empty sequences (no query, no key), fully masked queries, rows no sequence owns
    (Spec("merge_empty_and_masked", heads=8, heads_k=2, seqlens_q=(2, 0, 3, 1), seqlens_k=(500, 300, 0, 800),
          mask="key", mask_heads="Hk", keep=0.4, masked_rows=True, bias="key", extra_rows_q=3), ("2", "1")),
    # no kept key anywhere: each unit's split 0 merges alone (out 0, lse the sink or -inf)
    (Spec("merge_all_keys_masked", heads=8, heads_k=2, seqlens_q=(2, 3), seqlens_k=(700, 1200), mask="key", keep=0.0,
          sinks="float32", sinks_neg_inf=True), ("1",)),
    # D = 128 with few pairs: a warp per pair (and under 16 splits: no CTA per pair, which the kernel leaves to the
    # combine launch)
    (Spec("merge_d128_wide", head_dim=128, heads=16, heads_k=4, seqlens_q=(3, 1), seqlens_k=(2500, 400), mask="key",
          mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk", bias_dtype="q"), ("3", "12")),
    # D = 128 with 40 x 8 x 32 = 10240 pairs: eight lanes per pair
    (Spec("merge_d128_eight_lanes", head_dim=128, heads=32, heads_k=8, seqlens_q=(8,) * 40,
          seqlens_k=tuple(200 + 13 * i for i in range(40)), mask="key", mask_heads="Hk", keep=0.5, bias="key",
          bias_heads="Hk"), ("1",)),
    # D = 256 (16 packed rows per tile), causal
    (Spec("merge_d256", head_dim=256, heads=8, heads_k=2, seqlens_q=(2, 8), seqlens_k=(1000, 1500), is_causal=True,
          mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="1"), ("4",)),
    # a window whose first key falls inside a tile, seqused_k, a mask of one head
    (Spec("merge_window_seqused", heads=8, heads_k=2, seqlens_q=(2, 5), seqlens_k=(1800, 900), seqused_k=(1333, 899),
          window=(129, 3), sinks="float32", mask="key", keep=0.7), ("1", "2")),
    # two row tiles per unit (4 query heads x 12 queries = 48 packed rows), a long sequence of many parts
    (Spec("merge_two_row_tiles", heads=8, heads_k=2, seqlens_q=(12, 5, 9), seqlens_k=(9000, 300, 2500), mask="key",
          mask_heads="1", keep=0.3, bias="key", bias_heads="Hk"), ("3",)),
]


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec, tiles", MERGE_CASES, ids=lambda x: x.name if isinstance(x, Spec) else "-".join(x))
def test_kernel_merge_is_the_combine_launch_bitwise(spec, tiles, dtype, monkeypatch, capfd, cuda_device):
    """The decode kernel's last split CTA of each unit merges the unit (FwdPlan::combine_in_kernel) with the combine's
    arithmetic and lanes (split_merge.cuh): the reference's result, and bit for bit the result of the combine launch
    (DMATTN_DECODE_COMBINE=launch), for units of one participating split and of several, of none (split 0 alone),
    sinks, empty sequences and rows no sequence owns, 8 and 32 lanes per pair, D 64 / 128 / 256, two row tiles."""
    reason = support_reason(spec, dtype, "cuda")
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, dtype, "cuda")
    for n in tiles:
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", n)
        out, lse = _merged_both_ways(sample, monkeypatch, capfd, label=f"{n} tiles per split")
        assert_close_to_reference((out, lse), sample.reference(), sample.reference(sample.dtype),
                                  label=f"{n} tiles per split")
        if spec.extra_rows_q:
            assert (out[-spec.extra_rows_q:] == 0).all() and (lse[:, -spec.extra_rows_q:] == -math.inf).all()


@pytest.mark.parametrize("tiles", ["1", "auto"])
def test_kernel_merge_keeps_nonfinite_rows_bitwise(tiles, monkeypatch, capfd, cuda_device):
    """test_nonfinite_values_follow_the_contract's NaN score, NaN V under a visible key and row with nothing visible,
    plus an extreme bias (every score near finfo.min): the kernel's merge gives the combine launch's bits."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    if tiles != "auto":
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", tiles)
    spec = Spec("merge_nonfinite", heads=4, heads_k=2, seqlens_q=(1, 1, 1, 1), seqlens_k=(300, 300, 1300, 300),
                mask="key", mask_heads="Hk", keep=1.0, bias="key", bias_heads="1")
    sample = make_sample(spec, torch.float16, "cuda")
    k, v, mask, bias = sample.k.clone(), sample.v.clone(), sample.mask.clone(), sample.bias.clone()
    k[0 + 200, 0, 3] = math.nan  # sequence 0, KV head 0: a NaN score for query heads 0 and 1
    v[300 + 250, 1, 5] = math.nan  # sequence 1, KV head 1: a visible key whose V holds a NaN
    mask[600:1900, 0] = False  # sequence 2, KV head 0: nothing visible
    bias[1900:2200] = torch.finfo(torch.float32).min  # sequence 3: every score near finfo.min
    out, lse = _merged_both_ways(sample.replace(k=k, v=v, mask=mask, bias=bias), monkeypatch, capfd)
    assert out[0, 0:2].isnan().all() and lse[0:2, 0].isnan().all()
    assert out[1, 2:4].isnan().any() and lse[2:4, 1].isfinite().all()
    assert (out[2, 0:2] == 0).all() and (lse[0:2, 2] == -math.inf).all()


def test_kernel_merge_on_two_streams_at_once(monkeypatch, capfd, cuda_device):
    """Two calls whose kernels merge their own splits, in flight at once on two streams: each call's tickets live in
    its own workspace (zeroed by its own order pass), so neither sees the other's; both give the bits of the same
    calls through the combine launch, run one after the other."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "1")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    specs = [Spec(f"merge_stream_{i}", heads=8, heads_k=2, seqlens_q=(1, 3, 8, 2), seqlens_k=(1500, 700, 2100, 90),
                  mask="key", mask_heads="Hk", keep=0.25 + 0.25 * i, bias="key", bias_heads="Hk") for i in range(2)]
    _skip_unless_compiled(specs[0].head_dim)
    samples = [make_sample(s, torch.bfloat16, "cuda") for s in specs]
    monkeypatch.setenv("DMATTN_DECODE_COMBINE", "launch")
    want = [s.run() for s in samples]
    monkeypatch.setenv("DMATTN_DECODE_COMBINE", "auto")
    streams = [torch.cuda.Stream() for _ in samples]
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
    capfd.readouterr()
    got = [None, None]
    for _ in range(3):
        for i, (sample, stream) in enumerate(zip(samples, streams)):
            with torch.cuda.stream(stream):
                got[i] = _poisoned_run(sample)
        torch.cuda.synchronize()
        for (out, lse), (want_out, want_lse) in zip(got, want):
            assert torch.equal(_bits(out), _bits(want_out)) and torch.equal(_bits(lse), _bits(want_lse))
    assert _combine_flags(capfd) == [("0", "1")] * 6, "the calls did not take the kernel's merge"


# The multi-participant tickets under contention (review_decode_last_split_combine.md, T2): 2,048 units (256
# sequences x 8 KV heads) of 8-14 busy splits each (a 64-key tile per split asked; the partials' cap raises it where
# it must), more tickets than the order pass's 1,024 threads (its zeroing loop strides), several finishing CTAs for
# 40 rows no sequence owns; with them the eight-lane merge (over 8,192 pairs), without them the warp per pair.
@pytest.mark.parametrize("extra_rows", [40, 0], ids=["eight_lanes", "warp_per_pair"])
def test_kernel_merge_stress_many_participants(extra_rows, monkeypatch, capfd, cuda_device):
    """Each of 2,048 units merged exactly once, by its last participating split, bit for bit the combine launch's
    result, in ten calls in a row (compute-sanitizer runs this test too)."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "1")
    lengths = torch.randint(500, 901, (256,), generator=torch.Generator().manual_seed(7)).tolist()
    spec = Spec("merge_stress", head_dim=128, heads=32, heads_k=8, seqlens_q=(1,) * 256, seqlens_k=tuple(lengths),
                mask="key", mask_heads="Hk", keep=1.0, extra_rows_q=extra_rows)
    sample = make_sample(spec, torch.bfloat16, "cuda")
    # (B + 1) x the (row, head) pairs (257 x 8,192 or more) is past kMaxContractReads / 2 (passes.h): the launch's
    # combine leaves the rows to a finish launch (run CY, an H100, showed it: combine_finishes=0)
    out, lse = _merged_both_ways(sample, monkeypatch, capfd, label="stress", repeats=9, launch_finishes="0")
    assert not out[:256].isnan().any() and not lse[:, :256].isnan().any()
    if extra_rows:
        assert (out[256:] == 0).all() and (lse[:, 256:] == -math.inf).all()


@pytest.mark.parametrize("mask", [None, "key"], ids=["no_mask", "key_mask"])
@pytest.mark.parametrize("head_dim", [128, 256])
def test_split_combine_of_few_rows_and_many_splits(head_dim, mask, monkeypatch, cuda_device):
    """A call of few (row, head) pairs over many splits (a long context: here 48 pairs over up to 36 splits) combines
    a pair per CTA, its warps sharing the splits: the reference's result with sinks, a sequence too short to split
    and rows no sequence owns (0 / -inf)."""
    spec = Spec("few_rows_many_splits", head_dim=head_dim, heads=8, heads_k=2, seqlens_q=(1, 3, 2),
                seqlens_k=(5000, 9000, 100), extra_rows_q=2, mask=mask, mask_heads="Hk", keep=0.5,
                bias="key" if mask else None, bias_heads="Hk", sinks="float32")
    reason = support_reason(spec, torch.bfloat16, "cuda")
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "4")
    out, lse = _checked(make_sample(spec, torch.bfloat16, "cuda"))
    assert (out[6:] == 0).all() and (lse[:, 6:] == -math.inf).all()


@pytest.mark.parametrize("combine", list(COMBINES))
@pytest.mark.parametrize("lie", ["decreasing", "last_past_total", "negative", "longer_than_max_seqlen"])
def test_split_combine_makes_a_lie_visible(lie, combine, monkeypatch, capfd, cuda_device):
    """Lying cu_seqlens through a split call whose combine finishes the rows, or whose kernel merges its own splits
    (the order pass then finishes the rows, and the merges write nothing): every element of out and lse is NaN, the
    rows the combine would have combined included (compute-sanitizer runs this test: nothing out of bounds)."""
    spec = Spec("split_lies", heads=8, heads_k=2, seqlens_q=(1, 4, 8), seqlens_k=(700, 1000, 300), extra_rows_q=2,
                mask="key", mask_heads="Hk", keep=0.5, bias="key", bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "2")
    monkeypatch.setenv("DMATTN_DECODE_COMBINE", COMBINES[combine])
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.float16, "cuda")
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    total_q, total_k = sample.q.shape[0], sample.k.shape[0]
    lies = {
        "decreasing": dict(cu_q=[0, cu_q[2], cu_q[1], cu_q[3]], cu_k=[0, cu_k[2], cu_k[1], cu_k[3]]),
        "last_past_total": dict(cu_q=cu_q[:-1] + [total_q + 5], cu_k=cu_k[:-1] + [total_k + 1000]),
        "negative": dict(cu_q=[-7] + cu_q[1:], cu_k=[0, -3] + cu_k[2:]),
        "longer_than_max_seqlen": dict(max_k=400),
    }[lie]
    lying = with_lies(sample, lies)
    capfd.readouterr()
    out, lse = _poisoned_run(lying, fill=0.0)
    torch.cuda.synchronize()
    assert _combine_flags(capfd) == [("1", "0") if combine == "launch" else ("0", "1")]
    assert out.isnan().all() and lse.isnan().all()


def test_forced_decode_falls_back_where_it_cannot_run(monkeypatch, capfd, cuda_device):
    spec = next(s for s in SAMPLES if s.name == "key_mask_query_bias")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.float16, "cuda")
    capfd.readouterr()
    _checked(sample)
    assert _plan_lines(capfd) == ["prefill"]


def test_bad_debug_variables_are_clear_errors(monkeypatch, cuda_device):
    sample = make_sample(DECODE_SPECS[3], torch.float16, "cuda")
    monkeypatch.setenv("DMATTN_KERNEL", "fast")
    with pytest.raises(ValueError, match="DMATTN_KERNEL must be auto, prefill or decode, got 'fast'"):
        sample.run()
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "0")
    with pytest.raises(ValueError, match="DMATTN_DECODE_TILES_PER_SPLIT must be a positive integer, got '0'"):
        sample.run()
    monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "1")
    monkeypatch.setenv("DMATTN_DECODE_COMBINE", "kernel")
    with pytest.raises(ValueError, match="DMATTN_DECODE_COMBINE must be auto or launch, got 'kernel'"):
        sample.run()


@pytest.mark.parametrize("tiles", ["1", "auto"])
def test_nonfinite_values_follow_the_contract(tiles, monkeypatch, cuda_device):
    """Through the split combine: a NaN score makes its row NaN (out and lse), a NaN in a visible key's V makes out
    NaN and keeps lse, a row with nothing visible is 0 / -inf; other rows are unaffected."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    if tiles != "auto":
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", tiles)
    spec = Spec("nonfinite", heads=4, heads_k=2, seqlens_q=(1, 1, 1, 1), seqlens_k=(300, 300, 300, 300),
                mask="key", mask_heads="Hk", keep=1.0)
    sample = make_sample(spec, torch.float16, "cuda")
    q, k, v, mask = sample.q.clone(), sample.k.clone(), sample.v.clone(), sample.mask.clone()
    k[0 + 200, 0, 3] = math.nan  # sequence 0, KV head 0: a NaN score for query heads 0 and 1
    v[300 + 250, 1, 5] = math.nan  # sequence 1, KV head 1: a visible key whose V holds a NaN
    mask[600:900, 0] = False  # sequence 2, KV head 0: nothing visible
    out, lse = sample.replace(q=q, k=k, v=v, mask=mask).run()
    ref_out, ref_lse = sample.run()
    assert out[0, 0:2].isnan().all() and lse[0:2, 0].isnan().all()
    assert out[1, 2:4].isnan().any() and lse[2:4, 1].isfinite().all()
    assert (out[2, 0:2] == 0).all() and (lse[0:2, 2] == -math.inf).all()
    for row, heads in ((0, [2, 3]), (1, [0, 1]), (2, [2, 3]), (3, [0, 1, 2, 3])):
        assert torch.equal(out[row, heads], ref_out[row, heads]), (row, heads)
        assert torch.equal(lse[heads, row], ref_lse[heads, row]), (row, heads)


@pytest.mark.parametrize("kernel_name", ["decode", "prefill"])
def test_query_side_mask_hides_a_key_whose_v_is_inf(kernel_name, monkeypatch, cuda_device):
    """A key a query-side mask hides from one query of a tile but shows to the others: its inf V reaches only the rows
    that see it (the decode kernel checks the V of a tile whose terms hid a key), bit for bit as if it were finite."""
    monkeypatch.setenv("DMATTN_KERNEL", kernel_name)
    spec = Spec("query_hidden_inf_v", heads=8, heads_k=2, seqlens_q=(4, 2), seqlens_k=(300, 200), mask="query",
                mask_heads="Hk", keep=1.0)
    sample = make_sample(spec, torch.float16, "cuda")
    mask, v = sample.mask.clone(), sample.v.clone()
    mask[0, :, 100] = False  # query 0 of sequence 0 cannot see its key 100; its queries 1-3 can
    v[100, :, 7] = math.inf
    out, lse = sample.replace(mask=mask, v=v).run()
    clean, clean_lse = sample.replace(mask=mask).run()
    assert torch.equal(lse, clean_lse)
    assert torch.equal(out[0], clean[0])  # the hidden key's inf never reaches query 0
    assert not out[1:4, :, 7].isfinite().any()  # it reaches every head of the queries that see it
    assert torch.equal(out[4:], clean[4:])  # sequence 1 untouched


@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("tiles", ["1", "4", "auto"])
def test_extreme_scores_split_by_their_sums(tiles, head_dim, monkeypatch, cuda_device):
    """Every score of a row near finfo.min (a float32 bias of -FLT_MAX on each key): all equal, so out is the mean of
    V, however the keys are split. Splits merged through an lse m + log(l) would weigh alike (log l vanishes next to
    |m|); the partials keep m and l apart (found by test_fuzz's extreme-values draw). At D = 128 with a split per tile
    (18 splits, 6 pairs) the combine takes a CTA per pair."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    if tiles != "auto":
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", tiles)
    spec = Spec("extreme_bias", head_dim=head_dim, heads=2, heads_k=1, seqlens_q=(1, 2), seqlens_k=(1100, 300),
                bias="key", bias_heads="1")
    sample = make_sample(spec, torch.float16, "cuda")
    q = torch.zeros_like(sample.q)  # every score is exactly the bias
    bias = torch.full_like(sample.bias, torch.finfo(torch.float32).min)
    out, lse = sample.replace(q=q, bias=bias).run()
    starts = (0, 1100)
    for row, seq in ((0, 0), (1, 1), (2, 1)):
        k0, n = starts[seq], spec.seqlens_k[seq]
        mean = sample.v[k0:k0 + n].double().mean(0)  # (Hk, D)
        for h in range(2):
            assert torch.allclose(out[row, h].double(), mean[0], atol=2e-3, rtol=0), (row, h)
    assert (lse == torch.finfo(torch.float32).min).all()  # m + log(n) rounds back to m in float32


@pytest.mark.parametrize("head_dim", [64, 128], ids=["d64", "d128"])
@pytest.mark.parametrize("tiles", ["1", "auto"])
def test_a_nan_query_makes_every_split_nan(tiles, head_dim, monkeypatch, cuda_device):
    """A NaN query makes every score of its row NaN, so each split's max stays -inf (fmaxf drops NaN) while its sum
    is NaN: the row is still NaN in out and lse after the combine, not a row that saw nothing (test_fuzz's draw).
    At D = 128 with a split per tile the combine takes a CTA per pair."""
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    if tiles != "auto":
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", tiles)
    spec = Spec("nan_query", head_dim=head_dim, heads=2, heads_k=1, seqlens_q=(1, 1), seqlens_k=(1100, 300))
    sample = make_sample(spec, torch.float16, "cuda")
    q = sample.q.clone()
    q[0, 0] = math.nan
    out, lse = sample.replace(q=q).run()
    ref_out, ref_lse = sample.run()
    assert out[0, 0].isnan().all() and lse[0, 0].isnan()
    assert torch.equal(out[0, 1], ref_out[0, 1]) and torch.equal(out[1], ref_out[1])
    assert torch.equal(lse[1, 0], ref_lse[1, 0]) and torch.equal(lse[:, 1], ref_lse[:, 1])


def _strided_last_dim(mask):
    """The same mask with its last dimension's elements 2 bytes apart (a slice of a wider tensor)."""
    wide = torch.zeros(*mask.shape[:-1], 2 * mask.shape[-1], dtype=torch.bool, device=mask.device)
    wide[..., ::2] = mask
    return wide[..., ::2]


def _strided_heads(mask):
    """The same key-side mask with its heads 2 bytes apart (a column slice of a wider tensor)."""
    wide = torch.zeros(mask.shape[0], 2 * mask.shape[1], dtype=torch.bool, device=mask.device)
    wide[:, ::2] = mask
    return wide[:, ::2]


@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("kernel_name", ["decode", "prefill"])
def test_long_key_masks_are_compacted_in_parts(mask_heads, kernel_name, monkeypatch, cuda_device):
    """compact_keys takes a key-side mask's lists in parts of 2048 keys that find the kept keys before them by a
    look-back: a 40k-key sequence is 20 parts, beside sequences of one part and of none. The reference's result
    through both kernels for every mask head count (Hm = H runs the prefill kernel: the decode kernel cannot take
    it), the same bits again, and the same bits from the same mask with its heads 2 bytes apart or its True bytes
    stored as 2..255."""
    spec = Spec("parts", heads=8, heads_k=4, seqlens_q=(2, 1, 3, 1), seqlens_k=(40_000, 100, 9_000, 0), mask="key",
                mask_heads=mask_heads, keep=0.3, bias="key", bias_heads="Hk")
    monkeypatch.setenv("DMATTN_KERNEL", kernel_name)
    sample = make_sample(spec, torch.bfloat16, "cuda")
    first = _checked(sample, label=kernel_name)
    for again in (sample, sample.replace(mask=_strided_heads(sample.mask)),
                  sample.replace(mask=noncanonical_mask(sample.mask))):
        out, lse = again.run()
        assert torch.equal(first[0], out) and torch.equal(first[1], lse)


@pytest.mark.parametrize("operands", [("query", "query"), ("query", "key"), ("key", "query"), (None, "query")])
def test_long_query_side_lists_are_compacted_in_parts(operands, monkeypatch, cuda_device):
    """The decode kernel's lists with query-side terms are compacted in parts of 2048 keys too, each part writing its
    own keys' terms once the look-back has placed them: a 40k-key sequence is 20 parts, beside sequences of one part,
    of none and of no kept key (masked_rows), with every mix of a query-side and a key-side mask and bias, and masks
    stored as 2..255. The reference's result, and the same bits again."""
    mask, bias = operands
    spec = Spec("query_parts", heads=8, heads_k=4, seqlens_q=(3, 1, 8, 2, 1), seqlens_k=(40_000, 100, 9_000, 0, 4100),
                mask=mask, mask_heads="Hk", keep=0.2, masked_rows=mask is not None, bias=bias, bias_heads="Hk",
                bias_dtype="q")
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    first = _checked(sample, label=f"mask {mask} bias {bias}")
    again = [sample] if mask is None else [sample, sample.replace(mask=noncanonical_mask(sample.mask))]
    if mask == "query":  # its key positions 2 bytes apart (the compaction steps a query row by its column stride)
        again.append(sample.replace(mask=_strided_last_dim(sample.mask)))
    for other in again:
        out, lse = other.run()
        assert torch.equal(first[0], out) and torch.equal(first[1], lse)


@pytest.mark.parametrize("kernel_name", ["decode", "prefill"])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("bias_dtype", ["float32", "q"])
@pytest.mark.parametrize("keep", [0.01, 0.3])
def test_query_side_terms_of_every_chunk_size(keep, bias_dtype, head_dim, kernel_name, monkeypatch, cuda_device):
    """Query-side operands over 1 to 8 queries per sequence (3: packed rows wrap past a head's queries) and a sequence
    of three 2048-key chunks. The decode kernel: compact_keys gathers each query's mask and bias along the listed keys
    of a chunk, term by term in query-major order, with chunks listing fewer keys than the pass has threads (keep
    0.01: ~8% of the keys listed for 8 queries, a few for one) and more (keep 0.3); its score step finds each row's
    terms by the row's place in the ring (found once per thread at D = 64, per tile at D = 256). The prefill kernel:
    pass 2 reads each row's operands from its row start. The reference's result."""
    spec = Spec("terms_chunks", head_dim=head_dim, heads=8, heads_k=2, seqlens_q=(8, 1, 3), seqlens_k=(5000, 2100, 300),
                mask="query", mask_heads="Hk", keep=keep, bias="query", bias_heads="Hk", bias_dtype=bias_dtype)
    reason = support_reason(spec, torch.bfloat16, "cuda")  # D = 256 where the build has it
    if reason:
        pytest.skip(reason)
    monkeypatch.setenv("DMATTN_KERNEL", kernel_name)
    _checked(make_sample(spec, torch.bfloat16, "cuda"), label=f"{kernel_name} keep {keep}")
