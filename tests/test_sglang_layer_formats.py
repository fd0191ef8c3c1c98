"""fp8 layers (`format: fp8`) and padded head dims (80 / 96) through the production backend on the CPU,
against SGLang's TorchNativeAttnBackend over a bf16 pool that holds the K/V as the TurboQuant pool stores
them (fp8-rounded, or dequantized from the codes). fp8 layers are stored as e4m3 by the pool and read by
the backend's held Triton backend (its torch twin here) from the float8 view. Covers a prefill, a
radix-cache hit (prefix read from the cache) and decode, with a TurboQuant layer between two fp8 layers."""
import pytest

pytest.importorskip("sglang")

import torch  # noqa: E402

from sglang_fakes import (FakeModelConfig, decode_batch, extend_batch, sequence_kv,  # noqa: E402
                          tq_and_reference_runners, write_tq_config)
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend  # noqa: E402
from sglang.srt.layers.radix_attention import RadixAttention  # noqa: E402
from tq_kernels.codec import fp8_decode, fp8_encode  # noqa: E402

HQ, HKV, NUM_LAYERS = 8, 2, 3
CFG = "boundary: {first: 1, last: 1, format: fp8}\n"  # layers 0 and 2 fp8, layer 1 TurboQuant
ATOL = RTOL = 2e-2


@pytest.mark.parametrize("D", [64, 96])
def test_fp8_and_packed_layers_prefill_prefix_decode(tmp_path, D):
    path = write_tq_config(tmp_path, CFG)
    mc = FakeModelConfig(NUM_LAYERS, HQ, HKV, D, context_len=64)
    runner, pool, backend, ref_runner, ref_pool = tq_and_reference_runners(path, mc, 128, 4)
    ref = TorchNativeAttnBackend(ref_runner)
    layers = [RadixAttention(HQ, D, D ** -0.5, HKV, layer_id=i) for i in range(NUM_LAYERS)]
    fp8_layers = [i for i in range(NUM_LAYERS) if pool.is_fp8(i)]
    assert fp8_layers == [0, 2] and pool.is_quantized(1)
    assert pool.get_key_buffer(1).shape[-1] == D  # the model's head dim; 4-bit codes of 64 or 128 (padded) coords:
    assert pool.k_codes[1].shape[-1] == {64: 32, 96: 64}[D]

    def stored(lid, loc):
        """K/V of rows `loc` as the cache's readers take them, [n, HKV, D] bf16."""
        kb, vb = pool.get_kv_buffer(lid)
        if lid in fp8_layers:
            return fp8_decode(kb[loc]).bfloat16(), fp8_decode(vb[loc]).bfloat16()
        return tuple(x.bfloat16() for x in sequence_kv(pool, lid, loc))
    gen = torch.Generator().manual_seed(0)
    r2t = runner.req_to_token_pool.req_to_token

    def qkv(n):
        return tuple(torch.randn(n, h * D, generator=gen).to(torch.bfloat16) for h in (HQ, HKV, HKV))

    def run(fb, fb_ref, n, decode):
        for layer in layers:
            q, k, v = qkv(n)
            o = layer(q, k, v, fb)
            lid, loc = layer.layer_id, fb.out_cache_loc
            if lid in fp8_layers:
                assert torch.equal(pool.k_buffer[lid][loc], fp8_encode(k.view(-1, HKV, D)))  # e4m3 bytes
            if decode:  # the reference pool holds the new token as the cache does
                ref_pool.k_buffer[lid][loc], ref_pool.v_buffer[lid][loc] = stored(lid, loc)
            o_ref = layer(q, k, v, fb_ref, save_kv_cache=not decode)
            torch.testing.assert_close(o.float(), o_ref.float(), atol=ATOL, rtol=RTOL,
                                       msg=lambda m: f"layer {lid}: {m}")
            ref_pool.k_buffer[lid][loc], ref_pool.v_buffer[lid][loc] = stored(lid, loc)  # as later steps read them

    def extend(req_ids, prefix_lens, new_lens):
        slots = runner.token_to_kv_pool_allocator.alloc(sum(new_lens))
        off = 0
        for r, p, n in zip(req_ids, prefix_lens, new_lens):
            r2t[r, p:p + n] = slots[off:off + n].to(r2t.dtype)
            off += n
        fb = extend_batch(runner, req_ids, prefix_lens, new_lens, slots, backend)
        fb_ref = extend_batch(ref_runner, req_ids, prefix_lens, new_lens, slots, ref)
        backend.init_forward_metadata(fb)
        ref.init_forward_metadata(fb_ref)
        run(fb, fb_ref, sum(new_lens), decode=False)

    extend([0], [0], [10])                     # prefill
    r2t[1, :6] = r2t[0, :6]
    extend([1], [6], [4])                      # radix hit: a 6-token prefix read from fp8 rows
    lens = {0: 10, 1: 10}
    for _ in range(2):                         # decode both requests
        slots = runner.token_to_kv_pool_allocator.alloc(2)
        for r, slot in zip((0, 1), slots.tolist()):
            r2t[r, lens[r]] = slot
            lens[r] += 1
        seq = [lens[0], lens[1]]
        fb, fb_ref = decode_batch(runner, [0, 1], seq, slots, backend), decode_batch(ref_runner, [0, 1], seq, slots, ref)
        backend.init_forward_metadata(fb)
        ref.init_forward_metadata(fb_ref)
        run(fb, fb_ref, 2, decode=True)
