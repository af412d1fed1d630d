"""Proving a mask_mod one interval of key positions per query from its expression, so that ``varlen_attention`` runs
it as the op's ``key_range`` (8 bytes a query, key tiles outside the interval skipped) instead of building a
``(total_q, 1, max_seqlen_k)`` mask.

The mod is called once on symbolic indices: ``q_idx`` and ``kv_idx`` become affine forms ``a q + k kv + c + sum of
t[b]`` over the integers, where each ``t[b]`` is a 1-D integer tensor the mod reads at its sequence (a per-sequence
offset or length: ``b`` is symbolic too, and indexing a tensor with it is the one use it allows, besides the
``b.new_ones((), dtype=torch.bool)`` / ``new_zeros`` that FlexAttention's ``and_masks`` / ``or_masks`` start from);
``h`` fails on any use. Adding, subtracting and multiplying by integers keeps a form affine; a form without kv_idx floored by a positive
integer (``q_idx // 64``) is a term of a form too, and ``(kv_idx + c) // n`` a key block, which compared with a form
without kv_idx bounds kv_idx to whole blocks (``(kv + c) // n == r`` is ``n r - c <= kv < n r - c + n``). Comparing
two forms gives a condition ``form <= 0``, ``form < 0`` or ``form == 0``; ``&`` and ``|`` combine conditions (kept as
a disjunction of conjunctions) and ``~`` negates a single one. Anything else fails: a read of a tensor at a position
(a gate), a torch function, ``!=``, a float, Python control flow on a condition (``if``, ``and``, ``or``). Then the
mod is not proven and takes the mask path, as before.

A conjunction of conditions in which ``kv_idx`` has coefficient 1, -1 or 0 shows each query one interval of keys:
each condition bounds ``kv_idx`` above or below by an affine function of ``q_idx`` (or holds for the whole row), so
the interval is ``[max of the lower bounds, min of the upper bounds]``, clipped to the row's sequence. A disjunction
of such conjunctions is one interval for every row when they all have the same lower bounds (the union of [L, U_i) is
[L, max U_i)) or the same upper ones; other unions may leave a gap and are not proven. So a sliding window
``(kv_idx <= q_idx) & (q_idx - kv_idx < W)``, a causal mask with an offset, a band, their bottom-right aligned forms
(``kv_idx <= q_idx + len_k[b] - len_q[b]``), a prefix-LM ``(kv_idx < prefix[b]) | (kv_idx <= q_idx)``, chunked
causal attention ``(kv_idx <= q_idx) & (kv_idx // 64 == q_idx // 64)`` and block-causal masks are proven;
a document mask (it reads the keys' documents) is not (its constructor, ``dmattn_ops.document_mask``, is an interval
by construction). Coefficients of kv_idx other than 0 and +-1 are not proven (intervals still, but rounding a bound
is not worth its tests).
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

    # FlexAttention's and_masks / or_masks start from b.new_ones((), dtype=torch.bool) / b.new_zeros(...): a Python
    # bool then, which the conditions combine with
    def new_ones(self, size, dtype=None, **kwargs):
        return _scalar_bool(True, size, dtype)

    def new_zeros(self, size, dtype=None, **kwargs):
        return _scalar_bool(False, size, dtype)


def _scalar_bool(value: bool, size, dtype) -> bool:
    if tuple(size) != () or dtype is not torch.bool:
        raise _Unproven
    return value


class _Floor(NamedTuple):
    """floor(inner / n): inner an _Affine without kv_idx, n >= 1."""

    inner: "_Affine"
    n: int


class _Affine(NamedTuple):
    """a q_idx + k kv_idx + c + the sum of coefficient x term over terms ((term, coefficient), ...), a term a 1-D
    tensor t read at b (t[b]) or a _Floor of q_idx."""

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

    def __floordiv__(self, n):
        """A form without kv_idx floored by a positive int is a term; kv_idx + c floored by one is a _KeyBlock."""
        if type(n) is not int or n < 1:
            raise _Unproven
        f = self.f
        if f.k == 0:
            return _Form(_Affine(0, 0, 0, ((_Floor(f, n), 1),)))
        if f.k == 1 and f.a == 0 and not f.terms:
            return _KeyBlock(f.c, n)
        raise _Unproven

    # self OP other, as (self - other) OP 0, or (other - self) for > and >=; a _KeyBlock on the right answers for
    # itself (Python then calls its reflected method)
    def __le__(self, other):
        if isinstance(other, _KeyBlock):
            return NotImplemented
        return _Conditions.atom("le", (self - other).f)

    def __lt__(self, other):
        if isinstance(other, _KeyBlock):
            return NotImplemented
        return _Conditions.atom("lt", (self - other).f)

    def __ge__(self, other):
        if isinstance(other, _KeyBlock):
            return NotImplemented
        return _Conditions.atom("le", (_Form(_affine(other)) - self).f)

    def __gt__(self, other):
        if isinstance(other, _KeyBlock):
            return NotImplemented
        return _Conditions.atom("lt", (_Form(_affine(other)) - self).f)

    def __eq__(self, other):
        if isinstance(other, _KeyBlock):
            return NotImplemented
        return _Conditions.atom("eq", (self - other).f)

    __ne__ = __bool__ = __index__ = __int__ = __getattr__ = __truediv__ = __mod__ = _fail
    __hash__ = None


class _KeyBlock:
    """(kv_idx + c) // n, n >= 1: compared with a form R without kv_idx it bounds kv_idx, since (kv + c) // n == R
    holds exactly for n R - c <= kv < n R - c + n (a chunk, a block of a block mask)."""

    __slots__ = ("c", "n")

    def __init__(self, c: int, n: int):
        self.c, self.n = c, n

    def _row(self, other) -> _Form:
        r = _Form(_affine(other))
        if r.f.k != 0:
            raise _Unproven
        return r

    def _first(self, r: _Form) -> _Form:  # the first kv of block r: n r - c
        return r * self.n - self.c

    def __eq__(self, other):
        first = self._first(self._row(other))
        return (_kv() >= first) & (_kv() < first + self.n)

    def __le__(self, other):  # kv + c < n (r + 1)
        return _kv() < self._first(self._row(other)) + self.n

    def __lt__(self, other):
        return _kv() < self._first(self._row(other))

    def __ge__(self, other):
        return _kv() >= self._first(self._row(other))

    def __gt__(self, other):
        return _kv() >= self._first(self._row(other)) + self.n

    __ne__ = __bool__ = __index__ = __int__ = __getattr__ = __add__ = __radd__ = __sub__ = __rsub__ = _fail
    __mul__ = __rmul__ = __floordiv__ = __mod__ = _fail
    __hash__ = None


def _kv() -> _Form:
    return _Form(_Affine(0, 1, 0))


class _Conditions:
    """A disjunction of conjunctions: alternatives, each a tuple of conditions (kind, form) meaning form <= 0 ("le"),
    form < 0 ("lt") or form == 0 ("eq")."""

    __slots__ = ("alternatives",)

    def __init__(self, alternatives: tuple):
        self.alternatives = alternatives

    @classmethod
    def atom(cls, kind: str, f: _Affine) -> "_Conditions":
        return cls((((kind, f),),))

    def __and__(self, other):
        if other is True or other is False:  # a Python bool (the start of a loop of `&`, say)
            return self if other else _Conditions(())
        if not isinstance(other, _Conditions):
            raise _Unproven
        return _Conditions(tuple(x + y for x in self.alternatives for y in other.alternatives))

    def __or__(self, other):
        if other is True or other is False:
            return _Conditions(((),)) if other else self  # (): an alternative without conditions, every key
        if not isinstance(other, _Conditions):
            raise _Unproven
        return _Conditions(self.alternatives + other.alternatives)

    __rand__, __ror__ = __and__, __or__

    def __invert__(self):
        if len(self.alternatives) != 1 or len(self.alternatives[0]) != 1 or self.alternatives[0][0][0] == "eq":
            raise _Unproven  # not (a and b) is a disjunction of negations; not (x == c) is a hole
        kind, f = self.alternatives[0][0]  # not (f <= 0) is -f < 0; not (f < 0) is -f <= 0
        return _Conditions.atom("lt" if kind == "le" else "le", f.times(-1))

    __bool__ = __getattr__ = __eq__ = __ne__ = _fail
    __hash__ = None


class _Bounds(NamedTuple):
    """One alternative as bounds of kv_idx, each an affine form of q_idx (and per-sequence terms; its kv coefficient
    0): the row holds every condition of `rows`, and lower <= kv_idx < upper for each lower and upper bound."""

    lower: tuple  # inclusive
    upper: tuple  # exclusive
    rows: tuple  # (kind, form) without kv_idx


def _bounds(alternative: tuple) -> _Bounds:
    lower, upper, rows = [], [], []
    for kind, f in alternative:
        if f.k == 0:
            rows.append((kind, f))
            continue
        # k = 1: kv + rest OP 0, kv OP -rest (an upper bound); k = -1: kv OP' rest (a lower bound)
        bound = f.times(-1) if f.k == 1 else f
        bound = _Affine(bound.a, 0, bound.c, bound.terms)
        plus_one = _Affine(bound.a, 0, bound.c + 1, bound.terms)
        if kind == "eq":
            lower.append(bound)
            upper.append(plus_one)
        elif f.k == 1:
            upper.append(plus_one if kind == "le" else bound)
        else:
            lower.append(bound if kind == "le" else plus_one)
    return _Bounds(tuple(lower), tuple(upper), tuple(rows))


def _same(forms_a: tuple, forms_b: tuple) -> bool:
    """Whether two sets of bounds are the same forms (per-sequence tensors compared by identity)."""
    def key(f):
        terms = {}
        for t, m in f.terms:
            name = ("floor", key(t.inner), t.n) if isinstance(t, _Floor) else id(t)
            terms[name] = terms.get(name, 0) + m
        return f.a, f.c, frozenset((i, m) for i, m in terms.items() if m)

    return {key(f) for f in forms_a} == {key(f) for f in forms_b}


class Interval(NamedTuple):
    """A proven mask_mod: its alternatives as _Bounds, which all share their lower bounds (`shared` "lower": the union
    of [L, upper_i) is [L, max upper_i)) or their upper ones ("upper"), or a single alternative."""

    alternatives: tuple
    shared: str

    def forms(self):
        for alt in self.alternatives:
            yield from alt.lower
            yield from alt.upper
            yield from (f for _, f in alt.rows)

    def signature(self):
        """(key, tensors): a hashable key of the bounds, each tensor read at b standing as its identity and version
        counter (an in-place change makes another key), and those tensors (whoever keeps the key keeps them, so that
        no other tensor takes their identity). None where a tensor tracks no version (an inference tensor)."""
        held = []

        def form(f):
            terms = []
            for t, m in f.terms:
                if isinstance(t, _Floor):
                    terms.append(("floor", form(t.inner), t.n, m))
                else:
                    held.append(t)
                    terms.append((id(t), t._version, m))
            return f.a, f.k, f.c, tuple(terms)

        try:
            key = (self.shared, tuple((tuple(map(form, alt.lower)), tuple(map(form, alt.upper)),
                                       tuple((kind, form(f)) for kind, f in alt.rows)) for alt in self.alternatives))
        except RuntimeError:  # "Inference tensors do not track version counter"
            return None
        return key, held

    def terms_fit(self, batch: int, device: torch.device) -> bool:
        """Whether every tensor read at b has an entry for each of the batch's sequences, on the call's device."""
        def tensors(f):
            for t, _ in f.terms:
                yield from tensors(t.inner) if isinstance(t, _Floor) else (t,)

        return all(t.shape[0] >= batch and t.device == device for f in self.forms() for t in tensors(f))

    def key_range(self, q: torch.Tensor, count: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """(rows, 2) int32 [begin, end) for rows at positions q (INDEX_DTYPE) of sequences seq with count keys (seq
        valid for every row: terms_fit first)."""
        def value(f):
            out = f.a * q + f.c
            for t, m in f.terms:
                if isinstance(t, _Floor):
                    out = out + m * torch.div(value(t.inner), t.n, rounding_mode="floor")
                else:
                    out = out + m * t[seq].to(q.dtype)
            return out

        spans = []  # (lo, hi, holds) of each alternative
        for alt in self.alternatives:
            lo, hi = torch.zeros_like(q), count.clone()
            for f in alt.lower:
                lo = torch.maximum(lo, value(f))
            for f in alt.upper:
                hi = torch.minimum(hi, value(f))
            holds = None
            for kind, f in alt.rows:
                v = value(f)
                cond = (v <= 0) if kind == "le" else (v < 0) if kind == "lt" else (v == 0)
                holds = cond if holds is None else holds & cond
            spans.append((lo, hi, holds))
        if self.shared == "lower":  # [L, the largest upper bound of an alternative that holds)
            lo = spans[0][0]
            hi = None
            for _, h, holds in spans:
                h = h if holds is None else torch.where(holds, h, lo)
                hi = h if hi is None else torch.maximum(hi, h)
        else:  # (the smallest lower bound of an alternative that holds, U]
            hi = spans[0][1]
            lo = None
            for low, _, holds in spans:
                low = low if holds is None else torch.where(holds, low, hi)
                lo = low if lo is None else torch.minimum(lo, low)
        return clipped_key_range(lo, hi, count)


def clipped_key_range(begin: torch.Tensor, end: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(rows, 2) int32 key_range of rows' intervals [begin, end) clipped to their sequences' count keys, never
    reversed (an empty interval begins where it ends)."""
    begin = torch.minimum(begin.clamp(min=0), count)
    end = torch.maximum(torch.minimum(end, count), begin)
    return torch.stack([begin, end], dim=1).to(torch.int32)


