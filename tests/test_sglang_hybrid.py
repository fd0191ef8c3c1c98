"""Hybrid KV layouts through SGLang's real ModelRunnerKVCacheMixin (fake runner, CPU):

* hybrid SWA memory (gpt-oss): TQSWAKVPool with a full-attention and a sliding-window TQTokenToKVPool,
  SGLang's SWATokenToKVPoolAllocator translating slots; the split of the memory between the two pools by
  the plan's bytes; a sliding-window and a full layer with sinks served through prefill, a chunked-prefill
  continuation and decode (the sliding-window layer reads its window through translated slots) against
  plain softmax attention over the cache's dequantized K/V;
* linear-attention hybrids (Qwen3-Next / Qwen3.5): TQHybridLinearKVPool holding the attention layers
  (model layer ids) next to SGLang's recurrent-state pool; capacity over the attention layers only;
  YAML layer indices; the attention layers served by the backend under their model layer ids."""
import os

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, first_token_cut,  # noqa: E402
                          random_qkv, sequence_kv, server_args, sink_attention_row, tq_backend, write_tq_config)
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.swa_memory_pool import SWATokenToKVPoolAllocator  # noqa: E402
from sglang_tq.config import TQConfigError  # noqa: E402
from sglang_tq.kernel_calls import KernelCalls  # noqa: E402
from sglang_tq.pool import TQHybridLinearKVPool, TQLayerBuffer, TQSWAKVPool  # noqa: E402

HQ, HKV, D, W = 8, 2, 64, 6
TQ_ALL = "name: all-tq\nseed: 3\nboundary: {first: 0, last: 0}\n"
TOL = 2e-2


