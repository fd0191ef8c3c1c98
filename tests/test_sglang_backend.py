"""TurboQuantAttnBackend (reference path, CPU) against SGLang's TorchNativeAttnBackend.

The reference runs on a plain MHATokenToKVPool that holds the *dequantized* K/V of the TurboQuant
cache (and, like TurboQuant's extend, the new tokens' raw K/V), so both must agree to bf16 tolerance.
Covers GQA (9 q / 3 kv heads, head_dim 64), a bf16 boundary layer, MSE / PROD / outlier formats,
prefill, a radix-cache hit (prefix shared with another request), a chunked-prefill continuation,
a 1-token extend (mixed-batch style), decode, and slot reuse after a request is freed (retraction).
Every test also runs with key centering (`key_means:`, param "centered"): the TurboQuant cache then
holds codes of k - mu, and the reference pool the dequantized keys + mu -- equal attention by softmax
invariance.
"""
import os

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, sequence_kv,  # noqa: E402
                          server_args, tq_and_reference_runners, tq_backend, write_tq_config)
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang_tq.kernel_calls import KernelCalls  # noqa: E402
from sglang_tq.pool import TQLayerBuffer, TQTokenToKVPool  # noqa: E402

HQ, HKV, D = 9, 3, 64
NUM_LAYERS = 4
CFG = """
name: test-mix
seed: 7
defaults:
  k: {bits: 4}
  v: {bits: 3}
boundary: {first: 1, last: 0}
overrides:
  - layers: 2
    k: {bits: 3, qjl: true}
    v: {bits: 2}
  - layers: 3
    k: {bits: 3, outliers: {channels: 8, bits: 4}}
"""
ATOL = RTOL = 2e-2


def _key_mean(pool, lid):
    return pool.key_mean(lid) if pool.is_quantized(lid) else None


def _uncentered(pool, lid, k):
    """Dequantized stored keys -> the keys attention sees (+ mu with key centering)."""
    mu = _key_mean(pool, lid)
    return k if mu is None else k + mu


@pytest.fixture(scope="module", params=["plain", "centered"])
def setup(tmp_path_factory, request):
    d = tmp_path_factory.mktemp("cfg")
    text = CFG
    if request.param == "centered":
        from safetensors.torch import save_file

        means = torch.randn(NUM_LAYERS, HKV, D, generator=torch.Generator().manual_seed(11))
        save_file({"key_means": means}, str(d / "means.safetensors"))
        text = CFG + "key_means: means.safetensors\n"
    path = write_tq_config(d, text)
    mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=128)
    runner, pool, backend, ref_runner, ref_pool = tq_and_reference_runners(path, mc, 512, 8)
    assert isinstance(pool, TQTokenToKVPool) and isinstance(ref_pool, MHATokenToKVPool)
    if request.param == "centered":
        assert pool.key_mean(0) is None  # bf16 boundary layer: stored as is
        for lid in range(1, NUM_LAYERS):
            assert torch.equal(pool.key_mean(lid), means[lid])
    else:
        assert all(pool.key_mean(lid) is None for lid in range(NUM_LAYERS))
    ref = TorchNativeAttnBackend(ref_runner)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(NUM_LAYERS)]
    return dict(runner=runner, pool=pool, backend=backend, ref_runner=ref_runner, ref_pool=ref_pool,
                ref=ref, layers=layers, gen=torch.Generator().manual_seed(0))


def _qkv(gen, n):
    q = torch.randn(n, HQ * D, generator=gen).to(torch.bfloat16)
    k = torch.randn(n, HKV * D, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, HKV * D, generator=gen).to(torch.bfloat16)
    return q, k, v


def _sync_dequantized(s, slots):
    """Copy the TurboQuant cache rows `slots` (dequantized; a flagged first token: its exact table row, as every
    reader takes it) into the reference pool."""
    pool, ref_pool = s["pool"], s["ref_pool"]
    for lid in range(NUM_LAYERS):
        if not pool.is_quantized(lid):
            continue
        kd, vd = sequence_kv(pool, lid, slots)
        ref_pool.k_buffer[lid][slots] = _uncentered(pool, lid, kd).to(torch.bfloat16)
        ref_pool.v_buffer[lid][slots] = vd.to(torch.bfloat16)


