"""A plain PyTorch reference for ``dmattn::varlen_fwd``, written from the op contract alone.

    from dmattn_ops.reference import reference_varlen_attention
    out_ref, lse_ref = reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                  mask=mask, bias=bias, is_causal=True)

It loops over (sequence, query head), turns the mask and bias of one sequence into dense (H, Lq, Lk) tensors
(``materialize_mask`` / ``materialize_bias``) and runs textbook softmax attention on them. Nothing here shares code
with the dmattn kernels, so it can judge them. It computes in float64 by default; passing ``dtype=q.dtype`` gives
"a PyTorch implementation in the same dtype", the yardstick of the accuracy rule in the tests.

The numeric rules of the contract (docs/contract.md), as written here:
- any nonzero mask byte is True (a uint8 tensor viewed as bool may hold 2..255);
- scores are float32: a score beyond float32's range is the infinity it rounds to (in float64 the other scores
  keep their extra precision);
- the softmax subtracts the row's max score: weights exp(s - max), out = weights @ v / sum, lse = max + log(sum), so
  huge equal scores (a bias of finfo(float32).min on every key) give the mean of V and a finite lse;
- a key a row cannot see adds nothing to it, nor does a visible key of weight 0: NaN or inf in its V never reaches
  the row; a visible score of +inf or NaN makes the row's out and lse NaN; a row whose visible scores are all -inf
  (or that sees no key) gets out 0 and lse -inf.

It is slow (a Python loop, dense per-sequence masks) and meant for checking results, not for use in a model.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch

__all__ = ["causal_mask", "materialize_bias", "materialize_mask", "reference_varlen_attention", "window_mask"]

_NAME = "dmattn_ops.reference"


def _bounds(cu_seqlens: torch.Tensor) -> List[int]:
    return [int(x) for x in cu_seqlens.tolist()]


def _check_cu_seqlens(name: str, cu: List[int], total: int, max_seqlen: int) -> None:
    """The data rules of the contract: start at 0, non-decreasing, last entry <= total, lengths <= max_seqlen."""
    if cu[0] != 0:
        raise ValueError(f"{_NAME}: {name}[0] must be 0, got {cu[0]}")
    for b in range(len(cu) - 1):
        length = cu[b + 1] - cu[b]
        if length < 0:
            raise ValueError(f"{_NAME}: {name} must be non-decreasing, got {cu[b]} then {cu[b + 1]}")
        if length > max_seqlen:
            raise ValueError(f"{_NAME}: sequence {b} has {length} tokens in {name}, more than max_seqlen {max_seqlen}")
    if cu[-1] > total:
        raise ValueError(f"{_NAME}: {name}[-1] must be <= {total}, got {cu[-1]}")


def _heads_view(per_hm: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(Hm, Lq, Lk) -> (H, Lq, Lk): query head h reads operand head h // (H / Hm), which covers Hm = 1 (one
    head for all), Hm = Hk (the KV group of h) and Hm = H (h itself)."""
    hm = per_hm.shape[0]
    if num_heads == 0:  # no query heads (then Hm may be 0 too): nothing reads the operand
        return per_hm.new_empty((0, *per_hm.shape[1:]))
    if num_heads % hm != 0:
        raise ValueError(f"{_NAME}: operand head count Hm = {hm} does not divide H = {num_heads}")
    index = torch.arange(num_heads, device=per_hm.device) // (num_heads // hm)
    return per_hm.index_select(0, index)


def _dense_operand(
    t: torch.Tensor, name: str, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, batch_index: int,
    num_heads: int,
) -> torch.Tensor:
    """The (H, Lq, Lk) values of a key-side or query-side operand for sequence ``batch_index``."""
    cu_q, cu_k = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    q0, q1 = cu_q[batch_index], cu_q[batch_index + 1]
    k0, k1 = cu_k[batch_index], cu_k[batch_index + 1]
    lq, lk = q1 - q0, k1 - k0
    if t.dim() == 2:
        # key-side (total_k, Hm): row k0 + j is key j of the sequence, the same for every query.
        per_key = t[k0:k1].transpose(0, 1)  # (Hm, Lk)
        per_hm = per_key[:, None, :].expand(per_key.shape[0], lq, lk)  # (Hm, Lq, Lk)
    elif t.dim() == 3:
        # query-side (total_q, Hm, max_seqlen_k): [q0 + i, :, j] is query i against key j; columns >= Lk unused.
        if t.shape[2] < lk:
            raise ValueError(
                f"{_NAME}: query-side {name} has {t.shape[2]} columns, sequence {batch_index} has {lk} keys"
            )
        per_hm = t[q0:q1, :, :lk].permute(1, 0, 2)  # (Hm, Lq, Lk)
    else:
        raise ValueError(
            f"{_NAME}: {name} must be key-side (rank 2) or query-side (rank 3), got shape {tuple(t.shape)}"
        )
    return _heads_view(per_hm, num_heads)


