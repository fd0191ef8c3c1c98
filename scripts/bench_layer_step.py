#!/usr/bin/env python3
"""Per-layer cost of a decode step as a server's CUDA graph pays it (GPU): L layers back to back in one
graph, each with its own cache, storing the step's new K/V and attending over the batch. TurboQuant
(compress_and_store with the query rotation and the recent-window ring, then decode_attention with the
window) against BF16 KV (SGLang's store_cache, else index_put, then FlashInfer's tensor-core decode)
and FP8 KV (cast + store, FlashInfer FP8 decode). Same card, same run; per-layer µs = graph time / L.

Why: a serving step at short context is a sum of small launches per layer, and an isolated kernel's
graph time hides how much of it is launch and latency. This is the number behind the ISL 1K serving
ratio (`docs/RESULTS.md`). --variants: the defaults, without the window, batch-invariant splits.
--records PATH merges the points into a results/kernels.json-style list (bench "step"; with the card, the
copy bandwidth measured in this run and the commit), from which scripts/make_tables.py renders the tables.

    python3 scripts/bench_layer_step.py [--points 1:1024 8:4096 ...] [--out DIR] [--records PATH]
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import (bench, checkout_commit, copy_bandwidth_gbs, fmts, merge_records, paged_indices,  # noqa: E402
                           random_packed)
from profile_decode import kernel_times  # noqa: E402

from kernel_helpers import make_codecs  # noqa: E402  (bench_kernels put tests/ on the path)
from tq_kernels.compress import compress_and_store  # noqa: E402
from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode  # noqa: E402
from tq_kernels.window import DecodeWindow, RingWrite  # noqa: E402

# name -> plan_decode keyword arguments (None: the defaults without the recent window)
VARIANTS = {
    "default": {},
    "no_window": None,
    "batch_invariant": dict(batch_invariant=True),
}


def layers_for(bytes_per_layer, want):
    """As many layers as asked, within ~24 GB of caches."""
    return max(2, min(want, int(24e9 // max(bytes_per_layer, 1))))


def tq_layers(B, ctx, L, hq, hkv, d, codec, window, variant):
    kfmt, vfmt = fmts(codec, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=0)
    pkw = VARIANTS[variant] or {}
    if VARIANTS[variant] is None:
        window = 0
    n_slots = B * ctx + 1
    indptr, idx = paged_indices(B, ctx, n_slots, 2)
    plan = plan_decode(kc, vc, B, hkv, ctx, "cuda", window=bool(window), **pkw)
    ns = plan.num_splits
    ws = DecodeWorkspace.create(B, hq, d, max_splits=plan.partials, device="cuda")
    slots = idx[indptr[1:].long() - 1].to(torch.int64)  # each sequence's last position is the new token
    lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
    base = torch.arange(B, device="cuda", dtype=torch.int32) * max(window, 1)
    win_lo = (lens - window).clamp_min(0).contiguous()
    ring_rows = (base + (ctx - 1) % max(window, 1)).to(torch.int32)
    layers = []
    for i in range(L):
        bufs = random_packed(kfmt, vfmt, n_slots, hkv, 10 + i)
        ring = None
        if window:
            ring = (torch.randn(B * window, hkv, d, device="cuda", dtype=torch.bfloat16),
                    torch.randn(B * window, hkv, d, device="cuda", dtype=torch.bfloat16))
        layers.append((bufs, ring))
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)

    def one(bufs, ring):
        extra = {"ring": RingWrite(ring[0], ring[1], ring_rows)} if ring is not None else {}
        compress_and_store(k, v, slots, kc, vc, *bufs, q=q, q_rot=ws.q_rot, **extra)
        win = DecodeWindow(ring[0], ring[1], window, win_lo, base) if ring is not None else None
        decode_attention(q, *bufs, kc, vc, indptr, idx, d ** -0.5, 0.0, out, plan=plan, workspace=ws,
                         q_rotated=ws.q_rot, window=win)

    return (*time_layers(one, layers), ns)


def time_layers(one, layers):
    """(µs per layer of one step that runs `one(*layer)` for every layer, timed by `bench`; the kernel
    times of the first layer's plain launches). Frees the layers' caches afterwards, before the next
    system allocates its own."""
    def step():
        for layer in layers:
            one(*layer)

    us = bench(step) * 1e3 / len(layers)
    kern = kernel_times(lambda: one(*layers[0]))
    layers.clear()
    torch.cuda.empty_cache()
    return us, kern


def store_fn():
    """SGLang's BF16 KV store (one JIT launch for K and V) when it loads here, else index_put."""
    try:
        from sglang.jit_kernel.kvcache import can_use_store_cache, store_cache

        def store(k, v, kb, vb, loc):
            row = k.shape[1] * k.shape[2]
            if can_use_store_cache(row * kb.element_size()):
                return store_cache(k.reshape(-1, row), v.reshape(-1, row), kb.view(-1, row), vb.view(-1, row),
                                   loc, row_bytes=row * kb.element_size())
            kb[loc] = k
            vb[loc] = v
        # one trial call: the JIT kernel may not build here
        kb = torch.zeros(4, 8, 128, device="cuda", dtype=torch.bfloat16)
        store(torch.ones(1, 8, 128, device="cuda", dtype=torch.bfloat16), torch.ones(1, 8, 128, device="cuda",
              dtype=torch.bfloat16), kb, kb.clone(), torch.tensor([1], device="cuda"))
        torch.cuda.synchronize()
        assert float(kb[1].sum()) == 8 * 128
        return store, "sglang store_cache"
    except Exception as e:  # noqa: BLE001
        print(f"  (SGLang store_cache unavailable: {type(e).__name__}: {str(e)[:100]}; index_put)", flush=True)

        def store(k, v, kb, vb, loc):
            kb[loc] = k
            vb[loc] = v
        return store, "index_put"


def fi_layers(B, ctx, L, hq, hkv, d, kv_dtype, store):
    import flashinfer

    n_slots = B * ctx + 1
    indptr, idx = paged_indices(B, ctx, n_slots, 2)
    loc = idx[indptr[1:].long() - 1].to(torch.int64)
    ws_buf = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws_buf, "NHD", use_tensor_cores=True)
    w.plan(indptr, idx, torch.ones(B, dtype=torch.int32, device="cuda"), hq, hkv, d, 1, pos_encoding_mode="NONE",
           q_data_type=torch.bfloat16, kv_data_type=kv_dtype, sm_scale=d ** -0.5)
    layers = [(torch.randn(n_slots, 1, hkv, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype),
               torch.randn(n_slots, 1, hkv, d, device="cuda", dtype=torch.bfloat16).to(kv_dtype)) for _ in range(L)]
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    out = torch.empty_like(q)

    def one(kb, vb):
        if kv_dtype == torch.bfloat16:
            store(k, v, kb.view(n_slots, hkv, d), vb.view(n_slots, hkv, d), loc)
        else:  # SGLang's FP8 path: cast, then the same store on the byte view
            kb.view(n_slots, hkv, d)[loc] = k.to(kv_dtype)
            vb.view(n_slots, hkv, d)[loc] = v.to(kv_dtype)
        w.run(q, (kb, vb), out=out)

    return time_layers(one, layers)


