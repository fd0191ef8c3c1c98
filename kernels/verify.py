"""Speculative verify over the packed cache: the draft tree's mask, the prefix's recent-window view, and
the row copy that moves accepted draft tokens' exact K/V into the recent window's ring.

A verify step runs the extend kernel over a sequence's packed prefix plus its draft tokens (the new
tokens, exact). Two argument bundles (plain tensors, no engine types):

  TreeMask(mask, indptr)       the draft tokens see each other where the mask says so, in SGLang's layout:
                               sequence i's rows (one per draft token) start at indptr[i], each row
                               prefix_i + drafts_i entries wide; only the drafts' columns are read (every
                               draft token sees the whole prefix).
  PrefixRing(k, v, size, lo, base)   draft token r reads prefix positions [lo[r], prefix) from the recent
                               window's ring (row base[i] + position % size) and the older ones from the
                               codes: decode's view of the same position, so verify and decode see the
                               same values.

`DraftStaging` keeps, per request slot, the draft tokens' exact rows that a verify step wrote to staging rows
(tree siblings share a position, rejected tokens must leave no ring row behind) and later copies the accepted
ones to their ring rows; which tokens were accepted it reads from the request's slot table (the engine's
req-to-token rows), rewritten by then with the accepted tokens' slots. One launch each for the per-step
bookkeeping and for the copy over all layers on the GPU; a PyTorch reference elsewhere.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl


class TreeMask(NamedTuple):
    mask: torch.Tensor    # bool / uint8, flat: SGLang's custom_mask
    indptr: torch.Tensor  # int [B + 1]: first mask entry of each sequence


class PrefixRing(NamedTuple):
    k: torch.Tensor       # bf16 [rows, H_kv, d_k]: rotated exact keys (the recent window's ring)
    v: torch.Tensor       # bf16 [rows, H_kv, d_v]
    size: int             # W
    lo: torch.Tensor      # int32 [T]: first prefix position each new token reads from the ring (>= prefix: none)
    base: torch.Tensor    # int32 [B]: ring row of position p of sequence i is base[i] + p % W


@triton.jit
def _stage_kernel(req_ptr, pre_ptr, pos_ptr, n_real, n_pos, table_ptr, table_s, start_ptr, valid_ptr, prefix_ptr,
                  slots_ptr, rows_out, lo_out, base_out, R, W, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program b (a sequence of the verify batch): its draft tokens' staging rows and ring starts, its ring base,
    and for a real row of a ring request its step (prefix, draft slots) marked staged."""
    b = tl.program_id(0)
    req = tl.load(req_ptr + b).to(tl.int64)
    pre = tl.load(pre_ptr + b).to(tl.int64)
    in_ring = req < R
    real = b < n_real
    rc = tl.minimum(req, R - 1)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    t = b * D + d
    pos = tl.load(pos_ptr + t, mask=dm & (t < n_pos), other=0).to(tl.int64)
    pos = tl.where(t < n_pos, pos, pre + d)  # padding rows: any position (their outputs are dropped)
    lo = tl.minimum(tl.maximum(pos + 1 - W, tl.load(start_ptr + rc).to(tl.int64)), pre)
    tl.store(lo_out + t, tl.where(in_ring, lo, pre).to(tl.int32), mask=dm)
    tl.store(rows_out + t, tl.where(in_ring & real, rc * D + d, -1).to(tl.int32), mask=dm)
    tl.store(base_out + b, (rc * W).to(tl.int32))
    if in_ring & real:
        tl.store(valid_ptr + req, 1)
        tl.store(prefix_ptr + req, pre)
        tl.store(slots_ptr + req * D + d, tl.load(table_ptr + req * table_s + pre + d, mask=dm).to(tl.int64), mask=dm)


