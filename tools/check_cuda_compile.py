"""Compile-only check of the CUDA kernels with nvcc: no GPU and no torch needed (CI runs it wherever nvcc exists).

    python tools/check_cuda_compile.py                      # bfloat16 D=128 + registry + run kernels, sm_80
    python tools/check_cuda_compile.py --all --arch 80 90   # every instantiation of tools/kernel_matrix.py

CuTe / CUTLASS headers come from DMATTN_CUTLASS_DIR (an include directory holding cute/ and cutlass/) or from the
nvidia-cutlass package (cutlass_library/source/include). Exit status: 0 compiled, 1 a compile error, 2 a missing tool
or header (with what is needed), or 0 with a notice when nvcc is absent and --require-nvcc is not given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import kernel_matrix  # noqa: E402


def cutlass_include() -> Path | None:
    override = os.environ.get("DMATTN_CUTLASS_DIR")
    if override:
        return Path(override)
    try:
        import cutlass_library
    except ImportError:
        return None
    return Path(cutlass_library.__file__).parent / "source" / "include"


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80"], help="compute capabilities (default: 80)")
    ap.add_argument("--all", action="store_true", help="every instantiation, not just bfloat16 D=128")
    ap.add_argument("--std", default="17", choices=["17", "20"],
                    help="C++ standard (default 17; torch >= 2.13 builds extensions as C++20)")
    ap.add_argument("--require-nvcc", action="store_true", help="fail (exit 2) instead of skipping without nvcc")
    args = ap.parse_args()

    nvcc = find_nvcc()
    if nvcc is None:
        print("check_cuda_compile: nvcc not found (set CUDA_HOME); skipping the CUDA compile check")
        return 2 if args.require_nvcc else 0
    include = cutlass_include()
    if include is None or not (include / "cute" / "tensor.hpp").is_file():
        print(
            "check_cuda_compile: the CuTe / CUTLASS headers are missing: `pip install nvidia-cutlass` or set "
            f"DMATTN_CUTLASS_DIR to a CUTLASS include directory holding cute/ and cutlass/ (looked in {include})"
        )
        return 2

    chosen = kernel_matrix.INSTANTIATIONS if args.all else [("bfloat16", 128)]
    with tempfile.TemporaryDirectory(prefix="dmattn_cuda_check_") as tmp:
        generated = kernel_matrix.render(Path(tmp), chosen)
        sources = generated + sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in args.arch]
        failed = 0
        for src in sources:
            cmd = [nvcc, f"-std=c++{args.std}", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", *gencode,
                   f"-I{include}", f"-I{ROOT / 'csrc'}", "-Xptxas=-warn-spills", "-c", str(src),
                   "-o", str(Path(tmp) / (Path(src).stem + ".o"))]
            result = subprocess.run(cmd, capture_output=True, text=True)
            spills = [line for line in result.stderr.splitlines() if "spill" in line.lower()]
            status = "FAILED" if result.returncode != 0 else ("ok, but registers spill" if spills else "ok")
            print(f"check_cuda_compile: {Path(src).name:36s} {status}")
            if result.returncode != 0:
                failed += 1
                print(result.stdout + result.stderr)
            for line in spills:
                print(f"    {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
