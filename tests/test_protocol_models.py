"""Models of the CUDA kernels' synchronization protocols (tools/model_*.py), run in CI: each explores random
interleavings of a kernel's warpgroups over its barriers and buffers and must find no violation. A model checks the
protocol as written in its kernel, not the kernel itself: the GPU tests check the kernel."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))

import pytest  # noqa: E402

import model_bwd_dq_late  # noqa: E402
import model_bwd_dq_tile  # noqa: E402


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


def test_the_dq_writer_warp_and_the_consumer_warpgroups_keep_the_dq_tile_protocol(capsys):
    """csrc/cuda/sm90a/bwd_kernel.cuh's dQ in tiles (BwdParams::dq_tiles): the consumer warpgroups' stagings behind
    dq_empty / dq_full (12-15, 160 threads) and producer warp 3's walk of the same tiles, over 300 random CTAs (dead
    heads, partial tiles, D = 64 and 128, zero-item and all-dead CTAs) under random interleavings of every warp and the
    bulk engine: no deadlock, no phase mixing two tiles or two roles, no arrival left pending, no staging overwritten
    before its reduce-add read it or read before every warp wrote it, every computed tile reduced exactly once."""
    assert model_bwd_dq_tile.main(300) == 0
    assert "300 CTAs, 0 with a violation" in capsys.readouterr().out


@pytest.mark.parametrize("mutation, value", [
    ("WRITER_SKIPS_DEAD", False),   # the writer walks dead heads' items too
    ("WRITER_WAITS_KV", False),     # the writer reads live_heads before the gather warps ORed them in
    ("WRITER_WAITS_READ", False),   # a staging handed back before its reduce-add read it
    ("WG1_READ_WAIT", 1),           # warpgroup 1's staging handed back after wait_group.read 1
    ("FIRST_EMPTY_ARRIVE", False),  # the stagings not marked free for the first tile
    ("DQ_THREADS", 128),            # the writer warp left out of the count
    ("WRITER_ARRIVAL", 1),          # the writer's arrival counted as one lane's
    ("DQ_EMPTY", 10),               # ids colliding with ds_ready / the stagger
])
def test_the_dq_tile_model_catches_a_broken_protocol(mutation, value, monkeypatch, capsys):
    """Each mutation of the dQ-in-tiles protocol (the model's docstring lists them) is found within 150 CTAs, so the
    test above is not vacuous."""
    monkeypatch.setattr(model_bwd_dq_tile, mutation, value)
    assert model_bwd_dq_tile.main(150) == 1
    assert "150 CTAs, 0 with a violation" not in capsys.readouterr().out
