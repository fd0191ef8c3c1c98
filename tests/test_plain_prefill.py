"""The plain-prefill path of the backend (a batch without cached prefixes: attention over the new
bf16 K/V only, FlashInfer's ragged prefill or SGLang's Triton extend kernel) on a GPU against a torch
reference: q/k/v go in as the strided views of one qkv projection they are (no copies), grouped
queries, rows padded as a piecewise CUDA graph pads them (left untouched), soft-capping. Those cases
skip without CUDA (the FlashInfer ones also without FlashInfer); the view helper and the FlashInfer
planning are checked everywhere."""
import types

import pytest
import torch

from tq_kernels import reference

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (SGLang's Triton extend)")

HQ, HKV, D = 8, 2, 128


@needs_cuda
@pytest.mark.parametrize("kernel", ["triton", "flashinfer"])
@pytest.mark.parametrize("cap", [0.0, 30.0], ids=["nocap", "softcap"])
def test_plain_prefill_matches_reference(cap, kernel):
    from sglang_tq.backend import TurboQuantAttnBackend
    from sglang_tq.flashinfer_prefill import RaggedParams, RaggedPrefill

    dev = torch.device("cuda")
    from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd

    lens, pad = [37, 300, 1, 129], 11
    T = sum(lens)
    g = torch.Generator(device=dev).manual_seed(0)
    qkv = torch.randn(T + pad, (HQ + 2 * HKV) * D, device=dev, dtype=torch.bfloat16, generator=g)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)  # strided views, as the model hands them over
    qo = torch.zeros(len(lens) + 1, dtype=torch.int32, device=dev)
    qo[1:] = torch.tensor(lens, device=dev).cumsum(0)
    md = types.SimpleNamespace(qo_indptr=qo, kv_indptr=torch.zeros_like(qo), kv_indices=torch.zeros(1, dtype=torch.int64, device=dev),
                               custom_mask=None, mask_indptr=None, max_extend_len=max(lens))
    layer = types.SimpleNamespace(tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, qk_head_dim=D,
                                  v_head_dim=D, scaling=D ** -0.5, logit_capping_method="tanh", logit_cap=cap,
                                  xai_temperature_len=-1)
    ragged = None
    if kernel == "flashinfer":
        ragged = RaggedPrefill.create(dev, RaggedParams(HQ, HKV, D, D, torch.bfloat16, D ** -0.5, cap, True))
        if ragged is None:
            pytest.skip("FlashInfer is not importable here")
        ragged.plan(lens)
    backend = types.SimpleNamespace(_causal=lambda layer: True, ragged_prefill=ragged,
                                    _sliding_window=TurboQuantAttnBackend._sliding_window,
                                    bf16=types.SimpleNamespace(forward_metadata=md, extend_attention_fwd=extend_attention_fwd))
    o = TurboQuantAttnBackend._plain_extend(backend, q, k, v, layer, types.SimpleNamespace(ragged=ragged is not None))
    ref, _ = reference.new_token_attention(q[:T].view(T, HQ, D), k[:T].view(T, HKV, D), v[:T].view(T, HKV, D), qo,
                                           D ** -0.5, cap)
    err = (o[:T].view(T, HQ, D).float() - ref).norm() / ref.norm()
    assert err < 1e-2, f"rel err {err:.3e}"
    assert o.shape == (T + pad, HQ * D)


def test_head_rows_views_without_copy():
    """The strided slices of a qkv projection go to the kernel as views; a last dim that is not
    unit-stride is made contiguous (the kernel assumes it)."""
    from sglang_tq.backend import _head_rows

    qkv = torch.randn(5, (HQ + 2 * HKV) * D)
    q, k, _ = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    for x, h in ((q, HQ), (k, HKV)):
        r = _head_rows(x, h, D)
        assert r.shape == (5, h, D) and r.data_ptr() == x.data_ptr() and r.stride(-1) == 1
    t = torch.randn(5, D, HKV).transpose(1, 2)  # [5, HKV, D] with the last dim strided
    r = _head_rows(t, HKV, D)
    assert r.stride(-1) == 1 and torch.equal(r, t)


