"""Triton split-K decode attention over the packed TurboQuant cache.

Plan / run: `plan_decode` makes every launch decision once per (formats, batch shape) into a frozen
`DecodePlan` (split count, stage 1, tile, warps, register cap, int8 keys, V pairs, PDL);
`decode_attention` runs a plan with a fixed argument list. Per call (no host sync, static grid:
capturable in a CUDA graph):
  0. q_all = q @ W^T with W = [M_k] or [M_k; S M_k]: the query rotated into K's storage domain and,
     for PROD keys, its QJL sketch (compress_and_store(q=, q_rot=) writes it in the new token's
     launch for keys without QJL; else one small torch matmul). sm_scale (and log2 e when there is no
     soft-cap) is folded in inside the kernel.
  1. stage 1, grid (B, H_kv, num_splits [+ 1 with a recent window]): one program per (sequence, KV head,
     split) serves the whole GQA group (G = H_q / H_kv query rows padded to BLOCK_G >= 16 for tl.dot),
     so every packed K/V tile is read from HBM once per KV head. Two kinds:
     - sliced (formats whose first code field is 4 or 2 bits wide): every code position of a
       first-field byte is its own slice (coordinates T, T + S, ...), scored against the matching query
       columns and accumulated into its own V accumulator, so no tile is re-ordered; the centroids of a
       whole byte come from a register LUT (PTX byte permutes over the codebook in registers).
       4-bit one-field keys: int8 centroids against the query split into int8 high and low parts, on
       integer tensor cores. 4-bit one-field V: codes loaded as 16-bit elements (V pairs).
     - general (outlier formats, 6-bit codes): codes put back in coordinate order, per-code gathers.
     Per BLOCK_N tile: online softmax in fp32 (log2 units), p * |v| against the V centroids,
     accumulated in V's rotated domain. Writes acc / l and lse per split into the workspace. With a
     recent window one more program per (sequence, KV head) scores the ring's exact positions.
  2. stage 2, grid (B, H_kv): log-sum-exp merge of the splits that hold tokens, then one un-rotation
     o = o_rot M_v (two bf16 MMAs against M_v's signs), written in q's dtype into `out`.
On sm_90+ stage 1 launches as a programmatic dependent of compress and stage 2 of stage 1 (PDL).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, _reg_slice_code, cache_args, fmt_constexpr, gdc_launch_dependents, gdc_wait,
                      kernel_tables, next_pow2, online_softmax_step, packed_tile_update, pdl_ok, qjl_signs,
                      register_lut_i8_slices, register_lut_pair_slices, register_lut_slices, register_lut_slices3,
                      register_lut_slices5, softcap_log2, split_high_crumbs, split_high_nibbles, unrotate_store)
from .codec import TQCodec, padded_launch
from .window import DecodeWindow, FirstRows, check_decode_window, check_first_rows


@triton.jit
def _split_range(kv_indptr, kv_indices, b, sid, num_splits, BLOCK_N: tl.constexpr, plen_ptr, HAS_PLEN: tl.constexpr,
                 sliding_window, flags_ptr, HAS_FIRST: tl.constexpr):
    """Tokens [lo, hi) of split `sid` of sequence b (split length rounded up to whole tiles, so the
    partition depends only on the packed range's length and num_splits); and the sequence's start in
    kv_indices. HAS_PLEN: only the first plen[b] tokens come from the codes (the rest from the recent
    window's ring). The splits partition [packed start, packed end) (`_packed_start`): positions before a
    sliding window are never read."""
    seq_start = tl.load(kv_indptr + b)
    w0 = _packed_start(kv_indptr, kv_indices, b, sliding_window, flags_ptr, HAS_FIRST)
    seq_len = tl.maximum(_packed_len(kv_indptr, b, plen_ptr, HAS_PLEN), w0)
    split_len = _split_len(seq_len - w0, num_splits, BLOCK_N)
    lo = w0 + sid * split_len
    return seq_start, lo, tl.minimum(lo + split_len, seq_len)


@triton.jit
def _window_start(kv_indptr, b, sliding_window):
    """First position of sequence b inside its sliding window (the last `sliding_window` positions;
    0 = full attention)."""
    n = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    return tl.where(sliding_window > 0, tl.maximum(n - sliding_window, 0), 0)


@triton.jit
def _first_entry(kv_indptr, kv_indices, b, sliding_window, flags_ptr):
    """The first-token table entry serving position 0 of sequence b (`tq_kernels.window`: flags of its
    position-0 slot minus 1), -1 when none or when a sliding window has moved past position 0."""
    start = tl.load(kv_indptr + b)
    has = (tl.load(kv_indptr + b + 1) > start) & (_window_start(kv_indptr, b, sliding_window) == 0)
    slot = tl.load(kv_indices + start, mask=has, other=0).to(tl.int64)
    flag = tl.load(flags_ptr + slot, mask=has, other=0).to(tl.int32)
    return tl.where(has, flag - 1, -1)


@triton.jit
def _packed_start(kv_indptr, kv_indices, b, sliding_window, flags_ptr, HAS_FIRST: tl.constexpr):
    """First position of sequence b read from the codes: the sliding window's start, and past position 0
    where the first-token table serves it."""
    w0 = _window_start(kv_indptr, b, sliding_window)
    if HAS_FIRST:
        w0 = tl.maximum(w0, (_first_entry(kv_indptr, kv_indices, b, sliding_window, flags_ptr) >= 0).to(tl.int32))
    return w0


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


@triton.jit
def _store_partial(parts, b, heads, gmask, sid, o, lse, V_D: tl.constexpr):
    """One split's normalized partial o [BLOCK_G, V_D] and its lse into the workspace
    (parts = (part_out, 3 strides, part_lse, 2 strides))."""
    po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h = parts
    dv = tl.arange(0, V_D)
    po = po_ptr + b * po_b + heads * po_h + sid * po_s
    tl.store(po[:, None] + dv[None, :], o, mask=gmask[:, None])
    tl.store(pl_ptr + b * pl_b + heads * pl_h + sid, lse, mask=gmask)


# num_splits is never specialized: Triton compiles an int argument equal to 1 (and one divisible by 16)
# as a separate variant. The CUDA graphs capture batches up to --cuda-graph-max-bs, whose split counts
# are above 1; larger batches run eagerly, and from B x H_kv >= 16 x SMs on with 1 split
# (`choose_num_splits`): the first of them would compile both kernels again while serving.
# The sliding window is a per-layer runtime int for the same reason: no variant per window size.
_SPLITS_ARG = ["num_splits", "sliding_window"]


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage1(qr_ptr, qr_b, qr_h, q_scale, logit_cap, cache, kcent_ptr, vcent_ptr, kv_indptr, kv_indices,
                   num_splits, sliding_window, parts, plen_ptr, HAS_PLEN: tl.constexpr, ring, WSIZE: tl.constexpr,
                   BLOCK_W: tl.constexpr, first, HAS_FIRST: tl.constexpr, G: tl.constexpr, BLOCK_G: tl.constexpr,
                   BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr, KF: tl.constexpr, VF: tl.constexpr):
    """The general stage 1 (every format): codes put back in coordinate order, per-code gathers, one
    tl.dot per tile. cache: `cache_args`; parts: the workspace's partials; ring: `_ring_args`; first:
    `_first_args`."""
    K_D: tl.constexpr = KF.D
    V_D: tl.constexpr = VF.D
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sid = tl.program_id(2)
    if WSIZE > 0 or HAS_FIRST:
        if sid == num_splits:  # the recent window's ring and the exact first token (`_tail_split`)
            _tail_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, kv_indices, plen_ptr,
                        sliding_window, ring, first, parts, G, BLOCK_G, USE_CAP, WSIZE, BLOCK_W, HAS_FIRST, KF.D, VF.D)
            return
    seq_start, lo, hi = _split_range(kv_indptr, kv_indices, b, sid, num_splits, BLOCK_N, plen_ptr, HAS_PLEN,
                                     sliding_window, first[6], HAS_FIRST)
    if lo >= hi:  # an empty split: stage 2 never reads its partials
        return
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    dk = tl.arange(0, K_D)
    qrow = qr_ptr + b * qr_b + heads * qr_h
    q = (tl.load(qrow[:, None] + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)
    sk = q  # unused unless PROD keys
    if KF.QJLOFF >= 0:
        sk = (tl.load(qrow[:, None] + K_D + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, V_D), tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < hi
        slot = tl.load(kv_indices + seq_start + offs, mask=nmask, other=0).to(tl.int64)
        m_i, l_i, acc = packed_tile_update(q, sk, m_i, l_i, acc, slot, nmask, hk, logit_cap, cache, kcent_ptr,
                                           vcent_ptr, KF, VF, 0, "", 0, "", USE_CAP, False, nmask[None, :])
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    _store_partial(parts, b, heads, gmask, sid, o, lse, V_D)


@triton.jit
def _field_bits(rows, mask, pos, OFF: tl.constexpr, W: tl.constexpr):
    """W-bit values at bit positions `pos` ([C] coordinate * W) of the LSB-first field at byte OFF of
    every row -> int32 [BLOCK_N, C]. Bytes are gathered (duplicate addresses hit L1)."""
    byt = tl.load(rows[:, None] + OFF + (pos // 8)[None, :], mask=mask, other=0).to(tl.int32)
    return (byt >> (pos % 8)[None, :]) & ((1 << W) - 1)


@triton.jit
def _slice_index(rows, mask, b0, T: tl.constexpr, F: tl.constexpr):
    """Centroid-table index of slice T: storage coordinates c = S j + T (S = 8 / M0W codes per byte of
    the first field, whose byte tile b0 [BLOCK_N, D / S] the caller loaded once per tile). The first
    field needs only a shift; further fields (the high bit of 3-bit codes, outlier refinement bits at
    positions c % OSTRIDE == 0) are gathered per coordinate."""
    S: tl.constexpr = 8 // F.M0W
    c = tl.arange(0, F.D // S) * S + T
    m2 = mask[:, None]
    idx = (b0 >> (T * F.M0W)) & ((1 << F.M0W) - 1)
    if F.M1W > 0:
        idx = idx | (_field_bits(rows, m2, c * F.M1W, F.M1OFF, F.M1W) << F.M1SH)
    if F.NOUT > 0:
        is_out = (c % F.OSTRIDE) == 0
        e = c // F.OSTRIDE
        ex = _field_bits(rows, m2 & is_out[None, :], e * F.X0W, F.X0OFF, F.X0W) << F.X0SH
        if F.X1W > 0:
            ex = ex | (_field_bits(rows, m2 & is_out[None, :], e * F.X1W, F.X1OFF, F.X1W) << F.X1SH)
        idx = idx + tl.where(is_out[None, :], ex + (1 << F.LO), 0)
    return idx


@triton.jit
def _q_slice(qrow, gmask, q_scale, T: tl.constexpr, S: tl.constexpr, D: tl.constexpr):
    """Columns T, T + S, T + 2S, ... of the rotated query rows (scaled, bf16)."""
    cols = tl.arange(0, D // S) * S + T
    q = tl.load(qrow[:, None] + cols[None, :], mask=gmask[:, None], other=0.0) * q_scale
    return q.to(tl.bfloat16)


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
def query_slices(qrow, mask, q_scale, S: tl.constexpr, D: tl.constexpr):
    """The S column slices of the rotated query rows at qrow (`_q_slice`); unused entries of the
    4-tuple repeat slice 0."""
    q0 = _q_slice(qrow, mask, q_scale, 0, S, D)
    q1 = _q_slice(qrow, mask, q_scale, 1, S, D)
    q2 = q0
    q3 = q0
    if S == 4:
        q2 = _q_slice(qrow, mask, q_scale, 2, S, D)
        q3 = _q_slice(qrow, mask, q_scale, 3, S, D)
    return q0, q1, q2, q3


@triton.jit
def _slice_centroids(rows, mask, b0, cent_ptr, ASM: tl.constexpr, F: tl.constexpr, I8: tl.constexpr):
    """Centroids [BLOCK_N, D / S] of every slice of a tile (a 4-tuple; unused entries repeat slice 0),
    in cent_ptr's dtype (bf16; int8 with I8). ASM: the register LUT (I8: `register_lut_i8_asm`) over
    the uint8 first-field bytes b0; "" (interpreter) -> per-code gathers."""
    S: tl.constexpr = 8 // F.M0W
    if ASM != "" and I8:
        c0, c1, c2, c3 = register_lut_i8_slices(b0, ASM)
    elif ASM != "" and F.M1W == 1 and F.M0W == 2:  # 3-bit codes: the high bits come from the 1-bit field
        c0, c1, c2, c3 = register_lut_slices3(b0, split_high_nibbles(rows, mask, F.M1OFF, F.D), ASM)
    elif ASM != "" and F.M1W == 1:  # 5-bit codes: the same, two coordinates per byte
        c0, c1, c2, c3 = register_lut_slices5(b0, split_high_crumbs(rows, mask, F.M1OFF, F.D), ASM)
    elif ASM != "":
        c0, c1, c2, c3 = register_lut_slices(b0, ASM, F.M0W)
    else:
        bi = b0.to(tl.int32)
        c0 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 0, F))
        c1 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 1, F))
        c2 = c0
        c3 = c0
        if S == 4:
            c2 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 2, F))
            c3 = tl.load(cent_ptr + _slice_index(rows, mask, bi, 3, F))
    return c0, c1, c2, c3


@triton.jit
def _pair_centroids(b16, cent_ptr, ASM: tl.constexpr):
    """bf16 centroids of the 4 slices of 16-bit elements of 4-bit codes (`register_lut_pair_slices`;
    ASM "" (interpreter): one gather per code)."""
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
def sliced_tile_update(q0, q1, q2, q3, sk, q_row_scale, m_i, l_i, a0, a1, a2, a3, slot, nmask, hk, logit_cap,
                       cache, kcent_ptr, vcent_ptr, USE_CAP: tl.constexpr, K_ASM: tl.constexpr,
                       V_ASM: tl.constexpr, K_I8: tl.constexpr, V_PAIRS: tl.constexpr, KF: tl.constexpr,
                       VF: tl.constexpr):
    """One BLOCK_N tile of packed tokens in the sliced layout for query rows given as slices q0..q3 (sk:
    the whole QJL sketch rows for PROD keys): scores slice by slice from the register LUT, online
    softmax, p * |v| against every V slice into accumulators a0..a3. K_I8: the key centroids are int8,
    q0, q1 the query slices' int8 high parts and q2, q3 their low parts (`query_slices_i8`; q_row_scale
    [BLOCK_G] folds the query's and the table's scales), the scores int8 MMAs' int32 sums. V_PAIRS
    (4-bit one-field V): the V codes load as 16-bit elements (4 coordinates each), which a 16-bit MMA
    operand with the tokens as its reduction dimension takes as they are (two tokens' elements per
    register: `register_lut_asm(pairs=True)`; byte tiles there cost a shared-memory load per byte), so V
    has 4 slices (coordinates 4c + T). Returns (m_i, l_i, a0, a1, a2, a3)."""
    kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h = cache
    KS: tl.constexpr = 8 // KF.M0W
    VS: tl.constexpr = 4 if V_PAIRS else 8 // VF.M0W
    kb_cols = tl.arange(0, KF.D // KS)
    vb_cols = tl.arange(0, VF.D // VS)
    krow = kc_ptr + slot * kc_s + hk * kc_h
    vrow = vc_ptr + slot * vc_s + hk * vc_h
    ksrow = ks_ptr + slot * ks_s + hk * ks_h
    kb = tl.load(krow[:, None] + KF.M0OFF + kb_cols[None, :], mask=nmask[:, None], other=0)
    if V_PAIRS:
        vrow16 = (vrow + VF.M0OFF).to(tl.pointer_type(tl.uint16))
        vb = tl.load(vrow16[:, None] + vb_cols[None, :], mask=nmask[:, None], other=0)
    else:
        vb = tl.load(vrow[:, None] + VF.M0OFF + vb_cols[None, :], mask=nmask[:, None], other=0)
    ks0 = tl.load(ksrow, mask=nmask, other=0.0)
    vs0 = tl.load(vs_ptr + slot * vs_s + hk * vs_h, mask=nmask, other=0.0)
    # ---- scores of the whole GQA group against the tile, one tl.dot per slice
    c0, c1, c2, c3 = _slice_centroids(krow, nmask, kb, kcent_ptr, K_ASM, KF, K_I8)
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
    if KF.QJLOFF >= 0:  # the QJL signs as one tile in coordinate order, against the whole sketch rows
        s += tl.dot(sk, tl.trans(qjl_signs(krow, nmask, KF.QJLOFF, KF.D))) * \
            tl.load(ksrow + 1, mask=nmask, other=0.0).to(tl.float32)[None, :]
    p, alpha, m_i, l_i = online_softmax_step(s, nmask[None, :], m_i, l_i, logit_cap, USE_CAP)
    # ---- p * |v| against every V slice, accumulated per slice in V's rotated domain
    pv = (p * vs0.to(tl.float32)[None, :]).to(tl.bfloat16)
    if V_PAIRS:
        e0, e1, e2, e3 = _pair_centroids(vb, vcent_ptr, V_ASM)
    else:
        e0, e1, e2, e3 = _slice_centroids(vrow, nmask, vb, vcent_ptr, V_ASM, VF, False)
    a0 = tl.dot(pv, e0, a0 * alpha[:, None])
    a1 = tl.dot(pv, e1, a1 * alpha[:, None])
    if VS == 4:
        a2 = tl.dot(pv, e2, a2 * alpha[:, None])
        a3 = tl.dot(pv, e3, a3 * alpha[:, None])
    return m_i, l_i, a0, a1, a2, a3


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage1_sliced(qr_ptr, qr_b, qr_h, q_scale, k_i8_scale, logit_cap, cache, kcent_ptr, vcent_ptr,
                          kv_indptr, kv_indices, num_splits, sliding_window, parts, plen_ptr, HAS_PLEN: tl.constexpr,
                          ring, WSIZE: tl.constexpr, BLOCK_W: tl.constexpr, first, HAS_FIRST: tl.constexpr,
                          G: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr, K_ASM: tl.constexpr, V_ASM: tl.constexpr,
                          K_I8: tl.constexpr, V_PAIRS: tl.constexpr, WIDE: tl.constexpr, PDL: tl.constexpr,
                          KF: tl.constexpr, VF: tl.constexpr):
    """Stage 1 without tl.interleave, for formats whose first code field is 4 or 2 bits wide (K4, K3,
    K2, K5, PROD keys, outlier splits over those): every code position of a first-field byte is its own
    slice (coordinates T, T + S, ...: S = 8 / W slices of D / S columns), scored against the matching
    query columns and accumulated into its own V accumulator, so no tile is ever re-ordered. K_ASM /
    V_ASM: the register LUTs ("" in the interpreter: gathers). K_I8 / V_PAIRS: `sliced_tile_update`.
    WIDE: 64-bit slot offsets (buffers of 2^31 elements or more). PDL: launched as a programmatic
    dependent of compress (waits for its writes before reading the rotated query or the new codes).
    first / HAS_FIRST: the exact first token (`_first_args`)."""
    KS: tl.constexpr = 8 // KF.M0W
    VS: tl.constexpr = 4 if V_PAIRS else 8 // VF.M0W
    K_D: tl.constexpr = KF.D
    VC: tl.constexpr = VF.D // VS  # columns per V slice
    b = tl.program_id(0)
    hk = tl.program_id(1)
    sid = tl.program_id(2)
    if PDL:  # stage 2 may launch now too; it waits for this grid's writes
        gdc_launch_dependents()
    if WSIZE > 0 or HAS_FIRST:
        if sid == num_splits:  # the recent window's ring and the exact first token (`_tail_split`)
            if PDL:
                gdc_wait()
            _tail_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, kv_indices, plen_ptr,
                        sliding_window, ring, first, parts, G, BLOCK_G, USE_CAP, WSIZE, BLOCK_W, HAS_FIRST, KF.D, VF.D)
            return
    seq_start, lo, hi = _split_range(kv_indptr, kv_indices, b, sid, num_splits, BLOCK_N, plen_ptr, HAS_PLEN,
                                     sliding_window, first[6], HAS_FIRST)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    if lo >= hi:  # an empty split: the merge never reads its partials
        return
    if PDL:
        gdc_wait()
    qrow = qr_ptr + b * qr_b + heads * qr_h
    sk = tl.zeros((BLOCK_G, K_D), tl.bfloat16)  # unused unless PROD keys
    if K_I8:  # int8 scores (4-bit one-field keys): the query as int8 slices and a scale per row
        q0, q1, q2, q3, q_row_scale = query_slices_i8(qrow, gmask, q_scale, KF.D)
        q_row_scale = q_row_scale * (k_i8_scale / 128.0)
    else:
        q0, q1, q2, q3 = query_slices(qrow, gmask, q_scale, KS, KF.D)
        q_row_scale = tl.full((BLOCK_G,), 1.0, tl.float32)
        if KF.QJLOFF >= 0:  # the whole sketch rows, in coordinate order (they follow the rotated query)
            sk = _q_slice(qrow + KF.D, gmask, q_scale, 0, 1, KF.D)
    vb_cols = tl.arange(0, VC)
    tok = tl.arange(0, BLOCK_N)

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    a0 = tl.zeros((BLOCK_G, VC), tl.float32)
    a1 = tl.zeros((BLOCK_G, VC), tl.float32)
    a2 = tl.zeros((BLOCK_G, VC), tl.float32)
    a3 = tl.zeros((BLOCK_G, VC), tl.float32)

    # Plain loop: Triton's software pipeliner (num_stages) issues the slot loads and the first-field
    # byte tiles (cp.async into shared memory) of later tiles while this one is computed, and loads
    # the bytes straight into the MMA operand layout, so only uint8 tiles cross shared memory.
    for n0 in range(lo, hi, BLOCK_N):
        nmask = n0 + tok < hi
        slot = tl.load(kv_indices + seq_start + n0 + tok, mask=nmask, other=0)
        slot = slot.to(tl.int64) if WIDE else slot.to(tl.int32)  # 32-bit offset math where the buffers allow
        m_i, l_i, a0, a1, a2, a3 = sliced_tile_update(
            q0, q1, q2, q3, sk, q_row_scale, m_i, l_i, a0, a1, a2, a3, slot, nmask, hk, logit_cap,
            cache, kcent_ptr, vcent_ptr, USE_CAP, K_ASM, V_ASM, K_I8, V_PAIRS, KF, VF)

    has = l_i > 0
    inv = 1.0 / tl.where(has, l_i, 1.0)
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h = parts
    po = (po_ptr + b * po_b + heads * po_h + sid * po_s)[:, None] + vb_cols[None, :] * VS
    tl.store(po, a0 * inv[:, None], mask=gmask[:, None])
    tl.store(po + 1, a1 * inv[:, None], mask=gmask[:, None])
    if VS == 4:
        tl.store(po + 2, a2 * inv[:, None], mask=gmask[:, None])
        tl.store(po + 3, a3 * inv[:, None], mask=gmask[:, None])
    tl.store(pl_ptr + b * pl_b + heads * pl_h + sid, lse, mask=gmask)


@triton.jit
def _used_splits(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """How many splits of a sequence's packed range of seq_len tokens hold tokens (stage 1's
    partition, `_split_range`)."""
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
def _merge_acc(po, po_s, pl, used, gmask, BLOCK_G: tl.constexpr, V_D: tl.constexpr, tail_sid,
               HAS_TAIL: tl.constexpr, sink, HAS_SINK: tl.constexpr):
    """LSE-merge of the first `used` split partials of a GQA group's rows (po, pl: row pointers) and of
    partial `tail_sid` (HAS_TAIL: `_tail_split`'s): the normalized output rows [BLOCK_G, V_D],
    still rotated. HAS_SINK: sink [BLOCK_G] joins the denominator (`sink_step`)."""
    dv = tl.arange(0, V_D)
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, V_D), tl.float32)
    if HAS_TAIL:  # loaded first: its latency overlaps the loop's
        tail_lse = tl.load(pl + tail_sid, mask=gmask, other=float("-inf"))
        tail_o = tl.load(po[:, None] + tail_sid * po_s + dv[None, :], mask=gmask[:, None], other=0.0)
    for sid in range(0, used):
        lse = tl.load(pl + sid, mask=gmask, other=float("-inf"))
        o = tl.load(po[:, None] + sid * po_s + dv[None, :], mask=gmask[:, None], other=0.0)
        m, l, acc = _merge_step(m, l, acc, lse, o)
    if HAS_TAIL:
        m, l, acc = _merge_step(m, l, acc, tail_lse, tail_o)
    if HAS_SINK:
        alpha, l = sink_step(m, l, sink)
        acc = acc * alpha[:, None]
    return acc / tl.where(l > 0, l, 1.0)[:, None]


@triton.jit
def sink_step(m, l, sink):
    """An attention sink (a logit whose value is 0, natural-log units like the scaled scores) folded into
    a running (max m, sum l) in log2 units: the factor for what was accumulated so far and the new sum,
    relative to max(m, sink)."""
    s2 = sink * 1.4426950408889634  # log2(e): a literal, jit code reads no Python globals
    m_new = tl.maximum(m, s2)
    return tl.exp2(m - m_new), l * tl.exp2(m - m_new) + tl.exp2(s2 - m_new)


@triton.jit
def _window_partial(qrow, gmask, q_scale, logit_cap, hk, ring, lo, seq_len, base,
                    USE_CAP: tl.constexpr, WSIZE: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_G: tl.constexpr,
                    K_D: tl.constexpr, V_D: tl.constexpr):
    """Attention of a GQA group's rotated queries over positions [lo, seq_len) (at most WSIZE) of the
    recent window's ring (exact bf16 K/V in the codes' rotated domain; position p at row base + p % WSIZE).
    Returns the normalized partial and its lse (log2 units), -inf when the range is empty."""
    rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, wbase_ptr = ring
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
def _first_row_merge(qrow, gmask, q_scale, logit_cap, hk, first, e, o, lse, USE_CAP: tl.constexpr,
                     K_D: tl.constexpr, V_D: tl.constexpr):
    """Fold position 0's exact row (first-token table entry e; -1: nothing) into a normalized partial
    (o, lse in log2 units) of a GQA group's rotated queries."""
    fk_ptr, fk_t, fk_h, fv_ptr, fv_t, fv_h, flags_ptr = first
    use = e >= 0
    row = tl.maximum(e, 0).to(tl.int64)
    dk = tl.arange(0, K_D)
    dv = tl.arange(0, V_D)
    q = tl.load(qrow[:, None] + dk[None, :], mask=gmask[:, None], other=0.0) * q_scale
    k = tl.load(fk_ptr + row * fk_t + hk * fk_h + dk, mask=use & (dk < K_D), other=0.0).to(tl.float32)
    s = softcap_log2(tl.sum(q * k[None, :], axis=1), logit_cap, USE_CAP)
    s = tl.where(use, s, float("-inf"))
    v = tl.load(fv_ptr + row * fv_t + hk * fv_h + dv, mask=use & (dv < V_D), other=0.0).to(tl.float32)
    m_new, alpha, beta = merge_weights(lse, s)
    l = alpha + beta
    o = (o * alpha[:, None] + beta[:, None] * v[None, :]) / tl.where(l > 0, l, 1.0)[:, None]
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    return o, tl.where(l > 0, m_use + tl.log2(tl.where(l > 0, l, 1.0)), float("-inf"))


