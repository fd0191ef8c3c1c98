#!/usr/bin/env python3
"""Benchmark of the TurboQuant kernels against FlashInfer (BF16 / FP8 KV) and SGLang's Triton kernels, on one
GPU, in one run.

  python scripts/bench_kernels.py --headline --json results/headline.json  # the before/after points
  python scripts/bench_kernels.py --check --quick            # validate every codec, then a short bench
  python scripts/bench_kernels.py --check --out results/     # full grid, JSON + PNG
  python scripts/bench_kernels.py --quick --extend 16384:512  # also extend: 512 new over a packed 16K prefix

--headline times decode K4V4 at (32, 8, 128) B=32 ctx 32K and B=1 ctx 1K, K4V4 at (9, 3, 64) B=32 ctx 32K,
and extend of 512 new tokens over a 16K packed prefix (K4V4, (32, 8, 128)), each with FlashInfer BF16.
Every baseline is optional (lazy imports, try/except): a missing or failing FlashInfer / SGLang only
blanks its columns. Times are medians of CUDA-graph replays (falls back to plain launches when a
capture fails); when a point's data would fit in L2, several buffer sets are cycled.
Bytes of our kernel = B*ctx*H_kv*(k slot_bytes + v slot_bytes) + q + out.
Our decode reads queries already rotated, as in the server, where the step's compress launch rotates
them (its time, "compress", includes that); PROD (QJL) keys rotate inside decode.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from kernel_helpers import alloc_cache, fill_random_kv, make_codecs, rel_err  # noqa: E402
from tq_kernels import reference  # noqa: E402
from tq_kernels._common import kernel_tables  # noqa: E402
from tq_kernels.codec import VecFormat  # noqa: E402
from tq_kernels.compress import compress_and_store  # noqa: E402
from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode  # noqa: E402
from tq_kernels.extend import extend_attention  # noqa: E402
from make_tables import replace_records  # noqa: E402

CODECS = {
    "K4V4": (dict(bits=4), dict(bits=4)),
    "K3V3": (dict(bits=3), dict(bits=3)),
    "K4V2": (dict(bits=4), dict(bits=2)),
    "PROD-K3": (dict(bits=3, qjl=True), dict(bits=3)),
    "K5V4": (dict(bits=5), dict(bits=4)),  # k5v4 preset: 5-bit keys take the general stage 1
}
SHAPES = {"hd128": (32, 8, 128), "hd64": (9, 3, 64)}
# (shape, codec, B, ctx) of --headline, and its extend point (prefix, new)
HEADLINE_DECODE = [("hd128", "K4V4", 32, 32768), ("hd128", "K4V4", 1, 1024), ("hd64", "K4V4", 32, 32768)]
HEADLINE_EXTEND = (16384, 512)


def log(*a):
    print(*a, flush=True)


# --------------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------------
def bench(fn, n_inner=1, use_graph=True, rep_ms=200):
    """Median ms of one call of fn (fn runs n_inner calls, e.g. over rotating buffer sets)."""
    import triton.testing

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if use_graph:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            g.replay()
            torch.cuda.synchronize()
            return triton.testing.do_bench(g.replay, warmup=25, rep=rep_ms, return_mode="median") / n_inner
        except Exception as e:  # capture not supported by this fn: time plain launches
            log(f"    (graph capture failed: {type(e).__name__}: {str(e)[:120]}; timing without graph)")
            torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") / n_inner


def checkout_commit():
    """The checkout's HEAD (None where it has no .git: records then need --commit)."""
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def copy_bandwidth_gbs(nbytes=2 << 30):
    x = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.random_()
    ms = bench(lambda: y.copy_(x), use_graph=False, rep_ms=300)
    del x, y
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9  # read + write


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
def fmts(codec_name, d):
    kk, vv = CODECS[codec_name]
    return VecFormat(d, **kk), VecFormat(d, **vv)


def random_packed(kfmt, vfmt, n_slots, h_kv, gen_seed):
    """Random (non-zero) codes and scales: timing does not depend on the values."""
    g = torch.Generator(device="cuda").manual_seed(gen_seed)
    kc = torch.randint(0, 256, (n_slots, h_kv, kfmt.code_bytes), dtype=torch.uint8, device="cuda", generator=g)
    vc = torch.randint(0, 256, (n_slots, h_kv, vfmt.code_bytes), dtype=torch.uint8, device="cuda", generator=g)
    ks = (torch.rand(n_slots, h_kv, kfmt.n_scales, device="cuda", generator=g) * 4 + 1).half()
    vs = (torch.rand(n_slots, h_kv, vfmt.n_scales, device="cuda", generator=g) * 4 + 1).half()
    return kc, ks, vc, vs


