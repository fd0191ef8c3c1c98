"""Hook TurboQuant into SGLang 0.5.10.post1 (idempotent, cheap, no SGLang source changes).

`register()` installs four things; each is also installable on its own from the `.pth` autoload
hook (`sglang_tq._autoload`) right after the SGLang module it patches has executed:

1. `sglang.srt.server_args`: `add_attention_backend_choices(["turboquant"])` so argparse accepts
   `--attention-backend turboquant` (and the deterministic-inference list, so that
   `--enable-deterministic-inference` accepts it too); wraps `ServerArgs.__post_init__` (startup
   checks of `compat.check_server_args`: unsupported set-ups and a bad TurboQuant config fail in the
   main process, before any weight loads) and `_handle_model_specific_adjustments` (run with the
   Triton backend's name, the backend of the unquantized layers). SGLang's piecewise CUDA graphs for prefill stay as SGLang
   sets them (on by default): attention runs eagerly between the graph pieces, and the backend leaves
   the padded token rows out of the recent window's ring.
2. `sglang.srt.layers.attention.attention_registry`: `@register_attention_backend("turboquant")`.
3. `sglang.srt.model_executor.model_runner_kv_cache_mixin.ModelRunnerKVCacheMixin`:
   `get_cell_size_per_token` returns the real packed bytes/token of the layers this rank holds (so
   `max_total_num_tokens` grows by the compression ratio), `_resolve_hybrid_swa_tokens` splits the
   memory between the full and the sliding-window pool by the plan's bytes, and `_init_pools` builds
   `TQTokenToKVPool` in place of `MHATokenToKVPool` (and `TQSWAKVPool` / `TQHybridLinearKVPool` in place
   of SGLang's hybrid pools, whose sub-pools are TQTokenToKVPools) by rebinding those module globals while
   SGLang's own `_init_pools` runs, so the stock req-to-token pools (the recurrent-state pool included)
   and allocators are kept. All only when the server runs the
   turboquant backend; otherwise they call the originals. The wraps and the rebinding are
   `sglang_internals` functions (each tested against SGLang's own classes).

4. `sglang.srt.disaggregation` (common.conn, prefill, decode, decode_schedule_batch_mixin): the
   TurboQuant config check between prefill and decode workers and the recent window of transferred
   requests (`sglang_tq.disaggregation`).

The scheduler processes (spawned, one per TP/PP rank) get this through `run_scheduler_process_tq`
(passed by `sglang_tq.launch_server` as `run_scheduler_process_func`), through the launcher module
being re-executed as `__mp_main__`, or through the autoload hook.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from typing import List, Optional, Tuple

from sglang_tq.config import KEY_MEANS_AUTO
from sglang_tq.compat import BACKEND_NAME, check_runner, check_server_args, resolve_model_plan, uses_turboquant
from sglang_tq.sglang_internals import (load_tokenizer, pool_class_during, probe_key_means, server_arg,
                                        shrink_token_budget, wrap_method)

logger = logging.getLogger("sglang_tq")


# --------------------------------------------------------------------------------------------
# 1. server args
# --------------------------------------------------------------------------------------------
def install_server_args(mod) -> None:
    if BACKEND_NAME not in mod.ATTENTION_BACKEND_CHOICES:
        mod.add_attention_backend_choices([BACKEND_NAME])
    # --enable-deterministic-inference: SGLang's batch-invariant GEMMs and norms, and our decode's
    # batch-invariant split-K (the backend turns it on with this flag)
    if BACKEND_NAME not in mod.DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        mod.add_deterministic_attention_backend_choices([BACKEND_NAME])
    def make(orig_post):
        def __post_init__(self):
            orig_post(self)
            if uses_turboquant(self):
                check_server_args(self)
        return __post_init__

    wrap_method(mod.ServerArgs, "__post_init__", make)

    def make_adjust(orig_adjust):
        def _handle_model_specific_adjustments(self):
            """SGLang's per-architecture settings and checks (gpt-oss and the GDN hybrids list the attention
            backends they allow) see `triton`, the backend that serves TurboQuant's unquantized layers."""
            if not uses_turboquant(self):
                return orig_adjust(self)
            names = [n for n in _BACKEND_ARGS if getattr(self, n, None) == BACKEND_NAME]
            for n in names:
                setattr(self, n, "triton")
            try:
                return orig_adjust(self)
            finally:
                for n in names:
                    setattr(self, n, BACKEND_NAME)
        return _handle_model_specific_adjustments

    wrap_method(mod.ServerArgs, "_handle_model_specific_adjustments", make_adjust)


