#!/usr/bin/env python3
"""Load test against a running SGLang server (any backend): many concurrent requests with mixed
lengths, shared prefixes (radix-cache reuse and eviction), clients that abort mid-stream, and
logprob checks. Pass criteria, printed at the end and written as JSON:

  * 0 failed requests among those not aborted on purpose,
  * no NaN/inf among returned logprobs,
  * when idle afterwards: no running/waiting requests and no tokens held by requests
    (/get_load num_tokens == 0 after /flush_cache), server healthy.

Run the server with a small --max-total-tokens to force retraction, e.g.
  python -m sglang_tq.launch_server --model-path M --attention-backend turboquant --max-total-tokens 20000
  python scripts/load_test.py --url http://127.0.0.1:30000 --requests 2000 --concurrency 256
"""
from __future__ import annotations

import argparse
import json
import math
import random
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
         "you were her she there been one all we their has would when if so no will more out said up what its about "
         "into than them can only other time new some could these two may first then do any like my now over such "
         "our man me even most made after also did many before must through back years where much your way well").split()


def _text(rng, n_words):
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def one_request(url, i, rng, prefixes, abort_frac, max_new):
    prefix = rng.choice(prefixes) if rng.random() < 0.6 else ""
    prompt = prefix + _text(rng, rng.choice([8, 32, 128, 512, 1024]))
    abort = rng.random() < abort_frac
    body = {"text": prompt, "stream": True, "return_logprob": True,
            "sampling_params": {"max_new_tokens": rng.choice([4, 16, 64, max_new]), "temperature": rng.choice([0.0, 0.7]),
                                "ignore_eos": rng.random() < 0.5}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t0 = time.time()
    bad_lp, chunks = 0, 0
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                msg = json.loads(line[5:])
                if "error" in msg:
                    raise RuntimeError(str(msg["error"])[:200])
                chunks += 1
                for lp in (msg.get("meta_info", {}).get("output_token_logprobs") or []):
                    if lp and lp[0] is not None and not math.isfinite(lp[0]):
                        bad_lp += 1
                if abort and chunks >= 2:
                    return {"status": "aborted", "bad_logprobs": bad_lp, "s": time.time() - t0}
        return {"status": "ok", "bad_logprobs": bad_lp, "s": time.time() - t0}
    except Exception as e:  # noqa: BLE001
        return {"status": "aborted" if abort else "failed", "error": repr(e)[:300], "bad_logprobs": bad_lp}


def counts(results):
    """ok / aborted / failed counts, non-finite logprobs and the first errors of finished requests."""
    n = {st: sum(r["status"] == st for r in results) for st in ("ok", "aborted", "failed")}
    return {**n, "bad_logprobs": sum(r["bad_logprobs"] for r in results),
            "errors": [r.get("error") for r in results if r["status"] == "failed"][:10]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--abort-frac", type=float, default=0.10)
    ap.add_argument("--max-new", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    rng0 = random.Random(a.seed)
    prefixes = [_text(rng0, rng0.choice([64, 256, 1024])) + " " for _ in range(12)]
    seeds = [rng0.randrange(1 << 30) for _ in range(a.requests)]
    finished = []
    lock = threading.Lock()
    t0 = time.time()

    def run(i):
        r = one_request(a.url, i, random.Random(seeds[i]), prefixes, a.abort_frac, a.max_new)
        with lock:
            finished.append(r)
            if len(finished) % 200 == 0:
                part = counts(finished)
                print(f"  {len(finished)}/{a.requests} in {time.time() - t0:.0f}s: {part}", flush=True)
                if a.json:  # a run cut off from outside still leaves what it saw
                    json.dump({"partial": True, "finished": len(finished), "requests": a.requests,
                               "wall_s": round(time.time() - t0, 1), **part}, open(a.json, "w"), indent=1)
        return r

    with ThreadPoolExecutor(a.concurrency) as ex:
        results = list(ex.map(run, range(a.requests)))
    wall = time.time() - t0
    time.sleep(3)
    get = lambda p: json.loads(urllib.request.urlopen(a.url + p, timeout=60).read())  # noqa: E731
    load_before = get("/get_load")
    urllib.request.urlopen(urllib.request.Request(a.url + "/flush_cache", method="POST"), timeout=60).read()
    time.sleep(2)
    load_after = get("/get_load")
    healthy = urllib.request.urlopen(a.url + "/health", timeout=30).status == 200
    c = counts(results)
    loads = load_after if isinstance(load_after, list) else [load_after]
    idle_tokens = sum(x.get("num_tokens", 0) for x in loads)
    idle_reqs = sum(x.get("num_reqs", 0) for x in loads)  # running + waiting
    report = {"requests": a.requests, "concurrency": a.concurrency, "wall_s": round(wall, 1), **c,
              "idle_tokens_after_flush": idle_tokens, "idle_requests": idle_reqs,
              "healthy": healthy, "load_before_flush": load_before}
    report["pass"] = c["failed"] == 0 and c["bad_logprobs"] == 0 and idle_tokens == 0 and idle_reqs == 0 and healthy
    print(json.dumps(report, indent=1))
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