@triton.jit
def _tail_split(b, hk, sid, qr_ptr, qr_b, qr_h, q_scale, logit_cap, kv_indptr, kv_indices, wlo_ptr, sliding_window,
                ring, first, parts, G: tl.constexpr, BLOCK_G: tl.constexpr, USE_CAP: tl.constexpr,
                WSIZE: tl.constexpr, BLOCK_W: tl.constexpr, HAS_FIRST: tl.constexpr, K_D: tl.constexpr,
                V_D: tl.constexpr):
    """Stage 1's extra program per (sequence, KV head) with a recent window or the exact first token: the
    ring's partial over positions [lo, L) (WSIZE > 0) and position 0's exact row where the first-token
    table serves it and the ring does not hold it (HAS_FIRST), stored as split `sid` (= num_splits) for
    stage 2 to merge like any other. It runs beside the packed splits; scored inside stage 2 it would put
    dependent loads in front of the merge. A sliding window starting after lo cuts the ring's range too."""
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    seq_len = tl.load(kv_indptr + b + 1) - tl.load(kv_indptr + b)
    qrow = qr_ptr + b * qr_b + heads * qr_h
    lo = seq_len
    o = tl.zeros((BLOCK_G, V_D), tl.float32)
    lse = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    if WSIZE > 0:
        lo = tl.maximum(tl.minimum(tl.load(wlo_ptr + b), seq_len), _window_start(kv_indptr, b, sliding_window))
        wbase_ptr = ring[6]
        o, lse = _window_partial(qrow, gmask, q_scale, logit_cap, hk, ring, lo, seq_len, tl.load(wbase_ptr + b),
                                 USE_CAP, WSIZE, BLOCK_W, BLOCK_G, K_D, V_D)
    if HAS_FIRST:
        e = _first_entry(kv_indptr, kv_indices, b, sliding_window, first[6])
        o, lse = _first_row_merge(qrow, gmask, q_scale, logit_cap, hk, first, tl.where(lo > 0, e, -1), o, lse,
                                  USE_CAP, K_D, V_D)
    _store_partial(parts, b, heads, gmask, sid, o, lse, V_D)


