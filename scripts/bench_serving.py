#!/usr/bin/env python3
"""Serving benchmark, fair by construction: every config of a run on one card, one server at a time.

Each config (SGLang's `fa3`, `flashinfer` and `triton` backends over BF16 or FP8 KV, and TurboQuant presets)
gets a server with the same common arguments (--mem-fraction-static, chunked prefill, CUDA graphs, radix
cache: asserted before start and again from each server's /server_info); the servers run one after
another, never two at once. A built-in streaming client (threads, standard library only, 127.0.0.1 only)
sends token-id prompts to /generate and keeps every token's arrival time. Workloads:

  a      long prompts: ISL 16K / OSL 512 / 64 clients, output tok/s over the whole run
  b      capacity-bound long generation: ISL 2K / OSL 8K / 256 clients; output tok/s over a fixed window
         (the same for every config) that opens once the server is full, then the load is aborted
  c      multi-turn chat over one shared document: each turn extends the previous turn's prompt and answer,
         so every turn after the first is a radix-cache hit over the whole history
  d      short and light: ISL 1K / OSL 256 / 8 clients (the overhead case)
  sweep  b's window measurement at several client counts (throughput vs clients, one plot)

Pass 1 runs every config once; passes 2..--reps rerun the TurboQuant configs, BF16 `fa3` and the FP8 config
that was fastest at each point in pass 1 (servers restarted, so repetitions also span server starts). A
point's prompts come from its own seed (same prompts for every config, fresh ones for every point and
repetition; the radix cache is flushed between points). A config whose server does not start (e.g. `fa3`
without sgl-kernel's FA3 ops) is recorded as skipped with the reason, and the run goes on.

The model is a config-only Llama-3-8B shape (--load-format dummy, --skip-tokenizer-init: no weights, no
tokenizer); --model serves a real checkpoint the same way (token-id prompts).

  python scripts/bench_serving.py --workloads a,b,c,d,sweep --out $OUT          # full sizes
  python scripts/bench_serving.py --merge results/serving.json --from $OUT/serving_records.json
"""
from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from gpu_server_check import LLAMA8B, Tee, port_in_use, wait_healthy  # noqa: E402

# ----------------------------------------------------------------------------- configs and fairness

BASELINES = {  # name -> (attention backend, KV dtype)
    "bf16_fa3": ("fa3", "bf16"), "fp8_fa3": ("fa3", "fp8_e4m3"),
    "bf16_flashinfer": ("flashinfer", "bf16"), "fp8_flashinfer": ("flashinfer", "fp8_e4m3"),
    "bf16_triton": ("triton", "bf16"), "fp8_triton": ("triton", "fp8_e4m3"),
}
DEFAULT_CONFIGS = "turbo4,bf16_fa3,fp8_fa3,bf16_flashinfer,fp8_flashinfer,bf16_triton"
REFERENCE = "bf16_fa3"  # the baseline every ratio divides by
CONFIG_FLAGS = {"--attention-backend", "--kv-cache-dtype", "--tq-config"}  # what may differ between configs
# server settings that must be identical for every config of a run: flag -> /server_info key
FAIR_FLAGS = {"--mem-fraction-static": "mem_fraction_static", "--chunked-prefill-size": "chunked_prefill_size",
              "--cuda-graph-max-bs": "cuda_graph_max_bs"}
FAIR_SWITCHES = {"--disable-cuda-graph": "disable_cuda_graph", "--disable-radix-cache": "disable_radix_cache"}
RECORDED_SETTINGS = ("mem_fraction_static", "chunked_prefill_size", "cuda_graph_max_bs", "disable_cuda_graph",
                     "disable_radix_cache", "disable_piecewise_cuda_graph", "page_size", "max_running_requests",
                     "context_length", "attention_backend", "kv_cache_dtype")


class BenchError(RuntimeError):
    pass


def config_spec(name):
    """A config name -> its record fields and server arguments: BASELINES' names, else a TurboQuant
    preset name or YAML path."""
    if name in BASELINES:
        backend, kv = BASELINES[name]
        args = ["--attention-backend", backend] + (["--kv-cache-dtype", kv] if kv != "bf16" else [])
        return {"config": name, "backend": backend, "kv_dtype": kv, "args": args}
    if not re.fullmatch(r"[\w.\-/]+", name):
        raise BenchError(f"bench_serving: config {name!r}: not one of {sorted(BASELINES)} nor a preset name / YAML")
    stem = os.path.splitext(os.path.basename(name))[0]
    return {"config": stem, "backend": "turboquant", "kv_dtype": stem,
            "args": ["--attention-backend", "turboquant", "--tq-config", name]}


def is_reference(spec):
    return spec["config"] == REFERENCE


def is_fp8(spec):
    return spec["backend"] != "turboquant" and spec["kv_dtype"].startswith("fp8")


def common_args(model, dummy, mem_fraction, chunked_prefill, cuda_graph_max_bs, context_length, extra=()):
    """The server arguments every config shares: the fairness settings always explicit (SGLang would
    otherwise pick some of them per card and backend)."""
    args = ["--model-path", model, "--skip-tokenizer-init", "--incremental-streaming-output",
            "--grammar-backend", "none", "--context-length", str(context_length), "--page-size", "1",
            "--mem-fraction-static", str(mem_fraction), "--chunked-prefill-size", str(chunked_prefill),
            "--cuda-graph-max-bs", str(cuda_graph_max_bs)] + (["--load-format", "dummy"] if dummy else [])
    return args + list(extra)


