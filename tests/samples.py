"""Test inputs for dmattn::varlen_fwd and the one accuracy rule the tests judge them by.

- ``Spec``: a recipe for one call (sequence lengths, heads, layouts, edge-case knobs); ``SAMPLES`` is the named list
  that every correctness test and opcheck runs over.
- ``make_sample(spec, dtype, device)``: builds the tensors of a spec (same values on every device for one seed), a
  ``Sample``: the ``PackedBatch`` of tools/packed_batch.py (args, run, reference) with its spec.
- ``assert_close_to_reference``: the accuracy rule (FlashAttention 3's): the kernel's error against the float64
  reference is at most 2x the error of a PyTorch implementation in the same dtype, plus a small atol; NaN never.
  ``assert_devices_agree`` applies the same rule to a CPU and a CUDA result of one sample.
- ``support_reason``: why a device cannot run a sample ("" when it can), from ``dmattn_ops.build_info()``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

import dmattn_ops
from packed_batch import PackedBatch

ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Spec:
    """A recipe for one dmattn::varlen_fwd call. Heads of a mask/bias are named "1", "Hk" or "H"."""

    name: str
    seqlens_q: Tuple[int, ...]
    seqlens_k: Tuple[int, ...]
    heads: int = 4
    heads_k: int = 2
    head_dim: int = 64  # a head dim every CUDA build has
    mask: Optional[str] = None  # None | "key" (total_k, Hm) | "query" (total_q, Hm, max_seqlen_k)
    mask_heads: str = "1"
    keep: float = 0.6  # fraction of True mask entries
    mask_runs: int = 1  # the mask is constant over runs of this many consecutive keys (block-sparse when > 1)
    masked_rows: bool = False  # force some queries (or a whole sequence's keys) to be fully masked
    bias: Optional[str] = None  # None | "key" | "query"
    bias_heads: str = "1"
    bias_dtype: str = "float32"  # "float32" | "q" (q's dtype)
    bias_neg_inf: bool = False  # some bias entries are -inf
    is_causal: bool = False
    extra_rows_q: int = 0  # query rows after cu_seqlens_q[-1] (owned by no sequence)
    extra_rows_k: int = 0  # key rows after cu_seqlens_k[-1]
    slack_q: int = 0  # max_seqlen_q - the longest query sequence
    slack_k: int = 0  # max_seqlen_k - the longest key sequence
    packed_qkv: bool = False  # q, k, v: head slices of one (tokens, H + 2 Hk, D) projection; total_q == total_k
    softmax_scale: Optional[float] = None
    window: Optional[Tuple[int, int]] = None  # window_size (left, right)
    softcap: Optional[float] = None
    sinks: Optional[str] = None  # None | "float32" | "q" (q's dtype): (H,) sink logits
    sinks_neg_inf: bool = False  # the first head's sink is -inf (no sink for that head)
    seqused_k: Optional[Tuple[int, ...]] = None  # keys each sequence uses of its seqlens_k (a padded cache's fill)
    dtypes: Tuple[torch.dtype, ...] = ALL_DTYPES

    @property
    def total_q(self) -> int:
        return sum(self.seqlens_q) + self.extra_rows_q

    @property
    def total_k(self) -> int:
        return sum(self.seqlens_k) + self.extra_rows_k


@dataclass(kw_only=True)
class Sample(PackedBatch):
    """The tensors of one spec's call, on one device."""

    spec: Spec


def _heads(which: str, spec: Spec) -> int:
    return {"1": 1, "Hk": spec.heads_k, "H": spec.heads}[which]


