#!/usr/bin/env python3
"""Convert a gemma3 GGUF (llama.cpp's layout) into a Hugging Face Gemma3ForCausalLM folder.

    python scripts/gguf_gemma3_to_hf.py IN.gguf OUT_DIR

Writes config.json (gemma3_text), generation_config.json, model.safetensors (bf16), tokenizer.json,
tokenizer_config.json (with the Gemma 3 chat template when the GGUF carries none). Needs numpy, torch,
safetensors, tokenizers and the `gguf` package.

What llama.cpp changes on the way in, undone here:
- every RMSNorm weight (input, post-attention, pre-/post-feedforward, q_norm, k_norm, final) is stored
  as (1 + w), because llama.cpp multiplies by the weight while Gemma3RMSNorm multiplies by (1 + w);
- nothing else: gemma3 uses NEOX rope, so q/k rows are not permuted (unlike llama GGUFs), and the
  sqrt(hidden) embedding scale is applied by the model, not stored.
What the GGUF may not say and llama.cpp hard-codes for gemma3 (src/llama-model.cpp): every 6th layer is
full attention, the rest slide (unless gemma3.attention.sliding_window_pattern is present); sliding layers
use rope base 10,000; the query scale is head_dim, except for the 27B (62 layers): hidden / heads.
The tokenizer is SentencePiece BPE: llama.cpp merges the adjacent pair whose joined piece has the best
score, so HF merges are every split of a piece into two pieces, ranked by the joined piece's score.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

SWA_PATTERN = 6            # llama.cpp: hparams.set_swa_pattern(6) for gemma3
SLIDING_ROPE_BASE = 10000.0  # llama.cpp: rope_freq_base_train_swa for gemma3
NORM_SHIFT = 1.0

# Gemma 3's published chat template, text turns only (used when the GGUF has no tokenizer.chat_template)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

LAYER_TENSORS = {  # llama.cpp name inside blk.N -> Hugging Face name inside model.layers.N
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
TOP_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
               "output.weight": "lm_head.weight"}

# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6


def hf_tensor_name(name: str) -> str:
    """The Hugging Face name of a gemma3 GGUF tensor; unknown names are an error, not dropped."""
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}"
    raise ValueError(f"gemma3 GGUF tensor {name!r} has no Hugging Face counterpart "
                     f"(known: {sorted(TOP_TENSORS)} and blk.N.{{{', '.join(sorted(LAYER_TENSORS))}}})")


def hf_weight(name: str, w: np.ndarray) -> np.ndarray:
    """The HF value of a dequantized GGUF tensor: norm weights lose llama.cpp's +1."""
    return w - NORM_SHIFT if name.endswith("norm.weight") else w


