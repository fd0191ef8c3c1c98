"""Claim of the exact first-token rows (`tq_kernels.window`: FirstRows): one launch per extend batch.

Each new token at position 0 finds the table entry holding its token id or claims a free one (-1) with a
compare-and-swap, so concurrent sequences with the same first token share one entry; a full table leaves
the token to the codes. Every new token's slot flag is overwritten (entry + 1, or 0), since slots are
reused. No host sync: the entries stay on the device for the layers' compress launches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _claim_kernel(ids_ptr, slots_ptr, zero_ptr, N, table_ptr, flags_ptr, entries_ptr, P: tl.constexpr,
                  BLOCK: tl.constexpr):
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = t < N
    tok = tl.load(ids_ptr + t, mask=m, other=0).to(tl.int32)
    searching = m & (tl.load(zero_ptr + t, mask=m, other=0) != 0)
    entry = tl.full((BLOCK,), -1, tl.int32)
    for e in tl.static_range(P):
        # lanes done (or not at position 0) compare against -2, which no entry holds: a read, no write
        old = tl.atomic_cas(table_ptr + e + tl.zeros((BLOCK,), tl.int32), tl.where(searching, -1, -2), tok)
        hit = searching & ((old == -1) | (old == tok))
        entry = tl.where(hit, e, entry)
        searching = searching & ~hit
    tl.store(entries_ptr + t, entry, mask=m)
    slot = tl.load(slots_ptr + t, mask=m, other=0).to(tl.int64)
    tl.store(flags_ptr + slot, (entry + 1).to(tl.uint8), mask=m)


def claim_first_rows(ids: torch.Tensor, slots: torch.Tensor, at_zero: torch.Tensor, table: torch.Tensor,
                     flags: torch.Tensor) -> torch.Tensor:
    """ids [N] token ids, slots [N] their cache slots, at_zero [N] bool (position 0), table int32 [P] (the
    claimed token ids, -1 free), flags uint8 [slots]. -> int32 [N] entry of each token (-1: none); writes
    flags[slots] = entry + 1 and claims entries in `table`, in place."""
    n = ids.shape[0]
    entries = torch.empty(n, dtype=torch.int32, device=ids.device)
    if n == 0:
        return entries
    assert table.dtype == torch.int32 and flags.dtype == torch.uint8
    block = 128
    _claim_kernel[(triton.cdiv(n, block),)](ids, slots, at_zero.to(torch.int8), n, table, flags, entries,
                                            P=table.shape[0], BLOCK=block)
    return entries
