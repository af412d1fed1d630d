"""Fuzz test of dmattn::varlen_fwd: every call gets a clear error or the right answer (issue 8).

Hypothesis draws calls of ``dmattn_ops.varlen_attention`` and of ``torch.ops.dmattn.varlen_fwd`` itself:
- shapes: 0-3 sequences of 0-9 tokens per side, now and then 130 queries or 129 / 1100 keys (several CPU blocks,
  key chunks and key splits, several CUDA tiles), empty sequences, B = 0, rows no sequence owns, H = 0, MHA / GQA /
  MQA, head dims from 1, every dtype the device runs, causal, every mask / bias layout and head count Hm, both bias
  dtypes, max_seqlen at, above, or far above the real lengths (up to 2**40), softmax_scale None or any float32 in
  [-4, 4] (0 and negatives included);
- memory layouts: every tensor is a view into a larger poison-filled buffer (storage offsets, token / head strides,
  dims stored in another order, then sliced), stride-0 broadcasts through expand, size-1 and size-0 dims with
  arbitrary strides (0, 7, 2**33);
- values: q and k scaled by powers of two from tiny to near float32's max (scores stay moderate), V likewise,
  -inf / finfo.min / finfo.max / -2**14 biases, non-canonical mask bytes (uint8 viewed as bool), and NaN or
  inf in every q, K, V and bias entry that no row which could read it sees (a perturbed call);
- extreme visible values: q rows whose score with a visible key overflows float32 (either way), NaN / inf entries of
  q, K, V and bias, huge uniform biases (finfo.min / max, +-2**100);
- invalid calls: exactly one thing wrong (dtype, rank, shape, head counts, device, strides, lying cu_seqlens or
  max_seqlen, softmax_scale, Python types), and sizes past int32 or the CUDA grid.

The oracle is the contract (README "The op contract", docs/contract.md "Numeric limits"), not the implementation:
- an invalid call raises TypeError or ValueError starting with "dmattn.varlen_fwd: " (Python-type errors are drawn
  for the public API only: torch's own schema parser answers them for the raw op); lying cu_seqlens are a ValueError
  on the CPU and NaN in every element of out and lse on CUDA, and ``dmattn_ops.check_cu_seqlens`` rejects them;
- a valid call with moderate scores matches the float64 reference by ``assert_close_to_reference``;
- entries a row cannot see change nothing: the perturbed call is bit-identical to the clean one;
- with extreme visible values each (row, head) is predicted from float64 products of the actual values: a visible
  score that is NaN or +inf makes the row NaN; a row whose visible scores are all -inf is 0 with lse -inf; a row
  whose inputs did not change is bit-identical to the clean call; a row whose finite scores all equal one huge bias
  c is the plain mean of those keys' V, with lse c; non-finite V of a key with weight > 0 makes that column
  non-finite (or the whole out row NaN) and leaves lse alone. Rows the classification cannot decide (a possible
  float32 overflow) are not judged.

max_examples per test keep the file under a minute on two busy cores (about 20 s on idle ones); CI=true
derandomizes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

import dmattn_ops
from dmattn_ops.reference import causal_mask, materialize_mask
from packed_batch import PackedBatch
from samples import assert_close_to_reference, assert_gradients_close

PREFIX = "dmattn.varlen_fwd: "
INF = math.inf
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ARG_NAMES = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "mask", "bias",
             "softmax_scale", "is_causal")
HEADS = [(0, 1), (0, 2), (1, 1), (2, 1), (2, 2), (4, 1), (4, 2), (4, 4), (6, 3)]  # (H, Hk)
CPU_HEAD_DIMS = [1, 2, 3, 8, 16]
HUGE_MAX_SEQLEN = [2**31 - 1, 2**31 + 7, 2**40]
ODD_STRIDES = [None, None, 0, 7, 2**33]  # for dims of size 0 or 1 (None: keep the view's stride)
# Largest power-of-two exponent a drawn q / k / V entry is scaled by: randn values stay 2**8 below the dtype's max.
MAX_EXP = {torch.float32: 119, torch.bfloat16: 119, torch.float16: 7}


def _supported(device: str):
    """(dtypes, head dims) this build runs on ``device``; smaller CUDA head dims run zero-padded."""
    if device == "cpu":
        return list(FLOAT_DTYPES), CPU_HEAD_DIMS
    info = dmattn_ops.build_info()
    dtypes = [d for d in FLOAT_DTYPES if str(d).replace("torch.", "") in info["cuda_dtypes"]]
    largest = max(info["cuda_head_dims"], default=0)
    return dtypes, [d for d in (1, 3, 8, 16, 64, 80, 128) if d <= largest]


def _skip_without_kernels(device: str) -> None:
    if not all(_supported(device)):
        pytest.skip("this build's CUDA backend has no kernel instantiations")


# ---------------------------------------------------------------------------------------------------------------
# Shapes.


@dataclass(frozen=True)
class Shape:
    """Everything about a call except values and memory layout. An operand is (layout "key" | "query", Hm)."""

    seqlens_q: Tuple[int, ...]
    seqlens_k: Tuple[int, ...]
    total_q: int
    total_k: int
    heads: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    mask: Optional[Tuple[str, int]]
    bias: Optional[Tuple[str, int]]
    bias_dtype: torch.dtype
    is_causal: bool
    softmax_scale: Optional[float]
    max_seqlen_q: int
    max_seqlen_k: int

    def full_shape(self, name: str) -> Tuple[int, ...]:
        if name == "q":
            return (self.total_q, self.heads, self.head_dim)
        if name in ("k", "v"):
            return (self.total_k, self.heads_k, self.head_dim)
        if name.startswith("cu_seqlens"):
            return (len(self.seqlens_q) + 1,)
        layout, hm = getattr(self, name)
        return (self.total_k, hm) if layout == "key" else (self.total_q, hm, self.max_seqlen_k)

    @property
    def scale(self) -> float:
        """softmax_scale as the kernels use it: rounded to float32."""
        scale = self.softmax_scale if self.softmax_scale is not None else 1 / math.sqrt(self.head_dim)
        return torch.tensor(scale, dtype=torch.float32).item()

    def bounds(self) -> List[Tuple[int, int, int, int]]:
        """(q0, q1, k0, k1) of every sequence."""
        cu_q = dmattn_ops.cu_seqlens(self.seqlens_q).tolist()
        cu_k = dmattn_ops.cu_seqlens(self.seqlens_k).tolist()
        return [(cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]) for b in range(len(self.seqlens_q))]


def _max_seqlen(longest: int):
    return st.one_of(st.just(longest), st.integers(longest, longest + 3), st.sampled_from(HUGE_MAX_SEQLEN))


@st.composite
def shapes(draw, device: str) -> Shape:
    dtypes, head_dims = _supported(device)
    batch = draw(st.integers(0, 3))
    # Mostly short; now and then long enough to span several CPU row blocks / key chunks / key splits and CUDA tiles.
    long_q, long_k = {10: 130}, {10: 129, 11: 1100}
    seqlens_q = tuple(long_q.get(n, n) for n in draw(st.lists(st.integers(0, 10), min_size=batch, max_size=batch)))
    seqlens_k = tuple(long_k.get(n, n) for n in draw(st.lists(st.integers(0, 11), min_size=batch, max_size=batch)))
    heads, heads_k = draw(st.sampled_from(HEADS))
    dtype = draw(st.sampled_from(dtypes))
    operand = st.none() | st.tuples(st.sampled_from(["key", "query"]), st.sampled_from([1, heads_k, heads]))
    return Shape(
        seqlens_q=seqlens_q,
        seqlens_k=seqlens_k,
        total_q=sum(seqlens_q) + draw(st.integers(0, 2)),
        total_k=sum(seqlens_k) + draw(st.integers(0, 2)),
        heads=heads,
        heads_k=heads_k,
        head_dim=draw(st.sampled_from(head_dims)),
        dtype=dtype,
        mask=draw(operand),
        bias=draw(operand),
        bias_dtype=draw(st.sampled_from([torch.float32, dtype])),
        is_causal=draw(st.booleans()),
        softmax_scale=draw(st.none() | st.floats(-4, 4, width=32)),
        max_seqlen_q=draw(_max_seqlen(max(seqlens_q, default=0))),
        max_seqlen_k=draw(_max_seqlen(max(seqlens_k, default=0))),
    )


# ---------------------------------------------------------------------------------------------------------------
# Memory layouts: a view of the same values at other addresses, with other strides.


@dataclass(frozen=True)
class ViewPlan:
    order: Tuple[int, ...]  # dims from outermost to innermost in the buffer
    steps: Tuple[int, ...]  # element step along each dim inside the buffer
    pads: Tuple[int, ...]  # poisoned entries before the view along each dim (storage offset)
    broadcast: Tuple[bool, ...]  # dims held once and expanded (stride 0)
    odd_strides: Tuple[Optional[int], ...]  # a new stride for dims of size 0 or 1

    def base_shape(self, full: Tuple[int, ...]) -> Tuple[int, ...]:
        return tuple(1 if b else n for n, b in zip(full, self.broadcast))


@st.composite
def view_plans(draw, full: Tuple[int, ...], *, inner_contiguous=False, broadcastable=(), force_broadcast=()):
    """``inner_contiguous``: the last dim keeps stride 1 unless its size is 1 (q, k, v and cu_seqlens)."""
    ndim = len(full)
    fixed = inner_contiguous and full[-1] > 1
    order = tuple(range(ndim))
    if draw(st.booleans()):  # stored in another dim order (a transposed buffer), then sliced
        movable = order[:-1] if fixed else order
        order = tuple(draw(st.permutations(movable))) + ((ndim - 1,) if fixed else ())
    steps = tuple(1 if fixed and d == ndim - 1 else draw(st.integers(1, 3)) for d in range(ndim))
    pads = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
    broadcast = tuple(
        d in force_broadcast or (d in broadcastable and draw(st.integers(0, 3)) == 0) for d in range(ndim)
    )
    odd = tuple(draw(st.sampled_from(ODD_STRIDES)) if full[d] <= 1 else None for d in range(ndim))
    return ViewPlan(order, steps, pads, broadcast, odd)


def _poison_fill(dtype: torch.dtype):
    """What the buffer around a view holds: NaN, a True mask byte, a cu_seqlens entry past any total."""
    return {torch.uint8: 255, torch.int32: 2**30}.get(dtype, math.nan)


def materialize(base: torch.Tensor, plan: ViewPlan, full: Tuple[int, ...], device) -> torch.Tensor:
    """A view on ``device`` holding ``base`` (CPU, size 1 on broadcast dims) expanded to ``full``, laid out by
    ``plan`` inside a poison-filled buffer."""
    extents = [p + max(n, 1) * s + 1 for p, n, s in zip(plan.pads, base.shape, plan.steps)]
    buf = torch.full([extents[d] for d in plan.order], _poison_fill(base.dtype), dtype=base.dtype, device=device)
    buf = buf.permute([plan.order.index(d) for d in range(base.dim())])
    view = buf[tuple(slice(p, p + n * s, s) for p, n, s in zip(plan.pads, base.shape, plan.steps))]
    view.copy_(base)
    # Odd strides (dims of size <= 1) go on before the expand. An as_strided of the expanded view would have an
    # overlapping input, and autograd counts that overlap in the gradient's dtype: a float16 / bfloat16 count stops at
    # 256, so a base broadcast 520 times got twice its gradient.
    odd = [s if o is None else o for s, o in zip(view.stride(), plan.odd_strides)]
    view = view.as_strided(view.shape, odd, view.storage_offset()).expand(full)
    strides = [s if o is None else o for s, o in zip(view.stride(), plan.odd_strides)]
    if list(view.stride()) != strides:  # a size-0 dim broadcast from 1: an empty tensor, nothing to differentiate
        view = view.as_strided(view.shape, strides, view.storage_offset())
    return view


# ---------------------------------------------------------------------------------------------------------------
# Which entries a row can see.


def visible(shape: Shape, mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
    """Per sequence, (H, Lq, Lk) bool: query i of the sequence sees its key j in head h. ``mask`` is the logical
    canonical bool mask on the CPU."""
    result = []
    cu_q, cu_k = dmattn_ops.cu_seqlens(shape.seqlens_q), dmattn_ops.cu_seqlens(shape.seqlens_k)
    for b, (q0, q1, k0, k1) in enumerate(shape.bounds()):
        if shape.heads == 0:
            result.append(torch.zeros(0, q1 - q0, k1 - k0, dtype=torch.bool))
            continue
        vis = materialize_mask(mask, cu_q, cu_k, b, shape.heads)
        if shape.is_causal:
            vis = vis & causal_mask(q1 - q0, k1 - k0)
        result.append(vis)
    return result


def _group_any(seen: torch.Tensor, groups: int) -> torch.Tensor:
    """(..., H) -> (..., groups): whether any query head of each operand head group (H / groups heads) is set."""
    if seen.shape[-1] == 0:
        return torch.zeros(*seen.shape[:-1], groups, dtype=torch.bool)
    return seen.unflatten(-1, (groups, seen.shape[-1] // groups)).any(-1)


def free_entries(shape: Shape, vis: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Per tensor, a bool of its logical shape (query-side operands: only the first max Lk columns): True where the
    contract says the value cannot matter. For q, k, v and bias: no row that could read the entry sees it. For the
    mask (which decides what is seen): the entry belongs to no sequence (rows past cu_seqlens[-1], query-side
    columns j >= Lk)."""
    H, W = shape.heads, max(shape.seqlens_k, default=0)
    row_sees = torch.zeros(shape.total_q, H, dtype=torch.bool)
    key_seen = torch.zeros(shape.total_k, H, dtype=torch.bool)
    pair_seen = torch.zeros(shape.total_q, H, W, dtype=torch.bool)
    key_owned = torch.zeros(shape.total_k, dtype=torch.bool)
    pair_owned = torch.zeros(shape.total_q, W, dtype=torch.bool)
    for (q0, q1, k0, k1), v in zip(shape.bounds(), vis):
        row_sees[q0:q1] = v.any(2).T
        key_seen[k0:k1] = v.any(1).T
        pair_seen[q0:q1, :, : k1 - k0] = v.permute(1, 0, 2)
        key_owned[k0:k1] = True
        pair_owned[q0:q1, : k1 - k0] = True
    D = shape.head_dim
    result = {
        "q": ~row_sees[:, :, None].expand(-1, -1, D),
        "k": ~_group_any(key_seen, shape.heads_k)[:, :, None].expand(-1, -1, D),
    }
    result["v"] = result["k"]
    if shape.bias is not None:
        layout, hm = shape.bias
        if layout == "key":
            result["bias"] = ~_group_any(key_seen, hm)
        else:
            result["bias"] = ~_group_any(pair_seen.transpose(1, 2), hm).transpose(1, 2)
    if shape.mask is not None:
        layout, hm = shape.mask
        result["mask"] = (~key_owned[:, None] if layout == "key" else ~pair_owned[:, None, :]).expand(
            shape.full_shape("mask")[:2] + ((W,) if layout == "query" else ()))
    return result


