"""Bad input to ``dmattn.varlen_fwd`` fails with a clear Python exception: the type and the exact message.

Three ways in, one set of bad calls (``CASES``: metadata; ``TYPE_CASES``: Python types; ``DATA_CASES``: values):
- the public API ``dmattn_ops.varlen_attention`` (eager: the Python types, then the op's binding, whose metadata
  rules are ``meta/rules.py``'s word for word, then the CPU kernel's data checks);
- ``torch.compile`` of a function calling it: the fake impl runs the same metadata rules, so the eager exception is
  inside dynamo's ``TorchRuntimeError`` (the chain README's "Errors" documents); ``varlen_attention`` checks the Python
  types in the traced code itself (dynamo reports them as ``Unsupported`` under fullgraph=True, as themselves
  without); data errors surface unchanged when the compiled graph runs;
- ``torch.ops.dmattn.varlen_fwd`` called directly: the C++ binding (``csrc/tensors_to_params.cpp``) raises the public
  API's exception, type and message, for every metadata and data case (an eager API call relies on it: the rules run once);
  Python type mistakes never reach it (torch's schema parser answers).

The messages are pinned inline (expecttest); after a deliberate wording change, refresh them with
``EXPECTTEST_ACCEPT=1 pytest tests/test_errors.py``.
"""

from unittest import mock

