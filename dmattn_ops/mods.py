"""FlexAttention-style ``mask_mod`` / ``score_mod`` adapter: builds dmattn masks and biases in the most compact layout.

Users of ``torch.nn.attention.flex_attention`` describe masks and biases as functions of four index tensors::

    mask_mod(b, h, q_idx, kv_idx) -> bool             # True = attend
    score_mod(score, b, h, q_idx, kv_idx) -> score'   # here only additive ones: score + f(b, h, q_idx, kv_idx)

``create_mask`` / ``create_bias`` evaluate such a function over packed variable-length sequences and return a tensor
that ``dmattn_ops.varlen_attention`` takes as ``mask=`` / ``bias=``. ``b`` is the sequence index and ``q_idx`` /
``kv_idx`` are positions *inside* sequence ``b`` (not packed positions), all int64; a closure over a packed per-key
tensor reads it at ``cu_seqlens_k[b] + kv_idx`` (see docs/mods.md).

The layout is the most compact one the op contract allows, decided exactly from the function's data flow:

- no path from ``q_idx`` to the output  -> key-side ``(total_k, Hm)``, built in O(total_k * Hm);
- otherwise                              -> query-side ``(total_q, Hm, max_seqlen_k)``;
- Hm = 1 when no path from ``h`` to the output, else H. (Hm = Hk, "depends on h only through h // (H / Hk)", is
  a statement about values that data flow cannot prove, so it is never chosen.)

How the data flow is traced: ``torch.vmap`` is a dependency tracer. Each index input is given its own vmap level (a
batch of two copies of one valid position, so closures index in bounds); every op propagates the levels of its
inputs to its output, and ``vmap`` returns an output that is not batched at a level as a stride-0 expansion. So
``out.stride(level) == 0`` exactly when no op chain links that input to the output; the values are never compared.
Unlike a make_fx graph walk (the test suite uses one as an independent cross-check), this runs unchanged inside
``torch.compile(fullgraph=True, dynamic=True)``, including for mods that close over tensors created inside the
compiled region. The strides are static at trace time, so choosing the layout installs no guard and no graph break.
In eager mode an elementwise mod is traced more cheaply first, by one call on broadcast copies of that position, each
index along a dimension of its own (``dmattn_ops/_broadcast.py``): which dimensions the output has says the same.

Additivity of a score_mod is proven the same way, structurally: the score_mod runs once with a stand-in for ``score``
that records what is added to it and refuses every other use (multiplying it, passing it to ``tanh`` or
``torch.where``, reading it), naming the offending use in a ValueError.

Every evaluation is vectorized over packed rows, heads and key positions: in eager mode, for an elementwise mod, as
one call on broadcast index grids (the tensor expression one would write by hand, under a guard that sends every
other mod to vmap; ``dmattn_ops/_broadcast.py``), else by nested ``vmap`` like FlexAttention's ``create_block_mask``.
No Python loop runs over tokens or sequences, and nothing synchronizes with the device.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from . import _broadcast, _intervals, _kept

__all__ = [
    "ModDependencies", "additive_part", "chunked_causal", "create_bias", "create_mask", "document_mask",
    "mod_dependencies", "prefix_lm", "sliding_window",
]

# dtype of b, h, q_idx, kv_idx: int64, as FlexAttention's create_block_mask passes them (with int32, torch 2.11-2.13
# fail to trace `h // group` under vmap once dynamic=True makes `group` a SymInt).
INDEX_DTYPE = torch.int64

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ModDependencies(NamedTuple):
    """Which index inputs of a mod reach its output through some chain of ops."""

    batch: bool
    head: bool
    query: bool
    key: bool


# ----------------------------------------------------------------------------------------------------------------
# Dependency tracing


def _checked(mod: MaskMod, what: str) -> MaskMod:
    """mod, with a clear error when it returns something other than one scalar tensor per index tuple.

    what names the function in errors, e.g. "dmattn.create_mask: mask_mod"."""

    def call(b, h, q_idx, kv_idx):
        out = mod(b, h, q_idx, kv_idx)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{what} must return a tensor, got {type(out).__name__}")
        if out.dim() != 0:
            raise ValueError(
                f"{what} must return one value per (b, h, q_idx, kv_idx) (a 0-d tensor under vmap), "
                f"got shape {tuple(out.shape)}"
            )
        return out

    return call


def _trace(mod: MaskMod, b: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor):
    """Traces mod's data flow at one valid position (b, h=0, q_idx, kv_idx), all 0-d INDEX_DTYPE tensors.

    Returns (ModDependencies, the output dtype)."""
    h = torch.zeros((), dtype=INDEX_DTYPE, device=b.device)
    traced = mod
    for level in (3, 2, 1, 0):  # innermost level: kv_idx; outermost: b
        in_dims = tuple(0 if i == level else None for i in range(4))
        traced = torch.vmap(traced, in_dims=in_dims)
    # Two copies of each index, stacked (not expanded: a stride-0 input would read as "no dependency").
    out = traced(*(torch.stack([x, x]) for x in (b, h, q_idx, kv_idx)))  # (2, 2, 2, 2) over (b, h, q_idx, kv_idx)
    return ModDependencies(*(out.stride(level) != 0 for level in range(4))), out.dtype


def mod_dependencies(mod: MaskMod, *, b: int = 0, q_idx: int = 0, kv_idx: int = 0, device=None) -> ModDependencies:
    """Which of (b, h, q_idx, kv_idx) reach mod's output, traced at one position where mod can be evaluated.

    For a score_mod, trace ``additive_part(score_mod)``."""
    idx = [torch.tensor(x, dtype=INDEX_DTYPE, device=device) for x in (b, q_idx, kv_idx)]
    return _trace(_checked(mod, "dmattn.mod_dependencies: mod"), *idx)[0]


# ----------------------------------------------------------------------------------------------------------------
# Additivity of a score_mod


def _not_additive(why: str):
    raise ValueError(
        f"dmattn.create_bias: score_mod is not additive, so it cannot become a bias: it {why}. A bias needs "
        "score_mod(score, b, h, q_idx, kv_idx) == score + f(b, h, q_idx, kv_idx) with f independent of score, i.e. "
        "score may only appear as `score + x` or `score - x`. A softcap (tanh), a scale (score * x) or a "
        "torch.where(..., score, ...) changes the scores themselves; write masking as a mask_mod, and a "
        "conditional bias as score + torch.where(cond, x, 0.0)."
    )


_ADD = ("add", "__add__", "__radd__", "__iadd__")
_SUB = ("sub", "__sub__", "__isub__", "subtract")


class _ScoreTracer:
    """Stands in for ``score`` while a score_mod runs once: records the terms added to it, refuses any other use.

    ``score + x`` / ``x + score`` / ``score - x`` return a new tracer holding +x / -x; everything else that touches
    the score (arithmetic, torch functions, attribute reads beyond dtype/device/shape) raises the ValueError of
    ``_not_additive`` naming that use."""

    dtype = torch.float32  # FlexAttention's score is a float32 scalar
    shape = torch.Size([])
    ndim = 0

    def __init__(self, device, terms=()):
        self._terms = terms
        self._device = device

    @property
    def device(self):
        return self._device

    def _plus(self, other, sign: int):
        if isinstance(other, _ScoreTracer):
            _not_additive("combines score with itself (score + score or score - score)")
        return _ScoreTracer(self._device, self._terms + ((sign, other),))

    def __add__(self, other):
        return self._plus(other, 1)

    __radd__ = __add__

    def __sub__(self, other):
        return self._plus(other, -1)

    def __rsub__(self, other):
        _not_additive("subtracts score from something (x - score negates it)")

    def __mul__(self, other):
        _not_additive("multiplies score (score * x)")

    __rmul__ = __mul__

    def __truediv__(self, other):
        _not_additive("divides score (score / x, e.g. a softcap)")

    def __rtruediv__(self, other):
        _not_additive("divides by score")

    def __neg__(self):
        _not_additive("negates score")

    def __pow__(self, other):
        _not_additive("raises score to a power")

    def __abs__(self):
        _not_additive("takes abs(score)")

    def __bool__(self):
        _not_additive("branches on the value of score")

    def __getitem__(self, item):
        _not_additive("indexes score")

    def _compare(self, other):
        _not_additive("compares score with something")

    __lt__ = __le__ = __gt__ = __ge__ = _compare

    def __getattr__(self, name):  # only called for attributes the tracer does not define
        if name.startswith("__"):
            raise AttributeError(name)  # protocol probes (copy, pickle, dynamo) are not uses of the score
        _not_additive(f"reads score.{name}")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if not kwargs and len(args) == 2:
            a, b = args
            a_is, b_is = isinstance(a, _ScoreTracer), isinstance(b, _ScoreTracer)
            if name in _ADD and a_is != b_is:
                return a._plus(b, 1) if a_is else b._plus(a, 1)
            if name in _SUB and a_is and not b_is:
                return a._plus(b, -1)
            if name == "__rsub__" and b_is and not a_is:  # rsub(a, b) = b - a
                return b._plus(a, -1)
        _not_additive(f"passes score to {name}")

    def bias(self, like: torch.Tensor) -> torch.Tensor:
        """The sum of the recorded terms, float32 (a 0-d zero when nothing was added)."""
        total = torch.zeros((), dtype=torch.float32, device=like.device)
        for sign, term in self._terms:
            term = torch.as_tensor(term, device=like.device).to(torch.float32)
            total = total + term if sign > 0 else total - term
        return total


def additive_part(score_mod: ScoreMod) -> MaskMod:
    """f with ``score_mod(score, b, h, q_idx, kv_idx) == score + f(b, h, q_idx, kv_idx)``, returning float32.

    Additivity is proven structurally on each call (see _ScoreTracer); a non-additive score_mod raises ValueError."""

    def bias_mod(b, h, q_idx, kv_idx):
        result = score_mod(_ScoreTracer(b.device), b, h, q_idx, kv_idx)
        if not isinstance(result, _ScoreTracer):
            _not_additive("returns a value that does not contain score (it replaces the score instead of adding to it)")
        return result.bias(b)

    return bias_mod


# ----------------------------------------------------------------------------------------------------------------
# Packed index grids and evaluation


class _Rows(NamedTuple):
    """Each packed row's facts on one side (queries or keys), (total,) INDEX_DTYPE each. A row with no count (past
    cu_seqlens[-1], or of a sequence with nothing on the other side) has only don't-care entries: it is given the
    anchor's first position, where a mod may read memory in bounds."""

    seq: torch.Tensor  # the sequence owning the row, clamped to [0, B - 1]; the anchor where count <= 0
    pos: torch.Tensor  # its position in that sequence; 0 where count <= 0
    count: torch.Tensor  # the other side's count of that sequence (the keys of a query's); 0 past cu_seqlens[-1]
    last: torch.Tensor  # count - 1, the last position of the other side the row is evaluated at; 0 where count <= 0


