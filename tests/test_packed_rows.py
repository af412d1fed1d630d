"""The mask_mod adapter's two passes (csrc/packed_rows.h): dmattn::packed_rows, the per-row facts in one pass, and
dmattn::zero_unseen_, the don't-care entries zeroed in place. Their values against references written with torch ops
from the contract (csrc/schema.cpp), lying cu_seqlens and counts included, their errors, and torch.library.opcheck, on
every device this build has a kernel for (CUDA: a build with the CUDA backend).
"""

import re

import pytest
import torch

import dmattn_ops  # noqa: F401 - loads the op library


def _kernel_for(device):
    """Skips, with the reason, where this build has no packed_rows kernel for device."""
    key = {"cpu": "CPU", "cuda": "CUDA"}[torch.device(device).type]
    if not torch._C._dispatch_has_kernel_for_dispatch_key("dmattn::packed_rows", key):
        pytest.skip(f"dmattn::packed_rows has no {key} kernel in this build (a CPU-only build: DMATTN_BACKENDS)")
    return device


def _reference(cu, other, total):
    """rows (4, total) and anchor (2,) from the contract: torch.searchsorted for the owning sequence (the same search,
    so equal also where cu is not sorted), clamped to [0, B - 1]; the other side's count, 0 from cu[-1] on; the
    anchor as the first maximum of min(count, other count); a row without count at (anchor, position 0), its last
    position 0."""
    cu, other = cu.long().cpu(), other.long().cpu()
    i = torch.arange(total)
    b = (torch.searchsorted(cu, i, right=True) - 1).clamp(0, cu.shape[0] - 2)
    count = torch.where(i < cu[-1], (other[1:] - other[:-1])[b], 0)
    anchor = torch.minimum(cu[1:] - cu[:-1], other[1:] - other[:-1]).argmax()
    seen = count > 0
    rows = torch.stack([torch.where(seen, b, anchor), torch.where(seen, i - cu[b], 0), count,
                        torch.where(seen, count - 1, 0)])
    return rows, torch.stack([anchor, torch.tensor(0)])


CASES = {
    "plain": ([0, 3, 5, 9], [0, 4, 4, 10], 9),
    "padding_rows": ([0, 3, 5, 9], [0, 4, 4, 10], 12),  # rows past cu[-1]: no sequence's
    "fewer_rows": ([0, 3, 5, 9], [0, 4, 4, 10], 4),  # total below cu[-1]
    "empty_sequences": ([0, 0, 2, 2, 2, 5], [0, 1, 1, 3, 3, 3], 6),
    "one_sequence": ([0, 7], [0, 2], 7),
    "no_rows": ([0, 3, 5], [0, 2, 2], 0),
    "no_sequence_has_both": ([0, 2, 2], [0, 0, 3], 3),  # the anchor: the first of the equal minima
    "ties": ([0, 2, 4, 6], [0, 2, 4, 6], 6),
    "unsorted": ([0, 5, 2, 9], [0, 3, 1, 4], 10),  # lying: a later offset below an earlier one
    "negative": ([-3, 2, 4], [0, -1, 6], 6),
    "beyond_total": ([0, 4, 100], [0, 50, 60], 8),
    "start_above_zero": ([2, 4, 6], [1, 3, 5], 8),
}


@pytest.mark.parametrize("dtypes", [(torch.int32, torch.int32), (torch.int64, torch.int64),
                                    (torch.int32, torch.int64), (torch.int64, torch.int32)])
@pytest.mark.parametrize("case", list(CASES))
def test_values_match_the_contract(case, dtypes, device):
    _kernel_for(device)
    cu_list, other_list, total = CASES[case]
    cu = torch.tensor(cu_list, dtype=dtypes[0], device=device)
    other = torch.tensor(other_list, dtype=dtypes[1], device=device)
    rows, anchor = torch.ops.dmattn.packed_rows(cu, other, total)
    expected_rows, expected_anchor = _reference(cu, other, total)
    assert rows.dtype == anchor.dtype == torch.int64 and rows.device == anchor.device == cu.device
    assert rows.shape == (4, total) and anchor.shape == (2,)
    assert torch.equal(rows.cpu(), expected_rows), case
    assert torch.equal(anchor.cpu(), expected_anchor), case


