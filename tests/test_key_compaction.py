"""The key-side lists' compaction in parts: the warps' kernel (the default, FwdPlan::compact_by_warps) against the
chunk kernel it replaced (DMATTN_KEY_COMPACTION=chunks), bit for bit.

Both write the same lists (each (sequence, list head)'s kept key positions in ascending order, and their counts), so
every call through either gives the same out and lse to the last bit; a list that differed (a key lost, one twice,
two swapped) would move the kernels' sums. Each case is also checked against the float64 reference once. Lengths
sit on both kernels' part edges (2048 and 4096 keys: 2047, 2048, 2049, 4095, 4096, 4097, 8192), next to empty
sequences and sequences of one key, in calls long enough to be compacted in parts (max_seqlen_k > 2048).
"""

import math
import re

import pytest
import torch

from samples import Spec, assert_close_to_reference, make_sample, noncanonical_mask, support_reason
from test_kv_slots import assert_matches_reference, paged_cache, run as pool_run
from test_varlen_fwd import with_lies

EDGES = (40_000, 2047, 0, 2048, 1, 2049, 4095, 4096, 4097, 8192, 100)


def _launched(run):
    """run()'s result and the names of the key compaction kernels it launched (torch.profiler), or None where the
    profiler saw no CUDA kernel at all (no CUPTI here): nothing to tell the two passes apart by."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        result = run()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return result, ({name for name in kernels if "compact_key" in name} if kernels else None)


def _both(run, monkeypatch):
    """run() under the warps' compaction (the default) and under the chunk kernel's; each call must have launched
    the kernel it names (the plan line says compact_by_warps=1 for any call, so only the launches prove that the
    comparison is not of the chunk kernel with itself)."""
    monkeypatch.delenv("DMATTN_KEY_COMPACTION", raising=False)
    warps, ran = _launched(run)
    assert ran is None or any("compact_key_parts_by_warps_kernel" in name for name in ran), ran
    monkeypatch.setenv("DMATTN_KEY_COMPACTION", "chunks")
    chunks, ran = _launched(run)
    assert ran is None or (any("compact_key_parts_kernel<false>" in name for name in ran) and
                           not any("by_warps" in name for name in ran)), ran
    monkeypatch.delenv("DMATTN_KEY_COMPACTION")
    return warps, chunks


def _assert_same_bits(warps, chunks):
    for a, b in zip(warps, chunks):
        assert torch.equal(a, b) or (torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()))


def _skip_unsupported(spec, dtype=torch.bfloat16):
    reason = support_reason(spec, dtype, "cuda")
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("mask_heads", ["1", "Hk", "H"])
@pytest.mark.parametrize("kernel_name", ["decode", "prefill"])
def test_warps_and_chunks_give_the_same_lists(mask_heads, kernel_name, monkeypatch, cuda_device):
    """Every mask head count (Hm = 1: a column of adjacent bytes; Hk, H: each key's bytes for all heads adjacent, a
    list head's column strided by Hm), through the decode kernel (Hm = H runs the prefill kernel there) and the
    prefill kernel (its kept-row gather on sm90a), with the mask's heads 2 bytes apart and its True bytes stored as
    2..255: the same bits from both compactions, and the reference's result."""
    spec = Spec("compact_edges", heads=8, heads_k=4, seqlens_q=(2, 1, 3, 1, 1, 2, 1, 1, 3, 1, 1), seqlens_k=EDGES,
                mask="key", mask_heads=mask_heads, keep=0.3, bias="key", bias_heads="Hk")
    _skip_unsupported(spec)
    monkeypatch.setenv("DMATTN_KERNEL", kernel_name)
    sample = make_sample(spec, torch.bfloat16, "cuda")
    wide = sample.mask.new_zeros(sample.mask.shape[0], 2 * sample.mask.shape[1])
    wide[:, ::2] = sample.mask
    for variant in (sample, sample.replace(mask=wide[:, ::2]), sample.replace(mask=noncanonical_mask(sample.mask))):
        warps, chunks = _both(variant.run, monkeypatch)
        _assert_same_bits(warps, chunks)
    assert_close_to_reference(tuple(warps), sample.reference(), sample.reference(sample.dtype),
                              label=f"{kernel_name} Hm={mask_heads}")


@pytest.mark.parametrize("keep", [0.0, 0.02, 0.25, 1.0])
def test_every_keep_fraction(keep, monkeypatch, cuda_device):
    """No kept key (every count 0, every ballot empty), a few, a quarter, every key (each warp step's 32 slots
    written): the same bits."""
    spec = Spec("compact_keep", heads=8, heads_k=2, seqlens_q=(1,) * len(EDGES), seqlens_k=EDGES, mask="key",
                mask_heads="Hk", keep=keep)
    _skip_unsupported(spec)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    _assert_same_bits(*_both(sample.run, monkeypatch))


def test_the_decode_batch(monkeypatch, cuda_device):
    """issue 10's shape: 64 sequences of 1024-8192 keys, 8 list heads, a quarter of the keys kept."""
    gen = torch.Generator().manual_seed(10)
    lens = tuple(int(n) for n in torch.randint(1024, 8193, (64,), generator=gen))
    spec = Spec("compact_decode_batch", heads=32, heads_k=8, head_dim=128, seqlens_q=(1,) * 64, seqlens_k=lens,
                mask="key", mask_heads="Hk", keep=0.25)
    _skip_unsupported(spec)
    sample = make_sample(spec, torch.bfloat16, "cuda")
    _assert_same_bits(*_both(sample.run, monkeypatch))


def test_seqused_k_cuts_the_parts(monkeypatch, cuda_device):
    """seqused_k ends sequences inside a part, on a part edge and at 0 keys: the same bits."""
    spec = Spec("compact_seqused", heads=8, heads_k=2, seqlens_q=(1, 3, 1, 2), seqlens_k=(9000, 9000, 9000, 9000),
                seqused_k=(4096, 4097, 0, 8191), mask="key", mask_heads="Hk", keep=0.4)
    _skip_unsupported(spec)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    _assert_same_bits(*_both(sample.run, monkeypatch))


@pytest.mark.parametrize("mask_heads", [1, 2])
def test_a_key_pool(mask_heads, monkeypatch, cuda_device):
    """kv_slots: the decode kernel compacts the pool's mask rows through the slots (each key's row a slot, read
    after the slot loads), sequences over shuffled pages, one of them past a part of either kernel: the same bits as
    the chunk kernel's, and the reference's result."""
    call = paged_cache([1, 2, 1], [9000, 4097, 1], H=4, Hk=2, D=64, page_size=64, dtype=torch.bfloat16,
                       device="cuda", mask_heads=mask_heads)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    warps, chunks = _both(lambda: pool_run(call), monkeypatch)
    _assert_same_bits(warps, chunks)
    assert_matches_reference(*warps, call)


@pytest.mark.parametrize("lie", ["decreasing", "last_past_total", "negative", "longer_than_max_seqlen"])
def test_lying_cu_seqlens(lie, monkeypatch, cuda_device):
    """Lying cu_seqlens over parts (sequences overlap, pass total_k, start below 0, or are longer than
    max_seqlen_k): both compactions stay in bounds (compute-sanitizer runs this test) and the call is NaN
    everywhere either way."""
    spec = Spec("compact_lies", heads=8, heads_k=2, seqlens_q=(1, 4, 2), seqlens_k=(9000, 5000, 300), mask="key",
                mask_heads="Hk", keep=0.5)
    _skip_unsupported(spec, torch.float16)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, torch.float16, "cuda")
    cu_q, cu_k = sample.cu_seqlens_q.tolist(), sample.cu_seqlens_k.tolist()
    total_q, total_k = sample.q.shape[0], sample.k.shape[0]
    lies = {
        "decreasing": dict(cu_k=[0, cu_k[2], cu_k[1], cu_k[3]]),
        "last_past_total": dict(cu_q=cu_q[:-1] + [total_q + 5], cu_k=cu_k[:-1] + [total_k + 5000]),
        "negative": dict(cu_k=[0, -3] + cu_k[2:]),
        "longer_than_max_seqlen": dict(max_k=4100),
    }[lie]
    lying = with_lies(sample, lies)
    warps, chunks = _both(lying.run, monkeypatch)
    for out, lse in (warps, chunks):
        assert out.isnan().all() and lse.isnan().all()


