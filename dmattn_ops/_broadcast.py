"""Evaluating a mask_mod (or a score_mod's additive part) on broadcast index grids, in eager mode.

``dmattn_ops.mods`` evaluates a mod under nested ``torch.vmap``: exact for every mod FlexAttention accepts, and traced
away by ``torch.compile``, but in eager mode each op of the mod runs through the batching rules of every vmap level,
and the grid around it costs dozens of small ops. On a GPU that made ``create_mask`` 3-17x slower than the same mask
written as a tensor expression (run DO). Called on broadcast grids instead (``b``, ``q_idx`` of shape (rows, 1, 1),
``h`` (1, H, 1), ``kv_idx`` (1, 1, W)), the mod *is* that tensor expression.

The two evaluations agree exactly when the mod is elementwise in its index arguments. ``_Elementwise``, a
TorchFunctionMode, watches every op that touches a tensor computed from the grids ("derived") and allows only:

- elementwise ops whose other tensor operands are 0-d, so that every derived tensor is a broadcast of the grids;
- reading a tensor the mod closes over at derived indices (``t[i]``, ``t[i, j]``; the result's extra dimensions, if
  ``t`` has more than it is indexed by, fail the caller's shape check);
- new tensors shaped like a derived one or given a size (``zeros_like``, ``new_ones``), and dtype / device reads.

Anything else that touches a derived tensor (a reduction, a shape read, slicing, indexing a derived tensor as in
``t[i][j]``, an in-place op, bool-mask indexing) raises ``NotElementwise`` before it runs, and the caller evaluates
under vmap instead: an unusual mod costs the slower path, never a wrong value. Ops on tensors the grids do not reach
run freely (what they compute is the same under vmap).

The mode also records which indices reach an op that reads memory or can fail at a value (indexing, integer division
and remainder, powers; not a division by a nonzero Python number, nor a power to a float or non-negative int one).
Only where kv_idx does must key positions past a sequence's end be clamped into it before the mod sees them, a pass
over the whole grid: a sliding window reads nothing at a position, a prefix-LM reads its per-sequence prefix at b
alone, and a block mask's `kv_idx // 128` cannot fail, so none of their grids needs the clamp.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple, Optional

import torch
from torch.overrides import TorchFunctionMode


class NotElementwise(Exception):
    """An op the broadcast evaluation cannot vouch for; the caller falls back to vmap."""


# Elementwise ops defined for every value: their result at an entry depends on that entry's operands only.
_TOTAL_NAMES = """
    add __add__ __radd__ sub __sub__ __rsub__ rsub subtract mul __mul__ __rmul__ multiply neg __neg__ negative
    abs __abs__ absolute sign sgn square
    eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ greater less greater_equal less_equal not_equal
    bitwise_and bitwise_or bitwise_xor bitwise_not __and__ __or__ __xor__ __rand__ __ror__ __rxor__ __invert__
    logical_and logical_or logical_xor logical_not __lshift__ __rshift__ bitwise_left_shift bitwise_right_shift
    where minimum maximum fmin fmax clamp clamp_min clamp_max clip masked_fill
    to type type_as long int short bool float double half bfloat16 as_tensor contiguous clone detach
    zeros_like ones_like full_like
    true_divide __truediv__ __rtruediv__ exp exp2 expm1 log log2 log10 log1p sqrt rsqrt reciprocal sigmoid tanh
    sin cos floor ceil round trunc
"""
# Elementwise ops that read memory at a value or can fail at some values (an int divided by zero): positions past a
# sequence's keys must be clamped into it first. (div and divide: either, by their rounding_mode.)
_PARTIAL_NAMES = """
    floor_divide __floordiv__ __rfloordiv__ remainder __mod__ __rmod__ fmod pow __pow__ __rpow__ float_power take
