"""dmattn_ops as a Hugging Face transformers attention implementation.

    from dmattn_ops.integrations import transformers as dmattn_transformers
    dmattn_transformers.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="dmattn")

``register()`` also installs ``"paged|dmattn"`` for continuous batching (``generate_batch``; see
``paged_attention_forward``). For ``"dmattn"`` it installs two functions under one name, so padding (or anything
else transformers puts in a mask) can never be dropped silently: the attention function, and the mask function
transformers calls to prepare that attention's mask (transformers passes ``attention_mask=None`` to an attention
function registered alone). The mask is mostly the 2-D padding mask itself, ``(batch, keys)``, which becomes the op's
key-side mask: nothing ``(queries x keys)``-sized is built for causal layers (``padding_mask`` says what else it can
be: key positions for a chunked layer, sequence ids for a packed batch, transformers' full mask for an overlay).

What it handles: padded batches (left or right), GQA / MQA, the model's ``scaling``, causal decoder layers with a
dynamic or static cache (keys past the tokens seen so far are never visible), sliding-window layers (the op's native
window: key tiles outside it are skipped, no mask is built), chunked-attention layers (Llama 4's: each query's chunk
as the op's key_range, counted from the row's first real token as transformers counts it), attention logit softcapping (Gemma 2) and learned
attention sinks (gpt-oss's ``s_aux``) natively, packed rows given as ``cu_seq_lens_q`` / ``cu_seq_lens_k`` /
``max_length_q`` / ``max_length_k`` keyword arguments (what ``DataCollatorWithFlattening`` produces), packed
batches transformers infers from restarting ``position_ids`` (each query's own sequence as the op's key_range, rows of
any batch size), and whatever else a model composes into its mask function (``or_mask_function`` overlays, block ids:
transformers' own full mask, run as a query-side mask; see ``padding_mask``). Every length is a Python int of the
tensors' shapes; the one host sync is the mask function's check, in eager mode, whether any key is padding at all
(once per forward and mask kind, as transformers' sdpa and flash-attention paths check): an unpadded batch's layers
then run with no mask. Compiled code cannot read a mask function's parts, so there packed batches take the full
mask too (kept to each sequence where ``cu_seq_lens_*`` come).

Encoder (non-causal) layers take the padding mask as a key-side mask too (BERT, RoBERTa; ModernBERT's local layers,
whose bidirectional window transformers composes into the mask function, take its full mask).

Multi-head latent attention (DeepSeek-V3 and its kin: a value head dim below the key's) runs with the values zero-padded
to the key's head dim and the output cut back. DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5, HY-V4: an indexer picks
each query's top-k keys and transformers passes them as ``indices``) runs each query over its selected keys: a decode
step gathers those keys' rows and reads nothing else of the cache (``_attend_selected``); such a model's mask function
gives transformers' full mask, which its indexer reads too.

MiniMax M3's block-sparse attention (``block_indices``: blocks of keys kept per query and index head) runs as the op's
mask per index head (_selected_blocks). An additive 4-D mask a model makes itself (Doge's dynamic mask: each kept key's
gate) runs as the op's bias beside the mask of its kept keys (_attend_additive); such a model, like a sparse-attention
one, gets transformers' full mask from the mask function (``_READS_THE_MASK``). A model's additive score bias passed as
``position_bias`` (T5's relative position bias, which eager adds to the scores) becomes the op's query-side bias
``(B Lq, Hb, Lk)`` (_bias_rows). Those calls take the packed copy of K and V. An encoder-decoder's decoder
self-attention gets transformers' full mask: some (UMT5, NLLB-MoE, Pegasus-X) keep its causality in that mask alone.

What it refuses, with an error naming it: dropout while training, a value head dim wider than the key's,
output_attentions, top-k indices, block indices or a position bias over packed rows (a keyword a model needs applied
is never dropped: ignoring T5's position_bias gave other logits before it was run).

The cache is read in place, prefill and decode alike: the ``(batch, kv_heads, keys, head_dim)`` tensors seen as packed
``(rows, kv_heads, head_dim)`` rows (a strided view, ``_cache_as_rows``), sequence b at rows ``b R ..`` with the op's
``seqused_k`` saying how many of them it uses, and a key-side mask only for padding. Compiled code (torch.compile)
and head dims the CUDA build pads take a packed copy instead.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch

import dmattn_ops
from dmattn_ops import _kept
from dmattn_ops._meta import rules

NAME = "dmattn"


def register(name: str = NAME) -> str:
    """Registers the attention function and its mask function as ``attn_implementation=name``; returns name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("dmattn_ops.integrations.transformers needs the transformers package (>= 5.0)") from e
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    AttentionInterface.register(f"paged|{name}", paged_attention_forward)
    return name