def _run_extend(s, req_ids, prefix_lens, new_lens):
    runner, ref_runner = s["runner"], s["ref_runner"]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new_lens))
    assert slots is not None and int(slots.min()) >= 1  # slot 0 is never handed out
    r2t = runner.req_to_token_pool.req_to_token
    off = 0
    for r, p, n in zip(req_ids, prefix_lens, new_lens):
        r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
        off += n
    fb = extend_batch(runner, req_ids, prefix_lens, new_lens, slots, s["backend"])
    # each request's own first token id: at position 0 a token's K/V depend on its id alone, and the random
    # K/V here differ per request (the first-token table is keyed by id)
    fb.input_ids = torch.repeat_interleave(1000 + torch.tensor(req_ids), torch.tensor(new_lens))
    fb_ref = extend_batch(ref_runner, req_ids, prefix_lens, new_lens, slots, s["ref"])
    s["backend"].init_forward_metadata(fb)
    s["ref"].init_forward_metadata(fb_ref)
    outs = []
    for layer in s["layers"]:
        q, k, v = _qkv(s["gen"], sum(new_lens))
        o = layer(q, k, v, fb)
        o_ref = layer(q, k, v, fb_ref)
        assert o.shape == (sum(new_lens), HQ * D) and torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"extend layer {layer.layer_id}: {m}")
        outs.append(o)
    _sync_dequantized(s, slots)
    return fb, slots, outs


def _run_decode(s, req_ids):
    runner, ref_runner, pool = s["runner"], s["ref_runner"], s["pool"]
    r2t = runner.req_to_token_pool.req_to_token
    slots = runner.token_to_kv_pool_allocator.alloc(len(req_ids))
    seq = []
    for r, slot in zip(req_ids, slots.tolist()):
        n = int(s["lens"][r])
        r2t[r, n] = slot
        s["lens"][r] = n + 1
        seq.append(n + 1)
    fb = decode_batch(runner, req_ids, seq, slots, s["backend"])
    fb_ref = decode_batch(ref_runner, req_ids, seq, slots, s["ref"])
    s["backend"].init_forward_metadata(fb)
    s["ref"].init_forward_metadata(fb_ref)
    diffs = []
    for layer in s["layers"]:
        q, k, v = _qkv(s["gen"], len(req_ids))
        o = layer(q, k, v, fb)  # TurboQuant stores the new token packed, then attends over the cache
        lid = layer.layer_id
        if pool.is_quantized(lid):  # reference cache gets the dequantized new token
            kc, vc = pool.codecs(lid)
            mu = _key_mean(pool, lid)
            kf = k.view(-1, HKV, D).float()
            kd = kc.decode(*kc.encode(kf if mu is None else kf - mu))
            s["ref_pool"].k_buffer[lid][slots] = _uncentered(pool, lid, kd).to(torch.bfloat16)
            s["ref_pool"].v_buffer[lid][slots] = vc.decode(*vc.encode(v.view(-1, HKV, D).float())).to(torch.bfloat16)
        else:
            s["ref_pool"].set_kv_buffer(layer, slots, k.view(-1, HKV, D), v.view(-1, HKV, D))
        o_ref = layer(q, k, v, fb_ref, save_kv_cache=False)
        assert o.shape == (len(req_ids), HQ * D) and torch.isfinite(o).all()
        torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"decode layer {lid}: {m}")
        diffs.append(o)
    return fb, slots


def test_extend_prefix_chunked_decode(setup):
    s = setup
    s["lens"] = {}
    r2t = s["runner"].req_to_token_pool.req_to_token
    # 1) prefill: A (req 0) 12 tokens, C (req 2) 5 tokens (first chunk of a chunked prefill)
    fb1, slots1, _ = _run_extend(s, [0, 2], [0, 0], [12, 5])
    s["lens"].update({0: 12, 2: 5})
    md = s["backend"].forward_metadata
    assert md.kv_indptr.tolist() == [0, 0, 0] and md.kv_indices.numel() == 0
    assert md.qo_indptr.tolist() == [0, 12, 17] and md.max_extend_len == 12
    # 2) B (req 1): radix hit on A's first 8 tokens + 6 new; C: next chunk (prefix 5, 4 new);
    #    E (req 3): full hit on A's 12 tokens + 1 new token (a decode request inside a mixed batch)
    r2t[1, :8] = r2t[0, :8]
    r2t[3, :12] = r2t[0, :12]
    pool = s["pool"]
    assert pool.first_flags[r2t[0, 0]] > 0 and pool.first_flags[r2t[2, 0]] > 0  # exact first tokens, by id
    assert pool.first_flags[r2t[0, 0]] != pool.first_flags[r2t[2, 0]] and not pool.first_flags[r2t[0, 1:12]].any()
    fb2, slots2, _ = _run_extend(s, [1, 2, 3], [8, 5, 12], [6, 4, 1])
    s["lens"].update({1: 14, 2: 9, 3: 13})
    assert not pool.first_flags[slots2].any()  # no new token at position 0: the reused slots' flags cleared
    md = s["backend"].forward_metadata
    assert md.kv_indptr.tolist() == [0, 8, 13, 25]
    expect = torch.cat([r2t[1, :8], r2t[2, :5], r2t[3, :12]]).long()
    assert torch.equal(md.kv_indices, expect)  # prefix only, from the cache
    assert md.qo_indptr.tolist() == [0, 6, 10, 11] and md.max_extend_len == 6
    # 3) two decode steps over all four requests
    for _ in range(2):
        fb3, slots3 = _run_decode(s, [0, 1, 2, 3])
    md = s["backend"].forward_metadata
    seq = [s["lens"][r] for r in range(4)]
    assert md.kv_indptr.tolist() == [0] + torch.tensor(seq).cumsum(0).tolist()
    # 4) retraction: C leaves, its slots go back to the allocator and get reused by a new request
    alloc = s["runner"].token_to_kv_pool_allocator
    before = alloc.available_size()
    freed = r2t[2, :s["lens"][2]].long().clone()
    alloc.free(freed)
    assert alloc.available_size() == before + freed.numel()
    alloc.free_pages = torch.cat([freed, alloc.free_pages])  # make the next alloc reuse them at once
    _run_extend(s, [2], [0], [7])
    s["lens"][2] = 7
    _run_decode(s, [2, 0])


