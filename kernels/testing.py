"""Helpers shared by the kernel tests and scripts/bench_kernels.py: codec pairs, cache buffers of one
layer, random sequences written to random (non-contiguous) slots. Pure PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import interpreting
from .codec import ROLE_K, ROLE_V, TQCodec, VecFormat


def pick_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def triton_runnable() -> Tuple[bool, str]:
    """(can the Triton kernels run here, reason if not)."""
    if torch.cuda.is_available():
        return True, ""
    if interpreting():
        return True, ""
    return False, "no CUDA device and TRITON_INTERPRET is not set (run with TRITON_INTERPRET=1 on CPU)"


def make_codecs(kfmt: VecFormat, vfmt: VecFormat, seed: int = 0, layer_id: int = 0) -> Tuple[TQCodec, TQCodec]:
    return (TQCodec.build(kfmt, base_seed=seed, layer_id=layer_id, role=ROLE_K),
            TQCodec.build(vfmt, base_seed=seed, layer_id=layer_id, role=ROLE_V))


def alloc_cache(kfmt: VecFormat, vfmt: VecFormat, n_slots: int, h_kv: int, device, poison: bool = True):
    """(k_codes, k_scales, v_codes, v_scales). poison: random code bytes and NaN scales, so a kernel
    that reads a slot it should not (slot 0, unwritten rows, masked lanes) produces NaN."""
    kc = torch.zeros(n_slots, h_kv, kfmt.code_bytes, dtype=torch.uint8, device=device)
    ks = torch.zeros(n_slots, h_kv, kfmt.n_scales, dtype=torch.float16, device=device)
    vc = torch.zeros(n_slots, h_kv, vfmt.code_bytes, dtype=torch.uint8, device=device)
    vs = torch.zeros(n_slots, h_kv, vfmt.n_scales, dtype=torch.float16, device=device)
    if poison:
        for c in (kc, vc):
            c.copy_(torch.randint(0, 256, c.shape, dtype=torch.uint8).to(device))
        ks.fill_(float("nan"))
        vs.fill_(float("nan"))
    return kc, ks, vc, vs


@dataclass
class PagedBatch:
    kv_indptr: torch.Tensor   # int32 [B + 1]
    kv_indices: torch.Tensor  # int32 [sum(lens)], distinct slots >= 1 in random order
    lens: List[int]


def random_slots(n: int, n_slots: int, gen: torch.Generator) -> torch.Tensor:
    assert n <= n_slots - 1, "slot 0 is reserved"
    return (torch.randperm(n_slots - 1, generator=gen)[:n] + 1).to(torch.int32)


def fill_random_kv(lens: Sequence[int], h_kv: int, kcodec: TQCodec, vcodec: TQCodec, bufs, gen: torch.Generator,
                   device, dtype=torch.bfloat16, writer=None, n_slots: Optional[int] = None) -> PagedBatch:
    """Random K/V for sequences of the given lengths, compressed into random distinct slots with
    `writer` (default: the PyTorch reference compress_and_store)."""
    from . import reference

    writer = writer or reference.compress_and_store
    total = int(sum(lens))
    n_slots = n_slots or bufs[0].shape[0]
    slots = random_slots(total, n_slots, gen)
    if total:
        k = torch.randn(total, h_kv, kcodec.fmt.head_dim, generator=gen).to(device, dtype)
        v = torch.randn(total, h_kv, vcodec.fmt.head_dim, generator=gen).to(device, dtype)
        writer(k, v, slots.to(device), kcodec, vcodec, *bufs)
    indptr = torch.zeros(len(lens) + 1, dtype=torch.int32)
    indptr[1:] = torch.tensor(list(lens), dtype=torch.int64).cumsum(0).to(torch.int32)
    return PagedBatch(indptr.to(device), slots.to(device), list(lens))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))
