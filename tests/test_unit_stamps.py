"""tools/unit_stamps.py's reading of the measuring build's records (csrc/cuda/sm90a/unit_stamps.cuh), on records
written here with known times: a unit's SM time fitted as X + T x tiles, and the parts of its start and end."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import unit_stamps as us  # noqa: E402

# Cycles between a unit's points (one cycle = one ns here: the two clocks agree), and per KV tile.
KNOWN, SETUP, FIRST_S, STAGED, STORE, PER_TILE = 300, 500, 200, 700, 100, 2000


def records(units_per_sm, sms=2, gap=0):
    """Records of units run back to back on each SM (tiles 5, 6, ... so every span passes the tool's 10 us), both
    consumer warpgroups' alike: (units * 2, WORDS) int64, as torch.ops.dmattn.unit_stamps() returns them."""
    rows = []
    for sm in range(sms):
        t = 1_000 * sm
        for order in range(units_per_sm):
            tiles = 5 + order
            points = [t]
            for step in (KNOWN, SETUP, FIRST_S, PER_TILE * tiles, STAGED, STORE):
                points.append(points[-1] + step)
            rec = points + points  # %globaltimer, then clock64: the same counts
            rec += [sm, sm, tiles, order, order * sms + sm, 1]
            assert len(rec) == us.WORDS
            rows += [rec, rec]
            t = points[-1] + gap
    return torch.tensor(rows, dtype=torch.int64)


def test_layout_matches_the_kernels():
    """The tool's words per record are the binding's allocation (heuristics.h kUnitStampWords)."""
    header = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "cuda", "heuristics.h")
    with open(header) as f:
        assert f"constexpr int kUnitStampWords = {us.WORDS};" in f.read()
    assert us.WRITTEN == us.WORDS - 1


def test_fit_and_parts_of_back_to_back_units():
    row = us.analyse(us.units_of(records(units_per_sm=4)), call_ms=1.0, sms=2)
    assert row["units"] == 8
    # SM time = the span (nothing between two units): X = the boundary parts, T = the per-tile loop
    boundary_us = (KNOWN + SETUP + FIRST_S + STAGED + STORE) / 1e3
    assert abs(row["x_fit_us"] - boundary_us) < 1e-6
    assert abs(row["t_fit_us"] - PER_TILE / 1e3) < 1e-6
    assert abs(row["known_us"] - KNOWN / 1e3) < 1e-9
    assert abs(row["setup_us"] - SETUP / 1e3) < 1e-9
    assert abs(row["q_wait_us"] - (KNOWN + SETUP) / 1e3) < 1e-9
    assert abs(row["first_s_us"] - FIRST_S / 1e3) < 1e-9
    assert abs(row["staged_us"] - STAGED / 1e3) < 1e-9
    assert abs(row["store_us"] - STORE / 1e3) < 1e-9
    assert abs(row["epilogue_us"] - (STAGED + STORE) / 1e3) < 1e-9
    assert row["gap_us"] == 0
    assert abs(row["loop_us_per_tile"] - PER_TILE / 1e3) < 1e-9


def test_a_gap_between_units_counts_in_x():
    row = us.analyse(us.units_of(records(units_per_sm=4, gap=400)), call_ms=1.0, sms=2)
    assert abs(row["gap_us"] - 0.4) < 1e-9
    assert abs(row["x_fit_us"] - (KNOWN + SETUP + FIRST_S + STAGED + STORE + 400) / 1e3) < 1e-6


def test_unwritten_records_are_left_out():
    recs = records(units_per_sm=3)
    recs[0:2, us.WRITTEN] = 0  # the first unit's two records never written
    assert us.analyse(us.units_of(recs), call_ms=1.0, sms=2)["units"] == 5
