#!/usr/bin/env python3
"""Serving benchmark: BF16 KV vs FP8 KV vs TurboQuant presets, same model, same card, one run.

For each KV configuration it starts an SGLang server, records max_total_num_tokens, and at each
(input len, output len, concurrency) point sends random-token-id requests (nothing is downloaded):
with the built-in streaming client (`--client native`, default: only the standard library, since
`sglang.bench_serving` imports Hugging Face `datasets`, which the offline GPU bundle lacks) or with
`python -m sglang.bench_serving` (`--client sglang`). Then it prints a table of output tok/s, TTFT and
TPOT with ratios against BF16 and FP8, writes JSON, and draws throughput-vs-concurrency PNG plots.

The default model is a config-only Llama-3-8B shape (32 layers, 32/8 heads, hd 128) served with
--load-format dummy: speed does not depend on the weights' values. Pass --model for real weights.

Example (GPU):
  python scripts/bench_serving.py --points 16384:512:64,1024:256:8 --configs bf16,fp8,turbo4
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_server_check import Server, Tee, make_dummy_8b, tokenizer_dir  # noqa: E402

CONFIGS = {
    "bf16": ["--attention-backend", "triton"],
    "bf16_flashinfer": ["--attention-backend", "flashinfer"],
    "fp8": ["--attention-backend", "triton", "--kv-cache-dtype", "fp8_e4m3"],
    "fp8_flashinfer": ["--attention-backend", "flashinfer", "--kv-cache-dtype", "fp8_e4m3"],
    # FlashAttention-3 (SGLang's default backend on Hopper). Needs sgl-kernel with its FA3 ops (a build
    # without them fails with "Can not import FA3 in sgl_kernel")
    "bf16_fa3": ["--attention-backend", "fa3"],
    "fp8_fa3": ["--attention-backend", "fa3", "--kv-cache-dtype", "fp8_e4m3"],
}


# "<config>+nopw": the config without SGLang's piecewise CUDA graphs for prefill (on by default, also with
# turboquant); "+pw": with them wherever SGLang would turn them off
MODIFIERS = {"pw": ["--enforce-piecewise-cuda-graph"], "nopw": ["--disable-piecewise-cuda-graph"]}


def tq_args(preset):
    return ["--attention-backend", "turboquant", "--tq-config", preset]


def config_args(cfg):
    """Server arguments of a config name: CONFIGS' entries or a TurboQuant preset / YAML, then
    "+modifier" suffixes (MODIFIERS)."""
    name, *mods = cfg.split("+")
    unknown = [m for m in mods if m not in MODIFIERS]
    if unknown:
        raise SystemExit(f"bench_serving: unknown config modifier(s) {unknown} in {cfg!r}; known: {sorted(MODIFIERS)}")
    return list(CONFIGS.get(name) or tq_args(name)) + [x for m in mods for x in MODIFIERS.get(m, [])]


def stream_request(url, input_ids, osl, timeout=3600):
    """One streaming /generate request with fixed output length (ignore_eos). Returns TTFT (first
    chunk), latency and the number of output tokens."""
    body = {"input_ids": input_ids, "stream": True,
            "sampling_params": {"max_new_tokens": osl, "temperature": 0.0, "ignore_eos": True}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, n_out, last = None, 0, t0
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
            n_out = (chunk.get("meta_info") or {}).get("completion_tokens", n_out + 1)
            last = now
    return {"ttft": ttft if ttft is not None else last - t0, "latency": last - t0, "out_tokens": n_out}


def run_point_native(url, vocab, isl, osl, conc, num_prompts, seed=1, shared=0):
    """num_prompts requests of isl random token ids, at most `conc` in flight; the same metrics as
    sglang.bench_serving: output tok/s over the wall time, mean / median TTFT and TPOT in ms.
    shared > 0: every prompt starts with the same `shared` tokens (a long system prompt or document that
    many users ask about), sent once before the timing so the radix cache holds it: each request's
    prefill is then an extend of isl - shared new tokens over a cached prefix."""
    rng = random.Random(seed)
    random_ids = lambda n: [rng.randrange(100, max(101, vocab - 100)) for _ in range(n)]  # noqa: E731
    prefix = random_ids(shared)
    prompts = [prefix + random_ids(isl - shared) for _ in range(num_prompts)]
    # warm-up outside the timing: a batch like the point's (up to 8 requests of up to 1,024 tokens), so
    # that first-use costs (kernel compilation for new shapes, allocator growth) do not land in TTFT
    warm = [random_ids(min(isl, 1024)) for _ in range(min(conc, 8))]
    with ThreadPoolExecutor(len(warm)) as ex:
        list(ex.map(lambda p: stream_request(url, p, 4), warm))
    if shared:
        stream_request(url, prefix + random_ids(1), 1)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        res = list(ex.map(lambda p: stream_request(url, p, osl), prompts))
    dur = time.perf_counter() - t0
    ttft = [r["ttft"] * 1e3 for r in res]
    tpot = [(r["latency"] - r["ttft"]) * 1e3 / (r["out_tokens"] - 1) for r in res if r["out_tokens"] > 1]
    out = sum(r["out_tokens"] for r in res)
    return {"output_throughput": out / dur, "mean_ttft_ms": statistics.mean(ttft),
            "median_ttft_ms": statistics.median(ttft), "mean_tpot_ms": statistics.mean(tpot) if tpot else None,
            "median_tpot_ms": statistics.median(tpot) if tpot else None, "completed": len(res),
            "duration": dur, "total_output_tokens": out}


def run_point(url, tokenizer, isl, osl, conc, num_prompts, out_json):
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", "sglang", "--base-url", url,
           "--tokenizer", tokenizer, "--dataset-name", "random-ids", "--random-input-len", str(isl),
           "--random-output-len", str(osl), "--random-range-ratio", "1.0", "--num-prompts", str(num_prompts),
           "--max-concurrency", str(conc), "--output-file", out_json, "--seed", "1", "--disable-tqdm"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stdout[-2000:] + p.stderr[-3000:])
    last = open(out_json).read().strip().splitlines()[-1]
    r = json.loads(last)
    return {k: r.get(k) for k in ("output_throughput", "mean_ttft_ms", "median_ttft_ms", "mean_tpot_ms",
                                  "median_tpot_ms", "completed", "duration", "total_output_tokens")}


def server_log_stats(path):
    """What the server's own log says about the run: decode batches with and without CUDA graphs, and
    the median decode (gen) and prefill (input) throughput SGLang reports per logged batch. Tells a slow
    kernel from a server that replays no graphs or stalls in prefill."""
    import re
    dec_graph, dec_eager, gen, inp = 0, 0, [], []
    for line in open(path, errors="replace"):
        if "Decode batch" in line:
            if "cuda graph: True" in line:
                dec_graph += 1
            else:
                dec_eager += 1
            m = re.search(r"gen throughput \(token/s\): ([0-9.]+)", line)
            if m:
                gen.append(float(m.group(1)))
        elif "Prefill batch" in line:
            m = re.search(r"input throughput \(token/s\): ([0-9.]+)", line)
            if m and float(m.group(1)) > 0:
                inp.append(float(m.group(1)))
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return {"decode_batches_cuda_graph": dec_graph, "decode_batches_eager": dec_eager,
            "median_gen_throughput": med(gen), "median_input_throughput": med(inp)}


def plot(results, points, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by_len = {}
    for isl, osl, conc, shared in points:
        by_len.setdefault((isl, osl, shared), []).append(conc)
    fig, axes = plt.subplots(1, len(by_len), figsize=(6 * len(by_len), 4), squeeze=False)
    for ax, ((isl, osl, shared), concs) in zip(axes[0], by_len.items()):
        for cfg, r in results.items():
            ys = [r["points"].get(point_key((isl, osl, c, shared)), {}).get("output_throughput") for c in concs]
            ax.plot(concs, [y or 0 for y in ys], marker="o", label=cfg)
        ax.set_title(f"ISL {isl} / OSL {osl}" + (f" ({shared} shared)" if shared else ""))
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tok/s")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_points(spec):
    """"isl:osl:conc[:shared],..." -> [(isl, osl, conc, shared)] (shared: tokens every prompt of the point
    starts with; 0 = none)."""
    out = []
    for p in spec.split(","):
        v = [int(x) for x in p.split(":")]
        if len(v) not in (3, 4) or (len(v) == 4 and not 0 <= v[3] < v[0]):
            raise SystemExit(f"bench_serving: bad point {p!r}: isl:osl:concurrency[:shared], shared < isl")
        out.append(tuple(v) if len(v) == 4 else (*v, 0))
    return out


def point_key(point):
    isl, osl, conc, shared = point
    return f"{isl}:{osl}:{conc}" + (f":{shared}" if shared else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="HF folder; empty = config-only Llama-3-8B shape (dummy weights)")
    ap.add_argument("--tokenizer-from", default="/tmp/models/SmolLM2-135M-Instruct")
    ap.add_argument("--configs", default="bf16,fp8,turbo4")
    ap.add_argument("--points", default="16384:512:64,1024:256:8",
                    help="isl:osl:concurrency[:shared],... (shared: leading tokens common to every prompt, "
                         "cached before the timing: radix hits; native client only)")
    ap.add_argument("--prompts-per-conc", type=float, default=1.0, help="num_prompts = this x concurrency")
    ap.add_argument("--min-prompts", type=int, default=64,
                    help="at least this many requests per point: 64 makes ISL 1K / conc 8 eight waves (~12 s) "
                         "instead of two (~3 s, whose ratios moved by ~1 %% between two cards of one host)")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--extra", default="", help="extra server args, space separated")
    ap.add_argument("--client", choices=["native", "sglang"], default="native",
                    help="native: built-in streaming client; sglang: python -m sglang.bench_serving")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    sys.stdout = Tee(os.path.join(a.out, "progress.log"), sys.stdout)
    points = parse_points(a.points)
    if a.client != "native" and any(p[3] for p in points):
        raise SystemExit("bench_serving: shared-prefix points need the native client")
    model = a.model or make_dummy_8b(tokenizer_dir(a.tokenizer_from))
    vocab = json.load(open(os.path.join(model, "config.json"))).get("vocab_size", 32000)
    max_ctx = max(i + o for i, o, _, _ in points) + 64
    base = ["--model-path", model, "--grammar-backend", "none", "--mem-fraction-static", str(a.mem_fraction),
            "--context-length", str(max(max_ctx, 4096))] + (["--load-format", "dummy"] if not a.model else [])
    base += a.extra.split() if a.extra else []
    results = {}
    for cfg in a.configs.split(","):
        args = config_args(cfg)
        t0 = time.time()
        try:
            s = Server(f"serve_{cfg}", base + args, log_dir=a.out)
        except Exception as e:  # noqa: BLE001
            results[cfg] = {"error": repr(e), "points": {}}
            continue
        r = {"max_total_num_tokens": s.info.get("max_total_num_tokens"), "startup_s": round(s.startup_s), "points": {}}
        try:
            for isl, osl, conc, shared in points:
                n = max(a.min_prompts, int(a.prompts_per_conc * conc))
                key = point_key((isl, osl, conc, shared))
                try:
                    if a.client == "native":
                        r["points"][key] = run_point_native(s.url, vocab, isl, osl, conc, n, shared=shared)
                    else:
                        r["points"][key] = run_point(s.url, model, isl, osl, conc, n,
                                                     os.path.join("/tmp", f"bs_{cfg}_{key.replace(':', '_')}.jsonl"))
                except Exception as e:  # noqa: BLE001
                    r["points"][key] = {"error": repr(e)[:3000]}
                print(f"[{cfg}] {key}: {r['points'][key]}", flush=True)
        finally:
            s.stop()
        try:
            r["server_log"] = server_log_stats(s.log_path)
            print(f"[{cfg}] server log: {r['server_log']}", flush=True)
        except OSError:
            pass
        r["seconds"] = round(time.time() - t0)
        results[cfg] = r
        json.dump(results, open(os.path.join(a.out, "bench_serving.json"), "w"), indent=1)
    plot(results, points, os.path.join(a.out, "bench_serving.png"))

    print("\n===== serving benchmark =====")
    try:
        import torch
        print("card:", torch.cuda.get_device_name(0))
    except Exception:  # noqa: BLE001
        pass
    hdr = f"{'config':>10s} {'max_tokens':>10s} {'point':>14s} {'out tok/s':>10s} {'TTFT ms':>9s} {'TPOT ms':>8s} {'vs bf16':>8s} {'vs fp8':>7s}"
    print(hdr)
    for cfg, r in results.items():
        for key, p in r["points"].items():
            tp = p.get("output_throughput")
            rb = (results.get("bf16", {}).get("points", {}).get(key) or {}).get("output_throughput")
            rf = (results.get("fp8", {}).get("points", {}).get(key) or {}).get("output_throughput")
            fmt = lambda x: f"{x:.2f}" if x else "-"  # noqa: E731
            print(f"{cfg:>10s} {str(r.get('max_total_num_tokens')):>10s} {key:>14s} {fmt(tp):>10s} "
                  f"{fmt(p.get('mean_ttft_ms')):>9s} {fmt(p.get('mean_tpot_ms')):>8s} "
                  f"{fmt(tp / rb if tp and rb else None):>8s} {fmt(tp / rf if tp and rf else None):>7s}")


if __name__ == "__main__":
    main()
