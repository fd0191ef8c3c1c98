"""Key centering (k_mean): the cache stores codes of k - mu[h]; attention is unchanged because every
score of a query shifts by the same q.mu (softmax invariance, exact without logit softcapping).

Reference-path tests run everywhere; the Triton tests need CUDA or TRITON_INTERPRET=1.
"""
import pytest
import torch

from tq_kernels import ops, reference
from tq_kernels.codec import VecFormat
from kernel_helpers import alloc_cache, make_codecs, pick_device, random_slots, rel_err, triton_runnable

RUNNABLE, WHY = triton_runnable()
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
TOL = 2e-2  # as the decode / extend kernel tests

F = VecFormat
FORMATS = [
    ("K4V4-d64", F(64, 4), F(64, 4)),
    ("K3V3-d128", F(128, 3), F(128, 3)),
    ("PROD3-V3-d64", F(64, 3, qjl=True), F(64, 3)),
    ("K3o-V2-d128", F(128, 3, outlier_channels=32, outlier_bits=4), F(128, 2)),
]


def _data(kfmt, vfmt, n, h, gen, mu_scale=2.0):
    """Keys with a large shared per-head mean (as post-RoPE keys of real models), values, the mean."""
    mu = torch.randn(h, kfmt.head_dim, generator=gen) * mu_scale
    k = torch.randn(n, h, kfmt.head_dim, generator=gen) + mu
    v = torch.randn(n, h, vfmt.head_dim, generator=gen)
    return k, v, mu


def _write(k, v, kc, vc, n_slots, gen, k_mean=None, writer=reference.compress_and_store, device="cpu"):
    bufs = alloc_cache(kc.fmt, vc.fmt, n_slots, k.shape[1], device)
    slots = random_slots(k.shape[0], n_slots, gen).to(device)
    writer(k.to(device), v.to(device), slots, kc, vc, *bufs, k_mean=None if k_mean is None else k_mean.to(device))
    return bufs, slots


def _dequant(bufs, slots, kc, vc):
    s = slots.long().cpu()
    b = [x.cpu() for x in bufs]
    return kc.decode(b[0][s], b[1][s]).float(), vc.decode(b[2][s], b[3][s]).float()


