"""Proving a mask_mod one interval of key positions per query from its expression, so that ``varlen_attention`` runs
it as the op's ``key_range`` (8 bytes a query, key tiles outside the interval skipped) instead of building a
``(total_q, 1, max_seqlen_k)`` mask.

The mod is called once on symbolic indices: ``q_idx`` and ``kv_idx`` become affine forms ``a q + k kv + c + sum of
t[b]`` over the integers, where each ``t[b]`` is a 1-D integer tensor the mod reads at its sequence (a per-sequence
offset or length: ``b`` is symbolic too, and indexing a tensor with it is the one use it allows); ``h`` fails on any
use. Adding, subtracting and multiplying by integers keeps a form affine; comparing two forms gives a condition
``form <= 0``, ``form < 0`` or ``form == 0``; ``&`` conjoins conditions and ``~`` negates a single one. Anything else
fails: a read of a tensor at a position (a gate), a torch function, ``|``, ``!=``, a float, Python control flow on a
condition (``if``, ``and``, ``or``). Then the mod is not proven and takes the mask path, as before. A sliding window
``(kv_idx <= q_idx) & (q_idx - kv_idx < W)``, a causal mask with an offset or a band is proven, bottom-right aligned
ones too (``kv_idx <= q_idx + len_k[b] - len_q[b]``); a prefix-LM, an OR, is not (its constructor,
``dmattn_ops.prefix_lm``, is an interval by construction).

A conjunction of conditions in which ``kv_idx`` has coefficient 1, -1 or 0 shows each query one interval of keys:
each condition bounds ``kv_idx`` above or below by an affine function of ``q_idx`` (or holds for the whole row), so
the interval is ``[max of the lower bounds, min of the upper bounds]``, clipped to the row's sequence. Other
coefficients are not proven (an interval still, but rounding a bound is not worth its tests).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class _Unproven(Exception):
    """The expression left what this module can prove."""


def _fail(*args, **kwargs):
    raise _Unproven


class _Opaque:
    """h (and b outside a tensor read): any use fails (a mod depending on it is not proven)."""

    __slots__ = ()
    __getattr__ = __getitem__ = __index__ = __int__ = __bool__ = __call__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __floordiv__ = __mod__ = _fail
    __lt__ = __le__ = __gt__ = __ge__ = __eq__ = __ne__ = __and__ = __rand__ = __or__ = __ror__ = _fail
    __hash__ = None


class _Sequence(_Opaque):
    """b: a 1-D integer tensor read at it, ``t[b]``, is a per-sequence term of a form (torch hands the read to this
    class's __torch_function__); any other use fails."""

    __slots__ = ()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is not torch.Tensor.__getitem__ or len(args) != 2 or not isinstance(args[1], _Sequence):
            raise _Unproven
        t = args[0]
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype.is_complex or \
                t.dtype == torch.bool:
            raise _Unproven
        return _Form(_Affine(0, 0, 0, ((t, 1),)))


class _Affine(NamedTuple):
    """a q_idx + k kv_idx + c + the sum of coefficient x t[b] over terms ((t, coefficient), ...)."""

    a: int
    k: int
    c: int
    terms: tuple = ()

    def times(self, n: int) -> "_Affine":
        return _Affine(self.a * n, self.k * n, self.c * n, tuple((t, m * n) for t, m in self.terms))

    def plus(self, o: "_Affine") -> "_Affine":
        return _Affine(self.a + o.a, self.k + o.k, self.c + o.c, self.terms + o.terms)


def _affine(x) -> _Affine:
    if isinstance(x, _Form):
        return x.f
    if type(x) is int:
        return _Affine(0, 0, x)
    raise _Unproven


class _Form:
    """q_idx, kv_idx and integer arithmetic on them."""

    __slots__ = ("f",)

    def __init__(self, f: _Affine):
        self.f = f

    def __add__(self, other):
        return _Form(self.f.plus(_affine(other)))

    __radd__ = __add__

    def __neg__(self):
        return _Form(self.f.times(-1))

    def __sub__(self, other):
        return self + (-_Form(_affine(other)))

    def __rsub__(self, other):
        return _Form(_affine(other)) - self

    def __mul__(self, other):
        if type(other) is not int:
            raise _Unproven
        return _Form(self.f.times(other))

    __rmul__ = __mul__

    # self OP other, as (self - other) OP 0, or (other - self) for > and >=
    def __le__(self, other):
        return _Conditions((("le", (self - other).f),))

    def __lt__(self, other):
        return _Conditions((("lt", (self - other).f),))

    def __ge__(self, other):
        return _Conditions((("le", (_Form(_affine(other)) - self).f),))

    def __gt__(self, other):
        return _Conditions((("lt", (_Form(_affine(other)) - self).f),))

    def __eq__(self, other):
        return _Conditions((("eq", (self - other).f),))

    __ne__ = __bool__ = __index__ = __int__ = __getattr__ = __truediv__ = __floordiv__ = __mod__ = _fail
    __hash__ = None


class _Conditions:
    """A conjunction of conditions (kind, form): form <= 0 ("le"), < 0 ("lt") or == 0 ("eq")."""

    __slots__ = ("atoms",)

    def __init__(self, atoms: tuple):
        self.atoms = atoms

    def __and__(self, other):
        if isinstance(other, _Conditions):
            return _Conditions(self.atoms + other.atoms)
        if other is True:
            return self
        raise _Unproven

    __rand__ = __and__

    def __invert__(self):
        if len(self.atoms) != 1 or self.atoms[0][0] == "eq":
            raise _Unproven  # a disjunction, or a hole
        kind, f = self.atoms[0]  # not (f <= 0) is -f < 0; not (f < 0) is -f <= 0
        return _Conditions((("lt" if kind == "le" else "le", f.times(-1)),))

    __or__ = __ror__ = __bool__ = __getattr__ = __eq__ = __ne__ = _fail
    __hash__ = None


class Interval(NamedTuple):
    """A proven mask_mod: its conditions, each kv_idx's coefficient -1, 0 or 1."""

    atoms: tuple

    def terms_fit(self, batch: int, device: torch.device) -> bool:
        """Whether every tensor read at b has an entry for each of the batch's sequences, on the call's device."""
        return all(t.shape[0] >= batch and t.device == device for _, f in self.atoms for t, _ in f.terms)

    def key_range(self, q: torch.Tensor, count: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """(rows, 2) int32 [begin, end) for rows at positions q (INDEX_DTYPE) of sequences seq with count keys (seq
        valid for every row: terms_fit first)."""
        lo = torch.zeros_like(q)
        hi = count.clone()  # exclusive
        holds = torch.ones_like(q, dtype=torch.bool)
        for kind, f in self.atoms:
            rest = f.a * q + f.c  # the condition is f.k kv + rest OP 0
            for t, m in f.terms:
                rest = rest + m * t[seq].to(q.dtype)
            if f.k == 0:
                holds &= (rest <= 0) if kind == "le" else (rest < 0) if kind == "lt" else (rest == 0)
                continue
            # k = 1: kv OP -rest, an upper bound (or both, for ==); k = -1: kv OP' rest, a lower bound
            bound = -rest if f.k == 1 else rest
            if kind == "eq":
                lo, hi = torch.maximum(lo, bound), torch.minimum(hi, bound + 1)
            elif f.k == 1:
                hi = torch.minimum(hi, bound + 1 if kind == "le" else bound)
            else:
                lo = torch.maximum(lo, bound if kind == "le" else bound + 1)
        begin = torch.minimum(lo.clamp(min=0), count)
        end = torch.where(holds, torch.maximum(torch.minimum(hi, count), begin), begin)
        return torch.stack([begin, end], dim=1).to(torch.int32)


def prove(mask_mod) -> Optional[Interval]:
    """The mod's conditions where it is proven one interval of keys per query (module docstring), else None. The mod
    runs once on symbolic values (no tensor op): cheap, in eager mode only (compiled code evaluates the mod as it
    did before)."""
    if torch.compiler.is_compiling():
        return None
    try:
        out = mask_mod(_Sequence(), _Opaque(), _Form(_Affine(1, 0, 0)), _Form(_Affine(0, 1, 0)))
    except Exception:  # noqa: BLE001 - _Unproven, or whatever the mod raises on values it does not expect
        return None
    if not isinstance(out, _Conditions) or any(f.k not in (-1, 0, 1) for _, f in out.atoms):
        return None
    # Integers past 2^31 would overflow the int64 arithmetic of the bounds (a q_idx + ...): not proven (the mask
    # path evaluates the mod as written)
    if any(abs(n) >= 1 << 31 for _, f in out.atoms for n in (f.a, f.c, *(m for _, m in f.terms))):
        return None
    return Interval(out.atoms)
