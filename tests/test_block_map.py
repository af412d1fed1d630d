"""Masks made of whole blocks. Query-side ones: the CUDA prefill kernel summarizes such a mask by blocks of 64 packed
query rows x 32 key positions (csrc/cuda/passes.h, BlockMap) and skips the tiles it hides whole, runs the ones it
shows whole without reading it, and reads the rest per element. The masks here are random per block (all False, all
True or random), with sequences that do not start on a block boundary, so all three kinds of tile and blocks shared by
two sequences occur. Key-side ones, which the sm90a kernel's query-side variant maps by sequence on a cc 9.0 device
(BlockMap::by_sequence: a row of 32-key blocks per (mask head, sequence), in segments or at a stride, whichever is
smaller): random per 32-key block of each sequence, over a skewed batch (segments) and a batch of like lengths (the
stride), the sm90a path asserted from the logged plan there. The keys no query can see hold NaN, which must not reach
the output. Checked against the float64 reference on every device (the CPU kernel has no block map: the same
contract, another path).
"""

import re

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention, window_mask
from samples import build_reason

H, HK, D = 4, 2, 64


def block_mask(lens_q, lens_k, heads, g, kinds=("dead", "whole", "random")):
    """(total_q, heads, max_k) bool: per (64-row block of packed rows, 32-position block, head) one of kinds."""
    total_q, max_k = sum(lens_q), max(lens_k)
    row_blocks, col_blocks = -(-total_q // 64), -(-max_k // 32)
    choice = torch.randint(0, len(kinds), (row_blocks, heads, col_blocks), generator=g)
    mask = torch.zeros(row_blocks * 64, heads, col_blocks * 32, dtype=torch.bool)
    for i, kind in enumerate(kinds):
        pick = (choice == i).repeat_interleave(64, 0).repeat_interleave(32, 2)
        if kind == "whole":
            mask |= pick
        elif kind == "random":
            mask |= pick & (torch.rand(mask.shape, generator=g) < 0.5)
    return mask[:total_q, :, :max_k].contiguous()


def visible_keys(mask, lens_q, lens_k, causal):
    """(total_k,) bool: keys some query sees (the others get NaN K / V)."""
    seen, q0, k0 = [], 0, 0
    for lq, lk in zip(lens_q, lens_k):
        m = mask[q0:q0 + lq, :, :lk].any(1)  # (lq, lk)
        if causal:
            m &= torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        seen.append(m.any(0) if lq else torch.zeros(lk, dtype=torch.bool))
        q0, k0 = q0 + lq, k0 + lk
    return torch.cat(seen)


def query_mask_problem(lens_q, lens_k, heads, causal, g):
    """q, k, v, a block-structured query-side mask (block_mask) of `heads` heads and cu_seqlens over the sequences; the
    keys no query sees (under the mask, and the causal limit where asked) hold NaN."""
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, H, D, generator=g)
    k, v = (torch.randn(total_k, HK, D, generator=g) for _ in range(2))
    mask = block_mask(lens_q, lens_k, heads, g)
    hidden = ~visible_keys(mask, lens_q, lens_k, causal)
    k[hidden], v[hidden] = float("nan"), float("nan")
    return q, k, v, mask, dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)


def assert_close_to_reference(got, lse, want, want_lse, dtype):
    """No NaN in out or lse, both within the dtype's tolerance of the float64 reference."""
    assert not got.isnan().any() and not lse.isnan().any()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu().double(), want, **tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **tol)