# ------------------------------------------------------------------------------------------------
# Hybrid SWA memory
# ------------------------------------------------------------------------------------------------
def _swa_model(num_layers=4):
    """gpt-oss's layout: sliding-window layers 0, 2, ..., full layers 1, 3, ..."""
    mc = FakeModelConfig(num_layers, HQ, HKV, D, context_len=128)
    mc.is_hybrid_swa = True
    mc.swa_attention_layer_ids = list(range(0, num_layers, 2))
    mc.full_attention_layer_ids = list(range(1, num_layers, 2))
    mc.swa_head_dim = mc.swa_v_head_dim = D
    mc.hf_text_config = type("T", (), {"layer_types": ["sliding_attention", "full_attention"] * (num_layers // 2)})()
    mc.get_swa_num_kv_heads = mc.get_num_kv_heads
    return mc


def _swa_runner(cfg_path, backend="turboquant", num_layers=4, ratio=0.5):
    with env(SGLANG_TQ_CONFIG=cfg_path):
        r = FakeRunner(_swa_model(num_layers), server_args(attention_backend=backend, swa_full_tokens_ratio=ratio))
    r.is_hybrid_swa = True
    r.sliding_window_size = W
    return r


def _build_swa(r, full, swa, cfg_path, requests=4):
    r.full_max_total_num_tokens, r.swa_max_total_num_tokens = full, swa
    with env(SGLANG_TQ_CONFIG=cfg_path):
        return r.build_pools(full, max_running_requests=requests)


def test_hybrid_swa_pool_layout(tmp_path):
    """Each layer in its pool and format (sliding: bf16 keeps the sliding-window layers exact), SGLang's
    SWA allocator over both pools, the wrapper never claiming bf16 (fused KV writes check it)."""
    path = write_tq_config(tmp_path, TQ_ALL + "sliding: {format: bf16}\n")
    r = _swa_runner(path)
    pool = _build_swa(r, 256, 96, path)
    assert isinstance(pool, TQSWAKVPool) and isinstance(r.token_to_kv_pool_allocator, SWATokenToKVPoolAllocator)
    assert pool.swa_kv_pool.layer_ids == [0, 2] and pool.full_kv_pool.layer_ids == [1, 3]
    # the exact first token's tables and flags (full layers only) come out of the budget, both pools in proportion
    F, S = (r._tq_plan.layers_bytes_per_token(HKV, ids) for ids in ([1, 3], [0, 2]))
    full = 256 - first_token_cut(r, [1, 3], 256, F + 96 / 256 * S)
    assert pool.full_kv_pool.size == full < 256 and pool.swa_kv_pool.size == int(96 * full / 256)
    assert pool.full_kv_pool.first_token and not pool.swa_kv_pool.first_token
    assert pool.dtype == torch.uint8 and pool.model_dtype == torch.bfloat16
    for lid in (0, 2):
        assert not pool.is_quantized(lid) and pool.get_key_buffer(lid).shape == (pool.swa_kv_pool.size + 1, HKV, D)
    for lid in (1, 3):
        assert pool.is_quantized(lid) and isinstance(pool.get_key_buffer(lid), TQLayerBuffer)
        assert pool.get_key_buffer(lid).codes.shape[0] == full + 1
    assert pool.quantized_layer_ids == [1, 3]


def test_hybrid_swa_set_kv_buffer_translates_sliding_layers(tmp_path):
    """A sliding-window layer's new K/V land in its own pool's slot (the allocator's mapping), a full
    layer's in the full pool's slot."""
    path = write_tq_config(tmp_path, TQ_ALL + "sliding: {format: bf16}\n")
    r = _swa_runner(path)
    pool = _build_swa(r, 64, 32, path)
    alloc = r.token_to_kv_pool_allocator
    loc = alloc.alloc(3)
    alloc.full_to_swa_index_mapping[loc] = loc + 10  # as after evictions: the two pools' slot ids differ
    swa_loc = alloc.translate_loc_from_full_to_swa(loc).long()
    assert torch.equal(swa_loc, loc + 10)
    k = torch.randn(3, HKV, D).to(torch.bfloat16)
    layer = RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=2, sliding_window_size=W)
    pool.set_kv_buffer(layer, loc, k, k)
    assert torch.equal(pool.get_key_buffer(2)[swa_loc], k)
    assert pool.get_key_buffer(2)[loc].abs().sum() == 0


@pytest.mark.parametrize("sliding", ["tq", "bf16"])
def test_hybrid_swa_capacity_split_by_bytes(tmp_path, sliding):
    """SGLang splits the profiled memory so that swa_tokens = ratio x full_tokens and both pools fill it;
    with the plan's bytes the full pool's tokens over BF16's are the bytes ratio weighted the same way."""
    path = write_tq_config(tmp_path, TQ_ALL + f"sliding: {{format: {sliding}}}\n")
    ratio = 0.5
    tq, bf = _swa_runner(path, ratio=ratio), _swa_runner(path, "triton", ratio=ratio)
    with env(SGLANG_TQ_CONFIG=path):
        cap_tq, cap_bf = tq.profile_tokens(0.01), bf.profile_tokens(0.01)
        _, full_tq, swa_tq = tq._resolve_hybrid_swa_tokens(cap_tq)
    _, full_bf, swa_bf = bf._resolve_hybrid_swa_tokens(cap_bf)
    plan = tq._tq_plan
    F, S = (plan.layers_bytes_per_token(HKV, ids) for ids in ([1, 3], [0, 2]))
    memory = int(0.01 * (1 << 30))
    assert full_tq * F + swa_tq * S <= memory < (full_tq + 1) * F + (swa_tq + 1) * S
    assert swa_tq == int(full_tq * ratio)
    bf16_layer = HKV * 2 * D * 2
    byte_ratio = (2 * bf16_layer + ratio * 2 * bf16_layer) / (F + ratio * S)
    assert full_tq / full_bf == pytest.approx(byte_ratio, rel=1e-3)
    if sliding == "bf16":
        assert S == 2 * bf16_layer and byte_ratio < 2.0
    else:
        assert S == F and byte_ratio == pytest.approx(plan.compression_ratio())


def test_hybrid_swa_ring_serves_full_layers_only(tmp_path):
    """The recent window's ring is taken out of the budget for the full-attention layers alone, and both
    pools shrink in proportion."""
    path = write_tq_config(tmp_path, TQ_ALL + "window: {tokens: 4, requests: 2}\n")
    r = _swa_runner(path)
    pool = _build_swa(r, 400, 200, path, requests=2)
    assert pool.full_kv_pool.window_size == 4 and pool.swa_kv_pool.window_size == 0
    assert pool.window_buffers(2) == (None, None) and pool.window_buffers(1)[0].shape == (8, HKV, D)
    assert pool.window_start is pool.full_kv_pool.window_start
    assert pool.full_kv_pool.size < 400 and pool.swa_kv_pool.size == int(200 * pool.full_kv_pool.size / 400)
    F = r._tq_plan.layers_bytes_per_token(HKV, [1, 3])
    ring = 2 * 4 * 2 * HKV * 2 * D * 2  # 2 requests x 4 tokens x 2 full layers, bf16 K + V
    assert (400 - pool.full_kv_pool.size) == first_token_cut(r, [1, 3], 400, int(F + 0.5 * F), ring)


# -- serving through the backend ------------------------------------------------------------------
def _qkv(gen, n):
    return random_qkv(gen, n, HQ, HKV, D)


class _SWAServer:
    """gpt-oss's stack in two layers: layer 0 sliding (window W), layer 1 full, both with sinks."""

    def __init__(self, tmp_path, swa_tokens=64):
        path = write_tq_config(tmp_path, TQ_ALL)
        self.runner = r = _swa_runner(path, num_layers=2)
        self.pool = _build_swa(r, 256, swa_tokens, path)
        with env(SGLANG_TQ_CONFIG=path):
            self.backend = tq_backend(r)
        self.alloc = r.token_to_kv_pool_allocator
        self.gen = torch.Generator().manual_seed(1)
        self.layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0, sliding_window_size=W),
                       RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=1)]
        self.sinks = [torch.randn(HQ, generator=self.gen) + 1.0 for _ in self.layers]
        self.r2t = r.req_to_token_pool.req_to_token
        self.lens = {}

    def slots(self, lid, r, n):
        """Pool slots of positions 0..n-1 of request r in layer lid's pool."""
        full = self.r2t[r, :n].long()
        return self.alloc.translate_loc_from_full_to_swa(full).long() if lid == 0 else full

    def lo(self, layer, pos):
        return max(0, pos - layer.sliding_window_size) if layer.sliding_window_size > -1 else 0

    def extend(self, reqs, prefix, new):
        loc = self.alloc.alloc(sum(new))
        off = 0
        for r, p, n in zip(reqs, prefix, new):
            self.r2t[r, p:p + n] = loc[off:off + n].to(self.r2t.dtype)
            self.lens[r] = p + n
            off += n
        fb = extend_batch(self.runner, reqs, prefix, new, loc, self.backend)
        fb.out_cache_loc_swa = self.alloc.translate_loc_from_full_to_swa(loc)  # as ForwardBatch.init_new does
        self.backend.init_forward_metadata(fb)
        for layer, sink in zip(self.layers, self.sinks):
            q, k, v = _qkv(self.gen, sum(new))
            o = layer(q, k, v, fb, sinks=sink).view(-1, HQ, D).float()
            q3, k3, v3 = (x.view(x.shape[0], -1, D).float() for x in (q, k, v))
            off = 0
            for r, p, n in zip(reqs, prefix, new):
                lo_all = self.lo(layer, p)  # older positions may be gone from the sliding-window pool
                kp, vp = sequence_kv(self.pool, layer.layer_id, self.slots(layer.layer_id, r, p)[lo_all:])
                keys, vals = torch.cat([kp, k3[off:off + n]]), torch.cat([vp, v3[off:off + n]])
                for i in range(n):
                    pos = p + i
                    want = sink_attention_row(q3[off + i], keys[:pos + 1 - lo_all], vals[:pos + 1 - lo_all], sink,
                                         self.lo(layer, pos) - lo_all)
                    torch.testing.assert_close(o[off + i], want, atol=TOL, rtol=TOL,
                                               msg=lambda m: f"extend layer {layer.layer_id} req {r} pos {pos}: {m}")
                off += n

    def evict(self, r, keep_from):
        """What SGLang's _evict_swa does: free the sliding-window slots of positions before keep_from."""
        self.alloc.free_swa(self.r2t[r, :keep_from])

    def decode(self, reqs, graph=False):
        """graph: read the metadata a CUDA graph replay of this batch builds (static buffers)."""
        loc = self.alloc.alloc(len(reqs))
        seq = []
        for r, slot in zip(reqs, loc.tolist()):
            self.r2t[r, self.lens[r]] = slot
            self.lens[r] += 1
            seq.append(self.lens[r])
        fb = decode_batch(self.runner, reqs, seq, loc, self.backend)
        self.backend.init_forward_metadata(fb)
        if graph:
            self.backend.forward_metadata = self.backend._graph_metadata(
                len(reqs), fb.req_pool_indices, fb.seq_lens, fb.forward_mode)
            assert self.backend.forward_metadata.swa_kv_indices.data_ptr() == \
                self.backend._graph_swa_kv_indices.data_ptr()
        md = self.backend.forward_metadata
        assert md.swa_kv_indptr.tolist() == [0] + torch.cumsum(torch.tensor([min(n, W + 1) for n in seq]), 0).tolist()
        for layer, sink in zip(self.layers, self.sinks):
            q, k, v = _qkv(self.gen, len(reqs))
            o = layer(q, k, v, fb, sinks=sink).view(-1, HQ, D).float()
            for b, (r, n) in enumerate(zip(reqs, seq)):
                lo = self.lo(layer, n - 1)
                keys, vals = sequence_kv(self.pool, layer.layer_id, self.slots(layer.layer_id, r, n)[lo:])
                want = sink_attention_row(q.view(-1, HQ, D)[b], keys, vals, sink, 0)
                torch.testing.assert_close(o[b], want, atol=TOL, rtol=TOL,
                                           msg=lambda m: f"decode layer {layer.layer_id} req {r} len {n}: {m}")


