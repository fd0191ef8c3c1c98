"""Triton split-K decode attention against the PyTorch reference (codec + plain softmax attention on
the dequantized K/V). Run on CPU with TRITON_INTERPRET=1; unchanged on a GPU."""
import os
import zlib

import pytest
import torch
import triton
import triton.language as tl

from tq_kernels._common import split_high_crumbs, split_high_nibbles

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from kernel_helpers import alloc_cache, fill_random_kv, make_codecs, pick_device, rel_err, triton_runnable

RUNNABLE, WHY = triton_runnable()
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
TOL = 2e-2  # bf16 tensor-core operands

F = VecFormat
# name, K format, V format, (H_q, H_kv), sequence lengths, num_splits, block_n, logit_cap
CASES = [
    ("K4V4-d128-g4", F(128, 4), F(128, 4), (8, 2), [1, 37, 100], 3, 32, 0.0),
    ("K5V4-d128-g4", F(128, 5), F(128, 4), (8, 2), [41, 9], 2, 32, 0.0),
    ("K6V2-d64-g3", F(64, 6), F(64, 2), (9, 3), [30], 1, 32, 0.0),
    ("K3V3-d64-g3", F(64, 3), F(64, 3), (9, 3), [70, 5], 2, 32, 0.0),
    ("K2V2-d128-g1-nonc", F(128, 2, norm_correction=False), F(128, 2, norm_correction=False), (2, 2), [45], 1, 32, 0.0),
    ("PROD3-V3-d64-g8", F(64, 3, qjl=True), F(64, 3), (16, 2), [33, 1], 2, 32, 0.0),
    ("PROD4-V4-d128-g1", F(128, 4, qjl=True), F(128, 4), (2, 2), [50], 4, 32, 0.0),
    ("K3o-V2o-d128-g4", F(128, 3, outlier_channels=32, outlier_bits=4),
     F(128, 2, outlier_channels=32, outlier_bits=3), (4, 1), [90, 17], 2, 32, 0.0),
    ("PROD3o-V4nonc-d64-g3", F(64, 3, qjl=True, outlier_channels=16, outlier_bits=4),
     F(64, 4, norm_correction=False), (6, 2), [29], 1, 32, 0.0),
    ("K4V2-d64-g4-cap", F(64, 4), F(64, 2), (8, 2), [64, 3], 2, 32, 20.0),
    ("K4V3o-d256-g2", F(256, 4), F(256, 3, outlier_channels=8, outlier_bits=4), (4, 2), [21], 2, 32, 0.0),
    ("K4V4-d128-g8-long-default-block", F(128, 4), F(128, 4), (16, 2), [700, 129], 4, 64, 0.0),
    # more splits than tiles (empty splits) and an empty sequence
    ("K4V4-d64-empty-splits", F(64, 4), F(64, 4), (4, 4), [3, 0, 40], 8, 32, 0.0),
]


def _run_case(kfmt, vfmt, hq, hkv, lens, num_splits, block_n, cap, seed, q_dtype=torch.bfloat16, workspace=None,
              expect_sliced=None, **kw):
    """Decode one random batch with a plan of num_splits / block_n (the rest planned) against the
    reference; expect_sliced: which stage 1 the plan must have chosen."""
    from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode

    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 7)
    S = sum(lens) + 13
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV)  # poisoned: random bytes, NaN scales
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    B, d = len(lens), kfmt.head_dim
    q = (torch.randn(B, hq, d, generator=gen) * 2).to(DEV, q_dtype)
    sm = d ** -0.5
    ws = workspace or DecodeWorkspace.create(B + 1, hq, vfmt.head_dim, max_splits=max(num_splits, 4), device=DEV)
    out = torch.full((B, hq, vfmt.head_dim), float("nan"), dtype=q_dtype, device=DEV)
    plan = plan_decode(kc, vc, B, hkv, max(lens), DEV, num_splits=num_splits, block_n=block_n,
                       max_splits=ws.max_splits)
    if expect_sliced is not None:
        assert plan.sliced == expect_sliced, plan
    ret = decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, sm, cap, out,
                           plan=plan, workspace=ws, **kw)
    assert ret is out
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), sm, cap)
    assert not torch.isnan(out).any(), "NaN in output or elements left unwritten"
    return out.cpu().float(), ref.float()


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_matches_reference(case):
    """Every format through the stage 1 its plan picks (sliced where both formats have a register LUT,
    general for 6-bit codes, outliers and 3-bit keys at head_dim 64)."""
    name, kfmt, vfmt, (hq, hkv), lens, ns, bn, cap = case
    out, ref = _run_case(kfmt, vfmt, hq, hkv, lens, ns, bn, cap, zlib.crc32(name.encode()))
    err = rel_err(out, ref)
    assert err < TOL, f"{name}: rel err {err:.3e}"
    for b, n in enumerate(lens):
        if n == 0:
            assert float(out[b].abs().max()) == 0.0  # empty sequence -> zeros, as the reference


