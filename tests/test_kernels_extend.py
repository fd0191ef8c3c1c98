"""Triton extend (chunked prefill over a packed prefix) against the PyTorch reference.
Run on CPU with TRITON_INTERPRET=1; unchanged on a GPU."""
import zlib

import pytest
import torch
import triton

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from kernel_helpers import (alloc_cache, extend_inputs, fill_random_kv, make_codecs, pick_device, rel_err,
                            triton_runnable)

RUNNABLE, WHY = triton_runnable()
pytestmark = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
TOL = 2e-2

F = VecFormat
# name, K, V, (H_q, H_kv), prefix lengths, new-token counts, causal, logit_cap, block_m, block_n
CASES = [
    ("K4V4-d128-g4", F(128, 4), F(128, 4), (8, 2), [40, 0], [20, 17], True, 0.0, 32, 32),
    ("K3V3-d64-g3", F(64, 3), F(64, 3), (9, 3), [33], [35], True, 0.0, 32, 32),
    ("K5V4-d128-g4", F(128, 5), F(128, 4), (8, 2), [37], [12], True, 0.0, 32, 32),
    ("K2V2-d64-g1-nonc", F(64, 2, norm_correction=False), F(64, 2, norm_correction=False), (2, 2), [1, 50],
     [5, 1], True, 0.0, 32, 32),
    ("PROD3-V3-d64-g8", F(64, 3, qjl=True), F(64, 3), (8, 1), [27], [19], True, 0.0, 32, 32),
    ("PROD4-V4-d128-g4", F(128, 4, qjl=True), F(128, 4), (4, 1), [30, 9], [8, 16], True, 0.0, 32, 32),
    ("K3o-V2o-d128-g1", F(128, 3, outlier_channels=32, outlier_bits=4),
     F(128, 2, outlier_channels=32, outlier_bits=3), (2, 2), [45], [21], True, 0.0, 32, 32),
    ("PROD3o-V4-d64-g3", F(64, 3, qjl=True, outlier_channels=16, outlier_bits=4), F(64, 4),
     (3, 1), [18], [12], True, 0.0, 32, 32),
    ("K4V2-d64-g4-cap-noncausal", F(64, 4), F(64, 2), (4, 1), [26], [18], False, 15.0, 32, 32),
    ("K4V2-d128-g2-default-blocks", F(128, 4), F(128, 2), (4, 2), [150], [70], True, 0.0, 64, 64),
    ("K4V4-d64-noprefix", F(64, 4), F(64, 4), (4, 2), [0, 0], [23, 3], True, 0.0, 32, 32),
    ("K4V4-d128-g4-bm128", F(128, 4), F(128, 4), (8, 2), [70, 130], [150, 9], True, 0.0, 128, 64),
    ("K3V3-d64-g3-auto-blocks", F(64, 3), F(64, 3), (9, 3), [65], [140], True, 0.0, None, 64),
    ("K4V4-d256-g2", F(256, 4), F(256, 4), (4, 2), [37], [20], True, 0.0, 32, 32),
]


def _run(kfmt, vfmt, hq, hkv, pre, new, causal, cap, bm, bn, seed, dtype=torch.bfloat16, **kw):
    from tq_kernels.extend import extend_attention

    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    S = sum(pre) + 11
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV)  # poisoned
    batch = fill_random_kv(pre, hkv, kc, vc, bufs, gen, DEV)
    T = sum(new)
    qo = torch.zeros(len(new) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(new).cumsum(0)
    qo = qo.to(DEV)
    dk, dv = kfmt.head_dim, vfmt.head_dim
    q = (torch.randn(T, hq, dk, generator=gen) * 2).to(DEV, dtype)
    kn = torch.randn(T, hkv, dk, generator=gen).to(DEV, dtype)
    vn = torch.randn(T, hkv, dv, generator=gen).to(DEV, dtype)
    sm = dk ** -0.5
    out = torch.full((T, hq, dv), float("nan"), dtype=dtype, device=DEV)
    ret = extend_attention(q, kn, vn, *bufs, kc, vc, qo, batch.kv_indptr, batch.kv_indices, sm, cap, causal, out,
                           max_extend_len=max(new), block_m=bm, block_n=bn, **kw)
    assert ret is out
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo.cpu(),
                                     batch.kv_indptr.cpu(), batch.kv_indices.cpu(), sm, cap, causal)
    assert not torch.isnan(out).any(), "NaN in output or elements left unwritten"
    return out.cpu().float(), ref.float()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_extend_matches_reference(case):
    _check_variant(case, False, 0)