def test_ragged_prefill_plans_once_per_batch():
    """RaggedPrefill plans on host lengths (int32 indptr on the CPU: no device sync) with the model's fixed
    attention parameters, again only when the lengths change (the backend plans once per batch in its
    metadata), and runs on the batch's rows only (padding rows are not passed)."""
    from sglang_tq.flashinfer_prefill import RaggedParams, RaggedPrefill

    calls = []

    class FakeWrapper:
        def plan(self, qo, kv, hq, hkv, d, **kw):
            assert qo.device.type == "cpu" and qo.dtype == torch.int32 and torch.equal(qo, kv)
            calls.append(("plan", qo.tolist(), hq, hkv, d, kw["causal"], kw["logits_soft_cap"], kw["sm_scale"]))

        def run(self, q, k, v, out):
            assert q.shape[0] == k.shape[0] == v.shape[0] == out.shape[0]
            out.fill_(1.0)
            calls.append(("run", q.shape[0]))

    rp = RaggedPrefill.__new__(RaggedPrefill)
    rp.wrapper, rp._lens, rp._tokens = FakeWrapper(), None, 0
    rp.params = RaggedParams(HQ, HKV, D, D, torch.float32, 0.125, 30.0, True)
    qkv = torch.randn(12, (HQ + 2 * HKV) * D)
    q, k, v = (t.view(12, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))
    out = torch.zeros(12, HQ, D)
    for _batch in range(2):
        rp.plan([3, 6])
        for _layer in range(3):
            rp.run(q, k, v, out)
    assert calls == [("plan", [0, 3, 9], HQ, HKV, D, True, 30.0, 0.125)] + [("run", 9)] * 6
    assert torch.all(out[:9] == 1.0) and torch.all(out[9:] == 0.0)
    rp.plan([12])  # another batch: a new plan
    rp.run(q, k, v, out)
    assert [c[0] for c in calls[7:]] == ["plan", "run"] and calls[-2][1] == [0, 12] and calls[-1] == ("run", 12)
    assert RaggedPrefill.create("cpu", rp.params) is None


def test_ragged_prefill_only_for_uniform_attention_layers():
    """One FlashInfer plan per batch serves every layer, so the model's attention layers must share scale,
    soft-cap and causality, and none may use a Grok-style temperature (only SGLang's Triton kernel has it);
    else plain prefills stay on the Triton kernel."""
    pytest.importorskip("sglang")
    from sglang_tq.backend import TurboQuantAttnBackend

    backend = types.SimpleNamespace(_causal=lambda layer: True)

    def layer(scaling=0.1, cap=0.0, xai=-1):
        return types.SimpleNamespace(scaling=scaling, logit_capping_method="tanh", logit_cap=cap, xai_temperature_len=xai)

    def params(layers):
        return TurboQuantAttnBackend.ragged_attention_params(backend, layers)

    assert params([layer(), layer()]) == (0.1, 0.0, True)
    assert params([layer(cap=30.0)] * 2) == (0.1, 30.0, True)
    assert params([layer(), layer(scaling=0.2)]) is None
    assert params([layer(), layer(cap=30.0)]) is None
    assert params([layer(), layer(xai=1024)]) is None
    assert params([]) is None


@needs_cuda
@pytest.mark.parametrize("cap", [0.0, 30.0], ids=["nocap", "softcap"])
def test_flashinfer_lse_feeds_the_hybrid_extend(cap):
    """The hybrid extend on a GPU: FlashInfer's ragged prefill gives the new
    tokens' part and its lse, which must be log2 units as reference.new_token_attention's (the convention
    read from FlashInfer's source); extend_attention(new_part=) then merges it with the packed prefix to
    the reference's extend output."""
    from sglang_tq.flashinfer_prefill import RaggedParams, RaggedPrefill
    from tq_kernels.codec import VecFormat
    from tq_kernels.extend import extend_attention
    from kernel_helpers import alloc_cache, fill_random_kv, make_codecs, rel_err

    dev = torch.device("cuda")
    ragged = RaggedPrefill.create(dev, RaggedParams(HQ, HKV, D, D, torch.bfloat16, D ** -0.5, cap, True))
    if ragged is None:
        pytest.skip("FlashInfer is not importable here")
    fmt = VecFormat(D, 4)
    kc, vc = make_codecs(fmt, fmt, seed=2)
    gen = torch.Generator().manual_seed(11)
    pre, new = [300, 0, 129], [40, 17, 200]
    bufs = alloc_cache(fmt, fmt, sum(pre) + 9, HKV, dev)
    batch = fill_random_kv(pre, HKV, kc, vc, bufs, gen, dev)
    T = sum(new)
    qo = torch.zeros(len(new) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(new).cumsum(0)
    q = (torch.randn(T, HQ, D, generator=gen) * 2).to(torch.bfloat16)
    kn = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    vn = torch.randn(T, HKV, D, generator=gen).to(torch.bfloat16)
    sm = D ** -0.5
    o_new = torch.empty(T, HQ, D, device=dev, dtype=torch.bfloat16)
    lse = torch.empty(T, HQ, device=dev, dtype=torch.float32)
    ragged.plan(new)
    ragged.run(q.to(dev), kn.to(dev), vn.to(dev), o_new, lse=lse)
    o_ref, lse_ref = reference.new_token_attention(q, kn, vn, qo, sm, cap, True)
    assert rel_err(o_new.cpu().float(), o_ref) < 1e-2
    assert (lse.cpu() - lse_ref).abs().max() < 2e-2, "FlashInfer's lse is not in log2 units of the scores"
    out = torch.full((T, HQ, D), float("nan"), dtype=torch.bfloat16, device=dev)
    extend_attention(q.to(dev), kn.to(dev), vn.to(dev), *bufs, kc, vc, qo.to(dev), batch.kv_indptr,
                     batch.kv_indices, sm, cap, True, out, max_extend_len=max(new), new_part=(o_new, lse))
    ref = reference.extend_attention(q, kn, vn, *[b.cpu() for b in bufs], kc, vc, qo, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), sm, cap, True)
    assert rel_err(out.cpu().float(), ref.float()) < 2e-2
