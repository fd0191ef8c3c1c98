"""scripts/bench_serving.py on the CPU: statistics on made-up token timestamps, and whole runs against a
stand-in SGLang server process (tests/fake_sglang_server.py) that streams token ids on 127.0.0.1."""
import json
import shutil
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import bench_serving as bs  # noqa: E402
import make_tables as mt  # noqa: E402

FAKE = [sys.executable, str(Path(__file__).resolve().parent / "fake_sglang_server.py")]


def stream(sent, times, n=1, done=True, ids=()):
    s = bs.Stream()
    s.sent, s.chunks, s.done, s.output_ids = sent, [(t, n) for t in times], done, list(ids)
    return s


def test_percentile_interpolates():
    assert bs.percentile([], 50) is None
    assert bs.percentile([3.0], 99) == 3.0
    assert bs.percentile([1, 2, 3, 4], 50) == 2.5
    assert bs.percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert bs.percentile([10, 0, 5], 100) == 10 and bs.percentile([10, 0, 5], 0) == 0


def test_latency_stats_ttft_tpot_itl():
    a = stream(0.0, [0.5, 0.6, 0.7, 0.8])      # TTFT 500 ms, TPOT 100 ms
    b = stream(0.0, [1.0, 1.2, 1.4], n=2)      # chunks of 2 tokens: TPOT 0.4 s / 4 tokens = 100 ms
    st = bs.latency_stats([a, b])
    assert st["ttft_p50_ms"] == pytest.approx(750.0) and st["tpot_p50_ms"] == pytest.approx(100.0)
    assert st["itl_p50_ms"] == pytest.approx(100.0) and st["itl_p99_ms"] == pytest.approx(200.0, rel=0.02)
    whole = bs.whole_run_stats([a, b], 0.0)
    assert whole["output_tokens"] == 10 and whole["output_tok_s"] == pytest.approx(10 / 1.4, rel=1e-3)


def test_steady_state_window():
    """Tokens count only inside [t0 + warmup, + window]; the server is full once 95 % of the peak number
    of streaming requests stream; a window that opens before that says so."""
    t0 = 100.0
    streams = [stream(t0, [t0 + 1 + i * 0.1 for i in range(200)]) for _ in range(3)]   # 1 s .. 20.9 s
    streams.append(stream(t0, [t0 + 8 + i * 0.1 for i in range(100)]))                  # joins at 8 s
    w = bs.window_stats(streams, t0, warmup_s=10.0, window_s=5.0)
    # in [110, 115]: 51 ticks of each of the 4 requests
    assert w["window_tokens"] == 4 * 51 and w["output_tok_s"] == pytest.approx(4 * 51 / 5.0)
    assert w["full_at_s"] == pytest.approx(8.0) and w["window_after_full"] and w["streaming_in_window"] == 4
    early = bs.window_stats(streams, t0, warmup_s=5.0, window_s=5.0)
    assert early["full_at_s"] == pytest.approx(8.0) and not early["window_after_full"]
    cut = bs.window_stats(streams, t0, warmup_s=18.0, window_s=10.0)   # no token after 28 s: incomplete
    assert cut["output_tok_s"] is None and not cut["window_complete"]


def test_server_log_stats_slice(tmp_path):
    log = tmp_path / "server.log"
    first = ("Decode batch, #running-req: 99, #token: 5, cuda graph: True, gen throughput (token/s): 1.0, "
             "#queue-req: 7\n")
    log.write_text(first +
                   "Prefill batch, #new-seq: 8, #new-token: 8192, input throughput (token/s): 5000.0\n"
                   "Decode batch, #running-req: 40, cuda graph: True, gen throughput (token/s): 1500.0, #queue-req: 3\n"
                   "KV cache pool is full. Retract requests. #retracted_reqs: 2, #new_tokens_gained: 10\n"
                   "Decode batch, #running-req: 38, cuda graph: False, gen throughput (token/s): 1300.0, #queue-req: 5\n"
                   "KV cache pool is full. Retract requests. #retracted_reqs: 1, #new_tokens_gained: 4\n")
    st = bs.server_log_stats(str(log), start=len(first))  # the earlier run's line is not this run's
    assert st == {"peak_running_requests": 40, "peak_queued_requests": 5, "retractions": 3,
                  "decode_batches_cuda_graph": 1, "decode_batches_eager": 1, "median_gen_throughput": 1400.0,
                  "median_input_throughput": 5000.0}


