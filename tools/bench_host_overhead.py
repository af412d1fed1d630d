"""Host time per dmattn_ops call on a small decode batch: what the Python layer and the op's entry cost.

    python tools/bench_host_overhead.py --device cpu  [--json PATH]
    python tools/bench_host_overhead.py --device cuda [--json PATH]
    PYTHONPATH=.prev python tools/bench_host_overhead.py ...   # an earlier build (tools/run_gpu.sh `prev`)

The batch: B = 8 sequences of 1 query and 256 keys, H = 8, Hk = 2, D = 64, a key-side mask keeping half the keys and
a key-side bias (float32 on the CPU, bfloat16 on CUDA). Timed, per call (median over --rounds rounds of --calls
back-to-back calls, time.perf_counter):
  api           dmattn_ops.varlen_attention(...)    what a user's decode step pays
  raw_op        torch.ops.dmattn.varlen_fwd(*args)  the dispatcher, the C++ checks, allocation, launches / kernel
  python_layer  api - raw_op                        the Python wrapper on top
On CUDA the calls of a round are not synchronised, so a call costs its host time as long as the GPU keeps up (this
batch's kernels take a few microseconds); each round ends with a synchronize. On the CPU the kernel runs inside the
call, so api and raw_op include it and python_layer is the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def decode_batch(device: str):
    import dmattn_ops

    g = torch.Generator().manual_seed(0)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    B, H, Hk, D, keys = 8, 8, 2, 64, 256
    q = torch.randn(B, H, D, generator=g, dtype=dtype)
    k = torch.randn(B * keys, Hk, D, generator=g, dtype=dtype)
    v = torch.randn(B * keys, Hk, D, generator=g, dtype=dtype)
    mask = torch.rand(B * keys, Hk, generator=g) < 0.5
    bias = torch.randn(B * keys, Hk, generator=g)
    cu_q = dmattn_ops.cu_seqlens([1] * B)
    cu_k = dmattn_ops.cu_seqlens([keys] * B)
    tensors = [t.to(device) for t in (q, k, v, cu_q, cu_k, mask, bias.to(dtype))]
    q, k, v, cu_q, cu_k, mask, bias = tensors
    return (q, k, v, cu_q, cu_k, 1, keys), dict(mask=mask, bias=bias)


def per_call_us(fn, device: str, calls: int, rounds: int) -> list[float]:
    for _ in range(calls):  # warm-up: caches, allocator, lazy CUDA state
        fn()
    bc.synchronize(torch.device(device))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        bc.synchronize(torch.device(device))
        samples.append((t1 - t0) / calls * 1e6)
    return samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--label", default="this build")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import dmattn_ops

    seq_args, operands = decode_batch(args.device)
    raw_args = (*seq_args, operands["mask"], operands["bias"], None, False)
    api = per_call_us(lambda: dmattn_ops.varlen_attention(*seq_args, **operands), args.device, args.calls,
                      args.rounds)
    raw = per_call_us(lambda: torch.ops.dmattn.varlen_fwd(*raw_args), args.device, args.calls, args.rounds)
    result = dict(api_us=statistics.median(api), raw_op_us=statistics.median(raw))
    result["python_layer_us"] = result["api_us"] - result["raw_op_us"]
    print(f"{args.label} ({args.device}): " + ", ".join(f"{k} {v:.1f}" for k, v in result.items()))
    if args.json:
        bc.write_json(args.json, dict(
            label=args.label, device=args.device, batch="B=8, 1 query x 256 keys, H=8, Hk=2, D=64, key-side mask "
            "50% + bias", calls_per_round=args.calls, rounds=args.rounds, **result,
            api_rounds_us=api, raw_op_rounds_us=raw, environment=bc.environment(torch.device(args.device),
                                                                                 os.path.dirname(__file__) + "/.."),
            dmattn_build=dmattn_ops.build_info(), command=" ".join(sys.argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
