"""Backward benchmark (issue 14's performance section): dmattn_ops' backward against FlexAttention's and torch
varlen_attn's, on the same inputs in one run.

    python tools/bench_backward.py --out benchmarks/results                 # on the H200
    python tools/bench_backward.py --flex-blockmask eager --quick           # a shorter run
    python tools/bench_backward.py --device cpu --tiny --out /tmp/bwd      # CPU smoke test, tiny shapes
    python tools/bench_backward.py --only dmattn --out /tmp/bwd            # our rows alone (two builds compared)
    python tools/bench_backward.py --mask-heads h                          # a mask per query head (read per key)

The batch is bench_gpu.py's prefill workload: B = 8, 512-4096 tokens (q = k), causal, H = 32, Hk = 8, D = 128,
bf16. Groups:
  masked    a key-side mask keeping 50% of each sequence's keys + a key-side bias (the gating score) that
            requires grad. dmattn_ops forward (the reference of the backward's ratio) and backward; FlexAttention
            compiled, packed (bench_gpu.py's peer: document + causal mask_mod reading the keep tensor, score_mod
            adding the bias, a captured buffer that requires grad; its BlockMask build beside it), backward.
  no mask   dmattn_ops forward and backward; torch varlen_attn backward.
In both groups the dmattn_ops backward runs as planned (on a cc 9.0 device the sm90a backward, dQ by reduce-adds;
elsewhere the sm80 pair), then as the sm80 pair with dQ in order (DMATTN_BWD_DQ=ordered, the default before run CA
measured the sm90a one faster; also what torch's deterministic mode runs) and with the sm80 kernels' atomic dQ
(DMATTN_BWD_DQ=atomic).
Each backward is timed as torch.autograd.grad of the peer's output for q, k, v (and the bias) with a fixed random
output gradient, the forward run once before (untimed, its graph retained): median CUDA-event time, L2 flushed before
each repetition. "extra MB" is the peak memory one backward allocates above what was allocated before it, its
gradients included. Targets: backward <= 2.5x dmattn_ops' forward; >= 2x FlexAttention's backward; no mask, >= 1.0x
torch varlen_attn's backward.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402
import bench_gpu  # noqa: E402


MASKED_KEEP = 0.5  # the masked group's kept fraction of each sequence's keys


def _leaves(p, with_bias: bool):
    """p with q, k, v (and its bias) as fresh leaves that require grad, and those leaves."""
    names = ["q", "k", "v"] + (["bias"] if with_bias and p.bias is not None else [])
    leaves = {n: getattr(p, n).detach().clone().requires_grad_() for n in names}
    return p.replace(**leaves), list(leaves.values())


def _backward(forward: Callable[[], torch.Tensor], inputs: List[torch.Tensor], seed: int):
    """A callable running the backward of one forward call (run here, once) for ``inputs``."""
    out = forward()
    grad = torch.randn(out.shape, generator=torch.Generator(device=out.device).manual_seed(seed),
                       device=out.device, dtype=out.dtype)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def _with_env(call: Callable[[], object], name: str, value: str) -> Callable[[], object]:
    """call, run with the environment variable name set to value (and put back after)."""

    def run():
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            return call()
        finally:
            if previous is None:
                del os.environ[name]
            else:
                os.environ[name] = previous
    return run


def measure(name: str, family: str, kind: str, make: Callable[[], Callable[[], object]], dev, args) -> Dict:
    """Times ``make()``'s callable; any failure is reported in the row, not raised."""
    row = {"peer": name, "family": family, "kind": kind}
    try:
        fn = make()
        row["first_call_s"], _ = bc.time_once_s(fn, dev)
        row.update(bc.time_callable(fn, dev, args.warmup, args.reps, bench_gpu.FLUSH).as_dict())
        row["peak_extra_bytes"] = bc.peak_extra_bytes(fn, dev)
        row["status"] = "ok"
    except bench_gpu.Skip as e:
        row["status"], row["note"] = "skipped", str(e)
    except Exception as e:  # noqa: BLE001
        row["status"], row["note"] = "failed", f"{type(e).__name__}: {e}"
        if args.verbose:
            traceback.print_exc()
    bc.free_device_memory(dev)
    return row


def _batch(args):
    """The prefill batch's query and key lengths and head counts (bench_gpu.py's, drawn from --seed)."""
    return bench_gpu.sizes("prefill", args.tiny, torch.Generator().manual_seed(args.seed))