@triton.jit(do_not_specialize=_SPLITS_ARG)
def _decode_stage2(parts, num_splits, sliding_window, mv_ptr, out_ptr, out_b, out_h, kv_indptr, kv_indices, wlo_ptr,
                   flags_ptr, sink_ptr, G: tl.constexpr, BLOCK_G: tl.constexpr, V_D: tl.constexpr,
                   BLOCK_DO: tl.constexpr, BLOCK_N: tl.constexpr, MV_SCALE: tl.constexpr, HAS_RING: tl.constexpr,
                   HAS_FIRST: tl.constexpr, HAS_SINK: tl.constexpr, PRELOAD_M: tl.constexpr, PDL: tl.constexpr):
    """LSE-merge of the splits that hold tokens (stage 1's partition: the split count is static for
    CUDA graphs and sized for the longest context, so short sequences leave most splits empty) and,
    with a recent window (HAS_RING) or the exact first token (HAS_FIRST), of the partial that stage 1 stored
    as split num_splits;
    then one un-rotation. PRELOAD_M (d_v <= 128): mv_ptr holds M_v's signs in bf16, loaded whole
    before the merge so their latency overlaps the merge's, and used as the MMA operand as loaded;
    wider heads (a d_v x d_v bf16 matrix too large for registers) load int8 signs in BLOCK_DO-column
    chunks after the merge (`unrotate_store`). HAS_SINK: sink_ptr holds one logit per query head
    (natural-log units, like the scaled scores), added to the denominator."""
    po_ptr, po_b, po_h, po_s, pl_ptr, pl_b, pl_h = parts
    b = tl.program_id(0)
    hk = tl.program_id(1)
    g = tl.arange(0, BLOCK_G)
    gmask = g < G
    heads = hk * G + g
    if PRELOAD_M:
        dv = tl.arange(0, V_D)
        mvt = tl.load(mv_ptr + dv[:, None] * V_D + dv[None, :])
    w0 = _packed_start(kv_indptr, kv_indices, b, sliding_window, flags_ptr, HAS_FIRST)
    used = _used_splits(tl.maximum(_packed_len(kv_indptr, b, wlo_ptr, HAS_RING) - w0, 0), num_splits, BLOCK_N)
    sink = tl.zeros((BLOCK_G,), tl.float32)
    if HAS_SINK:
        sink = tl.load(sink_ptr + heads, mask=gmask, other=0.0).to(tl.float32)
    if PDL:  # a programmatic dependent of stage 1: M_v and the split count above did not need it
        gdc_wait()
    po = po_ptr + b * po_b + heads * po_h
    pl = pl_ptr + b * pl_b + heads * pl_h
    out_rows = out_ptr + b * out_b + heads * out_h
    acc = _merge_acc(po, po_s, pl, used, gmask, BLOCK_G, V_D, num_splits, HAS_RING or HAS_FIRST, sink, HAS_SINK)
    if PRELOAD_M:
        hi = acc.to(tl.bfloat16)
        lo = (acc - hi.to(tl.float32)).to(tl.bfloat16)
        o = tl.dot(lo, mvt, tl.dot(hi, mvt)) * MV_SCALE
        tl.store(out_rows[:, None] + dv[None, :], o.to(out_rows.dtype.element_ty), mask=gmask[:, None])
    else:
        unrotate_store(acc, mv_ptr, out_rows, gmask, V_D, BLOCK_DO, MV_SCALE)


