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