def server_commands(common, specs):
    """Each config's full argument list = common + its own CONFIG_FLAGS. Raises BenchError if the common
    part sets a per-config flag or a config sets anything else (fairness by construction)."""
    bad = [a for a in common if a in CONFIG_FLAGS]
    if bad:
        raise BenchError(f"bench_serving: common server args may not set {bad}: each config sets them")
    missing = [f for f in FAIR_FLAGS if f not in common]
    if missing:
        raise BenchError(f"bench_serving: common server args must set {missing} explicitly")
    out = []
    for spec in specs:
        flags = spec["args"][0::2]
        if set(flags) - CONFIG_FLAGS or len(spec["args"]) % 2:
            raise BenchError(f"bench_serving: config {spec['config']}: args {spec['args']} set more than "
                             f"{sorted(CONFIG_FLAGS)}")
        out.append(list(common) + list(spec["args"]))
    return out


def fair_settings(info):
    """The settings from one server's /server_info that must match across configs."""
    return {k: info.get(k) for k in list(FAIR_FLAGS.values()) + list(FAIR_SWITCHES.values())}


def check_same_settings(first, info, name):
    """Raises BenchError if a server runs with other fairness settings than the run's first server."""
    a, b = fair_settings(first), fair_settings(info)
    diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    if diff:
        raise BenchError(f"server settings of {name} differ from the run's first server: {diff}")


# ----------------------------------------------------------------------------- servers, one at a time

LAUNCH = {"turboquant": [sys.executable, "-m", "sglang_tq.launch_server"],
          None: [sys.executable, "-m", "sglang.launch_server"]}


class Server:
    """One SGLang server; at most one alive in this process at any time (starting a second raises)."""

    alive = []  # the server now running, if any
    lock = threading.Lock()

    def __init__(self, name, args, port, log_dir, start_timeout=360):
        with Server.lock:
            if Server.alive:
                raise BenchError(f"server {name}: {Server.alive[0].name} is still running (one server at a time)")
            if port_in_use(port):
                raise BenchError(f"server {name}: port {port} is already in use: stop the old server first")
            tq = args[args.index("--attention-backend") + 1] == "turboquant"
            cmd = LAUNCH["turboquant" if tq else None] + list(args) + ["--port", str(port), "--host", "127.0.0.1"]
            self.name, self.url, self.cmd = name, f"http://127.0.0.1:{port}", cmd
            self.log_path = os.path.join(log_dir, f"server_{name}.log")
            self.log = open(self.log_path, "w")
            print(f"[{name}] {' '.join(cmd)}", flush=True)
            self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
            Server.alive.append(self)
        try:
            self.startup_s = wait_healthy(self.url, self.proc, timeout=start_timeout)
            self.info = http_json(self.url, "GET", "/server_info")
        except Exception as e:  # noqa: BLE001
            self.stop()
            raise BenchError(f"server {name} did not start: {e}; log: {failure_reason(self.log_path)}") from None

    def stop(self):
        """Ends the server's whole process group and waits until every member is gone (the scheduler
        holds the GPU memory the next server needs)."""
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            t_end = time.time() + wait_s
            while time.time() < t_end and group_alive(self.proc):
                time.sleep(0.2)
            if not group_alive(self.proc):
                break
        self.log.close()
        with Server.lock:
            if self in Server.alive:
                Server.alive.remove(self)


def group_alive(proc):
    """Whether any process of proc's process group is still running (proc itself reaped first)."""
    proc.poll()
    try:
        os.killpg(proc.pid, 0)
        return True
    except ProcessLookupError:
        return False


def failure_reason(log_path, limit=400):
    """The last error-looking line of a server log (e.g. sgl-kernel built without FA3)."""
    try:
        lines = [ln.strip() for ln in open(log_path, errors="replace") if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if re.search(r"Error|Exception|error:|Can not|Cannot|not supported", ln)]
    return ((errs or lines or ["empty log"])[-1])[:limit]


# ----------------------------------------------------------------------------- HTTP client (127.0.0.1 only)


