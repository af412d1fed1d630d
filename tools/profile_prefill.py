"""Where a CUDA prefill call's time goes, kernel by kernel: bench_gpu.py's prefill batch (and its dense 4 x 4096
workload) with each operand set-up the benchmark times, on the plan's own kernel and on the forced sm80 one.

    python tools/profile_prefill.py --out benchmarks/results          # on the GPU machine
    python tools/profile_prefill.py --calls masked --arch auto --ncu  # one call, repeated: for ncu

Calls (bf16, H = 32, Hk = 8, D = 128 unless --head-dim; the prefill batch is B = 8, 512-4096 tokens, causal):
  masked       the prefill batch with a key-side mask keeping 50% of each sequence's keys per KV head (top of a
               random gating score) and that score as key-side bias: issue 12's masked target
  bias         the same batch, the key-side bias alone
  causal       the same batch, no mask or bias
  window       the same batch, no mask or bias, under the window workload's sliding window (bench_gpu.WINDOW keys)
  dense        4 x 4096, causal, no mask or bias (the dense workload)
  dense_nc     4 x 4096, non-causal
  query        masked's mask + bias expanded to the query-side layout (total_q, Hm, max_seqlen_k): bench_gpu's
               "causal, the same mask + bias expanded query-side" row (issue 11's operand bandwidth)
  query_mask   that query-side mask alone
  query_bias   that query-side bias alone
--row-multiple N stores the query calls' mask and bias in rows of a multiple of N keys (a view of the first
max_seqlen_k of each), so that every row starts at a multiple of N elements: with N = 8 a 16-bit bias's rows start at
16-byte chunks, where the batch's own 3,865-key rows start anywhere in one.
Each row: the median time of the whole call (CUDA events, L2 flushed before each call, as bench_gpu.py times it) and
the device time of each kernel the call launches (torch.profiler: the compaction and gather passes before the
attention kernel, the attention kernel itself). --ncu runs each call --ncu-reps times after a warm-up and nothing
else, so that `ncu --kernel-name regex:fwd_kernel --launch-skip N --launch-count 1` profiles one attention kernel.

    python tools/profile_prefill.py --chart cmp.png --builds main=a/prefill_profile.json new=b/prefill_profile.json

draws the rows of earlier runs side by side (anywhere, no GPU): per call and build, the attention kernel's time and
the passes before it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (it puts this checkout's dmattn_ops on the path)
import bench_gpu  # noqa: E402
from profile_decode import kernel_breakdown  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS = ["masked", "bias", "causal", "window", "dense", "dense_nc", "query", "query_mask", "query_bias"]


def padded_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """t's values as a view of the first t.shape[-1] columns of a buffer whose rows are a multiple of `multiple`
    columns long (zero past them): the same operand, its rows (and heads) starting at multiples of `multiple`."""
    keys = t.shape[-1]
    buf = torch.zeros(*t.shape[:-1], -(-keys // multiple) * multiple, dtype=t.dtype, device=t.device)
    buf[..., :keys] = t
    return buf[..., :keys]


def problem(call: str, head_dim: int, seed: int, device, row_multiple: int = 1):
    """The PackedBatch of one call, built as bench_gpu.py builds its workloads (same seed, same inputs); the query
    calls' operands in rows of a multiple of row_multiple keys (padded_rows)."""
    workload = "dense" if call.startswith("dense") else "prefill"
    gen = torch.Generator().manual_seed(seed)
    lens_q, lens_k, hs = bench_gpu.sizes(workload, False, gen)
    hs = dict(hs, head_dim=head_dim)
    keep = 0.5 if call in ("masked", "bias") or call.startswith("query") else None
    prob = bench_gpu.make_problem(lens_q, lens_k, hs["heads"], hs["heads_k"], hs["head_dim"], hs["heads_k"], keep,
                                  causal=call != "dense_nc", dtype=torch.bfloat16, device=device, seed=seed)
    if call == "window":
        return prob.replace(window_size=(bench_gpu.WINDOW - 1, -1))
    if call.startswith("query"):
        query_side = bench_gpu.key_side_as_query_side(prob)
        if row_multiple > 1:
            query_side = query_side.replace(mask=padded_rows(query_side.mask, row_multiple),
                                            bias=padded_rows(query_side.bias, row_multiple))
        return {"query": query_side, "query_mask": query_side.replace(bias=None),
                "query_bias": query_side.replace(mask=None)}[call]
    return prob.replace(mask=None) if call == "bias" else prob


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", nargs="+", default=CALLS, choices=CALLS)
    ap.add_argument("--arch", nargs="+", default=["auto", "sm80"], choices=["auto", "sm80"],
                    help="DMATTN_ARCH of each row (default: the plan's kernel, then the sm80 one forced)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--row-multiple", type=int, default=1,
                    help="the query calls' operands in rows of a multiple of this many keys (see above)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--seed", type=int, default=bench_gpu.DEFAULT_SEED)
    ap.add_argument("--ncu", action="store_true", help="only run each call (warm-up 3, then --ncu-reps), for ncu")
    ap.add_argument("--ncu-reps", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for prefill_profile.json")
    ap.add_argument("--chart", default=None, help="with --builds: draw their rows into this PNG and exit")
    ap.add_argument("--builds", nargs="+", default=[], metavar="LABEL=JSON", help="earlier runs' prefill_profile.json")
    args = ap.parse_args(argv)
    if args.chart:
        return chart(args.chart, args.builds)
    if not torch.cuda.is_available():
        print("profile_prefill: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    flush = bc.L2Flusher(dev)
    rows = []
    for call in args.calls:
        prob = problem(call, args.head_dim, args.seed, dev, args.row_multiple)
        for arch in args.arch:
            os.environ["DMATTN_ARCH"] = arch
            run = lambda: prob.run()  # noqa: E731
            if args.ncu:
                for _ in range(3 + args.ncu_reps):
                    run()
                torch.cuda.synchronize()
                print(f"{call} arch {arch}: ran 3 + {args.ncu_reps} calls", flush=True)
                continue
            ms = bc.time_callable(run, dev, warmup=5, reps=args.reps, flush=flush).median_ms
            kernels = kernel_breakdown(run, reps=10)
            rows.append({"call": call, "arch": arch, "head_dim": args.head_dim, "row_multiple": args.row_multiple,
                         "ms": ms, "kernels_us": kernels})
            parts = "  ".join(f"{k} {v:.1f}" for k, v in kernels.items())
            print(f"{call:8} {arch:4}  {ms * 1e3:8.1f} us  [{parts}]", flush=True)
    os.environ.pop("DMATTN_ARCH", None)
    if args.out and rows:
        payload = {"environment": bc.environment(dev, REPO), "reps": args.reps, "results": rows,
                   "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))}
        bc.write_json(os.path.join(args.out, "prefill_profile.json"), payload)
    return 0


def is_attention(kernel: str) -> bool:
    """Whether a kernel of a row's breakdown is the attention kernel (the others are the passes before it)."""
    return "fwd_kernel" in kernel


def chart(path: str, builds) -> int:
    """Each (call, arch) row of the given runs, build beside build: the attention kernel's device time, the passes'
    hatched after it, the call's median in the note."""
    import json

    if not builds:
        print("profile_prefill: --chart needs --builds LABEL=JSON ...", file=sys.stderr)
        return 2
    runs = []
    for spec in builds:
        label, _, file = spec.partition("=")
        if not file:
            print(f"profile_prefill: --builds takes LABEL=JSON, got {spec!r}", file=sys.stderr)
            return 2
        with open(file) as f:
            runs.append((label, json.load(f)["results"]))
    labels, kernel_ms, pass_ms, notes = [], [], [], []
    keys = [(r["call"], r["arch"]) for r in runs[0][1]]
    for call, arch in keys:
        for label, rows in runs:
            row = next((r for r in rows if (r["call"], r["arch"]) == (call, arch)), None)
            if row is None:
                continue
            kernels = row["kernels_us"]
            labels.append(f"{call} ({arch}), {label}")
            kernel_ms.append(sum(v for k, v in kernels.items() if is_attention(k)) / 1e3)
            pass_ms.append(sum(v for k, v in kernels.items() if not is_attention(k)) / 1e3)
            notes.append(f"call {row['ms']:.3f} ms")
    colors = ["C%d" % (i % len(runs)) for i in range(len(labels))]
    why = bc.bar_chart(path, "prefill calls: attention kernel (solid) and the passes before it (hatched)", labels,
                       kernel_ms, colors, notes, pass_ms, "passes before the attention kernel")
    if why:
        print(f"profile_prefill: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
