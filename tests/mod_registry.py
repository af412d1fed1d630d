"""A registry of FlexAttention mask_mods and score_mods over one packed varlen batch, for tests/test_mods.py.

Every mod is written the way a FlexAttention user would write it for dmattn_ops: b is the sequence index, q_idx /
kv_idx are positions inside sequence b, and closures over packed per-token tensors read them at
``cu_seqlens_q[b] + q_idx`` / ``cu_seqlens_k[b] + kv_idx``. ``Batch.flex_*`` rewrites such a mod for FlexAttention's
packed form (batch 1, one long sequence, sequences separated by a document mask), so the same function drives both
sides of the end-to-end comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch
from torch.nn.attention.flex_attention import and_masks, or_masks

import dmattn_ops
from packed_batch import PackedBatch

# Sequence lengths of the shared batch. Sequence 2 has no queries, sequence 4 no keys (its queries see nothing),
# and the last packed rows of q and k belong to no sequence (total > cu_seqlens[-1]).
LENS_Q = (3, 1, 0, 5, 2, 4)
LENS_K = (7, 4, 6, 9, 0, 11)
# One sequence (the adapter evaluates it in one pass: dmattn_ops/mods.py, _one_sequence), with padding rows too.
ONE_Q, ONE_K = (6,), (10,)
PREFIXES = (2, 1, 3, 4, 0, 5)  # prefix_lm's bidirectional keys, per sequence (cycled past six)
PAD_Q, PAD_K = 2, 3
HEADS, HEADS_K, HEAD_DIM = 4, 2, 16


def _owner(cu, total):
    """(total,) int64: the sequence owning each packed row, -1 for rows after cu[-1]."""
    rows = torch.arange(total)
    b = torch.searchsorted(cu.long(), rows, right=True) - 1
    return torch.where(rows < cu[-1], b, -1)


@dataclass(kw_only=True)
class Batch(PackedBatch):
    """A packed batch without mask or bias (the mods make those), and the per-token tensors the mods close over."""

    extras: Dict[str, torch.Tensor] = field(default_factory=dict)

    def to(self, device) -> "Batch":
        """The same batch with every tensor on device, extras included (the mods built from it then close over
        those)."""
        return super().to(device).replace(extras={name: t.to(device) for name, t in self.extras.items()})

    @property
    def len_q(self):  # (B,) int32 on the batch's device, for mods to index with b
        return self.cu_seqlens_q[1:] - self.cu_seqlens_q[:-1]

    @property
    def len_k(self):
        return self.cu_seqlens_k[1:] - self.cu_seqlens_k[:-1]

    def _unpacker(self):
        """(Q, K) packed query / key rows -> (same sequence?, b, q_idx, kv_idx). Off-sequence pairs get positions
        whose packed address cu[b] + idx is still Q / K, so closures never index out of bounds."""
        seq_q = _owner(self.cu_seqlens_q, self.total_q)
        seq_k = _owner(self.cu_seqlens_k, self.total_k)
        cu_q, cu_k = self.cu_seqlens_q, self.cu_seqlens_k

        def unpack(Q, K):
            bq, bk = seq_q[Q], seq_k[K]
            b = bq.clamp(min=0)
            return (bq == bk) & (bq >= 0), b, Q - cu_q[b], K - cu_k[b]

        return unpack

    def flex_mask_mod(self, mask_mod: Optional[Callable]):
        """FlexAttention's packed form of mask_mod: the document mask of the packing, AND mask_mod."""
        unpack = self._unpacker()

        def packed(b_, h, Q, K):
            same, b, q_idx, kv_idx = unpack(Q, K)
            return same if mask_mod is None else same & mask_mod(b, h, q_idx, kv_idx)

        return packed

    def flex_score_mod(self, score_mod: Optional[Callable]):
        """FlexAttention's packed form of score_mod (off-sequence pairs are masked anyway)."""
        if score_mod is None:
            return None
        unpack = self._unpacker()

        def packed(score, b_, h, Q, K):
            _, b, q_idx, kv_idx = unpack(Q, K)
            return score_mod(score, b, h, q_idx, kv_idx)

        return packed