@torch.compiler.assume_constant_result  # dynamo reads the kernel table once, at trace time: no graph break
def _has_packed_rows(device_type: str) -> bool:
    """Whether this build has the kernels of dmattn::packed_rows and dmattn::zero_unseen_ for a device type (the CPU's
    always; CUDA's in a CUDA build; both are registered in one file per backend)."""
    return _kernel_table_has_packed_rows(device_type)


@functools.lru_cache(maxsize=None)  # the library registers its kernels once, at import: a lookup per build is enough
def _kernel_table_has_packed_rows(device_type: str) -> bool:
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("dmattn::packed_rows", key)


class _Packing:
    """The packed batch's facts an evaluation needs, as device tensors (no host sync). Where this build has a kernel
    for the device, through dmattn::packed_rows (csrc/packed_rows.h): one launch for a side's rows, the anchor and a
    0-d zero, in eager mode and in compiled code alike. (Compiled, the tensor ops instead fuse into the grid's kernel,
    which on a GPU then works out each entry's row facts again: 2.1x the time of the grid kernel fed by packed_rows on
    an H100, run DV.) Otherwise by tensor ops.

    B >= 1. anchor: () INDEX_DTYPE, the sequence with the most of min(queries, keys): one with both, if any has both.
    It is where the probe runs and where don't-care entries are evaluated. zero: () INDEX_DTYPE 0 on the device."""

    def __init__(self, cu_seqlens_q, cu_seqlens_k, total_q: int, device: torch.device):
        self.native = _has_packed_rows(device.type)
        self.total_q = total_q
        self.batch = cu_seqlens_q.shape[0] - 1  # B, known on the host
        if self.native:
            self.cu_q, self.cu_k = (t.to(device).contiguous() for t in (cu_seqlens_q, cu_seqlens_k))
            rows, anchor = torch.ops.dmattn.packed_rows(self.cu_q, self.cu_k, total_q)
            self.anchor, self.zero = anchor.unbind(0)  # views: no launch for the zero
            self._query_rows = _Rows(*rows.unbind(0))
        else:
            self.zero = torch.zeros((), dtype=INDEX_DTYPE, device=device)
            self.cu_q = cu_seqlens_q.to(device=device, dtype=INDEX_DTYPE)
            self.cu_k = cu_seqlens_k.to(device=device, dtype=INDEX_DTYPE)
            self.len_k = self.cu_k[1:] - self.cu_k[:-1]
            self.anchor = torch.minimum(self.cu_q[1:] - self.cu_q[:-1], self.len_k).argmax()
            self._query_rows = None

    def query_rows(self) -> _Rows:
        """Each query row's facts (_Rows): its key count is 0 past cu_seqlens_q[-1]."""
        if self._query_rows is None:
            self._query_rows = self._rows_by_ops(self.cu_q, self.total_q)
        return self._query_rows

    def key_rows(self, total_k: int) -> _Rows:
        """Each key row's facts (_Rows), its count its own sequence's: > 0 exactly inside cu_seqlens_k[-1]."""
        if self.native:
            rows, _ = torch.ops.dmattn.packed_rows(self.cu_k, self.cu_k, total_k)
            return _Rows(*rows.unbind(0))
        return self._rows_by_ops(self.cu_k, total_k)

    def _rows_by_ops(self, cu: torch.Tensor, total: int) -> _Rows:
        """The facts of rows 0 .. total-1 of cu's side by tensor ops, as packed_rows gives them: the count is the keys
        of the row's sequence on either side (0 past cu[-1]), and a row without count is at the anchor's first
        position."""
        i = torch.arange(total, dtype=INDEX_DTYPE, device=self.zero.device)
        b = _sequence_of(cu, i)
        count = torch.where(i < cu[-1], self.len_k[b], self.zero)
        seen = count > 0
        return _Rows(torch.where(seen, b, self.anchor), torch.where(seen, i - cu[b], self.zero), count,
                     torch.where(seen, count - 1, self.zero))