def local_address(url):
    """(host, port) of a 127.0.0.1 URL; any other host is refused (the load goes to this machine only)."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or u.hostname != "127.0.0.1" or not u.port:
        raise BenchError(f"bench_serving: the client talks only to http://127.0.0.1:<port>, not {url!r}")
    return u.hostname, u.port


def http_json(url, method, path, body=None, timeout=120):
    host, port = local_address(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise BenchError(f"{method} {path}: HTTP {r.status}: {data[:200]!r}")
        try:
            return json.loads(data)
        except ValueError:  # /flush_cache answers in plain text
            return data.decode("utf-8", "replace")
    finally:
        conn.close()


class Stream:
    """One streamed request: send time, (arrival time, new tokens) per chunk, output ids."""

    __slots__ = ("sent", "chunks", "output_ids", "error", "done")

    def __init__(self):
        self.sent, self.chunks, self.output_ids, self.error, self.done = None, [], [], None, False

    @property
    def tokens(self):
        return sum(n for _, n in self.chunks)


class Load:
    """Closed-loop load: `clients` threads, each running tasks (one request, or a chat of several turns)
    taken from a shared list until it is empty, `max_s` has passed or stop() is called. Bounded in requests
    (max_requests, default 20 per client) and time (max_s, socket timeouts)."""

    def __init__(self, url, clients, max_s, request_timeout=600, max_requests=None):
        self.addr, self.url = local_address(url), url
        self.clients, self.max_s, self.request_timeout = clients, max_s, request_timeout
        self.max_requests = max_requests or 20 * clients + 64
        self.streams, self.stopped = [], threading.Event()
        self._lock, self._conns = threading.Lock(), set()

    def request(self, input_ids, osl):
        """One /generate request with fixed output length (ignore_eos), streamed; returns its Stream."""
        s = Stream()
        with self._lock:
            full = len(self.streams) >= self.max_requests
            if not full:
                self.streams.append(s)
        if full:
            self.stopped.set()
            return s
        if self.stopped.is_set() or time.perf_counter() > self.deadline:
            s.error = "not sent: load stopped"
            return s
        body = json.dumps({"input_ids": input_ids, "stream": True,
                           "sampling_params": {"max_new_tokens": osl, "temperature": 0.0, "ignore_eos": True}})
        conn = http.client.HTTPConnection(*self.addr, timeout=self.request_timeout)
        with self._lock:
            self._conns.add(conn)
        try:
            s.sent = time.perf_counter()
            conn.request("POST", "/generate", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                raise BenchError(f"HTTP {r.status}: {r.read()[:200]!r}")
            seen = 0
            while not self.stopped.is_set():
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    s.done = True
                    break
                msg = json.loads(data)
                now = time.perf_counter()
                if "error" in msg:
                    raise BenchError(str(msg["error"])[:200])
                n = (msg.get("meta_info") or {}).get("completion_tokens", seen + len(msg.get("output_ids") or [1]))
                if n > seen:
                    s.chunks.append((now, n - seen))
                    s.output_ids.extend(msg.get("output_ids") or [])
                    seen = n
        except Exception as e:  # noqa: BLE001 - a stopped load closes sockets under the readers
            if not self.stopped.is_set():
                s.error = repr(e)[:300]
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()
        return s

    def run(self, tasks, stop_at=None):
        """Runs tasks (callables taking this Load) on `clients` threads. stop_at: seconds after the
        start at which the load is stopped (open requests aborted). Returns the start time."""
        todo = list(tasks)
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + self.max_s

        def worker():
            while not self.stopped.is_set() and time.perf_counter() < self.deadline:
                with self._lock:
                    if not todo:
                        return
                    task = todo.pop(0)
                task(self)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        end = self.deadline if stop_at is None else min(self.deadline, self.t0 + stop_at)
        for t in threads:
            t.join(timeout=max(0.0, end - time.perf_counter()))
        if any(t.is_alive() for t in threads):
            self.stop()
            for t in threads:
                t.join(timeout=30)
        return self.t0

    def stop(self):
        """Ends the load: the server aborts every request, the client closes its sockets."""
        self.stopped.set()
        try:
            http_json(self.url, "POST", "/abort_request", {"rid": "", "abort_all": True}, timeout=30)
        except Exception:  # noqa: BLE001 - the sockets are closed below anyway
            pass
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except Exception:  # noqa: BLE001
                pass


# ----------------------------------------------------------------------------- statistics


def percentile(values, q):
    """q-th percentile (0..100) with linear interpolation between order statistics; None if empty."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def latency_stats(streams, t_from=None, t_to=None):
    """TTFT (requests whose first token is in range), TPOT (per request: time between its first and last
    token in range / tokens - 1) and ITL (gaps between consecutive chunks in range), p50 / p99 in ms."""
    lo = -float("inf") if t_from is None else t_from
    hi = float("inf") if t_to is None else t_to
    ttft, tpot, itl = [], [], []
    for s in streams:
        if not s.chunks:
            continue
        if lo <= s.chunks[0][0] <= hi:
            ttft.append((s.chunks[0][0] - s.sent) * 1e3)
        inside = [(t, n) for t, n in s.chunks if lo <= t <= hi]
        if len(inside) > 1:
            tpot.append((inside[-1][0] - inside[0][0]) * 1e3 / (sum(n for _, n in inside[1:])))
            itl += [(b[0] - a[0]) * 1e3 for a, b in zip(inside, inside[1:])]
    out = {}
    for name, vals in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        for q in (50, 99):
            x = percentile(vals, q)
            out[f"{name}_p{q}_ms"] = None if x is None else round(x, 3)
    return out


def whole_run_stats(streams, t0):
    """Output tok/s over the run (first send to last token) and the latency percentiles."""
    times = [t for s in streams for t, _ in s.chunks]
    tokens = sum(s.tokens for s in streams)
    dur = (max(times) - t0) if times else None
    return {"output_tok_s": round(tokens / dur, 3) if dur else None, "duration_s": round(dur or 0.0, 3),
            "output_tokens": tokens, "requests": len(streams), "completed": sum(s.done for s in streams),
            "errors": [s.error for s in streams if s.error][:5], **latency_stats(streams)}


