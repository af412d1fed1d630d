"""dmattn_ops.integrations.transformers: attn_implementation="dmattn" inside Hugging Face transformers.

Tiny random-weight models (no download) of eight families, on the CPU: logits against "sdpa" ("eager" for Gemma 2's
softcap and gpt-oss's sinks, which transformers' sdpa path drops) on unpadded, left- and right-padded batches (every
real token's logits), greedy generation token for token with dynamic and static caches, packed rows through
cu_seq_lens_* or restarting position_ids, mask overlays transformers composes (its full mask), encoders (BERT, RoBERTa,
ModernBERT) with padding, multi-head latent attention and DeepSeek Sparse Attention (DeepSeek-V3, V3.2, GLM-5,
against eager), torch.compile(fullgraph=True),
the in-place decode step (on CUDA too), and the clear refusals.
transformers is a test-only dependency, pinned in tools/bootstrap.py.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from dmattn_ops.integrations import transformers as dmattn_transformers  # noqa: E402

dmattn_transformers.register()

VOCAB = 128


def _tiny(family: str, **extra):
    """A 2-layer random-weight model of the family; ``extra`` overrides its config (head_dim included)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        cfg, cls = transformers.LlamaConfig(**common, **extra), transformers.LlamaForCausalLM
    elif family == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common, **extra), transformers.Qwen2ForCausalLM
    elif family == "qwen3":
        cfg, cls = transformers.Qwen3Config(**common, **{"head_dim": 16, **extra}), transformers.Qwen3ForCausalLM
    elif family == "mistral":  # a sliding window shorter than the prompts
        cfg, cls = transformers.MistralConfig(**common, sliding_window=6, **extra), transformers.MistralForCausalLM
    elif family == "gemma3":  # alternating sliding-window and global layers, its own query scaling
        cfg = transformers.Gemma3TextConfig(**common, **{"head_dim": 16, **extra}, sliding_window=5,
                                            layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    elif family == "gemma2":  # attention logit softcapping (a small cap, so that it changes the logits), windows
        cfg = transformers.Gemma2Config(**common, **{"head_dim": 16, **extra}, attn_logit_softcapping=1.5,
                                        sliding_window=5, layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma2ForCausalLM
    elif family == "gpt_oss":  # learned attention sinks, sliding and full layers, mixture of experts
        cfg = transformers.GptOssConfig(**common, **{"head_dim": 16, **extra}, num_local_experts=4,
                                        num_experts_per_tok=2, sliding_window=5,
                                        layer_types=["sliding_attention", "full_attention"])
        cls = transformers.GptOssForCausalLM
    elif family == "llama4":  # a chunked-attention layer (chunks of 5 keys, shorter than the prompts) and a full one
        cfg = transformers.Llama4TextConfig(**common, **{"head_dim": 16, **extra}, intermediate_size_mlp=128,
                                            attention_chunk_size=5, num_local_experts=2, num_experts_per_tok=1,
                                            no_rope_layers=[1, 0])
        cls = transformers.Llama4ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if family == "gpt_oss":  # sinks start at 0: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


# Each family and the implementation its logits are judged against: sdpa, or eager where transformers' sdpa path
# drops what the family uses (Gemma 2's softcap, gpt-oss's sinks).
REFERENCE = {"llama": "sdpa", "qwen2": "sdpa", "qwen3": "sdpa", "mistral": "sdpa", "gemma3": "sdpa",
             "gemma2": "eager", "gpt_oss": "eager", "llama4": "sdpa"}
FAMILIES = list(REFERENCE)


@pytest.fixture
def op_calls(monkeypatch):
    """Every op call the backend makes during the test (its ``_varlen``, which takes varlen_attention's arguments), as
    (args, kwargs) (the reference implementations never call it)."""
    calls = []
    original = dmattn_transformers._varlen

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(dmattn_transformers, "_varlen", recording)
    return calls


def _batch(padding: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    if padding == "left":
        mask[0, :4] = 0
        mask[2, :7] = 0
    elif padding == "right":
        mask[0, 8:] = 0
        mask[1, 5:] = 0
    return ids, mask


def _logits(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_reference(family, padding):
    model = _tiny(family)
    ids, mask = _batch(padding)
    want = _logits(model, REFERENCE[family], input_ids=ids, attention_mask=mask)
    got = _logits(model, "dmattn", input_ids=ids, attention_mask=mask)
    real = mask.bool()  # padded positions' logits are whatever each implementation leaves there
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_reference(family, cache, padding):
    """Unpadded, the mask function drops generate's all-ones mask: with a static cache the keys' count then still
    comes from the mask (the cache's slots past the tokens hold zeros, which would change the tokens if seen)."""
    if family == "llama4" and cache == "static":
        pytest.skip("transformers 5.17's static cache fails for Llama 4 under every attention implementation "
                    "(create_chunked_causal_mask() got an unexpected keyword argument 'block_sequence_ids')")
    model = _tiny(family)
    ids, mask = _batch(padding)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    runs = {}
    for implementation in (REFERENCE[family], "dmattn"):
        model.set_attn_implementation(implementation)
        runs[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                              **extra)
    assert torch.equal(runs["dmattn"], runs[REFERENCE[family]])


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gpt_oss"])
def test_speculative_decoding_matches_reference(family, op_calls):
    """Prompt-lookup decoding (transformers' assisted generation without a draft model): each step verifies several
    candidate tokens at once (a few queries against the cache, bottom-right aligned) and crops the rejected ones from
    the cache; the same tokens as the reference's, with calls of 2-4 queries among the op's."""
    model = _tiny(family)
    ids = torch.tensor([[3, 17, 42, 9, 3, 17, 42, 9, 3, 17]])
    runs = {}
    for implementation in (REFERENCE[family], "dmattn"):
        model.set_attn_implementation(implementation)
        runs[implementation] = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=10,
                                              do_sample=False, prompt_lookup_num_tokens=3)
    assert torch.equal(runs["dmattn"], runs[REFERENCE[family]])
    queries = {args[5] for args, _ in op_calls}  # max_seqlen_q
    assert queries & {2, 3, 4}, queries


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _prefill_and_step_inputs(family: str, device: str):
    """(model, tolerance, ids, mask, the decode step's mask) of a left-padded batch: on CUDA the model in float16
    with head dim 64, a head dim the CUDA kernels compile (skipped where this build has none)."""
    if device == "cuda":
        if 64 not in dmattn_transformers._CUDA_HEAD_DIMS:
            pytest.skip("this build has no CUDA kernel for head dim 64")
        model = _tiny(family, head_dim=64).to(device="cuda", dtype=torch.float16)
        tolerance = dict(rtol=2e-2, atol=2e-2)
    else:
        model = _tiny(family)
        tolerance = dict(rtol=1e-4, atol=1e-5)
    ids, mask = (t.to(device) for t in _batch("left"))
    return model, tolerance, ids, mask, torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def _cache_storages(past):
    """Where layer 0's K and V of a transformers cache live."""
    layer0 = past.layers[0]
    return layer0.keys.untyped_storage().data_ptr(), layer0.values.untyped_storage().data_ptr()


def _prefill_and_step(model, implementation, ids, mask, step_mask, cache):
    """A prefill of ids under mask into a new `cache` ("dynamic" or "static"), then one decode step of each row's last
    token: (prefill logits, step logits, the cache, layer 0's storages right after the prefill)."""
    model.set_attn_implementation(implementation)
    extra = {}
    if cache == "static":
        extra["past_key_values"] = transformers.StaticCache(config=model.config, max_cache_len=32)
    with torch.no_grad():
        prefill = model(input_ids=ids, attention_mask=mask, use_cache=True, **extra)
        after_prefill = _cache_storages(prefill.past_key_values)
        step = model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=prefill.past_key_values,
                     use_cache=True)
    return prefill.logits, step.logits, prefill.past_key_values, after_prefill


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_and_decode_read_the_cache_in_place(cache, device, op_calls):
    """The prefill and a decode step of a batch each hand the op the cache's own storage (no per-layer copy of K / V:
    a row view with seqused_k), and the decode step's logits match sdpa's after the same prefill. On CUDA in float16
    with head dim 64, a head dim the CUDA kernels compile."""
    model, tolerance, ids, mask, step_mask = _prefill_and_step_inputs("llama", device)
    _, got, past, after_prefill = _prefill_and_step(model, "dmattn", ids, mask, step_mask, cache)
    seen_storages = [(args[1].untyped_storage().data_ptr(), args[2].untyped_storage().data_ptr())
                     for args, _ in op_calls]
    layers = model.config.num_hidden_layers
    assert seen_storages[0] == after_prefill  # layer 0 of the prefill
    assert seen_storages[layers] == _cache_storages(past)  # layer 0 of the decode step
    _, want, _, _ = _prefill_and_step(model, "sdpa", ids, mask, step_mask, cache)
    torch.testing.assert_close(got, want, **tolerance)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_an_unpadded_batch_reaches_the_op_with_no_mask(cache, padding, device, op_calls):
    """An all-ones padding mask (a tokenizer's unpadded batch) reaches the op as no mask at all, in the prefill and
    the decode step (on CUDA a key-side mask costs every layer its passes), with the keys' count still read off the
    mask (a static cache's slots past the tokens never visible): logits as sdpa's. A batch with padding still
    hands the op its key-side mask."""
    model, tolerance, _, _, _ = _prefill_and_step_inputs("llama", device)
    ids, mask = (t.to(device) for t in _batch(padding))
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    got = _prefill_and_step(model, "dmattn", ids, mask, step_mask, cache)
    masks = [kwargs.get("mask") for _, kwargs in op_calls]
    want = _prefill_and_step(model, "sdpa", ids, mask, step_mask, cache)
    real = mask.bool()
    torch.testing.assert_close(got[0][real], want[0][real], **tolerance)
    torch.testing.assert_close(got[1], want[1], **tolerance)
    assert len(masks) == 2 * model.config.num_hidden_layers
    if padding == "none":
        assert all(m is None for m in masks)
    else:
        assert all(m is not None and m.dtype == torch.bool and m.shape[1] == 1 for m in masks)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_a_training_step_after_generating_under_inference_mode(padding):
    """The per-step tensors the backend keeps for a model's later layers (cu_seqlens, the unpadded stand-in) made
    under torch.inference_mode are not the ones a training step's autograd saves: a step with the same shapes right
    after an inference_mode forward trains (loss as sdpa's), in place (a padded batch) and packed (unpadded)."""
    model = _tiny("llama")
    ids, mask = _batch(padding)
    model.set_attn_implementation("dmattn")
    with torch.inference_mode():
        model(input_ids=ids, attention_mask=mask, use_cache=True)
    model.train()
    losses = {}
    for implementation in ("dmattn", "sdpa"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=True)
        out.loss.backward()
        losses[implementation] = out.loss.detach()
    torch.testing.assert_close(losses["dmattn"], losses["sdpa"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_a_no_grad_forward_calls_the_op_straight_and_a_grad_forward_through_varlen_attention(padding, monkeypatch):
    """Without gradients (generate) every layer's call goes to the op straight, skipping varlen_attention's Python
    checks (the backend built each argument); with gradients it goes through varlen_attention and the op's autograd.
    Both give the same logits, bit for bit (one kernel)."""
    model = _tiny("llama")
    ids, mask = _batch(padding)
    model.set_attn_implementation("dmattn")
    through_api = []
    original = dmattn_transformers.dmattn_ops.varlen_attention

    def recording(*args, **kwargs):
        through_api.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(dmattn_transformers.dmattn_ops, "varlen_attention", recording)
    with torch.no_grad():
        straight = model(input_ids=ids, attention_mask=mask).logits
    assert through_api == []
    with torch.enable_grad():
        with_grad = model(input_ids=ids, attention_mask=mask).logits
    assert len(through_api) == model.config.num_hidden_layers and with_grad.requires_grad
    assert torch.equal(straight, with_grad.detach())


def test_the_unpadded_stand_in_is_told_apart_in_and_out_of_inference_mode():
    """The stand-in for an all-ones mask is recognized by its storage: made under torch.inference_mode and used
    outside it (where a view of an inference tensor has no _base) too; another stride-0 True is a mask like any."""
    dmattn_transformers._ALL_REAL.clear()
    ones = torch.ones(2, 5, dtype=torch.bool)
    with torch.inference_mode():
        assert dmattn_transformers._is_unpadded(dmattn_transformers._unless_unpadded(ones))
    assert dmattn_transformers._is_unpadded(dmattn_transformers._unless_unpadded(ones))
    assert dmattn_transformers._is_unpadded(dmattn_transformers._unless_unpadded(ones)[:, 1:])
    assert not dmattn_transformers._is_unpadded(ones)
    assert not dmattn_transformers._is_unpadded(torch.ones((), dtype=torch.bool).expand(2, 5))
    padded = ones.clone()
    padded[0, 0] = False
    assert dmattn_transformers._unless_unpadded(padded) is padded


def test_the_unpadded_check_stays_out_of_compiled_code():
    """Under torch.compile the mask function does not ask whether any key is padding (that would be a host sync
    and a graph break): an all-ones mask stays a mask, and the model still compiles in one graph."""
    ones = torch.ones(2, 5, dtype=torch.long)
    assert dmattn_transformers._is_unpadded(dmattn_transformers._unless_unpadded(ones.bool()))

    @torch.compile(fullgraph=True, backend="eager")
    def masked(m):
        return dmattn_transformers._unless_unpadded(m.bool()) & True

    torch._dynamo.reset()
    assert masked(ones).tolist() == ones.bool().tolist()
    model = _tiny("llama")
    ids, mask = _batch("none")
    model.set_attn_implementation("dmattn")
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, _logits(model, "sdpa", input_ids=ids, attention_mask=mask), rtol=1e-4, atol=1e-5)


def _static_cache_run(model, implementation, ids, steps):
    """A prefill chunk of ids (B, n) into a static cache, then `steps` greedy decode steps, all with cache_position
    and no attention_mask (how an exported decoder, ExecuTorch's say, calls a model): every step's logits."""
    model.set_attn_implementation(implementation)
    cache = transformers.StaticCache(config=model.config, max_cache_len=32)
    out, n = [], ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(n, device=ids.device),
                       use_cache=True).logits
        out.append(logits)
        for t in range(n, n + steps):
            step = logits[:, -1:].argmax(-1)
            logits = model(input_ids=step, past_key_values=cache, cache_position=torch.tensor([t], device=ids.device),
                           use_cache=True).logits
            out.append(logits)
    return out


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "llama4"])
def test_a_static_cache_without_an_attention_mask(family, batch):
    """Called with cache_position and no attention_mask, a static cache's slots past the tokens so far hold zeros:
    the backend reads the tokens' count off the mask function's q_offset (a device tensor: no sync) and passes it as
    seqused_k, for a prefill chunk (bottom-right alignment to the tokens, not the slots) and the decode steps after
    it, sliding-window layers past their window included; every step's logits as the reference's. (Llama 4 apart:
    transformers 5.17's static cache fails for it under every implementation.)"""
    model = _tiny(family)
    ids = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(3))
    got = _static_cache_run(model, "dmattn", ids, steps=6)
    want = _static_cache_run(model, REFERENCE[family], ids, steps=6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def _chunked_run(model, implementation, ids, mask, cache, use_mask):
    """The prompt in two prefill chunks (7 and 5 tokens), then three greedy decode steps, with cache_position and,
    where use_mask, the attention mask of the tokens so far: every call's logits."""
    model.set_attn_implementation(implementation)
    cache = (transformers.StaticCache(config=model.config, max_cache_len=32) if cache == "static"
             else transformers.DynamicCache(config=model.config))
    out = []
    with torch.no_grad():
        for a, b in ((0, 7), (7, 12)):
            extra = dict(attention_mask=mask[:, :b]) if use_mask else {}
            out.append(model(input_ids=ids[:, a:b], past_key_values=cache, cache_position=torch.arange(a, b),
                             use_cache=True, **extra).logits)
        seen = mask
        for t in range(12, 15):
            seen = torch.cat([seen, torch.ones_like(seen[:, :1])], dim=1)
            extra = dict(attention_mask=seen) if use_mask else {}
            out.append(model(input_ids=out[-1][:, -1:].argmax(-1), past_key_values=cache,
                             cache_position=torch.tensor([t]), use_cache=True, **extra).logits)
    return out


@pytest.mark.parametrize("padding, use_mask", [("left", True), ("none", True), ("none", False)])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_decode_steps_match_reference(family, cache, padding, use_mask):
    """A prompt prefilled in two chunks (the second one's queries in the middle of a static cache's slots), then
    decode steps, each call's logits of real tokens as the reference's: dynamic and static caches, a left-padded
    batch and an unpadded one with and without its attention mask."""
    if family == "llama4" and cache == "static":
        pytest.skip("transformers 5.17's static cache fails for Llama 4 under every attention implementation")
    model = _tiny(family)
    ids, mask = _batch(padding)
    got = _chunked_run(model, "dmattn", ids, mask, cache, use_mask)
    want = _chunked_run(model, REFERENCE[family], ids, mask, cache, use_mask)
    real = [mask[:, :7].bool(), mask[:, 7:12].bool()] + [torch.ones(3, 1, dtype=torch.bool)] * 3
    for g, w, r in zip(got, want, real):
        torch.testing.assert_close(g[r], w[r], rtol=1e-4, atol=1e-5)


@CUDA
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_a_static_cache_without_an_attention_mask_on_cuda(family, batch):
    """As above on CUDA, in float16 at head dim 64 (the in-place row view for two rows, the packed call for one)."""
    if 64 not in dmattn_transformers._CUDA_HEAD_DIMS:
        pytest.skip("this build has no CUDA kernel for head dim 64")
    model = _tiny(family, head_dim=64).to(device="cuda", dtype=torch.float16)
    ids = torch.randint(0, VOCAB, (batch, 5), generator=torch.Generator().manual_seed(3)).cuda()
    got = _static_cache_run(model, "dmattn", ids, steps=6)
    want = _static_cache_run(model, "sdpa", ids, steps=6)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3"])
def test_an_exported_decoder_with_a_static_cache_generates_as_sdpa(family):
    """transformers' exportable decoder (TorchExportableModuleForDecoderOnlyLM: a static cache, one token a call,
    cache_position and no attention_mask) exported with torch.export: the same greedy tokens as sdpa's export, sliding
    windows crossed."""
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    tokens = {}
    for implementation in ("sdpa", "dmattn"):
        model = _tiny(family)
        model.generation_config = transformers.GenerationConfig(
            use_cache=True, cache_implementation="static", max_length=32,
            cache_config={"batch_size": 1, "max_cache_len": 32, "device": "cpu"})
        model.set_attn_implementation(implementation)
        exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=32)
        program = exportable.export(input_ids=torch.tensor([[5]]), cache_position=torch.tensor([0]), strict=False)
        step = program.module()
        prompt, out = [3, 17, 42, 9], []
        with torch.no_grad():
            for t in range(14):
                token = prompt[t] if t < len(prompt) else out[-1]
                logits = step(input_ids=torch.tensor([[token]]), cache_position=torch.tensor([t]))
                out.append(int(logits[0, -1].argmax()))
        tokens[implementation] = out
    assert tokens["dmattn"] == tokens["sdpa"]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_chunked_layers_prefill_and_decode_step(device):
    """Llama 4's chunked layers: a left-padded batch's prefill and then a decode step, whose chunk cache holds only
    the layer's last keys (transformers' kv_offset), against sdpa. On CUDA in float16 with head dim 64 (the in-place
    row view with seqused_k and the chunks as key_range on the CUDA kernels)."""
    model, tolerance, ids, mask, step_mask = _prefill_and_step_inputs("llama4", device)
    runs = {}
    for implementation in ("sdpa", "dmattn"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            prefill = model(input_ids=ids, attention_mask=mask, use_cache=True)
            step = model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=prefill.past_key_values,
                         use_cache=True)
        runs[implementation] = prefill.logits, step.logits
    real = mask.bool()
    torch.testing.assert_close(runs["dmattn"][0][real], runs["sdpa"][0][real], **tolerance)
    torch.testing.assert_close(runs["dmattn"][1], runs["sdpa"][1], **tolerance)


