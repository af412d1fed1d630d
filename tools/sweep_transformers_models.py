"""Every causal-LM architecture this transformers lists, built tiny from its default config, run under "eager" and
"dmattn" on the same left-padded batch: the largest logit difference over the real tokens, and whether 5 greedy
tokens agree. --seq2seq: every encoder-decoder one instead (a right-padded encoder batch, decoder ids given, each
model built with its implementation, which then reaches every stack). A correctness sweep by hand (minutes on the
CPU; not in CI, whose tests pin the families that matter).

    python tools/sweep_transformers_models.py --json benchmarks/results/transformers_architecture_sweep_cpu.json
    python tools/sweep_transformers_models.py --seq2seq --json benchmarks/results/transformers_seq2seq_sweep_cpu.json
    python tools/sweep_transformers_models.py llama doge          # some architectures only

Each config is shrunk by the attribute names most architectures share (hidden 64, 2 layers, 4 query and 2 KV heads,
head dim 16, a vocabulary of 128, few experts); an architecture that fails to build or run at that size (under eager
too, mostly: sizes the shrink left inconsistent) is reported with its error, and one that takes more than --timeout
seconds is cut off. What the sweep says is only as good as that shrink: a failure here is a lead, not a verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (it puts this checkout's dmattn_ops on the path)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, head_dim=16, max_position_embeddings=256, moe_intermediate_size=32,
             num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)
SMALL_SEQ2SEQ = dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                     encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
                     encoder_ffn_dim=128, decoder_ffn_dim=128, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64, pad_token_id=0,
                     bos_token_id=1, eos_token_id=2, decoder_start_token_id=0, num_experts=4)


class _TimedOut(Exception):
    pass


def _timed_out(*_):
    raise _TimedOut()


def _shrink(cfg, small: dict) -> None:
    """Sets each of small's attributes that cfg has (a derived or per-layer one that refuses is left as it is)."""
    for name, value in small.items():
        if hasattr(cfg, name):
            try:
                setattr(cfg, name, value)
            except Exception:  # noqa: BLE001 - see above
                pass


def _verdict(logits: dict, tokens: dict, real=None) -> dict:
    """A ran architecture's row: the largest logit difference (over the real tokens where given), the logits'
    scale, and whether the greedy tokens agree."""
    eager, ours = (logits[name] if real is None else logits[name][real] for name in ("eager", "dmattn"))
    return {"status": "ran", "max_abs_logit_diff": (eager - ours).abs().max().item(),
            "logit_scale": eager.abs().max().item(),
            "same_greedy_tokens": bool(torch.equal(tokens["eager"], tokens["dmattn"]))}


def tiny_model(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    _shrink(text, SMALL)
    if getattr(text, "layer_types", None) is not None:
        text.layer_types = list(text.layer_types)[:SMALL["num_hidden_layers"]]
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def batch():
    """Three left-padded rows of 12 tokens (ids 3-102)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 103, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :4] = 0
    mask[2, :7] = 0
    return ids, mask


def check_seq2seq(model_type: str) -> dict:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    g = torch.Generator().manual_seed(4)
    ids, decoder_ids = torch.randint(3, 100, (2, 12), generator=g), torch.randint(3, 100, (2, 5), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 8:] = 0
    logits, tokens = {}, {}
    for implementation in ("eager", "dmattn"):
        cfg = AutoConfig.for_model(model_type)
        _shrink(cfg, SMALL_SEQ2SEQ)
        torch.manual_seed(0)
        model = AutoModelForSeq2SeqLM.from_config(cfg, attn_implementation=implementation).eval()
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, attention_mask=mask,
                                           decoder_input_ids=decoder_ids).logits.float()
            tokens[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                    do_sample=False, decoder_start_token_id=0)
    return _verdict(logits, tokens)


def check(model_type: str) -> dict:
    model = tiny_model(model_type)
    ids, mask = batch()
    logits, tokens = {}, {}
    for implementation in ("eager", "dmattn"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            logits[implementation] = model(input_ids=ids, attention_mask=mask).logits.float()
            tokens[implementation] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                    do_sample=False, pad_token_id=0)
    return _verdict(logits, tokens, mask.bool())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("architectures", nargs="*", help="model types (default: every causal-LM one)")
    ap.add_argument("--seq2seq", action="store_true", help="the encoder-decoder architectures (see above)")
    ap.add_argument("--timeout", type=int, default=40, help="seconds an architecture may take")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import transformers
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES)

    from dmattn_ops.integrations import transformers as dmattn_transformers

    dmattn_transformers.register()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    names = args.architectures or sorted(MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES if args.seq2seq
                                         else MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    run = check_seq2seq if args.seq2seq else check
    signal.signal(signal.SIGALRM, _timed_out)
    results = {}
    for name in names:
        signal.alarm(args.timeout)
        try:
            results[name] = run(name)
        except _TimedOut:
            results[name] = {"status": f"timed out after {args.timeout} s"}
        except Exception as e:  # noqa: BLE001 - one architecture failing is reported, not fatal
            results[name] = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        finally:
            signal.alarm(0)
        r = results[name]
        line = (f"logits {r['max_abs_logit_diff']:.2e} (of {r['logit_scale']:.1e}), greedy tokens "
                f"{'same' if r['same_greedy_tokens'] else 'DIFFERENT'}") if r["status"] == "ran" else r["status"]
        print(f"{name:28} {line}", flush=True)
    ran = [r for r in results.values() if r["status"] == "ran"]
    print(f"{len(ran)} of {len(results)} ran; logits within 1e-4: "
          f"{sum(r['max_abs_logit_diff'] <= 1e-4 for r in ran)}; the same greedy tokens: "
          f"{sum(r['same_greedy_tokens'] for r in ran)}")
    if args.json:
        workload = "transformers architecture sweep" + (" (seq2seq)" if args.seq2seq else "")
        bc.write_json(args.json, {"workload": workload,
                                  "transformers": transformers.__version__,
                                  "shrink": SMALL_SEQ2SEQ if args.seq2seq else SMALL,
                                  "environment": bc.environment(torch.device("cpu"), REPO),
                                  "results": results,
                                  "command": "python " + " ".join([os.path.relpath(__file__, REPO)] +
                                                                  (argv or sys.argv[1:]))})
    return 0


if __name__ == "__main__":
    sys.exit(main())
