#!/usr/bin/env python3
"""Quality evaluation against any running SGLang server (BF16, FP8 or TurboQuant KV).

Sub-commands (each prints a table and can write JSON with --json):
  ppl      perplexity of a text file from /generate input logprobs, in windows of --window tokens
  passkey  passkey retrieval: a 5-digit key hidden at several depths of a haystack, at several lengths
  qa       ASDiv math word problems through /v1/chat/completions (accuracy on the final number)
  compare  two result files side by side with the relative change (delta %)

Why prefill chunking matters for KV-cache quality: within one prefill chunk, attention uses the
fresh (unquantized) K/V of that chunk, and only earlier chunks are read from the compressed cache.
A single-chunk perplexity therefore cannot see the cache format at all. Start the servers you
compare with the same small `--chunked-prefill-size` (e.g. 64) so that nearly every token attends to
its past through the cache, as in decoding; the flag is recorded in the JSON (from /server_info).

Only the standard library is needed; tqdm is used for progress bars when present.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
import urllib.request

try:
    from tqdm import tqdm
except ImportError:  # progress bars are optional
    def tqdm(it, **_):
        return it


# ------------------------------------------------------------------------------------------------
def _post(url: str, path: str, payload: dict, timeout: float = 600.0) -> dict:
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _get(url: str, path: str, timeout: float = 60.0) -> dict:
    with urllib.request.urlopen(url.rstrip("/") + path, timeout=timeout) as r:
        return json.loads(r.read())


def server_facts(url: str) -> dict:
    """The settings that decide what a quality number means."""
    try:
        info = _get(url, "/server_info")
    except Exception as e:  # noqa: BLE001 - older servers
        return {"error": str(e)}
    keys = ["model_path", "attention_backend", "kv_cache_dtype", "chunked_prefill_size",
            "disable_cuda_graph", "max_total_num_tokens", "tp_size"]
    facts = {k: info.get(k) for k in keys}
    import os
    facts["tq_config"] = os.environ.get("SGLANG_TQ_CONFIG")
    return facts


def tokenize(url: str, text: str) -> list:
    return _post(url, "/tokenize", {"prompt": text, "add_special_tokens": False})["tokens"]


# ------------------------------------------------------------------------------------------------
def perplexity(url: str, text: str, window: int = 0, stride: int = 0) -> dict:
    """window = 0: the whole text as one request (the server tokenizes it). Otherwise token windows
    of `window` with step `stride` (default = window); every window's first token is context only."""
    if window <= 0:
        chunks = [{"text": text}]
    else:
        ids = tokenize(url, text)
        stride = stride or window
        chunks = [{"input_ids": ids[s:s + window]} for s in range(0, max(1, len(ids) - 1), stride)
                  if len(ids[s:s + window]) > 1]
    nll, count = 0.0, 0
    for c in tqdm(chunks, desc="ppl", unit="win"):
        r = _post(url, "/generate", {**c, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
                                     "return_logprob": True, "logprob_start_len": 0})
        lps = [t[0] for t in r["meta_info"]["input_token_logprobs"] if t[0] is not None]
        if any(not math.isfinite(x) for x in lps):
            raise RuntimeError("non-finite logprob returned")
        nll -= sum(lps)
        count += len(lps)
    return {"ppl": math.exp(nll / count), "tokens": count, "windows": len(chunks), "window": window}


# ------------------------------------------------------------------------------------------------
def passkey(url: str, haystack: str, lengths, depths, trials: int = 2, seed: int = 0) -> dict:
    """Hide 'The pass key is NNNNN. Remember it.' at each depth of a haystack cut to ~length tokens
    (chars ~ 4 per token, then trimmed by the tokenizer), ask for it, greedy decode."""
    rng = random.Random(seed)
    hay_ids = tokenize(url, haystack[: max(lengths) * 6])
    rows = []
    for n in lengths:
        for depth in depths:
            ok = 0
            for t in range(trials):
                key = rng.randint(10000, 99999)
                needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
                body_ids = hay_ids[: max(16, n - 64)]
                start = rng.randint(0, max(0, len(hay_ids) - len(body_ids))) if t else 0
                body_ids = hay_ids[start:start + len(body_ids)]
                cut = int(len(body_ids) * depth)
                prefix = _post(url, "/detokenize", {"tokens": body_ids[:cut]}).get("text", "") if cut else ""
                suffix = _post(url, "/detokenize", {"tokens": body_ids[cut:]}).get("text", "")
                prompt = ("There is a pass key hidden inside a lot of irrelevant text. Find it.\n\n"
                          + prefix + needle + suffix + "\n\nWhat is the pass key? The pass key is")
                r = _post(url, "/generate", {"text": prompt,
                                             "sampling_params": {"max_new_tokens": 12, "temperature": 0.0}})
                ok += str(key) in r["text"]
            rows.append({"length": n, "depth": depth, "accuracy": ok / trials})
            print(f"  passkey len={n:>6} depth={depth:.2f}: {ok}/{trials}", file=sys.stderr)
    acc = sum(r["accuracy"] for r in rows) / len(rows)
    return {"accuracy": acc, "rows": rows}


