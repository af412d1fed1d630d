"""A short text summary of one Nsight Compute report (.ncu-rep): the kernel's time, tensor-pipe use, stall reasons
from the PC samples, and the source lines with the most stall samples (a `-lineinfo` build; dmattn_ops builds with
it always), each with its top three reasons and one SASS instruction.

    ncu --set full --import-source yes --kernel-name regex:fwd_kernel --launch-skip 3 --launch-count 1 \\
        -o /tmp/fwd python3 tools/profile_prefill.py --calls masked --arch auto --ncu      # on the GPU machine
    python3 tools/ncu_summary.py /tmp/fwd.ncu-rep --lines 30                                 # anywhere

Reading a report needs NVIDIA's `ncu_report` module: the Nsight Compute install's extras/python, or
`pip install ncu-report` (not a dependency of dmattn_ops; a machine without ncu can read a report it fetched).
"""

from __future__ import annotations

import argparse
import collections
import sys

STALL_PREFIX = "smsp__pcsamp_warps_issue_stalled_"
SCALARS = [
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "smsp__warps_eligible.avg.per_cycle_active",
    "smsp__warps_active.avg.per_cycle_active",
    "lts__t_sector_hit_rate.pct",
    "sm__cycles_active.avg",
    "gpc__cycles_elapsed.max",
    "smsp__inst_executed.sum",
    "launch__registers_per_thread",
]
TENSOR = [
    "sm__pipe_tensor_cycles_active_realtime.avg.pct_of_peak_sustained_elapsed",
    "sm__ops_path_tensor_op_hgmma_src_bf16_dst_fp32_sparsity_off.avg.pct_of_peak_sustained_elapsed",
    "sm__ops_path_tensor_op_hgmma_src_fp16_sparsity_off.avg.pct_of_peak_sustained_elapsed",
]


def value(action, name):
    metric = action.metric_by_name(name)
    return None if metric is None else metric.as_double()


def stall_samples(action):
    """{pc: Counter(reason -> samples)} from the per-instruction PC sampling metrics."""
    per_pc = collections.defaultdict(collections.Counter)
    for name in action.metric_names():
        if not name.startswith(STALL_PREFIX) or name.endswith("_not_issued"):
            continue
        metric = action.metric_by_name(name)
        if not metric.has_correlation_ids():
            continue
        pcs = metric.correlation_ids()
        for i in range(metric.num_instances()):
            samples = metric.as_uint64(i)
            if samples:
                per_pc[pcs.as_uint64(i)][name[len(STALL_PREFIX):]] += samples
    return per_pc


def summarize(path: str, lines: int, action_index: int = 0) -> str:
    import ncu_report  # noqa: PLC0415 (optional: see the module docstring)

    action = ncu_report.load_report(path).range_by_idx(0).action_by_idx(action_index)
    out = [f"{action.name()}: grid {value(action, 'launch__grid_size'):.0f} CTAs, "
           f"{value(action, 'gpu__time_duration.sum') / 1e3:.1f} us (at ncu's locked clocks)"]
    for name in TENSOR + SCALARS:
        v = value(action, name)
        if v is not None:
            out.append(f"  {name:90s} {v:14.3f}")
    per_pc = stall_samples(action)
    reasons = collections.Counter()
    for counter in per_pc.values():
        reasons.update(counter)
    total = sum(reasons.values()) or 1
    out.append(f"stall samples: {total}")
    out += [f"  {reason:30s} {n:9d} {100 * n / total:5.1f}%" for reason, n in reasons.most_common(14)]
    by_line, sass = collections.defaultdict(collections.Counter), collections.defaultdict(list)
    for pc, counter in per_pc.items():
        info = action.source_info(pc)
        key = (info.file_name().split("/")[-1], info.line()) if info else ("?", 0)
        by_line[key].update(counter)
        sass[key].append((sum(counter.values()), action.sass_by_pc(pc)))
    out.append(f"source lines with the most samples (top {lines}):")
    for (file, line), counter in sorted(by_line.items(), key=lambda kv: -sum(kv[1].values()))[:lines]:
        n = sum(counter.values())
        top = ", ".join(f"{reason} {100 * k // n}%" for reason, k in counter.most_common(3))
        example = max(sass[(file, line)])[1].strip()
        out.append(f"  {100 * n / total:5.1f}% {file}:{line}  [{top}]  e.g. {example}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", help=".ncu-rep files")
    ap.add_argument("--lines", type=int, default=30, help="source lines to list (default 30)")
    args = ap.parse_args(argv)
    try:
        import ncu_report  # noqa: F401, PLC0415
    except ImportError:
        print("ncu_summary: needs NVIDIA's ncu_report module (Nsight Compute's extras/python, or "
              "`pip install ncu-report`)", file=sys.stderr)
        return 2
    for path in args.reports:
        print(f"## {path}")
        print(summarize(path, args.lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
