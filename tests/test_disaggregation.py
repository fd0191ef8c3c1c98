"""PD disaggregation (sglang_tq.disaggregation), CPU: the buffers SGLang's transfer backends register for
every pool layout, a transfer done with those descriptors alone (as Mooncake's send_kvcache addresses
pages: ptr + index * item_len), the decode worker's recent window after a transfer, the config
fingerprint and the refusals of mismatched and mixed set-ups, the bootstrap route, and start-up checks."""
import ctypes
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, server_args  # noqa: E402
from sglang_fakes import tq_backend, write_tq_config  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang_tq import disaggregation as dg  # noqa: E402
from sglang_tq import pool as pool_mod  # noqa: E402
from sglang_tq.compat import TQUnsupportedError, _problems_server_args  # noqa: E402
from sglang_tq.config import load_config  # noqa: E402
from sglang_tq.pool import TQTokenToKVPool  # noqa: E402

HQ, HKV, D, NL = 4, 2, 64, 4
ALL_Q = "name: all-q\nboundary: {first: 0, last: 0}\n"
BOUNDARY = "name: bnd\nboundary: {first: 1, last: 1}\n"
MIXED = ("name: mixed\nseed: 5\nboundary: {first: 1, last: 0}\noverrides:\n"
         "  - {layers: 2, k: {bits: 3, qjl: true}, v: {bits: 2}}\n"
         "  - {layers: 3, k: {bits: 3, outliers: {channels: 16, bits: 4}}}\n")
WINDOW = """
name: win
defaults: {k: {bits: 3}, v: {bits: 2}}
boundary: {first: 1, last: 0}
window: {tokens: 4, requests: 2}
"""


def _pool(tmp_path, text, name="tq.yaml", tokens=64, start_layer=0, num_layers=None, backend="turboquant"):
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, text, name)):
        runner = FakeRunner(FakeModelConfig(NL, HQ, HKV, D, context_len=64), server_args(attention_backend=backend),
                            start_layer=start_layer, num_layers=num_layers)
        pool = runner.build_pools(tokens, max_running_requests=4)
        return runner, pool


def _row_bytes(fmt):
    return HKV * fmt.code_bytes, HKV * fmt.n_scales * 2


# --------------------------------------------------------------------------------------------
# Descriptors
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", [ALL_Q, BOUNDARY, MIXED], ids=["all-quantized", "bf16-boundary", "mixed-bits"])
def test_descriptors_follow_the_layer_formats(tmp_path, text):
    _, pool = _pool(tmp_path, text)
    plan = pool.plan
    layout = dg.transfer_layout(pool)
    want = []
    for role in ("k", "v"):
        for lp in plan.layers:
            if lp.quantized:
                codes, scales = _row_bytes(lp.k if role == "k" else lp.v)
                want += [(lp.layer_id, role, "codes", codes), (lp.layer_id, role, "scales", scales)]
            else:
                want.append((lp.layer_id, role, "bf16", HKV * D * 2))
    assert [(d.layer, d.role, d.part, d.item_len) for d in layout] == want
    # K side then V side of equal length: SGLang's len(ptrs) // 2 split pairs each K tensor with its V twin
    half = len(layout) // 2
    assert [(d.layer, d.part) for d in layout[:half]] == [(d.layer, d.part) for d in layout[half:]]
    rows = pool.size + pool.page_size
    assert all(d.nbytes == d.item_len * rows for d in layout)
    assert len({d.ptr for d in layout}) == len(layout)
    assert dg.transfer_bytes_per_token(pool) == pool.bytes_per_token() == plan.bytes_per_token(HKV)


def test_mixed_bits_item_lengths_differ_per_layer(tmp_path):
    _, pool = _pool(tmp_path, MIXED)
    codes = {(d.layer, d.role): d.item_len for d in dg.transfer_layout(pool) if d.part == "codes"}
    assert codes[(1, "k")] == HKV * D // 2 and codes[(1, "v")] == HKV * D // 2   # 4-bit
    assert codes[(2, "v")] == HKV * D // 4                                        # 2-bit
    assert codes[(2, "k")] != codes[(1, "k")] and codes[(3, "k")] != codes[(2, "k")]
    assert not any(d.layer == 0 and d.part != "bf16" for d in dg.transfer_layout(pool))


