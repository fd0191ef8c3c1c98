#!/usr/bin/env python3
"""Render the measured-results tables from the JSON summaries in results/.

    python scripts/make_tables.py           # rewrite the generated parts of docs/RESULTS.md and README.md
    python scripts/make_tables.py --check   # exit 1 if either file differs from what the JSON gives

The generated part of a file lies between `<!-- BEGIN generated -->` and `<!-- END generated -->`
(the README's model list between `<!-- BEGIN generated models -->` and `<!-- END generated models -->`);
the text around it is kept. Every table names its card, date, commit and the command that produced it.
Ratios are printed only between numbers measured on one card in one run.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- BEGIN generated -->", "<!-- END generated -->"
MODELS_BEGIN, MODELS_END = "<!-- BEGIN generated models -->", "<!-- END generated models -->"

COMMON = ("card", "date", "commit", "command")
REQUIRED = {
    "kernels": ("bench", "codec", "h_q", "h_kv", "head_dim", "batch", "context", "ours_us",
                "flashinfer_bf16_us", "flashinfer_fp8_us", "packed_bytes", "copy_gbps") + COMMON,
    "quality": ("model", "config", "metric", "length", "mean", "spread", "n", "bf16_mean", "path") + COMMON,
    "serving": ("workload", "config", "backend", "kv_dtype", "clients", "isl", "osl", "output_tok_s", "spread",
                "reps", "ttft_p50_ms", "tpot_p99_ms", "max_total_num_tokens") + COMMON,
    "capacity": ("model", "config", "backend", "max_total_num_tokens") + COMMON,
    "simulation": ("model", "config", "window", "centering", "protected_layers", "first_token", "metric", "mean",
                   "spread", "n",
                   "bf16_mean", "delta_pct", "delta_spread", "bytes_per_token", "bf16_bytes_per_token", "path")
    + COMMON,
    "fp8_scales": ("storage", "data", "rel_err", "seeds") + COMMON,
    "speculative": ("algorithm", "config", "backend", "prompts", "greedy_identical", "accept_len",
                    "bf16_accept_len", "tpot_ms", "bf16_tpot_ms", "batch") + COMMON,
    "before_after": ("change", "point", "bench", "codec", "h_q", "h_kv", "head_dim", "batch", "context", "new_tokens",
                     "before_us", "after_us", "change_pct", "card", "date", "commit_before", "commit_after",
                     "command"),
    "models": ("model", "layout", "config", "served", "graphs_identical", "capacity_ratio", "byte_ratio",
               "quality_metric", "quality_delta") + COMMON,
}
LAYOUTS = ("full", "swa", "swa+sinks", "hybrid-linear")
ALLOWED = {"kernels": {"bench": ("decode", "step", "extend")},
           "quality": {"metric": ("ppl", "needle", "passkey", "asdiv", "greedy_prefix")},
           "simulation": {"first_token": ("exact", "codes")},
           "models": {"layout": LAYOUTS}}
# The README's model families: (family, examples, layout in results/models.json, how TurboQuant serves it,
# where the CPU tests are)
FAMILIES = (
    ("Dense decoders, MHA / GQA", "Llama 3, Qwen2 / 2.5 / 3, Mistral, SmolLM2, Phi-3 (head_dim 96)", "full",
     "one packed pool; head_dim 64, 128, 256 (80 / 96 coded as 128 zero-padded coordinates: CPU-tested only)",
     "tests/test_sglang_backend.py, test_sglang_pool.py"),
    ("Sliding-window layers with attention sinks", "gpt-oss", "swa+sinks",
     "SGLang's hybrid SWA memory (its default for gpt-oss): full and sliding-window layers in their own "
     "packed pools; or one pool with --disable-hybrid-swa-memory",
     "tests/test_sglang_hybrid.py, test_sglang_sliding.py, test_kernels_sliding.py"),
    ("Sliding-window layers", "Gemma 2 / 3, Mistral with a window", "swa",
     "one packed pool (SGLang keeps one pool for these); Gemma 3 GGUFs convert with scripts/gguf_gemma3_to_hf.py",
     "tests/test_sglang_sliding.py, test_kernels_sliding.py, test_gemma3.py (conversion; CPU simulation of "
     "Gemma-3-270M in docs/RESULTS.md)"),
    ("Linear-attention hybrids (Gated DeltaNet)", "Qwen3-Next, Qwen3.5", "hybrid-linear",
     "the attention layers in the packed pool inside SGLang's hybrid pool; the recurrent-state pool is SGLang's",
     "tests/test_sglang_hybrid.py"),
)


class ResultsError(ValueError):
    pass


def load(results: Path) -> Dict[str, List[dict]]:
    """Every summary file, checked: a list of records with the schema's keys and allowed values."""
    data = {}
    for name, keys in REQUIRED.items():
        path = results / f"{name}.json"
        if not path.is_file():
            raise ResultsError(f"{path}: missing (an empty list [] if nothing is measured)")
        try:
            records = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ResultsError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(records, list):
            raise ResultsError(f"{path}: must hold a list of records, got {type(records).__name__}")
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise ResultsError(f"{path}: record {i} must be an object, got {type(rec).__name__}")
            missing = [k for k in keys if k not in rec]
            if missing:
                raise ResultsError(f"{path}: record {i}: missing key(s) {', '.join(missing)}; "
                                   f"required: {', '.join(keys)}")
            for key, allowed in ALLOWED.get(name, {}).items():
                if rec[key] not in allowed:
                    raise ResultsError(f"{path}: record {i}: {key}: {rec[key]!r} is not allowed; "
                                       f"allowed: {', '.join(allowed)}")
        data[name] = records
    return data