@pytest.mark.parametrize("family", ["llama", "llama4"])
@pytest.mark.parametrize("max_length", ["int", "tensor"])
def test_packed_rows_through_cu_seq_lens(max_length, family):
    """Three sequences packed in one row (what DataCollatorWithFlattening feeds): each one's logits as if alone. Max
    lengths given as 0-d tensors are not read (no sync): the row's length bounds the sequences instead. Llama 4's
    chunks count from each sequence's first token (the third sequence starts at row 14, inside a chunk of the row)."""
    model = _tiny(family)
    lengths = [5, 9, 3]
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (1, n), generator=g) for n in lengths]
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    longest = 9 if max_length == "int" else torch.tensor(9)
    got = _logits(model, "dmattn", input_ids=torch.cat(seqs, dim=1), position_ids=positions, cu_seq_lens_q=cu,
                  cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    for b, seq in enumerate(seqs):
        want = _logits(model, "sdpa", input_ids=seq)
        torch.testing.assert_close(got[:, cu[b]:cu[b + 1]], want, rtol=1e-4, atol=1e-5)


def _packed_batch(rows: int):
    """rows rows of 12 tokens, each packing sequences told only by position_ids restarting (no cu_seq_lens_*), and
    the sequences of row 0 alone."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (rows, 12), generator=g)
    lengths = [[5, 4, 3], [3, 9], [12]][:rows]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    starts = torch.tensor([0, 5, 9, 12])
    return ids, positions, [ids[:1, starts[i]:starts[i + 1]] for i in range(3)]


@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_through_restarting_position_ids(family, rows, op_calls):
    """A training batch (no cache, no padding mask) whose rows pack sequences told only by position_ids restarting:
    transformers composes a packed-sequence mask into the mask function, which reaches the attention function as each
    token's sequence (key_range, no full mask). Logits as the reference implementation's, every row, and row 0's
    sequences as if alone. Before, rows of a batch of two ran as one sequence each (0.36 off), and Llama 4, which
    passes no position_ids to its attention, too."""
    model = _tiny(family)
    ids, positions, alone = _packed_batch(rows)
    got = _logits(model, "dmattn", input_ids=ids, position_ids=positions, use_cache=False)
    calls = [kwargs for _, kwargs in op_calls]
    want = _logits(model, REFERENCE[family], input_ids=ids, position_ids=positions, use_cache=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    start = 0
    # (transformers' gpt-oss model infers no packing itself; Llama 4's reference counts chunks along the row)
    for seq in alone if family not in ("gpt_oss", "llama4") else ():
        torch.testing.assert_close(got[:1, start:start + seq.shape[1]],
                                   _logits(model, REFERENCE[family], input_ids=seq), rtol=1e-4, atol=1e-5)
        start += seq.shape[1]
    if family == "llama4":  # packing beside a chunk: transformers' full mask on the chunked layer
        assert any(c.get("mask") is not None and c["mask"].dim() == 3 for c in calls)
        assert any("mask_mod" in c for c in calls)  # and the sequences as key_range on the full layer
    elif family != "gpt_oss":
        assert calls and all("mask_mod" in c and c.get("mask") is None for c in calls)


@pytest.mark.parametrize("family", ["llama", "mistral", "llama4"])
def test_a_packed_training_step_matches_sdpa(family):
    """A training step on a packed batch of two rows (what padding-free SFT feeds): the loss and every parameter's
    gradient as sdpa's, through the op's backward over the document key_range (and transformers' full mask on Llama
    4's chunked layers)."""
    ids, positions, _ = _packed_batch(2)
    grads = {}
    for implementation in ("sdpa", "dmattn"):
        model = _tiny(family).train()
        model.set_attn_implementation(implementation)
        out = model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False)
        out.loss.backward()
        grads[implementation] = out.loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]
    (want_loss, want), (got_loss, got) = grads["sdpa"], grads["dmattn"]
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_packed_rows_with_a_cache_run_as_transformers_runs_them():
    """With a cache transformers does not infer packing from position_ids (the positions only rotate the keys), and
    neither does the backend now (it used to read them on the host, a sync per layer): the same logits as sdpa."""
    model = _tiny("llama")
    ids, positions, _ = _packed_batch(1)
    got = _logits(model, "dmattn", input_ids=ids, position_ids=positions)
    torch.testing.assert_close(got, _logits(model, "sdpa", input_ids=ids, position_ids=positions), rtol=1e-4,
                               atol=1e-5)


