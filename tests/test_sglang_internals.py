"""What sglang_tq.sglang_internals relies on, checked against SGLang's own classes (CPU): each test fails
when an SGLang version changes the internal, instead of the server silently misbehaving."""
import inspect
import os
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, first_token_cut,  # noqa: E402
                          tq_backend, write_tq_config)
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool  # noqa: E402
from sglang.srt.model_executor import model_runner_kv_cache_mixin as mix  # noqa: E402
from sglang.srt.server_args import ServerArgs  # noqa: E402
from sglang_tq import sglang_internals as si  # noqa: E402
from sglang_tq.pool import TQTokenToKVPool  # noqa: E402

PKG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sglang_tq")
HQ, HKV, D = 4, 2, 64
CFG = "defaults: {k: {bits: 4}, v: {bits: 4}}\nboundary: {first: 0, last: 0}\n"


def _sglang_source(module_name: str) -> str:
    import importlib

    return inspect.getsource(importlib.import_module(module_name))


def test_wrap_method_wraps_once_and_needs_the_method():
    class A:
        def f(self):
            return 1

    assert si.wrap_method(A, "f", lambda orig: lambda self: orig(self) + 1)
    assert not si.wrap_method(A, "f", lambda orig: lambda self: orig(self) + 10)
    assert A().f() == 2 and A.f.__wrapped__ is not None
    with pytest.raises(si.SGLangInternalsError, match="no method g"):
        si.wrap_method(A, "g", lambda orig: orig)
    # the three wraps of registration.py are in place on SGLang's classes
    assert {"_init_pools", "get_cell_size_per_token"} <= mix.ModelRunnerKVCacheMixin.__dict__["_sglang_tq_wrapped"]
    assert "__post_init__" in ServerArgs.__dict__["_sglang_tq_wrapped"]


def test_init_pools_builds_the_mha_pool_through_the_module_global(tmp_path):
    """_init_pools constructs `MHATokenToKVPool(...)` by the name the mixin module imported, so rebinding it
    makes SGLang build the TurboQuant pool (and keep its own req-to-token pool and allocator)."""
    src = inspect.getsource(inspect.unwrap(mix.ModelRunnerKVCacheMixin._init_pools))
    assert "MHATokenToKVPool(" in src
    assert mix.MHATokenToKVPool is MHATokenToKVPool
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, CFG)):
        runner = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=64))
        pool = runner.build_pools(64)
    assert isinstance(pool, TQTokenToKVPool) and isinstance(runner.req_to_token_pool, ReqToTokenPool)
    assert mix.MHATokenToKVPool is MHATokenToKVPool  # put back
    with pytest.raises(si.SGLangInternalsError, match="MHATokenToKVPool"):
        with si.pool_class_during(SimpleNamespace(), object):
            pass


def test_hybrid_pools_are_built_by_module_globals():
    """The hybrid layouts are replaced the same way: _init_pools builds SWAKVPool(...) and
    HybridLinearKVPool(...) by the names the mixin imported, and HybridLinearKVPool builds its attention pool
    as MHATokenToKVPool by memory_pool's module global (TQHybridLinearKVPool rebinds that one)."""
    from sglang.srt.mem_cache import memory_pool

    src = inspect.getsource(inspect.unwrap(mix.ModelRunnerKVCacheMixin._init_pools))
    assert "SWAKVPool(" in src and "HybridLinearKVPool(" in src
    assert mix.SWAKVPool.__module__ == "sglang.srt.mem_cache.swa_memory_pool"
    assert "TokenToKVPoolClass = MHATokenToKVPool" in inspect.getsource(memory_pool.HybridLinearKVPool.__init__)
    assert "token_to_kv_pool_class(" in inspect.getsource(mix.SWAKVPool.__init__)
    assert "_resolve_hybrid_swa_tokens" in inspect.getsource(mix.ModelRunnerKVCacheMixin._resolve_memory_pool_config)


def test_pool_size_comes_from_the_runner_budget(tmp_path):
    """_init_pools sizes the KV pool by runner.max_total_num_tokens, and MemoryPoolConfig keeps a copy of
    it: shrink_token_budget changes both, and the pool built next has the smaller size."""
    from sglang.srt.model_executor.model_runner_kv_cache_mixin import MemoryPoolConfig

    src = inspect.getsource(inspect.unwrap(mix.ModelRunnerKVCacheMixin._init_pools))
    assert "size=self.max_total_num_tokens" in src
    assert "max_total_num_tokens" in {f for f in MemoryPoolConfig.__dataclass_fields__}
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, CFG)):
        runner = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=64))
        runner.memory_pool_config = MemoryPoolConfig(max_total_num_tokens=64, max_running_requests=4)
        runner.max_total_num_tokens = 64
        si.shrink_token_budget(runner, 10)
        assert runner.max_total_num_tokens == runner.memory_pool_config.max_total_num_tokens == 54
        runner.max_running_requests = 4
        runner._init_pools()
    # the pool built next: the smaller budget, less the exact first token's tables and flags
    cell = runner.get_cell_size_per_token(2)
    assert runner.token_to_kv_pool.size == 54 - first_token_cut(runner, [0, 1], 54, cell)


