"""Triton split-K decode attention over the packed TurboQuant cache.

Per call (no host sync, static grid: capturable in a CUDA graph):
  0. q_all = q @ W^T with W = [M_k] or [M_k; S M_k] (one small torch matmul): the query rotated into
     K's storage domain and, for PROD keys, its QJL sketch. sm_scale (and log2 e when there is no
     soft-cap) is folded in inside the kernel.
  1. stage 1, grid (B, H_kv, num_splits): one program per (sequence, KV head, split) serves the whole
     GQA group (G = H_q / H_kv query rows padded to BLOCK_G >= 16 for tl.dot), so every packed K/V
     tile is read from HBM once per KV head. Per BLOCK_N tile: slots -> per-field uint8 tiles
     (vector loads) -> in-register unpack -> centroid gathers (tiny L1-resident table) -> bf16
     tensor-core scores q~ c^T times scale0 per token (+ sketch signs^T times scale1; 4-bit keys in
     the sliced stage 1: int8 centroids from a register LUT against the int8-split query) -> online
     softmax in fp32 -> p * v_scale0 -> tl.dot(p, c_v), accumulated in V's rotated domain.
     Writes acc / l and lse (log2 units) per split into the workspace. With a recent window, one more
     program per (sequence, KV head) scores the ring's exact positions and writes its partial after them.
  2. stage 2, grid (B, H_kv): log-sum-exp merge of the splits, then one un-rotation o = o_rot M_v
     (fp32 tl.dot against the d x d matrix), written in q's dtype into `out`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (LOG2E, _reg_slice_code, fmt_constexprs, gdc_launch_dependents, gdc_wait, interpreting, kernel_tables,
                      lut_width, next_pow2, pdl_ok,
                      online_softmax_step, qjl_signs, softcap_log2, packed_tile_update, register_lut_i8_slices,
                      register_lut_pair_slices, register_lut_slices, register_lut_slices3, register_poly_slices,
                      register_lut_slices5, rotation_operand, split_high_crumbs, split_high_nibbles,
                      unrotate_store)
from .codec import TQCodec
from .compress import _rotate_rows
from .window import DecodeWindow, check_decode_window


@triton.jit
def _split_range(kv_indptr, b, sid, num_splits, BLOCK_N: tl.constexpr, plen_ptr, HAS_PLEN: tl.constexpr):
    """Tokens [lo, hi) of split `sid` of sequence b (split length rounded up to whole tiles, so the
    partition depends only on the sequence length and num_splits); and the sequence's start in
    kv_indices. HAS_PLEN: only the first plen[b] tokens come from the codes (the rest from the recent
    window's ring)."""
    seq_start = tl.load(kv_indptr + b)
    seq_len = _packed_len(kv_indptr, b, plen_ptr, HAS_PLEN)
    split_len = _split_len(seq_len, num_splits, BLOCK_N)
    lo = sid * split_len
    return seq_start, lo, tl.minimum(lo + split_len, seq_len)


@triton.jit
def _packed_len(kv_indptr, b, plen_ptr, HAS_PLEN: tl.constexpr):
    """Tokens of sequence b read from the packed codes: all, or the first plen[b] (recent window)."""
    n = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    if HAS_PLEN:
        n = tl.maximum(tl.minimum(tl.load(plen_ptr + b), n), 0)
    return n


@triton.jit
def _split_len(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """Tokens per split: seq_len / num_splits rounded up to whole BLOCK_N tiles."""
    return tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N


# num_splits is never specialized: Triton compiles an int argument equal to 1 (and one divisible by 16)
# as a separate variant. The CUDA graphs capture batches up to --cuda-graph-max-bs, whose split counts
# are above 1. Larger batches run eagerly, and from B x H_kv >= 16 x SMs on (264 requests with 8 KV
# heads on 132 SMs) with 1 split (`choose_num_splits`): the first of them would have compiled both
# kernels again while serving, with every request waiting.
_SPLITS_ARG = ["num_splits"]


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage1(qr_ptr, qr_b, qr_h, q_scale, logit_cap,
                   kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h,
                   kcent_ptr, vcent_ptr, klut_ptr, vlut_ptr, kv_indptr, kv_indices, num_splits,
                   po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, plen_ptr, HAS_PLEN: tl.constexpr,
                   rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, wbase_ptr, WSIZE: tl.constexpr, BLOCK_W: tl.constexpr,
                   G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr,
                   K_LUT: tl.constexpr, V_LUT: tl.constexpr,
                   K_D: tl.constexpr, K_LO: tl.constexpr, K_M0W: tl.constexpr, K_M0OFF: tl.constexpr,
                   K_M1W: tl.constexpr, K_M1OFF: tl.constexpr, K_M1SH: tl.constexpr, K_QJLOFF: tl.constexpr,
                   K_NOUT: tl.constexpr, K_OSTRIDE: tl.constexpr, K_X0W: tl.constexpr, K_X0OFF: tl.constexpr,
                   K_X0SH: tl.constexpr, K_X1W: tl.constexpr, K_X1OFF: tl.constexpr, K_X1SH: tl.constexpr,
                   V_D: tl.constexpr, V_LO: tl.constexpr, V_M0W: tl.constexpr, V_M0OFF: tl.constexpr,
                   V_M1W: tl.constexpr, V_M1OFF: tl.constexpr, V_M1SH: tl.constexpr, V_QJLOFF: tl.constexpr,
                   V_NOUT: tl.constexpr, V_OSTRIDE: tl.constexpr, V_X0W: tl.constexpr, V_X0OFF: tl.constexpr,
                   V_X0SH: tl.constexpr, V_X1W: tl.constexpr, V_X1OFF: tl.constexpr, V_X1SH: tl.constexpr):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sid = tl.program_id(2)
    if WSIZE > 0:
        if sid == num_splits:  # the recent window's ring (`_ring_split`)
            _ring_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, plen_ptr, wbase_ptr,
                        rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h,
                        G, BLOCK_G, USE_CAP, WSIZE, BLOCK_W, K_D, V_D)
            return
    seq_start, lo, hi = _split_range(kv_indptr, b, sid, num_splits, BLOCK_N, plen_ptr, HAS_PLEN)
    if lo >= hi:  # an empty split: stage 2 never reads its partials
        return
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    dk = tl.arange(0, K_D)
    qrow = qr_ptr + b * qr_b + heads * qr_h
    q = (tl.load(qrow[:, None] + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)
    sk = q  # unused unless PROD keys
    if K_QJLOFF >= 0:
        sk = (tl.load(qrow[:, None] + K_D + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, V_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        slot = tl.load(kv_indices + seq_start + offs, mask=nmask, other=0).to(tl.int64)
        # ---- K: scores of the whole GQA group against the tile
        m_i, l_i, acc = packed_tile_update(
            q, sk, m_i, l_i, acc, slot, nmask, hk, logit_cap,
            kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h,
            kcent_ptr, vcent_ptr, klut_ptr, vlut_ptr, USE_CAP, K_LUT, V_LUT, 0, "", 0, "", False,
            K_D, K_LO, K_M0W, K_M0OFF, K_M1W, K_M1OFF, K_M1SH, K_QJLOFF, K_NOUT, K_OSTRIDE,
            K_X0W, K_X0OFF, K_X0SH, K_X1W, K_X1OFF, K_X1SH,
            V_D, V_LO, V_M0W, V_M0OFF, V_M1W, V_M1OFF, V_M1SH, V_NOUT, V_OSTRIDE,
            V_X0W, V_X0OFF, V_X0SH, V_X1W, V_X1OFF, V_X1SH)

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    dv = tl.arange(0, V_D)
    po = po_ptr + b * po_b + heads * po_h + sid * po_s
    tl.store(po[:, None] + dv[None, :], o, mask=gmask[:, None])
    tl.store(pl_ptr + b * pl_b + heads * pl_h + sid, lse, mask=gmask)


@triton.jit
def _field_bits(rows, mask, pos, OFF: tl.constexpr, W: tl.constexpr):
    """W-bit values at bit positions `pos` ([C] coordinate * W) of the LSB-first field at byte OFF of
    every row -> int32 [BLOCK_N, C]. Bytes are gathered (duplicate addresses hit L1)."""
    byt = tl.load(rows[:, None] + OFF + (pos // 8)[None, :], mask=mask, other=0).to(tl.int32)
    return (byt >> (pos % 8)[None, :]) & ((1 << W) - 1)


@triton.jit
def _slice_index(rows, mask, b0, T: tl.constexpr, D: tl.constexpr, LO: tl.constexpr, M0W: tl.constexpr,
                 M1W: tl.constexpr, M1OFF: tl.constexpr, M1SH: tl.constexpr, NOUT: tl.constexpr,
                 OSTRIDE: tl.constexpr, X0W: tl.constexpr, X0OFF: tl.constexpr, X0SH: tl.constexpr,
                 X1W: tl.constexpr, X1OFF: tl.constexpr, X1SH: tl.constexpr):
    """Centroid-table index of slice T: storage coordinates c = S j + T (S = 8 / M0W codes per byte of
    the first field, whose byte tile b0 [BLOCK_N, D / S] the caller loaded once per tile). The first
    field needs only a shift; further fields (the high bit of 3-bit codes, outlier refinement bits at
    positions c % OSTRIDE == 0) are gathered per coordinate."""
    S: tl.constexpr = 8 // M0W
    c = tl.arange(0, D // S) * S + T
    m2 = mask[:, None]
    idx = (b0 >> (T * M0W)) & ((1 << M0W) - 1)
    if M1W > 0:
        idx = idx | (_field_bits(rows, m2, c * M1W, M1OFF, M1W) << M1SH)
    if NOUT > 0:
        is_out = (c % OSTRIDE) == 0
        e = c // OSTRIDE
        ex = _field_bits(rows, m2 & is_out[None, :], e * X0W, X0OFF, X0W) << X0SH
        if X1W > 0:
            ex = ex | (_field_bits(rows, m2 & is_out[None, :], e * X1W, X1OFF, X1W) << X1SH)
        idx = idx + tl.where(is_out[None, :], ex + (1 << LO), 0)
    return idx


@triton.jit
def _q_slice(qrow, gmask, q_scale, T: tl.constexpr, S: tl.constexpr, D: tl.constexpr, F16: tl.constexpr = False):
    """Columns T, T + S, T + 2S, ... of the rotated query rows (scaled; bf16, or f16 against f16 keys)."""
    cols = tl.arange(0, D // S) * S + T
    q = tl.load(qrow[:, None] + cols[None, :], mask=gmask[:, None], other=0.0) * q_scale
    if F16:
        q16 = q.to(tl.float16)
    else:
        q16 = q.to(tl.bfloat16)
    return q16


@triton.jit
def _round_i8(x):
    return tl.where(x >= 0, x + 0.5, x - 0.5).to(tl.int32).to(tl.int8)  # round half away from zero


@triton.jit
def query_slices_i8(qrow, gmask, q_scale, D: tl.constexpr):
    """The two column slices (even / odd coordinates) of the rotated query rows as int8 pairs for int8
    keys, and each row's scale: q = scale * (hi + lo / 128) with scale = max|q| / 127 over the row, hi
    the rounded q / scale and lo the rounded remainder times 128, so two int8 MMAs per slice give the
    scores with ~15 bits of the query (one int8 would cost ~0.8 % of |q| in RMS)."""
    # whole rows, then split: a row-major layout, so the int8 operands sit row-major in shared memory
    # and load as words (strided slice loads came out column-major: byte loads every tile)
    q = tl.load(qrow[:, None] + tl.arange(0, D)[None, :], mask=gmask[:, None], other=0.0) * q_scale
    return _slices_i8(q, D)


@triton.jit
def _slices_i8(q, D: tl.constexpr):
    """`query_slices_i8` of query rows already in registers (rotated and scaled)."""
    qe, qo = tl.split(tl.reshape(q, (q.shape[0], D // 2, 2)))
    amax = tl.maximum(tl.max(tl.abs(qe), axis=1), tl.max(tl.abs(qo), axis=1))
    scale = tl.where(amax > 0, amax / 127.0, 1.0)
    qe = qe / scale[:, None]
    qo = qo / scale[:, None]
    qe_hi = _round_i8(qe)
    qo_hi = _round_i8(qo)
    qe_lo = _round_i8((qe - qe_hi.to(tl.float32)) * 128.0)
    qo_lo = _round_i8((qo - qo_hi.to(tl.float32)) * 128.0)
    return qe_hi, qo_hi, qe_lo, qo_lo, scale


@triton.jit
def query_slices(qrow, mask, q_scale, S: tl.constexpr, D: tl.constexpr, QJLOFF: tl.constexpr,
                 F16: tl.constexpr = False, QJL_TILE: tl.constexpr = False):
    """The S column slices of the rotated query rows at qrow (`_q_slice`), then those of their QJL
    sketch for PROD keys (QJLOFF >= 0; it follows the rotated query in each row; QJL_TILE: the whole
    sketch rows [BLOCK_G, D] in sk0, in coordinate order). Unused entries of the two 4-tuples repeat
    slice 0 of the query (QJL_TILE: of the sketch)."""
    q0 = _q_slice(qrow, mask, q_scale, 0, S, D, F16)
    q1 = _q_slice(qrow, mask, q_scale, 1, S, D, F16)
    q2 = q0
    q3 = q0
    if S == 4:
        q2 = _q_slice(qrow, mask, q_scale, 2, S, D, F16)
        q3 = _q_slice(qrow, mask, q_scale, 3, S, D, F16)
    sk0 = q0
    sk1 = q0
    sk2 = q0
    sk3 = q0
    if QJLOFF >= 0 and QJL_TILE:
        sk0 = _q_slice(qrow + D, mask, q_scale, 0, 1, D)
        sk1 = sk0
        sk2 = sk0
        sk3 = sk0
    elif QJLOFF >= 0:
        sk0 = _q_slice(qrow + D, mask, q_scale, 0, S, D)
        sk1 = _q_slice(qrow + D, mask, q_scale, 1, S, D)
        if S == 4:
            sk2 = _q_slice(qrow + D, mask, q_scale, 2, S, D)
            sk3 = _q_slice(qrow + D, mask, q_scale, 3, S, D)
    return q0, q1, q2, q3, sk0, sk1, sk2, sk3


@triton.jit
def _slice_centroids(rows, mask, b0, cent_ptr, ASM: tl.constexpr, D: tl.constexpr, LO: tl.constexpr,
                     M0W: tl.constexpr, M1W: tl.constexpr, M1OFF: tl.constexpr, M1SH: tl.constexpr,
                     NOUT: tl.constexpr, OSTRIDE: tl.constexpr, X0W: tl.constexpr, X0OFF: tl.constexpr,
                     X0SH: tl.constexpr, X1W: tl.constexpr, X1OFF: tl.constexpr, X1SH: tl.constexpr,
                     POLY: tl.constexpr = False, I8: tl.constexpr = False):
    """Centroids [BLOCK_N, D / S] of every slice of a tile (a 4-tuple; unused entries repeat slice 0),
    in cent_ptr's dtype (bf16; f16 with POLY; int8 with I8). ASM: the register LUT (POLY: the
    polynomial, `register_poly_asm`; I8: `register_lut_i8_asm`) over the uint8 first-field bytes b0;
    "" -> per-code gathers."""
    S: tl.constexpr = 8 // M0W
    if ASM != "" and I8:
        c0, c1, c2, c3 = register_lut_i8_slices(b0, ASM)
    elif ASM != "" and POLY:
        c0, c1, c2, c3 = register_poly_slices(b0, ASM)
    elif ASM != "" and M1W == 1 and M0W == 2:  # 3-bit codes: the high bits come from the 1-bit field
        c0, c1, c2, c3 = register_lut_slices3(b0, split_high_nibbles(rows, mask, M1OFF, D), ASM)
    elif ASM != "" and M1W == 1:  # 5-bit codes: the same, two coordinates per byte
        c0, c1, c2, c3 = register_lut_slices5(b0, split_high_crumbs(rows, mask, M1OFF, D), ASM)
    elif ASM != "":
        c0, c1, c2, c3 = register_lut_slices(b0, ASM, M0W)
    else:
        bi = b0.to(tl.int32)
        c0 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 0, D, LO, M0W, M1W, M1OFF, M1SH, NOUT, OSTRIDE,
                                             X0W, X0OFF, X0SH, X1W, X1OFF, X1SH))
        c1 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 1, D, LO, M0W, M1W, M1OFF, M1SH, NOUT, OSTRIDE,
                                             X0W, X0OFF, X0SH, X1W, X1OFF, X1SH))
        c2 = c0
        c3 = c0
        if S == 4:
            c2 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 2, D, LO, M0W, M1W, M1OFF, M1SH, NOUT, OSTRIDE,
                                                 X0W, X0OFF, X0SH, X1W, X1OFF, X1SH))
            c3 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 3, D, LO, M0W, M1W, M1OFF, M1SH, NOUT, OSTRIDE,
                                                 X0W, X0OFF, X0SH, X1W, X1OFF, X1SH))
    return c0, c1, c2, c3


@triton.jit
def _pair_centroids(b16, cent_ptr, ASM: tl.constexpr):
    """bf16 centroids of the 4 slices of 16-bit elements of 4-bit codes (`register_lut_pair_slices`;
    ASM "": one gather per code, as in the interpreter)."""
    if ASM != "":
        c0, c1, c2, c3 = register_lut_pair_slices(b16, ASM)
    else:
        w = b16.to(tl.int32)
        c0 = tl.load(cent_ptr + _reg_slice_code(w, w, 0, 4, 0, 0))
        c1 = tl.load(cent_ptr + _reg_slice_code(w, w, 1, 4, 0, 0))
        c2 = tl.load(cent_ptr + _reg_slice_code(w, w, 2, 4, 0, 0))
        c3 = tl.load(cent_ptr + _reg_slice_code(w, w, 3, 4, 0, 0))
    return c0, c1, c2, c3


@triton.jit
def _qjl_slice_score(sk, rows, mask, T: tl.constexpr, S: tl.constexpr, D: tl.constexpr, QJLOFF: tl.constexpr):
    """sk_T signs_T^T for PROD keys (signs of coordinates S j + T, gathered per coordinate)."""
    c = tl.arange(0, D // S) * S + T
    sg = (_field_bits(rows, mask[:, None], c, QJLOFF, 1) * 2 - 1).to(tl.float32).to(tl.bfloat16)
    return tl.dot(sk, tl.trans(sg))


@triton.jit
def sliced_tile_update(q0, q1, q2, q3, sk0, sk1, sk2, sk3, q_row_scale, m_i, l_i, a0, a1, a2, a3, slot, nmask, hk,
                       logit_cap, kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h,
                       kcent_ptr, vcent_ptr, USE_CAP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
                       K_POLY: tl.constexpr, V_POLY: tl.constexpr, K_I8: tl.constexpr, V_PAIRS: tl.constexpr,
                       QJL_TILE: tl.constexpr, K_D: tl.constexpr, K_LO: tl.constexpr, K_M0W: tl.constexpr,
                       K_M0OFF: tl.constexpr,
                       K_M1W: tl.constexpr, K_M1OFF: tl.constexpr, K_M1SH: tl.constexpr, K_QJLOFF: tl.constexpr,
                       K_NOUT: tl.constexpr, K_OSTRIDE: tl.constexpr, K_X0W: tl.constexpr, K_X0OFF: tl.constexpr,
                       K_X0SH: tl.constexpr, K_X1W: tl.constexpr, K_X1OFF: tl.constexpr, K_X1SH: tl.constexpr,
                       V_D: tl.constexpr, V_LO: tl.constexpr, V_M0W: tl.constexpr, V_M0OFF: tl.constexpr,
                       V_M1W: tl.constexpr, V_M1OFF: tl.constexpr, V_M1SH: tl.constexpr, V_NOUT: tl.constexpr,
                       V_OSTRIDE: tl.constexpr, V_X0W: tl.constexpr, V_X0OFF: tl.constexpr, V_X0SH: tl.constexpr,
                       V_X1W: tl.constexpr, V_X1OFF: tl.constexpr, V_X1SH: tl.constexpr):
    """One BLOCK_N tile of packed tokens in the sliced layout for query rows given as slices q0..q3
    (sk0..sk3: their QJL sketch for PROD keys): scores slice by slice from the register LUT, online
    softmax, p * |v| against every V slice into accumulators a0..a3: the loop body of decode's sliced
    stage 1. K_I8: the key centroids are int8, q0, q1 the query slices' int8 high parts and q2, q3 their
    low parts (`query_slices_i8`; q_row_scale [BLOCK_G] folds the query's and the table's scales), the
    scores int8 MMAs' int32 sums. V_PAIRS (4-bit one-field V): the V codes load as 16-bit elements (4
    coordinates each), which a 16-bit MMA operand with the tokens as its reduction dimension takes as
    they are (two tokens' elements per register: `register_lut_asm(pairs=True)`; byte tiles there cost a
    shared-memory load per byte), so V has 4 slices (coordinates 4c + T).
    Returns (m_i, l_i, a0, a1, a2, a3)."""
    KS: tl.constexpr = 8 // K_M0W
    VS: tl.constexpr = 4 if V_PAIRS else 8 // V_M0W
    kb_cols = tl.arange(0, K_D // KS)
    vb_cols = tl.arange(0, V_D // VS)
    krow = kc_ptr + slot * kc_s + hk * kc_h
    vrow = vc_ptr + slot * vc_s + hk * vc_h
    ksrow = ks_ptr + slot * ks_s + hk * ks_h
    kb = tl.load(krow[:, None] + K_M0OFF + kb_cols[None, :], mask=nmask[:, None], other=0)
    if V_PAIRS:
        vrow16 = (vrow + V_M0OFF).to(tl.pointer_type(tl.uint16))
        vb = tl.load(vrow16[:, None] + vb_cols[None, :], mask=nmask[:, None], other=0)
    else:
        vb = tl.load(vrow[:, None] + V_M0OFF + vb_cols[None, :], mask=nmask[:, None], other=0)
    ks0 = tl.load(ksrow, mask=nmask, other=0.0)
    vs0 = tl.load(vs_ptr + slot * vs_s + hk * vs_h, mask=nmask, other=0.0)
    # ---- scores of the whole GQA group against the tile, one tl.dot per slice
    c0, c1, c2, c3 = _slice_centroids(krow, nmask, kb, kcent_ptr, K_ASM, K_D, K_LO, K_M0W, K_M1W, K_M1OFF,
                                      K_M1SH, K_NOUT, K_OSTRIDE, K_X0W, K_X0OFF, K_X0SH, K_X1W, K_X1OFF, K_X1SH,
                                      K_POLY, K_I8)
    if K_I8:  # q0, q1: the query's int8 high parts; q2, q3: its low parts (/ 128)
        si = tl.dot(q0, tl.trans(c0), out_dtype=tl.int32)
        si = tl.dot(q1, tl.trans(c1), si, out_dtype=tl.int32) * 128
        si = tl.dot(q2, tl.trans(c0), si, out_dtype=tl.int32)
        si = tl.dot(q3, tl.trans(c1), si, out_dtype=tl.int32)
        s = si.to(tl.float32) * q_row_scale[:, None] * ks0.to(tl.float32)[None, :]
    else:
        s = tl.dot(q0, tl.trans(c0))
        s = tl.dot(q1, tl.trans(c1), s)
        if KS == 4:
            s = tl.dot(q2, tl.trans(c2), s)
            s = tl.dot(q3, tl.trans(c3), s)
        s = s * ks0.to(tl.float32)[None, :]
    if K_QJLOFF >= 0 and QJL_TILE:  # sk0: the whole sketch rows; the signs as one tile
        s += tl.dot(sk0, tl.trans(qjl_signs(krow, nmask, K_QJLOFF, K_D))) * \
            tl.load(ksrow + 1, mask=nmask, other=0.0).to(tl.float32)[None, :]
    elif K_QJLOFF >= 0:
        s1 = _qjl_slice_score(sk0, krow, nmask, 0, KS, K_D, K_QJLOFF)
        s1 += _qjl_slice_score(sk1, krow, nmask, 1, KS, K_D, K_QJLOFF)
        if KS == 4:
            s1 += _qjl_slice_score(sk2, krow, nmask, 2, KS, K_D, K_QJLOFF)
            s1 += _qjl_slice_score(sk3, krow, nmask, 3, KS, K_D, K_QJLOFF)
        s += s1 * tl.load(ksrow + 1, mask=nmask, other=0.0).to(tl.float32)[None, :]
    p, alpha, m_i, l_i = online_softmax_step(s, nmask, m_i, l_i, logit_cap, USE_CAP)
    # ---- p * |v| against every V slice, accumulated per slice in V's rotated domain
    if V_POLY:
        pv = (p * vs0.to(tl.float32)[None, :]).to(tl.float16)
    else:
        pv = (p * vs0.to(tl.float32)[None, :]).to(tl.bfloat16)
    if V_PAIRS:
        e0, e1, e2, e3 = _pair_centroids(vb, vcent_ptr, V_ASM)
    else:
        e0, e1, e2, e3 = _slice_centroids(vrow, nmask, vb, vcent_ptr, V_ASM, V_D, V_LO, V_M0W, V_M1W, V_M1OFF,
                                          V_M1SH, V_NOUT, V_OSTRIDE, V_X0W, V_X0OFF, V_X0SH, V_X1W, V_X1OFF,
                                          V_X1SH, V_POLY)
    a0 = tl.dot(pv, e0, a0 * alpha[:, None])
    a1 = tl.dot(pv, e1, a1 * alpha[:, None])
    if VS == 4:
        a2 = tl.dot(pv, e2, a2 * alpha[:, None])
        a3 = tl.dot(pv, e3, a3 * alpha[:, None])
    return m_i, l_i, a0, a1, a2, a3


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage1_sliced(qr_ptr, qr_b, qr_h, q_scale, k_i8_scale, logit_cap,
                          kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h,
                          kcent_ptr, vcent_ptr, kv_indptr, kv_indices, num_splits,
                          po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, plen_ptr, HAS_PLEN: tl.constexpr,
                          rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, wbase_ptr, WSIZE: tl.constexpr, BLOCK_W: tl.constexpr,
                          cnt_ptr, mv_ptr, out_ptr, out_b, out_h, qx_ptr, qx_b, qx_h, rot_ptr,
                          G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr,
                          K_ASM: tl.constexpr, V_ASM: tl.constexpr, K_POLY: tl.constexpr, V_POLY: tl.constexpr,
                          K_I8: tl.constexpr, V_PAIRS: tl.constexpr, QJL_TILE: tl.constexpr, WIDE: tl.constexpr,
                          FUSED_MERGE: tl.constexpr, FENCE: tl.constexpr, BLOCK_DO: tl.constexpr,
                          MV_SCALE: tl.constexpr, PDL: tl.constexpr, ROT_Q: tl.constexpr, ROT_SCALE: tl.constexpr,
                          K_D: tl.constexpr, K_LO: tl.constexpr, K_M0W: tl.constexpr, K_M0OFF: tl.constexpr,
                          K_M1W: tl.constexpr, K_M1OFF: tl.constexpr, K_M1SH: tl.constexpr, K_QJLOFF: tl.constexpr,
                          K_NOUT: tl.constexpr, K_OSTRIDE: tl.constexpr, K_X0W: tl.constexpr, K_X0OFF: tl.constexpr,
                          K_X0SH: tl.constexpr, K_X1W: tl.constexpr, K_X1OFF: tl.constexpr, K_X1SH: tl.constexpr,
                          V_D: tl.constexpr, V_LO: tl.constexpr, V_M0W: tl.constexpr, V_M0OFF: tl.constexpr,
                          V_M1W: tl.constexpr, V_M1OFF: tl.constexpr, V_M1SH: tl.constexpr, V_QJLOFF: tl.constexpr,
                          V_NOUT: tl.constexpr, V_OSTRIDE: tl.constexpr, V_X0W: tl.constexpr, V_X0OFF: tl.constexpr,
                          V_X0SH: tl.constexpr, V_X1W: tl.constexpr, V_X1OFF: tl.constexpr, V_X1SH: tl.constexpr):
    """Stage 1 without tl.interleave, for formats whose first code field is 4 or 2 bits wide (K4, K3,
    K2, PROD keys, outlier splits over those). Every code position of a first-field byte is its own
    slice (coordinates T, T + S, ...: S = 8 / W slices of D / S columns), scored against the matching
    query columns and accumulated into its own V accumulator, so no tile is ever re-ordered.
    K_ASM / V_ASM (register_lut_asm): centroids of a whole byte by PTX byte permutes instead of a
    memory gather per code ("": gathers). K_POLY / V_POLY: K_ASM / V_ASM compute 4-bit centroids as a
    polynomial in f16 (`register_poly_asm`; gathers from an f16 table in the interpreter), and that
    role's MMA runs in f16 (its query slices, or p * |v|, are cast to f16). FUSED_MERGE: no stage 2; the last split of each (sequence,
    KV head) to finish, found with an atomic counter in cnt_ptr, merges all of them and writes out_ptr (FENCE: a gpu-scope fence by every thread
    first, so the other programs see its partials; the interpreter runs programs one by one).
    ROT_Q (int8 keys): the packed splits rotate their query rows themselves from qx_ptr (q as the model
    gives it; rot_ptr: M_k^T's int8 signs, ROT_SCALE their magnitude; `_rotate_rows`, the arithmetic of
    compress's own query rotation). They read only codes that earlier steps wrote, so under PDL they do
    not wait for this step's compress, except a split that reaches the sequence's last position (a
    sequence without a ring row reads the new token's codes). The ring split still reads qr_ptr.
    V_PAIRS: V's 4-bit codes as 16-bit elements, four slices (`sliced_tile_update`)."""
    KS: tl.constexpr = 8 // K_M0W
    VS: tl.constexpr = 4 if V_PAIRS else 8 // V_M0W
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sid = tl.program_id(2)
    if PDL:  # launched as a programmatic dependent of compress: stage 2 may launch now too; wait for
        # compress's writes (the rotated query, the new token's ring row and codes) before reading them
        gdc_launch_dependents()
    if WSIZE > 0:
        if sid == num_splits:  # the recent window's ring (`_ring_split`)
            if PDL:
                gdc_wait()
            _ring_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, plen_ptr, wbase_ptr,
                        rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h,
                        G, BLOCK_G, USE_CAP, WSIZE, BLOCK_W, K_D, V_D)
            if FUSED_MERGE:  # one of the parts the last finisher merges (the ring's partial as the tail)
                g = tl.arange(0, BLOCK_G)
                _fused_merge_if_last(b, hk, hk * G + g, g < G, cnt_ptr, kv_indptr, plen_ptr, HAS_PLEN, num_splits,
                                     po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, mv_ptr, out_ptr, out_b, out_h,
                                     FENCE, BLOCK_N, BLOCK_G, V_D, BLOCK_DO, MV_SCALE, True)
            return
    seq_start, lo, hi = _split_range(kv_indptr, b, sid, num_splits, BLOCK_N, plen_ptr, HAS_PLEN)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    if lo >= hi:  # an empty split: the merge never reads its partials
        if FUSED_MERGE and WSIZE == 0 and sid == 0:  # an empty sequence: nobody merges, its output is zeros
            # (with a window the ring's program always takes part and merges)
            orow = out_ptr + b * out_b + heads * out_h
            dv = tl.arange(0, V_D)
            tl.store(orow[:, None] + dv[None, :], tl.zeros((BLOCK_G, V_D), tl.float32).to(orow.dtype.element_ty),
                     mask=gmask[:, None])
        return
    if PDL:
        if ROT_Q:  # this step's compress wrote only the query rotation (done here) and the last position
            if hi >= tl.load(kv_indptr + b + 1) - seq_start:
                gdc_wait()
        else:
            gdc_wait()
    qrow = qr_ptr + b * qr_b + heads * qr_h
    if K_I8:  # int8 scores (4-bit one-field keys): the query as int8 slices and a scale per row
        if ROT_Q:  # rotated here, with compress's arithmetic
            u = _rotate_rows(qx_ptr + b * qx_b + heads * qx_h, gmask, qx_ptr, False, rot_ptr, ROT_SCALE, BLOCK_G, K_D)
            q0, q1, q2, q3, q_row_scale = _slices_i8(u * q_scale, K_D)
        else:
            q0, q1, q2, q3, q_row_scale = query_slices_i8(qrow, gmask, q_scale, K_D)
        q_row_scale = q_row_scale * (k_i8_scale / 128.0)
        sk0 = q0
        sk1 = q0
        sk2 = q0
        sk3 = q0
    else:
        q0, q1, q2, q3, sk0, sk1, sk2, sk3 = query_slices(qrow, gmask, q_scale, KS, K_D, K_QJLOFF, K_POLY, QJL_TILE)
        q_row_scale = tl.full((BLOCK_G,), 1.0, tl.float32)
    vb_cols = tl.arange(0, V_D // VS)
    tok = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    a0 = tl.zeros((BLOCK_G, V_D // VS), tl.float32)
    a1 = tl.zeros((BLOCK_G, V_D // VS), tl.float32)
    a2 = tl.zeros((BLOCK_G, V_D // VS), tl.float32)
    a3 = tl.zeros((BLOCK_G, V_D // VS), tl.float32)

    # Plain loop: Triton's software pipeliner (num_stages) issues the slot loads and the first-field
    # byte tiles (cp.async into shared memory) of later tiles while this one is computed, and loads
    # the bytes straight into the MMA operand layout, so only uint8 tiles cross shared memory.
    for n0 in range(lo, hi, BLOCK_N):
        nmask = n0 + tok < hi
        slot = tl.load(kv_indices + seq_start + n0 + tok, mask=nmask, other=0)
        slot = slot.to(tl.int64) if WIDE else slot.to(tl.int32)  # 32-bit offset math where the buffers allow
        m_i, l_i, a0, a1, a2, a3 = sliced_tile_update(
            q0, q1, q2, q3, sk0, sk1, sk2, sk3, q_row_scale, m_i, l_i, a0, a1, a2, a3, slot, nmask, hk, logit_cap,
            kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h,
            kcent_ptr, vcent_ptr, USE_CAP, K_ASM, V_ASM, K_POLY, V_POLY, K_I8, V_PAIRS, QJL_TILE,
            K_D, K_LO, K_M0W, K_M0OFF, K_M1W, K_M1OFF, K_M1SH, K_QJLOFF, K_NOUT, K_OSTRIDE,
            K_X0W, K_X0OFF, K_X0SH, K_X1W, K_X1OFF, K_X1SH,
            V_D, V_LO, V_M0W, V_M0OFF, V_M1W, V_M1OFF, V_M1SH, V_NOUT, V_OSTRIDE,
            V_X0W, V_X0OFF, V_X0SH, V_X1W, V_X1OFF, V_X1SH)

    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    po = (po_ptr + b * po_b + heads * po_h + sid * po_s)[:, None] + vb_cols[None, :] * VS
    tl.store(po, a0 * inv[:, None], mask=gmask[:, None])
    tl.store(po + 1, a1 * inv[:, None], mask=gmask[:, None])
    if VS == 4:
        tl.store(po + 2, a2 * inv[:, None], mask=gmask[:, None])
        tl.store(po + 3, a3 * inv[:, None], mask=gmask[:, None])
    tl.store(pl_ptr + b * pl_b + heads * pl_h + sid, lse, mask=gmask)
    if FUSED_MERGE:
        _fused_merge_if_last(b, hk, heads, gmask, cnt_ptr, kv_indptr, plen_ptr, HAS_PLEN, num_splits,
                             po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, mv_ptr, out_ptr, out_b, out_h,
                             FENCE, BLOCK_N, BLOCK_G, V_D, BLOCK_DO, MV_SCALE, WSIZE > 0)


@triton.jit
def _fused_merge_if_last(b, hk, heads, gmask, cnt_ptr, kv_indptr, plen_ptr, HAS_PLEN: tl.constexpr, num_splits,
                         po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, mv_ptr, out_ptr, out_b, out_h,
                         FENCE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, V_D: tl.constexpr,
                         BLOCK_DO: tl.constexpr, MV_SCALE: tl.constexpr, HAS_RING: tl.constexpr):
    """Fused merge: count this program's partial as stored; the last of the (sequence, KV head)'s parts
    (its non-empty packed splits, and the ring's program with a window) merges them all and writes the
    output. FENCE: a gpu-scope fence by every thread first, so the other programs see its partials."""
    if FENCE:  # every thread's partial stores reach the gpu scope before the count says so
        tl.inline_asm_elementwise("fence.acq_rel.gpu;\nmov.u32 $0, $1;", "=r,r", [gmask.to(tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)
    tl.debug_barrier()
    cnt = cnt_ptr + b * tl.num_programs(1) + hk
    used = _used_splits(_packed_len(kv_indptr, b, plen_ptr, HAS_PLEN), num_splits, BLOCK_N)
    parts = used + 1 if HAS_RING else used
    if tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu") == parts - 1:  # the last part to finish
        tl.atomic_xchg(cnt, 0, sem="relaxed", scope="gpu")  # ready for the next call (graph replays)
        _merge_splits(po_ptr + b * po_b + heads * po_h, po_s, pl_ptr + b * pl_b + heads * pl_h, used, gmask,
                      mv_ptr, out_ptr + b * out_b + heads * out_h, BLOCK_G, V_D, BLOCK_DO, ".cg", MV_SCALE,
                      num_splits, HAS_RING)


@triton.jit
def _used_splits(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """How many splits of a sequence hold tokens (stage 1's partition, `_split_range`)."""
    return tl.cdiv(seq_len, tl.maximum(_split_len(seq_len, num_splits, BLOCK_N), 1))


@triton.jit
def merge_weights(m, lse):
    """Log-sum-exp merge of a part with lse (log2 units) into a running max m: the new max, the weight
    of what was summed so far (alpha) and the part's weight (beta); -inf on both sides gives weights 0."""
    m_new = tl.maximum(m, lse)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return m_new, tl.exp2(m - m_use), tl.exp2(lse - m_use)


@triton.jit
def _merge_step(m, l, acc, lse, o):
    """Fold one normalized partial (o, lse in log2 units) into the running (max, sum, acc)."""
    m_new, alpha, beta = merge_weights(m, lse)
    return m_new, l * alpha + beta, acc * alpha[:, None] + beta[:, None] * o


@triton.jit
def _merge_splits(po, po_s, pl, used, gmask, mv_ptr, out_rows, BLOCK_G: tl.constexpr, V_D: tl.constexpr,
                  BLOCK_DO: tl.constexpr, CACHE: tl.constexpr, MV_SCALE: tl.constexpr,
                  tail_sid, HAS_TAIL: tl.constexpr):
    """LSE-merge of the first `used` split partials of a GQA group's rows (po, pl: row pointers), and of
    partial `tail_sid` (HAS_TAIL: the recent window's), then one un-rotation into out_rows. CACHE: the
    loads' cache modifier (".cg": past L1, for partials other programs of the same launch wrote; ""
    otherwise)."""
    acc = _merge_acc(po, po_s, pl, used, gmask, BLOCK_G, V_D, CACHE, tail_sid, HAS_TAIL)
    unrotate_store(acc, mv_ptr, out_rows, gmask, V_D, BLOCK_DO, MV_SCALE)


@triton.jit
def _merge_acc(po, po_s, pl, used, gmask, BLOCK_G: tl.constexpr, V_D: tl.constexpr, CACHE: tl.constexpr,
               tail_sid, HAS_TAIL: tl.constexpr):
    """The merge of `_merge_splits`: the normalized output rows [BLOCK_G, V_D], still rotated."""
    dv = tl.arange(0, V_D)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, V_D), tl.float32)
    if HAS_TAIL:  # loaded first: its latency overlaps the loop's
        tail_lse = tl.load(pl + tail_sid, mask=gmask, other=float("-inf"), cache_modifier=CACHE)
        tail_o = tl.load(po[:, None] + tail_sid * po_s + dv[None, :], mask=gmask[:, None], other=0.0,
                         cache_modifier=CACHE)
    for sid in range(0, used):
        lse = tl.load(pl + sid, mask=gmask, other=float("-inf"), cache_modifier=CACHE)
        o = tl.load(po[:, None] + sid * po_s + dv[None, :], mask=gmask[:, None], other=0.0, cache_modifier=CACHE)
        m, l, acc = _merge_step(m, l, acc, lse, o)
    if HAS_TAIL:
        m, l, acc = _merge_step(m, l, acc, tail_lse, tail_o)
    return acc / tl.where(l > 0, l, 1.0)[:, None]


@triton.jit
def _window_partial(qrow, gmask, q_scale, logit_cap, hk, rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, lo, seq_len, base,
                    USE_CAP: tl.constexpr, WSIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr,
                    K_D: tl.constexpr, V_D: tl.constexpr):
    """Attention of a GQA group's rotated queries over positions [lo, seq_len) (at most WSIZE) of the
    recent window's ring (exact bf16 K/V in the codes' rotated domain; position p at row base + p % WSIZE).
    Returns the normalized partial and its lse (log2 units), -inf when the range is empty."""
    p = lo + tl.arange(0, BLOCK_W)
    pmask = p < seq_len
    row = (base + p % WSIZE).to(tl.int64)
    dk = tl.arange(0, K_D)
    dv = tl.arange(0, V_D)
    q = (tl.load(qrow[:, None] + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)
    k = tl.load(rk_ptr + row[:, None] * rk_t + hk * rk_h + dk[None, :], mask=pmask[:, None], other=0.0)
    s = softcap_log2(tl.dot(q, tl.trans(k)), logit_cap, USE_CAP)
    s = tl.where(pmask[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    pr = tl.exp2(s - m_use[:, None])
    l = tl.sum(pr, axis=1)
    v = tl.load(rv_ptr + row[:, None] * rv_t + hk * rv_h + dv[None, :], mask=pmask[:, None], other=0.0)
    o = tl.dot(pr.to(tl.bfloat16), v) / tl.where(l > 0, l, 1.0)[:, None]
    return o, tl.where(l > 0, m_use + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))


@triton.jit
def _ring_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, wlo_ptr, wbase_ptr,
                rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h,
                G: tl.constexpr, BLOCK_G: tl.constexpr, USE_CAP: tl.constexpr, WSIZE: tl.constexpr,
                BLOCK_W: tl.constexpr, K_D: tl.constexpr, V_D: tl.constexpr):
    """Stage 1's extra program per (sequence, KV head) with a recent window: the ring's partial over
    positions [lo, L), stored as split `sid` (= num_splits) for stage 2 to merge like any other. It
    runs beside the packed splits; scored inside stage 2 it put dependent loads in front of the merge."""
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    seq_len = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    lo = tl.maximum(tl.minimum(tl.load(wlo_ptr + b), seq_len), 0)
    o, lse = _window_partial(qr_ptr + b * qr_b + heads * qr_h, gmask, q_scale, logit_cap, hk,
                             rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, lo, seq_len, tl.load(wbase_ptr + b),
                             USE_CAP, WSIZE, BLOCK_W, BLOCK_G, K_D, V_D)
    dv = tl.arange(0, V_D)
    po = po_ptr + b * po_b + heads * po_h + sid * po_s
    tl.store(po[:, None] + dv[None, :], o, mask=gmask[:, None])
    tl.store(pl_ptr + b * pl_b + heads * pl_h + sid, lse, mask=gmask)


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage2(po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h, num_splits, mv_ptr, out_ptr, out_b, out_h,
                   kv_indptr, wlo_ptr, G: tl.constexpr, BLOCK_G: tl.constexpr, V_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr, BLOCK_N: tl.constexpr, MV_SCALE: tl.constexpr, HAS_RING: tl.constexpr,
                   PRELOAD_M: tl.constexpr, PDL: tl.constexpr):
    """LSE-merge of the splits that hold tokens (stage 1's partition: the split count is static for
    CUDA graphs and sized for the longest context, so short sequences leave most splits empty) and,
    with a recent window (HAS_RING), of the ring's partial that stage 1 stored as split num_splits;
    then one un-rotation. PRELOAD_M (MV_SCALE > 0): mv_ptr holds M_v's signs in bf16, loaded whole
    before the merge so its latency overlaps the merge's, and used as the MMA operand as loaded (the
    default loads int8 signs in BLOCK_DO-column chunks after the merge, one round trip per chunk,
    and widens them through shared memory)."""
    b = tl.program_id(0)
    hk = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    if PRELOAD_M:
        dv = tl.arange(0, V_D)
        mvt = tl.load(mv_ptr + dv[:, None] * V_D + dv[None, :])
    used = _used_splits(_packed_len(kv_indptr, b, wlo_ptr, HAS_RING), num_splits, BLOCK_N)
    if PDL:  # a programmatic dependent of stage 1: M_v and the split count above did not need it
        gdc_wait()
    po = po_ptr + b * po_b + heads * po_h
    pl = pl_ptr + b * pl_b + heads * pl_h
    out_rows = out_ptr + b * out_b + heads * out_h
    if PRELOAD_M:
        acc = _merge_acc(po, po_s, pl, used, gmask, BLOCK_G, V_D, "", num_splits, HAS_RING)
        hi = acc.to(tl.bfloat16)
        lo = (acc - hi.to(tl.float32)).to(tl.bfloat16)
        o = tl.dot(lo, mvt, tl.dot(hi, mvt)) * MV_SCALE
        tl.store(out_rows[:, None] + dv[None, :], o.to(out_rows.dtype.element_ty), mask=gmask[:, None])
    else:
        _merge_splits(po, po_s, pl, used, gmask, mv_ptr, out_rows, BLOCK_G, V_D, BLOCK_DO, "", MV_SCALE,
                      num_splits, HAS_RING)


def sliced_ok(fmt) -> bool:
    """Formats the sliced stage 1 handles: the first code field 4 or 2 bits wide (so at most 4 slices)
    and slices of at least 16 columns (tl.dot's minimum K)."""
    w = fmt.fields[0][1]
    return w in (2, 4) and fmt.head_dim * w // 8 >= 16


def _bad_sliced_keys(kf, kt) -> bool:
    """3-bit keys (the two-field "split" LUT) with 16-column slices (head_dim 64): the sliced stage 1 gave
    wrong results on an H100 and an H200 (Triton 3.6; every V width, 2026-11-28) while the interpreter,
    which gathers instead of running the PTX LUT, was right; head_dim 128 and 3-bit values pass. Such
    layers take the general stage 1."""
    return kt["register_lut_kind"] == "split" and kf.head_dim * kf.fields[0][1] // 8 <= 16


def _ring_args(window, dummy) -> tuple:
    """Stage 1's ring arguments: k and its two strides, v and its two strides, base, WSIZE, BLOCK_W."""
    if window is None:
        return (dummy, 0, 0, dummy, 0, 0, dummy, 0, 16)
    wk, wv = window.k, window.v
    return (wk, wk.stride(0), wk.stride(1), wv, wv.stride(0), wv.stride(1), window.base, int(window.size),
            max(16, next_pow2(int(window.size))))


def _launch_stage1(qr, q_scale, use_cap, logit_cap, k_codes, k_scales, v_codes, v_scales, kt, vt, k_lut, v_lut,
                   kv_indptr, kv_indices, num_splits, po, pl, B, h_kv, G, BLOCK_G, block_n, kf, vf,
                   num_warps, num_stages, plen=None, ring=None):
    """The general stage 1 (every format): codes put back in coordinate order, one tl.dot per tile.
    ring (a DecodeWindow): one more program per (sequence, KV head) scores the window's ring."""
    _decode_stage1[(B, h_kv, num_splits + (ring is not None))](
        qr, qr.stride(0), qr.stride(1), q_scale, float(logit_cap) if use_cap else 1.0,
        k_codes, k_codes.stride(0), k_codes.stride(1), k_scales, k_scales.stride(0), k_scales.stride(1),
        v_codes, v_codes.stride(0), v_codes.stride(1), v_scales, v_scales.stride(0), v_scales.stride(1),
        kt["centroids_bf16"], vt["centroids_bf16"],
        kt["lut"] if k_lut else kt["centroids_bf16"], vt["lut"] if v_lut else vt["centroids_bf16"],
        kv_indptr, kv_indices, num_splits,
        po, po.stride(0), po.stride(1), po.stride(2), pl, pl.stride(0), pl.stride(1),
        plen if plen is not None else kv_indptr, plen is not None, *_ring_args(ring, qr),
        G=G, BLOCK_G=BLOCK_G, BLOCK_N=block_n, USE_CAP=use_cap, K_LUT=k_lut, V_LUT=v_lut,
        **fmt_constexprs(kf, "K_"), **fmt_constexprs(vf, "V_"),
        num_warps=num_warps, num_stages=num_stages,
    )


@dataclass
class DecodeWorkspace:
    """Preallocated scratch of decode_attention (allocate once, outside any CUDA graph):
    part_out [max_batch, H_q, max_splits, d_v] fp32, part_lse [max_batch, H_q, max_splits] fp32,
    split_counts int32 [max_batch * H_q] (zeros; fused_merge counts finished splits per (sequence, KV
    head) there and the merging program sets its count back to 0, so replays start from zeros again),
    and q_rot [max_batch, H_q, d_k] fp32 (the rotated queries: compress_and_store(q=, q_rot=) writes
    them, decode_attention(q_rotated=) reads them)."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    split_counts: torch.Tensor
    q_rot: torch.Tensor

    @classmethod
    def create(cls, max_batch: int, num_q_heads: int, head_dim_v: int, max_splits: int = 64,
               device="cuda", head_dim_k: Optional[int] = None) -> "DecodeWorkspace":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.empty(max_batch, num_q_heads, max_splits, head_dim_v, **f32),
                   torch.empty(max_batch, num_q_heads, max_splits, **f32),
                   torch.zeros(max_batch * num_q_heads, dtype=torch.int32, device=device),
                   torch.empty(max_batch, num_q_heads, head_dim_k or head_dim_v, **f32))

    @property
    def max_batch(self) -> int:
        return self.part_out.shape[0]

    @property
    def max_splits(self) -> int:
        return self.part_out.shape[2]


_SM_COUNT = {}


def num_sms(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    key = device.index if device.index is not None else torch.cuda.current_device()
    if key not in _SM_COUNT:
        _SM_COUNT[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return _SM_COUNT[key]


def choose_num_splits(batch: int, num_kv_heads: int, max_seq_len_hint: int, num_sms: int,
                      max_splits: int = 64) -> int:
    """Split-K count per sequence (a Python int: static grid): ~8 programs per (sequence, KV head),
    at least 2 and at most 16 per SM, splits of at least 128 tokens (256 once the pairs alone fill the
    SMs). From an H100 sweep (scripts/bench_kernels.py --sweep, K4V4, hd 128, 2026-11-28, fourth
    session): B=1, 1K: 8 splits 12.5 us against 14.4 us with 4; B=1, 32K: 32 splits 47.5 us against
    56.1 us with 64; B=32, 1K: 4 splits 43.6 us against 49.5 us with 8; B=32, 32K: 872 us with 9
    splits, 891 us with 4."""
    work = max(1, batch * num_kv_heads)
    programs = max(2 * num_sms, min(16 * num_sms, 8 * work))
    min_tokens = 128 if work < num_sms else 256
    s = min(triton.cdiv(programs, work), triton.cdiv(max(1, max_seq_len_hint), min_tokens), max_splits)
    return max(1, int(s))


# Scores against 4-bit one-field keys on int8 tensor cores (`register_lut_i8_asm`, `query_slices_i8`)
# where decode_attention(key_int8=None). H200 sweep (2026-11-28, seventh session, K4V4, (32, 8, 128)):
# B=32, 32K 733 us with 4 warps and a 168-register cap against 854 us for bf16 key centroids; B=1, 32K
# 41.6 against 48.6 us; B=32, 1K 35.8 (1 split) / 38.8 (4) against 41.8 us; B=1, 1K 12.3 against 11.9 us.
KEY_INT8 = True
# Register cap of that stage 1 at 4 warps: 168 keeps three 128-thread programs on an SM (186 without
# the cap, two programs: 817 us at B=32, 32K); compiled for sm_90 without spills.
KEY_INT8_MAX_REGISTERS = 168


# Stage 2 with M_v's bf16 signs loaded before the merge (PRELOAD_M): the sm_90 build of K4V4's stage 2
# goes from 1,352 to 632 instructions and its matrix loads move ahead of the merge loop (16 LDG.128
# issued first, 103 registers, no spills). On: one H200 (ninth session, scripts/bench_layer_step.py,
# 32 layers in one graph, K4V4 (32, 8, 128)) stage 2 went from 5.4 to 4.7 us at B=1, 1K and the layer
# step from 17.1 to 16.4 us (B=8: 25.2 -> 24.4; B=64, 16K: 746.4 -> 745.7).
MERGE_PRELOAD = True

# Packed splits of stage 1 rotate their own query rows (decode_attention(rotate_q=)), so under PDL they
# need not wait for the step's compress. Prepared (interpreter tests, sm_90 compile), not timed: off.
ROTATE_Q_IN_STAGE1 = False


# V's 4-bit codes load as 16-bit elements (`sliced_tile_update`'s V_PAIRS): the PV operand then comes
# from shared memory in 16-bit matrix loads instead of one load per byte, and the LUT needs 19 instead of
# 30 instructions per 8 codes. With int8 keys and a 128-register cap (`KEY_INT8_PAIRS_MAX_REGISTERS`: four
# programs per SM, no spills) one H200 (thirteenth session, K4V4 (32, 8, 128), one call) ran B=32, 32K in
# 606.0 against 736.5 us (bytes, the old default), B=8, 32K 164.4 against 219.0, B=32, 1K 30.9 against
# 36.9, B=128, 1K 100.9 against 122.0, B=1, 1K 9.6 against 10.1; the 223 GPU decode / window / extend
# tests passed with it on. Without the cap (150 registers, three programs) it was not faster (756.6 us).
V_PAIRS = True
# Register cap of the int8-key stage 1 with V pairs at 4 warps and head_dim <= 128 (see above); bytes keep
# `KEY_INT8_MAX_REGISTERS` (with 128 they spilled: 772.5 us), and so does head_dim 256, which spills at
# either cap (sm_90: 200 spill instructions per tile at 128, 84 at 168; 189 for bytes at 168).
KEY_INT8_PAIRS_MAX_REGISTERS = 128


# Register cap of the sliced stage 1 when K and V both have 3-bit codes (the "split" LUTs; BLOCK_N 64,
# 4 warps, head_dim <= 128): 96 fits five programs on an SM instead of four (112 registers uncapped; 2
# spill instructions per tile at 96, sm_90). One H200 (thirteenth session, K3V3 (32, 8, 128)): B=32, 32K
# 1334.8 against 1377.6 us, B=1, 32K 70.8 against 74.8, B=1, 1K 12.4 against 12.8, B=32, 1K 53.2 / 52.9.
SPLIT_MAX_REGISTERS = 96


# PROD keys' QJL signs in the sliced stage 1: one [BLOCK_N, D / 8] byte tile per tile, unpacked into
# coordinate order and scored in one MMA against the whole sketch rows (`_common.qjl_signs`, as extend
# does), instead of one byte gather per coordinate and slice. Before it, PROD-K3 at B=32, 32K (32, 8, 128) took 6.59 ms on an
# H200 (thirteenth session), 0.15x FlashInfer BF16.
QJL_SIGN_TILE = True


def _even_rows(codes: torch.Tensor) -> bool:
    """Every (slot, head) row of `codes` starts at an even address: V pairs load it as 16-bit elements
    (the pools allocate contiguous [rows, H_kv, code_bytes] tensors; a view at an odd byte offset keeps
    the byte loads)."""
    return codes.data_ptr() % 2 == 0 and codes.stride(0) % 2 == 0 and codes.stride(1) % 2 == 0


def pairs_fit(d_v: int, num_warps: int) -> bool:
    """V pairs' four slices need d_v / 4 >= 8 columns per warp: at d_v 64 (4 warps) Triton gave every warp
    the whole PV product (4x the MMAs, 520 spill instructions per tile at the 128-register cap, sm_90)."""
    return d_v // 4 >= 8 * num_warps


def choose_max_registers(k_i8: bool, v_pairs: bool, num_warps: int, block_n: int, d_k: int, k_kind: str,
                         v_kind: str) -> Optional[int]:
    """The sliced stage 1's register cap (None: Triton's choice). Int8 keys at 4 warps: 128 with V pairs up
    to head_dim 128 (`KEY_INT8_PAIRS_MAX_REGISTERS`), else 168 (`KEY_INT8_MAX_REGISTERS`); 3-bit K and V
    (both "split" LUTs) at BLOCK_N 64, 4 warps, head_dim <= 128: 96 (`SPLIT_MAX_REGISTERS`)."""
    if k_i8 and num_warps == 4:
        return KEY_INT8_PAIRS_MAX_REGISTERS if v_pairs and d_k <= 128 else KEY_INT8_MAX_REGISTERS
    if block_n == 64 and num_warps == 4 and d_k <= 128 and k_kind == v_kind == "split":
        return SPLIT_MAX_REGISTERS
    return None


def choose_num_warps(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Warps per program of the sliced stage 1 with a one-field LUT (BLOCK_N 128): 8 while the
    (sequence, KV head) pairs alone leave SMs idle (latency-bound: each warp's share of a tile is
    shorter), else 4. H100 sweep (2026-11-28): B=1, 1K, 8 splits 11.8 us with 8 warps against 12.5 us
    with 4; B=1, 32K, 32 splits 48.3 against 47.5 us; B=32, 32K: 4 warps best."""
    return 8 if batch * num_kv_heads < num_sms else 4


def decode_attention(q, k_codes, k_scales, v_codes, v_scales, kcodec: TQCodec, vcodec: TQCodec,
                     kv_indptr, kv_indices, sm_scale: float, logit_cap: float = 0.0, out=None, *,
                     workspace: Optional[DecodeWorkspace] = None, num_splits: Optional[int] = None,
                     block_n: Optional[int] = None, num_warps: Optional[int] = None, num_stages: int = 2,
                     use_lut: bool = False, warps_for_batch: Optional[int] = None,
                     sliced: Optional[bool] = None, register_lut: bool = True, centroid_poly: bool = False,
                     fused_merge: bool = False,
                     q_rotated: Optional[torch.Tensor] = None, max_registers: Optional[int] = None,
                     max_seq_len_hint: Optional[int] = None, window: Optional[DecodeWindow] = None,
                     key_int8: Optional[bool] = None, merge_preload: Optional[bool] = None,
                     pdl: Optional[bool] = None, rotate_q: Optional[bool] = None,
                     v_pairs: Optional[bool] = None, qjl_tile: Optional[bool] = None):
    """q [B, H_q, d_k] (or [B, H_q * d_k]) -> out [B, H_q, d_v] in q's dtype (written into `out` if
    given, same shape convention). kv_indptr [B + 1], kv_indices: slots of each sequence.
    Stage 1 variants: the general one (`_decode_stage1`: codes put back in coordinate order; every
    format; use_lut: byte LUT instead of per-code gathers, slower on the H100) and the sliced one
    (`_decode_stage1_sliced`, formats with `sliced_ok`) whose register_lut looks 4- and 2-bit codes up
    with PTX byte permutes (the Triton interpreter has no inline asm: it takes per-code gathers).
    sliced=None picks the sliced stage 1 when both K and V have a register LUT (4-/2-bit first fields:
    K4/K2/PROD-K3, V4/V2; 3-bit codes: `register_lut_slices3`; 5-bit: `register_lut_slices5`): on an
    H200 (2026-11-28, scripts/bench_kernels.py --sweep, B=32, ctx 32K, K4V4) it ran in 0.97 ms against
    3.64 ms for the general stage 1; on an H100 (scripts/profile_decode.py) K3V3 took 1.37 ms against
    3.65 ms and K5V4 1.38 ms against 3.39 ms (2026-11-28, fourth session); with per-code gathers it is
    slower than the general one, which formats without a LUT (6-bit codes, outliers) keep.
    block_n=None: 128 for the sliced stage 1 with one-field LUTs, else 64 (fastest in that sweep).
    num_warps=None: `choose_num_warps(warps_for_batch or B, ...)` for that stage 1 at BLOCK_N 128, else 4
    (warps_for_batch=1 keeps the choice of batch size 1 for every batch, as the batch-invariant mode does).
    q_rotated: fp32 [>= B, H_q, d_k] queries already rotated (compress_and_store(q=..., q_rot=...) in
    the same launch as the new K/V: keys without QJL); q then gives only shapes and the output dtype.
    Else q is rotated here by an fp32 matmul (three small launches; rotating q inside stage 1 instead
    cost 10 us per program on an H100: 1.03 against 0.88 ms at B=32, 32K).
    centroid_poly (sliced stage 1, 4-bit single-field K, and V too if it is 4-bit): compute the
    centroids as an f16 polynomial of the code (`register_poly_asm`: 6 integer + 26 f16x2 instructions
    per 8 codes against ~23 integer ones for the lookup, more accurate than the bf16 table) and run that
    role's MMA in f16. Opt-in. H100 (2026-11-28): K4V4 and K4V2 pass the GPU tests, K4V4 at B=32, 32K
    0.861 against 0.889 ms with the LUT; a polynomial V behind 3-bit keys gave wrong results there, so V
    takes the polynomial only together with K.
    max_registers (sliced stage 1): a per-thread register cap (Triton's maxnreg); 128 lets four 4-warp
    programs share an SM instead of three. None, with int8 keys at 4 warps: 128 with v_pairs up to head_dim 128
    (`KEY_INT8_PAIRS_MAX_REGISTERS`, no spills), else 168 (`KEY_INT8_MAX_REGISTERS`); with 3-bit K and V at
    BLOCK_N 64 and 4 warps 96 (`SPLIT_MAX_REGISTERS`); otherwise Triton's choice.
    key_int8 (sliced stage 1, 4-bit one-field keys without outliers or QJL; None: `KEY_INT8`, on): the
    key centroids come from an int8 register LUT (`register_lut_i8_asm`: one register per 4 codes, 13
    instructions per 8 codes against ~30 for the bf16 LUT) and the scores from int8 MMAs against the
    query split into int8 high and low parts (`query_slices_i8`); the table's scale is chosen so its
    rounding error is about a bf16 table's. H200: 733 against 854 us at B=32, 32K (K4V4).
    v_pairs (sliced stage 1, 4-bit one-field V without a polynomial; None: `V_PAIRS`): V's codes load as
    16-bit elements (4 coordinates each) into four V slices instead of bytes into two. The PV MMA's
    operand holds two consecutive tokens per register, so byte tiles came out of shared memory one load
    per byte, 108 per tile (sm_90, K4V4 d128, BLOCK_N 128); 16-bit ones come in matrix loads
    (ldmatrix.trans), and the LUT reads the four codes of each token from its selector nibbles directly
    (`_register_lut_asm_pairs`: 19 instructions per 8 codes against 30). The loop goes from 1,460 to
    1,115 instructions per tile and warp (sm_90, with the 128-register cap and no spills; `V_PAIRS`).
    qjl_tile (PROD keys, sliced stage 1; None: `QJL_SIGN_TILE`): the QJL signs as one byte tile per
    tile, scored in one MMA against the whole sketch rows (`_common.qjl_signs`), instead of per-coordinate
    gathers slice by slice.
    fused_merge (sliced stage 1 only): the last split program of each (sequence, KV head) merges the
    splits and un-rotates, so a call is one launch instead of two. Not faster on an H100 (29.8 against
    27.9 us at B=1, 1K): off by default.
    merge_preload (d_v <= 128; None: `MERGE_PRELOAD`): stage 2 loads M_v's signs whole, in bf16, before
    its merge instead of int8 chunks after it (`_decode_stage2`'s PRELOAD_M).
    pdl (None: `_common.PDL`; sliced stage 1 only, sm_90+): stage 1 and stage 2 launch as programmatic
    dependents of the kernel before them, so they get on the SMs and run their prologue while it
    finishes, then wait for its writes (`gdc_wait`). Pair it with compress_and_store(pdl_trigger=True).
    rotate_q (None: `ROTATE_Q_IN_STAGE1`, off; int8 keys, bf16/fp16 q): the packed splits rotate their
    query rows themselves instead of reading q_rotated, so with PDL and a window they do not wait for the
    step's compress (`_decode_stage1_sliced`'s ROT_Q). Prepared for small batches (B=1, 1K is three
    dependent launches); not timed: an earlier in-stage-1 rotation (above, under q_rotated) cost 10 us
    per program at B=32, 32K on an H100.
    window (`tq_kernels.window.DecodeWindow`): positions [window.lo[b], L_b) of each sequence come from the
    recent window's ring (exact bf16, rotated) instead of the codes; one more stage-1 program per
    (sequence, KV head) scores them and stores its partial after the splits' (the workspace needs
    num_splits + 1 of them), and stage 2 merges it with the others (with fused_merge the last of all
    these programs to finish does, the ring's partial included)."""
    kf, vf = kcodec.fmt, vcodec.fmt
    if vf.qjl:
        raise NotImplementedError("PROD (QJL) format for V is not supported by the Triton decode kernel")
    d_k, d_v = kf.head_dim, vf.head_dim
    B = q.shape[0]
    q3 = q.reshape(B, -1, d_k)
    h_q, h_kv = q3.shape[1], k_codes.shape[1]
    assert h_q % h_kv == 0, (h_q, h_kv)
    G = h_q // h_kv
    dev = q.device
    if out is None:
        out = torch.empty(B, h_q, d_v, dtype=q.dtype, device=dev)
    out3 = out.view(B, h_q, d_v)
    assert out3.stride(2) == 1
    ring_parts = int(window is not None)  # the window's ring is one more partial, after the splits
    if num_splits is None:
        hint = max_seq_len_hint if max_seq_len_hint is not None else kv_indices.numel()
        num_splits = choose_num_splits(B, h_kv, hint, num_sms(dev),
                                       max_splits=(workspace.max_splits if workspace is not None else 64) - ring_parts)
    if workspace is None:
        workspace = DecodeWorkspace.create(B, h_q, d_v, num_splits + ring_parts, dev)
    assert workspace.max_batch >= B
    assert workspace.max_splits >= num_splits + ring_parts, (
        f"workspace has room for {workspace.max_splits} partials; {num_splits} splits"
        + (" + the window's ring" if ring_parts else "") + " need more")
    assert workspace.part_out.shape[1] == h_q and workspace.part_out.shape[3] == d_v
    if B == 0:
        return out

    kt, vt = kernel_tables(kcodec, dev), kernel_tables(vcodec, dev)
    single = kt["register_lut_kind"] == "single" and vt["register_lut_kind"] == "single"
    if sliced is None:  # per-code gathers lose to the general stage 1: sliced only with register LUTs
        # that have passed the GPU tests (the 5-bit one, "split5", runs with sliced=True only)
        sliced = bool(register_lut and {kt["register_lut_kind"], vt["register_lut_kind"]} <= {"single", "split",
                                                                                              "split5"})
    sliced = bool(sliced and sliced_ok(kf) and sliced_ok(vf) and not _bad_sliced_keys(kf, kt))
    if block_n is None:  # 128 measured best for the one-field LUT; the 3-bit one compiles worse at 128
        block_n = 128 if sliced and single else 64
    k_i8 = bool(sliced and (KEY_INT8 if key_int8 is None else key_int8) and kt["has_i8"])
    if num_warps is None:  # int8 keys: 4 warps at every batch (8 lost at B=1, 32K: 47.4 against 41.6 us)
        num_warps = (choose_num_warps(warps_for_batch or B, h_kv, num_sms(dev))
                     if sliced and single and block_n == 128 and not k_i8 else 4)
    if block_n < 32:  # 16-wide tiles gave wrong results on an H100 (Triton 3.6); the interpreter was right
        raise ValueError(f"block_n must be >= 32 (got {block_n})")
    use_cap = bool(logit_cap and logit_cap > 0)
    k_lut = lut_width(kf) if use_lut else 0
    v_lut = lut_width(vf) if use_lut else 0
    q_scale = float(sm_scale) * (1.0 if use_cap else LOG2E)
    BLOCK_G = max(16, next_pow2(G))
    po, pl = workspace.part_out, workspace.part_lse
    merge_in_stage1 = bool(sliced and fused_merge)
    plen = None  # with a window, stage 1 reads only each sequence's first window.lo[b] tokens
    if window is not None:
        check_decode_window(window, B, h_kv, d_k, d_v)
        plen = window.lo
    k_poly = bool(sliced and centroid_poly and kt["has_poly"] and not k_i8)
    # a polynomial V behind 4-bit keys only (3-bit keys with a polynomial V gave wrong results on an H100)
    v_poly = bool((k_poly or (k_i8 and centroid_poly)) and vt["has_poly"])
    v_pairs = bool(sliced and (V_PAIRS if v_pairs is None else v_pairs) and vt["has_pairs"] and not v_poly
                   and pairs_fit(d_v, num_warps) and _even_rows(v_codes))
    if max_registers is None and sliced:
        max_registers = choose_max_registers(k_i8, v_pairs, num_warps, block_n, d_k, kt["register_lut_kind"],
                                             vt["register_lut_kind"])
    mv, mv_scale = rotation_operand(vt, transposed=False)
    if merge_in_stage1:
        assert workspace.split_counts.numel() >= B * h_kv
    if q_rotated is not None:
        assert q_rotated.dtype == torch.float32 and q_rotated.shape[0] >= B and q_rotated.stride(-1) == 1
        qr = q_rotated.view(q_rotated.shape[0], h_q, kt["wt"].shape[1])
    else:
        qr = torch.matmul(q3.to(torch.float32), kt["wt"])  # [B, H_q, d_k (+ m)]
    use_pdl = bool((_common.PDL if pdl is None else pdl) and sliced and pdl_ok(dev))
    rot, rot_scale = rotation_operand(kt, transposed=True)
    rot_q = bool((ROTATE_Q_IN_STAGE1 if rotate_q is None else rotate_q) and k_i8 and rot_scale > 0
                 and q3.dtype in (torch.bfloat16, torch.float16) and q3.stride(2) == 1)
    if sliced:
        _decode_stage1_sliced[(B, h_kv, num_splits + ring_parts)](
            qr, qr.stride(0), qr.stride(1), q_scale, kt["i8_scale"], float(logit_cap) if use_cap else 1.0,
            k_codes, k_codes.stride(0), k_codes.stride(1), k_scales, k_scales.stride(0), k_scales.stride(1),
            v_codes, v_codes.stride(0), v_codes.stride(1), v_scales, v_scales.stride(0), v_scales.stride(1),
            kt["centroids_i8" if k_i8 else "centroids_f16" if k_poly else "centroids_bf16"],
            vt["centroids_f16" if v_poly else "centroids_bf16"],
            kv_indptr, kv_indices, num_splits,
            po, po.stride(0), po.stride(1), po.stride(2), pl, pl.stride(0), pl.stride(1),
            plen if plen is not None else kv_indptr, plen is not None, *_ring_args(window, qr),
            workspace.split_counts, mv, out3, out3.stride(0), out3.stride(1),
            q3, q3.stride(0), q3.stride(1), rot if rot_q else mv,
            G=G, BLOCK_G=BLOCK_G, BLOCK_N=block_n, USE_CAP=use_cap,
            K_ASM=("" if not register_lut else kt["i8_asm"] if k_i8 else kt["poly_asm"] if k_poly
                   else kt["lut_asm"]),
            V_ASM=(vt["poly_asm"] if v_poly else "" if not register_lut else vt["pairs_asm"] if v_pairs
                   else vt["lut_asm"]),
            K_POLY=k_poly, V_POLY=v_poly, K_I8=k_i8, V_PAIRS=v_pairs,
            QJL_TILE=bool(QJL_SIGN_TILE if qjl_tile is None else qjl_tile),
            WIDE=max(t.numel() for t in (k_codes, k_scales, v_codes, v_scales)) >= 2 ** 31,
            FUSED_MERGE=merge_in_stage1, FENCE=not interpreting(), BLOCK_DO=min(d_v, 32), MV_SCALE=mv_scale,
            PDL=use_pdl, ROT_Q=rot_q, ROT_SCALE=rot_scale, **fmt_constexprs(kf, "K_"), **fmt_constexprs(vf, "V_"),
            num_warps=num_warps, num_stages=num_stages, **({"maxnreg": max_registers} if max_registers else {}),
            launch_pdl=use_pdl,
        )
    else:
        _launch_stage1(qr, q_scale, use_cap, logit_cap, k_codes, k_scales, v_codes, v_scales, kt, vt, k_lut, v_lut,
                       kv_indptr, kv_indices, num_splits, po, pl, B, h_kv, G, BLOCK_G, block_n, kf, vf,
                       num_warps, num_stages, plen=plen, ring=window)
    if merge_in_stage1:
        return out
    preload_m = bool((MERGE_PRELOAD if merge_preload is None else merge_preload) and mv_scale > 0 and d_v <= 128)
    _decode_stage2[(B, h_kv)](
        po, po.stride(0), po.stride(1), po.stride(2), pl, pl.stride(0), pl.stride(1), num_splits,
        vt["msign_bf16"] if preload_m else mv, out3, out3.stride(0), out3.stride(1), kv_indptr,
        plen if plen is not None else kv_indptr,
        G=G, BLOCK_G=BLOCK_G, V_D=d_v, BLOCK_DO=min(d_v, 64), BLOCK_N=block_n, MV_SCALE=mv_scale,
        HAS_RING=window is not None, PRELOAD_M=preload_m, PDL=use_pdl, num_warps=4, launch_pdl=use_pdl,
    )
    return out
