"""Every place TurboQuant relies on SGLang 0.5.10.post1 internals rather than its public extension points.

Each function here names the internal it uses and why; tests/test_sglang_internals.py checks each one
against the real SGLang class on the CPU, so an SGLang upgrade that changes one fails a test instead of
silently serving a wrong cache:

* `wrap_method`: the three method wraps of registration.py (ServerArgs.__post_init__,
  ModelRunnerKVCacheMixin.get_cell_size_per_token and _init_pools), idempotent.
* `pool_class_during`: `_init_pools` constructs the MHA pool through the module global
  `model_runner_kv_cache_mixin.MHATokenToKVPool`; rebinding it while the stock method runs makes SGLang
  build the TurboQuant pool and keep its own req-to-token pool and allocator.
* `POOL_DTYPE`: models with a fused RoPE + KV write (`models/utils.enable_fused_set_kv_buffer`) take it
  only when `token_to_kv_pool.dtype == torch.bfloat16`; the pool reports uint8 so that every K/V write
  goes through its `set_kv_buffer` (a fused write would store bf16 rows past the packed buffers).
* `lowest_free_first`: the recent window's ring covers low request indices; `ReqToTokenPool.free`
  appends to `free_slots` and `alloc` pops from the front.
* `on_new_request_slots`: `ReqToTokenPool.alloc(reqs)` gives an index to the requests whose `req_pool_idx` is
  None and keeps the others' (a chunked request, a streaming session's turn); the recent window marks the
  newly handed-out slots so that their ring rows (another request's) are never read.
* `shrink_token_budget`: `_init_pools` sizes the pool by the runner's `max_total_num_tokens` (and its
  `MemoryPoolConfig` keeps a copy); the recent window's ring takes its bytes out of that budget.
* `server_arg`: server arguments are read by name; a name SGLang renamed or removed raises instead of
  reading a default.
* `load_tokenizer`: the served model's tokenizer, loaded as SGLang's TokenizerManager loads it.
* `probe_key_means`: one prefill through the loaded model's decoder stack (`model.model(input_ids,
  positions, forward_batch)`) with a hand-built EXTEND ForwardBatch; RadixAttention hands q, k, v (k after
  RoPE) to `forward_batch.attn_backend.forward` outside piecewise CUDA graphs, so a backend of its own sees
  every layer's keys and nothing reaches the KV pool.

Two more the backend relies on, with their tests there: the CUDA-graph runner pads a decode batch with
the backend's seq_len fill value (1) and stale request indices (the recent window tells padding rows by
their length), and the piecewise-graph runner builds the attention metadata from the unpadded batch while
the layers see tokens padded with out_cache_loc 0 (the window pads its ring rows with "none"). The pool
also answers `get_value_buffer(0)` on later pipeline ranks, which SGLang's Triton backend reads at
construction.
"""
from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
from typing import Callable, FrozenSet, Iterator

import torch

# The dtype the TurboQuant pool reports as `dtype` (never the model's 16-bit dtype): see the module docstring.
POOL_DTYPE = torch.uint8
_MARK = "_sglang_tq_wrapped"


class SGLangInternalsError(RuntimeError):
    """SGLang no longer has an internal TurboQuant relies on (another SGLang version)."""


def wrap_method(cls, name: str, make: Callable[[Callable], Callable]) -> bool:
    """cls.<name> = make(original), once per class and name (a second call is a no-op). Returns True when
    it wrapped."""
    marks = cls.__dict__.get(_MARK, frozenset())
    if name in marks:
        return False
    orig = getattr(cls, name, None)
    if orig is None:
        raise SGLangInternalsError(f"TurboQuant: SGLang's {cls.__name__} has no method {name} to extend")
    setattr(cls, name, functools.wraps(orig)(make(orig)))
    setattr(cls, _MARK, marks | {name})
    return True


