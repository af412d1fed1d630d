"""tools/bench_transformers.py on the CPU, tiny: the decode step of each implementation asked for runs and is reported
beside sdpa's logits, the via-API row (the backend with each op call made through varlen_attention) included."""

import json

import pytest

pytest.importorskip("transformers")

import dmattn_ops  # noqa: E402
import bench_transformers as tool  # noqa: E402  (tools/ is on pytest's pythonpath, pytest.ini)


@pytest.mark.parametrize("implementations", [["dmattn", "sdpa"], [tool.VIA_API, "sdpa"]])
def test_the_straight_and_the_via_api_rows_run_and_agree(implementations, tmp_path, monkeypatch):
    """Each row's step matches sdpa's logits; only the via-API row calls varlen_attention (the bench's steps run
    without gradients, where the backend calls the op straight)."""
    through_api = []
    original = dmattn_ops.varlen_attention
    monkeypatch.setattr(dmattn_ops, "varlen_attention", lambda *a, **k: through_api.append(1) or original(*a, **k))
    assert tool.main(["--device", "cpu", "--tiny", "--batch", "1", "--unpadded", "--reps", "2", "--function-time", "2",
                      "--implementations", *implementations, "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "transformers_decode_step_unpadded_b1.json").read_text())["results"]
    assert [r["implementation"] for r in rows] == implementations
    ours = rows[0]
    assert ours["status"] == "ok" and ours["max_abs_logit_diff_vs_sdpa"] < 1e-4
    assert ours["attention_function"]["calls_per_step"] == 2  # the tiny Llama's two layers
    assert (len(through_api) > 0) == (implementations[0] == tool.VIA_API)


def test_the_sparse_attention_model_steps_each_implementation(tmp_path):
    """--model deepseek_v32 (tiny): one prefill shared by the rows, each row's step matches sdpa's logits, and eager's
    attention function is timed too (the model calls it outside transformers' interface)."""
    assert tool.main(["--model", "deepseek_v32", "--device", "cpu", "--tiny", "--reps", "2", "--function-time", "2",
                      "--implementations", "dmattn", "sdpa", "eager", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "transformers_decode_step_deepseek_v32.json").read_text())
    assert payload["model"] == "deepseek_v32" and payload["config"]["index_topk"] == 64
    rows = payload["results"]
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["max_abs_logit_diff_vs_sdpa"] < 1e-4 and r["attention_function"]["calls_per_step"] == 2 for r in rows)


def test_the_architecture_sweep_reports_each_architecture(tmp_path):
    """tools/sweep_transformers_models.py on two architectures: each row says it ran, with the logit difference and
    the greedy tokens' verdict (Llama: within 1e-4, the same tokens), or what failed."""
    import sweep_transformers_models as sweep

    out = tmp_path / "sweep.json"
    assert sweep.main(["llama", "no_such_architecture", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results["llama"]["status"] == "ran" and results["llama"]["max_abs_logit_diff"] <= 1e-4
    assert results["llama"]["same_greedy_tokens"]
    assert results["no_such_architecture"]["status"].startswith("failed: ")