def _sequence_of(cu: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(rows,) packed positions -> (rows,) index of the sequence owning each, clamped to [0, B - 1]. (Searching cu[1:]
    would save the subtraction, but inductor's CUDA lowering of searchsorted takes no sliced boundaries.)"""
    return (torch.searchsorted(cu, rows, right=True) - 1).clamp(0, cu.shape[0] - 2)


def _heads(deps: ModDependencies, num_heads: int, zero: torch.Tensor) -> torch.Tensor:
    """The head indices a mod is evaluated at: (H,) when h reaches its output, else zero (a 0-d 0)."""
    return torch.arange(num_heads, dtype=INDEX_DTYPE, device=zero.device) if deps.head else zero


def _on_grid(mod, grids, shape) -> Optional[torch.Tensor]:
    """mod, which the probe found elementwise, evaluated on broadcast grids (_broadcast.evaluate, unguarded), viewed
    with len(shape) dimensions, or None when it fails there or its result is not a broadcast of shape (the caller
    then evaluates under vmap)."""
    out = _broadcast.evaluate(mod, *grids)
    return None if out is None else _broadcast.broadcast_of(out, shape)


def _dont_care(out: torch.Tensor, count: torch.Tensor, shape, fill, in_place: bool, j=None) -> torch.Tensor:
    """out (broadcast to shape = (rows, M, W)) with every entry [r, :, j >= count[r]] set to fill (False / 0.0, zero
    bytes), as a (rows, M, W) tensor. in_place: out is the grid evaluation's own result, in eager mode, where this
    build has dmattn::zero_unseen_ for the device; where out then is a contiguous (rows, M, W) tensor of more than
    one entry, the kernel writes those entries in place, one launch (none written where every row sees W keys),
    where the tensor expression takes two launches and two passes over the grid. (Every result of a probed grid is
    a new tensor but a 0-d one the mod closes over, which the probe admits: one entry, never written here.) A result
    that requires grad (a score_mod reading a learnable table) takes the expression, which autograd differentiates.
    j: the (W,) column positions, where the caller has them."""
    if (in_place and tuple(out.shape) == tuple(shape) and out.numel() > 1 and out.is_contiguous()
            and not out.requires_grad and fill in (False, 0.0)):
        torch.ops.dmattn.zero_unseen_(out, count)
        return out
    if j is None:
        j = torch.arange(shape[2], dtype=INDEX_DTYPE, device=out.device)
    inside = (j.unsqueeze(0) < count.unsqueeze(1)).unsqueeze(1)  # (rows, 1, W)
    # for a mask one `&` (a Python scalar in torch.where becomes a tensor filled on the device first: one launch more,
    # on a GPU a small build's cost is its launches)
    out = out & inside if fill is False else torch.where(inside, out, fill)
    return out.expand(shape).contiguous()


def _key_side(mod, checked, deps, p: _Packing, num_heads: int, total_k: int, fill, probed) -> torch.Tensor:
    """(total_k, Hm): row t = packed key t evaluated at (its sequence b, every head, its position kv_idx).

    probed: the mod's _broadcast.Probe (eager mode, an elementwise mod), else None: evaluated under vmap (checked).
    Rows after cu_seqlens_k[-1] are don't-care, evaluated at the anchor's first key (_Rows)."""
    b, kv_idx, count, _ = p.key_rows(total_k)
    zero = p.zero
    h = _heads(deps, num_heads, zero)  # q_idx = zero: it does not reach the output
    hm = num_heads if deps.head else 1
    out = None
    if probed is not None:
        out = _on_grid(mod, (b.unsqueeze(1), h.view(1, -1) if deps.head else h, zero, kv_idx.unsqueeze(1)),
                       (total_k, hm))
    in_place = out is not None and p.native  # (probed: eager mode)
    if out is None:
        fn = checked
        if deps.head:
            fn = torch.vmap(fn, in_dims=(None, 0, None, None))  # -> (H,)
        out = torch.vmap(fn, in_dims=(0, None, None, 0))(b, h, zero, kv_idx)  # (total_k,) or (total_k, H)
        if not deps.head:
            out = out.unsqueeze(1)
    # a key row's own count is > 0 exactly where it is inside cu_seqlens_k[-1]: width 1, column 0 kept there
    return _dont_care(out.unsqueeze(2), count, (total_k, hm, 1), fill, in_place).squeeze(2)


def _known_full_width(len_k: torch.Tensor, max_seqlen_k: int) -> bool:
    """Whether every row is known to see max_seqlen_k keys (len_k: each row's count). Checked on CPU tensors only, in
    eager mode: there the check is free, while on a GPU it would cost a host sync (False: not known)."""
    return len_k.device.type == "cpu" and not torch.compiler.is_compiling() and bool((len_k >= max_seqlen_k).all())


def _query_side(
    mod, checked, deps: ModDependencies, p: _Packing, num_heads: int, total_q: int, max_seqlen_k, fill, probed
) -> torch.Tensor:
    """(total_q, Hm, max_seqlen_k): [i, h, j] = query i with the j-th key of its own sequence.

    Entries with j >= that sequence's key length are don't-care (``fill``). Evaluated on broadcast grids when probed
    (a _broadcast.Probe) says the mod is elementwise, else under vmap (checked). Where the mod may read memory at a
    position (under vmap, or where the probe saw it read), every entry it reads at is a valid one: rows that see no
    key are evaluated at the anchor sequence's first query (_Rows), and where kv_idx reaches a read (not a window's,
    not a prefix's), kv_idx is clamped into the row's sequence, so a closure never indexes out of bounds."""
    b, q_idx, len_k, last = p.query_rows()  # (total_q,) each; len_k 0 on rows after cu_seqlens_q[-1]
    zero = p.zero
    j = torch.arange(max_seqlen_k, dtype=INDEX_DTYPE, device=zero.device)  # (max_seqlen_k,)
    hm = num_heads if deps.head else 1
    h = _heads(deps, num_heads, zero)
    shape = (total_q, hm, max_seqlen_k)

    # When every row sees max_seqlen_k keys, no position needs clamping and no entry is don't-care, which saves a
    # pass over the (total_q, max_seqlen_k) grid and the don't-care fill.
    full_width = _known_full_width(len_k, max_seqlen_k)
    last_k = None if full_width or (probed is not None and not probed.reads_keys) else last
    out = None
    if probed is not None:
        if last_k is None:
            kv = j.view(1, 1, -1)
        elif p.batch == 1:
            # One sequence: every row is evaluated in it (a row without keys at its first position), so one bound, the
            # largest row's, clamps every row. The key positions stay a (1, 1, W) broadcast, where a bound per row
            # makes them a (total_q, 1, W) int64 grid that the mod's ops then read (run EN: 0.37 ms of kernels for
            # a 4096 x 4096 document mask against the hand-written expression's 0.24).
            kv = torch.minimum(j, last_k.amax()).view(1, 1, -1)
        else:
            kv = torch.minimum(j.view(1, 1, -1), last_k.view(-1, 1, 1))
        out = _on_grid(mod, (b.view(-1, 1, 1), h.view(1, -1, 1) if deps.head else h, q_idx.view(-1, 1, 1), kv),
                       shape)
    in_place = out is not None and p.native  # (probed: eager mode)
    if out is None:
        if probed is not None and not full_width:  # the probe said elementwise, yet the grid's result was not
            return _query_side(mod, checked, deps, p, num_heads, total_q, max_seqlen_k, fill, None)

        def entry(b, q_idx, last_k, h, j):
            return checked(b, h, q_idx, j if last_k is None else torch.minimum(j, last_k))  # the clamp is per row

        fn = torch.vmap(entry, in_dims=(None, None, None, None, 0))  # -> (max_seqlen_k,)
        if deps.head:
            fn = torch.vmap(fn, in_dims=(None, None, None, 0, None))  # -> (H, max_seqlen_k)
        out = torch.vmap(fn, in_dims=(0, 0, None if last_k is None else 0, None, None))(b, q_idx, last_k, h, j)
        if not deps.head:
            out = out.unsqueeze(1)  # (total_q, 1, max_seqlen_k)
    if full_width:
        return out.expand(shape).contiguous()
    return _dont_care(out, len_k, shape, fill, in_place, j)


def _one_sequence(mod, p: _Packing, total_q: int, max_seqlen_k: int, fill, dtype) -> tuple:
    """One sequence (B = 1) in eager mode: (the mod's Probe, its query-side operand), from one evaluation under the
    guard on the operand's own grids, where a batch of several sequences probes the mod on small grids first and
    then evaluates it (on a GPU a one-sequence build is the host's time to issue its ops: the probe's were a third of
    a 4096 x 4096 document mask's). Every row is evaluated in the one sequence (a row without keys at its first
    position), so b is one entry. The key positions are given as they are (those past the sequence's keys are
    don't-care); at the mod's first op that reads memory or may fail at them, the guard clamps them into the sequence
    by one bound, the largest row's last key, and that op's key-dependent operands are taken at the clamped positions
    (_broadcast._Elementwise._at_clamped_keys). So a window or a prefix-LM skips the clamp's two ops (on a GPU,
    launches), and a mod reading a per-key tensor pays them and a gather of its (1, 1, W) index.

    (probe, None) where the operand is not that (1-head query-side) grid: a key-side mod, whose (1, 1, W) evaluation
    was all this cost, a head-dependent one, or a result of another dtype; the caller builds those from the probe.
    (None, None) where the guard cannot vouch for the mod: vmap evaluates it."""
    _, q_idx, len_k, last = p.query_rows()
    j = torch.arange(max_seqlen_k, dtype=INDEX_DTYPE, device=p.zero.device)
    shape = (total_q, 1, max_seqlen_k)
    # b and h: (1, 1, 1) views of the zero, distinct objects for the guard to tell apart (h is redone where it
    # reaches). Not 0-d: a closure indexed by a 0-d tensor reads it on the host (item(), a sync on a GPU).
    rows = (p.zero.view(1, 1, 1), p.zero.view(1, 1, 1), q_idx.view(-1, 1, 1))
    probed, out = _broadcast.probe_while_building(mod, *rows, j.view(1, 1, -1), shape,
                                                 clamped_keys=lambda: torch.minimum(j, last.amax()))
    if probed is None or not probed.dims[2] or probed.dims[1] or probed.dtype != dtype:
        return probed, None
    if _known_full_width(len_k, max_seqlen_k):  # no entry is don't-care
        return probed, out.expand(shape).contiguous()
    return probed, _dont_care(out, len_k, shape, fill, p.native, j)


# A sequence's own (len_q, len_k) block is evaluated by itself when the batch's grid has at least this many entries
# per sequence: a block costs one vmap call (~0.1 ms) and then only its valid entries, where the grid evaluates every
# (query, max_seqlen_k) entry and clamps positions past each sequence's end.
PER_SEQUENCE_MIN_ENTRIES = 1 << 16


def _query_side_per_sequence(
    mod, checked, deps: ModDependencies, p: _Packing, num_heads: int, total_q: int, max_seqlen_k: int, fill, dtype,
    probed,
) -> Optional[torch.Tensor]:
    """_query_side's result built block by block, or None where that does not pay or does not apply: CPU tensors in
    eager mode only (it reads cu_seqlens on the host, free there), non-decreasing cu_seqlens, and a grid with at least
    PER_SEQUENCE_MIN_ENTRIES entries per sequence. A block is evaluated on broadcast grids when probed says the mod
    is elementwise, else under vmap (checked)."""
    if p.cu_q.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    cu_q, cu_k = p.cu_q.tolist(), p.cu_k.tolist()
    batch = len(cu_q) - 1
    if total_q * max_seqlen_k < batch * PER_SEQUENCE_MIN_ENTRIES:
        return None
    if any(a > b for a, b in zip(cu_q, cu_q[1:])) or any(a > b for a, b in zip(cu_k, cu_k[1:])):
        return None  # rows would not belong to one sequence each; the grid's searchsorted decides those
    hm = num_heads if deps.head else 1
    out = torch.full((total_q, hm, max_seqlen_k), fill, dtype=dtype)
    h = _heads(deps, num_heads, torch.zeros((), dtype=INDEX_DTYPE))
    fn = torch.vmap(checked, in_dims=(None, None, None, 0))  # over kv_idx
    if deps.head:
        fn = torch.vmap(fn, in_dims=(None, 0, None, None))  # over h
    fn = torch.vmap(fn, in_dims=(None, None, 0, None))  # over q_idx
    for b in range(batch):
        q0, q1 = min(cu_q[b], total_q), min(cu_q[b + 1], total_q)
        len_k = min(cu_k[b + 1] - cu_k[b], max_seqlen_k)
        if q1 <= q0 or len_k <= 0:
            continue  # no query row, or no key: every entry stays fill
        seq, rows, keys = (torch.tensor(b, dtype=INDEX_DTYPE), torch.arange(q1 - q0, dtype=INDEX_DTYPE),
                           torch.arange(len_k, dtype=INDEX_DTYPE))
        block = None
        if probed is not None:
            block = _on_grid(mod, (seq, h.view(1, -1, 1) if deps.head else h, rows.view(-1, 1, 1),
                                   keys.view(1, 1, -1)), (q1 - q0, hm, len_k))
        if block is None:
            block = fn(seq, h, rows, keys)  # (rows, [H,] len_k)
            block = block if deps.head else block.unsqueeze(1)
        out[q0:q1, :, :len_k] = block
    return out


def _check_args(where, cu_seqlens_q, cu_seqlens_k, num_heads, num_heads_k):
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] < 1:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"dmattn.{where}: {name} must be a (B + 1,) tensor, got {got}")
        if t.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"dmattn.{where}: {name} must be an integer tensor, got {t.dtype}")
    if cu_seqlens_q.shape[0] != cu_seqlens_k.shape[0]:
        raise ValueError(
            f"dmattn.{where}: cu_seqlens_q and cu_seqlens_k must have the same length B + 1, "
            f"got {cu_seqlens_q.shape[0]} and {cu_seqlens_k.shape[0]}"
        )
    if num_heads < 1:
        raise ValueError(f"dmattn.{where}: num_heads must be >= 1, got {num_heads}")
    if num_heads_k is not None and (num_heads_k < 1 or num_heads % num_heads_k != 0):
        raise ValueError(
            f"dmattn.{where}: num_heads must be a multiple of num_heads_k, got {num_heads} and {num_heads_k}"
        )


