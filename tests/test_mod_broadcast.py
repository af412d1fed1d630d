"""The adapter's eager evaluation on broadcast grids (dmattn_ops/_broadcast.py): which mods take it, that it gives
the vmap evaluation's tensor bit for bit, that every other mod falls back to vmap, and that positions are clamped
exactly where a mod reads memory at a key position.

The reference for mods outside the registry is a plain loop calling the mod on 0-d tensors, one index tuple at a
time: it shares no code with either evaluation.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import dmattn_ops
from dmattn_ops import _broadcast
from dmattn_ops.mods import additive_part, create_bias, create_mask

try:  # tests/ as a package or as a plain folder on sys.path
    from . import mod_registry as reg
except ImportError:
    import mod_registry as reg

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ACCEPTED = [case.name for case in reg.CASES if case.rejected is None]


def _builds(batch, name):
    """(build function, the mod it evaluates as a mask_mod) for each operand of registry case name."""
    mask_mod, score_mod = reg.CASES_BY_NAME[name].mods(batch)
    shape = dict(num_heads=reg.HEADS, num_heads_k=reg.HEADS_K, total_q=batch.q.shape[0], total_k=batch.k.shape[0])
    bounds = (batch.cu_seqlens_q, batch.cu_seqlens_k, batch.max_seqlen_q, batch.max_seqlen_k)
    out = []
    if mask_mod is not None:
        out.append((lambda: create_mask(mask_mod, *bounds, **shape), mask_mod))
    if score_mod is not None:
        out.append((lambda: create_bias(score_mod, *bounds, **shape), additive_part(score_mod)))
    return out


class _GridSpy:
    """Wraps dmattn_ops.mods._on_grid and _one_sequence (a one-sequence build's guarded pass): counts the grid
    evaluations and those that fell back to vmap. (A one-sequence pass that leaves the operand to another build, a
    key-side or head-dependent mod's, counts as neither: that build's grid evaluation follows.)"""

    def __init__(self, monkeypatch):
        self.calls, self.fell_back = 0, 0
        on_grid, one_sequence = dmattn_ops.mods._on_grid, dmattn_ops.mods._one_sequence

        def spy_on_grid(*args):
            out = on_grid(*args)
            self.calls += 1
            self.fell_back += out is None
            return out

        def spy_one_sequence(*args):
            probed, out = one_sequence(*args)
            self.calls += out is not None or probed is None
            self.fell_back += probed is None
            return probed, out

        monkeypatch.setattr(dmattn_ops.mods, "_on_grid", spy_on_grid)
        monkeypatch.setattr(dmattn_ops.mods, "_one_sequence", spy_one_sequence)


def _vmap_everywhere(monkeypatch):
    """No probe vouches for any mod: every build evaluates under vmap."""
    monkeypatch.setattr(_broadcast, "probe", lambda *args: None)
    monkeypatch.setattr(dmattn_ops.mods, "_one_sequence", lambda *args: (None, None))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lens", ["packed", "one_sequence"])
@pytest.mark.parametrize("name", ACCEPTED)
def test_registry_mods_take_the_grid_and_match_vmap(name, lens, device, monkeypatch):
    """Every registry mod is elementwise: it is evaluated on broadcast grids (no fallback), and the tensor equals the
    vmap evaluation's bit for bit, don't-care entries included. Both the grid and the sequence-by-sequence block path
    (CPU) are covered, and a batch of one sequence, built in one guarded pass."""
    batch = (reg.make_batch() if lens == "packed" else reg.make_batch(lens_q=reg.ONE_Q, lens_k=reg.ONE_K)).to(device)
    for build, mod in _builds(batch, name):
        vmapped = []
        with monkeypatch.context() as m:
            _vmap_everywhere(m)
            for entries in (0, 1 << 62):  # block by block (CPU), then the grid
                m.setattr(dmattn_ops.mods, "PER_SEQUENCE_MIN_ENTRIES", entries)
                vmapped.append(build())
        for entries, expected in zip((0, 1 << 62), vmapped):
            with monkeypatch.context() as m:
                m.setattr(dmattn_ops.mods, "PER_SEQUENCE_MIN_ENTRIES", entries)
                spy = _GridSpy(m)
                got = build()
            assert spy.calls > 0 and spy.fell_back == 0, name
            assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), name


_TABLE = torch.arange(10)
_TABLE_2D = torch.arange(40).view(4, 10)


def _reads(mod):
    found = _broadcast.probe(mod, *(torch.zeros((), dtype=torch.int64) for _ in range(3)))
    return None if found is None else (found.reads_rows, found.reads_keys)


@pytest.mark.parametrize("mod, reads", [
    (lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx - kv_idx < 4), (False, False)),  # a window
    (lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) | (kv_idx < _TABLE[b]), (True, False)),  # a prefix per sequence
    (lambda b, h, q_idx, kv_idx: _TABLE[b + kv_idx] > 3, (True, True)),  # a per-key gate
    (lambda b, h, q_idx, kv_idx: _TABLE[h // 2] > kv_idx, (False, False)),  # a head's table: h is always valid
    (lambda b, h, q_idx, kv_idx: q_idx % (kv_idx + 1) == 0, (True, True)),  # integer remainder: may divide by 0
    (lambda b, h, q_idx, kv_idx: (q_idx / (kv_idx + 1)) > 0.5, (False, False)),  # true division is total
    (lambda b, h, q_idx, kv_idx: q_idx // 4 >= kv_idx // 4, (False, False)),  # a block mask: by a nonzero number
    (lambda b, h, q_idx, kv_idx: torch.div(kv_idx, 3, rounding_mode="floor") < q_idx % 5, (False, False)),
    (lambda b, h, q_idx, kv_idx: (kv_idx ** 2 < q_idx ** 2.0) & (kv_idx.pow(0) == 1), (False, False)),
    (lambda b, h, q_idx, kv_idx: kv_idx.float() // 0 > q_idx, (False, True)),  # by zero (it would fail on ints)
    (lambda b, h, q_idx, kv_idx: 8 // (kv_idx + 1) == q_idx, (False, True)),  # the index is the divisor
    (lambda b, h, q_idx, kv_idx: kv_idx.float() ** -1 > q_idx, (False, True)),  # a negative int power (as above)
    (lambda b, h, q_idx, kv_idx: 2 ** kv_idx > q_idx, (False, True)),  # the index is the exponent
    (lambda b, h, q_idx, kv_idx: kv_idx % torch.tensor(3) == q_idx, (False, True)),  # a tensor divisor: its value
])
def test_reads_decide_what_is_clamped(mod, reads):
    assert _reads(mod) == reads


NOT_ELEMENTWISE = {  # valid mods under vmap that the grids cannot evaluate as written
    "reduction": lambda b, h, q_idx, kv_idx: torch.stack([q_idx, kv_idx]).sum() > 3,
    "expand_reduce": lambda b, h, q_idx, kv_idx: (q_idx.unsqueeze(0).expand(3) > kv_idx).all(),
    "chained_index": lambda b, h, q_idx, kv_idx: _TABLE_2D[b][kv_idx] > q_idx + 12,
    "shape_read": lambda b, h, q_idx, kv_idx: (kv_idx <= q_idx) & (q_idx.dim() == 0),
    "in_place": lambda b, h, q_idx, kv_idx: q_idx.clone().add_(1) > kv_idx,
    "several_values": lambda b, h, q_idx, kv_idx: (kv_idx + torch.tensor([0, 1])).max() > q_idx,
}


def _loop_reference(mod, cu_q, cu_k, total_q, width):
    """(total_q, 1, width) bool: mod at every (query, key) of a sequence, one 0-d call each; False elsewhere."""
    out = torch.zeros(total_q, 1, width, dtype=torch.bool)
    for b in range(len(cu_q) - 1):
        for i in range(cu_q[b + 1] - cu_q[b]):
            for j in range(cu_k[b + 1] - cu_k[b]):
                idx = [torch.tensor(x) for x in (b, 0, i, j)]
                out[cu_q[b] + i, 0, j] = bool(mod(*idx))
    return out


@pytest.mark.parametrize("name", list(NOT_ELEMENTWISE))
def test_other_mods_fall_back_to_vmap(name):
    """The guard refuses them before they run on the grids, and the vmap evaluation builds the right tensor."""
    mod = NOT_ELEMENTWISE[name]
    assert _reads(mod) is None
    cu_q, cu_k = [0, 3, 4], [0, 4, 10]
    mask = create_mask(mod, torch.tensor(cu_q), torch.tensor(cu_k), 3, 6, 2, total_q=4, total_k=10)
    assert torch.equal(mask, _loop_reference(mod, cu_q, cu_k, 4, 6))


@pytest.mark.parametrize("device", DEVICES)
def test_key_reads_are_clamped_into_the_sequence(device, monkeypatch):
    """A mod that reads a per-key tensor exactly total_k long, where the last sequence is shorter than
    max_seqlen_k: its grid positions past that sequence's keys would read past the tensor's end. They are clamped,
    so the grid evaluation runs (no fallback, no out-of-bounds read on the GPU) and matches the reference."""
    cu_q, cu_k = [0, 2, 5], [0, 6, 9]  # the second sequence: 3 keys of max_seqlen_k = 6
    keys = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    cu_k_t = torch.tensor(cu_k, device=device)
    keys_dev = keys.to(device)

    def gate_and_causal(b, h, q_idx, kv_idx):
        return keys_dev[cu_k_t[b] + kv_idx] & (kv_idx <= q_idx + 4)

    spy = _GridSpy(monkeypatch)
    mask = create_mask(gate_and_causal, torch.tensor(cu_q, device=device), cu_k_t, 3, 6, 2, total_q=5, total_k=9)
    assert spy.calls == 1 and spy.fell_back == 0

    def on_cpu(b, h, q_idx, kv_idx):
        return keys[torch.tensor(cu_k)[b] + kv_idx] & (kv_idx <= q_idx + 4)

    assert torch.equal(mask.cpu(), _loop_reference(on_cpu, cu_q, cu_k, 5, 6))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keys, rows", [(5, 4), (5, 7), (1, 3), (0, 3)])
def test_one_sequence_clamps_key_reads_by_one_bound(keys, rows, device, monkeypatch):
    """B = 1: every row is evaluated in the one sequence, so the key positions are clamped by one bound (the largest
    row's last key) and stay a broadcast. A mod reading a tensor exactly total_k long, max_seqlen_k past the
    sequence's keys, padding rows past cu_seqlens_q[-1], a sequence of one key and of none: the grid evaluation runs
    (no fallback: no read out of bounds) and matches the reference."""
    queries = 3
    cu_q, cu_k = [0, queries], [0, keys]
    gate = torch.arange(max(keys, 1)) % 2 == 0
    gate_dev, cu_k_t = gate[:max(keys, 1)].to(device), torch.tensor(cu_k, device=device)

    def gate_and_causal(b, h, q_idx, kv_idx):
        return gate_dev[cu_k_t[b] + kv_idx] & (kv_idx <= q_idx + 1)

    spy = _GridSpy(monkeypatch)
    width = keys + 3
    mask = create_mask(gate_and_causal, torch.tensor(cu_q, device=device), cu_k_t, queries, width, 2,
                       total_q=rows, total_k=max(keys, 1))
    assert mask.shape == (rows, 1, width) and spy.calls == 1 and spy.fell_back == 0

    def on_cpu(b, h, q_idx, kv_idx):
        return gate[torch.tensor(cu_k)[b] + kv_idx] & (kv_idx <= q_idx + 1)

    assert torch.equal(mask.cpu(), _loop_reference(on_cpu, cu_q, cu_k, rows, width))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_side", [True, False])
def test_only_the_probe_runs_under_the_guard(query_side, device, monkeypatch):
    """The guard watches the mod on the probe's small grids; the build's own grid, the same code on larger tensors,
    runs with no torch-function mode of ours (its ops then cost no Python of the guard's), and gives the reference's
    tensor."""
    from torch.overrides import _get_current_function_mode_stack

    guarded = []

    def mod(b, h, q_idx, kv_idx):
        guarded.append(any(isinstance(m, _broadcast._Elementwise) for m in _get_current_function_mode_stack()))
        return (kv_idx > q_idx - 3) & (kv_idx <= q_idx + 1) if query_side else kv_idx % 2 == 0

    cu_q, cu_k = [0, 3, 7], [0, 4, 9]
    spy = _GridSpy(monkeypatch)
    mask = create_mask(mod, torch.tensor(cu_q, device=device), torch.tensor(cu_k, device=device), 4, 5, 2,
                       total_q=7, total_k=9)
    assert spy.calls == 1 and spy.fell_back == 0
    assert guarded == [True, False]  # the probe, then the build's grid
    if query_side:
        assert torch.equal(mask.cpu(), _loop_reference(mod, cu_q, cu_k, 7, 5))
    else:  # key positions 0-3 and 0-4: the even ones
        assert torch.equal(mask.cpu(), torch.tensor([[p % 2 == 0] for p in (0, 1, 2, 3, 0, 1, 2, 3, 4)]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["query", "key", "head"])
def test_one_sequence_is_built_in_one_guarded_pass(side, device, monkeypatch):
    """B = 1: the mod runs once, under the guard, on the operand's own grids, and that pass is the operand (the probe
    on small grids never runs). A key-side mod's pass leaves the key-side grid to run after it, unguarded; so does a
    head-dependent one's (its pass had one head). Each operand equals the reference."""
    from torch.overrides import _get_current_function_mode_stack

    guarded, rows = [], []

    def mod(b, h, q_idx, kv_idx):
        guarded.append(any(isinstance(m, _broadcast._Elementwise) for m in _get_current_function_mode_stack()))
        rows.append(q_idx)  # its shape read here would be refused by the guard
        if side == "key":
            return kv_idx % 2 == 0
        return (kv_idx <= q_idx + 1) & ((h <= 1) if side == "head" else True)

    monkeypatch.setattr(_broadcast, "probe", None)  # not called: calling it would fail
    cu_q, cu_k = torch.tensor([0, 5], device=device), torch.tensor([0, 4], device=device)
    spy = _GridSpy(monkeypatch)
    mask = create_mask(mod, cu_q, cu_k, 5, 6, 4, total_q=7, total_k=6)
    assert spy.fell_back == 0
    if side == "query":  # 7 rows (2 past the sequence), 6 columns (2 past its keys)
        assert guarded == [True] and rows[0].shape == (7, 1, 1) and mask.shape == (7, 1, 6)
        assert torch.equal(mask.cpu(), _loop_reference(mod, [0, 5], [0, 4], 7, 6))
    elif side == "key":  # key rows 0-3, then 2 rows past cu_seqlens_k[-1]
        assert guarded == [True, False] and mask.shape == (6, 1)
        assert torch.equal(mask.cpu()[:, 0], torch.tensor([True, False, True, False, False, False]))
    else:
        assert guarded == [True, False] and mask.shape == (7, 4, 6)
        for h in range(4):
            expected = _loop_reference(lambda b, h_, q, kv: mod(b, torch.tensor(h), q, kv), [0, 5], [0, 4], 7, 6)
            assert torch.equal(mask.cpu()[:, h:h + 1], expected), h


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mod_kind", ["window", "gate", "rows_and_keys", "two_reads", "divides"])
def test_one_sequence_clamps_key_positions_only_at_a_read(mod_kind, device, monkeypatch):
    """B = 1: the one pass gives the mod its key positions unclamped (0 .. max_seqlen_k - 1, past the sequence's 4
    keys), once. A mod that reads nothing at them (a window) gets no clamp at all. Where an op reads memory, or may
    fail, at a key-dependent value, its key-dependent operands are taken at positions clamped into the sequence: a
    per-key gate exactly total_k long, a table read at q_idx + kv_idx (its last valid index the last row's last key),
    two reads, a remainder whose divisor is 0 one key past the sequence (an integer division by zero fails on the
    CPU). Without the clamp each would read out of bounds (on the CPU an IndexError, on a GPU an illegal address) and
    fall back to vmap. Each operand equals the loop reference."""
    seen = []
    gate = (torch.arange(4) % 2 == 0).to(device)
    table = (torch.arange(7) % 3 != 1).to(device)

    def mod(b, h, q_idx, kv_idx):
        seen.append(kv_idx)  # no op on it: the guard would refuse a shape change
        window = (kv_idx <= q_idx + 1) & (q_idx - kv_idx < 2)
        if mod_kind == "gate":
            return window & gate[kv_idx]
        if mod_kind == "rows_and_keys":
            return window | table[q_idx + kv_idx]
        if mod_kind == "two_reads":
            return window & gate[kv_idx] | gate[kv_idx * 0 + 3 - kv_idx]
        if mod_kind == "divides":
            return window | ((q_idx + 7) % (4 - kv_idx) == 0)
        return window

    cu_q, cu_k = torch.tensor([0, 4], device=device), torch.tensor([0, 4], device=device)
    spy = _GridSpy(monkeypatch)
    mask = create_mask(mod, cu_q, cu_k, 4, 7, 2, total_q=4, total_k=4)
    assert spy.calls == 1 and spy.fell_back == 0 and mask.shape == (4, 1, 7)
    assert [kv.cpu().flatten().tolist() for kv in seen] == [list(range(7))]
    gate, table = gate.cpu(), table.cpu()
    assert torch.equal(mask.cpu(), _loop_reference(mod, [0, 4], [0, 4], 4, 7))


@settings(max_examples=60, deadline=None)
@given(queries=st.integers(0, 9), keys=st.integers(0, 9), pad_q=st.integers(0, 3), pad_k=st.integers(0, 3),
       wider=st.integers(0, 4), offset=st.integers(-3, 3), reads=st.sampled_from(["keys", "rows", "none"]))
def test_one_sequence_pass_matches_the_loop(queries, keys, pad_q, pad_k, wider, offset, reads):
    """The one-sequence pass over random shapes: queries and keys each 0-9 (none at all included), padding rows on
    both sides, max_seqlen_k up to 4 past the keys (max_seqlen_k >= 1), a mod reading a per-key tensor exactly
    total_k long, a per-query one, or nothing. Every entry equals the loop reference, and the pass never falls back
    (no read out of bounds: the CPU would raise)."""
    total_q, total_k, width = queries + pad_q, max(keys + pad_k, 1), max(keys + wider, 1)
    gate, rank = torch.arange(total_k) % 3 != 1, torch.arange(total_q + 1) % 4
    cu_q, cu_k = torch.tensor([0, queries]), torch.tensor([0, keys])

    def mod(b, h, q_idx, kv_idx):
        causal = kv_idx <= q_idx + offset
        if reads == "keys":
            return causal & gate[cu_k[b] + kv_idx]
        return causal | (rank[cu_q[b] + q_idx] == 0) if reads == "rows" else causal

    with pytest.MonkeyPatch.context() as m:
        spy = _GridSpy(m)
        mask = create_mask(mod, cu_q, cu_k, queries, width, 2, total_q=total_q, total_k=total_k)
    assert mask.shape == (total_q, 1, width)
    if total_q:
        assert spy.calls == 1 and spy.fell_back == 0
    assert torch.equal(mask, _loop_reference(mod, [0, queries], [0, keys], total_q, width))


def test_values_that_are_not_one_per_index_tuple_raise_as_before():
    """A mod returning a tensor the grids do not reach (several values) or a non-tensor fails with the vmap path's
    error, not a silent broadcast."""
    cu = torch.tensor([0, 3])
    several = torch.ones(7, dtype=torch.bool)  # 7: the probe's key-grid size, so a shape could pass for one
    with pytest.raises(ValueError, match="must return one value per"):
        create_mask(lambda b, h, q_idx, kv_idx: several, cu, cu, 3, 3, 2, total_q=3, total_k=3)
    with pytest.raises(TypeError, match="must return a tensor"):
        create_mask(lambda b, h, q_idx, kv_idx: True, cu, cu, 3, 3, 2, total_q=3, total_k=3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows", ["packed_rows", "tensor ops"])
@pytest.mark.parametrize("name", ["sliding_window", "document_causal", "per_head_gating", "alibi"])
def test_compiled_build_equals_the_eager_grid(name, rows, device, monkeypatch):
    """Compiled code evaluates under vmap (the guard is not traced): torch.compile(fullgraph=True, dynamic=True) of
    the build gives the eager grid's tensor, query-side and key-side, with each packed row's facts from
    dmattn::packed_rows (where the build has its kernel for the device) or from tensor ops (a build without it). On
    CUDA this also runs inductor's GPU lowering of the build (its searchsorted once refused a sliced boundaries tensor
    there, and only there)."""
    batch = reg.make_batch().to(device)
    for build, _ in _builds(batch, name):
        eager = build()
        if rows == "tensor ops":
            monkeypatch.setattr(dmattn_ops.mods, "_has_packed_rows", lambda device_type: False)
        torch._dynamo.reset()
        compiled = torch.compile(build, fullgraph=True, dynamic=True)
        assert torch.equal(compiled(), eager), name
        monkeypatch.undo()


def test_compiled_build_calls_packed_rows():
    """Where the build has dmattn::packed_rows' kernel (every build on the CPU), compiled code calls it too: inductor
    would otherwise fuse the rows' tensor ops into the grid's kernel, which on a GPU works out each entry's row facts
    again (2.1x the time, NOTES: run DV). The check reading the kernel table is a constant to dynamo: no graph break.
    The don't-care entries stay a tensor expression there (inductor fuses it into the grid's kernel), never the
    in-place dmattn::zero_unseen_, which eager builds call."""
    batch = reg.make_batch()
    (build, _), = _builds(batch, "sliding_window")
    targets = []

    def backend(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(build, backend=backend, fullgraph=True, dynamic=True)()
    assert torch.ops.dmattn.packed_rows.default in targets or torch.ops.dmattn.packed_rows in targets, targets
    assert not any("zero_unseen" in str(t) for t in targets), targets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ACCEPTED)
def test_rows_by_packed_rows_equal_rows_by_tensor_ops(name, device, monkeypatch):
    """Builds take each packed row's facts from dmattn::packed_rows (one launch) where the build has its kernel for the
    device, else from tensor ops. Both give the same operands, grid and vmap paths alike."""
    batch = reg.make_batch().to(device)
    for build, _ in _builds(batch, name):
        for probe in (_broadcast.probe, lambda *args: None):
            with monkeypatch.context() as m:
                if probe is not _broadcast.probe:
                    _vmap_everywhere(m)
                native = build()
                m.setattr(dmattn_ops.mods, "_has_packed_rows", lambda device_type: False)
                by_ops = build()
            assert torch.equal(native, by_ops), name


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops a build runs."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["sliding_window", "document_causal", "per_head_gating"])
def test_dont_care_entries_are_zeroed_in_place(name, device, monkeypatch):
    """An eager build's grid gets its don't-care entries (past each row's key count, key rows past cu_seqlens_k[-1])
    from dmattn::zero_unseen_, one op in place, where the build has its kernel; the operand equals the tensor
    expression's (a build without the kernels). Query-side and key-side registry mods."""
    batch = reg.make_batch().to(device)
    for build, _ in _builds(batch, name):
        with _OpLog() as log:
            native = build()
        assert "zero_unseen_" in log.names and "bitwise_and" not in log.names[log.names.index("zero_unseen_"):], \
            (name, log.names)
        monkeypatch.setattr(dmattn_ops.mods, "_has_packed_rows", lambda device_type: False)
        assert torch.equal(native, build()), name
        monkeypatch.undo()


@pytest.mark.parametrize("device", DEVICES)
def test_one_sequence_learnable_bias_keeps_its_gradient(device):
    """The one-sequence pass with a score_mod reading a table that requires grad: the bias requires grad (its
    don't-care entries by the tensor expression, never in place) and the table's gradient is the weights of the
    entries that read each key."""
    cu, cu_k = torch.tensor([0, 3], device=device), torch.tensor([0, 4], device=device)
    table = torch.linspace(-1.0, 1.0, 5, device=device, requires_grad=True)  # 4 keys and a row past cu_seqlens_k

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + table[cu_k[b] + kv_idx] + q_idx * 0.25

    bias = create_bias(score_mod, cu, cu_k, 3, 6, 2, total_q=4, total_k=5)  # width 6: 2 columns past the keys
    assert bias.requires_grad and bias.shape == (4, 1, 6)
    values = torch.zeros(4, 1, 6)
    for i in range(3):
        for t in range(4):
            values[i, 0, t] = table[t].item() + i * 0.25
    torch.testing.assert_close(bias.detach().cpu(), values)
    weights = torch.arange(1.0, bias.numel() + 1, device=device).view(bias.shape)
    (bias * weights).sum().backward()
    expected = torch.zeros(5, dtype=torch.float64)
    w = weights.double().cpu()
    for t in range(4):  # key t at column t of the sequence's 3 query rows; rows 3 and columns 4-5 are don't-care
        expected[t] = sum(w[i, 0, t] for i in range(3))
    torch.testing.assert_close(table.grad.double().cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("query_side", [False, True])
def test_a_learnable_bias_keeps_its_gradient(query_side, device):
    """A score_mod reading a table that requires grad gives a bias that requires grad, and its gradient is the one
    the contract gives: the table's entry at each seen (query, key) entry, don't-care entries 0. (The in-place
    don't-care op has no derivative: such a bias takes the tensor expression.)"""
    cu = torch.tensor([0, 3, 3, 7], device=device)  # sequence 1 has no query; 7 key rows, 9 packed (2 past the end)
    cu_k = torch.tensor([0, 2, 4, 7], device=device)
    total_q, total_k, width = 8, 9, 3
    table = torch.linspace(-1.0, 1.0, total_k, device=device, requires_grad=True)

    def score_mod(score, b, h, q_idx, kv_idx):
        extra = (q_idx * 0.25) if query_side else 0.0
        return score + table[cu_k[b] + kv_idx] + extra

    bias = create_bias(score_mod, cu, cu_k, 4, width, 2, total_q=total_q, total_k=total_k)
    assert bias.requires_grad and bias.shape == ((total_q, 1, width) if query_side else (total_k, 1))
    weights = torch.arange(1.0, bias.numel() + 1, device=device).view(bias.shape)
    (bias * weights).sum().backward()
    expected = torch.zeros(total_k, dtype=torch.float64)
    cu_l, cu_k_l, w = cu.tolist(), cu_k.tolist(), weights.double().cpu()
    for b in range(3):
        for t in range(cu_k_l[b], cu_k_l[b + 1]):
            if query_side:  # key t is seen by every query of its sequence, at column t - cu_k[b]
                expected[t] += sum(w[i, 0, t - cu_k_l[b]] for i in range(cu_l[b], cu_l[b + 1]))
            else:
                expected[t] += w[t, 0]
    torch.testing.assert_close(table.grad.double().cpu(), expected)
