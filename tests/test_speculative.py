"""Speculative verify (NGRAM's TARGET_VERIFY) in the SGLang backend, reference path on the CPU.

SGLang's own bookkeeping runs here: `NgramVerifyInput.prepare_for_verify` allocates the draft slots and
writes them to the req-to-token rows, `_free_cache` frees the rejected ones and rewrites the rows with the
accepted ones (its Triton helper runs under TRITON_INTERPRET=1). Checked:
* every verify output against attention computed by hand: the prefix as decode would read it (recent
  positions exact, older ones from the codes), the ancestors in the tree exact;
* after acceptance no slot leaks, the accepted tokens' codes are what compress writes, the ring holds
  their exact rows (tree siblings and rejected tokens leave nothing), and a following plain decode
  reads exactly the window it would have read had the accepted tokens been decoded one by one;
* CUDA-graph capture / replay of verify fill the same buffers as eager metadata; padding rows stage nothing;
* the refusals of what is not supported.
"""
import os
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import FakeModelConfig, FakeRunner, decode_batch, env, extend_batch, server_args, tq_backend  # noqa: E402
from sglang_fakes import sequence_kv, write_tq_config  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="SGLang's req-to-token Triton helpers run on a GPU or under TRITON_INTERPRET=1")

HQ, HKV, D, NUM_LAYERS, W, DRAFTS = 4, 2, 64, 3, 8, 4
CFG = """
name: test-spec
defaults:
  k: {bits: 4}
  v: {bits: 3}
boundary: {first: 1, last: 0}
window: {tokens: 8, requests: 4}
"""
CFG_NO_WINDOW = """
name: test-spec-nowindow
defaults:
  k: {bits: 4}
  v: {bits: 3}
boundary: {first: 1, last: 0}
"""


def _setup(tmp_path, cfg=CFG):
    path = write_tq_config(tmp_path, cfg)
    sa = server_args(speculative_algorithm="NGRAM", speculative_num_draft_tokens=DRAFTS)
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=64), sa)
        pool = runner.build_pools(256, max_running_requests=4)
        backend = tq_backend(runner)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(NUM_LAYERS)]
    return dict(runner=runner, pool=pool, backend=backend, layers=layers, gen=torch.Generator().manual_seed(0),
                exact={}, lens={}, start={}, window=backend.window)


@pytest.fixture
def s(tmp_path):
    return _setup(tmp_path)


def _qkv(s, n):
    g = s["gen"]
    return (torch.randn(n, HQ * D, generator=g).to(torch.bfloat16), torch.randn(n, HKV * D, generator=g).to(torch.bfloat16),
            torch.randn(n, HKV * D, generator=g).to(torch.bfloat16))