# --------------------------------------------------------------------------------------------
# reference path (always runs)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,kfmt,vfmt", FORMATS, ids=[c[0] for c in FORMATS])
def test_reference_compress_with_mean_is_compress_of_centered(name, kfmt, vfmt):
    gen = torch.Generator().manual_seed(1)
    kc, vc = make_codecs(kfmt, vfmt, seed=2)
    k, v, mu = _data(kfmt, vfmt, 21, 3, gen)
    a = alloc_cache(kfmt, vfmt, 32, 3, "cpu", poison=False)
    b = alloc_cache(kfmt, vfmt, 32, 3, "cpu", poison=False)
    slots = random_slots(21, 32, gen)
    reference.compress_and_store(k, v, slots, kc, vc, *a, k_mean=mu)
    reference.compress_and_store(k - mu, v, slots, kc, vc, *b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # the adapter interface's reference forwards k_mean too
    c = alloc_cache(kfmt, vfmt, 32, 3, "cpu", poison=False)
    ops.for_device("cpu").compress_and_store(k, v, slots, kc, vc, *c, k_mean=mu)
    for x, y in zip(c, b):
        assert torch.equal(x, y)


def test_centering_reduces_key_error():
    """The point of the feature: k - mu is smaller, so the dequantized key (+ mu) is closer to k."""
    gen = torch.Generator().manual_seed(3)
    kfmt = vfmt = F(128, 3)
    kc, vc = make_codecs(kfmt, vfmt)
    k, v, mu = _data(kfmt, vfmt, 64, 2, gen, mu_scale=1.5)
    plain = kc.decode(*kc.encode(k))
    centered = kc.decode(*kc.encode(k - mu)) + mu
    assert rel_err(centered, k) < 0.7 * rel_err(plain, k)


def test_reference_attention_invariant_to_mean():
    """Softmax invariance on the reference path: decode / extend over a cache written with k_mean (and
    new keys centered with it) equal exact attention over the un-centered keys (dequantized + mu)."""
    gen = torch.Generator().manual_seed(4)
    kfmt, vfmt = F(64, 4), F(64, 3)
    kc, vc = make_codecs(kfmt, vfmt, seed=1)
    hq, hkv, L, T = 6, 2, 30, 9
    k, v, mu = _data(kfmt, vfmt, L, hkv, gen, mu_scale=3.0)
    bufs, slots = _write(k, v, kc, vc, 48, gen, k_mean=mu)
    kd, vd = _dequant(bufs, slots, kc, vc)
    sm = 64 ** -0.5
    # attention itself: adding a per-head constant vector to every key changes nothing
    q = torch.randn(T, hq, 64, generator=gen) * 2
    torch.testing.assert_close(reference._attend(q, kd + mu, vd, sm, 0.0), reference._attend(q, kd, vd, sm, 0.0),
                               atol=1e-5, rtol=1e-5)
    # decode: unchanged kernel, centered cache == exact attention over (dequantized + mu)
    indptr = torch.tensor([0, 12, L], dtype=torch.int32)
    qd = q[:2]
    out = reference.decode_attention(qd, *bufs, kc, vc, indptr, slots, sm)
    for b, (lo, hi) in enumerate(((0, 12), (12, L))):
        exp = reference._attend(qd[b:b + 1], kd[lo:hi] + mu, vd[lo:hi], sm, 0.0)[0]
        torch.testing.assert_close(out[b].float(), exp, atol=1e-4, rtol=1e-4)
    # extend: new raw keys centered with the same mean
    kn = torch.randn(T, hkv, 64, generator=gen) + mu
    vn = torch.randn(T, hkv, 64, generator=gen)
    qo = torch.tensor([0, T], dtype=torch.int32)
    kvp = torch.tensor([0, L], dtype=torch.int32)
    out = reference.extend_attention(q, kn, vn, *bufs, kc, vc, qo, kvp, slots, sm, k_mean=mu)
    mask = torch.ones(T, L + T, dtype=torch.bool)
    mask[:, L:] = torch.ones(T, T, dtype=torch.bool).tril()
    exp = reference._attend(q, torch.cat([kd + mu, kn]), torch.cat([vd, vn]), sm, 0.0, mask)
    torch.testing.assert_close(out.float(), exp, atol=1e-4, rtol=1e-4)
    # without k_mean for the new keys the scores would be inconsistent (sanity: the keyword matters)
    bad = reference.extend_attention(q, kn, vn, *bufs, kc, vc, qo, kvp, slots, sm)
    assert rel_err(bad.float(), exp) > 1e-2


def test_reference_adding_mean_to_keys_and_k_mean_changes_nothing():
    """Shift every key by mu and center with mu: same cache up to float ties, same attention."""
    gen = torch.Generator().manual_seed(5)
    kfmt = vfmt = F(64, 4)
    kc, vc = make_codecs(kfmt, vfmt)
    hq, hkv, L, T = 4, 2, 25, 6
    k = torch.randn(L, hkv, 64, generator=gen)
    v = torch.randn(L, hkv, 64, generator=gen)
    mu = torch.randn(hkv, 64, generator=gen) * 4
    slots = random_slots(L, 40, gen)
    a = alloc_cache(kfmt, vfmt, 40, hkv, "cpu")
    b = alloc_cache(kfmt, vfmt, 40, hkv, "cpu")
    reference.compress_and_store(k, v, slots, kc, vc, *a)
    reference.compress_and_store(k + mu, v, slots, kc, vc, *b, k_mean=mu)
    q = torch.randn(T, hq, 64, generator=gen)
    kn = torch.randn(T, hkv, 64, generator=gen)
    vn = torch.randn(T, hkv, 64, generator=gen)
    args = (torch.tensor([0, T], dtype=torch.int32), torch.tensor([0, L], dtype=torch.int32), slots, 0.125)
    o1 = reference.extend_attention(q, kn, vn, *a, kc, vc, *args)
    o2 = reference.extend_attention(q, kn + mu, vn, *b, kc, vc, *args, k_mean=mu)
    assert rel_err(o2.float(), o1.float()) < 1e-3


# --------------------------------------------------------------------------------------------
# Triton kernels (CUDA or TRITON_INTERPRET=1)
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("name,kfmt,vfmt", FORMATS, ids=[c[0] for c in FORMATS])
def test_triton_compress_with_mean_equals_compress_of_centered(name, kfmt, vfmt):
    from tq_kernels.compress import compress_and_store

    gen = torch.Generator().manual_seed(6)
    kc, vc = make_codecs(kfmt, vfmt, seed=3)
    N, H, S = 19, 2, 32
    k, v, mu = _data(kfmt, vfmt, N, H, gen)
    k = k.to(torch.bfloat16)
    slots = random_slots(N, S, gen).to(DEV)
    a = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
    b = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
    compress_and_store(k.to(DEV), v.to(DEV), slots, kc, vc, *a, k_mean=mu.to(DEV))
    # same fp32 arithmetic (bf16 -> fp32, minus mu) done outside the kernel: bit-identical
    compress_and_store((k.float() - mu).to(DEV), v.to(DEV), slots, kc, vc, *b)
    for x, y in zip(a, b):
        assert torch.equal(x.cpu(), y.cpu())
    # and the centered kernel agrees with the centered reference (up to float ties at boundaries)
    r = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
    reference.compress_and_store(k, v, slots, kc, vc, *r, k_mean=mu)
    sl = slots.long().cpu()
    xt = kc.decode(a[0].cpu()[sl], a[1].cpu()[sl])
    xr = kc.decode(r[0].cpu()[sl], r[1].cpu()[sl])
    assert rel_err(xt, xr) < 1e-2
    assert torch.equal(a[2].cpu(), r[2].cpu())  # values are never centered


@needs_triton
@pytest.mark.parametrize("name,kfmt,vfmt", FORMATS[:3], ids=[c[0] for c in FORMATS[:3]])
def test_triton_decode_over_centered_cache_is_exact_attention(name, kfmt, vfmt):
    from tq_kernels.compress import compress_and_store
    from tq_kernels.decode import decode_attention, plan_decode

    gen = torch.Generator().manual_seed(7)
    kc, vc = make_codecs(kfmt, vfmt, seed=4)
    hq, hkv, lens = 6, 2, [17, 40]
    d = kfmt.head_dim
    k, v, mu = _data(kfmt, vfmt, sum(lens), hkv, gen, mu_scale=3.0)
    bufs, slots = _write(k.to(torch.bfloat16), v.to(torch.bfloat16), kc, vc, 64, gen, k_mean=mu,
                         writer=compress_and_store, device=DEV)
    kd, vd = _dequant(bufs, slots, kc, vc)
    indptr = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32).to(DEV)
    q = (torch.randn(2, hq, d, generator=gen) * 2).to(DEV, torch.bfloat16)
    sm = d ** -0.5
    out = decode_attention(q, *bufs, kc, vc, indptr, slots, sm,
                           plan=plan_decode(kc, vc, 2, hkv, max(lens), DEV, num_splits=2, block_n=32))
    exp = torch.stack([reference._attend(q[b:b + 1].cpu().float(), kd[lo:hi] + mu, vd[lo:hi], sm, 0.0)[0]
                       for b, (lo, hi) in enumerate(((0, lens[0]), (lens[0], sum(lens))))])
    assert rel_err(out.cpu().float(), exp) < TOL