@needs_triton
def test_decode_fp32_query_and_default_splits():
    """q in fp32, workspace and num_splits left to the launch function."""
    from tq_kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(11)
    kfmt = vfmt = F(64, 4)
    kc, vc = make_codecs(kfmt, vfmt)
    lens, hq, hkv = [20, 9], 4, 2
    bufs = alloc_cache(kfmt, vfmt, 40, hkv, DEV)
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    q = torch.randn(2, hq * 64, generator=gen).to(DEV)  # 2-D [B, H_q * d] as SGLang passes it
    out = decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, 0.125)
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), 0.125)
    assert out.dtype == torch.float32 and out.shape == (2, hq, 64)
    assert rel_err(out.cpu(), ref) < TOL


@needs_triton
@pytest.mark.parametrize("kbits, vbits", [(4, 4), (3, 3), (5, 4)], ids=["K4V4", "K3V3", "K5V4"])
def test_decode_launch_defaults(kbits, vbits):
    """Every launch choice left to decode_attention (block size, warps, splits, stage 1) on bf16 queries,
    for each register-LUT kind, at a small batch: on a GPU this is the 8-warp, 128-token-tile
    configuration of `choose_num_warps` for K4V4."""
    from tq_kernels.decode import decode_attention

    gen = torch.Generator().manual_seed(5)
    kfmt, vfmt = F(128, kbits), F(128, vbits)
    kc, vc = make_codecs(kfmt, vfmt)
    lens, hq, hkv = [300, 1], 8, 2
    bufs = alloc_cache(kfmt, vfmt, sum(lens) + 5, hkv, DEV)
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    q = (torch.randn(2, hq, 128, generator=gen) * 2).to(DEV, torch.bfloat16)
    out = decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, 128 ** -0.5)
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), 128 ** -0.5)
    assert rel_err(out.cpu().float(), ref.float()) < TOL


def test_choose_num_splits():
    from tq_kernels.decode import choose_num_splits

    assert choose_num_splits(1, 8, 32768, 132) == 33  # few (sequence, head) pairs: ~2 programs per SM
    assert choose_num_splits(1, 8, 1024, 132) == 8  # ... with splits down to 128 tokens
    assert choose_num_splits(32, 8, 32768, 132) == 8  # ~8 programs per pair
    assert choose_num_splits(32, 8, 1024, 132) == 4  # pairs fill the SMs: splits of at least 256 tokens
    assert choose_num_splits(128, 8, 32768, 132) <= 3  # 1024 (sequence, head) pairs already fill the GPU
    assert choose_num_splits(1, 1, 100, 132) == 1  # short sequences are not split
    assert 1 <= choose_num_splits(32, 8, 32768, 132, max_splits=16) <= 16


def test_choose_num_warps():
    from tq_kernels.decode import choose_num_warps

    assert choose_num_warps(1, 8, 132) == 8 and choose_num_warps(16, 8, 132) == 8  # pairs leave SMs idle
    assert choose_num_warps(17, 8, 132) == 4 and choose_num_warps(32, 8, 132) == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_cuda_graph_replay():
    """Capture decode_attention with a workspace, change lengths / indices in place, replay."""
    from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode

    gen = torch.Generator().manual_seed(5)
    kfmt, vfmt = F(128, 4), F(128, 4)
    kc, vc = make_codecs(kfmt, vfmt)
    hq, hkv, B, max_len, S = 8, 2, 3, 300, 4096
    bufs = alloc_cache(kfmt, vfmt, S, hkv, "cuda")
    batch = fill_random_kv([max_len] * B, hkv, kc, vc, bufs, gen, "cuda")
    kv_indptr = batch.kv_indptr.clone()
    kv_indices = torch.zeros(B * max_len, dtype=torch.int32, device="cuda")
    q = torch.randn(B, hq, 128, generator=gen).to("cuda", torch.bfloat16)
    out = torch.empty(B, hq, 128, dtype=torch.bfloat16, device="cuda")
    ws = DecodeWorkspace.create(B, hq, 128, max_splits=8, device="cuda")

    def set_batch(lens):
        ip = torch.zeros(B + 1, dtype=torch.int32)
        ip[1:] = torch.tensor(lens).cumsum(0)
        idx = torch.cat([batch.kv_indices[i * max_len:i * max_len + n] for i, n in enumerate(lens)])
        kv_indptr.copy_(ip.cuda())
        kv_indices[:idx.numel()].copy_(idx)
        return ip, idx

    plan = plan_decode(kc, vc, B, hkv, max_len, "cuda", num_splits=4, max_splits=ws.max_splits)

    def run():
        decode_attention(q, *bufs, kc, vc, kv_indptr, kv_indices, 128 ** -0.5, 0.0, out, plan=plan, workspace=ws)

    set_batch([10, 20, 30])
    run()  # warm-up: compile + cache tables outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    for lens in ([5, 300, 77], [1, 2, 3], [299, 150, 64]):
        ip, idx = set_batch(lens)
        q.copy_(torch.randn(B, hq, 128, generator=gen).to("cuda", torch.bfloat16))
        g.replay()
        torch.cuda.synchronize()
        ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, ip, idx.cpu(), 128 ** -0.5)
        assert rel_err(out.cpu().float(), ref.float()) < TOL


