"""CPU training step (issue 14's CPU kernel): dmattn_ops' forward and backward against torch SDPA's, same inputs.

Workload: B = 2 sequences of 512 tokens, causal, H = 8 query heads, Hk = 2 key/value heads, D = 64, float32, and a
learnable key-side bias (total_k, Hk) (a gate per key, as issue 14's example trains): gradients of q, k, v and the
bias. The peer is SDPA on padded (B, heads, L, D) tensors with K / V expanded to H heads and the bias broadcast into
a (B, H, L, L) float mask (causal folded in), its gradient flowing back to the same (total_k, Hk) leaf. Timed: the
forward alone and forward + backward of each, interleaved in one loop, median of many rounds; the gradients are
checked against each other.

    python tools/bench_cpu_backward.py                     # prints the table
    python tools/bench_cpu_backward.py --json out.json     # also writes the results, machine and command
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

import dmattn_ops

import bench_common  # tools/bench_common.py: git commit and JSON writing shared by the benchmark tools
from bench_cpu import cpu_model, run_record, time_side_by_side

B, L, H, HK, D = 2, 512, 8, 2, 64


def make_inputs(seed: int) -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    total = B * L
    return {
        "q": torch.randn(total, H, D, generator=gen),
        "k": torch.randn(total, HK, D, generator=gen),
        "v": torch.randn(total, HK, D, generator=gen),
        "bias": torch.randn(total, HK, generator=gen),
        "dout": torch.randn(total, H, D, generator=gen),
        "cu": torch.arange(0, total + 1, L, dtype=torch.int32),
    }


def leaves(x: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
    return [x[n].clone().requires_grad_(True) for n in ("q", "k", "v", "bias")]


def dmattn_forward(q, k, v, bias, cu):
    out = dmattn_ops.varlen_attention(q, k, v, cu, cu, L, L, bias=bias, is_causal=True)
    return out[0] if isinstance(out, tuple) else out


def sdpa_forward(q, k, v, bias, cu):
    del cu  # every sequence is L tokens: the packed rows reshape to (B, L, ...)
    group = H // HK
    qp = q.view(B, L, H, D).transpose(1, 2)
    kp = k.view(B, L, HK, D).transpose(1, 2).repeat_interleave(group, dim=1)
    vp = v.view(B, L, HK, D).transpose(1, 2).repeat_interleave(group, dim=1)
    keys = bias.view(B, L, HK).transpose(1, 2).repeat_interleave(group, dim=1)  # (B, H, L): one value per key
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    mask = keys[:, :, None, :].expand(B, H, L, L).masked_fill(~causal, float("-inf"))
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)
    return out.transpose(1, 2).reshape(B * L, H, D)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    x = make_inputs(args.seed)
    peers = {"dmattn_ops": dmattn_forward, "sdpa": sdpa_forward}
    grads = {}
    for name, fwd in peers.items():
        ls = leaves(x)
        fwd(*ls, x["cu"]).backward(x["dout"])
        grads[name] = [t.grad for t in ls]
    diffs = {n: (a - b).abs().max().item() for n, a, b in zip(("dq", "dk", "dv", "dbias"), *grads.values())}

    def step(fwd):
        ls = leaves(x)
        fwd(*ls, x["cu"]).backward(x["dout"])

    def forward_only(fwd):
        with torch.no_grad():
            fwd(x["q"], x["k"], x["v"], x["bias"], x["cu"])

    fns = {}
    for name, fwd in peers.items():
        fns[f"{name} forward"] = lambda fwd=fwd: forward_only(fwd)
        fns[f"{name} forward + backward"] = lambda fwd=fwd: step(fwd)
    times = time_side_by_side(fns, args.runs, args.warmup)
    median = {name: statistics.median(t) for name, t in times.items()}
    backward = {n: median[f"{n} forward + backward"] - median[f"{n} forward"] for n in peers}

    print(f"training step: B={B} x L={L} causal, H={H}, Hk={HK}, D={D}, float32, learnable key-side bias (total_k, Hk)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_model()}; "
          f"median of {args.runs} rounds after {args.warmup} warm-up rounds")
    print(f"{'':14}{'forward ms':>12}{'fwd + bwd ms':>14}{'backward ms':>13}{'bwd / fwd':>11}")
    for n in peers:
        print(f"{n:14}{median[f'{n} forward']:12.2f}{median[f'{n} forward + backward']:14.2f}{backward[n]:13.2f}"
              f"{backward[n] / median[f'{n} forward']:11.1f}")
    print(f"training step speed-up vs SDPA: "
          f"{median['sdpa forward + backward'] / median['dmattn_ops forward + backward']:.2f}x; "
          f"gradients max |diff| vs SDPA: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    agree = all(v < 1e-3 for v in diffs.values())
    if not agree:
        print(f"GRADIENTS DISAGREE: {diffs}", file=sys.stderr)
    if args.json:
        result = {
            **run_record("cpu_training_step", "bench_cpu_backward.py", argv),
            "workload": {"B": B, "L": L, "H": H, "Hk": HK, "D": D, "dtype": "float32", "causal": True,
                         "bias": "key-side (total_k, Hk), requires grad", "seed": args.seed},
            "runs": args.runs,
            "warmup": args.warmup,
            "median_ms": median,
            "backward_ms": backward,
            "gradient_max_abs_diff_vs_sdpa": diffs,
            "gradients_agree": agree,
        }
        bench_common.write_json(str(args.json), result)
        print(f"wrote {args.json}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