# What paged_attention_forward refuses beside a value head dim unlike the key's.
_NOT_PAGED = ("indices", "block_indices", "position_bias")


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                            scaling: Optional[float] = None, cache=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                            max_seqlen_q=None, max_seqlen_k=None, block_table=None, **kwargs):
    """``attn_implementation="paged|dmattn"``: transformers' continuous batching (``generate_batch``). Its cache is a
    token pool per layer group, and ``read_index[group]`` names the slot of every key the batch reads, packed as
    ``cu_seq_lens_k`` counts them: the op's ``kv_slots``. A full-attention layer writes this step's keys into the pool
    and attends over it in place (no gather of the cache); a sliding-window layer reads before it writes (its pages
    are a ring), so it takes the cache's gathered keys. query ``(1, H, total_q, D)``; returns ``(1, total_q, H, D)``."""
    if cache is None:
        raise ValueError("dmattn_ops: attn_implementation='paged|dmattn' runs under transformers' continuous batching, "
                         "which passes its paged cache; use attn_implementation='dmattn' for a standard forward")
    if block_table is not None:  # transformers offers its decode fast path to FlashAttention only
        raise NotImplementedError("dmattn_ops (paged|dmattn): the block-table decode fast path is not supported; "
                                  "set ContinuousBatchingConfig(max_blocks_per_request=0)")
    _refuse(module, query, key, value, dropout, kwargs)
    if _layer_chunk(module) is not None:
        raise NotImplementedError("dmattn_ops (paged|dmattn): chunked-attention layers are not supported yet; use "
                                  "attn_implementation='dmattn'")
    if value.shape[-1] != key.shape[-1] or any(kwargs.get(k) is not None for k in _NOT_PAGED):
        raise NotImplementedError("dmattn_ops (paged|dmattn): multi-head latent attention (a value head dim unlike the "
                                  "key's), sparse attention's indices and a position_bias are not supported yet; use "
                                  "attn_implementation='dmattn'")
    sliding = getattr(module, "sliding_window", None)
    layer_type = "sliding_attention" if sliding else "full_attention"
    if isinstance(cu_seq_lens_k, dict):
        cu_seq_lens_k, max_seqlen_k = cu_seq_lens_k[layer_type], max_seqlen_k[layer_type]
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))
    extra = dict(softmax_scale=scaling, is_causal=True, window_size=(sliding - 1, -1) if sliding else None,
                 softcap=kwargs.get("softcap") or None, sinks=sinks)
    q = query[0].transpose(0, 1)  # (total_q, H, D)
    cu_q, cu_k = cu_seq_lens_q.to(torch.int32), cu_seq_lens_k.to(torch.int32)
    group, layer_in_group = cache.layer_index_to_group_indices[module.layer_idx]
    read, write = kwargs["read_index"][group], kwargs["write_index"][group]
    if read.numel() > 0 and cache.sliding_windows[module.layer_idx] == 1:  # full attention: the pool in place
        k_pool, v_pool = cache.key_cache[layer_in_group], cache.value_cache[layer_in_group]
        k_pool.index_copy_(0, write, key[0].transpose(0, 1))
        v_pool.index_copy_(0, write, value[0].transpose(0, 1))
        out = _varlen(q, k_pool, v_pool, cu_q, cu_k, max_seqlen_q, max_seqlen_k, kv_slots=read.to(torch.int32),
                      **extra)
    else:  # no cache read (a prefill-only batch: the new keys are all of them), or a sliding window's ring
        k, v = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx,
                            read_index=kwargs["read_index"], write_index=kwargs["write_index"])
        out = _varlen(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, **extra)
    return out.unsqueeze(0), None


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask: Optional[torch.Tensor] = None, local_size: Optional[int] = None, config=None,
                 device=None, **kwargs) -> Optional[torch.Tensor]:
    """The mask function: the 2-D padding mask of the keys the layer sees, ``(batch, n)`` bool with n <= kv_length
    (a static cache holds kv_length slots but n tokens so far), or None when the caller has no padding mask. A static
    cache called without one (cache_position alone, as an exported decoder calls it) gives ``(batch,)`` int32 instead:
    the tokens so far, from q_offset (``_keys_seen``).

    For a chunked-attention layer (transformers' ``create_chunked_causal_mask``, Llama 4) the chunks count from each
    row's first real token and the layer's cache may hold only its last keys (kv_offset), which the attention
    function cannot see: there the mask is ``(batch, n)`` int32, each key's position among its row's real tokens
    (-1 for padding), always given, from which ``attention_forward`` builds every query's chunk as a key_range.

    transformers may compose more into ``mask_function`` than causal, window and chunk: the packed-sequence mask it
    infers from restarting ``position_ids`` (no padding mask, no cache: a training batch), a model's ``or_mask_function``
    / ``and_mask_function`` overlays (Gemma 3's bidirectional image tokens, say) or ``block_sequence_ids``. Packing
    alone comes as ``(batch, n)`` int64, each token's sequence in its row (the attention function runs it as
    ``key_range``, no ``(queries x keys)`` mask); anything else the attention function cannot express comes as
    transformers' own full ``(batch, 1, q_length, kv_length)`` bool mask, a query-side mask for the op (correct, and
    as large as sdpa's). See ``_mask_structure`` for how the two are told apart."""
    structure = _mask_structure(mask_function, q_length, kwargs)
    chunk = _mask_chunk(local_size, config)
    packed = isinstance(structure, torch.Tensor)
    if packed and (chunk is not None or attention_mask is not None or kv_offset != 0 or q_length != kv_length or
                   structure.shape != (batch_size, kv_length)):
        structure = "full"  # packing beside a chunk, padding or a cache: not one the attention function expresses
    if any(getattr(config, name, None) is not None for name in _READS_THE_MASK):
        structure = "full"  # the model reads transformers' 4-D mask itself (its indexer, its dynamic mask)
    if (getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False)) and \
            _has_causal_part(mask_function):
        # A decoder's self-attention in an encoder-decoder: some leave their modules' is_causal False and keep
        # causality in this mask alone (UMT5, NLLB-MoE, Pegasus-X), so the attention function gets all of it.
        structure = "full"
    if structure == "full":
        from transformers.masking_utils import sdpa_mask

        return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                         kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                         local_size=local_size, allow_is_causal_skip=False,
                         use_vmap=kwargs.get("use_vmap", False), device=device)
    if packed:
        return structure.to(torch.int64)
    seen = None if attention_mask is not None else _keys_seen(batch_size, q_length, kv_length, q_offset, mask_function,
                                                              device)
    if chunk is not None:
        if seen is not None:
            raise NotImplementedError("dmattn_ops (attn_implementation='dmattn'): a chunked-attention layer over a "
                                      "static cache without an attention_mask; pass the attention_mask")
        return _key_positions(batch_size, kv_length, kv_offset, attention_mask, device)
    if attention_mask is None:
        return seen
    return _unless_unpadded(attention_mask[:, -kv_length:].to(torch.bool))


# Config attributes of models that read the attention mask transformers makes before their attention function gets
# it, as a 4-D tensor: DeepSeek Sparse Attention's indexer (index_topk), Doge's dynamic mask (keep_window_size).
_READS_THE_MASK = ("index_topk", "keep_window_size")


def _keys_seen(batch_size: int, q_length: int, kv_length: int, q_offset, mask_function,
               device) -> Optional[torch.Tensor]:
    """Without a padding mask: how many of the kv_length keys the layer gets hold tokens, (batch,) int32, which
    attention_forward passes as the op's seqused_k (the causal and window alignment count them; the keys past them
    are never read); None where all of them do.

    A static cache's kv_length is its slots, the tokens so far only the first q_offset + q_length of them:
    transformers gives q_offset (the tokens before this step) as a device tensor there, read without a sync, but as
    the int 0 on the cache's first call (the prefill). A cross-attention layer's kv_length is its encoder's, all of
    them real, with q_offset 0 and fewer queries than keys too: an int q_offset short of kv_length counts only for a
    causal mask, whose keys past the last query are never visible anyway. A dynamic cache's kv_length is its
    tokens."""
    if isinstance(q_offset, torch.Tensor):
        seen = q_offset.reshape(-1)[0].to(device=device, dtype=torch.int32) + q_length
        return seen.clamp(max=kv_length).reshape(1).repeat(batch_size)  # the op wants it contiguous
    if q_offset + q_length >= kv_length or not _has_causal_part(mask_function):
        return None
    return torch.full((batch_size,), q_offset + q_length, dtype=torch.int32, device=device)


