"""``PackedBatch``: the arguments of one ``dmattn.varlen_fwd`` call over a packed varlen batch, and its shape facts.

The one batch type of the tests (``tests/samples.py``'s ``Sample``, ``tests/mod_registry.py``'s ``Batch``, the fuzz
calls) and of the tools (``bench_cpu.py``, ``bench_gpu.py``, ``demo.py``); each keeps its own builders.

It lives in ``tools/``, not in the ``dmattn_ops`` package: ``bench_gpu.py`` must start and time its peers where
``dmattn_ops`` does not import (an unbuilt extension), and ``tools/run_gpu.sh``'s compare stage runs this tree's
tools against an earlier build's package (``PYTHONPATH=.prev``), which has no such module. So only the methods that
call the op import ``dmattn_ops``. The tools import this file as a sibling of their script; the tests find it
through ``pythonpath = tools`` in ``pytest.ini``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch


@dataclass(kw_only=True)
class PackedBatch:
    """One call's inputs: packed q/k/v, the sequence bounds, and the optional mask, bias, scale and causal flag."""

    q: torch.Tensor  # (total_q, H, D)
    k: torch.Tensor  # (total_k, Hk, D)
    v: torch.Tensor  # (total_k, Hk, D)
    cu_seqlens_q: torch.Tensor  # (B + 1,) int32
    cu_seqlens_k: torch.Tensor  # (B + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int
    mask: Optional[torch.Tensor] = None  # bool, key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k)
    bias: Optional[torch.Tensor] = None  # float32 or q's dtype, the same two layouts
    softmax_scale: Optional[float] = None
    is_causal: bool = False
    window_size: Optional[Tuple[int, int]] = None  # (left, right); None: no window
    softcap: Optional[float] = None
    sinks: Optional[torch.Tensor] = None  # (H,) float32 or q's dtype
    seqused_k: Optional[torch.Tensor] = None  # (B,) int32: keys each sequence uses of its cu_seqlens_k range
    kv_slots: Optional[torch.Tensor] = None  # (total_k,) int32: k / v / key-side operands are a pool, row r at slot
    key_range: Optional[torch.Tensor] = None  # (total_q, 2) int32: query row r sees key positions [begin, end)

    # Shape facts.

    @property
    def batch_size(self) -> int:  # B
        return self.cu_seqlens_q.shape[0] - 1

    @property
    def total_q(self) -> int:
        return self.q.shape[0]

    @property
    def total_k(self) -> int:
        return self.k.shape[0]

    @property
    def heads(self) -> int:  # H
        return self.q.shape[1]

    @property
    def heads_k(self) -> int:  # Hk
        return self.k.shape[1]

    @property
    def head_dim(self) -> int:  # D
        return self.q.shape[2]

    @property
    def mask_heads(self) -> int:
        """Hm of the mask; 1 without one."""
        return self.mask.shape[1] if self.mask is not None else 1

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def seqlens_q(self) -> List[int]:
        """The query count of every sequence, read from cu_seqlens_q (a host copy)."""
        return self.cu_seqlens_q.diff().tolist()

    @property
    def seqlens_k(self) -> List[int]:
        """The key count of every sequence, read from cu_seqlens_k (a host copy)."""
        return self.cu_seqlens_k.diff().tolist()

    # Calls.

    def args(self) -> tuple:
        """Positional arguments of torch.ops.dmattn.varlen_fwd, in schema order. The window, softcap and sinks come
        only when set, so a batch without them also calls a build from before they existed (the compare stage of
        tools/run_gpu.sh)."""
        base = (
            self.q, self.k, self.v, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k,
            self.mask, self.bias, self.softmax_scale, self.is_causal,
        )
        if not self._newer_options():
            return base
        left, right = self.window_size if self.window_size is not None else (-1, -1)
        if self.key_range is not None:
            return (*base, left, right, self.softcap, self.sinks, self.seqused_k, self.kv_slots, self.key_range)
        if self.kv_slots is not None:
            return (*base, left, right, self.softcap, self.sinks, self.seqused_k, self.kv_slots)
        return (*base, left, right, self.softcap, self.sinks, self.seqused_k)

    def _newer_options(self) -> dict:
        """The keywords of varlen_attention that are set beyond mask, bias, scale and causal."""
        named = {"window_size": self.window_size, "softcap": self.softcap, "sinks": self.sinks,
                 "seqused_k": self.seqused_k, "kv_slots": self.kv_slots, "key_range": self.key_range}
        return {name: value for name, value in named.items() if value is not None}

    def run(self, **options) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of dmattn_ops.varlen_attention; ``options``: its other keywords (mask_mod, score_mod)."""
        import dmattn_ops

        return self._call(dmattn_ops.varlen_attention, return_lse=True, **options)

    def reference(self, dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, lse) of dmattn_ops.reference, computed in ``dtype`` on CPU copies, on one thread (a float64 reference
        of more than 2^36 score-dimension products keeps torch's threads: MANY_PRODUCTS).

        In float32 (the tests' "PyTorch implementation in the same dtype") the reference is run in two plain forms:
        the scale applied to q . k, as the reference writes it, and folded into q first, as kernels do. Element by
        element the one farther from the float64 answer is returned, so that the tests' accuracy rule is not set by
        the luckier rounding of one form: on the same inputs the two forms' errors differed by up to 5x (a fuzz draw
        with scores near 15: 2.5e-7 against 1.4e-6, the latter the CPU kernel's exactly)."""
        from dmattn_ops.reference import reference_varlen_attention

        many = dtype == torch.float64 and self.score_products() > MANY_PRODUCTS
        with contextlib.nullcontext() if many else one_thread():
            cpu = self.to("cpu")
            plain = cpu._call(reference_varlen_attention, dtype=dtype)
            if dtype != torch.float32:
                return plain
            scale = self.softmax_scale if self.softmax_scale is not None else self.q.shape[-1] ** -0.5
            folded = cpu.replace(q=cpu.q.to(torch.float32) * scale, softmax_scale=1.0)._call(
                reference_varlen_attention, dtype=dtype)
            exact = cpu._call(reference_varlen_attention, dtype=torch.float64)
            return tuple(_farther(a, b, want) for a, b, want in zip(plain, folded, exact))

    def score_products(self) -> int:
        """q . k products the reference computes: sum over sequences of Lq x Lk, times heads and head dim."""
        pairs = sum(lq * lk for lq, lk in zip(self.seqlens_q, self.seqlens_k))
        return pairs * self.q.shape[1] * self.q.shape[2]

    def _call(self, fn: Callable, **extra):
        """``fn`` in the signature varlen_attention and the reference share: the sequence arguments by position,
        the rest by keyword."""
        return fn(
            self.q, self.k, self.v, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k,
            mask=self.mask, bias=self.bias, softmax_scale=self.softmax_scale, is_causal=self.is_causal,
            **self._newer_options(), **extra,
        )

    # Copies.

    def replace(self, **changes):
        """A copy with some fields changed (of the same class)."""
        return dataclasses.replace(self, **changes)

    def to(self, device):
        """A copy with every tensor field on ``device`` (values and dtypes unchanged)."""
        fields = ((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))
        return self.replace(**{name: t.to(device) for name, t in fields if isinstance(t, torch.Tensor)})


# Above this many products a float64 reference keeps torch's threads: its few large operations split well, and the
# split moves only its last bits, far below any tolerance (test_sm90a's D = 256 sample past the kept-row cap, 1.4e11
# products: 84 s on one thread, 47 s on two).
MANY_PRODUCTS = 2**36


@contextlib.contextmanager
def one_thread():
    """The reference runs hundreds of tiny ops; on a busy 2-core machine each intra-op thread hand-off costs more
    than the op (20x slower in total), so it runs on one thread. The kernels under test keep every thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def capture_cuda_graph(run: Callable):
    """Runs ``run`` once on a side stream (lazy initialisation and allocator pools outside the capture), then captures
    it in a CUDA graph; returns (graph, what the captured call returned, whose buffers every replay rewrites)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = run()
    return graph, outputs


def _farther(a: torch.Tensor, b: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Element by element, whichever of a and b lies farther from want (a where neither distance is a number, as
    for two equal infinities)."""
    da = (a.double() - want).abs().nan_to_num(nan=0.0)
    db = (b.double() - want).abs().nan_to_num(nan=0.0)
    return torch.where(db > da, b, a)
