"""TQTokenToKVPool built by SGLang's real ModelRunnerKVCacheMixin._init_pools (fake runner, CPU):
capacity (get_cell_size_per_token, profile_max_num_token), config-to-pool mapping, buffer shapes and
dtypes, slot 0, sizes, PP layer ranges, and startup refusals."""
import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import FakeModelConfig, FakeRunner, env, first_token_cut, server_args, write_tq_config  # noqa: E402
from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang_tq.compat import TQUnsupportedError  # noqa: E402
from sglang_tq.config import load_config  # noqa: E402
from sglang_tq.pool import TQLayerBuffer, TQTokenToKVPool  # noqa: E402
from tq_kernels.codec import ROLE_K, ROLE_V, TQCodec, VecFormat  # noqa: E402

K4V4_ALL = "name: k4v4-all\nboundary: {first: 0, last: 0}\n"
LLAMA3_8B = dict(num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128)
MIXED = """
name: mixed
seed: 5
defaults: {k: {bits: 4}, v: {bits: 4}}
boundary: {first: 1, last: 1}
overrides:
  - layers: 2
    k: {bits: 3, qjl: true}
    v: {bits: 2}
  - layers: 3
    k: {bits: 3, outliers: {channels: 16, bits: 4}}
"""


def _llama(cfg_path, backend="turboquant", **kw):
    with env(SGLANG_TQ_CONFIG=cfg_path):
        return FakeRunner(FakeModelConfig(**LLAMA3_8B, context_len=8192), server_args(attention_backend=backend), **kw)


def test_cell_size_llama3_8b_k4v4(tmp_path):
    r = _llama(write_tq_config(tmp_path, K4V4_ALL))
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, K4V4_ALL)):
        tq = r.get_cell_size_per_token(32)
    bf16 = FakeRunner(FakeModelConfig(**LLAMA3_8B), server_args(attention_backend="triton")).get_cell_size_per_token(32)
    assert bf16 == 32 * 8 * 2 * 128 * 2
    assert tq == 32 * 8 * 2 * (64 + 2)  # 4-bit codes of 128 coords + one fp16 norm, K and V
    assert bf16 / tq == pytest.approx(3.88, abs=0.005)


def test_cell_size_turbo4_preset_and_config_function():
    with env(SGLANG_TQ_CONFIG=None):  # default preset
        r = FakeRunner(FakeModelConfig(**LLAMA3_8B))
        tq = r.get_cell_size_per_token(32)
    plan = load_config("turbo4").resolve(32, 128)
    assert tq == plan.bytes_per_token(8)
    # turbo4 keeps the first layer in bf16: (31 * 132 + 512) B per KV head -> 3.56x at 32 layers
    assert 32 * 8 * 512 / tq == pytest.approx(plan.compression_ratio())
    assert 32 * 8 * 512 / tq > 3.5


def test_max_total_num_tokens_grows(tmp_path):
    """profile_max_num_token (SGLang's, unchanged) at equal memory: tokens scale with 1/cell size."""
    path = write_tq_config(tmp_path, K4V4_ALL)
    with env(SGLANG_TQ_CONFIG=path):
        tq_tokens = FakeRunner(FakeModelConfig(**LLAMA3_8B)).profile_tokens(2.0)
    bf16_tokens = FakeRunner(FakeModelConfig(**LLAMA3_8B), server_args(attention_backend="triton")).profile_tokens(2.0)
    assert tq_tokens == (2 << 30) // (32 * 8 * 2 * 66)
    assert bf16_tokens == (2 << 30) // (32 * 8 * 512)
    assert tq_tokens / bf16_tokens == pytest.approx(512 / 132, rel=1e-3)


