"""The shape, dtype and layout rules of ``dmattn::varlen_fwd``: one source for the fake implementation, the eager
Python API's error messages and the tests.

Every rule here reads only metadata (shapes, strides, dtypes, devices), so it runs unchanged on real tensors, fake
tensors and symbolic shapes. The layout of a mask or bias is chosen by its rank alone, so no rule depends on data and
tracing installs no data-dependent guard. The data checks on ``cu_seqlens`` (monotone, in range) need the values and
live in the CPU kernel; the CUDA kernels clamp lengths to the tensor extents instead.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple, Optional

import torch

OP = "dmattn.varlen_fwd"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class Layout(enum.Enum):
    """Where a mask or bias element lives."""

    ABSENT = "absent"
    KEY_SIDE = "key-side"  # (total_k, Hm): one value per packed key, broadcast over the queries of its sequence
    QUERY_SIDE = "query-side"  # (total_q, Hm, max_seqlen_k): [i, h, j] = query i, j-th key of i's sequence


class VarlenLayout(NamedTuple):
    """What the rules found about one call."""

    total_q: int
    total_k: int
    num_heads: int
    num_heads_k: int
    head_dim: int
    batch: int
    mask: Layout
    bias: Layout


def layout_of(t: Optional[torch.Tensor]) -> Layout:
    """The layout of a mask or bias, by rank: 2 is key-side, 3 is query-side."""
    if t is None:
        return Layout.ABSENT
    return {2: Layout.KEY_SIDE, 3: Layout.QUERY_SIDE}.get(t.dim(), Layout.ABSENT)


def _fail(kind, msg):
    raise kind(f"{OP}: {msg}")


def _n(x):
    """A size as a message shows it: while tracing with symbolic shapes, the example's value (the SymInt's hint),
    so a message reads the same under torch.compile / torch.export as in eager mode."""
    if isinstance(x, torch.SymInt) and x.node.has_hint():
        return int(x.node.hint)
    return x


def _shape(t):
    return tuple(_n(s) for s in t.shape)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 3:
            _fail(ValueError, f"{name} must have shape (tokens, heads, head_dim), got shape {_shape(t)}")
    if q.dtype not in FLOAT_DTYPES:
        _fail(TypeError, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            _fail(TypeError, f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            _fail(ValueError, f"{name} must be on q's device {q.device}, got {t.device}")
    if k.shape != v.shape:  # compares the (symbolic) sizes themselves; _shape is for messages only
        _fail(ValueError, f"k and v must have the same shape (total_k, Hk, D), got {_shape(k)} and {_shape(v)}")
    if q.shape[2] != k.shape[2]:
        _fail(ValueError, f"q and k must have the same head_dim D, got {_n(q.shape[2])} and {_n(k.shape[2])}")
    if q.shape[2] < 1:
        _fail(ValueError, f"head_dim D must be >= 1, got {_n(q.shape[2])}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        _fail(
            ValueError,
            f"the number of query heads H must be a multiple of the number of key/value heads Hk, "
            f"got H = {_n(q.shape[1])}, Hk = {_n(k.shape[1])}",
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(2) != 1:
            strides = tuple(_n(s) for s in t.stride())
            _fail(ValueError, f"{name} must have a contiguous head_dim (stride 1), got strides {strides}")


def _check_backend(q):
    """What this build's kernels for q's device can run (``dmattn_ops.build_info()``): the CUDA kernels take float16
    and bfloat16, and head dims up to the largest one compiled (smaller ones run zero-padded to a compiled one).
    The CUDA binding (csrc/cuda/varlen_fwd_cuda.cpp) holds the same limits with the same messages."""
    if q.device.type != "cuda":
        return
    from .._build_config import CONFIG  # written by setup.py

    if "cuda" not in CONFIG["backends"]:
        _fail(
            ValueError,
            f"q is on {q.device}, but this build of dmattn_ops has no CUDA backend (built against torch "
            f"{CONFIG['torch_version']}, backends: {', '.join(CONFIG['backends'])}); rebuild it where torch has CUDA "
            "and nvcc is found, or run on the CPU",
        )
    if q.dtype == torch.float32:
        _fail(
            TypeError,
            "float32 q, k, v are not supported on CUDA (the kernels run float16 / bfloat16 tensor cores), got q of "
            "dtype float32; convert q, k and v to float16 or bfloat16, or run on the CPU",
        )
    largest = max(CONFIG["cuda_head_dims"])
    if q.shape[2] > largest:
        _fail(
            ValueError,
            f"head_dim D must be at most {largest} on CUDA (the largest compiled head dim), got {_n(q.shape[2])}",
        )


def _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k):
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor):
            _fail(TypeError, f"{name} must be an int32 tensor, got {type(t).__name__}")
        if t.dtype != torch.int32:
            _fail(TypeError, f"{name} must be int32 (convert with .int()), got {t.dtype}")
        if t.dim() != 1 or t.shape[0] < 1:
            _fail(ValueError, f"{name} must have shape (B + 1,), got shape {_shape(t)}")
        if t.device != q.device:
            _fail(ValueError, f"{name} must be on q's device {q.device}, got {t.device}")
        if t.stride(0) != 1:
            _fail(ValueError, f"{name} must be contiguous, got stride {_n(t.stride(0))}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(
            ValueError,
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, "
            f"got {_n(cu_seqlens_q.shape[0])} and {_n(cu_seqlens_k.shape[0])}",
        )


def _check_operand(name, t, q, k, max_seqlen_k):
    """Rank, rows, head count and (query-side) width of a mask or bias."""
    H, Hk = q.shape[1], k.shape[1]
    if t.device != q.device:
        _fail(ValueError, f"{name} must be on q's device {q.device}, got {t.device}")
    layout = layout_of(t)
    if layout is Layout.ABSENT:
        _fail(
            ValueError,
            f"{name} must be key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k), got shape {_shape(t)}",
        )
    if layout is Layout.KEY_SIDE and t.shape[0] != k.shape[0]:
        _fail(
            ValueError,
            f"{name} is key-side (rank 2), so it must have total_k = {_n(k.shape[0])} rows, got {_n(t.shape[0])}",
        )
    if layout is Layout.QUERY_SIDE and t.shape[0] != q.shape[0]:
        _fail(
            ValueError,
            f"{name} is query-side (rank 3), so it must have total_q = {_n(q.shape[0])} rows, got {_n(t.shape[0])}",
        )
    hm = t.shape[1]
    if hm != 1 and hm != Hk and hm != H:
        _fail(ValueError, f"{name} head dim Hm must be 1, Hk = {_n(Hk)} or H = {_n(H)}, got {_n(hm)}")
    if layout is Layout.QUERY_SIDE and t.shape[2] != max_seqlen_k:
        _fail(
            ValueError,
            f"{name} is query-side, so its last dim must be max_seqlen_k = {_n(max_seqlen_k)}, got {_n(t.shape[2])}",
        )
    return layout


def check_varlen_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, bias=None, softmax_scale=None,
    is_causal=False,
) -> VarlenLayout:
    """Validates the metadata of one call; raises TypeError/ValueError naming the argument, what was expected and
    what was given. Returns what it found."""
    _check_qkv(q, k, v)
    _check_backend(q)
    _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if value < 0:
            _fail(ValueError, f"{name} must be >= 0, got {_n(value)}")
    mask_layout = bias_layout = Layout.ABSENT
    if mask is not None:
        if mask.dtype != torch.bool:
            _fail(TypeError, f"mask must be bool (True = attend), got {mask.dtype}")
        mask_layout = _check_operand("mask", mask, q, k, max_seqlen_k)
    if bias is not None:
        if bias.dtype != torch.float32 and bias.dtype != q.dtype:
            _fail(TypeError, f"bias must be float32 or q's dtype {q.dtype}, got {bias.dtype}")
        bias_layout = _check_operand("bias", bias, q, k, max_seqlen_k)
    if softmax_scale is not None and not math.isfinite(softmax_scale):
        _fail(ValueError, f"softmax_scale must be finite, got {softmax_scale}")
    return VarlenLayout(
        total_q=q.shape[0],
        total_k=k.shape[0],
        num_heads=q.shape[1],
        num_heads_k=k.shape[1],
        head_dim=q.shape[2],
        batch=cu_seqlens_q.shape[0] - 1,
        mask=mask_layout,
        bias=bias_layout,
    )


def output_shapes(q):
    """out (total_q, H, D) in q's dtype and softmax_lse (H, total_q) float32, both contiguous."""
    total_q, num_heads, head_dim = q.shape
    return (total_q, num_heads, head_dim), (num_heads, total_q)


def operand_elements(layout: Layout, rows_k, rows_q, heads, max_seqlen_k) -> int:
    """Elements a mask or bias of this layout holds: O(total_k * Hm) key-side, O(total_q * Hm * max_seqlen_k)
    query-side."""
    if layout is Layout.KEY_SIDE:
        return rows_k * heads
    if layout is Layout.QUERY_SIDE:
        return rows_q * heads * max_seqlen_k
    return 0
