"""tools/kernel_matrix.py: the rendered instantiation files, the registry's dispatch, and the per-arch-path flags.

CPU only, no nvcc: the registry's C++ is compiled with the host compiler against the real csrc/cuda/dispatch.h (with
stand-ins for the CUDA toolkit headers) and run, so its dispatch order and head-dim rounding are checked as C++
executes them, and a launcher signature that drifts from csrc/cuda fails to link.
"""

import operator
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

import kernel_matrix as km

CSRC = Path(__file__).resolve().parent.parent / "csrc"
DEFAULT_ARCHS = km.parse_archs(km.DEFAULT_CUDA_ARCHS)
SM80_ONLY = [i for i in km.INSTANTIATIONS if i[0] == "sm80"]
# The sm80 list plus stand-in Hopper entries (one head dim no real path has), to exercise the sm90a path's handling.
WITH_SM90A = SM80_ONLY + [("sm90a", "bfloat16", 128), ("sm90a", "bfloat16", 192)]
ELEM = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


@pytest.mark.parametrize("instantiations", [km.INSTANTIATIONS, SM80_ONLY, WITH_SM90A],
                         ids=["default", "sm80_only", "with_sm90a"])
def test_every_instantiation_has_its_file(tmp_path, instantiations):
    files, registry = km.render(tmp_path, instantiations)
    assert sorted(files) == sorted(instantiations)
    assert {p.name for p in tmp_path.iterdir()} == {p.name for p in files.values()} | {"kernel_registry.cu"}
    for (arch, dtype, head_dim), path in files.items():
        assert path.name == f"varlen_fwd_{arch}_{dtype}_hd{head_dim}.cu"
        text = path.read_text()
        assert f'#include "cuda/{arch}/launch.cuh"' in text
        backward = (arch, dtype, head_dim) in km.BACKWARD  # its file instantiates the backward launcher too
        assert (f'#include "cuda/{arch}/bwd_launch.cuh"' in text) == backward
        assert text.endswith(
            "namespace dmattn::cuda {\n"
            f"template cudaError_t {arch}::launch_attention<{ELEM[dtype]}, {head_dim}>(const VarlenFwdParams&, "
            "const FwdPlan&, const Workspace&, cudaStream_t);\n"
            + (f"template cudaError_t {arch}::launch_backward<{ELEM[dtype]}, {head_dim}>(const bwd::BwdParams&, "
               "cudaStream_t);\n" if backward else "")
            + "}  // namespace dmattn::cuda\n"
        ), text
    # The registry declares the launchers it calls and includes no kernel header.
    text = registry.read_text()
    assert re.findall(r"#include [<\"](.*)[>\"]", text) == [
        "cuda_bf16.h", "cuda_fp16.h", "algorithm", "initializer_list", "cuda/dispatch.h"]
    for arch in {a for a, _, _ in instantiations}:
        assert f"namespace {arch} {{" in text


def test_default_list():
    assert km.INSTANTIATIONS == [("sm80", t, d) for t in ["float16", "bfloat16"] for d in [32, 64, 96, 128, 256]] + [
        ("sm90a", t, d) for t in ["float16", "bfloat16"] for d in [64, 128, 256]]
    assert [p.name for p in km.ARCH_PATHS] == ["sm90a", "sm80"]  # dispatch preference order


def test_backward_list():
    """The generated backward launchers: the sm90a backward at head dims 64 and 128 (the fused backward's), in files
    the build compiles for sm_90a."""
    assert km.BACKWARD == [("sm90a", t, d) for t in ["float16", "bfloat16"] for d in (64, 128)]
    assert all(entry in km.INSTANTIATIONS for entry in km.BACKWARD)
    assert km.PATHS["sm90a"].bwd_header == "cuda/sm90a/bwd_launch.cuh" and km.PATHS["sm80"].bwd_header is None


