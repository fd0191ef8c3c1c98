"""Startup checks: refuse set-ups the TurboQuant backend does not support, with a clear message.

Two layers of checks, both raising `TQUnsupportedError` (a ValueError):

* `check_server_args(server_args)` — main process, right after SGLang's `ServerArgs.__post_init__`
  (before any process is spawned or weight is loaded). Uses the server arguments and SGLang's
  `ModelConfig` (built from the HF config by `server_args.get_model_config()`), and resolves the
  TurboQuant config against the model's layer count / head_dim.
* `check_runner(runner)` — every scheduler process, inside `_init_pools` (after weights, before the
  KV pool is allocated), with what only the loaded model knows (hybrid layers).

Sliding-window layers and attention sinks are served (the kernels take the layer's window and sinks),
in one KV pool for all layers or in SGLang's hybrid SWA memory (a full-attention pool and a sliding-window
pool, pool.TQSWAKVPool). Linear-attention hybrids with Gated DeltaNet layers (Qwen3-Next, Qwen3.5) keep
SGLang's recurrent-state pool; their attention layers use the packed pool (pool.TQHybridLinearKVPool).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

from sglang_tq.config import KEY_MEANS_AUTO, TQConfigError
from sglang_tq.sglang_internals import server_arg
from tq_kernels.codec import SUPPORTED_HEAD_DIMS  # 80 and 96 are zero-padded to 128 inside the codec

BACKEND_NAME = "turboquant"
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16")
_PREFIX = "TurboQuant (--attention-backend turboquant) does not support "
SWA_OWN_SHAPE = ("sliding-window layers with their own KV head count or head dims (MiMo-V2-Flash): one plan "
                 "and one pair of codecs per head shape. Start with --disable-hybrid-swa-memory")
LINEAR_NOT_GDN = ("Mamba2, Kimi-linear and lightning-attention hybrids: served are the Gated DeltaNet hybrids "
                  "(Qwen3-Next, Qwen3.5); the stock Triton kernels that serve the unquantized layers read layer "
                  "0's cache, a recurrent layer in these models")


# Speculative decoding: NGRAM (no draft model) verifies over the packed cache (sglang_tq.speculative). The
# draft-model algorithms (EAGLE, EAGLE3, STANDALONE; MTP runs as EAGLE) are refused: SGLang gives the draft
# runner the target's pool size in tokens, which the packed pool multiplies, without budgeting the draft's own
# BF16 pool for it, and drafts with DRAFT_EXTEND and multi-step draft decode, which this backend does not run.
SPECULATIVE_ALGORITHMS = ("NGRAM",)
SPECULATIVE_SLIDING = ("speculative decoding on a model with sliding-window layers: the verify step reads the whole "
                       "packed prefix and has no window mask")
DRAFT_MODEL_REFUSAL = ("the draft model's KV pool would get the target's token count, which TurboQuant raises by its "
                       "compression ratio (a BF16 draft pool that large is not budgeted for), and its forward modes "
                       "(DRAFT_EXTEND, multi-step draft decode) are not implemented on the TurboQuant backend; NGRAM "
                       "(--speculative-algorithm NGRAM, no draft model) is supported")


class TQUnsupportedError(ValueError):
    """A server set-up that the TurboQuant backend refuses."""


def uses_turboquant(server_args) -> bool:
    """True if any attention backend (main, prefill or decode) is turboquant."""
    names = (server_arg(server_args, "attention_backend"), server_arg(server_args, "prefill_attention_backend"),
             server_arg(server_args, "decode_attention_backend"))
    return BACKEND_NAME in names


def _problems_server_args(sa) -> List[str]:
    def arg(name):
        return server_arg(sa, name)

    p = []
    main = arg("attention_backend")
    pre = arg("prefill_attention_backend") or main
    dec = arg("decode_attention_backend") or main
    if pre != BACKEND_NAME or dec != BACKEND_NAME:
        p.append(f"mixing attention backends (prefill={pre}, decode={dec}): the KV pool is shared, so "
                 f"every backend must be turboquant. Use --attention-backend turboquant alone")
    kvd = str(arg("kv_cache_dtype"))
    if kvd not in SUPPORTED_KV_CACHE_DTYPES:
        p.append(f"--kv-cache-dtype {kvd}: TurboQuant is the KV-cache quantization; use --kv-cache-dtype auto "
                 f"(or bf16) and pick bit widths with --tq-config / SGLANG_TQ_CONFIG")
    algo = arg("speculative_algorithm")
    if algo and str(algo).upper() not in SPECULATIVE_ALGORITHMS:
        p.append(f"--speculative-algorithm {algo}: {DRAFT_MODEL_REFUSAL}")
    if arg("enable_hierarchical_cache"):
        p.append("the hierarchical cache (--enable-hierarchical-cache): host pools copy bf16 rows")
    if arg("enable_double_sparsity"):
        p.append("double sparsity (--enable-double-sparsity)")
    if int(arg("page_size") or 1) > 1:
        p.append(f"--page-size {arg('page_size')}: v1 supports page size 1 only")
    from sglang_tq.disaggregation import problems_server_args as disaggregation_problems

    p += disaggregation_problems(arg)
    if arg("dllm_algorithm"):
        p.append(f"diffusion LLM decoding (--dllm-algorithm {arg('dllm_algorithm')})")
    if int(arg("attn_cp_size") or 1) > 1:
        p.append(f"attention context parallelism (--attn-cp-size {arg('attn_cp_size')})")
    if arg("enable_hisparse"):
        p.append("HiSparse (--enable-hisparse)")
    if arg("enable_lmcache"):
        p.append("LMCache (--enable-lmcache)")
    return p


def _problems_model_config(mc) -> List[str]:
    """Checks on SGLang's ModelConfig (main process or scheduler)."""
    p = []
    try:
        from sglang.srt.configs.model_config import AttentionArch

        if getattr(mc, "attention_arch", None) == AttentionArch.MLA:
            p.append("MLA models (DeepSeek-style latent attention); TurboQuant compresses per-head K/V (MHA/GQA)")
    except ImportError:  # pragma: no cover
        pass
    if getattr(mc, "is_hybrid_swa", False) and (
            getattr(mc, "is_hybrid_swa_compress", False)
            or getattr(mc, "swa_head_dim", mc.head_dim) != mc.head_dim
            or getattr(mc, "swa_v_head_dim", getattr(mc, "v_head_dim", mc.head_dim)) != getattr(mc, "v_head_dim", mc.head_dim)):
        p.append(SWA_OWN_SHAPE)
    if getattr(mc, "is_encoder_decoder", False):
        p.append("encoder-decoder models (cross attention)")
    if getattr(mc, "attention_chunk_size", None):
        p.append(f"chunked local attention (attention_chunk_size={mc.attention_chunk_size}): a query sees only "
                 f"its own chunk of positions, a mask the kernels do not have; SGLang serves it through its SWA "
                 f"pool and FlashAttention 3's local-attention metadata")
    hd = getattr(mc, "head_dim", None)
    vhd = getattr(mc, "v_head_dim", hd)
    if hd is not None and hd not in SUPPORTED_HEAD_DIMS:
        p.append(f"head_dim {hd} (supported: {', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
    if hd is not None and vhd is not None and vhd != hd:
        p.append(f"v_head_dim {vhd} != head_dim {hd}")
    return p


def _problems_runner(runner) -> List[str]:
    p = []
    if getattr(runner, "use_mla_backend", False):
        p.append("MLA models (DeepSeek-style latent attention)")
    if getattr(runner, "mambaish_config", None) is not None and getattr(runner, "hybrid_gdn_config", None) is None:
        p.append(LINEAR_NOT_GDN)
    if (getattr(runner, "is_hybrid_swa", False) or getattr(runner, "mambaish_config", None) is not None) and \
            str(server_arg(runner.server_args, "disaggregation_mode") or "null") != "null":
        p.append("PD disaggregation of a model with hybrid KV pools (sliding-window or recurrent layers): the "
                 "transfer describes one packed pool")
    if getattr(runner, "is_draft_worker", False):
        p.append("speculative-decoding draft workers")
    if server_arg(runner.server_args, "speculative_algorithm"):
        from sglang_tq.backend import TurboQuantAttnBackend, _attention_layers

        if any(TurboQuantAttnBackend._sliding_window(m) for m in _attention_layers(getattr(runner, "model", None))):
            p.append(SPECULATIVE_SLIDING)
    if getattr(runner, "enable_hisparse", False):
        p.append("HiSparse")
    import torch

    kvd = getattr(runner, "kv_cache_dtype", None)
    if kvd is not None and kvd not in (torch.bfloat16, torch.float16):
        p.append(f"a {kvd} KV cache (the model/KV dtype must be bfloat16 or float16; an FP8 KV checkpoint "
                 f"selects fp8 with --kv-cache-dtype auto)")
    try:
        from sglang.srt.utils import is_hip

        if is_hip():
            p.append("ROCm/HIP (fused RoPE+KV writes bypass the pool there)")
    except ImportError:  # pragma: no cover
        pass
    return p


def _raise(problems: Iterable[str]) -> None:
    problems = list(dict.fromkeys(problems))
    if not problems:
        return
    if len(problems) == 1:
        raise TQUnsupportedError(_PREFIX + problems[0] + ".")
    raise TQUnsupportedError(_PREFIX + "this set-up:\n" + "\n".join(f"  - {x}" for x in problems))


def resolve_plan_for(num_layers: int, head_dim: int, v_head_dim: Optional[int] = None, cfg_ref: Optional[str] = None,
                     num_kv_heads: Optional[int] = None, attention_layers: Optional[Sequence[int]] = None,
                     sliding_layers: Sequence[int] = ()):
    """Load the TurboQuant config named by `cfg_ref` (or $SGLANG_TQ_CONFIG, default turbo4) and
    resolve it for the model (num_kv_heads: total KV heads, checked against key_means when given;
    attention_layers / sliding_layers: `layer_kinds`). Raises TQConfigError."""
    from sglang_tq.config import load_config, load_env_config

    cfg = load_config(cfg_ref) if cfg_ref is not None else load_env_config()
    return cfg, cfg.resolve(int(num_layers), int(head_dim), None if v_head_dim is None else int(v_head_dim),
                            num_kv_heads=num_kv_heads, attention_layers=attention_layers,
                            sliding_layers=sliding_layers)


def layer_kinds(mc) -> Tuple[Optional[Tuple[int, ...]], Tuple[int, ...]]:
    """(attention layers, sliding-window layers) of an SGLang ModelConfig, as model layer ids. Attention
    layers are None (all) except in a linear-attention hybrid, whose config lists its full-attention
    layers; sliding-window layers come from SGLang's hybrid SWA split or the config's layer_types."""
    tc = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    attention = None
    if getattr(tc, "linear_layer_ids", None) is not None:  # Qwen3-Next / Qwen3.5 config classes
        attention = tuple(int(i) for i in tc.full_attention_layer_ids)
    if getattr(mc, "is_hybrid_swa", False) and getattr(mc, "swa_attention_layer_ids", None) is not None:
        sliding = tuple(int(i) for i in mc.swa_attention_layer_ids)
    else:
        types = getattr(tc, "layer_types", None) or ()
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return attention, sliding


def resolve_model_plan(mc, cfg_ref: Optional[str] = None):
    """(config, plan) of the TurboQuant config for an SGLang ModelConfig."""
    attention, sliding = layer_kinds(mc)
    return resolve_plan_for(mc.num_hidden_layers, mc.head_dim, mc.v_head_dim, cfg_ref,
                            num_kv_heads=total_kv_heads(mc), attention_layers=attention, sliding_layers=sliding)


def total_kv_heads(mc) -> Optional[int]:
    """Total (pre-TP) KV head count of an SGLang ModelConfig, or None when it cannot be read."""
    try:
        get = getattr(mc, "get_total_num_kv_heads", None)
        n = get() if get is not None else getattr(mc, "num_key_value_heads", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) else None
    except Exception:
        return None


def logit_softcap(mc) -> float:
    """The attention logit softcap the model's SGLang code applies (0: none): Gemma 2's
    attn_logit_softcapping; Grok's, whose SGLang model defaults it to 30."""
    tc = getattr(mc, "hf_text_config", None) or getattr(mc, "hf_config", None)
    cap = getattr(tc, "attn_logit_softcapping", None)
    if cap is None and any("Grok" in str(a) for a in (getattr(tc, "architectures", None) or ())):
        cap = 30.0
    return float(cap) if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap > 0 else 0.0


def _config_problems(cfg, plan, server_args, mc) -> List[str]:
    """Config keys that contradict the server arguments or the model: found here, before weights load, instead
    of in the scheduler or at the first forward. Each names the key, its value and what is allowed."""
    p = []
    algo = server_arg(server_args, "speculative_algorithm")
    if algo:
        drafts = int(server_arg(server_args, "speculative_num_draft_tokens") or 0)
        if plan.window_tokens and plan.quantized_layers and drafts > plan.window_tokens:
            p.append(f"window.tokens: {plan.window_tokens} is narrower than --speculative-num-draft-tokens {drafts}; "
                     f"allowed with speculative decoding: 0 (off) or >= {drafts} (a verify step commits its draft "
                     f"tokens to the recent window together)")
        if plan.prefill_from_cache:
            p.append(f"evaluation.prefill_from_cache: true does not combine with --speculative-algorithm {algo} "
                     f"(it is a perplexity mode); allowed there: false")
    cap = logit_softcap(mc)
    if cap and plan.quantized_layers and cfg.key_means is not None:
        if cfg.key_means != KEY_MEANS_AUTO:  # auto: the start-up probe leaves such a model uncentered
            p.append(f"key_means: {cfg.key_means}: key centering is not exact with the model's attention logit "
                     f"softcapping at {cap:g} (softcapped scores change under the per-query shift centering adds); "
                     f"allowed for this model: no key_means")
    return p


def check_server_args(server_args, resolve: bool = True):
    """Main-process check. Returns the resolved plan (or None when the model config is unavailable)."""
    if not uses_turboquant(server_args):
        return None
    problems = _problems_server_args(server_args)
    mc = None
    if str(server_arg(server_args, "model_path") or "").lower() not in ("", "none", "dummy"):
        try:
            mc = server_args.get_model_config()
        except Exception:  # model config unreadable here: the scheduler-side checks still run
            mc = None
    if mc is not None:
        problems += _problems_model_config(mc)
        if server_arg(server_args, "speculative_algorithm") and layer_kinds(mc)[1]:
            problems.append(SPECULATIVE_SLIDING)
    _raise(problems)
    if mc is not None and resolve:
        cfg, plan = resolve_model_plan(mc)
        problems = _config_problems(cfg, plan, server_args, mc)
        if problems:
            raise TQConfigError(f"{cfg.source}: " + problems[0] if len(problems) == 1 else
                                f"{cfg.source}:\n" + "\n".join(f"  - {x}" for x in problems))
        return plan
    return None


def check_runner(runner) -> None:
    """Scheduler-side check (inside _init_pools)."""
    problems = _problems_server_args(runner.server_args)
    problems += _problems_model_config(runner.model_config)
    problems += _problems_runner(runner)
    _raise(problems)