def _check_variant(case, pack, seed_offset, **kw):
    """One case (extend_attention keyword arguments kw), per query head or with the query group packed
    into the rows, against the reference."""
    name, kfmt, vfmt, (hq, hkv), pre, new, causal, cap, bm, bn = case
    if pack and not choose_gqa_pack_ok(hq // hkv, bm):
        pytest.skip("block too small for the packed group")
    out, ref = _run(kfmt, vfmt, hq, hkv, pre, new, causal, cap, bm, bn, zlib.crc32(name.encode()) + seed_offset,
                    gqa_pack=pack, **kw)
    err = rel_err(out, ref)
    assert err < TOL, f"{name}: rel err {err:.3e}"


def _cases(*names):
    return [c for c in CASES if c[0] in names]


PACKED_CASES = _cases("K4V4-d128-g4", "K2V2-d64-g1-nonc", "PROD3-V3-d64-g8", "PROD4-V4-d128-g4",
                      "K4V2-d64-g4-cap-noncausal", "K4V2-d128-g2-default-blocks", "K4V4-d64-noprefix",
                      "K4V4-d128-g4-bm128", "K4V4-d256-g2", "K3V3-d64-g3", "K5V4-d128-g4", "K3V3-d64-g3-auto-blocks",
                      "K3o-V2o-d128-g1")


@pytest.mark.parametrize("case", PACKED_CASES, ids=[c[0] for c in PACKED_CASES])
def test_extend_packed_group_matches_reference(case):
    """The query group packed into each program's rows: prefix centroids from the register LUTs (one-field
    4- / 2-bit codes, 3- and 5-bit codes through the split LUTs; the PTX on a GPU, one gather per slice in
    the interpreter, which checks the byte loads and the interleaving order) or per-code gathers
    (outliers), scales on the tiles."""
    _check_variant(case, True, 7)


def choose_gqa_pack_ok(group: int, block_m) -> bool:
    return block_m is None or block_m >= triton.next_power_of_2(group)


def test_choose_gqa_pack():
    """Packed where the group's rows of the longest run fit one 128-row block (groups padded to 2^k)."""
    from tq_kernels.extend import choose_gqa_pack

    assert choose_gqa_pack(4, 32) and choose_gqa_pack(3, 32) and choose_gqa_pack(8, 16)
    assert not choose_gqa_pack(4, 33) and not choose_gqa_pack(8, 17) and not choose_gqa_pack(4, 128)
    assert not choose_gqa_pack(1, 1)  # nothing to share


PACK_CASES = _cases("K4V4-d128-g4", "K3V3-d64-g3", "K2V2-d64-g1-nonc", "PROD3-V3-d64-g8", "PROD3o-V4-d64-g3",
                    "K4V2-d64-g4-cap-noncausal", "K4V4-d128-g4-bm128", "K3V3-d64-g3-auto-blocks")


@pytest.mark.parametrize("case", PACK_CASES, ids=[c[0] for c in PACK_CASES])
def test_extend_gqa_pack_matches_reference(case):
    """gqa_pack: one program per KV head whose rows are (token, query head) pairs of the whole group
    (groups of 3 padded to 4, of 8 with 4 tokens per 32-row program, of 1 as without packing)."""
    _check_variant(case, True, 1)


def test_extend_default_max_len():
    """max_extend_len computed by the launch function; one sequence with zero new tokens."""
    from tq_kernels.extend import extend_attention

    gen = torch.Generator().manual_seed(2)
    kfmt = vfmt = F(64, 3)
    kc, vc = make_codecs(kfmt, vfmt)
    bufs = alloc_cache(kfmt, vfmt, 40, 1, DEV)
    batch = fill_random_kv([10, 12], 1, kc, vc, bufs, gen, DEV)
    qo = torch.tensor([0, 0, 7], dtype=torch.int32, device=DEV)
    q = torch.randn(7, 2, 64, generator=gen).to(DEV)
    kn = torch.randn(7, 1, 64, generator=gen).to(DEV)
    vn = torch.randn(7, 1, 64, generator=gen).to(DEV)
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo, batch.kv_indptr, batch.kv_indices, 0.125)
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo.cpu(),
                                     batch.kv_indptr.cpu(), batch.kv_indices.cpu(), 0.125)
    assert rel_err(out.cpu(), ref) < TOL


SPLIT_CASES = _cases("K4V4-d128-g4", "K3V3-d64-g3", "PROD3-V3-d64-g8", "K3o-V2o-d128-g1",
                     "K4V2-d64-g4-cap-noncausal", "K4V4-d64-noprefix", "K4V4-d128-g4-bm128")


@pytest.mark.parametrize("splits, pack", [(2, False), (3, True)], ids=["2-splits", "3-splits-packed"])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_extend_split_prefix_matches_reference(case, splits, pack):
    """Split-K over the prefix: each split walks its tiles of the prefix (some none: prefixes shorter
    than the splits' tiles, or none at all), the last one also the new tokens, and the merge launch
    combines the partials; with and without GQA packing, PROD keys, outliers, soft-cap."""
    _check_variant(case, pack, 2, num_splits=splits)