def layer_types(n_layers: int, pattern=SWA_PATTERN) -> list[str]:
    """Per-layer attention kind: `pattern` is an int (every pattern-th layer full, llama.cpp's gemma3
    default 6) or GGUF's per-layer list (gemma3.attention.sliding_window_pattern, true = sliding)."""
    if isinstance(pattern, (int, np.integer)):
        if pattern < 1:
            raise ValueError(f"gemma3.attention.sliding_window_pattern {pattern}: must be >= 1")
        sliding = [(i + 1) % int(pattern) != 0 for i in range(n_layers)]
    else:
        sliding = [bool(x) for x in pattern]
        if len(sliding) != n_layers:
            raise ValueError(f"gemma3.attention.sliding_window_pattern has {len(sliding)} entries for "
                             f"{n_layers} layers")
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def hf_config(meta: dict, n_vocab: int, tied: bool) -> dict:
    """config.json for Gemma3ForCausalLM from the GGUF's gemma3.* and tokenizer.* keys."""
    def g(key, default=None):
        v = meta.get(f"gemma3.{key}", default)
        if v is None:
            raise ValueError(f"GGUF key gemma3.{key} missing (needed for config.json)")
        return v

    n_layers, hidden, n_head = int(g("block_count")), int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", hidden // n_head))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ValueError(f"gemma3.attention.value_length {g('attention.value_length')} != key_length {head_dim}")
    full_rope = {"rope_type": "default", "rope_theta": float(g("rope.freq_base", 1000000.0))}
    scaling = meta.get("gemma3.rope.scaling.type")
    if scaling == "linear":
        full_rope = {**full_rope, "rope_type": "linear", "factor": float(g("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"gemma3.rope.scaling.type {scaling!r}: only 'linear' or none is converted")
    tok = lambda k, d=None: meta.get(f"tokenizer.ggml.{k}", d)  # noqa: E731
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": n_vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": int(g("context_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon")),
        "query_pre_attn_scalar": hidden // n_head if n_layers == 62 else head_dim,
        "sliding_window": int(g("attention.sliding_window")),
        "layer_types": layer_types(n_layers, g("attention.sliding_window_pattern", SWA_PATTERN)),
        "rope_parameters": {"full_attention": full_rope,
                            "sliding_attention": {"rope_type": "default", "rope_theta": SLIDING_ROPE_BASE}},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "bos_token_id": int(tok("bos_token_id", 2)),
        "eos_token_id": int(tok("eos_token_id", 1)),
        "pad_token_id": int(tok("padding_token_id", 0)),
        "tie_word_embeddings": tied,
        "use_cache": True,
        "dtype": "bfloat16",
        # the config's format (rope_parameters per layer type); older values make transformers 5 suspect
        # a broken Mistral tokenizer
        "transformers_version": "5.0.0",
    }


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-BPE / llama.cpp's SPM tokenizer: every split of a normal
    piece into two normal pieces, best joined-piece score first (ties: shorter left part, then id order)."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    out = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                out.append((-scores[i], len(left), ids[left], ids[right], left, right))
    out.sort()
    return [(m[4], m[5]) for m in out]


def build_tokenizer(tokens: list[str], scores: list[float], types: list[int], bos_id: int, unk_id: int,
                    add_bos: bool):
    """A `tokenizers.Tokenizer` doing what llama.cpp does with the GGUF's SPM vocabulary: spaces become
    U+2581, BPE with byte fallback, control and user-defined tokens matched whole before BPE."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    if not (len(tokens) == len(scores) == len(types)):
        raise ValueError(f"tokenizer arrays differ in length: {len(tokens)} tokens, {len(scores)} scores, "
                         f"{len(types)} types")
    vocab = {}
    for i, t in enumerate(tokens):
        if t in vocab:
            raise ValueError(f"token {t!r} appears twice in tokenizer.ggml.tokens (ids {vocab[t]} and {i})")
        vocab[t] = i
    tk = Tokenizer(BPE(vocab, spm_merges(tokens, scores, types), unk_token=tokens[unk_id], fuse_unk=True,
                       byte_fallback=True))
    tk.normalizer = normalizers.Replace(" ", "\u2581")
    tk.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tk.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i in range(len(tokens)) if types[i] == USER_DEFINED])
    tk.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                           for i in range(len(tokens)) if types[i] == CONTROL])
    bos = tokens[bos_id]
    if add_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    return tk


def read_gguf(path: str):
    from gguf import GGUFReader
    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF."):
            continue
        meta[k] = f.contents()
    if meta.get("general.architecture") != "gemma3":
        raise ValueError(f"{path}: general.architecture is {meta.get('general.architecture')!r}; "
                         "this converter handles gemma3 only")
    if meta.get("tokenizer.ggml.model") != "llama":
        raise ValueError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
                         "gemma3 GGUFs carry a SentencePiece ('llama') vocabulary")
    return r, meta


def convert(src: str, out: str) -> dict:
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    r, meta = read_gguf(src)
    tokens = list(meta["tokenizer.ggml.tokens"])
    tensors = {}
    for t in r.tensors:
        hf = hf_tensor_name(t.name)
        shape = [int(x) for x in reversed(t.shape)]
        w = hf_weight(t.name, dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape))
        tensors[hf] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    tied = "lm_head.weight" not in tensors
    cfg = hf_config(meta, n_vocab=len(tokens), tied=tied)
    emb = tensors["model.embed_tokens.weight"].shape
    if emb != (cfg["vocab_size"], cfg["hidden_size"]):
        raise ValueError(f"{src}: token_embd is {tuple(emb)}, config says {cfg['vocab_size']} x {cfg['hidden_size']}")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

    types = [int(x) for x in meta["tokenizer.ggml.token_type"]]
    eot = tokens.index("<end_of_turn>") if "<end_of_turn>" in tokens else None
    eos_ids = [cfg["eos_token_id"]] + ([eot] if eot is not None and eot != cfg["eos_token_id"] else [])
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos_ids,
                   "pad_token_id": cfg["pad_token_id"]}, f, indent=2)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
    unk_id = int(meta.get("tokenizer.ggml.unknown_token_id", 3))
    tk = build_tokenizer(tokens, [float(s) for s in meta["tokenizer.ggml.scores"]], types,
                         cfg["bos_token_id"], unk_id, add_bos)
    tk.save(os.path.join(out, "tokenizer.json"))
    tc = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": tokens[cfg["bos_token_id"]], "eos_token": tokens[cfg["eos_token_id"]],
        "pad_token": tokens[cfg["pad_token_id"]], "unk_token": tokens[unk_id],
        "add_bos_token": add_bos, "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
        "model_max_length": cfg["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template") or CHAT_TEMPLATE,
    }
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
    n = sum(v.numel() for v in tensors.values())
    print(f"wrote {out}: {len(tensors)} tensors, {n / 1e6:.1f} M parameters, {cfg['num_hidden_layers']} layers "
          f"({cfg['layer_types'].count('full_attention')} full), vocab {len(tokens)}")
    return cfg


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: gguf_gemma3_to_hf.py IN.gguf OUT_DIR")
    convert(sys.argv[1], sys.argv[2])