def base_entries(free: torch.Tensor, base_shape: Tuple[int, ...], full: Tuple[int, ...]) -> torch.Tensor:
    """``free_entries`` for the entries of a base: a broadcast entry is free only if every entry it stands for is.
    Query-side columns past the longest key sequence are never read."""
    if len(full) == 3 and free.shape[2] < full[2] and base_shape[2] != 1:
        free = torch.nn.functional.pad(free, (0, full[2] - free.shape[2]), value=True)
    for d, n in enumerate(base_shape):
        if n == 1 and free.shape[d] != 1:
            free = free.all(d, keepdim=True)
    return free


# ---------------------------------------------------------------------------------------------------------------
# One drawn call: a shape, a layout for every tensor, and CPU values (bases: size 1 on broadcast dims).

TENSORS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "mask", "bias")


class Drawn:
    """Not a dataclass, so that hypothesis reports it by its short repr (describe() notes the tensors)."""

    def __init__(self, shape: Shape, plans: Dict[str, ViewPlan], bases: Dict[str, torch.Tensor], path: str):
        self.shape = shape
        self.plans = plans
        self.bases = bases  # the mask as uint8: 0 is False, any other byte True
        self.path = path  # "api": dmattn_ops.varlen_attention, "op": torch.ops.dmattn.varlen_fwd

    def __repr__(self) -> str:
        return f"Drawn({self.shape}, path={self.path!r})"

    def present(self) -> List[str]:
        return [n for n in TENSORS if n in self.bases]

    def logical(self, name: str, bases=None) -> torch.Tensor:
        """A tensor's values on the CPU at its full shape (the mask canonical bool), except that a query-side
        operand is only as wide as the longest key sequence: the columns past it are never read, and a
        max_seqlen_k of 2**40 would make every whole-tensor op on it huge."""
        base = (bases or self.bases)[name]
        full = self.shape.full_shape(name)
        if name in ("mask", "bias") and len(full) == 3:
            full = full[:2] + (min(full[2], max(self.shape.seqlens_k, default=0)),)
            base = base[:, :, : full[2]]
        return (base != 0 if name == "mask" else base).expand(full)

    def sample(self, device, bases=None) -> PackedBatch:
        bases = bases or self.bases
        views = {n: materialize(bases[n], self.plans[n], self.shape.full_shape(n), device) for n in self.present()}
        if "mask" in views:
            views["mask"] = views["mask"].view(torch.bool)
        return self._sample(**views)

    def reference_sample(self, bases=None) -> PackedBatch:
        """The same call on the CPU with plain logical tensors (what the float64 reference reads)."""
        return self._sample(**{n: self.logical(n, bases) for n in self.present()})

    def _sample(self, q, k, v, cu_seqlens_q, cu_seqlens_k, mask=None, bias=None) -> PackedBatch:
        s = self.shape
        return PackedBatch(
            q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=s.max_seqlen_q, max_seqlen_k=s.max_seqlen_k, mask=mask, bias=bias,
            softmax_scale=s.softmax_scale, is_causal=s.is_causal,
        )