def make_batch(seed: int = 0, dtype=torch.float32, lens_q=LENS_Q, lens_k=LENS_K) -> Batch:
    g = torch.Generator().manual_seed(seed)
    cu_q, cu_k = dmattn_ops.cu_seqlens(lens_q), dmattn_ops.cu_seqlens(lens_k)
    total_q, total_k = int(cu_q[-1]) + PAD_Q, int(cu_k[-1]) + PAD_K
    q = torch.randn(total_q, HEADS, HEAD_DIM, generator=g, dtype=dtype)
    k = torch.randn(total_k, HEADS_K, HEAD_DIM, generator=g, dtype=dtype)
    v = torch.randn(total_k, HEADS_K, HEAD_DIM, generator=g, dtype=dtype)
    batch = Batch(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max(lens_q),
                  max_seqlen_k=max(lens_k))

    # Key gating, top-k at token granularity: keep the top half of each sequence's keys by a gating score.
    gate = torch.rand(total_k, generator=g)
    keep = torch.zeros(total_k, dtype=torch.bool)
    for b in range(len(lens_k)):  # test set-up only; the adapter itself never loops over sequences
        lo, n = int(cu_k[b]), lens_k[b]
        if n:
            keep[lo + gate[lo : lo + n].topk((n + 1) // 2).indices] = True
    # Sub-documents inside each sequence (ids per packed key), queries aligned bottom-right with their keys.
    doc_k = (torch.rand(total_k, generator=g) < 0.3).cumsum(0).int()
    doc_q = torch.zeros(total_q, dtype=torch.int32)
    for b in range(len(lens_q)):
        lq, lk = lens_q[b], lens_k[b]
        for i in range(lq if lk else 0):
            doc_q[int(cu_q[b]) + i] = doc_k[int(cu_k[b]) + i + lk - lq]
    batch.extras = dict(
        keep=keep,
        keep_h=torch.rand(total_k, HEADS, generator=g) < 0.6,
        keep_hk=torch.rand(total_k, HEADS_K, generator=g) < 0.6,
        doc_q=doc_q,
        doc_k=doc_k,
        prefix=torch.tensor([PREFIXES[b % len(PREFIXES)] for b in range(len(lens_q))], dtype=torch.int32),
        slopes=torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)]),
        key_bias=torch.randn(total_k, generator=g),
        key_bias_h=torch.randn(total_k, HEADS, generator=g),
    )
    return batch


@dataclass
class Case:
    """mods(batch) -> (mask_mod or None, score_mod or None). rejected: the start of the expected ValueError."""

    name: str
    mods: Callable[[Batch], tuple]
    rejected: Optional[str] = None


def _causal(batch):
    """Bottom-right aligned causal, from per-sequence lengths: query q_idx sees kv_idx <= q_idx + Lk - Lq."""
    len_q, len_k = batch.len_q, batch.len_k

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + len_k[b] - len_q[b]

    return causal


def _gate(batch):
    keep, cu_k = batch.extras["keep"], batch.cu_seqlens_k

    def gate(b, h, q_idx, kv_idx):
        return keep[cu_k[b] + kv_idx]

    return gate


def _sliding_window(batch, window=3):
    len_q, len_k = batch.len_q, batch.len_k

    def sliding_window(b, h, q_idx, kv_idx):
        back = q_idx + len_k[b] - len_q[b] - kv_idx
        return (back >= 0) & (back < window)

    return sliding_window


