"""Shared test set-up: the device list every test is parametrized over, and the hypothesis profile.

"cpu" always runs. "cuda" runs when a GPU is visible and this build has the CUDA backend; otherwise it is skipped
with the reason, so the same test files serve CPU-only and GPU machines.
"""

import os
from typing import Optional

import pytest
import torch
from hypothesis import HealthCheck, settings

import dmattn_ops
import samples


def cuda_skip_reason() -> Optional[str]:
    """None when the CUDA backend can run here, else why not."""
    if not torch.cuda.is_available():
        return "CUDA not available"
    if "cuda" not in dmattn_ops.build_info()["backends"]:
        return "this build has no CUDA backend"
    return None


_CUDA_SKIP = cuda_skip_reason()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(_CUDA_SKIP is not None, reason=str(_CUDA_SKIP))),
]


@pytest.fixture(params=DEVICES, scope="session")
def device(request) -> str:
    """Every device this build can run on: "cpu", and "cuda" (skipped with a reason where absent)."""
    return request.param


@pytest.fixture(scope="session")
def cuda_device() -> str:
    """For CUDA-only tests: "cuda", or a skip with the reason."""
    if _CUDA_SKIP is not None:
        pytest.skip(_CUDA_SKIP)
    return "cuda"


# Kernel calls have no stable timing (first-call set-up, 2-core CI), so no deadline; each test sets its own
# max_examples to stay within the suite's time budget.
settings.register_profile(
    "dmattn", deadline=None, max_examples=50, print_blob=True, suppress_health_check=[HealthCheck.too_slow]
)
# CI (CI=true) draws the same examples every run, so a red CI is reproducible and never a coin toss; local runs
# keep exploring new ones.
settings.register_profile("dmattn-ci", parent=settings.get_profile("dmattn"), derandomize=True)
settings.load_profile("dmattn-ci" if os.environ.get("CI") else "dmattn")


def pytest_collection_modifyitems(config, items):
    """DMATTN_TEST_SHARD=i/n keeps every n-th collected test from the i-th (tools/pytest_shards.sh runs n such pytest
    processes at once on the GPU machine: the suite's float64 references keep one process on the CPU most of the time),
    counting a test's variants over SAME_SAMPLE_PARAMS as one. Every process collects the same tests in the same
    order, so the n shards split them with none left out."""
    shard = os.environ.get("DMATTN_TEST_SHARD")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"DMATTN_TEST_SHARD: expected i/n with 0 <= i < n, got {shard!r}") from None
    groups = {}  # a test's variants that differ only in SAME_SAMPLE_PARAMS -> one index, in collection order
    mine = [groups.setdefault(_shard_group(item), len(groups)) % count == index for item in items]
    config.hook.pytest_deselected(items=[item for item, keep in zip(items, mine) if not keep])
    items[:] = [item for item, keep in zip(items, mine) if keep]


# Parameters that pick a kernel path for one and the same sample (tests/test_sm90a.py's `arch` fixture and `path`
# parameter, test_backward.py's CUDA `mode`): a shard keeps a test's variants over them together, so one process
# computes their shared references once (samples.shared_reference).
SAME_SAMPLE_PARAMS = frozenset({"arch", "path", "mode"})
_function_of_shared_references = [None]


@pytest.fixture(autouse=True)
def _shared_references_of_one_test_function(request):
    """samples.shared_reference's memo holds the current test function's samples only."""
    if request.node.originalname != _function_of_shared_references[0]:
        _function_of_shared_references[0] = request.node.originalname
        samples.forget_shared_references()


def _shard_group(item):
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (item.nodeid.split("[")[0],) + tuple(
        sorted((name, repr(value)) for name, value in params.items() if name not in SAME_SAMPLE_PARAMS))
