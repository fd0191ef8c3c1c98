"""Speculative verify attention over the packed cache (`tq_kernels.verify`): draft trees and the prefix's ring.

* the reference's verify equals, draft by draft, the reference decode of the same token after its
  ancestors were decoded (what plain decoding would have computed), with and without a recent window;
* the Triton extend kernel with a tree mask and a prefix ring matches the reference (TRITON_INTERPRET=1 on
  CPU), for chains and branching trees, several prefix lengths, packed and unpacked query groups;
* DraftStaging's one-launch stage / commit (staging rows, ring bounds, the accepted rows copied to the ring)
  matches its PyTorch reference and does what it says.
"""
import zlib

import pytest
import torch

from tq_kernels import reference
from tq_kernels.codec import VecFormat
from tq_kernels.verify import DraftStaging, PrefixRing, TreeMask
from tq_kernels.window import DecodeWindow
from kernel_helpers import extend_inputs, pick_device, rel_err, triton_runnable

DEV = pick_device()
F = VecFormat


def random_tree(n: int, gen: torch.Generator, chain: bool = False):
    """(parent list, ancestor-or-self mask [n, n] bool, depth [n]) of a random draft tree whose nodes are
    numbered parents first (node 0: the root, the last accepted token), as SGLang orders them."""
    parent = [-1] + [j - 1 if chain else int(torch.randint(0, j, (1,), generator=gen)) for j in range(1, n)]
    mask = torch.zeros(n, n, dtype=torch.bool)
    depth = torch.zeros(n, dtype=torch.int32)
    for j in range(n):
        a = j
        while a >= 0:
            mask[j, a] = True
            a = parent[a]
        depth[j] = int(mask[j].sum()) - 1
    return parent, mask, depth


def sglang_mask(pre, trees):
    """SGLang's flat custom mask (per sequence [drafts, prefix + drafts], prefix columns all ones) and its
    indptr."""
    parts, ind = [], [0]
    for p, m in zip(pre, trees):
        d = m.shape[0]
        full = torch.cat([torch.ones(d, p, dtype=torch.bool), m], dim=1)
        parts.append(full.flatten())
        ind.append(ind[-1] + full.numel())
    return torch.cat(parts), torch.tensor(ind, dtype=torch.int32)


def verify_case(kfmt, vfmt, hq, hkv, pre, drafts, seed, window=0, chain=False, start=None):
    """A verify batch: packed prefixes, draft trees, and with `window` a ring holding each sequence's exact
    recent prefix positions (written by the reference compress, as decode would) with per-draft ring
    starts lo = max(position + 1 - W, start) clamped to the prefix."""
    gen, kc, vc, bufs, batch, qo, q, kn, vn = extend_inputs(kfmt, vfmt, hq, hkv, pre, drafts, seed, DEV)
    trees = [random_tree(d, gen, chain) for d in drafts]
    mask, mind = sglang_mask(pre, [t[1] for t in trees])
    ring = None
    if window:
        B = len(pre)
        rk = torch.zeros(B * window, hkv, kfmt.head_dim, dtype=torch.bfloat16)
        rv = torch.zeros(B * window, hkv, vfmt.head_dim, dtype=torch.bfloat16)
        lo, base = [], torch.arange(B, dtype=torch.int32) * window
        ip = batch.kv_indptr.tolist()
        for b, p in enumerate(pre):
            # the exact K/V of the prefix as compress saw them: recover from a fresh random draw, written
            # both to the ring (exact, rotated) and, re-encoded, to the codes of the same slots
            k = torch.randn(p, hkv, kfmt.head_dim, generator=gen)
            v = torch.randn(p, hkv, vfmt.head_dim, generator=gen)
            from tq_kernels.window import RingWrite
            pos = torch.arange(p)
            rows = torch.where(pos >= p - window, b * window + pos % window, -1).to(torch.int32)
            reference.compress_and_store(k, v, batch.kv_indices[ip[b]:ip[b + 1]].to(bufs[0].device), kc, vc, *bufs,
                                         ring=RingWrite(rk, rv, rows))
            s = 0 if start is None else start[b]
            lo += [min(max(p + int(dd) + 1 - window, s), p) for dd in trees[b][2]]
        ring = PrefixRing(rk.to(DEV), rv.to(DEV), window, torch.tensor(lo, dtype=torch.int32, device=DEV),
                          base.to(DEV))
    return dict(gen=gen, kc=kc, vc=vc, bufs=bufs, batch=batch, qo=qo, q=q, kn=kn, vn=vn, trees=trees,
                tree=TreeMask(mask.to(DEV), mind.to(DEV)), ring=ring)