@contextlib.contextmanager
def pool_class_during(module, factory, name: str = "MHATokenToKVPool") -> Iterator[None]:
    """While the block runs, code of `module` (SGLang's model_runner_kv_cache_mixin, or memory_pool for the
    pool HybridLinearKVPool builds inside) builds `factory(...)` where it would build the pool class
    `name` (same arguments)."""
    if not hasattr(module, name):
        raise SGLangInternalsError(f"TurboQuant: {getattr(module, '__name__', module)} no longer imports {name}; "
                                   f"the KV pool cannot "
                                   f"be replaced on this SGLang version")
    stock = getattr(module, name)
    setattr(module, name, factory)
    try:
        yield
    finally:
        setattr(module, name, stock)


def lowest_free_first(req_to_token_pool) -> None:
    """Make SGLang's req-to-token pool hand out its lowest free request index (it appends freed ones at the
    end and pops from the front, cycling through every index), so the requests running at the same time
    are the ones the recent window's ring covers. Idempotent."""
    if getattr(req_to_token_pool, "_tq_lowest_first", False):
        return
    if not isinstance(getattr(req_to_token_pool, "free_slots", None), list):
        raise SGLangInternalsError(f"TurboQuant: {type(req_to_token_pool).__name__} has no free_slots list; the "
                                   f"recent window needs SGLang's ReqToTokenPool")
    orig_free = req_to_token_pool.free

    def free(req):
        idx = req.req_pool_idx
        orig_free(req)
        slots = req_to_token_pool.free_slots
        if idx is not None and slots and slots[-1] == idx:
            slots.pop()
            bisect.insort(slots, idx)

    req_to_token_pool.free_slots = sorted(req_to_token_pool.free_slots)
    req_to_token_pool.free = free
    req_to_token_pool._tq_lowest_first = True


def on_new_request_slots(req_to_token_pool, callback: Callable[[list], None]) -> None:
    """After SGLang's req-to-token pool hands request indices to requests that had none (`alloc`: a new request,
    a retracted one readmitted), call callback(those indices). A chunked request's next chunk and a streaming
    session's next turn keep their index (no new one). One wrap per pool; a later call replaces the callback."""
    req_to_token_pool._tq_on_new_slots = callback
    if getattr(req_to_token_pool, "_tq_alloc_wrapped", False):
        return
    orig_alloc = req_to_token_pool.alloc

    def alloc(reqs, *args, **kwargs):
        new = [r for r in reqs if r.req_pool_idx is None]
        out = orig_alloc(reqs, *args, **kwargs)
        if out is not None and new:
            req_to_token_pool._tq_on_new_slots([r.req_pool_idx for r in new])
        return out

    req_to_token_pool.alloc = alloc
    req_to_token_pool._tq_alloc_wrapped = True


def shrink_token_budget(runner, tokens: int) -> None:
    """Take `tokens` out of the KV pool size SGLang computed, before `_init_pools` builds the pool. With
    hybrid SWA memory `tokens` are full-pool tokens and the sliding-window pool shrinks in proportion."""
    full = runner.max_total_num_tokens
    runner.max_total_num_tokens -= tokens
    cfg = getattr(runner, "memory_pool_config", None)
    if cfg is not None:
        cfg.max_total_num_tokens = runner.max_total_num_tokens
    if getattr(runner, "is_hybrid_swa", False) and full > 0:
        swa = int(runner.swa_max_total_num_tokens * runner.max_total_num_tokens / full)
        runner.full_max_total_num_tokens = runner.max_total_num_tokens
        runner.swa_max_total_num_tokens = swa
        if cfg is not None:
            cfg.full_max_total_num_tokens, cfg.swa_max_total_num_tokens = runner.max_total_num_tokens, swa


@functools.lru_cache(maxsize=1)
def server_arg_names() -> FrozenSet[str]:
    from sglang.srt.server_args import ServerArgs

    return frozenset(f.name for f in dataclasses.fields(ServerArgs))


def server_arg(server_args, name: str):
    """server_args.<name>, after checking that SGLang's ServerArgs has that field."""
    if name not in server_arg_names():
        raise SGLangInternalsError(f"TurboQuant: SGLang's ServerArgs has no field '{name}' (renamed or removed in "
                                   f"this SGLang version); the TurboQuant start-up checks need updating")
    return getattr(server_args, name)


