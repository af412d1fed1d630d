"""Where a CUDA decode call's time goes, kernel by kernel, on several decode shapes, beside the prefill kernel on the
same inputs, and how the decode kernel's split size moves it.

    python tools/profile_decode.py --out benchmarks/results        # on the GPU machine
    python tools/profile_decode.py --workloads decode --tiles auto 8 24 --keep 0.25 1.0

Workloads (bf16, D = 128, H = 32, key-side mask keeping the top fraction of each sequence's keys per KV head by a
random gating score + that score as key-side bias; keep 1.0: no mask, no bias):
  decode   bench_gpu.py's decode batch: B = 64, 1-8 queries and 1024-8192 keys per sequence, Hk = 8
  q1       the same batch with one query per sequence
  long     B = 4, 1-8 queries, 32k-128k keys per sequence (where split-KV decides), Hk = 8
  mqa      the decode batch with Hk = 1
  qside    the decode batch with its mask and bias expanded to the query-side layout (total_q, Hk, max_seqlen_k),
           the same values (bench_gpu.key_side_as_query_side); keep 1.0 has no operands, so it is skipped
For each (workload, kept fraction) the rows are: the decode kernel at each DMATTN_DECODE_TILES_PER_SPLIT of --tiles
("auto": the plan's own choice), and the prefill kernel forced (DMATTN_KERNEL=prefill: what every call ran before the
decode kernel). Each row has the median time of the whole call (CUDA events, L2 flushed before each call, as
bench_gpu.py times it), the device time of each kernel the call launches (torch.profiler: compaction, attention,
split combine, row finish) and the peak extra memory. TB/s counts the bytes of every K and V row (kept or not).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (it puts this checkout's dmattn_ops on the path)
import bench_gpu  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kernel_breakdown(fn, reps: int) -> dict:
    """Mean device microseconds per call of each CUDA kernel fn launches."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.replace("(anonymous namespace)::", "").replace("void ", "")
            name = name.split("<")[0].split("(")[0].split("::")[-1]
            totals[name] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    return {name: us / reps for name, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", nargs="+", default=["decode", "q1", "long", "mqa"],
                    choices=["decode", "q1", "long", "mqa", "qside"])
    ap.add_argument("--tiles", nargs="+", default=["auto"])
    ap.add_argument("--keep", nargs="+", type=float, default=[0.25, 1.0])
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mask-heads", type=int, default=None,
                    help="heads of the key-side mask and bias (default: Hk, one per KV head; 1: shared by every head)")
    ap.add_argument("--out", default=None, help="folder for decode_profile.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_decode: needs a CUDA device", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    flush = bc.L2Flusher(dev)
    rows, problems = [], {}
    for workload in args.workloads:
        gen = torch.Generator().manual_seed(args.seed)
        lens_q, lens_k, hs = bench_gpu.sizes("decode", False, gen)
        if workload == "q1":
            lens_q = [1] * len(lens_q)
        elif workload == "long":
            lens_q = torch.randint(1, 9, (4,), generator=gen).tolist()
            lens_k = torch.randint(32 * 1024, 128 * 1024 + 1, (4,), generator=gen).tolist()
        elif workload == "mqa":
            hs = {**hs, "heads_k": 1}
        problems[workload] = {"lens_q": lens_q, "lens_k": lens_k, **hs}
        for keep in args.keep:
            if workload == "qside" and keep >= 1:
                continue
            prob = bench_gpu.make_problem(lens_q, lens_k, hs["heads"], hs["heads_k"], hs["head_dim"],
                                          args.mask_heads or hs["heads_k"], keep if keep < 1 else None,
                                          causal=False, dtype=torch.bfloat16, device=dev, seed=args.seed)
            if workload == "qside":
                prob = bench_gpu.key_side_as_query_side(prob)
            kv_bytes = 2 * prob.k.numel() * prob.k.element_size()
            for kernel, tiles in [("decode", t) for t in args.tiles] + [("prefill", "-")]:
                os.environ["DMATTN_KERNEL"] = kernel
                if tiles in ("auto", "-"):
                    os.environ.pop("DMATTN_DECODE_TILES_PER_SPLIT", None)
                else:
                    os.environ["DMATTN_DECODE_TILES_PER_SPLIT"] = tiles
                call = lambda: prob.run()  # noqa: E731
                ms = bc.time_callable(call, dev, warmup=5, reps=args.reps, flush=flush).median_ms
                kernels = kernel_breakdown(call, reps=10)
                rows.append({"workload": workload, "keep": keep, "kernel": kernel, "tiles_per_split": tiles,
                             "ms": ms, "kv_tbps": kv_bytes / ms / 1e9, "kernels_us": kernels,
                             "extra_bytes": bc.peak_extra_bytes(call, dev)})
                parts = "  ".join(f"{k} {v:.1f}" for k, v in kernels.items())
                print(f"{workload:6} keep {keep:4.2f}  {kernel:7} tiles/split {tiles:>4}  {ms * 1e3:8.1f} us  "
                      f"{kv_bytes / ms / 1e9:5.2f} TB/s  [{parts}]", flush=True)
    os.environ.pop("DMATTN_KERNEL", None)
    os.environ.pop("DMATTN_DECODE_TILES_PER_SPLIT", None)
    if args.out:
        payload = {"problems": problems,
                   "environment": bc.environment(dev, REPO), "reps": args.reps, "results": rows,
                   "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))}
        bc.write_json(os.path.join(args.out, "decode_profile.json"), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