@CUDA
@pytest.mark.parametrize("family", ["llama", "mistral", "llama4"])
def test_packed_rows_through_restarting_position_ids_on_cuda(family):
    """The packed batch of two rows on CUDA, float16 at head dim 64: document key_range on the full layers (the
    sliding window beside it for Mistral), transformers' full mask as a query-side mask on Llama 4's chunked ones."""
    if 64 not in dmattn_transformers._CUDA_HEAD_DIMS:
        pytest.skip("this build has no CUDA kernel for head dim 64")
    model = _tiny(family, head_dim=64).to(device="cuda", dtype=torch.float16)
    ids, positions, _ = (t.cuda() if isinstance(t, torch.Tensor) else t for t in _packed_batch(2))
    got = _logits(model, "dmattn", input_ids=ids, position_ids=positions, use_cache=False)
    want = _logits(model, "sdpa", input_ids=ids, position_ids=positions, use_cache=False)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_gemma3_image_tokens_see_each_other_both_ways():
    """Gemma 3 with images: transformers composes an or_mask_function overlay (an image's tokens attend to each other
    bidirectionally) into the text layers' masks, which the backend dropped before (logits 0.19 off sdpa's on this
    tiny model); it now runs transformers' full mask. The SigLIP vision tower (non-causal, unpadded) runs on
    dmattn too. Every real token's logits as sdpa's, with a left-padded row."""
    text = transformers.Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                                         layer_types=["sliding_attention", "full_attention"],
                                         max_position_embeddings=256)
    vision = transformers.SiglipVisionConfig(hidden_size=32, image_size=28, patch_size=14, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    ids = torch.randint(0, 290, (2, 14), generator=torch.Generator().manual_seed(5))
    ids[:, 3], ids[:, 4:8], ids[:, 8] = 297, 299, 298  # <boi>, the image's 4 tokens, <eoi>
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[1, :2] = 0
    inputs = dict(input_ids=ids, pixel_values=torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(6)),
                  token_type_ids=(ids == 299).long(), attention_mask=mask)
    got, want = _logits(model, "dmattn", **inputs), _logits(model, "sdpa", **inputs)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)
    tokens = {}
    for implementation in ("sdpa", "dmattn"):  # and greedy generation after that prefill, token for token
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(tokens["dmattn"], tokens["sdpa"])


