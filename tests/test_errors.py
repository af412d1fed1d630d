"""Bad input to ``dmattn.varlen_fwd`` fails with a clear Python exception: the type and the exact message.

Three ways in, one set of bad calls (``CASES``):
- the public API ``dmattn_ops.varlen_attention`` (eager: ``meta/rules.py`` first, then the CPU kernel's data checks);
- ``torch.compile(fullgraph=True)`` of a function calling it: the fake impl runs the same rules, so the eager message
  appears inside dynamo's ``TorchRuntimeError``; data errors surface unchanged when the compiled graph runs;
- ``torch.ops.dmattn.varlen_fwd`` called directly: the C++ safety net (``csrc/binding.cpp``) raises
  TypeError / ValueError, never crashes.

The messages are pinned inline (expecttest); after a deliberate wording change, refresh them with
``EXPECTTEST_ACCEPT=1 pytest tests/test_errors.py``.
"""

from unittest import mock

import expecttest
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import dmattn_ops

# One small valid call: two sequences, GQA (H = 4 query heads over Hk = 2 key/value heads), head_dim 8.
H, HK, D = 4, 2, 8
SEQLENS_Q, SEQLENS_K = (3, 2), (5, 4)
TOTAL_Q, TOTAL_K = sum(SEQLENS_Q), sum(SEQLENS_K)  # 5, 9
MAX_Q, MAX_K = max(SEQLENS_Q), max(SEQLENS_K)  # 3, 5


def _cu(*values):
    return torch.tensor(values, dtype=torch.int32)


def valid_args():
    """Every argument of the op, by schema name; values are irrelevant to the messages, so no seed."""
    return dict(
        q=torch.randn(TOTAL_Q, H, D),  # (total_q, H, D)
        k=torch.randn(TOTAL_K, HK, D),  # (total_k, Hk, D)
        v=torch.randn(TOTAL_K, HK, D),  # (total_k, Hk, D)
        cu_seqlens_q=_cu(0, 3, 5),  # (B + 1,)
        cu_seqlens_k=_cu(0, 5, 9),  # (B + 1,)
        max_seqlen_q=MAX_Q,
        max_seqlen_k=MAX_K,
        mask=None,
        bias=None,
        softmax_scale=None,
        is_causal=False,
    )


def _strided_head_dim(tokens, heads):
    """(tokens, heads, D) with stride 2 on head_dim: every other element of a (tokens, heads, 2 D) tensor."""
    return torch.randn(tokens, heads, 2 * D)[..., ::2]


