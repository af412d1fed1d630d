"""How much of an sm90a forward call its work units' starts and ends cost (docs/pending/fa3_study.md, item C,
step 0): runs the calls below on each grid of the sm90a kernel and reads back the times each unit passed its
boundaries, written by the measuring build (DMATTN_UNIT_STAMPS=1 at build time; csrc/cuda/sm90a/unit_stamps.cuh).

    DMATTN_UNIT_STAMPS=1 DMATTN_CUDA_ARCHS=90 python setup.py build_ext --inplace    # the measuring build
    python tools/unit_stamps.py                          # every call below, every grid
    python tools/unit_stamps.py --calls causal masked --grids persistent dynamic --json /tmp/stamps.json
    # in one device call, the measuring build as a tree of its own (tools/run_gpu.sh), then this tool in it:
    tools/make_trees.sh stamps && printf 'DMATTN_UNIT_STAMPS=1\nDMATTN_HEAD_DIMS=128\n' > .trees/stamps.env
    LOGDIR=/tmp/l DMATTN_CUDA_ARCHS=90 TREE_DEFER_TESTS=stamps TREES_TO_CHECK=stamps \
      TREE_BENCH_TOOL=tools/unit_stamps.py BENCH_ARGS="--calls window causal" \
      bash tools/run_gpu.sh wheels trees tree_bench pack summary

Calls: causal and non-causal, the dense batch (B = --batch x --seqlen, H 32 / Hk 8, D 128, bf16 by default); masked,
window and masked_window, bench_gpu.py's prefill batch (its lengths from --seed, bench_gpu's default: 8 sequences,
~16k tokens, H 32 / Hk 8, D 128, causal): the key-side mask keeping 50% of each sequence's keys per KV head with its
key-side bias (the kSlots kernel over the gathered kept rows; its units' tiles are kept-slot tiles), the sliding
window of 256 keys (the windowed kernel, about three tiles a unit), and both (`--workload prefill` and `--workload
window` of bench_gpu.py).

Grids (the debug variables the binding reads per call): per_unit, a CTA per unit (DMATTN_SM90A_CTAS=0, dense's
static grid); persistent, one CTA per SM walking every SM-th unit (DMATTN_SM90A_CTAS=<SMs> DMATTN_SM90A_SCHED=static;
the masked and windowed calls' static grid); dynamic, one CTA per SM taking units longest first from a counter (the
default of the plain, windowed and kSlots kernels; DMATTN_SM90A_SCHED=dynamic).

Per call and grid it prints (microseconds; a unit = 128 query rows x one head; both consumer warpgroups' records
merged: its start the earlier, its end the later):
  X fit / T fit   least squares of each unit's SM time (its span plus the gap before it on its SM) against its KV
                  tiles: time = X + T * tiles. X is the per-unit boundary cost not overlapped with tiles
  gap             from the previous unit's end on the same SM to this unit's start (a CTA per unit: the CTA's exit
                  drain, the next one's launch and its barrier set-up; persistent: 0 by construction)
  Q wait          start -> the unit's Q landed and its set-up done (the two parts below)
    known           start -> the unit known: the dynamic scheduler's q_full wait (its words and Q); else ~0
    set-up          known -> Q landed: the consumers' unit set-up (its bounds, the rows' key ranges; with the
                    static grids also their q_full wait)
  first S         Q landed -> the first S GEMM issued (K's first tile, the ping-pong turn)
  epilogue        the last P V landed -> out stored (or its TMA store issued), in two parts:
    staged          -> the rows' values written (into shared memory past the warpgroup's barrier, or from registers)
    store           -> the TMA store issued
  share           units x X / (SMs x the stamps' makespan): the part of the call a perfect overlap would save
  tail            the mean time the SMs sit idle at the end (the makespan's end minus each SM's last unit end)
Durations within an SM use clock64 (finer than %globaltimer, whose step is printed), converted to time with the
ratio of the two over the call's long units.

First run: run DO on an H100 (benchmarks/results/unit_stamps_run_DO_h100.json; docs/pending/unit_boundaries.md reads
it). The records cost little there: each call's makespan matched the plain build's time (the window 302 us against
0.296-0.299 ms, dense causal 929 us against 0.918-0.935 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed_batch import PackedBatch  # noqa: E402

WORDS = 20  # per record: unit_stamps.cuh (UnitStamps::kWords, heuristics.h kUnitStampWords)
START, KNOWN, Q_LANDED, FIRST_S, LAST_PV, STAGED, DONE = range(7)
CLOCK = 7  # the clock64 words follow the seven %globaltimer ones
SM, CTA, TILES, ORDER, UNIT, WRITTEN = range(2 * CLOCK, 2 * CLOCK + 6)
GRID_ENV = {"per_unit": lambda sms: {"DMATTN_SM90A_CTAS": "0"},
            "persistent": lambda sms: {"DMATTN_SM90A_CTAS": str(sms), "DMATTN_SM90A_SCHED": "static"},
            "dynamic": lambda sms: {"DMATTN_SM90A_SCHED": "dynamic"}}
ENV_KEYS = ("DMATTN_SM90A_CTAS", "DMATTN_SM90A_SCHED", "DMATTN_ARCH")


CALLS = ("causal", "non-causal", "masked", "window", "masked_window")


def prefill_problem(args, call: str) -> PackedBatch:
    """bench_gpu.py's prefill batch (its sizes and inputs for --seed) as the call runs in its prefill / window
    workloads."""
    from bench_gpu import WINDOW, make_problem, sizes

    lens_q, lens_k, hs = sizes("prefill", False, torch.Generator().manual_seed(args.prefill_seed))
    dtype = getattr(torch, args.dtype)
    masked = call in ("masked", "masked_window")
    p = make_problem(lens_q, lens_k, hs["heads"], hs["heads_k"], hs["head_dim"], hs["heads_k"], 0.5 if masked else None,
                     causal=True, dtype=dtype, device=torch.device("cuda"), seed=args.prefill_seed)
    return p.replace(window_size=(WINDOW - 1, -1)) if "window" in call else p


def problem(args, causal: bool) -> PackedBatch:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(args.seed)
    lens = [args.seqlen] * args.batch
    total = sum(lens)
    dtype = getattr(torch, args.dtype)
    q = torch.randn(total, args.heads, args.head_dim, generator=gen, device=dev, dtype=dtype)
    k = torch.randn(total, args.heads_k, args.head_dim, generator=gen, device=dev, dtype=dtype)
    v = torch.randn(total, args.heads_k, args.head_dim, generator=gen, device=dev, dtype=dtype)
    cu = torch.tensor([0] + lens, device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedBatch(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=args.seqlen,
                       max_seqlen_k=args.seqlen, is_causal=causal)


def timed_call(p: PackedBatch, reps: int):
    """The call's median time (ms) over reps runs after two warm-ups, and the last run's records."""
    for _ in range(2):
        p.run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        p.run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    records = torch.ops.dmattn.unit_stamps().cpu()
    return sorted(times)[len(times) // 2], records


def units_of(records: torch.Tensor):
    """One row per unit from its two warpgroups' records (index 2 u + w): the earliest start and Q / first S, the
    latest last P V and end (both clocks), its SM, KV tiles and place in its CTA's walk."""
    rec = records.view(-1, 2, WORDS)
    written = (rec[:, 0, WRITTEN] == 1) & (rec[:, 1, WRITTEN] == 1)
    rec = rec[written]
    out = {}
    for name, k, pick in (("start", START, "min"), ("known", KNOWN, "min"), ("q", Q_LANDED, "min"),
                          ("s", FIRST_S, "min"), ("pv", LAST_PV, "max"), ("staged", STAGED, "max"),
                          ("done", DONE, "max")):
        for base, suffix in ((0, "_ns"), (CLOCK, "_clk")):
            both = rec[:, :, base + k]
            out[name + suffix] = both.min(1).values if pick == "min" else both.max(1).values
    for name, k in (("sm", SM), ("tiles", TILES), ("order", ORDER), ("cta", CTA)):
        out[name] = rec[:, 0, k]
    return out