def materialize_mask(
    mask: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, batch_index: int,
    num_heads: int,
) -> torch.Tensor:
    """The dense (H, Lq, Lk) bool mask of sequence ``batch_index`` (True = attend; all True when ``mask`` is None).

    ``mask`` is key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k), Hm in {1, Hk, H}. The causal
    rule is not applied here (see ``causal_mask``).
    """
    if mask is None:
        cu_q, cu_k = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
        lq = cu_q[batch_index + 1] - cu_q[batch_index]
        lk = cu_k[batch_index + 1] - cu_k[batch_index]
        return torch.ones(num_heads, lq, lk, dtype=torch.bool, device=cu_seqlens_q.device)
    dense = _dense_operand(mask, "mask", cu_seqlens_q, cu_seqlens_k, batch_index, num_heads)
    # Any nonzero byte is True. Torch's logical ops on bool tensors holding bytes 2..255 are not reliable, so the
    # bytes are compared as uint8; the slicing above only moved bytes, and this sequence's slice is all it touches.
    return dense.view(torch.uint8) != 0 if dense.dtype == torch.bool else dense


def materialize_bias(
    bias: Optional[torch.Tensor], cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, batch_index: int,
    num_heads: int, dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The dense (H, Lq, Lk) additive bias of sequence ``batch_index`` in ``dtype`` (zeros when ``bias`` is None).

    Same layouts as ``materialize_mask``.
    """
    if bias is None:
        cu_q, cu_k = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
        lq = cu_q[batch_index + 1] - cu_q[batch_index]
        lk = cu_k[batch_index + 1] - cu_k[batch_index]
        return torch.zeros(num_heads, lq, lk, dtype=dtype, device=cu_seqlens_q.device)
    return _dense_operand(bias, "bias", cu_seqlens_q, cu_seqlens_k, batch_index, num_heads).to(dtype)


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(Lq, Lk) bool, bottom-right aligned: query i sees key j iff j <= i + Lk - Lq."""
    return window_mask(lq, lk, (-1, 0), device=device)


def window_mask(lq: int, lk: int, window_size: Tuple[int, int], device=None) -> torch.Tensor:
    """(Lq, Lk) bool: query i sees key j iff a - left <= j <= a + right, a = i + Lk - Lq (bottom-right aligned);
    a side of -1 is open."""
    left, right = window_size
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    aligned = i + (lk - lq)
    allowed = torch.ones(lq, lk, dtype=torch.bool, device=device)
    if left >= 0:
        allowed &= j >= aligned - left
    if right >= 0:
        allowed &= j <= aligned + right
    return allowed


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    is_causal: bool = False,
    window_size: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    kv_slots: Optional[torch.Tensor] = None,
    key_range: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Varlen attention by the contract of ``dmattn_ops.varlen_attention``, computed in ``dtype``.

    Args: as ``dmattn_ops.varlen_attention`` (q (total_q, H, D); k, v (total_k, Hk, D); cu_seqlens (B + 1,);
    mask / bias key-side (total_k, Hm) or query-side (total_q, Hm, max_seqlen_k)). Inputs of any float dtype are
    converted to ``dtype`` first; the bias is added to the scaled score in ``dtype``.

    The window (FlashAttention's window_size; is_causal is a right side of 0) hides keys like a mask. A softcap
    replaces each scaled score x by softcap * tanh(x / softcap) before the bias is added. A sink (one logit per query
    head) joins the softmax as a key with that score and V = 0. With ``seqused_k`` sequence b's keys are the first
    ``seqused_k[b]`` of its ``cu_seqlens_k`` range (the others are not there at all: not even for the alignment).
    With ``kv_slots`` k, v and key-side operands are a pool, and packed key row r is their row ``kv_slots[r]``: the
    call is the packed call on those rows. With ``key_range`` query row r sees only key positions
    ``key_range[r, 0] <= j < key_range[r, 1]`` of its sequence, on top of everything else.

    Returns:
        out (total_q, H, D) and lse (H, total_q), both in ``dtype`` (the op returns lse in float32). A query
        with no visible key (empty key side, all masked, outside its window, or every visible score -inf) gets an
        output row of 0 and lse -inf (its head's sink, with sinks), and every row after cu_seqlens_q[-1] 0 and -inf.
    """
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"{_NAME}: q, k, v must have rank 3, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if kv_slots is not None:  # the packed keys are the pool rows kv_slots names
        # (Slots a sequence does not use are never read: any value will do there, so they are clamped here.)
        rows = kv_slots.to(device=k.device, dtype=torch.int64).clamp(0, max(k.shape[0] - 1, 0))
        k, v = k[rows], v[rows]
        mask = mask[rows] if mask is not None and mask.dim() == 2 else mask
        bias = bias[rows] if bias is not None and bias.dim() == 2 else bias
    total_q, num_heads, head_dim = q.shape
    total_k, num_heads_k, _ = k.shape
    if num_heads % num_heads_k != 0:
        raise ValueError(f"{_NAME}: H = {num_heads} must be a multiple of Hk = {num_heads_k}")
    cu_q, cu_k = _bounds(cu_seqlens_q), _bounds(cu_seqlens_k)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"{_NAME}: cu_seqlens_q and cu_seqlens_k differ in length: {len(cu_q)} and {len(cu_k)}")
    _check_cu_seqlens("cu_seqlens_q", cu_q, total_q, max_seqlen_q)
    _check_cu_seqlens("cu_seqlens_k", cu_k, total_k, max_seqlen_k)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    group = num_heads // num_heads_k  # query heads per KV head

    if seqused_k is not None:  # sequence b's keys end after its first seqused_k[b]: a shorter cu_seqlens_k range
        used = [int(n) for n in seqused_k.tolist()]
        if len(used) != len(cu_k) - 1:
            raise ValueError(f"{_NAME}: seqused_k has {len(used)} entries for {len(cu_k) - 1} sequences")
        ends = [cu_k[b] + min(max(u, 0), cu_k[b + 1] - cu_k[b]) for b, u in enumerate(used)]
    else:
        ends = cu_k[1:]
    out = torch.zeros(total_q, num_heads, head_dim, dtype=dtype, device=q.device)
    lse = torch.full((num_heads, total_q), -math.inf, dtype=dtype, device=q.device)
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], ends[b]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        if lk == 0:  # no key: out 0, lse -inf, or the sink (a NaN or +inf sink: NaN)
            for h in range(num_heads if sinks is not None else 0):
                sink = float(sinks[h].detach())
                bad = math.isnan(sink) or sink == math.inf
                lse[h, q0:q1] = math.nan if bad else sinks[h].to(dtype)
                if bad:
                    out[q0:q1, h] = math.nan
            continue
        allowed = materialize_mask(mask, cu_seqlens_q, cu_seqlens_k, b, num_heads)[..., :lk]  # (H, Lq, Lk)
        if is_causal:
            allowed = allowed & causal_mask(lq, lk, device=q.device)
        if window_size is not None:
            allowed = allowed & window_mask(lq, lk, window_size, device=q.device)
        if key_range is not None:  # query i sees key positions key_range[i, 0] <= j < key_range[i, 1]
            rng = key_range[q0:q1].to(device=q.device, dtype=torch.int64)
            j = torch.arange(lk, device=q.device)
            allowed = allowed & ((j >= rng[:, :1]) & (j < rng[:, 1:]))
        add = materialize_bias(bias, cu_seqlens_q, cu_seqlens_k, b, num_heads, dtype)[..., :lk]  # (H, Lq, Lk)
        for h in range(num_heads):
            qh = q[q0:q1, h].to(dtype)  # (Lq, D)
            kh = k[k0:k1, h // group].to(dtype)  # (Lk, D)
            vh = v[k0:k1, h // group].to(dtype)  # (Lk, D)
            raw = scale * (qh @ kh.transpose(0, 1))  # (Lq, Lk)
            if softcap:
                raw = softcap * torch.tanh(raw / softcap)
            scores = _float32_range(raw + add[h])
            scores = scores.masked_fill(~allowed[h], -math.inf)
            if sinks is not None:  # the sink is one more score, of a key whose V is 0
                sink = sinks[h].to(dtype).reshape(1, 1).expand(lq, 1)  # a tensor op: sinks keep their gradient
                scores = torch.cat([scores, sink], dim=1)
                vh = torch.cat([vh, vh.new_zeros(1, head_dim)], dim=0)
            row_max = scores.amax(dim=-1, keepdim=True)  # (Lq, 1); NaN if a visible score is NaN
            seen = row_max != -math.inf  # rows with a visible score above -inf (NaN rows too: they stay NaN)
            weights = torch.where(seen, torch.exp(scores - row_max), 0.0)  # (Lq, Lk), 0 for unseen keys and rows
            total = weights.sum(dim=-1, keepdim=True)
            out[q0:q1, h] = torch.where(seen, _weighted_values(weights, vh) / total, 0.0)
            lse[h, q0:q1] = torch.where(seen, row_max + torch.log(total), -math.inf)[:, 0]
    return out, lse


def _float32_range(scores: torch.Tensor) -> torch.Tensor:
    """Scores are float32: in a wider dtype, a score beyond float32's range becomes the infinity it rounds to."""
    if torch.finfo(scores.dtype).max <= torch.finfo(torch.float32).max:
        return scores
    as_float32 = scores.to(torch.float32)
    return torch.where(as_float32.isinf(), as_float32.to(scores.dtype), scores)


def _weighted_values(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """weights (Lq, Lk) @ v (Lk, D), where a key of weight 0 adds nothing even when its V row is not finite (0 * inf
    would be NaN). Keys with a non-finite V row are summed apart, over the rows that give them weight."""
    bad = ~v.isfinite().all(dim=-1)  # (Lk,)
    out = weights @ v.masked_fill(bad[:, None], 0.0)
    if bad.any():
        w = weights[:, bad, None]  # (Lq, n_bad, 1)
        out = out + torch.where(w != 0, w * v[bad][None], 0.0).sum(dim=1)
    return out
