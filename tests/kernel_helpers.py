"""Helpers shared by the kernel tests and the kernel scripts (bench_kernels, compile_check, ...): codec
pairs, cache buffers of one layer, random sequences written to random (non-contiguous) slots, and a CPU
emulator of the register-LUT PTX. Pure PyTorch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from tq_kernels._common import interpreting
from tq_kernels.codec import ROLE_K, ROLE_V, TQCodec, VecFormat


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
    from tq_kernels import reference

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


def extend_inputs(kfmt: VecFormat, vfmt: VecFormat, hq: int, hkv: int, pre: Sequence[int], new: Sequence[int],
                  seed: int, device, qkv_device=None):
    """An extend batch: a packed random prefix per sequence (poisoned cache elsewhere, on `device`), the
    new-token indptr (CPU) and the new tokens' bf16 q (x2) / k / v on qkv_device (default: device).
    -> (gen, kcodec, vcodec, bufs, PagedBatch, qo_indptr, q, k_new, v_new)."""
    gen = torch.Generator().manual_seed(seed)
    kc, vc = make_codecs(kfmt, vfmt, seed=seed % 5)
    bufs = alloc_cache(kfmt, vfmt, sum(pre) + 11, hkv, device)
    batch = fill_random_kv(pre, hkv, kc, vc, bufs, gen, device)
    T = sum(new)
    qo = torch.zeros(len(new) + 1, dtype=torch.int32)
    qo[1:] = torch.tensor(list(new)).cumsum(0)
    dev = device if qkv_device is None else qkv_device
    q = (torch.randn(T, hq, kfmt.head_dim, generator=gen) * 2).to(dev, torch.bfloat16)
    kn = torch.randn(T, hkv, kfmt.head_dim, generator=gen).to(dev, torch.bfloat16)
    vn = torch.randn(T, hkv, vfmt.head_dim, generator=gen).to(dev, torch.bfloat16)
    return gen, kc, vc, bufs, batch, qo, q, kn, vn


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def emulate_register_lut(asm: str, codes: torch.Tensor, high: torch.Tensor = None) -> list:
    """Run `register_lut_asm`'s PTX on the CPU (the few integer instructions it uses, on uint32
    words) for code bytes `codes` (uint8, numel % 4 == 0; 3-bit codes: and their high-bit nibbles
    `high`): returns one bf16 tensor per slice. Lets CPU tests check the asm logic; the GPU tests
    check the real thing."""
    def words(t):
        b = t.to(torch.int64).reshape(-1, 4)
        return b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24

    word = words(codes)
    # output registers $0 .. $3 (4- and 5-bit codes), $7 (2-, 3-bit) or $1 (the int8 LUT)
    pairs = "0x6240" in asm  # `_register_lut_asm_pairs`
    first = 8 if "$8" in asm else 4 if pairs else 2 if "lop3" in asm else 4
    operands = {first: word}
    if high is not None:  # 3-/5-bit codes: the spread high bits follow the code bytes
        operands[first + 1] = words(high)
    outs = {}
    regs = {}
    M = 0xFFFFFFFF

    def val(tok):
        tok = tok.strip()
        if tok.startswith("$"):
            i = int(tok[1:])
            return operands[i]
        if tok.startswith("0x") or tok.isdigit():
            return torch.full_like(word, int(tok, 0))
        return regs[tok]

    def prmt(a, bb, c):  # default mode: bit 3 of a selector nibble replicates the byte's msb
        src = a | (bb << 32)
        r = torch.zeros_like(a)
        for k in range(4):
            nib = (c >> (4 * k)) & 15
            byte = (src >> (8 * (nib & 7))) & 0xFF
            byte = torch.where(nib >= 8, torch.where(byte >= 128, 0xFF, 0), byte)
            r |= byte << (8 * k)
        return r

    def lop3(a, bb, c, lut):  # bit i of lut is the result for (a, b, c) bits = (i >> 2, i >> 1, i) & 1
        r = torch.zeros_like(a)
        for i in range(8):
            if (int(lut[0]) >> i) & 1:
                r |= ((a if i & 4 else ~a & M) & (bb if i & 2 else ~bb & M) & (c if i & 1 else ~c & M))
        return r

    for line in asm.replace("{", "").replace("}", "").splitlines():
        line = line.strip().rstrip(";")
        if not line or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        a = [x.strip() for x in args.split(",")]
        x = [val(t) for t in a[1:]]
        name = op.split(".")[0]
        r = {"shr": lambda: x[0] >> x[1], "shl": lambda: (x[0] << x[1]) & M, "and": lambda: x[0] & x[1],
                 "or": lambda: x[0] | x[1], "xor": lambda: x[0] ^ x[1], "mul": lambda: (x[0] * x[1]) & M,
             "mad": lambda: (x[0] * x[1] + x[2]) & M, "prmt": lambda: prmt(x[0], x[1], x[2]),
             "lop3": lambda: lop3(x[0], x[1], x[2], x[3]), "mov": lambda: x[0]}[name]()
        if a[0].startswith("$"):
            outs[int(a[0][1:])] = r
        else:
            regs[a[0]] = r
    if pairs:  # output T holds coordinate T of both tokens
        lanes = [torch.stack([outs[t] & 0xFFFF, outs[t] >> 16], dim=1).reshape(-1) for t in range(4)]
        return [torch.where(x >= 32768, x - 65536, x).to(torch.int16).view(torch.bfloat16) for x in lanes]
    if "lop3" in asm:  # the int8 LUT: one output word of 4 int8 values per slice
        return [torch.stack([(outs[k] >> (8 * j)) & 0xFF for j in range(4)], dim=1).reshape(-1)
                .to(torch.uint8).view(torch.int8) for k in sorted(outs)]
    res = []
    for s in range(len(outs) // 2):
        lanes = torch.stack([outs[2 * s] & 0xFFFF, outs[2 * s] >> 16, outs[2 * s + 1] & 0xFFFF,
                             outs[2 * s + 1] >> 16], dim=1).reshape(-1)
        res.append(torch.where(lanes >= 32768, lanes - 65536, lanes).to(torch.int16).view(torch.bfloat16))
    return res