def paged_indices(B, ctx, n_slots, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = (torch.randperm(n_slots - 1, device="cuda", generator=g)[:B * ctx] + 1).to(torch.int32)
    indptr = (torch.arange(B + 1, device="cuda", dtype=torch.int32) * ctx)
    return indptr, idx


def n_sets_for(nbytes, l2_bytes):
    return 1 if nbytes >= 4 * l2_bytes else min(8, max(2, math.ceil(4 * l2_bytes / max(nbytes, 1))))


# --------------------------------------------------------------------------------------------
# systems
# --------------------------------------------------------------------------------------------
def run_ours(B, ctx, hq, hkv, d, codec_name, l2, seed, splits=None, window=0, first=False):
    """window > 0: the last `window` positions of every sequence come from a recent-window ring (bf16).
    first: every sequence's position 0 from the exact first-token table (one entry all share, as a BOS)."""
    kfmt, vfmt = fmts(codec_name, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed)
    per_set = B * ctx * hkv * (kfmt.slot_bytes + vfmt.slot_bytes)
    n_sets = n_sets_for(per_set, l2)
    sets = []
    for i in range(n_sets):
        n_slots = B * ctx + 1
        bufs = random_packed(kfmt, vfmt, n_slots, hkv, seed + i)
        indptr, idx = paged_indices(B, ctx, n_slots, seed + 100 + i)
        q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(B, hq, d, device="cuda", dtype=torch.bfloat16)
        # the queries as the server's compress launch leaves them rotated (q M_k^T; QJL keys: decode
        # rotates and sketches them itself)
        qrot = None if kfmt.qjl else (q.float() @ kernel_tables(kc, "cuda")["wt"]).contiguous()
        win = None
        if window:
            from tq_kernels.window import DecodeWindow
            lens = (indptr[1:] - indptr[:-1]).to(torch.int32)
            win = DecodeWindow(torch.randn(B * window, hkv, d, device="cuda", dtype=torch.bfloat16),
                               torch.randn(B * window, hkv, d, device="cuda", dtype=torch.bfloat16), window,
                               (lens - window).clamp_min(0).contiguous(),
                               torch.arange(B, device="cuda", dtype=torch.int32) * window)
        rows = None
        if first:
            from tq_kernels.window import FirstRows
            flags = torch.zeros(n_slots, device="cuda", dtype=torch.uint8)
            flags[idx[indptr[:-1].long()].long()] = 1
            rows = FirstRows(torch.randn(4, hkv, d, device="cuda", dtype=torch.bfloat16),
                             torch.randn(4, hkv, d, device="cuda", dtype=torch.bfloat16), flags)
        sets.append((bufs, indptr, idx, q, out, qrot, win, rows))
    plan = plan_decode(kc, vc, B, hkv, ctx, "cuda", window=bool(window), first=first, num_splits=splits)
    ws = DecodeWorkspace.create(B, hq, d, max_splits=plan.partials, device="cuda")

    def fn():
        for bufs, indptr, idx, q, out, qrot, win, rows in sets:
            decode_attention(q, *bufs, kc, vc, indptr, idx, d ** -0.5, 0.0, out, plan=plan, workspace=ws,
                             q_rotated=qrot, window=win, first=rows)

    ms = bench(fn, n_inner=n_sets)
    qo_bytes = 2 * B * hq * d * 2
    del sets
    torch.cuda.empty_cache()
    return ms, per_set + qo_bytes, plan.num_splits


def sglang_tensor_cores(kv_dtype, hq, hkv) -> bool:
    """Whether SGLang's flashinfer backend decodes this shape on tensor cores (its should_use_tensor_core:
    FP8 always, 16-bit KV from a GQA group of 4), so the baseline is the kernel the server runs."""
    from sglang.srt.layers.attention.flashinfer_backend import should_use_tensor_core

    return bool(should_use_tensor_core(kv_dtype, hq, hkv))


def run_flashinfer(B, ctx, hq, hkv, d, kv_dtype, page_size, l2, seed):
    import flashinfer

    n_pages_seq = math.ceil(ctx / page_size)
    elt = 1 if kv_dtype != torch.bfloat16 else 2
    per_set = 2 * B * n_pages_seq * page_size * hkv * d * elt
    n_sets = n_sets_for(per_set, l2)
    ws_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrappers, sets = [], []
    last = (ctx - 1) % page_size + 1
    tensor_cores = sglang_tensor_cores(kv_dtype, hq, hkv)
    for i in range(n_sets):
        n_pages = B * n_pages_seq + 1
        k = torch.randn(n_pages, page_size, hkv, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
        v = torch.randn(n_pages, page_size, hkv, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)
        g = torch.Generator(device="cuda").manual_seed(seed + i)
        pidx = (torch.randperm(n_pages - 1, device="cuda", generator=g)[:B * n_pages_seq] + 1).to(torch.int32)
        indptr = torch.arange(B + 1, device="cuda", dtype=torch.int32) * n_pages_seq
        lastlen = torch.full((B,), last, device="cuda", dtype=torch.int32)
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws_buf if i == 0 else torch.empty_like(ws_buf), "NHD",
                                                          use_tensor_cores=tensor_cores)
        w.plan(indptr, pidx, lastlen, hq, hkv, d, page_size, pos_encoding_mode="NONE",
               q_data_type=torch.bfloat16, kv_data_type=kv_dtype, sm_scale=d ** -0.5)
        q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(B, hq, d, device="cuda", dtype=torch.bfloat16)
        wrappers.append(w)
        sets.append((q, (k, v), out))

    try:
        wrappers[0].run(sets[0][0], sets[0][1], out=sets[0][2])
        use_out = True
    except TypeError:  # older FlashInfer: no out=
        use_out = False

    def fn():
        for w, (q, kv, out) in zip(wrappers, sets):
            if use_out:
                w.run(q, kv, out=out)
            else:
                w.run(q, kv)

    ms = bench(fn, n_inner=n_sets)
    del sets, wrappers
    torch.cuda.empty_cache()
    return ms


def run_sglang_triton(B, ctx, hq, hkv, d, l2, seed, max_splits=16):
    import inspect

    from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd

    per_set = 2 * B * ctx * hkv * d * 2
    n_sets = n_sets_for(per_set, l2)
    sets = []
    for i in range(n_sets):
        n_slots = B * ctx + 1
        k = torch.randn(n_slots, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(n_slots, hkv, d, device="cuda", dtype=torch.bfloat16)
        indptr, idx = paged_indices(B, ctx, n_slots, seed + i)
        idx = idx.to(torch.int64)  # as SGLang's Triton backend passes them: 64-bit slot offsets past 2^31 elements
        q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
        o = torch.empty(B, hq, d, device="cuda", dtype=torch.bfloat16)
        sets.append((q, k, v, o, indptr, idx))
    logits = torch.empty(B, hq, max_splits, d, device="cuda", dtype=torch.float32)
    lse = torch.empty(B, hq, max_splits, device="cuda", dtype=torch.float32)
    nsp = torch.full((B,), max_splits, device="cuda", dtype=torch.int32)
    params = inspect.signature(decode_attention_fwd).parameters
    extra = {}
    if "k_scale" in params:
        extra["k_scale"] = 1.0
    if "v_scale" in params:
        extra["v_scale"] = 1.0

    def fn():
        for q, k, v, o, indptr, idx in sets:
            decode_attention_fwd(q, k, v, o, indptr, idx, logits, lse, nsp, max_splits, d ** -0.5, **extra)

    ms = bench(fn, n_inner=n_sets)
    del sets
    torch.cuda.empty_cache()
    return ms


def run_extend_pair(prefix, new, hq, hkv, d, codec_name, seed, seqs=1):
    """`seqs` sequences' chunked-prefill continuations (radix hits, or second chunks of long prompts):
    each sequence's `new` queries attend to its `prefix` cached tokens plus, causally, to themselves.
    -> dict of ms: "ours" (the defaults: automatic GQA packing and prefix splits), "one_split" (no
    prefix splits), "split4" (4 splits), "hybrid" (FlashInfer's ragged prefill for the new tokens with its
    lse, then `extend_attention(new_part=)` over the packed prefix only; None without FlashInfer),
    "fi_new" (that FlashInfer part alone), "sgl_triton_bf16" (SGLang's Triton extend over a BF16 prefix),
    "fi_bf16" (FlashInfer's paged prefill over a BF16 prefix plus the new tokens); None if unavailable."""
    kfmt, vfmt = fmts(codec_name, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed)
    n_slots = seqs * prefix + 1
    bufs = random_packed(kfmt, vfmt, n_slots, hkv, seed)
    dev = "cuda"
    idx = (torch.randperm(seqs * prefix, device=dev) + 1).to(torch.int64)
    qo = (torch.arange(seqs + 1, device=dev) * new).to(torch.int32)
    kvp = (torch.arange(seqs + 1, device=dev) * prefix).to(torch.int32)
    T = seqs * new
    q = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(T, hq, d, device=dev, dtype=torch.bfloat16)
    res = {}

    def ext(**kw):
        return bench(lambda: extend_attention(q, k, v, *bufs, kc, vc, qo, kvp, idx, d ** -0.5, out=out,
                                              max_extend_len=new, max_prefix_len=prefix, **kw))
    res["ours"] = ext()
    res["one_split"] = ext(num_splits=1)
    res["split4"] = ext(num_splits=4)
    res["hybrid"] = res["fi_new"] = None
    ragged = flashinfer_ragged(dev)
    if ragged is not None:
        o_new = torch.empty(T, hq, d, device=dev, dtype=torch.bfloat16)
        lse = torch.empty(T, hq, device=dev, dtype=torch.float32)
        lens = [new] * seqs

        def fi_new():
            ragged.run(q, k, v, o_new, lens, d ** -0.5, 0.0, True, lse=lse)
        res["fi_new"] = bench(fi_new)
        res["hybrid"] = bench(lambda: (fi_new(), extend_attention(
            q, k, v, *bufs, kc, vc, qo, kvp, idx, d ** -0.5, out=out, max_extend_len=new, max_prefix_len=prefix,
            new_part=(o_new, lse))))
        hybrid_out = out.float()  # the same output as the single kernel's, up to bf16 rounding
        ext()
        res["hybrid_rel_diff"] = float((hybrid_out - out.float()).norm() / out.float().norm())
    del bufs
    res["sgl_triton_bf16"] = None
    try:
        from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd
    except Exception as e:  # noqa: BLE001 - the baseline is optional
        log(f"  sglang extend not available: {type(e).__name__}: {e}")
        return res
    kb = torch.randn(n_slots, hkv, d, device=dev, dtype=torch.bfloat16)
    vb = torch.randn(n_slots, hkv, d, device=dev, dtype=torch.bfloat16)
    res["sgl_triton_bf16"] = bench(lambda: extend_attention_fwd(q, k, v, out, kb, vb, qo, kvp, idx, None, True, None,
                                                                new, 1.0, 1.0, d ** -0.5))
    del kb, vb
    torch.cuda.empty_cache()
    return res


def flashinfer_ragged(dev):
    """sglang_tq's FlashInfer ragged-prefill runner (the backend's plain prefill), or None without it."""
    try:
        from sglang_tq.flashinfer_prefill import RaggedPrefill
        return RaggedPrefill.create(dev)
    except Exception as e:  # noqa: BLE001 - FlashInfer is optional here
        log(f"  FlashInfer ragged prefill not available: {type(e).__name__}: {e}")
        return None


def run_prefill(seqs, length, hq, hkv, d, codec_name, seed, window=32):
    """One layer's attention work in a first prefill (no cached prefix) of `seqs` prompts of `length`
    tokens -> dict of ms: BF16 KV stores the K/V rows into the pool and runs SGLang's Triton extend;
    TurboQuant compresses them into the packed pool (and the last `window` tokens of each prompt into
    the exact ring) and runs the same extend over the new bf16 K/V. "*_fi": the same with FlashInfer's
    ragged prefill instead of the Triton extend (what the backend runs by default; None without
    FlashInfer)."""
    from sglang.srt.layers.attention.triton_ops.extend_attention import extend_attention_fwd
    from tq_kernels.window import RingWrite

    dev = "cuda"
    T = seqs * length
    kfmt, vfmt = fmts(codec_name, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed)
    n_slots = 2 * T + 1
    bufs = random_packed(kfmt, vfmt, n_slots, hkv, seed)
    slots = (torch.randperm(n_slots - 1, device=dev)[:T] + 1).to(torch.int64)
    q = torch.randn(T, hq, d, device=dev, dtype=torch.bfloat16)
    k = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(T, hkv, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty(T, hq, d, device=dev, dtype=torch.bfloat16)
    qo = (torch.arange(seqs + 1, device=dev) * length).to(torch.int32)
    kvp = torch.zeros(seqs + 1, device=dev, dtype=torch.int32)
    no_idx = torch.zeros(1, device=dev, dtype=torch.int64)
    pos = torch.arange(T, device=dev) % length
    rows = torch.where(pos >= length - window, (torch.arange(T, device=dev) // length) * window + pos % window, -1)
    ring = RingWrite(torch.zeros(seqs * window, hkv, d, device=dev, dtype=torch.bfloat16),
                     torch.zeros(seqs * window, hkv, d, device=dev, dtype=torch.bfloat16), rows.to(torch.int32))
    kb = torch.zeros(n_slots, hkv, d, device=dev, dtype=torch.bfloat16)
    vb = torch.zeros(n_slots, hkv, d, device=dev, dtype=torch.bfloat16)

    def extend():
        extend_attention_fwd(q, k, v, out, k, v, qo, kvp, no_idx, None, True, None, length, 1.0, 1.0, d ** -0.5)

    def store_bf16():
        kb[slots] = k
        vb[slots] = v

    def compress():
        compress_and_store(k, v, slots, kc, vc, *bufs, ring=ring)

    res = dict(extend=bench(extend), store_bf16=bench(store_bf16), compress=bench(compress))
    res["bf16_layer"] = bench(lambda: (store_bf16(), extend()))
    res["tq_layer"] = bench(lambda: (compress(), extend()))
    res["fi_prefill"] = res["bf16_layer_fi"] = res["tq_layer_fi"] = None
    ragged = flashinfer_ragged(dev)
    if ragged is not None:
        def fi():
            ragged.run(q, k, v, out, [length] * seqs, d ** -0.5, 0.0, True)
        res["fi_prefill"] = bench(fi)
        res["bf16_layer_fi"] = bench(lambda: (store_bf16(), fi()))
        res["tq_layer_fi"] = bench(lambda: (compress(), fi()))
    del bufs, kb, vb
    torch.cuda.empty_cache()
    return res


def run_compress(B, hkv, d, codec_name, seed, hq=None):
    """compress_and_store of B new tokens; with hq (keys without QJL) also rotating the B decode
    queries, as the server's decode step does."""
    kfmt, vfmt = fmts(codec_name, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed)
    n_slots = 4 * B + 1
    bufs = random_packed(kfmt, vfmt, n_slots, hkv, seed)
    k = torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16)
    slots = (torch.randperm(n_slots - 1, device="cuda")[:B] + 1).to(torch.int32)
    qkw = {}
    if hq and not kfmt.qjl:
        qkw = dict(q=torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16),
                   q_rot=torch.empty(B, hq, d, device="cuda", dtype=torch.float32))
    return bench(lambda: compress_and_store(k, v, slots, kc, vc, *bufs, **qkw))


# --------------------------------------------------------------------------------------------
# correctness on the GPU
# --------------------------------------------------------------------------------------------
def check_all(dev="cuda"):
    """Every codec (plus outliers / no norm correction) against the PyTorch reference."""
    log("== correctness check (Triton vs PyTorch reference on this GPU) ==")
    F = VecFormat
    combos = [(n, *fmts(n, d), hq, hkv) for n in CODECS for (hq, hkv, d) in SHAPES.values()]
    combos += [("K3o-V2o", F(128, 3, outlier_channels=32, outlier_bits=4),
                F(128, 2, outlier_channels=32, outlier_bits=3), 32, 8),
               ("PROD4o-V4nonc", F(128, 4, qjl=True, outlier_channels=32, outlier_bits=5),
                F(128, 4, norm_correction=False), 32, 8),
               ("K4V4-d256", F(256, 4), F(256, 4), 8, 2)]
    worst = 0.0
    ok = True
    for name, kfmt, vfmt, hq, hkv in combos:
        try:
            gen = torch.Generator().manual_seed(0)
            kc, vc = make_codecs(kfmt, vfmt, seed=1)
            lens = [1, 77, 1000, 333]
            S = sum(lens) + 7
            bufs = alloc_cache(kfmt, vfmt, S, hkv, dev)
            rbufs = [b.clone() for b in bufs]
            batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, dev, writer=compress_and_store)
            gen2 = torch.Generator().manual_seed(0)
            fill_random_kv(lens, hkv, kc, vc, rbufs, gen2, dev)  # reference writer, same data + slots
            sl = batch.kv_indices.long()
            same = (kc.unpack(bufs[0][sl], bufs[1][sl]).indices == kc.unpack(rbufs[0][sl], rbufs[1][sl]).indices)
            same_codes = float(same.float().mean())
            d = kfmt.head_dim
            q = torch.randn(len(lens), hq, d, generator=gen).to(dev).bfloat16()
            errs = []
            for ns, cap in ((1, 0.0), (4, 0.0), (3, 30.0)):
                out = torch.full((len(lens), hq, d), float("nan"), device=dev, dtype=torch.bfloat16)
                plan = plan_decode(kc, vc, len(lens), hkv, max(lens), dev, num_splits=ns)
                decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, d ** -0.5, cap, out, plan=plan)
                ref = reference.decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, d ** -0.5, cap)
                errs.append(rel_err(out.float(), ref.float()) if not out.isnan().any() else float("nan"))
            # extend: 2 sequences, prefix from the cache, new tokens
            new = [37, 5]
            T = sum(new)
            qo = torch.tensor([0, new[0], T], dtype=torch.int32, device=dev)
            kvp = torch.tensor([0, 77, 77 + 333], dtype=torch.int32, device=dev)
            kvi = torch.cat([batch.kv_indices[1:78], batch.kv_indices[1078:1411]])
            qe = torch.randn(T, hq, d, generator=gen).to(dev).bfloat16()
            kn = torch.randn(T, hkv, d, generator=gen).to(dev).bfloat16()
            vn = torch.randn(T, hkv, d, generator=gen).to(dev).bfloat16()
            oe = extend_attention(qe, kn, vn, *bufs, kc, vc, qo, kvp, kvi, d ** -0.5, max_extend_len=max(new))
            re = reference.extend_attention(qe, kn, vn, *bufs, kc, vc, qo, kvp, kvi, d ** -0.5)
            e_ext = rel_err(oe.float(), re.float())
            e = max(errs + [e_ext])
            worst = max(worst, e) if e == e else float("nan")
            good = e < 2e-2 and same_codes >= 0.999
            ok &= good
            log(f"  {name:<16} hq={hq:<2} hkv={hkv} d={d:<3} codes identical {same_codes:.5f}  "
                f"decode rel err {' '.join(f'{x:.2e}' for x in errs)}  extend {e_ext:.2e}  {'OK' if good else 'FAIL'}")
        except Exception as ex:
            ok = False
            log(f"  {name:<16} ERROR {type(ex).__name__}: {ex}")
            traceback.print_exc()
        torch.cuda.empty_cache()
    log(f"== check {'PASSED' if ok else 'FAILED'} (max rel err {worst:.3e}) ==")
    return ok