@pytest.mark.parametrize("heads", [1, HK, H], ids=["Hm=1", "Hm=Hk", "Hm=H"])
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_block_structured_query_mask(device, heads, causal):
    g = torch.Generator().manual_seed(heads * 2 + causal)
    lens_q, lens_k = [70, 1, 130, 45, 200], [90, 33, 130, 300, 200]
    total_q, max_k = sum(lens_q), max(lens_k)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, mask, cu_q, cu_k = query_mask_problem(lens_q, lens_k, heads, causal, g)
    bias = torch.randn(total_q, 1, max_k, generator=g)  # a query-side bias too: read on every tile the mask allows

    for b in (None, bias):
        got, lse = dmattn_ops.varlen_attention(
            *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max(lens_q), max_k,
            mask=mask.to(device), bias=None if b is None else b.to(device), is_causal=causal, return_lse=True)
        want, want_lse = reference_varlen_attention(
            *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max(lens_q), max_k, mask=mask, bias=b,
            is_causal=causal)
        assert_close_to_reference(got, lse, want, want_lse, dtype)


@pytest.mark.parametrize("layout", ["contiguous", "unaligned", "strided_keys", "heads_last"])
def test_block_structured_query_mask_of_long_rows(device, layout):
    """Rows of more than one 512-key chunk of the map's pass (csrc/cuda/block_map.cu: whole chunks of contiguous keys
    from a 16-byte aligned pointer as 16-byte loads, rows starting at every offset within 16 bytes (1301 keys a row);
    the rows' last chunks, an unaligned pointer and other strides byte by byte), in four memory layouts of the same
    mask: contiguous, one byte into a larger tensor, every other key of a wider tensor (key stride 2), and heads
    innermost (key stride = heads). The last row block is short (446 packed rows)."""
    g = torch.Generator().manual_seed(7)
    lens_q, lens_k = [70, 1, 130, 45, 200], [90, 33, 1100, 300, 1301]
    total_q, max_k = sum(lens_q), max(lens_k)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, mask, cu_q, cu_k = query_mask_problem(lens_q, lens_k, HK, False, g)
    given = mask.to(device)
    if layout == "strided_keys":
        wide = torch.zeros(total_q, HK, 2 * max_k, dtype=torch.bool, device=device)
        wide[:, :, ::2] = given
        given = wide[:, :, ::2]
    elif layout == "unaligned":
        storage = torch.zeros(given.numel() + 1, dtype=torch.bool, device=device)
        storage[1:] = given.flatten()
        given = storage[1:].view(given.shape)
    elif layout == "heads_last":
        given = given.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(given.cpu(), mask)

    got, lse = dmattn_ops.varlen_attention(
        *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max(lens_q), max_k, mask=given,
        return_lse=True)
    want, want_lse = reference_varlen_attention(
        *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max(lens_q), max_k, mask=mask)
    assert_close_to_reference(got, lse, want, want_lse, dtype)


def seen_by_rows(lens_q, lens_k, max_k, is_causal=False, window_size=None, key_range=None, seqused_k=None):
    """(total_q, max_k) bool: the keys each row may see by the contract before the mask: its sequence's keys (cut by
    seqused_k) under the window (the reference's window_mask, is_causal a right side of 0), and its key_range."""
    left, right = window_size if window_size is not None else (-1, -1)
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    seen = torch.zeros(sum(lens_q), max_k, dtype=torch.bool)
    q0 = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        lk = min(lk, int(seqused_k[b])) if seqused_k is not None else lk
        seen[q0:q0 + lq, :lk] = window_mask(lq, lk, (left, right))
        q0 += lq
    if key_range is not None:
        j = torch.arange(max_k)
        seen &= (j >= key_range[:, :1]) & (j < key_range[:, 1:])
    return seen


