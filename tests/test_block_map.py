"""Query-side masks made of whole blocks: the CUDA prefill kernel summarizes such a mask by blocks of 64 packed query
rows x 32 key positions (csrc/cuda/passes.h, BlockMap) and skips the tiles it hides whole, runs the ones it shows whole
without reading it, and reads the rest per element. The masks here are random per block (all False, all True or
random), with sequences that do not start on a block boundary, so all three kinds of tile and blocks shared by two
sequences occur; the keys no query can see hold NaN, which must not reach the output. Checked against the float64
reference on every device (the CPU kernel has no block map: the same contract, another path).
"""

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention

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


@pytest.mark.parametrize("heads", [1, HK, H], ids=["Hm=1", "Hm=Hk", "Hm=H"])
@pytest.mark.parametrize("causal", [False, True], ids=["", "causal"])
def test_block_structured_query_mask(device, heads, causal):
    g = torch.Generator().manual_seed(heads * 2 + causal)
    lens_q, lens_k = [70, 1, 130, 45, 200], [90, 33, 130, 300, 200]
    total_q, total_k, max_k = sum(lens_q), sum(lens_k), max(lens_k)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(total_q, H, D, generator=g)
    k, v = (torch.randn(total_k, HK, D, generator=g) for _ in range(2))
    mask = block_mask(lens_q, lens_k, heads, g)
    hidden = ~visible_keys(mask, lens_q, lens_k, causal)
    k[hidden], v[hidden] = float("nan"), float("nan")
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    bias = torch.randn(total_q, 1, max_k, generator=g)  # a query-side bias too: read on every tile the mask allows

    for b in (None, bias):
        got, lse = dmattn_ops.varlen_attention(
            *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max(lens_q), max_k,
            mask=mask.to(device), bias=None if b is None else b.to(device), is_causal=causal, return_lse=True)
        want, want_lse = reference_varlen_attention(
            *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max(lens_q), max_k, mask=mask, bias=b,
            is_causal=causal)
        assert not got.isnan().any() and not lse.isnan().any()
        tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cpu().double(), want, **tol)
        torch.testing.assert_close(lse.cpu().double(), want_lse, **tol)
