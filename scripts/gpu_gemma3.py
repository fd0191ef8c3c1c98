#!/usr/bin/env python3
"""Gemma-3-270M (real weights) in real servers on one GPU: BF16 KV (SGLang's triton backend) against
`turbo4` (scripts/gpu_gemma3.sh converts the GGUF and runs this).

Servers, one at a time (each one's numbers are written as soon as it stops, so a run cut short keeps
what it measured; none starts after --budget-s):
  bf16                     perplexity spans, greedy prompts, a completion, max_total_num_tokens
  turbo4-eval              perplexity spans with evaluation.prefill_from_cache: every scored token reads the
                           packed cache, as in decoding (configs/turbo4.yaml otherwise)
  turbo4_gemma3_270m-eval  the same with Gemma-3-270M's measured key means
                           (configs/examples/turbo4_gemma3_270m.yaml)
  turbo4                   greedy prompts (agreement with BF16), the completion, max_total_num_tokens (capacity)
  turbo4-nograph           the greedy prompts again without CUDA graphs (graphs_identical)
Perplexity: SPANS spans of SPAN_TOKENS tokens of the Austen texts (eval_quality.py's spans), each after
the tokenizer's BOS (Gemma reads BOS as its attention sink; without it perplexity doubles). Greedy:
PROMPTS prompts of PROMPT_TOKENS tokens (after BOS), GEN tokens each, EOS ignored, one request at a time.
Gemma 3 has 5 sliding-window (512) layers to each full one; SGLang 0.5.10 keeps them in one pool.
Writes <out>/models.json (one record per config for results/models.json) and <out>/gemma3_detail.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import eval_quality as ev  # noqa: E402
from gpu_server_check import Server, evaluation_config  # noqa: E402

MODEL = "Gemma-3-270M (google/gemma-3-270m, GGUF Q4_K_M)"
SPANS, SPAN_TOKENS = 4, 2048
PROMPTS, PROMPT_TOKENS, GEN = 16, 128, 128
MAX_RUNNING = 16
COMPLETION = "Question: What is the capital of France?\nAnswer:"
CENTERED = "turbo4_gemma3_270m"  # turbo4 + the model's measured key means (same bytes as turbo4)
CENTERED_YAML = os.path.join(os.path.dirname(HERE), "configs", "examples", f"{CENTERED}.yaml")


def completion(url):
    r = ev._post(url, "/generate", {"text": COMPLETION, "sampling_params": {"max_new_tokens": 24, "temperature": 0.0}})
    return r["text"]


def byte_ratio(model_dir, config, max_running):
    """(bf16 / config bytes per token, config bytes per token, bf16 bytes per token, recent-window ring bytes)
    for the model's attention shape in one pool."""
    from sglang_tq.config import load_config

    hf = json.load(open(os.path.join(model_dir, "config.json")))
    heads = hf["num_key_value_heads"]
    plan = load_config(config).resolve(hf["num_hidden_layers"], hf["head_dim"], num_kv_heads=heads)
    tq, bf = plan.bytes_per_token(heads), plan.bf16_bytes_per_token(heads)
    return bf / tq, tq, bf, plan.window_bytes(heads, min(max_running, plan.window_requests))