import expecttest
import numpy as np
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
        window_left=-1,  # the public API's window_size=(window_left, window_right)
        window_right=-1,
        softcap=None,
        sinks=None,  # (H,)
        seqused_k=None,  # (B,)
        kv_slots=None,  # (total_k,), rows of a pool k / v
        key_range=None,  # (total_q, 2), each query's [begin, end) key positions
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
    "softmax_scale_past_float32": dict(softmax_scale=1e39),  # finite as a double, inf as the kernels' float32
    "window_left_below_minus_1": dict(window_left=-2),
    "window_right_below_minus_1": dict(window_right=-5),
    "negative_softcap": dict(softcap=-1.0),
    "infinite_softcap": dict(softcap=float("inf")),
    "sinks_shape": dict(sinks=torch.zeros(HK)),
    "sinks_rank_2": dict(sinks=torch.zeros(H, 1)),
    "sinks_dtype": dict(sinks=torch.zeros(H, dtype=torch.float16)),
    "sinks_on_meta": dict(sinks=torch.zeros(H, device="meta")),
    "seqused_k_int64": dict(seqused_k=torch.tensor([3, 4])),
    "seqused_k_shape": dict(seqused_k=_cu(3, 4, 0)),
    "seqused_k_strided": dict(seqused_k=_cu(3, 0, 4, 0)[::2]),
    "kv_slots_int64": dict(kv_slots=torch.arange(TOTAL_K)),
    "kv_slots_rank_2": dict(kv_slots=_cu(*range(TOTAL_K)).reshape(TOTAL_K, 1)),
    "kv_slots_strided": dict(kv_slots=_cu(*range(2 * TOTAL_K))[::2]),
    "kv_slots_with_empty_pool": dict(k=torch.randn(0, HK, D), v=torch.randn(0, HK, D), kv_slots=_cu(*range(TOTAL_K))),
    "key_range_int64": dict(key_range=torch.zeros(TOTAL_Q, 2, dtype=torch.int64)),
    "key_range_on_meta": dict(key_range=torch.zeros(TOTAL_Q, 2, dtype=torch.int32, device="meta")),
    "key_range_shape": dict(key_range=torch.zeros(TOTAL_Q, 3, dtype=torch.int32)),
    "key_range_transposed": dict(key_range=torch.zeros(2, TOTAL_Q, dtype=torch.int32).t()),
    "key_side_mask_rows_with_kv_slots": dict(  # a pool of 12 slots, the mask with a row per packed key
        k=torch.randn(12, HK, D), v=torch.randn(12, HK, D), kv_slots=_cu(*range(TOTAL_K)),
        mask=torch.ones(TOTAL_K, 1, dtype=torch.bool)),
    # sizes the kernels keep in 32 bits (tensors of no element: no memory)
    "heads_past_int32": dict(q=torch.empty(0, 2**32, D), k=torch.empty(0, 2**32, D), v=torch.empty(0, 2**32, D)),
    "kv_heads_past_int32": dict(k=torch.empty(0, 2**32, D), v=torch.empty(0, 2**32, D)),
    "head_dim_past_int32": dict(q=torch.empty(0, H, 2**32), k=torch.empty(0, HK, 2**32), v=torch.empty(0, HK, 2**32)),
    "cu_seqlens_length_past_int32": dict(  # stride 0 as well: the size is reported, not the stride
        cu_seqlens_q=torch.zeros(1, dtype=torch.int32).expand(2**31 + 1),
        cu_seqlens_k=torch.zeros(1, dtype=torch.int32).expand(2**31 + 1),
    ),
}
# Python type mistakes: checked by varlen_attention before anything else, also while compiling.
TYPE_CASES = {
    "mask_list": dict(mask=[True] * TOTAL_K),
    "cu_seqlens_list": dict(cu_seqlens_q=[0, 3, 5]),
    "bias_numpy": dict(bias=np.zeros((TOTAL_K, 1), dtype=np.float32)),
    "q_nested": dict(q=torch.nested.nested_tensor([torch.randn(3, H, D), torch.randn(2, H, D)], layout=torch.jagged)),
    "q_sparse": dict(q=torch.randn(TOTAL_Q, H, D).to_sparse()),
    "max_seqlen_none": dict(max_seqlen_q=None),
    "max_seqlen_str": dict(max_seqlen_q="3"),
    "max_seqlen_float": dict(max_seqlen_q=3.0),
    "max_seqlen_bool": dict(max_seqlen_q=True),
    "max_seqlen_numpy": dict(max_seqlen_k=np.int64(MAX_K)),
    "softmax_scale_numpy": dict(softmax_scale=np.float32(0.5)),
    "softmax_scale_str": dict(softmax_scale="0.5"),
    "is_causal_str": dict(is_causal="yes"),
    "window_float": dict(window_left=2.0),
    "softcap_str": dict(softcap="30"),
    "sinks_list": dict(sinks=[0.0] * H),
    "kv_slots_list": dict(kv_slots=list(range(TOTAL_K))),
    "key_range_list": dict(key_range=[[0, 1]] * TOTAL_Q),
}
DATA_CASES = {
    "cu_seqlens_decreasing": dict(cu_seqlens_q=_cu(0, 3, 2), max_seqlen_q=TOTAL_Q),
    "cu_seqlens_past_total": dict(cu_seqlens_k=_cu(0, 5, 10)),
    "sequence_longer_than_max_seqlen": dict(cu_seqlens_k=_cu(0, 6, 9)),
    "cu_seqlens_not_starting_at_0": dict(cu_seqlens_q=_cu(1, 3, 5)),
    "later_sequence_longer_than_max_seqlen": dict(cu_seqlens_q=_cu(0, 1, 5)),
    "seqused_k_past_the_sequence": dict(seqused_k=_cu(3, 5)),
    "seqused_k_negative": dict(seqused_k=_cu(-1, 2)),
}
# Values of kv_slots (the CPU kernel's check; CUDA clamps). Not DATA_CASES: check_cu_seqlens does not take kv_slots.
SLOT_DATA_CASES = {
    "kv_slots_past_the_pool": dict(kv_slots=_cu(*range(TOTAL_K - 1), TOTAL_K)),
    "kv_slots_negative": dict(kv_slots=_cu(3, -1, *range(2, TOTAL_K))),
}


def bad_args(case):
    args = valid_args()
    args.update({**CASES, **TYPE_CASES, **DATA_CASES, **SLOT_DATA_CASES}[case])
    return args


