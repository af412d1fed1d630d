"""dmattn::packed_rows, the mask_mod adapter's per-row facts in one pass (csrc/packed_rows.h): its values against a
reference written with torch ops from the contract (csrc/schema.cpp), lying cu_seqlens included, its errors, and
torch.library.opcheck, on every device this build has a kernel for (CUDA: a build with the CUDA backend).
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
    """rows (3, total) and anchor from the contract: torch.searchsorted for the owning sequence (the same search, so
    equal also where cu is not sorted), clamped to [0, B - 1]; the other side's count, 0 from cu[-1] on; the anchor
    as the first maximum of min(count, other count)."""
    cu, other = cu.long().cpu(), other.long().cpu()
    i = torch.arange(total)
    b = (torch.searchsorted(cu, i, right=True) - 1).clamp(0, cu.shape[0] - 2)
    count = torch.where(i < cu[-1], (other[1:] - other[:-1])[b], 0)
    anchor = torch.minimum(cu[1:] - cu[:-1], other[1:] - other[:-1]).argmax()
    return torch.stack([b, i - cu[b], count]), anchor


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
    assert rows.shape == (3, total) and anchor.shape == ()
    assert torch.equal(rows.cpu(), expected_rows), case
    assert int(anchor) == int(expected_anchor), case


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
    assert torch.equal(rows.cpu(), expected_rows) and int(anchor) == int(expected_anchor) == 777


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