_BACKEND_ARGS = ("attention_backend", "prefill_attention_backend", "decode_attention_backend")


# --------------------------------------------------------------------------------------------
# 2. backend registry
# --------------------------------------------------------------------------------------------
def create_turboquant_backend(runner):
    from sglang_tq.backend import TurboQuantAttnBackend

    return TurboQuantAttnBackend(runner)


def install_registry(mod) -> None:
    if mod.ATTENTION_BACKENDS.get(BACKEND_NAME) is create_turboquant_backend:
        return
    mod.register_attention_backend(BACKEND_NAME)(create_turboquant_backend)


# --------------------------------------------------------------------------------------------
# 3. KV pool + capacity
# --------------------------------------------------------------------------------------------
def runner_plan(runner):
    """The TurboQuant plan of this model (cached on the runner). Layer ids are global."""
    plan = getattr(runner, "_tq_plan", None)
    if plan is None:
        _, plan = resolve_model_plan(runner.model_config)
        runner._tq_plan = plan
    return plan


def kv_layer_ids(runner, num_layers: Optional[int] = None) -> List[int]:
    """Model layer ids with a KV cache on this rank: the attention layers of a linear-attention hybrid in
    [start_layer, end_layer), else `num_layers` (default: the rank's effective layer count) from start_layer."""
    start = getattr(runner, "start_layer", 0) or 0
    linear = getattr(runner, "mambaish_config", None)
    if linear is not None:
        end = getattr(runner, "end_layer", None)
        return [i for i in linear.full_attention_layer_ids if start <= i and (end is None or i < end)]
    plan = runner_plan(runner)
    n = num_layers if num_layers is not None else (getattr(runner, "num_effective_layers", None)
                                                   or plan.num_layers - start)
    return list(range(start, min(start + n, plan.num_layers)))


def _runner_uses_tq(runner) -> bool:
    return uses_turboquant(runner.server_args)


def tq_cell_size_per_token(runner, num_layers: int, num_kv_heads: int) -> int:
    """K + V bytes of one token over this rank's layers with a KV cache (`kv_layer_ids`; SGLang passes the
    attention-layer count of a linear-attention hybrid, all layers otherwise). With hybrid SWA memory
    this is the bytes of one token in both pools, as SGLang's profile counts it."""
    return runner_plan(runner).layers_bytes_per_token(num_kv_heads, kv_layer_ids(runner, num_layers))


def swa_pool_bytes(runner, num_kv_heads: int) -> Tuple[int, int]:
    """(full-attention, sliding-window) layers' bytes of one token under hybrid SWA memory."""
    plan, mc = runner_plan(runner), runner.model_config
    return (plan.layers_bytes_per_token(num_kv_heads, mc.full_attention_layer_ids),
            plan.layers_bytes_per_token(num_kv_heads, mc.swa_attention_layer_ids))


def tq_hybrid_swa_tokens(runner, token_capacity: int, num_kv_heads: int) -> Tuple[int, int, int]:
    """SGLang's split of the profiled memory between the full and the sliding-window pool
    (`_resolve_hybrid_swa_tokens`: swa_tokens = swa_full_tokens_ratio x full_tokens, both pools filling the
    memory of `token_capacity` tokens of every layer) with this plan's bytes per layer instead of bf16's."""
    full_b, swa_b = swa_pool_bytes(runner, num_kv_heads)
    page = int(server_arg(runner.server_args, "page_size") or 1)
    if not runner.model_config.full_attention_layer_ids:
        cap = token_capacity // page * page
        return cap, 0, cap
    ratio = float(server_arg(runner.server_args, "swa_full_tokens_ratio"))
    memory = token_capacity * (full_b + swa_b)
    full = int(memory / (full_b + ratio * swa_b)) // page * page
    swa = int(full * ratio) // page * page
    logger.info("TurboQuant hybrid SWA memory: full-attention pool %d tokens (%d B/token), sliding-window pool %d "
                "tokens (%d B/token)", full, full_b, swa, swa_b)
    return full, full, swa


