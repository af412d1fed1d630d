"""A decode step of a transformers model with attn_implementation="dmattn" against the implementations this
transformers has ("sdpa", "eager", "flash_attention_2" where installed), on the same random-weight model and cache.

    python tools/bench_transformers.py --device cuda --out benchmarks/results     # the serving issue's shape
    python tools/bench_transformers.py --device cpu --tiny                        # a smoke run
    python tools/bench_transformers.py --device cuda --unpadded --batch 1         # no padding: the mask dropped
    python tools/bench_transformers.py --model deepseek_v32 --device cpu          # sparse attention's top-k keys

Model: a Llama of 8 layers (hidden 2048, 32 query heads, 8 KV heads, head dim 64, bf16 on CUDA / float32 on the CPU),
random weights, no download. Workload: B = 16 left-padded prompts of 1024-2048 tokens (seed 0), prefilled once per
implementation into a dynamic cache; then each implementation's decode step (one new token per sequence: the model
forward with that cache) is timed: median of --reps steps after warm-up, CUDA events, the cache trimmed back after
every step so each one sees the same lengths. The logits of every implementation's step are checked against sdpa's.
--tiny: 2 layers, hidden 256, B = 4, prompts of 48-96 tokens. --model deepseek_v32: DeepSeek-V3.2's attention
shape scaled down (2 layers, hidden 1024, 16 heads, multi-head latent attention with query / key head dim 192 and
value head dim 128, an indexer of 8 heads keeping each query's --topk keys, default 512), B = 2 left-padded prompts
of 2048-4096 tokens (--tiny: hidden 256, prompts of 256-512, top 64), prefilled once by dmattn and the cache copied
for each implementation (eager's prefill would hold every head's (S x S) weights): the decode step reads each
sequence's top-k keys in dmattn, every key under sdpa and eager (their mask hides the rest). --batch: another B.
--profile N: N more steps of
each implementation under torch.profiler, their host time per op. --unpadded: every prompt of the longest length,
an all-ones attention mask (a tokenizer's unpadded batch, generate's single prompt), and a row "dmattn_kept_mask"
beside "dmattn": the same backend with that all-True mask handed to every layer as a key-side mask, as it was before
the mask function dropped it (what the drop saves: on CUDA the mask's passes in every layer). "dmattn_via_api",
where --implementations names it: the backend with each op call made through varlen_attention (register_via_api).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (it puts this checkout's dmattn_ops on the path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(tiny: bool, device: torch.device, dtype: torch.dtype, batch_size=None, unpadded=False, model_name="llama",
          topk=None):
    import transformers

    model_cls = transformers.LlamaForCausalLM
    if model_name == "deepseek_v32":
        size = dict(hidden_size=256, q_lora_rank=96, kv_lora_rank=128, num_attention_heads=4) if tiny else \
            dict(hidden_size=1024, q_lora_rank=384, kv_lora_rank=512, num_attention_heads=16)
        cfg = transformers.DeepseekV32Config(
            vocab_size=1024, intermediate_size=2 * size["hidden_size"], moe_intermediate_size=256,
            num_hidden_layers=2, first_k_dense_replace=1, num_key_value_heads=size["num_attention_heads"],
            qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=8, num_experts_per_tok=2,
            n_group=1, topk_group=1, index_topk=topk or (64 if tiny else 512), index_head_dim=128, index_n_heads=8,
            max_position_embeddings=8192, **size)
        batch, lo, hi = (2, 256, 512) if tiny else (2, 2048, 4096)
        model_cls = transformers.DeepseekV32ForCausalLM
    elif tiny:
        cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
        batch, lo, hi = 4, 48, 96
    else:
        cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                       num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=8,
                                       max_position_embeddings=8192)
        batch, lo, hi = 16, 1024, 2048
    batch = batch_size or batch
    torch.manual_seed(0)
    model = model_cls(cfg).to(device=device, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = [hi] * batch if unpadded else torch.randint(lo, hi + 1, (batch,), generator=gen).tolist()
    width = max(lengths)
    ids = torch.randint(0, cfg.vocab_size, (batch, width), generator=gen)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, width - n:] = 1  # left padding
    return model, ids.to(device), mask.to(device), lengths


def implementations():
    out = ["dmattn", "sdpa", "eager"]
    try:
        import flash_attn  # noqa: F401

        out.append("flash_attention_2")
    except ImportError:
        pass
    return out


def profile_steps(step, device: torch.device, steps: int) -> dict:
    """Host time of `steps` decode steps under torch.profiler (CPU activity only): self CPU time per step in all and
    per op (the 40 largest), with calls per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return {"steps": steps,
            "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / steps / 1e3,
            "ops": [{"name": e.key, "self_cpu_us_per_step": e.self_cpu_time_total / steps,
                     "calls_per_step": e.count / steps} for e in events[:40]]}