# --------------------------------------------------------------------------------------------
def run_flashinfer_extend(prefix, new, hq, hkv, d, seed, seqs=1, page_size=16):
    """FlashInfer's paged prefill over a BF16 cache holding each sequence's prefix and new tokens (the
    new queries causal at the end): the BF16 baseline of an extend over a cached prefix."""
    import flashinfer

    dev = "cuda"
    total = prefix + new
    pages_seq = math.ceil(total / page_size)
    n_pages = seqs * pages_seq + 1
    g = torch.Generator(device=dev).manual_seed(seed)
    k = torch.randn(n_pages, page_size, hkv, d, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n_pages, page_size, hkv, d, device=dev, dtype=torch.bfloat16)
    pidx = (torch.randperm(n_pages - 1, device=dev, generator=g)[:seqs * pages_seq] + 1).to(torch.int32)
    kv_indptr = torch.arange(seqs + 1, device=dev, dtype=torch.int32) * pages_seq
    last = torch.full((seqs,), (total - 1) % page_size + 1, device=dev, dtype=torch.int32)
    qo = torch.arange(seqs + 1, device=dev, dtype=torch.int32) * new
    q = torch.randn(seqs * new, hq, d, device=dev, dtype=torch.bfloat16)
    out = torch.empty_like(q)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=dev), "NHD")
    w.plan(qo, kv_indptr, pidx, last, hq, hkv, d, page_size, causal=True, q_data_type=torch.bfloat16,
           kv_data_type=torch.bfloat16, sm_scale=d ** -0.5)
    ms = bench(lambda: w.run(q, (k, v), out=out))
    del k, v
    torch.cuda.empty_cache()
    return ms