"""
# Creation from a tensor's dtype and device, at a size given explicitly: the result is not derived.
_CREATE_NAMES = "new_ones new_zeros new_full new_tensor new_empty"
# Properties that do not describe a derived tensor's shape.
_ATTRIBUTE_NAMES = "dtype device is_cuda layout requires_grad"

_TOTAL, _PARTIAL, _DIV, _CREATE, _INDEX, _ATTRIBUTE = range(6)

# Of those, the ones whose first operand is the dividend (or the base): by a Python number that cannot make them fail
# (a nonzero divisor; a float or non-negative int exponent) they are total, as `kv_idx // 128` in a block mask is.
_DIVIDEND_FIRST_NAMES = "floor_divide __floordiv__ remainder __mod__ fmod div divide"
_BASE_FIRST_NAMES = "pow __pow__ float_power"


def _kinds() -> dict:
    """The functions __torch_function__ receives for those names (Tensor methods and torch functions), each mapped to
    its kind: one dict lookup per op, where reading each function's name took string work."""
    kinds = {}
    for kind, names in ((_TOTAL, _TOTAL_NAMES), (_PARTIAL, _PARTIAL_NAMES), (_CREATE, _CREATE_NAMES),
                        (_DIV, "div divide")):
        for name in names.split():
            for owner in (torch.Tensor, torch):
                func = getattr(owner, name, None)
                if callable(func):
                    kinds[func] = kind
    kinds[torch.Tensor.__getitem__] = _INDEX
    for name in _ATTRIBUTE_NAMES.split():
        kinds[getattr(torch.Tensor, name).__get__] = _ATTRIBUTE
    return kinds


_KIND = _kinds()


def _functions(names: str) -> frozenset:
    return frozenset(f for name in names.split() for owner in (torch.Tensor, torch)
                     if callable(f := getattr(owner, name, None)))


_DIVIDEND_FIRST, _BASE_FIRST = _functions(_DIVIDEND_FIRST_NAMES), _functions(_BASE_FIRST_NAMES)


def _by_safe_number(func, args, kwargs) -> bool:
    """func(x, c), c a Python number with which it cannot fail: an integer division or remainder by a nonzero c, a
    power to a float or a non-negative int c. (x is then the one derived operand.)"""
    c = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("exponent"))
    if type(c) is not int and type(c) is not float:  # bool and tensors excluded
        return False
    if func in _DIVIDEND_FIRST:
        return c != 0
    return func in _BASE_FIRST and (type(c) is float or c >= 0)


def _leaves(x, out: list) -> list:
    """The non-container values of x (nested tuples, lists and dicts), appended to out. torch's pytree would do,
    at ten times the cost per op (measured: the guard's overhead is most of a small build's)."""
    if isinstance(x, (tuple, list)):
        for y in x:
            _leaves(y, out)
    elif isinstance(x, dict):
        for y in x.values():
            _leaves(y, out)
    else:
        out.append(x)
    return out


