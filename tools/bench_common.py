"""Timing, memory, environment, JSON, chart and table helpers shared by the benchmark tools in ``tools/``.

Nothing here knows about attention: it times a zero-argument callable, measures the memory one call adds, records
where and how a run happened, and writes what a run found (JSON, an optional matplotlib PNG, a plain-text table).

Timing on CUDA uses CUDA events around each repetition, with the L2 cache flushed before every repetition (a write
of twice the L2 size, outside the timed region), and reports the median. On the CPU it uses ``time.perf_counter``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

# dmattn_ops for every tool that imports this module: a build named on PYTHONPATH (tools/run_gpu.sh runs another
# tree's build with this tree's tools) or an installed one first, else this checkout's, built in place (a source tree
# on the GPU machine, say): the checkout goes last on the path.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _CHECKOUT not in sys.path:
    sys.path.append(_CHECKOUT)

# -------------------------------------------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Per-repetition times of one callable, in milliseconds."""

    samples_ms: List[float]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    def as_dict(self) -> Dict[str, float]:
        return {
            "ms_median": self.median_ms,
            "ms_p10": self.quantile_ms(0.1),
            "ms_p90": self.quantile_ms(0.9),
            "ms_min": min(self.samples_ms),
            "reps": len(self.samples_ms),
        }


