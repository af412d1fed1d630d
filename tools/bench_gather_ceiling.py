"""What the GPU's memory gives a decode kernel that reads only the kept keys: the read bandwidth of row gathers at the
granularity a key-side mask leaves, with no attention around them.

    python tools/bench_gather_ceiling.py --out benchmarks/results      # on the GPU machine (needs Triton)

The cache is bench_gpu.py's decode batch: K of (total_k, Hk = 8, D = 128) bf16 (V alike, so each figure holds for
K + V). A key-side mask leaves one 256-byte row per kept (key, KV head); whether the rows of one key's heads lie side
by side depends on the mask's heads:
  contiguous           every byte, streamed (the copy ceiling)
  all rows, per head   every key of each head in position order: 256-byte rows 2 KB apart (the unmasked decode
                       kernel's order: one CTA per KV head)
  25% per head         the top 25% of each head's keys by a random score (Hm = Hk: the decode benchmark's mask), each
                       head's kept rows in position order
  25% shared           the same 25% of keys for every head (Hm = 1), read per head as above
  25% shared, by key   the same rows read key by key: 2 KB runs (the order a head-shared mask allows)
Each case is one Triton kernel that loads 64 listed rows per program and sums them (reads only: nothing written
but one float per program), timed with CUDA events after an L2 flush, median of --reps. GB/s counts the listed rows'
bytes. The decode kernel's own rate on the same mask is profile_decode.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import bench_gpu  # noqa: E402

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the GPU machine has it (torch's compiled FlexAttention needs it)
    triton = None

if triton is not None:
    @triton.jit
    def _gather_sum(src, idx, partial, n_rows, ROW: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        r = pid * BLOCK + tl.arange(0, BLOCK)
        live = r < n_rows
        rows = tl.load(idx + r, mask=live, other=0).to(tl.int64)
        cols = tl.arange(0, ROW)
        x = tl.load(src + rows[:, None] * ROW + cols[None, :], mask=live[:, None], other=0.0)
        tl.store(partial + pid, tl.sum(x.to(tl.float32)))


def gather_rows(src: torch.Tensor, idx: torch.Tensor, row: int, partial: torch.Tensor) -> None:
    """Reads src's rows of ``row`` elements listed in idx (int32), 64 per program."""
    block = 64 if row <= 256 else 16
    grid = (triton.cdiv(idx.numel(), block),)
    _gather_sum[grid](src, idx, partial, idx.numel(), ROW=row, BLOCK=block, num_warps=4)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for gather_ceiling.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or triton is None:
        print("bench_gather_ceiling: needs a CUDA device and Triton", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(args.seed)
    lens_q, lens_k, hs = bench_gpu.sizes("decode", False, gen)
    total_k, hk, d = sum(lens_k), hs["heads_k"], hs["head_dim"]
    # K and the mask of the decode benchmark: per KV head, the top `keep` of each sequence's keys by a random score
    prob = bench_gpu.make_problem(lens_q, lens_k, hs["heads"], hk, d, hk, args.keep, causal=False,
                                  dtype=torch.bfloat16, device=dev, seed=args.seed)
    k, keep = prob.k, prob.mask.cpu()
    flat = k.view(-1, d)  # row (key * Hk + head), 256 bytes each
    keys = torch.arange(total_k)
    heads = torch.arange(hk)
    per_head = torch.cat([keys[keep[:, h]] * hk + h for h in range(hk)])  # head-major, positions ascending
    shared_keys = keys[keep[:, 0]]
    shared = (shared_keys[None, :] * hk + heads[:, None]).reshape(-1)      # head-major
    every = (keys[None, :] * hk + heads[:, None]).reshape(-1)               # head-major, all keys
    cases = [
        ("contiguous", flat.view(-1, 1024), torch.arange(total_k * hk // 8), 1024),
        ("all rows, per head", flat, every, d),
        (f"{args.keep:.0%} per head", flat, per_head, d),
        (f"{args.keep:.0%} shared", flat, shared, d),
        (f"{args.keep:.0%} shared, by key", flat.view(-1, hk * d), shared_keys, hk * d),
    ]
    flush = bc.L2Flusher(dev)
    rows = []
    print(f"K: {total_k} keys x {hk} heads x {d} bf16 = {k.numel() * 2 / 1e9:.3f} GB")
    for name, src, idx, row in cases:
        idx = idx.to(device=dev, dtype=torch.int32)
        partial = torch.empty(triton.cdiv(idx.numel(), 16), device=dev, dtype=torch.float32)
        nbytes = idx.numel() * row * src.element_size()
        t = bc.time_callable(lambda: gather_rows(src, idx, row, partial), dev, warmup=5, reps=args.reps, flush=flush)
        rows.append({"case": name, "row_bytes": row * src.element_size(), "rows": idx.numel(), "bytes": nbytes,
                     "ms": t.median_ms, "gbps": nbytes / t.median_ms / 1e6})
        print(f"{name:24} {row * src.element_size():5d} B rows  {nbytes / 1e9:6.3f} GB  {t.median_ms * 1e3:8.1f} us  "
              f"{nbytes / t.median_ms / 1e6:7.0f} GB/s", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result = {"environment": bc.environment(dev, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "keep": args.keep, "total_k": total_k, "heads_k": hk,
                  "head_dim": d, "reps": args.reps, "results": rows,
                  "command": "python tools/bench_gather_ceiling.py " + " ".join(argv or sys.argv[1:])}
        with open(os.path.join(args.out, "gather_ceiling.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
