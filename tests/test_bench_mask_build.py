"""tools/bench_query_mask_build.py on the CPU, eager, one repetition: every row measured and checked equal to the
hand-written tensor (the tool asserts it), its ops counted, and a chart drawn from the JSON beside an earlier one
(where matplotlib is installed)."""

import json

import pytest

import bench_query_mask_build as tool  # tools/ is on pytest's pythonpath (pytest.ini)


@pytest.fixture(scope="module")
def result_file(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "build.json"
    assert tool.main(["--no-compile", "--reps", "1", "--json", str(out)]) == 0
    return out


def test_eager_rows(result_file):
    result = json.loads(result_file.read_text())
    assert {(r["batch"], r["mask"]) for r in result["rows"]} == {
        (b, m) for b in ("one", "prefill") for m in ("window", "prefix", "document")}
    for r in result["rows"]:
        assert r["mode"] == "eager" and r["adapter_ms"] > 0 and r["hand_written_ms"] > 0
        assert r["adapter_ops"] > 0 and r["hand_written_ops"] > 0


def test_chart_from_json(result_file, tmp_path):
    pytest.importorskip("matplotlib", reason="the chart needs matplotlib (the bench extra)")
    chart = tmp_path / "build.png"
    assert tool.main(["--from", str(result_file), "--prev", str(result_file), "--chart", str(chart)]) == 0
    assert chart.stat().st_size > 0