def _seq2seq_batch():
    """(encoder ids (2, 12), decoder ids (2, 5), the encoder's padding mask: row 0 right-padded after 8 tokens)."""
    g = torch.Generator().manual_seed(4)
    ids, decoder_ids = torch.randint(3, VOCAB, (2, 12), generator=g), torch.randint(3, VOCAB, (2, 5), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    return ids, decoder_ids, mask


def test_an_encoder_decoder_matches_sdpa():
    """BART: the decoder's cross-attention has fewer queries than keys and, without an attention_mask, every encoder
    key is real (no cache of slots): logits with and without a padding mask, and greedy generation, as sdpa's."""
    cfg = transformers.BartConfig(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                  decoder_ffn_dim=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(cfg).eval()
    ids, decoder_ids, mask = _seq2seq_batch()
    for inputs in (dict(input_ids=ids, attention_mask=mask), dict(input_ids=ids)):
        want = _logits(model, "sdpa", decoder_input_ids=decoder_ids, **inputs)
        got = _logits(model, "dmattn", decoder_input_ids=decoder_ids, **inputs)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    runs = {}
    for implementation in ("sdpa", "dmattn"):
        model.set_attn_implementation(implementation)
        runs[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(runs["dmattn"], runs["sdpa"])


def _tiny_t5(implementation: str):
    """A 2-layer random-weight T5 (relative position buckets, larger initial weights so that greedy tokens vary), built
    with its implementation in the config: transformers 5.17's set_attn_implementation does not reach T5's stacks."""
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                decoder_start_token_id=0, relative_attention_num_buckets=8, initializer_factor=8.0,
                                attn_implementation=implementation)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).eval()


def test_t5s_relative_position_bias_reaches_the_op(op_calls):
    """T5 passes its relative position bias as position_bias, which eager adds to the scores (an attention function
    that ignored it ran, and gave other logits): the op's query-side bias. Logits with and without padding, and greedy
    generation with a dynamic and a static cache, as eager's."""
    ids, decoder_ids, mask = _seq2seq_batch()
    runs = {}
    for implementation in ("eager", "dmattn"):
        model = _tiny_t5(implementation)
        with torch.no_grad():
            runs[implementation] = [model(input_ids=ids, decoder_input_ids=decoder_ids, **inputs).logits
                                    for inputs in (dict(attention_mask=mask), {})]
            for extra in ({}, {"cache_implementation": "static"}):
                runs[implementation].append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                            do_sample=False, **extra))
    for got, want in zip(runs["dmattn"][:2], runs["eager"][:2]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(got, want) for got, want in zip(runs["dmattn"][2:], runs["eager"][2:]))
    assert any(kwargs.get("bias") is not None for _, kwargs in op_calls)