def decode_baselines(B, ctx, hq, hkv, d, l2, args):
    """FlashInfer BF16 / FP8 and SGLang's Triton decode at one point (None where unavailable)."""
    base = {}
    for name, f in (("fi_bf16", lambda: run_flashinfer(B, ctx, hq, hkv, d, torch.bfloat16, args.fi_page_size, l2, 1)),
                    ("fi_fp8", lambda: run_flashinfer(B, ctx, hq, hkv, d, torch.float8_e4m3fn, args.fi_page_size,
                                                      l2, 2)),
                    ("sgl_triton", lambda: run_sglang_triton(B, ctx, hq, hkv, d, l2, 3, args.sgl_splits))):
        try:
            base[name] = f()
        except Exception as e:  # noqa: BLE001 - the baselines are optional
            base[name] = None
            log(f"  {name} failed at B={B} ctx={ctx}: {type(e).__name__}: {str(e)[:200]}")
        torch.cuda.empty_cache()
    return base


def decode_point(shape, codec, B, ctx, l2, bw, args, base):
    """One decode point: ours (and with a window), its bandwidth, its ratios to the baselines."""
    hq, hkv, d = SHAPES[shape]
    ms, nbytes, ns = run_ours(B, ctx, hq, hkv, d, codec, l2, 7)
    pt = dict(shape=shape, hq=hq, hkv=hkv, d=d, B=B, ctx=ctx, codec=codec, ms=ms, bytes=nbytes, splits=ns,
              gbs=nbytes / (ms * 1e-3) / 1e9, floor_ms=nbytes / (bw * 1e9) * 1e3, **base)
    pt["pct_copy"] = 100 * pt["gbs"] / bw
    for b in ("fi_bf16", "fi_fp8", "sgl_triton"):
        pt["x_" + b] = (base[b] / ms) if base.get(b) else None
    if args.window:
        pt["window"] = args.window
        pt["ms_window"] = run_ours(B, ctx, hq, hkv, d, codec, l2, 7, window=args.window)[0]
        for b in ("fi_bf16", "fi_fp8"):
            pt["x_window_" + b] = (base[b] / pt["ms_window"]) if base.get(b) else None
        log(f"  {shape} {codec:<8} B={B:<4} ctx={ctx:<6} with a {args.window}-token window "
            f"{pt['ms_window'] * 1e3:8.1f} us")
    if args.first:  # the exact first token's rows (with the window when one is timed)
        pt["ms_first"] = run_ours(B, ctx, hq, hkv, d, codec, l2, 7, window=args.window, first=True)[0]
        log(f"  {shape} {codec:<8} B={B:<4} ctx={ctx:<6} with the first token exact"
            f"{f' and the window' if args.window else ''} {pt['ms_first'] * 1e3:8.1f} us")
    log(f"  {shape} {codec:<8} B={B:<4} ctx={ctx:<6} ours {ms * 1e3:8.1f} us  "
        f"{pt['gbs']:6.0f} GB/s ({pt['pct_copy']:4.0f}% copy)  "
        + "  ".join(f"{b} {base[b] * 1e3:8.1f} us" for b in base if base.get(b)))
    return pt