def call_api(args):
    """The public API, keyword arguments as documented (the window as window_size)."""
    a = dict(args)
    positional = [a.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    a["window_size"] = (a.pop("window_left"), a.pop("window_right"))
    return dmattn_ops.varlen_attention(*positional, **a)


def call_op(args):
    """The registered op itself, every argument positional in schema order (valid_args() keeps that order)."""
    return torch.ops.dmattn.varlen_fwd(*args.values())


def api_function(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale,
                 is_causal, window_left, window_right, softcap, sinks, seqused_k, kv_slots=None, key_range=None):
    """What torch.compile traces: every tensor and size is an input, so dynamic=True makes the sizes symbolic."""
    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=mask, bias=bias,
        softmax_scale=softmax_scale, is_causal=is_causal, window_size=(window_left, window_right), softcap=softcap,
        sinks=sinks, seqused_k=seqused_k, kv_slots=kv_slots, key_range=key_range,
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
        self.assertRaisesInline(ValueError, call_api, "infinite_softmax_scale", """dmattn.varlen_fwd: softmax_scale must be finite in float32 (the kernels use it as float32), got inf""")

    def test_softmax_scale_past_float32(self):
        self.assertRaisesInline(ValueError, call_api, "softmax_scale_past_float32", """dmattn.varlen_fwd: softmax_scale must be finite in float32 (the kernels use it as float32), got 1e+39""")

    def test_heads_past_int32(self):
        self.assertRaisesInline(ValueError, call_api, "heads_past_int32", """dmattn.varlen_fwd: the number of query heads H (q.shape[1]) must be at most 2147483647 (the kernels keep it in 32 bits), got 4294967296""")

    def test_kv_heads_past_int32(self):
        self.assertRaisesInline(ValueError, call_api, "kv_heads_past_int32", """dmattn.varlen_fwd: the number of key/value heads Hk (k.shape[1]) must be at most 2147483647 (the kernels keep it in 32 bits), got 4294967296""")

    def test_head_dim_past_int32(self):
        self.assertRaisesInline(ValueError, call_api, "head_dim_past_int32", """dmattn.varlen_fwd: head_dim D must be at most 2147483647 (the kernels keep it in 32 bits), got 4294967296""")

    def test_cu_seqlens_length_past_int32(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_length_past_int32", """dmattn.varlen_fwd: the length B + 1 of cu_seqlens_q must be at most 2147483647 (the kernels keep it in 32 bits), got 2147483649""")

    # Python types.
    def test_mask_list(self):
        self.assertRaisesInline(TypeError, call_api, "mask_list", """dmattn.varlen_fwd: mask must be a bool tensor or None, got list""")

    def test_cu_seqlens_list(self):
        self.assertRaisesInline(TypeError, call_api, "cu_seqlens_list", """dmattn.varlen_fwd: cu_seqlens_q must be an int32 tensor, got list""")

    def test_bias_numpy(self):
        self.assertRaisesInline(TypeError, call_api, "bias_numpy", """dmattn.varlen_fwd: bias must be a tensor or None, got numpy.ndarray; convert it with torch.from_numpy""")

    def test_q_nested(self):
        self.assertRaisesInline(TypeError, call_api, "q_nested", """dmattn.varlen_fwd: q must be a dense tensor, got a nested tensor (layout torch.jagged); pass the packed tokens instead (a jagged nested tensor's .values(), with .offsets().int() as cu_seqlens)""")

    def test_q_sparse(self):
        self.assertRaisesInline(TypeError, call_api, "q_sparse", """dmattn.varlen_fwd: q must be a dense tensor, got layout torch.sparse_coo; convert it with .to_dense()""")

    def test_max_seqlen_none(self):
        self.assertRaisesInline(TypeError, call_api, "max_seqlen_none", """dmattn.varlen_fwd: max_seqlen_q must be an int, got None""")

    def test_max_seqlen_str(self):
        self.assertRaisesInline(TypeError, call_api, "max_seqlen_str", """dmattn.varlen_fwd: max_seqlen_q must be an int, got str""")

    def test_max_seqlen_float(self):
        self.assertRaisesInline(TypeError, call_api, "max_seqlen_float", """dmattn.varlen_fwd: max_seqlen_q must be an int, got float""")

    def test_max_seqlen_bool(self):
        self.assertRaisesInline(TypeError, call_api, "max_seqlen_bool", """dmattn.varlen_fwd: max_seqlen_q must be an int, got bool""")

    def test_max_seqlen_numpy(self):
        self.assertRaisesInline(TypeError, call_api, "max_seqlen_numpy", """dmattn.varlen_fwd: max_seqlen_k must be an int, got a numpy value; convert it with int()""")

    def test_softmax_scale_numpy(self):
        self.assertRaisesInline(TypeError, call_api, "softmax_scale_numpy", """dmattn.varlen_fwd: softmax_scale must be a float or None, got a numpy value; convert it with float()""")

    def test_softmax_scale_str(self):
        self.assertRaisesInline(TypeError, call_api, "softmax_scale_str", """dmattn.varlen_fwd: softmax_scale must be a float or None, got str""")

    def test_is_causal_str(self):
        self.assertRaisesInline(TypeError, call_api, "is_causal_str", """dmattn.varlen_fwd: is_causal must be a bool, got str""")

    def test_window_left_below_minus_1(self):
        self.assertRaisesInline(ValueError, call_api, "window_left_below_minus_1", """dmattn.varlen_fwd: window_left must be >= -1 (-1: no limit), got -2""")

    def test_window_right_below_minus_1(self):
        self.assertRaisesInline(ValueError, call_api, "window_right_below_minus_1", """dmattn.varlen_fwd: window_right must be >= -1 (-1: no limit), got -5""")

    def test_negative_softcap(self):
        self.assertRaisesInline(ValueError, call_api, "negative_softcap", """dmattn.varlen_fwd: softcap must be >= 0 and finite in float32 (0: no softcap), got -1.0""")

    def test_infinite_softcap(self):
        self.assertRaisesInline(ValueError, call_api, "infinite_softcap", """dmattn.varlen_fwd: softcap must be >= 0 and finite in float32 (0: no softcap), got inf""")

    def test_sinks_shape(self):
        self.assertRaisesInline(ValueError, call_api, "sinks_shape", """dmattn.varlen_fwd: sinks must have shape (H,) = (4,), got shape (2,)""")

    def test_sinks_rank_2(self):
        self.assertRaisesInline(ValueError, call_api, "sinks_rank_2", """dmattn.varlen_fwd: sinks must have shape (H,) = (4,), got shape (4, 1)""")

    def test_sinks_dtype(self):
        self.assertRaisesInline(TypeError, call_api, "sinks_dtype", """dmattn.varlen_fwd: sinks must be float32 or q's dtype torch.float32, got torch.float16""")

    def test_sinks_on_another_device(self):
        self.assertRaisesInline(ValueError, call_api, "sinks_on_meta", """dmattn.varlen_fwd: sinks must be on q's device cpu, got meta""")

    def test_seqused_k_int64(self):
        self.assertRaisesInline(TypeError, call_api, "seqused_k_int64", """dmattn.varlen_fwd: seqused_k must be int32 (convert with .int()), got torch.int64""")

    def test_seqused_k_shape(self):
        self.assertRaisesInline(ValueError, call_api, "seqused_k_shape", """dmattn.varlen_fwd: seqused_k must have shape (B,) = (2,), got shape (3,)""")

    def test_seqused_k_strided(self):
        self.assertRaisesInline(ValueError, call_api, "seqused_k_strided", """dmattn.varlen_fwd: seqused_k must be contiguous, got stride 2""")

    def test_seqused_k_past_the_sequence(self):
        self.assertRaisesInline(ValueError, call_api, "seqused_k_past_the_sequence", """dmattn.varlen_fwd: seqused_k[1] must be in [0, 4] (the keys of sequence 1 in cu_seqlens_k), got 5""")

    def test_kv_slots_int64(self):
        self.assertRaisesInline(TypeError, call_api, "kv_slots_int64", """dmattn.varlen_fwd: kv_slots must be int32 (convert with .int()), got torch.int64""")

    def test_kv_slots_rank_2(self):
        self.assertRaisesInline(ValueError, call_api, "kv_slots_rank_2", """dmattn.varlen_fwd: kv_slots must have shape (total_k,), got shape (9, 1)""")

    def test_kv_slots_strided(self):
        self.assertRaisesInline(ValueError, call_api, "kv_slots_strided", """dmattn.varlen_fwd: kv_slots must be contiguous, got stride 2""")

    def test_kv_slots_with_empty_pool(self):
        self.assertRaisesInline(ValueError, call_api, "kv_slots_with_empty_pool", """dmattn.varlen_fwd: kv_slots must be empty when the key pool is (k.shape[0] = 0), got shape (9,)""")

    def test_key_range_int64(self):
        self.assertRaisesInline(TypeError, call_api, "key_range_int64", """dmattn.varlen_fwd: key_range must be int32 (convert with .int()), got torch.int64""")

    def test_key_range_on_another_device(self):
        self.assertRaisesInline(ValueError, call_api, "key_range_on_meta", """dmattn.varlen_fwd: key_range must be on q's device cpu, got meta""")

    def test_key_range_shape(self):
        self.assertRaisesInline(ValueError, call_api, "key_range_shape", """dmattn.varlen_fwd: key_range must have shape (total_q, 2) = (5, 2), got shape (5, 3)""")

    def test_key_range_transposed(self):
        self.assertRaisesInline(ValueError, call_api, "key_range_transposed", """dmattn.varlen_fwd: key_range must be contiguous, got strides (1, 5)""")

    def test_key_side_mask_rows_with_kv_slots(self):
        self.assertRaisesInline(ValueError, call_api, "key_side_mask_rows_with_kv_slots", """dmattn.varlen_fwd: mask is key-side (rank 2) with kv_slots, so it must have a row per slot of the pool, k.shape[0] = 12 rows, got 9""")

    def test_kv_slots_past_the_pool(self):
        self.assertRaisesInline(ValueError, call_api, "kv_slots_past_the_pool", """dmattn.varlen_fwd: kv_slots[8] (key 3 of sequence 1) must be a row of the key pool, in [0, 9), got 9""")

    def test_kv_slots_negative(self):
        self.assertRaisesInline(ValueError, call_api, "kv_slots_negative", """dmattn.varlen_fwd: kv_slots[1] (key 1 of sequence 0) must be a row of the key pool, in [0, 9), got -1""")

    def test_kv_slots_list(self):
        self.assertRaisesInline(TypeError, call_api, "kv_slots_list", """dmattn.varlen_fwd: kv_slots must be an int32 tensor or None, got list""")

    def test_key_range_list(self):
        self.assertRaisesInline(TypeError, call_api, "key_range_list", """dmattn.varlen_fwd: key_range must be an int32 tensor or None, got list""")

    def test_mask_mod_with_kv_slots(self):
        args = dict(valid_args(), kv_slots=_cu(*range(TOTAL_K)))
        positional = (args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"))
        with self.assertRaises(ValueError) as ctx:
            dmattn_ops.varlen_attention(*positional, kv_slots=args["kv_slots"],
                                        mask_mod=lambda b, h, q_idx, kv_idx: kv_idx <= q_idx)
        self.assertExpectedInline(str(ctx.exception), """dmattn.varlen_fwd: mask_mod / score_mod build operands over packed keys, which a kv_slots call does not have; pass a key-side mask / bias with a row per pool slot instead""")

    def test_seqused_k_negative(self):
        self.assertRaisesInline(ValueError, call_api, "seqused_k_negative", """dmattn.varlen_fwd: seqused_k[0] must be in [0, 5] (the keys of sequence 0 in cu_seqlens_k), got -1""")

    def test_window_float(self):
        self.assertRaisesInline(TypeError, call_api, "window_float", """dmattn.varlen_fwd: window_left must be an int, got float""")

    def test_softcap_str(self):
        self.assertRaisesInline(TypeError, call_api, "softcap_str", """dmattn.varlen_fwd: softcap must be a float or None, got str""")

    def test_sinks_list(self):
        self.assertRaisesInline(TypeError, call_api, "sinks_list", """dmattn.varlen_fwd: sinks must be a tensor or None, got list""")

    def test_window_size_not_a_pair(self):
        a = valid_args()
        positional = [a.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q",
                                         "max_seqlen_k")]
        for name in ("window_left", "window_right"):
            a.pop(name)
        with self.assertRaises(TypeError) as ctx:
            dmattn_ops.varlen_attention(*positional, **a, window_size=4)
        self.assertExpectedInline(str(ctx.exception), """dmattn.varlen_fwd: window_size must be a (left, right) pair of ints or None, got int""")

    def test_max_seqlen_past_int64(self):
        with self.assertRaises(ValueError) as ctx:
            call_api(dict(valid_args(), max_seqlen_q=2**63))
        self.assertExpectedInline(str(ctx.exception), """dmattn.varlen_fwd: max_seqlen_q must fit in int64 (at most 9223372036854775807), got 9223372036854775808""")

    # CPU data checks (in the kernel: they read the cu_seqlens values).
    def test_cu_seqlens_decreasing(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_decreasing", """dmattn.varlen_fwd: cu_seqlens_q must be non-decreasing, got cu_seqlens_q[1] = 3 > cu_seqlens_q[2] = 2""")

    def test_cu_seqlens_last_entry_past_total(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_past_total", """dmattn.varlen_fwd: cu_seqlens_k[-1] must be <= total_k = 9, got 10""")

    def test_sequence_longer_than_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_api, "sequence_longer_than_max_seqlen", """dmattn.varlen_fwd: sequence 0 has 6 tokens in cu_seqlens_k, more than max_seqlen_k = 5""")

    def test_cu_seqlens_not_starting_at_0(self):
        self.assertRaisesInline(ValueError, call_api, "cu_seqlens_not_starting_at_0", """dmattn.varlen_fwd: cu_seqlens_q[0] must be 0, got 1""")

    def test_later_sequence_longer_than_max_seqlen(self):
        self.assertRaisesInline(ValueError, call_api, "later_sequence_longer_than_max_seqlen", """dmattn.varlen_fwd: sequence 1 has 4 tokens in cu_seqlens_q, more than max_seqlen_q = 3""")


@pytest.mark.parametrize("case", [*CASES, *DATA_CASES, *SLOT_DATA_CASES])
def test_direct_op_raises_the_public_error(case):
    """torch.ops.dmattn.varlen_fwd with no Python checks in front: the C++ binding (csrc/tensors_to_params.cpp) holds
    the same rules as meta/rules.py with the same messages, in the same order, and an eager varlen_attention call
    relies on it (the rules run once). So the raw op raises exactly what the public API does, for every metadata and data case
    (the meta-device cases dispatch to the fake impl, i.e. meta/rules.py itself)."""
    expected = eager_error(case)
    with pytest.raises(Exception) as info:
        call_op(bad_args(case))
    assert type(info.value) is type(expected), repr(info.value)
    assert str(info.value) == str(expected)


# The raw op's Python arguments are parsed by torch before any dmattn code runs: a wrong type gets torch's own
# RuntimeError naming the argument (and True as max_seqlen, 1 as is_causal, a numpy integer are coerced).
RAW_OP_TYPE_ERRORS = {
    "mask_list": "mask",
    "cu_seqlens_list": "cu_seqlens_q",
    "bias_numpy": "bias",
    "max_seqlen_none": "max_seqlen_q",
    "max_seqlen_str": "max_seqlen_q",
    "max_seqlen_float": "max_seqlen_q",
    "softmax_scale_str": "softmax_scale",
    "is_causal_str": "is_causal",
    "window_float": "window_left",
    "softcap_str": "softcap",
    "sinks_list": "sinks",
    "kv_slots_list": "kv_slots",
    "key_range_list": "key_range",
}


@pytest.mark.parametrize("case", RAW_OP_TYPE_ERRORS)
def test_raw_op_type_error_is_torchs(case):
    with pytest.raises(RuntimeError, match=f"for argument '{RAW_OP_TYPE_ERRORS[case]}'"):
        call_op(bad_args(case))


@pytest.mark.parametrize("case", ["q_nested", "q_sparse"])
def test_raw_op_non_dense_q_not_implemented(case):
    """A nested or sparse q dispatches to a backend the op has no kernel for (NestedTensor, SparseCPU)."""
    with pytest.raises(NotImplementedError):
        call_op(bad_args(case))


class TestCheckCuSeqlens(ErrorTestCase):
    """dmattn_ops.check_cu_seqlens, the check mode for CUDA callers: the CPU kernel's data checks, on the host."""

    @staticmethod
    def check(args):
        dmattn_ops.check_cu_seqlens(
            args["cu_seqlens_q"], args["cu_seqlens_k"], args["q"].shape[0], args["k"].shape[0], args["max_seqlen_q"],
            args["max_seqlen_k"], seqused_k=args["seqused_k"],
        )

    def test_valid_values_pass(self):
        self.check(valid_args())

    def test_same_messages_as_the_cpu_kernel(self):
        for case in DATA_CASES:
            with self.subTest(case=case):
                expected = eager_error(case)
                with self.assertRaises(ValueError) as ctx:
                    self.check(bad_args(case))
                self.assertEqual(str(ctx.exception), str(expected))

    def test_int64_cu_seqlens(self):
        self.assertRaisesInline(TypeError, self.check, "int64_cu_seqlens", """dmattn.varlen_fwd: cu_seqlens_k must be int32 (convert with .int()), got torch.int64""")


class TestBackward(ErrorTestCase):
    """dmattn::varlen_bwd checks its extra arguments (dout, out, softmax_lse, dsoftmax_lse) in C++ for raw calls and
    in meta/rules.py while tracing, with one text; gradients themselves are tests/test_backward.py's."""

    BWD_CASES = {
        "dout_shape": dict(dout=torch.randn(TOTAL_Q, H, D + 1)),
        "out_dtype": dict(out=torch.randn(TOTAL_Q, H, D, dtype=torch.float64)),
        "lse_shape": dict(softmax_lse=torch.randn(TOTAL_Q, H)),
        "dlse_dtype": dict(dsoftmax_lse=torch.randn(H, TOTAL_Q, dtype=torch.float16)),
    }

    @staticmethod
    def bwd_args(**changes):
        args = valid_args()
        bwd = dict(dout=torch.randn(TOTAL_Q, H, D), dsoftmax_lse=torch.empty(0), out=torch.randn(TOTAL_Q, H, D),
                   softmax_lse=torch.randn(H, TOTAL_Q))
        bwd.update(changes)
        return (bwd["dout"], bwd["dsoftmax_lse"], args["q"], args["k"], args["v"], bwd["out"], bwd["softmax_lse"],
                args["cu_seqlens_q"], args["cu_seqlens_k"], args["max_seqlen_q"], args["max_seqlen_k"])

    def test_backward_runs(self):
        args = valid_args()
        args["q"].requires_grad_()
        call_api(args).sum().backward()
        self.assertEqual(args["q"].grad.shape, (TOTAL_Q, H, D))

    def test_bad_backward_arguments_same_message_eager_and_traced(self):
        from torch._subclasses.fake_tensor import FakeTensorMode

        for case, change in self.BWD_CASES.items():
            with self.subTest(case=case):
                with self.assertRaises((ValueError, TypeError)) as eager:
                    torch.ops.dmattn.varlen_bwd(*self.bwd_args(**change))
                with FakeTensorMode() as mode:
                    fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in self.bwd_args(**change)]
                    with self.assertRaises((ValueError, TypeError)) as traced:
                        torch.ops.dmattn.varlen_bwd(*fake)
                self.assertIs(type(eager.exception), type(traced.exception))
                self.assertEqual(str(eager.exception), str(traced.exception))

    def test_bad_dout_message(self):
        with self.assertRaises(ValueError) as ctx:
            torch.ops.dmattn.varlen_bwd(*self.bwd_args(**self.BWD_CASES["dout_shape"]))
        self.assertExpectedInline(str(ctx.exception), """dmattn.varlen_bwd: dout must have q's shape (5, 4, 8), got (5, 4, 9)""")

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


def compiled_error(exc):
    """README ("Errors"): the exception eager mode raises, behind the TorchRuntimeError of a compiled call."""
    return exc.__context__.__cause__


@pytest.mark.parametrize("case, dynamic", _compile_params())
def test_compile_metadata_error_same_message(case, dynamic, fullgraph=True):
    """The fake impl runs meta/rules.py, so tracing fails with the eager exception, which dynamo wraps: the way
    README's "Errors" documents to catch it finds it, type and message."""
    expected = eager_error(case)
    compiled = torch.compile(api_function, backend="eager", fullgraph=fullgraph, dynamic=dynamic)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as info:
        compiled(**bad_args(case))
    error = compiled_error(info.value)
    assert type(error) is type(expected) and str(error) == str(expected)


def test_compile_metadata_error_without_fullgraph():
    """The same TorchRuntimeError without fullgraph: dynamo does not fall back to eager for it."""
    test_compile_metadata_error_same_message("float_mask", dynamic=False, fullgraph=False)


def test_compile_max_seqlen_past_int64():
    """While compiling, a max_seqlen out of int64 meets torch's schema parser before any rule: its RuntimeError,
    naming the argument, inside dynamo's."""
    args = dict(valid_args(), max_seqlen_q=2**63)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as info:
        torch.compile(api_function, backend="eager", fullgraph=True)(**args)
    error = compiled_error(info.value)
    assert type(error) is RuntimeError and "for argument 'max_seqlen_q'" in str(error)


def _type_compile_params():
    """(case, fullgraph) pairs. Under fullgraph=True dynamo refuses a sparse input before any code of ours runs."""
    return [
        pytest.param(case, fullgraph, id=f"{case}-{'fullgraph' if fullgraph else 'graph_breaks'}")
        for case in TYPE_CASES
        for fullgraph in (True, False)
        if not (fullgraph and case == "q_sparse")
    ]


@pytest.mark.parametrize("case, fullgraph", _type_compile_params())
def test_compile_type_error_same_message(case, fullgraph):
    """varlen_attention checks the Python types in the traced code: with fullgraph=True dynamo reports the raise as
    Unsupported (with the eager message); without, it runs the call eagerly and the exception arrives as itself."""
    expected = eager_error(case)
    compiled = torch.compile(api_function, backend="eager", fullgraph=fullgraph)
    if fullgraph:
        with pytest.raises(torch._dynamo.exc.Unsupported) as info:
            compiled(**bad_args(case))
        assert str(expected) in str(info.value)
    else:
        with pytest.raises(type(expected)) as info:
            compiled(**bad_args(case))
        assert str(info.value) == str(expected)


def test_compiled_graph_keeps_data_errors():
    """Data checks run in the CPU kernel, so a compiled graph raises them unchanged at run time. All DATA_CASES
    share one set of shapes, so one compiled graph serves every call with the same optional tensors given (those
    with seqused_k have their own)."""
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(api_function, backend=counter, fullgraph=True, dynamic=True)
    compiled(**valid_args())
    for case in DATA_CASES:
        expected = eager_error(case)
        with pytest.raises(ValueError) as info:
            compiled(**bad_args(case))
        assert str(info.value) == str(expected)
    given = {tuple(v is None for v in bad_args(case).values()) for case in DATA_CASES}
    assert counter.frame_count == len(given | {tuple(v is None for v in valid_args().values())}) == 2


class _BadMaskModule(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, mask):
        return dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, MAX_Q, MAX_K, mask=mask)


def test_export_metadata_error_same_exception():
    """torch.export (non-strict, no dynamo) lets the fake impl's exception through as itself."""
    args = bad_args("float_mask")
    inputs = tuple(args[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "mask"))
    with pytest.raises(TypeError) as info:
        torch.export.export(_BadMaskModule(), inputs)
    assert str(info.value) == str(eager_error("float_mask"))


# ---- what the build's CUDA kernels can run, checked from metadata (fake CUDA tensors need no GPU) ---------------


def _fake_cuda_call(dtype, head_dim, heads=H):
    """rules.check_varlen_fwd on fake CUDA tensors: the limits of the CUDA backend hold while tracing too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(TOTAL_Q, heads, head_dim, dtype=dtype, device="cuda")
        k = torch.empty(TOTAL_K, HK, head_dim, dtype=dtype, device="cuda")
        cu_q, cu_k = torch.empty(3, dtype=torch.int32, device="cuda"), torch.empty(3, dtype=torch.int32, device="cuda")
        dmattn_ops._meta.rules.check_varlen_fwd(q, k, k, cu_q, cu_k, MAX_Q, MAX_K)


class TestCudaBackendLimits(expecttest.TestCase):
    """The CUDA backend's limits are rules too (meta/rules.py, with the same messages as the CUDA binding): they
    fire on CUDA metadata alone, so they hold while tracing and are tested here with fake CUDA tensors."""

    CUDA_BUILD = dict(backends=["cpu", "cuda"], cuda_head_dims=[32, 64, 96, 128, 256])
    CPU_BUILD = dict(backends=["cpu"], torch_version="2.13.0+cpu")

    def check(self, build, dtype, head_dim, exc_type=None, expect=None, heads=H):
        """The rules on fake CUDA tensors, under a build config patched with ``build``."""
        from dmattn_ops import _build_config

        with mock.patch.object(_build_config, "CONFIG", dict(_build_config.CONFIG, **build)):
            if exc_type is None:
                _fake_cuda_call(dtype, head_dim, heads)
                return
            with self.assertRaises(Exception) as ctx:
                _fake_cuda_call(dtype, head_dim, heads)
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

    def test_query_heads_past_the_grid_limit(self):
        self.check(self.CUDA_BUILD, torch.float16, 64, ValueError, """dmattn.varlen_fwd: at most 65535 query heads on CUDA, got H = 65536""", heads=65536)