def test_hybrid_swa_serving_reference_path(tmp_path):
    s = _SWAServer(tmp_path)
    s.extend([0, 1], [0, 0], [13, 4])   # one prompt longer than the window, one shorter
    s.extend([0], [13], [9])            # chunked-prefill continuation over a packed prefix
    for _ in range(3):
        s.decode([0, 1])
    s.evict(0, s.lens[0] - 1 - W)       # SGLang's eviction keeps the last W + 1 positions
    for _ in range(2):
        s.decode([0, 1])
    s.backend.init_cuda_graph_state(4, 4)
    for _ in range(2):                  # as a CUDA-graph replay reads them
        s.decode([0, 1], graph=True)


def test_hybrid_swa_windows_read_only_kept_slots(tmp_path):
    """After eviction the freed sliding-window slots are handed out again and overwritten: decode and a
    continuation still match, so the sliding-window layer reads nothing outside its window."""
    s = _SWAServer(tmp_path, swa_tokens=30)  # 28 slots once the first token's tables are reserved
    assert s.pool.swa_kv_pool.size == 28
    s.extend([0], [0], [20])
    s.evict(0, 20 - W)
    s.extend([1], [0], [16])            # takes the freed slots
    s.decode([0, 1])
    s.extend([0], [s.lens[0]], [3])


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton kernels run on a GPU or under TRITON_INTERPRET=1")
def test_hybrid_swa_serving_triton_path(tmp_path, monkeypatch):
    """The same with the Triton kernels (as on a GPU): prompts through SGLang's Triton extend kernel, the
    continuation, decode and the compress into both pools through the TurboQuant kernels."""
    s = _SWAServer(tmp_path)
    triton = KernelCalls("cpu", triton=True)
    for obj in [s.backend, s.pool] + s.pool.tq_subpools:
        monkeypatch.setattr(obj, "ops", triton)
    monkeypatch.setattr(s.backend, "plain_prefill", True)
    s.extend([0, 1], [0, 0], [13, 4])
    s.extend([0], [13], [9])
    s.evict(0, s.lens[0] - 1 - W)
    for _ in range(2):
        s.decode([0, 1])


