"""Triton compress_and_store against the PyTorch reference (TQCodec.encode).

Run on CPU with TRITON_INTERPRET=1 (the Triton comparisons skip otherwise); unchanged on a GPU.

Float-tie exception: the kernel rotates with tensor-core matmuls against M's signs (bf16 hi/lo rows,
fp32 sums; or a dense fp32 matmul), the reference with the butterfly FWHT, so a code may differ where u lies within float rounding of a codebook boundary (or, for QJL
signs, where the projection is within rounding of 0). The tests allow only such cases.
"""
import math
import zlib

import pytest
import torch

from tq_kernels import reference
from tq_kernels.codec import VecFormat, codebook
from kernel_helpers import alloc_cache, make_codecs, pick_device, random_slots, rel_err, triton_runnable

RUNNABLE, WHY = triton_runnable()
pytestmark = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()

# (K format, V format): MSE 2/3/4, PROD 3/4, outliers d/4 channels at +1 bit, norm correction on/off
CASES = [
    ("K4V4-d128", VecFormat(128, 4), VecFormat(128, 4), torch.bfloat16),
    ("K5V4-d128", VecFormat(128, 5), VecFormat(128, 4), torch.bfloat16),
    ("K6V3o-d64", VecFormat(64, 6), VecFormat(64, 3, outlier_channels=16, outlier_bits=6), torch.bfloat16),
    ("K3V3-d64-fp16", VecFormat(64, 3), VecFormat(64, 3), torch.float16),
    ("K2V2-d128-nonc-fp32", VecFormat(128, 2, norm_correction=False), VecFormat(128, 2, norm_correction=False),
     torch.float32),
    ("PROD3-V3-d64", VecFormat(64, 3, qjl=True), VecFormat(64, 3), torch.bfloat16),
    ("PROD4-V2-d128", VecFormat(128, 4, qjl=True), VecFormat(128, 2), torch.bfloat16),
    ("K3o-V2o-d128", VecFormat(128, 3, outlier_channels=32, outlier_bits=4),
     VecFormat(128, 2, outlier_channels=32, outlier_bits=3, norm_correction=False), torch.bfloat16),
    ("PROD3o-V4-d64", VecFormat(64, 3, qjl=True, outlier_channels=16, outlier_bits=4), VecFormat(64, 4),
     torch.bfloat16),
    ("K1V1o-d256", VecFormat(256, 1), VecFormat(256, 1, outlier_channels=8, outlier_bits=4), torch.bfloat16),
]


