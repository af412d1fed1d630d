"""Two builds of dmattn_ops side by side: the dmattn_ops rows of tools/bench_gpu.py runs (or of tools/bench_backward.py
runs: workload "backward") made with each build on one machine in one session, as ratios new / old, with every
workload more than --tolerance slower flagged.

    # on the GPU host, in one device call (tools/run_gpu.sh's `compare` stage does this): the previous build in
    # .prev/ (sources of the commit to compare against, built in place), the current build in place; runs alternate
    # old, new, old, new so that drift of the machine hits both
    PYTHONPATH=.prev python3 tools/bench_gpu.py --workload decode --only dmattn --out $OUT/old1
    python3 tools/bench_gpu.py --workload decode --only dmattn --out $OUT/new1
    ...
    python3 tools/compare_builds.py --old $OUT/old1 $OUT/old2 --new $OUT/new1 $OUT/new2 \
        --json benchmarks/results/x.json --chart benchmarks/results/x.png

A row is one dmattn_ops peer of one (workload, group) of bench_gpu.py (e.g. "prefill / causal, the same mask + bias
expanded query-side / dmattn_ops, query-side mask + bias"); its time per build is the median over that build's runs
of the per-run medians. (Rows were once per group, pooling a group's dmattn_ops peers: a group of a 7.4 ms and a
0.96 ms call read as 4.2 ms, and a change to one of them was diluted or hidden.)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402

Key = Tuple[str, str, str]  # (workload, group, peer)


def dmattn_times(run_dirs: List[str]) -> Tuple[Dict[Key, List[float]], Dict[str, object]]:
    """{(workload, group, peer): [median ms of each run]} of the dmattn_ops rows, and the first run's metadata. A run
    folder holds bench_gpu.py's JSON (rows in "results", each naming its group) or bench_backward.py's (rows under
    their group in "groups")."""
    times: Dict[Key, List[float]] = {}
    meta: Dict[str, object] = {}
    for run in run_dirs:
        paths = sorted(glob.glob(os.path.join(run, "*.json")))
        if not paths:
            sys.exit(f"compare_builds: no bench_gpu.py / bench_backward.py JSON in {run}")
        for path in paths:
            with open(path) as f:
                payload = json.load(f)
            meta.setdefault("environment", payload["environment"])
            meta.setdefault("dmattn_build", payload["dmattn_build"])
            meta.setdefault("problems", {})[payload["workload"]] = {
                k: v for k, v in payload["problem"].items() if not isinstance(v, list)
            }
            rows = payload.get("results")
            if rows is None:  # bench_backward.py
                rows = [dict(row, group=group) for group, group_rows in payload["groups"].items() for row in group_rows]
            for row in rows:
                if row["family"] == "dmattn" and row["status"] == "ok" and row.get("ms_median"):
                    times.setdefault((payload["workload"], row["group"], row["peer"]), []).append(row["ms_median"])
    return times, meta


def compare(old: Dict[Key, List[float]], new: Dict[Key, List[float]], tolerance: float) -> List[Dict[str, object]]:
    rows = []
    for key in sorted(set(old) | set(new)):
        o = statistics.median(old[key]) if key in old else None
        n = statistics.median(new[key]) if key in new else None
        ratio = n / o if o and n else None
        verdict = "missing" if ratio is None else (f"SLOWER by {100 * (ratio - 1):.1f}%" if ratio > 1 + tolerance
                                                   else "ok")
        rows.append(dict(workload=key[0], group=key[1], peer=key[2], old_ms=o, new_ms=n, new_over_old=ratio,
                         verdict=verdict, old_runs=old.get(key, []), new_runs=new.get(key, [])))
    return rows


def label(r: Dict[str, object]) -> str:
    """workload / group, and the peer where it is more than plain dmattn_ops."""
    peer = "" if r["peer"] == "dmattn_ops" else f" / {str(r['peer']).removeprefix('dmattn_ops, ')}"
    return f"{r['workload']} / {r['group']}{peer}"


def chart(path: str, rows: List[Dict[str, object]], title: str) -> str | None:
    labels, values, colors, notes = [], [], [], []
    for r in rows:
        for build, color in (("old", "#999999"), ("new", "#1f77b4")):
            labels.append(f"{label(r)} [{build}]")
            values.append(r[f"{build}_ms"])
            colors.append(color)
            notes.append(f"x{r['new_over_old']:.3f}" if build == "new" and r["new_over_old"] else "")
    return bc.bar_chart(path, title, labels, values, colors, notes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", nargs="+", required=True,
                    help="bench_gpu.py (or bench_backward.py) --out folders of the previous build")
    ap.add_argument("--new", nargs="+", required=True, help="the same of the current build")
    ap.add_argument("--old-label", default="previous build")
    ap.add_argument("--new-label", default="this build")
    ap.add_argument("--tolerance", type=float, default=0.03, help="slow-down flagged above this fraction (0.03)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--chart", default=None)
    args = ap.parse_args(argv)

    old, old_meta = dmattn_times(args.old)
    new, new_meta = dmattn_times(args.new)
    rows = compare(old, new, args.tolerance)
    table = bc.format_table(
        ["workload / group / peer", "old ms", "new ms", "new / old", "verdict"],
        [[label(r), bc.fmt(r["old_ms"], ".4f"), bc.fmt(r["new_ms"], ".4f"),
          bc.fmt(r["new_over_old"], ".3f"), r["verdict"]] for r in rows],
    )
    print(f"old: {args.old_label}\nnew: {args.new_label}\n{table}")
    payload = dict(
        old=dict(label=args.old_label, runs=args.old, **old_meta),
        new=dict(label=args.new_label, runs=args.new, **new_meta),
        tolerance=args.tolerance,
        definitions="ms: median over a build's runs of the benchmark's per-run median (CUDA events, L2 flushed); "
                    "new / old < 1 means the current build is faster",
        rows=rows,
        command=" ".join(sys.argv),
    )
    if args.chart:
        why = chart(args.chart, rows, f"dmattn_ops: {args.new_label} vs {args.old_label} (median ms)")
        payload["chart"] = None if why else os.path.basename(args.chart)
    if args.json:
        bc.write_json(args.json, payload)
    return 1 if any(r["verdict"].startswith("SLOWER") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