def test_pool_layout_from_config(tmp_path):
    path = write_tq_config(tmp_path, MIXED)
    with env(SGLANG_TQ_CONFIG=path):
        r = FakeRunner(FakeModelConfig(6, 8, 2, 128, context_len=64))
        cell = r.get_cell_size_per_token(6)
        pool = r.build_pools(100, max_running_requests=4)
    plan = load_config(path).resolve(6, 128)
    assert isinstance(pool, TQTokenToKVPool)
    assert isinstance(r.req_to_token_pool, ReqToTokenPool)
    assert isinstance(r.token_to_kv_pool_allocator, TokenToKVPoolAllocator)
    size = 100 - first_token_cut(r, range(6), 100, cell)  # the exact first token's tables and flags
    assert r.token_to_kv_pool_allocator.size == pool.size == size < 100
    assert pool.dtype == torch.uint8 and pool.dtype != torch.bfloat16 and pool.model_dtype == torch.bfloat16
    rows = size + 1  # slot 0 (dummy) + the allocatable slots
    assert [lp.quantized for lp in pool.layer_plans] == [False, True, True, True, True, False]
    for lid in range(6):
        lp = plan.layers[lid]
        kb, vb = pool.get_kv_buffer(lid)
        if not lp.quantized:
            assert kb.shape == (rows, 2, 128) and kb.dtype == torch.bfloat16
            assert vb.shape == (rows, 2, 128) and vb.dtype == torch.bfloat16
            continue
        assert isinstance(kb, TQLayerBuffer) and kb.shape == (rows, 2, 128)
        assert kb.codes.shape == (rows, 2, lp.k.code_bytes) and kb.codes.dtype == torch.uint8
        assert kb.scales.shape == (rows, 2, lp.k.n_scales) and kb.scales.dtype == torch.float16
        assert vb.codes.shape == (rows, 2, lp.v.code_bytes) and vb.scales.shape == (rows, 2, lp.v.n_scales)
        assert kb.codec.fmt == lp.k and vb.codec.fmt == lp.v
        # codecs built with the config's seed and the *global* layer id
        ref = TQCodec.build(lp.k, 5, lid, ROLE_K, lp.k_outlier_channel_list)
        assert torch.equal(kb.codec.rotation.signs, ref.rotation.signs)
    assert pool.get_key_buffer(2).codec.fmt == VecFormat(128, 3, qjl=True)
    assert pool.get_key_buffer(2).scales.shape[-1] == 2
    assert pool.get_key_buffer(3).codec.fmt.outlier_channels == 16
    # sizes: cell size == bytes per token of the pool == config; totals include slot 0
    assert cell == pool.bytes_per_token() == plan.bytes_per_token(2)
    k_bytes, v_bytes = pool.get_kv_size_bytes()
    assert k_bytes + v_bytes == cell * rows
    assert pool.mem_usage == pytest.approx((k_bytes + v_bytes) / (1 << 30))
    ptrs, lens, items = pool.get_contiguous_buf_infos()
    k_t = [t for i in range(6) for t in pool._layer_tensors(i, "k")]
    v_t = [t for i in range(6) for t in pool._layer_tensors(i, "v")]
    assert len(ptrs) == len(lens) == len(items) == 2 * 2 + 4 * 4  # bf16: 1 per role; TQ: codes + scales
    assert ptrs == [t.data_ptr() for t in k_t + v_t]
    assert sum(lens) == k_bytes + v_bytes
    assert items == [t[0].nbytes for t in k_t + v_t] and sum(items) == cell
    # slot 0 is never handed out
    assert int(r.token_to_kv_pool_allocator.alloc(size).min()) == 1


def test_pipeline_parallel_layer_range(tmp_path):
    """A PP rank holding layers 3..5 of 6: capacity and codecs use the global layer ids."""
    path = write_tq_config(tmp_path, MIXED)
    with env(SGLANG_TQ_CONFIG=path):
        r = FakeRunner(FakeModelConfig(6, 8, 2, 128, context_len=64), start_layer=3, num_layers=3)
        cell = r.get_cell_size_per_token(3)
        pool = r.build_pools(20, max_running_requests=2)
    plan = load_config(path).resolve(6, 128)
    assert pool.start_layer == 3 and pool.layer_num == 3
    assert cell == 2 * sum(plan.layers[i].bytes_per_token_head(128, 128) for i in (3, 4, 5)) == pool.bytes_per_token()
    assert [pool.is_quantized(i) for i in (3, 4, 5)] == [True, True, False]
    kc, vc = pool.codecs(4)
    assert torch.equal(kc.rotation.signs, TQCodec.build(plan.layers[4].k, 5, 4, ROLE_K).rotation.signs)
    assert torch.equal(vc.rotation.signs, TQCodec.build(plan.layers[4].v, 5, 4, ROLE_V).rotation.signs)
    with pytest.raises(IndexError):
        pool.get_key_buffer(2)


