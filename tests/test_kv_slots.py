"""kv_slots: keys read from a pool (a paged KV cache flattened, or a token pool) in place.

Packed key row r of cu_seqlens_k's ranges is pool row kv_slots[r] of k, v and key-side operands. Every call here is
checked against the float64 reference (dmattn_ops.reference, which gathers the rows by the contract) and against the
same call on the gathered rows as packed keys. On CUDA each case runs through both kernels: the decode kernel reads
the pool in place, the prefill kernel gets the rows gathered by the binding.
"""

import pytest
import torch

import dmattn_ops
from dmattn_ops.reference import reference_varlen_attention
from packed_batch import capture_cuda_graph

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def paged_cache(lens_q, lens_k, *, H=4, Hk=2, D=32, page_size=16, dtype=torch.float32, device="cpu", mask_heads=0,
                bias_heads=0, shared_prefix_pages=0, seed=0):
    """A paged cache holding sequences of lens_k keys in shuffled pages (plus spare ones), its block table and the
    matching call. Sequences share their first shared_prefix_pages pages (prefix caching). Unused block-table
    entries are -1: the call must never read them (seqused_k stops each sequence at its length)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens_q)
    pages_per_seq = max(-(-n // page_size) for n in lens_k) if lens_k else 0
    needed = [-(-n // page_size) for n in lens_k]
    own = [max(n - shared_prefix_pages, 0) for n in needed]
    num_pages = shared_prefix_pages + sum(own) + 3  # 3 pages nobody uses
    order = torch.randperm(num_pages, generator=g).tolist()
    table = torch.full((B, max(pages_per_seq, 1)), -1, dtype=torch.int32)
    shared, next_page = order[:shared_prefix_pages], shared_prefix_pages
    for b in range(B):
        pages = shared[:needed[b]] + order[next_page:next_page + own[b]]
        next_page += own[b]
        table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
    pool = num_pages * page_size

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = rand(sum(lens_q), H, D)
    k, v = rand(pool, Hk, D), rand(pool, Hk, D)
    slots, cu_k, max_k = dmattn_ops.paged_kv_slots(table, page_size)
    call = dict(
        q=q, k=k, v=v, cu_seqlens_q=dmattn_ops.cu_seqlens(lens_q), cu_seqlens_k=cu_k,
        max_seqlen_q=max(lens_q, default=0), max_seqlen_k=max_k, seqused_k=torch.tensor(lens_k, dtype=torch.int32),
        kv_slots=slots,
    )
    if mask_heads:
        call["mask"] = torch.rand(pool, mask_heads, generator=g) < 0.6
    if bias_heads:
        call["bias"] = torch.randn(pool, bias_heads, generator=g)
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in call.items()}


def packed_equivalent(call):
    """The same call on the pool rows it uses, gathered into packed keys (each sequence's rows in order)."""
    slots = call["kv_slots"].long()
    used = call["seqused_k"].tolist()
    cu = call["cu_seqlens_k"].tolist()
    rows = torch.cat([slots[cu[b]:cu[b] + n] for b, n in enumerate(used)]) if used else slots[:0]
    packed = dict(call, k=call["k"][rows], v=call["v"][rows], kv_slots=None, seqused_k=None,
                  cu_seqlens_k=dmattn_ops.cu_seqlens(used, device=slots.device), max_seqlen_k=max(used, default=0))
    for name in ("mask", "bias"):
        if call.get(name) is not None and call[name].dim() == 2:
            packed[name] = call[name][rows]
    return packed


def run(call, **kw):
    c = dict(call)
    args = [c.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    return dmattn_ops.varlen_attention(*args, return_lse=True, **c, **kw)


def reference(call, **kw):
    c = dict(call)
    args = [c.pop(n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    def cpu(t):
        return t.cpu() if isinstance(t, torch.Tensor) else t

    return reference_varlen_attention(*map(cpu, args), **{n: cpu(t) for n, t in {**c, **kw}.items()})


def assert_matches_reference(out, lse, call, **kw):
    ref_out, ref_lse = reference(call, **kw)
    tol = TOL[call["q"].dtype]
    torch.testing.assert_close(out.cpu().double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=tol, rtol=tol)


CASES = {
    # name: (lens_q, lens_k, paged_cache kwargs, varlen_attention kwargs)
    "decode": ([1, 2, 1, 4], [37, 160, 0, 95], dict(), dict()),
    "decode_causal_gqa_masked_bias": ([3, 1, 4], [70, 129, 33], dict(mask_heads=2, bias_heads=1),
                                      dict(is_causal=True)),
    "decode_mqa_mask_per_kv_head": ([2, 2], [150, 64], dict(H=8, Hk=1, mask_heads=1, bias_heads=1), dict()),
    "decode_window_sinks_softcap": ([2, 1], [200, 90], dict(), dict(is_causal=True, window_size=(40, 0),
                                                                    softcap=5.0)),
    "prefill_causal": ([40, 25], [60, 25], dict(mask_heads=1), dict(is_causal=True)),
    "shared_prefix_pages": ([1, 1, 2], [40, 47, 33], dict(shared_prefix_pages=2, bias_heads=2), dict()),
    "all_keys_masked_and_empty": ([1, 2], [0, 20], dict(mask_heads=1), dict()),
}


def _kernels(device):
    return ["auto"] if device == "cpu" else ["decode", "prefill"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16, 5])
@pytest.mark.parametrize("case", CASES)
def test_kv_slots_match_reference_and_packed(device, dtype, page_size, case, monkeypatch):
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("float32 has no CUDA kernel")
    lens_q, lens_k, cache_kw, kw = CASES[case]
    if "window_size" in kw:
        kw = dict(kw, sinks=torch.linspace(-1, 1, cache_kw.get("H", 4)).to(device))
    call = paged_cache(lens_q, lens_k, page_size=page_size, dtype=dtype, device=device, **cache_kw)
    packed = packed_equivalent(call)
    for kernel in _kernels(device):
        if kernel != "auto":
            monkeypatch.setenv("DMATTN_KERNEL", kernel)
        out, lse = run(call, **kw)
        assert_matches_reference(out, lse, call, **kw)
        packed_out, packed_lse = run(packed, **kw)
        if device == "cpu":  # one kernel, the same keys in the same order: the same arithmetic
            assert torch.equal(out, packed_out) and torch.equal(lse, packed_lse)
        else:
            tol = TOL[dtype]
            torch.testing.assert_close(out, packed_out, atol=tol, rtol=tol)


def test_lying_kv_slots_stay_in_the_pool(device):
    """Slots outside the pool: the CPU kernel raises; CUDA clamps them into it (the result of the clamped call, read
    in place by the decode kernel and gathered for the prefill kernel), never reading past it."""
    call = paged_cache([1, 2], [50, 30], page_size=16, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                       device=device, bias_heads=1)
    lying = call["kv_slots"].clone()
    lying[3], lying[40], lying[1] = 1 << 30, -(1 << 30), call["k"].shape[0]
    if device == "cpu":
        with pytest.raises(ValueError, match="must be a row of the key pool"):
            run(dict(call, kv_slots=lying))
        return
    clamped = lying.clamp(0, call["k"].shape[0] - 1)
    for kernel in ("decode", "prefill"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DMATTN_KERNEL", kernel)
            out, lse = run(dict(call, kv_slots=lying))
            want, want_lse = run(dict(call, kv_slots=clamped))
        torch.testing.assert_close(out, want, atol=0, rtol=0)
        torch.testing.assert_close(lse, want_lse, atol=0, rtol=0)


def test_gradients_flow_back_into_the_pool():
    """The backward gathers the pool rows and adds their gradients back: a slot two sequences share (a prefix page)
    gets the sum. Checked against the reference's autograd, which indexes the pool by the same slots."""
    call = paged_cache([2, 3], [20, 26], page_size=4, shared_prefix_pages=2, bias_heads=2)
    leaves = {n: call[n].clone().requires_grad_() for n in ("q", "k", "v", "bias")}
    out, lse = run(dict(call, **leaves))
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    ref_leaves = {n: call[n].clone().requires_grad_() for n in leaves}
    ref_out, _ = reference(dict(call, **ref_leaves))
    (ref_out * grad.double()).sum().backward()
    for n in leaves:
        torch.testing.assert_close(leaves[n].grad.double(), ref_leaves[n].grad.double(), atol=1e-4, rtol=1e-4,
                                   msg=n)
    shared_slot = int(call["kv_slots"][0])
    assert leaves["k"].grad[shared_slot].abs().sum() > 0  # the shared page's slot got both sequences' gradients


def test_compiled_decode_step_with_kv_slots():
    """torch.compile(fullgraph=True, dynamic=True) of a decode step that rebuilds kv_slots from a block table: the
    same result as eager, one compile for growing caches."""
    from torch._dynamo.testing import CompileCounterWithBackend

    def step(q, k_cache, v_cache, block_table, seqused_k, cu_q, max_q):
        slots, cu_k, max_k = dmattn_ops.paged_kv_slots(block_table, 16)
        return dmattn_ops.varlen_attention(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), cu_q, cu_k, max_q,
                                           max_k, seqused_k=seqused_k, kv_slots=slots, is_causal=True)

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    torch._dynamo.reset()
    for length in (40, 41, 42):
        call = paged_cache([1, 1], [length, length - 7], page_size=16)
        k_cache, v_cache = call["k"].unflatten(0, (-1, 16)), call["v"].unflatten(0, (-1, 16))
        table = call["kv_slots"].reshape(2, -1, 16)[:, :, 0] // 16
        args = (call["q"], k_cache, v_cache, table, call["seqused_k"], call["cu_seqlens_q"], 1)
        torch.testing.assert_close(compiled(*args), step(*args), atol=0, rtol=0)
    assert counter.frame_count == 1


def test_opcheck_with_kv_slots():
    call = paged_cache([1, 3], [30, 20], page_size=16, mask_heads=1, bias_heads=2)
    args = tuple(call[n] for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")) + (
        call["mask"], call["bias"], None, False, -1, -1, None, None, call["seqused_k"], call["kv_slots"])
    torch.library.opcheck(torch.ops.dmattn.varlen_fwd.default, args)


def test_paged_kv_slots_layout():
    table = torch.tensor([[3, 0], [1, -1]], dtype=torch.int32)
    slots, cu, max_k = dmattn_ops.paged_kv_slots(table, 2)
    assert slots.tolist() == [6, 7, 0, 1, 2, 3, -2, -1]
    assert cu.tolist() == [0, 4, 8] and max_k == 4
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        dmattn_ops.paged_kv_slots(table, 0)
    with pytest.raises(ValueError, match="block_table must be a"):
        dmattn_ops.paged_kv_slots(table.float(), 2)


def test_paged_kv_slots_with_host_lengths_packs_the_slots():
    """seq_lens (host ints) gives one slot per real key: the call needs no seqused_k, and its result is the padded
    layout's."""
    table = torch.tensor([[3, 0], [1, -1]], dtype=torch.int32)
    slots, cu, max_k = dmattn_ops.paged_kv_slots(table, 2, seq_lens=[3, 1])
    assert slots.tolist() == [6, 7, 0, 2] and cu.tolist() == [0, 3, 4] and max_k == 3
    with pytest.raises(ValueError, match="seq_lens must hold B = 2 lengths in \\[0, 4\\]"):
        dmattn_ops.paged_kv_slots(table, 2, seq_lens=[5, 1])

    call = paged_cache([1, 3, 2], [45, 17, 33], page_size=16, mask_heads=1, bias_heads=2)
    table = torch.stack([call["kv_slots"].reshape(3, -1)[b, ::16] // 16 for b in range(3)])
    packed_slots, packed_cu, packed_max = dmattn_ops.paged_kv_slots(table, 16, seq_lens=torch.tensor([45, 17, 33]))
    compact = dict(call, kv_slots=packed_slots, cu_seqlens_k=packed_cu, max_seqlen_k=packed_max, seqused_k=None)
    out, lse = run(compact, is_causal=True)
    want, want_lse = run(call, is_causal=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_paged_decode_step_replays_in_a_cuda_graph(kernel, monkeypatch, cuda_device):
    """A decode step on a paged cache captured once (paged_kv_slots and the op, gathered rows included for the prefill
    kernel) and replayed while the cache, the block table and seqused_k change in place: every replay equals an
    eager call on the same buffers (no host sync, no allocation outside the graph's pool)."""
    monkeypatch.setenv("DMATTN_KERNEL", kernel)
    page, pages_per_seq, H, Hk, D = 16, 4, 8, 2, 64
    g = torch.Generator().manual_seed(0)
    lengths = [5, 17, 40, 31]
    B = len(lengths)
    num_pages = B * pages_per_seq + 2
    k_cache = torch.randn(num_pages, page, Hk, D, generator=g).to(cuda_device, torch.bfloat16)
    v_cache = torch.randn(num_pages, page, Hk, D, generator=g).to(cuda_device, torch.bfloat16)
    gate = torch.randn(num_pages, page, Hk, generator=g).to(cuda_device)
    order = torch.randperm(num_pages, generator=g)[: B * pages_per_seq].reshape(B, pages_per_seq)
    table = order.to(cuda_device, torch.int32)
    used = torch.tensor(lengths, dtype=torch.int32, device=cuda_device)
    q = torch.randn(B, H, D, generator=g).to(cuda_device, torch.bfloat16)
    cu_q = dmattn_ops.cu_seqlens([1] * B, device=cuda_device)

    def run():
        slots, cu_k, max_k = dmattn_ops.paged_kv_slots(table, page)
        return dmattn_ops.varlen_attention(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), cu_q, cu_k, 1, max_k,
                                           mask=gate.flatten(0, 1) > 0, bias=gate.flatten(0, 1), seqused_k=used,
                                           kv_slots=slots, return_lse=True)

    graph, (out, lse) = capture_cuda_graph(run)
    for step in range(4):
        for b in range(B):  # each sequence gains a key in its next slot; the block table's pages are reshuffled once
            n = int(used[b])
            slot = int(table[b, n // page]) * page + n % page
            k_cache.view(-1, Hk, D)[slot] = torch.randn(Hk, D, generator=g).to(cuda_device, torch.bfloat16)
            gate.view(-1, Hk)[slot] = torch.randn(Hk, generator=g).to(cuda_device)
        used += 1
        q.copy_(torch.randn(B, H, D, generator=g).to(cuda_device, torch.bfloat16))
        if step == 2:
            table.copy_(table.flip(1))
        graph.replay()
        want, want_lse = run()
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=lambda m: f"step {step}, out: {m}")
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0, msg=lambda m: f"step {step}, lse: {m}")
        ref_out, _ = reference(dict(q=q, k=k_cache.flatten(0, 1), v=v_cache.flatten(0, 1), cu_seqlens_q=cu_q,
                                    cu_seqlens_k=paged_cu(B, pages_per_seq * page), max_seqlen_q=1,
                                    max_seqlen_k=pages_per_seq * page, mask=gate.flatten(0, 1) > 0,
                                    bias=gate.flatten(0, 1), seqused_k=used,
                                    kv_slots=dmattn_ops.paged_kv_slots(table, page)[0]))
        torch.testing.assert_close(out.double().cpu(), ref_out, atol=2e-2, rtol=2e-2)


def paged_cu(batch, capacity):
    return torch.arange(batch + 1, dtype=torch.int32) * capacity


class _PagedDecode(torch.nn.Module):
    """A serving layer's attention over a paged cache: kv_slots rebuilt from the block table inside the graph."""

    def forward(self, q, k_cache, v_cache, block_table, seqused_k, cu_seqlens_q, gate):
        slots, cu_k, max_k = dmattn_ops.paged_kv_slots(block_table, 16)
        return dmattn_ops.varlen_attention(q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), cu_seqlens_q, cu_k, 8,
                                           max_k, mask=gate.flatten(0, 1) > 0, bias=gate.flatten(0, 1),
                                           seqused_k=seqused_k, kv_slots=slots, is_causal=True)


def test_export_paged_decode_with_dynamic_batch_and_pool():
    """torch.export of the paged layer with the batch, the pool's pages, the pages per sequence and the query count
    dynamic: the exported program equals eager on a batch of other sizes."""
    from torch.export import Dim

    def inputs(lens_q, lens_k, seed):
        call = paged_cache(lens_q, lens_k, page_size=16, mask_heads=2, seed=seed)
        pages = call["kv_slots"].shape[0] // 16 // len(lens_q)
        table = call["kv_slots"].reshape(len(lens_q), pages, 16)[:, :, 0].div(16, rounding_mode="floor").int()
        gate = torch.randn(call["k"].shape[0], 2, generator=torch.Generator().manual_seed(seed))
        return (call["q"], call["k"].unflatten(0, (-1, 16)), call["v"].unflatten(0, (-1, 16)), table,
                call["seqused_k"], call["cu_seqlens_q"], gate.unflatten(0, (-1, 16)))

    batch, pages, per_seq, total_q = Dim("B"), Dim("pages"), Dim("pages_per_seq"), Dim("total_q")
    shapes = ((total_q, None, None), (pages, None, None, None), (pages, None, None, None), (batch, per_seq),
              (batch,), (batch + 1,), (pages, None, None))
    ep = torch.export.export(_PagedDecode(), inputs([2, 1, 3], [40, 70, 20], 0), dynamic_shapes=shapes)
    other = inputs([1, 4, 2, 1, 1], [90, 33, 17, 64, 2], 1)
    torch.testing.assert_close(ep.module()(*other), _PagedDecode()(*other), atol=0, rtol=0)
