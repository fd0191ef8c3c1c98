"""TurboQuantAttnBackend: SGLang attention backend over the packed TurboQuant KV pool.

Shaped like SGLang's own backends: `init_forward_metadata` and the CUDA-graph hooks build one
`TQForwardMetadata` per batch (every launch decision and per-batch tensor), and `forward_extend` /
`forward_decode` are straight-line code that reads it. A stock `TritonAttnBackend`, held by composition,
serves the unquantized (boundary) layers from the pool's plain bf16 buffers and computes the slot
indices both kinds of layer read (`kv_indptr / kv_indices`: token slot ids; for extend the cached
*prefix* only, plus `qo_indptr` and `max_extend_len`). Every tq_kernels call goes through
`kernel_calls.KernelCalls` (the pool's `ops`).

* quantized layer, extend (prefill, chunked prefill, radix-cache hits, mixed batches): the new tokens are
  compressed into the cache, then attention = queries over the dequantized prefix from the packed cache
  plus (causally) the new tokens' unquantized K/V. A batch in which no sequence has a cached prefix (a
  first prefill chunk without a radix hit) reads nothing from the cache: it is plain attention over the
  bf16 K/V (the rotation is orthogonal), served by FlashInfer's ragged prefill where it imports, else by
  SGLang's Triton extend kernel. An extend over cached prefixes with at least HYBRID_MIN_NEW new tokens in
  one sequence takes the new tokens' part from FlashInfer (with its lse) and reads only the packed prefix
  in the TurboQuant kernel (below that, the partials and the merge cost more than they save).
* quantized layer, decode: compress the new token (the same launch rotates the queries), then split-K
  decode over the packed cache with a static per-batch-size split count and, under CUDA graphs, a
  preallocated workspace (no host syncs, static grid).
* quantized layer, speculative verify (NGRAM's TARGET_VERIFY batches: draft trees under SGLang's tree mask):
  `sglang_tq.speculative`, eagerly and from CUDA graphs.

Batch invariance follows SGLang's `--enable-deterministic-inference`: decode uses batch size 1's split
count for every batch, extend fixed block sizes and no prefix splits, and plain prefills stay on SGLang's
Triton kernel (per-sequence results that no batch changes).

Evaluation (`evaluation: {prefill_from_cache: true}` in the config; announced in the log): extend attends to
the new tokens' K/V *as stored* (dequantized from the packed cache) instead of the fresh values, so every
token sees its whole past exactly as decoding would (perplexity then measures the cache format).

Recent window (`window:` in the config; `tq_kernels.window`): every new token also writes its exact rotated
K/V to its request's ring row (req_pool_idx * W + position % W; in extend only each sequence's last W
tokens), and decode reads positions [lo, L) from the ring, lo = max(L - W, the prefix length of the request's
first extend), so a prefix that came from the radix cache (written by another request) is always read from
the codes, while later chunks of a chunked prefill and mixed batches keep the request's ring. Requests with req_pool_idx >= the ring's request count decode from the codes alone; the
req-to-token pool hands out the lowest free index first so that the ring covers the requests running at
the same time.

Exact first token (`first_token: exact` in the config; pool.py, `tq_kernels.window`): each extend claims, before
any layer runs, the first-token table entry of every new token at position 0 (by token id) and writes every
new slot's flag; each quantized layer's compress also writes those tokens' exact rotated rows to their
entry, and every reader of the cache (decode, extend over a cached prefix, speculative verify, the evaluation
mode's stored view) takes position 0 from the entry its slot is flagged with (also through a radix-cache
prefix: the flag is the slot's). Only where the token id determines position 0's K/V: off (logged) under
LoRA adapters; a sequence with multimodal inputs or a batch of input embeddings claims nothing.

Key centering (`key_means:` in the config): the pool stores keys as codes of k - mu; extend passes the mean
so the new tokens' fresh keys are centered the same way (with prefill_from_cache the new keys come
dequantized from the cache, already centered). Decode is unchanged (softmax invariance). With logit
softcapping the invariance does not hold: such layers are refused.
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend, logit_capping_mod
from sglang.srt.layers.radix_attention import AttentionType
from sglang_tq.flashinfer_prefill import RaggedParams, RaggedPrefill
from sglang_tq.kernel_calls import DecodeLaunch
from sglang_tq.pool import TQ_POOLS, WINDOW_FRESH, TQSWAKVPool
from sglang_tq.sglang_internals import lowest_free_first, on_new_request_slots, server_arg

logger = logging.getLogger("sglang_tq")

# An extend over cached prefixes takes its new tokens' part from FlashInfer from this many new tokens in
# one sequence on (docs/RESULTS.md has the measurements behind it).
HYBRID_MIN_NEW = 8192

_announced_prefill_from_cache = False


def _announce_prefill_from_cache(source: str) -> None:
    """Warn once per process that the server runs the evaluation mode."""
    global _announced_prefill_from_cache
    if not _announced_prefill_from_cache:
        _announced_prefill_from_cache = True
        logger.warning("TurboQuant: evaluation.prefill_from_cache is on (%s): prefill attends to its new tokens "
                       "as the cache stores them; outputs differ from serving and prefill is slower", source)


def _head_rows(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """x as [tokens, heads, dim] with unit stride along dim: a view where one exists (the strided q/k/v
    slices of a qkv projection have one), else a copy."""
    x = x.reshape(-1, heads, dim)
    return x if x.stride(-1) == 1 else x.contiguous()


def _attention_layers(model):
    from sglang.srt.layers.radix_attention import RadixAttention

    return [m for m in (model.modules() if model is not None else ()) if isinstance(m, RadixAttention)]


def _model_sinks_dtype(model) -> Optional[torch.dtype]:
    """The dtype of the model's attention sinks (gpt-oss: a `sinks` parameter per attention module),
    None without any: the sink variants of the extend kernels are compiled for it at start-up."""
    for m in (model.modules() if isinstance(model, torch.nn.Module) else ()):
        sinks = getattr(m, "sinks", None)
        if isinstance(sinks, torch.Tensor):
            return sinks.dtype
    return None


def _model_logit_caps(model) -> tuple:
    """(0.0,) plus one soft-capped value if any attention layer of `model` soft-caps its logits (the
    extend kernel has one variant with and one without a cap, whatever its value)."""
    caps = {logit_capping_mod(m.logit_capping_method, m.logit_cap) for m in _attention_layers(model)}
    capped = sorted(c for c in caps if c and c > 0)
    return (0.0,) + tuple(capped[:1])


@dataclass
class TQForwardMetadata:
    """What forward_extend / forward_decode read, built once per batch (by keyword) in
    init_forward_metadata or the CUDA-graph hooks."""

    decode: bool
    kv_indptr: torch.Tensor                  # [B + 1] (extend: the cached prefixes only)
    kv_indices: torch.Tensor                 # slot ids
    qo_indptr: Optional[torch.Tensor] = None  # extend: [B + 1] new tokens
    max_extend_len: Optional[int] = None     # extend: longest new-token run (host int)
    max_prefix_len: Optional[int] = None     # extend: longest cached prefix (host int)
    no_prefix: bool = False                  # extend: no sequence reads a cached prefix
    plain: bool = False                      # quantized layers: plain attention over the new bf16 K/V
    ragged: bool = False                     # FlashInfer's ragged prefill is planned for the new tokens
    hybrid: bool = False                     # new tokens' part from FlashInfer, the prefix from the codes
    launch: Optional[DecodeLaunch] = None    # decode: the kernels' plans for this batch size
    workspace: object = None                 # decode: DecodeWorkspace (None: the kernel allocates)
    window_rows: Optional[torch.Tensor] = None  # int32 ring row of each new token (< 0: none)
    window_lo: Optional[torch.Tensor] = None    # decode: first position read from the ring
    window_base: Optional[torch.Tensor] = None  # decode: ring row of position 0 (mod W)
    first_entries: Optional[torch.Tensor] = None  # extend: int32 first-token table entry of each new token (< 0: none)

    # hybrid SWA memory: what a sliding-window layer reads instead of kv_indptr / kv_indices: the positions
    # its window can reach (decode: the last W + 1, extend: the prefix's last W), as sliding-window pool slots
    swa_kv_indptr: Optional[torch.Tensor] = None
    swa_kv_indices: Optional[torch.Tensor] = None
    swa_max_prefix_len: Optional[int] = None  # extend
    verify: object = None                     # speculative verify: speculative.VerifyMetadata

    def kv(self, swa: bool) -> tuple:
        """(kv_indptr, kv_indices, max_prefix_len) a layer reads: a sliding-window layer under hybrid SWA
        memory its window's slots (positions counted from the window's start: the kernels' masks only
        compare query and key positions, so the shift changes nothing), any other layer the whole context."""
        if swa:
            return self.swa_kv_indptr, self.swa_kv_indices, self.swa_max_prefix_len
        return self.kv_indptr, self.kv_indices, self.max_prefix_len

    def ring_rows(self, n: int) -> Optional[torch.Tensor]:
        """window_rows for `n` written rows: a piecewise CUDA graph pads the extend's tokens past the batch
        (out_cache_loc 0, SGLang's padding slot); those rows write no ring row."""
        return _padded_rows(self.window_rows, n)

    def first_rows(self, n: int) -> Optional[torch.Tensor]:
        """first_entries for `n` written rows (padding rows: none, as in ring_rows)."""
        return _padded_rows(self.first_entries, n)


def _new_token_layout(fb) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(new tokens in the extend batch, int64 new-token count of each sequence, index of each sequence's first
    new token in the batch)."""
    n_tok = int(fb.extend_num_tokens) if fb.extend_num_tokens is not None else fb.out_cache_loc.shape[0]
    ext = fb.extend_seq_lens.to(torch.int64)
    return n_tok, ext, torch.cumsum(ext, 0) - ext


def _padded_rows(rows: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    if rows is None or rows.shape[0] >= n:
        return rows
    return torch.cat([rows, rows.new_full((n - rows.shape[0],), -1)])


class TurboQuantAttnBackend(AttentionBackend):
    # serves the unquantized layers and computes the slot indices (the CPU tests put a torch twin here)
    bf16_backend_cls = TritonAttnBackend

    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf: Optional[torch.Tensor] = None):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TQ_POOLS):
            raise RuntimeError(
                "TurboQuant: the attention backend needs the TurboQuant KV pool, but the model runner "
                f"built {type(pool).__name__}. Start the server with `python -m sglang_tq.launch_server` "
                "(or install the autoload hook: `python -m sglang_tq._autoload install`) so the pool "
                "patches are in place in the scheduler processes.")
        self.bf16 = self.bf16_backend_cls(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
        self.tq_pool = pool
        self.ops = pool.ops
        self.device = self.bf16.device
        self.on_cuda = torch.device(self.device).type == "cuda"
        self.num_head = self.bf16.num_head
        self.num_kv_head = self.bf16.num_kv_head
        self.v_head_dim = pool.v_head_dim
        self.max_context_len = self.bf16.max_context_len
        self.num_sms = max(int(self.bf16.device_core_count), 1)
        self.ops.warm_tables(itertools.chain(pool.k_codecs, pool.v_codecs))
        # (K codec, V codec) of the quantized layers with the recent window's ring and the first-token rows and of
        # those without them (the sliding-window pool's), planned apart
        self._codec_pairs, self._ringless_pairs = [], []
        for sub in getattr(pool, "tq_subpools", [pool]):
            pairs = [(kc, vc) for kc, vc in zip(sub.k_codecs, sub.v_codecs) if kc is not None]
            tail = sub.window_size or sub.first_token or not (pool.window_size or pool.first_token)
            (self._codec_pairs if tail else self._ringless_pairs).extend(pairs)
        self.first_token = bool(pool.first_token) and self._first_token_holds(model_runner)
        self.prefill_from_cache = bool(pool.plan.prefill_from_cache)
        if self.prefill_from_cache:
            _announce_prefill_from_cache(pool.plan.name)
        self.batch_invariant = bool(server_arg(model_runner.server_args, "enable_deterministic_inference"))
        # plain prefills and the hybrid extend need the plain-prefill kernels, which come with Triton; the
        # reference computes the same attention in its one extend
        self.plain_prefill = self.ops.triton
        self._launches: Dict[int, DecodeLaunch] = {}
        self.decode_workspace = None
        self._workspace_bs = 0
        self._graph_window = None  # static [3, max_bs] int32: rows, lo, base of CUDA-graph decode
        self._graph_md: Dict[tuple, TQForwardMetadata] = {}  # (verify, bs)

        # hybrid SWA memory: sliding-window layers read their window through translated slot ids
        self.swa_window = int(model_runner.sliding_window_size) if isinstance(pool, TQSWAKVPool) else 0
        if self.swa_window:
            self._swa_kv_indptr = torch.zeros(model_runner.req_to_token_pool.size + 1, dtype=torch.int32,
                                              device=self.device)
            self._graph_swa_kv_indices = None  # static decode indices of CUDA graphs (init_cuda_graph_state)
        self.window = pool.window_size      # recent window W (0: off)
        self.window_requests = pool.window_requests
        if self.window:
            lowest_free_first(model_runner.req_to_token_pool)
            on_new_request_slots(model_runner.req_to_token_pool, self._new_request_slots)
        self.extend_fixed = dict(block_m=64, gqa_pack=False, num_splits=1) if self.batch_invariant else {}
        model = getattr(model_runner, "model", None)
        dtype = getattr(model_runner, "dtype", pool.model_dtype)
        self.ragged_prefill = self._create_ragged_prefill(model, dtype)
        self.forward_metadata: Optional[TQForwardMetadata] = None
        self.spec = self._create_speculative(model_runner)
        if self.on_cuda and not skip_prefill:  # Triton's and FlashInfer's JIT builds at start-up
            self.warm_extend_kernels(dtype, logit_caps=_model_logit_caps(model), sinks_dtype=_model_sinks_dtype(model))
            if self.ragged_prefill is not None:
                self.warm_plain_prefill(dtype)

    @staticmethod
    def _first_token_holds(model_runner) -> bool:
        """Whether position 0's K/V are a function of the token id (the first-token table's key): not under
        LoRA adapters, which change them per request. Logged."""
        args = model_runner.server_args
        if server_arg(args, "enable_lora") or server_arg(args, "lora_paths"):
            logger.info("TurboQuant: first_token: exact is off under LoRA adapters (they change the first token's "
                        "K/V per request); the first token is read from the codes")
            return False
        return True

    def _create_speculative(self, model_runner):
        """The verify side of speculative decoding (sglang_tq.speculative) when the server runs it."""
        if not server_arg(model_runner.server_args, "speculative_algorithm"):
            return None
        if self.prefill_from_cache:
            raise ValueError("TurboQuant: evaluation.prefill_from_cache does not combine with speculative "
                             "decoding (it is a perplexity mode); remove one of them")
        from sglang_tq.speculative import SpeculativeVerify

        return SpeculativeVerify(self, model_runner)

    def _create_ragged_prefill(self, model, dtype) -> Optional[RaggedPrefill]:
        """FlashInfer's ragged prefill where it imports, the run is not batch-invariant and the model's
        attention layers allow it (`ragged_attention_params`)."""
        if not self.on_cuda or self.batch_invariant:
            return None
        params = self.ragged_attention_params(_attention_layers(model))
        if params is None:
            logger.info("TurboQuant: plain prefills use SGLang's Triton extend kernel (the attention layers "
                        "differ in scale, soft-cap or causality, or use a Grok-style temperature)")
            return None
        scale, cap, causal = params
        pool = self.tq_pool
        return RaggedPrefill.create(self.device, RaggedParams(
            num_qo_heads=self.num_head, num_kv_heads=pool.head_num, head_dim=pool.head_dim,
            v_head_dim=pool.v_head_dim, dtype=dtype, sm_scale=scale, logit_cap=cap, causal=causal))

    def ragged_attention_params(self, layers) -> Optional[tuple]:
        """(scale, soft-cap, causal) shared by every attention layer, which one FlashInfer plan per batch
        then serves; None when they differ, when there are none, or when a layer has a Grok-style
        temperature (the Triton kernel's extra FlashInfer lacks)."""
        params = {(float(m.scaling), float(logit_capping_mod(m.logit_capping_method, m.logit_cap)), self._causal(m))
                  for m in layers}
        if len(params) != 1 or any(getattr(m, "xai_temperature_len", -1) not in (-1, 0, None) for m in layers):
            return None
        return next(iter(params))

    # ----------------------------------------------------------------------------------------
    # Metadata
    # ----------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        fb = forward_batch
        if self.spec is not None and not fb.forward_mode.is_idle():
            # the requests' last verify: accepted tokens into the ring before anything reads it (an extend: the
            # tokens before its prefix, which a new request in the slot never reads from the ring)
            mode = fb.forward_mode
            new_lens = (fb.seq_lens if mode.is_target_verify() else fb.seq_lens - 1 if mode.is_decode()
                        else fb.extend_prefix_lens)
            self.spec.commit(fb.req_pool_indices, new_lens)
        if fb.forward_mode.is_target_verify() and self.spec is not None:
            self.bf16.init_forward_metadata(fb)
            self.forward_metadata = self._verify_metadata(fb.batch_size, fb.batch_size, fb.req_pool_indices,
                                                          fb.seq_lens, fb.positions)
            return
        if fb.spec_info is not None or fb.forward_mode.is_target_verify() or fb.forward_mode.is_draft_extend():
            raise NotImplementedError(f"TurboQuant: {fb.forward_mode.name} batches (speculative decoding): the "
                                      f"server was started without NGRAM speculative decoding, or a draft model's "
                                      f"forward reached the backend")
        self.bf16.init_forward_metadata(fb)
        if fb.forward_mode.is_decode_or_idle():
            bs = fb.batch_size
            ws = self.decode_workspace if bs <= self._workspace_bs else None  # bigger (eager) batches allocate
            self.forward_metadata = self._decode_metadata(bs, fb.req_pool_indices, fb.seq_lens, ws)
        else:
            self.forward_metadata = self._extend_metadata(fb)

    def _verify_metadata(self, bs, raw_bs, req_pool_indices, seq_lens, positions) -> TQForwardMetadata:
        """A TARGET_VERIFY batch: the stock backend's prefix indices, tree mask and draft count, plus the
        verify's own (speculative.SpeculativeVerify.metadata)."""
        t = self.bf16.forward_metadata
        vm = self.spec.metadata(bs, raw_bs, req_pool_indices, seq_lens, positions, t.custom_mask, t.mask_indptr)
        return TQForwardMetadata(decode=False, kv_indptr=t.kv_indptr, kv_indices=t.kv_indices, qo_indptr=t.qo_indptr,
                                 max_extend_len=t.max_extend_len, verify=vm)

    def decode_launch(self, bs: int) -> DecodeLaunch:
        """Launch decisions of a decode batch of `bs` (cached): the same for eager and graph runs."""
        launch = self._launches.get(bs)
        if launch is None:
            launch = self.ops.decode_launch(bs, self._codec_pairs, self.num_kv_head, self.max_context_len,
                                            self.num_sms, self.batch_invariant, window=bool(self.window),
                                            first=self.first_token, ringless_pairs=self._ringless_pairs)
            self._launches[bs] = launch
        return launch

    def _decode_metadata(self, bs, req_pool_indices, seq_lens, workspace, graph: bool = False) -> TQForwardMetadata:
        """graph: a CUDA graph's batch (per-batch tensors go to the static buffers the graph reads)."""
        t = self.bf16.forward_metadata
        window = {}
        if self.window:
            rows, lo, base = self._decode_window(req_pool_indices[:bs], seq_lens[:bs])
            if graph:
                for dst, src in zip(self._graph_window, (rows, lo, base)):
                    dst[:bs].copy_(src)
                rows, lo, base = (w[:bs] for w in self._graph_window)
            window = dict(window_rows=rows, window_lo=lo, window_base=base)
        if self.swa_window:
            window.update(self._swa_decode_kv(bs, req_pool_indices, seq_lens, graph))
        return TQForwardMetadata(decode=True, kv_indptr=t.kv_indptr, kv_indices=t.kv_indices,
                                 launch=self.decode_launch(bs), workspace=workspace, **window)

    def _swa_decode_kv(self, bs, req_pool_indices, seq_lens, graph: bool) -> dict:
        """The sliding-window layers' decode slots: each sequence's last W + 1 positions (the new token sees W
        back, as in extend; SGLang's eviction keeps them), translated to the sliding-window pool. CUDA graphs
        read them from static buffers, refilled before each replay."""
        from sglang.srt.layers.attention.triton_backend import (update_sliding_window_buffer,
                                                                update_sliding_window_buffer_cuda_graph)

        reach = self.swa_window + 1
        allocator = self.bf16.token_to_kv_pool_allocator
        if graph:
            indptr, indices, _, _ = update_sliding_window_buffer_cuda_graph(
                self._swa_kv_indptr, self._graph_swa_kv_indices, self.bf16.req_to_token, reach, seq_lens[:bs],
                req_pool_indices[:bs], bs, allocator)
        else:
            indptr, indices, _, _ = update_sliding_window_buffer(
                self._swa_kv_indptr, self.bf16.req_to_token, reach, seq_lens[:bs], req_pool_indices[:bs], bs,
                self.device, allocator)
        return dict(swa_kv_indptr=indptr, swa_kv_indices=indices)

    def _decode_window(self, req_pool_indices, seq_lens):
        """Ring rows of the new tokens and the bounds decode reads from the ring. A CUDA graph's padding rows
        carry the fill seq_len (1) and a stale request index; a real decode row has at least 2 tokens (its
        prompt and the new one), so rows of length <= 1 write no ring row."""
        W, R = self.window, self.window_requests
        start = self.tq_pool.window_start
        req = req_pool_indices.to(torch.int64)
        in_ring = req < R
        req_c = torch.clamp(req, max=R - 1)
        seq_lens = seq_lens.to(torch.int64)
        real = seq_lens > self.get_cuda_graph_seq_len_fill_value()
        rows = torch.where(in_ring & real, req_c * W + (seq_lens - 1) % W, -1)
        lo = torch.where(in_ring, torch.maximum(seq_lens - W, start[req_c].to(torch.int64)), seq_lens)
        return rows.to(torch.int32), lo.to(torch.int32), (req_c * W).to(torch.int32)

    def _extend_metadata(self, fb) -> TQForwardMetadata:
        t = self.bf16.forward_metadata
        prefix, lens = fb.extend_prefix_lens_cpu, fb.extend_seq_lens_cpu
        no_prefix = bool(prefix) and not any(prefix)  # host-side lengths: no sync
        hybrid = (self.ragged_prefill is not None and not self.prefill_from_cache and not no_prefix
                  and t.max_extend_len >= HYBRID_MIN_NEW)
        ragged = (self.ragged_prefill is not None and t.custom_mask is None and bool(lens)
                  and (no_prefix or hybrid))
        if ragged:
            self.ragged_prefill.plan(lens)
        layout = _new_token_layout(fb) if self.window or self.first_token else None
        return TQForwardMetadata(
            decode=False, kv_indptr=t.kv_indptr, kv_indices=t.kv_indices, qo_indptr=t.qo_indptr,
            max_extend_len=t.max_extend_len, max_prefix_len=max(prefix) if prefix else None,
            no_prefix=no_prefix, plain=self.plain_prefill and no_prefix and not self.prefill_from_cache,
            ragged=ragged, hybrid=hybrid and ragged,
            window_rows=self._extend_window(fb, layout) if self.window else None,
            first_entries=self._claim_first_rows(fb, layout) if self.first_token else None,
            # the stock backend's window of the prefix (its last W positions, as sliding-window pool slots)
            **(dict(swa_kv_indptr=t.window_kv_indptr, swa_kv_indices=t.window_kv_indices,
                    swa_max_prefix_len=min(max(prefix), self.swa_window) if prefix else None)
               if self.swa_window else {}))

    def _claim_first_rows(self, fb, layout) -> torch.Tensor:
        """The first-token table entry of each new token (the claim kernel: each sequence's first new token
        when its prefix is empty); every new slot's flag written. Sequences with multimodal inputs (their
        embeddings replace token ids') and batches of input embeddings claim nothing."""
        n_tok, ext, first = layout  # (_new_token_layout) first: n_tok for a sequence without new tokens
        starts = ((fb.extend_prefix_lens == 0) & (ext > 0)).to(torch.int32)
        mm = getattr(fb, "mm_inputs", None)
        if getattr(fb, "input_embeds", None) is not None:
            starts = torch.zeros_like(starts)
        elif mm is not None and any(x is not None for x in mm):
            text = torch.tensor([x is None for x in mm], dtype=torch.int32).to(starts.device, non_blocking=True)
            starts = starts * text
        at_zero = torch.zeros(n_tok + 1, dtype=torch.int32, device=ext.device).index_add_(0, first, starts)[:n_tok]
        return self.tq_pool.claim_first_rows(fb.input_ids[:n_tok], fb.out_cache_loc[:n_tok], at_zero > 0)

    def _new_request_slots(self, req_pool_indices) -> None:
        """SGLang handed these request slots to new requests: their ring rows are another request's."""
        for r in req_pool_indices:
            if r < self.window_requests:
                self.tq_pool.window_start[r] = WINDOW_FRESH  # one fill each, no host sync

    def _extend_window(self, fb, layout) -> torch.Tensor:
        """Ring rows of the new tokens (each sequence's last W). A ring request's first extend sets its first
        ring position to its prefix length (the prefix's ring rows are not its own: a radix hit, a retracted
        request readmitted); a later extend of the same request (the next chunk of a chunked prefill, a running
        request's token in a mixed batch, a session's next turn) keeps it, its ring rows being its own."""
        W, R = self.window, self.window_requests
        req = fb.req_pool_indices.to(torch.int64)
        in_ring = req < R
        req_c = torch.clamp(req, max=R - 1)
        seq_lens = fb.seq_lens.to(torch.int64)
        n_tok, ext, first = layout  # (_new_token_layout)
        seq = torch.repeat_interleave(torch.arange(req.shape[0], device=req.device), ext, output_size=n_tok)
        pos = fb.extend_prefix_lens.to(torch.int64)[seq] + torch.arange(n_tok, device=req.device) - first[seq]
        keep = in_ring[seq] & (pos >= seq_lens[seq] - W)
        rows = torch.where(keep, req_c[seq] * W + pos % W, -1)
        # requests outside the ring write row R, which nothing reads: no boolean index, no host sync
        start = self.tq_pool.window_start
        start[torch.where(in_ring, req, R)] = torch.minimum(start[req_c], fb.extend_prefix_lens.to(torch.int32))
        return rows.to(torch.int32)

    # ----------------------------------------------------------------------------------------
    # CUDA graphs (decode): the stock backend's buffers, our workspace and window buffers
    # ----------------------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None,
                              cuda_graph_num_kv_splits_buf=None):
        self.bf16.init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf=kv_indices_buf,
                                        cuda_graph_num_kv_splits_buf=cuda_graph_num_kv_splits_buf)
        if self.spec is not None:  # speculative decoding captures verify batches only: no decode buffers
            return
        # one workspace shared by all quantized layers, sized for the largest captured batch and split
        # count (+ 1 with a recent window: the ring's partial), allocated before capture
        partials = max(self.decode_launch(b).partials for b in range(1, max_num_tokens + 1))
        self.decode_workspace = self.ops.decode_workspace(max_num_tokens, self.num_head, self.v_head_dim, partials,
                                                          self.tq_pool.head_dim)
        self._workspace_bs = max_num_tokens if self.decode_workspace is not None else 0
        if self.window:
            self._graph_window = torch.zeros(3, max_num_tokens, dtype=torch.int32, device=self.device)
        if self.swa_window:
            self._graph_swa_kv_indices = torch.zeros(max_num_tokens * (self.swa_window + 1), dtype=torch.int64,
                                                     device=self.device)

    def _graph_metadata(self, bs, req_pool_indices, seq_lens, forward_mode, spec_info=None,
                        capture=False) -> TQForwardMetadata:
        if forward_mode.is_target_verify() and self.spec is not None:
            # capture: no real rows; replay: the real rows are the spec_info's (its draft tokens)
            raw_bs = 0 if capture else spec_info.draft_token.shape[0] // self.spec.draft_tokens
            positions = seq_lens.new_zeros(0) if capture else spec_info.positions
            return self._verify_metadata(bs, raw_bs, req_pool_indices, seq_lens, positions)
        if not forward_mode.is_decode_or_idle():
            raise NotImplementedError(f"TurboQuant: CUDA graphs of {forward_mode} batches are not supported")
        return self._decode_metadata(bs, req_pool_indices, seq_lens, self.decode_workspace, graph=True)

    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                 forward_mode, spec_info):
        self.bf16.init_forward_metadata_capture_cuda_graph(bs, num_tokens, req_pool_indices, seq_lens, encoder_lens,
                                                           forward_mode, spec_info)
        key = (forward_mode.is_target_verify(), bs)
        self.forward_metadata = self._graph_md[key] = self._graph_metadata(bs, req_pool_indices, seq_lens,
                                                                           forward_mode, spec_info, capture=True)

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens,
                                                forward_mode, spec_info, seq_lens_cpu=None):
        if self.spec is not None and not forward_mode.is_idle():
            if forward_mode.is_target_verify():
                raw_bs = spec_info.draft_token.shape[0] // self.spec.draft_tokens
                self.spec.commit(req_pool_indices[:bs], seq_lens[:bs], raw_bs)
            else:  # decode: padding rows (the fill seq_len) have new length 0, nothing to copy
                self.spec.commit(req_pool_indices[:bs], seq_lens[:bs] - 1)
        self.bf16.init_forward_metadata_replay_cuda_graph(bs, req_pool_indices, seq_lens, seq_lens_sum,
                                                          encoder_lens, forward_mode, spec_info, seq_lens_cpu)
        # refills the static window / verify buffers the graph reads
        self._graph_metadata(bs, req_pool_indices, seq_lens, forward_mode, spec_info)
        self.forward_metadata = self._graph_md[(forward_mode.is_target_verify(), bs)]

    def get_cuda_graph_seq_len_fill_value(self):
        return self.bf16.get_cuda_graph_seq_len_fill_value()

    # ----------------------------------------------------------------------------------------
    # Start-up warm-up (GPU)
    # ----------------------------------------------------------------------------------------
    def warm_extend_kernels(self, dtype, block_ms=(64, 128), logit_caps=(0.0,),
                            sinks_dtype: Optional[torch.dtype] = None) -> int:
        """Run the packed-prefix extend once per distinct (K format, V format) of the quantized layers,
        per query-block size the automatic choice takes and per logit soft-cap the model's attention
        layers use (0: none), on a 2-token prefill over a 1-token prefix (slot 0, SGLang's padding slot),
        with and without the query group packed into the rows, so Triton compiles every variant before
        the first request (else the first prefill that hits the radix cache stalls every waiting request
        on the JIT). Only the constexprs select a variant (formats, block size, GQA packing, window,
        causal, soft-cap on or off; strides and the index dtypes are the serving ones: the stock
        backend's own indptr buffers), so serving finds them all compiled. It also runs a prefill-sized
        compress (its own tile size) into slot 0, and the first-token claim kernel on slot 0 (no token at
        position 0); it writes no other cache row. sinks_dtype: the model's
        attention sinks' dtype (None: no sinks); every variant again with sinks. A sliding window selects
        no variant (a plain int argument). Returns the number of extend runs."""
        pool, dev = self.tq_pool, self.device
        n_new, h_q, h_kv = 2, self.num_head, pool.head_num
        qo_indptr = self.bf16.qo_indptr[:2]
        kv_indptr = self.bf16.kv_indptr[:2]
        qo_indptr.copy_(torch.tensor([0, n_new], dtype=qo_indptr.dtype))
        kv_indptr.copy_(torch.tensor([0, 1], dtype=kv_indptr.dtype))
        kv_indices = torch.zeros(1, dtype=torch.int64, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(n_new, h_q, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        k = torch.randn(n_new, h_kv, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        v = torch.randn(n_new, h_kv, pool.v_head_dim, generator=gen).to(device=dev, dtype=dtype)
        window = None
        if self.prefill_from_cache and self.window:
            from tq_kernels.window import ExtendWindow
            window = ExtendWindow(k, v, self.window)
        if self.batch_invariant:
            variants = [dict(self.extend_fixed, logit_cap=cap) for cap in logit_caps]
        else:
            # short runs pack the query group (a variant of its own); the prefix splits where the kernel
            # chooses them itself
            packings = (False,) if h_q == h_kv else (False, True)
            splittings = (1, 2) if self.ops.extend_splits_prefix() else (1,)
            variants = [dict(block_m=block_m, logit_cap=cap, gqa_pack=pack, num_splits=splits if splits > 1 else None)
                        for block_m, cap, pack, splits in itertools.product(block_ms, logit_caps, packings, splittings)]
        if self.ragged_prefill is not None:  # the prefix-only variant that takes the new tokens' part from outside
            new_part = (torch.zeros(n_new, h_q, pool.v_head_dim, device=dev, dtype=dtype),
                        torch.zeros(n_new, h_q, device=dev, dtype=torch.float32))
            variants += [dict(block_m=block_m, logit_cap=cap, gqa_pack=False, new_part=new_part)
                         for block_m, cap in itertools.product(block_ms, logit_caps)]
        if sinks_dtype is not None:
            sinks = torch.zeros(h_q, device=dev, dtype=sinks_dtype)
            variants += [dict(kw, sinks=sinks) for kw in variants]
        seen, runs = set(), 0
        for lid in pool.quantized_layer_ids:
            kb, vb = pool.get_kv_buffer(lid)
            if (kb.codec.fmt, vb.codec.fmt) in seen:
                continue
            seen.add((kb.codec.fmt, vb.codec.fmt))
            # the prefill's compress tiles (16 rows up to 16 tokens, 32 from 17 on) into slot 0, no ring row
            for n_rows in (2, 32):
                rows = torch.randn(n_rows, 2 * h_kv, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
                none = torch.full((n_rows,), -1, dtype=torch.int32, device=dev)
                pool.set_kv_buffer(None, torch.zeros(n_rows, dtype=torch.int64, device=dev), rows[:, :h_kv],
                                   rows[:, h_kv:, :pool.v_head_dim], layer_id_override=lid,
                                   window_rows=none if self.window else None,
                                   first_entries=none if self.first_token else None)
            for kw in variants:
                self.ops.extend(q, k, v, kb, vb, qo_indptr, kv_indptr, kv_indices, pool.head_dim ** -0.5,
                                causal=True, max_extend_len=n_new, window=window,
                                k_mean=None if kw["logit_cap"] else pool.key_mean(lid),
                                first=self.first_rows(pool, lid), **kw)
                runs += 1
            if self.spec is not None:  # speculative verify's variants (draft tree, prefix ring)
                runs += self.spec.warm(kb, vb, lid, dtype, block_ms, logit_caps)
        if self.first_token:  # the claim kernel, on slot 0 with no token at position 0
            one = torch.zeros(1, dtype=torch.int64, device=dev)
            pool.claim_first_rows(one, one, one.bool())
        return runs

    def warm_plain_prefill(self, dtype) -> bool:
        """One tiny plain prefill through FlashInfer's ragged prefill (with its lse, as the hybrid extend asks
        for it), so its JIT build happens at start-up and not at the first request. If FlashInfer cannot
        serve this model (a head size or dtype it was not built for), plain prefills go back to SGLang's
        Triton kernel: logged, returns False."""
        pool, dev = self.tq_pool, self.device
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(2, self.num_head, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        kv = torch.randn(2, 2 * pool.head_num, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        out = torch.empty(2, self.num_head, pool.v_head_dim, device=dev, dtype=dtype)
        lse = torch.empty(2, self.num_head, device=dev, dtype=torch.float32)
        try:
            self.ragged_prefill.plan([2])
            self.ragged_prefill.run(q, kv[:, :pool.head_num], kv[:, pool.head_num:, :pool.v_head_dim], out, lse=lse)
        except Exception as e:  # noqa: BLE001 - any FlashInfer failure: keep serving on Triton
            logger.warning("TurboQuant: FlashInfer's ragged prefill failed at start-up (%s: %s); plain "
                           "prefills use SGLang's Triton extend kernel", type(e).__name__, e)
            self.ragged_prefill = None
            return False
        return True

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def _causal(self, layer) -> bool:
        return not (layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY
                    or (layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL
                        and self.bf16.allow_bidirectional_attention_in_extend))

    @staticmethod
    def _unsupported(layer) -> Optional[str]:
        """Why the TurboQuant kernels (and the boundary layers' plain-prefill routing) cannot serve this
        layer, or None."""
        if getattr(layer, "is_cross_attention", False):
            return "cross attention is not supported"
        return None

    @classmethod
    def _check_layer(cls, layer):
        why = cls._unsupported(layer)
        if why is not None:
            raise NotImplementedError(f"TurboQuant: {why}")

    @staticmethod
    def _sliding_window(layer) -> int:
        """The kernels' window of a layer: the query at position i sees positions j > i - w (0: all).
        SGLang's sliding_window_size W (-1: none) lets a query see W positions back besides its own (its
        Triton extend kernel, FlashInfer's window_left, FlashAttention's window), so w = W + 1."""
        w = getattr(layer, "sliding_window_size", None)
        return int(w) + 1 if w is not None and w > -1 else 0

    def _in_swa_pool(self, pool, layer) -> bool:
        """Whether the layer's cache is the sliding-window pool of hybrid SWA memory. Its slots hold the
        window of SGLang's model-wide sliding_window_size, so a layer with another window is refused."""
        if not self.swa_window or not pool.is_swa_layer(layer.layer_id):
            return False
        if self._sliding_window(layer) != self.swa_window + 1:
            raise NotImplementedError(f"TurboQuant: layer {layer.layer_id} has sliding window "
                                      f"{layer.sliding_window_size}, the model's is {self.swa_window}; start "
                                      f"with --disable-hybrid-swa-memory")
        return True

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        pool = forward_batch.token_to_kv_pool
        md = self.forward_metadata
        if not pool.is_quantized(layer.layer_id):
            if md.ragged and md.no_prefix and self._unsupported(layer) is None:
                # a boundary layer's plain prefill: the same kernel as the quantized layers'
                if save_kv_cache:
                    pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
                return self._plain_extend(q, k, v, layer, md, sinks)
            return self.bf16.forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks)
        self._check_layer(layer)
        if md.verify is not None:
            return self.spec.forward(q, k, v, layer, forward_batch, md, save_kv_cache, sinks)
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, window_rows=md.ring_rows(k.shape[0]),
                               first_entries=md.first_rows(k.shape[0]))
        if md.plain:
            return self._plain_extend(q, k, v, layer, md, sinks)
        sliding = self._sliding_window(layer)
        swa = self._in_swa_pool(pool, layer)
        kv_indptr, kv_indices, max_prefix_len = md.kv(swa)
        kb, vb = pool.get_kv_buffer(layer.layer_id)
        k_mean = self._key_mean(pool, layer, sinks)
        first = self.first_rows(pool, layer.layer_id)
        window = new_part = None
        if self.prefill_from_cache:
            # stored keys are codes of k - mu: dequantized they are already centered like the prefix
            loc = forward_batch.out_cache_loc_swa if swa else forward_batch.out_cache_loc
            k_old, v_old = self._stored_kv(kb, vb, loc, q.dtype, first, md.first_rows(loc.shape[0]))
            if self.window:  # decode's view: the last W positions exact, older ones from the codes
                from tq_kernels.window import ExtendWindow
                window = ExtendWindow(k_old, v_old, self.window)
            else:
                k, v, k_mean = k_old, v_old, None
        elif md.hybrid and not sliding:  # FlashInfer's ragged plan has no window: the kernel reads k / v then
            new_part = self._new_part(q, k, v, layer, k_mean)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        self.ops.extend(  # views: the launch function rotates q / k / v into new tensors anyway
            _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim),
            _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim),
            _head_rows(v, layer.tp_v_head_num, layer.v_head_dim),
            kb, vb, md.qo_indptr, kv_indptr, kv_indices, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            causal=self._causal(layer),
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            max_extend_len=md.max_extend_len, max_prefix_len=max_prefix_len,
            k_mean=k_mean, window=window, new_part=new_part, sliding_window=sliding, sinks=sinks, first=first,
            **self.extend_fixed)
        return o

    def _new_part(self, q, k, v, layer, k_mean) -> tuple:
        """The new tokens' causal attention over themselves through FlashInfer's ragged prefill, with its
        lse, as extend_attention's new_part. Keys go in centered like the cache's (k - mu), so both parts'
        scores shift alike."""
        q3 = _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim)
        if k_mean is not None:
            k3 = k3 - k_mean.to(k3.dtype)
        o_new = q.new_empty((q3.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        lse = torch.empty((q3.shape[0], layer.tp_q_head_num), dtype=torch.float32, device=q.device)
        self.ragged_prefill.run(q3, k3, _head_rows(v, layer.tp_v_head_num, layer.v_head_dim), o_new, lse=lse)
        return o_new, lse

    def _plain_extend(self, q, k, v, layer, md, sinks=None):
        """Attention of new tokens without a cached prefix: nothing is read from the packed cache, and
        the rotation is orthogonal, so this is plain attention over the new bf16 K/V (key centering
        only shifts each query's scores by a constant). FlashInfer's ragged prefill serves it where it
        is planned, else SGLang's own Triton extend kernel, so such a prefill runs as fast as with BF16
        KV; the K/V were already stored packed. Both kernels take row and head strides, so q/k/v go in
        as the views of the qkv projection they are: no copies. Sliding-window and sink layers take the
        Triton kernel (the ragged plan is one for all layers, without either)."""
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        q3 = _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = _head_rows(v, layer.tp_v_head_num, layer.v_head_dim)
        o3 = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        sliding = self._sliding_window(layer)
        if md.ragged and not sliding and sinks is None:
            self.ragged_prefill.run(q3, k3, v3, o3)
            return o
        t = self.bf16.forward_metadata
        self.bf16.extend_attention_fwd(
            q3, k3, v3, o3,
            k3, v3,  # the prefix buffers: every prefix is empty, so the kernel reads none of them
            t.qo_indptr, t.kv_indptr, t.kv_indices, t.custom_mask, self._causal(layer), t.mask_indptr,
            t.max_extend_len, 1.0, 1.0, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            sliding_window_size=sliding - 1, sinks=sinks, window_kv_offsets=None,
            xai_temperature_len=getattr(layer, "xai_temperature_len", -1),
        )
        return o

    @staticmethod
    def _key_mean(pool, layer, sinks=None):
        """The layer's key-centering mean (None without one). Softcapped scores are not shift invariant, and
        neither is a softmax with a sink logit, so centering is refused there (the pool drops the means of a
        model with sinks at start-up: registration.drop_key_means_for_sinks)."""
        mu = pool.key_mean(layer.layer_id)
        if mu is not None and logit_capping_mod(layer.logit_capping_method, layer.logit_cap):
            raise NotImplementedError("TurboQuant: key centering (key_means) is not exact with logit "
                                      "softcapping; remove key_means from the config for this model")
        if mu is not None and sinks is not None:
            raise NotImplementedError("TurboQuant: key centering (key_means) is not exact with attention sinks; "
                                      "remove key_means from the config for this model")
        return mu

    def first_rows(self, pool, layer_id: int):
        """The layer's exact first-token rows for the kernels (None: off, or a layer of the sliding-window pool)."""
        return pool.first_rows(layer_id) if self.first_token else None

    @torch.compiler.disable
    def _stored_kv(self, kb, vb, loc, dtype, first=None, entries=None):
        """K/V of the slots `loc` as the cache holds them (dequantized; first-token rows where `entries` >= 0:
        their table entries, un-rotated), in `dtype`."""
        loc = loc.long()
        k = kb.codec.decode(kb.codes[loc], kb.scales[loc])
        v = vb.codec.decode(vb.codes[loc], vb.scales[loc])
        if first is not None and entries is not None:
            e = entries.long()
            exact = (e >= 0)[:, None, None]
            k = torch.where(exact, kb.codec.unrotate(first.k[e.clamp(min=0)].float()).to(k.dtype), k)
            v = torch.where(exact, vb.codec.unrotate(first.v[e.clamp(min=0)].float()).to(v.dtype), v)
        return k.to(dtype), v.to(dtype)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        pool = forward_batch.token_to_kv_pool
        md = self.forward_metadata
        if not pool.is_quantized(layer.layer_id):
            return self.bf16.forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks)
        self._check_layer(layer)
        hq, d = layer.tp_q_head_num, layer.qk_head_dim
        q = q.reshape(-1, hq * d)
        bs = q.shape[0]
        o = q.new_empty((bs, hq * layer.v_head_dim))
        kb, vb = pool.get_kv_buffer(layer.layer_id)
        q_rot = None
        if save_kv_cache:
            rot = {}
            if self.ops.rotates_queries(kb.codec):  # the new K/V's launch also rotates the queries
                q_rot = (md.workspace.q_rot if md.workspace is not None  # codec dim (head_dim 80/96: padded)
                         else q.new_empty((bs, hq, kb.codec.fmt.head_dim), dtype=torch.float32))
                rot = dict(q=q, q_rot=q_rot)
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, window_rows=md.window_rows, **rot)
        self._key_mean(pool, layer, sinks)  # decode itself is unchanged by centering; only the checks
        kv_indptr, kv_indices, _ = md.kv(self._in_swa_pool(pool, layer))
        window = None
        ring_k, ring_v = pool.window_buffers(layer.layer_id)
        if self.window and ring_k is not None:  # (no ring in the sliding-window pool: TQSWAKVPool)
            from tq_kernels.window import DecodeWindow
            window = DecodeWindow(ring_k, ring_v, self.window, md.window_lo, md.window_base)
        first = self.first_rows(pool, layer.layer_id)
        self.ops.decode(
            # no copy: decode reads q's values only through q_rotated or a matmul, which takes strides
            q.view(bs, hq, d), kb, vb, kv_indptr, kv_indices, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            out=o.view(bs, hq, layer.v_head_dim), launch=md.launch, workspace=md.workspace, q_rotated=q_rot,
            window=window, first=first, sliding_window=self._sliding_window(layer), sinks=sinks)
        return o
