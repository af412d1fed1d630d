"""Compile-only check of the CUDA kernels with nvcc: no GPU and no torch needed (CI runs it wherever nvcc exists).

    python tools/check_cuda_compile.py                      # one instantiation per arch path + registry + run kernels
    python tools/check_cuda_compile.py --all --arch 80 90   # every instantiation of tools/kernel_matrix.py
    python tools/check_cuda_compile.py --arch 90 --divisions  # also: integer divisions inside kernels' loops
    python tools/check_cuda_compile.py --arch 90 --sass --only sm80_bfloat16_hd128  # SASS instruction counts
    python tools/check_cuda_compile.py --arch 90 --all --sass-dir /tmp/after  # each object's SASS, to diff two trees

--arch plays DMATTN_CUDA_ARCHS: each file gets the flags the build gives it (kernel_matrix.nvcc_flags), so the sm80
instantiations are compiled for every listed arch, the sm90a ones for sm_90a when 90 is listed, and the registry and
csrc/cuda/*.cu for every listed arch. One instantiation per arch path is bfloat16 D=128 where the path has it, else
its first.

CuTe / CUTLASS headers come from DMATTN_CUTLASS_DIR (an include directory holding cute/ and cutlass/) or from the
nvidia-cutlass package (cutlass_library/source/include). --sass reads the objects back with cuobjdump: CUDA_HOME's,
PATH's, or the nvidia-cuda-cuobjdump package's (`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`:
development tools, no dependency of the library). Exit status: 0 compiled, 1 a compile error or a kernel whose wgmma
instructions ptxas serialized (its advisory C7518), 2 a missing tool or header (with what is needed), or 0 with a
notice when nvcc is absent and --require-nvcc is not given.
"""

from __future__ import annotations

import argparse
import os
import re
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


