#!/usr/bin/env python3
"""Real-server checks on a GPU: one script, one run on a GPU machine.

Starts SGLang servers one after another (BF16 KV with the triton backend as the baseline, then
TurboQuant presets), and records for each: max_total_num_tokens, perplexity, chat answers, greedy
tokens for parity checks, bad-request behaviour. Writes one JSON per stage into --out and prints a
summary table last.

Stages (--stages, comma-separated):
  smollm2   SmolLM2-135M-Instruct (real weights): BF16 (triton) vs turbo4 vs turbo3 perplexity, chat
            answers; turbo4 with CUDA graphs on vs off (greedy tokens for 20 prompts); the same prompts
            alone vs inside a busy batch (turbo4 and BF16); bad requests answered alike; perplexity only
            (no CUDA graphs) of turbo4 with 2 + 2 BF16 layers, turbo4 with key centering, the calibrated
            3-bit example plan and k5v4 with key centering; turbo4 and BF16 with SGLang's
            --enable-deterministic-inference (alone vs busy again); also perplexity on --heldout-text
  Progress goes to stdout and --out/progress.log, partial results to --out/smollm2_partial.json.
  load      scripts/load_test.py (2000 requests, concurrency 256, shared prefixes, 10 % aborts) against a
            turbo4 SmolLM2 server with a small --max-total-tokens and SGLang's retraction test hook
            (SGLANG_TEST_RETRACT): passes only with retracted requests, 0 failures and no leaks
  tp        TP = 2 vs TP = 1 (needs 2 GPUs): SmolLM2 with duplicated heads (scripts/make_tp_model.py),
            BF16 and turbo4 at both TP sizes: perplexity, greedy tokens, chat
  capacity  config-only Llama-3-8B shape (--load-format dummy): max_total_num_tokens of BF16 vs
            all-layers K4V4 vs the turbo4 preset at the same --mem-fraction-static
  eval      task accuracy on SmolLM2 (scripts/eval_quality.py's passkey and ASDiv QA) for --servers
            (default bf16,turbo4,turbo3): one eval_quality-format JSON per server and task
            (eval_<task>_<server>.json, for `eval_quality.py compare`), accuracies and their change
            against BF16 in the summary. Ordinary servers: prefill attends to the fresh chunk, decode
            (the answer) to the packed cache and the window.
The smollm2 and tp TurboQuant servers run their config with `evaluation: {prefill_from_cache: true}` (a
copy written into --out): prefill attends to the K/V as stored in the compressed cache (not the fresh
chunk), so every token sees its whole past as in decoding and perplexity measures the cache format.
"""
from __future__ import annotations

import argparse
import json
import re
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import eval_quality as ev  # noqa: E402

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in one sentence.",
    "List three prime numbers.", "Who wrote Pride and Prejudice?", "What is 12 times 7?",
    "Give me a synonym for happy.", "Translate 'good morning' to Spanish.", "What color is the sky on a clear day?",
    "Name a famous physicist.", "Describe a cat in five words.", "What is the boiling point of water in Celsius?",
    "Why do leaves change color in autumn?", "Suggest a name for a pet goldfish.", "What is the largest planet?",
    "How many days are in a leap year?", "Write one sentence about friendship.", "What does CPU stand for?",
    "Recommend a book for a long flight.", "What is the square root of 81?",
]


def wait_healthy(url, proc, timeout=600):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    raise TimeoutError("server did not become healthy")


class Tee:
    """stdout also into a file under --out, so a run cut off by a time limit still leaves its lines."""

    def __init__(self, path, stream):
        self.f, self.stream = open(path, "a", buffering=1), stream

    def write(self, s):
        self.stream.write(s)
        self.f.write(s)

    def flush(self):
        self.stream.flush()
        self.f.flush()


def port_in_use(port, host="127.0.0.1"):
    import socket
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


DEFAULT_PORT = int(os.environ.get("TQ_CHECK_PORT", "30000"))  # two scripts on two GPUs need two ports