def run_reference(c, sm):
    b = c["batch"]
    return reference.extend_attention(c["q"].cpu(), c["kn"].cpu(), c["vn"].cpu(), *[x.cpu() for x in c["bufs"]],
                                      c["kc"], c["vc"], c["qo"], b.kv_indptr.cpu(), b.kv_indices.cpu(), sm, 0.0, True,
                                      tree=_cpu(c["tree"]), prefix_ring=_cpu(c["ring"]))


def _cpu(t):
    return None if t is None else type(t)(*[x.cpu() if isinstance(x, torch.Tensor) else x for x in t])


@pytest.mark.parametrize("window,chain", [(0, False), (0, True), (6, False), (16, True)])
def test_reference_verify_is_decode_of_each_draft(window, chain):
    """With a window at least as deep as the tree, draft r of the verify equals the reference decode of r
    right after its ancestors were decoded (ancestors and r stored packed in their slots and exact in the
    ring at their positions; the prefix as stored): verify sees what decode sees, to bf16 rounding of the
    ring. Without a window, draft r sees the prefix as stored and its ancestors exact, nothing else."""
    kf, vf = F(64, 4), F(64, 4)
    pre, drafts = [20, 9], [5, 4]
    c = verify_case(kf, vf, 4, 2, pre, drafts, 7, window=window, chain=chain)
    sm = 64 ** -0.5
    got = run_reference(c, sm)
    kc, vc, batch = c["kc"], c["vc"], c["batch"]
    n_slots = c["bufs"][0].shape[0] + max(drafts)
    bufs = [torch.cat([x, x[:max(drafts)]]).cpu() for x in c["bufs"]]  # rows past the prefixes' slots
    qo, ip = c["qo"].tolist(), batch.kv_indptr.tolist()
    errs = []
    for b, (p, (parent, m, depth)) in enumerate(zip(pre, c["trees"])):
        d = m.shape[0]
        dslots = torch.arange(n_slots - d, n_slots, dtype=torch.int32)  # free slots (the last rows)
        kn, vn = c["kn"][qo[b]:qo[b + 1]].cpu(), c["vn"][qo[b]:qo[b + 1]].cpu()
        for r in range(d):
            path = [a for a in range(d) if m[r, a]]  # ancestors (and r) in depth order
            ring = None
            if window:
                rk, rv = c["ring"].k.cpu().clone(), c["ring"].v.cpu().clone()
                from tq_kernels.window import RingWrite
                rows = torch.tensor([b * window + (p + int(depth[a])) % window for a in path], dtype=torch.int32)
                reference.compress_and_store(kn[path], vn[path], dslots[path], kc, vc, *bufs, ring=RingWrite(rk, rv, rows))
                L = p + len(path)
                ring = DecodeWindow(rk, rv, window, torch.tensor([c["ring"].lo[qo[b] + r].item()], dtype=torch.int32),
                                    torch.tensor([b * window], dtype=torch.int32))
                slots = torch.cat([batch.kv_indices[ip[b]:ip[b + 1]].cpu(), dslots[path]])
                want = reference.decode_attention(c["q"][qo[b] + r:qo[b] + r + 1].cpu(), *bufs, kc, vc,
                                                  torch.tensor([0, L], dtype=torch.int32), slots, sm, window=ring)
            else:  # the prefix as stored, the ancestors exact (decode would see them through their codes)
                pslots = batch.kv_indices[ip[b]:ip[b + 1]].cpu().long()
                k = torch.cat([reference._dequant(bufs[0], bufs[1], kc, pslots), kn[path].float()])
                v = torch.cat([reference._dequant(bufs[2], bufs[3], vc, pslots), vn[path].float()])
                want = reference._attend(c["q"][qo[b] + r:qo[b] + r + 1].cpu().float(), k, v, sm, 0.0)
            errs.append(rel_err(got[qo[b] + r:qo[b] + r + 1].float(), want.float()))
    assert max(errs) < (2e-2 if window else 5e-3), errs  # bf16 output (and ring) rounding


