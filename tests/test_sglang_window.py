"""Recent window in the SGLang backend (reference path, CPU): which positions decode reads exactly.

Config with `window: {tokens: 4, requests: 2}`: requests 0 and 1 get a ring, request 2 (index >= 2)
does not. Every decode output is checked against attention computed here by hand over the cache as the
window defines it: positions [max(L - 4, start), L) exact (the K/V the test generated; start = the prefix
length of the request's last extend), older ones dequantized from the packed codes.
"""
import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, sequence_kv,  # noqa: E402
                          write_tq_config)
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang_fakes import tq_backend  # noqa: E402

HQ, HKV, D, NUM_LAYERS, W = 4, 2, 64, 3, 4
CFG = """
name: test-window
defaults:
  k: {bits: 3}
  v: {bits: 2}
boundary: {first: 1, last: 0}
window: {tokens: 4, requests: 2}
"""


@pytest.fixture
def s(tmp_path):
    path = write_tq_config(tmp_path, CFG)
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=64))
        pool = runner.build_pools(256, max_running_requests=8)
        backend = tq_backend(runner)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(NUM_LAYERS)]
    return dict(runner=runner, pool=pool, backend=backend, layers=layers, gen=torch.Generator().manual_seed(0),
                exact={}, lens={}, start={})


