"""The exact first token through the SGLang adapter (reference path, CPU): the claim per extend batch (flags of
position-0 slots by token id, radix hits through the slot, reused slots cleared, padding rows and input
embeddings and multimodal requests claim nothing), slot moves and the retraction copy carrying the flags,
`first_token: codes`, and LoRA (adapters change position 0's K/V per request: off)."""
import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, FakeRunner, env, extend_batch, server_args, tq_backend,  # noqa: E402
                          write_tq_config)
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402

HQ, HKV, D = 4, 2, 64
CFG = "name: t\nboundary: {first: 1, last: 0}\n"


def _server(tmp_path, cfg=CFG, sa=None):
    path = write_tq_config(tmp_path, cfg)
    mc = FakeModelConfig(3, HQ, HKV, D, context_len=64)
    with env(SGLANG_TQ_CONFIG=path):
        runner = FakeRunner(mc, sa)
        pool = runner.build_pools(128, max_running_requests=4)
        backend = tq_backend(runner)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(3)]
    return runner, pool, backend, layers


def _extend(runner, backend, layers, reqs, prefix, new, ids=None, pad=0, embeds=False, mm=None):
    slots = runner.token_to_kv_pool_allocator.alloc(sum(new))
    r2t = runner.req_to_token_pool.req_to_token
    off = 0
    for r, p, n in zip(reqs, prefix, new):
        r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
        off += n
    fb = extend_batch(runner, reqs, prefix, new, slots, backend)
    if ids is not None:
        fb.input_ids = torch.tensor(ids)
    if embeds:
        fb.input_embeds = torch.zeros(sum(new), HQ * D)
    fb.mm_inputs = mm
    backend.init_forward_metadata(fb)
    fb.out_cache_loc = torch.cat([slots, slots.new_zeros(pad)])  # a piecewise CUDA graph's padding rows
    gen = torch.Generator().manual_seed(sum(new))
    for layer in layers:
        q, k, v = (torch.randn(sum(new) + pad, h * D, generator=gen).to(torch.bfloat16) for h in (HQ, HKV, HKV))
        layer(q, k, v, fb)
    return slots, backend.forward_metadata


def test_claim_by_token_id_radix_hits_and_reused_slots(tmp_path):
    runner, pool, backend, layers = _server(tmp_path)
    assert backend.first_token and pool.first_token
    r2t = runner.req_to_token_pool.req_to_token
    # two prompts with the same first token id, one with another: two entries, the same one shared
    slots, md = _extend(runner, backend, layers, [0, 1, 2], [0, 0, 0], [5, 3, 4],
                        ids=[7] * 5 + [7] * 3 + [9] * 4, pad=3)
    assert md.first_entries.tolist() == [0, -1, -1, -1, -1, 0, -1, -1, 1, -1, -1, -1]
    assert md.first_rows(15).tolist()[12:] == [-1, -1, -1]  # padding rows write no table row
    assert pool.first_ids.tolist()[:2] == [7, 9] and pool.first_ids.tolist()[2:] == [-1, -1]
    assert pool.first_flags[r2t[:3, 0].long()].tolist() == [1, 1, 2]
    assert not pool.first_flags[slots[[1, 2, 3, 4, 6, 7, 9, 10, 11]].long()].any()
    # compress wrote the rows: entry 0 holds the (shared) first token's exact rotated K of each quantized layer
    for lid in (1, 2):
        first = pool.first_rows(lid)
        assert first.k[:2].abs().sum() > 0 and first.k[2:].abs().sum() == 0
    assert pool.first_rows(0) is None  # the bf16 boundary layer is exact anyway
    # a radix hit reuses request 0's first slot and its flag; a continuation claims nothing
    r2t[3, :5] = r2t[0, :5]
    _, md = _extend(runner, backend, layers, [3], [5], [2], ids=[7, 7])
    assert md.first_entries.tolist() == [-1, -1] and pool.first_flags[r2t[3, 0].long()] == 1
    # request 2 leaves; its first slot is handed to a token at position 4 of a new request: the flag goes
    alloc = runner.token_to_kv_pool_allocator
    alloc.free(r2t[2, :4].long())
    alloc.free_pages = torch.cat([r2t[2, :4].long(), alloc.free_pages])
    reused = r2t[2, 0].long()
    _, md = _extend(runner, backend, layers, [2], [4], [1], ids=[9])
    assert r2t[2, 4].long() == reused and pool.first_flags[reused] == 0


def test_table_full_and_input_embeddings(tmp_path):
    runner, pool, backend, layers = _server(tmp_path)
    _, md = _extend(runner, backend, layers, [0, 1, 2, 3], [0] * 4, [1] * 4, ids=[1, 2, 3, 4])
    assert md.first_entries.tolist() == [0, 1, 2, 3]
    _, md = _extend(runner, backend, layers, [0], [1], [1], ids=[5])
    assert md.first_entries.tolist() == [-1]
    r2t = runner.req_to_token_pool.req_to_token
    r2t[0] = 0
    _, md = _extend(runner, backend, layers, [0], [0], [2], ids=[5, 5])  # a fifth id: the table is full
    assert md.first_entries.tolist() == [-1, -1] and pool.first_flags[r2t[0, 0].long()] == 0
    _, md = _extend(runner, backend, layers, [0], [0], [2], ids=[1, 1], embeds=True)  # embeddings: no claim
    assert md.first_entries.tolist() == [-1, -1] and pool.first_flags[r2t[0, 0].long()] == 0
    r2t[1] = 0
    _, md = _extend(runner, backend, layers, [0, 1], [0, 0], [2, 2], ids=[1, 1, 2, 2], mm=[object(), None])
    assert md.first_entries.tolist() == [-1, -1, 1, -1]  # the multimodal request claims nothing, the text one does


def test_slot_moves_and_retraction_copy_carry_flags(tmp_path):
    runner, pool, backend, layers = _server(tmp_path)
    slots, _ = _extend(runner, backend, layers, [0], [0], [3], ids=[4, 4, 4])
    assert pool.first_flags[slots].tolist() == [1, 0, 0]
    dst = runner.token_to_kv_pool_allocator.alloc(3)
    pool.move_kv_cache(dst, slots)
    assert pool.first_flags[dst].tolist() == [1, 0, 0]
    copy = pool.get_cpu_copy(slots)
    pool.first_flags[slots] = 0
    pool.load_cpu_copy(copy, slots)
    assert pool.first_flags[slots].tolist() == [1, 0, 0]


def test_first_token_codes_keeps_no_rows(tmp_path):
    runner, pool, backend, layers = _server(tmp_path, CFG + "first_token: codes\n")
    assert not pool.first_token and not backend.first_token and pool.first_rows(1) is None
    assert pool.first_row_bytes() == 0 and pool.size == 128  # nothing taken from the budget
    _, md = _extend(runner, backend, layers, [0], [0], [3])
    assert md.first_entries is None


@pytest.mark.parametrize("lora", [dict(enable_lora=True), dict(lora_paths=["adapter"])], ids=["enable", "paths"])
def test_off_under_lora(tmp_path, lora, caplog):
    with caplog.at_level("INFO", logger="sglang_tq"):
        runner, pool, backend, layers = _server(tmp_path, sa=server_args(**lora))
    assert pool.first_token and not backend.first_token
    assert "first_token: exact is off under LoRA" in caplog.text
    slots, md = _extend(runner, backend, layers, [0], [0], [3])
    assert md.first_entries is None and not pool.first_flags[slots].any()
