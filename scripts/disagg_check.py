#!/usr/bin/env python3
"""Prefill/decode disaggregation with TurboQuant on real servers (GPU; run by scripts/gpu_disagg.sh).

For each model and config: one ordinary TurboQuant server gives the reference greedy tokens of --prompts
prompts (passages of --text of growing length, each continued for --max-new-tokens tokens, ignore_eos);
then a prefill worker, a decode worker (SGLang's --disaggregation-mode over --backend) and SGLang's router
(`sglang_router.launch_router --pd-disaggregation`) serve the same prompts. Recorded per pair: greedy
tokens identical (n/N), bytes per token SGLang accounts for the transfers (`sglang:kv_transfer_total_mb`
of the prefill worker: registered item lengths x pages sent, over the prompt tokens) against the config's
bytes per token (`ModelPlan.bytes_per_token` of the model's KV heads), and the transfer descriptors the
prefill worker registered (its log). Both workers share one card with --gpus 1 (each gets a share of
--mem-fraction), or take one card each with --gpus 2.

Records (results/distributed.json format) go to --out/distributed.json: setup, model, config,
greedy_identical, bytes_per_token, config_bytes_per_token, ppl_delta (null: not measured here), card,
date, commit. Exit code 3 with a line starting `blocked:` when the router or the transfer backend is not
installed.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import eval_quality as ev  # noqa: E402
from gpu_server_check import Server, Tee, evaluation_config, wait_healthy  # noqa: E402

BACKEND_MODULES = {"nixl": "nixl", "mooncake": "mooncake"}  # what SGLang's transfer backend imports
BOOTSTRAP_PORT = 8998


def prompts_from(text_path, n):
    """n passages of the text, 200 to ~2,600 characters (past the recent window and across several pages of
    the bootstrap transfer), taken at spread-out offsets."""
    text = open(text_path, encoding="utf-8").read()
    out = []
    for i in range(n):
        length = 200 + (i * 2400) // max(n - 1, 1)
        start = (i * 7919 * 13) % max(len(text) - length, 1)
        out.append(text[start:start + length])
    return out


def generate(url, prompts, max_new_tokens):
    from concurrent.futures import ThreadPoolExecutor

    def one(p):
        r = ev._post(url, "/generate", {"text": p, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                     "temperature": 0.0, "ignore_eos": True}})
        return r["meta_info"].get("output_ids") or r["text"]
    with ThreadPoolExecutor(8) as ex:
        return list(ex.map(one, prompts))


def metric_sum(url, name):
    """Sum of a Prometheus series (all label sets) from url/metrics; None when absent."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        body = r.read().decode()
    vals = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", body, re.M)]
    return sum(vals) if vals else None


def config_bytes_per_token(model, cfg_ref):
    from sglang_tq.config import load_config

    hf = json.load(open(os.path.join(model, "config.json")))
    heads = hf.get("num_key_value_heads") or hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return load_config(cfg_ref).resolve(hf["num_hidden_layers"], head_dim).bytes_per_token(heads)


def no_window_config(ref, out):
    """A copy of config `ref` without its recent window (every decode read from the codes)."""
    import yaml

    src = evaluation_config(ref, out)  # absolute key_means path; evaluation switched back off below
    cfg = yaml.safe_load(open(src))
    cfg.pop("window", None)
    cfg.pop("evaluation", None)
    cfg["name"] = f"{cfg.get('name', ref)}-nowindow"
    dst = os.path.join(out, f"{cfg['name']}.yaml")
    yaml.safe_dump(cfg, open(dst, "w"))
    return dst