def spill_lines(stderr: str) -> list[str]:
    """ptxas' lines (-v or -warn-spills) that report a nonzero spill store or load ("40 bytes spill loads" is one)."""
    return [line for line in stderr.splitlines() if re.search(r"\b[1-9]\d* bytes spill (stores|loads)", line)]


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "nvcc").is_file():
            return str(Path(candidate) / "bin" / "nvcc")
    return shutil.which("nvcc")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["80"],
                    help="compute capabilities, as DMATTN_CUDA_ARCHS lists them (default: 80)")
    ap.add_argument("--all", action="store_true", help="every instantiation, not one per arch path")
    ap.add_argument("--std", default="17", choices=["17", "20"],
                    help="C++ standard (default 17; torch >= 2.13 builds extensions as C++20)")
    ap.add_argument("--registers", action="store_true",
                    help="print ptxas' registers and spills of every kernel (ptxas -v), to compare two trees")
    ap.add_argument("--divisions", action="store_true",
                    help="also compile each file to PTX for the first --arch and list, per kernel, the source lines of "
                         "the integer divisions and remainders inside its loops (a report: it fails nothing)")
    ap.add_argument("--sass", action="store_true",
                    help="print each kernel's SASS instruction count per sm arch (cuobjdump), with its MMAs, cp.async "
                         "copies, branches and barriers: a compile-only patch's instruction budget, to compare two "
                         "trees where a GPU profile is not at hand (counts are static: a loop body counts once)")
    ap.add_argument("--sass-dir", metavar="DIR", type=Path,
                    help="write each compiled file's whole SASS (cuobjdump -sass) to DIR/<file>.sass, so that a "
                         "change meant to leave the machine code alone (moving code between headers, renaming) can "
                         "be checked by diffing two trees' dumps (`diff -r`); implies the cuobjdump --sass needs")
    ap.add_argument("--only", metavar="TEXT",
                    help="only the instantiation files whose name holds TEXT (e.g. sm80_bfloat16_hd128), and no "
                         "hand-written file or registry")
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

    wants_sass = args.sass or args.sass_dir is not None
    cuobjdump = find_cuobjdump() if wants_sass else None
    if wants_sass and cuobjdump is None:
        print("check_cuda_compile: --sass needs cuobjdump and nvdisasm: set CUDA_HOME to a toolkit that has them, or "
              "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`")
        return 2
    archs = [a for text in args.arch for a in kernel_matrix.parse_archs(text)]  # "80 90" or "80;90"
    built = kernel_matrix.built(archs)
    includes = [include, ROOT / "csrc"]
    with tempfile.TemporaryDirectory(prefix="dmattn_cuda_check_") as tmp:
        files, registry = kernel_matrix.render(Path(tmp), built)  # the registry over the whole build
        jobs = []  # (label, source, nvcc flags)
        for path in kernel_matrix.ARCH_PATHS:
            mine = [i for i in built if i[0] == path.name]
            if not mine:
                built_with = f"--arch {path.built_with}"
                why = "no instantiations (an empty slot)" if path.codes(archs) else f"not built without {built_with}"
                print(f"check_cuda_compile: [{path.name}] {why}")
            elif args.only:
                mine = [i for i in mine if args.only in Path(files[i]).name]
            elif not args.all:
                mine = [i for i in mine if i[1:] == ("bfloat16", 128)] or mine[:1]
            flags = kernel_matrix.nvcc_flags(archs, args.std, includes, path.name)
            jobs += [(path.name, files[i], flags) for i in mine]
        # The hand-written files and the registry go through torch's CUDAExtension, which adds its own nvcc flags
        # (no implicit half / bfloat16 conversions or operators): compile them with those too.
        global_flags = kernel_matrix.nvcc_flags(archs, args.std, includes) + torch_nvcc_flags()
        for src in [] if args.only else [registry, *sorted((ROOT / "csrc" / "cuda").glob("*.cu"))]:
            jobs.append(("global", src, global_flags))
        failed = 0
        for label, src, flags in jobs:
            ptxas = "-Xptxas=-v" if args.registers else "-Xptxas=-warn-spills"
            cmd = [nvcc, *flags, ptxas, "-c", str(src), "-o", str(Path(tmp) / (Path(src).stem + ".o"))]
            result = subprocess.run(cmd, capture_output=True, text=True)
            spills = spill_lines(result.stderr)
            serialized = serialized_wgmma(result.stderr)
            if result.returncode != 0:
                status = "FAILED"
            elif serialized:
                status = "FAILED: ptxas serialized wgmma"
            else:
                status = "ok, but registers spill" if spills else "ok"
            print(f"check_cuda_compile: [{label}] {Path(src).name:40s} {status}")
            if result.returncode != 0:
                failed += 1
                print(result.stdout + result.stderr)
            for line in spills:
                print(f"    {line}")
            if serialized:
                failed += 1
                for kernel, why in serialized:
                    print(f"    wgmma serialized ({why}): {kernel}")
            if args.registers:
                report(result.stderr)
            if cuobjdump is not None and result.returncode == 0:
                # cuobjdump runs nvdisasm, which the packages install beside it
                env = {**os.environ, "PATH": f"{Path(cuobjdump).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
                dump = subprocess.run([cuobjdump, "-sass", cmd[-1]], capture_output=True, text=True, env=env)
                if dump.returncode != 0:
                    print(f"    cuobjdump failed: {dump.stderr.strip()}")
                    failed += 1
                if args.sass_dir is not None:
                    args.sass_dir.mkdir(parents=True, exist_ok=True)
                    # What names where the tree lies, left out of a diff of two trees: the temporary folder and the
                    # checkout's path in the dump's headers, and the hash of the source's path nvcc puts in the name
                    # of an anonymous namespace (_GLOBAL__N__<8 hex digits>_<file>_...).
                    text = dump.stdout.replace(tmp, "<tmp>").replace(str(ROOT), "<root>")
                    text = re.sub(r"_GLOBAL__N__[0-9a-f]{8}_", "_GLOBAL__N__<path>_", text)
                    (args.sass_dir / (Path(src).stem + ".sass")).write_text(text)
                for (arch, kernel), counts in sass_counts(dump.stdout).items() if args.sass else ():
                    classes = "  ".join(f"{name} {n}" for name, n in counts.items() if name != "instructions")
                    print(f"    {arch:6s} {counts['instructions']:>6d} instructions  {classes}  {kernel}")
            if args.divisions and result.returncode == 0:
                ptx = Path(tmp) / (Path(src).stem + ".ptx")
                ptx_cmd = [nvcc, *ptx_flags(flags), "-ptx", str(src), "-o", str(ptx)]
                if subprocess.run(ptx_cmd, capture_output=True, text=True).returncode == 0:
                    for kernel, lines in loop_divisions(ptx.read_text()).items():
                        where = ", ".join(f"{at} x{n}" for at, n in sorted(lines.items()))
                        print(f"    divisions in loops: {kernel[:100]}: {where}")
    return 1 if failed else 0


def find_cuobjdump() -> str | None:
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "bin" / "cuobjdump").is_file():
            return str(Path(candidate) / "bin" / "cuobjdump")
    if found := shutil.which("cuobjdump"):
        return found
    try:  # the nvidia-cuda-cuobjdump wheel: site-packages/nvidia/cu<major>/bin/cuobjdump
        import nvidia
    except ImportError:
        return None
    for base in getattr(nvidia, "__path__", []):
        for path in sorted(Path(base).glob("cu*/bin/cuobjdump"), reverse=True):
            return str(path)
    return None


# Instruction classes --sass counts beside the total: (label, opcode prefixes).
SASS_CLASSES = [("mma", ("HMMA", "HGMMA")), ("cp.async", ("LDGSTS", "UBLKCP", "UTMALDG")), ("branch", ("BRA",)),
                ("barrier", ("BAR", "SYNCS"))]


