"""prefix_lm, document_mask and chunked_causal: mask_mods that are one interval of keys per query by construction,
which varlen_attention runs as the op's key_range (no mask tensor built).

Each mod is checked three ways: its values (what create_mask evaluates, the mask FlexAttention would see) against the
mask written here from its docstring; its key_range (the intervals the op gets) against those values; and the op's
output through the native path against the float64 reference given the dense mask.
"""

import pytest
import torch
import torch._dynamo.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention

H, HK, D = 4, 2, 16
# Sequences with more keys than queries (decode-like), as many (prefill), more queries than keys, and empty ones.
LENS = ([5, 40, 3, 0, 7, 1], [9, 40, 30, 4, 0, 1])


def batch(lens_q, lens_k, device="cpu", dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), H, D, generator=g)
    k, v = (torch.randn(sum(lens_k), HK, D, generator=g) for _ in range(2))
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)] + [cu_q.to(device), cu_k.to(device)]


def document_ids(lens_k, seed=0):
    """Per-key ids with 1-4 runs per sequence, ids reused across sequences and one id coming back after another (a
    new document, since a document is a run)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lk in lens_k:
        cuts = sorted(torch.randint(0, lk + 1, (3,), generator=g).tolist())
        run = torch.zeros(lk, dtype=torch.int64)
        for c in cuts:
            run[c:] += 1
        out.append(run % 2)  # ids alternate 0 / 1: equal ids in separate runs
    return torch.cat(out)


def expected_mask(kind, lens_q, lens_k, max_k, arg):
    """(total_q, max_k) bool, written from the docstrings: a = q_idx + Lk - Lq is the query's own key position."""
    rows, k0 = [], 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        j = torch.arange(max_k)
        for i in range(lq):
            a = i + lk - lq
            if kind == "prefix":
                prefix = arg if isinstance(arg, int) else int(arg[b])
                row = (j <= a) | (j < prefix)
            elif kind == "chunks":  # keys of the query's chunk [n * floor(a / n), n * floor(a / n) + n), up to a
                first = (a // arg) * arg
                row = (j <= a) & (j >= first)
            else:
                ids = arg[k0:k0 + lk]
                row = torch.zeros(max_k, dtype=torch.bool)
                if 0 <= a < lk:
                    lo = a
                    while lo > 0 and ids[lo - 1] == ids[a]:
                        lo -= 1
                    hi = a + 1
                    while hi < lk and ids[hi] == ids[a]:
                        hi += 1
                    row[lo:hi] = True
            rows.append(row & (j < lk))
        k0 += lk
    return torch.stack(rows) if rows else torch.zeros(0, max_k, dtype=torch.bool)


def mods_of(cu_q, cu_k, lens_q, lens_k, device="cpu"):
    """(name, mod, kind, arg) for every mod the tests cover."""
    per_seq = torch.tensor([2, 0, 100, 1, 3, 0])[:len(lens_q)]
    ids = document_ids(lens_k)
    return [
        ("prefix 6", dmattn_ops.prefix_lm(cu_q, cu_k, 6), "prefix", 6),
        ("prefix 0", dmattn_ops.prefix_lm(cu_q, cu_k, 0), "prefix", 0),
        ("prefix per sequence", dmattn_ops.prefix_lm(cu_q, cu_k, per_seq.to(device)), "prefix", per_seq),
        ("documents", dmattn_ops.document_mask(cu_q, cu_k, ids.to(device)), "documents", ids),
        ("chunks 4", dmattn_ops.chunked_causal(cu_q, cu_k, 4), "chunks", 4),
        ("chunks 1", dmattn_ops.chunked_causal(cu_q, cu_k, 1), "chunks", 1),  # each query sees its own key alone
        ("chunks 64", dmattn_ops.chunked_causal(cu_q, cu_k, 64), "chunks", 64),  # past every sequence: causal
    ]


MOD_NAMES = ["prefix 6", "prefix 0", "prefix per sequence", "documents", "chunks 4", "chunks 1", "chunks 64"]


def the_mod(name, cu_q, cu_k, lens_q, lens_k, device="cpu"):
    return next(m for m in mods_of(cu_q, cu_k, lens_q, lens_k, device) if m[0] == name)[1:]


def ranges_as_mask(key_range, lens_q, lens_k, max_k):
    lk = torch.tensor(lens_k).repeat_interleave(torch.tensor(lens_q))
    j = torch.arange(max_k)
    r = key_range.long().cpu()
    return (j >= r[:, :1]) & (j < r[:, 1:]) & (j < lk[:, None])


@pytest.mark.parametrize("name", MOD_NAMES)
def test_values_and_key_range_agree_with_the_definition(name):
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
    mod, kind, arg = the_mod(name, cu_q, cu_k, lens_q, lens_k)
    want = expected_mask(kind, lens_q, lens_k, 40, arg)
    built = dmattn_ops.create_mask(mod, cu_q, cu_k, 40, 40, H)
    assert built.shape == (q.shape[0], 1, 40)  # a plain mask_mod to create_mask: query-side, heads broadcast
    assert torch.equal(built[:, 0], want)
    key_range = mod.key_range(q.shape[0])
    assert key_range.dtype == torch.int32 and key_range.shape == (q.shape[0], 2)
    assert torch.equal(ranges_as_mask(key_range, lens_q, lens_k, 40), want)
    assert bool((key_range[:, 0] <= key_range[:, 1]).all())  # clipped: never reversed


class _OpSpy:
    """Records the mask and key_range each call of dmattn::varlen_fwd gets."""

    def __init__(self):
        self.real, self.calls = torch.ops.dmattn.varlen_fwd, []

    def __call__(self, *args):
        self.calls.append({"mask": args[7], "key_range": args[17]})
        return self.real(*args)


@pytest.mark.parametrize("name", MOD_NAMES)
@pytest.mark.parametrize("key_mask", [False, True], ids=["", "key-side mask"])
def test_runs_as_key_range_and_matches_reference(device, name, key_mask, monkeypatch):
    """With the call's own cu_seqlens tensors the op gets key_range and no mask built from the mod (a key-side mask=
    tensor may come along); with other tensors the mod is a plain query-side mask. Both match the reference."""
    lens_q, lens_k = LENS
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k, device, dtype)
    mod, kind, arg = the_mod(name, cu_q, cu_k, lens_q, lens_k, device)
    keep = (torch.rand(k.shape[0], 1, generator=torch.Generator().manual_seed(3)) < 0.7) if key_mask else None
    spy = _OpSpy()
    monkeypatch.setattr(torch.ops.dmattn, "varlen_fwd", spy)
    kw = dict(mask=keep.to(device)) if key_mask else {}
    native = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=mod, **kw)
    assert spy.calls[0]["key_range"] is not None
    assert spy.calls[0]["mask"] is None if keep is None else spy.calls[0]["mask"].shape == keep.shape
    dense = expected_mask(kind, lens_q, lens_k, 40, arg)
    if keep is not None:
        ks, k0 = [], 0
        for lk in lens_k:
            ks.append(torch.nn.functional.pad(keep[k0:k0 + lk, 0], (0, 40 - lk)))
            k0 += lk
        lk_of_row = torch.cat([torch.stack([ks[b]] * lq) for b, lq in enumerate(lens_q) if lq])
        dense = dense & lk_of_row
    want = reference_varlen_attention(*(t.cpu().double() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(), 40, 40,
                                      mask=dense.unsqueeze(1))[0]
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native.cpu().double(), want, **tol)
    if not key_mask:  # other cu_seqlens tensors: a plain mask_mod, which its expression proves an interval
        # (the prefix-LM's and the chunks': dmattn_ops/_intervals.py) or create_mask evaluates into a query-side mask
        # (the documents')
        as_mask = dmattn_ops.varlen_attention(q, k, v, cu_q.clone(), cu_k.clone(), 40, 40, mask_mod=mod)
        if kind in ("prefix", "chunks"):
            assert spy.calls[1]["key_range"] is not None and spy.calls[1]["mask"] is None
        else:
            assert spy.calls[1]["key_range"] is None and spy.calls[1]["mask"].dim() == 3
        torch.testing.assert_close(as_mask.cpu().double(), want, **tol)


