"""tools/compare_builds.py compares each dmattn_ops peer of a benchmark group on its own: a group holding a slow and a
fast call (the query-side expansion beside the key-side call of the same values) once pooled them into one median,
which hid a 6.5% slow-down of one of them."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import compare_builds  # noqa: E402


def write_run(folder, times):
    """A bench_gpu.py --out folder: one workload whose group holds the dmattn_ops peers of ``times`` (peer -> ms)."""
    os.makedirs(folder)
    rows = [dict(family="dmattn", status="ok", ms_median=ms, group="causal, mask", peer=peer)
            for peer, ms in times.items()]
    rows.append(dict(family="flex", status="ok", ms_median=0.5, group="causal, mask", peer="flex compiled"))
    payload = dict(workload="prefill", environment={"device": "cuda"}, dmattn_build={}, problem={"B": 8},
                   results=rows)
    with open(os.path.join(folder, "prefill.json"), "w") as f:
        json.dump(payload, f)


def test_each_peer_is_a_row_and_a_slower_peer_is_flagged(tmp_path, capsys):
    old = {"dmattn_ops, query-side mask": 7.44, "dmattn_ops, key-side": 0.96}
    new = {"dmattn_ops, query-side mask": 6.57, "dmattn_ops, key-side": 1.02}  # one faster, one 6% slower
    for i in (1, 2):
        write_run(tmp_path / f"old{i}", old)
        write_run(tmp_path / f"new{i}", new)
    out = tmp_path / "cmp.json"
    rc = compare_builds.main(["--old", str(tmp_path / "old1"), str(tmp_path / "old2"), "--new",
                              str(tmp_path / "new1"), str(tmp_path / "new2"), "--json", str(out)])
    assert rc == 1  # a slower row makes the exit status fail
    rows = {r["peer"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == set(old)  # one row per dmattn_ops peer; other families are not compared
    assert rows["dmattn_ops, query-side mask"]["old_ms"] == 7.44
    assert abs(rows["dmattn_ops, query-side mask"]["new_over_old"] - 6.57 / 7.44) < 1e-12
    assert rows["dmattn_ops, query-side mask"]["verdict"] == "ok"
    assert rows["dmattn_ops, key-side"]["verdict"] == "SLOWER by 6.2%"
    assert "prefill / causal, mask / key-side" in capsys.readouterr().out


def test_backward_runs_are_compared_by_group(tmp_path):
    """bench_backward.py's JSON (rows under their group, workload "backward") compares like bench_gpu.py's."""
    for name, ms in (("old", 2.18), ("new", 2.02)):
        folder = tmp_path / name
        os.makedirs(folder)
        groups = {"masked": [dict(family="dmattn", status="ok", ms_median=ms, peer="dmattn_ops backward"),
                             dict(family="flex", status="ok", ms_median=23.7, peer="flex compiled, backward")],
                  "no mask": [dict(family="dmattn", status="ok", ms_median=3.49, peer="dmattn_ops backward")]}
        payload = dict(workload="backward", environment={"device": "cuda"}, dmattn_build={}, problem={"H": 32},
                       groups=groups)
        (folder / "backward.json").write_text(json.dumps(payload))
    out = tmp_path / "cmp.json"
    rc = compare_builds.main(["--old", str(tmp_path / "old"), "--new", str(tmp_path / "new"), "--json", str(out)])
    assert rc == 0
    rows = {(r["group"], r["peer"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("masked", "dmattn_ops backward"), ("no mask", "dmattn_ops backward")}
    assert abs(rows["masked", "dmattn_ops backward"]["new_over_old"] - 2.02 / 2.18) < 1e-12
    assert rows["no mask", "dmattn_ops backward"]["verdict"] == "ok"