def _total(where, name, given, cu):
    if given is not None:
        return given
    if torch.compiler.is_compiling():
        raise ValueError(
            f"dmattn.{where}: pass {name} (q.shape[0] / k.shape[0]) when compiling; reading it from the "
            "cu_seqlens values would be a data-dependent size"
        )
    return int(cu[-1])


def _build(
    where, mod, fill, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, num_heads, num_heads_k, device, total_q, total_k
):
    """The layout choice and evaluation shared by create_mask (fill False) and create_bias (fill 0.0)."""
    _check_args(where, cu_seqlens_q, cu_seqlens_k, num_heads, num_heads_k)
    device = cu_seqlens_q.device if device is None else torch.device(device)
    total_q = _total(where, "total_q", total_q, cu_seqlens_q)
    total_k = _total(where, "total_k", total_k, cu_seqlens_k)
    dtype = torch.bool if where == "create_mask" else torch.float32
    if cu_seqlens_q.shape[0] == 1:  # B = 0: every entry is don't-care and there is no position to trace at
        return torch.full((total_k, 1), fill, dtype=dtype, device=device)
    p = _Packing(cu_seqlens_q, cu_seqlens_k, total_q, device)
    zero = p.zero
    checked = _checked(mod, f"dmattn.{where}: {'mask_mod' if where == 'create_mask' else 'score_mod'}")
    # Eager mode evaluates an elementwise mod on broadcast grids (dmattn_ops/_broadcast.py); compiled code, and any
    # mod the probe cannot vouch for, under vmap. (Dynamo traces the guard, but torch 2.13 fails its own guard on the
    # lookup of a Python-defined Tensor method such as __floordiv__, and the guard's id() bookkeeping makes dynamo
    # guard on the identity of tensors derived from the inputs: a recompile per batch. NOTES, eighteenth session.)
    probed = None
    if not torch.compiler.is_compiling():
        if p.batch == 1 and total_q > 0 and max_seqlen_k > 0:
            probed, built = _one_sequence(mod, p, total_q, max_seqlen_k, fill, dtype)
            if built is not None:
                return built
        else:
            probed = _broadcast.probe(mod, p.anchor, zero, zero)
    if probed is not None:
        deps, out_dtype = ModDependencies(*probed.dims), probed.dtype
    else:
        deps, out_dtype = _trace(checked, p.anchor, zero, zero)
    if out_dtype != dtype:  # an additive part is always float32
        raise TypeError(f"dmattn.create_mask: mask_mod must return bool (True = attend), got {out_dtype}")
    if deps.query:
        shape = (total_q, num_heads if deps.head else 1, max_seqlen_k)
        if total_q == 0 or max_seqlen_k == 0:  # nothing to evaluate (vmap needs a non-empty batch)
            return torch.full(shape, fill, dtype=dtype, device=device)
        args = (mod, checked, deps, p, num_heads, total_q, max_seqlen_k, fill)
        blocks = _query_side_per_sequence(*args, dtype, probed)
        return blocks if blocks is not None else _query_side(*args, probed)
    shape = (total_k, num_heads if deps.head else 1)
    if total_k == 0:
        return torch.full(shape, fill, dtype=dtype, device=device)
    return _key_side(mod, checked, deps, p, num_heads, total_k, fill, probed)