def sliced_ok(fmt) -> bool:
    """Formats the sliced stage 1 handles: the first code field 4 or 2 bits wide (so at most 4 slices)
    and slices of at least 16 columns (tl.dot's minimum K)."""
    w = fmt.fields[0][1]
    return w in (2, 4) and fmt.head_dim * w // 8 >= 16


def _bad_sliced_keys(kf, kt) -> bool:
    """3-bit keys (the two-field "split" LUT) with 16-column slices (head_dim 64): the sliced stage 1 gave
    wrong results on sm_90 (Triton 3.6; every V width) while the interpreter, which gathers instead of
    running the PTX LUT, was right; head_dim 128 and 3-bit values pass. Such layers take the general
    stage 1."""
    return kt["register_lut_kind"] == "split" and kf.head_dim * kf.fields[0][1] // 8 <= 16


def _ring_args(window, dummy) -> tuple:
    """Stage 1's ring argument (k and its two strides, v and its two strides, base), WSIZE, BLOCK_W."""
    if window is None:
        return (dummy, 0, 0, dummy, 0, 0, dummy), 0, 16
    wk, wv = window.k, window.v
    return ((wk, wk.stride(0), wk.stride(1), wv, wv.stride(0), wv.stride(1), window.base), int(window.size),
            max(16, next_pow2(int(window.size))))


