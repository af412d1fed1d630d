"""Memory a call allocates but does not initialize never reaches its results.

The backends allocate out, lse, the forward's workspace (kept-key lists, gathered rows, block maps, split partials,
tickets, unit counters) and the backward's scratch (delta, the row statistics' padded copy, dq where a conversion pass
writes it, the kept-key lists, the CTA order) with at::empty: no result may depend on an element no kernel wrote.
The debug variable DMATTN_FILL_UNINITIALIZED fills each such buffer first, every byte alike: `nan` with 0xFF (NaN in
every float format, -1 in every integer), `large` with 0x7F (3.4e38 in float32 and bfloat16, 2.1e9 in int32), which
a max or a comparison would not drop as it drops a NaN. Each call here runs plain and under each fill and must give
the same bits (dq, summed by reduce-adds in a varying order on the sm90a backward, to a float32 rounding). A kernel
whose result depends on an element it did not write (the padding past a head's last row in the row statistics, a
split that never merged, a list entry past its count) gives other bits under a fill. (Checked by a mutation: with the
CPU kernel's write of the rows no sequence owns taken out, the CPU forward tests of the three samples with such rows
fail.)

The CPU half runs in CI; the CUDA half on a GPU (tools/run_gpu.sh), over every forward path the plan has (the decode
kernel with a split per tile, the sm80 prefill kernels, the sm90a grids) and both fused backwards.
"""

import pytest
import torch

from samples import SAMPLES, make_sample
from test_backward import SM90A_BACKWARD_SPECS, SM90A_ROW_STATS_SPECS, _assert_same_work, _gradients, _op
from test_decode_kernel import KERNELS
from test_sm90a import (ARCHS, DYNAMIC_MASKED_SPECS, QUERY_BIAS_SPECS, QUERY_SPECS, SLOT_D256_SPECS, SLOT_SPECS,
                        _bits, _cuda_sample)

FILL = "DMATTN_FILL_UNINITIALIZED"


FILLS = ("nan", "large")


def _both_ways(monkeypatch, run, fill):
    """run() without a fill, then under `fill`: (plain, filled)."""
    monkeypatch.setenv(FILL, "off")
    plain = run()
    monkeypatch.setenv(FILL, fill)
    filled = run()
    monkeypatch.delenv(FILL)
    return plain, filled


def _assert_same_bits(filled, plain, what):
    differ = _bits(filled) != _bits(plain)
    assert not differ.any(), (f"{what} differs under the fill: {int(differ.sum())} of "
                              f"{differ.numel()} elements, {int((differ & torch.isnan(filled)).sum())} of them NaN")


def _assert_same_forward(sample, monkeypatch, fill, label=""):
    (out, lse), (out_f, lse_f) = _both_ways(monkeypatch, sample.run, fill)
    _assert_same_bits(out_f, out, f"{label}: out")
    _assert_same_bits(lse_f, lse, f"{label}: lse")


def test_fill_variable_is_checked(monkeypatch):
    """A misspelt value is a ValueError naming the variable and its choices, raised by the call that reads it."""
    sample = make_sample(SAMPLES[0], torch.float32, "cpu")
    monkeypatch.setenv(FILL, "yes")
    with pytest.raises(ValueError, match=f"{FILL} must be off, nan or large, got 'yes'"):
        sample.run()


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_cpu_forward_ignores_uninitialized_memory(spec, fill, monkeypatch):
    _assert_same_forward(make_sample(spec, torch.float32, "cpu"), monkeypatch, fill, spec.name)


CPU_BACKWARD_SPECS = [s for s in SAMPLES if s.name in (
    "empty_sequences", "no_sequences", "trailing_rows", "masked_rows_key_side", "sinks_empty_sequences",
    "decode_key_side", "window_long_causal")]


@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("spec", CPU_BACKWARD_SPECS, ids=lambda s: s.name)
def test_cpu_backward_ignores_uninitialized_memory(spec, fill, monkeypatch):
    sample = make_sample(spec, torch.float32, "cpu")
    plain, filled = _both_ways(monkeypatch, lambda: _gradients(sample, _op), fill)
    assert plain.keys() == filled.keys()
    for name, want in plain.items():
        _assert_same_bits(filled[name], want, f"d{name}")


# The CUDA forward paths, as test_sm90a and test_decode_kernel force them: the plan's choice; the decode kernel
# wherever it can run with a split per 64-key tile (so the split merge runs on every sample of more than 64 keys); the
# sm80 kernels; the sm90a kernel on static grids of 3 CTAs (each walks many units, empty ones included).
PATHS = {"auto": ARCHS["auto"], "decode_split_every_tile": KERNELS["decode_split_every_tile"], "sm80": ARCHS["sm80"],
         "persistent3": ARCHS["persistent3"]}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch, cuda_device):
    for name, value in PATHS[request.param].items():
        monkeypatch.setenv(name, value)
    return request.param


@pytest.mark.cuda
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_cuda_forward_ignores_uninitialized_memory(spec, fill, path, monkeypatch):
    _assert_same_forward(_cuda_sample(spec, torch.bfloat16), monkeypatch, fill, f"{spec.name} ({path})")


# The sm90a kernel's own operand layouts: kept rows gathered into slots (D 64 / 128 / 256), query-side masks over their
# block map, query-side biases staged per tile, and the dynamic scheduler over masks and windows (its unit counters
# live in the workspace).
def _by_name(*specs):
    """The specs, each name once (the lists share some)."""
    return list({s.name: s for s in specs}.values())


SM90A_SPECS = _by_name(*SLOT_SPECS, *SLOT_D256_SPECS, *QUERY_SPECS, *(s for s, _ in QUERY_BIAS_SPECS),
                       *DYNAMIC_MASKED_SPECS)


@pytest.mark.cuda
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("spec", SM90A_SPECS, ids=lambda s: s.name)
def test_cuda_sm90a_layouts_ignore_uninitialized_memory(spec, fill, monkeypatch, cuda_device):
    _assert_same_forward(_cuda_sample(spec, torch.bfloat16), monkeypatch, fill, spec.name)


@pytest.mark.cuda
@pytest.mark.parametrize("fill", FILLS)
@pytest.mark.parametrize("dq", ["auto", "ordered"])
@pytest.mark.parametrize("spec", _by_name(*SM90A_BACKWARD_SPECS, *SM90A_ROW_STATS_SPECS), ids=lambda s: s.name)
def test_cuda_backward_ignores_uninitialized_memory(spec, dq, fill, monkeypatch, cuda_device):
    """Both fused backwards (`auto`: the sm90a one on a cc 9.0 device, with its bulk-copied row statistics, whose
    padding no row may read; `ordered`: the sm80 pair): dk, dv and the bias gradient bit for bit, dq to a rounding."""
    monkeypatch.setenv("DMATTN_BWD_DQ", dq)
    sample = _cuda_sample(spec, torch.bfloat16)
    plain, filled = _both_ways(monkeypatch, lambda: _gradients(sample, _op), fill)
    for name, grad in filled.items():
        assert not torch.isnan(grad).any(), f"d{name}: NaN under the {fill} fill"
    _assert_same_work(filled, plain)