def active_counts(streams):
    """[(t, n)]: after each first- or last-token event, how many requests are between their first and last
    token (streaming, or paused by a retraction)."""
    ev = []
    for s in streams:
        if s.chunks:
            ev += [(s.chunks[0][0], 1), (s.chunks[-1][0], -1)]
    ev.sort(key=lambda e: (e[0], -e[1]))
    n, out = 0, []
    for t, d in ev:
        n += d
        out.append((t, n))
    return out


def full_at(streams, until):
    """Seconds-since-epoch-of-perf_counter at which the server is full: the first time the number of
    streaming requests reaches 95 % of its maximum before `until`."""
    counts = [(t, n) for t, n in active_counts(streams) if t <= until]
    if not counts:
        return None
    peak = max(n for _, n in counts)
    return next(t for t, n in counts if n >= 0.95 * peak)


def window_stats(streams, t0, warmup_s, window_s):
    """Steady state: output tok/s from the tokens that arrived in [t0 + warmup_s, t0 + warmup_s +
    window_s], latency percentiles in that window, and when the server was full (window_after_full: the
    window opened after that)."""
    w0, w1 = t0 + warmup_s, t0 + warmup_s + window_s
    tokens = sum(n for s in streams for t, n in s.chunks if w0 <= t <= w1)
    last = max((t for s in streams for t, _ in s.chunks), default=t0)
    full = full_at(streams, w1)
    return {"output_tok_s": round(tokens / window_s, 3) if last >= w1 else None, "window_s": window_s,
            "warmup_s": warmup_s, "window_tokens": tokens, "window_complete": last >= w1,
            "full_at_s": None if full is None else round(full - t0, 3),
            "window_after_full": full is not None and full <= w0,
            "streaming_in_window": sum(any(w0 <= t <= w1 for t, _ in s.chunks) for s in streams),
            "requests": len(streams), "errors": [s.error for s in streams if s.error][:5],
            **latency_stats(streams, w0, w1)}


# ----------------------------------------------------------------------------- workloads


def point_seed(base, *key):
    """The seed of one point and repetition: every config sees the same prompts, every point new ones."""
    return zlib.crc32(json.dumps([base, *key]).encode())


def token_ids(rng, n, vocab):
    return [rng.randrange(100, max(101, vocab - 100)) for _ in range(n)]


def single_requests(rng, vocab, n, isl, osl):
    prompts = [token_ids(rng, isl, vocab) for _ in range(n)]
    return [lambda load, p=p: load.request(p, osl) for p in prompts]


def endless_clients(seed, vocab, clients, isl, osl):
    """One task per client that sends a new prompt (from the client's own seed) whenever its last
    request ends, until the load stops: the server stays as full as the clients can make it."""
    def client(load, rng):
        while not load.stopped.is_set() and time.perf_counter() < load.deadline:
            load.request(token_ids(rng, isl, vocab), osl)
    return [lambda load, i=i: client(load, random.Random(seed * 1000003 + i)) for i in range(clients)]


def flush_cache(url, timeout_s=120):
    """Empties the radix cache between points; SGLang refuses while requests are still running, so retry."""
    t_end = time.time() + timeout_s
    while True:
        try:
            return http_json(url, "POST", "/flush_cache", timeout=60)
        except BenchError:
            if time.time() > t_end:
                raise
            time.sleep(2)


def chat_tasks(rng, vocab, convs, turns, doc, user, osl):
    """Conversations over one shared document: turn k's prompt = turn k-1's prompt + its answer + new user
    tokens, so the radix cache holds everything before the new user tokens."""
    document = token_ids(rng, doc, vocab)
    users = [[token_ids(rng, user, vocab) for _ in range(turns)] for _ in range(convs)]

    def conversation(load, msgs):
        history = list(document)
        for m in msgs:
            history += m
            s = load.request(list(history), osl)
            if s.error or not s.done:
                return
            history += s.output_ids
    return document, [lambda load, m=m: conversation(load, m) for m in users]


class Workload:
    """One point: kind ("closed": fixed requests, whole-run stats; "window": steady-state window; "chat")."""

    def __init__(self, name, kind, clients, isl, osl, **kw):
        self.name, self.kind, self.clients, self.isl, self.osl, self.kw = name, kind, clients, isl, osl, kw

    def key(self):
        return f"{self.name}:{self.isl}:{self.osl}:{self.clients}"

    def context_needed(self):
        if self.kind == "chat":
            return self.kw["doc"] + self.kw["turns"] * (self.kw["user"] + self.osl)
        return self.isl + self.osl

    def fields(self):
        f = {"workload": self.name, "clients": self.clients, "isl": self.isl, "osl": self.osl}
        if self.kind == "chat":
            f.update(turns=self.kw["turns"], shared_tokens=self.kw["doc"], user_tokens=self.kw["user"])
        return f

    def run(self, url, vocab, seed, max_s, on_start=lambda: None):
        """Warm-up, then the timed load; on_start() is called between the two."""
        rng = random.Random(seed)
        warm = Load(url, min(self.clients, 8), 120)  # first-use costs (new shapes, allocator) off the clock
        warm.run(single_requests(rng, vocab, min(self.clients, 8), min(self.isl, 1024), 4))
        if self.kind == "chat":
            doc, tasks = chat_tasks(rng, vocab, self.clients, self.kw["turns"], self.kw["doc"],
                                          self.kw["user"], self.osl)
            Load(url, 1, 300).run([lambda load: load.request(doc + [rng.randrange(100, 200)], 1)])  # doc cached
        elif self.kind == "window":
            tasks = endless_clients(seed, vocab, self.clients, self.isl, self.osl)
        else:
            tasks = single_requests(rng, vocab, self.kw["requests"], self.isl, self.osl)
        if self.kind == "window":  # the window always completes unless the server stops streaming
            max_s = max(max_s, self.kw["warmup_s"] + self.kw["window_s"] + 30)
        bound = {"chat": self.clients * self.kw.get("turns", 1), "closed": self.kw.get("requests")}.get(self.kind)
        load = Load(url, self.clients, max_s, max_requests=bound)
        on_start()
        if self.kind == "window":
            stop = self.kw["warmup_s"] + self.kw["window_s"]
            t0 = load.run(tasks, stop_at=stop)
            load.stop()
            res = window_stats(load.streams, t0, self.kw["warmup_s"], self.kw["window_s"])
        else:
            t0 = load.run(tasks)
            res = whole_run_stats(load.streams, t0)
            if load.stopped.is_set():
                res["cut_off_s"] = max_s
        return res