def _problem(args, dev, keep: Optional[float]):
    """The batch, causal, with a key-side mask keeping `keep` of each sequence's keys and a key-side bias, both of
    --mask-heads heads (keep None: neither)."""
    lens_q, lens_k, heads = _batch(args)
    hm = bench_gpu.mask_head_count(args.mask_heads, heads)
    return bench_gpu.make_problem(lens_q, lens_k, heads["heads"], heads["heads_k"], heads["head_dim"], hm, keep, True,
                                  getattr(torch, args.dtype), dev, args.seed)


def run(args) -> Dict[str, object]:
    dev = torch.device(args.device)
    lens_q, lens_k, heads = _batch(args)
    groups = {}
    for group, keep in (("masked: key-side mask 50% + key-side bias (requires grad)", MASKED_KEEP), ("no mask", None)):
        p = _problem(args, dev, keep)
        rows = []
        rows.append(measure("dmattn_ops forward", "dmattn", "forward",
                            lambda: (lambda: p.run()[0]), dev, args))

        def dmattn_bwd():
            s, inputs = _leaves(p, with_bias=True)
            return _backward(lambda: s.run()[0], inputs, args.seed)

        rows.append(measure("dmattn_ops backward", "dmattn", "backward", dmattn_bwd, dev, args))

        # The same backward under a debug variable, read per call: the sm80 pair with dQ in order
        # (DMATTN_BWD_DQ=ordered, side by side with the planned sm90a backward), and the sm80 dK / dV kernel adding dQ
        # with atomics (DMATTN_BWD_DQ=atomic).
        for label, dq in (("sm80 pair, ordered dQ", "ordered"), ("atomic dQ", "atomic")):
            rows.append(measure(f"dmattn_ops backward, {label}", "dmattn", "backward",
                                lambda dq=dq: _with_env(dmattn_bwd(), "DMATTN_BWD_DQ", dq), dev, args))
        peers = args.only == "all"  # else the peers are left out (two builds of dmattn_ops compared, say)
        if peers and keep is not None:
            def flex_bwd():
                if dev.type != "cuda":
                    raise bench_gpu.Skip("FlexAttention is compiled for CUDA here")
                s, inputs = _leaves(p, with_bias=True)
                prepared = bench_gpu.flex_peer(s).prepare()
                row_extras.update(prepared.extras)
                return _backward(prepared.run, inputs, args.seed)

            row_extras: Dict[str, object] = {}
            rows.append(measure("flex compiled, packed, backward", "flex", "backward", flex_bwd, dev, args))
            rows[-1]["extras"] = {k: v for k, v in row_extras.items() if not callable(v)}
        elif peers:
            def varlen_bwd():
                s, inputs = _leaves(p, with_bias=False)
                return _backward(bench_gpu.varlen_peer(s).prepare().run, inputs, args.seed)

            rows.append(measure("torch varlen_attn (FA2), backward", "varlen", "backward", varlen_bwd, dev, args)
                        if dev.type == "cuda" else
                        {"peer": "torch varlen_attn (FA2), backward", "family": "varlen", "kind": "backward",
                         "status": "skipped", "note": "FlashAttention kernels are CUDA only"})
        groups[group] = rows
    return {"workload": "backward", "problem": {"lens_q": lens_q, "lens_k": lens_k, **heads, "dtype": args.dtype,
                                                 "causal": True, "mask_heads": args.mask_heads},
            "environment": bc.environment(dev, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
            "dmattn_build": bench_gpu.dmattn_build(), "groups": groups, "targets": targets(groups),
            "tiny": args.tiny}


def _ms(rows, name) -> Optional[float]:
    for r in rows:
        if r["peer"] == name and r.get("status") == "ok":
            return r["ms_median"]
    return None


def targets(groups) -> List[Dict[str, str]]:
    out = []
    for group, rows in groups.items():
        fwd, bwd = _ms(rows, "dmattn_ops forward"), _ms(rows, "dmattn_ops backward")

        def verdict(ratio, goal, better_low):
            if ratio is None:
                return "not measured"
            return f"{'met' if (ratio <= goal if better_low else ratio >= goal) else 'MISSED'} ({ratio:.2f}x)"

        out.append({"target": f"dmattn_ops backward <= 2.5x its forward [{group}]",
                    "verdict": verdict(bwd / fwd if bwd and fwd else None, 2.5, True)})
        peer = "flex compiled, packed, backward" if "masked" in group else "torch varlen_attn (FA2), backward"
        goal = 2.0 if "masked" in group else 1.0
        other = _ms(rows, peer)
        out.append({"target": f"dmattn_ops backward >= {goal:g}x {peer} [{group}]",
                    "verdict": verdict(other / bwd if other and bwd else None, goal, False)})
    return out


def profile(args, keep: Optional[float] = MASKED_KEEP) -> str:
    """The kernels of one backward of the masked group (keep = MASKED_KEEP; None: the no-mask group, no bias) and their
    device time (torch.profiler), for finding where the time goes. Run under ncu it is also the call to profile: the
    backward runs twice (the first a warm-up), so `ncu --kernel-name regex:bwd_kernel --launch-skip 1 --launch-count 1`
    takes the second."""
    dev = torch.device(args.device)
    p = _problem(args, dev, keep)
    s, inputs = _leaves(p, with_bias=keep is not None)
    run_bwd = _backward(lambda: s.run()[0], inputs, args.seed)
    run_bwd()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        run_bwd()
        if dev.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=12, max_name_column_width=60)