def create_mask(
    mask_mod: MaskMod,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads: int,
    num_heads_k: Optional[int] = None,
    device=None,
    *,
    total_q: Optional[int] = None,
    total_k: Optional[int] = None,
) -> torch.Tensor:
    """Evaluates ``mask_mod(b, h, q_idx, kv_idx) -> bool`` into a dmattn mask of the most compact layout.

    Args:
        mask_mod: FlexAttention mask_mod. b: sequence index; h: query head; q_idx, kv_idx: positions inside sequence
            b (0-d int64 tensors under vmap). A closure over a packed per-key tensor reads ``t[cu_seqlens_k[b] +
            kv_idx]``.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) as for varlen_attention.
        max_seqlen_q: accepted for symmetry with varlen_attention (the layout never needs it).
        max_seqlen_k: width of a query-side mask.
        num_heads: H. num_heads_k: Hk, only checked (H % Hk == 0).
        device: where to build it; default cu_seqlens_q's device.
        total_q, total_k: packed row counts (q.shape[0], k.shape[0]); default cu_seqlens[-1], which reads the
            values, so pass them inside torch.compile.

    Returns:
        bool, key-side ``(total_k, Hm)`` when q_idx does not reach mask_mod's output, else query-side
        ``(total_q, Hm, max_seqlen_k)``; Hm = 1 when h does not reach it, else H. Rows outside every sequence and
        query-side entries past a sequence's key length are False.
    """
    return _build(
        "create_mask", mask_mod, False, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, num_heads, num_heads_k, device,
        total_q, total_k,
    )