def extend_point(prefix, new, seqs, codec, args):
    hq, hkv, d = SHAPES["hd128"]
    r = run_extend_pair(prefix, new, hq, hkv, d, codec, 9, seqs)
    r["fi_bf16"] = None
    if not args.no_baselines:
        try:
            r["fi_bf16"] = run_flashinfer_extend(prefix, new, hq, hkv, d, 9, seqs)
        except Exception as e:  # noqa: BLE001 - the baseline is optional
            log(f"  FlashInfer BF16 extend failed: {type(e).__name__}: {str(e)[:200]}")

    def us(x):
        return f"{x * 1e3:9.1f}" if x else "        -"
    log(f"  extend {codec:<8} prefix {prefix:<6} new {new:<6} seqs {seqs:<3} ours {us(r['ours'])} us  "
        f"1 split {us(r['one_split'])}  4 splits {us(r['split4'])}  hybrid {us(r['hybrid'])} "
        f"(FlashInfer new {us(r['fi_new'])}; differs by {r.get('hybrid_rel_diff') or 0:.1e})  "
        f"SGLang triton BF16 {us(r['sgl_triton_bf16'])}  FlashInfer BF16 {us(r['fi_bf16'])}"
        + (f"  ratio {r['fi_bf16'] / r['ours']:.2f}x" if r["fi_bf16"] else ""))
    return dict(codec=codec, prefix=prefix, new=new, seqs=seqs, **r)


