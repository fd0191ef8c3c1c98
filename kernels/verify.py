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

`RowCopy` copies rows between two lists of per-layer tensors (one launch for all layers on the GPU): the
accepted draft tokens' exact rows go from the staging rows verify wrote to their ring rows.
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

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
def _copy_rows_kernel(dst_table, src_table, src_rows, dst_rows, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """Program (entry e, tensor l): row src_rows[e] of tensor l of src_table -> row dst_rows[e] of tensor l
    of dst_table (tables: int64 data pointers of bf16 tensors with ROW contiguous elements per row);
    src_rows[e] < 0 copies nothing."""
    e = tl.program_id(0)
    lid = tl.program_id(1)
    s = tl.load(src_rows + e).to(tl.int64)
    if s < 0:
        return
    d = tl.load(dst_rows + e).to(tl.int64)
    dst = tl.load(dst_table + lid).to(tl.pointer_type(tl.bfloat16))
    src = tl.load(src_table + lid).to(tl.pointer_type(tl.bfloat16))
    for c0 in range(0, ROW, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < ROW
        tl.store(dst + d * ROW + c, tl.load(src + s * ROW + c, mask=m), mask=m)


class RowCopy:
    """dst[l][dst_rows[e]] = src[l][src_rows[e]] for every tensor pair l and entry e with src_rows[e] >= 0.
    The tensors are bf16 with contiguous rows of one size; `triton`: one launch over all pairs through a
    table of data pointers built once (the tensors must outlive this object and never be reallocated),
    else a loop of torch index copies."""

    def __init__(self, dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], triton_kernel: bool):
        if len(dst) != len(src) or not dst:
            raise ValueError(f"RowCopy: {len(dst)} destination and {len(src)} source tensors")
        shapes = {tuple(t.shape[1:]) for t in list(dst) + list(src)}
        if len(shapes) != 1 or any(t.dtype != torch.bfloat16 or not t.is_contiguous() for t in list(dst) + list(src)):
            raise ValueError(f"RowCopy: contiguous bf16 tensors with one row shape expected, got {sorted(shapes)}")
        self.dst: List[torch.Tensor] = list(dst)
        self.src: List[torch.Tensor] = list(src)
        self.row = int(torch.Size(next(iter(shapes))).numel())
        self.triton = triton_kernel
        if triton_kernel:
            dev = dst[0].device
            self.dst_table = torch.tensor([t.data_ptr() for t in dst], dtype=torch.int64, device=dev)
            self.src_table = torch.tensor([t.data_ptr() for t in src], dtype=torch.int64, device=dev)

    def __call__(self, src_rows: torch.Tensor, dst_rows: torch.Tensor) -> None:
        n = src_rows.shape[0]
        if n == 0:
            return
        if self.triton:
            _copy_rows_kernel[(n, len(self.dst))](self.dst_table, self.src_table, src_rows, dst_rows, ROW=self.row,
                                                 BLOCK=min(triton.next_power_of_2(self.row), 1024))
            return
        keep = src_rows >= 0
        s, d = src_rows[keep].long(), dst_rows[keep].long()
        for dt, st in zip(self.dst, self.src):
            dt[d] = st[s]