# Encoder-decoders whose decoder self-attention modules leave is_causal False and keep causality in the mask
# transformers makes (UMT5, NLLB-MoE, Pegasus-X: a 2-D padding mask alone would run them bidirectional), and Switch
# Transformers (an additive 4-D mask beside T5's position bias). Built from each default config, shrunk.
SEQ2SEQ_SHRINK = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                      encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, num_experts=4)


def _tiny_seq2seq(model_type: str, implementation: str):
    cfg = transformers.AutoConfig.for_model(model_type)
    for name, value in SEQ2SEQ_SHRINK.items():
        if hasattr(cfg, name):
            setattr(cfg, name, value)
    torch.manual_seed(0)
    return transformers.AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=implementation).eval()


@pytest.mark.parametrize("model_type", ["umt5", "nllb-moe", "pegasus_x", "switch_transformers"])
def test_encoder_decoders_whose_causality_is_in_the_mask_match_eager(model_type):
    """Logits (a padded encoder batch) and greedy generation as eager's: the decoder's self-attention causal although
    its modules say is_causal=False (the mask function gives such a decoder transformers' full mask)."""
    ids, decoder_ids, mask = _seq2seq_batch()
    runs = {}
    for implementation in ("eager", "dmattn"):
        model = _tiny_seq2seq(model_type, implementation)
        with torch.no_grad():
            runs[implementation] = (model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits,
                                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6,
                                                   do_sample=False))
    torch.testing.assert_close(runs["dmattn"][0], runs["eager"][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(runs["dmattn"][1], runs["eager"][1])


def _tiny_encoder(name: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if name == "modernbert":  # a local (bidirectional window of 2 keys each side) and a global layer
        cfg = transformers.ModernBertConfig(**common, global_attn_every_n_layers=2, local_attention=4, pad_token_id=0,
                                            bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
        cls = transformers.ModernBertModel
    else:
        cfg, cls = {"bert": (transformers.BertConfig(**common), transformers.BertModel),
                    "roberta": (transformers.RobertaConfig(**common), transformers.RobertaModel)}[name]
    torch.manual_seed(0)
    return cls(cfg).eval()


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", ["bert", "roberta", "modernbert"])
def test_encoders_match_sdpa(name, padding):
    """Non-causal layers with padding (refused before): the padding mask is a key-side mask with is_causal=False;
    ModernBERT's local layers, whose bidirectional window transformers composes into the mask function, take its
    full mask. Every real token's hidden state as sdpa's."""
    model = _tiny_encoder(name)
    ids, mask = _batch(padding)
    out = {}
    for implementation in ("sdpa", "dmattn"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            out[implementation] = model(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(out["dmattn"][real], out["sdpa"][real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["bert", "modernbert"])
def test_encoders_compile_in_one_graph(name):
    """Compiled, where the mask function goes by transformers' flags (for a bidirectional mask transformers always
    clears allow_is_causal_skip, so compiled encoders take the full mask): hidden states as sdpa's."""
    model = _tiny_encoder(name)
    ids, mask = _batch("left")
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    model.set_attn_implementation("dmattn")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


def _attention_inputs(B=2, Lq=7, Lk=7, H=4, Hk=2, D=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float16 if device == "cuda" else torch.float32
    return tuple(t.to(device=device, dtype=dtype) for t in (
        torch.randn(B, H, Lq, D, generator=g), torch.randn(B, Hk, Lk, D, generator=g),
        torch.randn(B, Hk, Lk, D, generator=g)))


def _sdpa_attention(q, k, v, mask):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    module.training = False
    return sdpa_attention_forward(module, q, k, v, mask, scaling=0.25)[0]


def _dmattn_attention(q, k, v, mask):
    module = torch.nn.Module()
    module.is_causal = True
    return dmattn_transformers.attention_forward(module, q, k, v, mask, scaling=0.25)[0]


def _masks(overlay=None, padding=None, position_ids=None, B=2, L=7):
    """The mask create_causal_mask makes for "dmattn" and for "sdpa" (an or_mask_function overlay, padding, packing)."""
    from transformers.masking_utils import create_causal_mask

    config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, hidden_size=64)
    embeds = torch.zeros(B, L, 64)
    out = {}
    for name in ("dmattn", "sdpa"):
        config._attn_implementation = name
        out[name] = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=padding,
                                       past_key_values=None, position_ids=position_ids, or_mask_function=overlay)
    return out


def _bidirectional_block(b, h, q_idx, kv_idx):
    """Gemma 3's kind of overlay: tokens 2-4 of each row (an image, say) see each other both ways."""
    inside = lambda i: (i >= 2) & (i <= 4)  # noqa: E731
    return inside(q_idx) & inside(kv_idx)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("padding", [False, True])
def test_an_overlay_the_backend_does_not_express_takes_transformers_full_mask(padding, device):
    """An or_mask_function overlay used to be dropped silently (the mask function returned the padding alone): now
    the mask function hands the attention function transformers' full mask, a query-side mask for the op. Real
    queries' outputs as sdpa's on its own mask (on CUDA in float16 at head dim 64)."""
    if device == "cuda" and 64 not in dmattn_transformers._CUDA_HEAD_DIMS:
        pytest.skip("this build has no CUDA kernel for head dim 64")
    pad = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]]) if padding else None
    masks = _masks(overlay=_bidirectional_block, padding=pad)
    assert masks["dmattn"].shape == (2, 1, 7, 7) and masks["dmattn"].dtype == torch.bool
    q, k, v = _attention_inputs(D=64 if device == "cuda" else 16, device=device)
    got = _dmattn_attention(q, k, v, masks["dmattn"].to(device))
    want = _sdpa_attention(q, k, v, masks["sdpa"].to(device))
    real = pad.bool() if padding else torch.ones(2, 7, dtype=torch.bool)
    tolerance = dict(rtol=2e-2, atol=2e-2) if device == "cuda" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.cpu().float()[real], want.cpu().float()[real], **tolerance)
    # the overlay matters: query 2 sees key 4 (causal alone would not let it)
    assert bool(masks["dmattn"][1, 0, 2, 4])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_a_full_mask_beside_cu_seq_lens_keeps_each_query_to_its_sequence(device, op_calls):
    """A full mask (an overlay's) in a packed row given by cu_seq_lens_* alone (position_ids not restarting, so
    transformers' mask does not know the packing): each query still sees only its own sequence, as the packed path
    without a full mask does (on CUDA in float16 at head dim 64)."""
    if device == "cuda" and 64 not in dmattn_transformers._CUDA_HEAD_DIMS:
        pytest.skip("this build has no CUDA kernel for head dim 64")
    q, k, v = _attention_inputs(B=1, Lq=9, Lk=9, D=64 if device == "cuda" else 16, device=device)
    masks = {name: m.to(device) for name, m in _masks(overlay=_bidirectional_block, B=1, L=9).items()}
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=device)
    module = torch.nn.Module()
    module.is_causal = True
    got = dmattn_transformers.attention_forward(module, q, k, v, masks["dmattn"], scaling=0.25, cu_seq_lens_q=cu,
                                                cu_seq_lens_k=cu, max_length_q=5, max_length_k=5)[0]
    assert [kwargs["mask"].shape for _, kwargs in op_calls] == [(9, 1, 5)]  # each query's own sequence's keys (max_length_k), not the row's 9
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1], device=device)
    want = _sdpa_attention(q, k, v, masks["sdpa"] & (seq[:, None] == seq[None, :]))
    tolerance = dict(rtol=2e-2, atol=2e-2) if device == "cuda" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.float(), want.float(), **tolerance)