def _near_boundary(codec, x, pos_mask, tol=1e-5):
    """[N, H, d] bool: u (reference rotation) within tol of a boundary of the codebook used there."""
    fmt = codec.fmt
    x = x.to(torch.float32)
    u = codec.rotation.forward(x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    _, b_lo = codebook(fmt.head_dim, fmt.mse_bits)
    near = (u[..., None] - b_lo).abs().min(-1).values < tol
    if fmt.outlier_channels:
        _, b_hi = codebook(fmt.head_dim, fmt.outlier_mse_bits)
        near_hi = (u[..., None] - b_hi).abs().min(-1).values < tol
        near = torch.where(codec.outlier_mask(), near_hi, near)
    return near & pos_mask


def _check_role(codec, x, slots, codes, scales, rcodes, rscales):
    qt = codec.unpack(codes[slots].cpu(), scales[slots].cpu())
    qr = codec.unpack(rcodes[slots].cpu(), rscales[slots].cpu())
    diff = qt.indices != qr.indices
    frac_same = 1.0 - diff.float().mean().item()
    assert frac_same >= 0.999, f"only {frac_same:.5f} of codes identical"
    if diff.any():
        near = _near_boundary(codec, x.cpu(), diff)
        assert bool(near[diff].all()), "code mismatch away from a codebook boundary"
    row_ok = ~diff.any(-1)  # rows without a (tie) code difference must have the same scales
    if codec.fmt.qjl:
        sdiff = (qt.signs != qr.signs) & row_ok[..., None]
        assert sdiff.float().mean().item() <= 1e-3
        if sdiff.any():  # sign ties: projection within rounding of zero
            xf = x.cpu().to(torch.float32)
            u = codec.rotation.forward(xf / xf.norm(dim=-1, keepdim=True).clamp_min(1e-30))
            r = u - qr.scales[..., :1] / xf.norm(dim=-1, keepdim=True).clamp_min(1e-30) * codec._centroids(qr.indices)
            proj = r @ codec.qjl_matrix.T
            assert bool((proj.abs()[sdiff] < 1e-4).all())
    st, sr = qt.scales[row_ok], qr.scales[row_ok]
    torch.testing.assert_close(st, sr, rtol=2e-3, atol=1e-6)
    assert not torch.isnan(qt.scales).any()


@pytest.mark.parametrize("name,kfmt,vfmt,dtype", CASES, ids=[c[0] for c in CASES])
def test_compress_matches_reference(name, kfmt, vfmt, dtype):
    """Every codec: codes and scales as the reference writes them (up to float ties)."""
    from tq_kernels.compress import compress_and_store

    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    kc, vc = make_codecs(kfmt, vfmt, seed=3)
    N, H, S = 37, 2, 64  # N not a multiple of BLOCK_T
    k = (torch.randn(N, H, kfmt.head_dim, generator=gen) * 3).to(DEV, dtype)
    v = torch.randn(N, H, vfmt.head_dim, generator=gen).to(DEV, dtype)
    k[5] = 0  # zero rows must not produce NaN
    v[7, 1] = 0
    slots = random_slots(N, S, gen).to(DEV)
    bufs = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
    for b in bufs:
        b.fill_(7 if b.dtype == torch.uint8 else 1.5)  # sentinel: rows not in `slots` must stay untouched
    rbufs = [b.clone() for b in bufs]
    compress_and_store(k, v, slots, kc, vc, *bufs)
    reference.compress_and_store(k, v, slots, kc, vc, *rbufs)

    untouched = torch.ones(S, dtype=torch.bool)
    untouched[slots.long().cpu()] = False
    for b, rb in zip(bufs, rbufs):
        assert torch.equal(b.cpu()[untouched], rb.cpu()[untouched])
    sl = slots.long()
    _check_role(kc, k, sl, bufs[0], bufs[1], rbufs[0], rbufs[1])
    _check_role(vc, v, sl, bufs[2], bufs[3], rbufs[2], rbufs[3])
    # zero rows: scale 0, finite everything
    assert float(bufs[1][sl[5]].float().abs().max()) == 0.0
    assert float(bufs[3][sl[7], 1].float().abs().max()) == 0.0
    # dequantized values agree (end to end through the codec)
    xt = kc.decode(bufs[0][sl].cpu(), bufs[1][sl].cpu())
    xr = kc.decode(rbufs[0][sl].cpu(), rbufs[1][sl].cpu())
    assert float((xt - xr).norm() / xr.norm()) < 1e-2


def test_compress_ties_are_rare_but_tolerated():
    """Values placed exactly on boundaries (after rotation) are where float ties can happen."""
    from tq_kernels.compress import compress_and_store

    kfmt = vfmt = VecFormat(128, 4)
    kc, vc = make_codecs(kfmt, vfmt, seed=1)
    _, b = codebook(128, 4)
    gen = torch.Generator().manual_seed(0)
    N, H, S = 16, 1, 20
    u = b[torch.randint(0, b.numel(), (N, H, 128), generator=gen)]
    u = u / u.norm(dim=-1, keepdim=True)
    k = kc.rotation.inverse(u)  # rotates back onto the boundaries (up to float rounding)
    slots = random_slots(N, S, gen).to(DEV)
    bufs = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
    compress_and_store(k.to(DEV), k.to(DEV), slots, kc, vc, *bufs)
    qt = kc.unpack(bufs[0][slots.long()].cpu(), bufs[1][slots.long()].cpu())
    # every code is either the reference's or one off where u sits on a boundary
    qr = kc.quantize(k)
    assert bool(((qt.indices - qr.indices).abs() <= 1).all())
    assert math.isfinite(float(qt.scales.sum()))


@pytest.mark.parametrize("block_t", [32, 64])
def test_compress_block_sizes_identical(block_t):
    """Larger token tiles (the prefill's 32: fewer programs, each loading the rotation once for more
    rows) write every byte as the decode step's 16-token tile does, with a last partial tile."""
    from tq_kernels.compress import compress_and_store

    kfmt, vfmt = VecFormat(128, 4), VecFormat(128, 4)
    gen = torch.Generator().manual_seed(12)
    kc, vc = make_codecs(kfmt, vfmt, seed=5)
    N, H, S = 70, 2, 90
    k = torch.randn(N, H, 128, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(N, H, 128, generator=gen).to(DEV, torch.bfloat16)
    slots = random_slots(N, S, gen).to(DEV)
    out = []
    for bt in (16, block_t):
        bufs = alloc_cache(kfmt, vfmt, S, H, DEV, poison=False)
        compress_and_store(k, v, slots, kc, vc, *bufs, block_t=bt)
        out.append(bufs)
    for a, b in zip(*out):
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("d", [80, 96])
def test_padded_head_dim_compress_decode_extend(d):
    """head_dim 80 / 96: the launch functions take model-dim tensors, pad them to the codec dim (128) and
    slice the output back. Triton compress / decode / extend against the reference, and the reference
    against dense attention over the dequantized (model-dim) K/V."""
    from tq_kernels.compress import compress_and_store
    from tq_kernels.decode import decode_attention
    from tq_kernels.extend import extend_attention

    kfmt, vfmt = VecFormat.for_model(d, 4), VecFormat.for_model(d, 3)
    assert (kfmt.head_dim, kfmt.in_dim, kfmt.code_bytes + 2) == (128, d, 66)
    kc, vc = make_codecs(kfmt, vfmt, seed=2, layer_id=1)
    gen = torch.Generator().manual_seed(d)
    h_kv, g, n_slots, lens = 2, 2, 40, [7, 12]
    n = sum(lens)
    k = torch.randn(n, h_kv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(n, h_kv, d, generator=gen).to(torch.bfloat16)
    mu = torch.randn(h_kv, d, generator=gen)
    q = torch.randn(n, h_kv * g, d, generator=gen).to(torch.bfloat16)
    slots = random_slots(n, n_slots, gen)
    bufs, rbufs = alloc_cache(kfmt, vfmt, n_slots, h_kv, DEV), alloc_cache(kfmt, vfmt, n_slots, h_kv, "cpu")
    q_rot = torch.zeros(n, h_kv * g, 128, dtype=torch.float32, device=DEV)
    compress_and_store(k.to(DEV), v.to(DEV), slots.to(DEV), kc, vc, *bufs, k_mean=mu.to(DEV), q=q.to(DEV), q_rot=q_rot)
    reference.compress_and_store(k, v, slots, kc, vc, *rbufs, k_mean=mu)
    for codec, x, (codes, scales), (rcodes, rscales) in ((kc, k.float() - mu, bufs[:2], rbufs[:2]),
                                                         (vc, v, bufs[2:], rbufs[2:])):
        _check_role(codec, codec.pad(x), slots.long(), codes, scales, rcodes, rscales)
    assert torch.allclose(q_rot.cpu(), kc.rotate(q), atol=1e-2)  # queries rotated in the codec's 128 dims

    indptr = torch.tensor([0, lens[0], n], dtype=torch.int32)
    kd = kc.decode(rbufs[0][slots.long()], rbufs[1][slots.long()]) + mu  # model-dim K/V as the cache holds them
    vd = vc.decode(rbufs[2][slots.long()], rbufs[3][slots.long()])
    assert kd.shape == vd.shape == (n, h_kv, d)
    qd = q[[lens[0] - 1, n - 1]]  # one decode query per sequence
    ref = reference.decode_attention(qd, *rbufs, kc, vc, indptr, slots, d ** -0.5)
    assert ref.shape == (2, h_kv * g, d)
    for b, (a, e) in enumerate(((0, lens[0]), (lens[0], n))):  # dense attention over the dequantized rows
        s = torch.einsum("hd,lhd->hl", qd[b].float(), kd[a:e].repeat_interleave(g, 1)) * d ** -0.5
        dense = torch.einsum("hl,lhd->hd", torch.softmax(s, -1), vd[a:e].repeat_interleave(g, 1))
        assert rel_err(ref[b].float(), dense) < 5e-3  # ref is rounded to q's bf16
    out = torch.empty(2, h_kv * g, d, dtype=torch.bfloat16, device=DEV)
    got = decode_attention(qd.to(DEV), *bufs, kc, vc, indptr.to(DEV), slots.to(DEV), d ** -0.5, out=out)
    assert got is out and rel_err(out.float().cpu(), ref.float()) < 2e-2

    # extend: 3 new tokens of sequence 1 over its 12-token packed prefix, keys centered with mu
    new = 3
    qn, kn, vn = (torch.randn(new, h, d, generator=gen).to(torch.bfloat16) for h in (h_kv * g, h_kv, h_kv))
    args = (torch.tensor([0, new], dtype=torch.int32), torch.tensor([0, lens[1]], dtype=torch.int32), slots[lens[0]:])
    ref_e = reference.extend_attention(qn, kn, vn, *rbufs, kc, vc, *args, d ** -0.5, k_mean=mu)
    assert ref_e.shape == (new, h_kv * g, d)
    got_e = extend_attention(qn.to(DEV), kn.to(DEV), vn.to(DEV), *bufs, kc, vc, *(a.to(DEV) for a in args), d ** -0.5,
                             k_mean=mu.to(DEV), max_extend_len=new, max_prefix_len=lens[1])
    assert got_e.shape == (new, h_kv * g, d) and rel_err(got_e.float().cpu(), ref_e.float()) < 2e-2