def ring_bytes(plan, num_kv_heads: int, requests: int, layers, staged_rows: int = 0) -> int:
    """Bytes of the recent-window rings of the quantized `layers` (ModelPlan.exact_row_bytes per row):
    window_tokens rows per request plus `staged_rows` rows of the same shape (speculative verify's
    DraftStaging)."""
    if not getattr(plan, "window_tokens", 0):
        return 0
    return plan.exact_row_bytes(num_kv_heads, layers) * (plan.window_tokens + staged_rows) * requests


def first_token_bytes(plan, num_kv_heads: int, layers, slots: int) -> int:
    """Bytes of the exact first token over the quantized `layers`: FIRST_TOKEN_ENTRIES exact rows
    (ModelPlan.exact_row_bytes) and one flag byte per slot of a pool of `slots`; 0 with first_token: codes."""
    from sglang_tq.config import FIRST_TOKEN_ENTRIES, FIRST_TOKEN_EXACT

    rows = plan.exact_row_bytes(num_kv_heads, layers)
    if getattr(plan, "first_token", None) != FIRST_TOKEN_EXACT or not rows:
        return 0
    return rows * FIRST_TOKEN_ENTRIES + slots


def reserve_window_memory(runner, plan, mod) -> int:
    """Request slots the recent window's ring covers (0: no window), after taking the ring's bytes and the
    exact first token's tables out of the token budget SGLang computed (max_total_num_tokens), so the pool
    plus both fit where SGLang planned the pool alone."""
    window = bool(getattr(plan, "window_tokens", 0))
    requests = (min(int(getattr(runner, "max_running_requests", None) or plan.window_requests), plan.window_requests)
                if window else 0)
    heads = runner.model_config.get_num_kv_heads(mod.get_attention_tp_size())
    # speculative verify stages each ring request's draft tokens in rows shaped like the ring's (DraftStaging)
    draft = int(server_arg(runner.server_args, "speculative_num_draft_tokens") or 0) \
        if server_arg(runner.server_args, "speculative_algorithm") else 0
    if getattr(runner, "is_hybrid_swa", False):  # ring and tables serve the full-attention layers (TQSWAKVPool)
        full_b, swa_b = swa_pool_bytes(runner, heads)
        ratio = runner.swa_max_total_num_tokens / max(runner.full_max_total_num_tokens, 1)
        layers = runner.model_config.full_attention_layer_ids
        cell = full_b + ratio * swa_b  # memory of one full-pool token, its share of the SWA pool included
    else:
        layers = kv_layer_ids(runner)
        cell = tq_cell_size_per_token(runner, len(layers), heads)
    ring = ring_bytes(plan, heads, requests, layers, draft) if window else 0
    page = int(server_arg(runner.server_args, "page_size") or 1)
    tables = first_token_bytes(plan, heads, layers, runner.max_total_num_tokens + page)
    if not ring + tables:
        return 0
    cut = int(-(-(ring + tables) // max(cell, 1)))
    if not ring:  # the first token's tables alone: a few rows per layer
        if not server_arg(runner.server_args, "max_total_tokens") and cut < runner.max_total_num_tokens:
            shrink_token_budget(runner, cut)
        return 0
    if server_arg(runner.server_args, "max_total_tokens"):  # a user cap: the pool is below what memory allows
        logger.info("TurboQuant recent window: last %d tokens exact for up to %d requests; ring %.1f MiB next to "
                    "the --max-total-tokens pool", plan.window_tokens, requests, ring / 2**20)
        return requests
    if cut >= runner.max_total_num_tokens:
        raise RuntimeError(f"TurboQuant: the recent window's ring ({ring} B for {requests} requests x "
                           f"{plan.window_tokens} tokens) does not fit next to the KV pool; lower window.requests "
                           f"or window.tokens in the config, or raise --mem-fraction-static")
    shrink_token_budget(runner, cut)
    logger.info("TurboQuant recent window: last %d tokens exact for up to %d requests; ring %.1f MiB "
                "(= %d tokens of the pool)", plan.window_tokens, requests, ring / 2**20, cut)
    return requests


def install_mixin(mod) -> None:
    M = mod.ModelRunnerKVCacheMixin

    def make_cell(orig_cell):
        def get_cell_size_per_token(self, num_layers: int) -> int:
            if not _runner_uses_tq(self):
                return orig_cell(self, num_layers)
            check_runner(self)
            heads = self.model_config.get_num_kv_heads(mod.get_attention_tp_size())
            return tq_cell_size_per_token(self, num_layers, heads)
        return get_cell_size_per_token

    def make_swa_split(orig_split):
        def _resolve_hybrid_swa_tokens(self, token_capacity: int):
            if not _runner_uses_tq(self):
                return orig_split(self, token_capacity)
            heads = self.model_config.get_num_kv_heads(mod.get_attention_tp_size())
            return tq_hybrid_swa_tokens(self, token_capacity, heads)
        return _resolve_hybrid_swa_tokens

    def make_init(orig_init):
        def _init_pools(self):
            if not _runner_uses_tq(self):
                return orig_init(self)
            check_runner(self)
            from sglang_tq.pool import TQ_POOLS, TQHybridLinearKVPool, TQSWAKVPool, TQTokenToKVPool

            plan = runner_plan(self)
            window_requests = reserve_window_memory(self, plan, mod)
            built = dict(plan=plan, window_requests=window_requests)
            with pool_class_during(mod, functools.partial(TQTokenToKVPool, **built)), \
                    pool_class_during(mod, functools.partial(TQSWAKVPool, **built), "SWAKVPool"), \
                    pool_class_during(mod, functools.partial(TQHybridLinearKVPool, **built), "HybridLinearKVPool"):
                orig_init(self)
            pool = self.token_to_kv_pool
            if not isinstance(pool, TQ_POOLS):
                raise RuntimeError(f"TurboQuant: SGLang built {type(pool).__name__} instead of a TurboQuant pool; "
                                   f"this model/set-up takes a KV-pool branch TurboQuant does not support")
            if plan.key_means_path == KEY_MEANS_AUTO:  # before any key is stored
                run_key_means_probe(self, pool)
            drop_key_means_for_sinks(pool, plan, getattr(self, "model", None))
            _log_startup(self, plan, pool)
        return _init_pools

    wrap_method(M, "get_cell_size_per_token", make_cell)
    wrap_method(M, "_resolve_hybrid_swa_tokens", make_swa_split)
    wrap_method(M, "_init_pools", make_init)


def run_key_means_probe(runner, pool) -> None:
    """`key_means: auto`: the key means of every quantized layer from one prefill of the probe text through
    the loaded model (sglang_tq.key_means). Where a single-request prefill of the decoder stack cannot run
    alone, the keys stay uncentered, with a warning naming why."""
    from sglang_tq.backend import _model_logit_caps, _model_sinks_dtype
    from sglang_tq.key_means import probe_token_ids
    from sglang_tq.pool import TQHybridLinearKVPool

    model = runner.model
    if _model_sinks_dtype(model) is not None:
        return  # drop_key_means_for_sinks says why
    if len(_model_logit_caps(model)) > 1:
        logger.warning("TurboQuant: key_means: auto: keys stay uncentered: the model's attention logit softcapping "
                       "changes softcapped scores under the per-query shift centering adds")
        return
    why = ("pipeline parallelism" if getattr(runner, "pp_size", 1) > 1
           else "DP attention" if server_arg(runner.server_args, "enable_dp_attention")
           else "linear-attention layers" if isinstance(pool, TQHybridLinearKVPool) else None)
    if why:
        logger.warning("TurboQuant: key_means: auto needs one prefill of the model alone; with %s the keys stay "
                       "uncentered (a key_means file from scripts/calibrate.py --key-means-out centers them)", why)
        return
    start = time.perf_counter()
    try:  # every rank runs the same code on the same files and tokens, so all fail alike or none does
        ids = probe_token_ids(load_tokenizer(runner.server_args))
        means = probe_key_means(model, ids)
    except Exception as e:  # no tokenizer, or a decoder stack that needs more than a text prefill (multimodal)
        logger.warning("TurboQuant: key_means: auto: the probe prefill failed on %s (%s: %s); the keys stay "
                       "uncentered", type(model).__name__, type(e).__name__, e)
        return
    if not all(bool(mu.isfinite().all()) for mu in means.values()):  # e.g. dummy weights that overflow
        logger.warning("TurboQuant: key_means: auto: the probe prefill gave non-finite keys; the keys stay "
                       "uncentered")
        return
    pool.use_auto_key_means(means)
    if getattr(runner, "tp_rank", 0) in (0, None):
        logger.info("TurboQuant key_means: auto: means of every quantized layer from a %d-token probe prefill "
                    "(%.2f s)", len(ids), time.perf_counter() - start)


def drop_key_means_for_sinks(pool, plan, model) -> bool:
    """A model with attention sinks (gpt-oss) stores its keys uncentered: a sink logit joins the softmax
    denominator, so the per-query shift q.mu that centering adds to every score would change the result.
    Returns True when means were dropped (logged)."""
    from sglang_tq.backend import _model_sinks_dtype

    if plan.key_means_path is None or _model_sinks_dtype(model) is None:
        return False
    pool.drop_key_means()
    logger.warning("TurboQuant: key centering (key_means: %s) is off for this model: its attention sinks make the "
                   "softmax change under the per-query shift centering adds", plan.key_means_path)
    return True


def _log_startup(runner, plan, pool) -> None:
    if getattr(runner, "tp_rank", 0) not in (0, None):
        return
    from sglang_tq.config import CONFIG_ENV

    heads = pool.head_num
    layers = [lid for p in getattr(pool, "tq_subpools", [pool]) for lid in p.layer_ids]
    tq = plan.layers_bytes_per_token(heads, layers)
    bf16 = heads * len(layers) * 2 * (pool.head_dim + pool.v_head_dim)
    where = (f" (PP rank {runner.pp_rank}: layers {layers[0]}-{layers[-1]})"
             if getattr(runner, "pp_size", 1) > 1 else "")
    logger.info("TurboQuant config %s (%s=%s)\n%s", plan.name, CONFIG_ENV, os.environ.get(CONFIG_ENV) or "<unset: turbo4>",
                plan.summary(heads))
    logger.info("TurboQuant KV pool%s: %d B/token vs %d B/token bf16 (%.2fx smaller); max_total_num_tokens=%d%s",
                where, tq, bf16, bf16 / tq, pool.size,
                f", sliding-window pool {pool.size_swa} tokens" if hasattr(pool, "size_swa") else "")


# --------------------------------------------------------------------------------------------
# 4. PD disaggregation (sglang_tq.disaggregation)
# --------------------------------------------------------------------------------------------
def install_disagg_conn(mod) -> None:
    from sglang_tq.disaggregation import install_conn

    install_conn(mod)


def install_disagg_prefill(mod) -> None:
    from sglang_tq.disaggregation import install_prefill

    install_prefill(mod)


def install_disagg_decode(mod) -> None:
    from sglang_tq.disaggregation import install_decode

    install_decode(mod)


def install_disagg_prebuilt(mod) -> None:
    from sglang_tq.disaggregation import install_prebuilt

    install_prebuilt(mod)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def register() -> None:
    """Install everything (idempotent). Imports SGLang."""
    import sglang.srt.disaggregation.common.conn as disagg_conn
    import sglang.srt.disaggregation.decode as disagg_decode
    import sglang.srt.disaggregation.decode_schedule_batch_mixin as disagg_prebuilt
    import sglang.srt.disaggregation.prefill as disagg_prefill
    import sglang.srt.layers.attention.attention_registry as registry
    import sglang.srt.model_executor.model_runner_kv_cache_mixin as mixin
    import sglang.srt.server_args as server_args

    install_server_args(server_args)
    install_registry(registry)
    install_mixin(mixin)
    install_disagg_conn(disagg_conn)
    install_disagg_prefill(disagg_prefill)
    install_disagg_decode(disagg_decode)
    install_disagg_prebuilt(disagg_prebuilt)


def run_scheduler_process_tq(*args, **kwargs):
    """`run_scheduler_process` with TurboQuant registered first (target of the spawned schedulers)."""
    register()
    from sglang.srt.managers.scheduler import run_scheduler_process

    return run_scheduler_process(*args, **kwargs)
