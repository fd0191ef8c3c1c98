"""The evaluation and load-test tools (scripts/) against a small stand-in server on 127.0.0.1 that speaks
the few SGLang HTTP endpoints they use. The real servers only exist on a GPU; this checks the tools'
own logic: perplexity arithmetic and windows, QA answer parsing, compare mode, load-test accounting
of aborted / failed requests and the idle check."""
import json
import math
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
import eval_quality  # noqa: E402
import load_test  # noqa: E402

LOGPROB = -2.0  # every input token gets this log-probability


class FakeSGLang(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state = {"fail_every": 0, "count": 0, "tokens_held": 0, "perturb_at": None}

    def log_message(self, *a):  # keep pytest output clean
        pass

    def _json(self, obj, code=200):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            return self._json({})
        if self.path == "/get_load":
            return self._json([{"num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": self.state["tokens_held"]}])
        if self.path == "/server_info":
            return self._json({"attention_backend": "fake", "max_total_num_tokens": 1000, "model_path": "/m/Fake-1B"})
        self._json({"error": "no route"}, 404)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        req = json.loads(self.rfile.read(n) or b"{}")
        if self.path == "/flush_cache":
            return self._json({})
        if self.path == "/tokenize":
            bos = [1] if req.get("add_special_tokens") else []  # the stand-in tokenizer's BOS is id 1
            return self._json({"tokens": bos + [ord(c) for c in req["prompt"]]})
        if self.path == "/detokenize":
            return self._json({"text": "".join(chr(t) for t in req["tokens"])})
        if self.path == "/v1/chat/completions":
            msg = req["messages"][0]["content"]
            a, b = [int(x) for x in msg.split("?")[0].split() if x.isdigit()][:2]
            return self._json({"choices": [{"message": {"content": f"Reasoning... Answer: {a + b}"}}]})
        if self.path == "/generate":
            ids = req.get("input_ids") or [ord(c) for c in req.get("text", "")]
            if not req.get("stream"):
                lps = [[None, ids[0], None]] + [[LOGPROB, t, None] for t in ids[1:]]
                text = req.get("text", "")
                # a "model" that finds the needle unless it sits in the first 150 characters
                key = text.split("The pass key is ")[1][:5] if "The pass key is " in text else "x"
                if "The pass key is " in text and text.index("The pass key is ") < 150:
                    key = "00000"
                # greedy tokens: a function of the prompt; with perturb_at set, prompts starting with an even
                # token id diverge from that position on (a stand-in for a lossy cache)
                n_out, cut = req.get("sampling_params", {}).get("max_new_tokens", 1), self.state["perturb_at"]
                out = [(sum(ids) + i) % 97 + (1000 if cut is not None and ids[0] % 2 == 0 and i >= cut else 0)
                       for i in range(n_out)]
                return self._json({"text": f" {key}.", "output_ids": out, "meta_info": {"input_token_logprobs": lps}})
            self.state["count"] += 1
            if self.state["fail_every"] and self.state["count"] % self.state["fail_every"] == 0:
                return self._json({"error": "boom"}, 500)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Connection", "close")
            self.end_headers()
            try:
                for i in range(4):
                    chunk = {"text": "y" * i, "meta_info": {"output_token_logprobs": [[-0.5, 1, None]],
                                                            "completion_tokens": i + 1}}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                pass
            self.close_connection = True
            return None
        self._json({"error": "no route"}, 404)


@pytest.fixture()
def server():
    FakeSGLang.state.update(fail_every=0, count=0, tokens_held=0, perturb_at=None)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_perplexity_whole_text_and_windows(server):
    text = "abcdefghij" * 5  # 50 tokens in the stand-in tokenizer
    whole = eval_quality.perplexity(server, text)
    assert whole["tokens"] == 49 and whole["windows"] == 1
    assert math.isclose(whole["ppl"], math.exp(-LOGPROB))
    win = eval_quality.perplexity(server, text, window=16)
    # windows of 16 tokens at stride 16: the first token of each window is context only
    assert win["windows"] == 4 and win["tokens"] == 15 * 3 + 1
    assert math.isclose(win["ppl"], math.exp(-LOGPROB))


def test_qa_parses_final_answers(server, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"passage": f"Tom has {a} apples and {b} pears.", "question": "How many fruits?", "answer": f"{a + b} fruits"}
            for a, b in [(2, 3), (10, 7), (1, 1)]]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    res = eval_quality.qa(server, str(data), limit=10, concurrency=2)
    assert res == {"accuracy": 1.0, "n": 3}


