"""Recent window: the last W positions of a sequence kept exact next to the packed cache.

Attention is mostly local, so the newest keys and values carry most of the weight, and their
quantization error most of the loss (SmolLM2, `turbo4`: +4.0 % perplexity with every token from codes,
+0.0 % with the last 32 exact; docs/RESULTS.md). Every token is still stored packed as always; in
addition its exact K and V, rotated like the codes ((k - mu) M_k^T and v M_v^T, so scores and the V
accumulator stay in the codes' domain), go in bf16 to a ring of W rows per request, row
`base + position % W`. Decode reads positions [lo, L) of a sequence from the ring and [0, lo) from the
codes, and merges the two by log-sum-exp like two more splits. The engine decides rows and bounds:
`lo` is at least L - W and at least the first position whose ring row was written for this sequence.

Two argument bundles (plain tensors, no engine types):
  RingWrite(k, v, rows)        compress_and_store: token i also goes to ring row rows[i] (< 0: not)
  DecodeWindow(k, v, size, lo, base)   decode_attention: per sequence b the ring part is [lo[b], L_b)
  ExtendWindow(k_old, v_old, size)     extend_attention (perplexity of the cache format): new key j is
                                       seen exact by query i when i - j < size, else as k_old / v_old
  FirstRows(k, v, flags)               decode_attention: the exact first token (below)

First token: attention-sink heads put most of their weight on position 0, so its codes' error costs
more than any other token's. At position 0 a causal decoder's K/V depend on the token id alone, so a
table of a few exact rows per layer (rotated like the ring's) serves every sequence starting with a
claimed token id; flags[slot] = entry + 1 marks a slot holding such a position-0 token (0: none), and
travels with the slot through the engine's prefix cache. `claim_first_rows` fills the table and the
flags; compress_and_store(first=RingWrite(table k, table v, entries)) writes the rows; decode reads
position 0 of sequence b from entry flags[kv_indices[kv_indptr[b]]] - 1 where that is > 0, position 0
lies inside the sliding window and the recent window's ring does not already hold it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RingWrite(NamedTuple):
    k: torch.Tensor      # bf16 [rows, H_kv, d_k]
    v: torch.Tensor      # bf16 [rows, H_kv, d_v]
    rows: torch.Tensor   # int32/int64 [N]: ring row of each new token, < 0 = not written


class DecodeWindow(NamedTuple):
    k: torch.Tensor      # bf16 [rows, H_kv, d_k]: rotated exact keys
    v: torch.Tensor      # bf16 [rows, H_kv, d_v]: rotated exact values
    size: int            # W: ring rows per request
    lo: torch.Tensor     # int32 [>= B]: first position of sequence b read from the ring (L_b: none)
    base: torch.Tensor   # int32 [>= B]: ring row of position p is base[b] + p % W


class ExtendWindow(NamedTuple):
    k_old: torch.Tensor  # [T, H_kv, d_k]: the new tokens' keys as the codes give them back
    v_old: torch.Tensor  # [T, H_kv, d_v]
    size: int


class FirstRows(NamedTuple):
    k: torch.Tensor      # bf16 [entries, H_kv, d_k]: rotated exact keys of the first tokens
    v: torch.Tensor      # bf16 [entries, H_kv, d_v]
    flags: torch.Tensor  # uint8 [slots]: entry + 1 of the position-0 token a slot holds (0: none)


def check_ring(ring: RingWrite, n: int, h: int, d_k: int, d_v: int):
    """(k, v, rows) of a RingWrite after shape checks."""
    k, v, rows = ring
    assert k.dtype == torch.bfloat16 and v.dtype == torch.bfloat16, "ring buffers are bf16"
    assert k.shape[1:] == (h, d_k) and v.shape[1:] == (h, d_v), (tuple(k.shape), tuple(v.shape), h, d_k, d_v)
    assert k.stride(2) == 1 and v.stride(2) == 1
    rows = rows.reshape(-1)
    assert rows.shape[0] >= n, (rows.shape, n)
    return k, v, rows


def check_decode_window(win: DecodeWindow, b: int, h: int, d_k: int, d_v: int) -> None:
    assert win.size >= 1
    assert win.k.dtype == torch.bfloat16 and win.v.dtype == torch.bfloat16
    assert win.k.shape[1:] == (h, d_k) and win.v.shape[1:] == (h, d_v)
    assert win.k.stride(2) == 1 and win.v.stride(2) == 1
    assert win.lo.shape[0] >= b and win.base.shape[0] >= b


def check_first_rows(first: FirstRows, h: int, d_k: int, d_v: int) -> None:
    assert first.k.dtype == torch.bfloat16 and first.v.dtype == torch.bfloat16, "first-token rows are bf16"
    assert first.k.shape[1:] == (h, d_k) and first.v.shape[1:] == (h, d_v), (tuple(first.k.shape), h, d_k, d_v)
    assert first.k.stride(2) == 1 and first.v.stride(2) == 1
    assert first.flags.dtype == torch.uint8 and first.flags.dim() == 1