def replace_records(path, recs: List[dict], key: Callable[[dict], tuple]) -> List[dict]:
    """Write `recs` into the JSON list at `path` (created if missing); an older record with the same `key`
    is replaced (the published tables hold current numbers only). Returns the whole list."""
    path = Path(path)
    new = {key(r) for r in recs}
    old = json.loads(path.read_text()) if path.exists() else []
    merged = [r for r in old if key(r) not in new] + recs
    path.write_text(json.dumps(merged, indent=1) + "\n")
    return merged


# ----------------------------------------------------------------------------- formatting


def num(x, digits=1) -> str:
    if x is None:
        return "—"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:,.{digits}f}"


def ratio(base, ours) -> str:
    """base / ours as `1.58×` (higher: ours is faster); — when either is missing."""
    return "—" if not base or not ours else f"{base / ours:.2f}×"


def ctx(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def table(header: Sequence[str], rows: Iterable[Sequence[str]], right_from: int = 1,
          right_to: Optional[int] = None) -> List[str]:
    """A Markdown table; columns right_from .. right_to - 1 (numbers) align right."""
    right = range(right_from, len(header) if right_to is None else right_to)
    out = ["| " + " | ".join(header) + " |",
           "| " + " | ".join("---:" if i in right else "---" for i in range(len(header))) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def provenance(rec: dict, commit_key: str = "commit") -> str:
    if commit_key == "commit":
        commit = f"commit `{rec['commit']}`"
    else:
        commit = f"commits `{rec['commit_before']}` → `{rec['commit_after']}`"
    return f"*{rec['card']}, {rec['date']}, {commit}:* `{rec['command']}`"


def groups(records: List[dict], key: Callable[[dict], tuple]) -> List[List[dict]]:
    """Records grouped by key, groups in order of first appearance."""
    out: Dict[tuple, List[dict]] = {}
    for r in records:
        out.setdefault(key(r), []).append(r)
    return list(out.values())


def run_key(r: dict) -> tuple:
    return tuple(r[k] for k in COMMON)


def commands(records: List[dict]) -> str:
    cmds = list(dict.fromkeys(r["command"] for r in records))
    return ("Command: " if len(cmds) == 1 else "Commands: ") + "; ".join(f"`{c}`" for c in cmds) + "."


def shape(r: dict) -> str:
    return f"({r['h_q']}, {r['h_kv']}, {r['head_dim']})"


# ----------------------------------------------------------------------------- sections


def decode_section(recs: List[dict]) -> List[str]:
    out = ["### Decode kernel", "",
           "One layer's decode over a packed cache, µs (medians of CUDA-graph replays), against FlashInfer's decode "
           "over BF16 and FP8 K/V in the same run. A cell reads `ours (FlashInfer BF16's time / ours)`: above 1× "
           "ours is faster. Rows by batch B, columns by context length.", ""]
    for g in groups(recs, lambda r: run_key(r) + (shape(r),)):
        out += [f"(H_q, H_kv, head_dim) = {shape(g[0])}. {provenance(g[0])}.", ""]
        contexts = sorted({r["context"] for r in g})
        by = {(r["codec"], r["batch"], r["context"]): r for r in g}
        rows = []
        for b in sorted({r["batch"] for r in g}):
            for label, key in (("FlashInfer BF16", "flashinfer_bf16_us"), ("FlashInfer FP8", "flashinfer_fp8_us")):
                cells = [next((r for r in g if r["batch"] == b and r["context"] == n), None) for n in contexts]
                rows.append([label, str(b)] + [num(r[key]) if r else "—" for r in cells])
            for codec in sorted({r["codec"] for r in g}):
                cells = [by.get((codec, b, n)) for n in contexts]
                rows.append([f"**{codec}**", str(b)] + [
                    f"{num(r['ours_us'])} ({ratio(r['flashinfer_bf16_us'], r['ours_us'])})" if r else "—"
                    for r in cells])
        out += table(["kernel", "B"] + [ctx(n) for n in contexts], rows) + [""]
    return out


def step_section(recs: List[dict]) -> List[str]:
    out = ["### Decode step per layer", "",
           "What a server's decode graph pays per layer: compress-and-store of the new token plus decode, "
           "`layers` layers captured in one CUDA graph, µs per layer, against BF16 and FP8 K/V stored by SGLang "
           "and read by FlashInfer.", ""]
    for g in groups(recs, lambda r: run_key(r) + (shape(r),)):
        r0 = g[0]
        out += [f"{r0['codec']}, {shape(r0)}, {r0.get('layers', '—')} layers, {r0.get('window', 0)}-token window. "
                f"{provenance(r0)}.", ""]
        rows = [[str(r["batch"]), ctx(r["context"]), num(r["ours_us"]), num(r["flashinfer_bf16_us"]),
                 num(r["flashinfer_fp8_us"]), ratio(r["flashinfer_bf16_us"], r["ours_us"])]
                for r in sorted(g, key=lambda r: (r["batch"], r["context"]))]
        out += table(["B", "context", "ours", "BF16 (FlashInfer)", "FP8 (FlashInfer)", "× BF16"], rows) + [""]
    return out


def extend_section(recs: List[dict]) -> List[str]:
    out = ["### Extend over a packed prefix", "",
           "New tokens attending to a cached, packed prefix plus themselves (chunked-prefill continuations, radix-cache "
           "hits), one layer, µs. *hybrid*: FlashInfer's ragged prefill computes the new tokens' part and the "
           "TurboQuant kernel the prefix's (the server does that from 8,192 new tokens on). Baseline: SGLang's Triton "
           "extend over BF16 K/V.", ""]
    for g in groups(recs, lambda r: run_key(r) + (shape(r),)):
        out += [f"{shape(g[0])}. {provenance(g[0])}.", ""]
        rows = []
        for r in sorted(g, key=lambda r: (r["codec"], r["context"], r["new_tokens"], r["batch"])):
            served = r["ours_us"] if r["new_tokens"] < 8192 or not r.get("hybrid_us") else r["hybrid_us"]
            rows.append([r["codec"], str(r["batch"]), ctx(r["context"]), str(r["new_tokens"]), num(r["ours_us"]),
                         num(r.get("hybrid_us")), num(r.get("sglang_triton_us")),
                         ratio(r.get("sglang_triton_us"), served)])
        out += table(["codec", "sequences", "prefix", "new tokens", "ours", "hybrid", "SGLang Triton BF16",
                      "× BF16 (as served)"], rows) + [""]
    return out


def quality_section(recs: List[dict]) -> List[str]:
    out = ["## Quality", ""]
    ppl = [r for r in recs if r["metric"] == "ppl"]
    if ppl:
        out += ["Perplexity of a real SGLang server's input logprobs with the whole text in one request; BF16 is the "
                "same model on SGLang's BF16 KV cache in the same run. The *path* says how the scored tokens "
                "reached attention.", ""]
        for g in groups(ppl, lambda r: (r["model"], r.get("text"), r["path"])):
            out += [f"{g[0]['model']}, {g[0].get('text', '')}; path: {g[0]['path']}.", ""]
            rows = [[f"`{r['config']}`", num(r["mean"], 4), num(r["bf16_mean"], 4),
                     f"{(r['mean'] / r['bf16_mean'] - 1) * 100:+.2f} %", r["card"], r["date"], f"`{r['commit']}`"]
                    for r in g]
            out += table(["config", "perplexity", "BF16", "vs BF16", "card", "date", "commit"], rows, 1, 4)
            out += ["", commands(g), ""]
    other = [r for r in recs if r["metric"] != "ppl"]
    if other:
        out += ["Task accuracy (fraction correct; n trials or problems; BF16 in the same run):", ""]
        rows = [[f"`{r['config']}`", r["metric"], r.get("text") or "—", str(r["length"] or "—"), str(r["n"]),
                 num(r["mean"], 3), num(r["bf16_mean"], 3), r["card"], r["date"], f"`{r['commit']}`"] for r in other]
        out += table(["config", "metric", "data", "tokens", "n", "ours", "BF16", "card", "date", "commit"], rows,
                     3, 7)
        out += ["", commands(other), ""]
    return out


SERVING_WORKLOADS = {
    "a": "long prompts", "b": "capacity-bound long generation: output tok/s over a steady-state window",
    "c": "multi-turn chat over a shared document (radix-cache hits)", "d": "short and light",
    "b_sweep": "capacity-bound generation at several client counts: steady-state window",
}


def serving_run(r: dict) -> tuple:
    """The records of one run: same card (and GPU, where recorded), date and commit."""
    return (r["card"], r.get("gpu_uuid"), r["date"], r["commit"])


def serving_point(r: dict) -> tuple:
    return (r["workload"], r["isl"], r["osl"], r["clients"])


def serving_reference(r: dict, recs: List[dict]) -> Optional[dict]:
    """BF16 `fa3` of the same run and point, if it was measured."""
    return next((b for b in recs if serving_run(b) == serving_run(r) and serving_point(b) == serving_point(r)
                 and b["backend"] == "fa3" and b["kv_dtype"] == "bf16" and b["output_tok_s"]), None)


def serving_best_fp8(r: dict, recs: List[dict]) -> Optional[dict]:
    """The fastest FP8-KV baseline of the same run and point."""
    fp8 = [b for b in recs if serving_run(b) == serving_run(r) and serving_point(b) == serving_point(r)
           and b["backend"] != "turboquant" and str(b["kv_dtype"]).startswith("fp8") and b["output_tok_s"]]
    return max(fp8, key=lambda b: b["output_tok_s"], default=None)


def serving_ratio(r: dict, base: Optional[dict]) -> str:
    if not base or not r["output_tok_s"] or base is r:
        return "—"
    return f"{r['output_tok_s'] / base['output_tok_s']:.3f}×"


def serving_section(recs: List[dict]) -> List[str]:
    out = ["## Serving", "",
           "Output tokens per second (median over `reps` repetitions; spread = max − min), TTFT p50, TPOT p50 and p99. "
           "Ratios divide by BF16 `fa3` (SGLang's default backend on Hopper) and by the fastest FP8-KV baseline, "
           "and are printed only where both numbers come from one run on one card (same card, date and commit); "
           "earlier records, whose configs ran on different GPUs at the same time, have none.", ""]
    for g in groups(recs, lambda r: serving_run(r) + (r["workload"],)):
        w = g[0]["workload"]
        out += [f"**{w}**" + (f": {SERVING_WORKLOADS[w]}" if w in SERVING_WORKLOADS else "")
                + f" ({g[0]['card']}, {g[0]['date']}, commit `{g[0]['commit']}`).", ""]
        rows = []
        for r in sorted(g, key=lambda r: (r["isl"], r["osl"], r["clients"], r["backend"] != "turboquant")):
            kv = f"`{r['config']}`" if r["backend"] == "turboquant" else str(r["kv_dtype"]).upper().replace("_", " ")
            tps = num(r["output_tok_s"], 1) if r["output_tok_s"] is not None else (
                "did not start" if r.get("skipped") else "—")
            rows.append([f"{r['isl']} / {r['osl']} / {r['clients']}", kv, r["backend"], tps,
                         num(r["spread"], 1), str(r["reps"]), num(r["ttft_p50_ms"], 1), num(r.get("tpot_p50_ms"), 2),
                         num(r["tpot_p99_ms"], 2),
                         num(r["max_total_num_tokens"]), num(r.get("peak_running_requests")),
                         num(r.get("retractions")), serving_ratio(r, serving_reference(r, recs)),
                         serving_ratio(r, serving_best_fp8(r, recs)), (r.get("skipped") or "")[:120]])
        out += table(["ISL / OSL / clients", "KV cache", "attention backend", "out tok/s", "spread", "reps",
                      "TTFT p50 ms", "TPOT p50 ms", "TPOT p99 ms", "max tokens", "peak running", "retractions",
                      "vs BF16 fa3", "vs best FP8", "note"], rows, 3, 14)
        if w == "b_sweep":
            best = {}
            for r in g:
                if r["output_tok_s"] and r["tpot_p99_ms"] is not None and r["tpot_p99_ms"] <= 50.0:
                    if r["config"] not in best or r["output_tok_s"] > best[r["config"]]["output_tok_s"]:
                        best[r["config"]] = r
            if best:
                out += ["", "Highest output tok/s with TPOT p99 ≤ 50 ms: " + "; ".join(
                    f"`{c}` {num(r['output_tok_s'], 1)} at {r['clients']} clients" for c, r in best.items()) + "."]
        out += ["", commands(g), ""]
    return out


def capacity_section(recs: List[dict]) -> List[str]:
    out = ["## Capacity", "",
           "`max_total_num_tokens` of the KV pool as SGLang sizes it (same model, same `--mem-fraction-static`, "
           "same card model; the pool's size does not depend on timing).", ""]
    for g in groups(recs, lambda r: (r["model"], r["date"])):
        bf16 = [r for r in g if r["config"] == "bf16"]
        rows = [[f"`{r['config']}`" if r["backend"] == "turboquant" else r["config"].upper().replace("_", " "),
                 r["backend"], num(r["max_total_num_tokens"]),
                 ratio(r["max_total_num_tokens"], bf16[0]["max_total_num_tokens"]) if bf16 else "—",
                 r["card"], f"`{r['commit']}`"] for r in g]
        out += [f"{g[0]['model']}, {g[0]['date']}:", ""]
        out += table(["KV cache", "attention backend", "max_total_num_tokens", "vs BF16", "card", "commit"], rows,
                     2, 4)
        out += ["", commands(g), ""]
    return out


def simulation_section(recs: List[dict]) -> List[str]:
    if not recs:
        return []
    out = ["## Key centering and the exact first token (CPU simulation)", "",
           "Perplexity from `scripts/calibrate.py`'s simulator: the model in fp32 on the CPU, K and V of every "
           "quantized layer coded and decoded as the cache stores them, every scored token reading the compressed "
           "cache (window 0: the codecs alone, as a radix-cached prefix or a far-back needle sees them; window 32: "
           "the presets' recent window; first token exact: each sequence's position 0 exact in every quantized "
           "layer, as `first_token: exact` serves it, codes: from the codes like the rest). Key centering: auto = "
           "the means the server measures at start-up with one prefill of `sglang_tq/probe.txt`; k_proj bias "
           "(rotary average) = the earlier `auto`, from the biases alone; calibrated = a means file measured on "
           "the text named. Not a server "
           "measurement. Change = mean over spans of the per-span perplexity ratio − 1, ± its standard deviation "
           "over the spans; bytes are the KV cache per token.", ""]
    for g in groups(recs, lambda r: (r["model"], r["path"], r.get("text"), r["n"], r["commit"], r["command"])):
        out += [f"{g[0]['model']}, {g[0]['n']} spans ({g[0].get('text', '')}); BF16 perplexity "
                f"{num(g[0]['bf16_mean'], 2)}, {num(g[0]['bf16_bytes_per_token'])} B/token.", ""]
        rows = [[f"`{r['config']}`", str(r["window"]), r["centering"],
                 ", ".join(map(str, r["protected_layers"])) or "—", r["first_token"], num(r["mean"], 2),
                 f"{r['delta_pct']:+.2f} % ± {r['delta_spread']:.2f}", num(r["bytes_per_token"])] for r in g]
        out += table(["preset", "window", "key centering", "bf16 layers", "first token", "perplexity", "change",
                      "B/token"], rows, 5)
        out += ["", provenance(g[0]) + ".", ""]
    return out


def fp8_section(recs: List[dict]) -> List[str]:
    if not recs:
        return []
    out = ["## fp8 layers: per-tensor scale", "",
           "`format: fp8` stores a layer in SGLang's own fp8 KV layout (e4m3 of x / scale, one scale per layer and "
           "role: the checkpoint's k_scale / v_scale, else 1.0), which SGLang's Triton kernels read as they are. A "
           "per-token-head scale would need kernels of its own. Relative error of the attention output against exact "
           "attention on synthetic K/V (the data are described in the script), mean over seeds; the "
           "\"SGLang decode / extend\" rows also round what those kernels round to e4m3.", ""]
    for g in groups(recs, run_key):
        kinds = list(dict.fromkeys(r["data"] for r in g))
        rows = [[name] + [num(next(r["rel_err"] for r in g if r["storage"] == name and r["data"] == kd), 3)
                          for kd in kinds] for name in dict.fromkeys(r["storage"] for r in g)]
        out += table(["K/V storage"] + kinds, rows) + ["", f"{g[0]['seeds']} seeds. " + provenance(g[0]) + ".", ""]
    return out


SPECULATIVE_HEADER = ["batch", "KV cache", "greedy identical (NGRAM on vs off)", "accept length", "vs BF16",
                      "TPOT ms, NGRAM", "BF16 TPOT ms, NGRAM", "vs BF16", "TPOT ms, off", "BF16 TPOT ms, off",
                      "out tok/s, NGRAM", "BF16 out tok/s, NGRAM"]


def speculative_section(recs: List[dict]) -> List[str]:
    out = ["## Speculative decoding (NGRAM)", "",
           "Servers one at a time on one card: TurboQuant and BF16 KV (the BF16 backend named below), each with NGRAM "
           "off and on, the same prompts. Greedy identical: prompts whose greedy tokens are the same with NGRAM on and "
           "off (batch-1 runs; in brackets the same for BF16). Accept length: SGLang's average tokens per verify "
           "step; \"vs BF16\" = ours / BF16's. TPOT p50 per request; \"vs BF16\" = our TPOT / BF16's with NGRAM on "
           "(below 1: faster).", ""]
    if not recs:
        return out + table(SPECULATIVE_HEADER, [["not measured yet"] + ["—"] * (len(SPECULATIVE_HEADER) - 1)], 3) + [""]
    for g in groups(recs, run_key):
        r0 = g[0]
        out += [f"**{r0.get('workload', r0['algorithm'])}**, {r0['prompts']} prompts, "
                f"{r0.get('draft_tokens', '—')} draft tokens, BF16 on `{r0.get('bf16_backend', '—')}`.", ""]
        rows = []
        for r in sorted(g, key=lambda r: r["batch"]):
            same = "—" if r["greedy_identical"] is None else (
                f"{r['greedy_identical']} / {r['prompts']}" + (f" ({r['bf16_greedy_identical']} / {r['prompts']})"
                                                             if r.get("bf16_greedy_identical") is not None else ""))
            acc = "—" if not (r["accept_len"] and r["bf16_accept_len"]) else f"{r['accept_len'] / r['bf16_accept_len']:.3f}"
            tp = "—" if not (r["tpot_ms"] and r["bf16_tpot_ms"]) else f"{r['tpot_ms'] / r['bf16_tpot_ms']:.2f}×"
            rows.append([str(r["batch"]), f"`{r['config']}`", same, num(r["accept_len"], 2) + " / " + num(
                r["bf16_accept_len"], 2), acc, num(r["tpot_ms"], 2), num(r["bf16_tpot_ms"], 2), tp,
                num(r.get("tpot_off_ms"), 2), num(r.get("bf16_tpot_off_ms"), 2), num(r.get("tok_s"), 1),
                num(r.get("bf16_tok_s"), 1)])
        out += table(SPECULATIVE_HEADER, rows, 3)
        load = r0.get("load")
        if load:
            out += ["", f"Load test with NGRAM on (`{r0['config']}`, scripts/load_test.py): {load.get('requests')} "
                        f"requests, {load.get('failed')} failed, {load.get('aborted')} aborted on purpose, "
                        f"{load.get('idle_tokens_after_flush')} tokens held when idle, "
                        f"{load.get('retractions_in_log')} retractions, "
                        f"{'passed' if load.get('pass') else 'FAILED'}."]
        out += ["", provenance(r0) + ".", ""]
    return out


def before_after_section(recs: List[dict]) -> List[str]:
    if not recs:
        return []
    out = ["## Kernel changes, before/after", "",
           "The same points timed on one card in one run before and after a change, µs (median of the runs); "
           "change = after / before − 1 (negative: faster).", ""]
    for g in groups(recs, lambda r: (r["change"], r["card"], r["date"], r["commit_before"], r["commit_after"],
                                     r["command"])):
        out += [f"**{g[0]['change']}** — " + provenance(g[0], commit_key="before_after") + ".", ""]
        rows = [[r["point"], r["bench"], r["codec"], shape(r), str(r["batch"]), ctx(r["context"]),
                 str(r["new_tokens"] if r["new_tokens"] is not None else "—"), num(r["before_us"]),
                 num(r["after_us"]), f"{r['change_pct']:+.1f} %"] for r in g]
        out += table(["point", "bench", "codec", "shape", "B", "context", "new tokens", "before", "after", "change"],
                     rows, right_from=4) + [""]
    return out


def _graphs(r: dict) -> str:
    g = r["graphs_identical"]
    return "—" if g is None else ("identical" if g else "differ") + (f" ({r['graphs_detail']})" if r.get("graphs_detail") else "")


def _capacity(r: dict) -> str:
    if r["capacity_ratio"] is None:
        return "—"
    want = r.get("expected_ratio") or r["byte_ratio"]
    return f"{r['capacity_ratio']:.3f}× (bytes {r['byte_ratio']:.3f}×, {(r['capacity_ratio'] / want - 1) * 100:+.2f} %)"


def models_section(recs: List[dict]) -> List[str]:
    out = ["## Model shapes in real servers", "",
           "`scripts/gpu_models.sh`: config-only model folders (`scripts/make_model_configs.py`, "
           "`--load-format dummy`), BF16 (SGLang's triton backend) and TurboQuant servers on one card. Capacity: "
           "`max_total_num_tokens` over BF16's at the same `--mem-fraction-static` (with hybrid SWA memory: the "
           "full-attention pool's tokens), against the config's byte ratio for the layout (in brackets: the "
           "difference to that ratio with the recent window's ring taken out of the pool).", ""]
    if not recs:
        return out + ["Not yet measured on a GPU.", ""]
    rows = [[r["model"], r["layout"], r.get("memory", "—"), f"`{r['config']}`", "yes" if r["served"] else "no",
             _graphs(r), _capacity(r), num(r["quality_delta"], 4), r["card"], r["date"], f"`{r['commit']}`"]
            for r in recs]
    out += table(["model", "layout", "KV memory", "config", "served", "CUDA graphs on / off", "capacity vs BF16",
                  "quality Δ", "card", "date", "commit"], rows, 7, 8)
    metrics = list(dict.fromkeys(r["quality_metric"] for r in recs))
    return out + ["", "Quality Δ: " + "; ".join(metrics) + ".", "", commands(recs), ""]


def readme_models(data: Dict[str, List[dict]]) -> str:
    """The README's model families and what was run on each, from results/models.json (and, for dense models,
    the capacity and quality records)."""
    rows = []
    for family, examples, layout, how, cpu_tests in FAMILIES:
        recs = [r for r in data["models"] if r["layout"] == layout]
        gpu = [f"{r['model']} ({r.get('memory', r['layout'])}): "
               + ("served" if r["served"] else "did not serve")
               + (f", CUDA graphs on/off {_graphs(r)}" if r["graphs_identical"] is not None else "")
               + (f", capacity {_capacity(r)}" if r["capacity_ratio"] is not None else "")
               + f"; {r['card']}, {r['date']}" for r in recs]
        if layout == "full":
            cap, ppl = _find(data["capacity"], config="turbo4"), _find(data["quality"], config="turbo4", metric="ppl")
            if cap:
                gpu.append(f"{cap['model']}: capacity measured; {cap['card'].split(' (')[0]}, {cap['date']}")
            if ppl:
                gpu.append(f"{ppl['model']}: perplexity measured; {ppl['card'].split(' (')[0]}, {ppl['date']}")
        rows.append([family, examples, how, "<br>".join(gpu) or "not yet measured on a GPU", cpu_tests])
    lines = table(["family", "e.g.", "served as", "run on a GPU", "CPU tests"], rows, 0, 0)
    return "\n".join(lines) + "\n"


def results_md(data: Dict[str, List[dict]]) -> str:
    k = data["kernels"]
    lines = ["## Kernels", ""]
    lines += decode_section([r for r in k if r["bench"] == "decode"])
    lines += step_section([r for r in k if r["bench"] == "step"])
    lines += extend_section([r for r in k if r["bench"] == "extend"])
    lines += quality_section(data["quality"])
    lines += simulation_section(data["simulation"])
    lines += serving_section(data["serving"])
    lines += capacity_section(data["capacity"])

    lines += models_section(data["models"])
    lines += speculative_section(data["speculative"])
    lines += fp8_section(data["fp8_scales"])
    lines += before_after_section(data["before_after"])
    return "\n".join(lines).rstrip() + "\n"


def _find(records: List[dict], **match) -> Optional[dict]:
    for r in records:
        if all(r.get(key) == value for key, value in match.items()):
            return r
    return None


def readme_summary(data: Dict[str, List[dict]]) -> str:
    """A few headline rows for the README; each names its card and links to the full table."""
    rows = []
    k = data["kernels"]
    for b, c in ((32, 32768), (1, 1024)):
        r = _find(k, bench="decode", codec="K4V4", head_dim=128, h_q=32, batch=b, context=c)
        if r:
            rows.append([f"decode, K4V4, (32, 8, 128), B={b}, {ctx(c)} context",
                         f"{num(r['ours_us'])} µs vs FlashInfer BF16 {num(r['flashinfer_bf16_us'])} µs "
                         f"({ratio(r['flashinfer_bf16_us'], r['ours_us'])}), FP8 {num(r['flashinfer_fp8_us'])} µs "
                         f"({ratio(r['flashinfer_fp8_us'], r['ours_us'])})", r["card"]])
    r = _find(k, bench="step", batch=64, context=16384)
    if r:
        rows.append(["decode step per layer, K4V4 + window, B=64, 16K",
                     f"{num(r['ours_us'])} µs vs BF16 {num(r['flashinfer_bf16_us'])} µs "
                     f"({ratio(r['flashinfer_bf16_us'], r['ours_us'])})", r["card"]])
    r = _find(k, bench="extend", codec="K4V4", context=16384, new_tokens=32, batch=1)
    if r:
        rows.append(["extend, 32 new tokens over a 16K packed prefix, K4V4",
                     f"{num(r['ours_us'])} µs vs SGLang Triton BF16 {num(r['sglang_triton_us'])} µs "
                     f"({ratio(r['sglang_triton_us'], r['ours_us'])})", r["card"]])
    for cfg in ("turbo4", "turbo3"):
        r = _find(data["quality"], config=cfg, metric="ppl")
        if r:
            rows.append([f"SmolLM2-135M perplexity, `{cfg}`",
                         f"{num(r['mean'], 4)} vs BF16 {num(r['bf16_mean'], 4)} "
                         f"({(r['mean'] / r['bf16_mean'] - 1) * 100:+.2f} %)", r["card"]])
    tq, bf = _find(data["capacity"], config="turbo4"), _find(data["capacity"], config="bf16")
    if tq and bf:
        rows.append(["KV pool capacity, Llama-3-8B shape, `turbo4`",
                     f"{num(tq['max_total_num_tokens'])} vs BF16 {num(bf['max_total_num_tokens'])} tokens "
                     f"({ratio(tq['max_total_num_tokens'], bf['max_total_num_tokens'])})", tq["card"].split(" (")[0]])
    tq = [r for r in data["serving"] if r["config"] == "turbo4" and r["isl"] == 16384 and r["clients"] == 64
          and r["output_tok_s"]]
    with_ref = [r for r in tq if serving_reference(r, data["serving"])]
    r = (with_ref or tq or [None])[-1]
    if r:
        ref = serving_reference(r, data["serving"])
        rows.append(["serving, 8B shape, ISL 16K / OSL 512 / 64 clients, `turbo4`",
                     f"{num(r['output_tok_s'], 1)} output tok/s " + (
                         f"({serving_ratio(r, ref)} BF16 fa3 on the same card)" if ref
                         else "(no same-card BF16 fa3 baseline yet)"), r["card"]])
    lines = table(["what", "measured", "card"], rows, 0, 0)
    lines += ["", "Dates, commits, commands and every other point: [docs/RESULTS.md](docs/RESULTS.md)."]
    return "\n".join(lines) + "\n"


def splice(text: str, generated: str, path: Path, begin: str = BEGIN, end: str = END) -> str:
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise ResultsError(f"{path}: needs exactly one {begin} followed by one {end}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{generated}{end}{tail}"


def targets(root: Path, data: Dict[str, List[dict]]):
    """(path, [(generated text, begin marker, end marker)]) of every generated file."""
    return [(root / "docs" / "RESULTS.md", [(results_md(data), BEGIN, END)]),
            (root / "README.md", [(readme_summary(data), BEGIN, END), (readme_models(data), MODELS_BEGIN, MODELS_END)])]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="fail if a file differs from what the JSON gives")
    ap.add_argument("--root", type=Path, default=ROOT, help="repository root (default: this checkout)")
    args = ap.parse_args(argv)
    try:
        data = load(args.root / "results")
        stale = []
        for path, parts in targets(args.root, data):
            text = path.read_text()
            new = text
            for generated, begin, end in parts:
                new = splice(new, generated, path, begin, end)
            if new == text:
                continue
            if args.check:
                stale.append(str(path))
            else:
                path.write_text(new)
                print(f"wrote {path}")
    except ResultsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if stale:
        print("out of date (run python scripts/make_tables.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
