"""Per-layer TurboQuant configuration: YAML schema, validation, resolution to per-layer formats.

Pure Python plus `tq_kernels.codec` (no SGLang), so a bad config fails in milliseconds, before any
model weight loads. Every error is a `TQConfigError` naming the file, the key path, the bad value
and what is allowed.

Schema (every key optional; values shown are the defaults)::

    name: turbo4                  # free text, shown in summaries (default: the file's stem)
    seed: 0                       # base seed of rotations / QJL projections (codec.derive_seed)
    defaults:                     # formats of every quantized layer, unless an override says otherwise
      k: {bits: 4, qjl: false, norm_correction: true, outliers: null}
      v: {bits: 4, norm_correction: true, outliers: null}
    boundary: {first: 2, last: 2, format: bf16}   # first/last N layers stay unquantized (bf16 or fp8)
    sliding: {format: tq}         # sliding-window layers: tq (like the rest), bf16 or fp8
    overrides:                    # applied in order after defaults and boundary; may not overlap
      - layers: [3, 5]            # inclusive range [first, last]; also 7, -1 (last layer) or "10-12"
        k: {bits: 3}              # only the keys given change; the rest comes from defaults
        v: {bits: 2}
      - layers: 9
        format: bf16              # whole layer unquantized (or fp8)

K/V keys:
  bits: bits per coordinate. MSE: 2..4. PROD keys (`qjl: true`, K only): 2..5, counting the QJL
    sign bit, i.e. (bits - 1)-bit MSE codes + 1 sign bit, exactly as `VecFormat`.
  qjl: K only. Spends one bit on QJL signs of the residual so that <q, k_hat> is unbiased.
  norm_correction: store |x| / |c_hat| so the dequantized vector keeps the norm of x.
  outliers: null, {channels: N, bits: B} or {fraction: F, bits: B}, optionally with
    `channel_list: [...]` (rotated channels chosen by calibration; length N). N (or F * head_dim)
    must be a power of two dividing head_dim, >= 8 and < head_dim; B > bits, counted like bits.

Key centering (optional, top level)::

    key_means: smollm2_key_means.safetensors   # relative to this YAML's folder unless absolute
    key_means: auto               # or: measured at start-up on a built-in probe text (sglang_tq.key_means)

A safetensors or .pt file with one float32 tensor `key_means` [num_layers, num_kv_heads_total,
head_dim] (scripts/calibrate.py --center writes one). Quantized layers then store keys as codes of
k - mu[layer, head]; attention is unchanged (softmax is invariant to the per-query constant q.mu). A model
with attention sinks (gpt-oss) stores its keys uncentered: the sink logit breaks that invariance.
The file must exist when the YAML is parsed; its shape is checked against the model at resolve time
(layers, head_dim, and heads when given; under tensor parallelism each rank takes its heads), and a plan
that quantizes no layer refuses it (nothing would be centered).
`key_means: auto` needs no file: at start-up the server runs one prefill of a short built-in text
(sglang_tq/probe.txt) through the loaded model and takes each layer's mean key (sglang_tq.key_means);
a model with logit softcapping or attention sinks, and set-ups where that prefill cannot run alone
(pipeline parallelism, DP attention, linear-attention hybrids), stay uncentered, with a warning.

Recent window (optional, top level)::

    window: {tokens: 32, requests: 256}

The last `tokens` positions of every sequence are also kept exact (bf16, in K's/V's rotated domain) in
a small per-request ring next to the packed pool, and decode reads them from there; older tokens are
read from the packed codes as always. Attention is mostly local, so this removes most of the loss of
4-bit codes (SmolLM2, CPU simulation: `turbo4` +4.0 % -> +0.0 % perplexity with 32 tokens). Ring memory
is `requests` x `tokens` bf16 tokens of the quantized layers, taken from the pool's budget; requests
beyond `requests` at a time decode from the codes alone. tokens 0 (the default) turns it off.

Evaluation (optional, top level; for measuring the cache format, not for serving)::

    evaluation: {prefill_from_cache: false}

prefill_from_cache: true makes every prefill attend to its own new tokens' K/V as the cache stores them
(dequantized from the codes; with a window, the last `tokens` positions exact) instead of the fresh
values, so each token sees its whole past exactly as decoding would: perplexity then measures the
cache format. It costs prefill speed and changes outputs, so the server warns about it in its log.

First token (optional, top level)::

    first_token: exact            # or: codes

Most models park attention on the sequence's first token (BOS; Qwen's `<|im_start|>`): "attention sink"
heads whose weight sits on that one key, so its quantization error costs more than any other token's.
`exact` (the default) keeps the first token's K/V exact (bf16, rotated like the recent window's rows) in
a table of a few entries per quantized layer, keyed by token id: at position 0 a causal decoder's K/V
depend on the token id alone, so every request starting with that token shares the entry, also through
the radix cache. The packed codes are still written; decode, extend over a cached prefix and speculative
verify read the exact row instead. Under LoRA adapters (which change that K/V per request) the server
turns it off and says so in its log. `codes` reads the first token from the codes like any other.

Layer formats: `tq` (quantized with the K/V formats above), `bf16` (stored unquantized, at the
model's 16-bit dtype) or `fp8` (SGLang's own fp8 KV layout: e4m3 of x / scale with one per-tensor scale,
the checkpoint's k_scale / v_scale or 1.0, read directly by SGLang's Triton kernels; head_dim bytes per
K or V vector, half of bf16). An override that changes k/v of a boundary layer (bf16 or fp8) must say
`format: tq`, so that a range never quantizes a boundary layer by accident.

Layer indices are the model's (`num_hidden_layers` of its config). In a linear-attention hybrid
(Qwen3-Next, Qwen3.5: Gated DeltaNet layers with a few full-attention layers) only the attention layers
hold a KV cache: the boundary counts attention layers (first: 1 = the first attention layer), a range
applies to the attention layers inside it, and an override that selects only recurrent layers is an
error naming them.

Sliding-window layers (gpt-oss, Gemma 3; `sliding:`) default to `tq` like every other layer. Under
SGLang's hybrid SWA memory their pool holds swa_full_tokens_ratio (default 0.8) tokens per full-pool
token whatever the window, so their bytes weigh almost as much as the full layers': bf16 SWA layers
there cost what bf16 full layers do, and packed ones keep the capacity gain of the whole model. `sliding:
{format: bf16}` (or fp8) keeps them exact at that price; boundary layers and overrides take precedence.

head_dim 80 and 96 (e.g. Phi-3): quantized layers code the vectors zero-padded to 128 coordinates (the
Walsh-Hadamard rotation needs a power of two), so a vector costs what one of 128 does (4-bit: 66 B against
160 / 192 B in bf16); outlier counts and channel lists are of the 128 coded channels.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import yaml

from tq_kernels.codec import (
    BF16_BYTES_PER_HEAD, FP8_BYTES_PER_HEAD, PADDED_HEAD_DIMS, ROLE_K, ROLE_V, SUPPORTED_HEAD_DIMS, TQCodec,
    VecFormat, codec_dim,
)

CONFIG_ENV = "SGLANG_TQ_CONFIG"  # env var the SGLang integration reads: preset name or YAML path
DEFAULT_PRESET = "turbo4"

FORMAT_TQ, FORMAT_BF16, FORMAT_FP8 = "tq", "bf16", "fp8"
FORMAT_NONE = "none"  # a layer without a KV cache (recurrent layer of a linear-attention hybrid)
LAYER_FORMATS = (FORMAT_TQ, FORMAT_BF16, FORMAT_FP8)
BOUNDARY_FORMATS = (FORMAT_BF16, FORMAT_FP8)
PLAIN_FORMATS = (FORMAT_BF16, FORMAT_FP8)  # layers served by SGLang's Triton kernels from plain buffers
MSE_BITS_RANGE = (2, 6)   # 1-bit MSE is legal in VecFormat but too lossy to offer for K or V alone;
                          # 5 and 6 bits (fields [4, 1] / [4, 2]) are for keys of small, sensitive models
PROD_BITS_RANGE = (2, 5)  # includes the QJL sign bit: 1..4-bit MSE codes + 1 sign bit
DEFAULT_BOUNDARY = 2

_TOP_KEYS = ("name", "seed", "defaults", "boundary", "sliding", "overrides", "key_means", "window", "evaluation",
             "first_token")
FIRST_TOKEN_EXACT, FIRST_TOKEN_CODES = "exact", "codes"
FIRST_TOKEN_CHOICES = (FIRST_TOKEN_EXACT, FIRST_TOKEN_CODES)
# first-token table entries per quantized layer: the few first-token ids (BOS, a chat template's opening
# token) the running requests share
FIRST_TOKEN_ENTRIES = 4
_WINDOW_KEYS = ("tokens", "requests")
_EVALUATION_KEYS = ("prefill_from_cache",)
WINDOW_MAX_TOKENS = 256      # the decode kernel keeps a window's scores in registers
DEFAULT_WINDOW_REQUESTS = 256
KEY_MEANS_TENSOR = "key_means"  # name of the tensor inside a key-means file
KEY_MEANS_AUTO = "auto"          # key_means: auto -> means from the start-up probe prefill
_DEFAULTS_KEYS = ("k", "v")
_K_KEYS = ("bits", "qjl", "norm_correction", "outliers")
_V_KEYS = ("bits", "norm_correction", "outliers")
_OUTLIER_KEYS = ("channels", "fraction", "bits", "channel_list")
_BOUNDARY_KEYS = ("first", "last", "format")
_SLIDING_KEYS = ("format",)
_OVERRIDE_KEYS = ("layers", "k", "v", "format")


class TQConfigError(ValueError):
    """A TurboQuant config is malformed or does not fit the model."""


# --------------------------------------------------------------------------------------------
# Spec objects (what the YAML says, before the model's shape is known)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutlierSpec:
    bits: int
    channels: Optional[int] = None
    fraction: Optional[float] = None
    channel_list: Optional[Tuple[int, ...]] = None

    def count(self, head_dim: int, where: str) -> int:
        """Outlier channels at this head_dim; a fraction must land on an allowed count."""
        n = self.channels
        if n is None:
            exact = self.fraction * head_dim
            n = int(round(exact))
            if abs(exact - n) > 1e-9:
                fractions = [f"{c / head_dim:g}" for c in _allowed_outlier_counts(head_dim)]
                raise TQConfigError(f"{where}.fraction: {self.fraction} x head_dim {head_dim} = {exact:g} "
                                    f"is not a whole number of channels; allowed at head_dim {head_dim}: "
                                    f"{', '.join(fractions)}")
        allowed = _allowed_outlier_counts(head_dim)
        if n not in allowed:
            what = f"fraction {self.fraction} gives {n} channels" if self.channels is None else f"channels: {n}"
            raise TQConfigError(f"{where}: {what} at head_dim {head_dim}; allowed channel counts "
                                f"(powers of two dividing head_dim, >= 8, < head_dim): {list(allowed)}")
        if self.channel_list is not None:
            if len(self.channel_list) != n:
                raise TQConfigError(f"{where}.channel_list: has {len(self.channel_list)} entries, "
                                    f"expected {n} (one per outlier channel)")
            bad = [c for c in self.channel_list if not 0 <= c < head_dim]
            if bad:
                raise TQConfigError(f"{where}.channel_list: {bad} out of range; allowed 0..{head_dim - 1}")
        return n


@dataclass(frozen=True)
class VecSpec:
    bits: int = 4
    qjl: bool = False
    norm_correction: bool = True
    outliers: Optional[OutlierSpec] = None

    def to_format(self, head_dim: int, where: str) -> Tuple[VecFormat, Optional[Tuple[int, ...]]]:
        """-> (VecFormat at this head_dim, calibrated outlier channel list or None). A padded head_dim
        (80, 96) gets the format of its codec dim; outlier counts are of the codec dim's channels."""
        n = self.outliers.count(codec_dim(head_dim), where + ".outliers") if self.outliers else 0
        try:
            fmt = VecFormat.for_model(head_dim, self.bits, qjl=self.qjl, norm_correction=self.norm_correction,
                                      outlier_channels=n, outlier_bits=self.outliers.bits if self.outliers else 0)
        except ValueError as e:  # a combination the field checks did not foresee
            raise TQConfigError(f"{where}: {e}") from None
        return fmt, (self.outliers.channel_list if self.outliers else None)