def test_unpatched_backend_keeps_stock_pool(tmp_path):
    r = FakeRunner(FakeModelConfig(4, 8, 2, 128, context_len=64), server_args(attention_backend="triton"))
    pool = r.build_pools(16, max_running_requests=2)
    assert type(pool) is MHATokenToKVPool


def _chunked_config():
    """Llama 4's chunked local attention: each query sees its own chunk of positions only."""
    mc = FakeModelConfig(4, 8, 2, 128, context_len=64)
    mc.attention_chunk_size = 8192
    return mc


def _swa_own_shape_config():
    """MiMo-V2-Flash: hybrid SWA memory whose sliding-window layers have their own head dims."""
    mc = FakeModelConfig(4, 8, 2, 128, context_len=64)
    mc.is_hybrid_swa = mc.is_hybrid_swa_compress = True
    mc.swa_head_dim = mc.swa_v_head_dim = 64
    return mc


def test_sliding_window_layers_get_the_packed_pool():
    """A model with sliding-window layers in one pool for all layers (Gemma 2 / 3, gpt-oss with
    --disable-hybrid-swa-memory) is served: the packed pool is built."""
    r = FakeRunner(FakeModelConfig(4, 8, 2, 128, context_len=64))
    r.sliding_window_size = 4095
    assert isinstance(r.build_pools(2048, max_running_requests=2), TQTokenToKVPool)


@pytest.mark.parametrize("change, message", [
    (dict(use_mla_backend=True), "MLA"),
    (dict(model_config=_swa_own_shape_config()), "their own KV head count or head dims"),
    (dict(model_config=_chunked_config()), "chunked local attention"),
    (dict(mambaish_config=object()), "Mamba2, Kimi-linear and lightning-attention hybrids"),
    (dict(mambaish_config=object(), hybrid_gdn_config=object(),
          server_args=server_args(disaggregation_mode="prefill")), "PD disaggregation of a model with hybrid"),
    (dict(kv_cache_dtype=torch.float8_e4m3fn), "KV cache"),
    (dict(server_args=server_args(speculative_algorithm="EAGLE")), "--speculative-algorithm EAGLE: the draft model"),
    (dict(server_args=server_args(enable_hierarchical_cache=True)), "hierarchical cache"),
    (dict(server_args=server_args(kv_cache_dtype="fp8_e5m2")), "--kv-cache-dtype fp8_e5m2"),
    (dict(server_args=server_args(decode_attention_backend="triton")), "mixing attention backends"),
    (dict(server_args=server_args(page_size=16)), "--page-size 16"),
    (dict(model_config=FakeModelConfig(4, 8, 2, 112)), "head_dim 112"),
    (dict(model_config=FakeModelConfig(4, 8, 2, 128, v_head_dim=64)), "v_head_dim 64 != head_dim 128"),
])
def test_unsupported_setups_refused(change, message):
    r = FakeRunner(FakeModelConfig(4, 8, 2, 128, context_len=64))
    for k, v in change.items():
        setattr(r, k, v)
    r.page_size = r.server_args.page_size
    with pytest.raises(TQUnsupportedError, match="TurboQuant .*does not support") as ei:
        r.build_pools(16, max_running_requests=2)
    assert message in str(ei.value)
    with pytest.raises(TQUnsupportedError):
        r.get_cell_size_per_token(4)


def test_key_mean_heads_tensor_parallel_slicing():
    from sglang_tq.config import TQConfigError
    from sglang_tq.pool import key_mean_heads

    assert key_mean_heads(8, 8, 0, 1) == slice(0, 8)
    assert key_mean_heads(8, 2, 3, 4) == slice(6, 8)          # heads split over 4 ranks
    assert key_mean_heads(2, 1, 5, 8) == slice(1, 2)          # 2 KV heads replicated over 8 ranks
    with pytest.raises(TQConfigError, match="KV heads"):
        key_mean_heads(6, 4, 0, 2)