def test_compare_mode(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({"results": {"ppl": 10.0, "tokens": 100}}))
    b.write_text(json.dumps({"results": {"ppl": 10.5, "tokens": 100}}))
    table = eval_quality.compare(str(a), str(b))
    assert "+5.00" in table and "ppl" in table


def test_load_test_counts_aborts_failures_and_idle_tokens(server, tmp_path, monkeypatch):
    FakeSGLang.state["fail_every"] = 7
    monkeypatch.setattr(load_test.time, "sleep", lambda s: None)
    out = tmp_path / "load.json"
    monkeypatch.setattr(sys, "argv", ["load_test", "--url", server, "--requests", "60", "--concurrency", "8",
                                      "--abort-frac", "0.25", "--json", str(out)])
    load_test.main()
    r = json.loads(out.read_text())
    assert r["ok"] + r["aborted"] + r["failed"] == 60
    assert r["failed"] > 0 and r["aborted"] > 0   # injected server errors and client aborts are both seen
    assert r["pass"] is False                     # any failure fails the run
    FakeSGLang.state.update(fail_every=0, tokens_held=5)
    load_test.main()
    r = json.loads(out.read_text())
    assert r["failed"] == 0 and r["idle_tokens_after_flush"] == 5 and r["pass"] is False  # a leak fails too
    FakeSGLang.state["tokens_held"] = 0
    load_test.main()
    assert json.loads(out.read_text())["pass"] is True


def test_load_test_leaves_partial_counts(server, tmp_path, monkeypatch):
    """Every 200 finished requests the JSON holds the counts so far: a run stopped from outside (a device
    call's time limit) still says how many requests finished and whether any failed."""
    FakeSGLang.state.update(fail_every=0, tokens_held=0)
    monkeypatch.setattr(load_test.time, "sleep", lambda s: None)
    dumps = []
    real_dump = load_test.json.dump
    monkeypatch.setattr(load_test.json, "dump", lambda obj, f, **kw: (dumps.append(dict(obj)), real_dump(obj, f, **kw)))
    out = tmp_path / "load.json"
    monkeypatch.setattr(sys, "argv", ["load_test", "--url", server, "--requests", "200", "--concurrency", "8",
                                      "--abort-frac", "0", "--json", str(out)])
    load_test.main()
    partial = [d for d in dumps if d.get("partial")]
    assert partial and partial[0]["finished"] == 200 and partial[0]["ok"] == 200 and partial[0]["failed"] == 0
    assert json.loads(out.read_text())["pass"] is True  # the final report replaces it


def test_passkey_accuracy_per_depth(server):
    hay = "The grass is green. The sky is blue. The sun is yellow. Here we go. " * 200
    res = eval_quality.passkey(server, hay, lengths=[400, 800], depths=[0.0, 0.5, 0.9], trials=2)
    by_depth = {}
    for row in res["rows"]:
        by_depth.setdefault(row["depth"], []).append(row["accuracy"])
    assert by_depth[0.5] == [1.0, 1.0] and by_depth[0.9] == [1.0, 1.0]
    assert by_depth[0.0] == [0.0, 0.0]  # the stand-in misses needles at the very start
    assert res["accuracy"] == pytest.approx(4 / 6)


def test_server_check_eval_stage(server, tmp_path, monkeypatch):
    """gpu_server_check's eval stage: one server per name (BF16 on SGLang's triton backend, the others on
    turboquant with their preset), passkey and QA through eval_quality, one eval_quality-format JSON per
    server and task that compare mode reads, accuracies and their change against BF16 in the summary."""
    import argparse

    import gpu_server_check

    started = []

    class StubServer:
        def __init__(self, name, args, env_extra=None, port=None, log_dir="."):
            started.append((name, args))
            self.url = server

        def stop(self):
            pass

    monkeypatch.setattr(gpu_server_check, "Server", StubServer)
    hay = tmp_path / "hay.txt"
    hay.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 200)
    qa = tmp_path / "qa.jsonl"
    qa.write_text("\n".join(json.dumps({"passage": f"Tom has {a} apples and {b} pears.", "question": "How many?",
                                        "answer": str(a + b)}) for a, b in [(2, 3), (4, 4)]))
    a = argparse.Namespace(servers="bf16,turbo4", heldout_text=str(hay), asdiv=str(qa), eval_qa_limit=10,
                           passkey_lengths="400,800", passkey_depths="0.0,0.5", passkey_trials=2)
    res = gpu_server_check.stage_eval(a, ["--model-path", "m"], str(tmp_path))
    assert [n for n, _ in started] == ["eval_bf16", "eval_turbo4"]
    assert started[0][1][-2:] == ["--attention-backend", "triton"]
    assert started[1][1][-4:] == ["--attention-backend", "turboquant", "--tq-config", "turbo4"]
    summ = res["summary"]
    assert summ["passkey_bf16"] == pytest.approx(0.5) and summ["qa_turbo4"] == 1.0  # the stand-in misses depth 0
    assert summ["passkey_points_vs_bf16_turbo4"] == 0.0
    table = eval_quality.compare(str(tmp_path / "eval_passkey_bf16.json"), str(tmp_path / "eval_passkey_turbo4.json"))
    assert "accuracy" in table