def describe(sample: PackedBatch) -> str:
    lines = []
    for name, value in zip(ARG_NAMES, sample.args()):
        if isinstance(value, torch.Tensor):
            lines.append(
                f"  {name}: {tuple(value.shape)} {value.dtype} on {value.device}, strides {value.stride()}, "
                f"offset {value.storage_offset()}"
                + (f", values {value.tolist()}" if name.startswith("cu_seqlens") and value.numel() < 16
                   and value.device.type != "meta" else "")
            )
        else:
            lines.append(f"  {name}: {value!r}")
    return "\n".join(lines)


def call(sample: PackedBatch, path: str):
    if path == "api":
        return sample.run()
    return torch.ops.dmattn.varlen_fwd(*sample.args())


@st.composite
def drawn_calls(draw, device: str, *, broadcast_values=True) -> Drawn:
    """A valid call: shape, layouts and moderate values (scores stay far from overflow). Without
    ``broadcast_values`` only the mask may be a stride-0 broadcast (the extreme-value test edits q, k, v and bias
    entry by entry)."""
    shape = draw(shapes(device))
    huge_k = shape.max_seqlen_k in HUGE_MAX_SEQLEN
    plans = {}
    for name in TENSORS:
        if name in ("mask", "bias") and getattr(shape, name) is None:
            continue
        full = shape.full_shape(name)
        if name in ("q", "k", "v"):
            # One V row for every key (token stride 0) makes out = that row exactly, which PyTorch's float32 matmul
            # hits and a kernel's running float32 sum over a long sequence misses by more than the accuracy rule's
            # few-ulp atol: V is broadcast over tokens only in short sequences.
            short = max(shape.seqlens_k, default=0) <= 9
            can = ((0, 1) if name != "v" or short else (1,)) if broadcast_values else ()
            plans[name] = draw(view_plans(full, inner_contiguous=True, broadcastable=can))
        elif name.startswith("cu_seqlens"):
            plans[name] = draw(view_plans(full, inner_contiguous=True))
        else:
            # A query-side operand as wide as a huge max_seqlen_k exists only as a broadcast of one column.
            force = (2,) if len(full) == 3 and huge_k else ()
            can = range(len(full)) if broadcast_values or name == "mask" else ()
            plans[name] = draw(view_plans(full, broadcastable=can, force_broadcast=force))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    bases = _values(draw, shape, plans, gen)
    return Drawn(shape, plans, bases, draw(st.sampled_from(["api", "op"])))


