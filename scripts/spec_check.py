#!/usr/bin/env python3
"""NGRAM speculative decoding on real servers, one GPU, one server at a time (bench_serving's Server, streaming
client and statistics).

Workload: repetitive text, where NGRAM's n-gram drafts get accepted: each prompt is a passage of the text files
given (--text: files or folders of .txt, e.g. the Austen novels) followed by an instruction to quote it and its
first words, so the continuation copies the passage. --prompts prompts x --max-new tokens, greedy, ignore_eos.

Stages (--stages, comma-separated; each server's results go to --work as JSON, so a stage cut off by a time
limit is rerun alone and the records are built from whatever the work folder holds):
  bf16    BF16 KV on SGLang's --bf16-backend (default fa3) without and with NGRAM
  turbo4  TurboQuant (--tq-config, default turbo4) without and with NGRAM
  load    scripts/load_test.py (--load-requests, concurrency 256, shared prefixes, 10 % aborts) against
          TurboQuant with NGRAM, a small pool and SGLang's retraction hook (SGLANG_TEST_RETRACT): passes with 0
          failures, no tokens held when idle, retractions seen and no leak message in the server log
Each bf16 / turbo4 server: the prompts one at a time (batch 1: each prompt's greedy tokens and TPOT; NGRAM's
accept length from /server_info), then 8 at a time (batch 8: TPOT p50 and output tok/s).

Records (results/speculative.json schema, one per batch size) go to --records: greedy_identical = prompts whose
greedy tokens are the same with NGRAM on and off (TurboQuant; bf16_greedy_identical: the same for BF16),
accept_len / bf16_accept_len, tpot_ms / bf16_tpot_ms with NGRAM (tpot_off_ms / bf16_tpot_off_ms without),
output tok/s likewise, and the load test's outcome.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_serving as bs  # noqa: E402
import gpu_server_check as gsc  # noqa: E402

QUOTE = "\n\nQuote the passage above word for word, then summarise it in one sentence.\n\n\""


def passages(paths, n, words, seed=0):
    """n passages of about `words` words from the .txt files under `paths`, at seeded paragraph starts."""
    files = []
    for p in paths:
        files += sorted(glob.glob(os.path.join(p, "*.txt"))) if os.path.isdir(p) else [p] if os.path.isfile(p) else []
    if not files:
        raise SystemExit(f"spec_check: no .txt files under {paths}")
    paras = []
    for f in files:
        text = open(f, encoding="utf-8", errors="replace").read()
        paras += [re.sub(r"\s+", " ", x).strip() for x in re.split(r"\n\s*\n", text) if len(x.split()) >= 30]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(paras))
        ws = []
        while len(ws) < words and i < len(paras):
            ws += paras[i].split()
            i += 1
        out.append(" ".join(ws[:words]))
    return out


def prompts_of(texts, tokenizer):
    return [tokenizer.encode(t + QUOTE + " ".join(t.split()[:6]), add_special_tokens=False) for t in texts]


def servers(a):
    ngram = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", str(a.draft_tokens)]
    tq = ["--attention-backend", "turboquant", "--tq-config", a.tq_config]
    bf16 = ["--attention-backend", a.bf16_backend]
    return {"bf16": [("bf16", bf16), ("bf16_ngram", bf16 + ngram)],
            "turbo4": [("tq", tq), ("tq_ngram", tq + ngram)]}


def run_server(a, name, args, ids, common):
    """One server: warm-up, the prompts at batch 1 then at batch 8. Returns its result dict."""
    s = bs.Server(name, common + args, a.port, a.work)
    try:
        load = bs.Load(s.url, 1, 120)
        load.run([lambda L, p=ids[0]: L.request(p, 16)] * 2)  # warm-up (JIT, graphs)
        res = {"name": name, "startup_s": round(s.startup_s, 1), "max_total_num_tokens": s.info.get("max_total_num_tokens")}
        b1 = bs.Load(s.url, 1, a.batch_s)
        t0 = b1.run([lambda L, p=p: L.request(p, a.max_new) for p in ids])
        res["tokens"] = [st.output_ids for st in b1.streams]
        res["b1"] = bs.whole_run_stats(b1.streams, t0)
        info = bs.http_json(s.url, "GET", "/server_info")
        states = info.get("internal_states") or [{}]
        res["accept_len"] = states[0].get("avg_spec_accept_length")
        bs.flush_cache(s.url)
        b8 = bs.Load(s.url, 8, a.batch_s)
        t0 = b8.run([lambda L, p=p: L.request(p, a.max_new) for p in ids])
        res["b8"] = bs.whole_run_stats(b8.streams, t0)
    finally:
        s.stop()
    return res


def stage_load(a):
    """load_test.py against TurboQuant + NGRAM with a small pool and SGLang's retraction hook."""
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": str(a.load_retract_interval)}
    gsc.DEFAULT_PORT = a.port
    s = gsc.Server("load_tq_ngram", ["--model-path", a.model, "--grammar-backend", "none", "--mem-fraction-static",
                                     str(a.mem_fraction), "--attention-backend", "turboquant", "--tq-config", a.tq_config,
                                     "--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens",
                                     str(a.draft_tokens), "--max-total-tokens", str(a.load_max_tokens)],
                   env, log_dir=a.work)
    out = os.path.join(a.work, "load_test.json")
    try:
        with open(os.path.join(a.work, "load_test.log"), "w") as log:
            subprocess.run([sys.executable, os.path.join(HERE, "load_test.py"), "--url", s.url, "--requests",
                            str(a.load_requests), "--concurrency", "256", "--json", out], stdout=log,
                           stderr=subprocess.STDOUT, timeout=a.load_s)
    except subprocess.TimeoutExpired:
        pass  # load_test.py leaves its partial counts in the JSON
    finally:
        log_text = open(s.log_path).read()
        s.stop()
    res = json.load(open(out)) if os.path.exists(out) else {"error": "load_test.py wrote no JSON"}
    res["retractions_in_log"] = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log_text))
    res["leak_messages_in_log"] = log_text.count("memory leak")
    res["pass"] = (bool(res.get("pass")) and not res.get("partial") and res["retractions_in_log"] > 0
                   and res["leak_messages_in_log"] == 0)
    json.dump(res, open(os.path.join(a.work, "spec_load.json"), "w"), indent=1)
    return res


