"""The codec reference (tq_kernels.codec) against theory and against itself.

Distortion and PROD statistics use fixed seeds, so they are deterministic; the tolerances are the
ones the method promises (Lloyd-Max optimum, paper bounds), not fitted to this implementation.
"""
import itertools

import pytest
import torch

from tq_kernels.codec import (
    ROLE_K, ROLE_QJL, ROLE_V, Rotation, TQCodec, VecFormat, derive_seed, fwht, lloyd_max, make_rotation,
    pack_field, unpack_field,
)
from sglang_tq.cli import measure_mse, measure_prod, mse_bound, prod_bound

N_SAMPLES = 100_000
# Per-vector MSE of the Lloyd-Max quantizer for one coordinate of a uniform unit vector, times d.
LLOYD_MAX = {
    128: {1: 0.3609, 2: 0.1160, 3: 0.0340, 4: 0.00931},
    64: {1: 0.3584, 2: 0.1145, 3: 0.0334, 4: 0.00913},
}


def unit(n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return x / x.norm(dim=-1, keepdim=True)


# --- distortion ------------------------------------------------------------------------------
@pytest.mark.parametrize("d,bits", [(d, b) for d in LLOYD_MAX for b in LLOYD_MAX[d]])
def test_lloyd_max_table_matches_published_optimum(d, bits):
    assert d * lloyd_max(d, bits)[2] == pytest.approx(LLOYD_MAX[d][bits], rel=2e-3)


@pytest.mark.parametrize("d,bits", [(d, b) for d in LLOYD_MAX for b in LLOYD_MAX[d]])
def test_mse_distortion_within_2pct_of_lloyd_max(d, bits):
    measured = measure_mse(d, bits, N_SAMPLES, seed=0)
    assert measured == pytest.approx(LLOYD_MAX[d][bits], rel=0.02)
    assert measured < mse_bound(bits)


@pytest.mark.parametrize("d,bits", [(d, b) for d in (64, 128) for b in (5, 6)])
def test_five_and_six_bit_codebooks(d, bits):
    """5- and 6-bit codes (fields [4, 1] / [4, 2], for sensitive keys): under the paper's bound, close to
    4x lower than one bit less (high-rate theory), the sampled distortion within 2 % of the codebook's,
    and codes surviving pack / unpack."""
    mse = d * lloyd_max(d, bits)[2]
    assert mse < mse_bound(bits)
    assert 3.5 < d * lloyd_max(d, bits - 1)[2] / mse < 4.0
    assert measure_mse(d, bits, 20_000, seed=1) == pytest.approx(mse, rel=0.02)
    fmt = VecFormat(d, bits)
    assert [w for _, w, _, _, _ in fmt.fields] == ([4, 1] if bits == 5 else [4, 2])
    assert fmt.code_bytes == d * bits // 8
    codec = TQCodec.build(fmt, 0, 1, ROLE_K)
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(4))
    q = codec.quantize(x)
    assert torch.equal(codec.unpack(*codec.pack(q)).indices, q.indices)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_prod_inner_product_unbiased_and_under_bound(bits):
    d = 128
    mean, stderr, rel_var = measure_prod(d, bits, samples=25_000, queries=16, seed=0)
    assert abs(mean) < 4 * stderr, f"bias {mean:.3e} is {mean / stderr:.1f} standard errors"
    assert rel_var < prod_bound(bits, d)
    # The QJL term must carry real information: without it the error would be the MSE residual's.
    assert rel_var > 0.1 * prod_bound(bits, d)


def test_inner_product_equals_dot_with_dequantized():
    for fmt in (VecFormat(128, 3, qjl=True), VecFormat(64, 4), VecFormat(128, 3, outlier_channels=32, outlier_bits=4)):
        codec = TQCodec.build(fmt, 5, 3, ROLE_K)
        k = torch.randn(256, fmt.head_dim, generator=torch.Generator().manual_seed(1)) * 3
        q = torch.randn(fmt.head_dim, generator=torch.Generator().manual_seed(2))
        quant = codec.unpack(*codec.encode(k))
        expected = codec.dequantize(quant) @ q
        torch.testing.assert_close(codec.inner_product(q, quant), expected, rtol=1e-4, atol=1e-4)