def test_quantized_layers_really_quantize(setup):
    """The TurboQuant layers read packed codes (not bf16 rows), so their decode output differs from
    exact attention over the raw K/V; the bf16 boundary layer matches exact attention."""
    s = setup
    pool, backend = s["pool"], s["backend"]
    assert isinstance(pool.get_key_buffer(1), TQLayerBuffer) and pool.k_buffer[1] is None
    assert pool.get_key_buffer(0).dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    n = 40
    slots = s["runner"].token_to_kv_pool_allocator.alloc(n + 1)
    r2t = s["runner"].req_to_token_pool.req_to_token
    r2t[5, :n + 1] = slots.to(r2t.dtype)
    for layer in s["layers"]:
        k = torch.randn(n + 1, HKV, D, generator=gen).to(torch.bfloat16)
        v = torch.randn(n + 1, HKV, D, generator=gen).to(torch.bfloat16)
        pool.set_kv_buffer(layer, slots[:n], k[:n], v[:n])
        q = torch.randn(1, HQ * D, generator=gen).to(torch.bfloat16)
        fb = decode_batch(s["runner"], [5], [n + 1], slots[n:], backend)
        backend.init_forward_metadata(fb)
        o = layer(q, k[n:].reshape(1, -1), v[n:].reshape(1, -1), fb).float().view(HQ, D)
        kk = k.float().repeat_interleave(HQ // HKV, dim=1)
        vv = v.float().repeat_interleave(HQ // HKV, dim=1)
        p = torch.softmax(torch.einsum("hd,lhd->hl", q.float().view(HQ, D), kk) * D ** -0.5, dim=-1)
        exact = torch.einsum("hl,lhd->hd", p, vv)
        err = (o - exact).abs().max().item()
        if pool.is_quantized(layer.layer_id):
            assert err > 5e-2, f"layer {layer.layer_id} looks unquantized (err {err})"
            assert err < 1.0
        else:
            assert err < 2e-2


def test_pool_round_trip_and_slot_zero(setup):
    s = setup
    pool = s["pool"]
    layer = s["layers"][1]
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(3, HKV, D, generator=gen).to(torch.bfloat16)
    v = torch.randn(3, HKV, D, generator=gen).to(torch.bfloat16)
    loc = torch.tensor([0, 500, 501])  # slot 0: the dummy row padded CUDA-graph tokens write to
    pool.set_kv_buffer(layer, loc, k, v)
    kb, vb = pool.get_kv_buffer(1)
    mu = _key_mean(pool, 1)
    kc, ks = kb.codec.encode(k.float() if mu is None else k.float() - mu)
    assert torch.equal(kb.codes[loc], kc) and torch.equal(kb.scales[loc], ks)
    vc, vs = vb.codec.encode(v.float())
    assert torch.equal(vb.codes[loc], vc) and torch.equal(vb.scales[loc], vs)
    # the bf16 boundary layer stores rows exactly
    pool.set_kv_buffer(s["layers"][0], loc, k, v)
    assert torch.equal(pool.get_key_buffer(0)[loc], k) and torch.equal(pool.get_value_buffer(0)[loc], v)


def test_prefill_from_cache_flag(setup):
    """evaluation.prefill_from_cache: extend attends to the new tokens' K/V as stored (dequantized)."""
    s = setup
    runner, ref_runner, pool, backend = s["runner"], s["ref_runner"], s["pool"], s["backend"]
    r2t = runner.req_to_token_pool.req_to_token
    src = r2t[0, :6].clone()  # radix hit on 6 cached tokens of request 0
    r2t[6, :6] = src
    slots = runner.token_to_kv_pool_allocator.alloc(5)
    r2t[6, 6:11] = slots.to(r2t.dtype)
    fb = extend_batch(runner, [6], [6], [5], slots, backend)
    fb_ref = extend_batch(ref_runner, [6], [6], [5], slots, s["ref"])
    backend.init_forward_metadata(fb)
    backend.prefill_from_cache = True
    try:
        for layer in s["layers"]:
            q, k, v = _qkv(s["gen"], 5)
            o = layer(q, k, v, fb)
            lid = layer.layer_id
            if pool.is_quantized(lid):
                kb, vb = pool.get_kv_buffer(lid)
                kd = _uncentered(pool, lid, kb.codec.decode(kb.codes[slots], kb.scales[slots]))
                s["ref_pool"].k_buffer[lid][slots] = kd.to(torch.bfloat16)
                s["ref_pool"].v_buffer[lid][slots] = vb.codec.decode(vb.codes[slots], vb.scales[slots]).to(torch.bfloat16)
            else:
                s["ref_pool"].set_kv_buffer(layer, slots, k.view(-1, HKV, D), v.view(-1, HKV, D))
            o_ref = layer(q, k, v, fb_ref, save_kv_cache=False)
            torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL)
    finally:
        backend.prefill_from_cache = False


def test_prefill_from_cache_comes_from_the_config(tmp_path, caplog):
    """evaluation.prefill_from_cache in the YAML turns the evaluation mode on; the server announces it in
    its log at warning level, once per process."""
    import sglang_tq.backend as backend_mod

    mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=128)
    for text, expect in ((CFG, False), (CFG + "evaluation: {prefill_from_cache: true}\n", True)):
        path = write_tq_config(tmp_path, text)
        with env(SGLANG_TQ_CONFIG=path):
            r = FakeRunner(mc)
            r.build_pools(64, max_running_requests=2)
            backend_mod._announced_prefill_from_cache = False
            with caplog.at_level("WARNING", logger="sglang_tq"):
                assert tq_backend(r).prefill_from_cache is expect
                tq_backend(r)
    warnings = [rec for rec in caplog.records if "prefill_from_cache" in rec.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_batch_invariant_split_count(setup, monkeypatch):
    """--enable-deterministic-inference: every decode batch size gets batch size 1's split count and warp
    choice (a sequence's split-K partition then depends on its length only); otherwise the count falls as
    batches grow. Decided once per batch size, in the metadata."""
    backend = setup["backend"]
    monkeypatch.setattr(backend, "ops", KernelCalls("cpu", triton=True))  # the split count is a Triton choice
    monkeypatch.setattr(backend, "num_sms", 132)
    monkeypatch.setattr(backend, "max_context_len", 16960)
    for invariant in (False, True):
        monkeypatch.setattr(backend, "batch_invariant", invariant)
        monkeypatch.setattr(backend, "_launches", {})
        launches = {bs: backend.decode_launch(bs) for bs in (1, 64, 512)}
        counts = {bs: la.num_splits for bs, la in launches.items()}
        if invariant:
            assert counts[1] == counts[64] == counts[512] > 1
            assert {la.batch for la in launches.values()} == {1}
            assert launches[1].plans == launches[64].plans == launches[512].plans
        else:
            assert counts[1] > counts[64] > counts[512]
            assert [launches[bs].batch for bs in (1, 64, 512)] == [1, 64, 512]
        assert backend.decode_launch(64) is launches[64]


def test_deterministic_inference_turns_on_batch_invariance(tmp_path):
    """--enable-deterministic-inference (SGLang's batch-invariant GEMMs and norms) also makes our
    decode split-K and extend blocks batch-invariant."""
    path = write_tq_config(tmp_path, CFG)
    mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=128)
    for flag in (False, True):
        with env(SGLANG_TQ_CONFIG=path):
            r = FakeRunner(mc, server_args(enable_deterministic_inference=flag))
            r.build_pools(64, max_running_requests=2)
            b = tq_backend(r)
            assert b.batch_invariant is flag
            assert b.extend_fixed == ({"block_m": 64, "gqa_pack": False, "num_splits": 1} if flag else {})