def _load(a, name):
    p = os.path.join(a.work, f"spec_{name}.json")
    return json.load(open(p)) if os.path.exists(p) else None


def identical(x, y):
    """Prompts whose greedy tokens agree in two runs (None if either is missing)."""
    if not x or not y or len(x["tokens"]) != len(y["tokens"]):
        return None
    return sum(i == j for i, j in zip(x["tokens"], y["tokens"]))


def records(a, meta):
    """One results/speculative.json record per batch size from the server results in the work folder."""
    r = {n: _load(a, n) for n in ("bf16", "bf16_ngram", "tq", "tq_ngram")}
    load = _load(a, "load")
    out = []
    for batch in (1, 8):
        key = f"b{batch}"

        def get(name, field):
            x = r[name]
            return None if x is None else x[key].get(field)
        n = len(r["tq"]["tokens"]) if r["tq"] else None
        out.append({
            "algorithm": "NGRAM", "config": a.tq_config, "backend": "turboquant", "bf16_backend": a.bf16_backend,
            "workload": f"Austen passages quoted back, {a.max_new} tokens greedy", "prompts": n,
            "max_new_tokens": a.max_new, "draft_tokens": a.draft_tokens,
            "greedy_identical": identical(r["tq"], r["tq_ngram"]) if batch == 1 else None,
            "bf16_greedy_identical": identical(r["bf16"], r["bf16_ngram"]) if batch == 1 else None,
            "accept_len": r["tq_ngram"]["accept_len"] if r["tq_ngram"] else None,
            "bf16_accept_len": r["bf16_ngram"]["accept_len"] if r["bf16_ngram"] else None,
            "tpot_ms": get("tq_ngram", "tpot_p50_ms"), "bf16_tpot_ms": get("bf16_ngram", "tpot_p50_ms"),
            "tpot_off_ms": get("tq", "tpot_p50_ms"), "bf16_tpot_off_ms": get("bf16", "tpot_p50_ms"),
            "tok_s": get("tq_ngram", "output_tok_s"), "bf16_tok_s": get("bf16_ngram", "output_tok_s"),
            "tok_s_off": get("tq", "output_tok_s"), "bf16_tok_s_off": get("bf16", "output_tok_s"),
            "batch": batch,
            "load": None if load is None else {k: load.get(k) for k in (
                "requests", "failed", "aborted", "idle_tokens_after_flush", "idle_requests", "retractions_in_log",
                "leak_messages_in_log", "pass")},
            **meta})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a real checkpoint folder (e.g. SmolLM2-135M-Instruct)")
    ap.add_argument("--text", nargs="+", required=True, help=".txt files or folders of them (prompts)")
    ap.add_argument("--stages", default="bf16,turbo4")
    ap.add_argument("--work", default="/tmp/work/spec", help="per-server results (kept between calls)")
    ap.add_argument("--records", default="", help="write the records here (default: <work>/speculative_records.json)")
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--passage-words", type=int, default=180)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--tq-config", default="turbo4")
    ap.add_argument("--bf16-backend", default="fa3")
    ap.add_argument("--mem-fraction", type=float, default=0.5)
    ap.add_argument("--batch-s", type=float, default=150, help="time limit of one batch-1 or batch-8 pass")
    ap.add_argument("--budget-s", type=float, default=500, help="no server starts later than this less 150 s")
    ap.add_argument("--deterministic", action="store_true", help="--enable-deterministic-inference on every server")
    ap.add_argument("--load-requests", type=int, default=1000)
    ap.add_argument("--load-s", type=float, default=420)
    ap.add_argument("--load-max-tokens", type=int, default=60000)
    ap.add_argument("--load-retract-interval", type=int, default=50)
    ap.add_argument("--port", type=int, default=int(os.environ.get("TQ_CHECK_PORT", "30000")))
    ap.add_argument("--commit", default=None)
    a = ap.parse_args(argv)
    os.makedirs(a.work, exist_ok=True)
    sys.stdout = bs.Tee(os.path.join(a.work, "progress.log"), sys.stdout)
    t_start = time.time()
    plan = servers(a)
    stages = a.stages.split(",")
    unknown = [s for s in stages if s not in plan and s != "load"]
    if unknown:
        raise SystemExit(f"spec_check: unknown stage(s) {unknown}; stages: {', '.join(list(plan) + ['load'])}")
    ids = None
    if any(s in plan for s in stages):
        from transformers import AutoTokenizer

        ids = prompts_of(passages(a.text, a.prompts, a.passage_words), AutoTokenizer.from_pretrained(a.model))
        print(f"{len(ids)} prompts, {statistics.mean(map(len, ids)):.0f} tokens on average", flush=True)
    common = bs.common_args(a.model, False, a.mem_fraction, 8192, 64, 4096,
                            ["--max-running-requests", "48"] + (["--enable-deterministic-inference"]
                                                                if a.deterministic else []))
    for st in stages:
        if st == "load":
            print("load:", json.dumps(stage_load(a))[:1500], flush=True)
            continue
        for name, args in plan[st]:
            if time.time() - t_start > a.budget_s - 150:
                print(f"[{name}] not started: budget spent (rerun with --stages {st})", flush=True)
                continue
            try:
                res = run_server(a, name, args, ids, common)
            except bs.BenchError as e:
                res = {"name": name, "error": str(e)[:500]}
            json.dump(res, open(os.path.join(a.work, f"spec_{name}.json"), "w"))
            print(f"[{name}] " + json.dumps({k: v for k, v in res.items() if k != "tokens"})[:1200], flush=True)
    card, _ = bs.card_info()
    meta = {"card": card, "date": datetime.date.today().isoformat(), "commit": a.commit or bs.git_commit(),
            "command": "bash scripts/gpu_speculative.sh MODEL TEXT_DIR"}
    ok = {n: _load(a, n) for n in ("bf16", "bf16_ngram", "tq", "tq_ngram")}
    if all(v is not None and "error" not in v for v in ok.values()):
        recs = records(a, meta)
        json.dump(recs, open(a.records or os.path.join(a.work, "speculative_records.json"), "w"), indent=1)
        print("\n===== speculative decoding (NGRAM) =====")
        for r in recs:
            print(json.dumps({k: r[k] for k in r if k not in ("command", "workload")}))
    else:
        print("records: not all four servers have results yet:",
              {n: ("missing" if v is None else v.get("error", "ok")[:200]) for n, v in ok.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
