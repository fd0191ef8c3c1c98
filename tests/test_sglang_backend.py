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

from sglang_fakes import FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, server_args, write_tq_config  # noqa: E402
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool  # noqa: E402
from sglang_tq.backend import TurboQuantAttnBackend  # noqa: E402
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
    with env(SGLANG_TQ_CONFIG=path):
        mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=128)
        runner = FakeRunner(mc)
        pool = runner.build_pools(512, max_running_requests=8)
        backend = TurboQuantAttnBackend(runner)
        ref_runner = FakeRunner(mc, server_args(attention_backend="torch_native"))
        ref_pool = ref_runner.build_pools(512, max_running_requests=8)
        ref_runner.req_to_token_pool = runner.req_to_token_pool  # same slot mapping for both
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
    """Copy the TurboQuant cache rows `slots` (dequantized) into the reference pool."""
    pool, ref_pool = s["pool"], s["ref_pool"]
    for lid in range(NUM_LAYERS):
        if not pool.is_quantized(lid):
            continue
        kb, vb = pool.get_kv_buffer(lid)
        kd = _uncentered(pool, lid, kb.codec.decode(kb.codes[slots], kb.scales[slots]))
        ref_pool.k_buffer[lid][slots] = kd.to(torch.bfloat16)
        ref_pool.v_buffer[lid][slots] = vb.codec.decode(vb.codes[slots], vb.scales[slots]).to(torch.bfloat16)


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
    fb2, slots2, _ = _run_extend(s, [1, 2, 3], [8, 5, 12], [6, 4, 1])
    s["lens"].update({1: 14, 2: 9, 3: 13})
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
    """SGLANG_TQ_PREFILL_FROM_CACHE=1: extend attends to the new tokens' K/V as stored (dequantized)."""
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


def test_batch_invariant_split_count(setup, monkeypatch):
    """SGLANG_TQ_BATCH_INVARIANT=1: every decode batch size gets batch size 1's split count (a sequence's
    split-K partition then depends on its length only); otherwise the count falls as batches grow."""
    backend = setup["backend"]

    monkeypatch.setattr(backend, "on_cuda", True)  # the split count is a GPU-path choice
    monkeypatch.setattr(backend, "num_sms", 132)
    monkeypatch.setattr(backend, "max_context_len", 16960)
    for invariant in (False, True):
        monkeypatch.setattr(backend, "batch_invariant", invariant)
        monkeypatch.setattr(backend, "_splits", {})
        counts = {bs: backend.num_splits(bs) for bs in (1, 64, 512)}
        if invariant:
            assert counts[1] == counts[64] == counts[512] > 1
        else:
            assert counts[1] > counts[64] > counts[512]


def test_deterministic_inference_turns_on_batch_invariance(tmp_path):
    """--enable-deterministic-inference (SGLang's batch-invariant GEMMs and norms) also makes our
    decode split-K batch-invariant, as SGLANG_TQ_BATCH_INVARIANT=1 does."""
    path = write_tq_config(tmp_path, CFG)
    mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=128)
    for flag in (False, True):
        with env(SGLANG_TQ_CONFIG=path, SGLANG_TQ_BATCH_INVARIANT=None):
            r = FakeRunner(mc, server_args(enable_deterministic_inference=flag))
            r.build_pools(64, max_running_requests=2)
            assert TurboQuantAttnBackend(r).batch_invariant is flag


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="SGLang's Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_extend_without_cached_prefix_takes_the_plain_kernel(setup):
    """A prefill batch in which no sequence has a cached prefix never reads the packed cache: the
    backend's GPU path hands it to SGLang's own Triton extend kernel over the new bf16 K/V (run here in
    the interpreter), which must match the reference; a batch with a prefix must not take that path."""
    s = setup
    runner, ref_runner, backend = s["runner"], s["ref_runner"], s["backend"]
    r2t = runner.req_to_token_pool.req_to_token
    new = [7, 12]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t[4, :7] = slots[:7].to(r2t.dtype)
    r2t[7, :12] = slots[7:].to(r2t.dtype)
    fb = extend_batch(runner, [4, 7], [0, 0], new, slots, backend)
    fb_ref = extend_batch(ref_runner, [4, 7], [0, 0], new, slots, s["ref"])
    assert backend._no_cached_prefix(fb)
    assert not backend._no_cached_prefix(extend_batch(runner, [4, 7], [3, 0], new, slots, backend))
    backend.init_forward_metadata(fb)
    s["ref"].init_forward_metadata(fb_ref)
    for layer in s["layers"][1:]:  # the quantized layers
        q, k, v = _qkv(s["gen"], sum(new))
        o = backend._plain_extend(q, k, v, q.new_empty(sum(new), HQ * D), layer)
        o_ref = layer(q, k, v, fb_ref)
        torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL)


