"""Query-side masks and biases read from shared memory: the CUDA prefill kernel copies each KV tile's operand rows
into shared memory with the tile's K (ScoreOperands::stage in csrc/cuda/sm80/score_operands.cuh) when its keys are
contiguous (a row's run of a tile may start anywhere in its first 16-byte chunk) and no key-side mask reorders them,
up to head dim 128; other calls (a key stride of 2, head dim 256) read them element by element. Both paths are run
here on the same values: the aligned layout, a row stride one element wider than the row (sliced from a wider
tensor) and a key stride of 2, with sequences whose keys end inside a 16-byte chunk, sequences with no query, fp32
and 16-bit biases, every head broadcast, causal or not, and a window. Hidden elements hold a NaN bias and keys no
query sees hold NaN in K / V, which must not reach the output. Checked against the float64 reference on every device
(the CPU kernel reads every layout one way: the same contract).
"""

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention
from samples import build_reason

H, HK = 4, 2
LENS_Q = [70, 1, 130, 45, 200, 0]
LENS_K = [90, 33, 130, 301, 320, 7]  # max 320 = 20 chunks of 16 mask bytes; 301, 33, 7 end inside a chunk


def laid_out(t, layout):
    """t (total_q, Hm, max_k) with the same values in the named memory layout."""
    if layout == "aligned":
        return t.contiguous()
    if layout == "row_plus_one":  # row stride max_k + 1 elements: no row after the first starts a chunk
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 1, dtype=t.dtype, device=t.device)
        wide[..., :-1] = t
        return wide[..., :-1]
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)  # "key_stride_2"
    wide[..., ::2] = t
    return wide[..., ::2]


def visible_keys(mask, causal, window):
    """(total_k,) bool: keys some query sees (the others get NaN K / V)."""
    seen, q0 = [], 0
    for lq, lk in zip(LENS_Q, LENS_K):
        m = mask[q0:q0 + lq, :, :lk].any(1) if mask is not None else torch.ones(lq, lk, dtype=torch.bool)
        pos = torch.arange(lq)[:, None] + (lk - lq)
        if causal:
            m &= torch.arange(lk)[None, :] <= pos
        if window is not None:
            m &= torch.arange(lk)[None, :] >= pos - window
        seen.append(m.any(0) if lq else torch.zeros(lk, dtype=torch.bool))
        q0 += lq
    return torch.cat(seen)


def problem(operands, heads, causal, window, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    total_q, total_k, max_k = sum(LENS_Q), sum(LENS_K), max(LENS_K)
    q = torch.randn(total_q, H, head_dim, generator=g)
    k, v = (torch.randn(total_k, HK, head_dim, generator=g) for _ in range(2))
    mask = torch.rand(total_q, heads, max_k, generator=g) < 0.6 if "mask" in operands else None
    bias = None
    if "bias" in operands:
        bias = torch.randn(total_q, heads, max_k, generator=g)
        if mask is not None:
            bias[~mask] = float("nan")  # a hidden element's bias is never used
    hidden = ~visible_keys(mask, causal, window)
    k[hidden], v[hidden] = float("nan"), float("nan")
    return q, k, v, mask, bias


OPERANDS = ["mask", "bias", "mask+bias", "mask+bias32"]


@pytest.mark.parametrize("layout", ["aligned", "row_plus_one", "key_stride_2"])
@pytest.mark.parametrize("operands", OPERANDS, ids=[o.replace("+", "_") for o in OPERANDS])
@pytest.mark.parametrize("heads", [1, HK, H], ids=["hm1", "hmk", "hmh"])
@pytest.mark.parametrize("causal,window", [(False, None), (True, None), (True, 40)],
                         ids=["full", "causal", "window40"])
@pytest.mark.parametrize("head_dim", [64, 128, 256], ids=["d64", "d128", "d256"])
def test_query_side_operands_in_every_layout(head_dim, causal, window, heads, operands, layout, device):
    if device == "cpu" and head_dim != 64:
        pytest.skip("the CPU kernel has one path for every head dim: 64 covers it")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    reason = build_reason(head_dim, dtype, device)
    if reason:
        pytest.skip(reason)
    q, k, v, mask, bias = problem(operands, heads, causal, window, head_dim,
                                  seed=head_dim + 7 * heads + 3 * causal + len(operands))
    bias_dtype = torch.float32 if operands.endswith("32") or device == "cpu" else dtype
    cu_q, cu_k = dmattn_ops.cu_seqlens(LENS_Q), dmattn_ops.cu_seqlens(LENS_K)
    max_q, max_k = max(LENS_Q), max(LENS_K)
    got_mask = None if mask is None else laid_out(mask.to(device), layout)
    got_bias = None if bias is None else laid_out(bias.to(device, bias_dtype), layout)
    got, lse = dmattn_ops.varlen_attention(
        *(t.to(device, dtype) for t in (q, k, v)), cu_q.to(device), cu_k.to(device), max_q, max_k,
        mask=got_mask, bias=got_bias, is_causal=causal, window_size=(window, 0) if window is not None else None,
        return_lse=True)
    want, want_lse = reference_varlen_attention(
        *(t.to(dtype).double() for t in (q, k, v)), cu_q, cu_k, max_q, max_k, mask=mask,
        bias=None if bias is None else bias.to(bias_dtype).double(), is_causal=causal,
        window_size=(window, 0) if window is not None else None)
    assert not got.isnan().any() and not lse.isnan().any()
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cpu().double(), want, **tol)
    torch.testing.assert_close(lse.cpu().double(), want_lse, **tol)


@pytest.mark.parametrize("lie", ["last_past_total", "longer_than_max_seqlen"])
def test_cuda_staged_operands_with_lying_cu_seqlens_stay_in_bounds(lie, cuda_device):
    """Aligned query-side operands (the staged path) with cu_seqlens that break the contract: the kernel clamps the
    lengths, so its copies read nothing out of bounds (compute-sanitizer runs this test) and every output is NaN."""
    q, k, v, mask, bias = problem("mask+bias", HK, True, None, 128, seed=5)
    cu_q, cu_k = dmattn_ops.cu_seqlens(LENS_Q).tolist(), dmattn_ops.cu_seqlens(LENS_K).tolist()
    max_q, max_k = max(LENS_Q), max(LENS_K)
    if lie == "last_past_total":
        cu_q[-1], cu_k[-1] = cu_q[-1] + 5, cu_k[-1] + 1000
    else:
        max_q, max_k = 1, 16
        mask, bias = mask[..., :16], bias[..., :16]  # a query-side operand is max_seqlen_k wide
    dev = cuda_device
    out, lse = torch.ops.dmattn.varlen_fwd(
        *(t.to(dev, torch.bfloat16) for t in (q, k, v)), torch.tensor(cu_q, dtype=torch.int32, device=dev),
        torch.tensor(cu_k, dtype=torch.int32, device=dev), max_q, max_k, mask.to(dev), bias.to(dev, torch.bfloat16),
        None, True)
    torch.cuda.synchronize()
    assert out.isnan().all() and lse.isnan().all()