@dataclass(frozen=True)
class LayerSelector:
    """Inclusive layer range; negative ends count from the end (-1 = last layer)."""

    first: int
    last: int
    text: str  # as written, for messages

    def resolve(self, num_layers: int, where: str) -> range:
        lo = self.first + num_layers if self.first < 0 else self.first
        hi = self.last + num_layers if self.last < 0 else self.last
        for end, raw in ((lo, self.first), (hi, self.last)):
            if not 0 <= end < num_layers:
                raise TQConfigError(f"{where}: layer {raw} is past the model's {num_layers} layers; "
                                    f"allowed {-num_layers}..{num_layers - 1}")
        if lo > hi:
            raise TQConfigError(f"{where}: {self.text} selects no layer in a {num_layers}-layer model "
                                f"(first {lo} > last {hi})")
        return range(lo, hi + 1)


@dataclass(frozen=True)
class Override:
    layers: LayerSelector
    k: Dict[str, Any]
    v: Dict[str, Any]
    format: Optional[str]
    index: int


@dataclass(frozen=True)
class TQConfig:
    name: str = DEFAULT_PRESET
    seed: int = 0
    k: VecSpec = VecSpec()
    v: VecSpec = VecSpec()
    boundary_first: int = DEFAULT_BOUNDARY
    boundary_last: int = DEFAULT_BOUNDARY
    boundary_format: str = FORMAT_BF16
    overrides: Tuple[Override, ...] = ()
    source: str = "<dict>"
    key_means: Optional[str] = None  # absolute path of the key-means file (key centering), or None
    window_tokens: int = 0           # recent window: last N positions kept exact (0 = off)
    window_requests: int = DEFAULT_WINDOW_REQUESTS
    prefill_from_cache: bool = False  # evaluation.prefill_from_cache
    sliding_format: str = FORMAT_TQ   # format of the sliding-window layers (sliding.format)
    first_token: str = FIRST_TOKEN_EXACT  # first_token: exact | codes

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "TQConfig":
        return _parse(data, source)

    def resolve(self, num_layers: int, head_dim: int, v_head_dim: Optional[int] = None,
                num_kv_heads: Optional[int] = None, attention_layers: Optional[Sequence[int]] = None,
                sliding_layers: Sequence[int] = ()) -> "ModelPlan":
        """Per-layer plan for the model. num_kv_heads (total, before tensor parallelism), when given,
        is checked against the key-means file too. attention_layers: the layers with a KV cache (None:
        all; a linear-attention hybrid's full-attention layers); sliding_layers: its sliding-window layers."""
        return _resolve(self, num_layers, head_dim, v_head_dim, num_kv_heads, attention_layers, sliding_layers)

    def __str__(self) -> str:
        return f"{self.name} ({self.source})"