def summarize(config, got, ratios, meta):
    """The results/models.json record of `config` from the servers' results: quality from the server
    `config`-eval, decoding (greedy, capacity, CUDA graphs) from `config` and `config`-nograph where run."""
    b, e, t, ng = (got.get(k) or {} for k in ("bf16", f"{config}-eval", config, f"{config}-nograph"))
    ratio, tq_bytes, bf_bytes, ring = ratios
    rec = dict(model=MODEL, layout="swa", memory="one pool", config=config, served=bool((t or e).get("served")),
               graphs_identical=None, capacity_ratio=None, byte_ratio=round(ratio, 4), expected_ratio=None,
               quality_metric=f"perplexity change in % ({config} / BF16 − 1, mean over {SPANS} Austen spans of "
                              f"{SPAN_TOKENS} tokens after BOS; prefill from the packed cache)",
               quality_delta=None, **meta)
    if t.get("served") and ng.get("served"):
        same = sum(x == y for x, y in zip(t["greedy"], ng["greedy"]))
        rec["graphs_identical"] = same == len(t["greedy"])
        rec["graphs_detail"] = f"{same}/{len(t['greedy'])} prompts"
    if b.get("served") and t.get("served"):
        nb, nt = b["max_total_num_tokens"], t["max_total_num_tokens"]
        rec["capacity_ratio"] = round(nt / nb, 4)
        rec["expected_ratio"] = round((nb * bf_bytes - ring) / tq_bytes / nb, 4)  # the ring's bytes taken out
        agree = ev.greedy_agreement({"prompts": b["prompts"], "outputs": b["greedy"]},
                                    {"prompts": t["prompts"], "outputs": t["greedy"]})
        rec["greedy_agreement"] = {"mean_prefix": round(agree["mean"], 2), "std": round(agree["std"], 2),
                                   "identical": f"{agree['identical']}/{agree['n']}", "tokens": GEN}
    if b.get("served") and e.get("served"):
        per_span = [x / y for x, y in zip(e["ppl"]["per_span"], b["ppl"]["per_span"])]
        mean = sum(per_span) / len(per_span)
        rec["quality_delta"] = round((mean - 1) * 100, 3)
        rec["quality_spread"] = round((sum((r - mean) ** 2 for r in per_span) / max(1, len(per_span) - 1)) ** 0.5
                                      * 100, 3)
        rec["bf16_ppl"], rec["ppl"] = round(b["ppl"]["ppl"], 4), round(e["ppl"]["ppl"], 4)
    for srv in (t, e):
        if srv and not srv.get("served"):
            rec["error"] = srv.get("error")
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/models/gemma3-270m")
    ap.add_argument("--text", default=".gpu_data", help="Austen text file or folder of *.txt")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--mem-fraction", type=float, default=0.6)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--budget-s", type=float, default=420, help="start no server after this many seconds")
    ap.add_argument("--extra-args", default="", help="more launch_server flags for every server")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    deadline = time.time() + a.budget_s
    meta = dict(card=ev._card(), date=datetime.date.today().isoformat(), commit=ev._git_commit(),
                command="bash scripts/gpu_gemma3.sh")
    base = ["--model-path", a.model, "--mem-fraction-static", str(a.mem_fraction), "--grammar-backend", "none",
            "--max-running-requests", str(MAX_RUNNING), "--cuda-graph-max-bs", str(MAX_RUNNING)] + a.extra_args.split()
    tq = ["--attention-backend", "turboquant", "--tq-config"]
    runs = [("bf16", ["--attention-backend", "triton"]),
            ("turbo4-eval", tq + [evaluation_config("turbo4", a.out)]),
            (f"{CENTERED}-eval", tq + [evaluation_config(CENTERED_YAML, a.out)]),
            ("turbo4", tq + ["turbo4"]),
            ("turbo4-nograph", tq + ["turbo4", "--disable-cuda-graph"])]
    texts = ev.read_texts(a.text)
    ratios = byte_ratio(a.model, "turbo4", MAX_RUNNING)
    got, spans, prompts = {}, None, None
    for name, args in runs:
        if time.time() > deadline:
            print(f"[{name}] not started: past --budget-s", flush=True)
            break
        res = {"served": False}
        try:
            s = Server(name, base + args, log_dir=a.out, port=a.port)
        except Exception as exc:  # noqa: BLE001 - a server that does not start is a result
            got[name] = {"served": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        try:
            res["max_total_num_tokens"] = s.info.get("max_total_num_tokens")
            res["startup_s"] = round(s.startup_s, 1)
            if spans is None:  # the same token ids for every server, from the first one's tokenizer
                bos = ev.bos_prefix(s.url)
                tok = lambda t: ev.tokenize(s.url, t)  # noqa: E731
                spans = [bos + x for x in ev.text_spans(texts, SPANS, SPAN_TOKENS, tok)]
                prompts = [bos + x for x in ev.text_spans(texts, PROMPTS, PROMPT_TOKENS, tok)]
            if name == "bf16" or name.endswith("-eval"):
                res["ppl"] = ev.span_perplexity(s.url, spans)
                print(f"[{name}] perplexity {res['ppl']['ppl']:.4f} ± {res['ppl']['std']:.4f}", flush=True)
            if not name.endswith("-eval"):
                # one request at a time: CUDA graphs on and off see the same batches
                res["prompts"], res["greedy"] = prompts, ev.greedy_generate(s.url, prompts, GEN, concurrency=1)
                res["completion"] = completion(s.url)
                print(f"[{name}] {COMPLETION!r} -> {res['completion']!r}", flush=True)
            res["served"] = True
        except Exception as exc:  # noqa: BLE001
            res["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            s.stop()
        got[name] = res
        recs = [summarize(c, got, ratios, meta) for c in ("turbo4", CENTERED)]
        with open(os.path.join(a.out, "models.json"), "w") as f:
            json.dump(recs, f, indent=1)
        with open(os.path.join(a.out, "gemma3_detail.json"), "w") as f:
            json.dump({k: {x: y for x, y in v.items() if x != "prompts"} for k, v in got.items()}, f, indent=1)
    recs = [summarize(c, got, ratios, meta) for c in ("turbo4", CENTERED)]
    print(json.dumps(recs, indent=1), flush=True)
    return 0 if all(r["served"] for r in recs) else 1


if __name__ == "__main__":
    sys.exit(main())
