"""Triton extend (chunked prefill) attention over a packed prefix plus the new, unquantized tokens.

Grid (num_seqs, H_q, cdiv(max_extend_len, BLOCK_M)). The launch function rotates everything into the
storage domain with small torch matmuls: q_all = q [M_k; S M_k]^T (rotated query + QJL sketch),
k~ = (k_new - mu) M_k^T (mu: the optional key-centering mean, the same one compress subtracted from
the stored prefix keys; scores of prefix and new tokens then shift by the same q.mu), v~ = v_new M_v^T (PROD keys: the new tokens use their exact k~, no QJL). One
fp32 accumulator in V's rotated domain then serves both parts:
  - prefix: BLOCK_N tiles dequantized in registers exactly as in decode (no dequantized copy of the
    prefix ever goes to HBM), all prefix tokens visible to every query;
  - new tokens: bf16 tiles of k~ / v~ (rotated in fp32, stored in bf16: the MMA operand's precision), causal (token j visible to query i iff j <= i) unless causal=False.
The output is un-rotated once at the end (o = o_rot M_v) and written in q's dtype.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (LOG2E, cache_args, fmt_constexpr, kernel_tables, online_softmax_step, packed_tile_update,
                      softcap_log2, unrotate_store)
from .codec import TQCodec, padded_launch
from .decode import _merge_step, merge_weights, num_sms, sink_step
from .verify import PrefixRing, TreeMask
from .window import ExtendWindow, FirstRows, check_first_rows


@triton.jit
def _new_token_softmax_step(s, cols, cmask, rows, m_i, l_i, logit_cap, sliding_window, CAUSAL: tl.constexpr,
                            SLIDING: tl.constexpr, USE_CAP: tl.constexpr):
    """Online-softmax step over a tile of new tokens (columns `cols` of the sequence's new run) for query
    rows `rows`: soft-cap, the visibility mask `cmask` ([1, N] padding, or [M, N] with a draft tree's
    mask), causal mask (token j visible to query i iff j <= i) and the sliding window (iff
    i - j < sliding_window, with SLIDING). A padded row may see nothing yet; its max stays -inf and its sums
    0. Returns (p, alpha, m_new, l_new)."""
    s = softcap_log2(s, logit_cap, USE_CAP)
    valid = cmask
    if CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if SLIDING:
        valid = valid & (rows[:, None] - cols[None, :] < sliding_window)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit(do_not_specialize=["num_splits", "sliding_window"])
def _extend_kernel(qr, new, cache, kcent_ptr, vcent_ptr, qo_indptr, kv_indptr, kv_indices, mv_ptr, out, ws,
                   num_splits, sliding_window, sink_ptr, q_scale, logit_cap, tree, exact, TREE: tl.constexpr,
                   PRING: tl.constexpr, SLIDING: tl.constexpr, HAS_FIRST: tl.constexpr, HAS_SINK: tl.constexpr,
                   G: tl.constexpr,
                   BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr, USE_CAP: tl.constexpr,
                   BLOCK_DO: tl.constexpr, MV_SCALE: tl.constexpr, WINDOW: tl.constexpr, NEW: tl.constexpr,
                   K_REG: tl.constexpr, K_ASM: tl.constexpr, V_REG: tl.constexpr, V_ASM: tl.constexpr,
                   KF: tl.constexpr, VF: tl.constexpr):
    """qr: (rotated queries, token stride, head stride); new: (k~, token stride, head stride, v~, token
    stride, head stride, k_old~, v_old~); cache: `cache_args`; out: (out, token stride, head stride);
    ws: (partials, lse, split stride, token stride, head stride). SLIDING (sliding_window > 0): query i of
    the new run (position pre + i) sees positions j > pre + i - sliding_window only; whole prefix tiles
    before the block's first visible position are skipped. The window is a constexpr flag, not a
    runtime test: its [rows, tile] mask is a selection per score in the prefix loop, which full-attention
    layers must not pay. HAS_SINK (unsplit launches; else the merge
    adds it): sink_ptr's logit per query head joins the denominator. TREE (speculative verify): tree =
    (mask, mask indptr) in SGLang's layout (`tq_kernels.verify.TreeMask`) decides which new tokens each
    new token sees, instead of causality. exact: the exact rows the prefix may read instead of its codes,
    (ring k, its token and head strides, ring v, its strides, lo, base, W, table k, its two strides,
    table v, its two strides, slot flags). PRING (`tq_kernels.verify.PrefixRing`): new token r reads prefix
    positions [lo[r], prefix) from the ring. HAS_FIRST (`tq_kernels.window.FirstRows`): the prefix's
    position 0 comes from the first-token table where its slot is flagged (rows that read it from the
    codes; the first split)."""
    # BLOCK_G == 1: program axis 1 is the query head, and the BLOCK_M rows are BLOCK_M new tokens.
    # BLOCK_G > 1 (GQA packing): axis 1 is the KV head, and row r is token r // BLOCK_G of query head
    # h * G + r % BLOCK_G, so each packed prefix tile is dequantized once for the whole group.
    # SPLIT (split-K over the prefix): axis 2 is (block of new tokens, split); split sp reads its share of
    # the prefix, the last split also the new tokens, and each writes its normalized accumulator and lse
    # to the workspace for _extend_merge_kernel.
    # NEW == False (the new tokens' attention comes from another kernel, `new_part`): only the prefix is
    # read, always through the workspace (SPLIT), and the merge folds in that outside partial.
    qr_ptr, qr_t, qr_h = qr
    kn_ptr, kn_t, kn_h, vn_ptr, vn_t, vn_h, ko_ptr, vo_ptr = new
    out_ptr, out_t, out_h = out
    ws_acc_ptr, ws_lse_ptr, ws_s, ws_t, ws_h = ws
    K_D: tl.constexpr = KF.D
    V_D: tl.constexpr = VF.D
    i = tl.program_id(0)
    h = tl.program_id(1)
    if SPLIT:
        mb = tl.program_id(2) // num_splits
        sp = tl.program_id(2) % num_splits
    else:
        mb = tl.program_id(2)
        sp = 0
    BLOCK_T: tl.constexpr = BLOCK_M // BLOCK_G  # new tokens per program
    q0 = tl.load(qo_indptr + i)
    ext = tl.load(qo_indptr + i + 1) - q0
    if mb * BLOCK_T >= ext:
        return
    if BLOCK_G == 1:
        hk = h // G
        head = h
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)  # each row's token in the sequence's new run
        rmask = rows < ext
    else:
        r = tl.arange(0, BLOCK_M)
        hk = h
        head = h * G + r % BLOCK_G
        rows = mb * BLOCK_T + r // BLOCK_G
        rmask = (rows < ext) & (r % BLOCK_G < G)
    dk = tl.arange(0, K_D)
    dv = tl.arange(0, V_D)
    qrow = qr_ptr + (q0 + rows).to(tl.int64) * qr_t + head * qr_h
    q = (tl.load(qrow[:, None] + dk[None, :], mask=rmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)
    sk = q  # unused unless PROD keys
    if KF.QJLOFF >= 0:
        sk = (tl.load(qrow[:, None] + K_D + dk[None, :], mask=rmask[:, None], other=0.0) * q_scale).to(tl.bfloat16)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, V_D), tl.float32)

    # ---- packed prefix: dequantized tile by tile in registers
    kv0 = tl.load(kv_indptr + i)
    pre = tl.load(kv_indptr + i + 1) - kv0
    p_lo = 0
    p_hi = pre
    if SPLIT:  # whole BLOCK_N tiles per split
        chunk = tl.cdiv(tl.cdiv(pre, num_splits), BLOCK_N) * BLOCK_N
        p_lo = sp * chunk
        p_hi = tl.minimum(pre, p_lo + chunk)
    # a sliding window: tiles wholly before the block's first row's window hold nothing any row sees
    row0 = mb * BLOCK_T
    if SLIDING:
        first = tl.maximum(pre + row0 - sliding_window + 1, 0)
        p_lo = tl.maximum(p_lo, (first // BLOCK_N) * BLOCK_N)
    if PRING:  # each row reads the codes below its ring start only
        rk_ptr, rk_t, rk_h, rv_ptr, rv_t, rv_h, lo_ptr, base_ptr, wsize, _, _, _, _, _, _, _ = exact
        lo_r = tl.minimum(tl.load(lo_ptr + q0 + rows, mask=rmask, other=0), pre)
        p_hi = tl.minimum(p_hi, tl.max(tl.where(rmask, lo_r, 0), axis=0))
    e0 = -1  # the first-token table entry serving the prefix's position 0 (-1: the codes)
    if HAS_FIRST:
        _, _, _, _, _, _, _, _, _, fk_ptr, fk_t, fk_h, fv_ptr, fv_t, fv_h, flags_ptr = exact
        slot0 = tl.load(kv_indices + kv0, mask=pre > 0, other=0).to(tl.int64)
        e0 = tl.where(pre > 0, tl.load(flags_ptr + slot0, mask=pre > 0, other=0).to(tl.int32) - 1, -1)
        see0 = rmask & (e0 >= 0)
        if SLIDING:
            see0 = see0 & (pre + rows < sliding_window)
        if SPLIT:
            see0 = see0 & (sp == 0)
        if PRING:
            see0 = see0 & (lo_r > 0)
        row0e = tl.maximum(e0, 0).to(tl.int64)
        k0 = tl.load(fk_ptr + row0e * fk_t + hk * fk_h + dk, mask=(dk < K_D) & (e0 >= 0), other=0.0)
        s0 = softcap_log2(tl.sum(q.to(tl.float32) * k0.to(tl.float32)[None, :], axis=1), logit_cap, USE_CAP)
        m_i = tl.where(see0, s0, float("-inf"))  # the first key of the online softmax: its weight is 1
        l_i = tl.where(see0, 1.0, 0.0)
        v0 = tl.load(fv_ptr + row0e * fv_t + hk * fv_h + dv, mask=(dv < V_D) & (e0 >= 0), other=0.0)
        acc = l_i[:, None] * v0.to(tl.float32)[None, :]
    for n0 in range(p_lo, p_hi, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        nmask = offs < p_hi
        valid = nmask[None, :]
        if SLIDING:
            valid = valid & (pre + rows[:, None] - offs[None, :] < sliding_window)
        if HAS_FIRST:  # [1, BLOCK_N]: no per-score select
            valid = valid & ((offs[None, :] > 0) | (e0 < 0))
        if PRING:
            valid = valid & (offs[None, :] < lo_r[:, None])
        slot = tl.load(kv_indices + kv0 + offs, mask=nmask, other=0).to(tl.int64)
        m_i, l_i, acc = packed_tile_update(q, sk, m_i, l_i, acc, slot, nmask, hk, logit_cap, cache, kcent_ptr,
                                           vcent_ptr, KF, VF, K_REG, K_ASM, V_REG, V_ASM, USE_CAP, True, valid)

    # ---- the prefix's recent positions from the ring (exact, rotated like k~ / v~): the last split's
    if PRING:
        r_lo = tl.min(tl.where(rmask, lo_r, pre), axis=0)
        r_hi = pre
        if SPLIT:
            r_hi = tl.where(sp == num_splits - 1, r_hi, r_lo)
        wbase = tl.load(base_ptr + i).to(tl.int64)
        for n0 in range(r_lo, r_hi, BLOCK_N):
            offs = n0 + tl.arange(0, BLOCK_N)
            nmask = offs < r_hi
            rrow = wbase + (offs % wsize).to(tl.int64)
            k = tl.load(rk_ptr + rrow[:, None] * rk_t + hk * rk_h + dk[None, :], mask=nmask[:, None], other=0.0)
            valid = nmask[None, :] & (offs[None, :] >= lo_r[:, None])
            p, alpha, m_i, l_i = online_softmax_step(tl.dot(q, tl.trans(k)), valid, m_i, l_i, logit_cap, USE_CAP)
            v = tl.load(rv_ptr + rrow[:, None] * rv_t + hk * rv_h + dv[None, :], mask=nmask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)

    # ---- new tokens (already rotated, unquantized): causal, or a draft tree's mask
    if NEW:  # else the new tokens' part comes from new_part, merged by _extend_merge_kernel
        if CAUSAL and not TREE:
            hi = tl.minimum(ext, (mb + 1) * BLOCK_T)
        else:
            hi = ext
        if TREE:
            tmask_ptr, tind_ptr = tree
            mrow = tmask_ptr + tl.load(tind_ptr + i).to(tl.int64) + rows.to(tl.int64) * (pre + ext) + pre
        if SPLIT:
            hi = tl.where(sp == num_splits - 1, hi, 0)
        c_lo = 0
        if SLIDING:
            c_lo = (tl.maximum(row0 - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        for n0 in range(c_lo, hi, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            cmask = cols < hi
            tok = (q0 + cols).to(tl.int64)
            seen = cmask[None, :]
            if TREE:
                seen = seen & (tl.load(mrow[:, None] + cols[None, :], mask=rmask[:, None] & seen, other=0) != 0)
            k = tl.load(kn_ptr + tok[:, None] * kn_t + hk * kn_h + dk[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))
            if WINDOW > 0:  # key j exact for query i when i - j < WINDOW, else as the codes give it back
                recent = (rows[:, None] - cols[None, :]) < WINDOW
                ko = tl.load(ko_ptr + tok[:, None] * kn_t + hk * kn_h + dk[None, :], mask=cmask[:, None], other=0.0)
                s = tl.where(recent, s, tl.dot(q, tl.trans(ko)))
            p, alpha, m_i, l_i = _new_token_softmax_step(s, cols, seen, rows, m_i, l_i, logit_cap, sliding_window,
                                                         CAUSAL and not TREE, SLIDING, USE_CAP)
            v = tl.load(vn_ptr + tok[:, None] * vn_t + hk * vn_h + dv[None, :], mask=cmask[:, None], other=0.0)
            if WINDOW > 0:
                vo = tl.load(vo_ptr + tok[:, None] * vn_t + hk * vn_h + dv[None, :], mask=cmask[:, None], other=0.0)
                acc = (acc * alpha[:, None] + tl.dot(tl.where(recent, p, 0.0).to(tl.bfloat16), v)
                       + tl.dot(tl.where(recent, 0.0, p).to(tl.bfloat16), vo))
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)

    if HAS_SINK:  # unsplit only (SPLIT: the merge adds the sink once)
        alpha, l_i = sink_step(m_i, l_i, tl.load(sink_ptr + head).to(tl.float32))
        acc = acc * alpha[:, None]
    has = l_i > 0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:  # the normalized partial and its lse (log2 units; -inf: nothing seen), as decode's splits
        wrow = sp.to(tl.int64) * ws_s + (q0 + rows).to(tl.int64) * ws_t + head * ws_h
        tl.store(ws_acc_ptr + wrow[:, None] * V_D + dv[None, :], acc, mask=rmask[:, None])
        tl.store(ws_lse_ptr + wrow, tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf")),
                 mask=rmask)
    else:
        orow = out_ptr + (q0 + rows).to(tl.int64) * out_t + head * out_h
        unrotate_store(acc, mv_ptr, orow, rmask, V_D, BLOCK_DO, MV_SCALE)


@triton.jit(do_not_specialize=["num_splits"])
def _extend_merge_kernel(ws_acc_ptr, ws_lse_ptr, ws_s, ws_t, ws_h, qo_indptr, n_seqs, num_splits, mv_ptr,
                         out_ptr, out_t, out_h, no_ptr, no_t, no_h, nl_ptr, nl_t, nl_h, sink_ptr,
                         V_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DO: tl.constexpr,
                         MV_SCALE: tl.constexpr, NEW_PART: tl.constexpr, HAS_SINK: tl.constexpr):
    """The splits' normalized partials of BLOCK_R new tokens of one query head -> the merged, un-rotated
    output (decode's log-sum-exp step, `_merge_step`). NEW_PART: one more normalized partial, the new
    tokens' attention from another kernel (no_ptr, un-rotated, with its lse at nl_ptr in log2 units):
    its weight goes on after the un-rotation, which is linear. Rows past the batch's real tokens
    (piecewise-graph padding) are left untouched. HAS_SINK: the head's sink joins the denominator."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    head = tl.program_id(1)
    rmask = rows < tl.load(qo_indptr + n_seqs)
    dv = tl.arange(0, V_D)
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, V_D), tl.float32)
    for sp in range(num_splits):
        wrow = sp * ws_s + rows.to(tl.int64) * ws_t + head * ws_h
        lse = tl.load(ws_lse_ptr + wrow, mask=rmask, other=float("-inf"))
        o = tl.load(ws_acc_ptr + wrow[:, None] * V_D + dv[None, :], mask=rmask[:, None], other=0.0)
        m, l_sum, acc = _merge_step(m, l_sum, acc, lse, o)
    orow = out_ptr + rows.to(tl.int64) * out_t + head * out_h
    sink = 0.0
    if HAS_SINK:
        sink = tl.load(sink_ptr + head).to(tl.float32)
    if NEW_PART:
        lse_n = tl.load(nl_ptr + rows.to(tl.int64) * nl_t + head * nl_h, mask=rmask, other=float("-inf"))
        m_new, alpha, beta = merge_weights(m, lse_n)
        l_tot = l_sum * alpha + beta
        if HAS_SINK:
            a_s, l_tot = sink_step(m_new, l_tot, sink)
            alpha = alpha * a_s
            beta = beta * a_s
        l_tot = tl.where(l_tot > 0, l_tot, 1.0)
        acc = acc * (alpha / l_tot)[:, None]
        nrow = no_ptr + rows.to(tl.int64) * no_t + head * no_h
        unrotate_store(acc, mv_ptr, orow, rmask, V_D, BLOCK_DO, MV_SCALE, nrow, beta / l_tot)
    else:
        if HAS_SINK:
            a_s, l_sum = sink_step(m, l_sum, sink)
            acc = acc * a_s[:, None]
        acc = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
        unrotate_store(acc, mv_ptr, orow, rmask, V_D, BLOCK_DO, MV_SCALE)