# --------------------------------------------------------------------------------------------
# Resolved plan (per layer)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    layer_id: int
    quantized: bool
    k: Optional[VecFormat]
    v: Optional[VecFormat]
    k_outlier_channel_list: Optional[Tuple[int, ...]] = None
    v_outlier_channel_list: Optional[Tuple[int, ...]] = None
    format: str = FORMAT_TQ  # FORMAT_TQ exactly when quantized; else FORMAT_BF16, FORMAT_FP8 or FORMAT_NONE

    def codecs(self, seed: int) -> Tuple[Optional[TQCodec], Optional[TQCodec]]:
        """(K codec, V codec) of this layer; (None, None) for an unquantized layer."""
        if not self.quantized:
            return None, None
        return (TQCodec.build(self.k, seed, self.layer_id, ROLE_K, outlier_channel_list=self.k_outlier_channel_list),
                TQCodec.build(self.v, seed, self.layer_id, ROLE_V, outlier_channel_list=self.v_outlier_channel_list))

    def bytes_per_token_head(self, head_dim: int, v_head_dim: int) -> int:
        """K + V bytes of one token in one KV head (0 for a layer without a KV cache)."""
        if self.format == FORMAT_NONE:
            return 0
        if self.format == FORMAT_FP8:
            return FP8_BYTES_PER_HEAD(head_dim) + FP8_BYTES_PER_HEAD(v_head_dim)
        if not self.quantized:
            return BF16_BYTES_PER_HEAD(head_dim) + BF16_BYTES_PER_HEAD(v_head_dim)
        return self.k.slot_bytes + self.v.slot_bytes

    def describe(self) -> Tuple[str, str]:
        if self.format == FORMAT_NONE:
            return "no KV (recurrent)", "-"
        if not self.quantized:
            return self.format, self.format
        k = self.k.describe() + (" (calibrated)" if self.k_outlier_channel_list else "")
        v = self.v.describe() + (" (calibrated)" if self.v_outlier_channel_list else "")
        return k, v


