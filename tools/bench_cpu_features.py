"""CPU cost of the window, softcap and sinks against plain causal attention, on one long sequence.

    python tools/bench_cpu_features.py --json benchmarks/results/cpu_features.json

One sequence of 4096 tokens (q = k), H = 8, Hk = 2, D = 64, bfloat16, causal, seed 0; each variant timed as the median
of --reps calls after one warm-up call, on --threads torch threads. Variants: plain causal; + softcap 30; + a 256-key
window (window_size=(255, 0)); + sinks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

# dmattn_ops: a build named on PYTHONPATH first (tools/run_gpu.sh runs another tree's build with this tree's tools),
# else this checkout's, built in place
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dmattn_ops  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    L, H, Hk, D = args.length, 8, 2, 64
    q = torch.randn(L, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(L, Hk, D, dtype=torch.bfloat16) for _ in range(2))
    cu = dmattn_ops.cu_seqlens([L])
    variants = {
        "causal": {},
        "causal + softcap 30": {"softcap": 30.0},
        "causal + window (255, 0)": {"window_size": (255, 0)},
        "causal + sinks": {"sinks": torch.randn(H)},
    }
    results = {}
    for name, extra in variants.items():
        def call():
            return dmattn_ops.varlen_attention(q, k, v, cu, cu, L, L, is_causal=True, **extra)

        call()
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        results[name] = sorted(times)[len(times) // 2] * 1e3
        print(f"{name:28s} {results[name]:8.1f} ms  ({results[name] / results['causal']:.2f}x causal)", flush=True)
    if args.json:
        payload = {"command": "python " + " ".join(sys.argv), "ms_median": results,
                   "shape": {"length": L, "heads": H, "heads_k": Hk, "head_dim": D, "dtype": "bfloat16"},
                   "environment": {"torch": torch.__version__, "threads": args.threads,
                                   "python": platform.python_version(),
                                   "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