class Router:
    def __init__(self, prefill_url, decode_url, port, log_dir):
        cmd = [sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
               "--prefill", prefill_url, str(BOOTSTRAP_PORT), "--decode", decode_url,
               "--host", "127.0.0.1", "--port", str(port)]
        self.url = f"http://127.0.0.1:{port}"
        self.log = open(os.path.join(log_dir, "router.log"), "w")
        print("[router]", " ".join(cmd), flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(self.url, self.proc, timeout=120)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def run_pair(a, model, cfg_path, cfg_name, prompts, out):
    base = ["--model-path", model, "--grammar-backend", "none", "--attention-backend", "turboquant",
            "--tq-config", cfg_path, "--cuda-graph-max-bs", "16"]
    share = a.mem_fraction / (2 if a.gpus == 1 else 1)
    ref = Server(f"single_{cfg_name}", base + ["--mem-fraction-static", str(a.mem_fraction)], port=a.port,
                 log_dir=out)
    try:
        want = generate(ref.url, prompts, a.max_new_tokens)
    finally:
        ref.stop()
    pd = ["--disaggregation-transfer-backend", a.backend, "--mem-fraction-static", f"{share:.2f}"]
    prefill = Server(f"prefill_{cfg_name}", base + pd + ["--disaggregation-mode", "prefill", "--enable-metrics",
                                                         "--disaggregation-bootstrap-port", str(BOOTSTRAP_PORT)],
                     port=a.port, log_dir=out)
    decode = router = None
    try:
        decode = Server(f"decode_{cfg_name}", base + pd + ["--disaggregation-mode", "decode", "--base-gpu-id",
                                                           str(a.gpus - 1)], port=a.port + 1, log_dir=out)
        router = Router(prefill.url, decode.url, a.port + 2, out)
        mb0 = metric_sum(prefill.url, "sglang:kv_transfer_total_mb_sum") or 0.0
        tok0 = metric_sum(prefill.url, "sglang:prompt_tokens_total") or 0.0
        got = generate(router.url, prompts, a.max_new_tokens)
        time.sleep(2)  # the prefill worker observes transfer metrics when it polls the finished transfers
        mb = (metric_sum(prefill.url, "sglang:kv_transfer_total_mb_sum") or 0.0) - mb0
        tok = (metric_sum(prefill.url, "sglang:prompt_tokens_total") or 0.0) - tok0
    finally:
        for s in (router, decode, prefill):
            if s is not None:
                s.stop()
    same = sum(x == y for x, y in zip(want, got))
    first_diff = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), None)
    return {"greedy_identical": f"{same}/{len(prompts)}", "first_differing_prompt": first_diff,
            "bytes_per_token": mb * 2**20 / tok if tok else None, "transfer_mb": mb, "prompt_tokens": tok}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="/tmp/models/SmolLM2-135M-Instruct",
                    help="comma-separated model folders (missing ones are reported and skipped)")
    ap.add_argument("--configs", default="turbo4,turbo4-nowindow",
                    help="presets or YAML paths; NAME-nowindow = NAME without its recent window")
    ap.add_argument("--backend", default="nixl", choices=sorted(BACKEND_MODULES))
    ap.add_argument("--gpus", type=int, default=1, choices=(1, 2))
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--text", default=".gpu_data/prideprejudice.txt")
    ap.add_argument("--mem-fraction", type=float, default=0.7)
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sys.stdout = Tee(os.path.join(a.out, "disagg_progress.log"), sys.stdout)
    missing = [m for m in ("sglang_router", BACKEND_MODULES[a.backend]) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"blocked: {', '.join(missing)} not installed (SGLang's router and the {a.backend} transfer "
              f"backend are needed for --disaggregation-mode)")
        sys.exit(3)
    import torch

    card = torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(HERE)).stdout.strip() or None
    prompts = prompts_from(a.text, a.prompts)
    records = []
    for model in a.models.split(","):
        if not os.path.exists(os.path.join(model, "config.json")):
            print(f"skipped: {model} not found")
            continue
        for ref in a.configs.split(","):
            path = no_window_config(ref[:-len("-nowindow")], a.out) if ref.endswith("-nowindow") else ref
            name = os.path.splitext(os.path.basename(ref))[0]
            try:
                r = run_pair(a, model, path, name, prompts, a.out)
            except Exception as e:  # noqa: BLE001 - record it, go on with the next pair
                import traceback
                traceback.print_exc()
                r = {"error": repr(e)}
            rec = {"setup": f"pd-{a.backend}-{a.gpus}gpu", "model": os.path.basename(model.rstrip("/")),
                   "config": name, "greedy_identical": r.get("greedy_identical"),
                   "bytes_per_token": r.get("bytes_per_token"),
                   "config_bytes_per_token": config_bytes_per_token(model, path), "ppl_delta": None,
                   "card": card, "date": datetime.date.today().isoformat(), "commit": commit,
                   **{k: v for k, v in r.items() if k not in ("greedy_identical", "bytes_per_token")}}
            print(json.dumps(rec), flush=True)
            records.append(rec)
            json.dump(records, open(os.path.join(a.out, "distributed.json"), "w"), indent=1)
    for rec in records:
        bpt, want = rec["bytes_per_token"], rec["config_bytes_per_token"]
        off = f"{(bpt / want - 1) * 100:+.2f} %" if bpt else "n/a"
        print(f"{rec['model']} {rec['config']}: greedy {rec['greedy_identical']}, bytes/token {bpt} vs config "
              f"{want} ({off})")


if __name__ == "__main__":
    main()
