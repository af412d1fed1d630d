"""tools/profile_prefill.py's chart of earlier runs (no GPU: the rows come from JSON files): every (call, arch) row of
each build drawn, the passes before the attention kernel told apart from it; a malformed --builds is refused. Its
padded rows keep an operand's values with rows starting at the multiple asked for."""

import json

import pytest
import torch

import profile_prefill as tool  # tools/ is on pytest's pythonpath (pytest.ini)


def _run(tmp_path, name, map_us):
    rows = [{"call": "query", "arch": "auto", "head_dim": 128, "ms": 2.0 + map_us / 1e3,
             "kernels_us": {"void dmattn::cuda::sm90a::fwd_kernel<...>": 1562.0, "block_map_kernel": map_us}},
            {"call": "causal", "arch": "auto", "head_dim": 128, "ms": 0.68, "kernels_us": {"fwd_kernel": 672.0}}]
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"results": rows}))
    return path


def test_attention_kernel_and_passes_are_told_apart():
    assert tool.is_attention("void dmattn::cuda::sm90a::fwd_kernel<FwdTraits<bf16, 128>>(...)")
    assert not tool.is_attention("block_map_kernel") and not tool.is_attention("v_flags_kernel")


def test_chart_of_two_builds(tmp_path):
    pytest.importorskip("matplotlib", reason="charts need matplotlib (the optional extra)")
    old, new = _run(tmp_path, "old", 1031.6), _run(tmp_path, "new", 180.0)
    out = tmp_path / "cmp.png"
    assert tool.main(["--chart", str(out), "--builds", f"main={old}", f"new={new}"]) == 0
    assert out.stat().st_size > 0


def test_builds_without_a_label_are_refused(tmp_path, capsys):
    assert tool.main(["--chart", str(tmp_path / "x.png"), "--builds", str(_run(tmp_path, "old", 1.0))]) == 2
    assert "LABEL=JSON" in capsys.readouterr().err
    assert tool.main(["--chart", str(tmp_path / "x.png")]) == 2
    assert "needs --builds" in capsys.readouterr().err


def test_padded_rows_keep_the_values_and_start_rows_at_the_multiple():
    t = torch.randn(5, 3, 3865).to(torch.bfloat16)
    padded = tool.padded_rows(t, 8)
    assert padded.shape == t.shape and torch.equal(padded, t)
    assert padded.stride() == (3 * 3872, 3872, 1)
    assert all(s % 8 == 0 for s in padded.stride()[:2])
    mask = torch.rand(2, 1, 17) > 0.5
    assert torch.equal(tool.padded_rows(mask, 8), mask) and tool.padded_rows(mask, 8).stride(0) == 24