def test_hybrid_swa_graph_metadata_uses_static_buffers(tmp_path):
    """CUDA-graph decode: the sliding-window slots go to the static buffer allocated before capture, refilled
    at replay with the replayed batch's windows."""
    s = _SWAServer(tmp_path)
    s.extend([0, 1], [0, 0], [10, 3])
    b = s.backend
    b.init_cuda_graph_state(4, 4)
    buf = b._graph_swa_kv_indices
    assert buf.shape == (4 * (W + 1),)
    seq = torch.tensor([10, 3, 1, 1])
    req = torch.tensor([0, 1, 0, 0])
    md = b._graph_metadata(4, req, seq, fb_mode())
    assert md.swa_kv_indices.data_ptr() == buf.data_ptr()
    want = torch.cat([s.alloc.translate_loc_from_full_to_swa(s.r2t[0, 10 - W - 1:10].long()),
                      s.alloc.translate_loc_from_full_to_swa(s.r2t[1, :3].long())])
    assert torch.equal(buf[:W + 1 + 3].long(), want.long())


def fb_mode():
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    return ForwardMode.DECODE


# ------------------------------------------------------------------------------------------------
# Linear-attention hybrids
# ------------------------------------------------------------------------------------------------
def _qwen3_next_config(num_layers=8):
    import sglang.srt.configs.qwen3_next as q3n

    q3n.get_attention_tp_size = lambda: 1
    return q3n.Qwen3NextConfig(
        num_hidden_layers=num_layers, hidden_size=256, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, full_attention_interval=4, vocab_size=1000, intermediate_size=512,
        moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=128)


