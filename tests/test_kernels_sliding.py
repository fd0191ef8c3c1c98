"""Sliding-window layers and attention sinks (gpt-oss, Gemma 3): the reference's semantics checked
directly, then the Triton decode and extend against the reference (TRITON_INTERPRET=1 on CPU).
Window w: the query at position i sees the keys at positions j with i - w < j <= i (decode: the last w
positions); a sink is a per-query-head logit in the softmax's denominator whose value is 0."""
import pytest
import torch

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from tq_kernels.window import DecodeWindow, ExtendWindow, RingWrite
from kernel_helpers import (alloc_cache, extend_inputs, fill_random_kv, make_codecs, pick_device, random_slots,
                            rel_err, triton_runnable)

RUNNABLE, WHY = triton_runnable()
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
F = VecFormat
TOL = 2e-2


def _sinks(hq, gen):
    return (torch.randn(hq, generator=gen) * 2 + 1).to(DEV, torch.float32)


def _decode_inputs(kfmt, vfmt, hq, hkv, lens, seed):
    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    bufs = alloc_cache(kfmt, vfmt, sum(lens) + 13, hkv, DEV)  # poisoned
    batch = fill_random_kv(lens, hkv, kc, vc, bufs, gen, DEV)
    q = (torch.randn(len(lens), hq, kfmt.head_dim, generator=gen) * 2).to(DEV, torch.bfloat16)
    return gen, kc, vc, bufs, batch, q


def test_reference_decode_window_is_the_last_positions():
    """Window w over a sequence of L == full attention over its last min(w, L) slots."""
    kfmt = F(64, 4)
    gen, kc, vc, bufs, batch, q = _decode_inputs(kfmt, kfmt, 4, 2, [30, 5], seed=1)
    cpu = [b.cpu() for b in bufs]
    ind, ptr = batch.kv_indices.cpu(), batch.kv_indptr.cpu()
    win = reference.decode_attention(q.cpu(), *cpu, kc, vc, ptr, ind, 0.125, sliding_window=8)
    last = torch.cat([ind[22:30], ind[30:35]])  # 8 of 30, all 5 of 5
    full = reference.decode_attention(q.cpu(), *cpu, kc, vc, torch.tensor([0, 8, 13], dtype=torch.int32), last, 0.125)
    assert torch.equal(win, full)
    assert rel_err(win.float(), reference.decode_attention(q.cpu(), *cpu, kc, vc, ptr, ind, 0.125).float()) > 1e-2


def test_reference_sink_is_a_zero_value_key():
    """One key with score s and a sink t: the output is v * e^s / (e^s + e^t)."""
    kfmt = F(64, 4)
    gen, kc, vc, bufs, batch, q = _decode_inputs(kfmt, kfmt, 2, 1, [1], seed=2)
    cpu = [b.cpu() for b in bufs]
    ind, ptr = batch.kv_indices.cpu(), batch.kv_indptr.cpu()
    sinks = torch.tensor([0.5, -3.0])
    out = reference.decode_attention(q.float().cpu(), *cpu, kc, vc, ptr, ind, 0.125, sinks=sinks)[0]
    k = kc.decode(cpu[0][ind.long()], cpu[1][ind.long()])[0, 0]
    v = vc.decode(cpu[2][ind.long()], cpu[3][ind.long()])[0, 0]
    s = q.float().cpu()[0] @ k * 0.125
    want = v[None, :] * (torch.exp(s) / (torch.exp(s) + torch.exp(sinks)))[:, None]
    assert torch.allclose(out, want, rtol=1e-4, atol=1e-5)