def prove(mask_mod) -> Optional[Interval]:
    """The mod's bounds where it is proven one interval of keys per query (module docstring), else None. The mod
    runs once on symbolic values (no tensor op): cheap, in eager mode only (compiled code evaluates the mod as it
    did before)."""
    if torch.compiler.is_compiling():
        return None
    try:
        out = mask_mod(_Sequence(), _Opaque(), _Form(_Affine(1, 0, 0)), _Form(_Affine(0, 1, 0)))
    except Exception:  # noqa: BLE001 - _Unproven, or whatever the mod raises on values it does not expect
        return None
    if not isinstance(out, _Conditions) or not out.alternatives:
        return None
    atoms = [f for alt in out.alternatives for _, f in alt]
    if any(f.k not in (-1, 0, 1) for f in atoms):
        return None
    # Integers past 2^31 would overflow the int64 arithmetic of the bounds (a q_idx + ...): not proven (the mask
    # path evaluates the mod as written)
    def numbers(f):
        yield from (f.a, f.c)
        for t, m in f.terms:
            yield m
            if isinstance(t, _Floor):
                yield t.n
                yield from numbers(t.inner)

    if any(abs(n) >= 1 << 31 for f in atoms for n in numbers(f)):
        return None
    alternatives = tuple(_bounds(alt) for alt in out.alternatives)
    first = alternatives[0]
    if all(_same(alt.lower, first.lower) for alt in alternatives):
        return Interval(alternatives, "lower")
    if all(_same(alt.upper, first.upper) for alt in alternatives):
        return Interval(alternatives, "upper")
    return None  # alternatives with other bounds on both sides may leave a gap between them