def _linear_runner(cfg_path, backend="turboquant"):
    hf = _qwen3_next_config()
    mc = FakeModelConfig(8, HQ, HKV, D, context_len=128)
    mc.hf_config = mc.hf_text_config = hf
    with env(SGLANG_TQ_CONFIG=cfg_path):
        r = FakeRunner(mc, server_args(attention_backend=backend, max_mamba_cache_size=8))
    r.mambaish_config = r.hybrid_gdn_config = hf
    return r


def test_linear_hybrid_pool_and_capacity(tmp_path):
    """Qwen3-Next (layers 3 and 7 are attention): the attention layers' packed pool inside SGLang's
    HybridLinearKVPool, the recurrent-state pool SGLang's own; capacity counts the attention layers only,
    and the boundary is the first attention layer."""
    path = write_tq_config(tmp_path, "name: t\nboundary: {first: 1, last: 0}\n")
    r = _linear_runner(path)
    with env(SGLANG_TQ_CONFIG=path):
        cell = r.get_cell_size_per_token(2)
        pool = r.build_pools(128, max_running_requests=4)
    plan = r._tq_plan
    assert plan.attention_layers == (3, 7) and plan.layers[3].format == "bf16" and plan.layers[7].quantized
    assert cell == plan.layers_bytes_per_token(HKV, [3, 7]) == HKV * (2 * D * 2 + plan.layers[7].k.slot_bytes * 2)
    assert isinstance(pool, TQHybridLinearKVPool) and pool.full_kv_pool.layer_ids == [3, 7]
    assert pool.mamba_pool is r.req_to_token_pool.mamba_pool
    assert pool.get_v_head_dim() == D and pool.quantized_layer_ids == [7]
    assert pool.size == 128 - first_token_cut(r, [3, 7], 128, cell)  # the first token's tables and flags
    assert isinstance(pool.get_key_buffer(7), TQLayerBuffer) and pool.get_key_buffer(3).shape == (pool.size + 1, HKV, D)
    with pytest.raises(IndexError, match="no KV cache"):
        pool.get_key_buffer(2)
    bf = _linear_runner(path, "triton")
    assert bf.get_cell_size_per_token(2) / cell == pytest.approx(plan.compression_ratio())


def test_linear_hybrid_yaml_layer_indices(tmp_path):
    """Overrides name the model's layer ids; one that selects only recurrent layers is an error naming
    them and the attention layers allowed."""
    bad = write_tq_config(tmp_path, "name: t\noverrides:\n  - layers: 2\n    format: bf16\n")
    with env(SGLANG_TQ_CONFIG=bad):
        with pytest.raises(TQConfigError, match=r"overrides\[0\]\.layers: 2: layer 2 is a recurrent.*3, 7"):
            _linear_runner(bad).get_cell_size_per_token(2)
    ok = write_tq_config(tmp_path, "name: t\nboundary: {first: 0, last: 0}\noverrides:\n  - layers: 7\n"
                                   "    format: fp8\n", name="ok.yaml")
    r = _linear_runner(ok)
    with env(SGLANG_TQ_CONFIG=ok):
        r.get_cell_size_per_token(2)
    assert r._tq_plan.layers[7].format == "fp8" and r._tq_plan.layers[3].quantized