def test_causal_documents_on_top_of_is_causal(device):
    """document_mask + is_causal=True: the causal documents of a packed sequence (each query its document's keys up
    to itself)."""
    lens = [64, 1, 33]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, cu_q, cu_k = batch(lens, lens, device, dtype, seed=4)
    ids = document_ids(lens, seed=7)
    got = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 64, 64, is_causal=True,
                                      mask_mod=dmattn_ops.document_mask(cu_q, cu_k, ids.to(device)))
    dense = expected_mask("documents", lens, lens, 64, ids)
    want = reference_varlen_attention(*(t.cpu().double() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(), 64, 64,
                                      mask=dense.unsqueeze(1), is_causal=True)[0]
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_documents_with_a_native_window(device):
    """Causal documents with a sliding window: document_mask beside is_causal and window_size, every limit native."""
    lens = [64, 1, 33]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v, cu_q, cu_k = batch(lens, lens, device, dtype, seed=5)
    ids = document_ids(lens, seed=9)
    got = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 64, 64, is_causal=True, window_size=(6, 0),
                                      mask_mod=dmattn_ops.document_mask(cu_q, cu_k, ids.to(device)))
    dense = expected_mask("documents", lens, lens, 64, ids)
    want = reference_varlen_attention(*(t.cpu().double() for t in (q, k, v)), cu_q.cpu(), cu_k.cpu(), 64, 64,
                                      mask=dense.unsqueeze(1), is_causal=True, window_size=(6, 0))[0]
    tol = dict(rtol=1.6e-2, atol=1.6e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.cpu().double(), want, **tol)