@pytest.mark.parametrize("case", ["keys", "causal", "causal_lq_lt_lk", "window", "key_range", "seqused_k"])
def test_unseen_mask_entries_change_nothing(device, case):
    """A query-side mask's entries that no row can see (past its sequence's keys, above the causal diagonal, outside
    a window or a key_range) change nothing, bit for bit, whether True or False: the CUDA map's pass
    (csrc/cuda/block_map.cu) votes only with the keys each row sees (and skips the 512-key chunks no row of a block
    sees), where a summary of every entry would send tiles down other paths (whole-visible tiles fold the scale into
    the exponent, partial ones do not). Rows of several chunks, row blocks across sequence
    boundaries, Hm = Hk; against the float64 reference too."""
    g = torch.Generator().manual_seed(11)
    lens_q, lens_k = [70, 1, 650, 45, 700, 30], [90, 33, 1100, 300, 700, 1300]
    if case == "causal":
        lens_k = lens_q
    total_q, max_k = sum(lens_q), max(lens_k)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, mask, cu_q, cu_k = query_mask_problem(lens_q, lens_k, HK, False, g)
    # finite K / V (query_mask_problem's NaN keys are another test's subject): only the mask's unseen entries vary
    k, v = (torch.randn(t.shape, generator=g) for t in (k, v))
    kwargs, key_range, seqused_k = {}, None, None
    if case.startswith("causal"):
        kwargs["is_causal"] = True
    elif case == "window":
        kwargs["window_size"] = (200, 40)
    elif case == "key_range":
        lo = torch.randint(0, max_k, (total_q,), generator=g)
        key_range = torch.stack([lo, lo + torch.randint(0, 600, (total_q,), generator=g)], 1).int()
    elif case == "seqused_k":
        seqused_k = torch.tensor([min(lk, u) for lk, u in zip(lens_k, [50, 40, 700, 300, 200, 900])], dtype=torch.int32)
    seen = seen_by_rows(lens_q, lens_k, max_k, key_range=key_range, seqused_k=seqused_k, **kwargs)[:, None, :]
    assert (~seen).sum() > seen.sum() // 4, "the case leaves entries no row sees"
    extra = dict(kwargs, key_range=key_range, seqused_k=seqused_k)

    def run(m):
        on = {n: t.to(device) if torch.is_tensor(t) else t for n, t in extra.items()}
        return dmattn_ops.varlen_attention(
            *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max(lens_q), max_k,
            mask=m.to(device), return_lse=True, **on)

    out_false, lse_false = run(mask & seen)
    out_true, lse_true = run(mask | ~seen)
    assert torch.equal(out_false, out_true) and torch.equal(lse_false, lse_true)
    want, want_lse = reference_varlen_attention(
        *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max(lens_q), max_k, mask=mask, **extra)
    rows = want_lse.isfinite()  # rows that see no key: lse -inf in both
    assert torch.equal(lse_true.cpu().isfinite(), rows)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_true.cpu().double(), want, **tol)
    torch.testing.assert_close(lse_true.cpu().double()[rows], want_lse[rows], **tol)


