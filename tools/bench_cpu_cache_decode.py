"""CPU decode over a transformers-style KV cache, no mask, every dtype: dmattn_ops against torch SDPA on the same
tensors, and optionally several builds of dmattn_ops side by side.

    python tools/bench_cpu_cache_decode.py                                  # this checkout's build
    python tools/bench_cpu_cache_decode.py --builds /tmp/base . --json out.json

The workload is what a transformers decode step hands the attention function: one new query per sequence, H = 32,
Hk = 8, D = 64, and a cache (B, Hk, L, D) laid out head-major, as transformers' caches are. SDPA gets it as is
(`enable_gqa=True`). dmattn_ops reads it in place the way its transformers backend does (attention_forward's row
view: B = 1 is a plain transpose, B > 1 an as_strided view of rows with `seqused_k`), so both read the same bytes in
the same order. Each (dtype, B, L) case times both implementations in turn in one process: the minimum over --rounds
rounds of back-to-back calls, on --threads torch threads. With --builds, each build runs in its own process (its
folder first on PYTHONPATH), the builds alternating for --repeats passes; a case's ratio is ours / SDPA from the same
process, so the machine's drift between processes cancels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (puts this checkout last on sys.path: a build on PYTHONPATH comes first)

CASES = [(dtype, batch, length) for dtype in ("float32", "bfloat16", "float16") for batch in (1, 8)
         for length in (1024, 4096)]
H, HK, D = 32, 8, 64


def build_label(folder: str) -> str:
    """A build's name in the table, chart and JSON: its git commit where the folder is a checkout (with "+changes"
    where its tracked files differ from it), else the folder's name."""
    git = bc.git_commit(os.path.abspath(folder))
    if git["commit"] and os.path.isdir(os.path.join(folder, ".git")):
        return git["commit"][:7] + ("+changes" if git["dirty"] else "")
    return os.path.basename(os.path.abspath(folder))


def measure(threads: int, rounds: int) -> list:
    """Times every case with the dmattn_ops first on sys.path; returns one dict per case."""
    import torch

    import dmattn_ops

    torch.set_num_threads(threads)
    results = []
    for dtype_name, B, L in CASES:
        dtype = getattr(torch, dtype_name)
        g = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, 1, D, generator=g).to(dtype)
        cache_k = torch.randn(B, HK, L, D, generator=g).to(dtype)
        cache_v = torch.randn(B, HK, L, D, generator=g).to(dtype)
        cu_q = torch.arange(B + 1, dtype=torch.int32)
        # The backend's row view of the cache: row b * R + s is position s of sequence b, R = Hk * L rows a sequence
        # (the other heads' rows between sequences are never visible: seqused_k = L).
        R = HK * L
        rows = (B - 1) * R + L
        k = cache_k.as_strided((rows, HK, D), (D, L * D, 1))
        v = cache_v.as_strided((rows, HK, D), (D, L * D, 1))
        cu_k = torch.clamp_max(torch.arange(0, (B + 1) * R, R, dtype=torch.int32), rows)
        used = torch.full((B,), L, dtype=torch.int32)
        q_rows = q.reshape(B, H, D)

        def ours():
            return dmattn_ops.varlen_attention(q_rows, k, v, cu_q, cu_k, 1, R, seqused_k=used)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q, cache_k, cache_v, enable_gqa=True)

        err = (ours().float() - sdpa().reshape(B, H, D).float()).abs().max().item()
        calls = max(4, 16384 // L)

        def timed(fn) -> float:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            return (time.perf_counter() - t0) / calls * 1e3

        ours(), sdpa()
        t_ours, t_sdpa = [], []
        for _ in range(rounds):
            t_ours.append(timed(ours))
            t_sdpa.append(timed(sdpa))
        results.append(dict(dtype=dtype_name, batch=B, keys=L, ours_ms=min(t_ours), sdpa_ms=min(t_sdpa),
                            ratio=min(t_ours) / min(t_sdpa), max_abs_diff=err))
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--builds", nargs="+", default=None,
                    help="folders holding a built dmattn_ops (default: this checkout's, in this process)")
    ap.add_argument("--repeats", type=int, default=2, help="alternating passes over --builds")
    ap.add_argument("--json", default=None)
    ap.add_argument("--chart", default=None, help="a PNG of each case's ratio per build (needs matplotlib)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child or not args.builds:
        results = measure(args.threads, args.rounds)
        if args.child:
            print(json.dumps(results))
            return 0
        runs = {build_label(bc._CHECKOUT): [results]}
    else:
        labels = {build: build_label(build) for build in args.builds}
        runs = {label: [] for label in labels.values()}
        for _ in range(args.repeats):
            for build in args.builds:
                env = dict(os.environ, PYTHONPATH=os.path.abspath(build))
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--threads",
                                      str(args.threads), "--rounds", str(args.rounds)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                runs[labels[build]].append(json.loads(out.strip().splitlines()[-1]))

    # Each build's pass with the lowest ratio, case by case (what the table and the chart show).
    best = {label: [min((p[i] for p in passes), key=lambda r: r["ratio"]) for i in range(len(CASES))]
            for label, passes in runs.items()}
    print(f"{'dtype':9} {'B':>2} {'keys':>5}  " + "  ".join(f"{b[-24:]:>24}" for b in runs))
    for i, (dtype, B, L) in enumerate(CASES):
        cells = [f"{rows[i]['ours_ms']:7.3f} ms {rows[i]['ratio']:5.2f}x sdpa" for rows in best.values()]
        print(f"{dtype:9} {B:2d} {L:5d}  " + "  ".join(f"{c:>24}" for c in cells))
    if args.json:
        import torch

        doc = dict(environment=bc.environment(torch.device("cpu"), bc._CHECKOUT), threads=args.threads, heads=H,
                   kv_heads=HK, head_dim=D,
                   note="ratio: dmattn_ops' time over SDPA's in the same process (lower is better); the table "
                        "shows each build's pass with the lowest ratio",
                   builds=runs)
        bc.write_json(args.json, doc)
    if args.chart:
        print(ratio_chart(args.chart, best, args.threads) or f"chart: {args.chart}")
    return 0


def ratio_chart(path: str, best: dict, threads: int):
    """Grouped horizontal bars: per case, each build's best ratio to SDPA (1.0: as fast as SDPA; best: per build, its
    best row of each case). Returns None, or why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e}); chart skipped"
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(CASES) * len(best) + 1.5))
    height = 0.8 / len(best)
    for k, (build, rows) in enumerate(best.items()):
        ratios = [row["ratio"] for row in rows]
        ys = [len(CASES) - 1 - i + (len(best) - 1 - k) * height - 0.4 + height / 2 for i in range(len(CASES))]
        ax.barh(ys, ratios, height=height, label=build)
        for y, r in zip(ys, ratios):
            ax.text(r + 0.02, y, f"{r:.2f}", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(CASES)))
    ax.set_yticklabels([f"{d} B={b} keys={n}" for d, b, n in CASES][::-1], fontsize=8)
    ax.set_xlabel("dmattn_ops time / SDPA time, same process (lower is better)")
    ax.set_title(f"CPU decode over a head-major KV cache, H={H} Hk={HK} D={D}, {threads} thread(s)", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


if __name__ == "__main__":
    sys.exit(main())
