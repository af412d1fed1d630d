"""tools/bench_mod_paths.py on the CPU, tiny: every path of a window mask_mod runs, checked against the native
window (the tool asserts it), and is reported."""

import bench_mod_paths as tool  # tools/ is on pytest's pythonpath (pytest.ini)


def test_every_path_runs_and_is_reported(tmp_path):
    out = tmp_path / "paths.json"
    result = tool.main(["--device", "cpu", "--lengths", "40", "17", "--window", "8", "--reps", "1",
                        "--head-dim", "16", "--json", str(out)])
    assert [r["path"] for r in result["rows"]] == ["proven", "proven again", "range given", "native", "mask path",
                                                  "mask given"]
    assert all(r["ms"] > 0 for r in result["rows"]) and out.exists()