def _attend(q, k, v):
    sc = torch.einsum("hd,lhd->hl", q.float(), k.float().repeat_interleave(HQ // HKV, 1)) * D ** -0.5
    return torch.einsum("hl,lhd->hd", torch.softmax(sc, -1), v.float().repeat_interleave(HQ // HKV, 1))


def _prefill(s, reqs, lens, prefix=None):
    """An extend of `lens` new tokens after `prefix` cached ones (default 0: a prompt) of each request; a request
    extended again (a streaming session's next turn) keeps its first extend's ring start."""
    runner = s["runner"]
    prefix = prefix or [0] * len(reqs)
    slots = runner.token_to_kv_pool_allocator.alloc(sum(lens))
    r2t = runner.req_to_token_pool.req_to_token
    fb = extend_batch(runner, reqs, prefix, lens, slots, s["backend"])
    s["backend"].init_forward_metadata(fb)
    off = 0
    for r, p, n in zip(reqs, prefix, lens):
        r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
        s["lens"][r], s["start"][r] = p + n, min(s["start"].get(r, p), p)
        off += n
    for layer in s["layers"]:
        q, k, v = _qkv(s, sum(lens))
        layer(q, k, v, fb)
        off = 0
        for r, p, n in zip(reqs, prefix, lens):
            for j in range(n):
                s["exact"][(r, p + j, layer.layer_id)] = (k[off + j].view(HKV, D), v[off + j].view(HKV, D))
            off += n


def _window_view(s, r, lid, upto, lo):
    """K/V of request r's positions [0, upto) as decode reads them: [lo, upto) exact, the rest from the codes
    (position 0 from the exact first-token row where its slot is flagged)."""
    r2t = s["runner"].req_to_token_pool.req_to_token
    kk, vv = sequence_kv(s["pool"], lid, r2t[r, :upto])
    for p in range(lo, upto):
        kk[p], vv[p] = s["exact"][(r, p, lid)]
    return kk, vv


def _tree(parents):
    n = len(parents)
    m = torch.zeros(n, n, dtype=torch.bool)
    for j in range(n):
        a = j
        while a >= 0:
            m[j, a] = True
            a = parents[a]
    return m, m.sum(1) - 1


def _verify(s, reqs, parents, accept):
    """One NGRAM verify step of `reqs` with draft trees `parents` (node 0: the last accepted token), run
    through the backend with SGLang's prepare_for_verify / _free_cache; `accept`: each request's accepted
    path (node ids, from the root). Checks every quantized layer's outputs. Returns the freed slots."""
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

    runner, backend = s["runner"], s["backend"]
    alloc = runner.token_to_kv_pool_allocator
    W_ = s["window"]
    bs = len(reqs)
    prefix = [s["lens"][r] for r in reqs]
    trees = [_tree(p) for p in parents]
    mask = torch.cat([torch.cat([torch.ones(DRAFTS, p, dtype=torch.bool), m], 1).flatten()
                      for p, (m, _) in zip(prefix, trees)])
    positions = torch.cat([p + dep for p, (_, dep) in zip(prefix, trees)]).to(torch.int64)
    draft_ids = torch.arange(bs * DRAFTS, dtype=torch.int64)
    vi = NgramVerifyInput(draft_ids, mask, positions, None, None, None, DRAFTS)
    reqs_ns = [SimpleNamespace(kv_committed_len=p, kv_allocated_len=p) for p in prefix]
    batch = SimpleNamespace(
        forward_mode=ForwardMode.DECODE, input_ids=None, req_pool_indices=torch.tensor(reqs, dtype=torch.int64),
        req_to_token_pool=runner.req_to_token_pool, seq_lens=torch.tensor(prefix, dtype=torch.int64),
        tree_cache=SimpleNamespace(token_to_kv_pool_allocator=alloc, is_chunk_cache=lambda: True),
        token_to_kv_pool_allocator=alloc, reqs=reqs_ns, batch_size=lambda: bs)
    free_before = alloc.available_size()
    vi.prepare_for_verify(batch, 1)
    draft_slots = batch.out_cache_loc.clone()
    assert alloc.available_size() == free_before - bs * DRAFTS
    fb = ForwardBatch(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=bs, input_ids=batch.input_ids,
                      req_pool_indices=batch.req_pool_indices, seq_lens=batch.seq_lens.clone(),
                      out_cache_loc=draft_slots, seq_lens_sum=sum(prefix),
                      seq_lens_cpu=torch.tensor(prefix), positions=positions, spec_info=vi, attn_backend=backend)
    fb.req_to_token_pool, fb.token_to_kv_pool = runner.req_to_token_pool, runner.token_to_kv_pool
    backend.init_forward_metadata(fb)
    step_kv = {}
    for layer in s["layers"]:
        lid = layer.layer_id
        q, k, v = _qkv(s, bs * DRAFTS)
        o = layer(q, k, v, fb)
        step_kv[lid] = (k.view(-1, HKV, D), v.view(-1, HKV, D))
        if not s["pool"].is_quantized(lid):
            continue
        for b, r in enumerate(reqs):
            m, dep = trees[b]
            for j in range(DRAFTS):
                t = b * DRAFTS + j
                lo = min(max(prefix[b] + int(dep[j]) + 1 - W_, s["start"][r]), prefix[b]) if W_ else prefix[b]
                kk, vv = _window_view(s, r, lid, prefix[b], lo)
                anc = [b * DRAFTS + a for a in range(DRAFTS) if m[j, a]]
                want = _attend(q[t].view(HQ, D), torch.cat([kk, step_kv[lid][0][anc]]),
                               torch.cat([vv, step_kv[lid][1][anc]]))
                torch.testing.assert_close(o[t].view(HQ, D).float(), want, atol=2e-2, rtol=2e-2,
                                           msg=lambda e: f"req {r} draft {j} layer {lid}: {e}")
    # SGLang's acceptance bookkeeping (page size 1): keep the accepted slots, free the rest
    acc_flat = torch.tensor([b * DRAFTS + a for b, path in enumerate(accept) for a in path], dtype=torch.int64)
    vi.accepted_indices = acc_flat
    vi.accept_length = torch.tensor([len(p) - 1 for p in accept], dtype=torch.int32)
    vi._free_cache(batch, 1, vi.accept_length.clone())
    n_acc = sum(len(p) for p in accept)
    assert alloc.available_size() == free_before - n_acc  # the rejected drafts' slots are free again
    kept = set(draft_slots[acc_flat].tolist())
    freed = [x for x in draft_slots.tolist() if x not in kept]
    r2t = runner.req_to_token_pool.req_to_token
    for b, r in enumerate(reqs):
        for i, a in enumerate(accept[b]):
            assert r2t[r, prefix[b] + i].item() == draft_slots[b * DRAFTS + a].item()
            for layer in s["layers"]:
                k, v = step_kv[layer.layer_id]
                s["exact"][(r, prefix[b] + i, layer.layer_id)] = (k[b * DRAFTS + a], v[b * DRAFTS + a])
        s["lens"][r] = prefix[b] + len(accept[b])
        assert reqs_ns[b].kv_committed_len == s["lens"][r]
    return freed


def _decode(s, reqs):
    """A plain decode step, every quantized output checked against the window decode would read."""
    runner, pool = s["runner"], s["pool"]
    W_ = s["window"]
    r2t = runner.req_to_token_pool.req_to_token
    slots = runner.token_to_kv_pool_allocator.alloc(len(reqs))
    for r, slot in zip(reqs, slots.tolist()):
        r2t[r, s["lens"][r]] = slot
        s["lens"][r] += 1
    fb = decode_batch(runner, reqs, [s["lens"][r] for r in reqs], slots, s["backend"])
    s["backend"].init_forward_metadata(fb)
    for layer in s["layers"]:
        lid = layer.layer_id
        q, k, v = _qkv(s, len(reqs))
        o = layer(q, k, v, fb)
        for i, r in enumerate(reqs):
            s["exact"][(r, s["lens"][r] - 1, lid)] = (k[i].view(HKV, D), v[i].view(HKV, D))
        if not pool.is_quantized(lid):
            continue
        for i, r in enumerate(reqs):
            L = s["lens"][r]
            lo = max(L - W_, s["start"][r]) if W_ else L
            kk, vv = _window_view(s, r, lid, L, lo)
            torch.testing.assert_close(o[i].view(HQ, D).float(), _attend(q[i].view(HQ, D), kk, vv), atol=2e-2,
                                       rtol=2e-2, msg=lambda e: f"decode req {r} layer {lid} L {L}: {e}")


def _check_ring(s, r):
    """The ring rows of request r's window hold exactly what compress writes for those tokens (rotated,
    bf16), so the ring is what decoding the accepted tokens one by one would have left."""
    pool, L = s["pool"], s["lens"][r]
    for lid in (layer.layer_id for layer in s["layers"]):
        if not pool.is_quantized(lid):
            continue
        rk, rv = pool.window_buffers(lid)
        kb, vb = pool.get_kv_buffer(lid)
        for p in range(max(L - W, s["start"][r]), L):
            k, v = s["exact"][(r, p, lid)]
            assert torch.equal(rk[r * W + p % W], kb.codec.rotate(k.float()).to(torch.bfloat16)), (r, p, lid)
            assert torch.equal(rv[r * W + p % W], vb.codec.rotate(v.float()).to(torch.bfloat16)), (r, p, lid)


def _use_triton(s, monkeypatch):
    """The backend and pool on the Triton kernels (interpreter): the GPU path."""
    from sglang_tq.kernel_calls import KernelCalls
    from sglang_tq.speculative import SpeculativeVerify

    ops = KernelCalls("cpu", triton=True)
    monkeypatch.setattr(s["backend"], "ops", ops)
    monkeypatch.setattr(s["pool"], "ops", ops)
    monkeypatch.setattr(s["backend"], "_launches", {})
    monkeypatch.setattr(s["backend"], "spec", SpeculativeVerify(s["backend"], s["runner"]))


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_verify_accept_and_decode(s, kernels, monkeypatch):
    """Two verify rounds over a branching tree (siblings at one depth, the later-numbered one rejected)
    and a chain, each followed by checks of slots, codes, ring and a plain decode; through the reference
    ops and through the Triton kernels (the GPU path: extend with the tree mask and prefix ring, staging
    through compress, the one-launch commit)."""
    if kernels == "triton":
        _use_triton(s, monkeypatch)
    _prefill(s, [0, 1], [11, 6])
    tree = [-1, 0, 0, 1]   # nodes 1 and 2 share depth 1; accepting 0-1-3 rejects 2 (written after 1)
    chain = [-1, 0, 1, 2]
    freed = _verify(s, [0, 1], [tree, chain], accept=[[0, 1, 3], [0]])
    r2t = s["runner"].req_to_token_pool.req_to_token
    for r in (0, 1):
        assert not set(r2t[r, :s["lens"][r]].tolist()) & set(freed)  # no freed slot is still referenced
    _decode(s, [0, 1])  # commits the accepted rows to the ring first
    _check_ring(s, 0)
    _check_ring(s, 1)
    _verify(s, [0, 1], [chain, tree], accept=[[0, 1, 2, 3], [0, 2]])
    _verify(s, [1, 0], [tree, tree], accept=[[0, 1], [0]])  # verify right after verify: commit at metadata
    _decode(s, [1, 0])
    for r in (0, 1):
        _check_ring(s, r)
    # the codes of every token in the cache are the compressed exact K/V (accepted drafts included)
    pool = s["pool"]
    for lid in (1, 2):
        kb, vb = pool.get_kv_buffer(lid)
        for r in (0, 1):
            for p in range(s["lens"][r]):
                k, _ = s["exact"][(r, p, lid)]
                codes, _ = kb.codec.encode(k.float()[None])
                assert torch.equal(kb.codes[r2t[r, p].long()], codes[0]), (r, p, lid)


def test_verify_on_a_linear_attention_hybrid(tmp_path):
    """Qwen3-Next (attention layers 3 and 7 between Gated DeltaNet layers, TQHybridLinearKVPool): the draft
    staging covers the attention layers by model layer id; verify, commit and decode as on a plain model."""
    import sglang.srt.configs.qwen3_next as q3n

    q3n.get_attention_tp_size = lambda: 1
    hf = q3n.Qwen3NextConfig(
        num_hidden_layers=8, hidden_size=256, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, full_attention_interval=4, vocab_size=1000, intermediate_size=512,
        moe_intermediate_size=128, num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=128)
    mc = FakeModelConfig(8, HQ, HKV, D, context_len=64)
    mc.hf_config = mc.hf_text_config = hf
    path = write_tq_config(tmp_path, CFG.replace("boundary: {first: 1, last: 0}", "boundary: {first: 0, last: 0}"))
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(mc, server_args(max_mamba_cache_size=8))
        runner.mambaish_config = runner.hybrid_gdn_config = hf
        pool = runner.build_pools(4096, max_running_requests=4)
        # set after the pools: SGLang's recurrent-state pool keeps CUDA-only verify buffers with speculative decoding
        runner.server_args.speculative_algorithm, runner.server_args.speculative_num_draft_tokens = "NGRAM", DRAFTS
        backend = tq_backend(runner)
    assert backend.spec.stage_index == {3: 0, 7: 1}
    s = dict(runner=runner, pool=pool, backend=backend, gen=torch.Generator().manual_seed(1), exact={}, lens={},
             start={}, window=backend.window,
             layers=[RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in (3, 7)])
    _prefill(s, [0, 1], [11, 6])
    _verify(s, [0, 1], [[-1, 0, 0, 1], [-1, 0, 1, 2]], accept=[[0, 1, 3], [0, 1]])
    _decode(s, [0, 1])
    for r in (0, 1):
        _check_ring(s, r)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_extend_after_verify_commits_the_accepted_tokens(s, kernels, monkeypatch):
    """A request whose last verify is still staged is extended in its own slot (a streaming session's next turn
    after a verify that finished the previous one): the accepted tokens reach the ring first, since the extend
    keeps the request's ring and decode then reads them."""
    if kernels == "triton":
        _use_triton(s, monkeypatch)
    _prefill(s, [0, 1], [9, 5])
    _verify(s, [0, 1], [[-1, 0, 0, 1], [-1, 0, 1, 2]], accept=[[0, 1, 3], [0, 1, 2]])
    _prefill(s, [0], [2], prefix=[s["lens"][0]])  # req 1 stays staged
    assert s["start"][0] == 0 and s["pool"].window_start[0].item() == 0
    _decode(s, [0, 1])
    for r in (0, 1):
        _check_ring(s, r)


def test_verify_without_window(tmp_path):
    """No recent window: drafts see the prefix through the codes, each other exact; nothing is staged."""
    s = _setup(tmp_path, CFG_NO_WINDOW)
    assert s["window"] == 0 and s["backend"].spec.staging is None
    _prefill(s, [0, 1], [9, 4])
    _verify(s, [0, 1], [[-1, 0, 0, 2], [-1, 0, 1, 1]], accept=[[0, 2, 3], [0, 1]])
    _decode(s, [0, 1])


def test_verify_cuda_graph_hooks_match_eager(s):
    """Capture and replay fill the static buffers the graph reads with the eager metadata's values; the
    padding row of a replay (stale request index, seq_len 1) stages no row, and the replay's real rows
    are committed at the next forward."""
    backend, runner = s["backend"], s["runner"]
    _prefill(s, [0, 1], [10, 7])
    backend.init_cuda_graph_state(4, 4 * DRAFTS)
    req = torch.zeros(4, dtype=torch.int64)
    lens = torch.ones(4, dtype=torch.int64)
    cap_info = SimpleNamespace(custom_mask=torch.ones(4 * DRAFTS * 32, dtype=torch.bool), draft_token=None,
                               positions=None, draft_token_num=DRAFTS)
    backend.init_forward_metadata_capture_cuda_graph(3, 3 * DRAFTS, req[:3], lens[:3], None,
                                                     ForwardMode.TARGET_VERIFY, cap_info)
    captured = backend.forward_metadata
    assert captured.verify is not None and (captured.verify.stage_rows == -1).all()
    assert not backend.spec.staging.valid.any()  # a capture stages nothing
    # the real batch, eagerly
    prefix = [s["lens"][0], s["lens"][1]]
    from sglang.srt.speculative.ngram_info import NgramVerifyInput

    m, dep = _tree([-1, 0, 0, 1])
    mask = torch.cat([torch.cat([torch.ones(DRAFTS, p, dtype=torch.bool), m], 1).flatten() for p in prefix])
    positions = torch.cat([p + dep for p in prefix]).to(torch.int64)
    vi = NgramVerifyInput(torch.arange(2 * DRAFTS), mask, positions, None, None, None, DRAFTS)
    slots = runner.token_to_kv_pool_allocator.alloc(2 * DRAFTS)
    r2t = runner.req_to_token_pool.req_to_token
    for b, r in enumerate((0, 1)):
        r2t[r, prefix[b]:prefix[b] + DRAFTS] = slots[b * DRAFTS:(b + 1) * DRAFTS]
    fb = ForwardBatch(forward_mode=ForwardMode.TARGET_VERIFY, batch_size=2, input_ids=vi.draft_token,
                      req_pool_indices=torch.tensor([0, 1]), seq_lens=torch.tensor(prefix), out_cache_loc=slots,
                      seq_lens_sum=sum(prefix), seq_lens_cpu=torch.tensor(prefix), positions=positions,
                      spec_info=vi, attn_backend=backend)
    fb.req_to_token_pool, fb.token_to_kv_pool = runner.req_to_token_pool, runner.token_to_kv_pool
    backend.init_forward_metadata(fb)
    eager = backend.forward_metadata.verify
    e_rows, e_lo, e_base = eager.stage_rows.clone(), eager.ring_lo.clone(), eager.ring_base.clone()
    assert e_rows.tolist() == list(range(0, DRAFTS)) + list(range(DRAFTS, 2 * DRAFTS))
    # replay: rows 0, 1 real, row 2 padding with request 0's stale index
    req[:3] = torch.tensor([0, 1, 0])
    lens[:2] = torch.tensor(prefix)
    backend.init_forward_metadata_replay_cuda_graph(3, req[:3], lens[:3], sum(prefix) + 1, None,
                                                    ForwardMode.TARGET_VERIFY, vi, lens[:3].clone())
    md = backend.forward_metadata
    assert md is captured and backend.spec.staging.valid.tolist() == [1, 1, 0, 0, 0]
    assert md.verify.stage_rows.data_ptr() == captured.verify.stage_rows.data_ptr()
    assert md.verify.stage_rows[:2 * DRAFTS].tolist() == e_rows.tolist()
    assert (md.verify.stage_rows[2 * DRAFTS:] == -1).all()
    assert md.verify.ring_lo[:2 * DRAFTS].tolist() == e_lo.tolist()
    assert md.verify.ring_base[:2].tolist() == e_base.tolist()
    assert torch.equal(md.kv_indices[:sum(prefix)], backend.bf16.forward_metadata.kv_indices[:sum(prefix)])


def test_verify_graphs_allocate_no_decode_workspace(s, tmp_path, monkeypatch):
    """With NGRAM SGLang captures verify batches only (max_bs x draft tokens rows): the decode workspace, which
    they do not read, is not allocated (memory outside SGLang's budget); without speculative decoding the decode
    graphs get it (Triton kernels in the interpreter)."""
    from sglang_tq.kernel_calls import KernelCalls

    ops = KernelCalls("cpu", triton=True)
    plain_path = write_tq_config(tmp_path, CFG, name="plain.yaml")
    with env(SGLANG_TQ_CONFIG=plain_path):
        runner = FakeRunner(FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=64))
        runner.build_pools(256, max_running_requests=4)
        plain = tq_backend(runner)
    for backend in (s["backend"], plain):
        monkeypatch.setattr(backend, "ops", ops)
        monkeypatch.setattr(backend, "_launches", {})
        backend.init_cuda_graph_state(4, 4 * DRAFTS if backend.spec is not None else 4)
    assert s["backend"].decode_workspace is None and s["backend"]._graph_window is None
    assert plain.spec is None and plain.decode_workspace.max_batch == 4 and plain._graph_window.shape == (3, 4)


@pytest.mark.parametrize("algo", ["EAGLE", "EAGLE3", "STANDALONE", "NEXTN"])
def test_draft_model_algorithms_refused(algo):
    from sglang_tq.compat import _problems_server_args

    problems = _problems_server_args(server_args(speculative_algorithm=algo))
    assert any(f"--speculative-algorithm {algo}: the draft model" in p for p in problems)
    assert not any("speculative" in p for p in _problems_server_args(server_args(speculative_algorithm="NGRAM")))


def test_window_narrower_than_the_drafts_refused(tmp_path):
    path = write_tq_config(tmp_path, CFG.replace("tokens: 8", "tokens: 2"))
    sa = server_args(speculative_algorithm="NGRAM", speculative_num_draft_tokens=DRAFTS)
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=64), sa)
        runner.build_pools(256, max_running_requests=4)
        with pytest.raises(ValueError, match=r"window.tokens \(2\).*--speculative-num-draft-tokens \(4\)"):
            tq_backend(runner)


def test_warm_up_compiles_the_verify_variants(s, monkeypatch):
    """Start-up warm-up (Triton in the interpreter): the verify extend once per block size, soft-cap and prefix
    split besides the plain variants; it writes no ring row (and no cache row but the padding slot 0)."""
    from sglang_tq.kernel_calls import KernelCalls

    ops = KernelCalls("cpu", triton=True)
    monkeypatch.setattr(s["backend"], "ops", ops)
    monkeypatch.setattr(s["pool"], "ops", ops)
    pool = s["pool"]
    rings = [t.clone() for lid in (1, 2) for t in pool.window_buffers(lid)]
    codes = pool.get_kv_buffer(1)[0].codes[1:].clone()
    calls = []
    monkeypatch.setattr(s["backend"].spec, "warm", lambda *a, _w=s["backend"].spec.warm: calls.append(1) or _w(*a))
    runs = s["backend"].warm_extend_kernels(torch.bfloat16, block_ms=(32,), logit_caps=(0.0, 30.0))
    assert len(calls) == 1  # one (K, V) format pair
    assert not s["backend"].spec.graphs  # the fake server runs without CUDA graphs: the eager variants
    assert runs == 2 * 2 * 2 + 2 * 2  # plain: 2 caps x 2 packings x 2 splittings; verify: 2 caps x (split, unsplit)
    assert all(torch.equal(a, b) for a, b in zip(rings, [t for lid in (1, 2) for t in pool.window_buffers(lid)]))
    assert torch.equal(codes, pool.get_kv_buffer(1)[0].codes[1:])
    monkeypatch.setattr(s["backend"].spec, "graphs", True)  # the CUDA-graph variants (int64 qo_indptr, uint8 mask)
    assert s["backend"].warm_extend_kernels(torch.bfloat16, block_ms=(32,), logit_caps=(0.0, 30.0)) == runs


def test_sliding_window_models_refused_with_speculative_decoding():
    """A model with sliding-window layers and NGRAM is refused at start-up (the loaded model's attention layers
    in the scheduler; the config's layer types in the main process), not at its first verify step."""
    import types

    from sglang_tq.compat import SPECULATIVE_SLIDING, TQUnsupportedError, _problems_runner, check_server_args

    def runner(window, algo):
        model = torch.nn.Sequential(RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=0, sliding_window_size=window))
        return types.SimpleNamespace(server_args=server_args(speculative_algorithm=algo), model=model)

    assert SPECULATIVE_SLIDING in _problems_runner(runner(127, "NGRAM"))
    assert SPECULATIVE_SLIDING not in _problems_runner(runner(-1, "NGRAM"))
    assert SPECULATIVE_SLIDING not in _problems_runner(runner(127, None))

    tc = types.SimpleNamespace(layer_types=["sliding_attention", "full_attention"])
    mc = types.SimpleNamespace(hf_text_config=tc, num_hidden_layers=2, head_dim=64, v_head_dim=64)
    sa = server_args(speculative_algorithm="NGRAM", speculative_num_draft_tokens=DRAFTS)
    sa.model_path = "some/model"
    sa.get_model_config = lambda: mc
    with pytest.raises(TQUnsupportedError, match="sliding-window layers: the verify step"):
        check_server_args(sa, resolve=False)
    tc.layer_types = ["full_attention"] * 2
    check_server_args(sa, resolve=False)