def test_a_full_mask_of_one_query_runs_as_a_key_side_mask(op_calls):
    """A decode step under a full mask: its row of the mask is per key (a key-side mask, the decode kernel's)."""
    q, k, v = _attention_inputs(Lq=1, Lk=9)
    full = torch.rand(2, 1, 1, 9, generator=torch.Generator().manual_seed(4)) < 0.6
    full[:, :, :, 0] = True
    got = _dmattn_attention(q, k, v, full)
    assert [kwargs["mask"].shape for _, kwargs in op_calls] == [(2 * 9, 1)]
    torch.testing.assert_close(got, _sdpa_attention(q, k, v, full), rtol=1e-4, atol=1e-5)


def test_mask_structure_reads_the_parts_transformers_composed():
    """Plain parts (causal, bidirectional, window, chunk) leave the padding mask; packing alone gives the sequence
    ids; any other part (an overlay, block ids, a function transformers did not make) the full mask."""
    from transformers import masking_utils as mu

    ids = torch.tensor([[0, 0, 1, 1]])
    structure = dmattn_transformers._mask_structure
    assert structure(mu.causal_mask_function, 4, {}) == "plain"
    assert structure(mu.sliding_window_causal_mask_function(3), 4, {}) == "plain"
    assert structure(mu.chunked_causal_mask_function(2, torch.zeros(1, dtype=torch.long)), 4, {}) == "plain"
    assert structure(mu.bidirectional_mask_function, 4, {}) == "plain"
    packed = mu.and_masks(mu.causal_mask_function, mu.packed_sequence_mask_function(ids))
    assert structure(packed, 4, {}) is ids
    for other in (mu.or_masks(mu.causal_mask_function, _bidirectional_block),
                  mu.and_masks(packed, _bidirectional_block),
                  mu.and_masks(packed, mu.packed_sequence_mask_function(ids)),
                  mu.or_masks(mu.causal_mask_function, mu.blockwise_overlay(ids)),
                  lambda b, h, q_idx, kv_idx: kv_idx <= q_idx):
        assert structure(other, 4, {}) == "full"


def test_a_transformers_mask_function_of_another_version_takes_the_full_mask_with_a_warning(monkeypatch):
    """A function of transformers.masking_utils this backend does not know (a transformers version it was not written
    against) is not guessed at: the full mask, and a warning once (it may make every layer's mask full)."""
    from transformers import masking_utils as mu

    def inner_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    inner_mask.__module__, inner_mask.__qualname__ = "transformers.masking_utils", "renamed_causal.<locals>.inner_mask"
    monkeypatch.setattr(dmattn_transformers, "_WARNED", set())
    with pytest.warns(UserWarning, match="renamed_causal.<locals>.inner_mask is not one this backend reads"):
        assert dmattn_transformers._mask_structure(mu.and_masks(inner_mask), 4, {}) == "full"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        assert dmattn_transformers._mask_structure(inner_mask, 4, {}) == "full"
        # the overlays known to need the full mask take it without a warning
        assert dmattn_transformers._mask_structure(mu.or_masks(mu.causal_mask_function), 4, {}) == "full"


