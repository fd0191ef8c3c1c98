"""A stand-in SGLang server process for the serving benchmark's CPU tests (127.0.0.1 only).

Takes SGLang's command line, answers /health, /server_info, /flush_cache, /abort_request and streaming
/generate with token ids. Its KV pool holds a number of tokens set by the KV format (BF16 < FP8 < TurboQuant);
a request runs once its prompt and output fit next to the running ones, else it waits (and the log says
so the way SGLang's does). Every running request gets one token per STEP_S, so a larger pool gives more
output tok/s once the server is full. Start and stop times go to the file named by FAKE_SGLANG_EVENTS;
a backend listed in FAKE_SGLANG_FAIL exits at start with SGLang's FA3 import error.
"""
import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STEP_S = 0.002
POOL = {"bf16": 4000, "fp8_e4m3": 8000, "turboquant": 14000}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    ap.add_argument("--host")
    ap.add_argument("--attention-backend")
    ap.add_argument("--kv-cache-dtype", default="bf16")
    ap.add_argument("--tq-config")
    ap.add_argument("--mem-fraction-static", type=float)
    ap.add_argument("--chunked-prefill-size", type=int)
    ap.add_argument("--cuda-graph-max-bs", type=int)
    ap.add_argument("--context-length", type=int)
    ap.add_argument("--page-size", type=int)
    ap.add_argument("--speculative-algorithm")
    a, _ = ap.parse_known_args()
    events = os.environ.get("FAKE_SGLANG_EVENTS")

    def event(what):
        if events:
            with open(events, "a") as f:
                f.write(f"{what} {os.getpid()} {time.time():.6f}\n")

    event("start")
    if a.attention_backend in os.environ.get("FAKE_SGLANG_FAIL", "").split(","):
        print("ImportError: Can not import FA3 in sgl_kernel. Please check your installation.", flush=True)
        event("stop")
        sys.exit(1)
    kv = "turboquant" if a.attention_backend == "turboquant" else a.kv_cache_dtype
    chunked = a.chunked_prefill_size
    if a.attention_backend in os.environ.get("FAKE_SGLANG_CHUNK_OVERRIDE", "").split(","):
        chunked = chunked // 2  # a backend that quietly runs with other settings
    info = {"max_total_num_tokens": POOL[kv], "mem_fraction_static": a.mem_fraction_static,
            "chunked_prefill_size": chunked, "cuda_graph_max_bs": a.cuda_graph_max_bs,
            "disable_cuda_graph": False, "disable_radix_cache": False, "page_size": a.page_size,
            "attention_backend": a.attention_backend, "kv_cache_dtype": a.kv_cache_dtype}
    if a.speculative_algorithm:  # as SGLang's scheduler reports it (tokens per verify step)
        info["internal_states"] = [{"avg_spec_accept_length": 3.0 if kv == "turboquant" else 3.2}]
    cond = threading.Condition()
    state = {"used": 0, "running": 0, "abort": 0}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _reply(self, body, code=200, ctype="application/json"):
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self._reply({})
            if self.path == "/server_info":
                return self._reply(info)
            self._reply({"error": "no route"}, 404)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            if self.path == "/flush_cache":
                return self._reply("Cache flushed.\n", ctype="text/plain")
            if self.path == "/abort_request":
                with cond:
                    state["abort"] += 1
                    cond.notify_all()
                return self._reply("")
            if self.path != "/generate":
                return self._reply({"error": "no route"}, 404)
            ids, osl = body["input_ids"], body["sampling_params"]["max_new_tokens"]
            need, gen = len(ids) + osl, state["abort"]
            with cond:
                if state["used"] + need > info["max_total_num_tokens"]:
                    print("KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 0",
                          flush=True)
                while state["used"] + need > info["max_total_num_tokens"] and state["abort"] == gen:
                    cond.wait(0.05)
                if state["abort"] != gen:
                    return self._reply({"error": "aborted"}, 400)
                state["used"] += need
                state["running"] += 1
                print(f"Decode batch, #running-req: {state['running']}, #token: {state['used']}, "
                      f"cuda graph: True, gen throughput (token/s): 1000.00, #queue-req: 0", flush=True)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for i in range(osl):
                    if state["abort"] != gen:
                        break
                    time.sleep(STEP_S)
                    chunk = {"output_ids": [(sum(ids) + i) % 1000 + 100], "meta_info": {"completion_tokens": i + 1}}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                else:
                    self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                with cond:
                    state["used"] -= need
                    state["running"] -= 1
                    cond.notify_all()
            self.close_connection = True

    ThreadingHTTPServer.request_queue_size = 256  # the default 5 would delay simultaneous connects by 1 s
    httpd = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    httpd.daemon_threads = True

    def stop(*_):
        event("stop")
        os._exit(0)

    signal.signal(signal.SIGTERM, stop)
    httpd.serve_forever()


if __name__ == "__main__":
    main()
