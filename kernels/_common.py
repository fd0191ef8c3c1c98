"""Shared pieces of the Triton kernels: the packed layout as one constexpr (`Fmt`, taken from
VecFormat.fields, never redefined here), in-register unpacking of LSB-first bit fields, register LUTs
(PTX byte permutes over a codebook held in registers), cached device tables.

Unpacking: a field of width w holds per = 8 / w codes per byte, coordinate i in byte i // per at bit
(i % per) * w. A [BLOCK_N, n*w/8] uint8 tile (contiguous per row -> vector loads) is split into `per`
shifted-and-masked planes of the same shape, and a bit-reversal tree of tl.interleave puts the
planes back into coordinate order ([BLOCK_N, n]). tl.interleave is join (new minor dim of size 2,
held per thread) + reshape merging it, which the compiler lowers to register renaming, unlike a
3-D broadcast + reshape whose layout it may have to convert through shared memory.

Interpreter path: TRITON_INTERPRET=1 cannot run inline PTX, so there every register LUT's ASM string
is "" and the jit helpers gather the same bf16 / int8 table entries from memory instead.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .codec import TQCodec, VecFormat

LOG2E = 1.4426950408889634
SQRT_PI_2 = math.sqrt(math.pi / 2.0)


class Fmt(NamedTuple):
    """One packed format as a single tl.constexpr: widths, byte offsets and shifts of its fields
    (main fields M0 / M1, outlier extras X0 / X1, QJL signs; -1 / 0 where absent)."""
    D: int        # head dim
    LO: int       # bits of the low (non-outlier) codes
    M0W: int
    M0OFF: int
    M1W: int
    M1OFF: int
    M1SH: int
    QJLOFF: int   # -1: no QJL field
    NOUT: int     # outlier positions (0: none), one every OSTRIDE coordinates
    OSTRIDE: int
    X0W: int
    X0OFF: int
    X0SH: int
    X1W: int
    X1OFF: int
    X1SH: int


@functools.lru_cache(maxsize=None)
def fmt_constexpr(fmt: VecFormat) -> Fmt:
    """VecFormat -> Fmt. Every number comes from fmt.fields."""
    mains = [(w, off, sh) for kind, w, n, off, sh in fmt.fields if kind == "main"]
    extras = [(w, off, sh) for kind, w, n, off, sh in fmt.fields if kind == "extra"]
    qjl = [off for kind, w, n, off, sh in fmt.fields if kind == "qjl"]
    assert 1 <= len(mains) <= 2 and len(extras) <= 2 and len(qjl) <= 1, fmt.fields
    assert mains[0][2] == 0
    m1 = mains[1] if len(mains) > 1 else (0, 0, 0)
    x0 = extras[0] if extras else (0, 0, 0)
    x1 = extras[1] if len(extras) > 1 else (0, 0, 0)
    return Fmt(fmt.head_dim, fmt.mse_bits, mains[0][0], mains[0][1], m1[0], m1[1], m1[2],
               qjl[0] if qjl else -1, fmt.outlier_channels, fmt.outlier_stride,
               x0[0], x0[1], x0[2], x1[0], x1[1], x1[2])


def interpreting() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's CPU interpreter (no inline asm there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


try:  # grid dependency control (programmatic dependent launch, sm_90+); Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait  # noqa: F401
    HAS_GDC = True
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False


@functools.lru_cache(maxsize=None)
def _sm90_or_newer(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_ok(device) -> bool:
    """Programmatic dependent launch possible here: a CUDA device of sm_90 or newer, Triton with GDC,
    not the interpreter (which has no PTX). The decode step then launches stage 1 as a dependent of
    compress and stage 2 as one of stage 1, so each gets on the SMs while the one before finishes."""
    dev = torch.device(device)
    return (HAS_GDC and dev.type == "cuda" and not interpreting()
            and _sm90_or_newer(dev.index if dev.index is not None else torch.cuda.current_device()))


def use_triton(t: torch.Tensor) -> bool:
    """Triton path when the data is on CUDA or the Triton interpreter is on (CPU tensors)."""
    return t.is_cuda or interpreting()


def lut_kind(fmt: VecFormat) -> str:
    """Which bf16 register LUT serves fmt's codes: "single" (one 4- or 2-bit field), "split" (3-bit codes:
    a 2-bit field and its 1-bit high field), "split5" (5-bit: 4 + 1) or "" (outliers, 6-bit codes)."""
    mains = [w for kind, w, *_ in fmt.fields if kind == "main"]
    if fmt.outlier_channels:
        return ""
    return {(2,): "single", (4,): "single", (2, 1): "split", (4, 1): "split5"}.get(tuple(mains), "")


def kernel_tables(codec: TQCodec, device) -> dict:
    """Device tables of one codec, cached inside the codec next to its own device_tables():
    M (u = M x) and M^T as int8 signs with their one magnitude (the rotation is +-1 / sqrt(d)), bf16
    signs of M (decode stage 2's operand as loaded), the centroid tables (fp32, bf16, int8 with its
    scale), boundaries, S^T (PROD), the query matrix W with q_all = q @ W^T = [M q ; S M q] (one matmul
    gives the rotated query and its QJL sketch), and the register-LUT PTX strings ("" in the
    interpreter)."""
    key = ("tq_kernels", str(torch.device(device)))
    cache = codec._cache
    if key not in cache:
        t = codec.device_tables(device)
        m = t["rotation"].to(torch.float32).contiguous()
        w = m if t["qjl"] is None else torch.cat([m, t["qjl"].to(torch.float32) @ m], dim=0)
        cent = t["centroids"].to(torch.float32).contiguous()
        mag = m.abs()
        scale = float(mag.max())
        if not torch.allclose(mag, torch.full_like(mag, scale), rtol=1e-6, atol=0.0):
            raise ValueError("tq_kernels: the rotation must be a +-1 / sqrt(d) matrix (signed Hadamard)")
        table8, scale8 = int8_codebook(cent)
        asm = "" if interpreting() else None  # the interpreter cannot run inline asm
        cache[key] = dict(
            m=m, mt=m.t().contiguous(), wt=w.t().contiguous(),
            centroids=cent, centroids_bf16=cent.to(torch.bfloat16).contiguous(),
            boundaries=t["boundaries"].to(torch.float32).contiguous(),
            st=None if t["qjl"] is None else t["qjl"].to(torch.float32).t().contiguous(),
            msign_t=torch.sign(m).t().to(torch.int8).contiguous(),   # rotating rows: x M^T
            msign=torch.sign(m).to(torch.int8).contiguous(),         # un-rotating: o M
            msign_bf16=torch.sign(m).to(torch.bfloat16).contiguous(),
            mscale=scale,
            register_lut_kind=lut_kind(codec.fmt) if register_lut_asm(codec.fmt, cent) else "",
            lut_asm=asm if asm is not None else register_lut_asm(codec.fmt, cent),
            has_pairs=bool(register_lut_asm(codec.fmt, cent, pairs=True)),
            pairs_asm=asm if asm is not None else register_lut_asm(codec.fmt, cent, pairs=True),
            has_i8=bool(register_lut_i8_asm(codec.fmt, cent)),
            i8_asm=asm if asm is not None else register_lut_i8_asm(codec.fmt, cent),
            centroids_i8=table8.to(device), i8_scale=scale8,
        )
    return cache[key]


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as numpy arrays of shape (1,) and turns loop bounds into
    ints with int(array), which numpy >= 2.4 rejects (`range(lo, hi)` with tensor bounds fails).
    Convert through the single element instead. Only affects TRITON_INTERPRET=1 runs."""
    try:
        import numpy as np
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_tq_patched", False):
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))

    patched._tq_patched = True
    interp._patch_lang_tensor = patched

    # The interpreter stores bf16 as raw uint16 bits and its create_dot multiplies those integers;
    # widen bf16 operands to float32 first (exact: a bf16 value is a truncated float32).
    builder = interp.InterpreterBuilder
    orig_dot = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        def widen(h):
            if h.dtype.scalar == tl.bfloat16:
                return interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
            return h
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot

    # ... and its fp32 -> bf16 cast truncates; GPUs round to nearest even. Round like the GPU so that
    # interpreter results carry the real bf16 error, not a systematic bias.
    orig_cast = builder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            return interp.TensorHandle(r, tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.cast_impl = cast_impl


if interpreting():  # GPU runs never touch the interpreter
    _patch_interpreter_index()



def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cache_args(k_codes, k_scales, v_codes, v_scales) -> tuple:
    """The four cache buffers of a layer as one kernel argument: (codes, slot stride, head stride) and
    (scales, slot stride, head stride) for K, then V."""
    return tuple(x for t in (k_codes, k_scales, v_codes, v_scales) for x in (t, t.stride(0), t.stride(1)))


# --------------------------------------------------------------------------------------------
# jit helpers (inlined into the kernels)
# --------------------------------------------------------------------------------------------
@triton.jit
def unpack_field(rows, mask, OFF: tl.constexpr, W: tl.constexpr, N: tl.constexpr):
    """rows: [BLOCK_N] byte pointers to the start of each token-head's codes; -> int32 [BLOCK_N, N]
    with the N codes of the W-bit field at byte offset OFF, in coordinate order."""
    NB: tl.constexpr = N * W // 8
    b = tl.load(rows[:, None] + OFF + tl.arange(0, NB)[None, :], mask=mask[:, None], other=0).to(tl.int32)
    if W == 4:
        x = tl.interleave(b & 15, b >> 4)
    elif W == 2:
        x = tl.interleave(tl.interleave(b & 3, (b >> 4) & 3), tl.interleave((b >> 2) & 3, b >> 6))
    elif W == 1:
        x = tl.interleave(
            tl.interleave(tl.interleave(b & 1, (b >> 4) & 1), tl.interleave((b >> 2) & 1, (b >> 6) & 1)),
            tl.interleave(tl.interleave((b >> 1) & 1, (b >> 5) & 1), tl.interleave((b >> 3) & 1, b >> 7)))
    else:
        x = b
    return x


@triton.jit
def spread(x, STRIDE: tl.constexpr):
    """[R, n] -> [R, n * STRIDE] with x[:, j] at column j * STRIDE and zeros elsewhere."""
    if STRIDE >= 2:
        x = tl.interleave(x, tl.zeros_like(x))
    if STRIDE >= 4:
        x = tl.interleave(x, tl.zeros_like(x))
    if STRIDE >= 8:
        x = tl.interleave(x, tl.zeros_like(x))
    if STRIDE >= 16:
        x = tl.interleave(x, tl.zeros_like(x))
    if STRIDE >= 32:
        x = tl.interleave(x, tl.zeros_like(x))
    if STRIDE >= 64:
        x = tl.interleave(x, tl.zeros_like(x))
    return x


@triton.jit
def table_index(rows, mask, F: tl.constexpr):
    """int32 [BLOCK_N, D]: index into the centroid table of every coordinate of every row
    (main fields; at outlier positions j*OSTRIDE also the extra bits and the 2^LO table offset)."""
    idx = unpack_field(rows, mask, F.M0OFF, F.M0W, F.D)
    if F.M1W > 0:
        idx = idx | (unpack_field(rows, mask, F.M1OFF, F.M1W, F.D) << F.M1SH)
    if F.NOUT > 0:
        e = unpack_field(rows, mask, F.X0OFF, F.X0W, F.NOUT) << F.X0SH
        if F.X1W > 0:
            e = e | (unpack_field(rows, mask, F.X1OFF, F.X1W, F.NOUT) << F.X1SH)
        idx = idx + spread(e + (1 << F.LO), F.OSTRIDE)
    return idx


@triton.jit
def _reg_slice_code(b, h, T: tl.constexpr, W: tl.constexpr, M1W: tl.constexpr, M1SH: tl.constexpr):
    """Code of slice T (bit position T * W of every first-field byte b), with its second-field bit from
    bit T of h when M1W is 1: the table index the register LUTs look up, computed in integers (the
    interpreter path's gather index)."""
    code = (b >> (T * W)) & ((1 << W) - 1)
    if M1W == 1:
        code = code | (((h >> T) & 1) << M1SH)
    return code


@triton.jit
def centroid_tile(rows, mask, cent_ptr, F: tl.constexpr, REG: tl.constexpr, ASM: tl.constexpr):
    """bf16 [BLOCK_N, D]: the (unscaled) centroids of every coordinate of every row.
    REG 4 / 2 (= F.M0W; formats with a register LUT, `lut_kind`): the register LUT `ASM` gives the
    centroids of a whole first-field byte's slices without a memory gather, interleaved back into
    coordinate order (register renaming, no layout conversion). With a 1-bit second field (3-bit codes
    after a 2-bit field, 5-bit after a 4-bit one) its bits come along as decode's split LUTs take them.
    ASM "" (interpreter): one gather per slice. REG 0: per-code gathers from the bf16 centroid table."""
    if REG != 0:
        NB: tl.constexpr = F.D * REG // 8
        b = tl.load(rows[:, None] + F.M0OFF + tl.arange(0, NB)[None, :], mask=mask[:, None], other=0)
        h = b  # the second field's bits, one byte per first-field byte (bit T: slice T's code)
        if F.M1W == 1:
            if REG == 2:
                h = split_high_nibbles(rows, mask, F.M1OFF, F.D)
            else:
                h = split_high_crumbs(rows, mask, F.M1OFF, F.D)
        if ASM != "":
            if F.M1W == 1 and REG == 2:
                c0, c1, c2, c3 = register_lut_slices3(b, h, ASM)
            elif F.M1W == 1:
                c0, c1, c2, c3 = register_lut_slices5(b, h, ASM)
            else:
                c0, c1, c2, c3 = register_lut_slices(b, ASM, REG)
        else:
            bi = b.to(tl.int32)
            hi = h.to(tl.int32)
            c0 = tl.load(cent_ptr + _reg_slice_code(bi, hi, 0, REG, F.M1W, F.M1SH))
            c1 = tl.load(cent_ptr + _reg_slice_code(bi, hi, 1, REG, F.M1W, F.M1SH))
            c2 = c0
            c3 = c0
            if REG == 2:
                c2 = tl.load(cent_ptr + _reg_slice_code(bi, hi, 2, REG, F.M1W, F.M1SH))
                c3 = tl.load(cent_ptr + _reg_slice_code(bi, hi, 3, REG, F.M1W, F.M1SH))
        if REG == 4:
            c = tl.interleave(c0, c1)
        else:
            c = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
    else:
        c = tl.load(cent_ptr + table_index(rows, mask, F))
    return c


@triton.jit
def qjl_signs(rows, mask, QJLOFF: tl.constexpr, D: tl.constexpr):
    """bf16 [BLOCK_N, D] of +-1 from the QJL sign field (bit 1 -> +1), in coordinate order, from one
    [BLOCK_N, D / 8] byte tile. The bf16 bits are built in integers (+1 is 0x3F80, the sign bit set where
    the bit is 0): exact, right in the interpreter, and no int-to-float conversions."""
    bits = unpack_field(rows, mask, QJLOFF, 1, D)
    return (((bits ^ 1) << 15) | 0x3F80).to(tl.int16).to(tl.bfloat16, bitcast=True)


@triton.jit
def softcap_log2(s, logit_cap, USE_CAP: tl.constexpr):
    """Scores in log2 units. Without a cap, log2(e) is already folded into the query."""
    if USE_CAP:
        # cap * tanh(s / cap), tanh via exp (stable at both ends: exp -> inf gives 1, -> 0 gives -1)
        t = 1.0 - 2.0 / (tl.exp(2.0 * s / logit_cap) + 1.0)
        s = logit_cap * t * 1.4426950408889634
    return s


@triton.jit
def online_softmax_step(s, valid, m_i, l_i, logit_cap, USE_CAP: tl.constexpr):
    """One tile of the online softmax over packed tokens: soft-cap, mask what `valid` hides (the tile's
    padding columns [1, N]; with a sliding window per row [M, N], so a row may see nothing yet: its max
    stays -inf and its sums 0), new running max (log2 units), rescale factor alpha of the old sums, tile
    probabilities p. Returns (p, alpha, m_new, l_new)."""
    s = softcap_log2(s, logit_cap, USE_CAP)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    return p, alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def unrotate_store(acc, mv_ptr, out_ptrs, row_mask, DV: tl.constexpr, BLOCK_DO: tl.constexpr,
                   MV_SCALE: tl.constexpr, add_ptrs=None, add_w=None):
    """out[:, j] = sum_k acc[:, k] M_v[k, j] (x = M_v^T u), BLOCK_DO output columns at a time;
    out_ptrs [R] point at each output row (unit stride over the head dim). mv_ptr holds M_v's int8
    signs (M_v = signs * MV_SCALE); acc goes through two bf16 MMAs as hi + lo (16 mantissa bits, exact
    products, fp32 sums). add_ptrs / add_w ([R] rows and weights): out += add_w * the rows at add_ptrs
    (already un-rotated)."""
    kk = tl.arange(0, DV)
    hi = acc.to(tl.bfloat16)
    lo = (acc - hi.to(tl.float32)).to(tl.bfloat16)
    for j0 in tl.static_range(0, DV, BLOCK_DO):
        jj = j0 + tl.arange(0, BLOCK_DO)
        sg = tl.load(mv_ptr + kk[:, None] * DV + jj[None, :]).to(tl.float32).to(tl.bfloat16)
        o = tl.dot(lo, sg, tl.dot(hi, sg)) * MV_SCALE
        if add_ptrs is not None:
            o += add_w[:, None] * tl.load(add_ptrs[:, None] + jj[None, :], mask=row_mask[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptrs[:, None] + jj[None, :], o.to(out_ptrs.dtype.element_ty), mask=row_mask[:, None])


@triton.jit
def packed_tile_update(q, sk, m_i, l_i, acc, slot, nmask, hk, logit_cap, cache, kcent_ptr, vcent_ptr,
                       KF: tl.constexpr, VF: tl.constexpr, K_REG: tl.constexpr, K_ASM: tl.constexpr,
                       V_REG: tl.constexpr, V_ASM: tl.constexpr, USE_CAP: tl.constexpr,
                       SCALE_TILES: tl.constexpr, valid):
    """One BLOCK_N tile of packed tokens (slots) for a block of query rows q (rotated, scaled; sk: the
    QJL sketch for PROD keys): scores from the K codes, online softmax (fp32, log2 units), p * scale0
    against the V centroids in V's rotated domain. Shared by decode's general stage 1 and extend's
    prefix loop. cache: `cache_args`. K_REG / V_REG, K_ASM / V_ASM: `centroid_tile`'s register LUT.
    SCALE_TILES (extend: many query rows): |k| and |v| multiply the dequantized tiles (fp32, rounded to
    bf16), loaded in the tiles' row layout; else (decode: a GQA group of rows) they multiply the scores
    and p. valid: `online_softmax_step`'s mask. Returns the updated (m_i, l_i, acc)."""
    kc_ptr, kc_s, kc_h, ks_ptr, ks_s, ks_h, vc_ptr, vc_s, vc_h, vs_ptr, vs_s, vs_h = cache
    krow = kc_ptr + slot * kc_s + hk * kc_h
    kcen = centroid_tile(krow, nmask, kcent_ptr, KF, K_REG, K_ASM)
    ksrow = ks_ptr + slot * ks_s + hk * ks_h
    if SCALE_TILES:
        ks0 = tl.load(ksrow, mask=nmask, other=0.0)
        s = tl.dot(q, tl.trans((kcen.to(tl.float32) * ks0.to(tl.float32)[:, None]).to(tl.bfloat16)))
    else:
        ks0 = tl.load(ksrow, mask=nmask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(kcen)) * ks0[None, :]
    if KF.QJLOFF >= 0:
        sg = qjl_signs(krow, nmask, KF.QJLOFF, KF.D)
        ks1 = tl.load(ksrow + 1, mask=nmask, other=0.0).to(tl.float32)
        s += tl.dot(sk, tl.trans(sg)) * ks1[None, :]
    p, alpha, m_new, l_i = online_softmax_step(s, valid, m_i, l_i, logit_cap, USE_CAP)
    vrow = vc_ptr + slot * vc_s + hk * vc_h
    vcen = centroid_tile(vrow, nmask, vcent_ptr, VF, V_REG, V_ASM)
    if SCALE_TILES:
        vs0 = tl.load(vs_ptr + slot * vs_s + hk * vs_h, mask=nmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16),
                                            (vcen.to(tl.float32) * vs0.to(tl.float32)[:, None]).to(tl.bfloat16))
    else:
        vs0 = tl.load(vs_ptr + slot * vs_s + hk * vs_h, mask=nmask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot((p * vs0[None, :]).to(tl.bfloat16), vcen)
    return m_new, l_i, acc


# --------------------------------------------------------------------------------------------
# Register LUT: centroids of a whole code byte by PTX byte permutes (no per-code memory gather)
# --------------------------------------------------------------------------------------------
# A per-code `tl.load(table + code)` costs one load instruction plus 64-bit address math per
# element and keeps a pointer tensor live. For the sliced decode path the first code field is a
# plain 4- or 2-bit field, so its codebook (16 or 4 bf16 values) fits in four / two 32-bit
# registers, and `prmt` (select 4 bytes out of 8 by 4 nibble selectors) looks up four codes at once.
# The asm takes 4 code bytes (pack=4, one register) and returns every slice of those bytes: slice T
# holds the codes at bit position T * w of each byte (storage coordinates S j + T, S = 8 / w), as
# packed bf16 pairs, identical to gathering `centroids_bf16[code]`.

def _bf16_bits(values) -> list:
    return [int(v) & 0xFFFF for v in torch.as_tensor(values, dtype=torch.float32).to(torch.bfloat16)
            .view(torch.int16).to(torch.int32).tolist()]


def _byte_tables(bits16) -> list:
    """bf16 bit patterns (8 values) -> 4 hex words: their low bytes (2 words), then their high bytes,
    so that one `prmt` over a word pair looks up the low or the high byte of any of the 8 values."""
    lo = [b & 0xFF for b in bits16]
    hi = [b >> 8 for b in bits16]
    return ["0x%08x" % (x[0] | x[1] << 8 | x[2] << 16 | x[3] << 24) for x in (lo[:4], lo[4:], hi[:4], hi[4:])]


# Magnitude index per nibble of the 4-bit code word $4 for the antisymmetric LUTs (m[k], k = (i & 7) ^ (7 if
# i < 8)): n holds 1 in every nibble whose code is negative (bit 3 clear), m the indices (both registers).
_MAGNITUDE_INDEX_PTX = ["shr.b32 n, $4, 3;", "and.b32 n, n, 0x11111111;", "xor.b32 n, n, 0x11111111;",
                        "mul.lo.u32 f, n, 7;", "xor.b32 m, $4, f;", "and.b32 m, m, 0x77777777;"]


def _register_lut_asm_pairs(mags) -> str:
    """The antisymmetric 4-bit bf16 LUT (`register_lut_asm`'s w = 4: magnitudes m[k], k = (i & 7) ^ (7 if
    i < 8), sign from bit 3) for a word of two 16-bit elements, tokens t and t + 1, 4 codes each
    (nibbles n0..n3 and n4..n7: coordinates 4c..4c+3): the layout of a 16-bit MMA operand whose reduction
    dimension is the token. Outputs $0..$3: coordinate 4c + T, the bf16 pair (token t, token t + 1);
    $4 the word. Per output pair (T = 0, 1 from nibbles n0 n1 n4 n5; T = 2, 3 from n2 n3 n6 n7) one prmt
    gathers the 4 magnitude indices as selector nibbles, two look up the low and the high bytes, a prmt
    in sign-replicate mode turns each nibble's bit 3 into a byte mask (from the word and the word << 4),
    one lop3 sets the sign bits and two prmt interleave: 19 instructions per 8 codes (30 for bytes)."""
    lo0, lo1, hi0, hi1 = _byte_tables(mags)
    # byte msb = bit 3 of the even nibbles (the odd ones' is the word's), then the magnitude indices
    body = ["shl.b32 c, $4, 4;"] + _MAGNITUDE_INDEX_PTX
    for s, (pick, sign) in enumerate((("0x0020", "0xEAC8"), ("0x0031", "0xFBD9"))):
        body += [f"prmt.b32 t, m, m, {pick};",  # selector nibbles: n(2s) n(2s+1) n(2s+4) n(2s+5)
                 f"prmt.b32 a, {lo0}, {lo1}, t;", f"prmt.b32 b, {hi0}, {hi1}, t;",
                 f"prmt.b32 k, c, $4, {sign};",  # 0xff where the code is >= 8 (positive)
                 "lop3.b32 b, b, k, 0x80808080, 0xD2;",  # b ^ (~k & 0x80808080): sign of the others
                 f"prmt.b32 ${2 * s}, a, b, 0x6240;", f"prmt.b32 ${2 * s + 1}, a, b, 0x7351;"]
    return "{\n.reg .b32 c, n, f, m, t, a, b, k;\n" + "\n".join(body) + "\n}"


def _register_lut_asm_5bit(bits) -> str:
    """5-bit codes (fields [4, 1]): two outputs per slice like w = 4; $4 the 4 bytes of the 4-bit field
    (slice 0 = low nibble, slice 1 = high nibble), $5 4 bytes whose bits 0 and 1 hold bit 4 of the same two
    coordinates (`split_high_crumbs`). The 32-entry codebook is antisymmetric, c[31 - i] = -c[i], so 16
    magnitudes m[k] = c[16 + k] suffice: k = lo4 ^ (15 if bit 4 is 0), negative iff bit 4 is 0. The low
    and the high bytes of the magnitudes are two 16-byte tables; each is read as two 8-byte halves (two
    prmt) and the half picked per byte by bit 3 of k. "" if the codebook is not antisymmetric in bf16."""
    mags = bits[16:32]
    if any(bits[15 - k] != (mags[k] ^ 0x8000) for k in range(16)):
        return ""
    lo_a, lo_b, hi_a, hi_b = _byte_tables(mags[:8])
    lo_c, lo_d, hi_c, hi_d = _byte_tables(mags[8:])
    body = []
    for s in range(2):
        body += [("and.b32 x, $4, 0x0f0f0f0f;" if s == 0 else "shr.b32 x, $4, 4;\nand.b32 x, x, 0x0f0f0f0f;"),
                 ("and.b32 f, $5, 0x01010101;" if s == 0 else "shr.b32 f, $5, 1;\nand.b32 f, f, 0x01010101;"),
                 "xor.b32 f, f, 0x01010101;",  # 1 per byte: negative code
                 "mul.lo.u32 m, f, 15;", "xor.b32 k, x, m;",  # magnitude index 0..15 per byte
                 "and.b32 t, k, 0x07070707;", "shr.b32 u, t, 4;", "or.b32 t, t, u;",
                 "prmt.b32 t, t, t, 0x0020;",  # 4 selector nibbles (index within a half)
                 "and.b32 h, k, 0x08080808;", "shr.b32 h, h, 3;", "mul.lo.u32 h, h, 255;",  # 0xff: upper half
                 f"prmt.b32 a, {lo_a}, {lo_b}, t;", f"prmt.b32 u, {lo_c}, {lo_d}, t;",
                 "xor.b32 u, u, a;", "and.b32 u, u, h;", "xor.b32 a, a, u;",
                 f"prmt.b32 b, {hi_a}, {hi_b}, t;", f"prmt.b32 u, {hi_c}, {hi_d}, t;",
                 "xor.b32 u, u, b;", "and.b32 u, u, h;", "xor.b32 b, b, u;",
                 "shl.b32 u, f, 7;", "xor.b32 b, b, u;",  # sign into the high byte
                 f"prmt.b32 ${2 * s}, a, b, 0x5140;", f"prmt.b32 ${2 * s + 1}, a, b, 0x7362;"]
    return "{\n.reg .b32 x, f, m, k, t, u, h, a, b;\n" + "\n".join(body) + "\n}"


def register_lut_asm(fmt: VecFormat, centroids: torch.Tensor, pairs: bool = False) -> str:
    """PTX of the register LUT of `fmt`'s codes, or "" where it does not apply (outliers; codes wider
    than 4 bits; a 4-bit codebook that is not exactly antisymmetric in bf16). The table words (bf16
    bits of the codebook) are immediates: with a single tensor operand Triton loads the code bytes
    straight into the MMA operand layout and converts nothing but uint8 tiles (table words as extra
    tensor operands make it round-trip every bf16 tile through shared memory on sm_90).
      w = 4: two outputs (low nibble = slice 0, high nibble = slice 1). The codebook is antisymmetric,
        c[15 - i] = -c[i], so 8 magnitudes m[k] = c[8 + k] suffice: index k = (i & 7) ^ (7 if i < 8),
        sign from bit 3; low and high bytes of the magnitudes are looked up separately (two prmt),
        the sign is xored into the high byte, and two prmt interleave them into bf16 pairs.
        Operands: $0..$3 out, $4 the 4 code bytes.
      w = 2: four outputs; the 4 centroids are 8 bytes, so one prmt with selector nibbles (2c, 2c + 1)
        per code returns two bf16 values. $0..$7 out, $8 the 4 code bytes.
      3-bit codes (fields [2, 1]): four outputs; $8 the 4 bytes of the 2-bit field, $9 4 bytes whose low
        nibble holds bit 2 of the same 4 coordinates each (bit T for slice T; `split_high_nibbles`);
        the 8 centroids' low and high bytes are two 8-byte tables, so per 4 codes: the code bytes,
        selector nibbles, two lookups and two interleaving prmt.
      5-bit codes (fields [4, 1]): `_register_lut_asm_5bit`.
    pairs (4-bit one-field codes only, else ""): codes that arrive as 16-bit elements of two consecutive
      tokens (`_register_lut_asm_pairs`)."""
    mains = [w for kind, w, n, off, sh in fmt.fields if kind == "main"]
    if fmt.outlier_channels or mains not in ([2], [4], [2, 1], [4, 1]) or (pairs and mains != [4]):
        return ""
    if mains == [4, 1]:
        return _register_lut_asm_5bit(_bf16_bits(centroids[:32]))
    if mains == [2, 1]:
        lo0, lo1, hi0, hi1 = _byte_tables(_bf16_bits(centroids[:8]))
        body = []
        for t in range(4):
            body += [f"shr.b32 x, $8, {2 * t};", "and.b32 x, x, 0x03030303;",
                     f"shr.b32 h, $9, {t};", "and.b32 h, h, 0x01010101;", "shl.b32 h, h, 2;",
                     "or.b32 x, x, h;",  # 3-bit code per byte
                     "shr.b32 u, x, 4;", "or.b32 u, x, u;", "prmt.b32 u, u, u, 0x0020;",  # 4 selector nibbles
                     f"prmt.b32 a, {lo0}, {lo1}, u;", f"prmt.b32 b, {hi0}, {hi1}, u;",
                     f"prmt.b32 ${2 * t}, a, b, 0x5140;", f"prmt.b32 ${2 * t + 1}, a, b, 0x7362;"]
        return "{\n.reg .b32 x, h, u, a, b;\n" + "\n".join(body) + "\n}"
    w = mains[0]
    bits = _bf16_bits(centroids[: 1 << w])
    if w == 2:
        t0, t1 = "0x%08x" % (bits[0] | bits[1] << 16), "0x%08x" % (bits[2] | bits[3] << 16)
        body = []
        for t in range(4):
            body += [f"shr.b32 x, $8, {2 * t};", "and.b32 x, x, 0x03030303;",
                     "mad.lo.u32 z, x, 34, 0x10101010;",  # byte = (2c+1) << 4 | 2c: selectors of c's two bytes
                     f"prmt.b32 ${2 * t}, {t0}, {t1}, z;", "shr.b32 z, z, 16;", f"prmt.b32 ${2 * t + 1}, {t0}, {t1}, z;"]
        return "{\n.reg .b32 x, z;\n" + "\n".join(body) + "\n}"
    mags = bits[8:16]
    if any(bits[7 - k] != (mags[k] ^ 0x8000) for k in range(8)):
        return ""
    if pairs:
        return _register_lut_asm_pairs(mags)
    lo0, lo1, hi0, hi1 = _byte_tables(mags)
    body = list(_MAGNITUDE_INDEX_PTX)
    for s in range(2):
        o0, o1 = f"${2 * s}", f"${2 * s + 1}"
        body += [("and.b32 t, m, 0x0f0f0f0f;" if s == 0 else "shr.b32 t, m, 4;\nand.b32 t, t, 0x0f0f0f0f;"),
                 "shr.b32 u, t, 4;", "or.b32 t, t, u;", "prmt.b32 t, t, t, 0x0020;",  # 4 selector nibbles
                 f"prmt.b32 a, {lo0}, {lo1}, t;", f"prmt.b32 b, {hi0}, {hi1}, t;",
                 ("and.b32 u, n, 0x01010101;\nshl.b32 u, u, 7;" if s == 0 else
                  "shl.b32 u, n, 3;\nand.b32 u, u, 0x80808080;"),
                 "xor.b32 b, b, u;", f"prmt.b32 {o0}, a, b, 0x5140;", f"prmt.b32 {o1}, a, b, 0x7362;"]
    return "{\n.reg .b32 n, f, m, t, u, a, b;\n" + "\n".join(body) + "\n}"


def int8_codebook(centroids: torch.Tensor) -> tuple:
    """The codebook as int8 values t = round(c / scale), and that scale: scores against int8 keys run on
    integer tensor cores (exact int32 sums). The scale maps max|c| to somewhere in [100, 127.5), where the
    rounding errors' mean square is least: about the error of a bf16 table (d = 128, 4 bits: 3.5e-4 RMS
    against the codes' own 8.6e-3, +0.2 % of their mean squared error)."""
    c = centroids.detach().to(torch.float64).cpu()
    top = float(c.abs().max()) if c.numel() else 0.0
    if top <= 0:
        return torch.zeros(c.numel(), dtype=torch.int8), 1.0
    scales = top / torch.linspace(100.0, 127.49, 2750, dtype=torch.float64)
    err = ((torch.round(c[None, :] / scales[:, None]) * scales[:, None] - c[None, :]) ** 2).mean(dim=1)
    scale = float(scales[int(torch.argmin(err))])
    return torch.round(c / scale).clamp(-127, 127).to(torch.int8).contiguous(), scale


def register_lut_i8_asm(fmt: VecFormat, centroids: torch.Tensor) -> str:
    """PTX of the int8 register LUT of 4-bit one-field codes ("" for other formats): 4 code bytes in
    ($2), the int8 centroids of their low nibbles (slice 0, $0) and high nibbles (slice 1, $1) out, 4
    bytes each: the operand layout of an int8 MMA, one register per 4 codes (the bf16 LUT needs two).
    Per 8 codes, 13 instructions: the 16-entry byte table is two 8-byte halves, both looked up with the
    low 3 bits of every nibble (4 prmt for 8 codes); a prmt in sign-replicate mode turns bit 3 of each
    nibble into a byte mask (over the word and the word << 4, whose byte msbs are the odd and the even
    nibbles' bit 3), one lop3 per 4 bytes picks the half, and two prmt sort the bytes into the slices."""
    mains = [w for kind, w, n, off, sh in fmt.fields if kind == "main"]
    if fmt.outlier_channels or fmt.qjl or mains != [4]:
        return ""
    t = [int(v) & 0xFF for v in int8_codebook(centroids[:16])[0].tolist()]
    w = ["0x%08x" % (t[i] | t[i + 1] << 8 | t[i + 2] << 16 | t[i + 3] << 24) for i in range(0, 16, 4)]
    body = ["and.b32 s, $2, 0x77777777;", "shr.b32 h, s, 16;",  # table index per nibble; nibbles 4..7
            f"prmt.b32 l0, {w[0]}, {w[1]}, s;", f"prmt.b32 u0, {w[2]}, {w[3]}, s;",  # codes 0..7 / 8..15
            f"prmt.b32 l1, {w[0]}, {w[1]}, h;", f"prmt.b32 u1, {w[2]}, {w[3]}, h;",
            "shl.b32 c, $2, 4;",  # byte k's msb: bit 3 of nibble 2k (c) / of nibble 2k + 1 ($2)
            "prmt.b32 m0, c, $2, 0xD9C8;", "prmt.b32 m1, c, $2, 0xFBEA;",  # 0xff where bit 3 is set
            "lop3.b32 r0, l0, u0, m0, 0xD8;", "lop3.b32 r1, l1, u1, m1, 0xD8;",  # m ? u : l
            "prmt.b32 $0, r0, r1, 0x6420;", "prmt.b32 $1, r0, r1, 0x7531;"]  # even / odd nibbles
    return "{\n.reg .b32 s, h, l0, u0, l1, u1, c, m0, m1, r0, r1;\n" + "\n".join(body) + "\n}"


@triton.jit
def split_high_nibbles(rows, mask, OFF: tl.constexpr, D: tl.constexpr):
    """The 1-bit field of 3-bit codes (bit 2 of coordinate i at byte OFF + i // 8, bit i % 8), as one
    byte per byte of the 2-bit field (coordinates 4 j .. 4 j + 3): [BLOCK_N, D / 4] uint8 whose low
    nibble holds their high bits (bit T for coordinate 4 j + T)."""
    hb = tl.load(rows[:, None] + OFF + tl.arange(0, D // 8)[None, :], mask=mask[:, None], other=0)
    return tl.interleave(hb & 15, hb >> 4)


@triton.jit
def split_high_crumbs(rows, mask, OFF: tl.constexpr, D: tl.constexpr):
    """The 1-bit field of 5-bit codes (bit 4 of coordinate i at byte OFF + i // 8, bit i % 8), as one
    byte per byte of the 4-bit field (coordinates 2 j, 2 j + 1): [BLOCK_N, D / 2] uint8 whose bits 0 and 1
    hold their high bits."""
    hn = split_high_nibbles(rows, mask, OFF, D)
    return tl.interleave(hn & 3, hn >> 2)


@triton.jit
def register_lut_slices5(b, hc, ASM: tl.constexpr):
    """5-bit codes: 4-bit field bytes b and their high-bit crumbs hc ([R, C] uint8 each) -> the bf16
    centroids of the 2 slices (a 4-tuple like register_lut_slices; entries 2, 3 repeat slice 0)."""
    c0, c1 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r,r", [b, hc], dtype=(tl.bfloat16, tl.bfloat16),
                                       is_pure=True, pack=4)
    return c0, c1, c0, c0


@triton.jit
def register_lut_slices3(b, hn, ASM: tl.constexpr):
    """3-bit codes: 2-bit field bytes b and their high-bit nibbles hn ([R, C] uint8 each) -> the bf16
    centroids of the 4 slices."""
    c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [b, hn],
                                               dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=4)
    return c0, c1, c2, c3


@triton.jit
def register_lut_pair_slices(b16, ASM: tl.constexpr):
    """uint16 elements [R, C] of 4-bit codes (coordinates 4c..4c+3 of element c) -> the bf16 centroids of
    the 4 slices T (coordinates 4c + T), [R, C] each (`register_lut_asm(pairs=True)`, two elements per
    call: consecutive rows of a 16-bit MMA operand)."""
    c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b16],
                                               dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                               is_pure=True, pack=2)
    return c0, c1, c2, c3


@triton.jit
def register_lut_i8_slices(b, ASM: tl.constexpr):
    """uint8 4-bit code bytes [R, C] -> the int8 centroids of both slices (`register_lut_i8_asm`)."""
    c0, c1 = tl.inline_asm_elementwise(ASM, "=r,=r,r", [b], dtype=(tl.int8, tl.int8), is_pure=True, pack=4)
    return c0, c1, c0, c0


@triton.jit
def register_lut_slices(b, ASM: tl.constexpr, W: tl.constexpr):
    """uint8 code bytes [R, C] -> the bf16 centroids of every slice (tuple of 8 / W tensors [R, C])."""
    if W == 4:
        c0, c1 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,r", [b], dtype=(tl.bfloat16, tl.bfloat16),
                                           is_pure=True, pack=4)
        c2 = c0
        c3 = c0
    else:
        c0, c1, c2, c3 = tl.inline_asm_elementwise(ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r", [b],
                                                   dtype=(tl.bfloat16, tl.bfloat16, tl.bfloat16, tl.bfloat16),
                                                   is_pure=True, pack=4)
    return c0, c1, c2, c3