def headline(results, l2, bw, args):
    """The before/after points (HEADLINE_DECODE, HEADLINE_EXTEND), each with FlashInfer BF16."""
    for shape, codec, B, ctx in HEADLINE_DECODE:
        hq, hkv, d = SHAPES[shape]
        base = {} if args.no_baselines else decode_baselines(B, ctx, hq, hkv, d, l2, args)
        results["points"].append(decode_point(shape, codec, B, ctx, l2, bw, args, base))
    prefix, new = HEADLINE_EXTEND
    results["extend"].append(extend_point(prefix, new, 1, "K4V4", args))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headline", action="store_true",
                    help="only the before/after points: decode K4V4 hd128 B=32 32K and B=1 1K, hd64 B=32 32K; "
                         "extend 512 new over a 16K prefix")
    ap.add_argument("--json", default=None, help="write the results as JSON to this file")
    ap.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse HEAD, where the "
                                                    "checkout has its .git)")
    ap.add_argument("--records", default=None, metavar="PATH",
                    help="merge this run's points into a results/kernels.json-style record list (then run "
                         "scripts/make_tables.py)")
    ap.add_argument("--quick", action="store_true", help="B in {1,32}, ctx in {1K,32K}, K4V4+K3V3, hd128")
    ap.add_argument("--check", action="store_true", help="correctness of every codec first")
    ap.add_argument("--out", default=None, help="directory for results.json and speedup.png")
    ap.add_argument("--mem-budget-gb", type=float, default=30.0, help="skip points whose BF16 KV exceeds this")
    ap.add_argument("--fi-page-size", type=int, default=1,
                    help="FlashInfer's KV page size (default 1: the page size SGLang serves with by default)")
    ap.add_argument("--sgl-splits", type=int, default=16, help="num_kv_splits / max_kv_splits of SGLang triton")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--batch", type=int, nargs="*", default=None)
    ap.add_argument("--ctx", type=int, nargs="*", default=None)
    ap.add_argument("--codecs", nargs="*", default=None)
    ap.add_argument("--shapes", nargs="*", default=None, choices=list(SHAPES))
    ap.add_argument("--window", type=int, default=0,
                    help="also time each point with a recent window of this many positions (server presets: 32)")
    ap.add_argument("--first", action="store_true",
                    help="also time each point with the exact first-token rows (and --window's ring when given)")
    ap.add_argument("--extend", nargs="*", default=[], metavar="PREFIX:NEW[:SEQS]",
                    help="also time extend over a packed prefix (chunked prefill / radix hit) against SGLang's "
                         "Triton extend and FlashInfer's prefill over a BF16 prefix, per codec, at (32, 8, 128); "
                         "SEQS sequences (default 1) of that shape in one call")
    ap.add_argument("--prefill", nargs="*", default=[], metavar="SEQS:LEN",
                    help="also time one layer's first-prefill attention work (store + SGLang's Triton extend) "
                         "with BF16 KV and with each codec's compress, at (32, 8, 128)")
    args = ap.parse_args()

    import triton

    log(f"torch {torch.__version__}  triton {triton.__version__}  cuda {torch.version.cuda}")
    if not torch.cuda.is_available():
        log("no CUDA device: nothing to benchmark (run the tests with TRITON_INTERPRET=1 instead)")
        return 1
    props = torch.cuda.get_device_properties(0)
    log(f"GPU {props.name}  SMs {props.multi_processor_count}  mem {props.total_memory / 2**30:.0f} GiB")
    for mod in ("flashinfer", "sglang"):
        try:
            m = __import__(mod)
            log(f"{mod} {getattr(m, '__version__', '?')}")
        except Exception as e:
            log(f"{mod} not available ({type(e).__name__}: {e})")
    l2 = getattr(props, "L2_cache_size", 50 << 20)
    t_start = time.time()
    commit = args.commit or checkout_commit()

    results = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__, commit=commit,
                   date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), points=[], compress=[],
                   extend=[], prefill=[], check=None)
    if args.check:
        results["check"] = check_all()

    bw = copy_bandwidth_gbs()
    log(f"copy bandwidth (read + write) {bw:.0f} GB/s")
    results["copy_gbs"] = bw

    if args.headline:
        headline(results, l2, bw, args)
        save(results, args.out, args.json)
        if args.records:
            merge_records(args.records, kernel_records(results))
        print_table(results, time.time() - t_start)
        return 0 if results["check"] in (None, True) else 2

    batches = args.batch or ([1, 32] if args.quick else [1, 8, 32, 128])
    ctxs = args.ctx or ([1024, 32768] if args.quick else [1024, 4096, 16384, 32768])
    codecs = args.codecs or (["K4V4", "K3V3"] if args.quick else list(CODECS))
    shapes = args.shapes or (["hd128"] if args.quick else list(SHAPES))

    for shape in shapes:
        hq, hkv, d = SHAPES[shape]
        for B in batches:
            for ctx in ctxs:
                bf16_bytes = 2 * B * ctx * hkv * d * 2
                if bf16_bytes > args.mem_budget_gb * 2**30:
                    log(f"skip {shape} B={B} ctx={ctx}: BF16 KV {bf16_bytes / 2**30:.1f} GiB > budget")
                    continue
                base = {} if args.no_baselines else decode_baselines(B, ctx, hq, hkv, d, l2, args)
                for codec in codecs:
                    try:
                        results["points"].append(decode_point(shape, codec, B, ctx, l2, bw, args, base))
                    except Exception as e:  # noqa: BLE001 - one failing point must not lose the others
                        log(f"  ours failed at {shape} {codec} B={B} ctx={ctx}: {type(e).__name__}: {e}")
                        traceback.print_exc()
                        continue
                    save(results, args.out, args.json)
        # compress vs one decode step
        for codec in codecs:
            for B in batches:
                try:
                    ms = run_compress(B, hkv, d, codec, 5, hq=hq)
                    dec = sorted((p["ctx"], p["ms"]) for p in results["points"] if p["shape"] == shape
                                 and p["codec"] == codec and p["B"] == B)
                    results["compress"].append(dict(shape=shape, codec=codec, B=B, ms=ms,
                                                    decode_ctx=dec[0][0] if dec else None,
                                                    decode_ms=dec[0][1] if dec else None))
                except Exception as e:
                    log(f"  compress failed {shape} {codec} B={B}: {type(e).__name__}: {e}")

    for pt in args.extend:
        prefix, new, *rest = (int(x) for x in pt.split(":"))
        for codec in codecs:
            try:
                results["extend"].append(extend_point(prefix, new, rest[0] if rest else 1, codec, args))
            except Exception as e:  # noqa: BLE001 - one failing point must not lose the others
                log(f"  extend failed {codec} {pt}: {type(e).__name__}: {e}")

    for pt in args.prefill:
        seqs, length = (int(x) for x in pt.split(":"))
        hq, hkv, d = SHAPES["hd128"]
        for codec in codecs:
            try:
                r = run_prefill(seqs, length, hq, hkv, d, codec, 11)
            except Exception as e:  # noqa: BLE001 - one failing point must not lose the others
                log(f"  prefill failed {codec} {pt}: {type(e).__name__}: {e}")
                continue
            results["prefill"].append(dict(codec=codec, seqs=seqs, len=length, **r))
            log(f"  prefill {codec:<8} {seqs} x {length}: per layer BF16 {r['bf16_layer'] * 1e3:8.1f} us "
                f"(store {r['store_bf16'] * 1e3:.1f}, extend {r['extend'] * 1e3:.1f})  TQ {r['tq_layer'] * 1e3:8.1f} us "
                f"(compress {r['compress'] * 1e3:.1f})"
                + (f"; FlashInfer prefill {r['fi_prefill'] * 1e3:.1f}: BF16 {r['bf16_layer_fi'] * 1e3:.1f} us, "
                   f"TQ {r['tq_layer_fi'] * 1e3:.1f} us" if r.get("fi_prefill") else ""))

    save(results, args.out, args.json)
    if args.records:
        merge_records(args.records, kernel_records(results))
    if args.out:
        try:
            plot(results, os.path.join(args.out, "speedup.png"))
        except Exception as e:
            log(f"plot failed: {type(e).__name__}: {e}")

    print_table(results, time.time() - t_start)
    return 0 if results["check"] in (None, True) else 2