def test_reference_extend_window_counts_positions_from_the_prefix():
    """Extend's window is over absolute positions (prefix first): a chunk after a prefix of P sees what
    a single extend of the whole sequence sees for the same rows."""
    kfmt = F(64, 4)
    gen = torch.Generator().manual_seed(3)
    kc, vc = make_codecs(kfmt, kfmt)
    n, P, hkv, hq, w = 20, 12, 1, 2, 5
    k = kc.decode(*kc.encode(torch.randn(n, hkv, 64, generator=gen)))  # exactly representable
    v = vc.decode(*vc.encode(torch.randn(n, hkv, 64, generator=gen)))
    q = torch.randn(n, hq, 64, generator=gen)
    bufs = alloc_cache(kfmt, kfmt, n + 1, hkv, "cpu", poison=False)
    slots = torch.arange(1, n + 1, dtype=torch.int32)
    reference.compress_and_store(k, v, slots, kc, vc, *bufs)
    args = dict(sliding_window=w)
    whole = reference.extend_attention(q, k, v, *bufs, kc, vc, torch.tensor([0, n]), torch.tensor([0, 0]),
                                       slots[:0], 0.125, **args)
    chunk = reference.extend_attention(q[P:], k[P:], v[P:], *bufs, kc, vc, torch.tensor([0, n - P]),
                                       torch.tensor([0, P]), slots[:P], 0.125, **args)
    assert rel_err(chunk, whole[P:]) < 1e-4
    row = P + 3  # sees positions row - w + 1 .. row only
    s = torch.einsum("hd,ld->hl", q[row], k[row - w + 1:row + 1, 0]) * 0.125
    want = torch.softmax(s, -1) @ v[row - w + 1:row + 1, 0]
    assert torch.allclose(whole[row], want, rtol=1e-4, atol=1e-5)


def _poison_before_window(bufs, batch, w):
    """NaN scales for every position before each sequence's window: a read of one shows in the output."""
    ptr = batch.kv_indptr.cpu().tolist()
    for b in range(len(ptr) - 1):
        n = ptr[b + 1] - ptr[b]
        if w < n:
            out = batch.kv_indices[ptr[b]:ptr[b] + n - w].long()
            bufs[1][out] = float("nan")
            bufs[3][out] = float("nan")


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, splits, block_n, window, cap, sinks", [
    (F(128, 4), F(128, 4), (8, 2), [100, 37, 1], 3, 32, 40, 0.0, False),   # sliced; window inside the 2nd split
    (F(128, 4), F(128, 4), (8, 2), [100, 37, 1], 3, 32, 64, 0.0, True),    # window crossing split bounds, sinks
    (F(64, 3), F(64, 3), (9, 3), [70, 20], 2, 32, 33, 0.0, True),          # general stage 1
    (F(64, 4), F(64, 2), (4, 4), [50, 0, 9], 4, 32, 200, 0.0, False),      # window >= L everywhere
    (F(64, 4), F(64, 4), (8, 2), [90, 7], 5, 32, 1, 10.0, True),           # one position, soft-cap
    (F(128, 4, qjl=True), F(128, 4), (4, 1), [80], 2, 32, 17, 0.0, True),  # PROD keys
], ids=["sliced-w40", "sliced-w64-sinks", "general-w33-sinks", "w-above-L", "w1-cap-sinks", "prod-w17"])
def test_decode_sliding_window_matches_reference(kfmt, vfmt, heads, lens, splits, block_n, window, cap, sinks):
    from tq_kernels.decode import decode_attention, plan_decode

    hq, hkv = heads
    gen, kc, vc, bufs, batch, q = _decode_inputs(kfmt, vfmt, hq, hkv, lens, seed=sum(lens) + window)
    _poison_before_window(bufs, batch, window)
    snk = _sinks(hq, gen) if sinks else None
    plan = plan_decode(kc, vc, len(lens), hkv, max(lens), DEV, num_splits=splits, block_n=block_n)
    out = decode_attention(q, *bufs, kc, vc, batch.kv_indptr, batch.kv_indices, kfmt.head_dim ** -0.5, cap,
                           plan=plan, sliding_window=window, sinks=snk)
    cpu = [b.cpu() for b in bufs]
    ref = reference.decode_attention(q.cpu(), *cpu, kc, vc, batch.kv_indptr.cpu(), batch.kv_indices.cpu(),
                                     kfmt.head_dim ** -0.5, cap, sliding_window=window,
                                     sinks=snk.cpu() if sinks else None)
    assert torch.isfinite(out.float()).all()  # nothing before the window was read
    assert rel_err(out.float().cpu(), ref.float()) < TOL
    if sinks:  # the sinks change the answer: the test can see them
        plain = reference.decode_attention(q.cpu(), *cpu, kc, vc, batch.kv_indptr.cpu(), batch.kv_indices.cpu(),
                                           kfmt.head_dim ** -0.5, cap, sliding_window=window)
        assert rel_err(plain.float(), ref.float()) > 1e-2


