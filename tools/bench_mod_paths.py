"""A sliding window written as a plain mask_mod, through each path varlen_attention has for it, side by side.

- proven:       ``varlen_attention(mask_mod=window)``: proven one interval per query by its expression (eager mode,
                docs/mods.md "Sliding windows") and run as key_range, built in the timed call (a model's first layer);
- proven again: the same call again: the proof, and the key_range of the same batch reused (every later layer);
- range given:  the attention alone over that key_range, built untimed;
- native:       the op's own ``window_size=(W - 1, -1)`` with ``is_causal`` (the same mask, nothing to build);
- mask path:    ``create_mask(window)`` then ``varlen_attention(mask=...)``, both timed: what the mod cost before
                the proof, and what compiled code still does;
- mask given:   the attention alone over that query-side mask, built untimed.

One packed batch of sequences with as many queries as keys (top-left positions, which the mod uses, are then the
window's own), GQA. Medians of --reps calls after warm-up calls, the paths interleaved round by round; every output
checked against the native path's.

    python tools/bench_mod_paths.py [--device cpu|cuda] [--lengths 4096] [--window 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096], help="tokens of each sequence")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("H", "HK"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    import dmattn_ops

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    (h, hk), d, w = args.heads, args.head_dim, args.window
    g = torch.Generator().manual_seed(0)
    total = sum(args.lengths)
    q = torch.randn(total, h, d, generator=g).to(device, dtype)
    k, v = (torch.randn(total, hk, d, generator=g).to(device, dtype) for _ in range(2))
    cu = dmattn_ops.cu_seqlens(args.lengths).to(device)
    longest = max(args.lengths)

    def window(b, h_, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < w)

    def attend(**kw):
        return dmattn_ops.varlen_attention(q, k, v, cu, cu, longest, longest, **kw)

    built = dmattn_ops.create_mask(window, cu, cu, longest, longest, h)
    ranges = dmattn_ops.mods.proven_key_range(window, cu, cu, total)
    def proven_cold():
        dmattn_ops.mods._PROVEN_RANGES.clear()
        return attend(mask_mod=window)

    paths = {
        "proven": proven_cold,
        "proven again": lambda: attend(mask_mod=window),
        "range given": lambda: attend(key_range=ranges),
        "native": lambda: attend(window_size=(w - 1, -1), is_causal=True),
        "mask path": lambda: attend(mask=dmattn_ops.create_mask(window, cu, cu, longest, longest, h)),
        "mask given": lambda: attend(mask=built),
    }
    want = paths["native"]()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, fn in paths.items():
        torch.testing.assert_close(fn(), want, rtol=tol, atol=tol, msg=lambda m, name=name: f"{name}: {m}")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(2):  # warm-up rounds
        for fn in paths.values():
            fn()
    times = {name: [] for name in paths}
    for _ in range(args.reps):
        for name, fn in paths.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - t0) * 1e3)
    rows = [dict(path=name, ms=statistics.median(t), ms_all=t) for name, t in times.items()]
    native = next(r["ms"] for r in rows if r["path"] == "native")
    for r in rows:
        r["vs_native"] = r["ms"] / native
        print(f"{r['path']:13s} {r['ms']:9.3f} ms   {r['vs_native']:5.2f}x the native window")
    result = dict(rows=rows, lengths=args.lengths, window=w, heads=[h, hk], head_dim=d, dtype=str(dtype),
                  query_side_mask_bytes=bc.tensor_bytes(built),
                  environment=bc.environment(device, os.path.join(os.path.dirname(__file__), "..")),
                  command="python tools/bench_mod_paths.py " + " ".join(sys.argv[1:] if argv is None else argv))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
