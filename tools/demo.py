"""`make demo`: one decode batch with a key-side mask and bias, through every way dmattn_ops runs.

The batch (B=16 sequences, 1-8 queries and 512-2048 keys each, H=8, Hk=2, D=64, float32) keeps the top 50% of each
sequence's keys by a gating score, as a key-side mask (total_k, Hk), with a key-side bias (total_k, Hk). It runs
  1. eager,
  2. under torch.compile(fullgraph=True, dynamic=True), on this batch and on a second batch of other sizes,
  3. through torch.export (Dims on total_q, total_k and B), running the exported module on both batches,
checks each output against the float64 reference, then prints what the key-side layout saves in memory and the time
against torch SDPA on padded tensors with a materialized (B, H, max_q, max_k) mask. Exits non-zero on a mismatch.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
from torch.export import Dim

import dmattn_ops

from bench_cpu import SDPA_HAS_GQA, describe, make_decode_batch, mask_bytes, pad_for_sdpa, time_side_by_side, unpad
from packed_batch import PackedBatch

TOLERANCE = 1e-4  # float32 kernel vs float64 reference, max abs difference of out


def attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, mask, bias):
    return dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                       mask=mask, bias=bias, return_lse=True)


class Attend(torch.nn.Module):
    def forward(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, mask, bias):
        return attend(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias)


def inputs(db: PackedBatch):
    """The arguments of attend: the op's, up to bias."""
    return (db.q, db.k, db.v, db.cu_seqlens_q, db.cu_seqlens_k, db.max_seqlen_q, db.max_seqlen_k, db.mask, db.bias)


def max_error(result, expected) -> float:
    """Largest |out - out_ref|; lse is compared too (finite entries; -inf must match exactly)."""
    (out, lse), (out_ref, lse_ref) = result, expected
    lse_ref = lse_ref.float()
    if not torch.equal(torch.isinf(lse), torch.isinf(lse_ref)):
        return float("inf")
    finite = torch.isfinite(lse_ref)
    lse_err = (lse[finite] - lse_ref[finite]).abs().max().item() if finite.any() else 0.0
    return max((out.double() - out_ref).abs().max().item(), lse_err)


def export_program(db: PackedBatch):
    total_q, total_k, batch = Dim("total_q", min=1), Dim("total_k", min=1), Dim("batch", min=1)
    dynamic = {
        "q": {0: total_q}, "k": {0: total_k}, "v": {0: total_k},
        "cu_seqlens_q": {0: batch + 1}, "cu_seqlens_k": {0: batch + 1},
        "max_seqlen_q": Dim.DYNAMIC, "max_seqlen_k": Dim.DYNAMIC,
        "mask": {0: total_k}, "bias": {0: total_k},
    }
    return torch.export.export(Attend(), inputs(db), dynamic_shapes=dynamic)


def main() -> int:
    torch.manual_seed(0)
    db = make_decode_batch(seed=0)
    other = make_decode_batch(batch=11, seed=1)  # other B, total_q, total_k, max_seqlen: no recompile expected
    shape = describe(db)
    print(f"decode batch: B={shape['B']}, total_q={shape['total_q']}, total_k={shape['total_k']}, H={shape['H']}, "
          f"Hk={shape['Hk']}, D={shape['D']}, float32; key-side mask ({shape['total_k']}, {shape['Hm']}) keeps "
          f"{shape['kept_keys']:,} of {shape['mask_entries']:,}, key-side bias ({shape['total_k']}, {shape['Hm']})")

    expected = {id(b): b.reference() for b in (db, other)}
    failures = []

    def report(label, batch, result, seconds):
        err = max_error(result, expected[id(batch)])
        ok = err <= TOLERANCE
        if not ok:
            failures.append(label)
        print(f"  {label:34} max |err| vs float64 reference {err:.1e}  {'ok' if ok else 'MISMATCH'}  ({seconds:.1f} s)")

    print("runs (outputs and lse checked against the float64 reference):")
    with torch.inference_mode():
        t0 = time.perf_counter()
        report("eager", db, attend(*inputs(db)), time.perf_counter() - t0)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, dynamic=True)
    for label, batch in (("torch.compile, batch 1", db), ("torch.compile, batch 2 (new sizes)", other)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = compiled(*inputs(batch))
        report(label, batch, result, time.perf_counter() - t0)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    if graphs != 1:
        failures.append(f"torch.compile built {graphs} graphs, expected 1")
    print(f"  torch.compile built {graphs} graph for the two batches (fullgraph=True: no graph break)")

    t0 = time.perf_counter()
    program = export_program(db)
    exported = program.module()
    export_s = time.perf_counter() - t0
    ops = sorted({str(n.target) for n in program.graph.nodes if isinstance(n.target, torch._ops.OpOverload)})
    for label, batch in (("torch.export, batch 1", db), ("torch.export, batch 2 (new sizes)", other)):
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = exported(*inputs(batch))
        report(label, batch, result, time.perf_counter() - t0 + (export_s if batch is db else 0.0))
    print(f"  exported graph: {', '.join(ops)}, dynamic in total_q, total_k, B and the max_seqlens")

    sdpa = pad_for_sdpa(db)
    mem = mask_bytes(db, sdpa)
    print("mask + bias memory for this batch:")
    print(f"  key-side   (total_k, Hm)                 {mem['key_side']:>12,} bytes")
    print(f"  query-side (total_q, Hm, max_seqlen_k)   {mem['query_side']:>12,} bytes  "
          f"({mem['query_side'] / mem['key_side']:.1f}x the key-side)")
    print(f"  SDPA padded (B, H, max_q, max_k) float   {mem['sdpa_materialized']:>12,} bytes  "
          f"({mem['sdpa_materialized'] / mem['key_side']:.1f}x the key-side)")

    runs, gqa = 20, ("enable_gqa" if SDPA_HAS_GQA else "expand")
    with torch.inference_mode():
        sdpa_out = unpad(sdpa.run(gqa), db)
        dm_out = db.run()[0]
        if (sdpa_out - dm_out).abs().max().item() > TOLERANCE:
            failures.append("SDPA agreement")
        times = time_side_by_side({
            "dmattn_ops": lambda: db.run()[0],
            "sdpa": lambda: sdpa.run(gqa),
        }, runs=runs, warmup=3)
    dm, sd = statistics.median(times["dmattn_ops"]), statistics.median(times["sdpa"])
    print(f"time, median of {runs} runs on {torch.get_num_threads()} CPU threads (tools/bench_cpu.py measures more "
          f"carefully):")
    print(f"  dmattn_ops, packed, key-side mask + bias  {dm:8.2f} ms")
    print(f"  torch SDPA, padded, materialized mask     {sd:8.2f} ms  (speed-up of dmattn_ops: {sd / dm:.2f}x)")

    if failures:
        print(f"FAILED: {', '.join(failures)}")
        return 1
    print("demo ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
