"""The shape, dtype and layout rules of ``dmattn::varlen_fwd``: one source for the fake implementation, the eager
Python API's error messages and the tests. The op's C++ binding (csrc/tensors_to_params.cpp) holds the same metadata
rules with the same messages, in the same order (tests/test_errors.py checks every case both ways), so an eager call
is checked once, there, and a traced one here.

Two kinds of rules:
- ``check_arg_types``: the Python type of every argument (a tensor, and a dense one; an int; a bool; ...). It makes
  no decision on sizes, so it installs no guard while dynamo traces, and ``varlen_attention`` runs it in compiled
  code too: the op's schema would otherwise coerce such values or reject them with torch's own message.
- ``check_varlen_fwd`` (which starts with ``check_arg_types``): the metadata rules (shapes, strides, dtypes,
  devices), so they run unchanged on real tensors, fake tensors and symbolic shapes; the fake implementation runs
  them. The layout of a mask or bias is chosen by its rank alone, so no rule depends on data and tracing installs no
  data-dependent guard.

The data checks on ``cu_seqlens`` (monotone, in range) need the values and live in the CPU kernel (and in
``dmattn_ops.check_cu_seqlens``); the CUDA kernels do not read them on the host.
"""

from __future__ import annotations

import enum
import math
import struct
from typing import NamedTuple, Optional

import torch

OP = "dmattn.varlen_fwd"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_MAX = 2**31 - 1  # B + 1, H, Hk, D and Hm are int32 in the kernels (VarlenFwdParams)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # the schema's SymInt
CUDA_MAX_HEADS = 65535  # query heads are a CUDA grid dimension


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


def _past(size, limit):
    """Whether a size exceeds a limit of the kernels. A symbolic size is judged by its example value, so the check
    installs no guard (an export Dim keeps its full range); a later call past the limit meets the same check in the
    C++ binding. A size with no example value (unbacked) is left to the binding."""
    n = _n(size)
    return isinstance(n, int) and n > limit


# ---- Python types (no guards: run by varlen_attention while dynamo traces, too) --------------------------------


def _type_name(x):
    if x is None:
        return "None"
    t = type(x)
    return t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _scalar_type_name(x, convert):
    """The type of a wrong scalar argument, for a message. Dynamo sees a numpy scalar as an array, so any numpy value
    is named as such, with how to convert it: the message reads the same in eager mode and while compiling."""
    if type(x).__module__ == "numpy":
        return f"a numpy value; convert it with {convert}()"
    return _type_name(x)


def _check_tensor(name, t, expected):
    """t is a dense torch.Tensor; ``expected`` is what the message asks for."""
    if not isinstance(t, torch.Tensor):
        hint = "; convert it with torch.from_numpy" if _type_name(t) == "numpy.ndarray" else ""
        _fail(TypeError, f"{name} must be {expected}, got {_type_name(t)}{hint}")
    if t.is_nested:
        _fail(
            TypeError,
            f"{name} must be a dense tensor, got a nested tensor (layout {t.layout}); pass the packed tokens instead "
            "(a jagged nested tensor's .values(), with .offsets().int() as cu_seqlens)",
        )
    if t.layout != torch.strided:
        _fail(TypeError, f"{name} must be a dense tensor, got layout {t.layout}; convert it with .to_dense()")


def _check_int(name, value):
    """An int (a SymInt while tracing) within the schema's int64. Exact types: a bool is no length, and dynamo treats
    a numpy integer as an array, so both are rejected, in eager mode as while compiling."""
    if type(value) not in (int, torch.SymInt):
        _fail(TypeError, f"{name} must be an int, got {_scalar_type_name(value, 'int')}")
    # While dynamo traces, a dynamic int passes for a plain one and comparing it would install a guard; the op's
    # schema parser rejects an int past int64 there anyway.
    if type(value) is int and not torch.compiler.is_compiling() and not INT64_MIN <= value <= INT64_MAX:
        _fail(ValueError, f"{name} must fit in int64 (at most {INT64_MAX}), got {value}")