def attention_function_time(name: str, step, device: torch.device, steps: int, model) -> dict:
    """Wall time per call of implementation `name`'s attention function (transformers' AttentionInterface entry;
    "eager": the model's module's eager_attention_forward, which it calls without the interface), over `steps` more
    decode steps, inside the model's step (caches and the CPU as the model leaves them, which a loop of calls alone
    would not): its median and mean in us, and calls per step. On the CPU that is the kernel and all the Python around
    it; on CUDA the host's share (the kernel runs asynchronously)."""
    import time

    from transformers import AttentionInterface

    if name == "eager":
        owner = sys.modules[type(model).__module__]
        original = owner.eager_attention_forward

        def install(fn):
            owner.eager_attention_forward = fn
    else:
        original = AttentionInterface()[name]

        def install(fn):
            AttentionInterface.register(name, fn)
    times = []

    def timed(*args, **kwargs):
        start = time.perf_counter_ns()
        out = original(*args, **kwargs)
        times.append(time.perf_counter_ns() - start)
        return out

    install(timed)
    try:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    finally:
        install(original)
    times.sort()
    return {"steps": steps, "calls_per_step": len(times) / steps, "median_us": times[len(times) // 2] / 1e3,
            "mean_us": sum(times) / len(times) / 1e3}


KEPT_MASK = "dmattn_kept_mask"


def register_kept_mask() -> None:
    """KEPT_MASK: dmattn's attention function with a mask function that hands on an all-True padding mask as a
    real (batch, keys) tensor, which the attention function runs as a key-side mask (the backend before it dropped
    such masks)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from dmattn_ops.integrations import transformers as dmattn_transformers

    def kept(*args, **kwargs):
        mask = dmattn_transformers.padding_mask(*args, **kwargs)
        if dmattn_transformers._is_unpadded(mask):
            mask = torch.ones(mask.shape, dtype=torch.bool, device=mask.device)
        return mask

    AttentionInterface.register(KEPT_MASK, dmattn_transformers.attention_forward)
    AttentionMaskInterface.register(KEPT_MASK, kept)


VIA_API = "dmattn_via_api"


def register_via_api() -> None:
    """VIA_API (run only where --implementations names it): dmattn's attention function with every op call routed
    through ``dmattn_ops.varlen_attention`` (its type checks, keyword binding and mods test), as the backend called
    the op before its no-grad calls went to the op straight. What the straight call saves, side by side in one
    process; the routing adds one attribute swap a call to this row."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    import dmattn_ops
    from dmattn_ops.integrations import transformers as dmattn_transformers

    def through_api(*args, **kwargs):
        return dmattn_ops.varlen_attention(*args, **kwargs)

    def via_api(*args, **kwargs):
        straight, dmattn_transformers._varlen = dmattn_transformers._varlen, through_api
        try:
            return dmattn_transformers.attention_forward(*args, **kwargs)
        finally:
            dmattn_transformers._varlen = straight

    AttentionInterface.register(VIA_API, via_api)
    AttentionMaskInterface.register(VIA_API, dmattn_transformers.padding_mask)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--model", choices=["llama", "deepseek_v32"], default="llama", help="the model (see above)")
    ap.add_argument("--topk", type=int, default=None, help="deepseek_v32: keys its indexer keeps per query")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=None, help="sequences (default: 16, --tiny 4)")
    ap.add_argument("--unpadded", action="store_true", help="prompts of one length, no padding (see above)")
    ap.add_argument("--implementations", nargs="+", default=None, metavar="NAME",
                    help="which implementations run, in this order (default: dmattn [dmattn_kept_mask] sdpa eager "
                         f"[flash_attention_2]; {VIA_API} only where named)")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="also run STEPS more steps of each implementation under torch.profiler (host activity) and "
                         "report each one's self CPU time per step and its ops (where a host-bound step's time goes)")
    ap.add_argument("--function-time", type=int, default=0, metavar="STEPS",
                    help="also run STEPS more steps of each implementation timing its attention function per call "
                         "inside the step (on the CPU the kernel and the Python around it; on CUDA the host's share)")
    ap.add_argument("--out", default=None, help="folder for transformers_decode_step[_unpadded][_bB].json")
    args = ap.parse_args(argv)

    from dmattn_ops.integrations import transformers as dmattn_transformers

    dmattn_transformers.register()
    register_via_api()
    names = implementations()
    if args.unpadded:
        register_kept_mask()
        names.insert(1, KEPT_MASK)
    names = args.implementations or names
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, ids, mask, lengths = build(args.tiny, device, dtype, args.batch, args.unpadded, args.model, args.topk)
    step_ids = ids[:, -1:]
    step_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    shared = None
    if args.model == "deepseek_v32":  # one prefill (see above), its cache copied for each implementation
        model.set_attn_implementation("dmattn")
        with torch.no_grad():
            shared = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    rows = []
    for name in names:
        model.set_attn_implementation(name)
        with torch.no_grad():
            if shared is not None:
                cache = copy.deepcopy(shared)
            else:
                cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values

            def step():
                out = model(input_ids=step_ids, attention_mask=step_mask, past_key_values=cache, use_cache=True)
                cache.crop(-1)  # drop the new token: every step sees the same lengths
                return out.logits

            try:
                logits = step()
                timing = bc.time_callable(step, device, warmup=3, reps=args.reps)
                host = profile_steps(step, device, args.profile) if args.profile else None
                fn_time = (attention_function_time(name, step, device, args.function_time, model)
                           if args.function_time else None)
            except Exception as e:  # noqa: BLE001 - one implementation failing is reported, not fatal
                rows.append({"implementation": name, "status": f"failed: {type(e).__name__}: {e}"})
                print(f"{name:20} failed: {e}", flush=True)
                continue
        rows.append({"implementation": name, "status": "ok", "logits": logits.float().cpu(), **timing.as_dict(),
                     **({"host_profile": host} if host else {}),
                     **({"attention_function": fn_time} if fn_time else {})})
        print(f"{name:20} {timing.median_ms:9.3f} ms per decode step", flush=True)
        if fn_time:
            print(f"{'':20} attention function: {fn_time['median_us']:.1f} us a call (median; mean "
                  f"{fn_time['mean_us']:.1f}), {fn_time['calls_per_step']:.0f} calls a step", flush=True)
        if host:
            print(f"{'':20} host: {host['self_cpu_ms_per_step']:.3f} ms of self CPU time a step; the most:", flush=True)
            for op in host["ops"][:12]:
                print(f"{'':22} {op['name'][:40]:40} {op['self_cpu_us_per_step']:9.1f} us"
                      f"  {op['calls_per_step']:6.1f} calls")
    ok = {r["implementation"]: r for r in rows if r["status"] == "ok"}
    for r in ok.values():
        r["max_abs_logit_diff_vs_sdpa"] = (r["logits"] - ok["sdpa"]["logits"]).abs().max().item() if "sdpa" in ok \
            else None
        r["dmattn_speedup"] = r["ms_median"] / ok["dmattn"]["ms_median"] if "dmattn" in ok else None
    for r in ok.values():
        del r["logits"]
        print(f"  {r['implementation']:20} {r['ms_median']:9.3f} ms  dmattn speed-up {r['dmattn_speedup'] or 0:.2f}x"
              f"  max |logit - sdpa| {r['max_abs_logit_diff_vs_sdpa'] or 0:.2e}")
    if args.out:
        payload = {"workload": "transformers decode step", "model": args.model, "tiny": args.tiny,
                   "batch": len(lengths), "unpadded": args.unpadded,
                   "prompt_lengths": lengths, "config": model.config.to_dict(), "dtype": str(dtype),
                   "environment": bc.environment(device, REPO), "results": rows,
                   "command": "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv or sys.argv[1:]))}
        name = "transformers_decode_step" + ("" if args.model == "llama" else f"_{args.model}") + \
            ("_unpadded" if args.unpadded else "") + (f"_b{args.batch}" if args.batch else "")
        bc.write_json(os.path.join(args.out, name + ".json"), payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
