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
    from sglang_tq.flashinfer_prefill import RaggedPrefill

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
    ragged = RaggedPrefill.create(dev) if kernel == "flashinfer" else None
    if kernel == "flashinfer" and ragged is None:
        pytest.skip("FlashInfer is not importable here")
    backend = types.SimpleNamespace(forward_metadata=md, _causal=lambda layer: True, ragged_prefill=ragged,
                                    extend_attention_fwd=extend_attention_fwd)
    for name in ("_ragged_ok", "_ragged_lens", "_ragged_run"):
        setattr(backend, name, types.MethodType(getattr(TurboQuantAttnBackend, name), backend))
    o = torch.full((T + pad, HQ * D), 7.0, device=dev, dtype=torch.bfloat16)
    fb = types.SimpleNamespace(extend_seq_lens_cpu=lens)
    ret = TurboQuantAttnBackend._plain_extend(backend, q, k, v, o, layer, fb)
    assert ret is o
    ref, _ = reference.new_token_attention(q[:T].view(T, HQ, D), k[:T].view(T, HKV, D), v[:T].view(T, HKV, D), qo,
                                           D ** -0.5, cap)
    err = (o[:T].view(T, HQ, D).float() - ref).norm() / ref.norm()
    assert err < 1e-2, f"rel err {err:.3e}"
    assert torch.all(o[T:] == 7.0), "padded rows were written"


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
    """RaggedPrefill plans on host lengths (int32 indptr on the CPU: no device sync) once per distinct
    batch and layer parameters, and runs on the batch's rows only (padding rows are not passed)."""
    from sglang_tq.flashinfer_prefill import RaggedPrefill

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
    rp.wrapper, rp._planned = FakeWrapper(), None
    qkv = torch.randn(12, (HQ + 2 * HKV) * D)
    q, k, v = (t.view(12, -1, D) for t in qkv.split([HQ * D, HKV * D, HKV * D], dim=-1))
    out = torch.zeros(12, HQ, D)
    for _layer in range(3):
        rp.run(q, k, v, out, [3, 6], 0.125, 0.0, True)
    assert calls == [("plan", [0, 3, 9], HQ, HKV, D, True, 0.0, 0.125)] + [("run", 9)] * 3
    assert torch.all(out[:9] == 1.0) and torch.all(out[9:] == 0.0)
    rp.run(q, k, v, out, [3, 6], 0.125, 30.0, True)  # another soft-cap: a new plan
    rp.run(q, k, v, out, [12], 0.125, 30.0, True)  # another batch: a new plan
    assert [c[0] for c in calls[4:]] == ["plan", "run", "plan", "run"] and calls[-2][1] == [0, 12]
    assert RaggedPrefill.create("cpu") is None


def test_plain_extend_routes_to_flashinfer_only_when_it_can():
    """The plain prefill goes to FlashInfer's ragged prefill with the batch's host lengths, except with a
    custom mask or a Grok-style attention temperature (only SGLang's Triton kernel has those), or without
    host lengths; then the Triton kernel runs."""
    pytest.importorskip("sglang")
    from sglang_tq.backend import TurboQuantAttnBackend

    calls = []

    class Ragged:
        def run(self, q3, k3, v3, out3, lens, scale, cap, causal, lse=None):
            calls.append(("flashinfer", list(lens), q3.shape, k3.shape))

    def triton(*a, **kw):
        calls.append(("triton",))

    layer = types.SimpleNamespace(tp_q_head_num=HQ, tp_k_head_num=HKV, tp_v_head_num=HKV, qk_head_dim=D,
                                  v_head_dim=D, scaling=0.1, logit_capping_method="tanh", logit_cap=0.0,
                                  xai_temperature_len=-1)
    qkv = torch.randn(10, (HQ + 2 * HKV) * D)
    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], dim=-1)
    o = torch.empty(10, HQ * D)
    md = types.SimpleNamespace(qo_indptr=None, kv_indptr=None, kv_indices=None, custom_mask=None, mask_indptr=None,
                               max_extend_len=6)
    backend = types.SimpleNamespace(forward_metadata=md, _causal=lambda layer: True, ragged_prefill=Ragged(),
                                    extend_attention_fwd=triton)
    for name in ("_ragged_ok", "_ragged_lens", "_ragged_run"):
        setattr(backend, name, types.MethodType(getattr(TurboQuantAttnBackend, name), backend))
    fb = types.SimpleNamespace(extend_seq_lens_cpu=[4, 6])
    assert TurboQuantAttnBackend._plain_extend(backend, q, k, v, o, layer, fb) is o
    assert calls[-1] == ("flashinfer", [4, 6], (10, HQ, D), (10, HKV, D))
    md.custom_mask = torch.ones(3, dtype=torch.bool)
    TurboQuantAttnBackend._plain_extend(backend, q, k, v, o, layer, fb)
    md.custom_mask = None
    layer.xai_temperature_len = 1024
    TurboQuantAttnBackend._plain_extend(backend, q, k, v, o, layer, fb)
    layer.xai_temperature_len = -1
    TurboQuantAttnBackend._plain_extend(backend, q, k, v, o, layer, types.SimpleNamespace())
    assert [c[0] for c in calls] == ["flashinfer", "triton", "triton", "triton"]


@needs_cuda
@pytest.mark.parametrize("cap", [0.0, 30.0], ids=["nocap", "softcap"])
def test_flashinfer_lse_feeds_the_hybrid_extend(cap):
    """The hybrid extend (SGLANG_TQ_HYBRID_EXTEND) on a GPU: FlashInfer's ragged prefill gives the new
    tokens' part and its lse, which must be log2 units as reference.new_token_attention's (the convention
    read from FlashInfer's source); extend_attention(new_part=) then merges it with the packed prefix to
    the reference's extend output."""
    from sglang_tq.flashinfer_prefill import RaggedPrefill
    from tq_kernels.codec import VecFormat
    from tq_kernels.extend import extend_attention
    from kernel_helpers import alloc_cache, fill_random_kv, make_codecs, rel_err

    dev = torch.device("cuda")
    ragged = RaggedPrefill.create(dev)
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
    ragged.run(q.to(dev), kn.to(dev), vn.to(dev), o_new, new, sm, cap, True, lse=lse)
    o_ref, lse_ref = reference.new_token_attention(q, kn, vn, qo, sm, cap, True)
    assert rel_err(o_new.cpu().float(), o_ref) < 1e-2
    assert (lse.cpu() - lse_ref).abs().max() < 2e-2, "FlashInfer's lse is not in log2 units of the scores"
    out = torch.full((T, HQ, D), float("nan"), dtype=torch.bfloat16, device=dev)
    extend_attention(q.to(dev), kn.to(dev), vn.to(dev), *bufs, kc, vc, qo.to(dev), batch.kv_indptr,
                     batch.kv_indices, sm, cap, True, out, max_extend_len=max(new), new_part=(o_new, lse))
    ref = reference.extend_attention(q, kn, vn, *[b.cpu() for b in bufs], kc, vc, qo, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), sm, cap, True)
    assert rel_err(out.cpu().float(), ref.float()) < 2e-2