def test_req_to_token_pool_order_and_lowest_free_first():
    """Stock ReqToTokenPool pops free indices from the front and appends freed ones (so it cycles through
    every index); lowest_free_first makes it reuse the lowest one. A pool without that list is refused."""
    def fresh():
        return ReqToTokenPool(size=8, max_context_len=16, device="cpu", enable_memory_saver=False)

    def reqs(n):
        return [SimpleNamespace(req_pool_idx=None, is_chunked=0, kv_committed_len=0) for _ in range(n)]

    for patched, expect in ((False, [4]), (True, [0])):
        pool = fresh()
        if patched:
            si.lowest_free_first(pool)
            si.lowest_free_first(pool)  # idempotent
        rs = reqs(4)
        assert pool.alloc(rs) == [0, 1, 2, 3]
        pool.free(rs[1])
        pool.free(rs[0])
        assert pool.alloc(reqs(1)) == expect
    with pytest.raises(si.SGLangInternalsError, match="free_slots"):
        si.lowest_free_first(SimpleNamespace(free=lambda req: None))


def test_on_new_request_slots_reports_only_new_indices():
    """SGLang's ReqToTokenPool.alloc keeps the index of a request that has one (a chunked request's next chunk,
    a streaming session's turn) and hands out new ones to the rest: only those are reported, none when it
    cannot serve the batch; a second install replaces the callback without a second wrap."""
    pool = ReqToTokenPool(size=3, max_context_len=16, device="cpu", enable_memory_saver=False)
    seen = []
    si.on_new_request_slots(pool, lambda idx: seen.append(("old", idx)))
    si.on_new_request_slots(pool, seen.append)
    chunked = SimpleNamespace(req_pool_idx=None, is_chunked=1, kv_committed_len=0)
    assert pool.alloc([chunked]) == [0] and seen == [[0]]
    new = [SimpleNamespace(req_pool_idx=None, is_chunked=0, kv_committed_len=0) for _ in range(2)]
    assert pool.alloc([chunked] + new) == [0, 1, 2] and seen == [[0], [1, 2]]
    assert pool.alloc([SimpleNamespace(req_pool_idx=None, is_chunked=0, kv_committed_len=0)]) is None
    assert seen == [[0], [1, 2]]


def test_server_args_read_by_name_exist():
    """Every server argument sglang_tq reads (server_arg(...) / arg(...) with a literal name) is a field of
    SGLang's ServerArgs; an unknown name raises instead of reading a default."""
    names = set()
    for fname in os.listdir(PKG):
        if fname.endswith(".py"):
            with open(os.path.join(PKG, fname)) as f:
                text = f.read()
            names |= set(re.findall(r"server_arg\([^,()]+,\s*\"(\w+)\"\)", text))
            names |= set(re.findall(r"\barg\(\s*[\"'](\w+)[\"']\s*\)", text))
    assert {"attention_backend", "kv_cache_dtype", "enable_deterministic_inference", "max_total_tokens"} <= names
    assert names <= si.server_arg_names(), sorted(names - si.server_arg_names())
    sa = object.__new__(ServerArgs)
    with pytest.raises(si.SGLangInternalsError, match="no field 'attn_backend'"):
        si.server_arg(sa, "attn_backend")


def test_fused_kv_write_is_off_for_the_turboquant_pool(tmp_path, monkeypatch):
    """Models with a fused RoPE + KV write take it only for a bf16 pool (`enable_fused_set_kv_buffer`); the
    TurboQuant pool reports uint8, so they call set_kv_buffer. Checked with SGLang's own function as on
    CUDA: a stock bf16 pool gets the fused path, ours does not."""
    import sglang.srt.models.utils as mutils

    monkeypatch.setattr(mutils, "_is_cuda", True)
    monkeypatch.setattr(mutils, "_is_hip", False)
    monkeypatch.setattr(mutils, "is_prefill_context_parallel_enabled", lambda: False)  # reads global server args
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, CFG)):
        runner = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=64))
        pool = runner.build_pools(64)
    assert pool.dtype == si.POOL_DTYPE != torch.bfloat16
    stock = MHATokenToKVPool(64, 1, torch.bfloat16, HKV, D, 2, "cpu", False)
    assert mutils.enable_fused_set_kv_buffer(SimpleNamespace(token_to_kv_pool=stock))
    assert not mutils.enable_fused_set_kv_buffer(SimpleNamespace(token_to_kv_pool=pool))