def _fresh_prefill(s, new):
    """Requests 4 and 7 start prompts of `new` tokens (no cached prefix): their extend batch and slots."""
    runner = s["runner"]
    r2t = runner.req_to_token_pool.req_to_token
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t[4, :new[0]] = slots[:new[0]].to(r2t.dtype)
    r2t[7, :new[1]] = slots[new[0]:].to(r2t.dtype)
    return extend_batch(runner, [4, 7], [0, 0], new, slots, s["backend"]), slots


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="SGLang's Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_extend_without_cached_prefix_takes_the_plain_kernel(setup):
    """A prefill batch in which no sequence has a cached prefix never reads the packed cache: the
    backend's GPU path hands it to SGLang's own Triton extend kernel over the new bf16 K/V (run here in
    the interpreter), which must match the reference; a batch with a prefix must not take that path."""
    s = setup
    runner, ref_runner, backend = s["runner"], s["ref_runner"], s["backend"]
    new = [7, 12]
    fb, slots = _fresh_prefill(s, new)
    fb_ref = extend_batch(ref_runner, [4, 7], [0, 0], new, slots, s["ref"])
    backend.init_forward_metadata(extend_batch(runner, [4, 7], [3, 0], new, slots, backend))
    assert not backend.forward_metadata.no_prefix and not backend.forward_metadata.plain
    backend.init_forward_metadata(fb)
    md = backend.forward_metadata
    assert md.no_prefix and not md.ragged
    assert not md.plain  # the reference's one extend serves it on the CPU; Triton takes the plain path
    s["ref"].init_forward_metadata(fb_ref)
    for layer in s["layers"][1:]:  # the quantized layers
        q, k, v = _qkv(s["gen"], sum(new))
        o = backend._plain_extend(q, k, v, layer, md)
        o_ref = layer(q, k, v, fb_ref)
        torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a GPU or under TRITON_INTERPRET=1")
