#!/usr/bin/env python3
"""Where the time of one decode step goes (GPU): per-kernel GPU time of compress_and_store and
decode_attention at a few (B, context) points, from torch.profiler over plain launches, next to the
CUDA-graph times of each call and of the layer's whole step (compress, then decode: what a server's
decode graph pays per quantized layer). By default the compress launch also rotates the queries, as in
the server; --compare-q-rotation adds each point with decode's own rotation (three launches).

    python3 scripts/profile_decode.py [--codecs K4V4 K3V3] [--points 1:1024 8:1024 32:32768] [--out DIR]
"""
import argparse
import json
import os
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kernels import bench, fmts, paged_indices, random_packed  # noqa: E402

from kernel_helpers import make_codecs  # noqa: E402  (bench_kernels put tests/ on the path)
from tq_kernels.compress import compress_and_store  # noqa: E402
from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode  # noqa: E402


def kernel_times(fn, iters=30):
    """{kernel name: mean device µs per call of fn}."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    tot = defaultdict(float)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:60]] += ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
    return {k: v / iters for k, v in sorted(tot.items(), key=lambda kv: -kv[1])}


def point(codec, B, ctx, hq=32, hkv=8, d=128, decode_kw=None):
    kfmt, vfmt = fmts(codec, d)
    kc, vc = make_codecs(kfmt, vfmt, seed=0)
    n_slots = B * ctx + 1
    bufs = random_packed(kfmt, vfmt, n_slots, hkv, 1)
    indptr, idx = paged_indices(B, ctx, n_slots, 2)
    q = torch.randn(B, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    kw = dict(decode_kw or {})
    q_in_compress = kw.pop("q_in_compress", True) and not kfmt.qjl
    plan = plan_decode(kc, vc, B, hkv, ctx, "cuda", num_splits=kw.pop("num_splits", None))
    ws = DecodeWorkspace.create(B, hq, d, max_splits=plan.partials, device="cuda")
    k = torch.randn(B, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    slots = (torch.randperm(n_slots - 1, device="cuda")[:B] + 1).to(torch.int64)
    qkw = dict(q=q, q_rot=ws.q_rot) if q_in_compress else {}

    def dec():
        decode_attention(q, *bufs, kc, vc, indptr, idx, d ** -0.5, 0.0, out, plan=plan, workspace=ws,
                         q_rotated=ws.q_rot if q_in_compress else None)

    def comp():
        compress_and_store(k, v, slots, kc, vc, *bufs, **qkw)

    def step():
        comp()
        dec()

    res = {"codec": codec, "B": B, "ctx": ctx, "splits": plan.num_splits, "q_in_compress": q_in_compress,
           "plan": {k_: str(v_) for k_, v_ in vars(plan).items()},
           "decode_graph_us": bench(dec) * 1e3, "compress_graph_us": bench(comp) * 1e3,
           "step_graph_us": bench(step) * 1e3,
           "decode_kernels_us": kernel_times(dec), "compress_kernels_us": kernel_times(comp)}
    del bufs
    torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codecs", nargs="*", default=["K4V4"])
    ap.add_argument("--points", nargs="*", default=["1:1024", "8:1024", "32:1024", "1:32768", "32:32768"])
    ap.add_argument("--compare-q-rotation", action="store_true",
                    help="each point also with decode's own q rotation (not in the compress launch)")
    ap.add_argument("--splits", type=int, nargs="*", default=[],
                    help="each point also with these split counts (default: the plan's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    variants = ([{}] + ([dict(q_in_compress=False)] if a.compare_q_rotation else [])
                + [dict(num_splits=n) for n in a.splits])
    print("GPU", torch.cuda.get_device_name(0), flush=True)
    rows = []
    for codec in a.codecs:
        for p, v in [(p, v) for p in a.points for v in variants]:
            B, ctx = (int(x) for x in p.split(":"))
            r = point(codec, B, ctx, decode_kw=v)
            rows.append(r)
            print(f"{codec} B={B} ctx={ctx} splits={r['splits']} {v or ''}: decode graph {r['decode_graph_us']:.1f} us, "
                  f"compress graph {r['compress_graph_us']:.1f} us, step graph {r['step_graph_us']:.1f} us", flush=True)
            for name, us in list(r["decode_kernels_us"].items())[:8]:
                print(f"    decode  {us:8.1f} us  {name}", flush=True)
            for name, us in list(r["compress_kernels_us"].items())[:4]:
                print(f"    compress{us:8.1f} us  {name}", flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "profile_decode.json"), "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