def create_bias(
    score_mod: ScoreMod,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    num_heads: int,
    num_heads_k: Optional[int] = None,
    device=None,
    *,
    total_q: Optional[int] = None,
    total_k: Optional[int] = None,
) -> torch.Tensor:
    """Evaluates the additive part f of ``score_mod(score, b, h, q_idx, kv_idx) == score + f(b, h, q_idx, kv_idx)``
    into a float32 dmattn bias of the most compact layout (same arguments and layouts as create_mask; don't-care
    entries are 0).

    Raises ValueError, saying which use of score broke it, when score_mod is not additive (a softcap, a scale)."""
    return _build(
        "create_bias", additive_part(score_mod), 0.0, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, num_heads, num_heads_k,
        device, total_q, total_k,
    )


def operands_from_mods(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, mask_mod, score_mod):
    """varlen_attention's mask_mod= / score_mod= path: (mask, bias) with the mods built in, on q's device.

    A mod next to an explicit tensor for the same operand is an error: combining them could force a key-side tensor
    into the query-side layout, which the op contract never does silently."""
    for mod_name, mod, name, given in (("mask_mod", mask_mod, "mask", mask), ("score_mod", score_mod, "bias", bias)):
        if mod is not None and given is not None:
            raise ValueError(
                f"dmattn.varlen_fwd: pass either {name} or {mod_name}, not both (fold the tensor into the {mod_name}, "
                f"e.g. read it by cu_seqlens_k[b] + kv_idx)"
            )
    shape_args = dict(
        num_heads=q.shape[1], num_heads_k=k.shape[1], device=q.device, total_q=q.shape[0], total_k=k.shape[0]
    )
    if mask_mod is not None:
        mask = create_mask(mask_mod, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **shape_args)
    if score_mod is not None:
        bias = create_bias(score_mod, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **shape_args)
    return mask, bias


# ----------------------------------------------------------------------------------------------------------------
# The op's native window, as a mask_mod


class _WindowMaskMod:
    """A sliding-window mask_mod that knows it is one (see sliding_window)."""

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, left: int, right: int):
        self.cu_seqlens_q, self.cu_seqlens_k, self.window_size = cu_seqlens_q, cu_seqlens_k, (left, right)
        self._lq = cu_seqlens_q.diff().to(INDEX_DTYPE)
        self._lk = cu_seqlens_k.diff().to(INDEX_DTYPE)

    def __call__(self, b, h, q_idx, kv_idx):
        left, right = self.window_size
        aligned = q_idx + self._lk[b] - self._lq[b]
        keep = kv_idx >= 0
        if left >= 0:
            keep = keep & (kv_idx >= aligned - left)
        if right >= 0:
            keep = keep & (kv_idx <= aligned + right)
        return keep


def sliding_window(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, left: int, right: int = 0) -> MaskMod:
    """FlashAttention's sliding window (the op's ``window_size=(left, right)``) as a mask_mod over these sequences:
    query ``q_idx`` of sequence ``b`` sees key ``kv_idx`` iff ``a - left <= kv_idx <= a + right`` with the aligned
    position ``a = q_idx + Lk[b] - Lq[b]`` (bottom-right, as ``is_causal``); -1 leaves a side open.

    ``varlen_attention(..., mask_mod=sliding_window(cu_q, cu_k, W - 1))`` with these same ``cu_seqlens`` tensors runs as
    the op's native window (key tiles outside it skipped, no mask built): a mask_mod cannot be proven a window by its
    data flow, but this one is one by construction. Everywhere else (``create_mask``, ``and_masks`` with other mods,
    FlexAttention) it is a plain mask_mod with the same values."""
    for name, side in (("left", left), ("right", right)):
        if type(side) is not int or side < -1:
            raise ValueError(f"dmattn.sliding_window: {name} must be an int >= -1 (-1: no limit), got {side!r}")
    return _WindowMaskMod(cu_seqlens_q, cu_seqlens_k, left, right)


def _made_for(mask_mod, kind: type, cu_seqlens_q, cu_seqlens_k) -> bool:
    """Whether mask_mod is a ``kind`` made for these very cu_seqlens tensors (the op's native form applies)."""
    return (isinstance(mask_mod, kind) and mask_mod.cu_seqlens_q is cu_seqlens_q
            and mask_mod.cu_seqlens_k is cu_seqlens_k)


def native_window(mask_mod, cu_seqlens_q, cu_seqlens_k):
    """The window_size of a sliding_window mask_mod made for these very cu_seqlens tensors, else None."""
    return mask_mod.window_size if _made_for(mask_mod, _WindowMaskMod, cu_seqlens_q, cu_seqlens_k) else None


# ----------------------------------------------------------------------------------------------------------------
# Masks that are one interval of keys per query: the op's key_range, as mask_mods