def make_sample(spec: Spec, dtype: torch.dtype, device="cpu", seed: int = 0) -> Sample:
    """Builds the tensors of ``spec``. Values come from a CPU generator seeded by (spec name, seed), so the CPU and
    CUDA samples of one spec hold the same numbers; views (packed qkv) are taken on the target device."""
    if len(spec.seqlens_q) != len(spec.seqlens_k):
        raise ValueError(f"spec {spec.name}: seqlens_q and seqlens_k must have the same length")
    gen = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()) * 1000 + seed)
    H, Hk, D = spec.heads, spec.heads_k, spec.head_dim
    total_q, total_k = spec.total_q, spec.total_k
    max_q = max(spec.seqlens_q, default=0) + spec.slack_q
    max_k = max(spec.seqlens_k, default=0) + spec.slack_k

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    if spec.packed_qkv:
        if total_q != total_k:
            raise ValueError(f"spec {spec.name}: packed_qkv needs total_q == total_k")
        qkv = randn(total_q, H + 2 * Hk, D).to(dtype).to(device)  # one projection, heads [q | k | v]
        q, k, v = qkv[:, :H], qkv[:, H : H + Hk], qkv[:, H + Hk :]
    else:
        q = randn(total_q, H, D).to(dtype).to(device)
        k = randn(total_k, Hk, D).to(dtype).to(device)
        v = randn(total_k, Hk, D).to(dtype).to(device)

    mask = None
    if spec.mask is not None:
        hm = _heads(spec.mask_heads, spec)
        shape = (total_k, hm) if spec.mask == "key" else (total_q, hm, max_k)
        mask = _runs(torch.rand(*_run_shape(shape, spec), generator=gen) < spec.keep, spec, shape)
        if spec.masked_rows:
            _mask_some_rows(spec, mask)
        mask = mask.to(device)

    bias = None
    if spec.bias is not None:
        hm = _heads(spec.bias_heads, spec)
        shape = (total_k, hm) if spec.bias == "key" else (total_q, hm, max_k)
        bias = randn(*shape)
        if spec.bias_neg_inf:
            bias = bias.masked_fill(torch.rand(*shape, generator=gen) < 0.3, -math.inf)
        bias = bias.to(torch.float32 if spec.bias_dtype == "float32" else dtype).to(device)

    sinks = None
    if spec.sinks is not None:
        sinks = randn(H)
        if spec.sinks_neg_inf and H > 0:
            sinks[0] = -math.inf
        sinks = sinks.to(torch.float32 if spec.sinks == "float32" else dtype).to(device)

    return Sample(
        spec=spec, q=q, k=k, v=v,
        cu_seqlens_q=dmattn_ops.cu_seqlens(spec.seqlens_q, device=device),
        cu_seqlens_k=dmattn_ops.cu_seqlens(spec.seqlens_k, device=device),
        max_seqlen_q=max_q, max_seqlen_k=max_k, mask=mask, bias=bias,
        softmax_scale=spec.softmax_scale, is_causal=spec.is_causal, window_size=spec.window, softcap=spec.softcap,
        sinks=sinks,
        seqused_k=None if spec.seqused_k is None else torch.tensor(spec.seqused_k, dtype=torch.int32, device=device),
    )


