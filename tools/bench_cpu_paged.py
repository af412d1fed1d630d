"""CPU decode with the keys in a pool (kv_slots) against packed keys: the CPU benchmark's decode batch (B = 16, 1-8
queries, 512-2048 keys, H = 8, Hk = 2, D = 64, float32, key-side mask keeping 50% + bias), its keys, mask and bias
moved into a paged pool of 16-key pages (padded per sequence, with seqused_k; or packed slots from host lengths) or a
token pool (page size 1), built by tools/bench_gpu.py's in_pool. Median of 30 calls after 3 warm-up calls.

    python tools/bench_cpu_paged.py [--json out.json]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu import in_pool, make_problem  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    lens_q = torch.randint(1, 9, (16,), generator=gen).tolist()
    lens_k = torch.randint(512, 2049, (16,), generator=gen).tolist()
    base = make_problem(lens_q, lens_k, 8, 2, 64, 2, 0.5, causal=False, dtype=torch.float32,
                        device=torch.device("cpu"), seed=0)
    results = {}
    want = base.run()[0]
    for name, p in (("packed keys", base), ("paged, 16-key pages", in_pool(base, 16)),
                    ("paged, host lengths", in_pool(base, 16, host_lengths=True)), ("token slots", in_pool(base, 1))):
        for _ in range(3):
            out = p.run()[0]
        assert torch.equal(out, want), name  # the same keys in the same order: the same arithmetic
        times = []
        for _ in range(30):
            t0 = time.perf_counter()
            p.run()
            times.append(time.perf_counter() - t0)
        results[name] = 1e3 * sorted(times)[len(times) // 2]
        print(f"{name:22s} {results[name]:.3f} ms  ({results[name] / results['packed keys']:.2f}x packed)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "torch": torch.__version__,
                       "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "median_ms": results}, f, indent=1)


if __name__ == "__main__":
    main()
