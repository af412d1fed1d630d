"""The sm90a backward's layouts, checked on the CPU: tests/host/sm90a_bwd_layouts.cu includes the kernel's traits
(csrc/cuda/sm90a/bwd_kernel.cuh), is compiled with nvcc as host code and run, so a transposed view that is not the
bytes it views, or a fragment the kernel indexes in another order than CuTe lays it out, fails here rather than as
wrong gradients on the GPU (the kernel itself runs only on a cc 9.0 device: test_backward.py)."""

import subprocess
from pathlib import Path

import pytest

import check_cuda_compile as ccc

ROOT = Path(__file__).resolve().parent.parent


def test_sm90a_backward_layouts(tmp_path):
    nvcc, cutlass = ccc.find_nvcc(), ccc.cutlass_include()
    if nvcc is None:
        pytest.skip("no nvcc to compile the layout check with (it needs no GPU)")
    if cutlass is None or not (cutlass / "cute").is_dir():
        pytest.skip("no CUTLASS headers (the nvidia-cutlass package) to compile the layout check with")
    exe = tmp_path / "sm90a_bwd_layouts"
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "--expt-relaxed-constexpr", "-w", f"-I{cutlass}",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "host" / "sm90a_bwd_layouts.cu"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout
