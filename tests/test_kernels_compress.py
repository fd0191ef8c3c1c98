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
from kernel_helpers import alloc_cache, make_codecs, pick_device, random_slots, triton_runnable

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