def test_key_range_is_built_once_per_total_q_in_eager_mode():
    """Every layer of a model calls the op with the same mod: the key_range is built on the first call only."""
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
    mod = dmattn_ops.document_mask(cu_q, cu_k, document_ids(lens_k))
    first = mod.key_range(q.shape[0])
    assert mod.key_range(q.shape[0]) is first
    assert mod.key_range(q.shape[0] + 3).shape == (q.shape[0] + 3, 2)  # another total_q: built again


def test_a_key_range_built_under_inference_mode_is_not_saved_for_a_backward():
    """A mod first called under torch.inference_mode (a generation), then in a training step: the key_range kept from
    the first call is an inference tensor, which the op's autograd could not save; the training call builds its own."""
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
    mod = dmattn_ops.document_mask(cu_q, cu_k, document_ids(lens_k))
    with torch.inference_mode():
        under = mod.key_range(q.shape[0])
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=mod)
    qq = q.clone().requires_grad_()
    dmattn_ops.varlen_attention(qq, k, v, cu_q, cu_k, 40, 40, mask_mod=mod).sum().backward()
    assert qq.grad is not None and torch.isfinite(qq.grad).all()
    assert torch.equal(mod.key_range(q.shape[0]), under) and not mod.key_range(q.shape[0]).is_inference()


def test_gradients_through_the_native_path():
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
    ids = document_ids(lens_k)
    mod = dmattn_ops.document_mask(cu_q, cu_k, ids)
    dense = dmattn_ops.create_mask(mod, cu_q.clone(), cu_k.clone(), 40, 40, H)
    grads = []
    for kw in (dict(mask_mod=mod), dict(mask=dense)):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        dmattn_ops.varlen_attention(qq, kk, vv, cu_q, cu_k, 40, 40, **kw).square().sum().backward()
        grads.append((qq.grad, kk.grad, vv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiles_in_one_graph_across_batches():
    """Built inside the compiled function, the three mods trace with fullgraph=True, dynamic=True and the second
    batch (other B, total_q, total_k) reuses the graph."""

    def attend(q, k, v, cu_q, cu_k, ids, prefix):
        a = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=dmattn_ops.prefix_lm(cu_q, cu_k, prefix))
        d = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, is_causal=True,
                                        mask_mod=dmattn_ops.document_mask(cu_q, cu_k, ids))
        c = dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, mask_mod=dmattn_ops.chunked_causal(cu_q, cu_k, 8))
        return a, d, c

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attend, backend=counter, fullgraph=True, dynamic=True)
    for lens_q, lens_k in (LENS, ([7, 20, 3], [7, 25, 30])):
        q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
        prefix = torch.arange(len(lens_q)) * 3
        args = (q, k, v, cu_q, cu_k, document_ids(lens_k), prefix)
        for got, want in zip(compiled(*args), attend(*args)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count == 1


def test_errors():
    lens_q, lens_k = LENS
    q, k, v, cu_q, cu_k = batch(lens_q, lens_k)
    with pytest.raises(ValueError, match=r"dmattn.prefix_lm: prefix_lengths must be an int >= 0 or a \(B,\) integer "
                                         r"tensor, got -1"):
        dmattn_ops.prefix_lm(cu_q, cu_k, -1)
    with pytest.raises(ValueError, match=r"prefix_lengths must be an int or a \(B,\) = \(6,\) integer tensor, got a "
                                         r"\(5,\) torch.int64 tensor"):
        dmattn_ops.prefix_lm(cu_q, cu_k, torch.arange(5))
    with pytest.raises(ValueError, match=r"dmattn.document_mask: document_ids must be a \(total_k,\) integer tensor, "
                                         r"got a \(84,\) torch.float32 tensor"):
        dmattn_ops.document_mask(cu_q, cu_k, torch.zeros(84))
    with pytest.raises(ValueError, match=r"document_ids must have one id per packed key, \(total_k,\) = \(84,\), "
                                         r"got \(80,\)"):
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40,
                                    mask_mod=dmattn_ops.document_mask(cu_q, cu_k, torch.zeros(80, dtype=torch.int64)))
    key_range = torch.zeros(q.shape[0], 2, dtype=torch.int32)
    for bad in (0, -3, 2.0, True, torch.tensor(4)):
        with pytest.raises(ValueError, match=r"dmattn.chunked_causal: chunk_size must be an int >= 1, got "):
            dmattn_ops.chunked_causal(cu_q, cu_k, bad)
    with pytest.raises(ValueError, match="pass either key_range or a prefix_lm / document_mask / chunked_causal "
                                         "mask_mod, not both"):
        dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, 40, 40, key_range=key_range,
                                    mask_mod=dmattn_ops.prefix_lm(cu_q, cu_k, 3))