def check_arg_types(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, bias=None, softmax_scale=None,
    is_causal=False, window_left=-1, window_right=-1, softcap=None, sinks=None, seqused_k=None, kv_slots=None,
    key_range=None,
):
    """Raises TypeError (ValueError for an int past int64) naming the first argument of the wrong Python type.

    Every call runs this (a decode step: every layer), so each argument is first tested inline, and only one that
    fails the plain test (a dense tensor; an int in int64, not compared while compiling) goes to the check that names
    it: the same verdicts, without a function call per argument."""
    compiling = torch.compiler.is_compiling()
    tensor, strided = torch.Tensor, torch.strided
    for name, t, expected in (("q", q, "a tensor"), ("k", k, "a tensor"), ("v", v, "a tensor"),
                              ("cu_seqlens_q", cu_seqlens_q, "an int32 tensor"),
                              ("cu_seqlens_k", cu_seqlens_k, "an int32 tensor")):
        if not (isinstance(t, tensor) and not t.is_nested and t.layout == strided):
            _check_tensor(name, t, expected)
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if type(value) is not int or not (compiling or INT64_MIN <= value <= INT64_MAX):
            _check_int(name, value)
    if mask is not None:
        _check_tensor("mask", mask, "a bool tensor or None")
    if bias is not None:
        _check_tensor("bias", bias, "a tensor or None")
    if softmax_scale is not None and type(softmax_scale) not in (float, int, torch.SymFloat):
        _fail(TypeError, f"softmax_scale must be a float or None, got {_scalar_type_name(softmax_scale, 'float')}")
    if type(is_causal) is not bool:
        _fail(TypeError, f"is_causal must be a bool, got {_scalar_type_name(is_causal, 'bool')}")
    for name, value in (("window_left", window_left), ("window_right", window_right)):
        if type(value) is not int or not (compiling or INT64_MIN <= value <= INT64_MAX):
            _check_int(name, value)
    if softcap is not None and type(softcap) not in (float, int, torch.SymFloat):
        _fail(TypeError, f"softcap must be a float or None, got {_scalar_type_name(softcap, 'float')}")
    if sinks is not None:
        _check_tensor("sinks", sinks, "a tensor or None")
    if seqused_k is not None:
        _check_tensor("seqused_k", seqused_k, "an int32 tensor or None")
    if kv_slots is not None:
        _check_tensor("kv_slots", kv_slots, "an int32 tensor or None")
    if key_range is not None:
        _check_tensor("key_range", key_range, "an int32 tensor or None")


# ---- metadata ---------------------------------------------------------------------------------------------------


