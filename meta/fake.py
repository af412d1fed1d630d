"""The fake (meta) implementations of ``dmattn::varlen_fwd`` and ``dmattn::varlen_bwd``, and the autograd of the former.

The fake impl runs ``rules.check_varlen_fwd``, the rules the op's C++ binding applies in eager mode, with the same
messages, so a bad call fails with the same message under ``torch.compile`` / ``torch.export`` as in eager mode; it
returns outputs of the real kernels' shapes and strides. It reads shapes only, so it is safe under symbolic shapes.
"""

import torch

from . import rules


@torch.library.register_fake("dmattn::varlen_fwd")
def _varlen_fwd_fake(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None, bias=None, softmax_scale=None,
    is_causal=False, window_left=-1, window_right=-1, softcap=None, sinks=None, seqused_k=None, kv_slots=None,
    key_range=None,
):
    rules.check_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
        window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range,
    )
    out_shape, lse_shape = rules.output_shapes(q)
    return q.new_empty(out_shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.register_fake("dmattn::varlen_bwd")
def _varlen_bwd_fake(
    dout, dsoftmax_lse, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=None,
    bias=None, softmax_scale=None, is_causal=False, bias_grad=False, window_left=-1, window_right=-1, softcap=None,
    sinks=None, seqused_k=None, key_range=None,
):
    rules.check_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
        window_left, window_right, softcap, sinks, seqused_k, None, key_range,
    )
    rules.check_varlen_bwd(q, dout, dsoftmax_lse, out, softmax_lse)
    dbias = bias.new_empty(bias.shape) if bias is not None and bias_grad else q.new_empty((0,), dtype=torch.float32)
    dsinks = sinks.new_empty(sinks.shape) if sinks is not None else q.new_empty((0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias, dsinks


# Autograd of varlen_fwd: the gradients come from dmattn::varlen_bwd (a CPU kernel so far; CUDA raises
# NotImplementedError). q, k, v, the bias and the sinks get gradients; the mask, cu_seqlens and the ints do not. A
# bias that does not require grad costs nothing (bias_grad=False). varlen_bwd takes packed keys: a kv_slots call's
# pool rows (k, v, key-side mask and bias) are gathered first and their gradients summed back into the pool (a slot
# that several keys name, such as a shared prefix page, gets the sum).
_BIAS_INPUT, _SINKS_INPUT = 8, 14  # positions of bias and sinks among varlen_fwd's inputs


def _setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
     window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range) = inputs
    out, softmax_lse = output
    ctx.save_for_backward(q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, mask, bias, sinks, seqused_k,
                          kv_slots, key_range)
    ctx.max_seqlen = (max_seqlen_q, max_seqlen_k)
    ctx.softmax_scale, ctx.is_causal = softmax_scale, is_causal
    ctx.window, ctx.softcap = (window_left, window_right), softcap


def _backward(ctx, grad_out, grad_lse):
    (q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, mask, bias, sinks, seqused_k, kv_slots,
     key_range) = ctx.saved_tensors
    pool_k, pool_bias = k, bias
    if kv_slots is not None:
        slots = kv_slots.long().clamp(0, k.shape[0] - 1)  # as CUDA clamps (an empty pool has no slots: the rules)
        k, v = k.index_select(0, slots), v.index_select(0, slots)
        if mask is not None and mask.dim() == 2:
            mask = mask.index_select(0, slots)
        if bias is not None and bias.dim() == 2:
            bias = bias.index_select(0, slots)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if grad_lse is None:
        grad_lse = softmax_lse.new_empty((0,))
    bias_grad = bias is not None and ctx.needs_input_grad[_BIAS_INPUT]
    dq, dk, dv, dbias, dsinks = torch.ops.dmattn.varlen_bwd(
        grad_out, grad_lse, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, *ctx.max_seqlen, mask, bias,
        ctx.softmax_scale, ctx.is_causal, bias_grad, *ctx.window, ctx.softcap, sinks, seqused_k, key_range,
    )
    if kv_slots is not None:
        dk = pool_k.new_zeros(pool_k.shape).index_add_(0, slots, dk)
        dv = pool_k.new_zeros(pool_k.shape).index_add_(0, slots, dv)
        if bias_grad and pool_bias.dim() == 2:
            dbias = pool_bias.new_zeros(pool_bias.shape).index_add_(0, slots, dbias)
    sinks_grad = sinks is not None and ctx.needs_input_grad[_SINKS_INPUT]
    return (dq, dk, dv, None, None, None, None, None, dbias if bias_grad else None, None, None, None, None, None,
            dsinks if sinks_grad else None, None, None, None)


torch.library.register_autograd("dmattn::varlen_fwd", _backward, setup_context=_setup_context)


@torch.library.register_fake("dmattn::packed_rows")
def _packed_rows_fake(cu_seqlens, cu_seqlens_other, total):
    """(4, total) int64 rows and a (2,) int64 anchor (csrc/packed_rows.h; the kernels check the arguments)."""
    return cu_seqlens.new_empty((4, total), dtype=torch.int64), cu_seqlens.new_empty((2,), dtype=torch.int64)


@torch.library.register_fake("dmattn::zero_unseen_")
def _zero_unseen_fake(grid, counts):
    """In place: no output (csrc/packed_rows.h; the kernels check the arguments)."""
    return None
