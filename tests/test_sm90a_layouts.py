"""The sm90a kernels' layouts, checked on the CPU: tests/host/sm90a_{fwd,bwd}_layouts.cu include the kernels' traits
(csrc/cuda/sm90a/kernel_traits.h, bwd_traits.h), are compiled with nvcc as host code and run, so a transposed view
that is not the bytes it views, or a fragment a kernel indexes in another order than CuTe lays it out, fails here
rather than as wrong outputs or gradients on the GPU (the kernels themselves run only on a cc 9.0 device:
test_sm90a.py, test_backward.py). The forward's check covers every tile it is built with, the wide ones included."""

import subprocess
from pathlib import Path

import pytest

import check_cuda_compile as ccc

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("check", ["sm90a_fwd_layouts", "sm90a_bwd_layouts"])
def test_sm90a_layouts(check, tmp_path):
    nvcc, cutlass = ccc.find_nvcc(), ccc.cutlass_include()
    if nvcc is None:
        pytest.skip("no nvcc to compile the layout check with (it needs no GPU)")
    if cutlass is None or not (cutlass / "cute").is_dir():
        pytest.skip("no CUTLASS headers (the nvidia-cutlass package) to compile the layout check with")
    exe = tmp_path / check
    subprocess.run([nvcc, "-std=c++17", "-arch=sm_90a", "--expt-relaxed-constexpr", "-w", f"-I{cutlass}",
                    f"-I{ROOT / 'csrc'}", str(ROOT / "tests" / "host" / f"{check}.cu"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout
