"""Recent window (tq_kernels.window): compress writes the exact rotated K/V to ring rows, decode reads the
last positions from the ring, extend (cache-format perplexity) picks exact or coded keys by distance.
Triton against the PyTorch reference; run on CPU with TRITON_INTERPRET=1, unchanged on a GPU."""
import pytest
import torch

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from kernel_helpers import alloc_cache, make_codecs, pick_device, random_slots, rel_err, triton_runnable
from tq_kernels.window import DecodeWindow, ExtendWindow, RingWrite

RUNNABLE, WHY = triton_runnable()
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
F = VecFormat
TOL = 2e-2


def _bf16_ring(rows, h, d):
    return torch.full((rows, h, d), float("nan"), dtype=torch.bfloat16, device=DEV)


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, centered", [(F(64, 4), F(64, 4), False), (F(128, 3), F(128, 4), True)],
                         ids=["K4V4-d64", "K3V4-d128-centered"])
def test_compress_writes_exact_rotated_rows(kfmt, vfmt, centered):
    from tq_kernels.compress import compress_and_store

    gen = torch.Generator().manual_seed(3)
    kc, vc = make_codecs(kfmt, vfmt, seed=1)
    n, h = 10, 2
    k = torch.randn(n, h, kfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(n, h, vfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    mu = torch.randn(h, kfmt.head_dim, generator=gen).to(DEV) if centered else None
    slots = random_slots(n, 40, gen).to(DEV)
    rows = torch.tensor([5, -1, 0, 7, -1, 1, 2, 3, -1, 6], dtype=torch.int32, device=DEV)
    out = []
    for fn in (compress_and_store, reference.compress_and_store):
        bufs = alloc_cache(kfmt, vfmt, 40, h, DEV, poison=False)
        ring = RingWrite(_bf16_ring(8, h, kfmt.head_dim), _bf16_ring(8, h, vfmt.head_dim), rows)
        fn(k, v, slots, kc, vc, *bufs, k_mean=mu, ring=ring)
        out.append((bufs, ring))
    (tb, tr), (rb, rr) = out
    written = rows[rows >= 0].long()
    assert torch.isnan(tr.k[4].float()).all() and torch.isnan(tr.v[4].float()).all()  # row 4: nobody's
    assert rel_err(tr.k[written].float(), rr.k[written].float()) < 1e-2
    assert rel_err(tr.v[written].float(), rr.v[written].float()) < 1e-2
    # the ring holds the exact vector, rotated: un-rotating gives back k - mu and v
    keep = rows >= 0
    kk = (k.float() - (mu if mu is not None else 0))[keep]
    assert rel_err(kc.unrotate(tr.k[rows[keep].long()].float().cpu()), kk.cpu()) < 1e-2
    assert rel_err(vc.unrotate(tr.v[rows[keep].long()].float().cpu()), v.float()[keep].cpu()) < 1e-2
    assert torch.equal(tb[0], rb[0]) or (tb[0] != rb[0]).float().mean() < 1e-3  # codes as without a ring


def _decode_case(kfmt, vfmt, hq, hkv, lens, wsize, lo_back, seed, **kw):
    """Sequences written packed and, for their last positions, into a ring (row base + p % W); decode
    with window lo = L - lo_back (clamped) against the reference with the same window."""
    from tq_kernels.decode import decode_attention, plan_decode

    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    S = sum(lens) + 9
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV, poison=False)
    total = sum(lens)
    slots = random_slots(total, S, gen).to(DEV)
    k = torch.randn(total, hkv, kfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(total, hkv, vfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    B = len(lens)
    req = torch.randperm(B + 2, generator=gen)[:B]  # request ids: ring rows req * W + p % W
    pos = torch.cat([torch.arange(n) for n in lens]) if total else torch.zeros(0, dtype=torch.long)
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]) if total else pos
    rows = (req[owner] * wsize + pos % wsize).to(torch.int32)
    rows[pos < torch.tensor(lens)[owner] - wsize] = -1  # only each sequence's last W go to the ring
    ring = RingWrite(_bf16_ring((B + 2) * wsize, hkv, kfmt.head_dim), _bf16_ring((B + 2) * wsize, hkv, vfmt.head_dim),
                     rows.to(DEV))
    reference.compress_and_store(k, v, slots, kc, vc, *bufs, ring=ring)
    indptr = torch.zeros(B + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens).cumsum(0)
    L = torch.tensor(lens, dtype=torch.int32)
    lo = torch.clamp(L - lo_back, min=0).maximum(L - wsize).to(torch.int32)
    win = DecodeWindow(ring.k, ring.v, wsize, lo.to(DEV), (req * wsize).to(torch.int32).to(DEV))
    q = (torch.randn(B, hq, kfmt.head_dim, generator=gen) * 2).to(DEV, torch.bfloat16)
    sm = kfmt.head_dim ** -0.5
    cap = kw.pop("logit_cap", 0.0)
    plan = plan_decode(kc, vc, B, hkv, max(lens), DEV, window=True, **kw)
    out = decode_attention(q, *bufs, kc, vc, indptr.to(DEV), slots, sm, cap, plan=plan, window=win)
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, indptr, slots.cpu(), sm, cap,
                                     window=DecodeWindow(ring.k.cpu(), ring.v.cpu(), wsize, lo, req * wsize))
    no_win = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, indptr, slots.cpu(), sm, cap)
    return out.float().cpu(), ref.float(), no_win.float()


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, wsize, lo_back, kw", [
    (F(128, 4), F(128, 4), (8, 2), [40, 5, 100], 16, 16, dict(num_splits=2, block_n=32)),   # sliced stage 1
    (F(64, 3), F(64, 3), (9, 3), [70, 20], 32, 32, dict(num_splits=3, block_n=32)),         # general stage 1
    (F(64, 4), F(64, 2), (4, 4), [33, 1, 0], 8, 5, dict(num_splits=2, block_n=32)),          # lo above L - W
    (F(128, 4, qjl=True), F(128, 4), (4, 1), [50], 16, 16, dict(num_splits=2, block_n=32)),  # PROD keys
    (F(64, 4), F(64, 4), (8, 2), [90, 7], 16, 16, dict(num_splits=5, block_n=32, logit_cap=5.0)),  # soft-cap
    (F(128, 4), F(128, 4), (8, 2), [40, 5, 100, 0], 16, 16, dict(num_splits=3, block_n=32)),  # empty sequence
    (F(64, 3, outlier_channels=16, outlier_bits=4), F(64, 4), (4, 2), [60, 9], 16, 16,
     dict(num_splits=2, block_n=32)),                                                         # outliers: general
], ids=["K4V4-d128-sliced", "K3V3-d64-general", "K4V2-d64-partial", "PROD4-d128", "K4V4-d64-softcap",
        "K4V4-d128-empty", "K3oV4-d64-general"])
