"""Exact first token (tq_kernels.window: FirstRows): the claim of table entries by token id, compress's
table rows, and decode reading position 0 from the table where its slot is flagged. Triton against the
PyTorch reference; run on CPU with TRITON_INTERPRET=1, unchanged on a GPU."""
import pytest
import torch

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from kernel_helpers import alloc_cache, make_codecs, pick_device, random_slots, rel_err, triton_runnable
from tq_kernels.window import DecodeWindow, FirstRows, RingWrite

RUNNABLE, WHY = triton_runnable()
needs_triton = pytest.mark.skipif(not RUNNABLE, reason=WHY)
DEV = pick_device()
F = VecFormat
TOL = 2e-2
ENTRIES = 4


def _claim_fns():
    fns = [reference.claim_first_rows]
    if RUNNABLE:
        from tq_kernels.first_token import claim_first_rows
        fns.append(claim_first_rows)
    return fns


@pytest.mark.parametrize("claim", _claim_fns(), ids=lambda f: f.__module__.split(".")[-1])
def test_claim_same_id_same_entry_full_table_and_other_positions(claim):
    table = torch.full((2,), -1, dtype=torch.int32, device=DEV)
    flags = torch.full((16,), 9, dtype=torch.uint8, device=DEV)  # stale flags: every new slot is overwritten
    ids = torch.tensor([5, 9, 5, 11, 5, 7], device=DEV)
    slots = torch.tensor([1, 2, 3, 4, 5, 6], device=DEV)
    at_zero = torch.tensor([1, 1, 1, 1, 0, 1], dtype=torch.bool, device=DEV)
    entries = claim(ids, slots, at_zero, table, flags)
    # 5 and 9 take the two entries; the second 5 shares its entry; 11 and 7 find the table full; the 5 not
    # at position 0 claims nothing
    assert entries.tolist() == [0, 1, 0, -1, -1, -1]
    assert table.tolist() == [5, 9]
    assert flags[1:7].tolist() == [1, 2, 1, 0, 0, 0]
    assert flags[0].item() == 9 and flags[7].item() == 9  # slots outside the batch keep theirs
    # a later batch finds the claimed ids again and never takes an entry for another id
    again = claim(torch.tensor([9, 13], device=DEV), torch.tensor([8, 9], device=DEV),
                  torch.tensor([1, 1], dtype=torch.bool, device=DEV), table, flags)
    assert again.tolist() == [1, -1] and flags[8:10].tolist() == [2, 0] and table.tolist() == [5, 9]


@needs_triton
def test_claim_many_tokens_agree_with_reference():
    from tq_kernels.first_token import claim_first_rows

    gen = torch.Generator().manual_seed(4)
    n = 300  # several programs of the claim kernel
    ids = torch.randint(0, 3, (n,), generator=gen)  # three ids, more entries than needed
    at_zero = torch.rand(n, generator=gen) < 0.3
    slots = torch.randperm(n, generator=gen) + 1
    table = torch.full((ENTRIES,), -1, dtype=torch.int32, device=DEV)
    flags = torch.zeros(n + 1, dtype=torch.uint8, device=DEV)
    entries = claim_first_rows(ids.to(DEV), slots.to(DEV), at_zero.to(DEV), table, flags).cpu()
    held = table.cpu().tolist()
    claimed = sorted(set(ids[at_zero].tolist()))
    assert sorted(t for t in held if t >= 0) == claimed and held.count(-1) == ENTRIES - len(claimed)
    for i in range(n):  # the entry of every position-0 token holds its id, the others none
        want = held.index(int(ids[i])) if at_zero[i] else -1
        assert entries[i].item() == want and flags[slots[i]].item() == want + 1