@dataclass(frozen=True)
class ModelPlan:
    name: str
    seed: int
    num_layers: int
    head_dim: int
    v_head_dim: int
    layers: Tuple[LayerPlan, ...]
    key_means_path: Optional[str] = None
    window_tokens: int = 0
    window_requests: int = DEFAULT_WINDOW_REQUESTS
    prefill_from_cache: bool = False  # evaluation.prefill_from_cache
    sliding_layers: Tuple[int, ...] = ()  # the model's sliding-window layers (as given to resolve)
    # float32 CPU [num_layers, num_kv_heads_total, head_dim] (key centering) or None
    key_means: Optional[Any] = field(default=None, compare=False, repr=False)
    first_token: str = FIRST_TOKEN_EXACT  # first_token: exact | codes

    def layer_key_mean(self, layer_id: int, heads: Optional[slice] = None):
        """fp32 [H, head_dim] mean of layer `layer_id` (heads: a slice of the KV heads), or None when the
        plan has no key means or the layer is not quantized (bf16 layers store keys as they are)."""
        if self.key_means is None or not self.layers[layer_id].quantized:
            return None
        mu = self.key_means[layer_id]
        return (mu if heads is None else mu[heads]).contiguous()

    def __getitem__(self, layer_id: int) -> LayerPlan:
        return self.layers[layer_id]

    def codecs(self, layer_id: int) -> Tuple[Optional[TQCodec], Optional[TQCodec]]:
        return self.layers[layer_id].codecs(self.seed)

    @property
    def quantized_layers(self) -> Tuple[int, ...]:
        return tuple(lp.layer_id for lp in self.layers if lp.quantized)

    @property
    def attention_layers(self) -> Tuple[int, ...]:
        """Layers with a KV cache (all but a linear-attention hybrid's recurrent layers)."""
        return tuple(lp.layer_id for lp in self.layers if lp.format != FORMAT_NONE)

    def layers_bytes_per_token(self, num_kv_heads: int, layers: Sequence[int]) -> int:
        """K + V cache bytes of one token over `layers` (model layer ids) and `num_kv_heads` heads."""
        return num_kv_heads * sum(self.layers[i].bytes_per_token_head(self.head_dim, self.v_head_dim) for i in layers)

    def bytes_per_token(self, num_kv_heads: int) -> int:
        """K + V cache bytes of one token over all layers and KV heads."""
        return num_kv_heads * sum(lp.bytes_per_token_head(self.head_dim, self.v_head_dim) for lp in self.layers)

    def exact_row_bytes(self, num_kv_heads: int, layers: Optional[Sequence[int]] = None) -> int:
        """Bytes of one token's exact rows (the recent window's ring, the first-token tables): bf16 K + V in
        every quantized layer of `layers` (default all), at the codec's dim (128 for a model head_dim of 80
        or 96), as the pool allocates them."""
        layers = range(self.num_layers) if layers is None else layers
        return num_kv_heads * sum(BF16_BYTES_PER_HEAD(lp.k.head_dim) + BF16_BYTES_PER_HEAD(lp.v.head_dim)
                                  for lp in (self.layers[i] for i in layers) if lp.quantized)

    def window_bytes(self, num_kv_heads: int, requests: Optional[int] = None, layers: Optional[range] = None) -> int:
        """Bytes of the recent-window ring: exact rows of window_tokens x `requests` (default window_requests)
        tokens in every quantized layer of `layers` (default all); 0 without a window."""
        if not self.window_tokens:
            return 0
        return (self.exact_row_bytes(num_kv_heads, layers) * self.window_tokens
                * (self.window_requests if requests is None else requests))

    def bf16_bytes_per_token(self, num_kv_heads: int) -> int:
        return num_kv_heads * len(self.attention_layers) * (BF16_BYTES_PER_HEAD(self.head_dim)
                                                            + BF16_BYTES_PER_HEAD(self.v_head_dim))

    def compression_ratio(self) -> float:
        return self.bf16_bytes_per_token(1) / self.bytes_per_token(1)

    def summary(self, num_kv_heads: int) -> str:
        return summary_table(self, num_kv_heads)


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------
def _allowed_outlier_counts(head_dim: int) -> Tuple[int, ...]:
    return tuple(n for n in (8, 16, 32, 64, 128) if n < head_dim and head_dim % n == 0)


def _fail(source: str, path: str, msg: str) -> TQConfigError:
    return TQConfigError(f"{source}: {path}: {msg}" if path else f"{source}: {msg}")


def _check_keys(data: Dict, allowed: Sequence[str], source: str, path: str) -> None:
    for key in data:
        if key not in allowed:
            near = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            where = f"{path}.{key}" if path else str(key)
            raise _fail(source, where, f"unknown key '{key}'{hint} (allowed: {', '.join(allowed)})")


def _got(value: Any) -> str:
    """A YAML value for a message: its type and repr; null as YAML writes it."""
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _want_mapping(value: Any, source: str, path: str) -> Dict:
    if not isinstance(value, dict):
        raise _fail(source, path, f"expected a mapping, got {_got(value)}")
    return value


def _want_int(value: Any, source: str, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, path, f"expected an integer, got {_got(value)}")
    return value