# Model files of SGLang 0.5.10.post1 with a fused RoPE + KV write; each gates it on enable_fused_set_kv_buffer.
FUSED_KV_WRITE_MODELS = {"bailing_moe.py", "gpt_oss.py", "llada2.py", "qwen3_moe.py", "sdar.py", "sdar_moe.py"}


def test_every_fused_kv_write_is_gated():
    """A model that writes K/V inside its RoPE kernel must ask enable_fused_set_kv_buffer first; a new
    model file with a fused write (or one without the gate) shows up here for review."""
    import importlib.util

    folder = list(importlib.util.find_spec("sglang.srt.models").submodule_search_locations)[0]
    found = set()
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith(".py") or fname == "utils.py":
            continue
        with open(os.path.join(folder, fname)) as f:
            text = f.read()
        if "create_fused_set_kv_buffer_arg(" in text:
            found.add(fname)
            assert "enable_fused_set_kv_buffer(" in text, f"{fname}: fused KV write without the gate"
    assert found == FUSED_KV_WRITE_MODELS


@pytest.mark.parametrize("mode", ["extend", "decode"])
def test_radix_attention_writes_through_the_pool(tmp_path, monkeypatch, mode):
    """The model path (RadixAttention -> the attention backend) stores every new K/V through the pool's
    set_kv_buffer, once per layer and step, for the bf16 and the packed layers alike."""
    cfg = "defaults: {k: {bits: 4}, v: {bits: 4}}\nboundary: {first: 1, last: 0}\n"
    with env(SGLANG_TQ_CONFIG=write_tq_config(tmp_path, cfg)):
        runner = FakeRunner(FakeModelConfig(2, HQ, HKV, D, context_len=64))
        pool = runner.build_pools(64)
        backend = tq_backend(runner)
    writes = []
    orig = pool.set_kv_buffer
    monkeypatch.setattr(pool, "set_kv_buffer", lambda layer, loc, *a, **kw: (writes.append((layer.layer_id, loc.tolist())),
                                                                            orig(layer, loc, *a, **kw)))
    n = 5 if mode == "extend" else 1
    slots = runner.token_to_kv_pool_allocator.alloc(n)
    r2t = runner.req_to_token_pool.req_to_token
    if mode == "extend":
        r2t[0, :n] = slots.to(r2t.dtype)
        fb = extend_batch(runner, [0], [0], [n], slots, backend)
    else:
        prior = runner.token_to_kv_pool_allocator.alloc(3)
        r2t[0, :3] = prior.to(r2t.dtype)
        r2t[0, 3] = slots[0].to(r2t.dtype)
        fb = decode_batch(runner, [0], [4], slots, backend)
    backend.init_forward_metadata(fb)
    gen = torch.Generator().manual_seed(0)
    for lid in range(2):
        layer = RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=lid)
        q = torch.randn(n, HQ * D, generator=gen).to(torch.bfloat16)
        k = torch.randn(n, HKV * D, generator=gen).to(torch.bfloat16)
        v = torch.randn(n, HKV * D, generator=gen).to(torch.bfloat16)
        assert layer(q, k, v, fb).shape == (n, HQ * D)
    assert writes == [(0, slots.tolist()), (1, slots.tolist())]


def test_cuda_graph_padding_as_the_window_expects():
    """The decode ring rows tell CUDA-graph padding apart by its seq_len: SGLang's graph runner fills the
    padded seq_lens with the backend's fill value (1 for the Triton backend) and leaves their request
    indices stale; a piecewise-graph extend builds the metadata from the unpadded batch."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    assert inspect.getsource(TritonAttnBackend.get_cuda_graph_seq_len_fill_value).rstrip().endswith("return 1")
    runner_src = _sglang_source("sglang.srt.model_executor.cuda_graph_runner")
    assert "self.seq_lens.fill_(seq_len_fill_value)" in runner_src
    assert "self.req_pool_indices[:raw_bs]" in runner_src
    piecewise = _sglang_source("sglang.srt.model_executor.piecewise_cuda_graph_runner")
    assert "attn_backend.init_forward_metadata(forward_batch)" in piecewise