def block_key_mask(lens_k, heads, g, kinds=("dead", "whole", "random")):
    """(total_k, heads) bool: per (32-position block of each sequence's keys, head) one of kinds."""
    parts = []
    for lk in lens_k:
        blocks = -(-lk // 32)
        choice = torch.randint(0, len(kinds), (blocks, heads), generator=g).repeat_interleave(32, 0)[:lk]
        keep = torch.zeros(lk, heads, dtype=torch.bool)
        for i, kind in enumerate(kinds):
            if kind == "whole":
                keep |= choice == i
            elif kind == "random":
                keep |= (choice == i) & (torch.rand(lk, heads, generator=g) < 0.5)
        parts.append(keep)
    return torch.cat(parts)


def _sm90a_device(head_dim) -> bool:
    """A cc 9.0 device and a build with the sm90a path at head_dim: where the plan must take it (tests/test_sm90a.py)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        return False
    sm90a = dmattn_ops.build_info().get("cuda_arch_paths", {}).get("sm90a", {})
    return head_dim in (sm90a.get("head_dims") or ())


@pytest.mark.parametrize("batch", ["skewed", "like_lengths"])
@pytest.mark.parametrize("head_dim", [64, 256])
@pytest.mark.parametrize("heads", [1, HK, H], ids=["Hm=1", "Hm=Hk", "Hm=H"])
def test_block_structured_key_mask_of_a_skewed_batch(device, heads, head_dim, batch, monkeypatch, capfd):
    """A key-side mask made of whole 32-key blocks of each sequence over a skewed batch (one 3,000-key sequence amid
    40 short ones of odd lengths), or 48 sequences of 1 to 128 keys, beside a query-side bias and, at D = 256, alone:
    on Hopper the sm90a kernel maps such a mask beside the bias per sequence (passes.h, BlockMap::sequence_row), the
    skewed batch's map and bits in segments sized by each sequence's own keys (dead, whole and mixed tiles in segments
    that start after key counts that are not multiples of 128), the like lengths' at a stride of 4 blocks a sequence
    (the smaller layout there); alone (D = 256) it gathers the mask's kept rows into slots instead. On a cc 9.0
    device with the sm90a path built, the logged plan (DMATTN_LOG_PLAN=1) must show that path: sm90a_query=1 with a
    map of the mask's heads beside the bias, sm90a_slots=1 and no map alone (but for a mask of H heads over the like
    lengths at D = 256: sequences of one query tile, which keep the sm80 kernels there, and the plan must say so).
    Keys no head keeps hold NaN, which must not reach the output."""
    reason = build_reason(head_dim, torch.bfloat16 if device == "cuda" else torch.float32, device)
    if reason:  # D = 256 where the build has it
        pytest.skip(reason)
    g = torch.Generator().manual_seed(heads * 3 + head_dim)
    if batch == "skewed":
        lens_q = [1 + (7 * i) % 9 for i in range(20)] + [200] + [(5 * i) % 6 for i in range(20)]
        lens_k = [1 + (37 * i) % 190 for i in range(20)] + [3000] + [1 + (53 * i) % 250 for i in range(20)]
    else:
        lens_k = [128 - (29 * i) % 128 for i in range(48)]
        lens_q = [1 + (11 * i) % k for i, k in enumerate(lens_k)]
    on_sm90a = device == "cuda" and _sm90a_device(head_dim)
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    total_q, total_k, max_k = sum(lens_q), sum(lens_k), max(lens_k)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(total_q, H, head_dim, generator=g)
    k, v = (torch.randn(total_k, HK, head_dim, generator=g) for _ in range(2))
    mask = block_key_mask(lens_k, heads, g)
    hidden = ~mask.any(1)
    k[hidden], v[hidden] = float("nan"), float("nan")
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    bias = torch.randn(total_q, 1, max_k, generator=g)  # query-side, in q's dtype on the device

    for b in (None, bias) if head_dim == 256 else (bias,):
        capfd.readouterr()
        got, lse = dmattn_ops.varlen_attention(
            *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max(lens_q), max_k,
            mask=mask.to(device), bias=None if b is None else b.to(device, dtype), is_causal=True, return_lse=True)
        want, want_lse = reference_varlen_attention(
            *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max(lens_q), max_k, mask=mask,
            bias=None if b is None else b.to(dtype).double(), is_causal=True)
        if on_sm90a:  # beside the bias, the by-sequence map's path ran: the query-side variant over a map of Hm heads
            torch.cuda.synchronize()
            plans = re.findall(r"kernel=prefill .*block_map_heads=(\d+) sm90a=(\d) sm90a_slots=(\d) sm90a_query=(\d)",
                               capfd.readouterr().err)
            if head_dim > 128 and heads > HK and max(lens_q) <= 128:
                # heuristics.h sm90a_slots_supports / sm90a_query_supports: at D = 256 a mask finer than the KV heads
                # over sequences of one query tile keeps the sm80 kernels, which read its kept rows alone (the like
                # lengths, Hm = H)
                assert [sm90a for _, sm90a, _, _ in plans] == ["0"], plans
            elif b is None:  # alone: its kept rows gathered into slots (heuristics.h sm90a_slots_supports), no map
                assert plans == [("0", "1", "1", "0")], plans
            else:
                assert plans == [(str(heads), "1", "0", "1")], plans
        assert_close_to_reference(got, lse, want, want_lse, dtype)