@needs_triton
def test_compress_writes_first_rows_next_to_the_ring():
    from tq_kernels.compress import compress_and_store

    gen = torch.Generator().manual_seed(5)
    kfmt, vfmt = F(64, 4), F(64, 4)
    kc, vc = make_codecs(kfmt, vfmt, seed=2)
    n, h = 6, 2
    k = torch.randn(n, h, 64, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(n, h, 64, generator=gen).to(DEV, torch.bfloat16)
    mu = torch.randn(h, 64, generator=gen).to(DEV)
    slots = random_slots(n, 20, gen).to(DEV)
    ring_rows = torch.tensor([0, 1, 2, 3, 4, 5], dtype=torch.int32, device=DEV)
    first_rows = torch.tensor([2, -1, -1, 0, -1, -1], dtype=torch.int32, device=DEV)
    got = []
    for fn in (compress_and_store, reference.compress_and_store):
        bufs = alloc_cache(kfmt, vfmt, 20, h, DEV, poison=False)
        nan = lambda rows: torch.full((rows, h, 64), float("nan"), dtype=torch.bfloat16, device=DEV)  # noqa: E731
        ring, first = RingWrite(nan(6), nan(6), ring_rows), RingWrite(nan(ENTRIES), nan(ENTRIES), first_rows)
        fn(k, v, slots, kc, vc, *bufs, k_mean=mu, ring=ring, first=first)
        got.append((ring, first))
    (tr, tf), (rr, rf) = got
    assert torch.isnan(tf.k[[1, 3]].float()).all() and torch.isnan(tf.v[[1, 3]].float()).all()  # unclaimed
    for e, i in ((2, 0), (0, 3)):  # the table rows are the ring's rows of the same tokens, also by reference
        assert torch.equal(tf.k[e], tr.k[i]) and torch.equal(tf.v[e], tr.v[i])
        assert rel_err(tf.k[e].float(), rf.k[e].float()) < 1e-2 and rel_err(tf.v[e].float(), rf.v[e].float()) < 1e-2
        assert rel_err(kc.unrotate(tf.k[e].float().cpu()), (k[i].float() - mu).cpu()) < 1e-2


def _decode_case(kfmt, vfmt, hq, hkv, lens, first_ids, seed, wsize=0, lo_back=0, sliding=0, shared=None, cap=0.0,
                 **kw):
    """Sequences written packed to random slots; first_ids[b]: the table entry flagged at sequence b's
    position-0 slot (-1: none). The table rows are far from the codes (position 0's exact row is another
    vector), so decode that read position 0 from the codes would fail. shared: (b, c) -> sequence c starts
    with the slot of sequence b's position 0 (a radix-cache prefix)."""
    from tq_kernels.decode import decode_attention, plan_decode

    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    S = sum(lens) + 9
    bufs = alloc_cache(kfmt, vfmt, S, hkv, DEV, poison=False)
    total, B = sum(lens), len(lens)
    slots = random_slots(total, S, gen)
    k = torch.randn(total, hkv, kfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    v = torch.randn(total, hkv, vfmt.head_dim, generator=gen).to(DEV, torch.bfloat16)
    indptr = torch.zeros(B + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(lens).cumsum(0)
    ring = win = win_ref = None
    if wsize:
        pos = torch.cat([torch.arange(n) for n in lens])
        owner = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])
        rows = (owner * wsize + pos % wsize).to(torch.int32)
        rows[pos < torch.tensor(lens)[owner] - wsize] = -1
        nan = lambda d: torch.full((B * wsize, hkv, d), float("nan"), dtype=torch.bfloat16, device=DEV)  # noqa: E731
        ring = RingWrite(nan(kfmt.head_dim), nan(vfmt.head_dim), rows.to(DEV))
    reference.compress_and_store(k, v, slots.to(DEV), kc, vc, *bufs, ring=ring)
    if shared is not None:
        b, c = shared
        slots[indptr[c]] = slots[indptr[b]]
    flags = torch.zeros(S, dtype=torch.uint8)
    for b, e in enumerate(first_ids):
        if lens[b] and e >= 0:
            flags[slots[indptr[b]]] = e + 1
    fk = (torch.randn(ENTRIES, hkv, kfmt.head_dim, generator=gen) * 3).to(torch.bfloat16)
    fv = (torch.randn(ENTRIES, hkv, vfmt.head_dim, generator=gen) * 3).to(torch.bfloat16)
    first = FirstRows(fk.to(DEV), fv.to(DEV), flags.to(DEV))
    first_ref = FirstRows(fk, fv, flags)
    L = torch.tensor(lens, dtype=torch.int32)
    if wsize:
        lo = torch.clamp(L - lo_back, min=0).maximum(L - wsize).to(torch.int32)
        base = (torch.arange(B) * wsize).to(torch.int32)
        win = DecodeWindow(ring.k, ring.v, wsize, lo.to(DEV), base.to(DEV))
        win_ref = DecodeWindow(ring.k.cpu(), ring.v.cpu(), wsize, lo, base)
    q = (torch.randn(B, hq, kfmt.head_dim, generator=gen) * 2).to(DEV, torch.bfloat16)
    sm = kfmt.head_dim ** -0.5
    plan = plan_decode(kc, vc, B, hkv, max(lens), DEV, window=bool(wsize), first=True, **kw)
    out = decode_attention(q, *bufs, kc, vc, indptr.to(DEV), slots.to(DEV), sm, cap, plan=plan, window=win,
                           first=first, sliding_window=sliding)
    cpu = [b.cpu() for b in bufs]
    ref = reference.decode_attention(q.cpu(), *cpu, kc, vc, indptr, slots, sm, cap, window=win_ref, first=first_ref,
                                     sliding_window=sliding)
    codes = reference.decode_attention(q.cpu(), *cpu, kc, vc, indptr, slots, sm, cap, window=win_ref,
                                       sliding_window=sliding)
    return out.float().cpu(), ref.float(), codes.float()


@needs_triton
@pytest.mark.parametrize("kfmt, vfmt, heads, lens, first_ids, kw", [
    (F(128, 4), F(128, 4), (8, 2), [40, 5, 100], [0, 3, -1], dict(num_splits=2, block_n=32)),    # sliced stage 1
    (F(64, 3), F(64, 3), (9, 3), [70, 1, 20], [1, 1, 2], dict(num_splits=3, block_n=32)),         # general stage 1
    (F(128, 4, qjl=True), F(128, 4), (4, 1), [50, 0], [2, 0], dict(num_splits=2, block_n=32)),    # PROD, empty
    (F(64, 4), F(64, 4), (8, 2), [90, 7], [0, 1], dict(num_splits=3, block_n=32, cap=5.0)),       # soft-cap
], ids=["K4V4-d128-sliced", "K3V3-d64-general", "PROD4-d128-empty", "K4V4-d64-softcap"])
def test_decode_first_row_without_window(kfmt, vfmt, heads, lens, first_ids, kw):
    out, ref, codes = _decode_case(kfmt, vfmt, *heads, lens, first_ids, seed=sum(lens), **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL
    flagged = [b for b, e in enumerate(first_ids) if e >= 0 and lens[b]]
    assert rel_err(ref[flagged], codes[flagged]) > 1e-2  # the exact row changes the answer: the test can see it
    unflagged = [b for b, e in enumerate(first_ids) if e < 0]
    assert torch.equal(ref[unflagged], codes[unflagged])


@needs_triton
@pytest.mark.parametrize("lens, lo_back, first_ids", [
    ([40, 12, 100], 16, [0, 1, 2]),    # 12 tokens < W: position 0 in the ring for that sequence
    ([40, 5, 60], 3, [2, -1, 0]),      # lo above L - W (a radix prefix read from the codes)
], ids=["ring-holds-short", "lo-above-window"])
def test_decode_first_row_with_window(lens, lo_back, first_ids):
    out, ref, codes = _decode_case(F(128, 4), F(128, 4), 8, 2, lens, first_ids, seed=7 + sum(lens), wsize=16,
                                   lo_back=lo_back, num_splits=2, block_n=32)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL
    assert rel_err(ref[0], codes[0]) > 1e-2


@needs_triton
def test_decode_first_row_ring_holds_position_zero():
    """A sequence shorter than W whose ring holds position 0: read from the ring, not the table."""
    out, ref, codes = _decode_case(F(64, 4), F(64, 4), 4, 2, [10, 30], [0, 1], seed=3, wsize=16, lo_back=16,
                                   num_splits=2, block_n=32)
    assert rel_err(out, ref) < TOL
    assert torch.equal(ref[0], codes[0])  # the ring's exact rows, as without the table
    assert rel_err(ref[1], codes[1]) > 1e-2


@needs_triton
def test_decode_first_row_sliding_window():
    """A sliding window past position 0 reads no first row; one that still holds it does."""
    out, ref, codes = _decode_case(F(64, 4), F(64, 4), 4, 2, [60, 20], [0, 1], seed=9, sliding=32,
                                   num_splits=2, block_n=32)
    assert rel_err(out, ref) < TOL
    assert torch.equal(ref[0], codes[0])  # 60 > 32: position 0 is outside the window
    assert rel_err(ref[1], codes[1]) > 1e-2


@needs_triton
def test_decode_first_row_shared_prefix_slot():
    """Two sequences whose position 0 is the same slot (a radix-cache prefix): both read the same entry."""
    out, ref, codes = _decode_case(F(128, 4), F(128, 4), 8, 2, [40, 70], [3, -1], seed=11, shared=(0, 1),
                                   num_splits=2, block_n=32)
    assert rel_err(out, ref) < TOL
    assert rel_err(ref[1], codes[1]) > 1e-2  # sequence 1 sees sequence 0's flag through the shared slot


def test_reference_first_row_replaces_position_zero():
    """The reference alone (any machine): decode over one flagged token is that token's exact V."""
    kfmt = F(64, 4)
    kc, vc = make_codecs(kfmt, kfmt, seed=1)
    bufs = alloc_cache(kfmt, kfmt, 4, 1, "cpu", poison=False)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(1, 1, 64, generator=gen)
    reference.compress_and_store(k, k, torch.tensor([2]), kc, vc, *bufs)
    fv = torch.randn(ENTRIES, 1, 64, generator=gen).to(torch.bfloat16)
    flags = torch.tensor([0, 0, 3, 0], dtype=torch.uint8)
    out = reference.decode_attention(torch.randn(1, 1, 64, generator=gen), *bufs, kc, vc, torch.tensor([0, 1]),
                                     torch.tensor([2]), 0.125, first=FirstRows(fv.clone(), fv, flags))
    assert rel_err(out.float(), vc.unrotate(fv[2].float())) < 1e-2


def _extend_case(pre, new, first_ids, seed, hq=8, hkv=2, sliding=0, cap=0.0, **kw):
    """An extend over packed prefixes whose position-0 slots carry first_ids (-1: none) and a table far
    from the codes; Triton against the reference with the table, and the reference without it."""
    from tq_kernels.extend import extend_attention

    kfmt = vfmt = F(64, 4)
    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    bufs = alloc_cache(kfmt, vfmt, sum(pre) + 11, hkv, DEV, poison=False)
    from kernel_helpers import fill_random_kv

    batch = fill_random_kv(pre, hkv, kc, vc, bufs, gen, DEV)
    flags = torch.zeros(sum(pre) + 11, dtype=torch.uint8)
    indptr, indices = batch.kv_indptr.cpu(), batch.kv_indices.cpu()
    for b, e in enumerate(first_ids):
        if pre[b] and e >= 0:
            flags[indices[indptr[b]]] = e + 1
    fk = (torch.randn(ENTRIES, hkv, 64, generator=gen) * 3).to(torch.bfloat16)
    fv = (torch.randn(ENTRIES, hkv, 64, generator=gen) * 3).to(torch.bfloat16)
    T = sum(new)
    qo = torch.zeros(len(new) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(new).cumsum(0)
    q = (torch.randn(T, hq, 64, generator=gen) * 2).to(DEV, torch.bfloat16)
    kn = torch.randn(T, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    vn = torch.randn(T, hkv, 64, generator=gen).to(DEV, torch.bfloat16)
    args = (kc, vc, qo, indptr, indices, 0.125, cap, True)
    out = extend_attention(q, kn, vn, *bufs, kc, vc, qo.to(DEV), batch.kv_indptr, batch.kv_indices, 0.125, cap, True,
                           max_extend_len=max(new), max_prefix_len=max(pre), sliding_window=sliding,
                           first=FirstRows(fk.to(DEV), fv.to(DEV), flags.to(DEV)), **kw)
    cpu = (q.cpu(), kn.cpu(), vn.cpu(), *[b.cpu() for b in bufs])
    ref = reference.extend_attention(*cpu, *args, sliding_window=sliding, first=FirstRows(fk, fv, flags))
    codes = reference.extend_attention(*cpu, *args, sliding_window=sliding)
    return out.float().cpu(), ref.float(), codes.float(), qo


@needs_triton
@pytest.mark.parametrize("kw", [dict(block_m=32, gqa_pack=False, num_splits=1), dict(block_m=32, gqa_pack=True),
                                dict(block_m=32, gqa_pack=False, num_splits=3),
                                dict(block_m=32, gqa_pack=False, num_splits=1, cap=5.0)],
                         ids=["rows-per-head", "gqa-pack", "split-prefix", "softcap"])
def test_extend_reads_the_prefix_first_row(kw):
    out, ref, codes, qo = _extend_case([40, 0, 100, 30], [9, 5, 20, 3], [1, 0, -1, 1], seed=21, **kw)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < TOL
    a, b = int(qo[0]), int(qo[1])
    assert rel_err(ref[a:b], codes[a:b]) > 1e-2  # the exact row changes what a radix hit's queries see
    c, d = int(qo[2]), int(qo[3])
    assert torch.equal(ref[c:d], codes[c:d])  # an unflagged prefix reads its codes


@needs_triton
def test_extend_first_row_sliding_window():
    """Queries whose sliding window has left position 0 see neither its codes nor its exact row."""
    out, ref, codes, qo = _extend_case([20, 60], [30, 4], [0, 2], seed=5, sliding=32, block_m=32, num_splits=1)
    assert rel_err(out, ref) < TOL
    assert rel_err(ref[:12], codes[:12]) > 1e-2  # rows 0..11 of sequence 0 (positions 20..31) still see it
    assert torch.equal(ref[12:30], codes[12:30]) and torch.equal(ref[30:], codes[30:])