@triton.jit
def _copy_row(dst_tab, src_tab, lid, src, dst, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Row src of tensor lid of src_tab -> row dst of tensor lid of dst_tab (tables of bf16 data pointers)."""
    to = tl.load(dst_tab + lid).to(tl.pointer_type(tl.bfloat16))
    fr = tl.load(src_tab + lid).to(tl.pointer_type(tl.bfloat16))
    for c0 in range(0, ROW, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < ROW
        tl.store(to + dst * ROW + c, tl.load(fr + src * ROW + c, mask=m), mask=m)


@triton.jit
def _commit_kernel(req_ptr, len_ptr, n_real, valid_ptr, prefix_ptr, slots_ptr, table_ptr, table_s, dk_tab, sk_tab,
                   dv_tab, sv_tab, R, W, D: tl.constexpr, BLOCK_D: tl.constexpr, ROW_K: tl.constexpr,
                   ROW_V: tl.constexpr, BLOCK: tl.constexpr):
    """Program (draft d of sequence b, layer l): if b's request slot has a staged step and position prefix + d
    is below b's new length, the token the slot table holds there is found among the step's draft slots and
    its staging row copied to the position's ring row, K and V."""
    e = tl.program_id(0)
    lid = tl.program_id(1)
    b = e // D
    d = e % D
    if b >= n_real:
        return
    req = tl.load(req_ptr + b).to(tl.int64)
    if req >= R:
        return
    if tl.load(valid_ptr + req) == 0:
        return
    pos = tl.load(prefix_ptr + req) + d
    if pos >= tl.load(len_ptr + b):
        return
    slot = tl.load(table_ptr + req * table_s + pos).to(tl.int64)
    i = tl.arange(0, BLOCK_D)
    hit = ((tl.load(slots_ptr + req * D + i, mask=i < D, other=-1) == slot) & (i < D)).to(tl.int32)
    if tl.max(hit, axis=0) == 0:
        return
    src = req * D + tl.argmax(hit, axis=0).to(tl.int64)
    dst = req * W + pos % W
    _copy_row(dk_tab, sk_tab, lid, src, dst, ROW_K, BLOCK)
    _copy_row(dv_tab, sv_tab, lid, src, dst, ROW_V, BLOCK)


@triton.jit
def _drop_kernel(req_ptr, n_real, valid_ptr, R):
    b = tl.program_id(0)
    req = tl.load(req_ptr + b).to(tl.int64)
    if (b < n_real) & (req < R):
        tl.store(valid_ptr + req, 0)


class DraftStaging:
    """The recent window's side of speculative verify, per request slot r < R (R = the ring's requests, W its
    rows per request, D draft tokens per step):

    * stage(): before a verify step, each draft token's staging row (r * D + draft index; < 0 for padding and
      requests outside the ring), the first prefix position it reads from the ring (decode's bound at its
      position: max(position + 1 - W, start), at most the prefix), each sequence's ring base, and the step
      recorded per request slot (prefix, the draft tokens' slots as the slot table holds them now);
    * commit(): before a later forward of a request slot, its staged step's accepted tokens (positions
      [prefix, new length), found by slot among the step's drafts) go from their staging rows to their ring
      rows, in every layer, and the step is dropped; without new lengths (an extend of the slot, which
      rewrites its ring rows itself) the step is only dropped.

    rings_k / rings_v: the ring of each layer ([R * W, H, d_k] / [.., d_v] bf16); the staging rows get the
    same row shape. max_rows: the largest batch. `triton_kernel`: one launch per call (GPU), else PyTorch."""

    def __init__(self, rings_k: Sequence[torch.Tensor], rings_v: Sequence[torch.Tensor], window: int, requests: int,
                 draft_tokens: int, max_rows: int, triton_kernel: bool):
        if not rings_k or len(rings_k) != len(rings_v):
            raise ValueError(f"DraftStaging: {len(rings_k)} K and {len(rings_v)} V rings")
        W, R, D = int(window), int(requests), int(draft_tokens)
        dev = rings_k[0].device
        self.window, self.requests, self.draft_tokens, self.triton = W, R, D, triton_kernel
        self.rings_k, self.rings_v = list(rings_k), list(rings_v)
        self.stage_k = [torch.zeros((R * D,) + tuple(r.shape[1:]), dtype=r.dtype, device=dev) for r in rings_k]
        self.stage_v = [torch.zeros((R * D,) + tuple(r.shape[1:]), dtype=r.dtype, device=dev) for r in rings_v]
        for group in (self.rings_k + self.stage_k, self.rings_v + self.stage_v):
            if len({tuple(t.shape[1:]) for t in group}) != 1 or any(
                    t.dtype != torch.bfloat16 or not t.is_contiguous() for t in group):
                raise ValueError("DraftStaging: the rings must be contiguous bf16 with one row shape per role")
        # per request slot (row R: what rows outside the ring would write; never read)
        self.valid = torch.zeros(R + 1, dtype=torch.int32, device=dev)
        self.prefix = torch.zeros(R + 1, dtype=torch.int64, device=dev)
        self.slots = torch.zeros(R + 1, D, dtype=torch.int64, device=dev)
        # stage()'s outputs: static, so CUDA graphs read them
        self.stage_rows = torch.full((max_rows * D,), -1, dtype=torch.int32, device=dev)
        self.ring_lo = torch.zeros(max_rows * D, dtype=torch.int32, device=dev)
        self.ring_base = torch.zeros(max_rows, dtype=torch.int32, device=dev)
        if triton_kernel:
            ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64, device=dev)  # noqa: E731
            self.tables = (ptrs(self.rings_k), ptrs(self.stage_k), ptrs(self.rings_v), ptrs(self.stage_v))

    def stage(self, req: torch.Tensor, prefix: torch.Tensor, positions: torch.Tensor, n_real: int,
              slot_table: torch.Tensor, start: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """req / prefix [bs] (the first n_real rows real), positions: the draft tokens' positions (prefix + depth
        in the tree; at least n_real * D), slot_table [requests, columns] (slot of each request's positions),
        start: each ring request's first ring position. -> views (stage_rows [bs * D], ring_lo [bs * D],
        ring_base [bs]) of the static buffers."""
        bs, D, W, R = req.shape[0], self.draft_tokens, self.window, self.requests
        T = bs * D
        n_pos = min(int(positions.shape[0]), n_real * D)
        if n_pos == 0:  # nothing read from it (a CUDA-graph capture has no positions)
            positions = prefix
        if self.triton:
            _stage_kernel[(bs,)](req, prefix, positions, n_real, n_pos, slot_table, slot_table.stride(0), start,
                                 self.valid, self.prefix, self.slots, self.stage_rows, self.ring_lo, self.ring_base,
                                 R, W, D=D, BLOCK_D=triton.next_power_of_2(D))
        else:
            req, prefix = req.to(torch.int64), prefix.to(torch.int64)
            tok = torch.arange(T, device=req.device)
            seq, draft = tok // D, tok % D
            in_ring, rc = req < R, torch.clamp(req, max=R - 1)
            real = torch.arange(bs, device=req.device) < n_real
            pos = prefix[seq] + draft
            pos[:n_pos] = positions[:n_pos].to(torch.int64)
            lo = torch.minimum(torch.maximum(pos + 1 - W, start[rc].to(torch.int64)[seq]), prefix[seq])
            self.ring_lo[:T] = torch.where(in_ring[seq], lo, prefix[seq]).to(torch.int32)
            self.stage_rows[:T] = torch.where((in_ring & real)[seq], rc[seq] * D + draft, -1).to(torch.int32)
            self.ring_base[:bs] = (rc * W).to(torch.int32)
            keep = in_ring & real
            r, p = req[keep], prefix[keep]
            self.valid[r] = 1
            self.prefix[r] = p
            self.slots[r] = slot_table[r[:, None], p[:, None] + torch.arange(D, device=req.device)].to(torch.int64)
        return self.stage_rows[:T], self.ring_lo[:T], self.ring_base[:bs]

    def commit(self, req: torch.Tensor, new_lens: Optional[torch.Tensor], n_real: int, slot_table: torch.Tensor) -> None:
        """req [bs] (the first n_real rows real) about to run a forward with these new lengths (tokens in the
        cache before it: the accepted ones included); None: an extend (drop only)."""
        bs = req.shape[0]
        if bs == 0 or n_real == 0:
            return
        D, W, R = self.draft_tokens, self.window, self.requests
        if self.triton:
            if new_lens is not None:
                rows = [t.shape[1:].numel() for t in (self.rings_k[0], self.rings_v[0])]
                _commit_kernel[(bs * D, len(self.rings_k))](
                    req, new_lens, n_real, self.valid, self.prefix, self.slots, slot_table, slot_table.stride(0),
                    *self.tables, R, W, D=D, BLOCK_D=triton.next_power_of_2(D), ROW_K=rows[0], ROW_V=rows[1],
                    BLOCK=min(triton.next_power_of_2(max(rows)), 1024))
            _drop_kernel[(bs,)](req, n_real, self.valid, R)
            return
        req = req[:n_real].to(torch.int64)
        keep = req < R
        if new_lens is not None:
            lens = new_lens[:n_real].to(torch.int64)
            staged = keep & (self.valid[torch.clamp(req, max=R)] != 0)
            for b in torch.nonzero(staged).flatten().tolist():
                r, pre = int(req[b]), int(self.prefix[req[b]])
                for pos in range(pre, min(pre + D, int(lens[b]))):
                    hit = torch.nonzero(self.slots[r] == slot_table[r, pos].to(torch.int64)).flatten()
                    if hit.numel():
                        src, dst = r * D + int(hit[0]), r * W + pos % W
                        for ring, st in zip(self.rings_k + self.rings_v, self.stage_k + self.stage_v):
                            ring[dst] = st[src]
        self.valid[req[keep]] = 0
