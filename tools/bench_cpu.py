"""CPU decode benchmark (issue 2): dmattn_ops against torch SDPA on padded tensors with a materialized mask.

Workload: a decode batch of B=16 sequences with 1-8 queries and 512-2048 keys each, H=8 query heads, Hk=2 key/value
heads, D=64, float32. Each sequence keeps the top 50% of its keys by a gating score (one score per key and KV head),
given to dmattn_ops as a key-side mask (total_k, Hk) plus a key-side bias (total_k, Hk).

The peer gets the same numbers the way SDPA needs them: q, k, v padded to (B, heads, max_seqlen, D) and mask + bias
folded into one additive float mask materialized at (B, H, max_seqlen_q, max_seqlen_k). GQA is given to SDPA both
ways (`enable_gqa=True`, and K/V expanded to H heads); the faster one is the baseline. Only the attention calls are
timed (padding and building the mask are left out of SDPA's time), interleaved in one loop, median of many runs.

    python tools/bench_cpu.py                      # prints the table
    python tools/bench_cpu.py --json out.json      # also writes the results, machine and command

The workload builder and the SDPA set-up here are also used by tools/demo.py.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import dmattn_ops

import bench_common  # tools/bench_common.py: git commit and JSON writing shared by the benchmark tools
from packed_batch import PackedBatch

ROOT = Path(__file__).resolve().parent.parent
SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


def describe(db: PackedBatch) -> Dict[str, int]:
    """The shape facts this benchmark prints and writes to its JSON."""
    return dict(B=db.batch_size, total_q=db.total_q, total_k=db.total_k, H=db.heads, Hk=db.heads_k, D=db.head_dim,
                Hm=db.mask_heads, max_seqlen_q=db.max_seqlen_q, max_seqlen_k=db.max_seqlen_k,
                kept_keys=int(db.mask.sum()), mask_entries=db.mask.numel())


def make_decode_batch(batch=16, queries=(1, 8), keys=(512, 2048), heads=8, kv_heads=2, head_dim=64, keep=0.5,
                      mask_heads: Optional[int] = None, dtype=torch.float32, seed=0) -> PackedBatch:
    """A decode batch: per sequence, lengths drawn uniformly from `queries` and `keys` (inclusive); a key-side
    mask (total_k, Hm) keeping the top `keep` fraction of each sequence's keys by a random gating score, per mask
    head, and a key-side bias (total_k, Hm) float32."""
    gen = torch.Generator().manual_seed(seed)
    hm = kv_heads if mask_heads is None else mask_heads
    seqlens_q = torch.randint(queries[0], queries[1] + 1, (batch,), generator=gen).tolist()
    seqlens_k = torch.randint(keys[0], keys[1] + 1, (batch,), generator=gen).tolist()
    total_q, total_k = sum(seqlens_q), sum(seqlens_k)

    q = torch.randn(total_q, heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(total_k, kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(total_k, kv_heads, head_dim, generator=gen).to(dtype)
    gate = torch.randn(total_k, hm, generator=gen)  # (total_k, Hm) gating score
    mask = torch.zeros(total_k, hm, dtype=torch.bool)
    start = 0
    for length in seqlens_k:
        top = gate[start:start + length].topk(max(1, round(keep * length)), dim=0).indices  # (kept, Hm)
        mask[start:start + length].scatter_(0, top, True)
        start += length
    bias = 0.5 * torch.randn(total_k, hm, generator=gen)  # (total_k, Hm) float32

    return PackedBatch(q=q, k=k, v=v, cu_seqlens_q=dmattn_ops.cu_seqlens(seqlens_q),
                       cu_seqlens_k=dmattn_ops.cu_seqlens(seqlens_k), max_seqlen_q=max(seqlens_q),
                       max_seqlen_k=max(seqlens_k), mask=mask, bias=bias)


@dataclass
class PaddedSDPA:
    """The same batch as torch SDPA takes it: padded tensors and one materialized additive mask."""

    q: torch.Tensor  # (B, H, max_seqlen_q, D)
    k: torch.Tensor  # (B, Hk, max_seqlen_k, D)
    v: torch.Tensor  # (B, Hk, max_seqlen_k, D)
    attn_mask: torch.Tensor  # (B, H, max_seqlen_q, max_seqlen_k) float: bias where attended, -inf elsewhere
    k_expanded: torch.Tensor  # (B, H, max_seqlen_k, D): k repeated over each KV group, made ahead of time
    v_expanded: torch.Tensor  # (B, H, max_seqlen_k, D)

    def run(self, gqa: str = "enable_gqa") -> torch.Tensor:
        """SDPA with GQA given as `enable_gqa=True` ("enable_gqa") or as K/V already repeated to H heads ("expand")."""
        if gqa == "enable_gqa":
            return F.scaled_dot_product_attention(self.q, self.k, self.v, attn_mask=self.attn_mask, enable_gqa=True)
        return F.scaled_dot_product_attention(self.q, self.k_expanded, self.v_expanded, attn_mask=self.attn_mask)


def pad_for_sdpa(db: PackedBatch) -> PaddedSDPA:
    """Pads q/k/v per sequence and folds the key-side mask and bias into a (B, H, max_q, max_k) additive mask.
    Padding keys get -inf; padding query rows attend to everything (finite rows, dropped by unpad)."""
    B, H, Hk, D = db.batch_size, db.heads, db.heads_k, db.head_dim
    Lq, Lk, group_m = db.max_seqlen_q, db.max_seqlen_k, H // db.mask_heads
    q = db.q.new_zeros(B, H, Lq, D)
    k = db.k.new_zeros(B, Hk, Lk, D)
    v = db.v.new_zeros(B, Hk, Lk, D)
    attn_mask = torch.zeros(B, H, Lq, Lk, dtype=db.q.dtype)
    starts_q, starts_k = db.cu_seqlens_q[:-1].tolist(), db.cu_seqlens_k[:-1].tolist()
    for b, (sq, sk, nq, nk) in enumerate(zip(starts_q, starts_k, db.seqlens_q, db.seqlens_k)):
        q[b, :, :nq] = db.q[sq:sq + nq].transpose(0, 1)
        k[b, :, :nk] = db.k[sk:sk + nk].transpose(0, 1)
        v[b, :, :nk] = db.v[sk:sk + nk].transpose(0, 1)
        keyside = db.bias[sk:sk + nk].masked_fill(~db.mask[sk:sk + nk], float("-inf"))  # (nk, Hm)
        row = torch.full((H, Lk), float("-inf"), dtype=db.q.dtype)
        row[:, :nk] = keyside.t().repeat_interleave(group_m, dim=0)  # (H, nk)
        attn_mask[b, :, :nq] = row[:, None, :]
    group = H // Hk
    return PaddedSDPA(q, k, v, attn_mask, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1))


def unpad(out: torch.Tensor, db: PackedBatch) -> torch.Tensor:
    """(B, H, max_seqlen_q, D) -> packed (total_q, H, D)."""
    return torch.cat([out[b, :, :n].transpose(0, 1) for b, n in enumerate(db.seqlens_q)])


def mask_bytes(db: PackedBatch, sdpa: PaddedSDPA) -> Dict[str, int]:
    """Bytes of mask + bias in each form: dmattn key-side, dmattn query-side, SDPA materialized."""
    per_element = db.mask.element_size() + db.bias.element_size()
    return {
        "key_side": db.mask.nbytes + db.bias.nbytes,
        "query_side": db.total_q * db.mask_heads * db.max_seqlen_k * per_element,
        "sdpa_materialized": sdpa.attn_mask.nbytes,
    }


def time_side_by_side(fns: Dict[str, Callable[[], object]], runs: int, warmup: int) -> Dict[str, List[float]]:
    """Calls each function `warmup` times, then `runs` rounds, each round calling every function once in turn.
    Returns milliseconds per call, per function."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_record(benchmark: str, script: str, argv) -> Dict[str, object]:
    """The head of a CPU benchmark's JSON: what ran (the command line of tools/<script>), when, on which commit and
    machine."""
    return {
        "benchmark": benchmark,
        "command": " ".join(shlex.quote(a) for a in ["python", f"tools/{script}",
                                                     *(sys.argv[1:] if argv is None else argv)]),
        "git": bench_common.git_commit(str(ROOT)),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                    "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version(), "torch": torch.__version__,
                    "dmattn_ops_build": dmattn_ops.build_info()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed rounds (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    db = make_decode_batch(seed=args.seed)
    sdpa = pad_for_sdpa(db)
    fns = {"dmattn_ops": lambda: db.run()[0]}
    if SDPA_HAS_GQA:
        fns["sdpa_enable_gqa"] = lambda: sdpa.run("enable_gqa")
    fns["sdpa_expand_kv"] = lambda: sdpa.run("expand")

    with torch.inference_mode():
        out = fns["dmattn_ops"]()
        errors = {name: (unpad(fn(), db) - out).abs().max().item() for name, fn in fns.items() if name != "dmattn_ops"}
        times = time_side_by_side(fns, args.runs, args.warmup)

    median = {name: statistics.median(t) for name, t in times.items()}
    best_sdpa = min((n for n in median if n.startswith("sdpa")), key=median.get)
    speedup = median[best_sdpa] / median["dmattn_ops"]
    mem = mask_bytes(db, sdpa)
    shape = describe(db)

    print(f"decode batch: B={shape['B']}, total_q={shape['total_q']}, total_k={shape['total_k']}, "
          f"H={shape['H']}, Hk={shape['Hk']}, D={shape['D']}, float32, key-side mask keeps "
          f"{shape['kept_keys']}/{shape['mask_entries']} + key-side bias")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}; "
          f"median of {args.runs} runs after {args.warmup} warm-up rounds")
    print(f"{'':27}{'median ms':>10}{'mask+bias bytes':>17}{'max |diff|':>12}")
    print(f"{'dmattn_ops (key-side)':27}{median['dmattn_ops']:10.3f}{mem['key_side']:17,}{'':>12}")
    for name in fns:
        if name.startswith("sdpa"):
            label = "SDPA padded, " + ("enable_gqa" if name == "sdpa_enable_gqa" else "K/V expanded")
            print(f"{label:27}{median[name]:10.3f}{mem['sdpa_materialized']:17,}{errors[name]:12.2e}")
    print(f"speed-up vs the faster SDPA: {speedup:.2f}x (target >= 2x); "
          f"mask memory {mem['sdpa_materialized'] / mem['key_side']:.0f}x smaller "
          f"(query-side layout would be {mem['query_side']:,} bytes)")

    agree = all(e < 1e-4 for e in errors.values())
    if not agree:
        print(f"OUTPUTS DISAGREE: {errors}", file=sys.stderr)
    if args.json:
        result = {
            **run_record("cpu_decode", "bench_cpu.py", argv),
            "workload": {**shape, "dtype": "float32", "keep": 0.5, "seed": args.seed},
            "runs": args.runs,
            "warmup": args.warmup,
            "median_ms": median,
            "baseline": best_sdpa,
            "speedup_vs_sdpa": speedup,
            "mask_bias_bytes": mem,
            "max_abs_diff_vs_dmattn": errors,
            "outputs_agree": agree,
        }
        bench_common.write_json(str(args.json), result)
        print(f"wrote {args.json}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