def _values(draw, shape: Shape, plans: Dict[str, ViewPlan], gen) -> Dict[str, torch.Tensor]:
    """CPU bases. q and k are randn scaled by 2**a and 2**b with |a + b| <= 3 (or both tiny), so scores are
    moderate whatever the magnitudes; V by 2**c."""
    top = MAX_EXP[shape.dtype]

    def base(name):
        return plans[name].base_shape(shape.full_shape(name))

    def randn(name):
        return torch.randn(base(name), generator=gen)

    a = draw(st.integers(-top, top))
    if draw(st.booleans()):
        b = max(-top, min(top, -a + draw(st.integers(-3, 3))))
    else:  # both tiny: scores are 0 or subnormal
        a, b = draw(st.integers(-top, -top // 2)), draw(st.integers(-top, -top // 2))
    # One scale for all of V: keys of very different magnitudes make out a cancellation, which the accuracy rule
    # (a few ulps of out beyond PyTorch's own error) does not judge fairly.
    c = draw(st.integers(-top, top))
    bases = {
        "q": (randn("q") * 2.0**a).to(shape.dtype),
        "k": (randn("k") * 2.0**b).to(shape.dtype),
        "v": (randn("v") * 2.0**c).to(shape.dtype),
        "cu_seqlens_q": dmattn_ops.cu_seqlens(shape.seqlens_q),
        "cu_seqlens_k": dmattn_ops.cu_seqlens(shape.seqlens_k),
    }
    if shape.mask is not None:
        keep = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        true_bytes = torch.randint(1, 256, base("mask"), generator=gen) if draw(st.booleans()) else 1
        bases["mask"] = ((torch.rand(base("mask"), generator=gen) < keep) * true_bytes).to(torch.uint8)
    if shape.bias is not None:
        info = torch.finfo(shape.bias_dtype)
        bias = randn("bias") * 4
        for special in draw(st.sets(st.sampled_from([-INF, info.min, info.max, -(2.0**14)]))):
            bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.15, special)
        bases["bias"] = bias.to(shape.bias_dtype)
    return bases


# ---------------------------------------------------------------------------------------------------------------
# Valid calls: the reference, and invisibility of everything a row cannot see.


def _check_outputs(result, shape: Shape, device) -> None:
    out, lse = result
    assert out.shape == (shape.total_q, shape.heads, shape.head_dim) and out.dtype == shape.dtype
    assert lse.shape == (shape.heads, shape.total_q) and lse.dtype == torch.float32
    assert out.device.type == lse.device.type == torch.device(device).type
    assert out.is_contiguous() and lse.is_contiguous()


def _assert_identical(a, b, what: str) -> None:
    for name, x, y in (("out", a[0], b[0]), ("lse", a[1], b[1])):
        assert torch.equal(x, y), f"{name} differs {what}: max diff {(x.double() - y.double()).abs().max().item()}"


def _perturb_unseen(draw, drawn: Drawn, gen) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Bases with NaN / +-inf in unseen entries of q, k, v and bias, and random bytes in unused mask entries."""
    shape, bases = drawn.shape, dict(drawn.bases)
    free = free_entries(shape, visible(shape, drawn.logical("mask") if "mask" in bases else None))
    changes = []
    for name in ("q", "k", "v", "bias", "mask"):
        if name not in bases or not draw(st.booleans()):
            continue
        full = shape.full_shape(name)
        where = base_entries(free[name], bases[name].shape, full)
        where = where & (torch.rand(where.shape, generator=gen) < draw(st.sampled_from([0.3, 1.0])))
        if name == "mask":
            fill = torch.randint(0, 256, where.shape, generator=gen, dtype=torch.uint8)
            bases[name] = torch.where(where, fill, bases[name])
            changes.append(f"mask: {int(where.sum())} unused entries set to random bytes")
        else:
            fill = draw(st.sampled_from([math.nan, INF, -INF]))
            bases[name] = bases[name].masked_fill(where, fill)
            changes.append(f"{name}: {int(where.sum())} unseen entries set to {fill}")
    return bases, changes


def _draw_call(data, device: str, **options):
    """A valid call drawn for ``device`` (skipped where this build has no kernels): (drawn, its shape, its sample)."""
    _skip_without_kernels(device)
    drawn = data.draw(drawn_calls(device, **options), label="call")
    sample = drawn.sample(device)
    note(f"{drawn.path} call:\n{describe(sample)}")
    return drawn, drawn.shape, sample


@settings(max_examples=500)
@given(data=st.data())
def test_valid_calls_match_the_reference(device, data):
    drawn, shape, sample = _draw_call(data, device)
    result = call(sample, drawn.path)
    _check_outputs(result, shape, device)
    if shape.heads > 0:  # without query heads the outputs are empty, as _check_outputs saw
        ref = drawn.reference_sample()
        assert_close_to_reference(result, ref.reference(), ref.reference(shape.dtype))
    assert dmattn_ops.check_cu_seqlens(
        sample.cu_seqlens_q, sample.cu_seqlens_k, shape.total_q, shape.total_k, shape.max_seqlen_q,
        shape.max_seqlen_k,
    ) is None

    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="perturbation seed"))
    bases, changes = _perturb_unseen(data.draw, drawn, gen)
    if changes:
        note("perturbed: " + "; ".join(changes))
        perturbed = call(drawn.sample(device, bases), data.draw(st.sampled_from(["api", "op"]), label="path"))
        _assert_identical(result, perturbed, "when entries no row sees hold NaN / inf / other mask bytes")


@settings(max_examples=150)
@given(data=st.data())
def test_gradients_of_valid_calls_match_the_reference(device, data):
    """The backward (issue 14; on CUDA the blockwise one) on drawn valid calls: shapes, odd strides, broadcasts and layouts as drawn, values
    redrawn as plain randn (the drawn ones span 2^119, which the gradients of a float32 op cannot follow; extreme
    values are the forward's tests). q, k, v and a bias are differentiable functions of their base tensors; the
    gradients reaching those bases through the op and through the float64 reference (on the logical tensors) obey
    the forward's accuracy rule."""
    drawn, shape, _ = _draw_call(data, device)
    if shape.heads == 0 or (shape.bias is not None and shape.bias[0] == "query"
                            and shape.max_seqlen_k in HUGE_MAX_SEQLEN):
        return  # nothing to differentiate; or a dbias as wide as a huge max_seqlen_k, which cannot be allocated
    names = [n for n in ("q", "k", "v", "bias") if n in drawn.bases]
    weight_gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="loss seed"))
    for n in names:
        b = drawn.bases[n]
        drawn.bases[n] = torch.randn(b.shape, generator=weight_gen).to(b.dtype)
    w = torch.randn(shape.total_q, shape.heads, shape.head_dim, generator=weight_gen, dtype=torch.float64)

    def base_gradients(run, dtype=None):
        # The reference's bases in its dtype, the bias too: autograd sums a broadcast base's gradient in the base's
        # dtype, so a float32 bias expanded over 264 entries would round the float64 reference's dbias to float32.
        bases = {n: (t.to(dtype) if dtype is not None else t).detach().clone().requires_grad_()
                 if n in names else t for n, t in drawn.bases.items()}
        out = run(bases)
        loss = (out.double() * w.to(out.device)).sum().cpu() + sum(0.0 * bases[n].sum() for n in names)
        loss.backward()
        return {n: bases[n].grad for n in names}

    got = base_gradients(lambda bases: drawn.sample(device, bases).run()[0])

    def reference(dtype):
        def run(bases):
            return drawn.reference_sample(bases).reference(dtype)[0]
        return run

    want = base_gradients(reference(torch.float64), torch.float64)
    base = base_gradients(reference(shape.dtype))
    event(f"gradients checked: {', '.join(names)}")
    # Contributions summed into one base entry: the logical entries it is broadcast to, times the query heads that
    # read one head of k, v or the bias.
    terms = {n: drawn.logical(n).numel() // max(drawn.bases[n].numel(), 1)
             * (1 if n == "q" else shape.heads // drawn.logical(n).shape[1]) for n in names}
    assert_gradients_close(got, want, base, shape.dtype, terms)


# ---------------------------------------------------------------------------------------------------------------
# Extreme visible values, predicted row by row.

UNK, FIN, NEG, BAD = 0, 1, 2, 3  # score classes: undecided, finite, -inf, NaN or +inf


def score_classes(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float):
    """Per (query, key): the class of the float32 score s = scale * (q . k) + bias, and scale * (q . k) where
    finite. q (Lq, D), k (Lk, D), bias (Lq, Lk), all float64 holding the call's exact values.

    A dot product whose terms sum (in absolute value) to at most 2**100 is finite in any evaluation order; one whose
    terms share a sign and whose value is at least 2**130 overflows in any order. Anything between is undecided, and
    so is a product whose q factor the CPU's float32 softmax_scale * q turns into 0 or inf while its k factor is inf
    or 0 (NaN on the CPU, +-inf or 0 on CUDA)."""
    p = q[:, None, :] * k[None, :, :]  # (Lq, Lk, D)
    scaled = q.float() * torch.tensor(scale, dtype=torch.float32)  # what the CPU multiplies k by
    flushed = ((scaled == 0) & (q != 0))[:, None, :] & k.isinf()[None, :, :]
    blown = (scaled.isinf() & q.isfinite())[:, None, :] & (k == 0)[None, :, :]
    order_dependent = (flushed | blown).any(-1)
    pos_inf, neg_inf = (p == INF).any(-1), (p == -INF).any(-1)
    nan = p.isnan().any(-1) | (pos_inf & neg_inf)
    finite_p = p.nan_to_num(0.0, 0.0, 0.0)
    x = scale * finite_p.sum(-1)
    safe = finite_p.abs().sum(-1) * max(abs(scale), 1.0) <= 2.0**100
    one_signed = (finite_p >= 0).all(-1) | (finite_p <= 0).all(-1)
    cls = torch.full(x.shape, UNK, dtype=torch.int8)
    cls[safe] = FIN
    over = ~safe & one_signed & (x.abs() >= 2.0**130)
    cls[over & (x > 0)] = BAD
    cls[over & (x < 0)] = NEG
    inf_sign = (pos_inf.double() - neg_inf.double()) * math.copysign(1.0, scale)
    infinite = (pos_inf | neg_inf) & safe  # inf plus a safely finite rest
    cls[(pos_inf | neg_inf) & ~safe] = UNK
    cls[infinite & (inf_sign > 0)] = BAD
    cls[infinite & (inf_sign < 0)] = NEG
    cls[(pos_inf | neg_inf) & (scale == 0)] = BAD  # 0 * inf
    cls[nan] = BAD
    cls[order_dependent] = UNK
    # Adding the bias: +inf or NaN bias makes the score NaN or +inf; -inf bias gives -inf unless the product part
    # was NaN / +inf (NaN) or undecided.
    cls[bias.isnan() | (bias == INF)] = BAD
    cls[(bias == -INF) & (cls == FIN)] = NEG
    return cls, x


@dataclass
class Prediction:
    kind: str  # "nan" | "empty" | "same" | "uniform"
    nonfinite_cols: torch.Tensor  # (D,) bool: out must be non-finite (V non-finite at a key of weight > 0), or the
    # whole out row NaN
    free_cols: torch.Tensor  # (D,) bool: unspecified (V non-finite at a key of weight exactly 0)
    # V non-finite at a key of finite score but weight <= 2^-100: its columns are free, and the whole out row may be
    # NaN as for a weighted key (the kernel's weight, in float32 or rounded to q's dtype, may be nonzero)
    light_nonfinite: bool = False
    value: Optional[float] = None  # uniform: the bias c, which is also lse
    mean: Optional[torch.Tensor] = None  # uniform: (D,) float64 mean of the V rows of the finite keys
    sum_error: float = 0.0  # uniform: what float32 accumulation of those rows may be off by


def predict(shape: Shape, clean: Dict[str, torch.Tensor], final: Dict[str, torch.Tensor],
            vis: List[torch.Tensor]) -> Dict[Tuple[int, int], Prediction]:
    """What the contract says each (query row, head) gets, from the logical CPU tensors of the clean and the final
    call; rows it does not decide are left out."""
    H, Hk, D = shape.heads, shape.heads_k, shape.head_dim
    predictions = {}
    for (q0, q1, k0, k1), seq_vis in zip(shape.bounds(), vis):
        for h in range(H):
            g = h // (H // Hk)
            q = final["q"][q0:q1, h].double()
            k = final["k"][k0:k1, g].double()
            v = final["v"][k0:k1, g].double()
            bias = _dense_bias(shape, final.get("bias"), q0, q1, k0, k1, h)
            classes, x = score_classes(q, k, bias, shape.scale)
            classes[~seq_vis[h]] = -1  # hidden
            bad_v = ~v.isfinite()
            for iq in range(q1 - q0):
                row = classes[iq]
                if (row == BAD).any():
                    predictions[(q0 + iq, h)] = Prediction("nan", torch.zeros(D, dtype=torch.bool),
                                                           torch.ones(D, dtype=torch.bool))
                    continue
                if (row == UNK).any():
                    continue
                fin = row == FIN
                s = torch.where(fin, x[iq] + bias[iq], -INF)
                # Keys whose weight exp(s - max) is (nearly) 0 are unspecified for non-finite V, like -inf keys.
                weighty = (s - s.max()).exp() > 2.0**-100 if fin.any() else fin
                light = (row == NEG) | (fin & ~weighty)
                nonfinite = bad_v[weighty].any(0)
                pred = Prediction("empty", nonfinite, bad_v[light].any(0) & ~nonfinite,
                                  light_nonfinite=bool(bad_v[fin & ~weighty].any()))
                if fin.any():
                    keys = (row >= 0).nonzero().flatten().tolist()
                    fin_keys = fin.nonzero().flatten().tolist()
                    pred = _same_or_uniform(shape, clean, final, q0, k0, h, g, iq, keys, x, bias, fin_keys, pred)
                    if pred is None:
                        continue
                predictions[(q0 + iq, h)] = pred
    return predictions


def _dense_bias(shape: Shape, bias, q0, q1, k0, k1, h) -> torch.Tensor:
    """(Lq, Lk) float64 bias of head h in one sequence (0 without a bias)."""
    if bias is None:
        return torch.zeros(q1 - q0, k1 - k0, dtype=torch.float64)
    layout, hm = shape.bias
    head = h // (shape.heads // hm)
    if layout == "key":
        return bias[k0:k1, head].double()[None, :].expand(q1 - q0, -1)
    return bias[q0:q1, head, : k1 - k0].double()


def _same_or_uniform(shape, clean, final, q0, k0, h, g, iq, keys, x, bias, fin, pred):
    """A row with finite scores: "same" when none of its inputs changed, "uniform" when every finite score is one
    huge bias value c (scale * q.k far below c's ulp), else None (not judged here)."""
    i = q0 + iq
    keys_k = [k0 + j for j in keys]
    unchanged = torch.equal(clean["q"][i, h], final["q"][i, h]) and torch.equal(
        clean["k"][keys_k, g], final["k"][keys_k, g]
    )
    if unchanged and "bias" in final:
        unchanged = torch.equal(_row_bias(shape, clean["bias"], i, h, k0, keys),
                                _row_bias(shape, final["bias"], i, h, k0, keys))
    if unchanged:
        return replace(pred, kind="same")
    c = bias[iq, fin]
    if (c == c[0]).all() and abs(c[0].item()) >= 2.0**99 and (x[iq, fin].abs() <= 2.0**40).all():
        rows = final["v"][[k0 + j for j in fin], g].double()
        sum_error = len(fin) * torch.finfo(torch.float32).eps * rows.nan_to_num(0, 0, 0).abs().max().item()
        return replace(pred, kind="uniform", value=c[0].item(), mean=rows.mean(0), sum_error=sum_error)
    return None


def _row_bias(shape: Shape, bias: torch.Tensor, i, h, k0, keys) -> torch.Tensor:
    layout, hm = shape.bias
    head = h // (shape.heads // hm)
    return bias[[k0 + j for j in keys], head] if layout == "key" else bias[i, head, keys]


def check_predictions(result, clean_result, predictions, shape: Shape) -> None:
    out, lse = (t.cpu() for t in result)
    clean_out, clean_lse = (t.cpu() for t in clean_result)
    eps = torch.finfo(shape.dtype).eps
    for (i, h), p in predictions.items():
        where = f"row {i}, head {h} ({p.kind})"
        o, l = out[i, h], lse[h, i].item()
        if p.kind == "nan":
            assert o.isnan().all() and math.isnan(l), f"{where}: a visible score is NaN / +inf, got {o}, lse {l}"
            continue
        checked = ~p.nonfinite_cols & ~p.free_cols
        if p.nonfinite_cols.any():
            assert not o[p.nonfinite_cols].isfinite().any(), f"{where}: non-finite V of a weighted key, got {o}"
        if (p.nonfinite_cols.any() or p.light_nonfinite) and o.isnan().all():
            checked = torch.zeros_like(checked)  # also allowed: the whole out row NaN (CUDA, tiles hiding keys)
        if p.kind == "empty":
            assert l == -INF and (o[checked] == 0).all(), f"{where}: no finite visible score, got {o}, lse {l}"
        elif p.kind == "same":
            assert lse[h, i].item() == clean_lse[h, i].item(), f"{where}: lse {l} != {clean_lse[h, i].item()}"
            assert torch.equal(o[checked], clean_out[i, h][checked]), f"{where}: {o} != {clean_out[i, h]}"
        else:
            assert abs(l - p.value) <= 2.0**-20 * abs(p.value), f"{where}: lse {l}, expected {p.value}"
            want, got = p.mean[checked], o[checked].double()
            tol = 4 * eps * want.abs().max().item() + p.sum_error if want.numel() else 0.0
            assert ((got - want).abs() <= tol).all(), f"{where}: out {got} is not the mean of the visible V {want}"


@st.composite
def extreme_bases(draw, drawn: Drawn, vis, gen) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """The clean bases with extreme entries: q rows overflowing against a visible key, non-finite q / K / V / bias
    entries, and blocks of a huge bias shared by all keys of a (sequence, bias head)."""
    shape = drawn.shape
    bases = {n: t.clone() for n, t in drawn.bases.items()}
    changes = []
    top = math.frexp(torch.finfo(shape.dtype).max)[1] - 2  # largest power of two kept with margin
    # Every visible (row, head, key), as (h, i, key) rows of one tensor.
    pairs = [v.nonzero() + torch.tensor([0, q0, k0]) for (q0, q1, k0, k1), v in zip(shape.bounds(), vis)]
    pairs = torch.cat(pairs) if pairs else torch.zeros(0, 3, dtype=torch.int64)
    for _ in range(draw(st.integers(0, 2)) if len(pairs) else 0):
        h, i, key = pairs[draw(st.integers(0, len(pairs) - 1))].tolist()
        g = h // (shape.heads // shape.heads_k)
        k = bases["k"][key, g].double()
        total = k.abs().sum().item() * abs(shape.scale)
        if total == 0:
            continue
        exp = math.ceil(math.log2(2.0**131 / total))
        if exp > top:
            continue
        direction = draw(st.sampled_from([1.0, -1.0]))
        bases["q"][i, h] = (direction * 2.0**exp * k.sign()).to(shape.dtype)
        changes.append(f"q[{i}, {h}] = {direction:+.0f} * 2**{exp} * sign(k[{key}, {g}])")
    for name in ("q", "k", "v", "bias"):
        if name in bases and draw(st.integers(0, 2)) == 0:
            value = draw(st.sampled_from([math.nan, INF, -INF]))
            where = torch.rand(bases[name].shape, generator=gen) < draw(st.sampled_from([0.02, 0.1]))
            bases[name] = bases[name].masked_fill(where, value)
            changes.append(f"{name}: {int(where.sum())} entries set to {value}")
    if shape.bias is not None and shape.bias_dtype != torch.float16 and shape.seqlens_q:
        info = torch.finfo(shape.bias_dtype)
        for _ in range(draw(st.integers(0, 2))):
            b = draw(st.integers(0, len(shape.seqlens_q) - 1))
            hm = draw(st.integers(0, shape.bias[1] - 1)) if shape.bias[1] else None
            if hm is None:
                continue
            c = draw(st.sampled_from([info.min, info.max, -(2.0**100), 2.0**100]))
            q0, q1, k0, k1 = shape.bounds()[b]
            if shape.bias[0] == "key":
                bases["bias"][k0:k1, hm] = c
            else:
                bases["bias"][q0:q1, hm, : k1 - k0] = c
            changes.append(f"bias of sequence {b}, head {hm} = {c}")
    return bases, changes


@settings(max_examples=500)
@given(data=st.data())
def test_extreme_values_follow_the_contract(device, data):
    drawn, shape, sample = _draw_call(data, device, broadcast_values=False)
    clean_result = call(sample, drawn.path)
    vis = visible(shape, drawn.logical("mask") if shape.mask else None)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1), label="extreme seed"))
    bases, changes = data.draw(extreme_bases(drawn, vis, gen), label="extremes")
    note("extremes: " + "; ".join(changes))
    result = call(drawn.sample(device, bases), drawn.path)
    _check_outputs(result, shape, device)
    clean = {n: drawn.logical(n) for n in drawn.present()}
    final = {n: drawn.logical(n, bases) for n in drawn.present()}
    predictions = predict(shape, clean, final, vis)
    kinds = [p.kind for p in predictions.values()]
    note(f"predicted rows: {({k: kinds.count(k) for k in set(kinds)})} of {shape.total_q * shape.heads}")
    for kind in set(kinds):
        event(f"has {kind} rows")
    check_predictions(result, clean_result, predictions, shape)
    # Rows no sequence owns see nothing, whatever q holds.
    owned = sum(shape.seqlens_q)
    out, lse = (t.cpu() for t in result)
    assert (out[owned:] == 0).all() and (lse[:, owned:] == -INF).all()


