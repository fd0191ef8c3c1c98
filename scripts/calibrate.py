#!/usr/bin/env python3
"""Per-layer calibration: measure each layer's sensitivity to K and V bit width on a real model and
text, then write a per-layer YAML that meets a target average number of code bits.

How it measures: the model runs in Hugging Face transformers with an attention function that
replaces every quantized layer's keys and values by what the TurboQuant cache would return (the
reference codec of tq_kernels, with the same per-layer seeds as the server) before attention. All
tokens, including the current one, see compressed K/V -- the conditions of decoding. Sensitivity of
(layer, role, bits) = increase of log-perplexity when only that layer's K (or V) is quantized at
that width. Allocation: start every quantized (layer, role) at the lowest candidate width and
repeatedly buy the upgrade with the largest sensitivity drop per extra bit until the average
reaches the target (greedy on an additive model), then verify the chosen plan end to end against
uniform bits at equal bytes.

  python scripts/calibrate.py --model /tmp/models/SmolLM2-135M-Instruct --text prideprejudice.txt \
      --target-bits 3.0 --out configs/calibrated_smollm2.yaml
  python scripts/calibrate.py --model ... --text ... --presets turbo4,turbo3,k4v2 --no-calibrate
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_tq.config import TQConfig, load_config  # noqa: E402
from tq_kernels.codec import ROLE_K, ROLE_V, TQCodec, VecFormat  # noqa: E402


class Simulator:
    """Holds a model whose attention reads K/V through the codecs of `self.plan` (None = exact)."""

    def __init__(self, model_path, device, dtype):
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.layer_codecs = {}  # layer -> (K codec or None, V codec or None); absent = exact
        sim = self

        def tq_attention(module, query, key, value, attention_mask, **kwargs):
            layer = getattr(module, "layer_idx", None)
            if layer in sim.layer_codecs:
                kc, vc = sim.layer_codecs[layer]
                if kc is not None:
                    key = kc.decode(*kc.encode(key.float())).to(key.dtype)
                if vc is not None:
                    value = vc.decode(*vc.encode(value.float())).to(value.dtype)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("tq_sim", tq_attention)
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype,
                                                          attn_implementation="tq_sim").to(device).eval()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.device = device

    def set_config(self, cfg):
        """Quantize as the server would with this config (None = every layer exact)."""
        self.layer_codecs = {}
        if cfg is not None:
            plan = cfg.resolve(self.num_layers, self.head_dim)
            self.layer_codecs = {l: plan.codecs(l) for l in plan.quantized_layers}

    def set_probe(self, layer, role, bits, seed):
        """Only `role` ('k' or 'v') of `layer` quantized at `bits`, everything else exact."""
        role_id = ROLE_K if role == "k" else ROLE_V
        codec = TQCodec.build(VecFormat(self.head_dim, bits), seed, layer, role_id)
        self.layer_codecs = {layer: (codec, None) if role == "k" else (None, codec)}

    @torch.no_grad()
    def nll(self, ids, window):
        """Mean negative log-likelihood over non-overlapping windows (each window's first token is
        context only)."""
        total, count = 0.0, 0
        for s in range(0, len(ids) - 1, window):
            x = torch.tensor(ids[s:s + window], device=self.device)[None]
            if x.shape[1] < 2:
                break
            logits = self.model(x).logits.float()
            lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, x[0, 1:, None])
            total -= lp.sum().item()
            count += x.shape[1] - 1
        return total / count


def config_dict(per_layer, boundary, seed, name):
    """YAML dict with one override per layer; per_layer[l] = (k_bits, v_bits)."""
    first, last = boundary
    return {"name": name, "seed": seed, "boundary": {"first": first, "last": last},
            "defaults": {"k": {"bits": 4}, "v": {"bits": 4}},
            "overrides": [{"layers": l, "k": {"bits": kb}, "v": {"bits": vb}} for l, (kb, vb) in sorted(per_layer.items())]}


def uniform_config(bits, boundary, seed):
    first, last = boundary
    return TQConfig.from_dict({"name": f"uniform{bits}", "seed": seed, "boundary": {"first": first, "last": last},
                               "defaults": {"k": {"bits": bits}, "v": {"bits": bits}}})


def calibrate(sim, ids, window, cands, target, boundary, seed, log):
    first, last = boundary
    layers = [l for l in range(sim.num_layers) if first <= l < sim.num_layers - last]
    sim.set_config(None)
    base = sim.nll(ids, window)
    log(f"baseline nll {base:.5f} (ppl {math.exp(base):.4f})")
    sens = {}
    t0 = time.time()
    for l in layers:
        for role in ("k", "v"):
            for b in cands:
                sim.set_probe(l, role, b, seed)
                sens[(l, role, b)] = sim.nll(ids, window) - base
        log(f"layer {l}: " + " ".join(f"{r}{b}={sens[(l, r, b)]:+.4f}" for r in ("k", "v") for b in cands))
    log(f"sensitivity sweep: {time.time() - t0:.0f}s")
    # greedy allocation
    bits = {(l, r): min(cands) for l in layers for r in ("k", "v")}
    budget = target * len(bits)
    while sum(bits.values()) < budget - 1e-9:
        best, best_gain = None, -1e30
        for key, b in bits.items():
            up = [c for c in cands if c > b]
            if not up:
                continue
            nb = up[0]
            if sum(bits.values()) + (nb - b) > budget + 1e-9:
                continue
            gain = (sens[(key[0], key[1], b)] - sens[(key[0], key[1], nb)]) / (nb - b)
            if gain > best_gain:
                best, best_gain = (key, nb), gain
        if best is None:
            break
        bits[best[0]] = best[1]
    per_layer = {l: (bits[(l, "k")], bits[(l, "v")]) for l in layers}
    return per_layer, sens, base


def main():
    ap = argparse.ArgumentParser(description="per-layer KV bit-width calibration")
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--chars", type=int, default=60000)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the text used")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--candidates", default="2,3,4")
    ap.add_argument("--target-bits", type=float, default=3.0, help="average code bits per K/V element over quantized layers")
    ap.add_argument("--boundary", default="2,2", help="first,last layers kept bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="calibrated.yaml")
    ap.add_argument("--json", default="")
    ap.add_argument("--presets", default="", help="also measure these presets (with and without boundary layers)")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    sim = Simulator(a.model, a.device, dtype)
    text = open(a.text, encoding="utf-8").read()[: a.chars]
    ids = sim.tok(text, add_special_tokens=False)["input_ids"][: a.tokens]
    log(f"model {a.model}: {sim.num_layers} layers, hd {sim.head_dim}, {sim.num_kv_heads} kv heads; {len(ids)} tokens")
    boundary = tuple(int(x) for x in a.boundary.split(","))
    report = {"model": a.model, "tokens": len(ids), "window": a.window, "device": a.device}
    if torch.cuda.is_available() and a.device == "cuda":
        report["card"] = torch.cuda.get_device_name(0)

    def ppl_of(cfg):
        sim.set_config(cfg)
        return math.exp(sim.nll(ids, a.window))

    report["ppl_bf16"] = ppl_of(None)
    if a.presets:
        rows = {}
        for name in a.presets.split(","):
            cfg = load_config(name)
            rows[name] = {"with_boundary": ppl_of(cfg)}
            d = cfg_to_nobound(cfg)
            rows[name]["no_boundary"] = ppl_of(d)
            log(f"preset {name:10s} ppl {rows[name]['with_boundary']:.4f} (boundary) "
                f"{rows[name]['no_boundary']:.4f} (all layers)  bf16 {report['ppl_bf16']:.4f}")
        report["presets"] = rows
    if not a.no_calibrate:
        cands = [int(x) for x in a.candidates.split(",")]
        per_layer, sens, base = calibrate(sim, ids, a.window, cands, a.target_bits, boundary, a.seed, log)
        name = os.path.splitext(os.path.basename(a.out))[0]
        d = config_dict(per_layer, boundary, a.seed, name)
        import yaml
        with open(a.out, "w") as f:
            f.write(f"# Calibrated per-layer K/V bit widths (scripts/calibrate.py) for {os.path.basename(a.model)};\n"
                    f"# target {a.target_bits} average code bits over quantized layers, boundary {boundary}.\n")
            yaml.safe_dump(d, f, sort_keys=False)
        cal = load_config(a.out)
        report["calibrated"] = {"path": a.out, "ppl": ppl_of(cal),
                                "avg_bits": sum(kb + vb for kb, vb in per_layer.values()) / (2 * len(per_layer))}
        if float(a.target_bits).is_integer():
            report["uniform_equal_bytes"] = {"bits": int(a.target_bits),
                                             "ppl": ppl_of(uniform_config(int(a.target_bits), boundary, a.seed))}
        report["sensitivity"] = {f"{l}.{r}{b}": v for (l, r, b), v in sens.items()}
        log(f"calibrated ({report['calibrated']['avg_bits']:.2f} bits): ppl {report['calibrated']['ppl']:.4f}"
            + (f" vs uniform {report['uniform_equal_bytes']['bits']} bits: {report['uniform_equal_bytes']['ppl']:.4f}"
               if "uniform_equal_bytes" in report else "") + f"; bf16 {report['ppl_bf16']:.4f}; wrote {a.out}")
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)


def cfg_to_nobound(cfg: TQConfig) -> TQConfig:
    """The same config with boundary protection switched off (all layers quantized)."""
    import dataclasses
    return dataclasses.replace(cfg, boundary_first=0, boundary_last=0) if hasattr(cfg, "boundary_first") else cfg


if __name__ == "__main__":
    main()