def table(payload) -> str:
    lines = []
    for group, rows in payload["groups"].items():
        lines.append(f"[{group}]")
        body = [[r["peer"], r["status"], bc.fmt(r.get("ms_median"), ".4g"),
                 bc.fmt(r["peak_extra_bytes"] / 2**20 if r.get("peak_extra_bytes") is not None else None, ".1f"),
                 r.get("note", "")[:70]] for r in rows]
        lines.append(bc.format_table(["peer", "status", "ms", "extra MB", "note"], body))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (float32 unless --dtype): a CPU smoke test")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    ap.add_argument("--seed", type=int, default=bench_gpu.DEFAULT_SEED)
    ap.add_argument("--flex-blockmask", choices=["compiled", "eager"], default="compiled")
    ap.add_argument("--out", default=None, help="directory for backward.json and backward.png")
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="also print the device time of each kernel of one masked backward (torch.profiler)")
    ap.add_argument("--mask-heads", choices=["1", "hk", "h"], default="hk",
                    help="Hm of the masked group's key-side mask and bias: 1, Hk (default) or H (read per key)")
    ap.add_argument("--only", choices=["all", "dmattn"], default="all",
                    help="dmattn: the dmattn_ops rows alone, no peer (no FlexAttention compile: two builds compared)")
    ap.add_argument("--profile-only", choices=["masked", "dense"], default=None,
                    help="only the kernel table of one backward of that group, no timing and no peer (the call to "
                         "run under ncu)")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.tiny else "bfloat16")
    args.warmup, args.reps = (1, 3) if args.tiny else ((2, 10) if args.quick else (3, 20))
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_backward: CUDA is not available here; use --device cpu --tiny for a smoke test")
    # bench_gpu's peers read its parsed arguments and L2 flusher.
    bench_gpu.ARGS = bench_gpu.parse_args(["--device", args.device, "--flex-blockmask", args.flex_blockmask]
                                          + (["--tiny"] if args.tiny else []))
    bench_gpu.FLUSH = bc.L2Flusher(dev)
    if args.profile_only:
        print(profile(args, MASKED_KEEP if args.profile_only == "masked" else None))
        return
    payload = run(args)
    print(table(payload))
    if args.profile:
        print(profile(args))
    for t in payload["targets"]:
        print(f"target: {t['target']}: {t['verdict']}"
              + ("  [tiny shapes: a smoke test, not a measurement]" if args.tiny else ""))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        bc.write_json(os.path.join(args.out, "backward.json"), payload)
        labels, values, colors, notes = [], [], [], []
        for group, rows in payload["groups"].items():
            for r in rows:
                labels.append(f"{r['peer']} [{group.split(':')[0]}]")
                values.append(r.get("ms_median"))
                colors.append(bench_gpu.COLORS.get(r["family"], "#7f7f7f"))
                notes.append(r["status"] if r["status"] != "ok" else "")
        why = bc.bar_chart(os.path.join(args.out, "backward.png"), "backward vs forward and peers (ms)", labels,
                           values, colors=colors, notes=notes)
        if why:
            print(f"no chart: {why}")
    return payload


if __name__ == "__main__":
    main()
