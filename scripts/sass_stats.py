#!/usr/bin/env python3
"""Static instruction counts of decode stage 1 (or extend) as compiled for sm_90 (no GPU needed).

Decode over low-bit codes is limited by instructions per code, not by bytes; the SASS says how many
instructions one tile costs before a GPU times it. For each headline format this compiles stage 1 at
the launch parameters `plan_decode` picks for the given batch and context on an H100 (132 SMs), dumps
the SASS (`cuobjdump -sass` from Triton's bundled CUDA tools), finds the main KV loop by its backward
branch, and reports per kernel: total instructions, loop-body instructions (per tile and warp), counts
by opcode class, registers, spills, and loop instructions per packed KV byte and per code.

  python scripts/sass_stats.py [--json PATH] [--batch 32 --context 32768] [--sass-dir DIR] [--filter K4V4]
  python scripts/sass_stats.py --extend 16384:512      # extend: NEW tokens of one sequence over a PREFIX

--extend compiles the extend kernel instead (full attention, no window; the main loop is the packed prefix's
tile loop, BLOCK_N = 64 tokens).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from compile_check import COMPILED, install  # noqa: E402  (sets the compile-only driver up on install())

# name -> (k VecFormat kwargs, v VecFormat kwargs); the shapes (H_q, H_kv, head_dim)
FORMATS = {"K4V4": (dict(bits=4), dict(bits=4)), "K3V3": (dict(bits=3), dict(bits=3)),
           "K4V2": (dict(bits=4), dict(bits=2)), "PROD-K3": (dict(bits=3, qjl=True), dict(bits=3))}
SHAPES = [(32, 8, 128), (9, 3, 64)]
H100_SMS = 132

# opcode (before the first '.') -> class; everything else is counted under its own opcode
CLASSES = {"LDG": "LDG", "LDS": "LDS", "LDSM": "LDSM", "STS": "STS", "STG": "STG", "LDGSTS": "LDGSTS",
           "HMMA": "HMMA", "IMMA": "IMMA", "HGMMA": "HGMMA", "IGMMA": "IGMMA", "PRMT": "PRMT", "LOP3": "LOP3",
           "SHF": "SHF", "I2F": "I2F", "F2F": "F2F", "F2FP": "F2FP", "FFMA": "FFMA", "FMUL": "FMUL", "FADD": "FADD",
           "MUFU": "MUFU", "IMAD": "IMAD", "IADD3": "IADD3", "LEA": "LEA", "ISETP": "ISETP", "FSETP": "FSETP",
           "FSEL": "FSEL", "SEL": "SEL", "MOV": "MOV", "BRA": "BRA", "BAR": "BAR", "SHFL": "SHFL", "FMNMX": "FMNMX",
           "I2FP": "I2F", "F2I": "F2I", "NOP": "NOP", "DEPBAR": "DEPBAR", "S2R": "S2R", "CS2R": "CS2R"}
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")


def cuda_tool(name: str) -> str:
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise SystemExit(f"sass_stats: {path} not found (Triton's bundled CUDA tools)")
    return path


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuda_tool("cuobjdump"), flag, f.name], check=True, capture_output=True,
                              text=True).stdout


def sass_of(cubin: bytes) -> str:
    return cuobjdump(cubin, "-sass")


def parse(sass: str) -> list:
    """[(address, opcode, text)] of the SASS listing, predicates stripped from the opcode."""
    out = []
    for line in sass.splitlines():
        m = _INSN.match(line)
        if not m:
            continue
        text = m.group(2).strip()
        op = text.split()[0]
        if op.startswith("@"):
            op = text.split()[1]
        out.append((int(m.group(1), 16), op, text))
    return out


def classify(op: str) -> str:
    return CLASSES.get(op.split(".")[0], op.split(".")[0])


def main_loop(insns: list) -> tuple:
    """(first, last) index of the main KV loop: the backward branch spanning the most instructions (stage 1
    has one tile loop; Triton emits nothing else with a backward branch of that size). None without one."""
    addr = {a: i for i, (a, _, _) in enumerate(insns)}
    best = None
    for i, (a, op, text) in enumerate(insns):
        if op.split(".")[0] != "BRA":
            continue
        tgt = re.search(r"0x([0-9a-f]+)", text)
        if not tgt:
            continue
        t = int(tgt.group(1), 16)
        if t < a and t in addr and (best is None or i - addr[t] > best[1] - best[0]):
            best = (addr[t], i)
    return best


def stats(kernel, tile_bytes: int, tile_codes: int, num_warps: int) -> dict:
    insns = parse(sass_of(kernel.asm["cubin"]))
    loop = main_loop(insns)
    body = insns[loop[0]:loop[1] + 1] if loop else []
    md = kernel.metadata
    n_regs, n_spills = getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None)
    if n_regs is None:  # without a device the kernel is never loaded: ptxas reports them in the cubin's info
        n_regs, n_spills = resource_usage(kernel.asm["cubin"])
    r = dict(total=len(insns), loop=len(body), registers=n_regs, spill_bytes=n_spills, shared=md.shared,
             num_warps=num_warps, loop_classes=dict(collections.Counter(classify(op) for _, op, _ in body)
                                                    .most_common()),
             total_classes=dict(collections.Counter(classify(op) for _, op, _ in insns).most_common()))
    # every warp runs the loop body once per tile
    r["loop_insns_per_kv_byte"] = round(len(body) * num_warps / tile_bytes, 3) if body else None
    r["loop_insns_per_code"] = round(len(body) * num_warps / tile_codes, 3) if body else None
    return r


def resource_usage(cubin: bytes) -> tuple:
    """(registers, spill bytes) from `cuobjdump -res-usage`."""
    txt = cuobjdump(cubin, "-res-usage")
    reg = re.search(r"REG:(\d+)", txt)
    st = re.search(r"STACK:(\d+)", txt)
    return (int(reg.group(1)) if reg else None), (int(st.group(1)) if st else None)


def _formats_and_cache(name, hkv, d):
    """(K format, V format, K codec, V codec, a 64-slot packed cache on the CPU) of FORMATS[name]."""
    from kernel_helpers import alloc_cache, make_codecs
    from tq_kernels.codec import VecFormat

    kk, vv = FORMATS[name]
    kf, vf = VecFormat(d, **kk), VecFormat(d, **vv)
    return (kf, vf, *make_codecs(kf, vf), alloc_cache(kf, vf, 64, hkv, "cpu"))


def compile_stage1(name, hq, hkv, d, batch, context, sms):
    """Compile decode (stage 1 and 2) with the plan for (batch, context) on `sms` SMs; returns
    (plan, stage-1 kernel, format pair)."""
    import torch
    from tq_kernels import decode

    kf, vf, kc, vc, bufs = _formats_and_cache(name, hkv, d)
    saved = decode.pdl_ok
    decode.pdl_ok = lambda device: True  # sm_90: stage 1 is a programmatic dependent launch
    try:
        plan = decode.plan_decode(kc, vc, batch, hkv, context, "cpu", sm_count=sms)
    finally:
        decode.pdl_ok = saved
    qrot = None if kf.qjl else torch.zeros(2, hq, d)
    COMPILED.clear()
    decode.decode_attention(torch.randn(2, hq, d, dtype=torch.bfloat16), *bufs, kc, vc,
                            torch.tensor([0, 3, 6], dtype=torch.int32), torch.arange(1, 7), d ** -0.5, plan=plan,
                            workspace=decode.DecodeWorkspace.create(2, hq, d, plan.partials, "cpu", head_dim_k=d),
                            q_rotated=qrot)
    k1 = [k for n, k in COMPILED if n.startswith("_decode_stage1")]
    return plan, k1[0], (kf, vf)


def compile_extend(name, hq, hkv, d, prefix, new, sms):
    """Compile extend (one sequence, `new` tokens over a `prefix`-token packed prefix) with the launcher's
    choices for `sms` SMs; returns (extend kernel, format pair)."""
    import torch
    from tq_kernels import extend

    kf, vf, kc, vc, bufs = _formats_and_cache(name, hkv, d)
    saved = extend.num_sms
    extend.num_sms = lambda device: sms
    COMPILED.clear()
    try:
        extend.extend_attention(torch.randn(new, hq, d, dtype=torch.bfloat16),
                                torch.randn(new, hkv, d, dtype=torch.bfloat16),
                                torch.randn(new, hkv, d, dtype=torch.bfloat16), *bufs, kc, vc,
                                torch.tensor([0, new], dtype=torch.int32), torch.tensor([0, prefix], dtype=torch.int32),
                                torch.zeros(prefix, dtype=torch.int64), d ** -0.5, max_extend_len=new,
                                max_prefix_len=prefix)
    finally:
        extend.num_sms = saved
    return [k for n, k in COMPILED if n == "_extend_kernel"][0], (kf, vf)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write the stats here")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--sms", type=int, default=H100_SMS, help="SMs the plan fills (H100: 132)")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sass-dir", default=None, help="also write each kernel's SASS listing here")
    ap.add_argument("--filter", default="")
    ap.add_argument("--extend", default=None, metavar="PREFIX:NEW", help="the extend kernel instead of decode")
    a = ap.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    install(a.arch)
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    if not os.path.exists(os.path.join(os.path.dirname(HERE), "configs", "prod3.yaml")):
        FORMATS.pop("PROD-K3")
    rows = []
    for hq, hkv, d in SHAPES:
        for name in FORMATS:
            label = f"{name} ({hq},{hkv},{d})"
            if a.filter and a.filter not in label:
                continue
            if a.extend:
                prefix, new = (int(x) for x in a.extend.split(":"))
                k1, (kf, vf) = compile_extend(name, hq, hkv, d, prefix, new, a.sms)
                bn, nw = 64, k1.metadata.num_warps
                r = dict(format=name, h_q=hq, h_kv=hkv, head_dim=d, prefix=prefix, new_tokens=new,
                         kernel="_extend_kernel", tile_bytes=bn * (kf.slot_bytes + vf.slot_bytes),
                         **stats(k1, bn * (kf.slot_bytes + vf.slot_bytes), bn * (kf.head_dim + vf.head_dim), nw))
                rows.append(r)
                print(f"{label:22s} extend w {nw} regs {r['registers']} spill {r['spill_bytes']}  total "
                      f"{r['total']:5d}  loop {r['loop']:5d} | "
                      + ", ".join(f"{c} {n}" for c, n in list(r["loop_classes"].items())[:12]), flush=True)
                continue
            plan, k1, (kf, vf) = compile_stage1(name, hq, hkv, d, a.batch, a.context, a.sms)
            tile_bytes = plan.block_n * (kf.slot_bytes + vf.slot_bytes)
            r = dict(format=name, h_q=hq, h_kv=hkv, head_dim=d, batch=a.batch, context=a.context,
                     kernel=k1.name if hasattr(k1, "name") else "_decode_stage1",
                     plan=dict(sliced=plan.sliced, block_n=plan.block_n, num_warps=plan.num_warps,
                               num_stages=plan.num_stages, max_registers=plan.max_registers,
                               key_int8=plan.key_int8, v_pairs=plan.v_pairs, num_splits=plan.num_splits),
                     tile_bytes=tile_bytes, **stats(k1, tile_bytes, plan.block_n * (kf.head_dim + vf.head_dim),
                                                     plan.num_warps))
            rows.append(r)
            if a.sass_dir:
                os.makedirs(a.sass_dir, exist_ok=True)
                with open(os.path.join(a.sass_dir, f"{name}_{hq}_{hkv}_{d}.sass"), "w") as f:
                    f.write(sass_of(k1.asm["cubin"]))
            top = ", ".join(f"{c} {n}" for c, n in list(r["loop_classes"].items())[:12])
            print(f"{label:22s} bn {plan.block_n:3d} w {plan.num_warps} regs {r['registers']} spill "
                  f"{r['spill_bytes']}  total {r['total']:5d}  loop {r['loop']:5d}  "
                  f"{r['loop_insns_per_kv_byte']} insn/B  {r['loop_insns_per_code']} insn/code | {top}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