def test_pipeline_stage_descriptors_carry_global_layer_ids(tmp_path):
    _, full = _pool(tmp_path, MIXED)
    _, stage = _pool(tmp_path, MIXED, start_layer=2, num_layers=2)
    got = [(d.layer, d.role, d.part, d.item_len) for d in dg.transfer_layout(stage)]
    assert [x for x in got if x[0] == 2] and {x[0] for x in got} == {2, 3}
    assert got == [(d.layer, d.role, d.part, d.item_len) for d in dg.transfer_layout(full) if d.layer >= 2]


def _means_file(tmp_path, heads, seed=0):
    from safetensors.torch import save_file

    t = torch.randn(NL, heads, D, generator=torch.Generator().manual_seed(seed))
    path = tmp_path / f"means{seed}.safetensors"
    save_file({"key_means": t.contiguous()}, str(path))
    return t, path


def test_key_means_change_the_fingerprint_not_the_descriptors(tmp_path):
    _, path = _means_file(tmp_path, HKV)
    _, plain = _pool(tmp_path, BOUNDARY, "a.yaml")
    _, centered = _pool(tmp_path, BOUNDARY + f"key_means: {path}\n", "b.yaml")
    assert ([(d.layer, d.part, d.item_len) for d in dg.transfer_layout(plain)]
            == [(d.layer, d.part, d.item_len) for d in dg.transfer_layout(centered)])
    a, b = dg.config_fingerprint(plain), dg.config_fingerprint(centered)
    assert a["fields"]["key_means"] is None and b["fields"]["key_means"] is not None
    with pytest.raises(dg.TQDisaggregationError, match="key_means"):
        dg.check_peer(a, b, "p:8998")


def test_tp_rank_slices(tmp_path, monkeypatch):
    """Two attention-TP ranks of a 2-KV-head model: one head each; the item lengths are one head's bytes,
    and each rank's fingerprint carries its own slice of the key means (decode rank r pairs with prefill
    rank r, so equal ranks agree and different ranks do not)."""
    t, path = _means_file(tmp_path, 2)
    plan = load_config(str(write_tq_config(tmp_path, BOUNDARY + f"key_means: {path}\n"))).resolve(NL, D, num_kv_heads=2)
    fps, layouts = [], []
    for rank in (0, 1):
        monkeypatch.setattr(pool_mod, "_attention_tp_rank_size", lambda r=rank: (r, 2))
        p = TQTokenToKVPool(32, 1, torch.bfloat16, 1, D, NL, "cpu", False, plan=plan)
        torch.testing.assert_close(p.key_mean(1), t[1, rank:rank + 1])
        layouts.append([(d.layer, d.part, d.item_len) for d in dg.transfer_layout(p)])
        fps.append(dg.config_fingerprint(p))
    k = plan.layers[1].k
    assert (1, "codes", k.code_bytes) in layouts[0] and (0, "bf16", D * 2) in layouts[0]
    assert layouts[0] == layouts[1]
    assert fps[0]["fields"]["kv_heads"] == 1
    assert fps[0]["digest"] != fps[1]["digest"]
    dg.check_peer(fps[0], dict(fps[0]), "p:8998")
    with pytest.raises(dg.TQDisaggregationError, match="key_means"):
        dg.check_peer(fps[0], fps[1], "p:8998")