def _run_shape(shape, spec: Spec):
    """The shape of the per-run draws: the key axis (dim 0 key-side, dim 2 query-side) divided into runs."""
    key_dim = 0 if len(shape) == 2 else 2
    runs = -(-shape[key_dim] // spec.mask_runs)
    return tuple(runs if d == key_dim else n for d, n in enumerate(shape))


def _runs(draws: torch.Tensor, spec: Spec, shape) -> torch.Tensor:
    """Repeats each draw over ``spec.mask_runs`` consecutive keys and trims to ``shape``."""
    key_dim = 0 if len(shape) == 2 else 2
    return draws.repeat_interleave(spec.mask_runs, dim=key_dim).narrow(key_dim, 0, shape[key_dim])


def _mask_some_rows(spec: Spec, mask: torch.Tensor) -> None:
    """Makes some queries see no key: key-side, every key of the first non-empty key sequence (for operand head 0);
    query-side, every third query row (all operand heads)."""
    if mask.dim() == 2:
        cu = dmattn_ops.cu_seqlens(spec.seqlens_k).tolist()
        for b in range(len(spec.seqlens_k)):
            if cu[b + 1] > cu[b]:
                mask[cu[b] : cu[b + 1], 0] = False
                return
    else:
        mask[::3] = False


def noncanonical_mask(mask: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """The same mask with every True stored as a byte in 2..255 (even ones included: a reader that tests bit 0 sees
    False), as a uint8 tensor viewed as bool."""
    gen = torch.Generator().manual_seed(seed)
    cpu = mask.cpu()
    noise = torch.randint(2, 256, cpu.shape, generator=gen, dtype=torch.uint8)
    noise.view(-1)[:4] = torch.tensor([2, 128, 254, 255], dtype=torch.uint8)  # the worst bytes, always present
    return (noise * cpu.to(torch.uint8)).view(torch.bool).to(mask.device)


def support_reason(spec: Spec, dtype: torch.dtype, device: str) -> str:
    """Why this build cannot run ``spec`` in ``dtype`` on ``device``; "" when it can (build_reason)."""
    return build_reason(spec.head_dim, dtype, device)


def build_reason(head_dim: int, dtype: torch.dtype, device: str) -> str:
    """Why this build cannot run head dim ``head_dim`` in ``dtype`` on ``device``; "" when it can. The CPU runs
    everything; the CUDA kernels cover the dtypes in build_info() and every head dim up to the largest one built."""
    if device == "cpu":
        return ""
    info = dmattn_ops.build_info()
    dtype_name = str(dtype).replace("torch.", "")
    if dtype_name not in info["cuda_dtypes"]:
        return f"CUDA kernels are built for {info['cuda_dtypes']}, not {dtype_name}"
    if head_dim > max(info["cuda_head_dims"]):  # smaller head dims run zero-padded to the next built one
        return f"CUDA kernels are built for head dims up to {max(info['cuda_head_dims'])}, not {head_dim}"
    return ""


def padded_reason(head_dim: int) -> str:
    """Why a CUDA test of how this build plans head dim ``head_dim`` does not apply here; "" where it does. A head dim
    with no kernel of its own runs zero-padded to a larger built one (build_reason), and is planned as that one."""
    built = dmattn_ops.build_info().get("cuda_head_dims", ())
    return "" if head_dim in built else (f"CUDA kernels are not built for head dim {head_dim}: it runs zero-padded to "
                                         "a larger built one, and is planned as that one")


# ---------------------------------------------------------------------------------------------------------------
# The accuracy rule.


def _atol(dtype: torch.dtype, magnitude: float) -> float:
    """A few units in the last place of ``dtype`` at ``magnitude`` (at least 1)."""
    return 4 * torch.finfo(dtype).eps * max(1.0, magnitude)


# Reference results computed once for all of a sample's kernel paths (test_sm90a's ARCHS, test_backward's CUDA
# modes) rather than once per path: on the GPU machine the CPU references are most of those tests' time (a D = 256
# sample past the kept-row cap: over 45 s each). tests/conftest.py keeps a test's path variants in one shard and
# empties the memo when the next test function starts, so it holds one function's samples.
_SHARED_REFERENCES: dict = {}


def shared_reference(key, compute):
    """``compute()``, or what it returned for ``key`` earlier in this test function (see _SHARED_REFERENCES)."""
    if key not in _SHARED_REFERENCES:
        _SHARED_REFERENCES[key] = compute()
    return _SHARED_REFERENCES[key]


def forget_shared_references():
    _SHARED_REFERENCES.clear()


def assert_close_to_reference(result, ref64, same_dtype, *, label: str = "") -> None:
    """Judges a kernel's (out, lse) against the float64 reference ``ref64`` = (out, lse).

    ``same_dtype`` is the reference run in the inputs' dtype (``Sample.reference(sample.dtype)``): "a PyTorch
    implementation in the same dtype" (in float32 the worse of two plain forms, PackedBatch.reference). The rule,
    for out and for lse:
        max |kernel - ref64| <= 2 * max |same_dtype - ref64| + atol,
    with atol a few ulps of the output dtype (float32 for lse). On top of it, exactly: no NaN anywhere; where the
    reference sees no key (lse -inf) the kernel's row is 0 and its lse -inf; everywhere else its lse is finite.
    """
    out, lse = (t.detach().cpu() for t in result)
    ref_out, ref_lse = ref64
    pt_out, pt_lse = same_dtype
    where = f" ({label})" if label else ""
    assert out.shape == ref_out.shape and lse.shape == ref_lse.shape, f"shapes differ{where}"
    assert not out.isnan().any(), f"out has NaN{where}"
    assert not lse.isnan().any(), f"lse has NaN{where}"

    empty = ref_lse == -math.inf  # (H, total_q): queries that see no key
    rows = out.permute(1, 0, 2)  # (H, total_q, D)
    assert (lse[empty] == -math.inf).all(), f"lse must be -inf for queries with no visible key{where}"
    assert (rows[empty] == 0).all(), f"out must be 0 for queries with no visible key{where}"
    assert lse[~empty].isfinite().all(), f"lse must be finite for queries that see a key{where}"
    assert out.isfinite().all(), f"out has inf{where}"

    checks = (
        ("out", out.double(), ref_out, pt_out.double(), out.dtype),
        ("lse", lse.double()[~empty], ref_lse[~empty], pt_lse.double()[~empty], torch.float32),
    )
    for name, got, want, base, dtype in checks:
        _within_rule(name, got, want, base, dtype, pt_out.dtype, where)


def _within_rule(name, got, want, base, dtype, base_dtype, where="", atol_scale: float = 1.0) -> None:
    """The accuracy rule on matching float64 tensors: max |got - want| <= 2 * max |base - want| + atol (a few ulps
    of ``dtype``, times atol_scale), where base is the PyTorch implementation in ``base_dtype``. Nothing to judge
    when want is empty."""
    if want.numel() == 0:
        return
    err = (got - want).abs().max().item()
    base_err = (base - want).abs().nan_to_num(math.inf).max().item()
    atol = _atol(dtype, want.abs().max().item()) * atol_scale
    assert err <= 2 * base_err + atol, (
        f"{name}: max error {err:.3g} vs the float64 reference exceeds 2 x {base_err:.3g} (PyTorch in "
        f"{base_dtype}) + atol {atol:.3g}{where}"
    )


def assert_gradients_close(got, want, same_dtype, base_dtype, terms=None) -> None:
    """Judges gradients {name: tensor} against those of the float64 reference (``want``) by the forward's rule, with
    ``same_dtype`` the reference's gradients in ``base_dtype``. On top of it: every gradient finite. Entries where the
    reference's own autograd is not finite (NaN through rows whose scores are all -inf) are not compared.

    The rule's few ulps are those of the coarser of the gradient's dtype and the call's: a float32 bias's gradient
    in a bfloat16 call comes from bfloat16 dO, O and V, so it cannot be closer than bfloat16 allows, however lucky
    the bfloat16 PyTorch run happens to be on a tiny draw (a (3, 1, 6) bias: 6.3e-4 against 2 x 3e-4). ``terms``
    {name: n}: each entry of that gradient sums n contributions (a broadcast base, the query heads sharing a head):
    the few ulps grow by sqrt(n), as rounding does over a sum. A scalar bias broadcast over 75k scores has a
    gradient that cancels to ~0 (the scores of a row sum to zero weight), where any two summation orders differ
    by ~1e-6 in float32."""
    for name, g in got.items():
        assert g.isfinite().all(), f"d{name} has inf / NaN"
        usable = want[name].isfinite()
        ulps = g.dtype if torch.finfo(g.dtype).eps >= torch.finfo(base_dtype).eps else base_dtype
        _within_rule(f"d{name}", g.double()[usable], want[name][usable], same_dtype[name].double()[usable], ulps,
                     base_dtype, atol_scale=math.sqrt((terms or {}).get(name, 1)))


def assert_devices_agree(cpu_result, cuda_result, ref64, same_dtype, *, label: str = "") -> None:
    """The CPU and CUDA results of one sample see the same keys (identical 0 / -inf rows) and differ by no more
    than the rule allows the two together: |cuda - cpu| <= 2 * |same_dtype - ref64| + |cpu - ref64| + atol."""
    (out_c, lse_c), (out_g, lse_g) = ((t.detach().cpu() for t in r) for r in (cpu_result, cuda_result))
    where = f" ({label})" if label else ""
    assert torch.equal(lse_c == -math.inf, lse_g == -math.inf), f"CPU and CUDA disagree on which rows see a key{where}"
    for name, a, b, ref, pt, dtype in (
        ("out", out_c, out_g, ref64[0], same_dtype[0], out_c.dtype),
        ("lse", lse_c, lse_g, ref64[1], same_dtype[1], torch.float32),
    ):
        seen = ref.isfinite()
        if not seen.any():
            continue
        a, b, ref, pt = a.double()[seen], b.double()[seen], ref[seen], pt.double()[seen]
        allowed = (2 * (pt - ref).abs().max() + (a - ref).abs().max()).item() + _atol(dtype, ref.abs().max().item())
        diff = (a - b).abs().max().item()
        assert diff <= allowed, f"{name}: CPU and CUDA differ by {diff:.3g}, more than {allowed:.3g}{where}"


# ---------------------------------------------------------------------------------------------------------------
# The named samples.


def _samples() -> Tuple[Spec, ...]:
    mixed = dict(seqlens_q=(5, 3, 8), seqlens_k=(7, 4, 9))
    specs = [
        Spec("dense_mha", heads=4, heads_k=4, **mixed),
        Spec("dense_gqa", **mixed),
        Spec("dense_mqa", heads=4, heads_k=1, **mixed),
    ]
    # Every layout and head broadcast, for mask and bias alone.
    for operand in ("mask", "bias"):
        for layout in ("key", "query"):
            for hm in ("1", "Hk", "H"):
                specs.append(Spec(f"{layout}_{operand}_{hm}", **mixed, **{operand: layout, f"{operand}_heads": hm}))
    specs += [
        Spec("key_bias_in_q_dtype", bias="key", bias_heads="H", bias_dtype="q", **mixed),
        Spec("query_bias_in_q_dtype", bias="query", bias_heads="Hk", bias_dtype="q", **mixed),
        # Mixed layouts in one call.
        Spec("key_mask_query_bias", mask="key", mask_heads="Hk", bias="query", bias_heads="H", **mixed),
        Spec("query_mask_key_bias", mask="query", mask_heads="H", bias="key", bias_heads="1", **mixed),
        Spec("key_mask_key_bias_mqa", heads=4, heads_k=1, mask="key", mask_heads="H", bias="key", bias_heads="Hk",
             **mixed),
        Spec("query_mask_query_bias", heads=6, heads_k=3, mask="query", mask_heads="Hk", bias="query",
             bias_heads="1", **mixed),
        # Causal, bottom-right aligned.
        Spec("causal_lq_lt_lk", seqlens_q=(3, 1, 6), seqlens_k=(7, 5, 9), is_causal=True, mask="key", bias="key",
             bias_heads="Hk"),
        Spec("causal_lq_eq_lk", seqlens_q=(6, 2, 9), seqlens_k=(6, 2, 9), is_causal=True, mask="query",
             mask_heads="H"),
        Spec("causal_lq_gt_lk", seqlens_q=(7, 5, 4), seqlens_k=(3, 2, 4), is_causal=True, bias="query"),
        Spec("causal_mqa_mixed", heads=4, heads_k=1, seqlens_q=(2, 9, 4), seqlens_k=(8, 4, 4), is_causal=True,
             mask="query", mask_heads="1", bias="key", bias_heads="H"),
        # Empty sequences on either side, no queries, no keys, no sequences.
        Spec("empty_sequences", seqlens_q=(0, 4, 3, 0, 2), seqlens_k=(5, 0, 3, 0, 4), mask="key", bias="query"),
        Spec("empty_sequences_causal", seqlens_q=(0, 4, 3, 5), seqlens_k=(3, 0, 3, 2), is_causal=True,
             mask="query", bias="key"),
        Spec("no_queries", seqlens_q=(0, 0), seqlens_k=(3, 4), mask="key", bias="key"),
        Spec("no_keys", seqlens_q=(3, 2), seqlens_k=(0, 0), mask="query", bias="key"),
        Spec("no_sequences", seqlens_q=(), seqlens_k=(), extra_rows_q=3, extra_rows_k=2, mask="key"),
        # Fully masked rows, -inf bias.
        Spec("masked_rows_key_side", mask="key", mask_heads="H", masked_rows=True, **mixed),
        Spec("masked_rows_query_side", mask="query", mask_heads="Hk", masked_rows=True, bias="key", **mixed),
        Spec("mask_all_false", mask="key", keep=0.0, **mixed),
        Spec("bias_neg_inf", bias="query", bias_heads="H", bias_neg_inf=True, mask="key", **mixed),
        # max_seqlen above the real lengths, rows after cu_seqlens[-1].
        Spec("max_seqlen_slack", slack_q=4, slack_k=6, mask="query", bias="query", bias_heads="H", **mixed),
        Spec("trailing_rows", extra_rows_q=3, extra_rows_k=4, mask="query", bias="key", is_causal=True, **mixed),
        # Strided views of a packed projection, self-attention.
        Spec("packed_qkv", seqlens_q=(6, 1, 9), seqlens_k=(6, 1, 9), packed_qkv=True, mask="key", bias="key"),
        Spec("packed_qkv_causal_mqa", heads=4, heads_k=1, seqlens_q=(5, 7), seqlens_k=(5, 7), packed_qkv=True,
             is_causal=True, mask="query", bias="query"),
        # Sequences spanning several CPU blocks and CUDA tiles; block-sparse masks (runs of masked keys that do not
        # line up with tiles) for tile skipping; decode with long key sides; an explicit softmax scale.
        Spec("long_sequences", seqlens_q=(150, 37, 70), seqlens_k=(200, 41, 300), mask="query", mask_heads="Hk",
             bias="key", is_causal=True),
        Spec("block_sparse_key_mask", seqlens_q=(130, 5), seqlens_k=(520, 300), mask="key", mask_heads="Hk",
             mask_runs=100, keep=0.5, bias="key", bias_heads="H"),
        Spec("block_sparse_query_mask_causal", seqlens_q=(200,), seqlens_k=(260,), mask="query", mask_heads="H",
             mask_runs=70, keep=0.5, is_causal=True, bias="query"),
        Spec("decode_key_side", heads=8, heads_k=2, seqlens_q=(1, 4, 8), seqlens_k=(700, 1000, 300), mask="key",
             mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk"),
        Spec("softmax_scale", softmax_scale=0.37, mask="key", bias="key", **mixed),
        # Odd and common head dims.
        Spec("head_dim_1", head_dim=1, mask="key", bias="query", **mixed),
        Spec("head_dim_5", head_dim=5, mask="query", bias="key", is_causal=True, **mixed),
        Spec("head_dim_16", head_dim=16, mask="key", mask_heads="Hk", bias="key", is_causal=True, **mixed),
        Spec("head_dim_32", head_dim=32, mask="query", mask_heads="H", bias="key", **mixed),
        Spec("head_dim_80", head_dim=80, mask="query", bias="query", bias_heads="Hk", **mixed),
        Spec("head_dim_96", head_dim=96, mask="key", bias="query", is_causal=True, **mixed),
        Spec("head_dim_256", head_dim=256, seqlens_q=(3, 70), seqlens_k=(90, 70), mask="key", bias="key",
             is_causal=True),
        Spec("head_dim_128_causal", head_dim=128, seqlens_q=(3, 18), seqlens_k=(20, 18), is_causal=True,
             mask="key", bias="key", bias_heads="H"),
    ]
    # Sliding windows (FlashAttention's window_size), softcap and sinks, alone and together, across tiles and on
    # decode shapes (the CUDA decode kernel's splits and their combine).
    long = dict(seqlens_q=(150, 37, 70), seqlens_k=(200, 41, 300))
    decode = dict(heads=8, heads_k=2, seqlens_q=(1, 4, 8), seqlens_k=(700, 1000, 300))
    specs += [
        Spec("window_left", window=(3, -1), mask="key", bias="key", **mixed),
        Spec("window_right", window=(-1, 2), mask="query", bias="key", bias_heads="Hk", **mixed),
        Spec("window_both", window=(2, 1), bias="query", **mixed),
        Spec("window_zero", window=(0, 0), mask="key", **mixed),
        Spec("window_causal_lq_gt_lk", seqlens_q=(7, 5, 4), seqlens_k=(3, 2, 4), window=(1, 3), is_causal=True,
             bias="key"),
        Spec("window_empty_sequences", seqlens_q=(0, 4, 3, 5), seqlens_k=(3, 0, 3, 2), window=(1, 0), mask="query"),
        Spec("window_long_causal", window=(50, -1), is_causal=True, mask="key", mask_heads="Hk", bias="key", **long),
        Spec("window_long_query_mask", window=(40, 30), mask="query", mask_heads="H", bias="query", **long),
        Spec("window_decode", window=(128, -1), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key",
             bias_heads="Hk", **decode),
        Spec("window_decode_no_mask", window=(200, 0), **decode),
        Spec("softcap", softcap=2.0, bias="key", **mixed),
        Spec("softcap_long_causal", softcap=1.5, is_causal=True, mask="query", mask_heads="Hk", **long),
        Spec("softcap_decode", softcap=3.0, mask="key", mask_heads="Hk", bias="key", bias_heads="Hk", **decode),
        Spec("sinks", sinks="float32", mask="key", bias="key", **mixed),
        Spec("sinks_q_dtype_masked_rows", sinks="q", sinks_neg_inf=True, mask="key", mask_heads="H",
             masked_rows=True, **mixed),
        Spec("sinks_empty_sequences", seqlens_q=(0, 4, 3, 0, 2), seqlens_k=(5, 0, 3, 0, 4), sinks="float32",
             mask="query", extra_rows_q=2),
        Spec("sinks_long_causal", sinks="float32", is_causal=True, bias="key", **long),
        Spec("sinks_decode", sinks="float32", mask="key", mask_heads="Hk", keep=0.25, bias="key", bias_heads="Hk",
             **decode),
        Spec("window_softcap_sinks", window=(16, -1), is_causal=True, softcap=4.0, sinks="q", mask="key",
             bias="key", bias_heads="H", **long),
        Spec("window_softcap_sinks_decode", window=(256, -1), is_causal=True, softcap=5.0, sinks="float32",
             mask="key", mask_heads="Hk", bias="key", **decode),
        # A padded cache: every sequence owns max_len key rows and uses the first seqused_k of them (the rest hold
        # whatever the cache holds), causal and windowed alignment to the used keys, mask and bias per cache slot.
        Spec("seqused_k", seqlens_q=(3, 1, 5, 0), seqlens_k=(40, 40, 40, 40), seqused_k=(17, 40, 0, 9), mask="key",
             bias="key", bias_heads="Hk"),
        Spec("seqused_k_causal_decode", heads=8, heads_k=2, seqlens_q=(1, 4, 8), seqlens_k=(900, 900, 900),
             seqused_k=(700, 9, 333), is_causal=True, mask="key", mask_heads="Hk", keep=0.5, bias="key"),
        Spec("seqused_k_window_long", seqlens_q=(150, 37), seqlens_k=(300, 300), seqused_k=(200, 41),
             window=(50, -1), is_causal=True, bias="query"),
    ]
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "sample names must be unique"
    return tuple(specs)


SAMPLES = _samples()
