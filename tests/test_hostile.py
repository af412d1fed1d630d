"""Inputs that once crashed the process or were refused for no reason: each must now run right or raise a clear error.

The calls that used to crash (a division by zero with no query heads, sizes narrowed to 32 bits) run in a child
interpreter, so a regression fails one test instead of killing the test run: the child must exit normally and print
what it got. Few children (each costs an interpreter start and an import of torch), each covering one finding on
every way in. `device` is conftest.py's fixture: "cpu", and "cuda" where this build can run it.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
from expecttest import assert_expected_inline

import dmattn_ops


def dtype_for(device):
    """The CUDA kernels take float16 / bfloat16 only."""
    return torch.float32 if device == "cpu" else torch.float16


def run_child(device, body):
    """Runs ``body`` in a fresh interpreter with ``dev``, ``dtype`` and ``cu`` (int32 cu_seqlens on dev) defined;
    returns its stdout once it has exited normally."""
    prelude = textwrap.dedent(
        f"""
        import torch
        import dmattn_ops
        dev, dtype = {device!r}, {dtype_for(device)}

        def cu(*values):
            return torch.tensor(values, dtype=torch.int32, device=dev)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(body)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"child exited with {result.returncode}:\n{result.stderr}"
    return result.stdout.strip()


def test_zero_query_heads(device):
    """H = 0 is valid: out (total_q, 0, D), lse (0, total_q). The mask's Hm = H = 0 used to divide 0 by 0."""
    out = run_child(
        device,
        """
        q = torch.randn(3, 0, 8, device=dev, dtype=dtype)       # (total_q, H = 0, D)
        k = v = torch.randn(5, 1, 8, device=dev, dtype=dtype)   # (total_k, Hk = 1, D)
        mask = torch.ones(5, 0, dtype=torch.bool, device=dev)   # key-side, Hm = H = 0
        bias = torch.zeros(3, 1, 5, device=dev)                 # query-side, Hm = 1
        args = (q, k, v, cu(0, 3), cu(0, 5), 3, 5)

        def api(*args):
            return dmattn_ops.varlen_attention(*args, mask=mask, bias=bias, is_causal=True, return_lse=True)

        calls = {
            "api": lambda: api(*args),
            "op": lambda: torch.ops.dmattn.varlen_fwd(*args, mask, bias, None, True),
            "compile": lambda: torch.compile(api, backend="eager", fullgraph=True)(*args),
        }
        for name, call in calls.items():
            out, lse = call()
            print(name, tuple(out.shape), tuple(lse.shape))
        """,
    )
    assert_expected_inline(out, """\
api (3, 0, 8) (0, 3)
op (3, 0, 8) (0, 3)
compile (3, 0, 8) (0, 3)""")


def test_sizes_past_int32_and_max_seqlen_past_the_totals(device):
    """Sizes the kernels keep in 32 bits are range-checked (zero-element tensors: no memory needed), before any
    stride; a max_seqlen far past the totals runs exactly as the real maxima do (it once sized an impossible CUDA
    grid)."""
    out = run_child(
        device,
        """
        def error(call):
            try:
                call()
            except ValueError as e:
                return f"ValueError: {e}"
            return "no error"

        heads = torch.empty(0, 2**32, 8, device=dev, dtype=dtype)      # H = Hk = 2^32 narrowed to 0
        long_cu = torch.zeros(1, dtype=torch.int32, device=dev).expand(2**31 + 1)  # B = 2^31 narrowed to -2^31
        q = torch.randn(3, 1, 8, device=dev, dtype=dtype)
        for call in (
            lambda: dmattn_ops.varlen_attention(heads, heads, heads, cu(0), cu(0), 0, 0),
            lambda: torch.ops.dmattn.varlen_fwd(heads, heads, heads, cu(0), cu(0), 0, 0),
            lambda: dmattn_ops.varlen_attention(q, q, q, long_cu, long_cu, 3, 3),
            lambda: torch.ops.dmattn.varlen_fwd(q, q, q, long_cu, long_cu, 3, 3),
        ):
            print(error(call))

        k = v = torch.randn(5, 1, 8, device=dev, dtype=dtype)
        batch = (q, k, v, cu(0, 1, 3), cu(0, 2, 5))
        huge = dmattn_ops.varlen_attention(*batch, 2**62, 2**62, is_causal=True, return_lse=True)
        exact = dmattn_ops.varlen_attention(*batch, 2, 3, is_causal=True, return_lse=True)
        print("max_seqlen 2^62 as exact:", all(torch.equal(a, b) for a, b in zip(huge, exact)))
        """,
    )
    assert_expected_inline(out, """\
ValueError: dmattn.varlen_fwd: the number of query heads H (q.shape[1]) must be at most 2147483647 (the kernels keep it in 32 bits), got 4294967296
ValueError: dmattn.varlen_fwd: the number of query heads H (q.shape[1]) must be at most 2147483647 (the kernels keep it in 32 bits), got 4294967296
ValueError: dmattn.varlen_fwd: the length B + 1 of cu_seqlens_q must be at most 2147483647 (the kernels keep it in 32 bits), got 2147483649
ValueError: dmattn.varlen_fwd: the length B + 1 of cu_seqlens_q must be at most 2147483647 (the kernels keep it in 32 bits), got 2147483649
max_seqlen 2^62 as exact: True""")