def sass_counts(dump: str) -> dict:
    """{(sm arch, kernel): {"instructions": n, class: n, ...}} of a `cuobjdump -sass` text: its instruction lines
    (`/*addr*/  [@pred] OPCODE ...`) under each `Function :` header, the arch from the `code for sm_XX` line above
    it."""
    out, arch, key = {}, "?", None
    for line in dump.splitlines():
        if m := re.match(r"\s*code for (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function : (\S+)", line):
            key = (arch, m.group(1))
            out[key] = {"instructions": 0, **{name: 0 for name, _ in SASS_CLASSES}}
        elif key and (m := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)):
            counts = out[key]
            counts["instructions"] += 1
            for name, prefixes in SASS_CLASSES:
                counts[name] += m.group(1).startswith(prefixes)
    return out


def ptx_flags(flags: list) -> list:
    """``flags`` for one PTX file: the first -gencode's virtual arch alone (nvcc -ptx takes one)."""
    gencodes = [f for f in flags if f.startswith("-gencode=")]
    rest = [f for f in flags if not f.startswith("-gencode=")]
    arch = gencodes[0].split("arch=", 1)[1].split(",", 1)[0] if gencodes else "compute_80"
    return [*rest, f"-arch={arch}"]


def loop_divisions(ptx: str) -> dict:
    """Per kernel of a PTX text: {"file:line": count} of its integer divisions and remainders (div / rem on s32, u32,
    s64, u64; the source line from -lineinfo's .loc) that lie inside a loop, i.e. between a label and a later branch
    back to it. An integer division is some twenty instructions (a 64-bit one a subroutine); in a per-element or
    per-tile loop it can cost more than the loads it serves (benchmarks/results/NOTES.md: the kept-key compaction)."""
    lines = ptx.splitlines()
    files = {}
    for line in lines:
        m = re.match(r'\s*\.file\s+(\d+)\s+"([^"]+)"', line)
        if m:
            files[m.group(1)] = Path(m.group(2)).name
    starts = [(i, m.group(1)) for i, line in enumerate(lines)
              if (m := re.match(r"(?:\.visible |\.weak )?\.entry (\S+?)\(", line))]
    out = {}
    for (first, kernel), (end, _) in zip(starts, [*starts[1:], (len(lines), "")]):
        body = lines[first:end]
        labels = {m.group(1): i for i, line in enumerate(body) if (m := re.match(r"^(\$\S+):", line))}
        loops = [(labels[m.group(1)], i) for i, line in enumerate(body)
                 if (m := re.search(r"\bbra(?:\.uni)?\s+(\$\S+);", line)) and labels.get(m.group(1), i) < i]
        at, found = "?", {}
        for i, line in enumerate(body):
            if m := re.match(r"\s*\.loc\s+(\d+)\s+(\d+)", line):
                at = f"{files.get(m.group(1), m.group(1))}:{m.group(2)}"
            elif re.match(r"\s*(?:div|rem)\.[su](?:32|64)\b", line) and any(a <= i <= b for a, b in loops):
                found[at] = found.get(at, 0) + 1
        if found:
            out[kernel] = found
    return out


def torch_nvcc_flags() -> list:
    """The flags torch's CUDAExtension gives every .cu source it builds (setup.py builds csrc/cuda/*.cu through it)."""
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
        return [f for f in COMMON_NVCC_FLAGS if f.startswith("-D")]
    except ImportError:  # torch's list as of 2.11
        return ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
                "-D__CUDA_NO_HALF2_OPERATORS__"]


def serialized_wgmma(ptxas_log: str) -> list:
    """(kernel, reason) for every kernel whose wgmma.mma_async instructions ptxas serialized (its advisory C7518,
    "Potential Performance Loss"): each MMA then waits for the one before it, which compiles and passes every test
    but throws away the overlap the sm90a main loop is built on (a patch that did this ran the 256-key window 27%
    slower on the H200, run BV). ptxas prints it with or without -v, so the check costs nothing; it fails the check."""
    found = []
    for line in ptxas_log.splitlines():
        if "wgmma.mma_async instructions are serialized" not in line:
            continue
        why = line.split("serialized", 1)[1].split(" in the function")[0].strip()
        kernel = line.split("'")[1] if line.count("'") >= 2 else "?"
        found.append((kernel, why))
    return found


def report(ptxas_log: str) -> None:
    """One line per compiled kernel from ptxas -v: arch, registers, spill bytes, mangled name."""
    kernel = arch = spill = None
    for line in ptxas_log.splitlines():
        if "Compiling entry function" in line:
            parts = line.split("'")
            kernel, arch, spill = parts[1], parts[3] if len(parts) > 3 else "?", ""
        elif "spill stores" in line:
            spill = ", ".join(x.strip() for x in line.split(",")[1:])
        elif "Used" in line and "registers" in line and kernel:
            regs = line.split("Used", 1)[1].split("registers")[0].strip()
            print(f"    {arch:6s} {regs:>4s} regs  {spill:40s} {kernel}")
            kernel = None


if __name__ == "__main__":
    sys.exit(main())