class _IntervalMaskMod:
    """A mask_mod that shows each query one interval of key positions of its sequence, by construction (see
    prefix_lm, document_mask and chunked_causal). ``varlen_attention`` given the same cu_seqlens tensors runs it as
    ``key_range`` (``key_range(total_q)``, O(total_q) tensor ops, no host sync); everywhere else it is a plain
    mask_mod.

    Subclasses give the mask through ``_keep`` (one (b, q_idx, kv_idx) entry, under vmap) and the same mask as
    intervals through ``_interval`` (vectors over query rows); tests/test_interval_mods.py checks that they agree."""

    def __init__(self, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor):
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self._cu_k = cu_seqlens_k.to(INDEX_DTYPE)
        self._lq = cu_seqlens_q.diff().to(INDEX_DTYPE)
        self._lk = cu_seqlens_k.diff().to(INDEX_DTYPE)
        self._built = _kept.KeptTensors(1)  # the key_range of the last eager build, by total_q

    def __call__(self, b, h, q_idx, kv_idx):
        return self._keep(b, q_idx + self._lk[b] - self._lq[b], kv_idx)

    def key_range(self, total_q: int) -> torch.Tensor:
        """(total_q, 2) int32 [begin, end) per packed query row, clipped to its sequence's keys; rows outside every
        sequence get an empty range.

        The mod reads its tensors when it is made (make it again when they change, e.g. per batch), so in eager mode
        the tensor is built once per total_q and every later call (each layer of a model) reuses it. Compiled code
        and CUDA-graph capture build it each time (their graphs hold the ops, not the values)."""
        if not _kept.may_keep(self._cu_k.device):  # dmattn_ops/_kept.py (which keeps inference tensors apart)
            return self._build(total_q)
        found = self._built.get(total_q)
        return found if found is not None else self._built.put(total_q, self._build(total_q))

    def _build(self, total_q: int) -> torch.Tensor:
        dev = self._cu_k.device
        if self._lq.shape[0] == 0:  # B = 0: no row belongs to a sequence
            return torch.zeros((total_q, 2), dtype=torch.int32, device=dev)
        # The query rows' facts as the mask path has them (one dmattn::packed_rows launch where built): a row without
        # keys (past cu_seqlens_q[-1], or of a sequence with none) has count 0, so its interval clips to empty.
        rows = _Packing(self.cu_seqlens_q, self.cu_seqlens_k, total_q, dev).query_rows()
        len_k = rows.count.clamp(min=0)
        aligned = rows.pos + len_k - self._lq[rows.seq]
        return _intervals.clipped_key_range(*self._interval(rows.seq, aligned, len_k), len_k)


class _PrefixLM(_IntervalMaskMod):
    def __init__(self, cu_seqlens_q, cu_seqlens_k, prefix):
        super().__init__(cu_seqlens_q, cu_seqlens_k)
        self._prefix = prefix  # an int or a (B,) INDEX_DTYPE tensor

    def _prefix_of(self, b):
        return self._prefix if isinstance(self._prefix, int) else self._prefix[b]

    def _keep(self, b, aligned, kv_idx):
        return (kv_idx <= aligned) | (kv_idx < self._prefix_of(b))

    def _interval(self, b, aligned, len_k):
        prefix = self._prefix_of(b)
        end = (aligned + 1).clamp(min=prefix) if isinstance(prefix, int) else torch.maximum(aligned + 1, prefix)
        return torch.zeros_like(aligned), end


def prefix_lm(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, prefix_lengths) -> MaskMod:
    """A prefix-LM mask_mod: query ``q_idx`` of sequence ``b`` sees every key of the sequence's first
    ``prefix_lengths[b]`` (bidirectional) and, beyond them, the keys up to its own position (causal):
    ``kv_idx < prefix[b] or kv_idx <= a``, with ``a = q_idx + Lk[b] - Lq[b]`` (bottom-right aligned, as is_causal).

    Args:
        cu_seqlens_q, cu_seqlens_k: the call's (B + 1,) tensors.
        prefix_lengths: an int for every sequence, or a (B,) integer tensor on cu_seqlens_k's device.

    ``varlen_attention(..., mask_mod=prefix_lm(cu_q, cu_k, n))`` with these same tensors and ``is_causal=False``
    runs as ``key_range`` (each query's interval ``[0, max(a + 1, prefix[b]))``, built in O(total_q), no mask tensor;
    the kernels skip the key tiles past it); elsewhere it is a plain mask_mod of the same values."""
    if isinstance(prefix_lengths, torch.Tensor):
        if prefix_lengths.dtype.is_floating_point or prefix_lengths.dtype == torch.bool or \
                prefix_lengths.shape != (cu_seqlens_q.shape[0] - 1,):
            raise ValueError(
                f"dmattn.prefix_lm: prefix_lengths must be an int or a (B,) = ({cu_seqlens_q.shape[0] - 1},) integer "
                f"tensor, got a {tuple(prefix_lengths.shape)} {prefix_lengths.dtype} tensor")
        prefix = prefix_lengths.to(INDEX_DTYPE)
    elif type(prefix_lengths) is int and prefix_lengths >= 0:
        prefix = prefix_lengths
    else:
        raise ValueError(f"dmattn.prefix_lm: prefix_lengths must be an int >= 0 or a (B,) integer tensor, "
                         f"got {prefix_lengths!r}")
    return _PrefixLM(cu_seqlens_q, cu_seqlens_k, prefix)


class _Documents(_IntervalMaskMod):
    def __init__(self, cu_seqlens_q, cu_seqlens_k, document_ids):
        super().__init__(cu_seqlens_q, cu_seqlens_k)
        ids = document_ids.to(INDEX_DTYPE)
        total_k, dev = ids.shape[0], ids.device
        t = torch.arange(total_k, dtype=INDEX_DTYPE, device=dev)
        cu = self._cu_k.clamp(0, total_k)
        edges = torch.zeros(total_k + 1, dtype=torch.bool, device=dev).index_fill_(0, cu, True)  # sequence bounds
        starts = edges[:-1] | (ids != ids.roll(1))  # a key that begins a run of equal ids inside its sequence
        ends = edges[1:] | (ids != ids.roll(-1))  # a key that ends one
        # Each key's run as packed rows [first, end), one extra entry (an empty run) so that indexing at row total_k,
        # where an empty sequence at the end points, stays in bounds.
        pad = torch.zeros(1, dtype=INDEX_DTYPE, device=dev)
        first = torch.where(starts, t, 0).cummax(0).values
        end = torch.where(ends, t + 1, total_k).flip(0).cummin(0).values.flip(0)
        self._first, self._end = torch.cat([first, pad]), torch.cat([end, pad])

    def _own_key(self, b, aligned, len_k):
        """The packed row of the query's own key (it names the query's document), and whether it exists."""
        inside = (aligned >= 0) & (aligned < len_k)
        return self._cu_k[b] + torch.where(inside, aligned, 0), inside

    def _keep(self, b, aligned, kv_idx):
        row, inside = self._own_key(b, aligned, self._lk[b])
        return inside & (self._first[row] == self._first[self._cu_k[b] + kv_idx])

    def _interval(self, b, aligned, len_k):
        row, inside = self._own_key(b, aligned, len_k)
        start = self._cu_k[b]
        return (torch.where(inside, self._first[row] - start, 0), torch.where(inside, self._end[row] - start, 0))