def test_decode_window_matches_reference(kfmt, vfmt, heads, lens, wsize, lo_back, kw):
    out, ref, no_win = _decode_case(kfmt, vfmt, *heads, lens, wsize, lo_back, seed=sum(lens), **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL
    assert rel_err(ref, no_win) > 1e-3  # the window changes the answer: the test can see it


@needs_triton
@pytest.mark.parametrize("pack, splits", [(False, 1), (True, 1), (True, 3)],
                         ids=["rows-per-head", "gqa-pack", "gqa-pack-split-prefix"])
@pytest.mark.parametrize("wsize", [4, 16])
def test_extend_window_matches_reference(wsize, pack, splits):
    from tq_kernels.extend import extend_attention

    gen = torch.Generator().manual_seed(11 + wsize)
    kfmt, vfmt = F(64, 4), F(64, 3)
    kc, vc = make_codecs(kfmt, vfmt, seed=2)
    hq, hkv, pre, new = 6, 2, [20, 0], [37, 9]
    S = sum(pre) + 7
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV, poison=False)
    slots = random_slots(sum(pre), S, gen).to(DEV)
    kp = torch.randn(sum(pre), hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    reference.compress_and_store(kp, torch.randn_like(kp.float()).to(torch.bfloat16), slots, kc, vc, *bufs)
    T = sum(new)
    q = torch.randn(T, hq, 64, generator=gen).to(DEV, torch.bfloat16)
    kn = torch.randn(T, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    vn = torch.randn(T, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    ko = kc.decode(*kc.encode(kn.float().cpu())).to(DEV, torch.bfloat16)
    vo = vc.decode(*vc.encode(vn.float().cpu())).to(DEV, torch.bfloat16)
    qo = torch.tensor([0, new[0], T], dtype=torch.int32)
    kvp = torch.tensor([0, pre[0], sum(pre)], dtype=torch.int32)
    win = ExtendWindow(ko, vo, wsize)
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), kvp.to(DEV), slots, 0.125, window=win,
                           max_extend_len=max(new), block_m=32, block_n=32, gqa_pack=pack, num_splits=splits)
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo, kvp,
                                     slots.cpu(), 0.125, window=ExtendWindow(ko.cpu(), vo.cpu(), wsize))
    exact = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo, kvp,
                                       slots.cpu(), 0.125)
    assert rel_err(out.float().cpu(), ref.float()) < TOL
    assert rel_err(ref.float(), exact.float()) > 1e-3
