"""Builds dmattn_ops: the op library dmattn_ops._C (CPU kernel always, CUDA kernels when available).

Build knobs (all optional; see README "Build knobs"):
  DMATTN_BACKENDS     auto (default) | cpu | cuda   auto builds CUDA when torch has CUDA and nvcc is found
  DMATTN_CUDA_ARCHS   semicolon list of compute capabilities, default "80;90" (the sm80 kernels are compiled for
                      each; the sm90a kernels for sm_90a when 90 is listed: tools/kernel_matrix.py)
  DMATTN_CUTLASS_DIR  a CUTLASS include directory (holding cute/ and cutlass/); default: the nvidia-cutlass package
  MAX_JOBS            parallel compile jobs (ninja; the kernel files default to one per core)
  NVCC_THREADS        nvcc --threads, default 4
  DMATTN_NVCC_FLAGS   more nvcc flags for every CUDA file, space-separated (e.g. -Xptxas=-v, -G)
  DMATTN_UNIT_STAMPS  1: the measuring build, whose sm90a forward kernel records each work unit's boundary times
                      (torch.ops.dmattn.unit_stamps(), tools/unit_stamps.py); off by default, and then compiled out

A CUDA build compiles csrc/cuda's hand-written files and the generated registry through torch's CUDAExtension (one
nvcc flag set for all, with the gencodes of DMATTN_CUDA_ARCHS) and the generated kernel files itself, each with its
arch path's flags only, through a ninja file under build/generated (BuildExtensionWithKernels); the objects are
linked into the same library.
"""

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "tools"))
import kernel_matrix  # noqa: E402  (tools/kernel_matrix.py: the one list of CUDA instantiations)

GENERATED = ROOT / "build" / "generated"  # rendered kernel files, their ninja file and objects; never committed
NINJA_FILE = GENERATED / "build.ninja"


def log(msg):
    print(f"[dmattn_ops] {msg}", flush=True)


def want_cuda():
    choice = os.environ.get("DMATTN_BACKENDS", "auto").strip().lower()
    if choice not in ("auto", "cpu", "cuda"):
        raise SystemExit(f"DMATTN_BACKENDS must be auto, cpu or cuda, got {choice!r}")
    nvcc = CUDA_HOME is not None and shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc"))
    have = torch.version.cuda is not None and bool(nvcc)
    if choice == "cuda" and not have:
        raise SystemExit(
            "DMATTN_BACKENDS=cuda, but "
            + ("torch was built without CUDA" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)")
        )
    if choice == "auto" and not have:
        why = "torch has no CUDA" if torch.version.cuda is None else "nvcc was not found"
        log(f"building the CPU backend only ({why}; DMATTN_BACKENDS=cuda makes this an error)")
    return choice != "cpu" and have


def cutlass_include():
    override = os.environ.get("DMATTN_CUTLASS_DIR")
    if override:
        path = Path(override)
    else:
        try:
            import cutlass_library
        except ImportError as e:
            raise SystemExit(
                "the CUDA build needs the CuTe/CUTLASS headers: `pip install nvidia-cutlass` "
                "or set DMATTN_CUTLASS_DIR to a CUTLASS include directory"
            ) from e
        path = Path(cutlass_library.__file__).parent / "source" / "include"
    if not (path / "cute" / "tensor.hpp").is_file():
        raise SystemExit(f"no CuTe headers under {path} (expected {path}/cute/tensor.hpp)")
    return str(path)


def torch_cxx_std():
    """The C++ standard torch's BuildExtension compiles with: it appends `-std=c++NN` to every compile that names
    none, NN a literal in BuildExtension.build_extensions (17 in torch 2.11, 20 in 2.13). Read from there, so the kernel
    objects compiled here and the files torch compiles agree under any torch."""
    found = set(re.findall(r"cpp_flag_prefix \+ 'c\+\+(\d+)'", inspect.getsource(BuildExtension.build_extensions)))
    if len(found) != 1:
        raise SystemExit(
            f"cannot tell which -std=c++NN torch {torch.__version__}'s BuildExtension compiles with (found {found}); "
            "setup.py's torch_cxx_std() needs updating for this torch"
        )
    return found.pop()


def ninja_binary():
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError as e:
        raise SystemExit("the CUDA build needs ninja: `pip install ninja`") from e
    return os.path.join(ninja.BIN_DIR, "ninja")


class BuildExtensionWithKernels(BuildExtension):
    """torch's BuildExtension, after compiling the generated kernel files with ninja. One torch extension has one nvcc
    flag set, and each arch path needs its own gencodes, so extension() writes the kernel files' ninja file and lists
    their objects in extra_objects; this runs it before torch compiles the rest and links everything."""

    def build_extension(self, ext):
        if ext.extra_objects:  # a CUDA build: the kernel objects
            jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
            log(f"compiling {len(ext.extra_objects)} kernel files: ninja -j {jobs} -f {NINJA_FILE.relative_to(ROOT)}")
            cmd = [ninja_binary(), "-C", str(NINJA_FILE.parent), "-f", NINJA_FILE.name, "-j", jobs]
            if subprocess.run(cmd).returncode != 0:
                raise SystemExit("[dmattn_ops] compiling the kernel files failed (nvcc's messages above)")
        super().build_extension(ext)


def user_nvcc_flags():
    """DMATTN_NVCC_FLAGS, split on spaces: added to every nvcc command (the kernel files and the hand-written ones)."""
    flags = os.environ.get("DMATTN_NVCC_FLAGS", "").split()
    if flags:
        log(f"extra nvcc flags from DMATTN_NVCC_FLAGS: {' '.join(flags)}")
    return flags


