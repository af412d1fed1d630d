"""Benchmark: building a key-gating mask with dmattn_ops.create_mask vs FlexAttention's create_block_mask.

The decode shape of ../shared/PEERS.md: B = 64 sequences of 1-8 queries and 1024-8192 keys, H = 32, Hk = 8. The
mask keeps the top 25% of each sequence's keys by a gating score (token granularity), written once as a mask_mod
over per-sequence positions::

    def keep(b, h, q_idx, kv_idx):  return gate_keep[cu_seqlens_k[b] + kv_idx]

dmattn_ops turns it into a key-side (total_k, Hm) tensor (O(total_k * Hm)); FlexAttention needs a BlockMask, built
by evaluating the mask_mod on the dense (B, H, Q, KV) grid:

- flex packed: batch 1, Q = total_q, KV = total_k, the packing's document mask AND the gate (FlexAttention's varlen);
- flex padded: (B, Q = max_q, KV = max_k), the gate read from a padded (B, max_k) copy (its best decode set-up).

Two head variants: "shared" (one mask for all heads: dmattn Hm = 1, Flex H = None) and "per_kv_head" (a gate per KV
head; dmattn traces h and builds Hm = H, Flex needs H = 32). Each row prints both times, the ratio and the mask
bytes; --json writes the rows. On the CPU the dense Flex grid of the packed per-KV-head variant is
total_q * total_k * 32 elements (~2.6 G at the full shape), so that row is skipped unless --packed-per-head is given
(or shrink the shape with --min-k / --max-k).

    python tools/bench_mask_build.py                      # CPU, full decode shape
    python tools/bench_mask_build.py --device cuda --compile --json results.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

import dmattn_ops


def decode_batch(args, device):
    """cu_seqlens and per-key gates of one decode batch (seeded), plus the top-25% keep masks."""
    g = torch.Generator().manual_seed(args.seed)
    len_q = torch.randint(1, args.max_q + 1, (args.batch,), generator=g)
    len_k = torch.randint(args.min_k, args.max_k + 1, (args.batch,), generator=g)
    cu_q, cu_k = dmattn_ops.cu_seqlens(len_q), dmattn_ops.cu_seqlens(len_k)
    total_k = int(cu_k[-1])
    gate = torch.rand(total_k, args.heads_k, generator=g)
    keep = torch.zeros(total_k, args.heads_k, dtype=torch.bool)
    for b in range(args.batch):  # set-up only, not timed
        lo, n = int(cu_k[b]), int(len_k[b])
        top = gate[lo : lo + n].topk(max(1, int(n * args.keep)), dim=0).indices  # (n_keep, Hk)
        keep[lo : lo + n].scatter_(0, top, True)
    padded = torch.zeros(args.batch, int(len_k.max()), args.heads_k, dtype=torch.bool)
    for b in range(args.batch):
        padded[b, : int(len_k[b])] = keep[int(cu_k[b]) : int(cu_k[b + 1])]
    to = dict(device=device)
    return dict(
        cu_q=cu_q.to(**to), cu_k=cu_k.to(**to), len_k=len_k.int().to(**to), keep=keep.to(**to),
        padded=padded.to(**to), max_q=int(len_q.max()), max_k=int(len_k.max()),
        total_q=int(cu_q[-1]), total_k=total_k,
    )


def dmattn_builder(args, data, per_head):
    cu_q, cu_k, keep = data["cu_q"], data["cu_k"], data["keep"]
    group = args.heads // args.heads_k

    def shared(b, h, q_idx, kv_idx):
        return keep[cu_k[b] + kv_idx, 0]

    def per_kv_head(b, h, q_idx, kv_idx):
        return keep[cu_k[b] + kv_idx, h // group]

    mod = per_kv_head if per_head else shared

    def build():
        return dmattn_ops.create_mask(
            mod, cu_q, cu_k, data["max_q"], data["max_k"], args.heads, args.heads_k,
            total_q=data["total_q"], total_k=data["total_k"],
        )

    return build


def flex_packed_builder(args, data, per_head, block_mask_fn):
    cu_q, cu_k, keep = data["cu_q"], data["cu_k"], data["keep"]
    device = cu_q.device
    rows_q = torch.arange(data["total_q"], device=device)
    rows_k = torch.arange(data["total_k"], device=device)
    seq_q = torch.searchsorted(cu_q, rows_q.int(), right=True) - 1  # (total_q,) document id of each packed row
    seq_k = torch.searchsorted(cu_k, rows_k.int(), right=True) - 1
    group = args.heads // args.heads_k

    def packed(b, h, q, kv):
        head = h // group if per_head else 0
        return (seq_q[q] == seq_k[kv]) & keep[kv, head]

    heads = args.heads if per_head else None

    def build():
        return block_mask_fn(packed, None, heads, data["total_q"], data["total_k"], device=device)

    return build


def flex_padded_builder(args, data, per_head, block_mask_fn):
    padded, len_k = data["padded"], data["len_k"]
    device = padded.device
    group = args.heads // args.heads_k

    def gate_padded(b, h, q, kv):
        head = h // group if per_head else 0
        return (kv < len_k[b]) & padded[b, kv, head]

    heads = args.heads if per_head else None

    def build():
        return block_mask_fn(gate_padded, args.batch, heads, data["max_q"], data["max_k"], device=device)

    return build


def block_mask_bytes(bm):
    tensors = [bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices]
    tensors += [bm.q_num_blocks, bm.q_indices, bm.full_q_num_blocks, bm.full_q_indices]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def time_ms(fn, device, warmup, reps):
    """Median wall time of fn() in ms (device-synchronized), and its last result."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        out = fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--max-q", type=int, default=8)
    p.add_argument("--min-k", type=int, default=1024)
    p.add_argument("--max-k", type=int, default=8192)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8)
    p.add_argument("--keep", type=float, default=0.25, help="fraction of each sequence's keys kept")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="torch.compile both builders (dynamic=False)")
    p.add_argument("--packed-per-head", action="store_true", help="also run Flex packed with H = heads")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU); default: torch's choice")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON ('-' for stdout)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = decode_batch(args, device)
    block_mask_fn = create_block_mask
    if args.compile:
        block_mask_fn = torch.compile(create_block_mask, dynamic=False)
    print(
        f"decode batch: B={args.batch}, total_q={data['total_q']}, total_k={data['total_k']}, max_q={data['max_q']}, "
        f"max_k={data['max_k']}, H={args.heads}, Hk={args.heads_k}, keep {args.keep:.0%}, device {device}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads{', compiled' if args.compile else ''}"
    )
    rows = []
    for per_head in (False, True):
        variant = "per_kv_head" if per_head else "shared"
        build = dmattn_builder(args, data, per_head)
        if args.compile:
            build = torch.compile(build, dynamic=False)
        ms, mask = time_ms(build, device, args.warmup, args.reps)
        mine = dict(ms=ms, shape=list(mask.shape), bytes=mask.numel() * mask.element_size())
        flexes = {"packed": flex_packed_builder, "padded": flex_padded_builder}
        for setup, make in flexes.items():
            row = dict(variant=variant, flex_setup=setup, dmattn=mine)
            if setup == "packed" and per_head and not args.packed_per_head and device.type == "cpu":
                row["flex"] = None
                row["skipped"] = "dense grid total_q * total_k * H too large for the CPU (pass --packed-per-head)"
            else:
                fms, bm = time_ms(make(args, data, per_head, block_mask_fn), device, args.warmup, args.reps)
                row["flex"] = dict(ms=fms, shape=list(bm.shape), bytes=block_mask_bytes(bm))
                row["ratio_flex_over_dmattn"] = fms / ms
            rows.append(row)

    print(f"{'variant':12s} {'flex set-up':12s} {'dmattn ms':>10s} {'flex ms':>10s} {'flex/dmattn':>12s}  "
          f"{'dmattn mask':>22s} {'flex BlockMask':>28s}")
    for r in rows:
        d, f = r["dmattn"], r["flex"]
        mine = f"{tuple(d['shape'])} {d['bytes'] / 1e6:.2f} MB"
        if f is None:
            print(f"{r['variant']:12s} {r['flex_setup']:12s} {d['ms']:10.3f} {'-':>10s} {'-':>12s}  {mine:>22s}  "
                  f"skipped: {r['skipped']}")
            continue
        theirs = f"{tuple(f['shape'])} {f['bytes'] / 1e6:.2f} MB"
        print(f"{r['variant']:12s} {r['flex_setup']:12s} {d['ms']:10.3f} {f['ms']:10.3f} "
              f"{r['ratio_flex_over_dmattn']:11.1f}x  {mine:>22s} {theirs:>28s}")
    if args.json:
        payload = dict(device=str(device), torch=torch.__version__, compiled=args.compile, args=vars(args),
                       total_q=data["total_q"], total_k=data["total_k"], rows=rows)
        text = json.dumps(payload, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