def probe_key_means(model, token_ids) -> dict:
    """{layer_id: fp32 CPU [H_local, head_dim]}: the mean post-RoPE key of every attention layer of this rank
    over one prefill of `token_ids` (exact attention in PyTorch: causal, GQA, the layer's scaling, logit cap,
    sliding window and sinks). Tensor-parallel ranks run it together (the model's collectives) and each
    gets its own heads."""
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
    from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode

    class ProbeAttention(AttentionBackend):
        def __init__(self):
            self.means = {}

        def init_forward_metadata(self, forward_batch):
            pass

        def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
            hq, hk = layer.tp_q_head_num, layer.tp_k_head_num
            k = k.reshape(-1, hk, layer.qk_head_dim).float()  # q may come as [1, T, H, d] (Gemma 3)
            t = k.shape[0]
            self.means[layer.layer_id] = k.mean(0).cpu()
            qh = q.reshape(t, hq, layer.qk_head_dim).transpose(0, 1).float()
            kh = k.transpose(0, 1).repeat_interleave(hq // hk, 0)
            vh = v.reshape(t, hk, layer.v_head_dim).transpose(0, 1).float().repeat_interleave(hq // hk, 0)
            s = qh @ kh.transpose(1, 2) * layer.scaling
            if layer.logit_cap and layer.logit_cap > 0:
                s = layer.logit_cap * torch.tanh(s / layer.logit_cap)
            pos = torch.arange(t, device=q.device)
            seen = pos[None, :] <= pos[:, None]
            if layer.sliding_window_size is not None and layer.sliding_window_size > 0:
                seen &= pos[:, None] - pos[None, :] <= layer.sliding_window_size
            s = s.masked_fill(~seen, float("-inf"))
            if sinks is not None:  # one more logit per head in the denominator
                s = torch.cat([s, sinks.float().view(hq, 1, 1).expand(hq, t, 1)], dim=-1)
            p = torch.softmax(s, dim=-1)[..., :t]
            return (p @ vh).transpose(0, 1).reshape(t, hq * layer.v_head_dim).to(q.dtype)

    stack = getattr(model, "model", None)
    if stack is None:
        raise SGLangInternalsError(f"TurboQuant: {type(model).__name__} has no decoder stack `model` to run the "
                                   f"key-means probe through")
    dev = next(model.parameters()).device
    t = len(token_ids)
    backend = ProbeAttention()
    fb = ForwardBatch(forward_mode=ForwardMode.EXTEND, batch_size=1,
                      input_ids=torch.tensor(token_ids, dtype=torch.int64, device=dev),
                      req_pool_indices=torch.zeros(1, dtype=torch.int64, device=dev),
                      seq_lens=torch.tensor([t], dtype=torch.int64, device=dev),
                      out_cache_loc=torch.zeros(t, dtype=torch.int64, device=dev), seq_lens_sum=t,
                      seq_lens_cpu=torch.tensor([t], dtype=torch.int64),
                      positions=torch.arange(t, dtype=torch.int64, device=dev), extend_num_tokens=t,
                      extend_seq_lens=torch.tensor([t], dtype=torch.int32, device=dev),
                      extend_prefix_lens=torch.zeros(1, dtype=torch.int32, device=dev),
                      extend_start_loc=torch.zeros(1, dtype=torch.int32, device=dev),
                      extend_seq_lens_cpu=[t], extend_prefix_lens_cpu=[0], attn_backend=backend)
    with torch.inference_mode():
        stack(fb.input_ids, fb.positions, fb)
    return backend.means


def load_tokenizer(server_args):
    """The served model's tokenizer, as SGLang's TokenizerManager loads it."""
    from sglang.srt.utils.hf_transformers_utils import get_tokenizer

    return get_tokenizer(server_arg(server_args, "tokenizer_path"),
                         tokenizer_mode=server_arg(server_args, "tokenizer_mode"),
                         trust_remote_code=server_arg(server_args, "trust_remote_code"),
                         revision=server_arg(server_args, "revision"))