@settings(max_examples=60)
@given(data=st.data())
def test_key_range_equals_the_mod_on_drawn_batches(data):
    """On drawn batches (empty sequences, Lq > Lk and Lq < Lk, rows after the last sequence, one-key documents,
    prefixes past the keys, chunks of one key and chunks past the keys) each mod's key_range, as a mask, is exactly what create_mask evaluates; rows no sequence
    owns get (0, 0)."""
    batch_size = data.draw(st.integers(1, 5), label="B")
    lens_q = data.draw(st.lists(st.integers(0, 9), min_size=batch_size, max_size=batch_size), label="lens_q")
    lens_k = data.draw(st.lists(st.integers(0, 12), min_size=batch_size, max_size=batch_size), label="lens_k")
    extra_rows = data.draw(st.integers(0, 3), label="rows after the last sequence")
    total_q, total_k, max_k = sum(lens_q) + extra_rows, sum(lens_k), max(max(lens_k), 1)
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    kind = data.draw(st.sampled_from(["prefix_lm", "document_mask", "chunked_causal"]), label="mod")
    if kind == "chunked_causal":
        mod = dmattn_ops.chunked_causal(cu_q, cu_k, data.draw(st.integers(1, 14), label="chunk_size"))
    elif kind == "prefix_lm":
        prefix = data.draw(st.one_of(st.integers(0, 14), st.lists(st.integers(0, 14), min_size=batch_size,
                                                                  max_size=batch_size)), label="prefix")
        mod = dmattn_ops.prefix_lm(cu_q, cu_k, prefix if isinstance(prefix, int) else torch.tensor(prefix))
    else:
        ids = torch.tensor(data.draw(st.lists(st.integers(0, 2), min_size=total_k, max_size=total_k), label="ids"),
                           dtype=torch.int64)
        mod = dmattn_ops.document_mask(cu_q, cu_k, ids)
    key_range = mod.key_range(total_q)
    built = dmattn_ops.create_mask(mod, cu_q, cu_k, max(lens_q), max_k, H, total_q=total_q, total_k=total_k)
    lk = torch.tensor(lens_k).repeat_interleave(torch.tensor(lens_q))
    lk = torch.cat([lk, torch.zeros(extra_rows, dtype=lk.dtype)])
    j = torch.arange(max_k)
    as_mask = (j >= key_range[:, :1].long()) & (j < key_range[:, 1:].long()) & (j < lk[:, None])
    assert torch.equal(built[:, 0], as_mask)
    assert bool((key_range[:, 0] <= key_range[:, 1]).all())
    assert key_range[total_q - extra_rows:].eq(0).all()