def _chunked_causal(batch, chunk=3):
    """Causal inside chunks of `chunk` key positions (chunked local attention, as Llama 4's local layers): a query
    sees the keys of its own chunk up to its bottom-right aligned position. Its `// chunk` divides by a nonzero
    number, which cannot fail, so the grids need no clamp of key positions."""
    len_q, len_k = batch.len_q, batch.len_k

    def chunked_causal(b, h, q_idx, kv_idx):
        pos = q_idx + len_k[b] - len_q[b]
        return (kv_idx <= pos) & (pos // chunk == kv_idx // chunk)

    return chunked_causal


def _prefix_lm(batch):
    prefix, causal = batch.extras["prefix"], _causal(batch)

    def prefix_lm(b, h, q_idx, kv_idx):
        return (kv_idx < prefix[b]) | causal(b, h, q_idx, kv_idx)

    return prefix_lm


def _document(batch):
    doc_q, doc_k, cu_q, cu_k = batch.extras["doc_q"], batch.extras["doc_k"], batch.cu_seqlens_q, batch.cu_seqlens_k

    def same_document(b, h, q_idx, kv_idx):
        return doc_q[cu_q[b] + q_idx] == doc_k[cu_k[b] + kv_idx]

    return same_document


def _per_head_gate(batch):
    keep_h, cu_k = batch.extras["keep_h"], batch.cu_seqlens_k

    def per_head_gate(b, h, q_idx, kv_idx):
        return keep_h[cu_k[b] + kv_idx, h]

    return per_head_gate


def _kv_head_gate(batch):
    keep_hk, cu_k = batch.extras["keep_hk"], batch.cu_seqlens_k
    group = HEADS // HEADS_K

    def kv_head_gate(b, h, q_idx, kv_idx):
        return keep_hk[cu_k[b] + kv_idx, h // group]

    return kv_head_gate


def _even_heads(b, h, q_idx, kv_idx):
    return h % 2 == 0


def _alibi(batch):
    slopes, len_q, len_k = batch.extras["slopes"], batch.len_q, batch.len_k

    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - (q_idx + len_k[b] - len_q[b]))

    return alibi


def _key_bias(batch):
    key_bias, cu_k = batch.extras["key_bias"], batch.cu_seqlens_k

    def key_bias_mod(score, b, h, q_idx, kv_idx):
        return key_bias[cu_k[b] + kv_idx] + score  # bias on the left: the tensor's __add__ meets the tracer

    return key_bias_mod


def _key_bias_h(batch):
    key_bias_h, cu_k = batch.extras["key_bias_h"], batch.cu_seqlens_k

    def per_head_key_bias(score, b, h, q_idx, kv_idx):
        return score - key_bias_h[cu_k[b] + kv_idx, h]

    return per_head_key_bias


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def _scaled(score, b, h, q_idx, kv_idx):
    return score * 0.5


def _masked_score(score, b, h, q_idx, kv_idx):
    return torch.where(kv_idx <= q_idx, score, -float("inf"))


def _identity(score, b, h, q_idx, kv_idx):
    return score


CASES = [
    Case("key_gating_topk", lambda B: (_gate(B), None)),
    Case("per_head_gating", lambda B: (_per_head_gate(B), None)),
    Case("kv_head_gating", lambda B: (_kv_head_gate(B), None)),
    Case("sliding_window", lambda B: (_sliding_window(B), None)),
    Case("prefix_lm", lambda B: (_prefix_lm(B), None)),
    Case("chunked_causal", lambda B: (_chunked_causal(B), None)),
    Case("document_causal", lambda B: (and_masks(_document(B), _causal(B)), None)),
    Case("gating_and_causal", lambda B: (and_masks(_gate(B), _causal(B)), None)),
    Case("gating_or_even_heads", lambda B: (or_masks(_gate(B), _even_heads), None)),
    Case("alibi", lambda B: (None, _alibi(B))),
    Case("key_bias", lambda B: (None, _key_bias(B))),
    Case("per_head_key_bias", lambda B: (None, _key_bias_h(B))),
    Case("identity_score", lambda B: (None, _identity)),
    Case("gating_with_key_bias", lambda B: (_gate(B), _key_bias(B))),
    Case("window_with_alibi", lambda B: (_sliding_window(B), _alibi(B))),
    Case("softcap", lambda B: (None, _softcap), rejected="dmattn.create_bias: score_mod is not additive"),
    Case("scaled_score", lambda B: (None, _scaled), rejected="dmattn.create_bias: score_mod is not additive"),
    Case("where_masked_score", lambda B: (None, _masked_score), rejected="dmattn.create_bias: score_mod is not"),
]

CASES_BY_NAME = {case.name: case for case in CASES}
