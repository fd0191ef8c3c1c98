#!/usr/bin/env python3
"""How far a preset's perplexity moves between equally valid runs (CPU, the calibrate.py simulator).

Two servers that compute the same model in different layouts (TP = 1 vs TP = 2, a request alone vs in
a batch) feed K/V that differ by bf16 rounding into the codec; a value near a codebook boundary then
lands on the other code. This measures the spread that causes: the preset's perplexity (a) under
other rotation seeds and (b) with K and V multiplied by (1 + eps * N(0, 1)) before quantization,
eps = 2^-9 (bf16 rounding size), several draws. A server-to-server difference inside that spread is
the codes' noise, not a layout bug.

    python3 scripts/quant_noise.py [--model DIR] [--text FILE] [--chars 6000] [--preset turbo4] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
from calibrate import Simulator  # noqa: E402

from sglang_tq.config import load_config  # noqa: E402


class Perturbed:
    """A codec whose encode first scales its input by (1 + eps * N(0, 1))."""

    def __init__(self, codec, eps, gen):
        self.codec, self.eps, self.gen = codec, eps, gen

    def encode(self, x):
        return self.codec.encode(x * (1 + self.eps * torch.randn(x.shape, generator=self.gen)))

    def decode(self, *a):
        return self.codec.decode(*a)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/models/SmolLM2-135M-Instruct")
    ap.add_argument("--text", default="../shared/data/austen/prideprejudice.txt")
    ap.add_argument("--chars", type=int, default=6000, help="the server check's text: its first 6,000 characters")
    ap.add_argument("--preset", default="turbo4")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--eps", type=float, default=2 ** -9)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.manual_seed(0)
    sim = Simulator(a.model, "cpu", torch.float32)
    ids = sim.tok(open(a.text, encoding="utf-8").read()[:a.chars])["input_ids"]
    ppl = lambda: math.exp(sim.nll(ids, len(ids)))  # noqa: E731 - one window: every token sees its whole past
    sim.set_config(None)
    exact = ppl()
    res = {"tokens": len(ids), "exact": exact, "seeds": {}, "perturbed": {}, "eps": a.eps}
    print(f"{len(ids)} tokens, exact K/V: {exact:.4f}")
    base = load_config(a.preset)
    for s in range(a.seeds):
        cfg = dataclasses.replace(base, seed=s)
        sim.set_config(cfg)
        res["seeds"][s] = p = ppl()
        print(f"  {a.preset} seed {s}: {p:.4f} ({(p / exact - 1) * 100:+.2f} %)")
    cfg = dataclasses.replace(base, seed=0)
    for n in range(a.draws):
        sim.set_config(cfg)
        g = torch.Generator().manual_seed(n)
        sim.layer_codecs = {l: (Perturbed(kc, a.eps, g), Perturbed(vc, a.eps, g))
                            for l, (kc, vc) in sim.layer_codecs.items()}
        res["perturbed"][n] = p = ppl()
        print(f"  {a.preset} seed 0, K/V x (1 + {a.eps:g} N(0,1)), draw {n}: {p:.4f} ({(p / exact - 1) * 100:+.2f} %)")
    vals = list(res["seeds"].values()) + list(res["perturbed"].values())
    res["spread_pct"] = (max(vals) / min(vals) - 1) * 100
    print(f"spread (max/min - 1) over all runs: {res['spread_pct']:.2f} %")
    if a.out:
        json.dump(res, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
