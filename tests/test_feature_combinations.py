"""Every per-call feature of dmattn::varlen_fwd drawn together, judged by the accuracy rule.

The other tests take the features one or two at a time (test_key_range, test_sm90a_layouts, test_fuzz's layouts and
values, the named samples); a kernel path that mishandles a pair nobody wrote down would pass them all. Hypothesis
draws one call of many sequences' lengths (empty ones, and now and then sequences past one CUDA tile), GQA / MQA /
MHA, causal, a sliding window (either side open), a softcap, learned sinks, seqused_k, key_range, keys in a pool
(kv_slots, with NaN in the slots no call may read), a mask and a bias in either layout with any head broadcast and
either bias dtype, -inf biases and fully masked rows; on CUDA it also draws the kernel (DMATTN_KERNEL=decode /
prefill / the plan's) and the arch (DMATTN_ARCH=sm80 / the plan's). The oracle is the float64 reference of the
contract and samples.assert_close_to_reference (at most 2x a PyTorch implementation's error in the same dtype; a
query that sees no key gives 0 and lse -inf; NaN never).

While writing it, 2,500 seeded calls of every feature but kv_slots on the CPU found no disagreement with the
reference (a script outside the suite), and the drawn test then ran ~1,500 draws with kv_slots too.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from samples import Spec, assert_close_to_reference, make_sample, support_reason

LENGTHS = st.one_of(st.integers(0, 9), st.sampled_from([70, 140]))


@st.composite
def calls(draw, device: str):
    """(Spec, dtype, key_range rows or None, {env var: value}) of one call."""
    batch = draw(st.integers(1, 3))
    seqlens_q = tuple(draw(st.lists(LENGTHS, min_size=batch, max_size=batch)))
    seqlens_k = tuple(draw(st.lists(LENGTHS, min_size=batch, max_size=batch)))
    heads_k = draw(st.sampled_from([1, 2]))
    heads = heads_k * draw(st.sampled_from([1, 2, 3]))
    mask, bias = draw(st.sampled_from([None, "key", "query"])), draw(st.sampled_from([None, "key", "query"]))
    used = draw(st.none() | st.tuples(*(st.integers(0, n) for n in seqlens_k)))
    spec = Spec(
        name="combination", seqlens_q=seqlens_q, seqlens_k=seqlens_k, heads=heads, heads_k=heads_k,
        head_dim=draw(st.sampled_from([8, 64])) if device == "cpu" else 64,
        mask=mask, mask_heads=draw(st.sampled_from(["1", "Hk", "H"])), keep=draw(st.sampled_from([0.3, 0.7, 1.0])),
        masked_rows=mask is not None and draw(st.booleans()),
        bias=bias, bias_heads=draw(st.sampled_from(["1", "Hk", "H"])), bias_dtype=draw(st.sampled_from(["float32", "q"])),
        bias_neg_inf=bias is not None and draw(st.booleans()),
        is_causal=draw(st.booleans()),
        window=draw(st.none() | st.tuples(st.integers(-1, 80), st.sampled_from([-1, 0, 2, 40]))),
        softcap=draw(st.none() | st.sampled_from([0.5, 3.0])),
        sinks=draw(st.none() | st.sampled_from(["float32", "q"])),
        seqused_k=used, slack_k=draw(st.sampled_from([0, 3])),
    )
    dtype = torch.float32 if device == "cpu" else draw(st.sampled_from([torch.float16, torch.bfloat16]))
    key_range = None
    if draw(st.booleans()) and spec.total_q:
        width = max(seqlens_k, default=0) + spec.slack_k
        key_range = draw(st.lists(st.tuples(st.integers(-3, width + 3), st.integers(-3, width + 3)),
                                  min_size=spec.total_q, max_size=spec.total_q))
    slots = draw(st.booleans())
    env = {}
    if device == "cuda":
        kernel = draw(st.sampled_from(["auto", "decode", "prefill"]))
        arch = draw(st.sampled_from(["auto", "sm80"]))
        env = {name: value for name, value in (("DMATTN_KERNEL", kernel), ("DMATTN_ARCH", arch)) if value != "auto"}
    return spec, dtype, key_range, slots, env, draw(st.integers(0, 3))


def as_pool(sample, seed: int):
    """The same call with its keys in a pool (kv_slots): packed key row r at a random slot of a pool with unused
    slots between, which hold NaN (K, V, a key-side bias) or True (a key-side mask) that no call may read."""
    total_k = sample.k.shape[0]
    g = torch.Generator().manual_seed(seed)
    pool = total_k + 5
    slot_of = torch.randperm(pool, generator=g)[:total_k].to(sample.k.device)

    def spread(t, fill):
        out = torch.full((pool, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)
        out[slot_of] = t
        return out

    key_side = lambda t: t is not None and t.dim() == 2  # noqa: E731
    return sample.replace(
        k=spread(sample.k, float("nan")), v=spread(sample.v, float("nan")),
        mask=spread(sample.mask, True) if key_side(sample.mask) else sample.mask,
        bias=spread(sample.bias, float("nan")) if key_side(sample.bias) else sample.bias,
        kv_slots=slot_of.to(torch.int32))


def test_drawn_combinations_match_the_reference(device, monkeypatch):
    # 300 draws catch a pair of features mishandled in ~6% of them (a softcap beside a window with its right side 0
    # taken as open, tried while writing this test: 80 draws missed it, 400 caught it); a few seconds on the CPU
    @settings(max_examples=300 if device == "cpu" else 200)
    @given(drawn=calls(device))
    def check(drawn):
        spec, dtype, key_range, slots, env, seed = drawn
        reason = support_reason(spec, dtype, device)
        if reason:
            pytest.skip(reason)
        sample = make_sample(spec, dtype, device, seed=seed)
        if key_range is not None:
            sample = sample.replace(key_range=torch.tensor(key_range, dtype=torch.int32, device=device))
        if slots:
            sample = as_pool(sample, seed)
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            result = sample.run()
        label = f"{spec} {dtype} key_range={key_range is not None} kv_slots={slots} {env}"
        assert_close_to_reference(result, sample.reference(torch.float64), sample.reference(dtype), label=label)

    check()