def test_many_sequences_and_rows(device):
    """More rows than one block's threads and more sequences than block 0's (its argmax reduces across threads)."""
    _kernel_for(device)
    g = torch.Generator().manual_seed(0)
    lens_q = torch.randint(0, 9, (1000,), generator=g)
    lens_k = torch.randint(0, 9, (1000,), generator=g)
    lens_k[777] = lens_q[777] = 50  # the one maximum, far from thread 0's share
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens_q.cumsum(0)]).to(device=device, dtype=torch.int32)
    other = torch.cat([torch.zeros(1, dtype=torch.long), lens_k.cumsum(0)]).to(device)
    total = int(cu[-1]) + 33
    rows, anchor = torch.ops.dmattn.packed_rows(cu, other, total)
    expected_rows, expected_anchor = _reference(cu, other, total)
    assert torch.equal(rows.cpu(), expected_rows) and torch.equal(anchor.cpu(), expected_anchor)
    assert int(anchor[0]) == 777


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(1, dtype=torch.int32), torch.zeros(1, dtype=torch.int32), 0),
     "cu_seqlens must be a (B + 1,) tensor with B >= 1, got shape [1]"),
    ((torch.zeros(3, dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32), 0),
     "cu_seqlens_other must be a (B + 1,) tensor with B >= 1, got shape [2, 2]"),
    ((torch.zeros(3), torch.zeros(3, dtype=torch.int32), 0), "cu_seqlens must be int32 or int64, got Float"),
    ((torch.zeros(3, dtype=torch.int32), torch.zeros(4, dtype=torch.int32), 0),
     "cu_seqlens and cu_seqlens_other must have the same length B + 1, got 3 and 4"),
    ((torch.zeros(6, dtype=torch.int32)[::2], torch.zeros(3, dtype=torch.int32), 0),
     "cu_seqlens must be contiguous"),
    ((torch.zeros(3, dtype=torch.int32), torch.zeros(3, dtype=torch.int32), -1), "total must be >= 0, got -1"),
])
def test_errors_name_the_argument(args, message):
    with pytest.raises(RuntimeError, match=re.escape("dmattn.packed_rows: " + message)):
        torch.ops.dmattn.packed_rows(*args)


def test_devices_must_agree(cuda_device):
    _kernel_for(cuda_device)
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.dmattn.packed_rows(torch.zeros(3, dtype=torch.int32, device=cuda_device),
                                     torch.zeros(3, dtype=torch.int32), 2)


@pytest.mark.parametrize("case", ["plain", "padding_rows", "no_rows"])
def test_opcheck(case, device):
    """Schema, fake implementation (shapes and dtypes agree with the kernel), AOT dispatch with dynamic shapes."""
    _kernel_for(device)
    cu_list, other_list, total = CASES[case]
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device)
    other = torch.tensor(other_list, dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.dmattn.packed_rows.default, (cu, other, total))


def test_rows_past_the_grid_stride(device):
    """More rows than the CUDA pass's grid covers in one sweep (1024 blocks of 256 threads), rows without a count both
    in an empty sequence far from block 0 and past cu_seqlens[-1]: each block that holds one reduces the anchor."""
    _kernel_for(device)
    lens_q = torch.tensor([1000, 150_000, 3, 140_000])
    lens_k = torch.tensor([10, 0, 3, 20])  # sequence 1's rows see no key; the anchor is sequence 3
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens_q.cumsum(0)]).to(device)
    other = torch.cat([torch.zeros(1, dtype=torch.long), lens_k.cumsum(0)]).to(device=device, dtype=torch.int32)
    total = int(cu[-1]) + 5_000
    rows, anchor = torch.ops.dmattn.packed_rows(cu, other, total)
    expected_rows, expected_anchor = _reference(cu, other, total)
    assert torch.equal(rows.cpu(), expected_rows) and torch.equal(anchor.cpu(), expected_anchor)
    assert int(anchor[0]) == 3 and int(rows[0, 1500]) == 3 and int(rows[0, -1]) == 3


