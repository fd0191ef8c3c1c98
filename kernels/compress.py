"""Triton compress-and-store: one launch per layer quantizes and packs K and V of N new tokens.

Grid (cdiv(N, BLOCK_T), H_kv, 2 or 3); axis 2 is the role (0: K, 1: V, each with its own constexpr
format; 2: the decode queries of the head's GQA group rotated like the keys, so that decode needs no
rotation launches of its own). Per tile of BLOCK_T token-heads: load rows (bf16/fp16/fp32) -> (keys with a calibrated mean
mu [H_kv, d]: x -= mu[h], key centering; softmax attention is invariant to it) -> fp32 norm -> normalize ->
rotate u = x M^T (bf16 hi/lo rows against M's int8 signs on tensor cores;
K chunked by 32 so a d=256 matrix never sits in registers) -> bucketize count(u > boundary) (= torch.searchsorted(right=False)), outlier
positions against the outlier codebook -> norm correction scale0 = |x| / |c[idx]| -> PROD: residual
r = u - a c, signs of r S^T (>= 0 -> 1) in column chunks, scale1 = |x| |r| sqrt(pi/2) / m -> clamp
scales to fp16 max -> pack each field LSB-first and store at the slot's row.

Float-tie exception: the reference rotates with the butterfly FWHT, this kernel with a dense matmul
(bf16 hi + lo against the signs, fp32 sums); u differs in the last float bits, so a code may differ where u lies within float rounding
(~1e-7) of a codebook boundary. Everything else is bit-identical up to that.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import SQRT_PI_2, cache_args, fmt_constexpr, gdc_launch_dependents, kernel_tables, pdl_ok
from .codec import FP16_MAX, TQCodec
from .window import check_ring


@triton.jit
def _pack_store(rows, mask, vals, off, W: tl.constexpr, N: tl.constexpr, BLOCK_T: tl.constexpr):
    """vals int32 [BLOCK_T, N] (< 2^W) -> N*W/8 bytes LSB-first at rows + off."""
    PER: tl.constexpr = 8 // W
    NB: tl.constexpr = N // PER
    v3 = tl.reshape(vals, (BLOCK_T, NB, PER))
    sh = tl.arange(0, PER) * W
    byte = tl.sum(v3 << sh[None, None, :], axis=2)
    tl.store(rows[:, None] + off + tl.arange(0, NB)[None, :], byte.to(tl.uint8), mask=mask[:, None])


@triton.jit
def _rotate_rows(xrow, tmask, mu_row, HAS_MU: tl.constexpr, mt_ptr, MSCALE: tl.constexpr,
                 BLOCK_T: tl.constexpr, D: tl.constexpr):
    """(x - mu) M^T in fp32 for the rows at xrow [BLOCK_T], K in chunks of BK. M = signs * MSCALE and
    mt_ptr holds M^T's int8 signs; x goes in as bf16 hi + lo (exact for bf16/fp16 rows, 16 mantissa
    bits otherwise) on tensor cores with fp32 sums."""
    d = tl.arange(0, D)
    BK: tl.constexpr = 32 if D > 32 else D
    u = tl.zeros((BLOCK_T, D), dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        xk = tl.load(xrow[:, None] + kk[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
        if HAS_MU:
            xk -= tl.load(mu_row + kk)[None, :]
        xh = xk.to(tl.bfloat16)
        xl = (xk - xh.to(tl.float32)).to(tl.bfloat16)
        sk = tl.load(mt_ptr + kk[:, None] * D + d[None, :]).to(tl.float32).to(tl.bfloat16)
        u = tl.dot(xl, sk, tl.dot(xh, sk, u))
    return u * MSCALE


@triton.jit
def _rotate_queries(q_ptr, q_t, q_h, N, G: tl.constexpr, qr_ptr, qr_t, qr_h, mt_ptr, MSCALE: tl.constexpr,
                    BLOCK_T: tl.constexpr, QROWS: tl.constexpr, D: tl.constexpr):
    """The decode queries of KV head h's group, rotated like its keys (q M_k^T, fp32): the decode kernel
    then reads them instead of running its own rotation launches. One tile of QROWS >= BLOCK_T * G rows
    (token-major, the group's heads inside) at a time: the sign matrix is read once per tile instead of
    once per head."""
    d = tl.arange(0, D)
    for r0 in range(0, BLOCK_T * G, QROWS):
        r = r0 + tl.arange(0, QROWS)
        t = tl.program_id(0) * BLOCK_T + r // G
        head = tl.program_id(1) * G + r % G
        rmask = (r < BLOCK_T * G) & (t < N)
        u = _rotate_rows(q_ptr + t.to(tl.int64) * q_t + head * q_h, rmask, q_ptr, False, mt_ptr, MSCALE, QROWS, D)
        tl.store((qr_ptr + t.to(tl.int64) * qr_t + head * qr_h)[:, None] + d[None, :], u, mask=rmask[:, None])


@triton.jit
def _compress_one(x_ptr, x_t, x_h, slots_ptr, N, codes, mt_ptr, MSCALE: tl.constexpr, cent_ptr, bnd_ptr, st_ptr,
                  mu_ptr, HAS_MU: tl.constexpr, ring, ring_rows_ptr, HAS_RING: tl.constexpr,
                  first, first_rows_ptr, HAS_FIRST: tl.constexpr,
                  BLOCK_T: tl.constexpr, NC: tl.constexpr, QJLC: tl.constexpr, SMAX: tl.constexpr,
                  F: tl.constexpr):
    """One role's tile: codes = (codes, slot stride, head stride, scales, slot stride, head stride);
    ring / first = (rows, row stride, head stride) of the recent window's ring / the first-token table."""
    c_ptr, c_s, c_h, s_ptr, s_s, s_h = codes
    ring_ptr, ring_t, ring_h = ring
    first_ptr, first_t, first_h = first
    D: tl.constexpr = F.D
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < N
    d = tl.arange(0, D)
    # the destination rows first: their loads then overlap the rest instead of waiting at the end
    slot = tl.load(slots_ptr + t, mask=tmask, other=0).to(tl.int64)
    if HAS_RING:
        rrow = tl.load(ring_rows_ptr + t, mask=tmask, other=-1).to(tl.int64)
    if HAS_FIRST:
        frow = tl.load(first_rows_ptr + t, mask=tmask, other=-1).to(tl.int64)
    xrow = x_ptr + t.to(tl.int64) * x_t + h * x_h
    x = tl.load(xrow[:, None] + d[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if HAS_MU:  # key centering: quantize x - mu[h] (one [D] vector per program)
        x -= tl.load(mu_ptr + h * D + d)[None, :]
    nrm = tl.sqrt(tl.sum(x * x, axis=1))
    inv = 1.0 / tl.maximum(nrm, 1e-30)

    y = _rotate_rows(xrow, tmask, mu_ptr + h * D, HAS_MU, mt_ptr, MSCALE, BLOCK_T, D)
    if HAS_RING:  # recent window: the exact rotated vector, bf16, at its ring row (-1: none)
        rmask = tmask & (rrow >= 0)
        tl.store((ring_ptr + rrow * ring_t + h * ring_h)[:, None] + d[None, :], y.to(tl.bfloat16),
                 mask=rmask[:, None])
    if HAS_FIRST:  # the exact first token: the same row at its table entry (-1: none)
        fmask = tmask & (frow >= 0)
        tl.store((first_ptr + frow * first_t + h * first_h)[:, None] + d[None, :], y.to(tl.bfloat16),
                 mask=fmask[:, None])
    u = y * inv[:, None]

    # bucketize: count(u > b) over the low codebook's boundaries (outliers: the outlier codebook's)
    NB_LO: tl.constexpr = (1 << F.LO) - 1
    idx = tl.zeros((BLOCK_T, D), dtype=tl.int32)
    for i in tl.static_range(NB_LO):
        idx += (u > tl.load(bnd_ptr + i)).to(tl.int32)
    if F.NOUT > 0:
        HI: tl.constexpr = F.LO + (F.X0W if F.X1W == 0 else F.X0W + F.X1W)
        NB_HI: tl.constexpr = (1 << HI) - 1
        idx_hi = tl.zeros((BLOCK_T, D), dtype=tl.int32)
        for i in tl.static_range(NB_HI):
            idx_hi += (u > tl.load(bnd_ptr + NB_LO + i)).to(tl.int32)
        is_out = (d % F.OSTRIDE) == 0
        idx = tl.where(is_out[None, :], idx_hi, idx)
        c = tl.load(cent_ptr + idx + tl.where(is_out, 1 << F.LO, 0)[None, :])
    else:
        c = tl.load(cent_ptr + idx)

    if NC:
        a = 1.0 / tl.maximum(tl.sqrt(tl.sum(c * c, axis=1)), 1e-30)
    else:
        a = tl.full((BLOCK_T,), 1.0, tl.float32)
    srow = s_ptr + slot * s_s + h * s_h
    tl.store(srow, tl.minimum(nrm * a, SMAX).to(tl.float16), mask=tmask)
    crow = c_ptr + slot * c_s + h * c_h

    # main fields carry the low LO bits of every code (outlier positions: of the outlier code)
    _pack_store(crow, tmask, (idx >> 0) & ((1 << F.M0W) - 1), F.M0OFF, F.M0W, D, BLOCK_T)
    if F.M1W > 0:
        _pack_store(crow, tmask, (idx >> F.M1SH) & ((1 << F.M1W) - 1), F.M1OFF, F.M1W, D, BLOCK_T)
    if F.NOUT > 0:
        e3 = tl.reshape(idx, (BLOCK_T, F.NOUT, F.OSTRIDE))
        first = (tl.arange(0, F.OSTRIDE) == 0)[None, None, :]
        ev = tl.sum(tl.where(first, e3, 0), axis=2)  # codes at positions j * OSTRIDE
        _pack_store(crow, tmask, (ev >> F.X0SH) & ((1 << F.X0W) - 1), F.X0OFF, F.X0W, F.NOUT, BLOCK_T)
        if F.X1W > 0:
            _pack_store(crow, tmask, (ev >> F.X1SH) & ((1 << F.X1W) - 1), F.X1OFF, F.X1W, F.NOUT, BLOCK_T)

    if F.QJLOFF >= 0:
        r = u - a[:, None] * c
        rn = tl.sqrt(tl.sum(r * r, axis=1))
        tl.store(srow + 1, tl.minimum(nrm * rn * QJLC, SMAX).to(tl.float16), mask=tmask)
        # projection r S^T in column chunks of BJ (S^T [D, M=D] contiguous)
        BJ: tl.constexpr = 32 if D > 32 else D
        for j0 in range(0, D, BJ):
            jj = j0 + tl.arange(0, BJ)
            sj = tl.load(st_ptr + d[:, None] * D + jj[None, :])
            pr = tl.dot(r, sj, input_precision="ieee")
            _pack_store(crow, tmask, (pr >= 0).to(tl.int32), F.QJLOFF + j0 // 8, 1, BJ, BLOCK_T)


@triton.jit
def _compress_kernel(k_ptr, k_t, k_h, v_ptr, v_t, v_h, slots_ptr, N, cache, k_tables, v_tables, kmu_ptr,
                     ring, ring_rows_ptr, first, first_rows_ptr, q_ptr, q_t, q_h, qr_ptr, qr_t, qr_h,
                     HAS_KMU: tl.constexpr, HAS_RING: tl.constexpr, HAS_FIRST: tl.constexpr, G: tl.constexpr,
                     QROWS: tl.constexpr,
                     BLOCK_T: tl.constexpr, SMAX: tl.constexpr, K_MSCALE: tl.constexpr, V_MSCALE: tl.constexpr,
                     K_NC: tl.constexpr, V_NC: tl.constexpr, K_QJLC: tl.constexpr, V_QJLC: tl.constexpr,
                     KF: tl.constexpr, VF: tl.constexpr, PDL_TRIGGER: tl.constexpr):
    """cache: `cache_args`; k_tables / v_tables: (M^T signs, centroids, boundaries, S^T) of each role;
    ring / first: (K rows, row stride, head stride, V rows, row stride, head stride)."""
    if PDL_TRIGGER:  # the decode's stage 1, launched as a programmatic dependent, may start now (it
        # waits for this kernel's writes before reading them)
        gdc_launch_dependents()
    kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h = cache
    kmt_ptr, kcent_ptr, kbnd_ptr, kst_ptr = k_tables
    vmt_ptr, vcent_ptr, vbnd_ptr, vst_ptr = v_tables
    rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h = ring
    fk_ptr, fk_t, fk_h, fv_ptr, fv_t, fv_h = first
    role = tl.program_id(2)
    if role == 0:
        _compress_one(k_ptr, k_t, k_h, slots_ptr, N, (kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h),
                      kmt_ptr, K_MSCALE, kcent_ptr, kbnd_ptr, kst_ptr, kmu_ptr, HAS_KMU,
                      (rk_ptr, rk_t, rk_h), ring_rows_ptr, HAS_RING, (fk_ptr, fk_t, fk_h), first_rows_ptr, HAS_FIRST,
                      BLOCK_T, K_NC, K_QJLC, SMAX, KF)
    elif role == 1:
        _compress_one(v_ptr, v_t, v_h, slots_ptr, N, (vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h),
                      vmt_ptr, V_MSCALE, vcent_ptr, vbnd_ptr, vst_ptr, kmu_ptr, False,
                      (rv_ptr, rv_t, rv_h), ring_rows_ptr, HAS_RING, (fv_ptr, fv_t, fv_h), first_rows_ptr, HAS_FIRST,
                      BLOCK_T, V_NC, V_QJLC, SMAX, VF)
    else:
        _rotate_queries(q_ptr, q_t, q_h, N, G, qr_ptr, qr_t, qr_h, kmt_ptr, K_MSCALE, BLOCK_T, QROWS, KF.D)


def _rows(x, n, h, d):
    x = x.reshape(n, h, d)
    if x.stride(2) != 1:
        x = x.contiguous()
    return x


def check_k_mean(k_mean, h: int, d: int, device):
    """k_mean: None or [H_kv, d] -> None or a contiguous fp32 tensor on `device`."""
    if k_mean is None:
        return None
    if tuple(k_mean.shape) != (h, d):
        raise ValueError(f"k_mean must be [H_kv={h}, d={d}], got {tuple(k_mean.shape)}")
    return k_mean.to(device=device, dtype=torch.float32).contiguous()


def choose_compress_tile(n: int, with_q: bool, head_dim: int) -> int:
    """Token-heads per program: prefills (more than 16 rows, no queries to rotate, d <= 128) take 32
    (fewer programs re-reading the rotation signs); a decode step keeps 16 (its launch also rotates the
    queries, and a batch is a few rows)."""
    return 32 if (n > 16 and not with_q and head_dim <= 128) else 16


def _role_tables(t: dict, dummy) -> tuple:
    return (t["msign_t"], t["centroids"], t["boundaries"], t["st"] if t["st"] is not None else dummy)


def compress_and_store(k, v, slots, kcodec: TQCodec, vcodec: TQCodec, k_codes, k_scales, v_codes, v_scales,
                       *, k_mean=None, q=None, q_rot=None, ring=None, first=None,
                       block_t: Optional[int] = None) -> None:
    """Quantize k [N, H_kv, d_k] and v [N, H_kv, d_v] and write them to rows `slots` [N] of the
    cache buffers (in place). One Triton launch for K and V.
    q [N, H_q, d_k] with q_rot (fp32, [N, H_q, d_k] or larger in dim 0, unit last stride): the same
    launch writes the decode queries rotated like the keys, q_rot[:N] = q M_k^T, for
    decode_attention(q_rotated=...) (keys without QJL: their queries also need the sketch).
    k_mean: optional fp32 [H_kv, d_k] (key centering): head h stores codes of k - k_mean[h].
    ring: optional `RingWrite` (recent window): token i's exact rotated K / V ((k - mu) M_k^T, v M_v^T,
    bf16) also go to row ring.rows[i] of ring.k / ring.v (rows < 0: not written).
    first: optional `RingWrite` into the first-token table (`tq_kernels.window`: FirstRows): the same exact
    rows at first.rows[i] (the token's entry, < 0: not written).
    block_t: token-heads per program (None: `choose_compress_tile`; the codes do not depend on it).
    On sm_90+ the launch lets a programmatic dependent (decode's stage 1) start while it runs."""
    n = k.shape[0]
    if n == 0:
        return
    kf, vf = kcodec.fmt, vcodec.fmt
    if kf.model_head_dim or vf.model_head_dim:  # head_dim 80 / 96: zero-padded to the codec dim here
        h = k_codes.shape[1]
        k, v = kcodec.pad(k.reshape(n, h, kf.in_dim)), vcodec.pad(v.reshape(n, h, vf.in_dim))
        k_mean = None if k_mean is None else kcodec.pad(k_mean.to(torch.float32))
        q = None if q is None else kcodec.pad(q.reshape(n, -1, kf.in_dim))
    if block_t is None:
        block_t = choose_compress_tile(n, q is not None, max(kf.head_dim, vf.head_dim))
    h = k_codes.shape[1]
    assert k_codes.shape[2] == kf.code_bytes and v_codes.shape[2] == vf.code_bytes
    assert k_scales.shape[2] == kf.n_scales and v_scales.shape[2] == vf.n_scales
    assert k_codes.dtype == v_codes.dtype and str(k_codes.dtype) == "torch.uint8"
    for buf in (k_codes, k_scales, v_codes, v_scales):
        assert buf.stride(2) == 1
    k3, v3 = _rows(k, n, h, kf.head_dim), _rows(v, n, h, vf.head_dim)
    slots = slots.reshape(n)
    kt, vt = kernel_tables(kcodec, k.device), kernel_tables(vcodec, v.device)
    dummy = kt["mt"]
    kmu = check_k_mean(k_mean, h, kf.head_dim, k.device)
    with_q = q is not None
    if with_q:
        if q_rot is None or kf.qjl:
            raise ValueError("compress_and_store(q=...): needs q_rot, and keys without QJL")
        q3 = _rows(q, n, q.reshape(n, -1).shape[1] // kf.head_dim, kf.head_dim)
        assert q3.shape[1] % h == 0 and q_rot.dtype == torch.float32 and q_rot.shape[0] >= n
        group = q3.shape[1] // h
        qr3 = q_rot.view(q_rot.shape[0], q3.shape[1], kf.head_dim)
        assert qr3.stride(2) == 1
    else:
        q3, qr3, group = k3, k3, 1
    if ring is not None:
        rk, rv, rrows = check_ring(ring, n, h, kf.head_dim, vf.head_dim)
    else:
        rk, rv, rrows = k3, v3, slots
    if first is not None:
        fk, fv, frows = check_ring(first, n, h, kf.head_dim, vf.head_dim)
    else:
        fk, fv, frows = k3, v3, slots
    grid = (triton.cdiv(n, block_t), h, 3 if with_q else 2)
    _compress_kernel[grid](
        k3, k3.stride(0), k3.stride(1), v3, v3.stride(0), v3.stride(1), slots, n,
        cache_args(k_codes, k_scales, v_codes, v_scales), _role_tables(kt, dummy), _role_tables(vt, dummy),
        kmu if kmu is not None else dummy,
        (rk, rk.stride(0), rk.stride(1), rv, rv.stride(0), rv.stride(1)), rrows,
        (fk, fk.stride(0), fk.stride(1), fv, fv.stride(0), fv.stride(1)), frows,
        q3, q3.stride(0), q3.stride(1), qr3, qr3.stride(0), qr3.stride(1),
        HAS_KMU=kmu is not None, HAS_RING=ring is not None, HAS_FIRST=first is not None, G=group,
        QROWS=min(triton.next_power_of_2(block_t * group), max(16, 8192 // kf.head_dim)),
        BLOCK_T=block_t, SMAX=FP16_MAX, K_MSCALE=kt["mscale"], V_MSCALE=vt["mscale"],
        K_NC=kf.norm_correction, V_NC=vf.norm_correction,
        K_QJLC=SQRT_PI_2 / kf.qjl_dim if kf.qjl else 0.0, V_QJLC=SQRT_PI_2 / vf.qjl_dim if vf.qjl else 0.0,
        KF=fmt_constexpr(kf), VF=fmt_constexpr(vf), PDL_TRIGGER=pdl_ok(k.device), num_warps=4,
    )