# --------------------------------------------------------------------------------------------
# A transfer by the descriptors, then decode on the other pool
# --------------------------------------------------------------------------------------------
def _send_pages(src_pool, dst_pool, src_idx, dst_idx):
    """What Mooncake's send_kvcache does for equal TP: per registered buffer, item_len bytes from
    src_ptr + i * item_len to dst_ptr + j * item_len (page size 1: page = slot)."""
    sp, _, si = src_pool.get_contiguous_buf_infos()
    dp, _, di = dst_pool.get_contiguous_buf_infos()
    assert si == di
    for s_ptr, d_ptr, item in zip(sp, dp, si):
        for i, j in zip(src_idx, dst_idx):
            ctypes.memmove(d_ptr + j * item, s_ptr + i * item, item)


def _attend(q, k, v):
    s = torch.einsum("hd,lhd->hl", q.float(), k.float().repeat_interleave(HQ // HKV, 1)) * D ** -0.5
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v.float().repeat_interleave(HQ // HKV, 1))


def _run(runner, backend, fb, layers, gen, n):
    out = {}
    for layer in layers:
        q, k, v = (torch.randn(n, h * D, generator=gen).to(torch.bfloat16) for h in (HQ, HKV, HKV))
        out[layer.layer_id] = (q, k, v, layer(q, k, v, fb))
    return out


def test_transfer_by_descriptors_then_decode(tmp_path):
    """Prefill pool (window on) stores a 9-token prompt; the bytes move by the descriptors to other slots of
    a decode pool whose request slot 0 last held another request (stale ring rows, window_start 0). After
    restart_window, decode reads the 9 transferred positions from the codes and the new one exactly; without
    it the stale ring rows would be read."""
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(NL)]
    gen = torch.Generator().manual_seed(0)
    pr, ppool = _pool(tmp_path, WINDOW, "p.yaml")
    dr, dpool = _pool(tmp_path, WINDOW, "d.yaml")
    assert dg.config_fingerprint(ppool) == dg.config_fingerprint(dpool)
    pb, db = tq_backend(pr), tq_backend(dr)

    P = 9
    src = pr.token_to_kv_pool_allocator.alloc(P)
    pr.req_to_token_pool.req_to_token[0, :P] = src.to(torch.int32)
    fb = extend_batch(pr, [0], [0], [P], src, pb)
    pb.init_forward_metadata(fb)
    _run(pr, pb, fb, layers, gen, P)

    # decode side: request slot 0 first held another request (its extend set window_start and the ring)
    stale = dr.token_to_kv_pool_allocator.alloc(6)
    dr.req_to_token_pool.req_to_token[0, :6] = stale.to(torch.int32)
    fb = extend_batch(dr, [0], [0], [6], stale, db)
    db.init_forward_metadata(fb)
    _run(dr, db, fb, layers, gen, 6)
    assert dpool.window_start[0].item() == 0

    dst = dr.token_to_kv_pool_allocator.alloc(P)
    assert (dst != src).all()  # other slots than on the prefill side
    _send_pages(ppool, dpool, src.tolist(), dst.tolist())
    for lid in range(NL):
        for a, b in zip(ppool._layer_tensors(lid, "k") + ppool._layer_tensors(lid, "v"),
                        dpool._layer_tensors(lid, "k") + dpool._layer_tensors(lid, "v")):
            assert torch.equal(a[src], b[dst])

    def decode(restart):
        if restart:
            dg.restart_window(dpool, torch.tensor([0]), torch.tensor([P]))
        else:
            dpool.window_start[0] = 0
        r2t = dr.req_to_token_pool.req_to_token
        r2t[0, :P] = dst.to(torch.int32)
        new = dr.token_to_kv_pool_allocator.alloc(1)
        r2t[0, P] = new.to(torch.int32)
        fb = decode_batch(dr, [0], [P + 1], new, db)
        db.init_forward_metadata(fb)
        res = _run(dr, db, fb, layers, torch.Generator().manual_seed(7), 1)
        errs = []
        for lid, (q, k, v, o) in res.items():
            if not dpool.is_quantized(lid):
                continue
            kb, vb = dpool.get_kv_buffer(lid)
            loc = r2t[0, :P + 1].long()
            kk = kb.codec.decode(kb.codes[loc], kb.scales[loc])
            vv = vb.codec.decode(vb.codes[loc], vb.scales[loc])
            kk[P], vv[P] = k.view(HKV, D), v.view(HKV, D)
            errs.append((o.view(HQ, D).float() - _attend(q.view(HQ, D), kk, vv)).abs().max().item())
        return max(errs)

    assert decode(restart=False) > 0.05  # stale ring rows of the slot's previous request
    assert dpool.window_start[0].item() == 0
    assert decode(restart=True) < 2e-2
    assert dpool.window_start[0].item() == P


def test_restart_window_only_touches_ring_slots(tmp_path):
    _, pool = _pool(tmp_path, WINDOW)
    pool.window_start.fill_(3)
    dg.restart_window(pool, torch.tensor([1, 5]), torch.tensor([11, 12]))
    assert pool.window_start.tolist() == [3, 11, 12]  # slot 5 is outside the ring: row R takes it
    _, plain = _pool(tmp_path, BOUNDARY, "plain.yaml")
    before = plain.window_start.clone()
    dg.restart_window(plain, torch.tensor([0]), torch.tensor([4]))  # no window: nothing to do
    assert plain.window_start.numel() == 1 and torch.equal(plain.window_start, before)


def test_prebuilt_hook_restarts_the_window_and_clears_first_rows(tmp_path):
    """Transferred requests start their window at their length, and their position-0 slots lose any first-token
    flag a previous use of the slot left (the prefill worker's exact rows do not travel)."""
    _, pool = _pool(tmp_path, WINDOW)
    ran = []

    class Mixin:
        def prepare_for_prebuilt(self):
            ran.append(1)
            self.req_pool_indices, self.seq_lens = torch.tensor([0, 1]), torch.tensor([7, 9])

    dg.install_prebuilt(SimpleNamespace(ScheduleBatchDisaggregationDecodeMixin=Mixin))
    batch = Mixin()
    batch.token_to_kv_pool_allocator = SimpleNamespace(get_kvcache=lambda: pool)
    req_to_token = torch.zeros(4, 16, dtype=torch.int32)
    req_to_token[0, :2], req_to_token[1, :2], req_to_token[2, 0] = torch.tensor([5, 6]), torch.tensor([8, 9]), 11
    batch.req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)
    assert pool.first_token
    pool.first_flags[[5, 6, 8, 11]] = 1  # stale flags of the slots' earlier requests
    batch.prepare_for_prebuilt()
    assert ran == [1] and pool.window_start[:2].tolist() == [7, 9]
    assert pool.first_flags[[5, 8]].tolist() == [0, 0]  # the transferred requests' first slots
    assert pool.first_flags[[6, 11]].tolist() == [1, 1]  # another position's slot, another request's


# --------------------------------------------------------------------------------------------
# Agreement between the workers
# --------------------------------------------------------------------------------------------
def test_fingerprint_mismatch_names_the_difference(tmp_path):
    _, a = _pool(tmp_path, MIXED, "a.yaml")
    _, b = _pool(tmp_path, MIXED.replace("v: {bits: 2}", "v: {bits: 3}"), "b.yaml")
    _, c = _pool(tmp_path, MIXED.replace("seed: 5", "seed: 6"), "c.yaml")
    fa, fb_, fc = (dg.config_fingerprint(p) for p in (a, b, c))
    dg.check_peer(fa, dg.config_fingerprint(a), "p:8998")
    with pytest.raises(dg.TQDisaggregationError, match=r"p:8998.*layer 2: prefill .*decode") as e:
        dg.check_peer(fa, fb_, "p:8998")
    assert "item_lens" in str(e.value) and "same SGLANG_TQ_CONFIG" in str(e.value)
    with pytest.raises(dg.TQDisaggregationError, match="seed: prefill 6, decode 5"):
        dg.check_peer(fa, fc, "p:8998")
    assert isinstance(e.value, TQUnsupportedError)


def test_mixed_set_ups_are_refused(tmp_path):
    _, tq = _pool(tmp_path, BOUNDARY)
    bf16 = MHATokenToKVPool(16, 1, torch.bfloat16, HKV, D, NL, "cpu", False, 0, NL - 1)
    t, b = dg.config_fingerprint(tq), dg.config_fingerprint(bf16)
    assert b == {"turboquant": False, "pool": "MHATokenToKVPool", "dtype": "torch.bfloat16"}
    with pytest.raises(dg.TQDisaggregationError, match=r"BF16 prefill -> TurboQuant decode"):
        dg.check_peer(t, b, "p:8998")
    with pytest.raises(dg.TQDisaggregationError, match=r"TurboQuant prefill -> BF16 decode"):
        dg.check_peer(b, t, "p:8998")
    with pytest.raises(dg.TQDisaggregationError, match="without sglang_tq"):
        dg.check_peer(t, None, "p:8998")
    dg.check_peer(b, None, "p:8998")  # neither side TurboQuant: not ours to judge
    dg.check_peer(b, dict(b), "p:8998")


def test_parallel_layout_must_match():
    dg.check_layout(True, True, "p:1", 2, 1, 2, 1)
    dg.check_layout(False, False, "p:1", 1, 1, 2, 1)
    with pytest.raises(dg.TQDisaggregationError, match="attention TP 1, PP 1; this decode worker has attention TP 2"):
        dg.check_layout(True, True, "p:1", 1, 1, 2, 1)
    with pytest.raises(dg.TQDisaggregationError, match="PP 2"):
        dg.check_layout(False, True, "p:1", 1, 2, 1, 1)


def test_config_route():
    store = {}
    assert dg.config_route(store, "GET", "0.0", None)[0] == 503
    assert dg.config_route(store, "PUT", "", {"rank": "0.0", "fingerprint": {"turboquant": False}}) == (200, {"ok": True})
    assert dg.config_route(store, "GET", "0.0", None) == (200, {"turboquant": False})
    assert dg.config_route(store, "GET", "1.0", None)[0] == 503
    assert dg.config_route(store, "PUT", "", {"rank": "0.0"})[0] == 400
    assert dg.config_route(store, "DELETE", "0.0", None)[0] == 405


def test_publish_retries_until_the_bootstrap_server_answers(monkeypatch):
    import requests

    sent, answers = [], [requests.ConnectionError("refused"), SimpleNamespace(status_code=200, text="")]

    def put(url, json, timeout):
        sent.append((url, json))
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a

    monkeypatch.setattr(requests, "put", put)
    mgr = SimpleNamespace(dist_init_addr=None, bootstrap_host="127.0.0.1", bootstrap_port=8998, attn_tp_rank=1,
                          pp_rank=0)
    dg.publish_fingerprint(mgr, {"turboquant": False}, tries=3, wait_s=0)
    assert len(sent) == 2 and sent[1] == ("http://127.0.0.1:8998" + dg.ROUTE,
                                          {"rank": "1.0", "fingerprint": {"turboquant": False}})
    answers[:] = [SimpleNamespace(status_code=500, text="boom")]
    with pytest.raises(RuntimeError, match="HTTP 500 boom"):
        dg.publish_fingerprint(mgr, {"turboquant": False}, tries=3, wait_s=0)
    answers[:] = [requests.ConnectionError("refused")] * 2
    with pytest.raises(RuntimeError, match="did not answer"):
        dg.publish_fingerprint(mgr, {"turboquant": False}, tries=2, wait_s=0)


def test_decode_check_runs_once_per_prefill_server(tmp_path, monkeypatch):
    """The wrapped try_ensure_parallel_info: retries while the prefill config is not published, refuses a
    mismatch, accepts a match once (asking again fetches nothing); a non-TurboQuant decode manager with a
    prefill server without sglang_tq passes."""
    _, a = _pool(tmp_path, BOUNDARY, "a.yaml")
    _, b = _pool(tmp_path, ALL_Q, "b.yaml")
    fa, fb_ = dg.config_fingerprint(a), dg.config_fingerprint(b)
    answers, asked = [], []

    def fetch(addr, tp, pp):
        asked.append((addr, tp, pp))
        return answers.pop(0)

    class Manager:
        attn_tp_size, pp_size = 1, 1

        def __init__(self, fp):
            self.prefill_info_table = {}
            if fp is not None:
                self._tq_fingerprint = fp

        def try_ensure_parallel_info(self, addr):
            self.prefill_info_table.setdefault(
                addr, SimpleNamespace(attn_tp_size=1, pp_size=1, target_tp_rank=0, target_pp_ranks=[0]))
            return True

    class Server:
        def _setup_routes(self):
            pass

    monkeypatch.setattr(dg, "fetch_fingerprint", fetch)
    dg.install_conn(SimpleNamespace(CommonKVBootstrapServer=Server, CommonKVManager=Manager))
    m = Manager(fa)
    answers[:] = [dg._PENDING, fb_]
    assert m.try_ensure_parallel_info("p:1") is False and "p:1" not in m.prefill_info_table
    with pytest.raises(dg.TQDisaggregationError, match="p:1"):
        m.try_ensure_parallel_info("p:1")
    answers[:] = [dict(fa)]
    m2 = Manager(fa)
    assert m2.try_ensure_parallel_info("p:2") and m2.try_ensure_parallel_info("p:2")
    assert asked == [("p:1", 0, 0), ("p:1", 0, 0), ("p:2", 0, 0)]
    answers[:] = [None]
    assert Manager(dg.config_fingerprint(MHATokenToKVPool(8, 1, torch.bfloat16, HKV, D, NL, "cpu", False, 0,
                                                          NL - 1))).try_ensure_parallel_info("p:3")
    assert Manager(None).try_ensure_parallel_info("p:4") and len(asked) == 4  # not a decode manager


# --------------------------------------------------------------------------------------------
# Start-up
# --------------------------------------------------------------------------------------------
def _problems(**kw):
    return _problems_server_args(server_args(attention_backend="turboquant", **kw))


def test_startup_allows_disaggregation_over_checked_backends(monkeypatch):
    for mode in ("prefill", "decode"):
        for backend in dg.SUPPORTED_TRANSFER_BACKENDS:
            assert _problems(disaggregation_mode=mode, disaggregation_transfer_backend=backend) == []
    p = _problems(disaggregation_mode="decode", disaggregation_transfer_backend="ascend")
    assert len(p) == 1 and "ascend" in p[0] and "mooncake" in p[0]
    monkeypatch.setenv("SGLANG_DISAGG_STAGING_BUFFER", "1")
    assert any("SGLANG_DISAGG_STAGING_BUFFER" in x for x in _problems(disaggregation_mode="prefill"))
    assert _problems() == []  # not disaggregated: the staging variable does not matter


def test_register_installs_the_disaggregation_hooks():
    from sglang_tq import _autoload
    from sglang_tq.registration import register
    import sglang.srt.disaggregation.common.conn as conn
    import sglang.srt.disaggregation.decode as decode
    import sglang.srt.disaggregation.decode_schedule_batch_mixin as prebuilt
    import sglang.srt.disaggregation.prefill as prefill

    register()
    mark = "_sglang_tq_wrapped"
    assert "_setup_routes" in conn.CommonKVBootstrapServer.__dict__[mark]
    assert "try_ensure_parallel_info" in conn.CommonKVManager.__dict__[mark]
    assert "_init_kv_manager" in prefill.PrefillBootstrapQueue.__dict__[mark]
    assert "_init_kv_manager" in decode.DecodePreallocQueue.__dict__[mark]
    assert "prepare_for_prebuilt" in prebuilt.ScheduleBatchDisaggregationDecodeMixin.__dict__[mark]
    for module in ("common.conn", "prefill", "decode", "decode_schedule_batch_mixin"):
        assert f"sglang.srt.disaggregation.{module}" in _autoload._WATCH