def test_sm90a_is_built_only_with_90():
    assert km.built(["80"], WITH_SM90A) == SM80_ONLY
    assert km.built(["80"]) == SM80_ONLY and km.built(["80", "90"]) == km.INSTANTIATIONS
    assert km.built(["80", "90"], WITH_SM90A) == WITH_SM90A
    assert km.built(["90"], WITH_SM90A) == WITH_SM90A
    assert km.PATHS["sm90a"].codes(["80"]) == [] and km.PATHS["sm90a"].codes(["80", "90"]) == ["90a"]


def test_nvcc_flags_per_arch_path():
    common = ["-std=c++20", "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo"]
    includes = ["/cutlass/include", "/repo/csrc"]
    sm80 = km.nvcc_flags(["80", "90"], "20", includes, "sm80")
    assert sm80 == [*common, "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                    "-I/cutlass/include", "-I/repo/csrc"]
    assert km.nvcc_flags(["80", "90"], "20", includes) == sm80  # the global flags: every listed arch
    sm90a = km.nvcc_flags(["80", "90"], "20", includes, "sm90a")
    assert [f for f in sm90a if f.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert [f for f in km.nvcc_flags(["80"], "17", includes, "sm90a") if f.startswith("-gencode")] == []
    assert km.parse_archs(" 80; 90,100 ") == ["80", "90", "100"]


def test_path_summary():
    summary = km.path_summary(DEFAULT_ARCHS, WITH_SM90A)
    assert list(summary) == ["sm90a", "sm80"]
    assert summary["sm90a"] == {"gencode": ["-gencode=arch=compute_90a,code=sm_90a"], "runs_on": "cc == 90",
                                "dtypes": ["bfloat16"], "head_dims": [128, 192]}
    assert summary["sm80"] == {
        "gencode": ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"],
        "runs_on": "cc >= 80", "dtypes": ["float16", "bfloat16"], "head_dims": [32, 64, 96, 128, 256]}
    empty = km.path_summary(["80"])["sm90a"]  # 90 not listed: no gencode, no kernels
    assert empty == {"gencode": [], "runs_on": "cc == 90", "dtypes": [], "head_dims": []}


def test_ninja_file_compiles_each_path_with_its_flags(tmp_path):
    files, _ = km.render(tmp_path, WITH_SM90A)
    flags = {p.name: km.nvcc_flags(DEFAULT_ARCHS, "20", ["/inc dir"], p.name) for p in km.ARCH_PATHS}
    sources = {p.name: [(src, tmp_path / "obj" / (src.stem + ".o")) for i, src in files.items() if i[0] == p.name]
               for p in km.ARCH_PATHS}
    text = km.ninja_source("/usr/local/cuda/bin/nvcc", flags, sources)
    rules = dict(re.findall(r"rule (\w+)\n  command = (.*)\n", text))
    assert set(rules) == {"nvcc_sm80", "nvcc_sm90a"}
    assert "-gencode=arch=compute_90a,code=sm_90a" in rules["nvcc_sm90a"]
    assert "compute_80" not in rules["nvcc_sm90a"] and "compute_90a" not in rules["nvcc_sm80"]
    for command in rules.values():
        assert command.startswith("$nvcc -MD -MF $out.d ") and command.endswith(" -c $in -o $out")
        assert "'-I/inc dir'" in command
    builds = re.findall(r"build (\S+): (\w+) (\S+)\n", text)
    assert len(builds) == len(WITH_SM90A)
    for obj, rule, src in builds:
        arch = Path(src).name.split("_")[2]
        assert rule == f"nvcc_{arch}" and Path(obj).stem == Path(src).stem
    # An empty arch path gets no rule.
    assert "nvcc_sm90a" not in km.ninja_source("nvcc", flags, {**sources, "sm90a": []})


# Stand-ins for the CUDA toolkit headers csrc/cuda includes, enough to compile the registry with the host compiler
# against the real csrc/cuda/dispatch.h (so a drift between LAUNCH_PARAMS and that header fails here, with no nvcc).
_CUDA_STUBS = {
    "cuda_runtime_api.h": """
        #pragma once
        enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
        using cudaStream_t = struct CUstream_st*;
        """,
    "cuda_fp16.h": "#pragma once\nstruct __half {};\n",
    "cuda_bf16.h": "#pragma once\nstruct __nv_bfloat16 {};\n",
}
# The launchers print which instantiation ran; main answers queries on stdin.
_DRIVER = """
    #include <cuda_bf16.h>
    #include <cuda_fp16.h>

    #include <cstdio>

    #include "cuda/dispatch.h"
    namespace dmattn::cuda {
    template <typename Elem> const char* name();
    template <> const char* name<__half>() { return "float16"; }
    template <> const char* name<__nv_bfloat16>() { return "bfloat16"; }
    #define LAUNCHER(ARCH)                                                      \\
      namespace ARCH {                                                         \\
      template <typename Elem, int kHeadDim>                                   \\
      cudaError_t launch_attention(PARAMS) {                                   \\
        std::printf(#ARCH " %s %d\\n", name<Elem>(), kHeadDim);              \\
        return cudaSuccess;                                                    \\
      }                                                                        \\
      template <typename Elem, int kHeadDim>                                   \\
      cudaError_t launch_backward(const bwd::BwdParams&, cudaStream_t) {       \\
        std::printf("backward " #ARCH " %s %d\\n", name<Elem>(), kHeadDim);  \\
        return cudaSuccess;                                                    \\
      }                                                                        \\
      }
    LAUNCHER(sm80)
    LAUNCHER(sm90a)
    }  // namespace dmattn::cuda
    #include "kernel_registry.cu"
    // stdin: lines "cc dtype head_dim" (dtype: the ScalarType value); stdout per line: kernel_head_dim,
    // max_kernel_head_dim, attention_path ("-": null), then what dispatch_attention ran ("none" when it returned
    // cudaErrorInvalidValue).
    int main() {
      int cc, dtype, head_dim;
      while (std::scanf("%d %d %d", &cc, &dtype, &head_dim) == 3) {
        dmattn::VarlenFwdParams p;
        p.dtype = static_cast<dmattn::ScalarType>(dtype);
        p.head_dim = head_dim;
        const char* path = dmattn::cuda::attention_path(cc, p.dtype, head_dim);
        std::printf("%d %d %s ", dmattn::cuda::kernel_head_dim(cc, p.dtype, head_dim),
                    dmattn::cuda::max_kernel_head_dim(cc, p.dtype), path != nullptr ? path : "-");
        const dmattn::cuda::FwdPlan plan;
        const dmattn::cuda::Workspace ws;
        if (dmattn::cuda::dispatch_attention(cc, p, plan, ws, nullptr) != cudaSuccess) std::printf("none\\n");
      }
    }
    """
_SCALAR_TYPE = {"float16": 1, "bfloat16": 2}  # csrc/varlen_fwd_params.h


def build_host_driver(tmp: Path, source: str, name: str, what: str) -> Path:
    """Compiles a driver's C++ source (dedented) against csrc/ and the CUDA stand-ins with the host compiler, in tmp,
    into the executable tmp / name; skips the test where there is no host compiler (what: what it compiles)."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip(f"no host C++ compiler to compile {what} with")
    for stub, text in _CUDA_STUBS.items():
        (tmp / stub).write_text(textwrap.dedent(text))
    (tmp / "main.cpp").write_text(textwrap.dedent(source))
    exe = tmp / name
    subprocess.run([compiler, "-std=c++17", "-Wall", "-Werror", "-I", str(tmp), "-I", str(CSRC),
                    str(tmp / "main.cpp"), "-o", str(exe)], check=True)
    return exe


def run_registry(tmp_path, instantiations, queries):
    """Compiles the registry for instantiations with the host compiler and returns its answer to each
    (cc, dtype, head_dim): (kernel_head_dim, max_kernel_head_dim, "arch dtype head_dim" or "none"), having checked
    that attention_path names the arch that ran."""
    km.render(tmp_path, instantiations)
    params = ", ".join(t for t, _ in km.LAUNCH_PARAMS)
    exe = build_host_driver(tmp_path, _DRIVER.replace("PARAMS", params), "registry", "the registry")
    stdin = "".join(f"{cc} {_SCALAR_TYPE[dtype]} {d}\n" for cc, dtype, d in queries)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout
    answers = []
    for line in out.splitlines():
        fit, largest, path, ran = line.split(" ", 3)
        # attention_path names the path dispatch_attention ran ("-": none)
        assert path == (ran.split(" ")[0] if ran != "none" else "-"), line
        answers.append((int(fit), int(largest), ran))
    return answers


def expected(instantiations, cc, dtype, head_dim):
    """The registry's contract, from the list: paths that run on cc, the smallest fitting head dim among them, and
    dispatch to the first path in preference order that has (dtype, head_dim)."""
    compare = {">=": operator.ge, "==": operator.eq}
    runs = [p.name for p in km.ARCH_PATHS if compare[p.runs_on[0]](cc, p.runs_on[1])]
    dims = [d for a, t, d in instantiations if a in runs and t == dtype]
    fit = min((d for d in dims if d >= head_dim), default=-1)
    ran = next((f"{a} {dtype} {head_dim}" for a in runs for b, t, d in instantiations
                if (b, t, d) == (a, dtype, head_dim)), "none")
    return fit, max(dims, default=0), ran


@pytest.mark.parametrize("instantiations", [km.INSTANTIATIONS, SM80_ONLY, WITH_SM90A],
                         ids=["default", "sm80_only", "with_sm90a"])
def test_registry_dispatch(tmp_path, instantiations):
    queries = [(cc, dtype, d) for cc in (75, 80, 86, 90, 100, 120) for dtype in ("float16", "bfloat16")
               for d in (1, 31, 32, 33, 64, 80, 96, 100, 128, 129, 150, 192, 200, 256, 257)]
    answers = run_registry(tmp_path, instantiations, queries)
    assert answers == [expected(instantiations, *q) for q in queries]
    # Spelled out for the stand-in sm90a entries: preferred on cc 90 only, and 150 rounds to 192 there alone.
    if instantiations is WITH_SM90A:
        by_query = dict(zip(queries, answers))
        assert by_query[(90, "bfloat16", 128)] == (128, 256, "sm90a bfloat16 128")
        assert by_query[(80, "bfloat16", 128)] == (128, 256, "sm80 bfloat16 128")
        assert by_query[(90, "bfloat16", 150)] == (192, 256, "none")
        assert by_query[(90, "bfloat16", 192)] == (192, 256, "sm90a bfloat16 192")
        assert by_query[(100, "bfloat16", 150)] == (256, 256, "none")


# The backward's dispatch: per query line "cc dtype head_dim", whether has_backward_kernel holds (0 / 1), then what
# dispatch_backward ran ("none" when it returned cudaErrorInvalidValue).
_BACKWARD_MAIN = """
    int main() {
      int cc, dtype, head_dim;
      while (std::scanf("%d %d %d", &cc, &dtype, &head_dim) == 3) {
        dmattn::cuda::bwd::BwdParams p;
        p.f.dtype = static_cast<dmattn::ScalarType>(dtype);
        p.f.head_dim = head_dim;
        std::printf("%d ", static_cast<int>(dmattn::cuda::has_backward_kernel(cc, p.f.dtype, head_dim)));
        if (dmattn::cuda::dispatch_backward(cc, p, nullptr) != cudaSuccess) std::printf("none\\n");
      }
    }
    """


@pytest.mark.parametrize("instantiations", [km.INSTANTIATIONS, SM80_ONLY], ids=["default", "sm80_only"])
def test_backward_registry_dispatch(tmp_path, instantiations):
    """has_backward_kernel and dispatch_backward agree with BACKWARD: the sm90a backward on cc 90 alone, at head dims
    64 and 128 exactly (the binding pads to one), in both dtypes; nothing in a build without sm90a."""
    km.render(tmp_path, instantiations)
    params = ", ".join(t for t, _ in km.LAUNCH_PARAMS)
    driver = _DRIVER.replace("PARAMS", params).split("// stdin:")[0] + textwrap.dedent(_BACKWARD_MAIN)
    exe = build_host_driver(tmp_path, driver, "backward_registry", "the backward registry")
    queries = [(cc, dtype, d) for cc in (80, 90, 100) for dtype in ("float16", "bfloat16") for d in (64, 100, 128, 256)]
    stdin = "".join(f"{cc} {_SCALAR_TYPE[dtype]} {d}\n" for cc, dtype, d in queries)
    out = subprocess.run([str(exe)], input=stdin, capture_output=True, text=True, check=True).stdout.splitlines()
    for (cc, dtype, d), line in zip(queries, out, strict=True):
        built = ("sm90a", dtype, d) in instantiations and ("sm90a", dtype, d) in km.BACKWARD and cc == 90
        assert line == (f"1 backward sm90a {dtype} {d}" if built else "0 none"), (cc, dtype, d)


def test_kernel_head_dim_covers_every_head_dim(tmp_path):
    """Every head dim up to the largest compiled one has a kernel on each device the sm80 path runs on."""
    queries = [(cc, dtype, d) for cc in (80, 90) for dtype in km.DTYPES for d in range(1, max(km.HEAD_DIMS) + 2)]
    answers = run_registry(tmp_path, km.INSTANTIATIONS, queries)
    for (cc, dtype, d), (fit, largest, _) in zip(queries, answers):
        assert largest == max(km.HEAD_DIMS)
        assert fit == min((h for h in km.HEAD_DIMS if h >= d), default=-1), (cc, dtype, d)


@pytest.mark.parametrize("text, dims", [("", km.HEAD_DIMS), ("128", [128]), ("128;64", [64, 128]),
                                        (" 64 , 256,", [64, 256]), ("128;128", [128])])
def test_head_dims_variable_parses(text, dims):
    """DMATTN_HEAD_DIMS lists head dims as DMATTN_CUDA_ARCHS lists archs; unset or empty means every one."""
    assert km.parse_head_dims(text) == dims


@pytest.mark.parametrize("text", ["100", "sixty-four", "64;48", "-128"])
def test_head_dims_variable_names_the_choices(text):
    """A head dim with no kernel template is an error naming the variable, the choices and what was given."""
    with pytest.raises(ValueError, match=r"DMATTN_HEAD_DIMS must list head dims among 32, 64, 96, 128, 256"):
        km.parse_head_dims(text)


def test_fewer_head_dims_run_padded_in_the_registry(tmp_path):
    """A build of head dim 128 alone (DMATTN_HEAD_DIMS=128): every dtype and arch path at 128 (the sm90a backward at
    128 too), smaller head dims padded to 128, larger ones have no kernel (the binding's error names the largest)."""
    only = km.with_head_dims([128])
    assert only == [i for i in km.INSTANTIATIONS if i[2] == 128] and {a for a, _, _ in only} == {"sm80", "sm90a"}
    assert [i for i in km.BACKWARD if i in only] == [("sm90a", "float16", 128), ("sm90a", "bfloat16", 128)]
    queries = [(cc, "bfloat16", d) for cc in (80, 90) for d in (32, 64, 128, 129, 256)]
    answers = dict(zip(queries, run_registry(tmp_path, only, queries)))
    assert answers[(90, "bfloat16", 64)] == (128, 128, "none")
    assert answers[(90, "bfloat16", 128)] == (128, 128, "sm90a bfloat16 128")
    assert answers[(80, "bfloat16", 32)] == (128, 128, "none")
    assert answers[(80, "bfloat16", 129)] == (-1, 128, "none")
    assert answers == {q: expected(only, *q) for q in queries}