def kernel_records(results) -> list:
    """results/kernels.json records (decode points and extend rows) of this run."""
    common = dict(card=results["gpu"], date=results["date"][:10], commit=(results.get("commit") or "")[:7] or None,
                  command="python scripts/bench_kernels.py " + " ".join(sys.argv[1:]), copy_gbps=round(results["copy_gbs"]))

    def us(ms):
        return None if not ms else round(ms * 1e3, 1)

    recs = [dict(bench="decode", codec=p["codec"], h_q=p["hq"], h_kv=p["hkv"], head_dim=p["d"], batch=p["B"],
                 context=p["ctx"], new_tokens=None, ours_us=us(p["ms"]), flashinfer_bf16_us=us(p.get("fi_bf16")),
                 flashinfer_fp8_us=us(p.get("fi_fp8")), sglang_triton_us=us(p.get("sgl_triton")),
                 packed_bytes=p["bytes"], **common) for p in results["points"]]
    hq, hkv, d = SHAPES["hd128"]
    recs += [dict(bench="extend", codec=e["codec"], h_q=hq, h_kv=hkv, head_dim=d, batch=e["seqs"], context=e["prefix"],
                  new_tokens=e["new"], ours_us=us(e["ours"]), flashinfer_bf16_us=us(e.get("fi_bf16")),
                  flashinfer_fp8_us=None, sglang_triton_us=us(e.get("sgl_triton_bf16")), packed_bytes=None, **common)
             for e in results["extend"]]
    return recs