def test_plain_prefill_route_with_triton(setup, monkeypatch):
    """With the Triton kernels (as on a GPU) a batch without cached prefixes takes the plain route: its
    quantized layers store the new K/V packed (the same codes as the reference compress) and attend over
    the fresh bf16 K/V through SGLang's Triton extend kernel, matching the reference path's output."""
    s = setup
    pool, backend = s["pool"], s["backend"]
    new = [6, 3]
    fb, slots = _fresh_prefill(s, new)
    layers = s["layers"][1:]  # the quantized layers
    qkv = [_qkv(s["gen"], sum(new)) for _ in layers]
    outs, codes = {}, {}
    for route in ("reference", "triton"):
        if route == "triton":
            triton = KernelCalls("cpu", triton=True)
            monkeypatch.setattr(backend, "ops", triton)
            monkeypatch.setattr(pool, "ops", triton)
            monkeypatch.setattr(backend, "plain_prefill", True)
        backend.init_forward_metadata(fb)
        assert backend.forward_metadata.plain is (route == "triton")
        outs[route] = [layer(q, k, v, fb).float() for layer, (q, k, v) in zip(layers, qkv)]
        codes[route] = [pool.get_key_buffer(layer.layer_id).codes[slots].clone() for layer in layers]
    for layer, a, b, ca, cb in zip(layers, outs["reference"], outs["triton"], codes["reference"], codes["triton"]):
        torch.testing.assert_close(b, a, atol=ATOL, rtol=RTOL, msg=lambda m: f"layer {layer.layer_id}: {m}")
        assert (ca != cb).float().mean().item() < 0.01  # the same codes up to rounding ties


def test_model_logit_caps():
    """The warm-up's soft-cap variants come from the model's attention layers."""
    from sglang_tq.backend import _model_logit_caps

    plain = torch.nn.ModuleList([RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(2)])
    capped = torch.nn.ModuleList([RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0, logit_cap=30.0)])
    assert _model_logit_caps(None) == (0.0,) and _model_logit_caps(plain) == (0.0,)
    assert _model_logit_caps(capped) == (0.0, 30.0)


class RecordingCalls(KernelCalls):
    """The Triton kernels (interpreter) with every extend's variant recorded."""

    def __init__(self, run=True):
        super().__init__("cpu", triton=True)
        self.calls, self.run = [], run

    def extend(self, q, k, v, kb, vb, qo, kvp, kvi, scale, **kw):
        self.calls.append(dict(kw, fmts=(kb.codec.fmt, vb.codec.fmt), index_dtypes=(qo.dtype, kvp.dtype)))
        if self.run:
            out = super().extend(q, k, v, kb, vb, qo, kvp, kvi, scale, **kw)
            assert out.shape == (q.shape[0], HQ, D) and torch.isfinite(out).all()
            return out
        return None