def _unseen_reference(grid, counts):
    """grid with [r, :, j] zeroed for every j >= counts[r] (the contract, csrc/packed_rows.h)."""
    j = torch.arange(grid.shape[2])
    keep = (j.view(1, 1, -1) < counts.cpu().view(-1, 1, 1))
    return torch.where(keep, grid.cpu(), torch.zeros((), dtype=grid.dtype))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32, torch.float16, torch.int64])
@pytest.mark.parametrize("shape", [(7, 1, 37), (5, 3, 64), (1, 1, 1), (3, 2, 300), (0, 2, 5), (4, 1, 0)])
@pytest.mark.parametrize("offset", [0, 3])
def test_zero_unseen_matches_the_contract(dtype, shape, offset, device):
    """Every row's entries from its count on are zeroed, in place, and nothing else is written: counts below 0, 0,
    inside, equal to and past the width; the grid placed `offset` elements into its storage (a run that starts and
    ends anywhere within 16 bytes), guard entries on both sides untouched."""
    _kernel_for(device)
    g = torch.Generator().manual_seed(sum(shape) + offset)
    rows, heads, width = shape
    n = rows * heads * width
    if dtype == torch.bool:
        storage = torch.rand(n + offset + 9, generator=g) < 0.7
    else:
        storage = (torch.rand(n + offset + 9, generator=g) * 100 + 1).to(dtype)
    storage = storage.to(device)
    before = storage.clone()
    grid = storage[offset:offset + n].view(shape)
    counts = torch.randint(-2, width + 3, (rows,), generator=g)
    if rows >= 4:
        counts[:4] = torch.tensor([-1, 0, width, width + 7])
    expected = _unseen_reference(grid, counts)
    assert torch.ops.dmattn.zero_unseen_(grid, counts.to(device)) is None
    assert torch.equal(grid.cpu(), expected)
    assert torch.equal(storage[:offset].cpu(), before[:offset].cpu())
    assert torch.equal(storage[offset + n:].cpu(), before[offset + n:].cpu())


def test_zero_unseen_many_lines(device):
    """More (row, head) lines than the CUDA pass's grid covers in one sweep."""
    _kernel_for(device)
    g = torch.Generator().manual_seed(1)
    grid = (torch.rand(40_000, 2, 24, generator=g) < 0.5).to(device)
    counts = torch.randint(0, 25, (40_000,), generator=g)
    expected = _unseen_reference(grid, counts)
    torch.ops.dmattn.zero_unseen_(grid, counts.to(device))
    assert torch.equal(grid.cpu(), expected)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)), "grid must be a 3-d (rows, heads, width) tensor, got shape [3, 4]"),
    ((torch.zeros(3, 2, 4).transpose(0, 1), torch.zeros(2, dtype=torch.long)), "grid must be contiguous"),
    ((torch.zeros(3, 1, 4), torch.zeros(2, dtype=torch.long)),
     "counts must be a (3,) tensor, one count per row of grid, got shape [2]"),
    ((torch.zeros(3, 1, 4), torch.zeros(3, dtype=torch.int32)), "counts must be int64, got Int"),
    ((torch.zeros(3, 1, 4), torch.zeros(6, dtype=torch.long)[::2]), "counts must be contiguous"),
])
def test_zero_unseen_errors_name_the_argument(args, message):
    with pytest.raises(RuntimeError, match=re.escape("dmattn.zero_unseen_: " + message)):
        torch.ops.dmattn.zero_unseen_(*args)


def test_zero_unseen_devices_must_agree(cuda_device):
    _kernel_for(cuda_device)
    with pytest.raises(RuntimeError, match="grid and counts must be on one device"):
        torch.ops.dmattn.zero_unseen_(torch.zeros(3, 1, 4, device=cuda_device), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_zero_unseen_opcheck(dtype, device):
    """Schema (grid mutated, nothing returned), fake implementation, AOT dispatch."""
    _kernel_for(device)
    grid = torch.ones(4, 2, 6, dtype=dtype, device=device)
    counts = torch.tensor([0, 3, 6, 9], device=device)
    torch.library.opcheck(torch.ops.dmattn.zero_unseen_.default, (grid, counts))
