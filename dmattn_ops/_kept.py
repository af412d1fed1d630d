"""Small device tensors kept between calls: each layer of a model calls the op with the same batch, so what is built
from the batch (cu_seqlens, a key_range) is built by the first layer and reused by the others.

``may_keep`` says whether anything may be kept at all, ``KeptTensors`` is where it is kept: a least-recently-used
map that threads may share (a lookup that loses a race with an eviction returns what it found; CPython's GIL makes
that race rare, a free-threaded build need not). Its entries are kept apart by ``torch.is_inference_mode_enabled()``
at the time of the call: a tensor made under ``torch.inference_mode`` (a generation) cannot be saved for a backward
(the op's autograd saves its inputs), so a training step must not be handed one. (Whoever keeps a tensor elsewhere
keys it the same way.)
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable, Optional

import torch


def may_keep(device: torch.device) -> bool:
    """Not in compiled code (its graph holds the ops, not the values), nor under CUDA graph capture (a tensor made
    there must not outlive the capture's pool)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


class KeptTensors:
    """At most ``entries`` values, the least recently used dropped first; a key put under torch.inference_mode is
    found only under it, and one put outside only outside."""

    def __init__(self, entries: int):
        self._entries = entries
        self._map: "OrderedDict[Hashable, Any]" = OrderedDict()

    def get(self, key: Hashable) -> Optional[Any]:
        key = (key, torch.is_inference_mode_enabled())
        found = self._map.get(key)
        if found is not None:
            try:
                self._map.move_to_end(key)
            except KeyError:  # another thread dropped it meanwhile: the value found is still right
                pass
        return found

    def put(self, key: Hashable, value: Any) -> Any:
        self._map[(key, torch.is_inference_mode_enabled())] = value
        while len(self._map) > self._entries:
            try:
                self._map.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
        return value

    def clear(self) -> None:
        self._map.clear()

    def __len__(self) -> int:
        return len(self._map)