@pytest.mark.parametrize("family", ["llama", "mistral", "llama4"])
def test_packed_rows_with_cu_seq_lens_compile_in_one_graph(family):
    """What DataCollatorWithFlattening feeds, compiled: cu_seq_lens_* beside restarting position_ids. Compiled code
    cannot tell transformers' packing from an overlay, so the full mask comes, and each query gets its own sequence's
    entries of it (a (total, 1, max_length) query-side mask on the packed call): logits as sdpa's."""
    model = _tiny(family)
    lengths = [5, 9, 3]
    ids = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(7))
    cu = torch.tensor([0, 5, 14, 17], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    inputs = dict(input_ids=ids, position_ids=positions, use_cache=False)
    model.set_attn_implementation("dmattn")
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(**inputs, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9,
                                                   max_length_k=9).logits
    torch.testing.assert_close(got, _logits(model, "sdpa", **inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_rows_compile_in_one_graph(family):
    """Compiled code cannot read the mask function's parts: transformers' flag (allow_is_causal_skip=False) makes
    it take the full mask, and the packed rows are right there too."""
    model = _tiny(family)
    ids, positions, _ = _packed_batch(2)
    model.set_attn_implementation("dmattn")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, position_ids=positions, use_cache=False).logits
    want = _logits(model, "sdpa", input_ids=ids, position_ids=positions, use_cache=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "llama4", "gemma2", "gpt_oss", "deepseek_v32"])
def test_compiles_in_one_graph(family):
    """fullgraph=True with padding: causal and chunked layers, softcap (Gemma 2), sinks and windows (gpt-oss), latent
    and sparse attention (DeepSeek-V3.2, below)."""
    model = _tiny_latent(family) if family in LATENT_FAMILIES else _tiny(family)
    ids, mask = _batch("left")
    model.set_attn_implementation("dmattn")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits
    want = _logits(model, REFERENCE.get(family, "eager"), input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, mask):
        return self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def test_a_padded_model_exports_and_aot_compiles_across_batch_shapes(tmp_path):
    """torch.export of a model with attn_implementation="dmattn", batch and length dynamic, strict and not; the
    exported program and its AOTInductor package run batches of other shapes (contiguous inputs, as AOTInductor
    expects), every real token's logits as sdpa's in eager mode."""
    model = _tiny("llama")
    ids, mask = _batch("left")
    model.set_attn_implementation("dmattn")
    batch, length = torch.export.Dim("B", min=1, max=16), torch.export.Dim("L", min=2, max=128)
    dims = {"ids": {0: batch, 1: length}, "mask": {0: batch, 1: length}}
    g = torch.Generator().manual_seed(2)
    others = []
    for b, n in ((2, 9), (4, 20)):
        other_mask = torch.ones(b, n, dtype=torch.long)
        other_mask[0, :3] = 0  # left padding in the first row
        others.append((torch.randint(0, VOCAB, (b, n), generator=g), other_mask))

    def want(i, m):
        return _logits(model, "sdpa", input_ids=i, attention_mask=m)[m.bool()]

    with torch.no_grad():
        for strict in (False, True):
            model.set_attn_implementation("dmattn")
            program = torch.export.export(_Logits(model), (ids, mask), dynamic_shapes=dims, strict=strict)
            for i, m in [(ids, mask), *others]:
                torch.testing.assert_close(program.module()(i, m)[m.bool()], want(i, m), rtol=1e-4, atol=1e-5)
        package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "llama.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        for i, m in others:
            torch.testing.assert_close(runner(i, m)[m.bool()], want(i, m), rtol=1e-4, atol=1e-5)


def test_dropout_while_training_is_refused_clearly():
    model = _tiny("llama", attention_dropout=0.1).train()
    ids, mask = _batch("none")
    model.set_attn_implementation("dmattn")
    with pytest.raises(NotImplementedError, match=r"attention dropout while training \(dropout=0.1\)"):
        model(input_ids=ids, attention_mask=mask)


def test_registering_both_functions_keeps_padding():
    """Registered alone, an attention function gets attention_mask=None from transformers and padding is lost: the
    mask function registered beside it is what keeps it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert AttentionInterface._global_mapping["dmattn"] is dmattn_transformers.attention_forward
    assert AttentionMaskInterface._global_mapping["dmattn"] is dmattn_transformers.padding_mask


def test_chunked_layer_without_its_mask_function_is_refused():
    """The attention function registered alone gets no key positions for a chunked layer: a clear error, not plain
    causal attention."""
    from transformers import AttentionInterface

    AttentionInterface.register("dmattn_alone", dmattn_transformers.attention_forward)
    model = _tiny("llama4")
    ids, mask = _batch("left")
    model.set_attn_implementation("dmattn_alone")
    with pytest.raises(ValueError, match="a chunked-attention layer needs the key positions dmattn_ops' mask function"):
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)


# Multi-head latent attention (a value head dim below the key's) and DeepSeek Sparse Attention (an indexer's top-k keys
# per query): DeepSeek-V3's MLA alone; DeepSeek-V3.2, GLM-5 (glm_moe_dsa) and HY-V4 (with learned sinks too) with the
# indexer, judged against eager (the implementation their indexer's mask is written for). Each keeps 5 keys per query
# under 12-token prompts.
LATENT_FAMILIES = ["deepseek_v3", "deepseek_v32", "glm_moe_dsa", "hy_v4"]


def _tiny_latent(family: str, index_topk: int = 5):
    """A 2-layer random-weight MLA model (query / key head dim 24, value head dim 16) of the family."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                  qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
                  n_group=1, topk_group=1, max_position_embeddings=256)
    indexer = dict(index_topk=index_topk, index_head_dim=16, index_n_heads=2)
    if family == "deepseek_v3":
        cfg, cls = transformers.DeepseekV3Config(**common, first_k_dense_replace=1), transformers.DeepseekV3ForCausalLM
    elif family == "deepseek_v32":
        cfg = transformers.DeepseekV32Config(**common, **indexer, first_k_dense_replace=1)
        cls = transformers.DeepseekV32ForCausalLM
    elif family == "glm_moe_dsa":
        cfg, cls = transformers.GlmMoeDsaConfig(**common, **indexer), transformers.GlmMoeDsaForCausalLM
    elif family == "hy_v4":
        cfg = transformers.HYV4Config(**common, **indexer, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        cls = transformers.HYV4ForCausalLM
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if family == "hy_v4":  # sinks start alike: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_latent_and_sparse_attention_logits_match_eager(family, padding):
    model = _tiny_latent(family)
    ids, mask = _batch(padding)
    want = _logits(model, "eager", input_ids=ids, attention_mask=mask)
    got = _logits(model, "dmattn", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("padding", ["left", "none"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", LATENT_FAMILIES)
def test_latent_and_sparse_attention_generate_as_eager(family, cache, padding):
    model = _tiny_latent(family)
    ids, mask = _batch(padding)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    runs = {}
    for implementation in ("eager", "dmattn"):
        model.set_attn_implementation(implementation)
        runs[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                              **extra)
    assert torch.equal(runs["dmattn"], runs["eager"])


def test_sparse_attention_keeps_each_querys_top_k_keys(op_calls):
    """The indexer's selection reaches the op: the logits move when it keeps more keys (so the tests above judge it),
    the prefill runs it as a query-side mask, and every decode step reads each sequence's 5 selected keys alone,
    whatever the cache's length (each of the three left-padded prompts has at least 5 real tokens, so all are
    visible)."""
    ids, mask = _batch("left")
    sparse = _logits(_tiny_latent("deepseek_v32"), "dmattn", input_ids=ids, attention_mask=mask)
    dense = _logits(_tiny_latent("deepseek_v32", index_topk=64), "dmattn", input_ids=ids, attention_mask=mask)
    assert (sparse - dense)[mask.bool()].abs().max() > 1e-2
    model = _tiny_latent("deepseek_v32")
    model.set_attn_implementation("dmattn")
    op_calls.clear()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    layers = model.config.num_hidden_layers
    assert len(op_calls) == 3 * layers
    for step, (args, kwargs) in enumerate(op_calls):
        kept = kwargs["mask"]
        if step < layers:  # the prefill: (B Lq, 1, Lk)
            assert kept.shape == (3 * 12, 1, 12)
        else:
            assert args[1].shape[0] == 3 * 5 and kept.shape == (3 * 5, 1) and bool(kept.all())


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_sparse_attention_hides_selected_keys_a_query_does_not_see(cache, op_calls):
    """Keeping 9 keys where a left-padded prompt has 5 real tokens, the indexer selects padding (and, in a static
    cache, empty slots): the decode steps' masks hide them, and the tokens are eager's."""
    model = _tiny_latent("deepseek_v32", index_topk=9)
    ids, mask = _batch("left")
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    runs = {}
    for implementation in ("eager", "dmattn"):
        model.set_attn_implementation(implementation)
        op_calls.clear()
        runs[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                              **extra)
    assert torch.equal(runs["dmattn"], runs["eager"])
    decode = [kwargs["mask"] for _, kwargs in op_calls if kwargs["mask"].dim() == 2]
    assert decode and not bool(decode[0].all())


def _tiny_minimax_m3(topk_blocks: int = 2):
    """A 2-layer random-weight MiniMax M3 (text): a block-sparse layer (blocks of 2 keys, each query keeps 2 per index
    head, the query's own among them) and a full one; 2 index heads over 2 KV heads of 4 query heads."""
    cfg = transformers.MiniMaxM3VLTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, dense_intermediate_size=128,
        shared_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        rotary_dim=8, num_local_experts=4, num_experts_per_tok=2, index_n_heads=2, index_head_dim=16,
        index_block_size=2, index_topk_blocks=topk_blocks, index_local_blocks=1,
        layer_types=["minimax_m3_sparse", "full_attention"], max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2)
    torch.manual_seed(0)
    return transformers.MiniMaxM3VLForCausalLM(cfg).eval()


def _judge_a_selection_against_eager(build, padding: str, op_calls, moves: float) -> list:
    """What a model that picks each query's keys itself is judged by: logits as eager's, other logits (by more than
    `moves`) where it picks more (build(True)), and greedy generation with a dynamic and a static cache as eager's.
    Returns each generation's op calls, (args, kwargs)."""
    ids, mask = _batch(padding)
    model = build(False)
    want = _logits(model, "eager", input_ids=ids, attention_mask=mask)
    got = _logits(model, "dmattn", input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-4, atol=1e-5)
    wider = _logits(build(True), "dmattn", input_ids=ids, attention_mask=mask)
    assert (got - wider)[real].abs().max() > moves
    calls = []
    for extra in ({}, {"cache_implementation": "static"}):
        runs = {}
        for implementation in ("eager", "dmattn"):
            model.set_attn_implementation(implementation)
            op_calls.clear()
            runs[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                                                  do_sample=False, pad_token_id=0, **extra)
        assert torch.equal(runs["dmattn"], runs["eager"])
        calls.append(list(op_calls))
    return calls


@pytest.mark.parametrize("padding", ["none", "right"])
def test_minimax_m3_block_sparse_attention_matches_eager(padding, op_calls):
    """MiniMax M3's indexer keeps blocks of keys per query and index head (block_indices): the op's mask, key-side per
    index head in a decode step. Judged against eager (_judge_a_selection_against_eager: 8 blocks against 2). Left
    padding is left out: the model's indexer counts blocks from content positions and can keep only padding for a
    query (its source says so), which eager then averages over every key with equal weight and the op answers with
    zeros."""
    build = lambda wider: _tiny_minimax_m3(topk_blocks=8 if wider else 2)  # noqa: E731
    for calls in _judge_a_selection_against_eager(build, padding, op_calls, 1e-2):
        sparse_decode = [k["mask"] for _, k in calls[2:] if k["mask"] is not None and k["mask"].shape[-1] == 2]
        assert sparse_decode and all(m.dim() == 2 and not bool(m.all()) for m in sparse_decode)


def _tiny_doge(keep_window_size: int = 5):
    """A 2-layer random-weight Doge: dynamic mask attention, each query keeping the keep_window_size keys of the
    highest gates (a learned function of the values, per key and KV head) among those it sees."""
    cfg = transformers.DogeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  keep_window_size=keep_window_size)
    torch.manual_seed(0)
    model = transformers.DogeForCausalLM(cfg).eval()
    with torch.no_grad():  # A starts at 0, which makes every gate 1: make them differ
        for layer in model.model.layers:
            layer.self_attn.A.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_doges_dynamic_mask_matches_eager(padding, op_calls):
    """Doge builds its attention mask itself (its gates as an additive bias, the keys past each query's top 5 hidden)
    from transformers' 4-D mask, which the mask function gives it: the op's bias and mask, key-side in a decode step.
    Judged against eager (_judge_a_selection_against_eager: 64 keys kept against 5)."""
    build = lambda wider: _tiny_doge(keep_window_size=64 if wider else 5)  # noqa: E731
    for calls in _judge_a_selection_against_eager(build, padding, op_calls, 1e-3):
        decode = [k for a, k in calls if a[0].shape[0] == 3]  # one query per sequence
        assert decode and all(k["mask"].dim() == 2 and k["bias"].shape == k["mask"].shape for k in decode)
        assert not all(bool(k["mask"].all()) for k in decode)  # the top 5 of more keys


@pytest.mark.parametrize("batch", [1, 3])
def test_selected_rows_gathers_each_sequences_picked_keys(batch):
    """_selected_rows' row view and its fallback (strides no row view allows: the head dim not contiguous) give
    t[b, :, picked[b, j]], j fastest, for a contiguous cache, a narrower view of a wider one, and the fallback."""
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(batch, 2, 7, 12, generator=g)
    picked = torch.randint(0, 7, (batch, 4), generator=g)
    for t in (wide, wide[..., :5], wide.transpose(2, 3)):
        want = torch.stack([t[b, :, picked[b]].transpose(0, 1) for b in range(batch)]).reshape(batch * 4, 2, -1)
        assert torch.equal(dmattn_transformers._selected_rows(t, picked), want)


def test_latent_and_sparse_attention_refusals():
    """What the backend does not run says so: a value head dim wider than the key's, top-k indices or a position bias
    over packed rows (cu_seq_lens_*), MiniMax M3's block indices there or beside a full mask, latent and sparse
    attention under paged|dmattn; and
    a top-k call without the 4-D mask the mask function gives, a position bias of another shape."""
    module = torch.nn.Module()
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(NotImplementedError, match=r"a value head dim \(16\) wider than the key's \(8\)"):
        dmattn_transformers.attention_forward(module, q, k, torch.randn(1, 2, 3, 16), None)
    top = torch.zeros(1, 3, 2, dtype=torch.int32)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="top-k indices over packed rows"):
        dmattn_transformers.attention_forward(module, q, k, k, None, indices=top, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match="a position_bias over packed rows"):
        dmattn_transformers.attention_forward(module, q, k, k, None, position_bias=torch.zeros(1, 2, 3, 3),
                                              cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match=r"block_indices over packed rows \(cu_seq_lens_q\)"):
        dmattn_transformers.attention_forward(module, q, k, k, None, block_indices=top[:, None], cu_seq_lens_q=cu,
                                              cu_seq_lens_k=cu)
    with pytest.raises(NotImplementedError, match="block_indices beside transformers' full mask"):
        dmattn_transformers.attention_forward(module, q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool),
                                              block_indices=top[:, None])
    with pytest.raises(ValueError, match=r"a position_bias must be \(1 or batch, 1 / Hk / H heads, queries, >= keys\)"):
        dmattn_transformers.attention_forward(module, q, k, k, None, position_bias=torch.zeros(1, 2, 3, 2))
    with pytest.raises(ValueError, match="needs transformers' 4-D boolean mask"):
        dmattn_transformers.attention_forward(module, q, k, k, torch.ones(1, 3, dtype=torch.bool), indices=top)
    bias = torch.zeros(1, 2, 3, 3)
    for v, extra in ((torch.randn(1, 2, 3, 4), {}), (k, {"indices": top}), (k, {"position_bias": bias})):
        with pytest.raises(NotImplementedError, match=r"paged\|dmattn\): multi-head latent attention"):
            dmattn_transformers.paged_attention_forward(module, q, k, v, None, cache=object(), **extra)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gemma2", "gpt_oss"])