# --- records: ppl over spans, needle, asdiv, greedy agreement, merge --------------------------------
RECORD_KEYS = {"model", "config", "metric", "length", "mean", "spread", "spread_kind", "n", "bf16_mean", "card",
               "date", "commit", "command", "path", "detail"}
LABELS = ["--card", "H100", "--commit", "abc1234", "--command", "run it"]


def _texts(tmp_path):
    d = tmp_path / "texts"
    d.mkdir()
    (d / "a.txt").write_text("abcdefghij" * 30)   # 300 tokens in the stand-in tokenizer
    (d / "b.txt").write_text("klmnopqrst" * 12)   # 120 tokens
    return d


def _run(argv, out):
    eval_quality.main(argv + ["--json", str(out)])
    recs = json.loads(out.read_text())
    assert isinstance(recs, list) and all(set(r) == RECORD_KEYS for r in recs)
    return recs


def test_text_spans_are_disjoint_and_alternate_texts():
    a, b = "".join(chr(0x100 + i) for i in range(300)), "".join(chr(0x1000 + i) for i in range(120))
    spans = eval_quality.text_spans([a, b], 5, 50, lambda t: [ord(c) for c in t])
    assert len(spans) == 5 and all(len(s) == 50 for s in spans)
    # the first span of each text, then the second, ...; each span starts where the text's last one ended
    assert [s[0] for s in spans] == [0x100, 0x1000, 0x100 + 50, 0x1000 + 50, 0x100 + 100]
    with pytest.raises(SystemExit, match="only 8 spans"):
        eval_quality.text_spans(["abcdefghij" * 30, "klmnopqrst" * 12], 9, 50, lambda t: [ord(c) for c in t])


def test_ppl_spans_record(server, tmp_path):
    recs = _run(["ppl", "--url", server, "--text", str(_texts(tmp_path)), "--spans", "4", "--span-tokens", "40",
                 "--config", "turbo4", "--path", "extend, evaluation.prefill_from_cache"] + LABELS, tmp_path / "p.json")
    (r,) = recs
    assert r["metric"] == "ppl" and r["config"] == "turbo4" and r["model"] == "Fake-1B" and r["n"] == 4
    assert r["mean"] == pytest.approx(math.exp(-LOGPROB)) and r["spread"] == pytest.approx(0.0)
    assert r["spread_kind"] == "std over spans" and r["detail"]["tokens"] == 4 * 39
    assert r["path"] == "extend, evaluation.prefill_from_cache" and r["card"] == "H100" and r["commit"] == "abc1234"


def test_ppl_spans_with_bos_score_every_span_token(server, tmp_path):
    """--bos: the tokenizer's BOS goes in front of each span as context, so all span tokens are scored."""
    (r,) = _run(["ppl", "--url", server, "--text", str(_texts(tmp_path)), "--spans", "4", "--span-tokens", "40",
                 "--bos", "--config", "bf16"] + LABELS, tmp_path / "p.json")
    assert r["detail"]["tokens"] == 4 * 40 and r["detail"]["bos"] is True


def test_span_perplexity_mean_and_std(monkeypatch):
    lps = {1: -1.0, 2: -2.0, 3: -3.0}  # each span's tokens all get the log-probability of its first id
    monkeypatch.setattr(eval_quality, "_post", lambda url, path, p: {
        "meta_info": {"input_token_logprobs": [[None]] + [[lps[p["input_ids"][0]]]] * (len(p["input_ids"]) - 1)}})
    res = eval_quality.span_perplexity("u", [[1] * 10, [2] * 10, [3] * 10])
    per = [math.exp(1), math.exp(2), math.exp(3)]
    assert res["ppl"] == pytest.approx(sum(per) / 3) and res["min"] == pytest.approx(per[0])
    assert res["std"] == pytest.approx(__import__("statistics").stdev(per))
    assert res["pooled"] == pytest.approx(math.exp(2))