def _has_causal_part(fn) -> bool:
    """Whether transformers' mask function is, or (in eager mode, an and_masks closure's parts) includes, its causal
    mask function. Compiled code cannot read a closure: there only the causal function itself counts."""
    from transformers.masking_utils import causal_mask_function

    if fn is causal_mask_function:
        return True
    if torch.compiler.is_compiling() or getattr(fn, "__qualname__", None) != _AND_MASKS:
        return False
    parts = _closure_value(fn, "mask_functions")
    return isinstance(parts, tuple) and any(_has_causal_part(f) for f in parts)


# The all-True padding mask's stand-in (_unless_unpadded), per device: a 0-d True whose expanded views mean "no key is
# padding", which attention_forward tells from a user's mask by its storage (no read of its values; the dict keeps
# the tensor alive, so no other tensor can have that address).
_ALL_REAL: "dict[torch.device, torch.Tensor]" = {}


def _unless_unpadded(mask: torch.Tensor) -> torch.Tensor:
    """The padding mask, or where no key is padding (a tokenizer's mask of an unpadded batch, generate's for one
    sequence) a stride-0 view of one True of the same shape, so that attention_forward runs the layer without a mask
    (on CUDA a key-side mask costs every layer its compaction passes) while still reading the keys' count off its
    width (a static cache holds more slots than tokens). Finding out takes one host sync per forward and mask kind,
    which transformers' own sdpa and flash-attention mask functions pay too; none where a sync is not allowed (compiled
    or traced code, CUDA graph capture, fake tensors): there the mask stays as it is."""
    if (type(mask) is not torch.Tensor or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (mask.is_cuda and torch.cuda.is_current_stream_capturing()) or not bool(mask.all())):
        return mask
    true = _ALL_REAL.get(mask.device)
    if true is None:
        true = _ALL_REAL[mask.device] = torch.ones((), dtype=torch.bool, device=mask.device)
    return true.expand(mask.shape)


def _is_unpadded(mask: Optional[torch.Tensor]) -> bool:
    """Whether mask is _unless_unpadded's stand-in (or a view of it). By storage, not by ``_base``: a view of a tensor
    made under torch.inference_mode, taken outside it, has no ``_base``."""
    if mask is None or torch.compiler.is_compiling() or type(mask) is not torch.Tensor:
        return False
    true = _ALL_REAL.get(mask.device)
    return true is not None and mask.data_ptr() == true.data_ptr() and not any(mask.stride())


# transformers.masking_utils' mask functions the attention function implements itself (causal, bidirectional, the
# sliding window and the chunk overlays; the window and chunk sizes reach it as the layer's own), and the combinators
# whose parts are read from their closures. Named by qualified name: the overlays are closures made per call.
_PLAIN_MASKS = frozenset({"causal_mask_function", "bidirectional_mask_function",
                          "sliding_window_overlay.<locals>.inner_mask", "chunked_overlay.<locals>.inner_mask"})
_PACKED_MASK = "packed_sequence_mask_function.<locals>.inner_mask"
_AND_MASKS = "and_masks.<locals>.and_mask"
# transformers.masking_utils' parts known to need the full mask; any other function of that module (a transformers
# version this module was not written against) takes it too, with a warning once: it may make every layer's mask full.
_FULL_MASKS = frozenset({"or_masks.<locals>.or_mask", "blockwise_overlay.<locals>.inner_mask",
                         "sliding_window_bidirectional_overlay.<locals>.inner_mask",
                         "padding_mask_function.<locals>.inner_mask"})
_WARNED: set = set()


def _mask_structure(mask_function, q_length: int, kwargs: dict):
    """What transformers composed into mask_function: "plain" (causal, window or chunk: the layer's own), the
    ``(batch, n)`` sequence ids of a packed batch when packing is all that was added, or "full" (anything else).

    In eager mode the function's parts are read (an ``and_masks`` closure's functions, recursively); a part that is
    not one of transformers' plain masks or its packed-sequence mask makes it "full", so a mask function this module
    does not know is never dropped. Dynamo cannot read a closure, so compiled code goes by the flag transformers
    clears whenever it adds a part (``allow_is_causal_skip=False``): "full" then, packing included, but for a decode
    step of one query (transformers clears the flag for a compiled static-cache decode step too; no part applies to
    a decode step's row: packing never comes with a cache)."""
    if torch.compiler.is_compiling():
        return "full" if kwargs.get("allow_is_causal_skip", True) is False and q_length > 1 else "plain"
    packed = []
    if not _known_parts(mask_function, packed):
        return "full"
    if not packed:
        return "plain"
    return packed[0] if len(packed) == 1 and isinstance(packed[0], torch.Tensor) and packed[0].dim() == 2 else "full"


def _known_parts(fn, packed: list) -> bool:
    """Whether fn is made of plain masks and packed-sequence masks only (whose id tensors go to packed)."""
    if fn is None:
        return True
    if getattr(fn, "__module__", None) != "transformers.masking_utils":
        return False
    name = getattr(fn, "__qualname__", None)
    if name in _PLAIN_MASKS:
        return True
    if name == _PACKED_MASK:
        ids = _closure_value(fn, "packed_sequence_mask")
        packed.append(ids)
        return ids is not None
    if name == _AND_MASKS:
        parts = _closure_value(fn, "mask_functions")
        if isinstance(parts, tuple):
            return all(_known_parts(f, packed) for f in parts)
    elif name in _FULL_MASKS:
        return False
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"dmattn_ops (attn_implementation='dmattn'): transformers' mask function {name} is not one this "
                      "backend reads (another transformers version?); it takes transformers' full mask, which is "
                      "correct but as large as sdpa's", stacklevel=2)
    return False


def _closure_value(fn, name: str):
    """The value of the free variable `name` of closure fn, or None."""
    try:
        return fn.__closure__[fn.__code__.co_freevars.index(name)].cell_contents
    except (AttributeError, ValueError, IndexError, TypeError):
        return None