def parse_triple(flag, spec, n=3):
    try:
        v = [int(x) for x in spec.split(":")]
    except ValueError:
        v = []
    if len(v) != n or min(v) <= 0:
        raise BenchError(f"bench_serving: {flag} {spec!r}: expected {n} positive integers separated by ':'")
    return v


def workloads(a):
    """The selected workloads from the size flags."""
    chosen = [w for w in a.workloads.split(",") if w]
    unknown = [w for w in chosen if w not in ("a", "b", "c", "d", "sweep")]
    if unknown:
        raise BenchError(f"bench_serving: --workloads: unknown {unknown}; allowed: a, b, c, d, sweep")
    out = []
    if "a" in chosen:
        isl, osl, clients = parse_triple("--a", a.a)
        out.append(Workload("a", "closed", clients, isl, osl, requests=max(clients, a.a_requests)))
    if "b" in chosen:
        isl, osl, clients = parse_triple("--b", a.b)
        out.append(Workload("b", "window", clients, isl, osl, warmup_s=a.b_warmup_s, window_s=a.b_window_s))
    if "c" in chosen:
        doc, turns, convs, user, osl = parse_triple("--c", a.c, 5)
        out.append(Workload("c", "chat", convs, doc, osl, doc=doc, turns=turns, user=user))
    if "d" in chosen:
        isl, osl, clients = parse_triple("--d", a.d)
        out.append(Workload("d", "closed", clients, isl, osl, requests=max(clients, a.d_requests)))
    if "sweep" in chosen:
        isl, osl, _ = parse_triple("--b", a.b)
        for c in sorted({int(x) for x in a.sweep_clients.split(",")}):
            out.append(Workload("b_sweep", "window", c, isl, osl, warmup_s=a.sweep_warmup_s,
                                window_s=a.sweep_window_s))
    if not out:
        raise BenchError("bench_serving: --workloads selects nothing")
    return out


# ----------------------------------------------------------------------------- server log


def server_log_stats(path, start=0, end=None):
    """What the server's log says between byte offsets start and end: peak running and queued requests
    (from the periodic 'Decode batch' lines), retractions ('#retracted_reqs'), decode batches with and
    without CUDA graphs, median decode and prefill throughput."""
    with open(path, "rb") as f:
        f.seek(start)
        text = f.read(None if end is None else max(0, end - start)).decode("utf-8", "replace")
    running, queued, gen, inp = [], [], [], []
    retracted = dec_graph = dec_eager = 0
    for line in text.splitlines():
        if "Decode batch" in line:
            dec_graph += "cuda graph: True" in line
            dec_eager += "cuda graph: True" not in line
            for pat, dst in ((r"#running-req: (\d+)", running), (r"#queue-req: (\d+)", queued),
                             (r"gen throughput \(token/s\): ([0-9.]+)", gen)):
                m = re.search(pat, line)
                if m:
                    dst.append(float(m.group(1)))
        elif "Prefill batch" in line:
            m = re.search(r"input throughput \(token/s\): ([0-9.]+)", line)
            if m and float(m.group(1)) > 0:
                inp.append(float(m.group(1)))
        m = re.search(r"#retracted_reqs: (\d+)", line)
        if m:
            retracted += int(m.group(1))
    med = lambda v: statistics.median(v) if v else None  # noqa: E731
    return {"peak_running_requests": int(max(running)) if running else None,
            "peak_queued_requests": int(max(queued)) if queued else None, "retractions": retracted,
            "decode_batches_cuda_graph": dec_graph, "decode_batches_eager": dec_eager,
            "median_gen_throughput": med(gen), "median_input_throughput": med(inp)}


# ----------------------------------------------------------------------------- run metadata


def card_info():
    """(card, gpu_uuid): the GPU this process uses, by nvidia-smi's name and physical index (the first
    entry of CUDA_VISIBLE_DEVICES) and the number of GPUs on the host."""
    try:
        rows = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip().splitlines()
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"bench_serving: nvidia-smi failed ({e}): the card must be recorded") from None
    gpus = [[x.strip() for x in r.split(",")] for r in rows if r.strip()]
    vis = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    pick = next((g for g in gpus if vis in (g[0], g[2])), gpus[0]) if vis else gpus[0]
    return f"{pick[1]} (GPU {pick[0]} of {len(gpus)})", pick[2]