WORKSPACE_CAP_BYTES = 256 << 20


def choose_extend_splits(programs: int, max_prefix_len: int, rows: int, heads: int, d_v: int, device,
                         block_n: int = 64) -> int:
    """Prefix splits for an extend whose grid has `programs` programs: enough to give the GPU two per SM
    when the grid alone does not, each split at least 8 prefix tiles, at most 16, and the fp32
    partials ([splits, rows, heads, d_v + 1]) within WORKSPACE_CAP_BYTES. 1 where the grid fills the
    GPU: every program already walks the whole prefix once."""
    sms = num_sms(device)
    if programs >= sms or max_prefix_len < 16 * block_n:
        return 1
    want = min(triton.cdiv(2 * sms, max(programs, 1)), max_prefix_len // (8 * block_n), 16)
    cap = WORKSPACE_CAP_BYTES // max(rows * heads * (d_v + 1) * 4, 1)
    return int(max(1, min(want, cap)))


def _register_lut_width(tables: dict, fmt) -> int:
    """The first code field's width (4 or 2) where `centroid_tile` takes the register LUT for this
    format (one main field, or a second 1-bit one: 3- and 5-bit codes); else 0 (per-code gathers)."""
    if not tables["register_lut_kind"]:
        return 0
    return [w for k, w, *_ in fmt.fields if k == "main"][0]


def choose_block_m(n_seqs: int, h_q: int, max_extend_len: int, device) -> int:
    """Query rows per program. Every program dequantizes the whole prefix once, so more rows per program
    means fewer dequantizations per row: 128 rows with 8 warps where the grid still has two programs
    per SM, else 64."""
    return 128 if n_seqs * h_q * triton.cdiv(max(max_extend_len, 1), 128) >= 2 * num_sms(device) else 64


def choose_gqa_pack(group: int, max_extend_len: int) -> bool:
    """Pack the query group into each program's rows when the longest new-token run of the whole group
    fits one 128-row block: a program per query head would then fill a quarter to a half of its rows
    and dequantize the prefix G times (many short turns over long cached histories)."""
    return group > 1 and max_extend_len * triton.next_power_of_2(group) <= 128


@padded_launch  # head_dim 80 / 96: tensors at the model's dims, the launch at the codec's
def extend_attention(q, k_new, v_new, k_codes, k_scales, v_codes, v_scales, kcodec: TQCodec, vcodec: TQCodec,
                     qo_indptr, kv_indptr, kv_indices, sm_scale: float, logit_cap: float = 0.0,
                     causal: bool = True, out=None, *, max_extend_len: Optional[int] = None,
                     max_prefix_len: Optional[int] = None, k_mean=None, window: Optional[ExtendWindow] = None,
                     new_part: Optional[tuple] = None, block_m: Optional[int] = None, block_n: int = 64,
                     num_warps: Optional[int] = None, gqa_pack: Optional[bool] = None,
                     num_splits: Optional[int] = None, sliding_window: int = 0, sinks=None,
                     tree: Optional[TreeMask] = None, prefix_ring: Optional[PrefixRing] = None,
                     first: Optional[FirstRows] = None):
    """q [T, H_q, d_k], k_new [T, H_kv, d_k], v_new [T, H_kv, d_v] -> out [T, H_q, d_v] (q's dtype).
    max_extend_len: longest new-token run of a sequence (Python int); computed with a host sync
    when not given. max_prefix_len: the longest cached prefix (Python int; enables split-K).
    k_mean: optional fp32 [H_kv, d_k], the key-centering mean the cache was written with: the new
    tokens' keys are centered the same way (k_new - k_mean) so all scores shift by the same q.k_mean.
    The prefix tiles' centroids come from the bf16 register LUT where the format has one (2-/3-/4-/5-bit
    codes; gathers in the interpreter and for outlier / 6-bit formats), and the per-token scales
    multiply the dequantized K / V tiles.
    Launch choices (None: chosen here): block_m `choose_block_m` (>= 32; 16-wide tiles gave wrong
    results on sm_90), num_warps 8 for block_m >= 128 else 4, gqa_pack `choose_gqa_pack` (one program
    per (sequence, KV head) and block of new tokens, its rows covering the whole query group, so the
    prefix is dequantized once per group), num_splits `choose_extend_splits` (split-K over the prefix
    for grids too small to fill the GPU, e.g. a lone turn over a long history; needs max_prefix_len,
    else 1): each split walks its share of the prefix, the last one also the new tokens, into fp32
    partials that `_extend_merge_kernel` merges and un-rotates.
    window (`tq_kernels.window.ExtendWindow`, for measuring the cache format with a recent window): new
    key j is seen exact by query i when i - j < window.size, else as window.k_old / v_old (the keys and
    values as the codes give them back; k_old already centered, so k_mean applies to k_new only).
    new_part (o_new, lse_new): the new tokens' attention over themselves already computed by another
    kernel (e.g. FlashInfer's ragged prefill with its lse): o_new [T, H_q, d_v] in the original domain,
    lse_new fp32 [T, H_q] in log2 units (log2 of the sum of exp(score * sm_scale), soft-capped as here;
    FlashInfer's convention). This kernel then reads only the prefix, into fp32 partials, and the merge
    launch folds o_new in by its lse. k_new / v_new are not read (no window then).
    sliding_window: query i (position prefix + i) sees positions j > prefix + i - sliding_window only
    (0: all); not with new_part (that kernel would have to apply it). sinks: [H_q] logits (natural-log
    units, like the scaled scores) added to each head's softmax denominator.
    tree / prefix_ring (speculative verify, `tq_kernels.verify`): the new tokens are draft tokens that see
    each other where the tree mask says (not causally), and each reads its recent prefix positions from
    the ring; neither with a sliding window, an evaluation window or new_part.
    first (`tq_kernels.window.FirstRows`): a prefix's position 0 comes from the first-token table where its
    slot is flagged (and the query reads it from the codes: inside its sliding window, before its ring)."""
    kf, vf = kcodec.fmt, vcodec.fmt
    if (tree is not None or prefix_ring is not None) and (
            sliding_window > 0 or new_part is not None or (window is not None and window.size > 0)):
        raise ValueError("extend: a draft tree / prefix ring (verify) does not combine with a sliding window, "
                         "an evaluation window or new_part")
    if new_part is not None and window is not None and window.size > 0:
        raise ValueError("extend: new_part and a recent window (evaluation view) do not combine")
    if new_part is not None and sliding_window > 0:
        raise ValueError("extend: new_part and a sliding window do not combine (new_part's kernel would apply it)")
    if sliding_window < 0:
        raise ValueError(f"extend: sliding_window must be >= 0 (0: full attention), got {sliding_window}")
    if vf.qjl:
        raise ValueError("extend: the PROD (QJL) format is for keys only; V has no QJL field")
    if (block_m is not None and block_m < 32) or block_n < 32:
        raise ValueError(f"extend: block_m / block_n must be >= 32 (got {block_m}, {block_n})")
    d_k, d_v = kf.head_dim, vf.head_dim
    T = q.shape[0]
    q3 = q.reshape(T, -1, d_k)
    h_q, h_kv = q3.shape[1], k_codes.shape[1]
    if h_q % h_kv:
        raise ValueError(f"extend: {h_q} query heads are not a multiple of {h_kv} KV heads")
    G = h_q // h_kv
    dev = q.device
    if out is None:
        out = torch.empty(T, h_q, d_v, dtype=q.dtype, device=dev)
    out3 = out.view(T, h_q, d_v)
    assert out3.stride(2) == 1
    n_seqs = qo_indptr.shape[0] - 1
    if T == 0 or n_seqs <= 0:
        return out
    if max_extend_len is None:
        max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max().item())
    if max_extend_len <= 0:
        return out
    if gqa_pack is None:
        gqa_pack = choose_gqa_pack(G, max_extend_len) and (block_m is None or block_m >= triton.next_power_of_2(G))
    block_g = triton.next_power_of_2(G) if gqa_pack else 1
    if block_m is None:
        block_m = choose_block_m(n_seqs, h_q, max_extend_len, dev)
    if block_m < block_g:
        raise ValueError(f"extend: block_m ({block_m}) must hold the padded query group ({block_g})")
    if num_warps is None:
        num_warps = 8 if block_m >= 128 else 4
    kt, vt = kernel_tables(kcodec, dev), kernel_tables(vcodec, dev)
    qr = torch.matmul(q3.to(torch.float32), kt["wt"])                              # [T, H_q, d_k (+m)]
    if new_part is not None:  # the new tokens' K/V are not read: any tensor stands in for them
        kn = vn = qr
    else:
        kn = k_new.reshape(T, h_kv, d_k).to(torch.float32)
        if k_mean is not None:
            if tuple(k_mean.shape) != (h_kv, d_k):
                raise ValueError(f"extend: k_mean must be [{h_kv}, {d_k}], got {tuple(k_mean.shape)}")
            kn = kn - k_mean.to(device=dev, dtype=torch.float32)
        kn = torch.matmul(kn, kt["mt"]).to(torch.bfloat16)                        # k~ = (k - mu) M_k^T
        vn = torch.matmul(v_new.reshape(T, h_kv, d_v).to(torch.float32), vt["mt"]).to(torch.bfloat16)  # v~ = v M_v^T
    if window is not None and window.size > 0:
        ko = torch.matmul(window.k_old.reshape(T, h_kv, d_k).to(torch.float32), kt["mt"]).to(torch.bfloat16)
        vo = torch.matmul(window.v_old.reshape(T, h_kv, d_v).to(torch.float32), vt["mt"]).to(torch.bfloat16)
        wsize = int(window.size)
        assert ko.stride() == kn.stride() and vo.stride() == vn.stride()  # the kernel reads them with kn's / vn's strides
    else:
        ko, vo, wsize = kn, vn, 0
    use_cap = bool(logit_cap and logit_cap > 0)
    k_reg, v_reg = _register_lut_width(kt, kf), _register_lut_width(vt, vf)
    q_scale = float(sm_scale) * (1.0 if use_cap else LOG2E)
    blocks = triton.cdiv(max_extend_len, block_m // block_g)
    heads_axis = h_kv if gqa_pack else h_q
    if num_splits is None:
        num_splits = (choose_extend_splits(n_seqs * heads_axis * blocks, max_prefix_len, T, h_q, d_v, dev, block_n)
                      if max_prefix_len is not None else 1)
    num_splits = max(1, int(num_splits))
    split = num_splits > 1 or new_part is not None
    if split:  # fp32 partials: [splits, T, H_q] rows of d_v (normalized accumulator) and their lse
        ws_acc = torch.empty(num_splits, T, h_q, d_v, dtype=torch.float32, device=dev)
        ws_lse = torch.empty(num_splits, T, h_q, dtype=torch.float32, device=dev)
    else:
        ws_acc = ws_lse = out3
    grid = (n_seqs, heads_axis, blocks * num_splits)
    if sinks is not None:
        assert sinks.shape == (h_q,) and sinks.stride(0) == 1, (tuple(sinks.shape), h_q)
    sink_arg = sinks if sinks is not None else qo_indptr
    tree_arg = (tree.mask, tree.indptr) if tree is not None else (qo_indptr, qo_indptr)
    if prefix_ring is not None:
        rk, rv = prefix_ring.k, prefix_ring.v
        assert rk.dtype == torch.bfloat16 and rk.shape[1:] == (h_kv, d_k) and rv.shape[1:] == (h_kv, d_v)
        assert rk.stride(2) == 1 and rv.stride(2) == 1 and prefix_ring.lo.shape[0] >= T
        pring_arg = (rk, rk.stride(0), rk.stride(1), rv, rv.stride(0), rv.stride(1), prefix_ring.lo,
                     prefix_ring.base, int(prefix_ring.size))
    else:
        pring_arg = (qr, 0, 0, qr, 0, 0, qo_indptr, qo_indptr, 1)
    if first is not None:
        check_first_rows(first, h_kv, d_k, d_v)
        first_arg = (first.k, first.k.stride(0), first.k.stride(1), first.v, first.v.stride(0), first.v.stride(1),
                     first.flags)
    else:
        first_arg = (qr, 0, 0, qr, 0, 0, qo_indptr)
    _extend_kernel[grid](
        (qr, qr.stride(0), qr.stride(1)),
        (kn, kn.stride(0), kn.stride(1), vn, vn.stride(0), vn.stride(1), ko, vo),
        cache_args(k_codes, k_scales, v_codes, v_scales), kt["centroids_bf16"], vt["centroids_bf16"],
        qo_indptr, kv_indptr, kv_indices, vt["msign"], (out3, out3.stride(0), out3.stride(1)),
        (ws_acc, ws_lse, T * h_q, h_q, 1), num_splits, int(sliding_window), sink_arg, q_scale,
        float(logit_cap) if use_cap else 1.0, tree_arg, pring_arg + first_arg, TREE=tree is not None,
        PRING=prefix_ring is not None, SLIDING=sliding_window > 0, HAS_FIRST=first is not None,
        HAS_SINK=sinks is not None and not split, G=G, BLOCK_G=block_g,
        BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=bool(causal), SPLIT=split,
        USE_CAP=use_cap, BLOCK_DO=min(d_v, 64), MV_SCALE=vt["mscale"], WINDOW=wsize, NEW=new_part is None,
        K_REG=k_reg, K_ASM=kt["lut_asm"] if k_reg else "", V_REG=v_reg, V_ASM=vt["lut_asm"] if v_reg else "",
        KF=fmt_constexpr(kf), VF=fmt_constexpr(vf), num_warps=num_warps, num_stages=2,
    )
    if split:
        if new_part is not None:
            o_new = new_part[0].view(-1, h_q, d_v)
            lse_new = new_part[1].view(-1, h_q)
            assert o_new.shape[0] >= T and lse_new.shape[0] >= T and o_new.stride(2) == 1
            assert lse_new.dtype == torch.float32
        else:
            o_new, lse_new = out3, ws_lse[0]
        _extend_merge_kernel[(triton.cdiv(T, 32), h_q)](
            ws_acc, ws_lse, T * h_q, h_q, 1, qo_indptr, n_seqs, num_splits, vt["msign"], out3, out3.stride(0),
            out3.stride(1), o_new, o_new.stride(0), o_new.stride(1), lse_new, lse_new.stride(0), lse_new.stride(1),
            sink_arg, V_D=d_v, BLOCK_R=32, BLOCK_DO=min(d_v, 64), MV_SCALE=vt["mscale"],
            NEW_PART=new_part is not None, HAS_SINK=sinks is not None, num_warps=4)
    return out