@needs_triton
@pytest.mark.parametrize("window, ring, lo_back", [(24, 16, 16), (10, 16, 16), (40, 32, 20)],
                         ids=["window-above-ring", "window-inside-ring", "ring-partial"])
def test_decode_sliding_window_with_recent_ring(window, ring, lo_back):
    """The recent window's ring and a sliding window together: the packed splits cover
    [max(0, L - window), lo), the ring [max(lo, L - window), L)."""
    from tq_kernels.decode import decode_attention, plan_decode

    kfmt, vfmt, hq, hkv, lens = F(128, 4), F(128, 4), 8, 2, [90, 30, 12, 0]
    gen = torch.Generator().manual_seed(window + ring)
    kc, vc = make_codecs(kfmt, vfmt, seed=4)
    S, total, B = sum(lens) + 9, sum(lens), len(lens)
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV, poison=False)
    slots = random_slots(total, S, gen).to(DEV)
    k = torch.randn(total, hkv, 128, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(total, hkv, 128, generator=gen).to(DEV, torch.bfloat16)
    pos = torch.cat([torch.arange(n) for n in lens])
    owner = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
    rows = (owner * ring + pos % ring).to(torch.int32)
    rows[pos < torch.tensor(lens)[owner] - ring] = -1
    nan = lambda d: torch.full((B * ring, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)  # noqa: E731
    rw = RingWrite(nan(128), nan(128), rows.to(DEV))
    reference.compress_and_store(k, v, slots, kc, vc, *bufs, ring=rw)
    indptr = torch.zeros(B + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens).cumsum(0)
    L = torch.tensor(lens, dtype=torch.int32)
    lo = torch.clamp(L - lo_back, min=0).maximum(L - ring).to(torch.int32)
    base = (torch.arange(B) * ring).to(torch.int32)
    q = (torch.randn(B, hq, 128, generator=gen) * 2).to(DEV, torch.bfloat16)
    snk = _sinks(hq, gen)
    plan = plan_decode(kc, vc, B, hkv, max(lens), DEV, window=True, num_splits=3, block_n=32)
    out = decode_attention(q, *bufs, kc, vc, indptr.to(DEV), slots, 0.1, plan=plan,
                           window=DecodeWindow(rw.k, rw.v, ring, lo.to(DEV), base.to(DEV)),
                           sliding_window=window, sinks=snk)
    ref = reference.decode_attention(q.cpu(), *[b.cpu() for b in bufs], kc, vc, indptr, slots.cpu(), 0.1,
                                     window=DecodeWindow(rw.k.cpu(), rw.v.cpu(), ring, lo, base),
                                     sliding_window=window, sinks=snk.cpu())
    assert torch.isfinite(out.float()).all()
    assert rel_err(out.float().cpu(), ref.float()) < TOL


@needs_triton
@pytest.mark.parametrize("window, sinks, pack, splits, causal", [
    (8, False, False, 1, True), (8, True, True, 1, True), (45, True, True, 3, True), (30, True, False, 2, True),
    (1, True, False, 1, True), (500, False, True, 1, True), (16, True, False, 1, False),
], ids=["w8", "w8-sinks-pack", "w45-sinks-split", "w30-sinks-split-rows", "w1-sinks", "w-above-all", "noncausal"])
def test_extend_sliding_window_matches_reference(window, sinks, pack, splits, causal):
    from tq_kernels.extend import extend_attention

    hq, new = 6, [37, 9, 40]
    gen, kc, vc, bufs, batch, qo, q, kn, vn = extend_inputs(F(64, 4), F(64, 3), hq, 2, [70, 0, 5], new,
                                                             window * 7 + splits, DEV)
    snk = _sinks(hq, gen) if sinks else None
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), batch.kv_indptr, batch.kv_indices, 0.125, 0.0,
                           causal, max_extend_len=max(new), block_m=32, block_n=32, gqa_pack=pack,
                           num_splits=splits, sliding_window=window, sinks=snk)
    cpu = [b.cpu() for b in bufs]
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *cpu, kc, vc, qo, batch.kv_indptr.cpu(),
                                     batch.kv_indices.cpu(), 0.125, 0.0, causal, sliding_window=window,
                                     sinks=snk.cpu() if sinks else None)
    full = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *cpu, kc, vc, qo, batch.kv_indptr.cpu(),
                                      batch.kv_indices.cpu(), 0.125, 0.0, causal)
    assert torch.isfinite(out.float()).all()
    assert rel_err(out.float().cpu(), ref.float()) < TOL
    assert (rel_err(ref.float(), full.float()) > 1e-2) == (window < 500 or sinks)


