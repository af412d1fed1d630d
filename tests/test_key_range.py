"""key_range: one interval of visible key positions per query, (total_q, 2) int32, on top of causal, window and masks.

Every case is checked against the float64 reference (dmattn_ops.reference, which applies the ranges by the contract)
and against the same call with the ranges written as a query-side bool mask, the layout they replace. On CUDA each
case runs through both kernels (the decode kernel reads the ranges per packed row, the prefill kernel in its
query-side variant).
"""

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SEQ_ARGS = ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")


def ranges_of(kind, lens_q, lens_k, g):
    """key_range rows for each sequence: a 'window' of 5 keys, a 'prefix' LM (the first third bidirectional, then
    causal), causal 'documents' (3 per sequence), causal 'chunks' of 8 keys (Llama 4's chunked attention), or
    'random' intervals (empty, reversed and out of range included). lens_k: the keys each sequence uses."""
    rows = []
    for lq, lk in zip(lens_q, lens_k):
        shift = lk - lq  # query i's own key is i + shift (bottom-right aligned, as is_causal)
        docs = sorted(torch.randint(0, max(lk, 1), (2,), generator=g).tolist())
        for i in range(lq):
            me = i + shift
            if kind == "window":
                rows.append((me - 4, me + 1))
            elif kind == "prefix":
                rows.append((0, max(lk // 3, me + 1)))
            elif kind == "documents":
                start = max([0] + [d for d in docs if d <= me])
                rows.append((start, me + 1))
            elif kind == "chunks":
                rows.append((me - me % 8, me + 1))
            else:
                rows.append(tuple(torch.randint(-3, lk + 4, (2,), generator=g).tolist()))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 2)


def make_call(lens_q, lens_k, kind, *, H=4, Hk=2, D=32, dtype=torch.float32, device="cpu", key_mask=False,
              bias=None, used=None, seed=0):
    """used: seqused_k, the keys each sequence uses of its lens_k rows (the rest are slack, as in a padded cache
    read in place); the ranges count positions among them."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    total_q, total_k = sum(lens_q), sum(lens_k)
    call = dict(q=rand(total_q, H, D), k=rand(total_k, Hk, D), v=rand(total_k, Hk, D),
                cu_seqlens_q=dmattn_ops.cu_seqlens(lens_q), cu_seqlens_k=dmattn_ops.cu_seqlens(lens_k),
                max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max(lens_k, default=0),
                key_range=ranges_of(kind, lens_q, lens_k if used is None else used, g))
    if used is not None:
        call["seqused_k"] = torch.tensor(used, dtype=torch.int32)
    if key_mask:
        call["mask"] = torch.rand(total_k, 1, generator=g) < 0.7
    if bias == "key":
        call["bias"] = torch.randn(total_k, Hk, generator=g)
    elif bias == "query":
        call["bias"] = torch.randn(total_q, 1, call["max_seqlen_k"], generator=g)
    return {n: t.to(device) if isinstance(t, torch.Tensor) else t for n, t in call.items()}


def run(call, **kw):
    c = dict(call)
    args = [c.pop(n) for n in SEQ_ARGS]
    return dmattn_ops.varlen_attention(*args, return_lse=True, **c, **kw)


def reference(call, **kw):
    def cpu(t):
        return t.cpu() if isinstance(t, torch.Tensor) else t

    c = {n: cpu(t) for n, t in {**call, **kw}.items()}
    return reference_varlen_attention(*[c.pop(n) for n in SEQ_ARGS], **c)


def as_query_mask(call):
    """The same call with its ranges as a query-side (total_q, 1, max_seqlen_k) bool mask (and a key-side mask,
    if any, folded in): what a caller without key_range passes."""
    cu_q, cu_k = call["cu_seqlens_q"].tolist(), call["cu_seqlens_k"].tolist()
    rng = call["key_range"].long().cpu()
    j = torch.arange(call["max_seqlen_k"])
    allowed = (j >= rng[:, :1]) & (j < rng[:, 1:])  # (total_q, max_seqlen_k)
    if call.get("mask") is not None:
        key_mask = call["mask"].cpu()[:, 0]
        for b in range(len(cu_q) - 1):
            lk = cu_k[b + 1] - cu_k[b]
            allowed[cu_q[b]:cu_q[b + 1], :lk] &= key_mask[cu_k[b]:cu_k[b + 1]]
    return dict(call, key_range=None, mask=allowed[:, None, :].to(call["q"].device))


def _kernels(device):
    return ["auto"] if device == "cpu" else ["decode", "prefill"]


CASES = {
    # name: (lens_q, lens_k, ranges, make_call kwargs, varlen_attention kwargs)
    "prefill_window": ([40, 17, 0, 64], [40, 17, 0, 64], "window", dict(), dict()),
    "prefill_prefix_lm": ([33, 70], [33, 70], "prefix", dict(bias="key"), dict()),
    "prefill_documents_causal": ([90, 12], [90, 12], "documents", dict(key_mask=True), dict(is_causal=True)),
    "prefill_random_query_bias": ([25, 31], [25, 40], "random", dict(bias="query"), dict()),
    "decode_documents": ([1, 3, 2, 4], [120, 77, 1, 200], "documents", dict(key_mask=True, bias="key"), dict()),
    "decode_random_mqa": ([2, 1, 4], [65, 130, 9], "random", dict(H=8, Hk=1), dict()),
    "decode_window_and_op_window": ([3, 2], [100, 64], "prefix", dict(), dict(is_causal=True, window_size=(20, 0))),
    # the transformers backend's chunked layers in place: rows of a padded cache, seqused_k, a padding mask
    "decode_chunks_seqused": ([1, 2, 3], [40, 40, 40], "chunks", dict(used=[17, 40, 9], key_mask=True),
                              dict(is_causal=True)),
    "prefill_chunks_seqused": ([30, 12], [64, 64], "chunks", dict(used=[30, 50]), dict(is_causal=True)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_key_range_matches_reference_and_query_mask(device, dtype, case, monkeypatch):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("float32 has no CUDA kernel")
    lens_q, lens_k, kind, call_kw, kw = CASES[case]
    call = make_call(lens_q, lens_k, kind, dtype=dtype, device=device, **call_kw)
    # The ranges as a query-side mask (the key-side mask folded in): compared where the call has no bias.
    masked = as_query_mask(call) if call.get("bias") is None else None
    for kernel in _kernels(device):
        if kernel != "auto":
            monkeypatch.setenv("DMATTN_KERNEL", kernel)
        out, lse = run(call, **kw)
        ref_out, ref_lse = reference(call, **kw)
        tol = TOL[dtype]
        torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
        torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)
        if masked is not None:
            m_out, m_lse = run(masked, **kw)
            torch.testing.assert_close(out, m_out, atol=tol, rtol=tol)
            torch.testing.assert_close(lse, m_lse, atol=tol, rtol=tol)


def test_rows_with_no_key_in_range_are_empty(device):
    """A reversed, empty or out-of-range interval sees no key: out 0, lse -inf (the contract's empty row)."""
    call = make_call([3], [10], "window", device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    call["key_range"] = torch.tensor([[5, 5], [7, 2], [10, 30]], dtype=torch.int32, device=device)
    out, lse = run(call)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all()


def test_gradients_match_reference():
    """Autograd through the op (the CPU backward reads the ranges too) against the float64 reference's. Every row
    keeps a key here: the reference's own gradient is NaN through a row that sees none."""
    call = make_call([20, 9], [26, 9], "documents", bias="key")
    leaves = {n: call[n].clone().requires_grad_() for n in ("q", "k", "v", "bias")}
    out, _ = run(dict(call, **leaves), is_causal=True)
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    ref_leaves = {n: call[n].double().requires_grad_() for n in leaves}
    ref_out, _ = reference(dict(call, **ref_leaves), is_causal=True)
    (ref_out * grad.double()).sum().backward()
    for n in leaves:
        torch.testing.assert_close(leaves[n].grad.double(), ref_leaves[n].grad, atol=1e-4, rtol=1e-4, msg=n)


@pytest.mark.parametrize("kind", ["window", "prefix", "documents", "random"])
@pytest.mark.parametrize("backward", ["kernel", "blockwise"])
def test_cuda_gradients_match_reference(kind, backward, cuda_device, monkeypatch):
    """The CUDA backward reads the ranges too (the fused kernels per row, the blockwise path as a mask): gradients of
    q, k, v and a key-side bias under causal + key ranges + a key-side mask, by the forward's accuracy rule against the
    float64 reference (rows that see no key are not compared: the reference's own gradient is NaN there)."""
    from samples import assert_gradients_close

    monkeypatch.setenv("DMATTN_BWD", backward)
    call = make_call([70, 9, 130], [90, 9, 130], kind, D=64, dtype=torch.bfloat16, key_mask=True, bias="key")
    grad = torch.randn(sum([70, 9, 130]), 4, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def gradients(run_call, leaves):
        out, _ = run_call(dict(call, **leaves))
        (out.double().cpu() * grad).sum().backward()
        return {n: t.grad.cpu() for n, t in leaves.items()}

    names = ("q", "k", "v", "bias")
    got = gradients(lambda c: run({n: t.to(cuda_device) if isinstance(t, torch.Tensor) else t
                                   for n, t in c.items()}, is_causal=True),
                    {n: call[n].to(cuda_device).requires_grad_() for n in names})
    want = gradients(lambda c: reference(c, is_causal=True, dtype=torch.float64),
                     {n: call[n].double().requires_grad_() for n in names})
    base = gradients(lambda c: reference(c, is_causal=True, dtype=torch.bfloat16),
                     {n: call[n].clone().requires_grad_() for n in names})
    assert_gradients_close(got, want, base, torch.bfloat16)


def test_compiled_with_key_range_one_graph():
    """torch.compile(fullgraph=True, dynamic=True): the same result as eager, one compile across batch shapes."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def f(q, k, v, cu_q, cu_k, max_q, max_k, key_range):
        return dmattn_ops.varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, key_range=key_range, is_causal=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, backend=counter, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    for lens in ([12, 30], [7, 19, 25], [40]):
        call = make_call(lens, lens, "documents")
        args = [call[n] for n in SEQ_ARGS] + [call["key_range"]]
        torch.testing.assert_close(compiled(*args), f(*args), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_opcheck_with_key_range():
    call = make_call([5, 9], [8, 9], "prefix", bias="key")
    args = tuple(call[n] for n in SEQ_ARGS) + (None, call["bias"], None, True, -1, -1, None, None, None, None,
                                               call["key_range"])
    torch.library.opcheck(torch.ops.dmattn.varlen_fwd.default, args)