def record_key(r: dict) -> tuple:
    return tuple(r.get(k) for k in ("bench", "codec", "h_q", "h_kv", "head_dim", "batch", "context", "new_tokens",
                                    "card"))


def merge_records(path, recs) -> None:
    """Write recs into the JSON list at path; a new record replaces an older one of the same point and card."""
    merged = replace_records(path, recs, record_key)
    log(f"{len(recs)} records into {path} ({len(merged)} in all)")


def save(results, out, json_path=None):
    """results.json under out and / or json_path (after every decode point too, so a run cut short keeps
    what it measured)."""
    paths = ([os.path.join(out, "results.json")] if out else []) + ([json_path] if json_path else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)


def print_table(results, elapsed_s):
    """Compact table: the last lines of the output."""
    bw = results["copy_gbs"]
    log("")
    log(f"GPU {results['gpu']}, copy {bw:.0f} GB/s, bench time {elapsed_s:.0f} s"
        + ("" if results["check"] is None else f", check {'PASSED' if results['check'] else 'FAILED'}"))
    for c in results["compress"]:
        dm = f"{c['decode_ms'] * 1e3:.1f} us at ctx {c['decode_ctx']}" if c.get("decode_ms") else "-"
        log(f"compress {c['shape']} {c['codec']} B={c['B']} tokens: {c['ms'] * 1e3:.1f} us  (decode step: {dm})")
    log(f"{'shape':<6}{'codec':<9}{'B':>4}{'ctx':>7}{'ours us':>9}{'floor':>7}{'%copy':>6}"
        f"{'FIbf16':>8}{'FIfp8':>8}{'sglT':>8}{'xBF16':>6}{'xFP8':>6}{'xTri':>6}")

    def f(x, s=1e3, p=".1f"):
        return "-" if x is None else format(x * s, p)

    for p in results["points"]:
        log(f"{p['shape']:<6}{p['codec']:<9}{p['B']:>4}{p['ctx']:>7}{f(p['ms']):>9}{f(p['floor_ms']):>7}"
            f"{p['pct_copy']:>6.0f}{f(p.get('fi_bf16')):>8}{f(p.get('fi_fp8')):>8}{f(p.get('sgl_triton')):>8}"
            f"{f(p['x_fi_bf16'], 1, '.2f'):>6}{f(p['x_fi_fp8'], 1, '.2f'):>6}{f(p['x_sgl_triton'], 1, '.2f'):>6}")
    for e in results.get("extend", []):
        log(f"extend {e['codec']} prefix {e['prefix']} new {e['new']} seqs {e['seqs']}: ours {f(e['ours'])} us"
            f"  FlashInfer BF16 {f(e.get('fi_bf16'))} us  SGLang triton BF16 {f(e.get('sgl_triton_bf16'))} us")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in results["points"] if p.get("x_fi_bf16")]
    shapes = sorted({p["shape"] for p in pts})
    fig, axes = plt.subplots(1, max(1, len(shapes)), figsize=(7 * max(1, len(shapes)), 5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for codec in sorted({p["codec"] for p in pts}):
            for B in sorted({p["B"] for p in pts}):
                sel = sorted((p["ctx"], p["x_fi_bf16"]) for p in pts
                             if p["shape"] == shape and p["codec"] == codec and p["B"] == B)
                if sel:
                    ax.plot([s[0] for s in sel], [s[1] for s in sel], marker="o", label=f"{codec} B={B}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length")
        ax.set_ylabel("speed-up vs FlashInfer BF16")
        ax.set_title(f"{shape} on {results['gpu']}")
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