# Every K x V bit-width pair of plain MSE formats through the default (automatic) stage 1 at d 64
# (SmolLM2's head size), plus 3-bit keys at d 128: key and value LUT kinds differ in slice count (4 for
# 2- and 3-bit codes, 2 for 4- and 5-bit ones), and 3-bit keys with 4-bit values once gave wrong results
# on sm_90 while the interpreter was right.
MATRIX = [(64, kb, vb) for kb in (2, 3, 4, 5) for vb in (2, 3, 4, 5)] + [(128, 3, vb) for vb in (2, 4, 5)]


@needs_triton
@pytest.mark.parametrize("d, kb, vb", MATRIX, ids=[f"K{kb}V{vb}-d{d}" for d, kb, vb in MATRIX])
def test_decode_default_stage1_bit_matrix(d, kb, vb):
    out, ref = _run_case(F(d, kb), F(d, vb), 6, 2, [70, 5], 2, 32, 0.0, 100 * kb + vb)
    assert rel_err(out, ref) < TOL


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, cap", [
    (F(128, 4), F(128, 4), (8, 2), [1, 70, 129], 0.0),
    (F(64, 4), F(64, 2), (9, 3), [40, 3], 20.0),
    (F(64, 2, norm_correction=False), F(64, 4), (4, 4), [3, 0, 40], 0.0),
    (F(128, 3), F(128, 3), (16, 2), [100], 0.0),
    (F(64, 3, qjl=True), F(64, 3), (9, 3), [45, 2], 0.0),
    (F(128, 4, qjl=True), F(128, 2), (4, 1), [66], 0.0),
    (F(128, 3, outlier_channels=32, outlier_bits=4), F(64 * 2, 2, outlier_channels=16, outlier_bits=4),
     (8, 2), [50, 9], 0.0),
    (F(64, 3, qjl=True, outlier_channels=16, outlier_bits=4), F(64, 3, outlier_channels=8, outlier_bits=4),
     (6, 2), [37], 0.0),
    (F(128, 5), F(128, 4), (8, 2), [70, 33], 0.0),
    (F(64, 5), F(64, 3), (9, 3), [40, 1], 0.0),
], ids=["K4V4-d128-g4", "K4V2-d64-g3-cap", "K2V4-d64-g1-empty", "K3V3-d128-g8", "PROD3-V3-d64-g3",
        "PROD4-V2-d128-g4", "K3o-V2o2-d128", "PROD3o-V3o-d64", "K5V4-d128-g4", "K5V3-d64-g3"])
def test_decode_planned_stage1_matches_reference(kfmt, vfmt, heads, lens, cap):
    """Formats whose first field suits the sliced layout (`sliced_ok`), with and without register LUTs
    (outlier formats take the general stage 1): the same attention as the reference."""
    from tq_kernels.decode import sliced_ok

    assert sliced_ok(kfmt) and sliced_ok(vfmt)
    out, ref = _run_case(kfmt, vfmt, *heads, lens, 3, 32, cap, 1234)
    assert rel_err(out, ref) < TOL
    for b, n in enumerate(lens):
        if n == 0:
            assert float(out[b].abs().max()) == 0.0


@needs_triton
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("kfmt, vfmt, hq, hkv", [(F(128, 4), F(128, 4), 8, 2),
                                                 (F(64, 3, outlier_channels=16, outlier_bits=4), F(64, 3), 9, 3),
                                                 (F(256, 4), F(256, 4), 16, 2)],
                         ids=["K4V4-g4", "K3o-V3-g3", "K4V4-d256-g8"])
