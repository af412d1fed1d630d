"""One sample of tests/samples.py through the op's forward and backward, stage by stage, each stage synchronized and
timed, so that a call that hangs or crawls on the GPU shows which stage it is in (the last line printed), with the
plan the op logs for it (DMATTN_LOG_PLAN) and a Python stack every --dump seconds while a stage runs.

    python3 tools/trace_backward_case.py window_decode --dtype float16 --deterministic          # on the GPU machine
    python3 tools/trace_backward_case.py window_decode --deterministic --no-fill --env DMATTN_BWD_DQ=atomic
    python3 tools/trace_backward_case.py window_decode --device cpu                            # a dry run anywhere

--deterministic sets torch.use_deterministic_algorithms(True), as test_backward.py's kernel_deterministic mode does
(with DMATTN_BWD_DQ=atomic, which that mode also sets: --env); --no-fill turns off torch's filling of uninitialized
memory under it (torch.utils.deterministic.fill_uninitialized_memory), to tell a read of unwritten memory from the
rest. The gradients are checked against the float64 reference by test_backward.py's own rule at the end.
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools")]
# dmattn_ops: an installed one or a build named on PYTHONPATH first, else this checkout's, built in place (the GPU
# machine's tools/run_gpu.sh builds in place and installs nothing: session 10's first call found no module)
sys.path.append(ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="a sample name of tests/samples.py (SAMPLES), e.g. window_decode")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms(True)")
    ap.add_argument("--no-fill", action="store_true",
                    help="with --deterministic: torch.utils.deterministic.fill_uninitialized_memory = False")
    ap.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set before the op runs")
    ap.add_argument("--dump", type=float, default=30.0, help="seconds between stack dumps while a stage runs")
    args = ap.parse_args(argv)
    for item in args.env:
        name, _, value = item.partition("=")
        if not name or not _:
            ap.error(f"--env expects NAME=VALUE, got {item!r}")
        os.environ[name] = value
    os.environ.setdefault("DMATTN_LOG_PLAN", "1")

    import torch
    import torch.utils.deterministic

    import samples
    import test_backward as tb

    specs = {s.name: s for s in samples.SAMPLES}
    if args.spec not in specs:
        ap.error(f"no sample named {args.spec!r} (tests/samples.py SAMPLES)")
    spec, dtype = specs[args.spec], getattr(torch, args.dtype)
    reason = samples.support_reason(spec, dtype, args.device)
    if reason:
        print(f"trace_backward_case: skipped: {reason}")
        return 0
    torch.use_deterministic_algorithms(args.deterministic)
    if args.no_fill:
        torch.utils.deterministic.fill_uninitialized_memory = False
    print(f"torch {torch.__version__}, {args.spec} {args.dtype} on {args.device}, deterministic={args.deterministic},"
          f" fill={torch.utils.deterministic.fill_uninitialized_memory}", flush=True)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    start = time.time()

    def stage(name, fn):
        faulthandler.dump_traceback_later(args.dump, repeat=True)
        t0 = time.time()
        print(f"[{t0 - start:8.3f} s] {name} ...", flush=True)
        result = fn()
        sync()
        faulthandler.cancel_dump_traceback_later()
        print(f"[{time.time() - start:8.3f} s] {name}: done in {time.time() - t0:.3f} s", flush=True)
        return result

    sample = stage("inputs", lambda: samples.make_sample(spec, dtype, args.device))
    leaves, s = tb._differentiable(sample)
    out, lse = stage("forward", lambda: s.run())
    loss = stage("loss", lambda: tb._total_loss(out, lse, leaves, 1))
    stage("backward", loss.backward)
    got = {name: t.grad.cpu() for name, t in leaves.items()}
    cpu = samples.make_sample(spec, dtype, "cpu")
    want = stage("float64 reference", lambda: tb._gradients(cpu, tb._reference(torch.float64)))
    base = stage("same-dtype reference", lambda: tb._gradients(cpu, tb._reference(dtype)))
    samples.assert_gradients_close(got, want, base, dtype)
    print(f"[{time.time() - start:8.3f} s] gradients match the reference", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