def _want_bool(value: Any, source: str, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(source, path, f"expected true or false, got {_got(value)}")
    return value


def _want_choice(value: Any, choices: Sequence[str], source: str, path: str) -> str:
    if value not in choices:
        near = difflib.get_close_matches(str(value).lower(), choices, n=1) if isinstance(value, str) else []
        hint = f"; did you mean '{near[0]}'?" if near else ""
        raise _fail(source, path, f"{'null' if value is None else repr(value)} is not allowed{hint} "
                                  f"(allowed: {', '.join(choices)})")
    return value


def _parse_outliers(data: Any, bits: int, qjl: bool, source: str, path: str) -> Optional[OutlierSpec]:
    if data is None:
        return None
    data = _want_mapping(data, source, path)
    _check_keys(data, _OUTLIER_KEYS, source, path)
    if "bits" not in data:
        raise _fail(source, path, "missing 'bits' (bits of the outlier channels, more than the layer's bits)")
    obits = _want_int(data["bits"], source, path + ".bits")
    top = (PROD_BITS_RANGE if qjl else MSE_BITS_RANGE)[1]
    if not bits < obits <= top:
        raise _fail(source, path + ".bits", f"{obits} is out of range; allowed {bits + 1}..{top} "
                                            f"(more than bits: {bits}, at most {top})")
    if ("channels" in data) == ("fraction" in data):
        raise _fail(source, path, "give exactly one of 'channels' (a count) or 'fraction' (of head_dim)")
    channels = fraction = None
    if "channels" in data:
        channels = _want_int(data["channels"], source, path + ".channels")
        if channels < 8 or channels & (channels - 1):
            raise _fail(source, path + ".channels", f"{channels} is not allowed; allowed: a power of two >= 8 "
                                                    f"dividing head_dim and < head_dim (e.g. 16, 32 at head_dim 128)")
    else:
        fraction = data["fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise _fail(source, path + ".fraction", f"{fraction!r} is not allowed; allowed: a number in (0, 1) "
                                                    f"with fraction x head_dim a power of two >= 8")
        fraction = float(fraction)
    channel_list = None
    if data.get("channel_list") is not None:
        raw = data["channel_list"]
        if not isinstance(raw, list) or not raw:
            raise _fail(source, path + ".channel_list", f"expected a non-empty list of channel indices, got {raw!r}")
        channel_list = tuple(_want_int(c, source, f"{path}.channel_list[{i}]") for i, c in enumerate(raw))
        negative = [c for c in channel_list if c < 0]
        if negative:
            raise _fail(source, path + ".channel_list", f"channels {negative} are negative; entries are channel "
                                                        f"indices 0..head_dim - 1")
        dup = sorted({c for c in channel_list if channel_list.count(c) > 1})
        if dup:
            raise _fail(source, path + ".channel_list", f"channels {dup} repeated; entries must be distinct")
        if channels is not None and len(channel_list) != channels:
            raise _fail(source, path + ".channel_list", f"has {len(channel_list)} entries, expected channels: {channels}")
    return OutlierSpec(obits, channels, fraction, channel_list)


def _parse_vec(data: Any, base: VecSpec, role: str, source: str, path: str) -> VecSpec:
    """Fields given in `data` replace those of `base`; the result is checked as a whole."""
    if data is None:
        return base
    data = _want_mapping(data, source, path)
    if role == "v" and "qjl" in data:
        raise _fail(source, path + ".qjl", f"{data['qjl']!r}: V may not use qjl (QJL makes <q, k> unbiased; "
                                           f"values are only averaged, so V uses MSE codes)")
    _check_keys(data, _K_KEYS if role == "k" else _V_KEYS, source, path)
    bits = _want_int(data["bits"], source, path + ".bits") if "bits" in data else base.bits
    qjl = _want_bool(data["qjl"], source, path + ".qjl") if "qjl" in data else base.qjl
    nc = (_want_bool(data["norm_correction"], source, path + ".norm_correction")
          if "norm_correction" in data else base.norm_correction)
    lo, hi = PROD_BITS_RANGE if qjl else MSE_BITS_RANGE
    if not lo <= bits <= hi:
        kind = "PROD keys (qjl: true, including the sign bit)" if qjl else "MSE (qjl: false)"
        raise _fail(source, path + ".bits", f"{bits} is out of range; allowed {lo}..{hi} for {kind}")
    if "outliers" in data:
        outliers = _parse_outliers(data["outliers"], bits, qjl, source, path + ".outliers")
    else:
        outliers = base.outliers
        if outliers is not None and not bits < outliers.bits <= hi:
            raise _fail(source, path + ".bits", f"{bits} leaves the inherited outliers.bits {outliers.bits} "
                                                f"not above it; set outliers here too (or outliers: null)")
    return VecSpec(bits, qjl, nc, outliers)


def _parse_selector(value: Any, source: str, path: str) -> LayerSelector:
    allowed = "an index (7, -1 = last layer), a range string \"a-b\" or a list [first, last]"
    if isinstance(value, bool):
        raise _fail(source, path, f"{value!r} is not a layer selector; allowed: {allowed}")
    if isinstance(value, int):
        return LayerSelector(value, value, str(value))
    if isinstance(value, str):
        parts = value.replace(" ", "").split("-")
        if len(parts) == 2 and all(p.isdigit() for p in parts):
            a, b = int(parts[0]), int(parts[1])
            if a > b:
                raise _fail(source, path, f"{value!r}: first {a} > last {b}")
            return LayerSelector(a, b, repr(value))
        if len(parts) == 1 and parts[0].isdigit():
            return LayerSelector(int(parts[0]), int(parts[0]), repr(value))
    if isinstance(value, list) and len(value) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        a, b = value
        if (a < 0) == (b < 0) and a > b:
            raise _fail(source, path, f"{value!r}: first {a} > last {b}")
        return LayerSelector(a, b, str(value))
    raise _fail(source, path, f"{value!r} is not a layer selector; allowed: {allowed}")


def _parse_override(data: Any, index: int, source: str) -> Override:
    path = f"overrides[{index}]"
    data = _want_mapping(data, source, path)
    _check_keys(data, _OVERRIDE_KEYS, source, path)
    if "layers" not in data:
        raise _fail(source, path, "missing 'layers' (which layers this override changes)")
    sel = _parse_selector(data["layers"], source, path + ".layers")
    fmt = _want_choice(data["format"], LAYER_FORMATS, source, path + ".format") if "format" in data else None
    k = data.get("k")
    v = data.get("v")
    if fmt in PLAIN_FORMATS and (k is not None or v is not None):
        raise _fail(source, path, f"format: {fmt} stores the layer without TurboQuant codes; remove its k/v "
                                  f"settings (they apply to format: tq only)")
    if fmt is None and not k and not v:
        raise _fail(source, path, "changes nothing; give k, v (with at least one key) or format")
    for role, sub in (("k", k), ("v", v)):
        if sub is not None:
            _want_mapping(sub, source, f"{path}.{role}")  # keys and values are checked by _override_specs
    return Override(sel, dict(k or {}), dict(v or {}), fmt, index)


def _or_empty(value: Any, empty: Any) -> Any:
    """A key written with no value (`overrides:`) means empty; 0 or "" stay wrong types."""
    return empty if value is None else value


def _parse(data: Any, source: str) -> TQConfig:
    if data is None:
        raise _fail(source, "", "empty config; expected a mapping with keys " + ", ".join(_TOP_KEYS))
    data = _want_mapping(data, source, "")
    _check_keys(data, _TOP_KEYS, source, "")
    name = data.get("name", Path(source).stem if source.endswith((".yaml", ".yml")) else DEFAULT_PRESET)
    if not isinstance(name, str) or not name:
        raise _fail(source, "name", f"expected a non-empty string, got {name!r}")
    seed = _want_int(data.get("seed", 0), source, "seed")
    if seed < 0:
        raise _fail(source, "seed", f"{seed} is negative; allowed: an integer >= 0")

    defaults = _want_mapping(_or_empty(data.get("defaults"), {}), source, "defaults")
    _check_keys(defaults, _DEFAULTS_KEYS, source, "defaults")
    k = _parse_vec(defaults.get("k"), VecSpec(), "k", source, "defaults.k")
    v = _parse_vec(defaults.get("v"), VecSpec(), "v", source, "defaults.v")

    boundary = _want_mapping(_or_empty(data.get("boundary"), {}), source, "boundary")
    _check_keys(boundary, _BOUNDARY_KEYS, source, "boundary")
    first = _want_int(boundary.get("first", DEFAULT_BOUNDARY), source, "boundary.first")
    last = _want_int(boundary.get("last", DEFAULT_BOUNDARY), source, "boundary.last")
    for key, val in (("first", first), ("last", last)):
        if val < 0:
            raise _fail(source, f"boundary.{key}", f"{val} is negative; allowed: an integer >= 0")
    bfmt = _want_choice(boundary.get("format", FORMAT_BF16), BOUNDARY_FORMATS, source, "boundary.format")
    sliding = _want_mapping(_or_empty(data.get("sliding"), {}), source, "sliding")
    _check_keys(sliding, _SLIDING_KEYS, source, "sliding")
    sfmt = _want_choice(sliding.get("format", FORMAT_TQ), LAYER_FORMATS, source, "sliding.format")

    raw_overrides = _or_empty(data.get("overrides"), [])
    if not isinstance(raw_overrides, list):
        raise _fail(source, "overrides", f"expected a list of overrides (- layers: ...), got {_got(raw_overrides)}")
    overrides = tuple(_parse_override(o, i, source) for i, o in enumerate(raw_overrides))
    key_means = _parse_key_means_path(data.get("key_means"), source)
    wtokens, wrequests = _parse_window(data.get("window"), source)
    from_cache = _parse_evaluation(data.get("evaluation"), source)
    first_token = _want_choice(data.get("first_token", FIRST_TOKEN_EXACT), FIRST_TOKEN_CHOICES, source, "first_token")
    cfg = TQConfig(name, seed, k, v, first, last, bfmt, overrides, source, key_means, wtokens, wrequests, from_cache,
                   sfmt, first_token)
    # Check every override's k/v against the defaults now, so a bad value fails at load time.
    for o in overrides:
        _override_specs(cfg, o, k, v)
    _check_static_overlaps(cfg)
    return cfg


def _parse_window(value: Any, source: str) -> Tuple[int, int]:
    """window: {tokens: N, requests: R} -> (N, R); absent: (0, default)."""
    if value is None:
        return 0, DEFAULT_WINDOW_REQUESTS
    value = _want_mapping(value, source, "window")
    _check_keys(value, _WINDOW_KEYS, source, "window")
    tokens = _want_int(value.get("tokens", 0), source, "window.tokens")
    if not 0 <= tokens <= WINDOW_MAX_TOKENS:
        raise _fail(source, "window.tokens", f"{tokens} is out of range; allowed: 0 (off) .. {WINDOW_MAX_TOKENS}")
    requests = _want_int(value.get("requests", DEFAULT_WINDOW_REQUESTS), source, "window.requests")
    if requests < 1:
        raise _fail(source, "window.requests", f"{requests} is out of range; allowed: an integer >= 1")
    return tokens, requests


def _parse_evaluation(value: Any, source: str) -> bool:
    """evaluation: {prefill_from_cache: B} -> B; absent: False."""
    if value is None:
        return False
    value = _want_mapping(value, source, "evaluation")
    _check_keys(value, _EVALUATION_KEYS, source, "evaluation")
    return _want_bool(value.get("prefill_from_cache", False), source, "evaluation.prefill_from_cache")


def _parse_key_means_path(value: Any, source: str) -> Optional[str]:
    """key_means: PATH -> absolute path (relative paths: to the YAML's folder; from_dict: to the cwd)."""
    if value is None:
        return None
    if value == KEY_MEANS_AUTO:  # measured at start-up by the probe prefill (sglang_tq.key_means)
        return KEY_MEANS_AUTO
    allowed = f"allowed: '{KEY_MEANS_AUTO}' or a file path (.safetensors or .pt)"
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise _fail(source, "key_means", f"{value!r} is not allowed; {allowed}")
    path = Path(os.path.expanduser(str(value)))
    if not path.is_absolute():
        base = Path(source).parent if source.endswith((".yaml", ".yml")) else Path.cwd()
        path = base / path
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "no such file"
        word = str(value).strip().lower()
        near = "/" not in word and "." not in word and difflib.get_close_matches(word, [KEY_MEANS_AUTO], n=1)
        hint = f"; did you mean '{KEY_MEANS_AUTO}'?" if near else ""
        raise _fail(source, "key_means", f"{value!r}: {what} ({path}); {allowed}, holding a float32 tensor "
                                         f"'{KEY_MEANS_TENSOR}' [num_layers, num_kv_heads, head_dim] "
                                         f"(scripts/calibrate.py --center){hint}")
    return str(path.resolve())


def load_key_means(path: Union[str, os.PathLike], source: str = "") -> Any:
    """Load a key-means file -> float32 CPU tensor [num_layers, num_kv_heads, head_dim].
    .safetensors: the tensor named 'key_means'; otherwise torch.load of a tensor or of a dict
    holding 'key_means'. Raises TQConfigError."""
    import torch

    where = f"{source}: key_means" if source else "key_means"
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError as e:
        raise TQConfigError(f"{where}: {path}: cannot load ({e}); install safetensors or use a .pt file") from None
    except Exception as e:  # corrupt file, not a tensor file, ...
        raise TQConfigError(f"{where}: {path}: cannot load: {type(e).__name__}: {e}") from None
    t = data.get(KEY_MEANS_TENSOR) if isinstance(data, dict) else data
    if not isinstance(t, torch.Tensor):
        found = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise TQConfigError(f"{where}: {path}: expected a tensor '{KEY_MEANS_TENSOR}', found {found}")
    if t.dim() != 3 or not t.is_floating_point():
        raise TQConfigError(f"{where}: {path}: '{KEY_MEANS_TENSOR}' has shape {list(t.shape)} dtype {t.dtype}; "
                            f"expected a float tensor [num_layers, num_kv_heads, head_dim]")
    t = t.to(torch.float32).contiguous()
    if not torch.isfinite(t).all():
        raise TQConfigError(f"{where}: {path}: '{KEY_MEANS_TENSOR}' holds non-finite values")
    return t


def check_key_means_shape(t: Any, num_layers: int, head_dim: int, num_kv_heads: Optional[int],
                          where: str) -> None:
    """Raise TQConfigError unless t is [num_layers, num_kv_heads (if given), head_dim]."""
    n, h, d = t.shape
    want = f"[{num_layers}, {num_kv_heads if num_kv_heads is not None else 'num_kv_heads'}, {head_dim}]"
    if n != num_layers or d != head_dim or (num_kv_heads is not None and h != num_kv_heads):
        raise TQConfigError(f"{where}: shape {list(t.shape)} does not fit the model; expected {want} "
                            f"(num_layers, num_kv_heads, head_dim)")


def _override_specs(cfg: TQConfig, o: Override, k: VecSpec, v: VecSpec) -> Tuple[VecSpec, VecSpec]:
    path = f"overrides[{o.index}]"
    return (_parse_vec(o.k or None, k, "k", cfg.source, path + ".k"),
            _parse_vec(o.v or None, v, "v", cfg.source, path + ".v"))


def _check_static_overlaps(cfg: TQConfig) -> None:
    """Overlaps visible without the layer count (both ranges non-negative)."""
    seen: List[Tuple[int, int, int]] = []
    for o in cfg.overrides:
        s = o.layers
        if s.first < 0 or s.last < 0:
            continue
        for a, b, j in seen:
            if s.first <= b and a <= s.last:
                raise _fail(cfg.source, f"overrides[{o.index}].layers",
                            f"{s.text} overlaps overrides[{j}] (layers {a}-{b}); each layer may be overridden once")
        seen.append((s.first, s.last, o.index))


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------
def _check_layer_ids(ids: Sequence[int], num_layers: int, what: str, src: str) -> Tuple[int, ...]:
    ids = tuple(sorted(set(int(i) for i in ids)))
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise TQConfigError(f"{src}: the model's {what} {bad} are past its {num_layers} layers")
    return ids


def _resolve(cfg: TQConfig, num_layers: int, head_dim: int, v_head_dim: Optional[int],
             num_kv_heads: Optional[int] = None, attention_layers: Optional[Sequence[int]] = None,
             sliding_layers: Sequence[int] = ()) -> ModelPlan:
    src = cfg.source
    v_head_dim = head_dim if v_head_dim is None else v_head_dim
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise TQConfigError(f"{src}: model has num_layers={num_layers!r}; expected an integer >= 1")
    for what, d in (("head_dim", head_dim), ("v_head_dim", v_head_dim)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise TQConfigError(f"{src}: model {what} {d} is not supported by TurboQuant "
                                f"(supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    attn = (tuple(range(num_layers)) if attention_layers is None
            else _check_layer_ids(attention_layers, num_layers, "attention layers", src))
    if not attn:
        raise TQConfigError(f"{src}: the model has no attention layer (nothing to cache)")
    sliding = _check_layer_ids(sliding_layers, num_layers, "sliding-window layers", src)
    is_attn = set(attn)

    # boundary: the first / last N attention layers
    first = min(cfg.boundary_first, len(attn))
    last = min(cfg.boundary_last, len(attn) - first)  # capped: first + last <= attention layers
    boundary = set(attn[:first]) | set(attn[len(attn) - last:])
    layer_format = [FORMAT_NONE if i not in is_attn else cfg.boundary_format if i in boundary else FORMAT_TQ
                    for i in range(num_layers)]
    for i in sliding:
        if i in is_attn and i not in boundary:
            layer_format[i] = cfg.sliding_format
    specs: List[Tuple[VecSpec, VecSpec]] = [(cfg.k, cfg.v)] * num_layers

    owner: Dict[int, int] = {}
    for o in cfg.overrides:
        path = f"overrides[{o.index}]"
        selected = o.layers.resolve(num_layers, f"{src}: {path}.layers")
        layers = [i for i in selected if i in is_attn]
        if not layers:
            which = f"layer {selected[0]} is a" if len(selected) == 1 else f"layers {selected[0]}-{selected[-1]} are"
            raise TQConfigError(f"{src}: {path}.layers: {o.layers.text}: {which} recurrent (linear-attention) "
                                f"layer{'' if len(selected) == 1 else 's'} without a KV cache; allowed: the "
                                f"attention layers {_spans(attn)}")
        for i in layers:
            if i in owner:
                raise TQConfigError(f"{src}: {path}.layers: {o.layers.text} overlaps overrides[{owner[i]}] "
                                    f"at layer {i}; each layer may be overridden once")
            owner[i] = o.index
        ks, vs = _override_specs(cfg, o, cfg.k, cfg.v)
        for i in layers:
            if o.format is not None:
                layer_format[i] = o.format
            elif layer_format[i] in PLAIN_FORMATS:
                kind = "sliding-window" if i in sliding and i not in boundary else "boundary"
                raise TQConfigError(f"{src}: {path}: changes k/v of layer {i}, which is a {layer_format[i]} "
                                    f"{kind} layer; "
                                    f"add 'format: tq' to quantize it, or leave it out of the range")
            specs[i] = (ks, vs)

    plans = []
    for i in range(num_layers):
        if layer_format[i] != FORMAT_TQ:
            plans.append(LayerPlan(i, False, None, None, format=layer_format[i]))
            continue
        ks, vs = specs[i]
        where = f"{src}: {'overrides[%d]' % owner[i] if i in owner else 'defaults'}"
        kf, kl = ks.to_format(head_dim, where + ".k")
        vf, vl = vs.to_format(v_head_dim, where + ".v")
        plans.append(LayerPlan(i, True, kf, vf, kl, vl))
    means = None
    if cfg.key_means is not None and cfg.key_means != KEY_MEANS_AUTO:  # auto: filled by the pool
        means = load_key_means(cfg.key_means, src)
        check_key_means_shape(means, num_layers, head_dim, num_kv_heads, f"{src}: key_means: {cfg.key_means}")
        if not any(lp.quantized for lp in plans):
            raise TQConfigError(f"{src}: key_means: {cfg.key_means}: no layer of this {num_layers}-layer model is "
                                f"quantized (boundary, sliding and overrides leave every attention layer "
                                f"{'/'.join(sorted({lp.format for lp in plans} - {FORMAT_NONE}))}), so nothing would be "
                                f"centered; allowed: key_means with at least one tq layer, or no key_means")
    return ModelPlan(cfg.name, cfg.seed, num_layers, head_dim, v_head_dim, tuple(plans), cfg.key_means,
                     cfg.window_tokens, cfg.window_requests, cfg.prefill_from_cache, sliding, means, cfg.first_token)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, (str, int, float, bool, type(None))):
            raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} as a key; keys are names",
                                                    key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, source: str = "<string>") -> TQConfig:
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TQConfigError(f"{source}: malformed YAML{line}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise TQConfigError(f"{source}: malformed YAML: {e}") from None
    return _parse(data, source)


def presets_dir() -> Path:
    """Folder of the shipped presets: package `sglang_tq.configs` (the repo's top-level configs/)."""
    try:
        from importlib.resources import files

        path = Path(str(files("sglang_tq.configs")))
        if path.is_dir():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "configs"  # source tree without an install


def list_presets() -> List[str]:
    return sorted(p.stem for p in presets_dir().glob("*.yaml"))


def _no_config(ref: str, path: Path) -> str:
    """Why `ref` names neither a YAML file nor a preset, with the nearest preset name."""
    presets = list_presets()
    if path.is_dir():
        what = "is a folder; expected a YAML file or a preset name"
    elif os.sep in ref or "/" in ref or ref.endswith((".yaml", ".yml")):
        what = f"no such file ({path.resolve()}); expected a YAML file or a preset name"
    else:
        what = "no such config file or preset"
    near = difflib.get_close_matches(Path(ref).stem, presets, n=1)
    hint = f"; did you mean '{near[0]}'?" if near else ""
    return f"{ref}: {what}{hint} (presets: {', '.join(presets)})"


def load_config(path_or_name: Union[str, os.PathLike, None] = None) -> TQConfig:
    """Load a YAML file, or a preset by name (default: turbo4)."""
    ref = DEFAULT_PRESET if path_or_name is None or str(path_or_name) == "" else str(path_or_name)
    path = Path(ref).expanduser()
    if not path.is_file():
        stem = ref[:-5] if ref.endswith(".yaml") else ref
        preset = presets_dir() / f"{stem}.yaml"
        if os.sep in ref or "/" in ref or not preset.is_file():
            raise TQConfigError(_no_config(ref, path))
        path = preset
    try:
        text = path.read_text()
    except OSError as e:
        raise TQConfigError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise TQConfigError(f"{path}: not a text file (byte {e.start} is not UTF-8); expected a YAML file") from None
    if not text.strip():
        raise TQConfigError(f"{path}: empty file; expected a mapping with keys {', '.join(_TOP_KEYS)}")
    return parse_yaml(text, str(path))


def load_env_config() -> TQConfig:
    """The config $SGLANG_TQ_CONFIG names (default turbo4); a load error says the name came from there."""
    ref = os.environ.get(CONFIG_ENV) or None
    try:
        return load_config(ref)
    except TQConfigError as e:
        if ref is None:
            raise
        raise TQConfigError(f"{e} [from {CONFIG_ENV}={ref}]") from None


# --------------------------------------------------------------------------------------------
# Sizes and summary
# --------------------------------------------------------------------------------------------
def bytes_per_token(plan_or_config: Union[ModelPlan, TQConfig], num_layers: int, num_kv_heads: int,
                    head_dim: int, v_head_dim: Optional[int] = None) -> int:
    """K + V cache bytes of one token over all layers and KV heads (bf16 layers: 2 B/element)."""
    plan = _as_plan(plan_or_config, num_layers, head_dim, v_head_dim)
    return plan.bytes_per_token(num_kv_heads)


def _as_plan(plan_or_config, num_layers, head_dim, v_head_dim) -> ModelPlan:
    if isinstance(plan_or_config, TQConfig):
        return plan_or_config.resolve(num_layers, head_dim, v_head_dim)
    plan = plan_or_config
    want = (num_layers, head_dim, head_dim if v_head_dim is None else v_head_dim)
    if (plan.num_layers, plan.head_dim, plan.v_head_dim) != want:
        raise TQConfigError(f"plan {plan.name} was resolved for (layers, head_dim, v_head_dim) = "
                            f"{(plan.num_layers, plan.head_dim, plan.v_head_dim)}, not {want}")
    return plan


def _layer_span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _spans(ids: Sequence[int]) -> str:
    """3, 7, 11 -> '3, 7, 11'; 0, 1, 2, 5 -> '0-2, 5'."""
    runs: List[List[int]] = []
    for i in ids:
        if runs and runs[-1][1] == i - 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(_layer_span(a, b) for a, b in runs)


def summary_table(plan: ModelPlan, num_kv_heads: int) -> str:
    """One row per run of consecutive identical layers, plus the total."""
    d, dv = plan.head_dim, plan.v_head_dim
    bf16_layer = num_kv_heads * (BF16_BYTES_PER_HEAD(d) + BF16_BYTES_PER_HEAD(dv))
    groups: List[List[Any]] = []
    for lp in plan.layers:
        key = lp.describe()
        if groups and groups[-1][2] == key:
            groups[-1][1] = lp.layer_id
        else:
            groups.append([lp.layer_id, lp.layer_id, key, lp.bytes_per_token_head(d, dv) * num_kv_heads])
    header = ("layers", "K", "V", "B/token/layer", "vs bf16")
    rows = [(_layer_span(a, b), k, v, str(per_layer), f"{bf16_layer / per_layer:.2f}x" if per_layer else "-")
            for a, b, (k, v), per_layer in groups]
    total = plan.bytes_per_token(num_kv_heads)
    bf16_total = plan.bf16_bytes_per_token(num_kv_heads)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    fmt_row = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [f"{plan.name}: {plan.num_layers} layers, {num_kv_heads} KV heads, head_dim {d}"
             + (f", v_head_dim {dv}" if dv != d else "") + f", seed {plan.seed}",
             fmt_row(header), fmt_row(tuple("-" * w for w in widths))]
    lines += [fmt_row(r) for r in rows]
    for what, dim in (("head_dim", d), ("v_head_dim", dv)):
        if dim in PADDED_HEAD_DIMS and (what == "head_dim" or dv != d) and plan.quantized_layers:
            lines.append(f"{what} {dim}: quantized layers code {codec_dim(dim)} coordinates (zero-padded for the "
                         f"rotation), so a vector costs what one of {codec_dim(dim)} does")
    if plan.sliding_layers:
        lines.append(f"sliding-window layers: {_spans(plan.sliding_layers)}")
    if plan.key_means_path:
        lines.append("key centering: auto (mean keys measured at start-up by a probe prefill)"
                     if plan.key_means_path == KEY_MEANS_AUTO else f"key centering: {plan.key_means_path}")
    if plan.window_bytes(num_kv_heads):
        lines.append(f"recent window: the last {plan.window_tokens} tokens exact (bf16) for up to "
                     f"{plan.window_requests} requests at a time; ring {plan.window_bytes(num_kv_heads)} B in all")
    if plan.first_token == FIRST_TOKEN_EXACT and plan.quantized_layers:
        lines.append("first token: exact (bf16 rows by token id, a few per quantized layer)")
    if plan.prefill_from_cache:
        lines.append("evaluation: prefill attends to its new tokens as the cache stores them (prefill_from_cache)")
    lines.append(f"total: {total} B/token (bf16 {bf16_total} B/token), "
                 f"compression {bf16_total / total:.2f}x, {len(plan.quantized_layers)}/{len(plan.attention_layers)} "
                 f"layers quantized" + (" (the attention layers)" if len(plan.attention_layers) < plan.num_layers else ""))
    return "\n".join(lines)


__all__ = [
    "CONFIG_ENV", "DEFAULT_PRESET", "TQConfigError", "TQConfig", "VecSpec", "OutlierSpec", "LayerPlan",
    "ModelPlan", "load_config", "load_env_config", "load_key_means", "check_key_means_shape", "parse_yaml", "list_presets", "presets_dir", "bytes_per_token", "summary_table",
]