def kernel_objects(archs, selected, std, include_dirs, common):
    """Renders the instantiation files and the registry, writes the ninja file that compiles each instantiation with
    its arch path's flags and the common ones (nvcc --threads, DMATTN_NVCC_FLAGS), and returns (registry .cu, kernel
    .o list), for the instantiations of `selected` that archs build."""
    instantiations = kernel_matrix.built(archs, selected)
    files, registry = kernel_matrix.render(GENERATED, instantiations)
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    # Kernel files are torch-free, so no torch include dirs; -fPIC and the C++ ABI as torch compiles the rest, and
    # CC as nvcc's host compiler where it is set, as torch's own nvcc calls do.
    extra = ["-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *common]
    if os.environ.get("CC"):
        extra += ["-ccbin", os.environ["CC"]]
    flags, sources = {}, {}
    for path in kernel_matrix.ARCH_PATHS:
        flags[path.name] = kernel_matrix.nvcc_flags(archs, std, include_dirs, path.name) + extra
        mine = [(src, GENERATED / "obj" / (src.stem + ".o")) for i, src in files.items() if i[0] == path.name]
        sources[path.name] = mine
        codes = path.codes(archs)
        if mine:
            log(f"{path.name}: {len(mine)} kernel files for {', '.join('sm_' + c for c in codes)}")
        elif codes:
            log(f"{path.name}: no instantiations in tools/kernel_matrix.py (an empty slot)")
        else:
            log(f"{path.name}: not built ({path.built_with} is not in DMATTN_CUDA_ARCHS)")
    kernel_matrix.write_if_changed(NINJA_FILE, kernel_matrix.ninja_source(nvcc, flags, sources))
    return registry, [obj for files in sources.values() for _, obj in files]


def selected_instantiations():
    """tools/kernel_matrix.py's instantiations at the head dims of DMATTN_HEAD_DIMS (default: all)."""
    try:
        head_dims = kernel_matrix.parse_head_dims(os.environ.get("DMATTN_HEAD_DIMS", ""))
    except ValueError as err:
        raise SystemExit(f"dmattn_ops setup: {err}") from None
    return kernel_matrix.with_head_dims(head_dims)


def write_build_config(backends, archs, selected=kernel_matrix.INSTANTIATIONS):
    no_cuda = {"cuda_archs": [], "cuda_arch_paths": {}, "cuda_dtypes": [], "cuda_head_dims": [], "cuda_backward": {}}
    config = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": backends,
        "cpu_dtypes": ["float32", "float16", "bfloat16"],
        # cuda_arch_paths: per arch path, in dispatch preference order, its gencode, runs_on, dtypes and head_dims
        **(kernel_matrix.build_info(archs, selected) if "cuda" in backends else no_cuda),
    }
    text = '"""Written by setup.py at build time: what this build of dmattn_ops contains."""\n\nCONFIG = ' + repr(config) + "\n"
    (ROOT / "dmattn_ops" / "_build_config.py").write_text(text)


def extension():
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    # -fopenmp: torch's CPU build runs at::parallel_for on OpenMP, which is compiled out without it.
    # No -std: torch picks the standard its headers need (C++17 up to 2.12, C++20 from 2.13); it also adds
    # -DPy_LIMITED_API for py_limited_api=True.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not want_cuda():
        write_build_config(["cpu"], [])
        return CppExtension(
            "dmattn_ops._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True
        )

    archs = kernel_matrix.parse_archs(os.environ.get("DMATTN_CUDA_ARCHS", kernel_matrix.DEFAULT_CUDA_ARCHS))
    std = torch_cxx_std()
    include_dirs = [cutlass_include(), str(ROOT / "csrc")]
    common = [f"--threads={os.environ.get('NVCC_THREADS', '4')}", *user_nvcc_flags()]
    selected = selected_instantiations()
    log(f"building CPU + CUDA backends: archs {archs}, head dims {sorted({d for _, _, d in selected})}, C++{std}")
    registry, objects = kernel_objects(archs, selected, std, include_dirs, common)
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    sources.append(str(registry.relative_to(ROOT)))
    # The global flags of the hand-written CUDA files and the registry (torch adds the include dirs; its -std is std).
    nvcc = kernel_matrix.nvcc_flags(archs, std, []) + common
    write_build_config(["cpu", "cuda"], archs, selected)
    # The measuring build's defines (kernel_matrix.measuring_defines) reach nvcc through nvcc_flags; the C++ files
    # (the binding) get them here, so that both sides agree on the Workspace they share.
    if kernel_matrix.unit_stamps_requested():
        log("the measuring build: DMATTN_UNIT_STAMPS=1 (the sm90a forward records its units' boundary times)")
    return CUDAExtension(
        "dmattn_ops._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("DMATTN_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DDMATTN_WITH_CUDA", *kernel_matrix.measuring_defines()], "nvcc": nvcc},
        extra_objects=[str(o) for o in objects],
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    name="dmattn_ops",
    version="0.1.0",
    description="Varlen attention with dynamic key-side / query-side masks and biases, as a PyTorch custom op",
    packages=["dmattn_ops", "dmattn_ops._meta", "dmattn_ops.integrations"],
    package_dir={"dmattn_ops": "dmattn_ops", "dmattn_ops._meta": "meta"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtensionWithKernels},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "test": ["pytest", "expecttest", "hypothesis"],
        "bench": ["matplotlib"],
        "cuda": ["nvidia-cutlass==4.2.0.0"],  # CuTe / CUTLASS headers, build time only
    },
)
