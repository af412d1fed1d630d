"""The sm90a prefill kernel (wgmma + TMA; csrc/cuda/sm90a/) beside the sm80 one: dense calls (no mask, bias, window
edge, key range, softcap or sink; causal or not) run on it on a cc 9.0 device, every other call on the sm80 kernels.
Every shape runs both ways, the sm80 path forced through the documented debug variable DMATTN_ARCH=sm80, each judged
by the float64 reference and the accuracy rule of tests/samples.py. GPU only; on devices other than cc 9.0 (or a
build without the sm90a path) the automatic choice is the sm80 kernel, which test_choice checks."""

import math
import re

import pytest
import torch

import dmattn_ops
from samples import Spec, assert_close_to_reference, make_sample, support_reason

ARCHS = {"auto": {}, "sm80": {"DMATTN_ARCH": "sm80"}}


@pytest.fixture(params=list(ARCHS))
def arch(request, monkeypatch, cuda_device):
    for name, value in ARCHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


def _sm90a_built() -> bool:
    return bool(dmattn_ops.build_info().get("cuda_arch_paths", {}).get("sm90a", {}).get("head_dims"))


def _sm90a_device() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and _sm90a_built()


def _check(spec, dtype, label=""):
    reason = support_reason(spec, dtype, "cuda")
    if reason:
        pytest.skip(reason)
    sample = make_sample(spec, dtype, "cuda")
    out, lse = sample.run()
    assert_close_to_reference((out, lse), sample.reference(), sample.reference(sample.dtype), label=label)
    return sample, (out, lse)


# Dense shapes: query tiles of 128 rows and key tiles of 128 keys cut everywhere, GQA / MQA / MHA, D 64 / 128 (and
# 96, padded to 128), causal with more keys than queries and more queries than keys, empty sequences, rows past the
# last sequence, many short sequences.
SPECS = [
    Spec("one_tile", heads=4, heads_k=2, seqlens_q=(37,), seqlens_k=(53,)),
    Spec("tiles_cut_everywhere", heads=8, heads_k=2, seqlens_q=(129, 300, 1), seqlens_k=(257, 128, 700)),
    Spec("causal_more_keys", heads=8, heads_k=8, seqlens_q=(200, 64), seqlens_k=(1000, 64), is_causal=True),
    Spec("causal_more_queries", heads=4, heads_k=1, seqlens_q=(300, 17), seqlens_k=(130, 3), is_causal=True),
    Spec("causal_long", head_dim=128, heads=8, heads_k=2, seqlens_q=(1500, 513), seqlens_k=(1500, 513),
         is_causal=True),
    Spec("d64", head_dim=64, heads=6, heads_k=3, seqlens_q=(250, 90), seqlens_k=(400, 90), is_causal=True),
    Spec("d96_padded", head_dim=96, heads=4, heads_k=2, seqlens_q=(140,), seqlens_k=(260,)),
    Spec("empty_sequences", heads=4, heads_k=2, seqlens_q=(0, 130, 5, 0), seqlens_k=(20, 0, 140, 0)),
    Spec("rows_past_the_end", heads=4, heads_k=2, seqlens_q=(100, 70), seqlens_k=(150, 90), extra_rows_q=9,
         extra_rows_k=13, slack_q=3, slack_k=5, is_causal=True),
    Spec("many_short", heads=4, heads_k=4, seqlens_q=tuple(range(1, 40)), seqlens_k=tuple(range(40, 1, -1))),
    Spec("scale", heads=4, heads_k=2, seqlens_q=(160,), seqlens_k=(160,), softmax_scale=0.5, is_causal=True),
]
CUDA_DTYPES = (torch.float16, torch.bfloat16)


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_dense_shapes_match_reference_on_each_path(spec, dtype, arch):
    _check(spec, dtype, label=arch)


def _plan_sm90a(capfd):
    return [int(x) for x in re.findall(r"kernel=prefill .*sm90a=(\d)", capfd.readouterr().err)]


@pytest.mark.parametrize(
    "spec, dense",
    [
        (SPECS[2], True),
        (Spec("key_mask", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), mask="key"), False),
        (Spec("window", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), window=(64, 0)), False),
        (Spec("softcap", heads=4, heads_k=2, seqlens_q=(200,), seqlens_k=(300,), softcap=30.0), False),
    ],
    ids=lambda x: x.name if isinstance(x, Spec) else str(x),
)
def test_choice(spec, dense, monkeypatch, capfd, cuda_device):
    """Dense prefill takes the sm90a kernel on a cc 9.0 device with the sm90a path built, and never elsewhere; calls
    with any feature it lacks take the sm80 kernels; DMATTN_ARCH=sm80 forces them."""
    monkeypatch.setenv("DMATTN_LOG_PLAN", "1")
    capfd.readouterr()
    _check(spec, torch.bfloat16)
    torch.cuda.synchronize()
    assert _plan_sm90a(capfd) == [int(dense and _sm90a_device())]
    monkeypatch.setenv("DMATTN_ARCH", "sm80")
    _check(spec, torch.bfloat16)
    torch.cuda.synchronize()
    assert _plan_sm90a(capfd) == [0]


def test_bad_arch_variable_is_a_clear_error(monkeypatch, cuda_device):
    sample = make_sample(SPECS[0], torch.float16, "cuda")
    monkeypatch.setenv("DMATTN_ARCH", "sm100")
    with pytest.raises(ValueError, match="DMATTN_ARCH must be auto or sm80, got 'sm100'"):
        sample.run()


@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nonfinite_v_of_hidden_keys(dtype, arch):
    """Keys a row cannot see never reach it, even with inf / NaN in their V (0 * inf is NaN in the tensor cores): the
    causal diagonal's later keys and the rows past a sequence's end. A visible key's NaN V makes its rows NaN."""
    spec = Spec("nonfinite_v", heads=4, heads_k=2, seqlens_q=(200, 150), seqlens_k=(200, 150), is_causal=True,
                extra_rows_k=7)
    sample = make_sample(spec, dtype, "cuda")
    v = sample.v.clone()
    v[199, 0, 3] = math.inf  # the last key of sequence 0: only its last query (199) sees it
    v[120, 1, 0] = math.nan  # seen by queries 120.. of sequence 0, hidden from 0..119
    v[350:, :, :] = math.nan  # the rows past the last sequence
    out, lse = sample.replace(v=v).run()
    clean, clean_lse = sample.run()
    assert torch.equal(lse, clean_lse)  # lse does not read V
    assert torch.equal(out[:120], clean[:120])  # rows that see neither key: as without them
    assert out[120:199, 1 * 2:2 * 2].isnan().any()  # KV head 1's query heads see the NaN
    assert torch.equal(out[120:199, 0:2], clean[120:199, 0:2])  # KV head 0's do not
    assert not out[199, 0:2].isfinite().all()  # the inf reaches the one row that sees it
    assert torch.equal(out[200:350], clean[200:350])  # sequence 1: untouched by the rows past it
