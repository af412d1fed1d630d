"""torch.library.opcheck on dmattn::varlen_fwd for every named sample, on every device.

opcheck runs the op through its schema checks (no input is mutated or aliased), the fake impl (shapes, strides and
dtypes agree with the real kernel), the autograd registration, and AOT dispatch with dynamic shapes. One dtype per
sample and device keeps the suite quick: the checks concern registration, not numerics (test_varlen_fwd.py covers
every dtype).
"""

import pytest
import torch

from samples import SAMPLES, make_sample, support_reason


def _dtype_for(spec, device):
    """The first of the sample's dtypes that ``device`` runs, or None."""
    return next((d for d in spec.dtypes if not support_reason(spec, d, device)), None)


@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_opcheck(spec, device):
    dtype = _dtype_for(spec, device)
    if dtype is None:
        pytest.skip(support_reason(spec, spec.dtypes[0], device))
    sample = make_sample(spec, dtype, device)
    torch.library.opcheck(torch.ops.dmattn.varlen_fwd.default, sample.args())


@pytest.mark.parametrize("spec", SAMPLES, ids=lambda s: s.name)
def test_opcheck_with_gradients(spec):
    """The same checks with q, k, v, the bias and the sinks requiring grad (CPU: the backward's only kernel so far): the
    autograd registration, and AOT dispatch with dynamic shapes through the backward (dmattn::varlen_bwd, its fake
    and its kernel) against eager."""
    sample = make_sample(spec, torch.float32, "cpu")
    leaves = {name: getattr(sample, name).detach().clone().requires_grad_() for name in ("q", "k", "v")}
    for name in ("bias", "sinks"):
        if getattr(sample, name) is not None:
            leaves[name] = getattr(sample, name).detach().clone().requires_grad_()
    torch.library.opcheck(torch.ops.dmattn.varlen_fwd.default, sample.replace(**leaves).args())