def test_pool_rejects_key_means_with_wrong_heads(tmp_path):
    from safetensors.torch import save_file
    from sglang_tq.config import TQConfigError

    save_file({"key_means": torch.zeros(4, 5, 64)}, str(tmp_path / "m.safetensors"))
    path = write_tq_config(tmp_path, "boundary: {first: 1, last: 0}\nkey_means: m.safetensors\n")
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(4, 6, 2, 64))
        with pytest.raises(TQConfigError, match=r"\[4, 5, 64\]|5 KV heads"):
            runner.build_pools(64, max_running_requests=2)


# --- fp8 layers --------------------------------------------------------------------------------------
FP8_CFG = "boundary: {first: 1, last: 0, format: fp8}\noverrides:\n  - {layers: 2, format: fp8}\n"


def test_fp8_capacity_llama3_8b_turbo4_plan(tmp_path):
    """The 32-layer turbo4 plan with its first layer in fp8 instead of bf16, Llama-3-8B shape, at equal KV
    memory (55 GiB, about what an H100 80 GB leaves for the KV cache of an 8B bf16 model): SGLang's
    profile_max_num_token with the packed cell size, minus the recent window's ring (256 requests x 32
    tokens in bf16, taken from the token budget as reserve_window_memory does) -> 3.70x the bf16 tokens
    (3.77x without the ring; the bf16 first layer gives 3.50x with the ring)."""
    import sglang.srt.model_executor.model_runner_kv_cache_mixin as mix
    from sglang_tq.config import presets_dir
    from sglang_tq.registration import first_token_bytes, reserve_window_memory

    fp8_path = str(presets_dir() / "examples" / "turbo4_fp8_boundary.yaml")
    budget = 55.0
    bf16_tokens = FakeRunner(FakeModelConfig(**LLAMA3_8B), server_args(attention_backend="triton")).profile_tokens(budget)

    def tq_tokens(path):
        with env(SGLANG_TQ_CONFIG=path):
            r = _llama(path)
            r.max_total_num_tokens = r.profile_tokens(budget)
            r.max_running_requests = 256
            cell = r.get_cell_size_per_token(32)
            plan = load_config(path).resolve(32, 128)
            assert reserve_window_memory(r, plan, mix) == 256
            return r.max_total_num_tokens, cell, plan

    fp8_tokens, fp8_cell, plan = tq_tokens(fp8_path)
    assert fp8_cell == 8 * (31 * 132 + 256) == 34784
    ring = plan.window_bytes(8, 256)
    assert ring == 31 * 8 * 512 * 32 * 256
    profiled = int(budget * (1 << 30)) // fp8_cell
    tables = first_token_bytes(plan, 8, range(32), profiled + 1)  # the exact first token's, with a flag per slot
    assert tables == 31 * 2 * 8 * 256 * 4 + profiled + 1
    assert fp8_tokens == profiled - -(-(ring + tables) // fp8_cell)
    ratio = fp8_tokens / bf16_tokens
    assert ratio >= 3.70 and f"{ratio:.3f}" == "3.702"
    bf16_first, _, _ = tq_tokens("turbo4")
    assert f"{bf16_first / bf16_tokens:.3f}" == "3.496"


def test_window_reservation_counts_draft_staging():
    """With speculative decoding each ring request also has staging rows for its draft tokens (bf16, the ring's
    row shape): the reservation grows by draft_tokens / window_tokens of the ring."""
    import sglang.srt.model_executor.model_runner_kv_cache_mixin as mix
    from sglang_tq.registration import first_token_bytes, reserve_window_memory

    budget = 55.0
    plan = load_config("turbo4").resolve(32, 128)

    def tokens(**spec):
        with env(SGLANG_TQ_CONFIG="turbo4"):
            r = _llama("turbo4")
            for k, v in spec.items():
                setattr(r.server_args, k, v)
            r.max_total_num_tokens = r.profile_tokens(budget)
            r.max_running_requests = 256
            full = r.max_total_num_tokens
            assert reserve_window_memory(r, plan, mix) == 256
            return full - r.max_total_num_tokens, r.get_cell_size_per_token(32), full

    plain, cell, full = tokens()
    spec, _, _ = tokens(speculative_algorithm="NGRAM", speculative_num_draft_tokens=8)
    ring = plan.window_bytes(8, 256)
    tables = first_token_bytes(plan, 8, range(32), full + 1)  # the exact first token's, as the same reservation
    assert plain == -(-(ring + tables) // cell)
    assert spec == -(-(ring * (plan.window_tokens + 8) // plan.window_tokens + tables) // cell) > plain


def test_fp8_pool_layout_store_and_read(tmp_path):
    """fp8 layers: uint8 rows of e4m3 values (SGLang's fp8 layout) read as float8_e4m3fn views; the
    checkpoint's k_scale / v_scale (from the layer) divide on store; out-of-range values saturate."""
    from tq_kernels.codec import FP8_MAX, fp8_decode, fp8_encode

    path = write_tq_config(tmp_path, FP8_CFG)
    with env(SGLANG_TQ_CONFIG=path):
        r = FakeRunner(FakeModelConfig(4, 8, 2, 128, context_len=64))
        cell = r.get_cell_size_per_token(4)
        pool = r.build_pools(50, max_running_requests=2)
    assert [pool.is_fp8(i) for i in range(4)] == [True, False, True, False]
    assert [pool.is_quantized(i) for i in range(4)] == [False, True, False, True]
    assert cell == pool.bytes_per_token() == 2 * (2 * 256 + 2 * 132)
    kb, vb = pool.get_kv_buffer(0)
    assert kb.dtype == vb.dtype == torch.float8_e4m3fn and kb.shape == (pool.size + 1, 2, 128)
    assert pool.k_buffer[0].dtype == torch.uint8

    class Layer:
        layer_id, k_scale, v_scale = 2, None, None

    gen = torch.Generator().manual_seed(3)
    k = torch.randn(5, 2 * 128, generator=gen).to(torch.bfloat16)
    v = (torch.randn(5, 2 * 128, generator=gen) * 0.1).to(torch.bfloat16)
    k[0, 0] = 1000.0  # past e4m3's range: saturates, never NaN
    loc = torch.tensor([3, 7, 8, 20, pool.size])  # the last slot too
    pool.set_kv_buffer(Layer, loc, k, v)
    kd = pool.get_key_buffer(2)[loc].float()
    vd = fp8_decode(pool.get_value_buffer(2)[loc])
    assert torch.isfinite(kd).all() and kd[0, 0, 0] == FP8_MAX
    kf = k.float().view(5, 2, 128)
    normal = kf.abs() >= 2 ** -6  # e4m3 normal range: relative error <= 2^-4 (3 mantissa bits)
    err = ((kd - kf).abs() / kf.abs().clamp_min(1e-30))[normal & (kf.abs() <= FP8_MAX)]
    assert err.max() <= 2 ** -4 and err.mean() < 0.03
    assert torch.equal(vd, fp8_decode(fp8_encode(v.view(5, 2, 128))))
    assert not torch.equal(vd, v.float().view(5, 2, 128))  # really stored in 8 bits

    Layer.k_scale, Layer.v_scale, Layer.k_scale_float, Layer.v_scale_float = torch.tensor(4.0), torch.tensor(0.5), 4.0, 0.5
    pool.set_kv_buffer(Layer, loc, k, v, k_scale=Layer.k_scale, v_scale=Layer.v_scale)
    assert torch.equal(pool.get_key_buffer(2)[loc].float(), fp8_encode(kf, 4.0).view(torch.float8_e4m3fn).float())
    assert torch.equal(fp8_decode(pool.get_value_buffer(2)[loc], 0.5), fp8_decode(fp8_encode(v.view(5, 2, 128), 0.5), 0.5))
    # whole-slot moves and the CPU copy carry the fp8 bytes
    before = pool.k_buffer[2][loc[:2]].clone()
    pool.move_kv_cache(torch.tensor([30, 31]), loc[:2])
    assert torch.equal(pool.k_buffer[2][torch.tensor([30, 31])], before)
