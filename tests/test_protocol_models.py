"""Models of the CUDA kernels' synchronization protocols (tools/model_*.py), run in CI: each explores random
interleavings of a kernel's warpgroups over its barriers and buffers and must find no violation. A model checks the
protocol as written in its kernel, not the kernel itself: the GPU tests check the kernel."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import model_bwd_dq_late  # noqa: E402


def test_the_late_dq_and_staggered_warpgroups_of_the_sm90a_backward_keep_their_protocol(capsys):
    """csrc/cuda/sm90a/bwd_kernel.cuh's consumer protocol (dQ a tile late, three dS^T buffers, barrier ids by
    parity, the stagger after every partial tile): 1,000 interleavings, with and without the stagger, none with a
    deadlock, a dQ product reading another tile's dS^T, a buffer overwritten while read, or a barrier phase mixing
    two tiles."""
    assert model_bwd_dq_late.main(500) == 0
    assert "1000 interleavings, 0 with a violation" in capsys.readouterr().out


def test_the_model_catches_a_broken_protocol(monkeypatch, capsys):
    """The same model with two dS^T buffers instead of three (a mutation its docstring names) finds violations, so
    the test above is not vacuous."""
    monkeypatch.setattr(model_bwd_dq_late, "BUFFERS", 2)
    assert model_bwd_dq_late.main(200) == 1
    assert "0 with a violation" not in capsys.readouterr().out
