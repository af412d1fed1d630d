"""tools/bench_gpu.py's target verdicts on made-up result rows (no device, no timing): issue 11's operand-bandwidth
target reads a query-side row's mask + bias bytes per second of its call against the copy bandwidth measured in the
same run, and judges the prefill workload's row only (a decode call reads its K / V too)."""

import bench_gpu

GROUP = "causal, the same mask + bias expanded query-side"


def _rows(ms=1.0, mask_bytes=2.0e9, status="ok"):
    return [{"group": GROUP, "peer": bench_gpu.QUERY_SIDE_PEER, "family": "dmattn", "status": status,
             "ms_median": ms if status == "ok" else None, "mask_bytes": mask_bytes},
            {"group": GROUP, "peer": "dmattn_ops, key-side (the same values)", "family": "dmattn", "status": "ok",
             "ms_median": 0.5, "mask_bytes": 1e6}]


def _operand_verdicts(workload, results, copy_tbps):
    return [t["verdict"] for t in bench_gpu.check_targets(workload, results, copy_tbps)
            if t["target"].startswith("dmattn_ops query-side operand bytes")]


def test_operand_bandwidth_is_bytes_per_second_of_the_query_side_row():
    rows = _rows(ms=1.0, mask_bytes=2.0e9)
    assert bench_gpu.add_operand_bandwidth(rows)
    assert rows[0]["operand_tbps"] == 2.0  # 2 GB in 1 ms
    assert "operand_tbps" not in rows[1]  # the key-side row reads no query-side operands
    assert not bench_gpu.add_operand_bandwidth(_rows(status="not built"))


def test_operand_bandwidth_target_is_half_the_copy_bandwidth_on_prefill():
    rows = _rows(ms=1.0, mask_bytes=2.0e9)
    bench_gpu.add_operand_bandwidth(rows)
    assert _operand_verdicts("prefill", rows, 4.0) == ["met (0.50x: 2.00 of 4.00 TB/s)"]
    assert _operand_verdicts("prefill", rows, 4.2)[0].startswith("MISSED (0.48x")
    assert _operand_verdicts("prefill", rows, None) == ["not measured"]
    assert _operand_verdicts("decode", rows, 4.0) == []  # reported on decode rows, judged on prefill only