def step_records(rows, a, card, copy_gbps, shape) -> list:
    """results/kernels.json records (bench "step") of this run's points: per-layer µs of the default
    plan (the served one) against FlashInfer BF16 / FP8, the packed bytes one layer reads, the copy bandwidth."""
    hq, hkv, d = shape
    kfmt, vfmt = fmts(a.codec, d)
    common = dict(card=card, date=time.strftime("%Y-%m-%d", time.gmtime()),
                  commit=((a.commit or checkout_commit() or "")[:7] or None),
                  command="python scripts/bench_layer_step.py " + " ".join(sys.argv[1:]), copy_gbps=round(copy_gbps))
    return [dict(bench="step", codec=a.codec, h_q=hq, h_kv=hkv, head_dim=d, batch=r["B"], context=r["ctx"],
                 new_tokens=1, layers=r["layers"], window=a.window, ours_us=round(r["tq_default_us"], 1), flashinfer_bf16_us=round(r["bf16_us"], 1),
                 flashinfer_fp8_us=round(r["fp8_us"], 1) if "fp8_us" in r else None, sglang_triton_us=None,
                 packed_bytes=r["B"] * r["ctx"] * hkv * (kfmt.slot_bytes + vfmt.slot_bytes), **common)
            for r in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", nargs="*", default=["1:1024", "8:1024", "32:1024", "1:4096", "8:4096", "32:4096",
                                                    "64:16384"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--codec", default="K4V4")
    ap.add_argument("--window", type=int, default=32, help="recent-window rows per request (presets: 32; 0: none)")
    ap.add_argument("--variants", nargs="*", default=["default"], choices=list(VARIANTS))
    ap.add_argument("--no-fp8", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--records", default=None, metavar="PATH",
                    help="merge the points (the default plan) into a results/kernels.json-style record list")
    ap.add_argument("--commit", default=None, help="the commit to record (default: git rev-parse HEAD)")
    a = ap.parse_args()
    if a.records and "default" not in a.variants:
        ap.error("--records holds the default plan's times: add 'default' to --variants")
    hq, hkv, d = 32, 8, 128
    gpu = torch.cuda.get_device_name(0)
    print("GPU", gpu, flush=True)
    store, store_name = store_fn()
    rows = []
    for p in a.points:
        B, ctx = (int(x) for x in p.split(":"))
        L = layers_for(B * ctx * hkv * d * 4, a.layers)
        r = {"B": B, "ctx": ctx, "layers": L, "bf16_store": store_name}
        r["bf16_us"], r["bf16_kernels_us"] = fi_layers(B, ctx, L, hq, hkv, d, torch.bfloat16, store)
        if not a.no_fp8:
            r["fp8_us"], r["fp8_kernels_us"] = fi_layers(B, ctx, L, hq, hkv, d, torch.float8_e4m3fn, store)
        for var in a.variants:
            us, kern, ns = tq_layers(B, ctx, L, hq, hkv, d, a.codec, a.window, var)
            r[f"tq_{var}_us"], r[f"tq_{var}_kernels_us"], r["splits"] = us, kern, ns
        rows.append(r)
        line = f"B={B:<3} ctx={ctx:<6} L={L:<3} per layer: BF16 {r['bf16_us']:7.1f} us"
        if "fp8_us" in r:
            line += f"  FP8 {r['fp8_us']:7.1f}"
        for var in a.variants:
            line += f"  TQ[{var}] {r[f'tq_{var}_us']:7.1f} ({r['bf16_us'] / r[f'tq_{var}_us']:.2f}x BF16)"
        print(line, flush=True)
        for key in ["bf16", "fp8"] + [f"tq_{var}" for var in a.variants]:
            if f"{key}_kernels_us" in r:
                ks = ", ".join(f"{n.split('(')[0][:28]} {t:.1f}" for n, t in r[f"{key}_kernels_us"].items())
                print(f"    {key} kernels (plain launches, one layer, us): {ks}", flush=True)
    if a.records:
        merge_records(a.records, step_records(rows, a, gpu, copy_bandwidth_gbs(), (hq, hkv, d)))
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "bench_layer_step.json"), "w") as f:
            json.dump({"gpu": gpu, "codec": a.codec, "window": a.window, "shape": [hq, hkv, d], "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