def _mask_chunk(local_size: Optional[int], config) -> Optional[int]:
    """The chunk size when transformers builds a chunked-attention layer's mask (it passes ``local_size``, the chunk,
    as it passes a sliding window's size for a sliding layer), else None."""
    if local_size is None or config is None:
        return None
    types = getattr(config, "layer_types", None) or ()
    chunk = getattr(config, "attention_chunk_size", None)
    if "chunked_attention" not in types or local_size != chunk:
        return None
    if "sliding_attention" in types and getattr(config, "sliding_window", None) == local_size:
        raise NotImplementedError(f"dmattn_ops (attn_implementation='dmattn'): a model whose sliding window and "
                                  f"attention chunk are both {local_size} keys (their masks cannot be told apart)")
    return chunk


def _key_positions(batch_size: int, kv_length: int, kv_offset: int, attention_mask: Optional[torch.Tensor],
                   device) -> torch.Tensor:
    """(batch, n) int32: the position of each key the layer sees (columns kv_offset .. of the tokens so far) among
    its row's real tokens, -1 for a padding token. transformers' chunks count from the row's left padding; the real
    tokens' positions are that count whether the padding is on the left or the right."""
    if attention_mask is None:
        pos = torch.arange(kv_offset, kv_offset + kv_length, dtype=torch.int32, device=device)
        return pos.expand(batch_size, kv_length)
    real = attention_mask.to(torch.bool)
    pos = torch.where(real, real.cumsum(-1) - 1, -1).to(torch.int32)
    return pos[:, kv_offset:kv_offset + kv_length]


def _layer_chunk(module: torch.nn.Module) -> Optional[int]:
    """The attention chunk of a chunked-attention layer (config.layer_types, as Llama 4's), else None. Read once per
    module and config object: a config's attributes go through transformers' own __getattribute__, a few us a layer
    of every step otherwise."""
    config = getattr(module, "config", None)
    kept = _LAYER_CHUNKS.get(module) if config is not None else None
    if kept is not None and kept[0] is config:
        return kept[1]
    types = getattr(config, "layer_types", None)
    layer = getattr(module, "layer_idx", None)
    chunk = None
    if types and layer is not None and layer < len(types) and types[layer] == "chunked_attention":
        chunk = config.attention_chunk_size
    if config is not None:
        _LAYER_CHUNKS[module] = (config, chunk)
    return chunk


_LAYER_CHUNKS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _chunk_ranges(positions: torch.Tensor, Lq: int, Lk: int, chunk: int) -> torch.Tensor:
    """(B * Lq, 2) int32 key_range of a chunked layer's queries: query i of row b is the key at column Lk - Lq + i
    of the Lk it sees (bottom-right aligned), at position p among its row's real tokens (positions: (B, >= Lk), as
    _key_positions gives them), and sees the keys of its chunk up to itself, the p % chunk real tokens before it: the
    columns [Lk - Lq + i - p % chunk, Lk - Lq + i]. A padding query (p = -1) sees none."""
    B = positions.shape[0]
    own = positions[:, Lk - Lq:Lk]
    end = torch.arange(Lk - Lq + 1, Lk + 1, dtype=torch.int32, device=positions.device).expand(B, Lq)
    begin = torch.where(own >= 0, end - 1 - own % chunk, end)
    return torch.stack([begin, end], dim=-1).reshape(B * Lq, 2).to(torch.int32)


def _refuse(module, query, key, value, dropout, kwargs) -> None:
    def fail(what: str) -> None:
        raise NotImplementedError(f"dmattn_ops (attn_implementation='dmattn'): {what} is not supported yet; use "
                                  "attn_implementation='sdpa' or 'eager' for this model")

    if dropout:
        fail(f"attention dropout while training (dropout={dropout})")
    if value.shape[-1] > key.shape[-1]:
        fail(f"a value head dim ({value.shape[-1]}) wider than the key's ({key.shape[-1]})")
    if kwargs.get("output_attentions"):
        fail("output_attentions=True (the op never forms the attention weights)")


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: Optional[torch.Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      sliding_window: Optional[int] = None, is_causal: Optional[bool] = None, **kwargs):
    """The attention function: query ``(B, H, Lq, D)``, key / value ``(B, Hk, Lk, D)`` (the cache), attention_mask as
    padding_mask returns it. Returns ``(B, Lq, H, Dv)`` and no attention weights.

    Multi-head latent attention (DeepSeek-V3's and its kin's value head dim Dv below the key's D): the values are
    zero-padded to D and the output cut back to Dv, as transformers' FlashAttention path does (the op runs one head
    dim): the whole cache's values (a copy), but for a sparse-attention decode step, which gathers the selected keys'
    rows alone (``_attend_selected``)."""
    _refuse(module, query, key, value, dropout, kwargs)
    value_dim = value.shape[-1]
    out = _attention(module, query, key, value, attention_mask, scaling, sliding_window, is_causal, kwargs)
    return (out if value_dim == key.shape[-1] else out[..., :value_dim]), None


def _as_key_wide(value: torch.Tensor, width: int) -> torch.Tensor:
    """value zero-padded along its head dim to width (multi-head latent attention), or value itself."""
    return value if value.shape[-1] == width else torch.nn.functional.pad(value, (0, width - value.shape[-1]))


