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

Key centering (--center): per-(layer, KV head) means of the post-RoPE keys are measured with exact
attention on text *other* than the evaluation text (--means-text FILE, default: the --text file from
character --chars onward), saved (--key-means-out, default <out stem>_key_means.safetensors, .pt
without safetensors) and written into the calibrated YAML as `key_means:`; the sensitivity sweep then
probes centered keys, and PPL is reported with and without centering for the calibrated plan and for
every --presets entry. The simulator centers whenever a config has key_means: it quantizes k - mu
and adds mu back (the same attention as the server's centered cache, by softmax invariance);
`key_means: auto` uses the means the server measures at start-up on its probe text (sglang_tq.key_means).

Server agreement (--variants): perplexity of preset variants on the spans that
`eval_quality.py ppl --text DIR --spans N --span-tokens T` sends to a server, each span one request
whose every scored token reads the compressed cache -- the server's `evaluation: {prefill_from_cache:
true}`; --write-configs writes the YAMLs to serve (add that evaluation key). Where the two may differ:
arithmetic (here fp32 on CPU, bf16 with --device cuda; the server bf16 with fp16 code scales), and
the recent window inside an evaluation prefill (here query i reads key j exactly when i - j < W, as
decode does). The exact first token (`first_token: exact`, the presets' default) is simulated too: each
sequence's position 0 keeps its exact K/V in every quantized layer, as the server's first-token table
serves it (--first-token for the probes and the written YAML; variant option first=exact|codes).

  python scripts/calibrate.py --model DIR --text A.txt --means-text B.txt --key-means-out m.safetensors \
      --no-calibrate --eval-texts austen/ --spans 4 --span-tokens 512 \
      --variants turbo4:w=0:center=none,turbo4:w=0:center=auto,turbo4:w=0:center=calibrated:protect=2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sglang_tq.config import (FIRST_TOKEN_CHOICES, FIRST_TOKEN_EXACT, KEY_MEANS_AUTO, TQConfig,  # noqa: E402
                              load_config, presets_dir)
from sglang_tq.key_means import probe_token_ids  # noqa: E402
from tq_kernels.codec import ROLE_K, ROLE_V, TQCodec, VecFormat  # noqa: E402


def recent_window_attention(module, query, exact, coded, recent, mask=None):
    """Causal attention where query i sees key j exact when i - j < recent and as the cache's codes
    give it back otherwise (the server's recent window; query [B, H_q, T, d], K/V [B, H_kv, T, d]).
    mask: transformers' boolean [B, 1, T, T] (True = attend; a sliding-window layer's band), None = causal."""
    (k, v), (kq, vq) = exact, coded
    g = query.shape[1] // k.shape[1]
    rep = lambda x: x.repeat_interleave(g, dim=1)  # noqa: E731
    t = query.shape[2]
    i = torch.arange(t, device=query.device)[:, None]
    j = torch.arange(t, device=query.device)[None, :]
    near = (i - j < recent) & (j <= i)
    allowed = j <= i if mask is None else mask[..., -t:, -t:]
    s = torch.where(near, query @ rep(k).transpose(-1, -2), query @ rep(kq).transpose(-1, -2)) * module.scaling
    p = torch.softmax(s.float().masked_fill(~allowed, float("-inf")), -1).to(query.dtype)
    out = (p * near) @ rep(v) + (p * ~near) @ rep(vq)
    return out.transpose(1, 2).contiguous(), None


class Simulator:
    """Holds a model whose attention reads K/V through the codecs of `self.plan` (None = exact)."""

    def __init__(self, model_path, device, dtype):
        from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.layer_codecs = {}  # layer -> (K codec or None, V codec or None); absent = exact
        self.recent = 0         # recent window: key j exact for query i when i - j < recent (config `window:`)
        self.layer_means = {}   # layer -> fp32 [H_kv, d] key-centering mean on the device; absent = none
        self.first_exact = False  # position 0 exact in every quantized layer (config `first_token: exact`)
        self.collect = None     # while measuring means: layer -> [sum over tokens [H_kv, d], token count]
        sim = self

        def tq_attention(module, query, key, value, attention_mask, **kwargs):
            layer = getattr(module, "layer_idx", None)
            if sim.collect is not None and layer is not None:  # key: [B, H_kv, T, d], post-RoPE
                acc = sim.collect.setdefault(layer, [0.0, 0, 0.0])
                kf = key.float()
                acc[0] = acc[0] + kf.sum(dim=(0, 2))             # [H_kv, d]
                acc[1] += key.shape[0] * key.shape[2]
                acc[2] = acc[2] + kf.square().sum(dim=(0, 2, 3))  # [H_kv]: for |mu| / rms
            if layer in sim.layer_codecs:
                exact_k, exact_v = key, value
                kc, vc = sim.layer_codecs[layer]
                if kc is not None:
                    mu = sim.layer_means.get(layer)
                    if mu is None:
                        key = kc.decode(*kc.encode(key.float())).to(key.dtype)
                    else:  # centered: quantize k - mu, attention sees k_hat + mu (= server by invariance)
                        mu = mu[None, :, None, :]
                        key = (kc.decode(*kc.encode(key.float() - mu)) + mu).to(key.dtype)
                if vc is not None:
                    value = vc.decode(*vc.encode(value.float())).to(value.dtype)
                if sim.first_exact:  # the server's first-token table: the sequence's position 0 exact
                    key, value = key.clone(), value.clone()
                    key[:, :, 0], value[:, :, 0] = exact_k[:, :, 0], exact_v[:, :, 0]
                if sim.recent > 0:  # the server's recent window: the last `recent` positions exact
                    return recent_window_attention(module, query, (exact_k, exact_v), (key, value), sim.recent,
                                                   attention_mask)
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register("tq_sim", tq_attention)
        # the masks SDPA gets (a sliding-window layer's band); without this transformers passes none
        AttentionMaskInterface.register("tq_sim", sdpa_mask)
        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, torch_dtype=dtype,
                                                          attn_implementation="tq_sim").to(device).eval()
        cfg = self.model.config
        self.num_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.device = device

    def _means(self, key_means, layers):
        """{layer: device fp32 [H_kv, d]} from a [num_layers, H_kv, d] tensor (None: no centering)."""
        if key_means is None:
            return {}
        t = key_means.to(device=self.device, dtype=torch.float32)
        return {l: t[l].contiguous() for l in layers}

    def set_config(self, cfg, key_means="config"):
        """Quantize as the server would with this config (None = every layer exact). key_means:
        "config" = the config's own key_means (if any); None = no centering; a tensor = these means."""
        plan = None if cfg is None else cfg.resolve(self.num_layers, self.head_dim, num_kv_heads=self.num_kv_heads)
        if plan is not None and isinstance(key_means, str):  # the config's own: a file, `auto` or none
            key_means = self.auto_key_means() if plan.key_means_path == KEY_MEANS_AUTO else plan.key_means
        self.layer_codecs, self.layer_means, self.recent, self.first_exact = {}, {}, 0, False
        if plan is not None:
            self.recent = plan.window_tokens
            self.first_exact = plan.first_token == FIRST_TOKEN_EXACT
            self.layer_codecs = {l: plan.codecs(l) for l in plan.quantized_layers}
            self.layer_means = self._means(key_means, plan.quantized_layers)

    def auto_key_means(self):
        """`key_means: auto` as the server measures it: the mean key of every layer over one prefill of the
        probe text (sglang_tq.key_means)."""
        if not hasattr(self, "_auto_means"):
            rms = getattr(self, "last_key_rms", None)
            ids = probe_token_ids(self.tok)
            self._auto_means = self.key_means(ids, len(ids))
            if rms is not None:  # keep the rms of the means measured on text
                self.last_key_rms = rms
        return self._auto_means

    def set_probe(self, layer, role, bits, seed, key_means=None, recent=0, first_exact=False):
        """Only `role` ('k' or 'v') of `layer` quantized at `bits`, everything else exact (K centered
        with key_means[layer] when given; the last `recent` positions exact, as the server's window;
        first_exact: position 0 exact, as the server's first-token table)."""
        self.recent, self.first_exact = recent, first_exact
        role_id = ROLE_K if role == "k" else ROLE_V
        codec = TQCodec.build(VecFormat(self.head_dim, bits), seed, layer, role_id)
        self.layer_codecs = {layer: (codec, None) if role == "k" else (None, codec)}
        self.layer_means = self._means(key_means, [layer]) if role == "k" else {}

    @torch.no_grad()
    def key_means(self, ids, window, prefix=()):
        """float32 CPU [num_layers, H_kv, d]: mean post-RoPE key of every (layer, KV head) over `ids`
        (exact attention, non-overlapping windows, each after `prefix`, e.g. BOS, whose keys count too, as
        the server centers every position).
        Also sets self.last_key_rms [num_layers, H_kv]."""
        self.set_config(None)
        self.collect = {}
        try:
            for s in range(0, len(ids), window):
                x = torch.tensor(list(prefix) + ids[s:s + window], device=self.device)[None]
                if x.shape[1] < 2:
                    break
                self.model(x)
            if len(self.collect) != self.num_layers:
                raise RuntimeError(f"attention hook saw {len(self.collect)} of {self.num_layers} layers")
            acc = [self.collect[l] for l in range(self.num_layers)]
            self.last_key_rms = torch.stack([(c[2] / c[1]).sqrt() for c in acc]).float().cpu()  # [L, H_kv]
            return torch.stack([c[0] / c[1] for c in acc]).float().cpu()
        finally:
            self.collect = None

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


    @torch.no_grad()
    def reference_logprobs(self, ids, window):
        """log-softmax of the current model's next-token logits per window (bf16 storage: this is the
        reference distribution the KL metric compares against)."""
        out = []
        for s in range(0, len(ids) - 1, window):
            x = torch.tensor(ids[s:s + window], device=self.device)[None]
            if x.shape[1] < 2:
                break
            out.append(torch.log_softmax(self.model(x).logits.float()[0, :-1], -1).to(torch.bfloat16))
        return out

    @torch.no_grad()
    def kl_to(self, ids, window, ref):
        """Mean KL(reference || current) per predicted token over the same windows. Compares whole
        distributions instead of the log-likelihood of one text, so it is far less noisy than a
        perplexity difference of the same token count."""
        total, count = 0.0, 0
        for i, s in enumerate(range(0, len(ids) - 1, window)):
            x = torch.tensor(ids[s:s + window], device=self.device)[None]
            if x.shape[1] < 2:
                break
            lq = torch.log_softmax(self.model(x).logits.float()[0, :-1], -1)
            lp = ref[i].float()
            total += (lp.exp() * (lp - lq)).sum().item()
            count += x.shape[1] - 1
        return total / count


def config_dict(per_layer, boundary, seed, name, recent=0, first_token=FIRST_TOKEN_EXACT):
    """YAML dict with one override per layer; per_layer[l] = (k_bits, v_bits)."""
    first, last = boundary
    return {"name": name, "seed": seed, "boundary": {"first": first, "last": last},
            **({"window": {"tokens": recent}} if recent else {}),
            **({"first_token": first_token} if first_token != FIRST_TOKEN_EXACT else {}),
            "defaults": {"k": {"bits": 4}, "v": {"bits": 4}},
            "overrides": [{"layers": l, "k": {"bits": kb}, "v": {"bits": vb}} for l, (kb, vb) in sorted(per_layer.items())]}


def uniform_config(bits, boundary, seed, recent=0, first_token=FIRST_TOKEN_EXACT):
    first, last = boundary
    return TQConfig.from_dict({"name": f"uniform{bits}", "seed": seed, "boundary": {"first": first, "last": last},
                               **({"window": {"tokens": recent}} if recent else {}),
                               "first_token": first_token,
                               "defaults": {"k": {"bits": bits}, "v": {"bits": bits}}})


def calibrate(sim, ids, window, cands, target, boundary, seed, log, key_means=None, metric="kl", recent=0,
              first_exact=True):
    """Sensitivity of every (layer, role, bits) with only that role of that layer quantized:
    metric 'kl' = mean KL divergence of the next-token distribution from the unquantized model's
    (default: low variance), 'nll' = increase of the text's negative log-likelihood."""
    first, last = boundary
    layers = [l for l in range(sim.num_layers) if first <= l < sim.num_layers - last]
    sim.set_config(None)
    base = sim.nll(ids, window)
    log(f"baseline nll {base:.5f} (ppl {math.exp(base):.4f}); sensitivity metric: {metric}")
    ref = sim.reference_logprobs(ids, window) if metric == "kl" else None
    sens = {}
    t0 = time.time()
    for l in layers:
        for role in ("k", "v"):
            for b in cands:
                sim.set_probe(l, role, b, seed, key_means, recent, first_exact)
                sens[(l, role, b)] = sim.kl_to(ids, window, ref) if metric == "kl" else sim.nll(ids, window) - base
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


def variant_dict(spec: str, worst_layers=(), means_path: str = "") -> dict:
    """Config dict of a variant spec PRESET[:w=N][:center=none|auto|calibrated][:protect=N][:first=exact|codes]:
    the preset with its recent window set to N tokens, its key centering replaced (calibrated = the means
    file measured on probe text), its N worst quantized layers (by |mean|/rms of the probe keys) kept bf16
    and its first token exact or from the codes."""
    import yaml

    name, *opts = spec.split(":")
    d = yaml.safe_load(open(presets_dir() / f"{name}.yaml", encoding="utf-8"))
    d["name"] = spec
    for o in opts:
        k, _, v = o.partition("=")
        if k == "w":
            d["window"] = {**(d.get("window") or {}), "tokens": int(v)}
        elif k == "center" and v in ("none", "auto", "calibrated"):
            d.pop("key_means", None)
            if v == "auto":
                d["key_means"] = KEY_MEANS_AUTO
            elif v == "calibrated":
                if not means_path:
                    raise SystemExit(f"calibrate: variant {spec!r}: center=calibrated needs measured means")
                d["key_means"] = os.path.abspath(means_path)
        elif k == "protect":  # the worst layers the preset quantizes
            b = d.get("boundary") or {}
            first, last = b.get("first", 2), b.get("last", 2)
            quantized = [l for l in worst_layers if first <= l < len(worst_layers) - last]
            d["overrides"] = list(d.get("overrides") or []) + [{"layers": l, "format": "bf16"}
                                                              for l in quantized[: int(v)]]
        elif k == "first" and v in FIRST_TOKEN_CHOICES:
            d["first_token"] = v
        else:
            raise SystemExit(f"calibrate: variant {spec!r}: unknown option {o!r}; allowed: w=N, "
                             f"center=none|auto|calibrated, protect=N, first=exact|codes")
    return d


def span_ppl(sim, spans):
    """Perplexity of every span, each scored as one request (its first token context only): what
    `eval_quality.py ppl --spans` reports from a server whose every scored token reads the cache."""
    per = [math.exp(sim.nll(sp, len(sp))) for sp in spans]
    mean = sum(per) / len(per)
    std = (sum((x - mean) ** 2 for x in per) / (len(per) - 1)) ** 0.5 if len(per) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(per), "max": max(per), "per_span": per}


SIMULATION_PATH = "CPU simulation of the codecs (fp32): every scored token reads the compressed cache"


def simulation_records(report: dict, a, means_label: str) -> list:
    """results/simulation.json records of --variants (scripts/make_tables.py publishes them). change = mean
    over spans of the per-span perplexity ratio - 1, spread = its standard deviation over the spans."""
    import datetime

    import eval_quality as ev

    res = report["variants"]
    bf = res["rows"]["bf16"]
    texts = ", ".join(os.path.basename(f) for f in ev.text_files(a.eval_texts))
    command = "python scripts/calibrate.py " + shlex.join(
        os.path.basename(x) if os.path.isabs(x) else x for x in sys.argv[1:])
    out = []
    for spec, r in res["rows"].items():
        if spec == "bf16":
            continue
        ratios = [x / y - 1 for x, y in zip(r["per_span"], bf["per_span"])]
        mean = sum(ratios) / len(ratios)
        sd = (sum((x - mean) ** 2 for x in ratios) / (len(ratios) - 1)) ** 0.5 if len(ratios) > 1 else 0.0
        out.append({
            "model": a.name or os.path.basename(a.model.rstrip("/")), "config": spec.split(":")[0],
            "window": r["window"],
            "centering": f"calibrated ({means_label})" if r["centering"] == "calibrated" else r["centering"],
            "protected_layers": r["protected"], "first_token": r["first_token"], "metric": "ppl",
            "mean": round(r["mean"], 4), "spread": round(r["std"], 4), "n": len(ratios), "span_tokens": a.span_tokens,
            "bf16_mean": round(bf["mean"], 4), "delta_pct": round(100 * mean, 2), "delta_spread": round(100 * sd, 2),
            "bytes_per_token": r["bytes_per_token"], "bf16_bytes_per_token": r["bf16_bytes_per_token"],
            "path": SIMULATION_PATH,
            "text": f"{a.span_tokens}-token spans of {texts}" + (", each after BOS" if a.bos else ""),
            "card": "CPU (simulation)", "date": datetime.date.today().isoformat(), "commit": ev._git_commit(),
            "command": command})
    return out


def run_variants(sim, a, log, means=None, means_path="", ratio=None):
    """--variants on --eval-texts spans: perplexity (mean, std over spans) and cache bytes per token of
    each variant; the YAMLs go to --write-configs when given (serve them with
    `evaluation: {prefill_from_cache: true}` to compare with the server)."""
    import yaml
    import eval_quality as ev

    spans = ev.text_spans(ev.read_texts(a.eval_texts), a.spans, a.span_tokens,
                          lambda t: sim.tok(t, add_special_tokens=False)["input_ids"])
    if a.bos:  # as `eval_quality.py ppl --bos`: the tokenizer's BOS in front of every span, context only
        pre = sim.tok("", add_special_tokens=True)["input_ids"]
        spans = [pre + sp for sp in spans]
    worst = []
    if ratio is not None:
        worst = sorted(range(len(ratio)), key=lambda l: -ratio[l])
    if means is not None:  # how far the start-up probe's means (key_means: auto) are from these
        auto, rms = sim.auto_key_means(), sim.last_key_rms.clamp_min(1e-30)
        left = [float(((means[l] - auto[l]).norm(dim=-1) / rms[l]).mean()) for l in range(sim.num_layers)]
        log("|measured mean - probe mean| / rms per layer: " + " ".join(f"{r:.2f}" for r in left))
    log(f"{len(spans)} spans of {a.span_tokens} tokens from {a.eval_texts}; same as the server's "
        f"`eval_quality.py ppl --text {a.eval_texts} --spans {a.spans} --span-tokens {a.span_tokens}"
        f"{' --bos' if a.bos else ''}`")
    rows = {}
    sim.set_config(None)
    rows["bf16"] = {**span_ppl(sim, spans), "bytes_per_token": None}
    bf16 = rows["bf16"]["mean"]
    log(f"{'bf16':36s} ppl {bf16:.4f} +- {rows['bf16']['std']:.4f}")
    for spec in a.variants.split(","):
        d = variant_dict(spec, worst, means_path)
        cfg = TQConfig.from_dict(d, f"<variant {spec}>")
        sim.set_config(cfg)
        r = span_ppl(sim, spans)
        plan = cfg.resolve(sim.num_layers, sim.head_dim, num_kv_heads=sim.num_kv_heads)
        r["bytes_per_token"] = plan.bytes_per_token(sim.num_kv_heads)
        r["bf16_bytes_per_token"] = plan.bf16_bytes_per_token(sim.num_kv_heads)
        km = d.get("key_means")
        r["centering"] = "none" if km is None else "auto" if km == KEY_MEANS_AUTO else "calibrated"
        r["window"], r["first_token"] = plan.window_tokens, plan.first_token
        r["protected"] = [o["layers"] for o in d.get("overrides", []) if o.get("format") == "bf16"]
        rows[spec] = r
        log(f"{spec:36s} ppl {r['mean']:.4f} +- {r['std']:.4f} ({(r['mean'] / bf16 - 1) * 100:+.2f} %; spans "
            + " ".join(f"{x:.3f}" for x in r["per_span"]) + f"); {r['bytes_per_token']} B/token"
            + (f"; bf16 layers {r['protected']}" if r["protected"] else ""))
        if a.write_configs:
            os.makedirs(a.write_configs, exist_ok=True)
            with open(os.path.join(a.write_configs, spec.replace(":", "_").replace("=", "") + ".yaml"), "w") as f:
                yaml.safe_dump(d, f, sort_keys=False)
    return {"spans": len(spans), "span_tokens": a.span_tokens, "texts": a.eval_texts, "spread": "std over spans",
            "bos": a.bos, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description="per-layer KV bit-width calibration")
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--chars", type=int, default=60000)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the text used")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--recent", type=int, default=32,
                    help="recent window (config `window: {tokens: N}`) of the probes, the uniform plans and the "
                         "written YAML; presets use their own; 0 = every position from the codes")
    ap.add_argument("--first-token", choices=FIRST_TOKEN_CHOICES, default=FIRST_TOKEN_EXACT,
                    help="config `first_token:` of the probes, the uniform plans and the written YAML; presets use "
                         "their own")
    ap.add_argument("--candidates", default="2,3,4")
    ap.add_argument("--metric", choices=("kl", "nll"), default="kl",
                    help="sensitivity: KL to the unquantized model's next-token distribution, or NLL increase")
    ap.add_argument("--heldout-text", default="", help="also report PPL of bf16 / uniform / calibrated on this text")
    ap.add_argument("--target-bits", type=float, default=3.0, help="average code bits per K/V element over quantized layers")
    ap.add_argument("--boundary", default="2,2", help="first,last layers kept bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="calibrated.yaml")
    ap.add_argument("--json", default="")
    ap.add_argument("--presets", default="", help="also measure these presets (with and without boundary layers)")
    ap.add_argument("--no-calibrate", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--center", action="store_true",
                    help="key centering: measure key means, write key_means: into the YAML, report PPL with/without")
    ap.add_argument("--key-means-out", default="",
                    help="where to save the key means (default: <out stem>_key_means.safetensors); also measures "
                         "them without --center")
    ap.add_argument("--means-text", default="",
                    help="text for the key means (default: the --text file from character --chars onward)")
    ap.add_argument("--means-tokens", type=int, default=0, help="tokens for the key means (default: --tokens)")
    ap.add_argument("--variants", default="",
                    help="comma list of PRESET[:w=N][:center=none|auto|calibrated][:protect=N][:first=exact|codes]: "
                         "perplexity of each "
                         "on --spans spans of --eval-texts, as a server with evaluation.prefill_from_cache reports it")
    ap.add_argument("--eval-texts", default="", help="text file or folder of *.txt for --variants")
    ap.add_argument("--spans", type=int, default=3)
    ap.add_argument("--span-tokens", type=int, default=1024)
    ap.add_argument("--record", default="", help="write --variants as records into this results JSON list "
                    "(results/simulation.json; replaces records of the same model, variant and commit)")
    ap.add_argument("--name", default="", help="model name in the records (default: the --model folder's name)")
    ap.add_argument("--means-label", default="", help="what the key means were measured on, for the records "
                    "(default: the --means-text file's name)")
    ap.add_argument("--write-configs", default="", help="write each variant's YAML into this folder")
    ap.add_argument("--bos", action="store_true", help="the tokenizer's BOS in front of every --variants span (as "
                    "eval_quality.py ppl --bos) and every key-means window; for models that need it, e.g. Gemma")
    a = ap.parse_args()
    log = lambda m: print(m, flush=True)  # noqa: E731
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    sim = Simulator(a.model, a.device, dtype)
    full = open(a.text, encoding="utf-8").read()
    text = full[: a.chars]
    ids = sim.tok(text, add_special_tokens=False)["input_ids"][: a.tokens]
    log(f"model {a.model}: {sim.num_layers} layers, hd {sim.head_dim}, {sim.num_kv_heads} kv heads; {len(ids)} tokens")
    boundary = tuple(int(x) for x in a.boundary.split(","))
    report = {"model": a.model, "tokens": len(ids), "window": a.window, "device": a.device}
    if torch.cuda.is_available() and a.device == "cuda":
        report["card"] = torch.cuda.get_device_name(0)

    def ppl_of(cfg, key_means="config"):
        sim.set_config(cfg, key_means)
        return math.exp(sim.nll(ids, a.window))

    means, means_path = None, ""
    if a.center or a.key_means_out:
        if a.means_text:
            mtext, msrc = open(a.means_text, encoding="utf-8").read()[: a.chars], a.means_text
        else:
            mtext, msrc = full[a.chars: 2 * a.chars], f"{a.text}[{a.chars}:]"
        mids = sim.tok(mtext, add_special_tokens=False)["input_ids"][: a.means_tokens or a.tokens]
        if len(mids) < 64:
            raise SystemExit(f"calibrate: only {len(mids)} tokens of text for the key means ({msrc}); "
                             f"give --means-text FILE (text other than the evaluation text)")
        t0 = time.time()
        means = sim.key_means(mids, a.window, sim.tok("", add_special_tokens=True)["input_ids"] if a.bos else ())
        means_path = save_key_means(means, a.key_means_out or default_means_path(a.out))
        ratio = key_mean_ratio(means, sim.last_key_rms)
        log(f"key means over {len(mids)} tokens of {msrc} ({time.time() - t0:.1f}s) -> {means_path}; "
            f"|mean|/rms per layer: " + " ".join(f"{r:.2f}" for r in ratio))
        report["key_means"] = {"path": means_path, "tokens": len(mids), "text": msrc, "mean_over_rms": ratio}

    if a.variants:
        if not a.eval_texts:
            raise SystemExit("calibrate: --variants needs --eval-texts")
        report["variants"] = run_variants(sim, a, log, means, means_path,
                                          key_mean_ratio(means, sim.last_key_rms) if means is not None else None)
        if a.json:
            json.dump(report, open(a.json, "w"), indent=1)
        if a.record:
            from make_tables import replace_records

            label = a.means_label or (f"{report['key_means']['tokens']} tokens of "
                                      f"{os.path.basename(a.means_text or a.text)}" if "key_means" in report else "")
            replace_records(a.record, simulation_records(report, a, label),
                            lambda r: (r["model"], r["config"], r["window"], r["centering"],
                                       tuple(r["protected_layers"]), r["first_token"], r["text"], r["commit"]))
        if a.no_calibrate and not a.presets:
            return
    report["ppl_bf16"] = ppl_of(None)
    if a.presets:
        rows = {}
        for name in a.presets.split(","):
            cfg = load_config(name)
            rows[name] = {"with_boundary": ppl_of(cfg)}
            d = cfg_to_nobound(cfg)
            rows[name]["no_boundary"] = ppl_of(d)
            line = (f"preset {name:10s} ppl {rows[name]['with_boundary']:.4f} (boundary) "
                    f"{rows[name]['no_boundary']:.4f} (all layers)")
            if a.center:
                rows[name]["with_boundary_centered"] = ppl_of(cfg, means)
                rows[name]["no_boundary_centered"] = ppl_of(d, means)
                line += (f"; centered {rows[name]['with_boundary_centered']:.4f} (boundary) "
                         f"{rows[name]['no_boundary_centered']:.4f} (all layers)")
            log(line + f"  bf16 {report['ppl_bf16']:.4f}")
        report["presets"] = rows
    if not a.no_calibrate:
        cands = [int(x) for x in a.candidates.split(",")]
        per_layer, sens, base = calibrate(sim, ids, a.window, cands, a.target_bits, boundary, a.seed, log,
                                          key_means=means if a.center else None, metric=a.metric, recent=a.recent,
                                          first_exact=a.first_token == FIRST_TOKEN_EXACT)
        report["metric"] = a.metric
        name = os.path.splitext(os.path.basename(a.out))[0]
        d = config_dict(per_layer, boundary, a.seed, name, a.recent, a.first_token)
        if a.center:
            d["key_means"] = os.path.relpath(os.path.abspath(means_path), os.path.dirname(os.path.abspath(a.out)))
        import yaml
        with open(a.out, "w") as f:
            f.write(f"# Calibrated per-layer K/V bit widths (scripts/calibrate.py) for {os.path.basename(a.model)};\n"
                    f"# target {a.target_bits} average code bits over quantized layers, boundary {boundary}.\n")
            yaml.safe_dump(d, f, sort_keys=False)
        cal = load_config(a.out)
        report["calibrated"] = {"path": a.out, "ppl": ppl_of(cal),
                                "avg_bits": sum(kb + vb for kb, vb in per_layer.values()) / (2 * len(per_layer))}
        if a.center:  # the YAML has key_means: ppl above is centered
            report["calibrated"]["ppl_uncentered"] = ppl_of(cal, None)
            log(f"calibrated plan: ppl {report['calibrated']['ppl']:.4f} centered, "
                f"{report['calibrated']['ppl_uncentered']:.4f} uncentered")
        if float(a.target_bits).is_integer():
            uni = uniform_config(int(a.target_bits), boundary, a.seed, a.recent, a.first_token)
            report["uniform_equal_bytes"] = {"bits": int(a.target_bits), "ppl": ppl_of(uni)}
            if a.center:
                report["uniform_equal_bytes"]["ppl_centered"] = ppl_of(uni, means)
        report["sensitivity"] = {f"{l}.{r}{b}": v for (l, r, b), v in sens.items()}
        log(f"calibrated ({report['calibrated']['avg_bits']:.2f} bits): ppl {report['calibrated']['ppl']:.4f}"
            + (f" vs uniform {report['uniform_equal_bytes']['bits']} bits: {report['uniform_equal_bytes']['ppl']:.4f}"
               if "uniform_equal_bytes" in report else "") + f"; bf16 {report['ppl_bf16']:.4f}; wrote {a.out}")
        if a.heldout_text:
            report["heldout"] = heldout(sim, a, boundary, means, log)
    if a.json:
        json.dump(report, open(a.json, "w"), indent=1)


def heldout(sim, a, boundary, means, log):
    """BF16 / uniform / calibrated perplexity on a text the calibration never saw (the honest check)."""
    text = open(a.heldout_text, encoding="utf-8").read()[: a.chars]
    ids = sim.tok(text, add_special_tokens=False)["input_ids"][: a.tokens]
    ppl = lambda cfg, km="config": (sim.set_config(cfg, km), math.exp(sim.nll(ids, a.window)))[1]  # noqa: E731
    out = {"text": a.heldout_text, "tokens": len(ids), "bf16": ppl(None), "calibrated": ppl(load_config(a.out))}
    if float(a.target_bits).is_integer():
        out["uniform"] = ppl(uniform_config(int(a.target_bits), boundary, a.seed, a.recent, a.first_token))
        if a.center:
            out["uniform_centered"] = ppl(uniform_config(int(a.target_bits), boundary, a.seed, a.recent,
                                                         a.first_token), means)
            out["calibrated_uncentered"] = ppl(load_config(a.out), None)
    log("held-out " + ", ".join(f"{k} {v:.4f}" for k, v in out.items() if isinstance(v, float)))
    return out


def default_means_path(out: str) -> str:
    return os.path.splitext(out)[0] + "_key_means.safetensors"


def save_key_means(means: torch.Tensor, path: str) -> str:
    """Save {"key_means": [L, H_kv, d] fp32} as safetensors (or .pt when safetensors is missing or the
    path does not end in .safetensors). Returns the path written."""
    means = means.to(torch.float32).contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            path = path[: -len(".safetensors")] + ".pt"
        else:
            save_file({"key_means": means}, path)
            return path
    torch.save({"key_means": means}, path)
    return path


def key_mean_ratio(means: torch.Tensor, rms: torch.Tensor):
    """Per layer: mean over KV heads of |mu| / rms(k) (how much of the keys centering removes)."""
    return [float((means[l].norm(dim=-1) / rms[l].clamp_min(1e-30)).mean()) for l in range(means.shape[0])]


def cfg_to_nobound(cfg: TQConfig) -> TQConfig:
    """The same config with boundary protection switched off (all layers quantized)."""
    import dataclasses
    return dataclasses.replace(cfg, boundary_first=0, boundary_last=0) if hasattr(cfg, "boundary_first") else cfg


if __name__ == "__main__":
    main()