def test_decode_with_queries_rotated_by_compress(kfmt, vfmt, hq, hkv, q_dtype):
    """compress_and_store(q=, q_rot=) rotates the decode queries in its launch (q M_k^T, fp32); decode
    on them (q_rotated=) matches decode's own rotation and the reference."""
    from tq_kernels.compress import compress_and_store
    from tq_kernels.decode import DecodeWorkspace, decode_attention, plan_decode

    gen = torch.Generator().manual_seed(21)
    kc, vc = make_codecs(kfmt, vfmt, seed=2)
    lens = [90, 1, 17]
    bufs = alloc_cache(kfmt, vfmt, sum(lens) + 13, hkv, DEV)
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    B, d = len(lens), kfmt.head_dim
    q = (torch.randn(B, hq, d, generator=gen) * 2).to(DEV, q_dtype)
    # the new token of each sequence: its K/V go to the last slot of the sequence, as in a decode step
    last = batch.kv_indices[batch.kv_indptr[1:].long() - 1]
    k_new = torch.randn(B, hkv, d, generator=gen).to(DEV, q_dtype)
    v_new = torch.randn(B, hkv, vfmt.head_dim, generator=gen).to(DEV, q_dtype)
    ws = DecodeWorkspace.create(B + 2, hq, vfmt.head_dim, max_splits=4, device=DEV, head_dim_k=d)
    ws.q_rot.fill_(float("nan"))
    compress_and_store(k_new, v_new, last, kc, vc, *bufs, q=q, q_rot=ws.q_rot)
    want = q.float().cpu() @ kc.rotation.matrix().T.float()
    torch.testing.assert_close(ws.q_rot[:B].cpu(), want, rtol=1e-5, atol=1e-5)
    outs = []
    for qrot in (ws.q_rot, None):
        out = torch.empty(B, hq, vfmt.head_dim, dtype=q_dtype, device=DEV)
        decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, d ** -0.5, 0.0, out,
                         plan=plan_decode(kc, vc, B, hkv, max(lens), DEV, num_splits=2, block_n=32, max_splits=4),
                         workspace=ws, q_rotated=qrot)
        outs.append(out.float().cpu())
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), d ** -0.5, 0.0)
    assert rel_err(outs[0], ref.float()) < TOL
    assert rel_err(outs[0], outs[1]) < 1e-2


@needs_triton
@pytest.mark.parametrize("num_splits", [7, 33])
def test_decode_stage2_many_splits(num_splits):
    """Stage 2 loads a query head's split partials as one block padded to a power of two: split counts
    that are not one, sequences that fill some, all or none of them."""
    lens = [300, 0, 33, 129]
    out, ref = _run_case(F(64, 4), F(64, 4), 8, 2, lens, num_splits, 32, 0.0, 5 + num_splits)
    assert rel_err(out, ref) < TOL
    assert float(out[1].abs().max()) == 0.0


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, splits", [
    (F(128, 4), F(128, 4), (8, 2), [1, 70, 0, 129], 3),
    (F(64, 3), F(64, 2), (9, 3), [40, 5], 5),
    (F(256, 4), F(256, 4), (4, 2), [33], 2),  # d 256: never preloaded (int8 chunks either way)
], ids=["K4V4-d128", "K3V2-d64", "K4V4-d256"])
def test_decode_stage2_unrotation(kfmt, vfmt, heads, lens, splits):
    """Stage 2 un-rotates with M_v's bf16 signs loaded before its merge (d_v <= 128) or int8 signs in
    column chunks after it (d_v 256): the reference's result either way."""
    hq, hkv = heads
    out, ref = _run_case(kfmt, vfmt, hq, hkv, lens, splits, 32, 0.0, 21)
    assert rel_err(out, ref) < TOL


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, splits", [
    (F(128, 4), F(128, 4), (8, 2), [1, 70, 0, 129], 3),
    (F(64, 3, qjl=True), F(64, 2), (9, 3), [40, 5], 5),
], ids=["K4V4-d128", "PROD3V2-d64"])
def test_decode_pdl(kfmt, vfmt, heads, lens, splits):
    """On sm_90+ the plan launches stage 1 and stage 2 as programmatic dependents, waiting (gdc_wait)
    before they read what the kernel before them wrote (outside a graph here, after ordinary launches);
    in the interpreter PDL is off (`pdl_ok`). Same result as the reference."""
    from tq_kernels._common import pdl_ok
    from tq_kernels.decode import plan_decode

    hq, hkv = heads
    kc, vc = make_codecs(kfmt, vfmt)
    assert plan_decode(kc, vc, len(lens), hkv, max(lens), DEV).pdl == pdl_ok(DEV)
    if DEV == "cpu":
        assert not pdl_ok(DEV)
    out, ref = _run_case(kfmt, vfmt, hq, hkv, lens, splits, 64, 0.0, 23)
    assert rel_err(out, ref) < TOL


def test_rotation_sign_tables_reproduce_m():
    """M = signs / sqrt(d) (also with an outlier permutation): the rotations on signs are exact."""
    from tq_kernels._common import kernel_tables

    for kfmt in (F(64, 4), F(128, 3, outlier_channels=32, outlier_bits=4)):
        kc, _ = make_codecs(kfmt, kfmt, seed=3)
        t = kernel_tables(kc, "cpu")
        assert t["msign_t"].dtype == torch.int8 and t["msign"].dtype == torch.int8
        # what the kernels are handed: M^T to rotate, M to un-rotate (int8 and bf16 signs)
        torch.testing.assert_close(t["msign_t"].float() * t["mscale"], t["mt"], rtol=0, atol=1e-7)
        torch.testing.assert_close(t["msign"].float() * t["mscale"], t["m"], rtol=0, atol=1e-7)
        torch.testing.assert_close(t["msign_bf16"].float() * t["mscale"], t["m"], rtol=0, atol=1e-7)