def _attention(module, query, key, value, attention_mask, scaling, sliding_window, is_causal,
               kwargs) -> torch.Tensor:
    """attention_forward's output ``(B, Lq, H, D)``: value's head dim may be below the key's D."""
    B, _, Lq, _ = query.shape
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q = query.transpose(1, 2)  # (B, Lq, H, D)
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux", kwargs.get("sinks"))  # gpt-oss passes its (H,) sink logits as s_aux
    # T5's relative position bias (and its kin's): the op's query-side bias
    position_bias = kwargs.get("position_bias")
    _refuse_together(kwargs)
    if kwargs.get("indices") is not None:  # sparse attention: each query's top-k keys (DeepSeek-V3.2, GLM-5)
        return _attend_selected(q, key, value, attention_mask, kwargs["indices"], scaling, softcap, sinks)
    value = _as_key_wide(value, key.shape[-1])
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        # transformers' full mask (padding_mask: parts this module does not express), or a prepared boolean one
        if kwargs.get("block_indices") is not None:
            raise NotImplementedError("dmattn_ops (attn_implementation='dmattn'): block-sparse attention's "
                                      "block_indices beside transformers' full mask is not supported yet; use "
                                      "attn_implementation='sdpa' or 'eager' for this model")
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None and cu_k is not None and B == 1:  # packed rows: each query keeps to its own sequence
            return _attend_full_mask_packed(q, key, value, attention_mask, cu_q, cu_k, kwargs.get("max_length_q"),
                                            kwargs.get("max_length_k"), scaling, softcap, sinks)
        return _attend_full_mask(q, key, value, attention_mask, scaling, softcap, sinks, position_bias)
    seen = None
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.is_floating_point():
        # an additive mask the model made itself (Doge's dynamic mask: its gates where a key is kept), and beside it
        # a position bias eager adds too (Switch Transformers)
        if kwargs.get("cu_seq_lens_q") is not None:
            raise NotImplementedError("dmattn_ops (attn_implementation='dmattn'): an additive 4-D attention mask "
                                      "over packed rows is not supported yet")
        if position_bias is not None:
            attention_mask = attention_mask + position_bias[..., :attention_mask.shape[-1]]
        window = (sliding_window - 1, -1) if sliding_window is not None else None
        return _attend_additive(q, key, value, attention_mask, scaling, softcap, sinks, window)
    if attention_mask is not None and attention_mask.dim() == 1 and attention_mask.dtype == torch.int32:
        seen, attention_mask = attention_mask, None  # padding_mask: the tokens a static cache holds (_keys_seen)
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"dmattn_ops (attn_implementation='dmattn'): a prepared {attention_mask.dim()}-D "
                                  f"{attention_mask.dtype} attention mask is not supported; pass the 2-D padding mask "
                                  "(or a 4-D one: boolean, True where a query sees a key, or additive)")
    sequence_ids = None
    if attention_mask is not None and attention_mask.dtype == torch.int64:  # a packed batch (padding_mask)
        sequence_ids, attention_mask = attention_mask, None
    chunk, positions = _layer_chunk(module), None
    if chunk is not None:  # padding_mask gave the keys' positions among their rows' real tokens
        if attention_mask is None or attention_mask.dtype != torch.int32:
            raise ValueError("dmattn_ops: a chunked-attention layer needs the key positions dmattn_ops' mask function "
                             "gives (register both with dmattn_ops.integrations.transformers.register())")
        positions = attention_mask
        attention_mask = positions >= 0
    # transformers' sliding window W: a query sees itself and the W - 1 keys before it.
    window = (sliding_window - 1, -1) if sliding_window is not None else None
    if window is not None and not causal:  # a bidirectional window comes in the full mask (padding_mask)
        raise NotImplementedError("dmattn_ops (attn_implementation='dmattn'): a non-causal sliding-window layer "
                                  "without its full mask (register the mask function with register())")
    extra = dict(softmax_scale=scaling, is_causal=causal, window_size=window, softcap=softcap or None, sinks=sinks)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:  # packed rows in one batch row: already the op's layout
        if B != 1:
            raise ValueError(f"dmattn_ops: cu_seq_lens_q / cu_seq_lens_k describe packed rows of a batch of 1, "
                             f"got a batch of {B}")
        # A max length given as a tensor is not read (that would sync): the row's length bounds every sequence.
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        same = cu_q is cu_k  # (before the conversion, which makes two tensors of one int64 tensor)
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if chunk is not None:
            if Lq != key.shape[2] or (not same and not torch.equal(cu_q, cu_k)):
                raise NotImplementedError("dmattn_ops (attn_implementation='dmattn'): a chunked-attention layer over "
                                          "packed rows with a cache (its packed queries and keys differ)")
            # each sequence's chunks from its own first token, as if it were alone (what packing promises;
            # transformers' sdpa and eager paths count them along the row instead)
            extra["key_range"] = dmattn_ops.chunked_causal(cu_q, cu_k, chunk).key_range(Lq)
        out = _varlen(
            q[0], key[0].transpose(0, 1), value[0].transpose(0, 1), cu_q, cu_k,
            max_q if isinstance(max_q, int) else Lq, max_k if isinstance(max_k, int) else key.shape[2], **extra)
        return out.unsqueeze(0)

    # Keys the layer has seen: a padding mask is as long as the tokens so far, a static cache may hold more slots.
    Lk = key.shape[2] if attention_mask is None else attention_mask.shape[-1]
    if Lk > key.shape[2]:
        raise ValueError(f"dmattn_ops: the padding mask covers {Lk} keys but the cache holds {key.shape[2]}")
    real = None if _is_unpadded(attention_mask) else attention_mask  # (B, Lk) bool or None: the keys b has
    if chunk is not None:  # each query's chunk, up to itself, as a key_range (causal and left padding included)
        extra["key_range"] = _chunk_ranges(positions, Lq, Lk, chunk)
    blocks = kwargs.get("block_indices")
    # In place through an as_strided row view, in eager mode: compiled code gets the packed copy below (under
    # torch.compile an as_strided of the cache is taken against whatever layout inductor gives the cache).
    if (B > 1 and sequence_ids is None and position_bias is None and blocks is None and _no_padding_copy(query)
            and not torch.compiler.is_compiling()):
        rows = _cache_as_rows(key, value)
        if rows is not None:
            return _attend_in_place(q, rows, real, Lk, extra, seen)
    if blocks is not None:  # block-sparse attention: the selected blocks' keys, per index head, and the padding
        mask = _selected_blocks(blocks, module, q.shape[2], key.shape[1], Lk, real)
    else:
        mask = real.reshape(B * Lk, 1) if real is not None else None  # key-side, one head
    if seen is not None:
        extra["seqused_k"] = seen
    return _attend_copied(q, key, value, Lk, mask, sequence_ids, position_bias, **extra)