def test_extend_split_leaves_padding_rows():
    """Rows past the batch's real tokens (a piecewise CUDA graph's padding) stay untouched by the merge."""
    from tq_kernels.extend import extend_attention

    gen = torch.Generator().manual_seed(3)
    kfmt = vfmt = F(64, 4)
    kc, vc = make_codecs(kfmt, vfmt)
    bufs = alloc_cache(kfmt, vfmt, 200, 2, DEV)
    batch = fill_random_kv([150], 2, kc, vc, bufs, gen, DEV)
    n, pad = 9, 5
    qo = torch.tensor([0, n], dtype=torch.int32, device=DEV)
    q = torch.randn(n + pad, 4, 64, generator=gen).to(DEV, torch.bfloat16)
    kn = torch.randn(n + pad, 2, 64, generator=gen).to(DEV, torch.bfloat16)
    vn = torch.randn(n + pad, 2, 64, generator=gen).to(DEV, torch.bfloat16)
    out = torch.full((n + pad, 4, 64), 5.0, dtype=torch.bfloat16, device=DEV)
    extend_attention(q, kn, vn, *bufs, kc, vc, qo, batch.kv_indptr, batch.kv_indices, 0.125, out=out,
                     max_extend_len=n, block_m=32, block_n=32, num_splits=4)
    ref = reference.extend_attention(q[:n].cpu(), kn[:n].cpu(), vn[:n].cpu(), *[b.cpu() for b in bufs], kc, vc,
                                     qo.cpu(), batch.kv_indptr.cpu(), batch.kv_indices.cpu(), 0.125)
    assert rel_err(out[:n].cpu().float(), ref.float()) < TOL
    assert torch.all(out[n:].cpu() == 5.0)


def test_choose_extend_splits():
    """Splits only where the grid leaves SMs idle and the prefix is long; capped by the workspace."""
    from tq_kernels import extend as ext

    sms = ext.num_sms(DEV)
    assert ext.choose_extend_splits(sms, 16384, 512, 32, 128, DEV) == 1          # the grid fills the GPU
    assert ext.choose_extend_splits(1, 512, 32, 32, 128, DEV) == 1               # short prefix
    s = ext.choose_extend_splits(max(sms // 4, 1), 16384, 512, 32, 128, DEV)
    assert 2 <= s <= 16 and s <= 16384 // (8 * 64)
    assert ext.choose_extend_splits(1, 1 << 20, 1 << 16, 32, 128, DEV) == 1     # partials over the cap


NEW_PART_CASES = _cases("K4V4-d128-g4", "K3V3-d64-g3", "PROD3-V3-d64-g8", "K3o-V2o-d128-g1",
                        "K4V2-d64-g4-cap-noncausal", "K4V4-d64-noprefix")


@pytest.mark.parametrize("splits, pack", [(1, False), (2, True)], ids=["1-split", "2-splits-packed"])
@pytest.mark.parametrize("case", NEW_PART_CASES, ids=[c[0] for c in NEW_PART_CASES])
def test_extend_new_part_matches_reference(case, splits, pack):
    """new_part: the new tokens' attention (and its log2 lse) from outside, as FlashInfer's ragged prefill
    gives it; the kernel reads only the prefix and the merge folds both in. Sequences without a prefix
    (their partial is empty) and key centering included."""
    from tq_kernels.extend import extend_attention

    name, kfmt, vfmt, (hq, hkv), pre, new, causal, cap, bm, bn = case
    if pack and not choose_gqa_pack_ok(hq // hkv, bm):
        pytest.skip("block too small for the packed group")
    seed = zlib.crc32(name.encode()) + 4
    gen, kc, vc, bufs, batch, qo, q, kn, vn = extend_inputs(kfmt, vfmt, hq, hkv, pre, new, seed, DEV, qkv_device="cpu")
    T = sum(new)
    dk, dv = kfmt.head_dim, vfmt.head_dim
    k_mean = None if (cap or kfmt.qjl) else torch.randn(hkv, dk, generator=gen) * 0.3
    sm = dk ** -0.5
    o_new, lse_new = reference.new_token_attention(q, kn, vn, qo, sm, cap, causal, k_mean=k_mean)
    out = torch.full((T, hq, dv), float("nan"), dtype=torch.bfloat16, device=DEV)
    extend_attention(q.to(DEV), kn.to(DEV), vn.to(DEV), *bufs, kc, vc, qo.to(DEV), batch.kv_indptr,
                     batch.kv_indices, sm, cap, causal, out, max_extend_len=max(new), block_m=bm, block_n=bn,
                     gqa_pack=pack, num_splits=splits, k_mean=None if k_mean is None else k_mean.to(DEV),
                     new_part=(o_new.to(DEV, torch.bfloat16), lse_new.to(DEV)))
    ref = reference.extend_attention(q, kn, vn, *[b.cpu() for b in bufs], kc, vc, qo, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), sm, cap, causal, k_mean=k_mean)
    assert not torch.isnan(out).any()
    err = rel_err(out.cpu().float(), ref.float())
    assert err < TOL, f"{name}: rel err {err:.3e}"


def test_new_token_attention_lse_is_log2():
    """The reference new part's lse is log2(sum exp(score)): one query over one key gives score * log2(e)."""
    q = torch.tensor([[[1.0, 2.0]]])
    k = torch.tensor([[[0.5, 0.25]]])
    v = torch.tensor([[[3.0, 4.0]]])
    o, lse = reference.new_token_attention(q, k, v, torch.tensor([0, 1]), 0.5)
    assert torch.allclose(o, v) and torch.allclose(lse, torch.tensor([[0.5 * 1.0 * 1.4426950408889634]]))
