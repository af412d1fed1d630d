"""Sliding windows of several widths on a packed prefill batch, each through the three paths of the plan's choice:

    python tools/bench_window_sweep.py [--out DIR] [--widths 64 128 256 ...] [--reps N]

  sm90a persistent   the sm90a kernel on a persistent grid (DMATTN_SM90A_CTAS = the SM count; dynamic by default)
  sm90a per unit     the sm90a kernel, a CTA per work unit (DMATTN_SM90A_CTAS=0)
  sm80               the sm80 kernels (DMATTN_ARCH=sm80)

The batch: B = 8 sequences of 512-4096 tokens (seed 0), causal, H = 32, Hk = 8, D = 128, bf16; window w is
window_size=(w - 1, 0); "none" is plain causal. Medians of CUDA-event timings; every path's output is compared with
the first path's (max |difference|). This is the measurement behind heuristics.h's kSm90aMinWindow (windows of at
most that many keys take the sm80 kernel). Writes DIR/window_sweep.json (default: the current directory).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bc  # noqa: E402  (it puts this checkout's dmattn_ops on the path)
import dmattn_ops  # noqa: E402

ENV_KEYS = ("DMATTN_SM90A_CTAS", "DMATTN_ARCH")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--widths", type=int, nargs="*", default=[64, 128, 256, 512, 1024, 2048])
    ap.add_argument("--reps", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_window_sweep: needs a CUDA device")

    g = torch.Generator().manual_seed(0)
    lens = torch.randint(512, 4097, (8,), generator=g).tolist()
    H, Hk, D, total = 32, 8, 128, sum(lens)
    q = torch.randn(total, H, D, generator=g).to("cuda", torch.bfloat16)
    k = torch.randn(total, Hk, D, generator=g).to("cuda", torch.bfloat16)
    v = torch.randn(total, Hk, D, generator=g).to("cuda", torch.bfloat16)
    cu = dmattn_ops.cu_seqlens(lens, device="cuda")
    device = torch.device("cuda")
    longest = max(lens)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    paths = {"sm90a persistent": {"DMATTN_SM90A_CTAS": str(sms)}, "sm90a per unit": {"DMATTN_SM90A_CTAS": "0"},
             "sm80": {"DMATTN_ARCH": "sm80"}}

    def run(window):
        return dmattn_ops.varlen_attention(q, k, v, cu, cu, longest, longest, is_causal=True, window_size=window)

    saved = {key: os.environ.get(key) for key in ENV_KEYS}
    rows = []
    try:
        for width in [*args.widths, None]:
            window = (width - 1, 0) if width else None
            row, first = {"window": width}, None
            for name, env in paths.items():
                for key in ENV_KEYS:
                    os.environ.pop(key, None)
                os.environ.update(env)
                ms = bc.time_callable(lambda: run(window), device, warmup=3, reps=args.reps).median_ms
                out = run(window)
                first = out if first is None else first
                row[name] = {"ms": ms, "max_diff_vs_first": (out.float() - first.float()).abs().max().item()}
            rows.append(row)
            print(f"window {width or 'none'}: "
                  + ", ".join(f"{n} {r['ms']:.4f} ms" for n, r in row.items() if n != "window"), flush=True)
    finally:
        for key, value in saved.items():
            os.environ.pop(key, None)
            if value is not None:
                os.environ[key] = value
    result = {"lens": lens, "heads": H, "heads_k": Hk, "head_dim": D, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "rows": rows}
    path = Path(args.out) / "window_sweep.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
