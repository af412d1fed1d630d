"""The fake (meta) implementation of ``dmattn::varlen_fwd`` and its autograd guard.

The fake impl runs ``rules.check_varlen_fwd``, the rules the op's C++ binding applies in eager mode, with the same
messages, so a bad call fails with the same message under ``torch.compile`` / ``torch.export`` as in eager mode; it
returns outputs of the real kernels' shapes and strides. It reads shapes only, so it is safe under symbolic shapes.
"""

import torch

from . import rules


@torch.library.register_fake("dmattn::varlen_fwd")
def _varlen_fwd_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, bias=None, softmax_scale=None,
    is_causal=False,
):
    rules.check_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal
    )
    out_shape, lse_shape = rules.output_shapes(q)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_out, grad_lse):
    raise NotImplementedError(
        f"{rules.OP} has no backward yet: it is a forward-only (inference) op. Run it under torch.no_grad(), or "
        "detach its inputs, if no gradient is needed."
    )


torch.library.register_autograd("dmattn::varlen_fwd", _backward, setup_context=_setup_context)