def test_configs_and_fairness_by_construction():
    assert bs.config_spec("fp8_fa3") == {"config": "fp8_fa3", "backend": "fa3", "kv_dtype": "fp8_e4m3",
                                         "args": ["--attention-backend", "fa3", "--kv-cache-dtype", "fp8_e4m3"]}
    tq = bs.config_spec("configs/turbo3.yaml")
    assert tq["config"] == "turbo3" and tq["args"][-1] == "configs/turbo3.yaml"
    with pytest.raises(bs.BenchError, match="not one of"):
        bs.config_spec("fa3 --disable-radix-cache")
    common = bs.common_args("m", True, 0.8, 8192, 64, 4096)
    cmds = bs.server_commands(common, [bs.config_spec("turbo4"), bs.config_spec("bf16_triton")])
    assert all(c[:len(common)] == common for c in cmds)
    with pytest.raises(bs.BenchError, match="may not set"):
        bs.server_commands(common + ["--attention-backend", "fa3"], [bs.config_spec("turbo4")])
    with pytest.raises(bs.BenchError, match="must set"):
        bs.server_commands(["--model-path", "m"], [bs.config_spec("turbo4")])
    sneaky = dict(bs.config_spec("bf16_triton"), args=["--attention-backend", "triton", "--disable-cuda-graph", "1"])
    with pytest.raises(bs.BenchError, match="set more than"):
        bs.server_commands(common, [sneaky])
    info = {"mem_fraction_static": 0.8, "chunked_prefill_size": 8192, "cuda_graph_max_bs": 64,
            "disable_cuda_graph": False, "disable_radix_cache": False}
    bs.check_same_settings(info, dict(info, page_size=16), "x")  # other keys may differ
    with pytest.raises(bs.BenchError, match="chunked_prefill_size"):
        bs.check_same_settings(info, dict(info, chunked_prefill_size=4096), "x")


def test_client_talks_to_loopback_only():
    assert bs.local_address("http://127.0.0.1:30000") == ("127.0.0.1", 30000)
    for url in ("http://10.0.0.5:30000", "http://localhost.example:30000", "https://127.0.0.1:1"):
        with pytest.raises(bs.BenchError, match="only to"):
            bs.local_address(url)


def test_one_server_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(bs.Server, "alive", [type("S", (), {"name": "other"})()])
    with pytest.raises(bs.BenchError, match="other is still running"):
        bs.Server("x", ["--attention-backend", "triton"], free_port(), str(tmp_path))


def test_plan_passes_and_best_under_tpot():
    specs = [bs.config_spec(c) for c in ("turbo4", "bf16_fa3", "fp8_fa3", "fp8_flashinfer", "bf16_triton")]
    p1 = {("a", "fp8_fa3"): 10.0, ("a", "fp8_flashinfer"): 12.0, ("b", "fp8_fa3"): None, ("b", "fp8_flashinfer"): 3.0}
    (again,) = bs.plan_passes(specs, 2, p1)
    assert [s["config"] for s in again] == ["turbo4", "bf16_fa3", "fp8_flashinfer"]
    assert bs.plan_passes(specs, 1, p1) == []
    recs = [{"config": "x", "clients": c, "output_tok_s": t, "tpot_p99_ms": p}
            for c, t, p in ((32, 100.0, 20.0), (64, 180.0, 45.0), (128, 250.0, 70.0))]
    assert bs.best_under_tpot(recs)["x"]["clients"] == 64


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SMALL = ["--a", "64:16:4", "--a-requests", "6", "--b", "50:1000:12", "--b-warmup-s", "0.6", "--b-window-s", "1.0",
         "--c", "40:3:3:8:6", "--d", "32:8:2", "--d-requests", "4", "--sweep-clients", "2,12",
         "--sweep-warmup-s", "0.3", "--sweep-window-s", "0.5", "--commit", "abc1234", "--mem-fraction", "0.8",
         "--chunked-prefill", "8192", "--cuda-graph-max-bs", "64"]


