"""tools/bench_gpu.py's target verdicts on made-up result rows (no device, no timing): issue 11's operand-bandwidth
target reads a query-side row's mask + bias bytes per second of its call against the copy bandwidth measured in the
same run, and judges the prefill workload's row only (a decode call reads its K / V too); issue 10's 10x FlexAttention
target reads Flex's best set-up (padded, one mask for all heads, its decoding kernel; or a KV head's query heads
folded into the query length, with either mask) against dmattn_ops on that same mask, in that row's own group, and
how the padded Flex rows learn which kernel Flex chose."""

import pytest
import torch

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


def _decode_rows():
    """The decode workload's Flex rows as bench_gpu.py groups them: the packed and per-KV-head rows beside dmattn_ops
    on the per-KV-head mask, the head-shared row beside dmattn_ops on the one mask for all heads."""
    main, shared = "key-side mask 25% + bias", bench_gpu.SHARED_DECODE_GROUP
    rows = [(main, "dmattn_ops", "dmattn", 0.1), (main, "flex compiled, packed", "flex", 7.0),
            (main, "flex compiled, padded, per-KV-head mask", "flex", 4.2),
            (main, "flex compiled, padded, folded query heads, per-KV-head mask", "flex", 0.9),
            (shared, "dmattn_ops", "dmattn", 0.2),
            (shared, "flex compiled, padded, head-shared mask (its best set-up)", "flex", 1.25),
            (shared, "flex compiled, padded, folded query heads, head-shared mask", "flex", 3.0)]
    rows = [{"group": g, "peer": p, "family": f, "status": "ok", "ms_median": ms, "check": "ok"}
            for g, p, f, ms in rows]
    bench_gpu.add_speedups(rows)
    return rows


def test_flex_best_set_up_is_judged_against_dmattn_on_the_same_head_shared_mask():
    verdicts = {t["target"]: t["verdict"] for t in bench_gpu.check_targets("decode", _decode_rows())}
    flex = {k: v for k, v in verdicts.items() if "flex" in k}
    assert flex == {  # each row against the group's own dmattn_ops row: 1.25 / 0.2, 4.2 / 0.1, 0.9 / 0.1, ...
        "dmattn_ops >= 10x flex compiled, padded, head-shared [key-side mask]": "MISSED (6.25x)",
        "dmattn_ops >= 10x flex compiled, padded, per-KV-head [key-side mask]": "met (42.00x)",
        "dmattn_ops >= 10x flex compiled, padded, folded query heads, per-KV-head [key-side mask]": "MISSED (9.00x)",
        "dmattn_ops >= 10x flex compiled, padded, folded query heads, head-shared [key-side mask]": "met (15.00x)",
        "dmattn_ops >= 10x flex compiled, packed [key-side mask]": "met (70.00x)"}
    assert bench_gpu.SHARED_DECODE_GROUP.startswith("key-side mask")  # the targets' group prefix finds it


def test_flex_targets_not_measured_without_their_rows():
    rows = [r for r in _decode_rows() if "padded" not in r["peer"]]
    verdicts = {t["target"]: t["verdict"] for t in bench_gpu.check_targets("decode", rows)}
    assert verdicts["dmattn_ops >= 10x flex compiled, padded, head-shared [key-side mask]"] == "not measured"
    assert verdicts["dmattn_ops >= 10x flex compiled, packed [key-side mask]"] == "met (70.00x)"


def test_flex_decoding_rule_needs_one_blockmask_head_with_gqa():
    assert bench_gpu._flex_kernel_rule(8, 32, 8, 1).startswith("decoding")  # the best set-up
    assert bench_gpu._flex_kernel_rule(8, 32, 8, 32).startswith("main")  # per-KV-head mask: a BlockMask of H heads
    assert bench_gpu._flex_kernel_rule(128, 32, 8, 1).startswith("main")  # not a short query
    assert bench_gpu._flex_kernel_rule(8, 24, 8, 1).startswith("main")  # H / Hk = 3
    assert bench_gpu._flex_kernel_rule(8, 32, 32, 32).startswith("decoding")  # MHA: 1 or H heads
    # a KV head's 4 query heads folded into the rows: 8 heads of 4 x 8 = 32 rows, no GQA, a BlockMask of Hk heads
    assert bench_gpu._flex_kernel_rule(4 * 8, 8, 8, 8).startswith("decoding")
    assert bench_gpu._flex_kernel_rule(4 * 32, 8, 8, 8).startswith("main")  # 128 folded rows


@pytest.mark.parametrize("decided, kernel", [(True, "decoding"), (False, "main"), (None, "not observed")])
def test_flex_kernel_choice_reads_the_lowering_log(decided, kernel):
    flex_decoding = pytest.importorskip("torch._inductor.kernel.flex.flex_decoding")
    log = flex_decoding.log
    level = log.level
    with bench_gpu._FlexKernelChoice(torch.device("cuda")) as choice:  # a device object: no CUDA needed
        if decided is not None:  # the line _use_flex_decoding logs while the CUDA lowering compiles
            log.debug("Use flex decoding %s, force_flex_attention=%s", decided, False)
    assert choice.kernel == kernel
    assert log.level == level and choice.handler not in log.handlers  # the logger is left as it was
    with bench_gpu._FlexKernelChoice(torch.device("cpu")) as choice:
        log.debug("Use flex decoding %s", True)
    assert choice.kernel == "cpu lowering"