# ---- size-1 dims: their strides do not matter (the kernels read element 0 only) ---------------------------------


def test_head_dim_1_with_any_stride(device):
    """A head dim of 1 has no meaningful stride, and .contiguous() keeps whatever it is: such tensors run, and give
    what their contiguous copies give, in eager mode, through the raw op and compiled."""
    dtype = dtype_for(device)
    q = torch.randn(1, 5, 4, device=device, dtype=dtype).permute(1, 2, 0)  # (5, 4, 1), strides (4, 1, 20)
    k = torch.randn(1, 9, 2, device=device, dtype=dtype).permute(1, 2, 0)  # (9, 2, 1), strides (2, 1, 18)
    v = torch.randn(1, 9, 2, device=device, dtype=dtype).permute(1, 2, 0)
    assert q.stride(2) != 1
    cu_q = dmattn_ops.cu_seqlens([3, 2], device=device)
    cu_k = dmattn_ops.cu_seqlens([5, 4], device=device)
    expected = dmattn_ops.varlen_attention(
        q.clone(memory_format=torch.contiguous_format), k.clone(memory_format=torch.contiguous_format),
        v.clone(memory_format=torch.contiguous_format), cu_q, cu_k, 3, 5, is_causal=True,
    )
    assert torch.equal(dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 3, 5, is_causal=True), expected)
    assert torch.equal(torch.ops.dmattn.varlen_fwd(q, k, v, cu_q, cu_k, 3, 5, is_causal=True)[0], expected)
    compiled = torch.compile(dmattn_ops.varlen_attention, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, k, v, cu_q, cu_k, 3, 5, is_causal=True), expected)

    empty = torch.randn(0, 1, 1, device=device, dtype=dtype) * 1.0  # strides (1, 0, 0), as elementwise ops give
    assert empty.stride(2) != 1
    assert dmattn_ops.varlen_attention(empty, empty, empty, cu_q[:1], cu_k[:1], 0, 0).shape == (0, 1, 1)


def test_single_entry_cu_seqlens_with_any_stride(device):
    """cu_seqlens of one entry (B = 0) is read at element 0 only, whatever its stride: every query row is owned by
    no sequence, so out = 0 and lse = -inf."""
    dtype = dtype_for(device)
    q = torch.randn(3, 2, 8, device=device, dtype=dtype)
    k = torch.randn(4, 2, 8, device=device, dtype=dtype)
    cu = torch.zeros(2, dtype=torch.int32, device=device)[::2]  # (1,), stride 2
    assert cu.stride(0) != 1
    for out, lse in (
        dmattn_ops.varlen_attention(q, k, k, cu, cu, 0, 0, return_lse=True),
        torch.ops.dmattn.varlen_fwd(q, k, k, cu, cu, 0, 0),
    ):
        assert torch.equal(out, torch.zeros_like(q))
        assert torch.equal(lse, torch.full((2, 3), float("-inf"), device=device))