# ------------------------------------------------------------------------------------------------
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _last_number(s: str):
    nums = _NUM.findall(s.replace("$", ""))
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def qa(url: str, path: str, limit: int, max_tokens: int = 160, concurrency: int = 16) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    probs = [json.loads(l) for l in open(path)][:limit]

    def ask(p):
        msg = (f"{p['passage']} {p['question']}\nThink briefly, then give the final answer as "
               f"'Answer: <number>'.")
        r = _post(url, "/v1/chat/completions", {"model": "default", "temperature": 0.0,
                                                "max_tokens": max_tokens,
                                                "messages": [{"role": "user", "content": msg}]})
        out = r["choices"][0]["message"]["content"] or ""
        m = re.search(r"[Aa]nswer:\s*([-\d.,]+)", out)
        got = _last_number(m.group(1)) if m else _last_number(out)
        want = _last_number(p["answer"])
        return got is not None and want is not None and abs(got - want) < 1e-6

    with ThreadPoolExecutor(concurrency) as ex:
        res = list(tqdm(ex.map(ask, probs), total=len(probs), desc="qa"))
    return {"accuracy": sum(res) / len(res), "n": len(res)}


# ------------------------------------------------------------------------------------------------
def _flatten(d, pre=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{pre}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[f"{pre}{k}"] = v
    return out


def compare(a_path: str, b_path: str) -> str:
    a, b = json.load(open(a_path)), json.load(open(b_path))
    fa, fb = _flatten(a.get("results", a)), _flatten(b.get("results", b))
    lines = [f"{'metric':40s} {'A':>12s} {'B':>12s} {'delta %':>9s}"]
    for k in sorted(set(fa) & set(fb)):
        d = (fb[k] - fa[k]) / fa[k] * 100 if fa[k] else float("nan")
        lines.append(f"{k:40s} {fa[k]:12.4f} {fb[k]:12.4f} {d:+9.2f}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("ppl", "passkey", "qa"):
        p = sub.add_parser(name)
        p.add_argument("--url", default="http://127.0.0.1:30000")
        p.add_argument("--json", help="write results here")
        p.add_argument("--label", default="")
    sub.choices["ppl"].add_argument("--text", required=True)
    sub.choices["ppl"].add_argument("--chars", type=int, default=0, help="first N characters (0 = all)")
    sub.choices["ppl"].add_argument("--window", type=int, default=0, help="tokens per window (0 = whole text)")
    sub.choices["ppl"].add_argument("--stride", type=int, default=0)
    sub.choices["passkey"].add_argument("--haystack", required=True)
    sub.choices["passkey"].add_argument("--lengths", default="1024,2048,4096,8000")
    sub.choices["passkey"].add_argument("--depths", default="0.1,0.5,0.9")
    sub.choices["passkey"].add_argument("--trials", type=int, default=2)
    sub.choices["qa"].add_argument("--data", required=True)
    sub.choices["qa"].add_argument("--limit", type=int, default=300)
    sub.choices["qa"].add_argument("--max-tokens", type=int, default=160)
    c = sub.add_parser("compare")
    c.add_argument("a")
    c.add_argument("b")
    args = ap.parse_args(argv)

    if args.cmd == "compare":
        print(compare(args.a, args.b))
        return
    t0 = time.time()
    if args.cmd == "ppl":
        text = open(args.text, encoding="utf-8").read()
        if args.chars:
            text = text[: args.chars]
        res = perplexity(args.url, text, args.window, args.stride)
        print(f"ppl {res['ppl']:.4f} over {res['tokens']} tokens ({res['windows']} windows)")
    elif args.cmd == "passkey":
        res = passkey(args.url, open(args.haystack, encoding="utf-8").read(),
                      [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")],
                      args.trials)
        print(f"passkey accuracy {res['accuracy']:.3f}")
    else:
        res = qa(args.url, args.data, args.limit, args.max_tokens)
        print(f"qa accuracy {res['accuracy']:.3f} over {res['n']} problems")
    out = {"label": args.label, "cmd": args.cmd, "server": server_facts(args.url), "results": res,
           "seconds": round(time.time() - t0, 1)}
    if args.json:
        json.dump(out, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