# name -> overrides of valid_args(). Metadata cases come first; DATA_CASES need the values (CPU kernel checks).
CASES = {
    # dtypes
    "float_mask": dict(mask=torch.ones(TOTAL_K, 1)),
    "integer_bias": dict(bias=torch.zeros(TOTAL_K, 1, dtype=torch.int64)),
    "float_cu_seqlens": dict(cu_seqlens_q=torch.tensor([0.0, 3.0, 5.0])),
    "int64_cu_seqlens": dict(cu_seqlens_k=torch.tensor([0, 5, 9])),
    "float64_qkv": dict(
        q=torch.randn(TOTAL_Q, H, D, dtype=torch.float64),
        k=torch.randn(TOTAL_K, HK, D, dtype=torch.float64),
        v=torch.randn(TOTAL_K, HK, D, dtype=torch.float64),
    ),
    "float16_k_with_float32_q": dict(k=torch.randn(TOTAL_K, HK, D, dtype=torch.float16)),
    # ranks and shapes
    "q_rank_2": dict(q=torch.randn(TOTAL_Q, H * D)),
    "mask_rank_1": dict(mask=torch.ones(TOTAL_K, dtype=torch.bool)),
    "key_side_mask_rows": dict(mask=torch.ones(TOTAL_Q, 1, dtype=torch.bool)),  # total_q rows in rank 2
    "query_side_bias_rows": dict(bias=torch.zeros(TOTAL_K, 1, MAX_K)),  # total_k rows in rank 3
    "mask_heads_not_1_hk_h": dict(mask=torch.ones(TOTAL_K, 3, dtype=torch.bool)),
    "query_side_mask_width": dict(mask=torch.ones(TOTAL_Q, H, MAX_K + 1, dtype=torch.bool)),
    "k_v_shape_mismatch": dict(v=torch.randn(TOTAL_K - 2, HK, D)),
    "head_dim_mismatch": dict(k=torch.randn(TOTAL_K, HK, D // 2), v=torch.randn(TOTAL_K, HK, D // 2)),
    "h_not_multiple_of_hk": dict(k=torch.randn(TOTAL_K, 3, D), v=torch.randn(TOTAL_K, 3, D)),
    "cu_seqlens_lengths_differ": dict(cu_seqlens_k=_cu(0, 9)),
    "cu_seqlens_empty": dict(cu_seqlens_q=_cu(), cu_seqlens_k=_cu()),
    "cu_seqlens_strided": dict(cu_seqlens_q=_cu(0, 0, 3, 0, 5)[::2]),
    # layouts and devices
    "q_strided_head_dim": dict(q=_strided_head_dim(TOTAL_Q, H)),
    "v_strided_head_dim": dict(v=_strided_head_dim(TOTAL_K, HK)),
    "cu_seqlens_on_meta": dict(cu_seqlens_k=_cu(0, 5, 9).to("meta")),
    "bias_on_meta": dict(bias=torch.zeros(TOTAL_K, HK, device="meta")),
    # scalars
    "negative_max_seqlen": dict(max_seqlen_k=-1),
    "infinite_softmax_scale": dict(softmax_scale=float("inf")),
}
DATA_CASES = {
    "cu_seqlens_decreasing": dict(cu_seqlens_q=_cu(0, 3, 2), max_seqlen_q=TOTAL_Q),
    "cu_seqlens_past_total": dict(cu_seqlens_k=_cu(0, 5, 10)),
    "sequence_longer_than_max_seqlen": dict(cu_seqlens_k=_cu(0, 6, 9)),
    "cu_seqlens_not_starting_at_0": dict(cu_seqlens_q=_cu(1, 3, 5)),
}
def bad_args(case):
    args = valid_args()
    args.update(CASES[case] if case in CASES else DATA_CASES[case])
    return args


def call_api(args):
    """The public API, keyword arguments as documented."""
    a = dict(args)
    positional = [a.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    return dmattn_ops.varlen_attention(*positional, **a)


def call_op(args):
    """The registered op itself, every argument positional in schema order (valid_args() keeps that order)."""
    return torch.ops.dmattn.varlen_fwd(*args.values())


def api_function(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale,
                 is_causal):
    """What torch.compile traces: every tensor and size is an input, so dynamic=True makes the sizes symbolic."""
    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=mask, bias=bias,
        softmax_scale=softmax_scale, is_causal=is_causal,
    )


def eager_error(case):
    with pytest.raises((TypeError, ValueError)) as info:
        call_api(bad_args(case))
    return info.value


class ErrorTestCase(expecttest.TestCase):
    def assertRaisesInline(self, exc_type, call, case, expect):
        """call(bad_args(case)) raises exactly exc_type (not a subclass) with the message `expect`."""
        with self.assertRaises(Exception) as ctx:
            call(bad_args(case))
        self.assertIs(type(ctx.exception), exc_type, msg=repr(ctx.exception))
        self.assertExpectedInline(str(ctx.exception), expect, skip=1)


class TestPublicApiErrors(ErrorTestCase):
    """dmattn_ops.varlen_attention, eager, on the CPU."""

    def test_float_mask(self):
        self.assertRaisesInline(TypeError, call_api, "float_mask", """dmattn.varlen_fwd: mask must be bool (True = attend), got torch.float32""")

    def test_integer_bias(self):
        self.assertRaisesInline(TypeError, call_api, "integer_bias", """dmattn.varlen_fwd: bias must be float32 or q's dtype torch.float32, got torch.int64""")

    def test_float_cu_seqlens(self):
        self.assertRaisesInline(TypeError, call_api, "float_cu_seqlens", """dmattn.varlen_fwd: cu_seqlens_q must be int32 (convert with .int()), got torch.float32""")

    def test_int64_cu_seqlens_rejected(self):
        self.assertRaisesInline(TypeError, call_api, "int64_cu_seqlens", """dmattn.varlen_fwd: cu_seqlens_k must be int32 (convert with .int()), got torch.int64""")

    def test_float64_qkv(self):
        self.assertRaisesInline(TypeError, call_api, "float64_qkv", """dmattn.varlen_fwd: q must be float32, float16 or bfloat16, got torch.float64""")

    def test_k_dtype_differs_from_q(self):
        self.assertRaisesInline(TypeError, call_api, "float16_k_with_float32_q", """dmattn.varlen_fwd: k must have q's dtype torch.float32, got torch.float16""")

    def test_q_rank_2(self):
        self.assertRaisesInline(ValueError, call_api, "q_rank_2", """dmattn.varlen_fwd: q must have shape (tokens, heads, head_dim), got shape (5, 32)""")

    def test_mask_rank_1(self):
        self.assertRaisesInline(ValueError, call_api, "mask_rank_1", """dmattn.varlen_fwd: mask must be key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k), got shape (9,)""")

    def test_key_side_mask_rows_not_total_k(self):
        self.assertRaisesInline(ValueError, call_api, "key_side_mask_rows", """dmattn.varlen_fwd: mask is key-side (rank 2), so it must have total_k = 9 rows, got 5""")

    def test_query_side_bias_rows_not_total_q(self):
        self.assertRaisesInline(ValueError, call_api, "query_side_bias_rows", """dmattn.varlen_fwd: bias is query-side (rank 3), so it must have total_q = 5 rows, got 9""")

    def test_mask_heads_not_1_hk_or_h(self):
        self.assertRaisesInline(ValueError, call_api, "mask_heads_not_1_hk_h", """dmattn.varlen_fwd: mask head dim Hm must be 1, Hk = 2 or H = 4, got 3""")

    def test_query_side_mask_width_not_max_seqlen_k(self):
        self.assertRaisesInline(ValueError, call_api, "query_side_mask_width", """dmattn.varlen_fwd: mask is query-side, so its last dim must be max_seqlen_k = 5, got 6""")

    def test_k_v_shape_mismatch(self):
        self.assertRaisesInline(ValueError, call_api, "k_v_shape_mismatch", """dmattn.varlen_fwd: k and v must have the same shape (total_k, Hk, D), got (9, 2, 8) and (7, 2, 8)""")

    def test_head_dim_mismatch(self):
        self.assertRaisesInline(ValueError, call_api, "head_dim_mismatch", """dmattn.varlen_fwd: q and k must have the same head_dim D, got 8 and 4""")

    def test_h_not_multiple_of_hk(self):
        self.assertRaisesInline(ValueError, call_api, "h_not_multiple_of_hk", """dmattn.varlen_fwd: the number of query heads H must be a multiple of the number of key/value heads Hk, got H = 4, Hk = 3""")

    def test_cu_seqlens_lengths_differ(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_lengths_differ", """dmattn.varlen_fwd: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got 3 and 2""")

    def test_cu_seqlens_empty(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_empty", """dmattn.varlen_fwd: cu_seqlens_q must have shape (B + 1,), got shape (0,)""")

    def test_cu_seqlens_strided(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_strided", """dmattn.varlen_fwd: cu_seqlens_q must be contiguous, got stride 2""")

    def test_q_non_contiguous_head_dim(self):
        self.assertRaisesInline(ValueError, call_api, "q_strided_head_dim", """dmattn.varlen_fwd: q must have a contiguous head_dim (stride 1), got strides (64, 16, 2)""")

    def test_v_non_contiguous_head_dim(self):
        self.assertRaisesInline(ValueError, call_api, "v_strided_head_dim", """dmattn.varlen_fwd: v must have a contiguous head_dim (stride 1), got strides (32, 16, 2)""")

    def test_cu_seqlens_on_another_device(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_on_meta", """dmattn.varlen_fwd: cu_seqlens_k must be on q's device cpu, got meta""")

    def test_bias_on_another_device(self):
        self.assertRaisesInline(ValueError, call_api, "bias_on_meta", """dmattn.varlen_fwd: bias must be on q's device cpu, got meta""")

    def test_negative_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_api, "negative_max_seqlen", """dmattn.varlen_fwd: max_seqlen_k must be >= 0, got -1""")

    def test_infinite_softmax_scale(self):
        self.assertRaisesInline(ValueError, call_api, "infinite_softmax_scale", """dmattn.varlen_fwd: softmax_scale must be finite, got inf""")

    # CPU data checks (in the kernel: they read the cu_seqlens values).
    def test_cu_seqlens_decreasing(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_decreasing", """dmattn.varlen_fwd: cu_seqlens_q must be non-decreasing, got cu_seqlens_q[1] = 3 > cu_seqlens_q[2] = 2""")

    def test_cu_seqlens_last_entry_past_total(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_past_total", """dmattn.varlen_fwd: cu_seqlens_k[-1] must be <= total_k = 9, got 10""")

    def test_sequence_longer_than_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_api, "sequence_longer_than_max_seqlen", """dmattn.varlen_fwd: sequence 0 has 6 tokens in cu_seqlens_k, more than max_seqlen_k = 5""")

    def test_cu_seqlens_not_starting_at_0(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_not_starting_at_0", """dmattn.varlen_fwd: cu_seqlens_q[0] must be 0, got 1""")


class TestDirectOpErrors(ErrorTestCase):
    """torch.ops.dmattn.varlen_fwd with no Python checks in front: the C++ safety net answers (the meta-device
    cases dispatch to the fake impl, i.e. the Python rules)."""

    def test_float_mask(self):
        self.assertRaisesInline(TypeError, call_op, "float_mask", """dmattn.varlen_fwd: mask must be bool (True = attend), got Float""")

    def test_integer_bias(self):
        self.assertRaisesInline(TypeError, call_op, "integer_bias", """dmattn.varlen_fwd: bias must be float32 or q's dtype Float, got Long""")

    def test_float_cu_seqlens(self):
        self.assertRaisesInline(TypeError, call_op, "float_cu_seqlens", """dmattn.varlen_fwd: cu_seqlens_q must be int32 (convert with .int()), got Float""")

    def test_int64_cu_seqlens_rejected(self):
        self.assertRaisesInline(TypeError, call_op, "int64_cu_seqlens", """dmattn.varlen_fwd: cu_seqlens_k must be int32 (convert with .int()), got Long""")

    def test_float64_qkv(self):
        self.assertRaisesInline(TypeError, call_op, "float64_qkv", """dmattn.varlen_fwd: q must be float32, float16 or bfloat16, got Double""")

    def test_k_dtype_differs_from_q(self):
        self.assertRaisesInline(TypeError, call_op, "float16_k_with_float32_q", """dmattn.varlen_fwd: k must have q's dtype Float, got Half""")

    def test_q_rank_2(self):
        self.assertRaisesInline(ValueError, call_op, "q_rank_2", """dmattn.varlen_fwd: q must have rank 3 (tokens, heads, head_dim), got rank 2""")

    def test_mask_rank_1(self):
        self.assertRaisesInline(ValueError, call_op, "mask_rank_1", """dmattn.varlen_fwd: mask must be key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k), got rank 1""")

    def test_key_side_mask_rows_not_total_k(self):
        self.assertRaisesInline(ValueError, call_op, "key_side_mask_rows", """dmattn.varlen_fwd: mask (key-side) must have total_k = 9 rows, got 5""")

    def test_query_side_bias_rows_not_total_q(self):
        self.assertRaisesInline(ValueError, call_op, "query_side_bias_rows", """dmattn.varlen_fwd: bias (query-side) must have total_q = 5 rows, got 9""")

    def test_mask_heads_not_1_hk_or_h(self):
        self.assertRaisesInline(ValueError, call_op, "mask_heads_not_1_hk_h", """dmattn.varlen_fwd: mask head dim Hm must be 1, Hk = 2 or H = 4, got 3""")

    def test_query_side_mask_width_not_max_seqlen_k(self):
        self.assertRaisesInline(ValueError, call_op, "query_side_mask_width", """dmattn.varlen_fwd: mask (query-side) last dim must be max_seqlen_k = 5, got 6""")

    def test_k_v_shape_mismatch(self):
        self.assertRaisesInline(ValueError, call_op, "k_v_shape_mismatch", """dmattn.varlen_fwd: k and v must have the same shape, got [9, 2, 8] and [7, 2, 8]""")

    def test_head_dim_mismatch(self):
        self.assertRaisesInline(ValueError, call_op, "head_dim_mismatch", """dmattn.varlen_fwd: q and k must have the same head_dim, got 8 and 4""")

    def test_h_not_multiple_of_hk(self):
        self.assertRaisesInline(ValueError, call_op, "h_not_multiple_of_hk", """dmattn.varlen_fwd: the number of query heads H must be a multiple of the number of key/value heads Hk, got H = 4, Hk = 3""")

    def test_cu_seqlens_lengths_differ(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_lengths_differ", """dmattn.varlen_fwd: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, got 3 and 2""")

    def test_cu_seqlens_empty(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_empty", """dmattn.varlen_fwd: cu_seqlens_q must have shape (B + 1,), got [0]""")

    def test_cu_seqlens_strided(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_strided", """dmattn.varlen_fwd: cu_seqlens_q must be contiguous, got stride 2""")

    def test_q_non_contiguous_head_dim(self):
        self.assertRaisesInline(ValueError, call_op, "q_strided_head_dim", """dmattn.varlen_fwd: q must have a contiguous head_dim (stride 1), got stride 2""")

    def test_v_non_contiguous_head_dim(self):
        self.assertRaisesInline(ValueError, call_op, "v_strided_head_dim", """dmattn.varlen_fwd: v must have a contiguous head_dim (stride 1), got stride 2""")

    def test_cu_seqlens_on_another_device(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_on_meta", """dmattn.varlen_fwd: cu_seqlens_k must be on q's device cpu, got meta""")

    def test_bias_on_another_device(self):
        self.assertRaisesInline(ValueError, call_op, "bias_on_meta", """dmattn.varlen_fwd: bias must be on q's device cpu, got meta""")

    def test_negative_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_op, "negative_max_seqlen", """dmattn.varlen_fwd: max_seqlen_k must be >= 0, got -1""")

    def test_infinite_softmax_scale(self):
        self.assertRaisesInline(ValueError, call_op, "infinite_softmax_scale", """dmattn.varlen_fwd: softmax_scale must be finite, got inf""")

    def test_cu_seqlens_decreasing(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_decreasing", """dmattn.varlen_fwd: cu_seqlens_q must be non-decreasing, got cu_seqlens_q[1] = 3 > cu_seqlens_q[2] = 2""")

    def test_cu_seqlens_last_entry_past_total(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_past_total", """dmattn.varlen_fwd: cu_seqlens_k[-1] must be <= total_k = 9, got 10""")

    def test_sequence_longer_than_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_op, "sequence_longer_than_max_seqlen", """dmattn.varlen_fwd: sequence 0 has 6 tokens in cu_seqlens_k, more than max_seqlen_k = 5""")

    def test_cu_seqlens_not_starting_at_0(self):
        self.assertRaisesInline(ValueError, call_op, "cu_seqlens_not_starting_at_0", """dmattn.varlen_fwd: cu_seqlens_q[0] must be 0, got 1""")


class TestBackward(ErrorTestCase):
    def test_backward_raises_not_implemented(self):
        args = valid_args()
        args["q"].requires_grad_()
        out = call_api(args)
        self.assertTrue(out.requires_grad)
        with self.assertRaises(NotImplementedError) as ctx:
            out.sum().backward()
        self.assertExpectedInline(str(ctx.exception), """dmattn.varlen_fwd has no backward yet: it is a forward-only (inference) op. Run it under torch.no_grad(), or detach its inputs, if no gradient is needed.""")
        self.assertIsNone(args["q"].grad)

    def test_no_grad_runs(self):
        args = valid_args()
        args["q"].requires_grad_()
        with torch.no_grad():
            out = call_api(args)
        self.assertEqual(out.shape, (TOTAL_Q, H, D))


# ---- the same messages while tracing ---------------------------------------------------------------------------


def _compile_params():
    """(case, dynamic) pairs: every metadata error, with static and with symbolic shapes."""
    return [
        pytest.param(case, dynamic, id=f"{case}-{'dynamic' if dynamic else 'static'}")
        for case in CASES
        for dynamic in (False, True)
    ]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case, dynamic", _compile_params())
def test_compile_metadata_error_same_message(case, dynamic):
    """The fake impl runs meta/rules.py, so tracing fails with the eager message (wrapped by dynamo)."""
    expected = str(eager_error(case))
    compiled = torch.compile(api_function, backend="eager", fullgraph=True, dynamic=dynamic)
    with pytest.raises(Exception) as info:
        compiled(**bad_args(case))
    assert isinstance(info.value, (torch._dynamo.exc.TorchRuntimeError, TypeError, ValueError)), repr(info.value)
    assert expected in str(info.value), f"eager: {expected!r}\ncompiled: {info.value}"


def test_compiled_graph_keeps_data_errors():
    """Data checks run in the CPU kernel, so a compiled graph raises them unchanged at run time. All DATA_CASES
    share one set of shapes, so the one compiled graph serves every call."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(api_function, backend=counter, fullgraph=True, dynamic=True)
    compiled(**valid_args())
    for case in DATA_CASES:
        expected = eager_error(case)
        with pytest.raises(ValueError) as info:
            compiled(**bad_args(case))
        assert str(info.value) == str(expected)
    assert counter.frame_count == 1


class _BadMaskModule(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, mask):
        return dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, MAX_Q, MAX_K, mask=mask)


def test_export_metadata_error_same_message():
    args = bad_args("float_mask")
    inputs = tuple(args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "mask"))
    with pytest.raises(Exception) as info:
        torch.export.export(_BadMaskModule(), inputs)
    assert str(eager_error("float_mask")) in str(info.value)


# ---- what the build's CUDA kernels can run, checked from metadata (fake CUDA tensors need no GPU) ---------------


def _fake_cuda_call(dtype, head_dim):
    """rules.check_varlen_fwd on fake CUDA tensors: the limits of the CUDA backend hold while tracing too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(TOTAL_Q, H, head_dim, dtype=dtype, device="cuda")
        k = torch.empty(TOTAL_K, HK, head_dim, dtype=dtype, device="cuda")
        cu_q, cu_k = torch.empty(3, dtype=torch.int32, device="cuda"), torch.empty(3, dtype=torch.int32, device="cuda")
        dmattn_ops._meta.rules.check_varlen_fwd(q, k, k, cu_q, cu_k, MAX_Q, MAX_K)


class TestCudaBackendLimits(expecttest.TestCase):
    """The CUDA backend's limits are rules too (meta/rules.py, with the same messages as the CUDA binding): they
    fire on CUDA metadata alone, so they hold while tracing and are tested here with fake CUDA tensors."""

    CUDA_BUILD = dict(backends=["cpu", "cuda"], cuda_head_dims=[32, 64, 96, 128, 256])
    CPU_BUILD = dict(backends=["cpu"], torch_version="2.13.0+cpu")

    def check(self, build, dtype, head_dim, exc_type=None, expect=None):
        """The rules on fake CUDA tensors, under a build config patched with ``build``."""
        from dmattn_ops import _build_config

        with mock.patch.object(_build_config, "CONFIG", dict(_build_config.CONFIG, **build)):
            if exc_type is None:
                _fake_cuda_call(dtype, head_dim)
                return
            with self.assertRaises(Exception) as ctx:
                _fake_cuda_call(dtype, head_dim)
        self.assertIs(type(ctx.exception), exc_type, msg=repr(ctx.exception))
        self.assertExpectedInline(str(ctx.exception), expect, skip=1)

    def test_build_without_cuda(self):
        self.check(self.CPU_BUILD, torch.float16, 64, ValueError, """dmattn.varlen_fwd: q is on cuda:0, but this build of dmattn_ops has no CUDA backend (built against torch 2.13.0+cpu, backends: cpu); rebuild it where torch has CUDA and nvcc is found, or run on the CPU""")

    def test_float32_on_cuda(self):
        self.check(self.CUDA_BUILD, torch.float32, 64, TypeError, """dmattn.varlen_fwd: float32 q, k, v are not supported on CUDA (the kernels run float16 / bfloat16 tensor cores), got q of dtype float32; convert q, k and v to float16 or bfloat16, or run on the CPU""")

    def test_head_dim_past_the_largest_compiled(self):
        self.check(self.CUDA_BUILD, torch.bfloat16, 264, ValueError, """dmattn.varlen_fwd: head_dim D must be at most 256 on CUDA (the largest compiled head dim), got 264""")

    def test_smaller_head_dims_run_padded(self):
        self.check(self.CUDA_BUILD, torch.bfloat16, 80)  # no error: the CUDA binding pads 80 to 96