def _variant(kw):
    return (*kw["fmts"], kw["block_m"], kw["logit_cap"], kw["gqa_pack"], kw.get("num_splits") or 1)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_warm_extend_kernels_runs_each_variant_once(setup, monkeypatch):
    """The start-up warm-up (run on CUDA in __init__) calls the Triton extend kernel once per distinct
    (K format, V format) of the quantized layers, per block size and with and without GQA packing (a
    group of 3 here) and per prefix split count (1, and 2 where the kernel splits by itself), over
    slot 0, with the stock backend's own indptr buffers (the dtypes serving passes). It compresses a
    prefill-sized batch into slot 0 (SGLang's padding slot) and leaves every other cache row as it was."""
    s = setup
    backend, pool = s["backend"], s["pool"]
    before = [t.clone() for t in pool._all_tensors("k") + pool._all_tensors("v")]
    ops = RecordingCalls()
    monkeypatch.setattr(backend, "ops", ops)
    splits = (1, 2) if ops.extend_splits_prefix() else (1,)
    n = 12 * len(splits)
    runs = backend.warm_extend_kernels(torch.bfloat16, block_ms=(32, 64))
    assert runs == len(ops.calls) == n
    assert {kw["index_dtypes"] for kw in ops.calls} == {(backend.bf16.qo_indptr.dtype, backend.bf16.kv_indptr.dtype)}
    runs = backend.warm_extend_kernels(torch.bfloat16, block_ms=(32,), logit_caps=(0.0, 30.0))
    calls = [_variant(kw) for kw in ops.calls]
    pairs = {(pool.codecs(lid)[0].fmt, pool.codecs(lid)[1].fmt) for lid in range(NUM_LAYERS) if pool.is_quantized(lid)}
    assert len(pairs) == 3  # layers 1, 2, 3 of CFG: three different K/V format pairs
    assert set(calls[:n]) == {(kf, vf, bm, 0.0, p, ns) for kf, vf in pairs for bm in (32, 64)
                              for p in (False, True) for ns in splits}
    assert runs == n and set(calls[n:]) == {(kf, vf, 32, cap, p, ns) for kf, vf in pairs for cap in (0.0, 30.0)
                                            for p in (False, True) for ns in splits}
    changed = [not torch.equal(a, b) for a, b in zip(before, pool._all_tensors("k") + pool._all_tensors("v"))]
    for a, b in zip(before, pool._all_tensors("k") + pool._all_tensors("v")):
        assert torch.equal(a[1:], b[1:])  # rows past slot 0
    assert any(changed)  # the compress warm-up wrote slot 0


def test_warm_extend_variants_follow_the_serving_choices(setup, monkeypatch):
    """With FlashInfer's prefill the warm-up also compiles the prefix-only (hybrid) variant; a
    batch-invariant server compiles only its fixed variant (block 64, no packing, one split)."""
    backend = setup["backend"]
    ops = RecordingCalls(run=False)
    monkeypatch.setattr(backend, "ops", ops)
    monkeypatch.setattr(backend, "ragged_prefill", object())
    backend.warm_extend_kernels(torch.bfloat16, block_ms=(32, 64))
    assert sum("new_part" in kw for kw in ops.calls) == 2 * 3  # block sizes x K/V format pairs
    ops.calls.clear()
    monkeypatch.setattr(backend, "ragged_prefill", None)
    monkeypatch.setattr(backend, "batch_invariant", True)
    monkeypatch.setattr(backend, "extend_fixed", dict(block_m=64, gqa_pack=False, num_splits=1))
    backend.warm_extend_kernels(torch.bfloat16, block_ms=(32, 64), logit_caps=(0.0, 30.0))
    assert len(ops.calls) == 2 * 3 and {(kw["block_m"], kw["gqa_pack"], kw["num_splits"]) for kw in ops.calls} == {(64, False, 1)}


@pytest.mark.parametrize("from_cache", [False, True], ids=["fresh", "from-cache"])
def test_padded_extend_equals_unpadded(setup, from_cache):
    """Piecewise CUDA graphs (on by default) hand the attention q/k/v and out_cache_loc padded to a
    captured token count: padding rows after the real tokens, their out_cache_loc 0 (SGLang's dummy
    slot), extend_num_tokens still the real count. The real rows' outputs must equal an unpadded run's
    (a radix-hit sequence and a fresh one, with and without prefill from the cache)."""
    s = setup
    runner, pool, backend = s["runner"], s["pool"], s["backend"]
    r2t = runner.req_to_token_pool.req_to_token
    prefix = runner.token_to_kv_pool_allocator.alloc(6)  # a cached prefix of 6 tokens (never slot 0)
    r2t[7, :6] = prefix.to(r2t.dtype)
    for layer in s["layers"]:
        _, k, v = _qkv(s["gen"], 6)
        pool.set_kv_buffer(layer, prefix, k.view(6, HKV, D), v.view(6, HKV, D))
    new, pad = [5, 4], 7
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t[7, 6:11] = slots[:5].to(r2t.dtype)
    r2t[4, :4] = slots[5:].to(r2t.dtype)
    backend.prefill_from_cache = from_cache
    try:
        for layer in s["layers"][1:]:  # the quantized layers
            q, k, v = _qkv(s["gen"], sum(new) + pad)
            outs = []
            for n_rows in (sum(new), sum(new) + pad):
                fb = extend_batch(runner, [7, 4], [6, 0], new, slots, backend)
                fb.out_cache_loc = torch.cat([slots, slots.new_zeros(n_rows - sum(new))])
                backend.init_forward_metadata(fb)
                outs.append(layer(q[:n_rows], k[:n_rows], v[:n_rows], fb))
            assert outs[1].shape == (sum(new) + pad, HQ * D)
            diff = (outs[0].float() - outs[1][:sum(new)].float()).abs().max().item()
            assert diff == 0.0, f"layer {layer.layer_id}: {diff}"
    finally:
        backend.prefill_from_cache = False