def test_continuous_batching_with_paged_dmattn(family, monkeypatch, op_calls):
    """generate_batch with attn_implementation="paged|dmattn": the same greedy tokens as "paged|sdpa" ("paged|eager"
    for Gemma 2's softcap and gpt-oss's sinks), prompts of different lengths sharing the paged cache. Full-attention layers read the pool in
    place through kv_slots (counted here); sliding-window layers take the cache's gathered keys. transformers sizes
    the cache from the GPU's free memory, so on the CPU the test gives it 1 GiB."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig
    from transformers.generation.continuous_batching import cache as cb_cache

    monkeypatch.setattr(cb_cache.PagedAttentionMemoryHandler, "get_available_memory", lambda self: 1 << 30)
    model = _tiny(family)
    prompts = [[1, 5, 9, 3], [7, 2], [4, 4, 4, 4, 4, 4, 8] * 5]
    tokens = {}
    for implementation in (f"paged|{REFERENCE[family]}", "paged|dmattn"):
        model.set_attn_implementation(implementation)
        out = model.generate_batch(
            prompts, generation_config=transformers.GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1,
                                                                     pad_token_id=0),
            continuous_batching_config=ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=64, block_size=16),
            warmup=False)
        tokens[implementation] = {name: o.generated_tokens for name, o in out.items()}
    reference, ours = tokens.values()
    assert ours == reference and all(len(t) == 10 for t in ours.values())
    if family != "mistral":  # every Mistral layer has a window; the others have full-attention layers
        assert any(kwargs.get("kv_slots") is not None for _, kwargs in op_calls)


def test_paged_dmattn_needs_the_paged_cache():
    model = _tiny("llama")
    model.set_attn_implementation("paged|dmattn")
    with pytest.raises(ValueError, match="runs under transformers' continuous batching"):
        model(torch.tensor([[1, 2, 3]]))