@pytest.mark.parametrize("fmt", [F(128, 4), F(64, 4), F(256, 4), F(128, 2), F(64, 2),
                                 F(128, 3, qjl=True), F(64, 4, norm_correction=False)],
                         ids=["K4-d128", "K4-d64", "K4-d256", "K2-d128", "K2-d64", "PROD3-d128", "K4-d64-nonc"])
def test_register_lut_asm_logic(fmt):
    """The register-LUT PTX, run instruction by instruction on the CPU (tests/kernel_helpers.py emulator), maps
    every code byte to exactly the bf16 centroids a per-code gather returns, slice by slice."""
    from kernel_helpers import emulate_register_lut
    from tq_kernels._common import kernel_tables, register_lut_asm

    kc, _ = make_codecs(fmt, fmt)
    cent = kernel_tables(kc, "cpu")["centroids"]
    asm = register_lut_asm(fmt, cent)
    assert asm
    w = fmt.fields[0][1]
    codes = torch.arange(256, dtype=torch.uint8)
    slices = emulate_register_lut(asm, codes)
    assert len(slices) == 8 // w
    table = cent.to(torch.bfloat16)
    for t, got in enumerate(slices):
        want = table[(codes.long() >> (t * w)) & ((1 << w) - 1)]
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"slice {t}"


def test_register_lut_formats():
    """Register LUTs exist for 4-/2-bit codes ("single") and 3-/5-bit codes ("split", "split5": high
    bits from a second field), not for outliers or 6-bit codes."""
    from tq_kernels._common import kernel_tables, register_lut_asm

    for fmt, kind in ((F(128, 4), "single"), (F(64, 2), "single"), (F(128, 3, qjl=True), "single"),
                      (F(128, 3), "split"), (F(64, 3), "split"), (F(128, 5), "split5"), (F(64, 5), "split5"),
                      (F(128, 6), ""),
                      (F(128, 3, outlier_channels=32, outlier_bits=4), ""), (F(64, 2, outlier_channels=16, outlier_bits=3), "")):
        kc, _ = make_codecs(fmt, fmt)
        assert bool(register_lut_asm(fmt, kc.centroid_table())) == bool(kind), fmt
        assert kernel_tables(kc, "cpu")["register_lut_kind"] == kind, fmt