def _tree_sees_only_ancestors(c, sm):
    """Changing a draft's K/V changes only the outputs of the drafts that see it (its descendants)."""
    base = run_reference(c, sm)
    qo = c["qo"].tolist()
    parent, m, _ = c["trees"][0]
    j = len(parent) - 1  # a leaf in node order: only it sees itself
    c2 = dict(c, kn=c["kn"].clone(), vn=c["vn"].clone())
    c2["vn"][qo[0] + j] += 5.0
    moved = (run_reference(c2, sm) - base).abs().flatten(1).amax(1)
    for r in range(qo[1] - qo[0]):
        assert (moved[qo[0] + r] > 0) == bool(m[r, j]), r
    assert float(moved[qo[1]:].max()) == 0.0


def test_reference_tree_mask_hides_non_ancestors():
    _tree_sees_only_ancestors(verify_case(F(64, 4), F(64, 4), 4, 2, [13, 6], [7, 3], 3), 0.125)


RUNNABLE, WHY = triton_runnable()
# name, K, V, (H_q, H_kv), prefixes, drafts, window, chain, block_m, gqa_pack
CASES = [
    ("K4V4-chain", F(64, 4), F(64, 4), (4, 2), [37, 5], [4, 4], 0, True, 32, False),
    ("K4V4-tree-ring", F(64, 4), F(64, 4), (4, 2), [70, 12, 1], [8, 6, 3], 16, False, 32, False),
    ("K4V2-tree-ring-packed", F(128, 4), F(128, 2), (8, 2), [45, 90], [7, 5], 32, False, 64, True),
    ("PROD3-V3-tree", F(64, 3, qjl=True), F(64, 3), (4, 1), [33], [6], 8, False, 32, False),
    ("K3V3-long-prefix-ring", F(64, 3), F(64, 3), (3, 3), [150], [5], 32, True, 32, False),
]


@pytest.mark.skipif(not RUNNABLE, reason=WHY)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_triton_verify_matches_reference(case):
    from tq_kernels.extend import extend_attention

    name, kf, vf, (hq, hkv), pre, drafts, window, chain, bm, pack = case
    seed = zlib.crc32(name.encode())
    c = verify_case(kf, vf, hq, hkv, pre, drafts, seed, window=window, chain=chain,
                    start=[min(3, p) for p in pre])
    sm = kf.head_dim ** -0.5
    b = c["batch"]
    out = torch.full((sum(drafts), hq, vf.head_dim), float("nan"), dtype=torch.bfloat16, device=DEV)
    extend_attention(c["q"], c["kn"], c["vn"], *c["bufs"], c["kc"], c["vc"], c["qo"].to(DEV), b.kv_indptr,
                     b.kv_indices, sm, 0.0, True, out, max_extend_len=max(drafts), block_m=bm, block_n=32,
                     gqa_pack=pack, tree=c["tree"], prefix_ring=c["ring"])
    ref = run_reference(c, sm)
    assert not torch.isnan(out).any()
    assert rel_err(out.cpu().float(), ref.float()) < 2e-2


@pytest.mark.skipif(not RUNNABLE, reason=WHY)
def test_triton_verify_split_prefix_matches_reference():
    """Prefix splits (several programs per sequence): the ring part and the drafts go to the last split."""
    from tq_kernels.extend import extend_attention

    kf = F(64, 4)
    c = verify_case(kf, kf, 2, 1, [140], [5], 11, window=16)
    b = c["batch"]
    out = extend_attention(c["q"], c["kn"], c["vn"], *c["bufs"], c["kc"], c["vc"], c["qo"].to(DEV), b.kv_indptr,
                           b.kv_indices, 0.125, 0.0, True, max_extend_len=5, block_m=32, block_n=32, num_splits=3,
                           tree=c["tree"], prefix_ring=c["ring"])
    assert rel_err(out.cpu().float(), run_reference(c, 0.125).float()) < 2e-2


def test_verify_refuses_sliding_window():
    kf = F(64, 4)
    c = verify_case(kf, kf, 2, 1, [10], [3], 1)
    b = c["batch"]
    with pytest.raises(ValueError, match="sliding window"):
        reference.extend_attention(c["q"], c["kn"], c["vn"], *c["bufs"], c["kc"], c["vc"], c["qo"], b.kv_indptr,
                                   b.kv_indices, 0.125, tree=c["tree"], sliding_window=4)