def test_only_the_config_and_autoload_variables_are_read():
    """User-facing behaviour comes from the YAML config: the adapter reads no environment variable but
    SGLANG_TQ_CONFIG (the config, carried to spawned processes) and SGLANG_TQ_AUTOLOAD (opt-out)."""
    import re

    pkg = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sglang_tq")
    found = set()
    for name in os.listdir(pkg):
        if name.endswith(".py"):
            with open(os.path.join(pkg, name)) as f:
                found |= set(re.findall(r"SGLANG_TQ_[A-Z_]+", f.read()))
    assert found == {"SGLANG_TQ_CONFIG", "SGLANG_TQ_AUTOLOAD"}


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_hybrid_extend_matches_single_kernel(setup, monkeypatch):
    """The hybrid extend: the new tokens' attention from the plain-prefill kernel (a torch stand-in for
    FlashInfer here: planned with the batch's lengths in the metadata, keys centered like the cache's, an
    lse buffer) plus the prefix-only TurboQuant kernel gives the one-kernel extend's output (a radix-hit
    sequence and a fresh one, with and without key centering)."""
    import sglang_tq.backend as backend_mod
    from tq_kernels import reference

    s = setup
    runner, pool, backend = s["runner"], s["pool"], s["backend"]
    calls = []

    class TorchRagged:
        def plan(self, lens):
            self.lens = list(lens)

        def run(self, q3, k3, v3, out3, lse=None):
            n = sum(self.lens)
            qo = torch.tensor([0, *torch.tensor(self.lens).cumsum(0).tolist()])
            o, l2 = reference.new_token_attention(q3[:n], k3[:n], v3[:n], qo, D ** -0.5, 0.0, True)
            out3[:n] = o.to(out3.dtype)
            lse[:n] = l2
            calls.append((list(self.lens), k3[:n].float().clone()))

    r2t = runner.req_to_token_pool.req_to_token
    prefix = runner.token_to_kv_pool_allocator.alloc(6)
    r2t[7, :6] = prefix.to(r2t.dtype)
    for layer in s["layers"]:
        _, k, v = _qkv(s["gen"], 6)
        pool.set_kv_buffer(layer, prefix, k.view(6, HKV, D), v.view(6, HKV, D))
    new = [5, 4]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t[7, 6:11] = slots[:5].to(r2t.dtype)
    r2t[4, :4] = slots[5:].to(r2t.dtype)
    monkeypatch.setattr(backend_mod, "HYBRID_MIN_NEW", 2)
    monkeypatch.setattr(backend, "ops", KernelCalls("cpu", triton=True))
    for layer in s["layers"][1:]:  # the quantized layers
        q, k, v = _qkv(s["gen"], sum(new))
        outs = []
        for ragged in (None, TorchRagged()):
            monkeypatch.setattr(backend, "ragged_prefill", ragged)
            fb = extend_batch(runner, [7, 4], [6, 0], new, slots, backend)
            backend.init_forward_metadata(fb)
            assert backend.forward_metadata.hybrid is (ragged is not None)
            outs.append(layer(q, k, v, fb).float())
        assert calls and calls[-1][0] == new
        mu = pool.key_mean(layer.layer_id)
        k_sent = k.view(-1, HKV, D).float() - (mu if mu is not None else 0.0)
        assert ((calls[-1][1] - k_sent).norm() / k_sent.norm()).item() < 1e-2  # centered (bf16 rounding)
        err = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
        assert err < 2e-2, f"layer {layer.layer_id}: {err:.3e}"


def test_extend_routing_in_the_metadata(setup, monkeypatch):
    """init_forward_metadata decides the extend's route once per batch: FlashInfer's prefill is planned
    (with the host-side lengths) for a batch without cached prefixes or a hybrid one, never with a custom
    mask; the hybrid extend needs HYBRID_MIN_NEW new tokens in one sequence and no evaluation mode."""
    import sglang_tq.backend as backend_mod

    s = setup
    runner, backend = s["runner"], s["backend"]
    planned = []

    class Ragged:
        def plan(self, lens):
            planned.append(list(lens))

    slots = runner.token_to_kv_pool_allocator.alloc(9)
    monkeypatch.setattr(backend, "ragged_prefill", Ragged())
    monkeypatch.setattr(backend_mod, "HYBRID_MIN_NEW", 5)

    def md(prefix, new=(5, 4)):
        backend.init_forward_metadata(extend_batch(runner, [4, 7], list(prefix), list(new), slots, backend))
        return backend.forward_metadata

    m = md([0, 0])
    assert m.no_prefix and m.ragged and not m.hybrid and m.max_prefix_len == 0 and planned[-1] == [5, 4]
    m = md([3, 0])
    assert m.hybrid and m.ragged and m.max_prefix_len == 3 and not m.no_prefix
    m = md([3, 0], new=(4, 4))
    assert not m.hybrid and not m.ragged
    monkeypatch.setattr(backend, "prefill_from_cache", True)
    assert not md([3, 0]).hybrid
    monkeypatch.setattr(backend, "prefill_from_cache", False)
    n = len(planned)
    monkeypatch.setattr(TorchMetadataWithMask, "mask", torch.ones(3, dtype=torch.bool))
    monkeypatch.setattr(backend.bf16, "init_forward_metadata",
                        TorchMetadataWithMask(backend.bf16.init_forward_metadata, backend.bf16))
    m = md([0, 0])
    assert m.no_prefix and not m.ragged and len(planned) == n