@needs_triton
@pytest.mark.parametrize("name,kfmt,vfmt", FORMATS, ids=[c[0] for c in FORMATS])
def test_triton_extend_centered_is_exact_attention(name, kfmt, vfmt):
    from tq_kernels.compress import compress_and_store
    from tq_kernels.extend import extend_attention

    gen = torch.Generator().manual_seed(8)
    kc, vc = make_codecs(kfmt, vfmt, seed=5)
    hq, hkv, pre, new = 4, 2, [20, 0], [13, 5]
    d = kfmt.head_dim
    k, v, mu = _data(kfmt, vfmt, sum(pre), hkv, gen, mu_scale=3.0)
    bufs, slots = _write(k.to(torch.bfloat16), v.to(torch.bfloat16), kc, vc, 48, gen, k_mean=mu,
                         writer=compress_and_store, device=DEV)
    kd, vd = _dequant(bufs, slots, kc, vc)
    T = sum(new)
    q = (torch.randn(T, hq, d, generator=gen) * 2).to(DEV, torch.bfloat16)
    kn = (torch.randn(T, hkv, d, generator=gen) + mu).to(DEV, torch.bfloat16)
    vn = torch.randn(T, hkv, vfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    qo = torch.tensor([0, new[0], T], dtype=torch.int32).to(DEV)
    kvp = torch.tensor([0, pre[0], sum(pre)], dtype=torch.int32).to(DEV)
    sm = d ** -0.5
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo, kvp, slots, sm, max_extend_len=max(new),
                           block_m=32, block_n=32, k_mean=mu.to(DEV))
    # through the adapter interface as well (keyword forwarded)
    out2 = ops.for_device(DEV).extend_attention(q, kn, vn, *bufs, kc, vc, qo, kvp, slots, sm,
                                                max_extend_len=max(new), block_m=32, block_n=32, k_mean=mu.to(DEV))
    if DEV == "cuda":
        assert torch.equal(out.cpu(), out2.cpu())
    else:  # the reference on CPU
        assert rel_err(out.cpu().float(), out2.float()) < TOL
    exp = torch.zeros(T, hq, vfmt.head_dim)
    qc, knc, vnc = q.cpu().float(), kn.cpu().float(), vn.cpu().float()
    for i in range(2):
        a, b = int(qo[i]), int(qo[i + 1])
        lo, hi = int(kvp[i]), int(kvp[i + 1])
        n = b - a
        mask = torch.ones(n, hi - lo + n, dtype=torch.bool)
        mask[:, hi - lo:] = torch.ones(n, n, dtype=torch.bool).tril()
        exp[a:b] = reference._attend(qc[a:b], torch.cat([kd[lo:hi] + mu, knc[a:b]]),
                                     torch.cat([vd[lo:hi], vnc[a:b]]), sm, 0.0, mask)
    assert rel_err(out.cpu().float(), exp) < TOL
