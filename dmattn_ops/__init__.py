"""dmattn_ops: varlen attention with dynamic key-side / query-side masks and biases, as a PyTorch custom op.

    import dmattn_ops
    out = dmattn_ops.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      mask=key_side_mask, bias=key_side_bias, is_causal=True)

The op itself is ``torch.ops.dmattn.varlen_fwd`` (schema in csrc/schema.cpp).
"""

import torch  # noqa: F401  (loads libtorch before the op library)

from . import _C  # noqa: F401  (loads the op library: schema + CPU/CUDA kernels)
from . import _meta  # noqa: F401  (fake impl + autograd guard)
from ._meta.rules import Layout
from . import reference  # noqa: F401  (float64 reference of the contract, for checking results)
from .mods import chunked_causal, create_bias, create_mask, document_mask, prefix_lm, sliding_window
from .ops import check_cu_seqlens, cu_seqlens, paged_kv_slots, varlen_attention

__all__ = [
    "Layout", "varlen_attention", "cu_seqlens", "paged_kv_slots", "check_cu_seqlens", "create_mask", "create_bias",
    "sliding_window", "prefix_lm", "document_mask", "chunked_causal", "build_info",
]


def build_info():
    """What this build contains: torch version, backends, dtypes, head dims (written by setup.py)."""
    from ._build_config import CONFIG

    return dict(CONFIG)
