"""A decode loop under torch.compile(fullgraph=True, dynamic=True): per-step time and recompiles (issue 10).

    python tools/bench_decode_loop.py [--device cuda] [--steps 8] [--json PATH]

B sequences with 1 new query each and a packed key cache of 1024-4096 keys per sequence (seeded), H = 32, Hk = 8,
D = 128 (bfloat16 on CUDA, float32 on the CPU). Every step each sequence gains one key, so total_k, cu_seqlens_k and
max_seqlen_k change; the compiled step computes a key-side gating mask (gate > 0, about half the keys) in the graph
and calls dmattn_ops.varlen_attention with the gate as key-side bias. Reported per step (median over the steps after
the first, which compiles):
  setup_ms      appending the new keys to the packed cache and building cu_seqlens_k (a user's per-step work with a
                packed cache: it copies the whole cache; issue 13's cache layouts remove it)
  attention_ms  the compiled step (mask + attention), synchronized
and the number of graphs compiled (1 means no recompile after the first step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def gated_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, gate):
    import dmattn_ops

    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=gate > 0, bias=gate, is_causal=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--min-k", type=int, default=1024)
    ap.add_argument("--max-k", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-k", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import dmattn_ops
    from torch._dynamo.testing import CompileCounterWithBackend

    device = torch.device(args.device)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.min_k, args.max_k + 1, (args.batch,), generator=g).tolist()
    hk, d = args.heads_k, args.head_dim
    cache = {
        "k": [torch.randn(n, hk, d, generator=g).to(device, dtype) for n in lengths],
        "v": [torch.randn(n, hk, d, generator=g).to(device, dtype) for n in lengths],
        "gate": [torch.randn(n, hk, generator=g).to(device) for n in lengths],
    }
    cu_q = dmattn_ops.cu_seqlens([1] * args.batch, device=device)
    counter = CompileCounterWithBackend("inductor")
    step_fn = torch.compile(gated_attention, backend=counter, fullgraph=True, dynamic=True)

    setup_ms, attention_ms = [], []
    for step in range(args.steps + 1):
        bc.synchronize(device)
        t0 = time.perf_counter()
        for name, rows in cache.items():
            shape = rows[0].shape[1:]
            new = torch.randn(args.batch, 1, *shape, generator=g).to(device, rows[0].dtype)
            for b in range(args.batch):
                rows[b] = torch.cat([rows[b], new[b]])
        k, v, gate = (torch.cat(cache[name]) for name in ("k", "v", "gate"))
        seqlens_k = [t.shape[0] for t in cache["k"]]
        cu_k = dmattn_ops.cu_seqlens(seqlens_k, device=device)
        q = torch.randn(args.batch, args.heads, d, generator=g).to(device, dtype)
        bc.synchronize(device)
        t1 = time.perf_counter()
        step_fn(q, k, v, cu_q, cu_k, 1, max(seqlens_k), gate)
        bc.synchronize(device)
        t2 = time.perf_counter()
        if step > 0:  # step 0 compiles
            setup_ms.append((t1 - t0) * 1e3)
            attention_ms.append((t2 - t1) * 1e3)
        else:
            compile_s = t2 - t1

    result = dict(setup_ms=statistics.median(setup_ms), attention_ms=statistics.median(attention_ms),
                  graphs_compiled=counter.frame_count, first_step_s=compile_s)
    print(f"decode loop on {args.device}: B={args.batch}, keys {args.min_k}-{args.max_k} (+1 per step), "
          f"H={args.heads}, Hk={hk}, D={d}, {args.steps} steps after the first")
    print(f"  graphs compiled {result['graphs_compiled']} (first step {compile_s:.1f} s); per step: set-up "
          f"{result['setup_ms']:.3f} ms, attention {result['attention_ms']:.3f} ms")
    if args.json:
        bc.write_json(args.json, dict(
            args=vars(args), lengths=lengths, **result, setup_ms_steps=setup_ms, attention_ms_steps=attention_ms,
            environment=bc.environment(device, os.path.join(os.path.dirname(__file__), "..")),
            dmattn_build=dmattn_ops.build_info(), command=" ".join(sys.argv)))
    return 0 if counter.frame_count == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