@needs_triton
def test_extend_sliding_window_with_recent_window_view():
    """The recent window's evaluation view (exact keys near each query, codes further away) inside a
    sliding window: both masks hold."""
    from tq_kernels.extend import extend_attention

    T = 40
    gen, kc, vc, bufs, batch, qo, q, kn, vn = extend_inputs(F(64, 4), F(64, 4), 4, 2, [20], [T], 5, DEV)
    ko = kc.decode(*kc.encode(kn.float().cpu())).to(DEV, torch.bfloat16)
    vo = vc.decode(*vc.encode(vn.float().cpu())).to(DEV, torch.bfloat16)
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), batch.kv_indptr, batch.kv_indices, 0.125,
                           window=ExtendWindow(ko, vo, 4), max_extend_len=T, block_m=32, block_n=32,
                           sliding_window=12)
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo,
                                     batch.kv_indptr.cpu(), batch.kv_indices.cpu(), 0.125,
                                     window=ExtendWindow(ko.cpu(), vo.cpu(), 4), sliding_window=12)
    assert rel_err(out.float().cpu(), ref.float()) < TOL


@needs_triton
def test_extend_sinks_with_new_part_and_window_refused():
    """Sinks apply once in the merge when the new tokens' part comes from another kernel; a sliding
    window with new_part is refused (that kernel would have to apply it)."""
    from tq_kernels.extend import extend_attention

    T, hq = 10, 4
    gen, kc, vc, bufs, batch, qo, q, kn, vn = extend_inputs(F(64, 4), F(64, 4), hq, 2, [30], [T], 9, DEV)
    snk = _sinks(hq, gen)
    o_new, lse_new = reference.new_token_attention(q.cpu(), kn.cpu(), vn.cpu(), qo, 0.125)
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), batch.kv_indptr, batch.kv_indices, 0.125,
                           max_extend_len=T, block_m=32, block_n=32, new_part=(o_new.to(DEV), lse_new.to(DEV)),
                           sinks=snk)
    ref = reference.extend_attention(q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs], kc, vc, qo,
                                     batch.kv_indptr.cpu(), batch.kv_indices.cpu(), 0.125, sinks=snk.cpu())
    assert rel_err(out.float().cpu(), ref.float()) < TOL
    with pytest.raises(ValueError, match="sliding window"):
        extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), batch.kv_indptr, batch.kv_indices, 0.125,
                         max_extend_len=T, new_part=(o_new.to(DEV), lse_new.to(DEV)), sliding_window=4)