def test_model_logit_caps():
    """The warm-up's soft-cap variants come from the model's attention layers."""
    from sglang_tq.backend import _model_logit_caps

    plain = torch.nn.ModuleList([RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(2)])
    capped = torch.nn.ModuleList([RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0, logit_cap=30.0)])
    assert _model_logit_caps(None) == (0.0,) and _model_logit_caps(plain) == (0.0,)
    assert _model_logit_caps(capped) == (0.0, 30.0)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_warm_extend_kernels_runs_each_variant_once(setup):
    """The start-up warm-up (run on CUDA in __init__) calls the Triton extend kernel once per distinct
    (K format, V format) of the quantized layers, per block size and with and without GQA packing (a
    group of 3 here) and per prefix split count (1, and 2 where the kernel splits by itself), over
    slot 0, with the parent's own indptr buffers (the dtypes serving passes). It compresses a
    prefill-sized batch into slot 0 (SGLang's padding slot) and leaves every other cache row as it was."""
    from tq_kernels import ops

    s = setup
    backend, pool = s["backend"], s["pool"]
    before = [t.clone() for t in pool._all_tensors("k") + pool._all_tensors("v")]
    calls = []

    def recording(q, k, v, kc, ks, vc, vs, kcodec, vcodec, qo, kvp, kvi, scale, **kw):
        out = ops.TRITON.extend_attention(q, k, v, kc, ks, vc, vs, kcodec, vcodec, qo, kvp, kvi, scale, **kw)
        assert out.shape == (q.shape[0], HQ, D) and torch.isfinite(out).all()
        assert qo.dtype == backend.qo_indptr.dtype and kvp.dtype == backend.kv_indptr.dtype
        calls.append((kcodec.fmt, vcodec.fmt, kw["block_m"], kw["logit_cap"], kw["gqa_pack"],
                      kw.get("num_splits", 1)))
        return out

    splits = (1, 2)  # the kernel splits the prefix by itself where the grid is small
    n = 12 * len(splits)
    saved = backend._extend
    backend._extend = recording
    try:
        runs = backend.warm_extend_kernels(torch.bfloat16, block_ms=(32, 64))
        assert runs == len(calls) == n
        runs = backend.warm_extend_kernels(torch.bfloat16, block_ms=(32,), logit_caps=(0.0, 30.0))
    finally:
        backend._extend = saved
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