# ---------------------------------------------------------------------------------------------------------------
# Invalid calls: exactly one thing wrong.


def _randn(shape, dtype, device):
    return torch.randn(shape).to(dtype).to(device)


def _filled(shape: Tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A stride-0 tensor of ``shape`` (ones): cheap at any size, e.g. a query-side operand as wide as 2**31."""
    return torch.ones((), dtype=dtype, device=device).expand(shape)


def _moved(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on another device; a huge stride-0 operand as a fresh stride-0 tensor instead of a copy."""
    return t.to(device) if t.numel() <= 2**20 else _filled(t.shape, t.dtype, device)


def corruptions(drawn: Drawn, sample: PackedBatch, device: str) -> Dict[str, Callable]:
    """The corruptions that apply to this call: name -> f(draw) returning (bad sample, path or None for the drawn
    one, expectation): "error", "data" (lying cu_seqlens / max_seqlen) or "error_or_empty"."""
    s = drawn.shape
    H, Hk, D, dtype, dev = s.heads, s.heads_k, s.head_dim, s.dtype, sample.device
    operands = [n for n in ("mask", "bias") if getattr(s, n) is not None]
    query_side = [n for n in operands if getattr(s, n)[0] == "query"]
    cu_names = st.sampled_from(["cu_seqlens_q", "cu_seqlens_k"])

    def error(**changes):
        return sample.replace(**changes), None, "error"

    def qkv_dtype(draw):
        wrong = draw(st.sampled_from([torch.float64, torch.int32, torch.bool, torch.uint8]))
        return error(q=sample.q.to(wrong), k=sample.k.to(wrong), v=sample.v.to(wrong))

    def k_or_v_dtype(draw):
        name = draw(st.sampled_from("kv"))
        wrong = draw(st.sampled_from([d for d in FLOAT_DTYPES if d != dtype]))
        return error(**{name: getattr(sample, name).to(wrong)})

    def qkv_rank(draw):
        name = draw(st.sampled_from("qkv"))
        t = getattr(sample, name)
        return error(**{name: t.unsqueeze(0) if draw(st.booleans()) else t.flatten(1)})

    def k_v_shapes_differ(draw):
        return error(v=_randn((s.total_k + 1, Hk, D), dtype, dev))

    def head_dims_differ(draw):
        return error(k=_randn((s.total_k, Hk, D + 1), dtype, dev), v=_randn((s.total_k, Hk, D + 1), dtype, dev))

    def heads_not_a_multiple(draw):
        hk = draw(st.sampled_from([0, H + 1]))
        return error(k=_randn((s.total_k, hk, D), dtype, dev), v=_randn((s.total_k, hk, D), dtype, dev))

    def no_query_and_no_kv_heads(draw):  # H = Hk = 0: H % Hk is undefined, so an error or an empty result
        bad = sample.replace(k=_randn((s.total_k, 0, D), dtype, dev), v=_randn((s.total_k, 0, D), dtype, dev),
                             mask=None, bias=None)
        return bad, None, "error_or_empty"

    def strided_head_dim(draw):
        name = draw(st.sampled_from("qkv"))
        t = getattr(sample, name)
        wide = torch.zeros(*t.shape[:2], 2 * D, dtype=dtype, device=dev)
        wide[..., ::2] = t
        return error(**{name: wide[..., ::2]})

    def cu_seqlens_dtype(draw):
        name = draw(cu_names)
        return error(**{name: getattr(sample, name).to(draw(st.sampled_from([torch.int64, torch.float32,
                                                                              torch.int16])))})

    def cu_seqlens_rank_or_empty(draw):
        name = draw(cu_names)
        t = getattr(sample, name)
        return error(**{name: t.unsqueeze(0) if draw(st.booleans()) else t[:0]})

    def cu_seqlens_lengths_differ(draw):
        return error(cu_seqlens_k=torch.cat([sample.cu_seqlens_k, sample.cu_seqlens_k[-1:]]))

    def cu_seqlens_strided(draw):
        name = draw(cu_names)
        t = getattr(sample, name)
        wide = torch.zeros(2 * t.shape[0], dtype=torch.int32, device=dev)
        wide[::2] = t
        return error(**{name: wide[::2]})

    def one_tensor_on_another_device(draw):
        name = draw(st.sampled_from([n for n in TENSORS if getattr(sample, n) is not None]))
        return error(**{name: _moved(getattr(sample, name), "meta" if device == "cpu" else "cpu")})

    def negative_max_seqlen(draw):
        return error(**{draw(st.sampled_from(["max_seqlen_q", "max_seqlen_k"])): draw(st.sampled_from([-1, -2**40]))})

    def operand_shape(name):
        return sample.mask.shape if name == "mask" and sample.mask is not None else (
            sample.bias.shape if name == "bias" and sample.bias is not None else (s.total_k, 1))

    def mask_dtype(draw):
        wrong = draw(st.sampled_from([torch.uint8, torch.float32, torch.int32]))
        return error(mask=_filled(operand_shape("mask"), wrong, dev))

    def bias_dtype(draw):
        wrong = [torch.float64, torch.int64, torch.bool] + [d for d in (torch.float16, torch.bfloat16) if d != dtype]
        return error(bias=_filled(operand_shape("bias"), draw(st.sampled_from(wrong)), dev))

    def operand_rank(draw):  # rank 1 or 4: neither layout
        name = draw(st.sampled_from(operands))
        t = getattr(sample, name)
        rank1 = _filled(t.shape[:1], t.dtype, dev)
        return error(**{name: rank1 if draw(st.booleans()) else t[(None,) * (4 - t.dim())]})

    def reshaped(name, shape):
        return error(**{name: _filled(shape, getattr(sample, name).dtype, dev)})

    def operand_rows(draw):
        name = draw(st.sampled_from(operands))
        t = getattr(sample, name)
        return reshaped(name, (t.shape[0] + 1,) + t.shape[1:])

    def operand_heads(draw):
        name = draw(st.sampled_from(operands))
        t = getattr(sample, name)
        return reshaped(name, (t.shape[0], min(n for n in range(2, 10) if n not in (Hk, H))) + t.shape[2:])

    def query_side_width(draw):
        name = draw(st.sampled_from(query_side))
        t = getattr(sample, name)
        return reshaped(name, t.shape[:2] + (s.max_seqlen_k + draw(st.sampled_from([1, -1] if s.max_seqlen_k
                                                                                      else [1])),))

    def softmax_scale(draw):  # not finite as a float32
        return error(softmax_scale=draw(st.sampled_from([INF, -INF, math.nan, 1e39, -1e39, 3.5e38])))

    def lying_cu_seqlens(draw):
        return _lying(draw, s, sample), None, "data"

    def python_type(draw):  # the raw op's arguments are parsed by torch (RuntimeError), so the public API only
        return _python_type(draw, sample), "api", "error"

    def not_built_for_cuda(draw):
        if draw(st.booleans()):
            return error(q=sample.q.float(), k=sample.k.float(), v=sample.v.float())
        wide = max(dmattn_ops.build_info()["cuda_head_dims"]) + 8
        return error(q=_randn((s.total_q, H, wide), dtype, dev), k=_randn((s.total_k, Hk, wide), dtype, dev),
                     v=_randn((s.total_k, Hk, wide), dtype, dev))

    found = [qkv_dtype, k_or_v_dtype, qkv_rank, k_v_shapes_differ, head_dims_differ, cu_seqlens_dtype,
             cu_seqlens_rank_or_empty, cu_seqlens_lengths_differ, one_tensor_on_another_device,
             negative_max_seqlen, mask_dtype, bias_dtype, softmax_scale, lying_cu_seqlens, python_type]
    found.append(heads_not_a_multiple if H > 0 else no_query_and_no_kv_heads)
    found += [strided_head_dim] if D > 1 else []
    found += [cu_seqlens_strided] if s.seqlens_q else []
    found += [operand_rank, operand_rows, operand_heads] if operands else []
    found += [query_side_width] if query_side and s.max_seqlen_k not in HUGE_MAX_SEQLEN else []
    found += [not_built_for_cuda] if device != "cpu" else []
    return {f.__name__: f for f in found}


def _lying(draw, s: Shape, sample: PackedBatch) -> PackedBatch:
    """cu_seqlens not starting at 0, decreasing, past the total, or a sequence longer than its max_seqlen."""
    side = draw(st.sampled_from(["q", "k"]))
    name, total = f"cu_seqlens_{side}", s.total_q if side == "q" else s.total_k
    cu = getattr(sample, name).cpu().tolist()
    lengths = s.seqlens_q if side == "q" else s.seqlens_k
    kinds = ["first_not_0"] + (["decreasing", "past_total"] if lengths else [])
    kinds += ["longer_than_max"] if max(lengths, default=0) > 0 else []
    kind = draw(st.sampled_from(kinds))
    if kind == "longer_than_max":
        return sample.replace(**{f"max_seqlen_{side}": max(lengths) - 1})
    if kind == "first_not_0":
        cu[0] = draw(st.sampled_from([1, -1]))
    elif kind == "decreasing":
        cu[1] = -1
    else:
        cu[-1] = total + draw(st.sampled_from([1, 2**30]))
    return sample.replace(**{name: torch.tensor(cu, dtype=torch.int32, device=sample.device)})


def _python_type(draw, sample: PackedBatch) -> PackedBatch:
    """One argument of a wrong Python type (lists, strings, None, floats for ints)."""
    name = draw(st.sampled_from(ARG_NAMES))
    value = getattr(sample, name)
    if isinstance(value, torch.Tensor):
        as_list = [value.tolist()] if value.numel() <= 2**10 else []
        bad = draw(st.sampled_from(as_list + ["tensor", 1.0] + ([None] if name not in ("mask", "bias") else [])))
    elif name in ("mask", "bias"):
        bad = draw(st.sampled_from([[[True]], "mask", 1.0]))
    elif name.startswith("max_seqlen"):
        bad = draw(st.sampled_from([float(value), str(value), None]))
    elif name == "softmax_scale":
        bad = draw(st.sampled_from(["0.5", [0.5], 1j]))
    else:
        bad = draw(st.sampled_from(["yes", [True]]))
    return sample.replace(**{name: bad})


def _outcome(fn):
    try:
        return fn(), None
    except Exception as err:  # noqa: BLE001 (the oracle judges the exception's type and message)
        return None, err


def _assert_clear_error(err: Optional[BaseException]) -> None:
    assert err is not None, "the call succeeded"
    assert type(err) in (TypeError, ValueError) and str(err).startswith(PREFIX), (
        f"expected a TypeError / ValueError starting with {PREFIX!r}, got {type(err).__name__}: {err}"
    )


@settings(max_examples=600)
@given(data=st.data())
def test_invalid_calls_raise_clear_errors(device, data):
    _skip_without_kernels(device)
    drawn = data.draw(drawn_calls(device), label="valid call")
    sample = drawn.sample(device)
    options = corruptions(drawn, sample, device)
    name = data.draw(st.sampled_from(sorted(options)), label="corruption")
    bad, path, expect = options[name](data.draw)
    event(name)
    path = path or drawn.path
    note(f"{name}, {path} call:\n{describe(bad)}")
    result, err = _outcome(lambda: call(bad, path))
    if expect == "error":
        _assert_clear_error(err)
    elif expect == "error_or_empty":
        if err is not None:
            _assert_clear_error(err)
        else:
            _check_outputs(result, replace(drawn.shape, heads_k=0), device)
    elif device == "cpu" or err is not None:  # lying cu_seqlens / max_seqlen
        _assert_clear_error(err)
    else:
        out, lse = result
        assert out.isnan().all() and lse.isnan().all(), "CUDA with lying cu_seqlens: out and lse must be all NaN"
    if expect == "data":  # the synchronous check finds what CUDA reports only as NaN
        err = _outcome(lambda: dmattn_ops.check_cu_seqlens(bad.cu_seqlens_q, bad.cu_seqlens_k, bad.q.shape[0],
                                                           bad.k.shape[0], bad.max_seqlen_q, bad.max_seqlen_k))[1]
        _assert_clear_error(err)
        assert isinstance(err, ValueError), err


# ---------------------------------------------------------------------------------------------------------------
# Sizes past int32 (cheap as tensors with no elements) and past the CUDA grid.


@pytest.mark.parametrize("path", ["api", "op"])
@pytest.mark.parametrize("size", [2**31, 2**32 + 2])
@pytest.mark.parametrize("dim", ["H", "Hk", "D"])
def test_sizes_past_int32_are_rejected(dim, size, path, device):
    """H, Hk or D past int32 (2**32 + 2 wraps to a plausible 2) with zero tokens: a clear error, not a wrapped
    size."""
    _skip_without_kernels(device)
    dtype = _supported(device)[0][0]
    H, Hk, D = {"H": (size, 2, 8), "Hk": (0, size, 8), "D": (2, 2, size)}[dim]
    total_k = 3 if dim == "H" else 0
    sample = PackedBatch(
        q=torch.empty(0, H, D, dtype=dtype, device=device),
        k=torch.zeros(total_k, Hk, D, dtype=dtype, device=device),
        v=torch.zeros(total_k, Hk, D, dtype=dtype, device=device),
        cu_seqlens_q=dmattn_ops.cu_seqlens([0], device=device),
        cu_seqlens_k=dmattn_ops.cu_seqlens([total_k], device=device), max_seqlen_q=0, max_seqlen_k=total_k,
    )
    _assert_clear_error(_outcome(lambda: call(sample, path))[1])


@pytest.mark.parametrize("heads", [65535, 65536])
def test_many_heads(heads, device):
    """Query heads as a stride-0 broadcast of one head (MQA): the CPU runs any count; CUDA runs up to 65535 (its
    grid) and rejects more with a clear error."""
    _skip_without_kernels(device)
    dtype = _supported(device)[0][0]
    gen = torch.Generator().manual_seed(0)
    one = PackedBatch(
        q=torch.randn(5, 1, 8, generator=gen).to(dtype), k=torch.randn(7, 1, 8, generator=gen).to(dtype),
        v=torch.randn(7, 1, 8, generator=gen).to(dtype), cu_seqlens_q=dmattn_ops.cu_seqlens([3, 2]),
        cu_seqlens_k=dmattn_ops.cu_seqlens([4, 3]), max_seqlen_q=3, max_seqlen_k=4, is_causal=True,
    )
    many = one.replace(**{n: getattr(one, n).to(device) for n in ("k", "v", "cu_seqlens_q", "cu_seqlens_k")},
                       q=one.q.to(device).expand(5, heads, 8))
    result, err = _outcome(many.run)
    if device != "cpu" and heads > 65535:
        _assert_clear_error(err)
        return
    assert err is None, err

    def every_head(ref):  # the one-head reference, for each of the identical heads
        return ref[0].expand(5, heads, 8), ref[1].expand(heads, 5)

    assert_close_to_reference(result, every_head(one.reference()), every_head(one.reference(dtype)))
