#!/usr/bin/env python3
"""Hybrid model shapes in real servers on one GPU (scripts/gpu_models.sh runs it): the config-only
folders of scripts/make_model_configs.py with `--load-format dummy`, one server at a time.

Per shape, servers in this order (each one's results are written as soon as it stops, so a run cut short
keeps what it measured):
  gpt-oss     BF16 (SGLang's triton backend) and `turbo4` under hybrid SWA memory (SGLang's default for
              gpt-oss), `turbo4` again without CUDA graphs; then BF16 and `turbo4` with
              --disable-hybrid-swa-memory (one pool for all layers)
  qwen3-next  BF16 (triton), `turbo4`, `turbo4` without CUDA graphs
What each TurboQuant server is checked for:
  served            started, answered every request
  graphs_identical  the same greedy tokens with CUDA graphs on and off (PROMPTS random-token prompts sent one
                    at a time, GEN tokens each, EOS ignored); None where the graphs-off server is not run
  capacity_ratio    its max_total_num_tokens over the BF16 server's at the same --mem-fraction-static, against
  byte_ratio        the config's bytes per token over BF16's for the layout (hybrid SWA memory: full-pool tokens,
                    (F_bf16 + r S_bf16) / (F + r S) with F, S the full / sliding-window layers' bytes and r
                    --swa-full-tokens-ratio); the recent window's ring is counted in (expected_ratio)
  quality_delta     mean |log p_turbo4 - log p_bf16| over the teacher-forced tokens of LOGPROB_PROMPTS prompts
                    of LOGPROB_LEN tokens (longer than gpt-oss's 128-token window), prefill reading the packed
                    cache (evaluation.prefill_from_cache), dummy weights
Writes <out>/models.json (records for results/models.json) and <out>/models_detail.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import eval_quality as ev  # noqa: E402
import make_model_configs  # noqa: E402
from gpu_server_check import Server, evaluation_config  # noqa: E402

PROMPTS, PROMPT_LEN, GEN = 6, 160, 24
LOGPROB_PROMPTS, LOGPROB_LEN = 4, 600
SWA_RATIO = 0.8  # SGLang's default --swa-full-tokens-ratio, passed explicitly
MAX_RUNNING = 16
MODELS = {"gpt-oss": "gpt-oss-20b shape, 4 layers (dummy weights)",
          "qwen3-next": "Qwen3-Next-80B-A3B shape, 8 layers (dummy weights)"}


def prompts(vocab: int, n: int, length: int, seed: int):
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab) for _ in range(length)] for _ in range(n)]


def greedy(url, ps):
    """One request at a time: graphs on and off see the same batches."""
    out = []
    for p in ps:
        r = ev._post(url, "/generate", {"input_ids": p, "sampling_params": {
            "max_new_tokens": GEN, "temperature": 0.0, "ignore_eos": True}})
        out.append(list(r["meta_info"].get("output_ids") or r.get("output_ids") or []))
    return out


def logprobs(url, ps):
    return [ev._input_logprobs(url, {"input_ids": p}) for p in ps]


def byte_ratios(model_dir: str, cfg_ref: str, hybrid_swa: bool, heads_tp1: int, ring_requests: int):
    """(byte_ratio, plan, ring bytes) of the config for the model in this layout."""
    from sglang.srt.configs.model_config import ModelConfig
    from sglang_tq.compat import resolve_model_plan
    from tq_kernels.codec import BF16_BYTES_PER_HEAD

    mc = ModelConfig(model_dir, disable_hybrid_swa_memory=not hybrid_swa)
    _, plan = resolve_model_plan(mc, cfg_ref)
    bf16_layer = heads_tp1 * (BF16_BYTES_PER_HEAD(plan.head_dim) + BF16_BYTES_PER_HEAD(plan.v_head_dim))
    if mc.is_hybrid_swa:
        F, S = (plan.layers_bytes_per_token(heads_tp1, ids) for ids in (mc.full_attention_layer_ids,
                                                                         mc.swa_attention_layer_ids))
        bf = bf16_layer * (len(mc.full_attention_layer_ids) + SWA_RATIO * len(mc.swa_attention_layer_ids))
        ring_layers = mc.full_attention_layer_ids
        return bf / (F + SWA_RATIO * S), F + SWA_RATIO * S, bf, plan.window_bytes(heads_tp1, ring_requests, ring_layers)
    tq = plan.bytes_per_token(heads_tp1)
    bf = plan.bf16_bytes_per_token(heads_tp1)
    return bf / tq, tq, bf, plan.window_bytes(heads_tp1, ring_requests, plan.attention_layers)


def run_layout(shape, hybrid_swa, a, meta, records, detail, deadline):
    """The servers of one shape and memory layout; appends its record."""
    model = make_model_configs.build(shape, a.models_dir, a.tokenizer)
    cfg = json.load(open(os.path.join(model, "config.json")))
    vocab, heads = cfg["vocab_size"], cfg["num_key_value_heads"]
    base = ["--model-path", model, "--load-format", "dummy", "--grammar-backend", "none", "--skip-server-warmup",
            "--mem-fraction-static", str(a.mem_fraction), "--max-running-requests", str(MAX_RUNNING),
            "--cuda-graph-max-bs", "4", "--context-length", "4096", "--swa-full-tokens-ratio", str(SWA_RATIO)]
    base += [] if hybrid_swa else ["--disable-hybrid-swa-memory"]
    tq = ["--attention-backend", "turboquant", "--tq-config", evaluation_config("turbo4", a.out)]
    runs = [("bf16", ["--attention-backend", "triton"]), ("turbo4", tq)]
    if hybrid_swa:  # graphs on / off in the default layout
        runs.append(("turbo4-nograph", tq + ["--disable-cuda-graph"]))
    greedy_ps, lp_ps = prompts(vocab, PROMPTS, PROMPT_LEN, 1), prompts(vocab, LOGPROB_PROMPTS, LOGPROB_LEN, 2)
    got = {}
    for name, args in runs:
        if time.time() > deadline:
            print(f"[{shape}] out of time before {name}", flush=True)
            break
        tag = f"{shape}_{name}" + ("" if hybrid_swa else "_onepool")
        res = {"served": False}
        try:
            s = Server(tag, base + args, log_dir=a.out, port=a.port)
        except Exception as e:  # noqa: BLE001 - a server that does not start is a result
            res["error"] = f"{type(e).__name__}: {e}"[:500]
            got[name] = detail[tag] = res
            continue
        try:
            res["max_total_num_tokens"] = s.info.get("max_total_num_tokens")
            res["startup_s"] = round(s.startup_s, 1)
            res["greedy"] = greedy(s.url, greedy_ps)
            if name != "turbo4-nograph":
                res["logprobs"] = logprobs(s.url, lp_ps)
            res["served"] = True
        except Exception as e:  # noqa: BLE001
            res["error"] = f"{type(e).__name__}: {e}"[:500]
        finally:
            s.stop()
        got[name] = res
        detail[tag] = {k: v for k, v in res.items() if k != "logprobs"}
    if shape == "qwen3-next":
        layout, memory = "hybrid-linear", "attention pool + recurrent-state pool"
    else:
        layout, memory = "swa+sinks", "hybrid SWA pools" if hybrid_swa else "one pool"
    rec = summarize(shape, model, layout, memory, hybrid_swa, heads, got, meta)
    if rec is not None:
        records.append(rec)
        print(json.dumps(rec), flush=True)


def summarize(shape, model, layout, memory, hybrid_swa, heads, got, meta):
    t, b, ng = got.get("turbo4"), got.get("bf16"), got.get("turbo4-nograph")
    if t is None:
        return None
    ratio, tq_bytes, bf_bytes, ring = byte_ratios(model, "turbo4", hybrid_swa, heads, MAX_RUNNING)
    rec = dict(model=MODELS[shape], layout=layout, memory=memory, config="turbo4", served=bool(t.get("served")),
               graphs_identical=None, capacity_ratio=None, byte_ratio=round(ratio, 4), expected_ratio=None,
               quality_metric=f"mean |Δ log p| of {LOGPROB_PROMPTS} x {LOGPROB_LEN} teacher-forced random tokens "
                              f"vs BF16 (triton), prefill from the packed cache, dummy weights",
               quality_delta=None, **meta)
    if ng is not None and t.get("served") and ng.get("served"):
        same = sum(x == y for x, y in zip(t["greedy"], ng["greedy"]))
        rec["graphs_identical"] = same == len(t["greedy"])
        rec["graphs_detail"] = f"{same}/{len(t['greedy'])} prompts"
    if b is not None and b.get("served") and t.get("served"):
        nb, nt = b["max_total_num_tokens"], t["max_total_num_tokens"]
        rec["capacity_ratio"] = round(nt / nb, 4)
        rec["expected_ratio"] = round((nb * bf_bytes - ring) / tq_bytes / nb, 4)  # the ring's bytes taken out
        deltas = [abs(x - y) for lt, lb in zip(t["logprobs"], b["logprobs"]) for x, y in zip(lt, lb)]
        rec["quality_delta"] = round(sum(deltas) / len(deltas), 5)
        rec["quality_delta_max"] = round(max(deltas), 5)
        rec["bf16_greedy_agreement"] = f"{sum(x == y for x, y in zip(t['greedy'], b['greedy']))}/{len(t['greedy'])}"
        rec["capacity_within_1pct"] = abs(rec["capacity_ratio"] / rec["expected_ratio"] - 1) <= 0.01
    if not t.get("served"):
        rec["error"] = t.get("error")
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--shapes", default="gpt-oss,qwen3-next")
    ap.add_argument("--tokenizer", default=".gpu_tok")
    ap.add_argument("--models-dir", default="/tmp/models")
    ap.add_argument("--mem-fraction", type=float, default=0.6)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--budget-s", type=float, default=470, help="start no server after this many seconds")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    # `timeout` ends this script with SIGTERM: unwind, so the running server's `finally` stops it (servers run
    # in their own process group and would outlive the script)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(124))
    deadline = time.time() + a.budget_s
    meta = dict(card=ev._card(), date=datetime.date.today().isoformat(), commit=ev._git_commit(),
                command="bash scripts/gpu_models.sh")
    records, detail = [], {}
    shapes = a.shapes.split(",")
    for shape in shapes:
        if shape not in MODELS:
            raise SystemExit(f"gpu_models: unknown shape {shape!r}; allowed: {', '.join(MODELS)}")
    # the default layouts first, gpt-oss's one-pool layout last
    jobs = [(shape, True) for shape in shapes] + [("gpt-oss", False)] * ("gpt-oss" in shapes)
    for shape, hybrid_swa in jobs:
        run_layout(shape, hybrid_swa, a, meta, records, detail, deadline)
        with open(os.path.join(a.out, "models.json"), "w") as f:
            json.dump(records, f, indent=1)
        with open(os.path.join(a.out, "models_detail.json"), "w") as f:
            json.dump(detail, f, indent=1)
    print(f"wrote {len(records)} records to {os.path.join(a.out, 'models.json')}")
    ok = bool(records)
    for r in records:  # the targets: served, graphs on/off identical, capacity = byte ratio within 1 %
        checks = {"served": r["served"], "graphs identical": r["graphs_identical"],
                  "capacity within 1 %": r.get("capacity_within_1pct")}
        failed = [k for k, v in checks.items() if v is False or (v is None and k != "graphs identical")]
        ok = ok and not failed
        print(f"{'PASS' if not failed else 'FAIL'} {r['model']}, {r['memory']}: "
              + ", ".join(f"{k} {v}" for k, v in checks.items()) + f", quality Δ {r['quality_delta']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