def _check_int32(what, size):
    if _past(size, INT32_MAX):
        _fail(ValueError, f"{what} must be at most {INT32_MAX} (the kernels keep it in 32 bits), got {_n(size)}")


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
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
    # Sizes before strides: an expanded tensor (stride 0) of a size past int32 gets the size error. Hm needs no
    # check of its own: it must be 1, Hk or H.
    _check_int32("the number of query heads H (q.shape[1])", q.shape[1])
    _check_int32("the number of key/value heads Hk (k.shape[1])", k.shape[1])
    _check_int32("head_dim D", q.shape[2])
    if k.shape[1] < 1 or q.shape[1] % k.shape[1] != 0:
        _fail(
            ValueError,
            f"the number of query heads H must be a multiple of the number of key/value heads Hk, "
            f"got H = {_n(q.shape[1])}, Hk = {_n(k.shape[1])}",
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[2] > 1 and t.stride(2) != 1:  # a head dim of 1 is read at element 0 only: any stride will do
            strides = tuple(_n(s) for s in t.stride())
            _fail(ValueError, f"{name} must have a contiguous head_dim (stride 1), got strides {strides}")


def check_backend_built(q):
    """q's device has kernels in this build (``dmattn_ops.build_info()``). The one metadata rule the op's binding
    cannot raise (without a CUDA backend no binding sees a CUDA call), so the eager API runs it before the op."""
    if not q.is_cuda:  # (a property: no device object made, as q.device would, in every eager call)
        return
    from .._build_config import CONFIG  # written by setup.py

    if "cuda" not in CONFIG["backends"]:
        _fail(
            ValueError,
            f"q is on {q.device}, but this build of dmattn_ops has no CUDA backend (built against torch "
            f"{CONFIG['torch_version']}, backends: {', '.join(CONFIG['backends'])}); rebuild it where torch has CUDA "
            "and nvcc is found, or run on the CPU",
        )


def _check_backend(q):
    """What this build's kernels for q's device can run: the CUDA kernels take float16 and bfloat16, at most 65535
    query heads (a grid dimension), and head dims up to the largest one compiled (smaller ones run zero-padded to a
    compiled one). The CUDA binding (csrc/cuda/varlen_fwd_cuda.cpp) holds the same limits with the same messages."""
    check_backend_built(q)
    if q.device.type != "cuda":
        return
    from .._build_config import CONFIG  # written by setup.py
    if q.dtype == torch.float32:
        _fail(
            TypeError,
            "float32 q, k, v are not supported on CUDA (the kernels run float16 / bfloat16 tensor cores), got q of "
            "dtype float32; convert q, k and v to float16 or bfloat16, or run on the CPU",
        )
    if _past(q.shape[1], CUDA_MAX_HEADS):
        _fail(ValueError, f"at most {CUDA_MAX_HEADS} query heads on CUDA, got H = {_n(q.shape[1])}")
    largest = max(CONFIG["cuda_head_dims"])
    if q.shape[2] > largest:
        _fail(
            ValueError,
            f"head_dim D must be at most {largest} on CUDA (the largest compiled head dim), got {_n(q.shape[2])}",
        )


def check_cu_seqlens_tensor(name, t):
    """Type, dtype, shape and strides of one cu_seqlens (``dmattn_ops.check_cu_seqlens`` runs this too)."""
    _check_tensor(name, t, "an int32 tensor")
    if t.dtype != torch.int32:
        _fail(TypeError, f"{name} must be int32 (convert with .int()), got {t.dtype}")
    if t.dim() != 1 or t.shape[0] < 1:
        _fail(ValueError, f"{name} must have shape (B + 1,), got shape {_shape(t)}")
    _check_int32(f"the length B + 1 of {name}", t.shape[0])
    if t.shape[0] > 1 and t.stride(0) != 1:  # a single entry is read at element 0 only
        _fail(ValueError, f"{name} must be contiguous, got stride {_n(t.stride(0))}")


def _check_cu_seqlens(q, cu_seqlens_q, cu_seqlens_k):
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        check_cu_seqlens_tensor(name, t)
        if t.device != q.device:
            _fail(ValueError, f"{name} must be on q's device {q.device}, got {t.device}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        _fail(
            ValueError,
            f"cu_seqlens_q and cu_seqlens_k must have the same length B + 1, "
            f"got {_n(cu_seqlens_q.shape[0])} and {_n(cu_seqlens_k.shape[0])}",
        )


def _check_operand(name, t, q, k, max_seqlen_k, pool=False):
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
        rows = "a row per slot of the pool, k.shape[0]" if pool else "total_k"
        _fail(
            ValueError,
            f"{name} is key-side (rank 2){' with kv_slots' if pool else ''}, so it must have {rows} = "
            f"{_n(k.shape[0])} rows, got {_n(t.shape[0])}",
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


def _float32(x):
    """x rounded to float32, or inf where that rounding overflows."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.inf


def _check_softmax_scale(softmax_scale):
    """The kernels use softmax_scale as float32: 1e39 is finite as a double but inf there."""
    if type(softmax_scale) in (float, int) and not math.isfinite(_float32(softmax_scale)):
        _fail(
            ValueError,
            f"softmax_scale must be finite in float32 (the kernels use it as float32), got {softmax_scale}",
        )


def _check_window_softcap_sinks(q, window_left, window_right, softcap, sinks):
    """The window sides are -1 (no limit) or a key count; softcap is 0 (off) or a positive float32; sinks one logit
    per query head."""
    for name, value in (("window_left", window_left), ("window_right", window_right)):
        if value < -1:
            _fail(ValueError, f"{name} must be >= -1 (-1: no limit), got {_n(value)}")
    if type(softcap) in (float, int) and not (math.isfinite(_float32(softcap)) and softcap >= 0):
        _fail(ValueError, f"softcap must be >= 0 and finite in float32 (0: no softcap), got {float(softcap)!r}")
    if sinks is not None:
        if sinks.dtype != torch.float32 and sinks.dtype != q.dtype:
            _fail(TypeError, f"sinks must be float32 or q's dtype {q.dtype}, got {sinks.dtype}")
        if sinks.device != q.device:
            _fail(ValueError, f"sinks must be on q's device {q.device}, got {sinks.device}")
        if sinks.dim() != 1 or sinks.shape[0] != q.shape[1]:
            _fail(ValueError, f"sinks must have shape (H,) = ({_n(q.shape[1])},), got shape {_shape(sinks)}")


def _check_seqused_k(q, cu_seqlens_k, seqused_k):
    """(B,) int32 on q's device, contiguous: how many keys of its cu_seqlens_k range each sequence uses."""
    if seqused_k.dtype != torch.int32:
        _fail(TypeError, f"seqused_k must be int32 (convert with .int()), got {seqused_k.dtype}")
    if seqused_k.device != q.device:
        _fail(ValueError, f"seqused_k must be on q's device {q.device}, got {seqused_k.device}")
    batch = cu_seqlens_k.shape[0] - 1
    if seqused_k.dim() != 1 or seqused_k.shape[0] != batch:
        _fail(ValueError, f"seqused_k must have shape (B,) = ({_n(batch)},), got shape {_shape(seqused_k)}")
    if seqused_k.shape[0] > 1 and seqused_k.stride(0) != 1:
        _fail(ValueError, f"seqused_k must be contiguous, got stride {_n(seqused_k.stride(0))}")


def _check_kv_slots(q, k, kv_slots):
    """(total_k,) int32 on q's device, contiguous: the pool row (slot) of each packed key row."""
    if kv_slots.dtype != torch.int32:
        _fail(TypeError, f"kv_slots must be int32 (convert with .int()), got {kv_slots.dtype}")
    if kv_slots.device != q.device:
        _fail(ValueError, f"kv_slots must be on q's device {q.device}, got {kv_slots.device}")
    if kv_slots.dim() != 1:
        _fail(ValueError, f"kv_slots must have shape (total_k,), got shape {_shape(kv_slots)}")
    if kv_slots.shape[0] > 1 and kv_slots.stride(0) != 1:
        _fail(ValueError, f"kv_slots must be contiguous, got stride {_n(kv_slots.stride(0))}")
    if k.shape[0] == 0 and kv_slots.shape[0] != 0:
        _fail(ValueError, f"kv_slots must be empty when the key pool is (k.shape[0] = 0), got shape {_shape(kv_slots)}")
    _check_int32("the rows of the key pool (k.shape[0] with kv_slots)", k.shape[0])


def _check_key_range(q, key_range):
    """key_range: (total_q, 2) int32 on q's device, contiguous (each query's [begin, end) key positions)."""
    if key_range.dtype != torch.int32:
        _fail(TypeError, f"key_range must be int32 (convert with .int()), got {key_range.dtype}")
    if key_range.device != q.device:
        _fail(ValueError, f"key_range must be on q's device {q.device}, got {key_range.device}")
    if key_range.dim() != 2 or key_range.shape[0] != q.shape[0] or key_range.shape[1] != 2:
        _fail(ValueError, f"key_range must have shape (total_q, 2) = ({_n(q.shape[0])}, 2), got shape "
                          f"{_shape(key_range)}")
    if not key_range.is_contiguous():
        _fail(ValueError, f"key_range must be contiguous, got strides {tuple(_n(s) for s in key_range.stride())}")


def check_varlen_fwd(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, bias=None, softmax_scale=None,
    is_causal=False, window_left=-1, window_right=-1, softcap=None, sinks=None, seqused_k=None, kv_slots=None,
    key_range=None,
) -> VarlenLayout:
    """Validates the Python types and the metadata of one call; raises TypeError/ValueError naming the argument, what
    was expected and what was given. Returns what it found."""
    check_arg_types(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
        window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range,
    )
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
        mask_layout = _check_operand("mask", mask, q, k, max_seqlen_k, kv_slots is not None)
    if bias is not None:
        if bias.dtype != torch.float32 and bias.dtype != q.dtype:
            _fail(TypeError, f"bias must be float32 or q's dtype {q.dtype}, got {bias.dtype}")
        bias_layout = _check_operand("bias", bias, q, k, max_seqlen_k, kv_slots is not None)
    _check_softmax_scale(softmax_scale)
    _check_window_softcap_sinks(q, window_left, window_right, softcap, sinks)
    if seqused_k is not None:
        _check_seqused_k(q, cu_seqlens_k, seqused_k)
    if kv_slots is not None:
        _check_kv_slots(q, k, kv_slots)
    if key_range is not None:
        _check_key_range(q, key_range)
    return VarlenLayout(
        total_q=q.shape[0],
        total_k=k.shape[0] if kv_slots is None else kv_slots.shape[0],
        num_heads=q.shape[1],
        num_heads_k=k.shape[1],
        head_dim=q.shape[2],
        batch=cu_seqlens_q.shape[0] - 1,
        mask=mask_layout,
        bias=bias_layout,
    )


def check_varlen_bwd(q, dout, dsoftmax_lse, out, softmax_lse):
    """The extra arguments of dmattn::varlen_bwd, after check_varlen_fwd on the forward's: the rules (and messages) of
    check_bwd_args in csrc/tensors_to_params.cpp."""
    prefix = "dmattn.varlen_bwd: "
    for name, t in (("dout", dout), ("out", out)):
        if tuple(t.shape) != tuple(q.shape):
            raise ValueError(f"{prefix}{name} must have q's shape {_shape(q)}, got {_shape(t)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{prefix}{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{prefix}{name} must be on q's device {q.device}, got {t.device}")
    lse_shape = (_n(q.shape[1]), _n(q.shape[0]))
    for name, t in (("softmax_lse", softmax_lse), ("dsoftmax_lse", dsoftmax_lse)):
        if name == "dsoftmax_lse" and t.numel() == 0:
            continue  # no gradient through softmax_lse
        if _shape(t) != lse_shape:
            raise ValueError(f"{prefix}{name} must have shape (H, total_q) = {lse_shape}, got {_shape(t)}")
        if t.dtype != torch.float32:
            raise TypeError(f"{prefix}{name} must be float32, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{prefix}{name} must be on q's device {q.device}, got {t.device}")


def output_shapes(q):
    """out (total_q, H, D) in q's dtype and softmax_lse (H, total_q) float32, both contiguous."""
    total_q, num_heads, head_dim = q.shape
    return (total_q, num_heads, head_dim), (num_heads, total_q)