def test_norm_correction_keeps_the_norm():
    codec = TQCodec.build(VecFormat(128, 2, norm_correction=True), 0, 0, ROLE_V)
    x = torch.randn(512, 128, generator=torch.Generator().manual_seed(3)) * 7
    xh = codec.dequantize(codec.quantize(x))
    torch.testing.assert_close(xh.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-4)


# --- rotation ----------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [64, 128, 256])
def test_rotation_orthonormal_and_invertible(d):
    x = torch.randn(32, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    assert torch.allclose(fwht(fwht(x)), x, atol=1e-12)
    plain = make_rotation(d, 11)
    chosen = torch.randperm(d, generator=torch.Generator().manual_seed(d))[: d // 8].tolist()
    permuted = make_rotation(d, 11, chosen, outlier_stride=8)
    assert permuted.perm is not None
    for rot in (plain, permuted):
        m = rot.matrix().double()
        assert torch.allclose(m @ m.T, torch.eye(d, dtype=torch.float64), atol=1e-6)
        assert torch.allclose(rot.inverse(rot.forward(x)), x, atol=1e-12)
        assert torch.allclose(x @ m.T, rot.forward(x), atol=1e-5)


def test_outlier_channels_land_on_every_rth_position():
    d, chosen = 128, [5, 9, 100, 17, 64, 3, 77, 120, 2, 40, 41, 42, 90, 91, 92, 127]
    rot = make_rotation(d, 0, chosen, outlier_stride=d // len(chosen))
    assert rot.perm[:: d // len(chosen)].tolist() == chosen
    assert sorted(rot.perm.tolist()) == list(range(d))


def test_seeds_are_deterministic_and_distinct():
    fmt = VecFormat(128, 3, qjl=True)
    a, b = TQCodec.build(fmt, 7, 4, ROLE_K), TQCodec.build(fmt, 7, 4, ROLE_K)
    assert torch.equal(a.rotation.matrix(), b.rotation.matrix()) and torch.equal(a.qjl_matrix, b.qjl_matrix)
    others = [TQCodec.build(fmt, 7, 5, ROLE_K), TQCodec.build(fmt, 8, 4, ROLE_K),
              TQCodec.build(VecFormat(128, 3), 7, 4, ROLE_V)]
    for o in others:
        assert not torch.equal(a.rotation.matrix(), o.rotation.matrix())
    assert not torch.equal(a.qjl_matrix, others[0].qjl_matrix)
    seeds = {derive_seed(7, layer, role) for layer in range(64) for role in (ROLE_K, ROLE_V, ROLE_QJL)}
    assert len(seeds) == 64 * 3


# --- packing -----------------------------------------------------------------------------------
def test_pack_field_is_lsb_first():
    assert pack_field(torch.tensor([1, 2, 3, 0]), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_field(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]), 1).tolist() == [0b10000001]
    assert pack_field(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    assert unpack_field(torch.tensor([0x5A], dtype=torch.uint8), 4, 2).tolist() == [0xA, 0x5]


def _formats():
    for d, mse_bits, qjl, nc in itertools.product((64, 128, 256), (1, 2, 3, 4), (False, True), (False, True)):
        bits = mse_bits + qjl
        yield VecFormat(d, bits, qjl=qjl, norm_correction=nc), False
        if mse_bits == 4:
            continue  # no room for more bits on outliers
        for n, calibrated in itertools.product((d // 8, d // 4, d // 2), (False, True)):
            if n < 8:
                continue
            for extra in range(1, 4 - mse_bits + 1):
                yield VecFormat(d, bits, qjl=qjl, norm_correction=nc, outlier_channels=n,
                                outlier_bits=bits + extra), calibrated


FORMATS = list(_formats())


@pytest.mark.parametrize("d", [64, 128, 256])
def test_pack_unpack_round_trip_every_format(d):
    x = torch.randn(64, d, generator=torch.Generator().manual_seed(d)) * 2
    x[0] = 0  # a zero vector must survive
    checked = 0
    for fmt, calibrated in (f for f in FORMATS if f[0].head_dim == d):
        channels = None
        if calibrated:
            g = torch.Generator().manual_seed(fmt.outlier_channels)
            channels = torch.randperm(d, generator=g)[: fmt.outlier_channels].tolist()
        codec = TQCodec.build(fmt, 1, 2, ROLE_K, outlier_channel_list=channels)
        quant = codec.quantize(x)
        codes, scales = codec.pack(quant)
        assert codes.dtype == torch.uint8 and codes.shape == (64, fmt.code_bytes), fmt
        assert scales.dtype == torch.float16 and scales.shape == (64, fmt.n_scales), fmt
        assert fmt.slot_bytes == fmt.code_bytes + 2 * fmt.n_scales
        assert fmt.code_bytes == (d * fmt.bits + fmt.outlier_channels * (fmt.outlier_bits - fmt.bits)) // 8
        back = codec.unpack(codes, scales)
        assert torch.equal(back.indices, quant.indices), fmt
        assert torch.equal(back.scales, quant.scales.half().float()), fmt
        if fmt.qjl:
            assert torch.equal(back.signs, quant.signs), fmt
        xh = codec.dequantize(back)
        assert torch.isfinite(xh).all() and torch.equal(xh[0], torch.zeros(d)), fmt
        checked += 1
    assert checked >= 60


def test_fields_are_aligned_and_contiguous():
    for fmt, _ in FORMATS:
        off, first_extra = 0, True
        for kind, w, n, offset, _shift in fmt.fields:
            assert offset == off, (fmt, kind)
            if kind != "extra" or first_extra:  # later outlier fields are smaller than d/8 bytes
                assert offset % (fmt.head_dim // 8) == 0, (fmt, kind)
                first_extra = first_extra and kind != "extra"
            off += n * w // 8
        assert off == fmt.code_bytes


def test_zero_vector_encodes_without_nan():
    for fmt in (VecFormat(128, 4), VecFormat(128, 3, qjl=True), VecFormat(64, 2, outlier_channels=16, outlier_bits=4)):
        codec = TQCodec.build(fmt, 0, 0, ROLE_K)
        codes, scales = codec.encode(torch.zeros(3, fmt.head_dim))
        assert torch.isfinite(scales.float()).all() and (scales == 0).all()
        assert torch.equal(codec.decode(codes, scales), torch.zeros(3, fmt.head_dim))
        assert torch.isfinite(codec.inner_product(torch.ones(fmt.head_dim), codec.unpack(codes, scales))).all()


# --- padded head dims (80, 96 -> 128) ---------------------------------------------------------------
@pytest.mark.parametrize("d", [80, 96])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_padded_head_dim_round_trip_matches_theory(d, bits):
    """x in R^d is zero-padded to 128 and rotated: the 128-dim Lloyd-Max distortion D_128 spreads evenly
    over the 128 original coordinates, so the d that come back keep d/128 of it: E|x - x_hat|^2 / |x|^2 =
    D_128 * d / 128 (no norm correction, which would rescale by the whole 128-dim code)."""
    fmt = VecFormat.for_model(d, bits, norm_correction=False)
    assert (fmt.head_dim, fmt.in_dim, fmt.code_bytes) == (128, d, 16 * bits)
    codec = TQCodec.build(fmt, 0, 3, ROLE_K)
    x = torch.randn(20_000, d, generator=torch.Generator().manual_seed(d + bits))
    codes, scales = codec.encode(x)
    assert codes.shape == (20_000, 16 * bits)
    x_hat = codec.decode(codes, scales)
    assert x_hat.shape == x.shape
    measured = (((x_hat - x) ** 2).sum(-1) / (x ** 2).sum(-1)).mean().item()
    theory = 128 * lloyd_max(128, bits)[2] * d / 128
    assert measured == pytest.approx(theory, rel=0.10)
    # scores from the codes with the query padded alike equal <q, x_hat> in the model's d
    q = torch.randn(4, d, generator=torch.Generator().manual_seed(1))
    ip = codec.inner_product(q[:, None, :], codec.unpack(codes[:50], scales[:50]))
    assert torch.allclose(ip, q @ x_hat[:50].T, atol=1e-4)


def test_padded_formats_are_checked():
    assert VecFormat.for_model(128, 4) == VecFormat(128, 4) and VecFormat(128, 4).in_dim == 128
    with pytest.raises(ValueError, match="model_head_dim 72 is not padded to 128"):
        VecFormat(128, 4, model_head_dim=72)
    with pytest.raises(ValueError, match="codec dim 96 not supported"):
        VecFormat(96, 4)