def test_needle_records_per_length(server, tmp_path):
    hay = tmp_path / "hay.txt"
    hay.write_text("The grass is green. The sky is blue. The sun is yellow. Here we go. " * 200)
    recs = _run(["needle", "--url", server, "--haystack", str(hay), "--lengths", "400,800", "--depths", "0.0,0.5",
                 "--trials", "3", "--margin", "64", "--config", "bf16"] + LABELS, tmp_path / "n.json")
    assert [(r["length"], r["n"]) for r in recs] == [(400, 6), (800, 6)]
    for r in recs:  # the stand-in misses needles at the very start
        assert r["mean"] == pytest.approx(0.5) and r["detail"]["by_depth"] == {"0.0": 0.0, "0.5": 1.0}
        assert r["spread"] == pytest.approx(math.sqrt(0.25 / 6)) and r["path"] == "decode"


def test_asdiv_record(server, tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text("\n".join(json.dumps({"passage": f"Tom has {a} apples and {b} pears.", "question": "How many?",
                                          "answer": str(a + b)}) for a, b in [(2, 3), (4, 4), (1, 0)]))
    (r,) = _run(["asdiv", "--url", server, "--data", str(data), "--config", "fp8"] + LABELS, tmp_path / "q.json")
    assert r["metric"] == "asdiv" and r["mean"] == 1.0 and r["n"] == 3 and r["spread"] == 0.0


def test_greedy_reference_and_compare(server, tmp_path):
    texts = str(_texts(tmp_path))
    common = ["--url", server, "--text", texts, "--prompts", "6", "--prompt-tokens", "20", "--tokens", "16"] + LABELS
    ref = tmp_path / "ref.json"
    eval_quality.main(["greedy", *common, "--config", "bf16", "--save", str(ref)])
    assert len(json.loads(ref.read_text())["outputs"]) == 6
    FakeSGLang.state["perturb_at"] = 5
    run = tmp_path / "run.json"
    (r,) = _run(["greedy", *common, "--config", "turbo3", "--save", str(run), "--reference", str(ref)],
                tmp_path / "g1.json")
    firsts = [p[0] for p in json.loads(ref.read_text())["prompts"]]
    want = [5 if f % 2 == 0 else 16 for f in firsts]
    assert r["metric"] == "greedy_prefix" and r["n"] == 6 and r["mean"] == pytest.approx(sum(want) / 6)
    assert r["detail"]["identical"] == want.count(16)
    bos = tmp_path / "bos.json"
    eval_quality.main(["greedy", *common, "--config", "bf16", "--bos", "--save", str(bos)])
    assert [p[0] for p in json.loads(bos.read_text())["prompts"]] == [1] * 6
    assert [p[1:] for p in json.loads(bos.read_text())["prompts"]] == json.loads(ref.read_text())["prompts"]
    eval_quality.main(["greedy-compare", str(ref), str(run), "--json", str(tmp_path / "g2.json")])
    (c,) = json.loads((tmp_path / "g2.json").read_text())
    assert c["mean"] == r["mean"] and c["config"] == "turbo3" and c["spread_kind"] == "std over prompts"


def test_merge_fills_bf16_mean_and_replaces(tmp_path):
    def rec(config, metric, mean, length=None, n=10):
        return {"model": "M", "config": config, "metric": metric, "length": length, "mean": mean, "spread": 0.0,
                "spread_kind": "x", "n": n, "bf16_mean": None, "card": "H100", "date": "2026-01-01",
                "commit": "c", "command": "", "path": "decode", "detail": {}}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([rec("bf16", "ppl", 7.0), rec("bf16", "needle", 0.9, 4096)]))
    b.write_text(json.dumps([rec("turbo4", "ppl", 7.2), rec("turbo4", "needle", 0.8, 4096),
                             rec("turbo4", "needle", 0.5, 8192)]))
    out = tmp_path / "quality.json"
    out.write_text(json.dumps([rec("turbo4", "ppl", 99.0), rec("other", "ppl", 1.0)]))
    recs = eval_quality.merge([str(a), str(b)], "bf16", str(out))
    got = {(r["config"], r["metric"], r["length"]): r["bf16_mean"] for r in recs}
    assert got[("turbo4", "ppl", None)] == 7.0 and got[("turbo4", "needle", 4096)] == 0.9
    assert got[("turbo4", "needle", 8192)] is None  # no BF16 record of that length
    saved = json.loads(out.read_text())
    assert [r["mean"] for r in saved if r["config"] == "turbo4" and r["metric"] == "ppl"] == [7.2]  # replaced
    assert any(r["config"] == "other" for r in saved) and len(saved) == 6
    with pytest.raises(SystemExit, match="baseline config 'fp8'.*configs found"):
        eval_quality.merge([str(b)], "fp8")
    assert "+2.86" in eval_quality.compare(str(a), str(b))  # compare reads record lists: ppl 7.0 -> 7.2
