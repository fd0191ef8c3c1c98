#!/usr/bin/env python3
"""Copy a Llama-family checkpoint with every attention head duplicated, so that it splits over more
tensor-parallel ranks while computing exactly the same function.

SmolLM2-135M has 9 query / 3 KV heads, which TP = 2 cannot split. Doubling gives 18 / 6 heads:
each KV head appears twice (k_proj, v_proj rows repeated), each query group twice (q_proj rows
repeated), and o_proj's columns are repeated at half weight, so the two copies of every head add up
to the original output (halving is exact in fp16/bf16). The result is real weights that serve under
TP = 2 (and TP = 1) with the original model's perplexity, which is what the TP = 2 vs TP = 1
comparison needs (scripts/gpu_server_check.py --stages tp).

    python3 scripts/make_tp_model.py SRC_DIR DST_DIR [--factor 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import torch


def duplicate_heads(state: dict, cfg: dict, factor: int = 2) -> tuple[dict, dict]:
    """(state dict, config) -> the same with factor x the query and KV heads."""
    hq, hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // hq
    g = hq // hkv
    out = {}
    for name, w in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            w = w.view(hkv, 1, g, d, -1).expand(hkv, factor, g, d, w.shape[-1]).reshape(factor * hq * d, -1)
        elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.v_proj.weight"):
            w = w.view(hkv, 1, d, -1).expand(hkv, factor, d, w.shape[-1]).reshape(factor * hkv * d, -1)
        elif name.endswith("self_attn.o_proj.weight"):
            h = w.shape[0]
            w = (w.view(h, hkv, 1, g, d).expand(h, hkv, factor, g, d).reshape(h, factor * hq * d) / factor)
        elif "self_attn" in name and name.endswith(".bias"):
            raise NotImplementedError(f"attention biases are not handled: {name}")
        out[name] = w.contiguous()
    new_cfg = dict(cfg, num_attention_heads=factor * hq, num_key_value_heads=factor * hkv, head_dim=d)
    return out, new_cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--factor", type=int, default=2)
    a = ap.parse_args()
    from safetensors.torch import load_file, save_file

    cfg = json.load(open(os.path.join(a.src, "config.json")))
    files = sorted(f for f in os.listdir(a.src) if f.endswith(".safetensors"))
    state = {}
    for f in files:
        state.update(load_file(os.path.join(a.src, f)))
    new_state, new_cfg = duplicate_heads(state, cfg, a.factor)
    os.makedirs(a.dst, exist_ok=True)
    for f in os.listdir(a.src):  # tokenizer and generation files as they are
        if not f.endswith(".safetensors") and f != "config.json" and not f.endswith(".index.json"):
            shutil.copy(os.path.join(a.src, f), a.dst)
    save_file(new_state, os.path.join(a.dst, "model.safetensors"), metadata={"format": "pt"})
    json.dump(new_cfg, open(os.path.join(a.dst, "config.json"), "w"), indent=1)
    print(f"{a.dst}: {new_cfg['num_attention_heads']} query / {new_cfg['num_key_value_heads']} KV heads")


if __name__ == "__main__":
    main()