def _selected_blocks(blocks: torch.Tensor, module, H: int, Hk: int, Lk: int,
                     real: Optional[torch.Tensor]) -> torch.Tensor:
    """MiniMax M3's block-sparse attention: its indexer keeps, per index head, query and sequence, a few blocks of
    ``index_block_size`` consecutive key slots (``block_indices (B, H_idx, Lq, k)``, -1 for none), and the query
    sees the keys of those blocks (on top of causality and padding). As the op's mask: key-side ``(B Lk, Hm)`` for one
    query per sequence (a decode step: the kernels skip the keys outside the blocks), query-side ``(B Lq, Hm, Lk)``
    otherwise, with the padding folded in; Hm the index heads, which each serve H / H_idx query heads as transformers'
    eager path maps them (repeated to H where that is not 1 or Hk)."""
    B, H_idx, Lq, _ = blocks.shape
    size = module.config.index_block_size
    n_blocks = -(-Lk // size)
    columns = blocks.to(torch.int64)
    picked = torch.zeros((B, H_idx, Lq, n_blocks + 1), dtype=torch.bool, device=blocks.device)
    picked.scatter_(-1, torch.where((columns >= 0) & (columns < n_blocks), columns, n_blocks), True)
    keys = picked[..., :n_blocks].repeat_interleave(size, dim=-1)[..., :Lk]  # (B, H_idx, Lq, Lk)
    if H_idx not in (1, Hk, H):
        keys = keys.repeat_interleave(H // H_idx, dim=1)
    if real is not None:
        keys = keys & real[:, None, None, :Lk].to(torch.bool)
    return _op_layout(keys)


def _refuse_together(kwargs: dict) -> None:
    """What transformers may pass that this backend does not run in a combination (each alone it runs), and what it
    does not run at all (a keyword a model needs applied, which ignoring would silently change its output)."""
    def fail(what: str) -> None:
        raise NotImplementedError(f"dmattn_ops (attn_implementation='dmattn'): {what} is not supported yet; use "
                                  "attn_implementation='sdpa' or 'eager' for this model")

    packed = kwargs.get("cu_seq_lens_q") is not None
    if kwargs.get("block_indices") is not None and (packed or kwargs.get("position_bias") is not None):
        fail("block-sparse attention's block_indices over packed rows (cu_seq_lens_q) or beside a position_bias")
    if kwargs.get("indices") is not None and (packed or kwargs.get("position_bias") is not None
                                              or kwargs.get("block_indices") is not None):
        fail("sparse attention's top-k indices over packed rows (cu_seq_lens_q), beside a position_bias or beside "
             "block_indices")
    if kwargs.get("position_bias") is not None and packed:
        fail("a position_bias over packed rows (cu_seq_lens_q)")


def _bias_rows(position_bias: torch.Tensor, B: int, Lq: int, H: int, Hk: int, Lk: int,
               dtype: torch.dtype) -> torch.Tensor:
    """A model's additive score bias ``(1 or B, Hb, Lq, >= Lk)`` (T5's relative position bias: Hb = H, batch 1),
    added to the scaled scores, as the op's query-side bias ``(B Lq, Hb, Lk)`` in q's dtype or float32 (a copy, the
    size of the bias sdpa's path adds)."""
    shape = tuple(position_bias.shape)
    if (position_bias.dim() != 4 or shape[0] not in (1, B) or shape[1] not in (1, Hk, H) or shape[2] != Lq
            or shape[3] < Lk):
        raise ValueError(f"dmattn_ops: a position_bias must be (1 or batch, 1 / Hk / H heads, queries, >= keys) = "
                         f"(1 or {B}, 1 / {Hk} / {H}, {Lq}, >= {Lk}), got {shape}")
    if position_bias.dtype not in (dtype, torch.float32):
        position_bias = position_bias.float()
    rows = position_bias[..., :Lk].expand(B, -1, -1, -1).transpose(1, 2)  # (B, Lq, Hb, Lk)
    return rows.reshape(B * Lq, shape[1], Lk)


def _attend_copied(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, Lk: int, mask: Optional[torch.Tensor],
                   sequence_ids: Optional[torch.Tensor] = None, position_bias: Optional[torch.Tensor] = None,
                   **extra) -> torch.Tensor:
    """The batch as B packed sequences, each of its Lq queries and the cache's first Lk keys (K and V copied packed:
    for B > 1 the reshape copies), under ``mask`` in the op's layout; ``sequence_ids`` (B, Lk): each row's packed
    sequences as documents, each query seeing its own (document_mask's key_range); ``position_bias``: a model's
    additive score bias (_bias_rows). Returns (B, Lq, H, D)."""
    B, Lq, H, D = q.shape
    if position_bias is not None:
        extra["bias"] = _bias_rows(position_bias, B, Lq, H, key.shape[1], Lk, q.dtype)
    Hk = key.shape[1]
    if Lk != key.shape[2]:  # (a dynamic cache holds exactly the keys seen: no slice, one view less a layer)
        key, value = key[:, :, :Lk], value[:, :, :Lk]
    k = key.transpose(1, 2).reshape(B * Lk, Hk, D)
    v = value.transpose(1, 2).reshape(B * Lk, Hk, D)
    cu_q, cu_k = _kept_tensors(("packed", B, Lq, Lk), q.device, lambda: (
        torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=q.device),
        torch.arange(0, (B + 1) * Lk, Lk, dtype=torch.int32, device=q.device)))
    if sequence_ids is not None:
        extra["mask_mod"] = dmattn_ops.document_mask(cu_q, cu_k, sequence_ids.reshape(B * Lk))
    out = _varlen(q.reshape(B * Lq, H, D), k, v, cu_q, cu_k, Lq, Lk, mask=mask, **extra)
    return out.view(B, Lq, H, D)


def _check_full_mask(full: torch.Tensor, batch: int, heads: int, queries: int, slots: int) -> None:
    """A 4-D boolean mask must be (batch, 1 or heads, queries, keys <= the cache's slots)."""
    if full.shape[0] != batch or full.shape[1] not in (1, heads) or full.shape[2] != queries or full.shape[3] > slots:
        raise ValueError(f"dmattn_ops: a 4-D attention mask must be (batch, 1 or heads, queries, keys <= {slots}) = "
                         f"({batch}, 1 or {heads}, {queries}, <= {slots}), got {tuple(full.shape)}")


def _attend_full_mask_packed(q, key, value, full, cu_q, cu_k, max_q, max_k, scaling, softcap, sinks):
    """Packed rows of one batch row (cu_seq_lens_*) under a full mask ``(1, 1 or H, L, Lk)``: the op's packed call
    with the mask's entries of each query's own sequence as a query-side mask ``(L, Hm, max_k)`` (query i, key j of
    its sequence: the mask's column cu_k[s] + j), not the row's ``L x Lk``. The mask transformers makes knows the
    packing only when it inferred it from restarting position_ids; keys of other sequences are never seen here."""
    _, Lq, H, D = q.shape
    _check_full_mask(full, 1, H, Lq, key.shape[2])
    Lk, Hm = full.shape[3], full.shape[1]
    # A max length given as a tensor is not read (that would sync): the row's length bounds every sequence.
    max_q = max_q if isinstance(max_q, int) else Lq
    max_k = max_k if isinstance(max_k, int) else Lk
    cu_q, cu_k = cu_q.to(device=q.device, dtype=torch.int32), cu_k.to(device=q.device, dtype=torch.int32)
    rows = torch.arange(Lq, device=q.device)
    seq = (torch.searchsorted(cu_q, rows.to(torch.int32), right=True) - 1).clamp(0, cu_q.shape[0] - 2)
    start, end = cu_k[seq].long(), cu_k[seq + 1].long()  # each query's sequence's keys: columns [start, end)
    cols = start[:, None] + torch.arange(max_k, device=q.device)  # (L, max_k)
    inside = (cols < end[:, None]) & (cols < Lk)
    if Lk == 0:  # no key at all
        picked = torch.zeros((Hm, Lq, max_k), dtype=torch.bool, device=q.device)
    else:
        picked = full[0].gather(2, cols.clamp(max=Lk - 1)[None].expand(Hm, -1, -1))  # (Hm, L, max_k)
    mask = (picked & inside[None]).permute(1, 0, 2).contiguous()  # (L, Hm, max_k)
    out = _varlen(q[0], key[0, :, :Lk].transpose(0, 1), value[0, :, :Lk].transpose(0, 1), cu_q, cu_k, max_q, max_k,
                  mask=mask, softmax_scale=scaling, softcap=softcap or None, sinks=sinks)
    return out.unsqueeze(0)


def _attend_full_mask(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, full: torch.Tensor, scaling,
                      softcap, sinks, position_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The batch under a full boolean mask ``(B, 1 or H, Lq, Lk)`` (True: the query sees the key; Lk <= the cache's
    slots): the mask says everything (causality, window, padding), so the op runs it alone. One query per sequence
    makes it a key-side mask; more make it the op's query-side mask ``(B Lq, Hm, Lk)``. K and V are copied packed."""
    B, Lq, H, _ = q.shape
    _check_full_mask(full, B, H, Lq, key.shape[2])
    return _attend_copied(q, key, value, full.shape[3], _op_layout(full).contiguous(), softmax_scale=scaling,
                          softcap=softcap or None, sinks=sinks, position_bias=position_bias)


def _op_layout(full: torch.Tensor) -> torch.Tensor:
    """A per-(query, key) operand ``(B, Hm, Lq, Lk)`` in the op's layout for B packed sequences of Lq queries and Lk
    keys: key-side ``(B Lk, Hm)`` where each sequence has one query (its row is per key), query-side
    ``(B Lq, Hm, Lk)`` otherwise (a view where the strides allow)."""
    B, Hm, Lq, Lk = full.shape
    if Lq == 1:
        return full[:, :, 0, :].transpose(1, 2).reshape(B * Lk, Hm)
    return full.transpose(1, 2).reshape(B * Lq, Hm, Lk)


def _attend_additive(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, full: torch.Tensor, scaling, softcap,
                     sinks, window) -> torch.Tensor:
    """The batch under an additive 4-D mask ``(B, 1 or H, Lq, Lk)`` a model made (Doge's dynamic mask: each kept key's
    gate, the dtype's lowest value where a key is hidden by causality, padding or the model's top-k): the op's bias
    in the mask's layout (key-side ``(B Lk, Hm)`` for one query per sequence, query-side ``(B Lq, Hm, Lk)``
    otherwise) and the op's mask of its entries above half the dtype's lowest value, so a hidden key is skipped, not
    weighted by ``e^(lowest)``. The mask holds causality and padding; a sliding window is applied too. K and V are
    copied packed. (A row whose every key is hidden gives zeros, where eager's softmax of equal lowest values averages
    every key.)"""
    B, Lq, H, _ = q.shape
    _check_full_mask(full, B, H, Lq, key.shape[2])
    seen = full > torch.finfo(full.dtype).min / 2
    bias = full if full.dtype in (q.dtype, torch.float32) else full.float()
    return _attend_copied(q, key, value, full.shape[3], _op_layout(seen).contiguous(),
                          bias=_op_layout(bias).contiguous(), softmax_scale=scaling, softcap=softcap or None,
                          sinks=sinks, window_size=window)


def _attend_selected(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, full: Optional[torch.Tensor],
                     indices: torch.Tensor, scaling, softcap, sinks) -> torch.Tensor:
    """DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5): the model's indexer names each query's top-k keys,
    ``indices (B, Lq, k)`` int32 (columns of the keys, distinct, as topk gives them; -1, or a column past the keys,
    names none), and the query sees those of them that transformers' full mask ``(B, 1, Lq, Lk)`` shows it (causality,
    padding; padding_mask gives such a model that mask, which its indexer reads too). value may be narrower than key
    (multi-head latent attention, as these models have).

    A decode step (one query per sequence) gathers its selected keys' K and V rows, B k of them whatever the cache's
    length (the values padded there alone), and runs them as B packed sequences of k keys under a key-side mask of
    the visible ones: the step costs the selection, not the cache. More queries take the selection as a query-side
    mask ``(B Lq, 1, Lk)``, the size of sdpa's mask, over the whole cache."""
    if full is None or full.dim() != 4 or full.dtype != torch.bool:
        raise ValueError("dmattn_ops (attn_implementation='dmattn'): a sparse-attention layer (top-k indices) needs "
                         "transformers' 4-D boolean mask, which dmattn_ops' mask function gives such a model (register "
                         "both with dmattn_ops.integrations.transformers.register())")
    B, Lq, H, D = q.shape
    _check_full_mask(full, B, H, Lq, key.shape[2])
    Lk = full.shape[-1]
    columns = indices.to(torch.int64)
    named = (columns >= 0) & (columns < Lk)  # (B, Lq, k): the index names a key
    if Lq == 1 and full.shape[1] == 1 and Lk > 0:
        picked = torch.where(named[:, 0], columns[:, 0], 0)  # (B, k); a column of no key reads key 0, hidden below
        seen = full[:, 0, 0].gather(1, picked) & named[:, 0]
        k, Hk = picked.shape[1], key.shape[1]

        def as_cache(rows):  # the gathered (B k, Hk, D) rows viewed as a (B, Hk, k, D) cache, which the packed call
            return rows.view(B, k, Hk, D).transpose(1, 2)  # takes back as those rows without a copy

        return _attend_copied(q, as_cache(_selected_rows(key, picked)),
                              as_cache(_as_key_wide(_selected_rows(value, picked), D)), k, seen.reshape(B * k, 1),
                              softmax_scale=scaling, softcap=softcap or None, sinks=sinks)
    # Each query's selection as a row of Lk + 1 columns, the last one a sink for the indices that name no key
    # (scatter_ needs every index in range).
    picked = torch.zeros((B, Lq, Lk + 1), dtype=torch.bool, device=q.device)
    picked.scatter_(-1, torch.where(named, columns, Lk), True)
    return _attend_full_mask(q, key, _as_key_wide(value, D), full & picked[:, None, :, :Lk], scaling, softcap, sinks)


def _no_padding_copy(query: torch.Tensor) -> bool:
    """Whether the op runs this head dim as is. On CUDA a head dim without a compiled kernel is zero-padded, which
    would copy the whole row view (Hk times the cache): the decode step then takes the copying path instead."""
    return not query.is_cuda or query.shape[-1] in _CUDA_HEAD_DIMS


_CUDA_HEAD_DIMS = frozenset(dmattn_ops.build_info().get("cuda_head_dims", ()))


def _cache_as_rows(key: torch.Tensor, value: torch.Tensor):
    """The cache's ``(B, Hk, S, D)`` K and V, each seen without a copy as packed rows ``(rows, Hk, D)``: row
    ``b * R + s`` is position s of sequence b, R = the batch stride over the position stride (Hk x S for a contiguous
    cache; the rows between sequences hold the other heads and are never visible). None when the strides do not allow
    it. Returns (k_rows, v_rows, R)."""
    if key.shape[0] < 2:
        return None
    views = [_as_rows(t) for t in (key, value)]
    if views[0] is None or views[1] is None:
        return None
    (k_rows, r_k), (v_rows, r_v) = views
    return (k_rows, v_rows, r_k) if r_k == r_v else None


def _as_rows(t: torch.Tensor):
    """One ``(B, Hk, S, d)`` cache tensor as _cache_as_rows sees it: ``(rows (rows, Hk, d), R)``, or None."""
    sb, sh, ss, sd = t.stride()
    if sd != 1 or ss <= 0 or sb % ss != 0:
        return None
    rows_per_seq = sb // ss
    B, Hk, S, d = t.shape
    # The last sequence's rows stop at its S positions, so the view ends where the tensor ends.
    n_rows = (B - 1) * rows_per_seq + S
    return t.as_strided((n_rows, Hk, d), (ss, sh, 1)), rows_per_seq


def _selected_rows(t: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
    """The rows ``t[b, :, picked[b, j]]`` of a ``(B, Hk, S, d)`` cache tensor as ``(B k, Hk, d)``, j fastest: one
    index_select over its row view (on the CPU ~5x faster than advanced indexing of the 4-D tensor, which it falls
    back to where the strides allow no row view)."""
    B, k = picked.shape
    rows = _as_rows(t) if B > 1 else (t[0].transpose(0, 1), 0)
    if rows is None or torch.compiler.is_compiling():
        batch = torch.arange(B, device=t.device)[:, None]
        return t[batch, :, picked].reshape(B * k, t.shape[1], t.shape[3])  # (B, k, Hk, d): advanced indices first
    view, R = rows
    return view.index_select(0, (torch.arange(B, device=t.device)[:, None] * R + picked).reshape(B * k))


def _attend_in_place(q: torch.Tensor, rows, real: Optional[torch.Tensor], Lk: int, extra: dict,
                     seen: Optional[torch.Tensor] = None):
    """The batch's queries against the cache in place (no copy of K or V): sequence b is rows [b R, b R + R) of the
    row view (the last one shorter), of which it uses the first Lk (seqused_k: the causal and window alignment count
    those; seen[b] instead where given, a static cache's tokens so far), and with a padding mask a key-side mask keeps
    only the real ones (the rest of its rows are never read)."""
    k_rows, v_rows, R = rows
    B, Lq, H, D = q.shape
    device = q.device
    n_rows = k_rows.shape[0]
    keep = None
    if real is not None:
        padded = torch.nn.functional.pad(real.to(torch.bool), (0, R - Lk))  # (B, R)
        keep = padded.reshape(B * R)[:n_rows].reshape(n_rows, 1)
    cu_q, cu_k, used = _step_metadata(B, Lq, R, n_rows, Lk, device)
    out = _varlen(q.reshape(B * Lq, H, D), k_rows, v_rows, cu_q, cu_k, Lq, R, mask=keep,
                  seqused_k=used if seen is None else seen, **extra)
    return out.view(B, Lq, H, D)


def _varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, mask=None, bias=None,
            softmax_scale=None, is_causal=False, window_size=None, softcap=None, sinks=None, seqused_k=None,
            kv_slots=None, key_range=None, mask_mod=None) -> torch.Tensor:
    """Every call of the op this backend makes (``dmattn_ops.varlen_attention``'s arguments). A generate step in eager
    mode (no gradient, no mask_mod) goes to the op straight, one call a layer: the backend builds each argument itself
    (lengths from shapes, int32 metadata, a bool mask), so ``varlen_attention``'s Python type checks and keyword
    binding would only repeat what is known; a device this build has no kernels for still gets the API's error.
    Anything else (compiled, exported, training, a mask_mod) takes ``varlen_attention``."""
    if (mask_mod is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not dmattn_ops.ops._is_exporting()):
        rules.check_backend_built(q)
        left, right = (-1, -1) if window_size is None else window_size
        return dmattn_ops.ops.forward_below_autograd((
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask, bias, softmax_scale, is_causal,
            left, right, softcap, sinks, seqused_k, kv_slots, key_range))[0]
    return dmattn_ops.varlen_attention(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, mask=mask, bias=bias,
        softmax_scale=softmax_scale, is_causal=is_causal, window_size=window_size, softcap=softcap, sinks=sinks,
        seqused_k=seqused_k, kv_slots=kv_slots, key_range=key_range, mask_mod=mask_mod)


_METADATA = _kept.KeptTensors(16)


def _kept_tensors(key: tuple, device: torch.device, build) -> tuple:
    """build()'s small device tensors (a call's cu_seqlens, say: the same for every layer of a step), built once and
    kept for the next layers, keyed by the host ints that define them (dmattn_ops/_kept.py: not in compiled code or
    CUDA graph capture, and apart under torch.inference_mode). The op only reads them."""
    if not _kept.may_keep(device):
        return build()
    key = (*key, device)
    found = _METADATA.get(key)
    return found if found is not None else _METADATA.put(key, build())


def _step_metadata(B: int, Lq: int, R: int, n_rows: int, Lk: int, device: torch.device):
    """cu_seqlens_q, cu_seqlens_k and seqused_k of the in-place row view (kept per step: _kept_tensors)."""
    def build():
        cu_q = torch.arange(0, (B + 1) * Lq, Lq, dtype=torch.int32, device=device)
        cu_k = torch.clamp_max(torch.arange(0, (B + 1) * R, R, dtype=torch.int32, device=device), n_rows)
        return cu_q, cu_k, torch.full((B,), Lk, dtype=torch.int32, device=device)

    return _kept_tensors(("rows", B, Lq, R, n_rows, Lk), device, build)
