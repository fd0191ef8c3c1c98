"""Sliding-window layers and attention sinks through TurboQuantAttnBackend (CPU, fake runner): a
gpt-oss-like stack (a sliding-window layer and a full one, both with sinks, one KV pool for all layers)
served through prefill, a chunked-prefill continuation and decode, each output against plain softmax
attention written here over the cache's dequantized K/V (decode: the recent window's positions exact),
with the recent window's ring off, shorter than the sliding window and longer. SGLang's
sliding_window_size W lets the query at position i see positions i - W .. i (its Triton extend kernel,
FlashInfer's window_left)."""
import os

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, sequence_kv,  # noqa: E402
                          random_qkv, sink_attention_row, tq_backend, write_tq_config)
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang_tq.kernel_calls import KernelCalls  # noqa: E402

HQ, HKV, D, W = 8, 2, 64, 6
CFG = """
name: test-sliding
seed: 3
defaults:
  k: {bits: 4}
  v: {bits: 4}
boundary: {first: 0, last: 0}
"""
TOL = 2e-2


@pytest.fixture(params=[0, 4, 16], ids=["no-ring", "ring-4", "ring-16"])
def setup(tmp_path, request):
    ring = request.param
    path = write_tq_config(tmp_path, CFG + (f"window: {{tokens: {ring}, requests: 4}}\n" if ring else ""))
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=128))
        runner.sliding_window_size = W  # what ModelRunner reads from the model
        pool = runner.build_pools(1024, max_running_requests=4)
        backend = tq_backend(runner)
    gen = torch.Generator().manual_seed(1)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0, sliding_window_size=W),
              RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=1)]
    sinks = [torch.randn(HQ, generator=gen) + 1.0 for _ in layers]
    assert backend.window == ring
    return dict(runner=runner, pool=pool, backend=backend, layers=layers, sinks=sinks, gen=gen, lens={}, ring=ring,
                start={}, exact={}, r2t=runner.req_to_token_pool.req_to_token)


def _qkv(gen, n):
    return random_qkv(gen, n, HQ, HKV, D)


def _decode_view(s, lid, r, n):
    """K/V of positions 0..n-1 of request r as decode reads them: from the codes (the first token from its
    exact row), and the recent window's positions (the last `ring`, none before the request's last extend
    began) exact."""
    k, v = sequence_kv(s["pool"], lid, s["r2t"][r, :n])
    if s["ring"]:
        for p in range(max(n - s["ring"], s["start"][r]), n):
            k[p], v[p] = s["exact"][lid, r, p]
    return k, v


def _window_lo(layer, pos):
    return max(0, pos - layer.sliding_window_size) if layer.sliding_window_size > -1 else 0


def _extend(s, reqs, prefix, new):
    backend, pool, r2t = s["backend"], s["pool"], s["r2t"]
    slots = s["runner"].token_to_kv_pool_allocator.alloc(sum(new))
    off = 0
    for r, p, n in zip(reqs, prefix, new):
        r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
        s["lens"][r], s["start"][r] = p + n, min(s["start"].get(r, p), p)  # a request's first extend sets it
        off += n
    fb = extend_batch(s["runner"], reqs, prefix, new, slots, backend)
    backend.init_forward_metadata(fb)
    for layer, sink in zip(s["layers"], s["sinks"]):
        q, k, v = _qkv(s["gen"], sum(new))
        o = layer(q, k, v, fb, sinks=sink).view(-1, HQ, D).float()
        q3, k3, v3 = (x.view(x.shape[0], -1, D).float() for x in (q, k, v))
        off = 0
        for r, p, n in zip(reqs, prefix, new):
            kp, vp = sequence_kv(pool, layer.layer_id, r2t[r, :p])
            keys, vals = torch.cat([kp, k3[off:off + n]]), torch.cat([vp, v3[off:off + n]])  # new tokens exact
            for i in range(n):
                pos = p + i
                s["exact"][layer.layer_id, r, pos] = (k3[off + i], v3[off + i])
                want = sink_attention_row(q3[off + i], keys[:pos + 1], vals[:pos + 1], sink, _window_lo(layer, pos))
                torch.testing.assert_close(o[off + i], want, atol=TOL, rtol=TOL,
                                           msg=lambda m: f"extend layer {layer.layer_id} req {r} pos {pos}: {m}")
            off += n