class TorchMetadataWithMask:
    """The stock metadata with a custom mask set (as SGLang sets one for some multimodal batches)."""

    mask = None

    def __init__(self, init, owner):
        self.init, self.owner = init, owner

    def __call__(self, fb):
        self.init(fb)
        self.owner.forward_metadata.custom_mask = self.mask


def test_plain_prefill_falls_back_when_flashinfer_fails(setup, monkeypatch):
    """The start-up run of FlashInfer's prefill (planned, with an lse) switches plain prefills and the
    hybrid extend back to SGLang's Triton path when FlashInfer cannot serve the model."""
    backend = setup["backend"]
    seen = []

    class Ok:
        def plan(self, lens):
            seen.append(list(lens))

        def run(self, q3, k3, v3, out3, lse=None):
            assert lse is not None and seen == [[2]]

    class Broken:
        def plan(self, lens):
            pass

        def run(self, *a, **kw):
            raise RuntimeError("no kernel for this head size")

    monkeypatch.setattr(backend, "ragged_prefill", Ok())
    assert backend.warm_plain_prefill(torch.bfloat16) and backend.ragged_prefill is not None
    monkeypatch.setattr(backend, "ragged_prefill", Broken())
    assert not backend.warm_plain_prefill(torch.bfloat16)
    assert backend.ragged_prefill is None


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a GPU or under TRITON_INTERPRET=1")
def test_decode_through_the_triton_kernels_eager_and_graph(setup, monkeypatch):
    """The GPU decode path, with the Triton kernels in the interpreter: the compress launch rotates the
    queries (into the workspace under CUDA graphs), decode takes the metadata's split count and warp
    choice, eagerly and from the graph hooks' metadata; outputs match the reference path's."""
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    s = setup
    runner, pool, backend = s["runner"], s["pool"], s["backend"]
    for name in ("decode_workspace", "_workspace_bs", "_graph_md", "_graph_window", "_launches", "forward_metadata"):
        monkeypatch.setattr(backend, name, getattr(backend, name))
    monkeypatch.setattr(backend, "_graph_md", {})
    gen = torch.Generator().manual_seed(5)
    n = 10
    slots = runner.token_to_kv_pool_allocator.alloc(n + 1)
    r2t = runner.req_to_token_pool.req_to_token
    r2t[6, :n + 1] = slots.to(r2t.dtype)
    layers = s["layers"][1:]  # the quantized layers
    for layer in layers:
        pool.set_kv_buffer(layer, slots[:n], torch.randn(n, HKV, D, generator=gen).to(torch.bfloat16),
                           torch.randn(n, HKV, D, generator=gen).to(torch.bfloat16))
    qkv = [_qkv(gen, 1) for _ in layers]
    fb = decode_batch(runner, [6], [n + 1], slots[n:], backend)

    def run():
        return [layer(q, k, v, fb).float() for layer, (q, k, v) in zip(layers, qkv)]

    backend.init_forward_metadata(fb)
    ref = run()
    triton = KernelCalls("cpu", triton=True)
    monkeypatch.setattr(backend, "ops", triton)
    monkeypatch.setattr(pool, "ops", triton)
    monkeypatch.setattr(backend, "_launches", {})
    monkeypatch.setattr(backend, "num_sms", 4)
    backend.init_forward_metadata(fb)
    md = backend.forward_metadata
    assert md.launch == backend.decode_launch(1) and md.launch.num_splits >= 1 and md.workspace is None
    eager = run()
    backend.init_cuda_graph_state(2, 2)
    assert backend.decode_workspace is not None and backend._workspace_bs == 2
    req, lens = torch.zeros(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64)
    backend.init_forward_metadata_capture_cuda_graph(1, 1, req[:1], lens[:1], None, ForwardMode.DECODE, None)
    req[0], lens[0] = 6, n + 1
    backend.init_forward_metadata_replay_cuda_graph(1, req[:1], lens[:1], n + 1, None, ForwardMode.DECODE, None,
                                                    lens[:1].clone())
    md = backend.forward_metadata
    assert md.workspace is backend.decode_workspace and md.launch == backend.decode_launch(1)
    graph = run()
    for layer, a, b, c in zip(layers, ref, eager, graph):
        for name, o in (("eager", b), ("graph", c)):
            torch.testing.assert_close(o, a, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} layer {layer.layer_id}: {m}")