def test_env_switches_reach_the_kernels(setup):
    """SGLANG_TQ_EXTEND_SPLITS (read when the backend is built; unset: the kernel chooses) and the
    start-up warm-up: the split variant is compiled unless splits are off. Batch-invariant runs never
    split."""
    s = setup
    runner = s["runner"]
    for value, want in (("1", {1, 2}), ("0", {1})):
        with env(SGLANG_TQ_EXTEND_SPLITS=value):
            b = TurboQuantAttnBackend(runner)
        assert b.extend_splits is (value == "1")
        calls = []
        b._extend = lambda *a, **kw: calls.append(kw)
        b.warm_extend_kernels(torch.bfloat16, block_ms=(32,))
        assert {kw.get("num_splits", 1) for kw in calls} == want
    with env(SGLANG_TQ_EXTEND_SPLITS="1", SGLANG_TQ_BATCH_INVARIANT="1"):
        assert TurboQuantAttnBackend(runner).extend_splits is None
    plain = TurboQuantAttnBackend(runner)
    assert plain.extend_splits is None
    hb = TurboQuantAttnBackend(runner)  # on by default, but it needs FlashInfer's prefill: never on the CPU
    assert hb.ragged_prefill is None and not hb.hybrid_extend
    hb.hybrid_extend, calls = True, []  # as on a GPU: the warm-up also compiles the prefix-only variant
    hb._extend = lambda *a, **kw: calls.append(kw)
    hb.warm_extend_kernels(torch.bfloat16, block_ms=(32, 64))
    assert sum("new_part" in kw for kw in calls) == 2 * 3  # block sizes x K/V format pairs


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton extend kernel runs on a GPU or under TRITON_INTERPRET=1")
def test_hybrid_extend_matches_single_kernel(setup, monkeypatch):
    """SGLANG_TQ_HYBRID_EXTEND: the new tokens' attention from the plain-prefill kernel (a torch stand-in
    for FlashInfer here: called with the batch's lengths, keys centered like the cache's, an lse buffer)
    plus the prefix-only TurboQuant kernel gives the one-kernel extend's output (a radix-hit sequence
    and a fresh one, with and without key centering)."""
    import sglang_tq.backend as backend_mod
    from tq_kernels import ops, reference

    s = setup
    runner, pool, backend = s["runner"], s["pool"], s["backend"]
    calls = []

    class TorchRagged:
        def run(self, q3, k3, v3, out3, lens, sm_scale, cap, causal, lse=None):
            n = sum(lens)
            qo = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
            o, l2 = reference.new_token_attention(q3[:n], k3[:n], v3[:n], qo, sm_scale, cap, causal)
            out3[:n] = o.to(out3.dtype)
            lse[:n] = l2
            calls.append((list(lens), k3[:n].float().clone()))

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
    saved = backend._extend, backend.ragged_prefill, backend.hybrid_extend
    backend._extend, backend.ragged_prefill = ops.TRITON.extend_attention, TorchRagged()
    try:
        for layer in s["layers"][1:]:  # the quantized layers
            q, k, v = _qkv(s["gen"], sum(new))
            outs = []
            for hybrid in (False, True):
                backend.hybrid_extend = hybrid
                fb = extend_batch(runner, [7, 4], [6, 0], new, slots, backend)
                backend.init_forward_metadata(fb)
                outs.append(layer(q, k, v, fb).float())
            assert calls and calls[-1][0] == new
            mu = pool.key_mean(layer.layer_id)
            k_sent = k.view(-1, HKV, D).float() - (mu if mu is not None else 0.0)
            assert ((calls[-1][1] - k_sent).norm() / k_sent.norm()).item() < 1e-2  # centered (bf16 rounding)
            err = ((outs[0] - outs[1]).norm() / outs[0].norm()).item()
            assert err < 2e-2, f"layer {layer.layer_id}: {err:.3e}"
    finally:
        backend._extend, backend.ragged_prefill, backend.hybrid_extend = saved


def test_plain_prefill_falls_back_when_flashinfer_fails(setup):
    """The start-up run of FlashInfer's prefill (with an lse, per soft-cap) switches plain prefills and the
    hybrid extend back to SGLang's Triton path when FlashInfer cannot serve the model."""
    backend = setup["backend"]
    seen = []

    class Ok:
        def run(self, q3, k3, v3, out3, lens, sm_scale, cap, causal, lse=None):
            assert lse is not None and lens == [2] and causal
            seen.append(cap)

    class Broken:
        def run(self, *a, **kw):
            raise RuntimeError("no kernel for this head size")

    saved = backend.ragged_prefill, backend.hybrid_extend
    try:
        backend.ragged_prefill, backend.hybrid_extend = Ok(), True
        assert backend.warm_plain_prefill(torch.bfloat16, logit_caps=(0.0, 30.0)) and seen == [0.0, 30.0]
        assert backend.ragged_prefill is not None and backend.hybrid_extend
        backend.ragged_prefill = Broken()
        assert not backend.warm_plain_prefill(torch.bfloat16)
        assert backend.ragged_prefill is None and not backend.hybrid_extend
    finally:
        backend.ragged_prefill, backend.hybrid_extend = saved