def _first_args(first, dummy) -> tuple:
    """Stage 1's first argument (table k and its two strides, table v and its two strides, slot flags)."""
    if first is None:
        return (dummy, 0, 0, dummy, 0, 0, dummy)
    return (first.k, first.k.stride(0), first.k.stride(1), first.v, first.v.stride(0), first.v.stride(1), first.flags)


@dataclass
class DecodeWorkspace:
    """Preallocated scratch of decode_attention (allocate once, outside any CUDA graph):
    part_out [max_batch, H_q, max_splits, d_v] fp32, part_lse [max_batch, H_q, max_splits] fp32 and
    q_rot [max_batch, H_q, d_k] fp32 (the rotated queries: compress_and_store(q=, q_rot=) writes
    them, decode_attention(q_rotated=) reads them)."""

    part_out: torch.Tensor
    part_lse: torch.Tensor
    q_rot: torch.Tensor

    @classmethod
    def create(cls, max_batch: int, num_q_heads: int, head_dim_v: int, max_splits: int = 64,
               device="cuda", head_dim_k: Optional[int] = None) -> "DecodeWorkspace":
        f32 = dict(dtype=torch.float32, device=device)
        return cls(torch.empty(max_batch, num_q_heads, max_splits, head_dim_v, **f32),
                   torch.empty(max_batch, num_q_heads, max_splits, **f32),
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
    SMs)."""
    work = max(1, batch * num_kv_heads)
    programs = max(2 * num_sms, min(16 * num_sms, 8 * work))
    min_tokens = 128 if work < num_sms else 256
    s = min(triton.cdiv(programs, work), triton.cdiv(max(1, max_seq_len_hint), min_tokens), max_splits)
    return max(1, int(s))


# Register caps of the sliced stage 1 at 4 warps (Triton's maxnreg), each the largest that fits one more
# 128-thread program per SM without spills on sm_90: int8 keys with V pairs (head_dim <= 128) four
# programs; int8 keys with byte V (and head_dim 256, which spills at either cap) three; 3-bit K and V
# (BLOCK_N 64, head_dim <= 128) five.
KEY_INT8_PAIRS_MAX_REGISTERS = 128
KEY_INT8_MAX_REGISTERS = 168
SPLIT_MAX_REGISTERS = 96


def _even_rows(codes: torch.Tensor) -> bool:
    """Every (slot, head) row of `codes` starts at an even address, as V pairs' 16-bit loads need (the
    pools allocate contiguous [rows, H_kv, code_bytes] tensors)."""
    return codes.data_ptr() % 2 == 0 and codes.stride(0) % 2 == 0 and codes.stride(1) % 2 == 0


def pairs_fit(d_v: int, num_warps: int) -> bool:
    """V pairs' four slices need d_v / 4 >= 8 columns per warp: at d_v 64 (4 warps) Triton gave every warp
    the whole PV product (4x the MMAs, spills at the register cap)."""
    return d_v // 4 >= 8 * num_warps


def choose_max_registers(k_i8: bool, v_pairs: bool, num_warps: int, block_n: int, d_k: int, k_kind: str,
                         v_kind: str) -> Optional[int]:
    """The sliced stage 1's register cap (None: Triton's choice); see the constants above."""
    if k_i8 and num_warps == 4:
        return KEY_INT8_PAIRS_MAX_REGISTERS if v_pairs and d_k <= 128 else KEY_INT8_MAX_REGISTERS
    if block_n == 64 and num_warps == 4 and d_k <= 128 and k_kind == v_kind == "split":
        return SPLIT_MAX_REGISTERS
    return None


def choose_num_warps(batch: int, num_kv_heads: int, num_sms: int) -> int:
    """Warps per program of the sliced stage 1 with one-field bf16 LUTs (BLOCK_N 128): 8 while the
    (sequence, KV head) pairs alone leave SMs idle (latency-bound: each warp's share of a tile is
    shorter), else 4."""
    return 8 if batch * num_kv_heads < num_sms else 4


@dataclass(frozen=True)
class DecodePlan:
    """Every launch decision of one decode configuration, made once by `plan_decode`."""
    num_splits: int              # packed splits per sequence (the tail partial comes after them)
    ring: bool                   # a recent window: its ring's partial per (sequence, KV head)
    first: bool                  # the exact first token: joins the tail partial (one even without a ring)
    sliced: bool                 # the sliced stage 1 (else the general one)
    key_int8: bool               # int8 key centroids and int8 scores (sliced, 4-bit one-field keys)
    v_pairs: bool                # V codes as 16-bit elements (sliced, 4-bit one-field V)
    block_n: int
    num_warps: int
    num_stages: int
    max_registers: Optional[int]
    pdl: bool                    # programmatic dependent launch (sm_90+)

    @property
    def partials(self) -> int:
        """Partials per (sequence, query head) in the workspace."""
        return self.num_splits + int(self.ring or self.first)


def plan_decode(kcodec: TQCodec, vcodec: TQCodec, batch: int, num_kv_heads: int, max_seq_len: int, device, *,
                window: bool = False, first: bool = False, batch_invariant: bool = False, max_splits: int = 64,
                num_splits: Optional[int] = None, block_n: Optional[int] = None,
                sm_count: Optional[int] = None) -> DecodePlan:
    """The launch decisions for decoding `batch` sequences of at most `max_seq_len` tokens with these
    codecs. window: a recent window's ring is read too; first: the exact first-token rows (either: one more
    partial, which max_splits counts).
    batch_invariant: the split count and warps of batch size 1 for every batch, so a sequence's result
    does not depend on the batch it is in. num_splits / block_n: fixed instead of chosen (tests, sweeps).
    sm_count: the multiprocessors to fill (None: the device's).
    Stage 1: sliced where both formats allow it (a register LUT: 2-/3-/4-/5-bit codes), else general;
    block_n 128 for one-field LUTs, else 64; warps `choose_num_warps` for one-field bf16 LUTs at 128,
    else 4; int8 keys for 4-bit one-field keys; V pairs for 4-bit one-field V where they fit
    (`pairs_fit`); the register cap `choose_max_registers`."""
    kf, vf = kcodec.fmt, vcodec.fmt
    if vf.qjl:
        raise ValueError("decode: the PROD (QJL) format is for keys only; V has no QJL field")
    kt, vt = kernel_tables(kcodec, device), kernel_tables(vcodec, device)
    ring = bool(window)
    tail = int(ring or first)
    sms = sm_count or num_sms(device)
    rows = 1 if batch_invariant else max(1, int(batch))
    if num_splits is None:
        num_splits = choose_num_splits(rows, num_kv_heads, max_seq_len, sms, max_splits=max_splits - tail)
    if num_splits < 1 or num_splits + tail > max_splits:
        raise ValueError(f"decode: {num_splits} splits{' + the tail partial' if tail else ''} do not fit "
                         f"max_splits={max_splits}")
    sliced = bool(kt["register_lut_kind"] and vt["register_lut_kind"] and sliced_ok(kf) and sliced_ok(vf)
                  and not _bad_sliced_keys(kf, kt))
    single = kt["register_lut_kind"] == "single" and vt["register_lut_kind"] == "single"
    if block_n is None:  # 128 for one-field LUTs; the 3-bit one compiles worse at 128
        block_n = 128 if sliced and single else 64
    if block_n < 32:  # 16-wide tiles gave wrong results on sm_90 (Triton 3.6); the interpreter was right
        raise ValueError(f"decode: block_n must be >= 32 (got {block_n})")
    k_i8 = sliced and kt["has_i8"]
    num_warps = (choose_num_warps(rows, num_kv_heads, sms) if sliced and single and block_n == 128 and not k_i8
                 else 4)
    v_pairs = bool(sliced and vt["has_pairs"] and pairs_fit(vf.head_dim, num_warps))
    max_registers = (choose_max_registers(k_i8, v_pairs, num_warps, block_n, kf.head_dim, kt["register_lut_kind"],
                                          vt["register_lut_kind"]) if sliced else None)
    return DecodePlan(num_splits=int(num_splits), ring=ring, first=bool(first), sliced=sliced, key_int8=k_i8,
                      v_pairs=v_pairs,
                      block_n=int(block_n), num_warps=num_warps, num_stages=2, max_registers=max_registers,
                      pdl=bool(sliced and pdl_ok(device)))


@padded_launch  # head_dim 80 / 96: q and out at the model's dims, the launch at the codec's
def decode_attention(q, k_codes, k_scales, v_codes, v_scales, kcodec: TQCodec, vcodec: TQCodec,
                     kv_indptr, kv_indices, sm_scale: float, logit_cap: float = 0.0, out=None, *,
                     plan: Optional[DecodePlan] = None, workspace: Optional[DecodeWorkspace] = None,
                     q_rotated: Optional[torch.Tensor] = None, window: Optional[DecodeWindow] = None,
                     first: Optional[FirstRows] = None, sliding_window: int = 0,
                     sinks: Optional[torch.Tensor] = None):
    """q [B, H_q, d_k] (or [B, H_q * d_k]) -> out [B, H_q, d_v] in q's dtype (written into `out` if
    given, same shape convention). kv_indptr [B + 1], kv_indices: slots of each sequence.
    plan: `plan_decode`'s decisions (None: planned here for this batch, from kv_indices' length).
    workspace: partials and rotated queries (None: allocated here; not under a CUDA graph).
    q_rotated: fp32 [>= B, H_q, d_k] queries already rotated (compress_and_store(q=..., q_rot=...) in
    the same launch as the new K/V: keys without QJL); q then gives only shapes and the output dtype.
    Else q is rotated here by an fp32 matmul.
    window (`tq_kernels.window.DecodeWindow`): positions [window.lo[b], L_b) of each sequence come from
    the recent window's ring (exact bf16, rotated) instead of the codes; the plan must have ring=True.
    first (`tq_kernels.window.FirstRows`): position 0 of sequence b from the first-token table where its
    slot is flagged (and the ring does not hold it); the plan must have first=True.
    sliding_window: only the last `sliding_window` positions of each sequence are read (0: all); the
    splits partition the window, so stage 1 never touches the tokens before it.
    sinks: [H_q] logits (gpt-oss attention sinks, natural-log units like the scaled scores) added to
    each head's softmax denominator."""
    kf, vf = kcodec.fmt, vcodec.fmt
    d_k, d_v = kf.head_dim, vf.head_dim
    B = q.shape[0]
    q3 = q.reshape(B, -1, d_k)
    h_q, h_kv = q3.shape[1], k_codes.shape[1]
    if h_q % h_kv:
        raise ValueError(f"decode: {h_q} query heads are not a multiple of {h_kv} KV heads")
    G = h_q // h_kv
    dev = q.device
    if plan is None:
        plan = plan_decode(kcodec, vcodec, B, h_kv, kv_indices.numel(), dev, window=window is not None,
                           first=first is not None, max_splits=workspace.max_splits if workspace is not None else 64)
    if plan.ring != (window is not None):
        raise ValueError("decode: the plan was made " + ("with" if plan.ring else "without")
                         + " a recent window, the call has " + ("one" if window is not None else "none"))
    if plan.first != (first is not None):
        raise ValueError("decode: the plan was made " + ("with" if plan.first else "without")
                         + " first-token rows, the call has " + ("them" if first is not None else "none"))
    if out is None:
        out = torch.empty(B, h_q, d_v, dtype=q.dtype, device=dev)
    out3 = out.view(B, h_q, d_v)
    assert out3.stride(2) == 1
    if workspace is None:
        workspace = DecodeWorkspace.create(B, h_q, d_v, plan.partials, dev)
    if workspace.max_batch < B or workspace.max_splits < plan.partials:
        raise ValueError(f"decode: the workspace holds {workspace.max_batch} sequences x {workspace.max_splits} "
                         f"partials; this call needs {B} x {plan.partials}")
    assert workspace.part_out.shape[1] == h_q and workspace.part_out.shape[3] == d_v
    if plan.v_pairs and not _even_rows(v_codes):
        raise ValueError("decode: V pairs load 16-bit elements; the V codes' rows must start at even addresses")
    if sliding_window < 0:
        raise ValueError(f"decode: sliding_window must be >= 0 (0: full attention), got {sliding_window}")
    if sinks is not None:
        assert sinks.shape == (h_q,) and sinks.stride(0) == 1, (tuple(sinks.shape), h_q)
    if B == 0:
        return out

    kt, vt = kernel_tables(kcodec, dev), kernel_tables(vcodec, dev)
    use_cap = bool(logit_cap and logit_cap > 0)
    q_scale = float(sm_scale) * (1.0 if use_cap else LOG2E)
    BLOCK_G = max(16, next_pow2(G))
    po, pl = workspace.part_out, workspace.part_lse
    parts = (po, po.stride(0), po.stride(1), po.stride(2), pl, pl.stride(0), pl.stride(1))
    plen = kv_indptr  # with a window, stage 1 reads only each sequence's first window.lo[b] tokens
    if window is not None:
        check_decode_window(window, B, h_kv, d_k, d_v)
        plen = window.lo
    if first is not None:
        check_first_rows(first, h_kv, d_k, d_v)
    if q_rotated is not None:
        assert q_rotated.dtype == torch.float32 and q_rotated.shape[0] >= B and q_rotated.stride(-1) == 1
        qr = q_rotated.view(q_rotated.shape[0], h_q, kt["wt"].shape[1])
    else:
        qr = torch.matmul(q3.to(torch.float32), kt["wt"])  # [B, H_q, d_k (+ m)]
    ring, wsize, block_w = _ring_args(window, qr)
    first_args = _first_args(first, plen)
    cache = cache_args(k_codes, k_scales, v_codes, v_scales)
    grid = (B, h_kv, plan.partials)
    common = dict(G=G, BLOCK_G=BLOCK_G, BLOCK_N=plan.block_n, USE_CAP=use_cap, KF=fmt_constexpr(kf),
                  VF=fmt_constexpr(vf), num_warps=plan.num_warps, num_stages=plan.num_stages)
    cap = float(logit_cap) if use_cap else 1.0
    if plan.sliced:
        _decode_stage1_sliced[grid](
            qr, qr.stride(0), qr.stride(1), q_scale, kt["i8_scale"], cap, cache,
            kt["centroids_i8" if plan.key_int8 else "centroids_bf16"], vt["centroids_bf16"],
            kv_indptr, kv_indices, plan.num_splits, int(sliding_window), parts, plen, window is not None, ring, wsize,
            block_w, first_args, first is not None, K_ASM=kt["i8_asm"] if plan.key_int8 else kt["lut_asm"],
            V_ASM=vt["pairs_asm"] if plan.v_pairs else vt["lut_asm"],
            K_I8=plan.key_int8, V_PAIRS=plan.v_pairs,
            WIDE=max(t.numel() for t in (k_codes, k_scales, v_codes, v_scales)) >= 2 ** 31, PDL=plan.pdl,
            **common, **({"maxnreg": plan.max_registers} if plan.max_registers else {}), launch_pdl=plan.pdl,
        )
    else:
        _decode_stage1[grid](
            qr, qr.stride(0), qr.stride(1), q_scale, cap, cache, kt["centroids_bf16"], vt["centroids_bf16"],
            kv_indptr, kv_indices, plan.num_splits, int(sliding_window), parts, plen, window is not None, ring, wsize,
            block_w, first_args, first is not None, **common,
        )
    preload_m = d_v <= 128
    _decode_stage2[(B, h_kv)](
        parts, plan.num_splits, int(sliding_window), vt["msign_bf16"] if preload_m else vt["msign"], out3,
        out3.stride(0), out3.stride(1), kv_indptr, kv_indices, plen, first_args[6],
        sinks if sinks is not None else plen, G=G, BLOCK_G=BLOCK_G, V_D=d_v, BLOCK_DO=min(d_v, 64),
        BLOCK_N=plan.block_n, MV_SCALE=vt["mscale"], HAS_RING=window is not None, HAS_FIRST=first is not None,
        HAS_SINK=sinks is not None, PRELOAD_M=preload_m,
        PDL=plan.pdl, num_warps=4, launch_pdl=plan.pdl,
    )
    return out
