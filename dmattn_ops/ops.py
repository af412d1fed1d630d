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
    window_size: Optional[Tuple[int, int]] = None,
    softcap: Optional[float] = None,
    sinks: Optional[torch.Tensor] = None,
    seqused_k: Optional[torch.Tensor] = None,
    kv_slots: Optional[torch.Tensor] = None,
    key_range: Optional[torch.Tensor] = None,
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
        window_size: (left, right), FlashAttention's sliding window: query i sees keys j with
            a - left <= j <= a + right, a = i + Lk - Lq; -1 leaves that side open. is_causal sets right to 0.
            Key tiles outside every row's window are skipped, so a window costs what it keeps.
        softcap: > 0 caps every score as softcap * tanh(scale * q . k / softcap) before the bias is added
            (attention logit softcapping, Gemma 2); None or 0 is off.
        sinks: (H,) float32 or q's dtype: one learned logit per query head that joins the softmax denominator of
            every row of that head (attention sinks, gpt-oss): out = sum_j e^s_j v_j / (e^sink + sum_j e^s_j) and
            lse = log(e^sink + sum_j e^s_j). A row with no visible key gets out 0 and lse = sink.
        seqused_k: (B,) int32: sequence b uses only the first seqused_k[b] keys of its cu_seqlens_k range (its
            length for the causal / window alignment too), FlashAttention's seqused_k. A padded cache (B, S, Hk, D)
            seen as packed rows, sequence b at rows b * S .. b * S + S (cu_seqlens_k = arange(B + 1) * S), is then
            read in place with no mask for its unused slots.
        kv_slots: (total_k,) int32: the keys live in a pool (a KV cache) and packed key row r, as cu_seqlens_k counts
            them, is row kv_slots[r] of k and v, which are then (pool_rows, Hk, D): a paged cache (num_pages,
            page_size, Hk, D) flattened to (num_pages * page_size, Hk, D), or a token pool. A key-side mask or bias
            then has a row per slot (pool_rows, Hm), addressed like k, so gating scores live beside the cache. The
            CUDA decode kernel reads the pool in place; other calls gather the rows they use first.
            ``paged_kv_slots`` builds kv_slots, cu_seqlens_k and max_seqlen_k from a block table.
        key_range: (total_q, 2) int32: query row r sees only the key positions key_range[r, 0] <= j < key_range[r, 1]
            of its sequence (positions 0 .. its key count; an empty or reversed range sees no key), on top of
            is_causal, window_size, mask and bias. One interval per query: the compact form of a mask that depends on
            positions only (a sliding window, a prefix-LM, the causal documents of a packed sequence), which the
            kernels turn into skipped key tiles instead of reading a (total_q, Hm, max_seqlen_k) mask.
        return_lse: also return softmax_lse (H, total_q) float32, natural log.
        mask_mod, score_mod: FlexAttention-style mods, built into mask / bias by dmattn_ops.create_mask /
            create_bias in the most compact layout (see docs/mods.md); each excludes the tensor it replaces. A
            dmattn_ops.sliding_window mask_mod made for these cu_seqlens runs as window_size instead, and a
            dmattn_ops.prefix_lm / document_mask / chunked_causal one as key_range (a mask= tensor may then come
            with it); so does, in eager mode, a mask_mod whose expression proves it one interval of keys per query
            (a window, a band, a prefix-LM, chunks of q_idx and kv_idx: docs/mods.md, "Sliding windows").

    Returns:
        out (total_q, H, D) in q's dtype, or (out, softmax_lse). A query with no visible key gets a row of zeros
        and lse = -inf; NaN comes only from non-finite inputs of keys a row sees, or, on CUDA, from cu_seqlens that
        break the contract (docs/contract.md, "Numeric limits").
    """
    # The Python types first, in compiled code too: isinstance checks install no guard, and the op's schema would
    # coerce (True as 1) or reject such values with torch's own message.
    window_left, window_right = _window_sides(window_size)
    rules.check_arg_types(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
        window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range,
    )
    if mask_mod is not None or score_mod is not None:
        # (a call without mods, as a decode step's in every layer, passes this block at one comparison)
        if kv_slots is not None:
            raise ValueError(f"{rules.OP}: mask_mod / score_mod build operands over packed keys, which a kv_slots "
                             "call does not have; pass a key-side mask / bias with a row per pool slot instead")
        # (With seqused_k the op aligns windows to the used keys, the mask_mod to cu_seqlens_k: no native mapping
        # then.)
        window = mods.native_window(mask_mod, cu_seqlens_q, cu_seqlens_k) if seqused_k is None else None
        if window is not None:  # a sliding_window mask_mod runs as the op's own window
            if window_size is not None:
                raise ValueError("dmattn.varlen_fwd: pass either window_size or a sliding_window mask_mod, not both")
            window_left, window_right = window
            mask_mod = None
        # A prefix_lm / document_mask / chunked_causal mask_mod runs as key_range (same proviso on seqused_k).
        ranges = None if seqused_k is not None else mods.native_key_range(
            mask_mod, cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0])
        if ranges is not None:
            if key_range is not None:
                raise ValueError("dmattn.varlen_fwd: pass either key_range or a prefix_lm / document_mask / "
                                 "chunked_causal mask_mod, not both")
            key_range, mask_mod = ranges, None
        elif mask_mod is not None and mask is None and key_range is None and seqused_k is None:
            # A mask_mod proven one interval of keys per query by its expression (a window, a band, a prefix-LM
            # written as a mod; eager mode): key_range too, and no mask built (dmattn_ops/_intervals.py). Not beside
            # mask=: that pair is an error either way, as in compiled code, where nothing is proven.
            ranges = mods.proven_key_range(mask_mod, cu_seqlens_q, cu_seqlens_k, q.shape[0])
            if ranges is not None:
                key_range, mask_mod = ranges, None
        if mask_mod is not None or score_mod is not None:
            mask, bias = mods.operands_from_mods(
                q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, mask_mod, score_mod
            )
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
            window_left, window_right, softcap, sinks, seqused_k, kv_slots, key_range)
    if not torch.compiler.is_compiling():
        # The metadata rules run once: in the op's binding for an eager call (same messages as meta/rules.py), in the
        # fake implementation while tracing. Only a device this build has no kernels for is caught here.
        rules.check_backend_built(q)
        if not _is_exporting() and not (torch.is_grad_enabled() and torch._C._any_requires_grad(*args)):
            # No gradient to record: what the op's autograd registration would do for this call (torch.library's
            # forward_no_grad: the kernels below the autograd keys), without its Python hop, ~8.5 us a call
            # (a decode step pays it in every layer; benchmarks/results/NOTES.md, "Thirty-first session").
            out, lse = forward_below_autograd(args)
            return (out, lse) if return_lse else out
    out, lse = torch.ops.dmattn.varlen_fwd(*args)
    return (out, lse) if return_lse else out


# torch.export's tracing (strict or not) sees the op as the user called it, through its autograd registration.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)


def forward_below_autograd(args: tuple) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of ``torch.ops.dmattn.varlen_fwd(*args)`` (its 18 schema arguments, in order) run below the
    autograd keys, in eager mode, for a call with nothing to differentiate: the no-grad call ``varlen_attention``
    makes, and the one the transformers backend makes straight from its decode step (which builds every argument
    itself, so it skips ``varlen_attention``'s Python type checks). The metadata rules still run in the op's binding."""
    with torch._C._AutoDispatchBelowAutograd():
        # (looked up per call, not kept: tests and tools that wrap torch.ops.dmattn.varlen_fwd see every call)
        return torch.ops.dmattn.varlen_fwd(*args)