def test_linear_hybrid_attention_layers_served(tmp_path):
    """The backend serves the attention layers under their model layer ids (as HybridLinearAttnBackend
    hands them over): a prefill and decode steps against attention over the dequantized cache."""
    path = write_tq_config(tmp_path, TQ_ALL)
    r = _linear_runner(path)
    with env(SGLANG_TQ_CONFIG=path):
        pool = r.build_pools(128, max_running_requests=4)
        backend = tq_backend(r)
    gen = torch.Generator().manual_seed(2)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in (3, 7)]
    r2t = r.req_to_token_pool.req_to_token
    req = 0
    loc = r.token_to_kv_pool_allocator.alloc(7)
    r2t[req, :7] = loc.to(r2t.dtype)
    fb = extend_batch(r, [req], [0], [7], loc, backend)
    backend.init_forward_metadata(fb)
    zero_sink = torch.full((HQ,), -1e4)
    for layer in layers:
        q, k, v = _qkv(gen, 7)
        layer(q, k, v, fb)
    n = 7
    for _ in range(2):
        slot = r.token_to_kv_pool_allocator.alloc(1)
        r2t[req, n] = slot.to(r2t.dtype)
        n += 1
        fb = decode_batch(r, [req], [n], slot, backend)
        backend.init_forward_metadata(fb)
        for layer in layers:
            q, k, v = _qkv(gen, 1)
            o = layer(q, k, v, fb).view(-1, HQ, D).float()
            keys, vals = sequence_kv(pool, layer.layer_id, r2t[req, :n])
            want = sink_attention_row(q.view(-1, HQ, D)[0], keys, vals, zero_sink, 0)
            torch.testing.assert_close(o[0], want, atol=TOL, rtol=TOL)


def test_layer_kinds_from_the_model_config():
    """Attention layers from a GDN hybrid's config class; sliding-window layers from SGLang's hybrid SWA split
    or, in one pool for all layers, from the config's layer_types."""
    from sglang_tq.compat import layer_kinds

    mc = FakeModelConfig(8, HQ, HKV, D)
    mc.hf_config = mc.hf_text_config = _qwen3_next_config()
    assert layer_kinds(mc) == ((3, 7), ())
    assert layer_kinds(_swa_model(4)) == (None, (0, 2))
    one_pool = _swa_model(6)
    one_pool.is_hybrid_swa = False  # --disable-hybrid-swa-memory
    assert layer_kinds(one_pool) == (None, (0, 2, 4))


@pytest.mark.parametrize("with_sinks", [False, True])
def test_key_centering_off_for_models_with_sinks(tmp_path, with_sinks):
    """Attention sinks make the softmax change under centering's per-query shift: a model with sinks stores
    its keys uncentered (key means dropped at start-up), one without keeps them; the backend refuses a mean
    next to sinks."""
    from safetensors.torch import save_file
    from sglang_tq.backend import TurboQuantAttnBackend

    save_file({"key_means": torch.randn(2, HKV, D)}, str(tmp_path / "m.safetensors"))
    path = write_tq_config(tmp_path, TQ_ALL + "key_means: m.safetensors\n")
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    if with_sinks:
        model.attn.sinks = torch.nn.Parameter(torch.zeros(HQ))
    with env(SGLANG_TQ_CONFIG=path):
        r = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=64))
        r.model = model
        pool = r.build_pools(64)
    assert all((pool.key_mean(i) is None) == with_sinks for i in (0, 1))
    layer = RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0)
    if not with_sinks:
        with pytest.raises(NotImplementedError, match="not exact with attention sinks"):
            TurboQuantAttnBackend._key_mean(pool, layer, torch.zeros(HQ))
