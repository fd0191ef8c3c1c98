#!/usr/bin/env python3
"""Compile the Triton kernels for a GPU target on a machine without a GPU (sm_90 by default).

Triton's front end, its MLIR passes and ptxas all run on the CPU; only loading and launching need a
GPU. This script swaps in a stand-in driver that reports the target, turns every launch into a
compile-only warm-up, and calls the real launch functions on CPU tensors for the configurations the
server and the benchmarks use, so compiler crashes show up here instead of on a lent GPU.

  python scripts/compile_check.py            # all configurations
  python scripts/compile_check.py --arch 90 --filter extend
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.driver import CudaDriver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CompileOnlyDriver(CudaDriver):
    """Reports a CUDA target without touching libcuda."""

    def __init__(self, arch):  # noqa: D107 - CudaDriver.__init__ loads libcuda; skip it
        self.arch = arch
        self.get_current_device = lambda: 0
        self.get_current_stream = lambda *a: 0
        self.set_current_device = lambda *a: None

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED = []


def install(arch):
    triton.runtime.driver.set_active(CompileOnlyDriver(arch))
    from triton.runtime.jit import JITFunction
    orig = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        k = orig(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, k))
        return k
    JITFunction.run = run


def configs():
    from tq_kernels.codec import VecFormat as F
    out = []
    for d, (hq, hkv) in [(64, (9, 3)), (128, (32, 8))]:
        for name, kf, vf in [("K4V4", F(d, 4), F(d, 4)), ("K3V3", F(d, 3), F(d, 3)), ("K4V2", F(d, 4), F(d, 2)),
                             ("K5V4", F(d, 5), F(d, 4)),
                             ("PROD3", F(d, 3, qjl=True), F(d, 3)),
                             ("K3.5o", F(d, 3, outlier_channels=d // 4, outlier_bits=4),
                              F(d, 3, outlier_channels=d // 4, outlier_bits=4))]:
            out.append((f"{name}-d{d}", kf, vf, hq, hkv))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--filter", default="")
    a = ap.parse_args()
    install(a.arch)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from kernel_helpers import alloc_cache, make_codecs
    from tq_kernels import compress, decode, extend
    failures = 0
    for name, kf, vf, hq, hkv in configs():
        kc, vc = make_codecs(kf, vf)
        bufs = alloc_cache(kf, vf, 64, hkv, "cpu")
        d = kf.head_dim
        jobs = {
            "compress": lambda: compress.compress_and_store(torch.randn(8, hkv, d, dtype=torch.bfloat16),
                                                            torch.randn(8, hkv, d, dtype=torch.bfloat16),
                                                            torch.arange(1, 9), kc, vc, *bufs),
            "compress-centered": lambda: compress.compress_and_store(
                torch.randn(8, hkv, d, dtype=torch.bfloat16), torch.randn(8, hkv, d, dtype=torch.bfloat16),
                torch.arange(1, 9), kc, vc, *bufs, k_mean=torch.randn(hkv, d)),
        }
        if not kf.qjl:  # the decode step's compress also rotates the queries
            jobs["compress-with-q"] = lambda: compress.compress_and_store(
                torch.randn(8, hkv, d, dtype=torch.bfloat16), torch.randn(8, hkv, d, dtype=torch.bfloat16),
                torch.arange(1, 9), kc, vc, *bufs, q=torch.randn(8, hq, d, dtype=torch.bfloat16),
                q_rot=torch.empty(8, hq, d))
        jobs["compress-prefill"] = lambda: compress.compress_and_store(  # 40 rows: the prefill's 32-row tile
            torch.randn(40, hkv, d, dtype=torch.bfloat16), torch.randn(40, hkv, d, dtype=torch.bfloat16),
            torch.arange(1, 41) % 64, kc, vc, *bufs)

        def decode_job(bn, window=None, **kw):
            def run():
                plan = decode.plan_decode(kc, vc, 2, hkv, 3, "cpu", window=window is not None, num_splits=2,
                                          block_n=bn)
                return decode.decode_attention(
                    torch.randn(2, hq, d, dtype=torch.bfloat16), *bufs, kc, vc,
                    torch.tensor([0, 3, 6], dtype=torch.int32), torch.arange(1, 7), d ** -0.5, plan=plan,
                    window=window, **kw)
            return run

        from tq_kernels.window import DecodeWindow, ExtendWindow, RingWrite

        ring = lambda rows: (torch.zeros(rows, hkv, d, dtype=torch.bfloat16),  # noqa: E731
                             torch.zeros(rows, hkv, d, dtype=torch.bfloat16))
        jobs["compress-window"] = lambda: compress.compress_and_store(
            torch.randn(8, hkv, d, dtype=torch.bfloat16), torch.randn(8, hkv, d, dtype=torch.bfloat16),
            torch.arange(1, 9), kc, vc, *bufs, ring=RingWrite(*ring(64), torch.arange(8, dtype=torch.int32)))
        win = DecodeWindow(*ring(64), 32, torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0, 32], dtype=torch.int32))
        jobs["decode-window"] = decode_job(None, window=win)
        jobs["extend-window"] = lambda: extend.extend_attention(
            torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
            torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
            torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
            window=ExtendWindow(torch.randn(4, hkv, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16), 32))
        for bn in (32, 64, None):  # None: the plan's own tile
            jobs[f"decode-bn{bn or 'plan'}"] = decode_job(bn)
        jobs["decode-bn128"] = decode_job(128)

        def pdl_job(fn):  # programmatic dependent launch: pdl_ok() is False off a GPU, so force it
            def run():
                saved = decode.pdl_ok, compress.pdl_ok
                decode.pdl_ok = compress.pdl_ok = lambda device: True
                try:
                    return fn()
                finally:
                    decode.pdl_ok, compress.pdl_ok = saved
            return run
        jobs["decode-pdl-window"] = pdl_job(decode_job(None, window=win))
        jobs["decode-pdl"] = pdl_job(decode_job(None))
        # a sliding-window layer with attention sinks (gpt-oss), with the recent window's ring too
        sinks = torch.zeros(hq, dtype=torch.bfloat16)
        jobs["decode-sliding-sinks"] = pdl_job(decode_job(None, window=win, sliding_window=128, sinks=sinks))
        jobs["decode-sliding-sinks-bn32"] = decode_job(32, sliding_window=128, sinks=sinks)
        jobs["compress-pdl"] = pdl_job(lambda: compress.compress_and_store(
            torch.randn(8, hkv, d, dtype=torch.bfloat16), torch.randn(8, hkv, d, dtype=torch.bfloat16),
            torch.arange(1, 9), kc, vc, *bufs, q=None if kf.qjl else torch.randn(8, hq, d, dtype=torch.bfloat16),
            q_rot=None if kf.qjl else torch.empty(8, hq, d)))
        for bm, bn in ((64, 64), (32, 32), (64, 32), (128, 64)):
            jobs[f"extend-bm{bm}-bn{bn}"] = lambda bm=bm, bn=bn: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_m=bm, block_n=bn, gqa_pack=False)
        for bm in (64, 128):  # GQA packing (BLOCK_G rows per token)
            jobs[f"extend-gqa-pack-bm{bm}"] = lambda bm=bm: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_m=bm, block_n=64, gqa_pack=True)
        for bm, pack in ((64, False), (128, True)):  # split-K over the prefix, and its merge launch
            jobs[f"extend-split-bm{bm}{'-pack' if pack else ''}"] = lambda bm=bm, pack=pack: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_m=bm, block_n=64, gqa_pack=pack, num_splits=3)
        for bm in (64, 128):  # the new tokens' part from another kernel: prefix-only, merge folds it in
            jobs[f"extend-new-part-bm{bm}"] = lambda bm=bm: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_m=bm, block_n=64, gqa_pack=False,
                new_part=(torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hq)))
        for job, kw in (("extend-sliding-sinks", {}), ("extend-sliding-sinks-split", dict(num_splits=3)),
                        ("extend-new-part-sinks", dict(new_part=(torch.randn(4, hq, d, dtype=torch.bfloat16),
                                                                 torch.randn(4, hq))))):
            jobs[job] = lambda kw=kw: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                sinks=sinks, sliding_window=0 if "new_part" in kw else 128, **kw)
        # speculative verify: a draft tree (bool mask eagerly, uint8 under CUDA graphs) and the prefix's ring,
        # unsplit and split (packed group), and the staging / commit launches
        from tq_kernels.verify import DraftStaging, PrefixRing, TreeMask

        for job, mask_dtype, kw in (("extend-verify", torch.bool, dict(block_m=64, gqa_pack=False)),
                                    ("extend-verify-pack", torch.bool, dict(block_m=64, gqa_pack=True)),
                                    ("extend-verify-split", torch.uint8, dict(block_m=128, gqa_pack=True, num_splits=3))):
            jobs[job] = lambda mask_dtype=mask_dtype, kw=kw: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_n=64, tree=TreeMask(torch.ones(28, dtype=mask_dtype), torch.tensor([0, 28])),
                prefix_ring=PrefixRing(*ring(64), 32, torch.tensor([1, 1, 2, 2], dtype=torch.int32),
                                       torch.tensor([0], dtype=torch.int32)), **kw)

        def staging_job():
            st = DraftStaging([ring(64)[0]] * 2, [ring(64)[1]] * 2, 32, 2, 4, 2, triton_kernel=True)
            table = torch.zeros(3, 64, dtype=torch.int32)
            req, pre = torch.tensor([0, 1]), torch.tensor([5, 9])
            st.stage(req, pre, torch.arange(8), 2, table, torch.zeros(3, dtype=torch.int32))
            st.commit(req, pre + 2, 2, table)
        jobs["verify-staging"] = staging_job
        # the exact first token: its table rows in compress, decode's tail partial (with and without the ring),
        # extend's first row (split and packed, and verify's), and the claim launch
        from tq_kernels.first_token import claim_first_rows
        from tq_kernels.window import FirstRows

        first = FirstRows(*ring(4), torch.zeros(64, dtype=torch.uint8))
        jobs["compress-first"] = lambda: compress.compress_and_store(
            torch.randn(8, hkv, d, dtype=torch.bfloat16), torch.randn(8, hkv, d, dtype=torch.bfloat16),
            torch.arange(1, 9), kc, vc, *bufs, ring=RingWrite(*ring(64), torch.arange(8, dtype=torch.int32)),
            first=RingWrite(*ring(4), torch.full((8,), -1, dtype=torch.int32)))

        def first_decode_job(bn, window=None, **kw):
            def run():
                plan = decode.plan_decode(kc, vc, 2, hkv, 3, "cpu", window=window is not None, first=True,
                                          num_splits=2, block_n=bn)
                return decode.decode_attention(
                    torch.randn(2, hq, d, dtype=torch.bfloat16), *bufs, kc, vc,
                    torch.tensor([0, 3, 6], dtype=torch.int32), torch.arange(1, 7), d ** -0.5, plan=plan,
                    window=window, first=first, **kw)
            return run
        jobs["decode-first"] = first_decode_job(None)
        jobs["decode-first-bn32"] = first_decode_job(32, sliding_window=128, sinks=sinks)
        jobs["decode-pdl-window-first"] = pdl_job(first_decode_job(None, window=win))
        for job, kw in (("extend-first", dict(block_m=64, gqa_pack=False)),
                        ("extend-first-split-pack", dict(block_m=128, gqa_pack=True, num_splits=3)),
                        ("extend-first-verify", dict(block_m=64, gqa_pack=True, tree=TreeMask(
                            torch.ones(28, dtype=torch.uint8), torch.tensor([0, 28])), prefix_ring=PrefixRing(
                            *ring(64), 32, torch.tensor([1, 1, 2, 2], dtype=torch.int32),
                            torch.tensor([0], dtype=torch.int32))))):
            jobs[job] = lambda kw=kw: extend.extend_attention(
                torch.randn(4, hq, d, dtype=torch.bfloat16), torch.randn(4, hkv, d, dtype=torch.bfloat16),
                torch.randn(4, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc, torch.tensor([0, 4], dtype=torch.int32),
                torch.tensor([0, 3], dtype=torch.int32), torch.arange(1, 4), d ** -0.5, max_extend_len=4,
                block_n=64, first=first, **kw)
        jobs["claim-first"] = lambda: claim_first_rows(
            torch.arange(8), torch.arange(1, 9), torch.ones(8, dtype=torch.bool),
            torch.full((4,), -1, dtype=torch.int32), torch.zeros(64, dtype=torch.uint8))
        for job, fn in jobs.items():
            if a.filter and a.filter not in f"{name} {job}":
                continue
            COMPILED.clear()
            try:
                fn()
                info = ", ".join(f"{n}: smem {k.metadata.shared}" for n, k in COMPILED)
                print(f"ok   {name:10s} {job:18s} {info}", flush=True)
            except Exception as e:  # noqa: BLE001
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"FAIL {name:10s} {job:18s} {type(e).__name__}: {msg[-1] if msg else ''}", flush=True)
                if os.environ.get("VERBOSE"):
                    traceback.print_exc()
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