def _staging(use_triton, R=4, W=8, D=4):
    gen = torch.Generator().manual_seed(0)
    rings_k = [torch.full((R * W, 2, 8), -1.0, dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    rings_v = [torch.full((R * W, 2, 8), -2.0, dtype=torch.bfloat16, device=DEV) for _ in range(2)]
    st = DraftStaging(rings_k, rings_v, W, R, D, max_rows=6, triton_kernel=use_triton)
    for n, t in enumerate(st.stage_k + st.stage_v):  # staging row i of tensor n holds 100 n + i
        t.copy_((100 * n + torch.arange(t.shape[0]))[:, None, None].expand_as(t).to(t.dtype))
    table = torch.randint(1000, 2000, (R + 2, 64), generator=gen, dtype=torch.int32).to(DEV)
    start = torch.tensor([0, 3, 0, 9, 0], dtype=torch.int32, device=DEV)
    return st, table, start


@pytest.mark.parametrize("use_triton", [False, True])
def test_draft_staging_stage_and_commit(use_triton):
    """stage(): staging rows, ring starts and bases per draft token, padding and requests outside the ring
    staged nowhere; commit(): the accepted tokens (by slot, up to the new length) copied to their ring rows in
    every layer, nothing else; a request outside the batch keeps its step, an extend drops it."""
    if use_triton and not RUNNABLE:
        pytest.skip(WHY)
    D, W, R = 4, 8, 4
    st, table, start = _staging(use_triton)
    req = torch.tensor([1, 3, 5, 1], dtype=torch.int64, device=DEV)  # 5: outside the ring; row 3: padding
    prefix = torch.tensor([10, 20, 7, 1], dtype=torch.int64, device=DEV)
    positions = torch.tensor([10, 11, 11, 12, 20, 21, 22, 23, 7, 8, 9, 10], device=DEV)
    rows, lo, base = st.stage(req, prefix, positions, 3, table, start)
    assert rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15] + [-1] * 8
    assert lo[:8].tolist() == [3, 4, 4, 5, 13, 14, 15, 16] and lo[8:12].tolist() == [7] * 4
    assert base.tolist() == [8, 24, 24, 8]
    assert st.valid.tolist() == [0, 1, 0, 1, 0] and st.prefix[1].item() == 10 and st.prefix[3].item() == 20
    assert st.slots[1].tolist() == table[1, 10:14].tolist()
    drafts1 = table[1, 10:14].clone()
    # request 1 accepted drafts 2 then 0 (SGLang rewrote its row); request 3 is not in the next batch
    table[1, 10], table[1, 11] = drafts1[2], drafts1[0]
    st.commit(torch.tensor([1], device=DEV), torch.tensor([12], device=DEV), 1, table)
    assert st.valid.tolist() == [0, 0, 0, 1, 0]
    for n, ring in enumerate(st.rings_k + st.rings_v):
        fill = -1.0 if n < 2 else -2.0
        got = ring[:, 0, 0].float().tolist()
        want = [fill] * (R * W)
        want[1 * W + 10 % W] = 100 * n + 1 * D + 2
        want[1 * W + 11 % W] = 100 * n + 1 * D + 0
        assert got == want, (n, got)
    st.commit(torch.tensor([3], device=DEV), None, 1, table)  # an extend of slot 3: dropped, nothing copied
    assert not st.valid.any() and st.rings_k[0][3 * W:, 0, 0].eq(-1).all()


@pytest.mark.skipif(not RUNNABLE, reason=WHY)
def test_draft_staging_triton_matches_reference():
    """The one-launch stage / commit against the PyTorch reference on one random sequence of steps."""
    out = []
    for use_triton in (False, True):
        st, table, start = _staging(use_triton)
        gen = torch.Generator().manual_seed(1)
        req = torch.tensor([2, 0, 3], device=DEV)
        prefix = torch.tensor([5, 17, 30], device=DEV)
        positions = (prefix[:, None] + torch.randint(0, 4, (3, 4), generator=gen).to(DEV)).flatten()
        res = [t.clone() for t in st.stage(req, prefix, positions, 3, table, start)]
        table[2, 5:7] = table[2, 5:9][torch.tensor([3, 1])]
        table[0, 17] = table[0, 18]
        st.commit(req, torch.tensor([7, 18, 30], device=DEV), 3, table)
        out.append(res + [st.valid.clone()] + [r.clone() for r in st.rings_k + st.rings_v])
    for a, b in zip(*out):
        assert torch.equal(a, b)