@pytest.fixture
def fake_run(tmp_path, monkeypatch):
    events = tmp_path / "events.txt"
    monkeypatch.setenv("FAKE_SGLANG_EVENTS", str(events))
    monkeypatch.setattr(bs, "LAUNCH", {"turboquant": FAKE, None: FAKE})
    monkeypatch.setattr(bs, "card_info", lambda: ("Fake GPU (GPU 0 of 1)", "GPU-fake"))
    monkeypatch.setattr(bs.Server, "alive", [])

    def run(configs, workloads, reps=2, extra=()):
        out = tmp_path / "out"
        argv = ["--configs", configs, "--workloads", workloads, "--reps", str(reps), "--port", str(free_port()),
                "--out", str(out), *SMALL, *extra]
        assert bs.main(argv) == 0
        recs = json.loads((out / "serving_records.json").read_text())
        spans = [ln.split() for ln in events.read_text().splitlines()]
        return recs, spans, out
    return run


def no_overlap(spans):
    """start/stop events alternate: every server stopped before the next one started."""
    kinds = [s[0] for s in spans]
    assert kinds == ["start", "stop"] * (len(kinds) // 2), kinds
    assert all(spans[i][1] == spans[i + 1][1] for i in range(0, len(spans), 2))  # same pid
    times = [float(s[2]) for s in spans]
    assert times == sorted(times)


def test_full_run_against_stand_in_servers(fake_run, monkeypatch, tmp_path):
    """Four configs, every workload: servers one after another; fa3 fails to start and is recorded as
    skipped with the reason; turbo4, the fastest FP8 run twice, the rest once; records fit make_tables'
    schema; the larger pool gives more steady-state tok/s; chat turns reuse their history."""
    monkeypatch.setenv("FAKE_SGLANG_FAIL", "fa3")
    recs, spans, out = fake_run("turbo4,bf16_fa3,fp8_flashinfer,bf16_triton", "a,b,c,d,sweep")
    no_overlap(spans)
    assert len(spans) == 2 * (4 + 2)  # pass 1: 4 starts (fa3 exits at once); pass 2: turbo4, fp8_flashinfer
    by = {(r["workload"], r["clients"], r["config"]): r for r in recs}
    assert len(recs) == 6 * 4  # a, b, c, d, two sweep points x 4 configs
    for (w, c, cfg), r in by.items():
        if cfg == "bf16_fa3":
            assert r["output_tok_s"] is None and r["reps"] == 0 and "Can not import FA3" in r["skipped"]
        else:
            assert r["output_tok_s"] > 0 and r["reps"] == (1 if cfg == "bf16_triton" else 2), (w, cfg, r)
            assert r["card"] == "Fake GPU (GPU 0 of 1)" and r["commit"] == "abc1234"
            assert r["server_settings"]["chunked_prefill_size"] == 8192
    b_tq, b_bf = by[("b", 12, "turbo4")], by[("b", 12, "bf16_triton")]
    assert b_tq["max_total_num_tokens"] == 14000 and b_bf["max_total_num_tokens"] == 4000
    assert b_tq["output_tok_s"] > 1.5 * b_bf["output_tok_s"]
    assert b_bf["retractions"] > 0 and b_bf["peak_running_requests"] == 4000 // 1050  # the pool holds 3
    assert all(run["window_after_full"] for run in b_tq["runs"]), b_tq["runs"]
    c = by[("c", 3, "turbo4")]
    assert c["turns"] == 3 and c["shared_tokens"] == 40 and c["runs"][0]["requests"] == 9
    assert all(r["runs"][0].get("errors") == [] for k, r in by.items() if k[2] != "bf16_fa3")
    # the records are what make_tables renders
    res = tmp_path / "results"
    shutil.copytree(ROOT / "results", res)
    bs.merge(str(res / "serving.json"), recs)
    data = mt.load(res)
    text = "\n".join(mt.serving_section(data["serving"]))
    assert "did not start" in text and "Fake GPU (GPU 0 of 1)" in text


def test_settings_mismatch_skips_config(fake_run, monkeypatch):
    """A server that runs with another chunked-prefill size than the first one is not timed."""
    monkeypatch.setenv("FAKE_SGLANG_CHUNK_OVERRIDE", "triton")
    recs, spans, _ = fake_run("turbo4,bf16_triton", "d", reps=1)
    no_overlap(spans)
    tri = next(r for r in recs if r["config"] == "bf16_triton")
    assert tri["output_tok_s"] is None and "chunked_prefill_size" in tri["skipped"]
    assert next(r for r in recs if r["config"] == "turbo4")["output_tok_s"] > 0


def test_merge_replaces_same_point_and_keeps_others(tmp_path):
    def rec(config, tps, commit="c1"):
        return dict(workload="d", config=config, backend="x", kv_dtype="bf16", clients=8, isl=1024, osl=256,
                    output_tok_s=tps, spread=None, reps=1, ttft_p50_ms=1.0, tpot_p99_ms=2.0,
                    max_total_num_tokens=10, card="H (GPU 0 of 1)", date="2026-12-07", commit=commit, command="x")
    path = tmp_path / "serving.json"
    path.write_text(json.dumps([rec("turbo4", 1.0), rec("turbo4", 5.0, commit="old")]))
    out = bs.merge(str(path), [rec("turbo4", 2.0), rec("bf16_fa3", 3.0)])
    assert sorted((r["config"], r["commit"], r["output_tok_s"]) for r in out) == [
        ("bf16_fa3", "c1", 3.0), ("turbo4", "c1", 2.0), ("turbo4", "old", 5.0)]
    with pytest.raises(bs.BenchError, match="missing key"):
        bs.merge(str(path), [{"workload": "d"}])
    # --merge --from: records of earlier runs, no server
    f = tmp_path / "recs.json"
    f.write_text(json.dumps([rec("fp8_fa3", 4.0)]))
    assert bs.main(["--merge", str(path), "--from", str(f)]) == 0
    assert len(json.loads(path.read_text())) == 4
    assert bs.main(["--from", str(f)]) == 2  # --from alone is an error


def test_merge_joins_repetitions_of_one_run(tmp_path):
    """One run split over two commands on one card: the repetitions join (median and spread over all),
    merging the same file again adds nothing, and a config that started later loses its skip note."""
    meta = {"card": "H (GPU 0 of 1)", "gpu_uuid": "GPU-a", "date": "2026-12-07", "commit": "c1",
            "max_total_num_tokens": {"turbo4": 99}}
    point = {"workload": "b", "clients": 256, "isl": 2048, "osl": 8192}
    spec = bs.config_spec("turbo4")
    first = bs.record(point, spec, [{"output_tok_s": 100.0, "tpot_p99_ms": 40.0, "run_id": "r1"}],
                      dict(meta, command="first command"))
    second = bs.record(point, spec, [{"output_tok_s": 130.0, "tpot_p99_ms": 30.0, "run_id": "r2"},
                                     {"output_tok_s": 110.0, "tpot_p99_ms": 35.0, "run_id": "r3"}],
                       dict(meta, command="second command"))
    path = tmp_path / "serving.json"
    bs.merge(str(path), [first])
    bs.merge(str(path), [second])
    (r,) = bs.merge(str(path), [second])
    assert r["reps"] == 3 and r["output_tok_s"] == 110.0 and r["spread"] == 30.0 and r["tpot_p99_ms"] == 35.0
    assert r["command"] == "first command; second command" and r["max_total_num_tokens"] == 99
    other_card = bs.record(point, spec, [{"output_tok_s": 1.0, "run_id": "r4"}], dict(meta, gpu_uuid="GPU-b",
                                                                                       command="x"))
    assert len(bs.merge(str(path), [other_card])) == 2
    skipped = bs.record(dict(point, clients=8), bs.config_spec("bf16_fa3"), [], dict(meta, command="x"),
                        skipped="did not start")
    bs.merge(str(path), [skipped])
    ran = bs.record(dict(point, clients=8), bs.config_spec("bf16_fa3"), [{"output_tok_s": 5.0, "run_id": "r5"}],
                    dict(meta, command="y"))
    rec = [x for x in bs.merge(str(path), [ran]) if x["config"] == "bf16_fa3"][0]
    assert rec["reps"] == 1 and "skipped" not in rec


def test_bad_flags_are_named(capsys, tmp_path):
    assert bs.main(["--workloads", "a,e", "--commit", "x", "--out", str(tmp_path)]) == 2
    assert "unknown ['e']" in capsys.readouterr().err