class _Elementwise(TorchFunctionMode):
    """The guard described in the module docstring, for grids given as (b, h, q_idx, kv_idx). It tracks, per derived
    tensor, which grids reach it (bits 1, 2, 4, 8). ``reads``: the union of those bits over the operands of every op
    of _PARTIAL and every index read that ran."""

    def __init__(self, grids, clamped_keys=None):
        super().__init__()
        # None, or a callable giving the key positions clamped into the sequence (probe_while_building)
        self._clamped_keys, self._clamped = clamped_keys, None
        # id -> (a weak reference, bits): a derived tensor is freed as soon as the mod drops it (on a build's own
        # grids, intermediates of the grid's size), and a new tensor that reuses a freed one's id is not taken for it
        self._sources = {}
        for bit, t in enumerate(grids):
            self._mark(t, self.sources(t) | (1 << bit))
        self.reads = 0

    def _mark(self, x: torch.Tensor, bits: int):
        self._sources[id(x)] = (weakref.ref(x), bits)

    def sources(self, x) -> int:
        """The grids reaching x, as bits (0: x is not derived)."""
        entry = self._sources.get(id(x)) if isinstance(x, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is x else 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # The operands' grids, and whether a tensor the grids do not reach, of more than one value, is among them.
        # (Every op of the mod passes here, and of a small build's time this loop was the largest part: it is kept
        # to plain dict and isinstance work.)
        leaves = args if not kwargs else args + tuple(kwargs.values())
        if any(isinstance(x, (tuple, list, dict)) for x in leaves):
            leaves = _leaves(leaves, [])
        sources, wide = 0, False
        for x in leaves:
            if isinstance(x, torch.Tensor):
                entry = self._sources.get(id(x))
                bits = entry[1] if entry is not None and entry[0]() is x else 0
                sources |= bits
                wide = wide or (not bits and x.dim() != 0)
        if not sources:
            return func(*args, **kwargs)
        kind = _KIND.get(func)
        if kind == _ATTRIBUTE or kind == _CREATE:
            return func(*args, **kwargs)
        if kind == _INDEX:
            self._check_index(args)
            self.reads |= sources
            if sources & _KEYS and self._clamped_keys is not None:
                args = (args[0], self._at_clamped_keys(args[1]))
        elif kind == _TOTAL or kind == _PARTIAL or kind == _DIV:
            if wide:
                raise NotElementwise("an elementwise op combines an index tensor with a tensor of several values")
            if (kind == _PARTIAL or (kind == _DIV and kwargs.get("rounding_mode") is not None)) and \
                    not _by_safe_number(func, args, kwargs):
                self.reads |= sources
                if sources & _KEYS and self._clamped_keys is not None:
                    args = self._at_clamped_keys(args)
                    kwargs = {k: self._at_clamped_keys(v) for k, v in kwargs.items()}
        else:
            raise NotElementwise(func)  # not elementwise, or not known to be
        out = func(*args, **kwargs)
        for x in (out,) if isinstance(out, torch.Tensor) else _leaves(out, []):
            if isinstance(x, torch.Tensor):
                self._mark(x, self.sources(x) | sources)
        return out

    def _at_clamped_keys(self, x):
        """x (a tensor, or a tuple of an index's parts) with each operand kv_idx reaches taken at the clamped key
        positions: gathered along the key dimension (2) at them. The ops the guard admits are elementwise, so such
        an operand's entry at key position j depends on kv_idx[j] alone, and the gathered entry at j is the one the
        mod would have computed from the clamped position: the same at every position inside the sequence, and an
        in-bounds read past it (a don't-care entry)."""
        if isinstance(x, tuple):
            return tuple(self._at_clamped_keys(y) for y in x)
        bits = self.sources(x)
        if not bits & _KEYS:
            return x
        if self._clamped is None:
            self._clamped = self._clamped_keys()
        if x.dim() < 3 or x.shape[2] != self._clamped.shape[0]:
            raise NotElementwise("a key-dependent operand without the key dimension")
        out = x.index_select(2, self._clamped)
        self._mark(out, bits)
        return out

    def _check_index(self, args):
        """t[i] / t[i, j, ...]: t not derived, every index a non-bool tensor or an int, one of them derived."""
        if len(args) != 2 or self.sources(args[0]) or not isinstance(args[0], torch.Tensor):
            raise NotElementwise("indexes an index tensor")
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        for i in index:
            if isinstance(i, torch.Tensor):
                if i.dtype == torch.bool or i.dtype == torch.uint8:
                    raise NotElementwise("indexes with a boolean mask")
                if not self.sources(i) and i.dim() != 0:
                    raise NotElementwise("indexes with a tensor of more than one element")
            elif type(i) is not int:
                raise NotElementwise("indexes with something other than a tensor or an int")


class Probe(NamedTuple):
    """What one broadcast evaluation on a small grid tells about a mod."""

    dims: tuple  # (batch, head, query, key): whether each index reaches the output
    dtype: torch.dtype  # the output's
    reads_rows: bool  # an op reads memory at (or may fail for) a value reached by b or q_idx: rows need valid ones
    reads_keys: bool  # the same for kv_idx: key positions past a sequence's end must be clamped into it


# Distinct sizes for the probe's four grid dimensions: a result of another shape (an indexed tensor's own dimensions)
# shows as one that does not broadcast to them.
_PROBE_SIZES = (2, 3, 5, 7)
_ROWS, _KEYS = 0b0101, 0b1000  # the bits of b and q_idx, of kv_idx (h is always a valid head)


def probe(mod, b: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> Optional[Probe]:
    """mod evaluated on copies of one valid position (0-d int64 b, q_idx, kv_idx; head 0), each index along a
    dimension of its own; None when mod is not elementwise (or fails, or returns something other than a tensor).
    The copies are stride-0 views: they cost no copy."""
    grids = []
    for d, (x, n) in enumerate(zip((b, q_idx, q_idx, kv_idx), _PROBE_SIZES)):  # head 0: a view of q_idx's 0
        shape = [1, 1, 1, 1]
        shape[d] = n
        grids.append(x.expand(shape))  # 0-d: expand adds the leading dimensions
    return probe_while_building(mod, *grids, _PROBE_SIZES)[0]


def broadcast_of(out: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """out viewed with len(shape) dimensions, where its shape broadcasts to shape with each size 1 or shape's own;
    else None. (More dimensions than shape: an indexed tensor's own, t[i] of a 2-d t.)"""
    if out.dim() > len(shape):
        return None
    sizes = (1,) * (len(shape) - out.dim()) + tuple(out.shape)
    if not all(s in (1, n) for s, n in zip(sizes, shape)):
        return None
    return out if out.dim() == len(shape) else out.view(sizes)


def probe_while_building(mod, b, h, q_idx, kv_idx, shape, clamped_keys=None) -> tuple:
    """(Probe, mod's result viewed with len(shape) dimensions) from one guarded evaluation on the build's own grids,
    or (None, None) where the guard cannot vouch for the mod (or its result is not a broadcast of shape). The probe's
    record comes from the guard, not from sizes: an index reaches the output where the guard saw it flow there (the
    same indices as the probe's sizes show, since every op it admits broadcasts its operands), so the grids may share
    sizes. They must be distinct tensor objects (views will do): the guard tells them apart by identity.

    clamped_keys: kv_idx is (1, 1, W) and holds positions past a sequence's keys (their entries don't-care);
    clamped_keys() gives the W positions clamped into the sequence. It is called at the first op that would read
    memory, or could fail, at a value kv_idx reaches, and that op's key-dependent operands are taken at those
    positions (_Elementwise._at_clamped_keys). A mod that reads nothing at its key positions (a window, a prefix-LM)
    is then built without the clamp's ops, and one that does pays them once, with a gather of a (1, 1, W) index."""
    guard = _Elementwise((b, h, q_idx, kv_idx), clamped_keys)
    out = _run(mod, (b, h, q_idx, kv_idx), guard)
    reach = guard.sources(out)  # of the result itself: broadcast_of may return a view, a tensor the guard never saw
    out = None if out is None else broadcast_of(out, shape)
    if out is None:
        return None, None
    return Probe(tuple(bool(reach & (1 << d)) for d in range(4)), out.dtype, bool(guard.reads & _ROWS),
                 bool(guard.reads & _KEYS)), out


def _run(mod, grids, guard: Optional[_Elementwise]) -> Optional[torch.Tensor]:
    """mod(*grids) under guard (if any); None where the guard refused an op, the mod raised, or its result is not a
    tensor, or, guarded, a tensor of several values the grids do not reach (a closure's own)."""
    try:
        with guard if guard is not None else contextlib.nullcontext():
            out = mod(*grids)
    except Exception:  # noqa: BLE001 - any failure: vmap evaluates it and raises what it raises there
        return None
    if not isinstance(out, torch.Tensor) or (guard is not None and out.dim() != 0 and not guard.sources(out)):
        return None
    return out


def evaluate(mod, b, h, q_idx, kv_idx) -> Optional[torch.Tensor]:
    """mod(b, h, q_idx, kv_idx) on broadcast grids with no guard, or None when it raises or returns something other
    than a tensor: for a mod the probe has vouched for, on the grids of the build itself. The probe ran the same mod
    under the guard, which refuses every op whose path could differ on grids of another shape or value (a shape read,
    bool() or item() of a derived tensor, a reduction), so the build's grid runs the ops the guard saw. Unguarded,
    those ops cost no Python of ours: on a GPU a small build is the host's time to issue its ops (run DY; run EB:
    8-12% less of it)."""
    return _run(mod, (b, h, q_idx, kv_idx), None)