def identical(x, y):
    """'n/20': how many of the PROMPTS got the same greedy tokens in two runs."""
    return f"{sum(i == j for i, j in zip(x, y))}/{len(PROMPTS)}"


def evaluation_config(ref, out):
    """A copy of the TurboQuant config `ref` (preset name or YAML path) with evaluation.prefill_from_cache
    on, written into `out` (its key_means path made absolute, so the copy loads from there)."""
    import yaml

    path = ref if ref.endswith((".yaml", ".yml")) else os.path.join(os.path.dirname(HERE), "configs", f"{ref}.yaml")
    stem = os.path.splitext(os.path.basename(path))[0]
    cfg = yaml.safe_load(open(path)) or {}
    cfg.setdefault("name", stem)
    if cfg.get("key_means") not in (None, "auto") and not os.path.isabs(os.path.expanduser(cfg["key_means"])):
        cfg["key_means"] = os.path.join(os.path.dirname(os.path.abspath(path)), cfg["key_means"])
    cfg["evaluation"] = {"prefill_from_cache": True}
    dst = os.path.join(out, f"eval_{stem}.yaml")
    with open(dst, "w") as f:
        yaml.safe_dump(cfg, f)
    return dst


def with_evaluation(args, out):
    """Server arguments with the --tq-config (if any) replaced by its evaluation_config copy."""
    if "--tq-config" not in args:
        return args
    i = args.index("--tq-config")
    return args[:i + 1] + [evaluation_config(args[i + 1], out)] + args[i + 2:]


def selected(plan, servers):
    """The plan's (name, ...) entries named in the comma-separated `servers` (all when empty)."""
    return [p for p in plan if not servers or p[0] in servers.split(",")]


class Server:
    def __init__(self, name, args, env_extra=None, port=None, log_dir="."):
        port = port or DEFAULT_PORT
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        if port_in_use(port):  # a server left over from a killed run would answer in its place
            raise RuntimeError(f"port {port} is already in use: stop the old server first "
                               f"(e.g. pkill -f 'sglang[._]launch_serve[r]')")
        tq = "--attention-backend" in args and args[args.index("--attention-backend") + 1] == "turboquant"
        mod = "sglang_tq.launch_server" if tq else "sglang.launch_server"
        cmd = [sys.executable, "-m", mod, *args, "--port", str(port), "--host", "127.0.0.1"]
        env = dict(os.environ, **(env_extra or {}))
        self.log_path = os.path.join(log_dir, f"server_{name}.log")
        self.log = open(self.log_path, "w")
        print(f"[{name}] {' '.join(cmd)}", flush=True)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self.startup_s = wait_healthy(self.url, self.proc)
        except Exception:
            self.stop()
            print(open(self.log_path).read()[-6000:])
            raise
        failed = [ln for ln in open(self.log_path, errors="replace") if "the probe prefill failed" in ln]
        if failed:  # key_means: auto would serve uncentered keys: a check run must not pass over that
            self.stop()
            raise RuntimeError(f"[{name}] the key-means probe failed at start-up: {failed[0].strip()}")
        self.info = ev._get(self.url, "/server_info")
        print(f"[{name}] up in {self.startup_s:.0f}s, max_total_num_tokens={self.info.get('max_total_num_tokens')}",
              flush=True)

    def generate(self, prompts, max_new_tokens=32, concurrent=False):
        """Greedy continuations of exactly max_new_tokens (ignore_eos): without it SmolLM2 ends 11 of the
        20 raw prompts at once on every backend, and empty answers match trivially."""
        def one(p):
            r = ev._post(self.url, "/generate", {"text": p, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                                             "temperature": 0.0, "ignore_eos": True}})
            return r["meta_info"].get("output_ids") or r["text"]
        if not concurrent:
            return [one(p) for p in prompts]
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(len(prompts)) as ex:
            return list(ex.map(one, prompts))

    def chat(self, msg, max_tokens=64):
        r = ev._post(self.url, "/v1/chat/completions", {"model": "default", "temperature": 0.0, "max_tokens": max_tokens,
                                                        "messages": [{"role": "user", "content": msg}]})
        return r["choices"][0]["message"]["content"]

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except Exception:  # noqa: BLE001
                pass
        self.log.close()
        time.sleep(3)


