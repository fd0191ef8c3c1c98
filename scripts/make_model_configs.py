#!/usr/bin/env python3
"""Config-only model folders with the attention shapes of hybrid models, for servers started with
`--load-format dummy` (no weights are downloaded or stored):

  gpt-oss     gpt-oss-20b's attention: 64 query / 8 KV heads, head_dim 64, layers alternating a 128-token
              sliding window and full attention, attention sinks (GptOssForCausalLM; SGLang serves it with
              hybrid SWA memory unless --disable-hybrid-swa-memory). 4 layers, 8 experts.
  qwen3-next  Qwen3-Next-80B-A3B's attention (the layer design Qwen3.5's text model shares): Gated DeltaNet
              layers and every 4th layer full attention with 16 query / 2 KV heads, head_dim 256
              (Qwen3NextForCausalLM, the text-only architecture of that design SGLang 0.5.10.post1 serves;
              Qwen3.5 itself is served only as a vision-language model). 8 layers (3 and 7 attention),
              16 experts.

Configs come from transformers' config classes (bf16, no quantization_config); fewer layers and experts
than the released models (the attention layers keep their shapes). The tokenizer is copied from
--tokenizer (SmolLM2's, .gpu_tok) and the vocabulary set to its size.

  python scripts/make_model_configs.py --tokenizer .gpu_tok --out /tmp/models gpt-oss qwen3-next
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Dict

CONTEXT = 4096  # max_position_embeddings: the checks use short prompts; keeps SGLang's per-request buffers small


def gpt_oss(vocab_size: int) -> Dict:
    from transformers import GptOssConfig

    cfg = GptOssConfig(num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=4, vocab_size=vocab_size,
                       max_position_embeddings=CONTEXT, sliding_window=128, head_dim=64, num_attention_heads=64,
                       num_key_value_heads=8, hidden_size=2880, intermediate_size=2880,
                       layer_types=["sliding_attention", "full_attention"] * 2)
    return dict(cfg.to_dict(), architectures=["GptOssForCausalLM"])


def qwen3_next(vocab_size: int) -> Dict:
    from transformers import Qwen3NextConfig

    cfg = Qwen3NextConfig(num_hidden_layers=8, num_experts=16, num_experts_per_tok=4, vocab_size=vocab_size,
                          max_position_embeddings=CONTEXT, hidden_size=2048, num_attention_heads=16,
                          num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                          linear_key_head_dim=128, linear_value_head_dim=128, moe_intermediate_size=512,
                          shared_expert_intermediate_size=512, full_attention_interval=4,
                          layer_types=["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3
                          + ["full_attention"])
    return dict(cfg.to_dict(), architectures=["Qwen3NextForCausalLM"])


SHAPES = {"gpt-oss": gpt_oss, "qwen3-next": qwen3_next}


def build(shape: str, out_dir: str, tokenizer_dir: str) -> str:
    """Write `out_dir/<shape>-shape` (config.json + the tokenizer files) and return its path."""
    if shape not in SHAPES:
        raise SystemExit(f"make_model_configs: unknown shape {shape!r}; allowed: {', '.join(SHAPES)}")
    if not os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise SystemExit(f"make_model_configs: {tokenizer_dir} has no tokenizer.json")
    dest = os.path.join(out_dir, f"{shape}-shape")
    os.makedirs(dest, exist_ok=True)
    for f in os.listdir(tokenizer_dir):
        if "token" in f or f == "special_tokens_map.json":
            shutil.copy(os.path.join(tokenizer_dir, f), dest)
    with open(os.path.join(tokenizer_dir, "tokenizer.json")) as f:
        tok = json.load(f)
    vocab = len(tok["model"]["vocab"]) + sum(1 for t in tok.get("added_tokens", []) if t["id"] >= len(tok["model"]["vocab"]))
    cfg = SHAPES[shape](vocab)
    cfg.pop("quantization_config", None)
    cfg.update(dtype="bfloat16", torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2, pad_token_id=None)  # SmolLM2's
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return dest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shapes", nargs="+", choices=sorted(SHAPES))
    ap.add_argument("--tokenizer", default=".gpu_tok", help="folder with tokenizer.json (SmolLM2's)")
    ap.add_argument("--out", default="/tmp/models")
    a = ap.parse_args(argv)
    for shape in a.shapes:
        print(build(shape, a.out, a.tokenizer))


if __name__ == "__main__":
    main()