def _decode(s, reqs):
    backend, r2t = s["backend"], s["r2t"]
    slots = s["runner"].token_to_kv_pool_allocator.alloc(len(reqs))
    seq = []
    for r, slot in zip(reqs, slots.tolist()):
        r2t[r, s["lens"][r]] = slot
        s["lens"][r] += 1
        seq.append(s["lens"][r])
    fb = decode_batch(s["runner"], reqs, seq, slots, backend)
    backend.init_forward_metadata(fb)
    for layer, sink in zip(s["layers"], s["sinks"]):
        q, k, v = _qkv(s["gen"], len(reqs))
        o = layer(q, k, v, fb, sinks=sink).view(-1, HQ, D).float()
        for b, (r, n) in enumerate(zip(reqs, seq)):
            s["exact"][layer.layer_id, r, n - 1] = (k.view(-1, HKV, D)[b].float(), v.view(-1, HKV, D)[b].float())
            keys, vals = _decode_view(s, layer.layer_id, r, n)  # the new token too: read back from the cache
            want = sink_attention_row(q.view(-1, HQ, D)[b], keys, vals, sink, _window_lo(layer, n - 1))
            torch.testing.assert_close(o[b], want, atol=TOL, rtol=TOL,
                                       msg=lambda m: f"decode layer {layer.layer_id} req {r} len {n}: {m}")


def _serve(s):
    _extend(s, [0, 1], [0, 0], [13, 4])   # prompts: one longer than the window, one shorter
    _extend(s, [0], [13], [9])            # chunked-prefill continuation over a packed prefix
    for _ in range(3):
        _decode(s, [0, 1])


def test_sliding_window_and_sinks_reference_path(setup):
    _serve(setup)


def test_sinks_and_window_change_the_answer(setup):
    """The checks above can see a wrong window or a missing sink: with either dropped the expected
    rows move by more than the tolerance."""
    s = setup
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(HQ, D, generator=gen) * 2
    k, v = torch.randn(20, HKV, D, generator=gen), torch.randn(20, HKV, D, generator=gen)
    sink = s["sinks"][0]
    base = sink_attention_row(q, k, v, sink, 20 - 1 - W)
    assert (base - sink_attention_row(q, k, v, sink, 20 - W)).abs().max() > 5 * TOL   # one position fewer
    assert (base - sink_attention_row(q, k, v, sink - 50, 20 - 1 - W)).abs().max() > 5 * TOL  # no sink


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a GPU or under TRITON_INTERPRET=1")
def test_sliding_window_and_sinks_triton_path(setup, monkeypatch):
    """The same with the Triton kernels (as on a GPU): the prompts take the plain route, SGLang's own
    Triton extend kernel with the layer's window and sinks; the continuation and decode the
    TurboQuant kernels."""
    s = setup
    triton = KernelCalls("cpu", triton=True)
    monkeypatch.setattr(s["backend"], "ops", triton)
    monkeypatch.setattr(s["pool"], "ops", triton)
    monkeypatch.setattr(s["backend"], "plain_prefill", True)
    _serve(s)


def test_warm_up_compiles_the_sink_variants(setup, monkeypatch):
    """A model with attention sinks (gpt-oss: a `sinks` parameter per attention module, bf16 on this
    backend) gets every start-up extend variant again with sinks of that dtype, so the first request does
    not wait on their compilation; a model without sinks gets none."""
    from sglang_tq.backend import _model_sinks_dtype

    s = setup
    attn = torch.nn.Module()
    attn.sinks = torch.nn.Parameter(torch.zeros(HQ, dtype=torch.bfloat16), requires_grad=False)
    assert _model_sinks_dtype(torch.nn.Sequential(torch.nn.Linear(2, 2), attn)) == torch.bfloat16
    assert _model_sinks_dtype(torch.nn.Linear(2, 2)) is None and _model_sinks_dtype(None) is None
    calls = []
    monkeypatch.setattr(s["backend"].ops, "extend", lambda *a, **kw: calls.append(kw))
    plain = s["backend"].warm_extend_kernels(torch.bfloat16, block_ms=(32,))
    assert plain == len(calls) and all("sinks" not in kw for kw in calls)
    calls.clear()
    both = s["backend"].warm_extend_kernels(torch.bfloat16, block_ms=(32,), sinks_dtype=torch.bfloat16)
    with_sinks = [kw["sinks"] for kw in calls if "sinks" in kw]
    assert both == 2 * plain and len(with_sinks) == plain
    assert all(t.dtype == torch.bfloat16 and t.shape == (HQ,) for t in with_sinks)