def git_commit():
    try:
        return subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def make_dummy_8b(dest):
    """A config-only Llama-3-8B folder (vocabulary 128,256): weights from --load-format dummy, prompts as
    token ids (--skip-tokenizer-init), so no tokenizer is needed."""
    os.makedirs(dest, exist_ok=True)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(dict(LLAMA8B, vocab_size=128256, bos_token_id=128000, eos_token_id=128001), f)
    return dest


# ----------------------------------------------------------------------------- records


RECORD_KEYS = ("workload", "config", "backend", "kv_dtype", "clients", "isl", "osl", "output_tok_s", "spread",
               "reps", "ttft_p50_ms", "tpot_p99_ms", "max_total_num_tokens", "card", "date", "commit", "command")
MEDIAN_KEYS = ("output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms",
               "itl_p99_ms")


def record(point, spec, runs, meta, skipped=None):
    """One results/serving.json record of a point and config, every repetition kept under `runs`."""
    rec = {**point, "config": spec["config"], "backend": spec["backend"], "kv_dtype": spec["kv_dtype"],
           "max_total_num_tokens": meta.get("max_total_num_tokens", {}).get(spec["config"])}
    if skipped:
        rec["skipped"] = skipped
    rec.update({k: meta.get(k) for k in ("card", "gpu_uuid", "date", "commit", "command", "server_settings")})
    rec["runs"] = runs
    return summarize(rec)


def summarize(rec):
    """Fills a record's medians over its runs, spread = max - min output tok/s, reps, and the peak running
    requests and retractions of any run."""
    ok = [r for r in rec["runs"] if r.get("output_tok_s") is not None]
    for k in MEDIAN_KEYS:
        vals = [r[k] for r in ok if r.get(k) is not None]
        rec[k] = round(statistics.median(vals), 3) if vals else None
    tps = [r["output_tok_s"] for r in ok]
    rec.update(spread=round(max(tps) - min(tps), 3) if len(tps) > 1 else None, spread_kind="max - min tok/s",
               reps=len(ok))
    for k in ("peak_running_requests", "retractions"):
        vals = [r[k] for r in ok if r.get(k) is not None]
        rec[k] = max(vals) if vals else None
    if ok:
        rec.pop("skipped", None)
    return rec


def check_records(records, where):
    """Every record has RECORD_KEYS (the schema scripts/make_tables.py checks)."""
    for i, r in enumerate(records):
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise BenchError(f"{where}: record {i}: missing key(s) {', '.join(missing)}")


MERGE_KEY = ("workload", "config", "clients", "isl", "osl", "card", "gpu_uuid", "date", "commit")


def merge(into, new):
    """Writes `new` records into the list at `into`. A record of the same point, config and run (card,
    GPU, date, commit: e.g. one run split over several commands on one machine) gains the new record's
    repetitions (by run_id, so merging twice adds nothing) and is summarized again; a record without
    repetitions replaces it; others are appended."""
    key = lambda r: tuple(r.get(k) for k in MERGE_KEY)  # noqa: E731
    out = json.load(open(into)) if os.path.exists(into) else []
    check_records(new, "new records")
    index = {key(r): i for i, r in enumerate(out)}
    for r in new:
        k = key(r)
        if k not in index:
            index[k] = len(out)
            out.append(r)
            continue
        base = out[index[k]]
        if "runs" not in base or "runs" not in r:
            out[index[k]] = r
            continue
        seen = {x.get("run_id") for x in base["runs"]}
        both = dict(base, runs=base["runs"] + [x for x in r["runs"] if x.get("run_id") not in seen])
        both["command"] = "; ".join(dict.fromkeys(c for x in (base, r) for c in x["command"].split("; ")))
        both["max_total_num_tokens"] = base["max_total_num_tokens"] or r["max_total_num_tokens"]
        if r.get("skipped") and not base.get("skipped"):
            both["skipped"] = r["skipped"]
        out[index[k]] = summarize(both)
    with open(into, "w") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return out


def best_under_tpot(records, limit_ms=50.0):
    """Per config, the sweep record with the highest output tok/s whose TPOT p99 is <= limit_ms."""
    best = {}
    for r in records:
        if r.get("output_tok_s") is None or r.get("tpot_p99_ms") is None or r["tpot_p99_ms"] > limit_ms:
            continue
        if r["config"] not in best or r["output_tok_s"] > best[r["config"]]["output_tok_s"]:
            best[r["config"]] = r
    return best