def paged_kv_slots(
    block_table: torch.Tensor, page_size: int, seq_lens: Optional[Sequence[int]] = None
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """``(kv_slots, cu_seqlens_k, max_seqlen_k)`` for a paged KV cache, to pass with its flattened pool.

    ``block_table`` (B, pages_per_seq) int32 names the pages of each sequence in order; the cache is
    ``(num_pages, page_size, Hk, D)``, passed as ``k_cache.flatten(0, 1)`` (a view); key j of sequence b is slot
    ``block_table[b, j // page_size] * page_size + j % page_size``. Page size 1 is a token pool: ``block_table`` rows
    are then the slots themselves.

    Without ``seq_lens`` every sequence gets ``pages_per_seq * page_size`` rows: pass its real length as
    ``seqused_k[b]`` (slots past it, and unused pages, are never read). Built on the device with no host sync, so a
    CUDA graph can replay it; the CUDA decode kernel then plans its key splits for the padded length.
    With ``seq_lens`` (host ints: a list, or a CPU tensor, e.g. vLLM's ``seq_lens_cpu``) the slots are packed, one row
    per real key, and the splits fit the real lengths; no ``seqused_k`` is needed. Still no sync.
    """
    if not isinstance(page_size, int) or isinstance(page_size, bool) or page_size < 1:
        raise ValueError(f"dmattn.paged_kv_slots: page_size must be an int >= 1, got {page_size!r}")
    if block_table.dim() != 2 or block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError("dmattn.paged_kv_slots: block_table must be a (B, pages_per_seq) int32 or int64 tensor, "
                         f"got shape {tuple(block_table.shape)} of {block_table.dtype}")
    batch, pages = block_table.shape
    dev = block_table.device
    capacity = pages * page_size
    if seq_lens is None:
        offsets = torch.arange(page_size, device=dev, dtype=block_table.dtype)
        slots = (block_table.unsqueeze(-1) * page_size + offsets).reshape(-1).to(torch.int32)
        return slots, torch.arange(batch + 1, device=dev, dtype=torch.int32) * capacity, capacity
    if isinstance(seq_lens, torch.Tensor) and seq_lens.device.type != "cpu":
        raise ValueError("dmattn.paged_kv_slots: seq_lens must be host ints (a list or a CPU tensor: a device tensor "
                         "would need a sync to size the slots); pass seqused_k to the op instead")
    lens = [int(n) for n in seq_lens]
    if len(lens) != batch or any(n < 0 or n > capacity for n in lens):
        raise ValueError(f"dmattn.paged_kv_slots: seq_lens must hold B = {batch} lengths in [0, {capacity}] "
                         f"(pages_per_seq x page_size), got {lens}")
    total = sum(lens)
    cu = torch.tensor([0, *lens], dtype=torch.int64).cumsum(0)
    seq = torch.repeat_interleave(torch.arange(batch, device=dev), torch.tensor(lens, device=dev), output_size=total)
    pos = torch.arange(total, device=dev) - cu[:-1].to(dev)[seq]
    slots = (block_table.long()[seq, pos // page_size] * page_size + pos % page_size).to(torch.int32)
    return slots, cu.to(device=dev, dtype=torch.int32), max(lens, default=0)


def _window_sides(window_size) -> Tuple[int, int]:
    """(left, right) of ``window_size`` (None: (-1, -1)); its Python type checked here, its values by the op."""
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        got = f"{type(window_size).__qualname__} of length {len(window_size)}" if isinstance(
            window_size, (tuple, list)) else type(window_size).__qualname__
        raise TypeError(f"{rules.OP}: window_size must be a (left, right) pair of ints or None, got {got}")
    return window_size[0], window_size[1]


def cu_seqlens(lengths: Union[Sequence[int], torch.Tensor], *, device=None) -> torch.Tensor:
    """The (B + 1,) int32 ``cu_seqlens`` of sequences of the given lengths: 0, then the running sums.

    ``lengths`` is a sequence of ints or a 1-D integer tensor (kept on its device unless ``device`` is given)."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=device)
    if lengths.dim() != 1:
        raise ValueError(f"dmattn.cu_seqlens: lengths must be 1-D, got shape {tuple(lengths.shape)}")
    return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)


def check_cu_seqlens(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    total_q: int,
    total_k: int,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    seqused_k: Optional[torch.Tensor] = None,
) -> None:
    """Checks the values of ``cu_seqlens_q`` / ``cu_seqlens_k`` (and ``seqused_k``) as the CPU kernel does, on any
    device.

    The CUDA kernels never read ``cu_seqlens`` on the host (that would synchronize the device), so they report no
    lying values (not starting at 0, decreasing, past the total, a sequence longer than its max_seqlen; see
    docs/contract.md for what such values give). This is the check mode for CUDA callers: it copies the values to the
    host, so it synchronizes, and raises the ValueError the CPU kernel would, with the same message, checking
    cu_seqlens_q before cu_seqlens_k. It also checks their type, dtype and shape as ``varlen_attention`` does.

    Args:
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32, as passed to ``varlen_attention``.
        total_q, total_k: q.shape[0] and k.shape[0].
        max_seqlen_q, max_seqlen_k: as passed to ``varlen_attention``.
        seqused_k: (B,) int32 or None, as passed to ``varlen_attention``: each entry within its sequence's keys.
    """
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        rules.check_cu_seqlens_tensor(name, t)
    for name, cu, total, max_seqlen, total_name, max_name in (
        ("cu_seqlens_q", cu_seqlens_q, total_q, max_seqlen_q, "total_q", "max_seqlen_q"),
        ("cu_seqlens_k", cu_seqlens_k, total_k, max_seqlen_k, "total_k", "max_seqlen_k"),
    ):
        c = cu.to("cpu", torch.int64)
        if c[0] != 0:
            _value_error(f"{name}[0] must be 0, got {int(c[0])}")
        lengths = c[1:] - c[:-1]
        bad = ((lengths < 0) | (lengths > max_seqlen)).nonzero()
        if len(bad) > 0:  # the first bad sequence, as the kernel's loop finds it
            b = int(bad[0])
            if lengths[b] < 0:
                _value_error(
                    f"{name} must be non-decreasing, got {name}[{b}] = {int(c[b])} > {name}[{b + 1}] = {int(c[b + 1])}"
                )
            _value_error(f"sequence {b} has {int(lengths[b])} tokens in {name}, more than {max_name} = {max_seqlen}")
        if c[-1] > total:
            _value_error(f"{name}[-1] must be <= {total_name} = {total}, got {int(c[-1])}")
    if seqused_k is not None:
        lengths = cu_seqlens_k.to("cpu", torch.int64).diff()
        used = seqused_k.to("cpu", torch.int64)
        bad = ((used < 0) | (used > lengths)).nonzero()
        if len(bad) > 0:
            b = int(bad[0])
            _value_error(f"seqused_k[{b}] must be in [0, {int(lengths[b])}] (the keys of sequence {b} in "
                         f"cu_seqlens_k), got {int(used[b])}")


def _value_error(msg):
    raise ValueError(f"{rules.OP}: {msg}")
