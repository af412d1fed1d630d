"""Builds dmattn_ops: the op library dmattn_ops._C (CPU kernel always, CUDA kernels when available).

Build knobs (all optional; see README "Build knobs"):
  DMATTN_BACKENDS     auto (default) | cpu | cuda   auto builds CUDA when torch has CUDA and nvcc is found
  DMATTN_CUDA_ARCHS   semicolon list of compute capabilities, default "80;90"
  DMATTN_CUTLASS_DIR  a CUTLASS include directory (holding cute/ and cutlass/); default: the nvidia-cutlass package
  MAX_JOBS            parallel compile jobs (ninja)
  NVCC_THREADS        nvcc --threads, default 4
"""

import os
import shutil
import sys
from pathlib import Path

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT / "tools"))
import kernel_matrix  # noqa: E402  (tools/kernel_matrix.py: the one list of CUDA instantiations)


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


def cuda_archs():
    archs = [a.strip() for a in os.environ.get("DMATTN_CUDA_ARCHS", "80;90").replace(",", ";").split(";") if a.strip()]
    flags = []
    for arch in archs:
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    return archs, flags


def write_build_config(backends, archs):
    config = {
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends": backends,
        "cpu_dtypes": ["float32", "float16", "bfloat16"],
        "cuda_archs": archs,
        "cuda_dtypes": kernel_matrix.DTYPES if "cuda" in backends else [],
        "cuda_head_dims": kernel_matrix.HEAD_DIMS if "cuda" in backends else [],
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

    archs, gencode = cuda_archs()
    generated = kernel_matrix.render(ROOT / "build" / "generated")
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    sources += [str(p.relative_to(ROOT)) for p in generated]
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
            f"--threads={os.environ.get('NVCC_THREADS', '4')}", *gencode]
    log(f"building CPU + CUDA backends: {len(generated)} kernel files, archs {archs}")
    write_build_config(["cpu", "cuda"], archs)
    return CUDAExtension(
        "dmattn_ops._C",
        sources,
        include_dirs=[cutlass_include(), str(ROOT / "csrc")],
        define_macros=[("DMATTN_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx + ["-DDMATTN_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
        py_limited_api=True,
    )


setup(
    name="dmattn_ops",
    version="0.1.0",
    description="Varlen attention with dynamic key-side / query-side masks and biases, as a PyTorch custom op",
    packages=["dmattn_ops", "dmattn_ops._meta"],
    package_dir={"dmattn_ops": "dmattn_ops", "dmattn_ops._meta": "meta"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
    extras_require={
        "test": ["pytest", "expecttest", "hypothesis"],
        "bench": ["matplotlib"],
        "cuda": ["nvidia-cutlass==4.2.0.0"],  # CuTe / CUTLASS headers, build time only
    },
)
