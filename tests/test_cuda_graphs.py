"""A decode step captured once in a CUDA graph and replayed while the contents of its inputs change (issue 10).

Serving stacks capture a decode step with fixed-size buffers and replay it every step. That works only if the op
never synchronises with the host, never reads cu_seqlens on the host, and allocates only through torch's caching
allocator (which serves a capture from its private pool). Here the buffers hold a packed key cache with room to
spare: every step each sequence gains a key, so cu_seqlens_k, the packed K / V rows, the key-side gating mask and
the bias all change in place, while every shape and max_seqlen_k (the capacity) stay fixed. Each replay must equal an
eager call on the same buffers.
"""

import re

import pytest
import torch

import dmattn_ops
from packed_batch import capture_cuda_graph

H, HK, D = 8, 2, 64
CAPACITY = 160  # keys per sequence the buffers can hold: 3 KV tiles of 64


def _pack(rows_per_seq, capacity_rows):
    """Packs per-sequence tensors into a buffer of capacity_rows rows (the rest stays zero), returns (buffer, cu)."""
    packed = torch.cat(rows_per_seq)
    buffer = torch.zeros(capacity_rows, *packed.shape[1:], dtype=packed.dtype, device=packed.device)
    buffer[: packed.shape[0]] = packed
    return buffer, dmattn_ops.cu_seqlens([t.shape[0] for t in rows_per_seq], device=packed.device)


@pytest.mark.parametrize("kernel", ["auto", "decode_split_every_tile", "decode_split_every_tile_combine_launch"])
@pytest.mark.parametrize("layout", ["key", "query"])
def test_decode_step_replays_with_new_contents(layout, kernel, monkeypatch, capfd, cuda_device):
    """Also through the decode kernel with a split per 64-key tile (its partials and combine pass in the graph). With
    the key-side gate the kernel merges its own splits (the last split CTA of each unit, by tickets that the order
    pass zeroes in every replay), or with DMATTN_DECODE_COMBINE=launch the combine pass merges them."""
    if kernel != "auto":
        monkeypatch.setenv("DMATTN_KERNEL", "decode")
        monkeypatch.setenv("DMATTN_DECODE_TILES_PER_SPLIT", "1")
    if kernel.endswith("combine_launch"):
        monkeypatch.setenv("DMATTN_DECODE_COMBINE", "launch")
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    g = torch.Generator().manual_seed(0)
    lengths = [5, 70, 9, 130]
    B = len(lengths)
    total_k = B * CAPACITY
    cache = {
        "k": [torch.randn(n, HK, D, generator=g) for n in lengths],
        "v": [torch.randn(n, HK, D, generator=g) for n in lengths],
        "gate": [torch.randn(n, HK, generator=g) for n in lengths],
    }

    def step_inputs():
        k, cu_k = _pack([t.to(cuda_device, torch.bfloat16) for t in cache["k"]], total_k)
        v, _ = _pack([t.to(cuda_device, torch.bfloat16) for t in cache["v"]], total_k)
        gate, _ = _pack([t.to(cuda_device) for t in cache["gate"]], total_k)
        q = torch.randn(B, H, D, generator=g).to(cuda_device, torch.bfloat16)
        return dict(q=q, k=k, v=v, cu_k=cu_k, gate=gate)

    static = step_inputs()
    cu_q = dmattn_ops.cu_seqlens([1] * B, device=cuda_device)
    if layout == "query":  # the gate expanded per query: (total_q, Hk, max_seqlen_k), key j of each query's sequence
        static["gate_q"] = torch.zeros(B, HK, CAPACITY, device=cuda_device)

    def expand_gate(inputs):
        cu = inputs["cu_k"].tolist()
        for b in range(B):
            n = cu[b + 1] - cu[b]
            inputs["gate_q"][b].fill_(-1.0)
            inputs["gate_q"][b, :, :n] = inputs["gate"][cu[b] : cu[b + 1]].T

    def run():
        gate = static["gate"] if layout == "key" else static["gate_q"]
        return dmattn_ops.varlen_attention(
            static["q"], static["k"], static["v"], cu_q, static["cu_k"], 1, CAPACITY,
            mask=gate > 0, bias=gate, return_lse=True,
        )

    if layout == "query":
        expand_gate(static)
    torch.cuda.synchronize()
    capfd.readouterr()
    graph, (out, lse) = capture_cuda_graph(run)
    in_kernel = set(re.findall(r"combine_in_kernel=(\d)", capfd.readouterr().err))
    if kernel != "auto":  # which path the captured call took (query-side terms: the combine launch)
        assert in_kernel == {"1" if kernel == "decode_split_every_tile" and layout == "key" else "0"}, in_kernel

    for step in range(4):
        for name, rows in cache.items():
            for b, t in enumerate(rows):
                rows[b] = torch.cat([t, torch.randn(1, *t.shape[1:], generator=g)])
        fresh = step_inputs()
        for name, t in fresh.items():
            static[name].copy_(t)
        if layout == "query":
            expand_gate(static)
        graph.replay()
        want_out, want_lse = run()
        torch.testing.assert_close(out, want_out, rtol=0, atol=0, msg=lambda m: f"step {step}, out: {m}")
        torch.testing.assert_close(lse, want_lse, rtol=0, atol=0, msg=lambda m: f"step {step}, lse: {m}")
        assert not out.isnan().any(), f"step {step}: valid cu_seqlens, yet NaN (the contract check fired?)"