def analyse(u: dict, call_ms: float, sms: int) -> dict:
    n = u["sm"].numel()
    if n == 0:
        return {"units": 0}
    has_q = u["tiles"] > 0
    span_ns = (u["done_ns"] - u["start_ns"]).double()
    span_clk = (u["done_clk"] - u["start_clk"]).double()
    long = has_q & (span_ns > 10_000)
    ns_per_clk = float((span_ns[long] / span_clk[long]).median()) if bool(long.any()) else float("nan")
    stamps = torch.cat([u["start_ns"], u["done_ns"]]).unique()
    step_ns = float((stamps[1:] - stamps[:-1]).min()) if stamps.numel() > 1 else float("nan")

    def us(clk):  # a clock64 difference within one SM, in microseconds
        return clk.double() * ns_per_clk / 1e3

    # The gap before each unit on its SM (units of an SM run one after the other: one CTA fits an SM at a time);
    # an SM's first unit: from the stamps' first start.
    t0 = int(u["start_ns"].min())
    gap = torch.zeros(n, dtype=torch.float64)
    sm_last_end = {}
    for sm in u["sm"].unique().tolist():
        idx = (u["sm"] == sm).nonzero().flatten()
        idx = idx[u["start_clk"][idx].argsort()]
        first = int(idx[0])
        gap[first] = (int(u["start_ns"][first]) - t0) / 1e3
        if idx.numel() > 1:
            gap[idx[1:]] = us(u["start_clk"][idx[1:]] - u["done_clk"][idx[:-1]])
        sm_last_end[sm] = int(u["done_ns"][idx].max())
    makespan_us = (int(u["done_ns"].max()) - t0) / 1e3
    sm_time = us(span_clk) + gap
    # time = X + T tiles over the units after each SM's first (the first's gap is the launch, not a boundary)
    later = gap.clone()
    for sm in u["sm"].unique().tolist():
        idx = (u["sm"] == sm).nonzero().flatten()
        later[idx[u["start_clk"][idx].argmin()]] = float("nan")
    fit = ~torch.isnan(later)
    tiles = u["tiles"].double()
    x_fit = t_fit = float("nan")
    if int(fit.sum()) >= 2 and float(tiles[fit].std()) > 0:
        a = torch.stack([torch.ones_like(tiles[fit]), tiles[fit]], 1)
        sol = torch.linalg.lstsq(a, sm_time[fit].unsqueeze(1)).solution.flatten()
        x_fit, t_fit = float(sol[0]), float(sol[1])
    elif int(fit.sum()) >= 1:  # one tile count (non-causal): X from the components, T from the loop
        t_fit = float((us(u["pv_clk"] - u["s_clk"])[fit & has_q] / tiles[fit & has_q]).mean())
        x_fit = float((sm_time[fit] - t_fit * tiles[fit]).mean())
    end_ns = int(u["done_ns"].max())
    tail_us = sum((end_ns - e) / 1e3 for e in sm_last_end.values()) / max(len(sm_last_end), 1)
    mean = lambda t: float(t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {
        "units": n, "tiles_per_unit": mean(tiles), "call_ms": call_ms, "makespan_us": makespan_us,
        "sms_used": len(sm_last_end), "ns_per_clock": ns_per_clk, "globaltimer_step_ns": step_ns,
        "x_fit_us": x_fit, "t_fit_us": t_fit,
        "gap_us": mean(gap[fit]) if bool(fit.any()) else float("nan"),
        "q_wait_us": mean(us(u["q_clk"] - u["start_clk"])[has_q]),
        "known_us": mean(us(u["known_clk"] - u["start_clk"])[has_q]),
        "setup_us": mean(us(u["q_clk"] - u["known_clk"])[has_q]),
        "first_s_us": mean(us(u["s_clk"] - u["q_clk"])[has_q]),
        "loop_us_per_tile": mean((us(u["pv_clk"] - u["s_clk"]) / tiles.clamp(min=1))[has_q]),
        "epilogue_us": mean(us(u["done_clk"] - u["pv_clk"])[has_q]),
        "staged_us": mean(us(u["staged_clk"] - u["pv_clk"])[has_q]),
        "store_us": mean(us(u["done_clk"] - u["staged_clk"])[has_q]),
        "share": n * x_fit / (max(len(sm_last_end), 1) * makespan_us) if makespan_us > 0 else float("nan"),
        "tail_us": tail_us,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grids", nargs="+", default=list(GRID_ENV), choices=list(GRID_ENV))
    ap.add_argument("--calls", nargs="+", default=list(CALLS), choices=list(CALLS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-k", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prefill-seed", type=int, default=None,
                    help="the prefill batch's seed (masked / window calls; default: bench_gpu.py's)")
    ap.add_argument("--json", help="also write every row here")
    ap.add_argument("--out", help="a folder to write every row into, as unit_stamps.json (what tools/run_gpu.sh's "
                                  "tree_bench stage passes)")
    args = ap.parse_args()
    if args.prefill_seed is None:
        from bench_gpu import DEFAULT_SEED
        args.prefill_seed = DEFAULT_SEED

    import dmattn_ops
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("unit_stamps: needs a cc 9.0 device (the sm90a kernel)")
        return 2
    if not dmattn_ops.build_info().get("unit_stamps") or not hasattr(torch.ops.dmattn, "unit_stamps"):
        print("unit_stamps: this build does not record units: rebuild with DMATTN_UNIT_STAMPS=1 "
              "(DMATTN_UNIT_STAMPS=1 DMATTN_CUDA_ARCHS=90 python setup.py build_ext --inplace)")
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    saved = {k: os.environ.get(k) for k in ENV_KEYS}
    rows = []
    cols = ["units", "call_ms", "x_fit_us", "t_fit_us", "gap_us", "q_wait_us", "known_us", "setup_us", "first_s_us",
            "loop_us_per_tile", "epilogue_us", "staged_us", "store_us", "share", "tail_us"]
    print(f"unit_stamps: {torch.cuda.get_device_name(0)}, {sms} SMs; dense: B = {args.batch} x {args.seqlen}, "
          f"H {args.heads} / Hk {args.heads_k}, D {args.head_dim}, {args.dtype}")
    print(f"{'call':13s} {'grid':11s} " + " ".join(f"{c:>16s}" for c in cols))
    shown = False  # the prefill batch's sizes, printed once
    try:
        for call in args.calls:
            if call in ("causal", "non-causal"):
                p = problem(args, call == "causal")
            else:
                p = prefill_problem(args, call)
                if not shown:
                    shown = True
                    print(f"(prefill batch: B = {p.batch_size}, lengths {p.seqlens_q}, H {p.heads} / Hk {p.heads_k}, "
                          f"D {p.head_dim})")
            for grid in args.grids:
                for k in ENV_KEYS:
                    os.environ.pop(k, None)
                os.environ.update(GRID_ENV[grid](sms))
                call_ms, records = timed_call(p, args.reps)
                if records.numel() == 0:
                    print(f"{call:13s} {grid:11s} no records (not the sm90a kernel?)")
                    continue
                row = analyse(units_of(records), call_ms, sms)
                row.update(call=call, grid=grid)
                rows.append(row)
                print(f"{row['call']:13s} {grid:11s} " +
                      " ".join(f"{row.get(c, float('nan')):>16.4g}" for c in cols))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if rows:
        print(f"(clock: {rows[0]['ns_per_clock']:.4g} ns per cycle; %globaltimer step seen: "
              f"{rows[0]['globaltimer_step_ns']:.4g} ns)")
    for path in filter(None, (args.json, args.out and Path(args.out) / "unit_stamps.json")):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"args": vars(args), "sms": sms, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