@pytest.mark.parametrize("bits, d", [(3, 64), (3, 128), (5, 64), (5, 128), (5, 256)])
def test_register_lut_asm_logic_split(bits, d):
    """3-/5-bit codes: the PTX (emulated on the CPU) combines every (bits-1)-bit code byte with every
    combination of its coordinates' high bits (spread per byte) into exactly the bf16 centroids of the
    2^bits-entry codebook, slice by slice."""
    from kernel_helpers import emulate_register_lut
    from tq_kernels._common import kernel_tables, register_lut_asm

    fmt = F(d, bits)
    kc, _ = make_codecs(fmt, fmt)
    cent = kernel_tables(kc, "cpu")["centroids"]
    asm = register_lut_asm(fmt, cent)
    w = bits - 1
    n_high = 1 << (8 // w)  # one high bit per slice
    codes = torch.arange(256, dtype=torch.uint8).repeat(n_high)
    high = torch.arange(n_high, dtype=torch.uint8).repeat_interleave(256)
    slices = emulate_register_lut(asm, codes, high)
    assert len(slices) == 8 // w
    table = cent.to(torch.bfloat16)
    for t, got in enumerate(slices):
        idx = ((codes.long() >> (w * t)) & ((1 << w) - 1)) | (((high.long() >> t) & 1) << w)
        assert torch.equal(got.view(torch.int16), table[idx].view(torch.int16)), f"slice {t}"
    # a codebook that is not antisymmetric in bf16 gets no 5-bit LUT (the general path decodes it)
    if bits == 5:
        bad = cent.clone()
        bad[0] *= 1.01
        assert register_lut_asm(fmt, bad) == ""


@triton.jit
def _split_high_bits_kernel(src, dst, ROWS: tl.constexpr, D: tl.constexpr, STRIDE: tl.constexpr, PER: tl.constexpr):
    r = tl.arange(0, ROWS)
    if PER == 4:
        hb = split_high_nibbles(src + r * STRIDE, r < ROWS, 0, D)
    else:
        hb = split_high_crumbs(src + r * STRIDE, r < ROWS, 0, D)
    tl.store(dst + r[:, None] * (D // PER) + tl.arange(0, D // PER)[None, :], hb)


@needs_triton
@pytest.mark.parametrize("per, d", [(4, 128), (2, 64)], ids=["nibbles-3bit", "crumbs-5bit"])
def test_split_high_bits_match_the_field_layout(per, d):
    """The jit helpers that feed the 3-/5-bit LUTs: for the code byte j of the first field (coordinates
    per j .. per j + per - 1), bit T = the high bit of coordinate per j + T, read from the 1-bit field
    (coordinate i at byte i // 8, bit i % 8). split_high_nibbles: per = 4; split_high_crumbs: per = 2."""
    rows = 4
    bits = torch.randint(0, 2, (rows, d), generator=torch.Generator().manual_seed(per))
    field = (bits.reshape(rows, d // 8, 8) << torch.arange(8)).sum(-1).to(torch.uint8)
    out_d = torch.zeros(rows, d // per, dtype=torch.uint8).to(DEV)
    _split_high_bits_kernel[(1,)](field.to(DEV), out_d, rows, d, d // 8, per)
    want = (bits.reshape(rows, d // per, per) << torch.arange(per)).sum(-1).to(torch.uint8)
    assert torch.equal(out_d.cpu(), want)


def test_sliced_ok_formats():
    from tq_kernels.decode import sliced_ok

    assert sliced_ok(F(128, 4)) and sliced_ok(F(64, 2)) and sliced_ok(F(128, 3))
    assert sliced_ok(F(128, 3, qjl=True)) and sliced_ok(F(128, 3, outlier_channels=32, outlier_bits=4))
    assert not sliced_ok(F(128, 1))        # 1-bit first field: 8 slices
    assert not sliced_ok(F(64, 2, qjl=True))  # 1-bit MSE codes under the QJL bit


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, cap, block_n", [
    (F(128, 4), F(128, 4), (8, 2), [90, 1, 33], 0.0, 32),
    (F(128, 4), F(128, 4), (16, 2), [300, 129], 0.0, 128),
    (F(64, 4), F(64, 2), (9, 3), [40, 0], 20.0, 32),
    (F(256, 4), F(256, 4), (4, 2), [21], 0.0, 32),
    (F(128, 4, norm_correction=False), F(128, 3), (4, 1), [66], 0.0, 64),
], ids=["K4V4-g4", "K4V4-g8-bn128", "K4V2-d64-g3-cap-empty", "K4V4-d256-g2", "K4nonc-V3-g4"])
def test_decode_key_int8(kfmt, vfmt, heads, lens, cap, block_n):
    """4-bit one-field keys: scores from int8 centroids against the int8-rounded query on integer tensor
    cores (the register LUT on a GPU, a gather from the int8 table in the interpreter): within 1 % of the
    reference (observed 0.4-0.7 % under the interpreter, bf16 keys 0.4-0.5 %)."""
    from tq_kernels.decode import plan_decode

    assert plan_decode(*make_codecs(kfmt, vfmt), len(lens), heads[1], max(lens), DEV).key_int8
    out, ref = _run_case(kfmt, vfmt, *heads, lens, 2, block_n, cap, 31, expect_sliced=True)
    assert rel_err(out, ref) < 1e-2
    for b, n in enumerate(lens):
        if n == 0:
            assert float(out[b].abs().max()) == 0.0


@pytest.mark.parametrize("fmt", [F(128, 4), F(64, 4), F(256, 4), F(128, 4, norm_correction=False)],
                         ids=["d128", "d64", "d256", "d128-nonc"])
def test_register_lut_i8_asm_logic(fmt):
    """The int8 register-LUT PTX, emulated on the CPU (prmt with its sign-replicate selectors, lop3),
    maps every code byte's two nibbles to the int8 table entries, slice 0 the low nibble; the table is
    the codebook to within half its scale."""
    from kernel_helpers import emulate_register_lut
    from tq_kernels._common import int8_codebook, kernel_tables, register_lut_i8_asm

    kc, _ = make_codecs(fmt, fmt)
    cent = kernel_tables(kc, "cpu")["centroids"]
    table, scale = int8_codebook(cent)
    assert float((table.double() * scale - cent.double()).abs().max()) <= scale / 2 + 1e-12
    codes = torch.arange(256, dtype=torch.uint8).repeat(4)[torch.randperm(1024, generator=torch.Generator().manual_seed(0))]
    lo, hi = emulate_register_lut(register_lut_i8_asm(fmt, cent), codes)
    assert torch.equal(lo, table[(codes & 15).long()]) and torch.equal(hi, table[(codes >> 4).long()])


def test_register_lut_i8_formats():
    """The int8 LUT exists for one-field 4-bit codes only (not 2-/3-/5-bit codes, outliers or PROD keys)."""
    from tq_kernels._common import kernel_tables, register_lut_i8_asm

    for fmt, has in [(F(128, 4), True), (F(64, 4), True), (F(128, 2), False), (F(128, 3), False),
                     (F(128, 5), False), (F(128, 4, qjl=True), False),
                     (F(128, 4, outlier_channels=32, outlier_bits=5), False)]:
        kc, _ = make_codecs(fmt, fmt)
        assert bool(register_lut_i8_asm(fmt, kernel_tables(kc, "cpu")["centroids"])) == has, fmt


def test_split_count_is_not_specialized():
    """Triton compiles an int argument equal to 1 as its own variant. CUDA graphs capture batches whose
    split counts are above 1; the eager batches above --cuda-graph-max-bs get 1 split. With num_splits
    specialized, the first such batch compiled stage 1 and stage 2 again while the server waited, so
    every decode kernel takes num_splits as a plain int (checked on the JIT functions, outside the
    interpreter); the per-layer sliding window too (0 and a window divisible by 16 are variants)."""
    import subprocess
    import sys

    code = ("from tq_kernels import decode as d\n"
            "for k in (d._decode_stage1, d._decode_stage1_sliced, d._decode_stage2):\n"
            "    assert [p.name for p in k.params if p.do_not_specialize] == ['num_splits', 'sliding_window'], k\n"
            "assert d.choose_num_splits(300, 8, 17408, 132) == 1  # an eager batch: one split\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.parametrize("fmt", [F(128, 4), F(64, 4), F(256, 4), F(128, 4, norm_correction=False)],
                         ids=["d128", "d64", "d256", "d128-nonc"])
def test_register_lut_pairs_asm_logic(fmt):
    """The pairs variant of the 4-bit register LUT (V codes as 16-bit elements, two tokens per word),
    emulated on the CPU: output T holds the bf16 centroids of coordinate 4c + T (nibble T of the
    16-bit element) of both tokens, for every code byte in every position."""
    from kernel_helpers import emulate_register_lut
    from tq_kernels._common import kernel_tables, register_lut_asm

    kc, _ = make_codecs(fmt, fmt)
    cent = kernel_tables(kc, "cpu")["centroids"]
    asm = register_lut_asm(fmt, cent, pairs=True)
    assert asm and not register_lut_asm(F(128, 2), cent[:4], pairs=True)
    gen = torch.Generator().manual_seed(1)
    words = torch.stack([torch.randperm(256, generator=gen).to(torch.uint8) for _ in range(4)], dim=1)  # [256, 4]
    outs = emulate_register_lut(asm, words.reshape(-1))
    table = cent.to(torch.bfloat16)
    elem = words.long()[:, 0::2] | words.long()[:, 1::2] << 8  # [256, 2]: the 16-bit element of token t, t + 1
    for t, got in enumerate(outs):
        want = table[(elem >> (4 * t)) & 15].reshape(-1)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), f"slice {t}"


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, cap, block_n", [
    (F(128, 4), F(128, 4), (8, 2), [90, 1, 33], 0.0, 32),
    (F(128, 4), F(128, 4), (16, 2), [300, 129], 0.0, 128),
    (F(256, 4), F(256, 4), (4, 2), [21], 0.0, 32),
    (F(128, 3, qjl=True), F(128, 4, norm_correction=False), (4, 1), [66], 0.0, 64),
], ids=["K4V4-g4", "K4V4-g8-bn128", "K4V4-d256", "PROD3-V4nonc"])
def test_decode_v_pairs(kfmt, vfmt, heads, lens, cap, block_n):
    """4-bit one-field V (d_v >= 128): the codes load as 16-bit elements, four V slices (coordinates
    4c + T): the reference's result."""
    from tq_kernels.decode import plan_decode

    assert plan_decode(*make_codecs(kfmt, vfmt), len(lens), heads[1], max(lens), DEV, block_n=block_n).v_pairs
    out, ref = _run_case(kfmt, vfmt, *heads, lens, 2, block_n, cap, 41)
    assert rel_err(out, ref) < TOL


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, block_n", [
    (F(128, 3, qjl=True), F(128, 3), (8, 2), [90, 1, 33], 32),
    (F(128, 4, qjl=True), F(128, 4), (9, 3), [70, 0], 64),
    (F(128, 5, qjl=True), F(128, 2), (4, 1), [130], 128),
], ids=["PROD3-V3-g4", "PROD4-V4-g3-empty", "PROD5-V2-g4-bn128"])
def test_decode_qjl_sign_tile(kfmt, vfmt, heads, lens, block_n):
    """PROD keys in the sliced stage 1: the QJL signs unpacked from one byte tile into coordinate order
    and scored in one MMA against the whole sketch rows: the reference's result."""
    out, ref = _run_case(kfmt, vfmt, *heads, lens, 2, block_n, 0.0, 43, expect_sliced=True)
    assert rel_err(out, ref) < TOL
    for b, n in enumerate(lens):
        if n == 0:
            assert float(out[b].abs().max()) == 0.0


def test_stage1_register_caps_and_pairs_fit():
    """The stage-1 launch rules: V pairs only with >= 8 PV columns per
    warp; the 128 cap for int8 keys with V pairs up to head_dim 128 (168 otherwise, and at head_dim 256,
    where both spill); 96 for 3-bit K and V at BLOCK_N 64 and 4 warps; Triton's choice elsewhere."""
    from tq_kernels.decode import choose_max_registers, pairs_fit

    assert pairs_fit(128, 4) and pairs_fit(256, 4) and not pairs_fit(64, 4) and not pairs_fit(128, 8)
    assert choose_max_registers(True, True, 4, 128, 128, "single", "single") == 128
    assert choose_max_registers(True, False, 4, 128, 128, "single", "single") == 168
    assert choose_max_registers(True, True, 4, 128, 256, "single", "single") == 168
    assert choose_max_registers(False, False, 4, 64, 128, "split", "split") == 96
    assert choose_max_registers(False, False, 4, 64, 256, "split", "split") is None
    assert choose_max_registers(False, False, 8, 128, 128, "split", "split") is None
    assert choose_max_registers(False, True, 4, 64, 128, "split5", "single") is None  # K5V4: Triton's choice


@needs_triton
def test_decode_v_pairs_odd_byte_view_is_refused():
    """A V-code view whose rows start at odd addresses cannot load as 16-bit elements: a plan with V
    pairs refuses it with a clear error instead of misaligned accesses."""
    from tq_kernels.decode import _even_rows, decode_attention, plan_decode

    gen = torch.Generator().manual_seed(3)
    kfmt = vfmt = F(128, 4)
    kc, vc = make_codecs(kfmt, vfmt)
    lens, hq, hkv = [40, 7], 8, 2
    bufs = alloc_cache(kfmt, vfmt, sum(lens) + 5, hkv, DEV)
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    k_codes, k_scales, v_codes, v_scales = bufs
    wide = torch.zeros(v_codes.shape[0], hkv, v_codes.shape[2] + 1, dtype=torch.uint8, device=DEV)
    odd = wide[:, :, 1:]  # rows at odd offsets (stride 65)
    odd.copy_(v_codes)
    assert _even_rows(v_codes) and not _even_rows(odd)
    q = (torch.randn(2, hq, 128, generator=gen) * 2).to(DEV, torch.bfloat16)
    plan = plan_decode(kc, vc, 2, hkv, 40, DEV, num_splits=2, block_n=32)
    assert plan.v_pairs
    with pytest.raises(ValueError, match="even addresses"):
        decode_attention(q, k_codes, k_scales, odd, v_scales, kc, vc, batch.kv_indptr, batch.kv_indices,
                         128 ** -0.5, plan=plan)


def test_plan_decode_choices():
    """The stage 1 and its options follow the formats: sliced with register LUTs (2-/3-/4-/5-bit codes,
    PROD keys), general for 6-bit codes, outliers and 3-bit keys at head_dim 64; int8 keys for 4-bit
    one-field keys; V pairs for 4-bit one-field V where d_v / 4 gives every warp 8 columns; one split
    count for every batch size when batch-invariant; a window's ring counted in the partials."""
    from tq_kernels.decode import plan_decode

    def plan(kf, vf, batch=32, **kw):
        return plan_decode(*make_codecs(kf, vf), batch, 8, 32768, "cpu", **kw)

    p = plan(F(128, 4), F(128, 4))
    assert p.sliced and p.key_int8 and p.v_pairs and p.block_n == 128 and p.num_warps == 4
    assert p.max_registers == 128 and not p.pdl and p.partials == p.num_splits
    assert plan(F(128, 4), F(128, 4), window=True).partials == p.num_splits + 1
    p = plan(F(64, 4), F(64, 4))
    assert p.sliced and p.key_int8 and not p.v_pairs and p.max_registers == 168
    p = plan(F(128, 3), F(128, 3))
    assert p.sliced and not p.key_int8 and not p.v_pairs and p.block_n == 64 and p.max_registers == 96
    assert plan(F(128, 5), F(128, 4)).sliced and plan(F(128, 3, qjl=True), F(128, 4)).sliced
    assert not plan(F(128, 3, qjl=True), F(128, 4)).key_int8
    for kf, vf in ((F(128, 6), F(128, 4)), (F(64, 3), F(64, 4)),
                   (F(128, 3, outlier_channels=32, outlier_bits=4), F(128, 4))):
        p = plan(kf, vf)
        assert not p.sliced and not p.key_int8 and not p.v_pairs and p.max_registers is None, (kf, p)
    many = plan(F(128, 4), F(128, 4), batch=64, batch_invariant=True)
    assert many.num_splits == plan(F(128, 4), F(128, 4), batch=1).num_splits
    with pytest.raises(ValueError, match="block_n"):
        plan(F(128, 4), F(128, 4), block_n=16)
    with pytest.raises(ValueError, match="max_splits"):
        plan(F(128, 4), F(128, 4), num_splits=64, window=True)


def test_kernel_signatures_stay_small():
    """A data format travels as one constexpr (`_common.Fmt`) and pointers with their strides as tuples:
    no Triton kernel of the package takes more than 40 parameters (constexprs included)."""
    import triton

    from tq_kernels import _common, compress, decode, extend

    kernels = [(m.__name__, name, obj) for m in (_common, compress, decode, extend)
               for name, obj in vars(m).items() if isinstance(obj, triton.runtime.jit.KernelInterface)]
    assert len(kernels) > 20
    big = {f"{mod}.{name}": len(k.arg_names) for mod, name, k in kernels if len(k.arg_names) > 40}
    assert not big, big
