"""dmattn_ops/_kept.py: the small map of tensors kept between calls (a model's layers share one batch's facts)."""

import torch

from dmattn_ops import _kept


def test_the_least_recently_used_entry_goes_first():
    kept = _kept.KeptTensors(2)
    assert kept.put("a", 1) == 1
    kept.put("b", 2)
    assert kept.get("a") == 1  # "a" is now the most recent
    kept.put("c", 3)
    assert kept.get("b") is None and kept.get("a") == 1 and kept.get("c") == 3
    assert len(kept) == 2
    kept.clear()
    assert len(kept) == 0 and kept.get("a") is None


def test_entries_are_kept_apart_by_inference_mode():
    """What was built under torch.inference_mode (an inference tensor, which autograd cannot save) is not handed to a
    call outside it, nor the reverse."""
    kept = _kept.KeptTensors(4)
    with torch.inference_mode():
        kept.put("a", "inference")
        assert kept.get("a") == "inference"
    assert kept.get("a") is None
    kept.put("a", "normal")
    assert kept.get("a") == "normal"
    with torch.inference_mode():
        assert kept.get("a") == "inference"


def test_nothing_is_kept_in_compiled_code():
    @torch.compile(fullgraph=True, backend="eager")
    def inside(x):
        return x + int(_kept.may_keep(x.device))

    torch._dynamo.reset()
    assert _kept.may_keep(torch.device("cpu"))
    assert inside(torch.zeros(1)).item() == 0
