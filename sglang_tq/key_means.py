"""Key centering without a calibration file (`key_means: auto`): the mean of every (layer, KV head)
computed from the model's weights when the server starts.

Why: models with k_proj biases (Qwen2/2.5) add a large constant to every key, so the codec spends
its range on a constant and the per-key error grows with it. Centering by any constant mu per
(layer, KV head) is exact under softmax (q.mu is the same for every key of a query); only the codec
error of k - mu changes. The cache stores post-RoPE keys, so the constant the bias leaves there is
the rotary average of the bias:

    mu = mean over positions p in [0, P) of RoPE_p(b)

per rotary pair (x_i, y_i) with angle p * theta_i that is (C_i b_x - S_i b_y, S_i b_x + C_i b_y),
C_i / S_i the mean cosine / sine over the P positions: slow pairs keep their bias, fast pairs
average to zero. Models without biases get no centering from this (mu = 0 would change nothing).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

# Positions the rotary average runs over: a typical cache length (slow rotary pairs keep most of
# their bias over any length; fast ones average out after a few hundred positions).
AUTO_POSITIONS = 4096
AUTO = "auto"


def rope_averaged_bias(bias: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool = True) -> torch.Tensor:
    """[H, d] mean over positions of the rotated bias. bias: [H, d] (or [H * d] with cos giving
    d / 2); cos, sin: [P, rot / 2] tables of the positions averaged (rot <= d rotary dims; the rest
    pass through). neox: pairs (i, i + rot/2) (HF / SGLang Llama, Qwen2); else interleaved (2i, 2i+1).
    Why a closed form: the average of rotations is (mean cos, mean sin) per pair."""
    if bias.dim() != 2 or 2 * cos.shape[-1] > bias.shape[-1]:
        raise ValueError(f"rope_averaged_bias: bias {list(bias.shape)} must be [num_kv_heads, head_dim] with "
                         f"head_dim >= 2 * {cos.shape[-1]} (the rotary pairs of cos)")
    half = cos.shape[-1]
    b = bias.float()
    c, s = cos.float().mean(0), sin.float().mean(0)
    out = b.clone()
    if neox:
        x, y = b[:, :half], b[:, half:2 * half]
        out[:, :half], out[:, half:2 * half] = c * x - s * y, s * x + c * y
    else:
        x, y = b[:, 0:2 * half:2], b[:, 1:2 * half:2]
        out[:, 0:2 * half:2], out[:, 1:2 * half:2] = c * x - s * y, s * x + c * y
    return out


def rope_tables(inv_freq: torch.Tensor, positions: int = AUTO_POSITIONS, scaling: float = 1.0):
    """(cos, sin) [positions, len(inv_freq)] of the standard rotary embedding (times its attention
    scaling, as HF's rotary modules apply it to cos and sin)."""
    ang = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
    return (ang.cos() * scaling).float(), (ang.sin() * scaling).float()


def means_from_biases(biases: Sequence[Optional[torch.Tensor]], num_kv_heads: int, head_dim: int,
                      cos: torch.Tensor, sin: torch.Tensor, neox: bool = True) -> Optional[torch.Tensor]:
    """float32 CPU [num_layers, num_kv_heads, head_dim] from one k_proj bias ([num_kv_heads * head_dim]
    or None) per layer; None when no layer has a bias (nothing to center)."""
    if all(b is None for b in biases):
        return None
    out = torch.zeros(len(biases), num_kv_heads, head_dim)
    for l, b in enumerate(biases):
        if b is not None:
            out[l] = rope_averaged_bias(b.detach().float().cpu().reshape(num_kv_heads, head_dim), cos, sin, neox)
    return out


def hf_key_means(model, positions: int = AUTO_POSITIONS) -> Optional[torch.Tensor]:
    """`key_means: auto` for a Hugging Face transformers causal LM (Llama / Qwen2 layout: self_attn.k_proj,
    model.rotary_emb); used by scripts/calibrate.py's simulator. None for a model without k_proj biases
    (nothing to center; e.g. Gemma 3, whose per-layer-type rotary has no single table)."""
    biases = [getattr(layer.self_attn.k_proj, "bias", None) for layer in model.model.layers]
    if all(b is None for b in biases):
        return None
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rot = model.model.rotary_emb
    cos, sin = rope_tables(rot.inv_freq.cpu(), positions, float(getattr(rot, "attention_scaling", 1.0)))
    return means_from_biases(biases, cfg.num_key_value_heads, head_dim, cos, sin, neox=True)


def _sglang_k_bias(attn) -> Optional[torch.Tensor]:
    """The local K part of a SGLang attention module's fused qkv_proj bias, or None."""
    qkv = getattr(attn, "qkv_proj", None)
    bias = getattr(qkv, "bias", None)
    if bias is None:
        return None
    q, kv = int(attn.q_size), int(attn.kv_size)
    return bias[q:q + kv]


def sglang_key_means(model, start_layer: int, num_layers_local: int, num_kv_heads_local: int,
                     head_dim: int, positions: int = AUTO_POSITIONS) -> List[Optional[torch.Tensor]]:
    """`key_means: auto` on a SGLang server: one float32 CPU [H_local, head_dim] mean per local layer
    (None for a layer without a k bias), from this rank's shard of qkv_proj's bias (tensor parallelism
    shards heads, so each rank centers its own heads) and the layer's rotary cos/sin cache."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:  # not a decoder-layer stack this module knows: keys stay uncentered
        return [None] * num_layers_local
    out: List[Optional[torch.Tensor]] = []
    for i in range(num_layers_local):
        attn = getattr(layers[start_layer + i], "self_attn", None)
        b = None if attn is None else _sglang_k_bias(attn)
        if b is None:
            out.append(None)
            continue
        rope = attn.rotary_emb
        cache = rope.cos_sin_cache[:positions].float().cpu()  # [P, rot]: cos half, sin half
        half = cache.shape[-1] // 2
        mu = rope_averaged_bias(b.detach().float().cpu().reshape(num_kv_heads_local, head_dim),
                                cache[:, :half], cache[:, half:], bool(getattr(rope, "is_neox_style", True)))
        out.append(mu)
    return out