def plot_sweep(records, path):
    """Sweep output tok/s vs clients, one line per config (PNG; skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    sweep = [r for r in records if r["workload"] == "b_sweep" and r.get("output_tok_s") is not None]
    if not sweep:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for cfg in dict.fromkeys(r["config"] for r in sweep):
        pts = sorted((r["clients"], r["output_tok_s"]) for r in sweep if r["config"] == cfg)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=cfg)
    r0 = sweep[0]
    ax.set_title(f"ISL {r0['isl']} / OSL {r0['osl']}: steady-state output tok/s, {r0['card']}")
    ax.set_xlabel("clients")
    ax.set_ylabel("output tok/s")
    ax.set_xscale("log", base=2)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ----------------------------------------------------------------------------- the run


def plan_passes(specs, reps, pass1):
    """Configs of pass 2..reps: TurboQuant configs, BF16 fa3 and, per point, pass 1's fastest FP8 config.
    pass1: {(point key, config): output tok/s or None}."""
    fp8 = [s["config"] for s in specs if is_fp8(s)]
    best = set()
    for point in {k for k, _ in pass1}:
        got = [(pass1.get((point, c)) or 0, c) for c in fp8 if pass1.get((point, c))]
        if got:
            best.add(max(got)[1])
    again = [s for s in specs if s["backend"] == "turboquant" or is_reference(s) or s["config"] in best]
    return [again] * max(0, reps - 1)


def run_bench(a, specs, loads, common, meta, out_dir):
    """Every pass, every config one server after another; returns the records."""
    cmds = dict(zip((s["config"] for s in specs), server_commands(common, specs)))
    runs = {}  # (point key, config) -> [run dicts]
    skipped = {}
    first_info = None
    t_start = time.time()
    meta.setdefault("max_total_num_tokens", {})

    def one_pass(pass_specs, rep):
        nonlocal first_info
        for spec in pass_specs:
            cfg = spec["config"]
            if cfg in skipped:
                continue
            left = a.budget_s - (time.time() - t_start)
            if left < a.min_config_s:
                skipped[cfg] = f"time budget: {left:.0f} s left before pass {rep} (--budget-s {a.budget_s})"
                print(f"[{cfg}] skipped: {skipped[cfg]}", flush=True)
                continue
            try:
                s = Server(f"{cfg}_r{rep}", cmds[cfg], a.port, out_dir)
            except BenchError as e:
                skipped[cfg] = str(e)
                print(f"[{cfg}] skipped: {e}", flush=True)
                continue
            try:
                if first_info is None:
                    first_info = s.info
                    meta["server_settings"] = {k: s.info.get(k) for k in RECORDED_SETTINGS
                                               if k not in ("attention_backend", "kv_cache_dtype")}
                check_same_settings(first_info, s.info, cfg)
                meta["max_total_num_tokens"][cfg] = s.info.get("max_total_num_tokens")
                for w in loads:
                    mark = [os.path.getsize(s.log_path)]
                    try:
                        flush_cache(s.url)
                        r = w.run(s.url, a.vocab, point_seed(a.seed, w.key(), rep), a.max_load_s,
                                  on_start=lambda: mark.__setitem__(0, os.path.getsize(s.log_path)))
                    except Exception as e:  # noqa: BLE001 - one failed point must not end the run
                        r = {"output_tok_s": None, "error": repr(e)[:500]}
                    s.log.flush()
                    r.update(server_log_stats(s.log_path, mark[0]), rep=rep, run_id=uuid.uuid4().hex[:12])
                    runs.setdefault((w.key(), cfg), []).append(r)
                    print(f"[{cfg}] {w.key()} rep {rep}: {json.dumps(r)[:600]}", flush=True)
            except BenchError as e:
                skipped[cfg] = str(e)
                print(f"[{cfg}] stopped: {e}", flush=True)
            finally:
                s.stop()
            write_out(out_dir, records_of(specs, loads, runs, skipped, meta))

    one_pass(specs, a.first_rep)
    pass1 = {k: (v[0].get("output_tok_s") if v else None) for k, v in runs.items()}
    for i, again in enumerate(plan_passes(specs, a.reps, pass1), start=a.first_rep + 1):
        one_pass(again, i)
    return records_of(specs, loads, runs, skipped, meta)


def records_of(specs, loads, runs, skipped, meta):
    return [record(w.fields(), s, runs.get((w.key(), s["config"]), []), meta, skipped.get(s["config"]))
            for w in loads for s in specs]


def write_out(out_dir, records):
    with open(os.path.join(out_dir, "serving_records.json"), "w") as f:
        json.dump(records, f, indent=1)


def summary(records):
    """Text table: per point and config the median output tok/s, spread, TTFT / TPOT, and the ratio to
    BF16 fa3 of this run."""
    lines = [f"{'point':>22s} {'config':>16s} {'out tok/s':>10s} {'spread':>8s} {'reps':>4s} {'TTFT p50':>9s} "
             f"{'TPOT p99':>9s} {'peak run':>8s} {'retr':>5s} {'vs fa3':>7s}"]
    fmt = lambda x, d=1: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in records:
        point = f"{r['workload']} {r['isl']}/{r['osl']}/{r['clients']}"
        ref = next((b for b in records if b["config"] == REFERENCE and
                    (b["workload"], b["isl"], b["osl"], b["clients"]) == (r["workload"], r["isl"], r["osl"],
                                                                          r["clients"])), None)
        ratio = (r["output_tok_s"] / ref["output_tok_s"]) if ref and ref["output_tok_s"] and r["output_tok_s"] else None
        lines.append(f"{point:>22s} {r['config']:>16s} {fmt(r['output_tok_s']):>10s} {fmt(r['spread']):>8s} "
                     f"{r['reps']:>4d} {fmt(r['ttft_p50_ms']):>9s} {fmt(r['tpot_p99_ms'], 2):>9s} "
                     f"{str(r.get('peak_running_requests')):>8s} {str(r.get('retractions')):>5s} "
                     f"{fmt(ratio, 3):>7s}" + (f"  skipped: {r['skipped'][:100]}" if r.get("skipped") else ""))
    best = best_under_tpot([r for r in records if r["workload"] == "b_sweep"])
    if best:
        lines.append("sweep, highest output tok/s with TPOT p99 <= 50 ms: " + ", ".join(
            f"{c} {r['output_tok_s']:.0f} ({r['clients']} clients)" for c, r in best.items()))
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"comma-separated: {', '.join(BASELINES)} or TurboQuant presets / YAML paths")
    ap.add_argument("--workloads", default="a,b,c,d,sweep")
    ap.add_argument("--a", default="16384:512:64", help="isl:osl:clients")
    ap.add_argument("--a-requests", type=int, default=64, help="requests of workload a (at least its clients)")
    ap.add_argument("--b", default="2048:8192:256", help="isl:osl:clients (also the sweep's lengths)")
    ap.add_argument("--b-warmup-s", type=float, default=60.0, help="window opens this long after the load starts")
    ap.add_argument("--b-window-s", type=float, default=60.0)
    ap.add_argument("--c", default="16384:8:64:128:256",
                    help="shared document tokens : turns : conversations : user tokens per turn : OSL per turn")
    ap.add_argument("--d", default="1024:256:8", help="isl:osl:clients")
    ap.add_argument("--d-requests", type=int, default=64, help="requests of workload d (at least its clients)")
    ap.add_argument("--sweep-clients", default="32,64,128,256,512")
    ap.add_argument("--sweep-warmup-s", type=float, default=45.0)
    ap.add_argument("--sweep-window-s", type=float, default=60.0)
    ap.add_argument("--reps", type=int, default=2,
                    help="repetitions of TurboQuant configs, BF16 fa3 and the fastest FP8 (others once)")
    ap.add_argument("--seed", type=int, default=0, help="base of every point's seed")
    ap.add_argument("--first-rep", type=int, default=1,
                    help="number of this run's first repetition (a run split over several commands continues "
                         "the numbering: repetition k has the same prompts for every config)")
    ap.add_argument("--max-load-s", type=float, default=600.0, help="a point's load is stopped after this long")
    ap.add_argument("--budget-s", type=float, default=1e9, help="no new server once this much time has passed")
    ap.add_argument("--min-config-s", type=float, default=0.0,
                    help="a server is started only if at least this much of --budget-s is left")
    ap.add_argument("--model", default="", help="HF folder with weights; empty: config-only Llama-3-8B, dummy weights")
    ap.add_argument("--mem-fraction", type=float, default=0.85)
    ap.add_argument("--chunked-prefill", type=int, default=16384)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ap.add_argument("--server-args", default="", help="more server args for every config, space separated")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--commit", default="", help="recorded commit (default: git rev-parse of this checkout)")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/out"))
    ap.add_argument("--merge", default="", help="write the records into this results file (e.g. results/serving.json)")
    ap.add_argument("--from", dest="merge_from", nargs="*", default=None,
                    help="with --merge: merge these serving_records.json files instead of running")
    a = ap.parse_args(argv)
    try:
        if a.merge_from is not None:
            if not a.merge:
                raise BenchError("bench_serving: --from needs --merge RESULTS_FILE")
            recs = [r for p in a.merge_from for r in json.load(open(p))]
            print(f"{len(merge(a.merge, recs))} records in {a.merge}")
            return 0
        return run_main(a, argv)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_main(a, argv):
    os.makedirs(a.out, exist_ok=True)
    stdout = sys.stdout
    sys.stdout = Tee(os.path.join(a.out, "progress.log"), stdout)
    try:
        return bench(a, argv)
    finally:
        sys.stdout = stdout


def bench(a, argv):
    specs = [config_spec(c) for c in a.configs.split(",") if c]
    if len({s["config"] for s in specs}) != len(specs):
        raise BenchError(f"bench_serving: --configs {a.configs!r} names a config twice")
    loads = workloads(a)
    model = a.model or make_dummy_8b(os.path.join(a.out, "llama8b-shape"))
    a.vocab = json.load(open(os.path.join(model, "config.json"))).get("vocab_size", 32000)
    context = max(4096, max(w.context_needed() for w in loads) + 64)
    common = common_args(model, not a.model, a.mem_fraction, a.chunked_prefill, a.cuda_graph_max_bs, context,
                         a.server_args.split())
    card, uuid = card_info()
    commit = a.commit or git_commit()
    if not commit:
        raise BenchError("bench_serving: no git checkout here: pass --commit")
    meta = {"card": card, "gpu_uuid": uuid, "commit": commit, "date": datetime.date.today().isoformat(),
            "command": "python scripts/bench_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    records = run_bench(a, specs, loads, common, meta, a.out)
    write_out(a.out, records)
    if plot_sweep(records, os.path.join(a.out, "sweep.png")):
        print(f"plot: {os.path.join(a.out, 'sweep.png')}")
    print("\n===== serving benchmark, " + card + ", commit " + commit + " =====")
    print(summary(records))
    if a.merge:
        merge(a.merge, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
