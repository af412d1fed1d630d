"""The Python surface over ``torch.ops.dmattn.varlen_fwd``."""

from typing import Optional, Sequence, Tuple, Union

import torch

from . import mods
from ._meta import rules


def varlen_attention(
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
    return_lse: bool = False,
    mask_mod: Optional[mods.MaskMod] = None,
    score_mod: Optional[mods.ScoreMod] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention over packed variable-length sequences with an optional boolean mask and additive bias.

    Args:
        q: (total_q, H, D) float32, float16 or bfloat16.
        k, v: (total_k, Hk, D), q's dtype; H % Hk == 0 (MHA, GQA, MQA).
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32, start at 0, non-decreasing. Sequence b owns queries
            cu_seqlens_q[b]:cu_seqlens_q[b+1] and keys cu_seqlens_k[b]:cu_seqlens_k[b+1].
        max_seqlen_q, max_seqlen_k: upper bounds on the sequence lengths.
        mask: bool, True = attend. Key-side (total_k, Hm): one value per packed key, broadcast over every query
            of that key's sequence. Query-side (total_q, Hm, max_seqlen_k): [i, h, j] is query i and the j-th key
            of i's own sequence. Hm in {1, Hk, H}.
        bias: float32 or q's dtype, same two layouts as mask, added to the scaled score.
        softmax_scale: multiplies q . k; default 1 / sqrt(D).
        is_causal: bottom-right aligned: query i of a sequence with Lq queries and Lk keys sees key j iff
            j <= i + Lk - Lq.
        return_lse: also return softmax_lse (H, total_q) float32, natural log.
        mask_mod, score_mod: FlexAttention-style mods, built into mask / bias by dmattn_ops.create_mask /
            create_bias in the most compact layout (see docs/mods.md); each excludes the tensor it replaces.

    Returns:
        out (total_q, H, D) in q's dtype, or (out, softmax_lse). A query with no visible key gets a row of zeros
        and lse = -inf (never NaN).
    """
    if mask_mod is not None or score_mod is not None:
        mask, bias = mods.operands_from_mods(
            q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, mask_mod, score_mod
        )
    if not torch.compiler.is_compiling():
        # Traced calls are checked by the fake impl, which runs the same rules.
        rules.check_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal
        )
    out, lse = torch.ops.dmattn.varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal
    )
    return (out, lse) if return_lse else out


def cu_seqlens(lengths: Union[Sequence[int], torch.Tensor], *, device=None) -> torch.Tensor:
    """The (B + 1,) int32 ``cu_seqlens`` of sequences of the given lengths: 0, then the running sums.

    ``lengths`` is a sequence of ints or a 1-D integer tensor (kept on its device unless ``device`` is given)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    if lengths.dim() != 1:
        raise ValueError(f"dmattn.cu_seqlens: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