def test_the_plan_says_which(monkeypatch, capfd, cuda_device):
    """DMATTN_LOG_PLAN shows compact_by_warps=1 by default and 0 under DMATTN_KEY_COMPACTION=chunks; a bad value is
    a clear error."""
    spec = Spec("compact_plan", heads=4, heads_k=2, seqlens_q=(1, 1), seqlens_k=(5000, 10), mask="key",
                mask_heads="Hk")
    _skip_unsupported(spec)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    capfd.readouterr()
    _both(sample.run, monkeypatch)
    assert re.findall(r"compact_by_warps=(\d)", capfd.readouterr().err) == ["1", "0"]
    monkeypatch.setenv("DMATTN_KEY_COMPACTION", "warps")
    with pytest.raises(ValueError, match="DMATTN_KEY_COMPACTION must be auto or chunks, got 'warps'"):
        sample.run()


def test_cuda_graph_replays(monkeypatch, cuda_device):
    """A captured call replays its ticket and statuses from the memset in the graph: replays give the first
    call's bits under both compactions."""
    from packed_batch import capture_cuda_graph

    spec = Spec("compact_graph", heads=8, heads_k=2, seqlens_q=(1, 1, 1), seqlens_k=(9000, 4097, 2), mask="key",
                mask_heads="Hk", keep=0.3)
    _skip_unsupported(spec)
    monkeypatch.setenv("DMATTN_KERNEL", "decode")
    sample = make_sample(spec, torch.bfloat16, "cuda")
    for setting in (None, "chunks"):
        if setting:
            monkeypatch.setenv("DMATTN_KEY_COMPACTION", setting)
        eager = sample.run()
        graph, outputs = capture_cuda_graph(sample.run)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(outputs[0], eager[0]) and torch.equal(outputs[1], eager[1])
    assert not math.isnan(float(eager[1][0, 0]))