def _attend(q, k, v):
    s = torch.einsum("hd,lhd->hl", q.float(), k.float().repeat_interleave(HQ // HKV, 1)) * D ** -0.5
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v.float().repeat_interleave(HQ // HKV, 1))


def _extend(s, reqs, prefix, new, pad=0):
    """pad > 0: as a piecewise-CUDA-graph replay passes the batch, `pad` extra rows of q/k/v and
    out_cache_loc 0 after the real tokens (extend_num_tokens stays the real count)."""
    runner = s["runner"]
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t = runner.req_to_token_pool.req_to_token
    fb = extend_batch(runner, reqs, prefix, new, slots, s["backend"])
    s["backend"].init_forward_metadata(fb)  # SGLang builds the metadata from the unpadded batch
    fb.out_cache_loc = torch.cat([slots, slots.new_zeros(pad)])
    off = 0
    for r, p, n in zip(reqs, prefix, new):
        r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
        s["lens"][r], s["start"][r] = p + n, min(s["start"].get(r, p), p)  # a request's first extend sets it
        off += n
    for layer in s["layers"]:
        q = torch.randn(sum(new) + pad, HQ * D, generator=s["gen"]).to(torch.bfloat16)
        k = torch.randn(sum(new) + pad, HKV * D, generator=s["gen"]).to(torch.bfloat16)
        v = torch.randn(sum(new) + pad, HKV * D, generator=s["gen"]).to(torch.bfloat16)
        assert layer(q, k, v, fb).shape == (sum(new) + pad, HQ * D)
        off = 0
        for r, p, n in zip(reqs, prefix, new):
            for j in range(n):
                s["exact"][(r, p + j, layer.layer_id)] = (k[off + j].view(HKV, D), v[off + j].view(HKV, D))
            off += n


def _decode(s, reqs):
    runner, pool = s["runner"], s["pool"]
    r2t = runner.req_to_token_pool.req_to_token
    slots = runner.token_to_kv_pool_allocator.alloc(len(reqs))
    for r, slot in zip(reqs, slots.tolist()):
        r2t[r, s["lens"][r]] = slot
        s["lens"][r] += 1
    fb = decode_batch(runner, reqs, [s["lens"][r] for r in reqs], slots, s["backend"])
    s["backend"].init_forward_metadata(fb)
    checked = 0
    for layer in s["layers"]:
        lid = layer.layer_id
        q = torch.randn(len(reqs), HQ * D, generator=s["gen"]).to(torch.bfloat16)
        k = torch.randn(len(reqs), HKV * D, generator=s["gen"]).to(torch.bfloat16)
        v = torch.randn(len(reqs), HKV * D, generator=s["gen"]).to(torch.bfloat16)
        o = layer(q, k, v, fb)
        for i, r in enumerate(reqs):
            s["exact"][(r, s["lens"][r] - 1, lid)] = (k[i].view(HKV, D), v[i].view(HKV, D))
        if not pool.is_quantized(lid):
            continue
        kb, vb = pool.get_kv_buffer(lid)
        for i, r in enumerate(reqs):
            L = s["lens"][r]
            lo = max(L - W, s["start"][r]) if r < 2 else L
            kk, vv = sequence_kv(pool, lid, r2t[r, :L])
            for p in range(lo, L):
                kk[p], vv[p] = s["exact"][(r, p, lid)]
            want = _attend(q[i].view(HQ, D), kk, vv)
            torch.testing.assert_close(o[i].view(HQ, D).float(), want, atol=2e-2, rtol=2e-2,
                                       msg=lambda m: f"req {r} layer {lid} L {L} lo {lo}: {m}")
            checked += 1
    return checked


@pytest.mark.parametrize("pad", [0, 5], ids=["exact", "padded"])
def test_decode_reads_the_window_exactly(s, pad):
    """pad 5: every extend comes padded as under piecewise CUDA graphs; the padding rows must reach no
    ring row (a padding row's ring write would break the exact window that decode is checked against)."""
    assert s["backend"].window == W and s["pool"].window_requests == 2
    assert s["pool"].ring_k[0] is None and s["pool"].ring_k[1].shape == (2 * W, HKV, D)
    r2t = s["runner"].req_to_token_pool.req_to_token
    _extend(s, [0], [0], [10], pad)                    # a prompt: positions 6..9 go to the ring
    r2t[1, :8] = r2t[0, :8]                            # req 1: radix hit on req 0's first 8 tokens
    _extend(s, [1, 2], [8, 0], [2, 5], pad)            # req 2: beyond the ring's 2 requests
    md = s["backend"].forward_metadata
    assert md.window_rows.shape == (7,) and md.ring_rows(7 + pad).shape == (7 + pad,)
    assert (md.ring_rows(7 + pad)[7:] == -1).all() and torch.equal(md.ring_rows(7 + pad)[:7], md.window_rows)
    assert s["pool"].window_start[:2].tolist() == [0, 8]  # row 2 took req 2's write (no mask, no sync)
    assert s["pool"].window_start.shape == (3,)
    for _ in range(6):                                 # ring rows wrap around; req 1's window grows from 8
        assert _decode(s, [0, 1, 2]) == 3 * (NUM_LAYERS - 1)
    _extend(s, [0], [16], [1], pad)                    # req 0's token in a mixed batch: its ring stays
    assert s["pool"].window_start[0].item() == 0
    _decode(s, [0])
    # a new request handed slot 0 (SGLang's alloc) with a radix hit on req 0's first 12 tokens: slot 0's ring
    # rows are req 0's, so its start is its prefix
    from types import SimpleNamespace

    assert s["runner"].req_to_token_pool.alloc([SimpleNamespace(req_pool_idx=None, is_chunked=0,
                                                                kv_committed_len=0)]) == [0]
    s["start"].pop(0)
    _extend(s, [0], [12], [2], pad)
    assert s["pool"].window_start[0].item() == 12
    for _ in range(3):
        _decode(s, [0, 1])


def _reserved_tokens(pool, tokens: int) -> int:
    """Tokens the budget of a `tokens`-token pool gives up: the ring's bytes and the first token's (its tables
    and a flag byte per slot, slot 0 included)."""
    from sglang_tq.registration import first_token_bytes

    tables = first_token_bytes(pool.plan, HKV, pool.layer_ids, tokens + 1)
    assert tables == pool.first_row_bytes() - pool.first_ids.nbytes + (tokens - pool.size)  # the flags before the cut
    return -(-(pool.window_bytes() + tables) // pool.bytes_per_token())


def test_window_changes_attention_and_capacity(tmp_path, s):
    """The ring's bytes (and the first token's) come out of the token budget; without the window the same
    request attends to codes only (so the comparison above can tell the two apart)."""
    pool = s["pool"]
    assert s["runner"].max_total_num_tokens < 256
    assert pool.window_bytes() == 2 * (NUM_LAYERS - 1) * 2 * W * HKV * D * 2
    cut = 256 - s["runner"].max_total_num_tokens
    assert cut == _reserved_tokens(pool, 256)


@pytest.mark.parametrize("head_dim", [80, 96])
def test_window_budget_of_padded_head_dims(tmp_path, head_dim):
    """head_dim 80 / 96: the codes and the ring rows are at the codec's padded 128; the token budget gives up
    the ring's real bytes (and the first token's)."""
    path = write_tq_config(tmp_path, CFG)
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(NUM_LAYERS, HQ, HKV, head_dim, context_len=64))
        pool = runner.build_pools(256, max_running_requests=8)
    assert pool.ring_k[1].shape == (2 * W, HKV, 128)
    assert pool.window_bytes() == pool.plan.window_bytes(HKV, pool.window_requests, pool.layer_ids)  # as the log states
    assert 256 - runner.max_total_num_tokens == _reserved_tokens(pool, 256)


def test_lowest_free_request_index_first(s):
    from types import SimpleNamespace

    rtp = s["runner"].req_to_token_pool
    reqs = [SimpleNamespace(req_pool_idx=None, is_chunked=0, kv_committed_len=0) for _ in range(4)]
    got = rtp.alloc(reqs)
    assert got == [0, 1, 2, 3]
    rtp.free(reqs[1])
    rtp.free(reqs[0])
    new = [SimpleNamespace(req_pool_idx=None, is_chunked=0, kv_committed_len=0)]
    assert rtp.alloc(new) == [0]  # stock SGLang would hand out 4
    assert rtp.free_slots[:3] == [1, 4, 5]


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="SGLang's Triton metadata kernels run on a GPU or under TRITON_INTERPRET=1")
def test_cuda_graph_hooks_match_eager_metadata(s):
    """The CUDA-graph hooks build the decode metadata into static buffers: a replay gives the eager
    metadata's indices, ring rows and bounds for the real rows, and a padding row (seq_len 1, a stale
    request index, as SGLang's graph runner pads) writes no ring row."""
    backend, runner = s["backend"], s["runner"]
    _extend(s, [0, 1], [0, 0], [6, 3])
    slots = runner.token_to_kv_pool_allocator.alloc(2)
    r2t = runner.req_to_token_pool.req_to_token
    for r, slot in zip([0, 1], slots.tolist()):
        r2t[r, s["lens"][r]] = slot
    seq = [s["lens"][0] + 1, s["lens"][1] + 1]
    fb = decode_batch(runner, [0, 1], seq, slots, backend)
    backend.init_forward_metadata(fb)
    eager = backend.forward_metadata
    backend.init_cuda_graph_state(4, 4)
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    fill = backend.get_cuda_graph_seq_len_fill_value()
    assert fill == 1
    req = torch.zeros(4, dtype=torch.int64)
    lens = torch.full((4,), fill, dtype=torch.int64)
    backend.init_forward_metadata_capture_cuda_graph(3, 3, req[:3], lens[:3], None, ForwardMode.DECODE, None)
    captured = backend.forward_metadata
    assert (captured.window_rows == -1).all()  # capture runs write no ring row
    req[:2], req[2] = torch.tensor([0, 1]), 1  # row 2: padding with a stale (running) request index
    lens[:2] = torch.tensor(seq)
    backend.init_forward_metadata_replay_cuda_graph(3, req[:3], lens[:3], sum(seq) + fill, None, ForwardMode.DECODE,
                                                    None, lens[:3].clone())
    md = backend.forward_metadata
    assert md is captured and md.launch == backend.decode_launch(3)
    assert md.window_rows.data_ptr() == captured.window_rows.data_ptr()  # the buffers the graph reads
    assert md.window_rows[:2].tolist() == eager.window_rows.tolist() and md.window_rows[2].item() == -1
    assert md.window_lo[:2].tolist() == eager.window_lo.tolist()
    assert md.window_base[:2].tolist() == eager.window_base.tolist()
    assert md.kv_indptr[:3].tolist() == eager.kv_indptr.tolist()
    assert torch.equal(md.kv_indices[:sum(seq)], eager.kv_indices)
