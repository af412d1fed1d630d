"""Building a query-side mask: dmattn_ops.create_mask from a mask_mod against the same tensor written by hand.

Issue 11 asks that the adapter's build stay within 2x of the hand-written tensor expression, eager and compiled.
Three query-dependent masks, each on two batches:

- window:   causal sliding window of 256 keys        (kv <= q) & (q - kv < 256)
- prefix:   prefix-LM, the first 25% of each sequence bidirectional, the rest causal
- document: 4 documents per packed sequence, causal inside each document

- one:      a single 4096 x 4096 sequence (issue 11's build example)
- prefill:  issue 11's prefill shape, B = 8 sequences of 512-4096 tokens (seeded), queries = keys

The hand-written tensor builds the same (total_q, 1, max_seqlen_k) bool tensor from per-row facts (the row's
position, its sequence's length, prefix and first packed token, and the per-token document ids), False past each
sequence's keys; both are checked equal. The document mask's key documents are gathered from the per-token ids, as
the mask_mod does (results before 2026-12-06's run DV handed the expression that (total_q, max_seqlen_k) grid
ready-made).
Times are medians of --reps calls of each build, the two builds' calls interleaved, after three warm-up calls of each
(compiled: after compiling, torch.compile(dynamic=True); before 2026-12-07's run FB each side ran its reps in a block
after a single warm-up call, so a fresh process's first row could read high). Each eager
row also counts the aten ops that run (views excluded, and unbind since 2026-12-07: it launches nothing): on a GPU,
where every op is a kernel launch of a few microseconds, that count sets a small build's time. On a GPU each eager
row also splits a call's time into the host's issue (from the call to its return, the GPU idle before) and the
GPU's time in kernels and copies (torch.profiler).

    python tools/bench_query_mask_build.py [--device cpu] [--json PATH]
    python tools/bench_query_mask_build.py --from RESULT.json [--prev EARLIER.json] --chart PATH   # a chart only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

WINDOW = 256
DOCUMENTS = 4


def batches(device):
    g = torch.Generator().manual_seed(0)
    prefill = torch.randint(512, 4097, (8,), generator=g).tolist()
    return {"one": [4096], "prefill": prefill}


class Facts:
    """Per-row and per-key facts of a packed batch (queries = keys per sequence), on `device`."""

    def __init__(self, lengths, device):
        self.lengths = lengths
        self.total, self.width = sum(lengths), max(lengths)
        self.cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        rows = [torch.arange(n) for n in lengths]
        self.pos = torch.cat(rows).to(device)  # (T,) position of each row (and key) in its sequence
        self.len = torch.cat([torch.full((n,), n) for n in lengths]).to(device)  # (T,) its sequence's length
        self.prefix_per_seq = torch.tensor([n // 4 for n in lengths], device=device)  # (B,)
        self.prefix = torch.cat([torch.full((n,), n // 4) for n in lengths]).to(device)  # (T,)
        # document id of each packed token: DOCUMENTS equal parts of its sequence
        self.doc = torch.cat([torch.arange(n) * DOCUMENTS // n for n in lengths]).to(device)  # (T,)
        starts = [0] + torch.tensor(lengths).cumsum(0).tolist()[:-1]
        # (T,) the packed index of each row's sequence's first token
        self.start = torch.cat([torch.full((n,), s) for s, n in zip(starts, lengths)]).to(device)


def mask_mods(f: Facts):
    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < WINDOW)

    def prefix(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) | (kv_idx < f.prefix_per_seq[b])

    def document(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (f.doc[f.cu[b] + kv_idx] == f.doc[f.cu[b] + q_idx])

    return {"window": window, "prefix": prefix, "document": document}


def hand_written(name, pos, length, prefix, doc, start, width, uniform):
    """The same tensor from per-row facts: (T, 1, width) bool; uniform: every sequence has width keys."""
    i, n = pos.view(-1, 1, 1), length.view(-1, 1, 1)
    j = torch.arange(width, device=pos.device).view(1, 1, width)
    if name == "window":
        m = (j <= i) & (i - j < WINDOW)
    elif name == "prefix":
        m = (j <= i) | (j < prefix.view(-1, 1, 1))
    else:  # key j's document: packed token start + j, j kept inside the row's sequence where sequences differ
        key = start.view(-1, 1, 1) + (j if uniform else torch.minimum(j, n - 1))
        m = (j <= i) & (doc[key] == doc.view(-1, 1, 1))
    return m if uniform else m & (j < n)  # False past each sequence's keys, where a sequence is shorter


VIEWS = frozenset("view expand slice select unsqueeze squeeze alias t transpose _unsafe_view unbind".split())


def count_ops(fn) -> int:
    """The aten ops one call of fn runs, views excluded."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func.overloadpacket.__name__ not in VIEWS
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def paired_median_ms(fns, reps, warmup=3):
    """Each of fns timed reps times, the calls interleaved (fns[0], fns[1], fns[0], ...) after warmup calls of each,
    so that a drift of the host's speed during the row (another process, a clock change) reaches both sides alike.
    Medians, in fns' order."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [statistics.median(t) for t in times]


def issue_and_device_ms(fn, reps) -> tuple:
    """A CUDA call's two halves: the host's time to return from it with the GPU's queue empty before (its launches'
    issue), and the GPU's time in its kernels and copies (torch.profiler), medians / means over reps calls."""
    issue = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    device_us = sum(e.self_device_time_total for e in prof.key_averages())
    return statistics.median(issue), device_us / reps / 1e3