class L2Flusher:
    """Evicts the GPU's L2 cache by writing a buffer of twice its size (no-op on the CPU)."""

    def __init__(self, device: torch.device):
        self.buf = None
        if device.type == "cuda":
            l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 * 2**20
            self.buf = torch.empty(2 * l2 // 4, dtype=torch.int32, device=device)

    def __call__(self):
        if self.buf is not None:
            self.buf.zero_()


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_callable(fn: Callable[[], object], device: torch.device, warmup: int, reps: int,
                  flush: Optional[L2Flusher] = None) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed, then ``reps`` timed repetitions, each after an L2 flush."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            if flush is not None:
                flush()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return Timing(samples)


def copy_tbps(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """The device's copy bandwidth in TB/s: bytes read plus bytes written by ``dst.copy_(src)`` of ``nbytes`` (a
    quarter of that on the CPU), the median of ``reps`` timed copies after a warm-up. The ceiling that issue 11's
    "share of copy bandwidth" target divides by."""
    if device.type != "cuda":
        nbytes //= 4
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = time_callable(lambda: dst.copy_(src), device, warmup=2, reps=reps).median_ms
    del src, dst
    return 2 * nbytes / ms / 1e9


def time_once_s(fn: Callable[[], object], device: torch.device):
    """Wall time of one call, in seconds (e.g. a first call that compiles), and its result."""
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - t0, result


# -------------------------------------------------------------------------------------------------------- memory


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory one call of ``fn`` allocates above what was allocated before it (its output included).

    CUDA only (the caching allocator's statistics); None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def tensor_bytes(*tensors) -> int:
    """Bytes of the storage the given tensors reach (a stride-0 broadcast counts once; None counts 0)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        # Elements actually stored: 1 + sum((size - 1) * stride) over dims of nonzero stride and size.
        if t.numel() == 0:
            continue
        span = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()) if st != 0)
        total += span * t.element_size()
    return total


def free_device_memory(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- environment


def git_commit(repo_dir: str) -> Dict[str, object]:
    """HEAD commit and whether the work tree had uncommitted changes (None where git is unavailable). A copy of the
    tree whose .git is absent or stale (the GPU host's) names its commit in DMATTN_GIT_COMMIT; dirtiness is then
    unknown."""
    if os.environ.get("DMATTN_GIT_COMMIT"):
        return {"commit": os.environ["DMATTN_GIT_COMMIT"], "dirty": None}

    def run(*args):
        return subprocess.run(["git", "-C", repo_dir, *args], capture_output=True, text=True, timeout=10)

    try:
        head = run("rev-parse", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def environment(device: torch.device, repo_dir: str) -> Dict[str, object]:
    """Device name, versions, git commit and the exact command line of this run."""
    env = {
        "device": str(device),
        "device_name": _cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": None,
        "python": platform.python_version(),
        "host_cpus": os.cpu_count(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": git_commit(repo_dir),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device_name"] = props.name
        env["device_memory_bytes"] = props.total_memory
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["cudnn"] = torch.backends.cudnn.version()
        env["driver"] = _nvidia_smi_driver()
        env["gpu_state"] = _nvidia_smi_state()
    return env


# What can make one GPU model time differently on two hosts: its clock and power caps, and its state when the results
# are written (right after the timed calls): the SM clock, the power draw, the temperature and the active clock event
# (throttle) reasons, a bit mask (0x1 idle, 0x4 software power cap, 0x20 software thermal slowdown, ...). Main's dense
# non-causal kernel ran 642 TFLOP/s on an H100 host (run DH) and 613 on an H200 one (run EM), where cuDNN went from
# ~636 to 676: the same GH100 silicon.
_GPU_STATE_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.draw", "power.limit", "temperature.gpu",
                     "clocks_event_reasons.active")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_smi_state() -> Optional[Dict[str, str]]:
    """_GPU_STATE_FIELDS of device 0 as nvidia-smi reports them (units included), each asked for alone (a field this
    driver does not know drops that field only), or None where none answers (no nvidia-smi)."""
    state = {field: _nvidia_smi_field(field) for field in _GPU_STATE_FIELDS}
    return {field: value for field, value in state.items() if value is not None} or None


def _nvidia_smi_driver() -> Optional[str]:
    return _nvidia_smi_field("driver_version")


def _nvidia_smi_field(field: str) -> Optional[str]:
    """nvidia-smi's value of one --query-gpu field for device 0, or None (no nvidia-smi, or it refused the field)."""
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = r.stdout.strip().splitlines()
    return lines[0].strip() if r.returncode == 0 and lines else None


# --------------------------------------------------------------------------------------------------- reporting


def write_json(path: str, payload: Dict[str, object]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(_finite(payload), f, indent=2, default=_json_default, allow_nan=False)
        f.write("\n")


def _finite(o):
    """JSON has no NaN/inf: those become None, recursively."""
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def finite_or_none(x: Optional[float]) -> Optional[float]:
    """JSON has no NaN/inf: those become None (and the status field says why)."""
    return x if x is not None and math.isfinite(x) else None


def bar_chart(path: str, title: str, labels: Sequence[str], values_ms: Sequence[Optional[float]],
              colors: Sequence[str], notes: Sequence[str], extra_ms: Optional[Sequence[Optional[float]]] = None,
              extra_label: str = "") -> Optional[str]:
    """A horizontal bar chart of median times, with an optional hatched extension per bar (e.g. a set-up cost paid
    per step); returns None on success, else why no chart was written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"matplotlib not importable ({e}); chart skipped"
    try:
        _draw_bars(plt, path, title, labels, values_ms, colors, notes, extra_ms or [None] * len(labels), extra_label)
    except Exception as e:  # noqa: BLE001 - a chart is a nicety: never lose the JSON over it
        return f"chart failed ({type(e).__name__}: {e})"
    return None


def _draw_bars(plt, path, title, labels, values_ms, colors, notes, extra_ms, extra_label):
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(labels) + 1.6))
    ys = list(range(len(labels)))[::-1]
    shown = [v if v is not None else 0.0 for v in values_ms]
    extra = [e if e is not None and v is not None else 0.0 for e, v in zip(extra_ms, values_ms)]
    ax.barh(ys, shown, color=colors)
    if any(extra):
        from matplotlib.patches import Patch

        ax.barh(ys, extra, left=shown, color="none", edgecolor=colors, hatch="//")
        ax.legend(handles=[Patch(facecolor="none", edgecolor="black", hatch="//", label=extra_label)],
                  loc="lower right", fontsize=8)
    ends = [v + e for v, e in zip(shown, extra)]
    top = max(ends) if ends and max(ends) > 0 else 1.0
    for y, v, end, note in zip(ys, values_ms, ends, notes):
        text = f"{v:.3g} ms" if v is not None else "n/a"
        if note:
            text += f"  ({note})"
        ax.text(end + 0.01 * top, y, text, va="center", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("median time per call, ms (lower is better)")
    ax.set_xlim(0, top * 2.0)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first and last columns left-aligned, the (numeric) others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    last = len(headers) - 1

    def line(cells):
        return "  ".join(c.ljust(w) if i in (0, last) else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def fmt(x: Optional[float], spec: str = ".3g") -> str:
    return "-" if x is None else format(x, spec)