def document_mask(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, document_ids: torch.Tensor) -> MaskMod:
    """A document mask_mod for sequences that pack several documents: each query sees the keys of its own document.

    Args:
        cu_seqlens_q, cu_seqlens_k: the call's (B + 1,) tensors.
        document_ids: (total_k,) integer tensor, one id per packed key, on cu_seqlens_k's device. A document is a run
            of equal consecutive ids inside a sequence (the same id after another one starts a new document).

    Query ``q_idx`` of sequence ``b`` is the token at key position ``a = q_idx + Lk[b] - Lq[b]`` (bottom-right
    aligned, as is_causal) and sees the keys of the document holding that key; a query with no key at its position
    sees none. Add ``is_causal=True`` for causal documents. ``varlen_attention(..., mask_mod=document_mask(cu_q, cu_k,
    ids))`` with these same tensors runs as ``key_range`` (each query's document, built in O(total_q + total_k), no
    mask tensor; the kernels skip the key tiles of other documents); elsewhere it is a plain mask_mod of the same
    values."""
    if not isinstance(document_ids, torch.Tensor) or document_ids.dim() != 1 or \
            document_ids.dtype.is_floating_point or document_ids.dtype == torch.bool:
        got = f"a {tuple(document_ids.shape)} {document_ids.dtype} tensor" if isinstance(
            document_ids, torch.Tensor) else type(document_ids).__name__
        raise ValueError(f"dmattn.document_mask: document_ids must be a (total_k,) integer tensor, got {got}")
    return _Documents(cu_seqlens_q, cu_seqlens_k, document_ids)


class _Chunks(_IntervalMaskMod):
    def __init__(self, cu_seqlens_q, cu_seqlens_k, chunk_size: int):
        super().__init__(cu_seqlens_q, cu_seqlens_k)
        self._chunk = chunk_size

    def _keep(self, b, aligned, kv_idx):
        return (kv_idx <= aligned) & (kv_idx // self._chunk == aligned // self._chunk)

    def _interval(self, b, aligned, len_k):
        return aligned - aligned % self._chunk, aligned + 1  # % and // round toward -inf: no key for aligned < 0


def chunked_causal(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, chunk_size: int) -> MaskMod:
    """Chunked causal attention (the local layers of Llama 4, transformers' ``attention_chunk_size``): each
    sequence's keys are cut into chunks of ``chunk_size`` positions from its first key, and a query sees the keys of
    its own chunk up to itself: ``kv_idx <= a and kv_idx // chunk_size == a // chunk_size``, with ``a = q_idx + Lk[b]
    - Lq[b]`` (bottom-right aligned, as is_causal). A query with no key at its position (``a < 0``) sees none.

    ``varlen_attention(..., mask_mod=chunked_causal(cu_q, cu_k, n))`` with these same tensors and ``is_causal=False``
    runs as ``key_range`` (each query's interval ``[a - a % n, a + 1)``, built in O(total_q), no mask tensor; the
    kernels skip the key tiles of other chunks); elsewhere it is a plain mask_mod of the same values."""
    if type(chunk_size) is not int or chunk_size < 1:
        raise ValueError(f"dmattn.chunked_causal: chunk_size must be an int >= 1, got {chunk_size!r}")
    return _Chunks(cu_seqlens_q, cu_seqlens_k, chunk_size)


def proven_key_range(mask_mod, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, total_q: int) -> \
        Optional[torch.Tensor]:
    """(total_q, 2) int32 key_range of a mask_mod proven one interval of keys per query by its expression (a window,
    a band, a prefix-LM or chunks written as a mask_mod: dmattn_ops/_intervals.py), in eager mode; else None. Rows
    outside every sequence get an empty range. O(total_q) tensor ops, no host sync."""
    if cu_seqlens_q.shape[0] < 2:
        return None
    interval = _intervals.prove(mask_mod)
    if interval is None or not interval.terms_fit(cu_seqlens_q.shape[0] - 1, cu_seqlens_q.device):
        return None
    key = _proven_range_key(interval, cu_seqlens_q, cu_seqlens_k, total_q)
    found = _PROVEN_RANGES.get(key[0]) if key is not None else None
    if found is not None:
        return found[0]
    rows = _Packing(cu_seqlens_q, cu_seqlens_k, total_q, cu_seqlens_q.device).query_rows()
    out = interval.key_range(rows.pos, rows.count.clamp(min=0), rows.seq)
    if key is not None:
        _PROVEN_RANGES.put(key[0], (out, key[1]))
    return out


# The key_ranges of proven mods built last (each layer of a model calls the op with the same mod and batch: the first
# builds, the others reuse), keyed by the proof's bounds and the batch's tensors by identity and version counter.
_PROVEN_RANGES = _kept.KeptTensors(8)


def _proven_range_key(interval, cu_seqlens_q, cu_seqlens_k, total_q: int):
    """(key, tensors the entry must keep alive) of a proven key_range, or None where it is not cached: under CUDA-graph
    capture (a tensor made there must not outlive the capture's pool), or for tensors without a version counter."""
    if not _kept.may_keep(cu_seqlens_q.device):
        return None
    signature = interval.signature()
    if signature is None:
        return None
    try:
        batch = tuple((id(t), t._version, t.device) for t in (cu_seqlens_q, cu_seqlens_k))
    except RuntimeError:  # inference tensors
        return None
    return (signature[0], batch, total_q), (*signature[1], cu_seqlens_q, cu_seqlens_k)


def native_key_range(mask_mod, cu_seqlens_q, cu_seqlens_k, total_q: int, total_k: int) -> Optional[torch.Tensor]:
    """The key_range of a prefix_lm / document_mask / chunked_causal mask_mod made for these very cu_seqlens tensors,
    else None."""
    if not _made_for(mask_mod, _IntervalMaskMod, cu_seqlens_q, cu_seqlens_k):
        return None
    if isinstance(mask_mod, _Documents) and mask_mod._first.shape[0] != total_k + 1:
        raise ValueError(f"dmattn.document_mask: document_ids must have one id per packed key, (total_k,) = "
                         f"({total_k},), got ({mask_mod._first.shape[0] - 1},)")
    return mask_mod.key_range(total_q)