def chart(path: str, result: dict, prev: Optional[dict]) -> Optional[str]:
    """Bars per row of result: the adapter's time, an earlier build's (prev, same rows) and the hand-written one's."""
    earlier = {(r["batch"], r["mask"], r["mode"]): r for r in prev["rows"]} if prev else {}
    labels, values, colors, notes = [], [], [], []
    for r in result["rows"]:
        key = (r["batch"], r["mask"], r["mode"])
        bars = [("create_mask", r["adapter_ms"], "tab:blue", f"{r['ratio']:.2f}x hand-written")]
        if key in earlier:
            e = earlier[key]
            bars.append(("create_mask, earlier build", e["adapter_ms"], "tab:gray", f"{e['ratio']:.2f}x"))
        bars.append(("hand-written", r["hand_written_ms"], "tab:green", ""))
        for what, ms, color, note in bars:
            labels.append(f"{' '.join(key)}: {what}")
            values.append(ms)
            colors.append(color)
            notes.append(note)
    device = result.get("environment", {}).get("device_name", "")
    return bc.bar_chart(path, f"Building a query-side mask (issue 11: create_mask <= 2x hand-written), {device}",
                        labels, values, colors, notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--json", default=None)
    ap.add_argument("--chart", default=None, help="a chart of the result (needs matplotlib)")
    ap.add_argument("--from", dest="source", default=None, help="chart this result JSON instead of measuring")
    ap.add_argument("--prev", default=None, help="an earlier build's result JSON, charted beside")
    args = ap.parse_args(argv)
    if args.source:
        import json

        with open(args.source) as fh:
            result = json.load(fh)
        prev = None
        if args.prev:
            with open(args.prev) as fh:
                prev = json.load(fh)
        why = chart(args.chart, result, prev) if args.chart else "no --chart given"
        print(why or f"wrote {args.chart}")
        return 0 if why is None else 1

    import dmattn_ops

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    rows = []
    for batch_name, lengths in batches(device).items():
        f = Facts(lengths, device)
        mods = mask_mods(f)
        for name, mod in mods.items():
            def adapter(cu, total, width, mod=mod):
                return dmattn_ops.create_mask(mod, cu, cu, width, width, 8, total_q=total, total_k=total)

            def hand(pos, length, prefix, doc, start, width, name=name, uniform=len(set(lengths)) == 1):
                return hand_written(name, pos, length, prefix, doc, start, width, uniform)

            hand_args = (f.pos, f.len, f.prefix, f.doc, f.start, f.width)
            adapter_args = (f.cu, f.total, f.width)
            built = adapter(*adapter_args)
            assert built.shape == (f.total, 1, f.width), built.shape
            assert torch.equal(built, hand(*hand_args)), f"{batch_name} / {name}: the two builds differ"
            modes = [("eager", adapter, hand)]
            if not args.no_compile:
                torch._dynamo.reset()
                modes.append(("compiled", torch.compile(adapter, dynamic=True), torch.compile(hand, dynamic=True)))
            for mode, a_fn, h_fn in modes:
                a_ms, h_ms = paired_median_ms([lambda: (a_fn(*adapter_args), sync()),
                                               lambda: (h_fn(*hand_args), sync())], args.reps)
                row = dict(batch=batch_name, lengths=lengths, mask=name, mode=mode, adapter_ms=a_ms,
                           hand_written_ms=h_ms, ratio=a_ms / h_ms, entries=f.total * f.width)
                ops = ""
                if mode == "eager":
                    row.update(adapter_ops=count_ops(lambda: a_fn(*adapter_args)),
                               hand_written_ops=count_ops(lambda: h_fn(*hand_args)))
                    ops = f"   ops {row['adapter_ops']:3d} / {row['hand_written_ops']:3d}"
                    if device.type == "cuda":  # where a call's time goes: the host's issue, the GPU's kernels
                        for who, fn, fn_args in (("adapter", a_fn, adapter_args), ("hand_written", h_fn, hand_args)):
                            row[f"{who}_issue_ms"], row[f"{who}_device_ms"] = issue_and_device_ms(
                                lambda fn=fn, fn_args=fn_args: fn(*fn_args), args.reps)
                        ops += (f"   issue {row['adapter_issue_ms']:.3f} / {row['hand_written_issue_ms']:.3f} ms"
                                f"   GPU {row['adapter_device_ms']:.3f} / {row['hand_written_device_ms']:.3f} ms")
                rows.append(row)
                print(f"{batch_name:8s} {name:9s} {mode:9s} create_mask {a_ms:8.3f} ms   hand-written {h_ms:8.3f} ms"
                      f"   ratio {a_ms / h_ms:5.2f}{ops}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst ratio {worst:.2f} (issue 11: <= 2)")
    result = dict(rows=rows, worst_ratio=worst, target="create_mask <= 2x the hand-written tensor expression (issue 11)",
                  environment=bc.environment(device, os.path.join(os.path.dirname(__file__), "..")),
                  dmattn_build=dmattn_ops.build_info(), command=" ".join(sys.argv))
    if args.json:
        bc.write_json(args.json, result)
    if args.chart:
        print(chart(args.chart, result, None) or f"wrote {args.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