def raw_status(url, path, payload):
    req = urllib.request.Request(url + path, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            body = json.loads(r.read())
            return r.status, _shape(body)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:200]


def _shape(body):
    """What a bad-request comparison should look at: error text or the kinds of fields returned."""
    if isinstance(body, dict) and "choices" in body:
        c = body["choices"][0]
        return {"finish_reason": c.get("finish_reason"), "n_chars": len((c.get("message") or {}).get("content") or c.get("text") or "")}
    return str(body)[:200]


BAD_REQUESTS = [
    ("empty prompt", "/v1/completions", {"model": "default", "prompt": "", "max_tokens": 8}),
    ("max_tokens 0", "/v1/chat/completions", {"model": "default", "max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}),
    ("negative temperature", "/v1/chat/completions", {"model": "default", "temperature": -1, "messages": [{"role": "user", "content": "hi"}]}),
    ("top_p 0", "/v1/chat/completions", {"model": "default", "top_p": 0.0, "messages": [{"role": "user", "content": "hi"}]}),
    ("prompt longer than context", "/v1/completions", {"model": "default", "prompt": "word " * 9000, "max_tokens": 8}),
]


def smollm2_servers(a, base, out):
    """Seven SmolLM2 servers, each asked everything it is needed for (server starts dominate)."""
    text = open(a.text, encoding="utf-8").read()[:6000]
    heldout = open(a.heldout_text, encoding="utf-8").read()[:6000] if a.heldout_text else ""
    # turbo4 with SmolLM2's key means (key centering; the means ship with the calibrated example)
    means = os.path.abspath(os.path.join(os.path.dirname(HERE), "configs", "examples",
                                         "calibrated_smollm2_key_means.safetensors"))
    def centered_config(name, k_bits, v_bits):  # the turbo4 preset's boundary (first layer bf16)
        path = os.path.join(out, f"{name}.yaml")
        with open(path, "w") as f:
            f.write(f"name: {name}\ndefaults:\n  k: {{bits: {k_bits}}}\n  v: {{bits: {v_bits}}}\n"
                    f"boundary: {{first: 1, last: 0, format: bf16}}\nkey_means: {means}\n"
                    f"window: {{tokens: 32}}\n")
        return path

    def no_window_config(preset):  # the preset without its recent window (every token from the codes)
        import yaml

        cfg = yaml.safe_load(open(os.path.join(os.path.dirname(HERE), "configs", f"{preset}.yaml")))
        cfg["name"] = f"{preset}_nowindow"
        cfg.pop("window", None)
        path = os.path.join(out, f"{preset}_nowindow.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    def no_boundary_config(preset):  # the preset with every layer quantized (its boundary layers too)
        import yaml

        cfg = yaml.safe_load(open(os.path.join(os.path.dirname(HERE), "configs", f"{preset}.yaml")))
        cfg["name"] = f"{preset}_noboundary"
        cfg["boundary"] = {"first": 0, "last": 0}
        path = os.path.join(out, f"{preset}_noboundary.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path

    centered = centered_config("turbo4_centered", 4, 4)
    k5_centered = centered_config("k5v4_centered", 5, 4)  # 5-bit keys: ~1 % in simulation (docs/RESULTS.md)
    examples = os.path.join(os.path.dirname(HERE), "configs", "examples")
    calibrated = os.path.join(examples, "calibrated_smollm2.yaml")
    calibrated4 = os.path.join(examples, "calibrated4_smollm2.yaml")  # 4.00 bits, the bytes of turbo4
    calibrated3w = os.path.join(examples, "calibrated3_window_smollm2.yaml")  # 3.00 bits, with the window
    boundary2 = os.path.join(examples, "turbo4_boundary2.yaml")
    plan = [("bf16", ["--attention-backend", "triton"]),
            ("turbo4", ["--attention-backend", "turboquant", "--tq-config", "turbo4"]),
            ("turbo4_nograph", ["--attention-backend", "turboquant", "--tq-config", "turbo4", "--disable-cuda-graph"]),
            # prefill without SGLang's piecewise CUDA graphs (on by default; with them, the attention sees
            # token counts padded to a captured size)
            ("turbo4_nopw", ["--attention-backend", "turboquant", "--tq-config", "turbo4", "--disable-piecewise-cuda-graph"]),
            ("turbo3", ["--attention-backend", "turboquant", "--tq-config", "turbo3"]),
            # perplexity only (prefill): no CUDA graphs, whose capture took minutes for the mixed-format plan
            ("turbo4_boundary2", ["--attention-backend", "turboquant", "--tq-config", boundary2, "--disable-cuda-graph"]),
            ("turbo4_centered", ["--attention-backend", "turboquant", "--tq-config", centered, "--disable-cuda-graph"]),
            ("calibrated3", ["--attention-backend", "turboquant", "--tq-config", calibrated, "--disable-cuda-graph"]),
            ("calibrated4", ["--attention-backend", "turboquant", "--tq-config", calibrated4, "--disable-cuda-graph"]),
            ("calibrated3_window", ["--attention-backend", "turboquant", "--tq-config", calibrated3w,
                                    "--disable-cuda-graph"]),
            ("k5v4_centered", ["--attention-backend", "turboquant", "--tq-config", k5_centered, "--disable-cuda-graph"]),
            # the other presets, and presets without their boundary layers (perplexity only)
            *[(p, ["--attention-backend", "turboquant", "--tq-config", p, "--disable-cuda-graph"])
              for p in ("turbo2", "turbo3.5", "k4v2")],
            *[(f"{p}_noboundary", ["--attention-backend", "turboquant", "--tq-config", no_boundary_config(p),
                                   "--disable-cuda-graph"]) for p in ("turbo4", "turbo3", "k4v2", "turbo2", "turbo3.5")],
            # the presets without their recent window (the cache format alone, as before the window)
            *[(f"{p}_nowindow", ["--attention-backend", "turboquant", "--tq-config", no_window_config(p),
                                 "--disable-cuda-graph"]) for p in ("turbo4", "turbo3")],
            ("k5v4", ["--attention-backend", "turboquant", "--tq-config", "k5v4", "--disable-cuda-graph"]),
            # SGLang's deterministic inference (batch-invariant GEMMs, norms and attention splits), which
            # also makes our decode and extend batch-invariant: is a request's output then the same alone
            # and in a batch? BF16 beside
            ("bf16_deterministic", ["--attention-backend", "triton", "--enable-deterministic-inference"]),
            ("turbo4_deterministic", ["--attention-backend", "turboquant", "--tq-config", "turbo4",
                                      "--enable-deterministic-inference"])]
    ppl_only = ("turbo4_boundary2", "turbo4_centered", "calibrated3", "calibrated4", "calibrated3_window",
                "k5v4_centered", "turbo2",
                "turbo3.5", "k4v2", "k5v4",
                "turbo4_noboundary", "turbo3_noboundary", "k4v2_noboundary", "turbo2_noboundary",
                "turbo3.5_noboundary", "turbo4_nowindow", "turbo3_nowindow")
    res = {}  # a subset of servers (e.g. split over two runs): the summary covers what ran
    for name, extra in selected(plan, a.servers):
        r = {}
        s = Server(name, base + with_evaluation(extra, out), log_dir=out)
        try:
            r["max_total_num_tokens"] = s.info.get("max_total_num_tokens")
            r["alone"] = s.generate(PROMPTS)
            if name == "turbo4_nograph":
                res[name] = r
                continue
            r["ppl"] = ev.perplexity(s.url, text)
            if heldout:
                r["ppl_heldout"] = ev.perplexity(s.url, heldout)
            print(f"  {name}: ppl {r['ppl']['ppl']:.4f} ({r['ppl']['tokens']} tokens)"
                  + (f", held-out {r['ppl_heldout']['ppl']:.4f}" if heldout else ""), flush=True)
            if name in ppl_only:
                res[name] = r
                continue
            r["chat"] = [s.chat(p) for p in PROMPTS[:3]]
            if name != "turbo3":
                # flush the radix cache first: a busy-run request must not reuse the alone run's cached
                # prefix (a cache hit reads quantized K/V where the alone run computed them fresh)
                urllib.request.urlopen(urllib.request.Request(s.url + "/flush_cache", method="POST"), timeout=60).read()
                r["busy"] = s.generate(PROMPTS + [p + " Answer in detail." for p in PROMPTS] * 3,
                                       concurrent=True)[:len(PROMPTS)]
                r["badreq"] = {label: raw_status(s.url, path, body) for label, path, body in BAD_REQUESTS}
                r["healthy_after_badreq"] = urllib.request.urlopen(s.url + "/health", timeout=10).status
            if a.qa_limit:
                r["qa"] = ev.qa(s.url, a.asdiv, a.qa_limit)
        finally:
            s.stop()
        res[name] = r
        json.dump(res, open(os.path.join(out, "smollm2_partial.json"), "w"), indent=1, default=str)
    res["summary"] = smollm2_summary(res, bool(heldout))
    return res


def smollm2_summary(res, heldout=True):
    """Perplexities and their change against BF16, parity counts: whatever the servers that ran allow."""
    b, t4 = res.get("bf16", {}), res.get("turbo4", {})
    summ = {}
    for name, r in res.items():
        if "ppl" in r:
            summ[f"ppl_{name}"] = r["ppl"]["ppl"]
            if "ppl" in b and name != "bf16":
                summ[f"ppl_delta_pct_{name}"] = (r["ppl"]["ppl"] / b["ppl"]["ppl"] - 1) * 100
        if heldout and "ppl_heldout" in r:
            summ[f"ppl_heldout_{name}"] = r["ppl_heldout"]["ppl"]
    if "alone" in t4 and "alone" in res.get("turbo4_nograph", {}):
        summ["graphs_on_vs_off_identical"] = identical(t4["alone"], res["turbo4_nograph"]["alone"])
    if "alone" in t4 and "alone" in res.get("turbo4_nopw", {}):
        summ["piecewise_vs_eager_prefill_identical"] = identical(t4["alone"], res["turbo4_nopw"]["alone"])
    for name, r in res.items():
        if "busy" in r:
            summ[f"{name}_alone_vs_busy_identical"] = identical(r["alone"], r["busy"])
    if "badreq" in b and "badreq" in t4:
        summ["badreq_same_status"] = all(b["badreq"][k][0] == t4["badreq"][k][0] for k, _, _ in BAD_REQUESTS)
    if b.get("max_total_num_tokens") and t4.get("max_total_num_tokens"):
        summ["capacity_ratio_smollm2_turbo4"] = t4["max_total_num_tokens"] / b["max_total_num_tokens"]
    return summ


def stage_load(a, base, out):
    """scripts/load_test.py against a turbo4 SmolLM2 server with a small pool under 256 concurrent
    requests (shared prefixes, 10 % aborts, logprobs). SGLang's admission control kept a full pool from
    retracting in an earlier run (0.99 usage, 0 retractions), so the server also runs SGLang's
    own retraction test hook (SGLANG_TEST_RETRACT: retract part of the running batch every
    `--load-retract-interval` decode steps); the stage passes only if retractions happened."""
    import subprocess
    env = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": str(a.load_retract_interval)}
    s = Server("load_turbo4", base + ["--attention-backend", "turboquant", "--tq-config", "turbo4",
                                      "--max-total-tokens", str(a.load_max_tokens)], env, log_dir=out)
    try:
        with open(os.path.join(out, "load_test.log"), "w") as log:  # streamed: a cut-off run keeps its progress
            subprocess.run([sys.executable, os.path.join(HERE, "load_test.py"), "--url", s.url,
                            "--requests", str(a.load_requests), "--concurrency", "256",
                            "--json", os.path.join(out, "load_test.json")], stdout=log, stderr=subprocess.STDOUT)
        print(open(os.path.join(out, "load_test.log")).read()[-3000:])
        res = json.load(open(os.path.join(out, "load_test.json")))
        log = open(s.log_path).read()
        res["retractions_in_log"] = sum(int(n) for n in re.findall(r"#retracted_reqs: (\d+)", log))
        res["leak_messages_in_log"] = log.count("memory leak")
        res["pass"] = bool(res.get("pass")) and res["retractions_in_log"] > 0 and res["leak_messages_in_log"] == 0
    finally:
        s.stop()
    return res


def stage_tp(a, base, out):
    """TP = 2 against TP = 1 on real weights: SmolLM2 with every head duplicated
    (scripts/make_tp_model.py: 18 query / 6 KV heads, the same function), BF16 and turbo4, each at
    TP 1 and TP 2 with CUDA graphs; perplexity, greedy tokens of the 20 prompts, one chat answer.
    Perplexity twice: the issue's text (first 6,000 characters, 1,628 tokens) and the first 150,000
    characters in 2,048-token windows ("ppl_long"). The TP layouts round differently, which flips some
    4-bit codes: on the short text that alone moves perplexity by about 1 % (scripts/quant_noise.py), the
    size of the tolerance, so the long text tells a TP bug from that noise. (36,000 characters, ~9K
    tokens, gave -0.58 % for turbo4 on two H200s against -1.29 % on the short text: the size that noise
    falling as 1/sqrt(tokens) predicts; hence 150,000, ~37K tokens.)"""
    full = open(a.text, encoding="utf-8").read()
    text = full[:6000]
    dup = "/tmp/models/SmolLM2-dup"
    if not os.path.exists(os.path.join(dup, "model.safetensors")):
        subprocess.run([sys.executable, os.path.join(HERE, "make_tp_model.py"), a.model, dup], check=True)
    common = [x if x != a.model else dup for x in base]
    common[common.index("--cuda-graph-max-bs") + 1] = "16"
    res = {}
    plan = [("tp1_bf16", ["--attention-backend", "triton"]),
            ("tp2_bf16", ["--attention-backend", "triton", "--tp", "2"]),
            ("tp1_turbo4", ["--attention-backend", "turboquant", "--tq-config", "turbo4"]),
            ("tp2_turbo4", ["--attention-backend", "turboquant", "--tq-config", "turbo4", "--tp", "2"])]
    for name, extra in selected(plan, a.servers):
        s = Server(name, common + with_evaluation(extra, out), log_dir=out)
        try:
            r = {"max_total_num_tokens": s.info.get("max_total_num_tokens"), "ppl": ev.perplexity(s.url, text),
                 "ppl_long": ev.perplexity(s.url, full[:150000], window=2048),
                 "alone": s.generate(PROMPTS), "chat": s.chat(PROMPTS[0])}
        finally:
            s.stop()
        print(f"  {name}: ppl {r['ppl']['ppl']:.4f}, max_total_num_tokens {r['max_total_num_tokens']}", flush=True)
        res[name] = r
        json.dump(res, open(os.path.join(out, "tp_partial.json"), "w"), indent=1, default=str)
    res["summary"] = {f"ppl_{k}": res[k]["ppl"]["ppl"] for k in res}
    for kind in ("bf16", "turbo4"):
        if f"tp1_{kind}" not in res or f"tp2_{kind}" not in res:
            continue
        one, two = res[f"tp1_{kind}"], res[f"tp2_{kind}"]
        res["summary"][f"ppl_delta_pct_tp2_vs_tp1_{kind}"] = (two["ppl"]["ppl"] / one["ppl"]["ppl"] - 1) * 100
        res["summary"][f"ppl_long_delta_pct_tp2_vs_tp1_{kind}"] = (two["ppl_long"]["ppl"] / one["ppl_long"]["ppl"]
                                                                    - 1) * 100
        res["summary"][f"greedy_identical_tp2_vs_tp1_{kind}"] = identical(one["alone"], two["alone"])
    return res


LLAMA8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": 32, "head_dim": 128, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
           "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2}


def make_dummy_8b(tokenizer_dir, dest="/tmp/models/llama8b-shape"):
    """A config-only Llama-3-8B-shape model folder (weights come from --load-format dummy); the
    tokenizer is SmolLM2's, so the vocabulary is that tokenizer's size."""
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(tokenizer_dir):
        if "token" in f or f in ("special_tokens_map.json", "generation_config.json"):
            shutil.copy(os.path.join(tokenizer_dir, f), dest)
    vocab = json.load(open(os.path.join(tokenizer_dir, "config.json"))).get("vocab_size", 49152)
    json.dump(dict(LLAMA8B, vocab_size=vocab), open(os.path.join(dest, "config.json"), "w"))
    return dest


def tokenizer_dir(preferred):
    """SmolLM2's tokenizer: from the model folder if present, else the carried .gpu_tok copy."""
    for d in (preferred, ".gpu_tok"):
        if d and os.path.exists(os.path.join(d, "tokenizer.json")):
            return d
    raise FileNotFoundError("no tokenizer folder (model folder or .gpu_tok)")


def stage_capacity(a, base_unused, out):
    model = make_dummy_8b(tokenizer_dir(a.model))
    all4 = os.path.join(out, "all_k4v4.yaml")
    with open(all4, "w") as f:
        f.write("name: all_k4v4\nboundary: {first: 0, last: 0}\ndefaults:\n  k: {bits: 4}\n  v: {bits: 4}\n")
    common = ["--model-path", model, "--load-format", "dummy", "--grammar-backend", "none",
              "--mem-fraction-static", str(a.mem_fraction), "--disable-cuda-graph", "--context-length", "32768"]
    res = {}
    for name, extra in [("bf16", ["--attention-backend", "triton"]),
                        ("all_k4v4", ["--attention-backend", "turboquant", "--tq-config", all4]),
                        ("turbo4", ["--attention-backend", "turboquant", "--tq-config", "turbo4"])]:
        s = Server(f"cap_{name}", common + extra, log_dir=out)
        try:
            res[name] = s.info.get("max_total_num_tokens")
            # one real request through the 32-layer model proves the pool is used, not just sized
            ev._post(s.url, "/generate", {"text": "hello " * 200, "sampling_params": {"max_new_tokens": 8}})
        finally:
            s.stop()
    res["ratio_all_k4v4"] = res["all_k4v4"] / res["bf16"]
    res["ratio_turbo4"] = res["turbo4"] / res["bf16"]
    # the byte ratios the configs themselves state (Llama-3-8B shape: 32 layers, head_dim 128)
    from sglang_tq.config import load_config
    res["expected_all_k4v4"] = load_config(all4).resolve(32, 128).compression_ratio()
    plan4 = load_config("turbo4").resolve(32, 128)
    res["expected_turbo4_pool_only"] = plan4.compression_ratio()
    # the recent window's ring (256 requests x 32 tokens, bf16) comes out of the same memory: the pool
    # then holds (M - ring) / its bytes per token, M ~ the BF16 server's tokens x BF16 bytes per token
    mem = res["bf16"] * plan4.bf16_bytes_per_token(8)
    res["ring_bytes_turbo4"] = plan4.window_bytes(8)
    res["expected_turbo4"] = (mem - res["ring_bytes_turbo4"]) / plan4.bytes_per_token(8) / res["bf16"]
    return res


def stage_eval(a, base, out):
    """Passkey retrieval and ASDiv QA (eval_quality's functions) per server, BF16 first."""
    names = a.servers.split(",") if a.servers else ["bf16", "turbo4", "turbo3"]
    haystack = open(a.heldout_text, encoding="utf-8").read()
    lengths = [int(x) for x in a.passkey_lengths.split(",")]
    depths = [float(x) for x in a.passkey_depths.split(",")]
    res = {}
    for name in names:
        args = (["--attention-backend", "triton"] if name == "bf16"
                else ["--attention-backend", "turboquant", "--tq-config", name])
        s = Server(f"eval_{name}", base + args, log_dir=out)
        try:
            facts = ev.server_facts(s.url)
            r = {"passkey": ev.passkey(s.url, haystack, lengths, depths, a.passkey_trials),
                 "qa": ev.qa(s.url, a.asdiv, a.eval_qa_limit)}
        finally:
            s.stop()
        for task, tr in r.items():
            json.dump({"label": name, "cmd": task, "server": facts, "results": tr},
                      open(os.path.join(out, f"eval_{task}_{name}.json"), "w"), indent=1)
        res[name] = r
        print(f"  {name}: passkey {r['passkey']['accuracy']:.3f}, qa {r['qa']['accuracy']:.3f} "
              f"({r['qa']['n']} problems)", flush=True)
    summ = {}
    for name, r in res.items():
        for task in ("passkey", "qa"):
            summ[f"{task}_{name}"] = r[task]["accuracy"]
            if name != "bf16" and "bf16" in res:
                summ[f"{task}_points_vs_bf16_{name}"] = 100 * (r[task]["accuracy"] - res["bf16"][task]["accuracy"])
    res["summary"] = summ
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/models/SmolLM2-135M-Instruct")
    ap.add_argument("--text", default=".gpu_data/prideprejudice.txt")
    ap.add_argument("--heldout-text", default=".gpu_data/emma.txt",
                    help="second text for perplexity (the calibrated plan and key means never saw it)")
    ap.add_argument("--asdiv", default=".gpu_data/asdiv.jsonl")
    ap.add_argument("--qa-limit", type=int, default=0)
    ap.add_argument("--eval-qa-limit", type=int, default=300, help="eval stage: ASDiv problems per server")
    ap.add_argument("--passkey-lengths", default="1024,2048,4096,7500",
                    help="eval stage: prompt lengths in tokens (SmolLM2's context is 8,192)")
    ap.add_argument("--passkey-depths", default="0.1,0.5,0.9")
    ap.add_argument("--passkey-trials", type=int, default=4)
    ap.add_argument("--stages", default="smollm2,capacity")
    ap.add_argument("--servers", default="", help="smollm2 / tp stages: only these servers (comma-separated names)")
    ap.add_argument("--mem-fraction", type=float, default=0.80)
    ap.add_argument("--server-mem-fraction", type=float, default=0.5,
                    help="--mem-fraction-static of the smollm2 / load / tp servers (lower to run several "
                         "checks on one GPU at once)")
    ap.add_argument("--load-requests", type=int, default=2000)
    ap.add_argument("--load-retract-interval", type=int, default=50,
                    help="the load server retracts part of its running batch every this many decode steps")
    ap.add_argument("--load-max-tokens", type=int, default=60000,
                    help="the load server's pool: small enough that 256 concurrent requests (prompts up to "
                         "~2.6K tokens) force retraction; 20000 served too few at once to finish in a call")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--port", type=int, default=0, help="servers listen here, one at a time (default: "
                    "$TQ_CHECK_PORT or 30000)")
    a = ap.parse_args()
    global DEFAULT_PORT
    DEFAULT_PORT = a.port or DEFAULT_PORT
    os.makedirs(a.out, exist_ok=True)
    sys.stdout = Tee(os.path.join(a.out, "progress.log"), sys.stdout)
    base = ["--model-path", a.model, "--grammar-backend", "none", "--mem-fraction-static", str(a.server_mem_fraction),
            "--cuda-graph-max-bs", "64"]
    summary = {}
    for st in a.stages.split(","):
        t0 = time.time()
        try:
            stage = {"smollm2": smollm2_servers, "capacity": stage_capacity, "load": stage_load, "tp": stage_tp,
                     "eval": stage_eval}[st]
            summary[st] = stage(a, base, a.out)
        except Exception as e:  # noqa: BLE001 - keep the other stages running
            import traceback
            traceback.print_exc()
            summary[st] = {"error": repr(e)}
        summary[st]["seconds"] = round(time.time() - t0)
        json.dump(summary[st], open(os.path.join(a.out, f"{st}.json"), "w"), indent=1, default=str)
        print(f"== {st} done in {summary[st]['seconds']}s", flush=True)
    print("\n===== summary =====")
    for st, r in summary.items():
        print(st, json.dumps(r.get("summary", r), default=str)[:2000])


if __name__ == "__main__":
    main()
