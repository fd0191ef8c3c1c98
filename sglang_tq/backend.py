"""TurboQuantAttnBackend: SGLang attention backend over the packed TurboQuant KV pool.

Subclass of SGLang's `TritonAttnBackend`, reusing all of its metadata and CUDA-graph plumbing:
`init_forward_metadata`, `init_cuda_graph_state`, `init_forward_metadata_capture_cuda_graph` and
`..._replay_cuda_graph` fill `forward_metadata.kv_indptr / kv_indices` (token slot ids; for extend the
*prefix* only), `qo_indptr` and `max_extend_len`. Those are layout-agnostic, so only the forward
functions change:

* quantized layer, extend (prefill, chunked prefill, radix-cache hits, mixed batches):
  `compress_and_store` of the new tokens (if `save_kv_cache`), then `extend_attention` = queries
  attend to the dequantized prefix from the packed cache plus (causally) to the new tokens'
  unquantized K/V. A batch in which no sequence has a cached prefix (a first prefill chunk without
  a radix hit) reads nothing from the cache: SGLang's own Triton extend kernel runs it on the bf16 K/V
  (`SGLANG_TQ_PLAIN_PREFILL=0` turns that off).
* quantized layer, decode: `compress_and_store` of the new token, then `decode_attention` over the
  packed cache (split-K with a static per-batch-size split count and a preallocated
  `DecodeWorkspace` under CUDA graphs: no host syncs, static grid).
* unquantized (boundary) layer: the parent's Triton kernels over the pool's plain bf16 buffers.

`SGLANG_TQ_PREFILL_FROM_CACHE=1` (read once per process; for quality evaluation): extend attends to
the new tokens' K/V *as stored* (dequantized from the packed cache) instead of the fresh values, so
every token sees its whole past exactly as decoding would (perplexity then measures the cache format).

Recent window (`window:` in the config; `tq_kernels.window`): every new token also writes its exact
rotated K/V to its request's ring row (req_pool_idx * W + position % W; in extend only each sequence's
last W tokens), decode reads positions [lo, L) from the ring, lo = max(L - W, the position of the
request's last extend), so a prefix that came from the radix cache (written by another request) is
always read from the codes. Requests with req_pool_idx >= the ring's request count decode from the
codes alone; the req-to-token pool hands out the lowest free index first so that the ring covers the
requests running at the same time. CUDA-graph padding rows (out_cache_loc 0) write no ring row.

Key centering (`key_means:` in the config): the pool stores keys as codes of k - mu; extend passes
`k_mean=mu` so the new tokens' fresh keys are centered the same way (with PREFILL_FROM_CACHE the new
keys come dequantized from the cache, already centered, so no mean is passed). Decode is unchanged
(softmax invariance). With logit softcapping the invariance does not hold: such layers are refused.

On a machine without CUDA (the CPU tests) the TurboQuant layers run `tq_kernels.reference` and the
bf16 layers a small torch path, and the metadata is computed in torch (the parent's metadata kernels
are Triton), with the same kv_indptr / kv_indices / qo_indptr as on GPU.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Optional

import torch

from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend, logit_capping_mod
from sglang.srt.layers.radix_attention import AttentionType
from sglang_tq.pool import TQTokenToKVPool, kernel_ops

logger = logging.getLogger("sglang_tq")


PREFILL_FROM_CACHE_ENV = "SGLANG_TQ_PREFILL_FROM_CACHE"
# 1 = one split count for every decode batch size (the count of batch size 1). A sequence's split-K
# partition then depends on its length alone, so its decode attention is bit-identical alone or in a
# batch. Quantized K/V turn tiny upstream differences into other codes, so this matters more than with
# bf16 KV. It costs more partials at large batches, so it is off by default.
BATCH_INVARIANT_ENV = "SGLANG_TQ_BATCH_INVARIANT"
# 0 = extend never splits the packed prefix over several programs (unset: the kernel chooses, where the
# grid is small; tq_kernels.extend.choose_extend_splits).
EXTEND_SPLITS_ENV = "SGLANG_TQ_EXTEND_SPLITS"
# 0 = every quantized-layer prefill through the TurboQuant extend kernel. Default 1: a batch without
# cached prefixes reads nothing from the packed cache, so SGLang's Triton extend kernel serves it on the
# bf16 K/V (same result up to rounding, BF16-KV prefill speed).
PLAIN_PREFILL_ENV = "SGLANG_TQ_PLAIN_PREFILL"
# Which kernel runs those plain prefills: "flashinfer" (default where it imports: its ragged prefill, FA3
# on sm_90, as SGLang's flashinfer backend runs them) or "triton" (SGLang's Triton extend kernel).
PLAIN_PREFILL_KERNEL_ENV = "SGLANG_TQ_PLAIN_PREFILL_KERNEL"
# On unless 0: an extend over cached prefixes whose longest new-token run has at least HYBRID_MIN_NEW
# tokens takes the new tokens' attention from FlashInfer's ragged prefill (with its lse) and reads only the
# packed prefix in the TurboQuant kernel (tq_kernels.extend_attention's new_part). One H200 (twelfth
# session, K4V4 (32, 8, 128), one layer, the prefix through the register LUT): 8,192 new over 8,192
# cached 8.54 ms against 9.98 with the new tokens in our kernel; 2,048 over 8,192 2.10 against 2.00 ms
# (the partials and the merge cost more than the causal part saves), hence the threshold.
HYBRID_EXTEND_ENV = "SGLANG_TQ_HYBRID_EXTEND"
HYBRID_MIN_NEW = 8192
# 0 = do not compile the packed-prefix extend kernel at start-up. Default 1: without it the first prefill
# that hits the radix cache pays Triton's JIT for each variant (seen on an H200 as a 3 s stall of every
# request then waiting, SmolLM2 at 4K prompts; the ninth session's serving run).
WARM_EXTEND_ENV = "SGLANG_TQ_WARM_EXTEND"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() not in ("", "0", "false", "no", "off")


def _env_on(name: str) -> bool:
    """A switch that is on unless set to 0 / false / no / off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


def _env_choice(name: str) -> Optional[bool]:
    """A switch whose absence means "the kernel's own choice": None if unset, else its flag value."""
    return _env_flag(name) if os.environ.get(name) else None


def _head_rows(x: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """x as [tokens, heads, dim] with unit stride along dim: a view where one exists (the strided q/k/v
    slices of a qkv projection have one), else a copy."""
    x = x.reshape(-1, heads, dim)
    return x if x.stride(-1) == 1 else x.contiguous()


def _no_compile(fn):
    return torch.compiler.disable(fn)


def _model_logit_caps(model) -> tuple:
    """(0.0,) plus one soft-capped value if any attention layer of `model` soft-caps its logits (the
    extend kernel has one variant with and one without a cap, whatever its value)."""
    from sglang.srt.layers.radix_attention import RadixAttention

    caps = {logit_capping_mod(m.logit_capping_method, m.logit_cap)
            for m in (model.modules() if model is not None else ()) if isinstance(m, RadixAttention)}
    capped = sorted(c for c in caps if c and c > 0)
    return (0.0,) + tuple(capped[:1])


def lowest_free_first(req_to_token_pool) -> None:
    """Make SGLang's req-to-token pool hand out its lowest free request index (it appends freed ones
    at the end and pops from the front, cycling through every index). The recent window's ring covers
    request indices below its request count, so with this the requests running at the same time are
    the ones it covers. Idempotent; a pool without `free_slots` (another class) is left alone."""
    if getattr(req_to_token_pool, "_tq_lowest_first", False) or not hasattr(req_to_token_pool, "free_slots"):
        return
    import bisect

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


class TurboQuantAttnBackend(TritonAttnBackend):
    def __init__(self, model_runner, skip_prefill: bool = False, kv_indptr_buf: Optional[torch.Tensor] = None):
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, TQTokenToKVPool):
            raise RuntimeError(
                "TurboQuant: the attention backend needs the TurboQuant KV pool, but the model runner "
                f"built {type(pool).__name__}. Start the server with `python -m sglang_tq.launch_server` "
                "(or install the autoload hook: `python -m sglang_tq._autoload install`) so the pool "
                "patches are in place in the scheduler processes.")
        super().__init__(model_runner, skip_prefill=skip_prefill, kv_indptr_buf=kv_indptr_buf)
        # TritonAttnBackend read v_head_dim from get_value_buffer(0).shape[-1]; use the pool's value.
        self.v_head_dim = pool.v_head_dim
        self.tq_pool = pool
        self.on_cuda = torch.device(self.device).type == "cuda"
        self.ops = kernel_ops(self.device)
        self._compress = _no_compile(self.ops.compress_and_store)
        self._decode = _no_compile(self.ops.decode_attention)
        self._extend = _no_compile(self.ops.extend_attention)
        self.num_sms = self.device_core_count if self.device_core_count > 0 else 1
        if self.on_cuda:
            self._warm_tables()
        self.prefill_from_cache = _env_flag(PREFILL_FROM_CACHE_ENV)
        self.batch_invariant = (_env_flag(BATCH_INVARIANT_ENV)
                                or bool(getattr(model_runner.server_args, "enable_deterministic_inference", False)))
        self.extend_splits = None if self.batch_invariant else _env_choice(EXTEND_SPLITS_ENV)
        self.plain_prefill = _env_on(PLAIN_PREFILL_ENV)
        # batch-invariant runs keep SGLang's Triton kernel (per-sequence results that no batch changes)
        self.ragged_prefill = None
        if (self.on_cuda and self.plain_prefill and not self.batch_invariant
                and os.environ.get(PLAIN_PREFILL_KERNEL_ENV, "flashinfer").strip().lower() == "flashinfer"):
            from .flashinfer_prefill import RaggedPrefill
            self.ragged_prefill = RaggedPrefill.create(self.device)
        self.hybrid_extend = self.ragged_prefill is not None and _env_on(HYBRID_EXTEND_ENV)
        self.decode_workspace = None
        self._workspace_bs = 0
        self._splits = {}
        self._plans = {}
        self.window = pool.window_size      # recent window W (0: off)
        self.window_requests = pool.window_requests
        self._window_fb = None              # the forward batch self._window_md belongs to
        self._window_md = None
        if self.window:
            lowest_free_first(model_runner.req_to_token_pool)
        if self.on_cuda and not skip_prefill and _env_on(WARM_EXTEND_ENV):
            caps = _model_logit_caps(getattr(model_runner, "model", None))
            dtype = getattr(model_runner, "dtype", pool.model_dtype)
            self.warm_extend_kernels(dtype, logit_caps=caps)
            if self.ragged_prefill is not None:  # FlashInfer's JIT build of its prefill module
                self.warm_plain_prefill(dtype, logit_caps=caps)

    # ----------------------------------------------------------------------------------------
    # Metadata: the parent's on CUDA; the same tensors computed in torch elsewhere.
    # ----------------------------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        if self.on_cuda:
            return super().init_forward_metadata(forward_batch)
        return self._init_forward_metadata_torch(forward_batch)

    def _gather_indices(self, req_pool_indices, lens, kv_indptr):
        """torch twin of create_flashinfer_kv_indices_triton: concatenated req_to_token[r, :len]."""
        rows = self.req_to_token[req_pool_indices.long()]
        cols = torch.arange(rows.shape[1], device=rows.device)[None, :]
        mask = cols < lens.to(rows.device).long()[:, None]
        return rows[mask].to(torch.int64)

    def _init_forward_metadata_torch(self, fb):
        if fb.spec_info is not None or fb.forward_mode.is_target_verify() or fb.forward_mode.is_draft_extend():
            raise NotImplementedError("TurboQuant: speculative decoding is not supported")
        bs = fb.batch_size
        kv_indptr = self.kv_indptr
        if fb.forward_mode.is_decode_or_idle():
            kv_indptr[1:bs + 1] = torch.cumsum(fb.seq_lens, dim=0)
            kv_indptr = kv_indptr[:bs + 1]
            kv_indices = self._gather_indices(fb.req_pool_indices, fb.seq_lens, kv_indptr)
            self.forward_metadata = ForwardMetadata(
                None, None, None, None, kv_indptr, kv_indices, None, None, None, None, None, None, None)
            return
        kv_indptr[1:bs + 1] = torch.cumsum(fb.extend_prefix_lens, dim=0)
        kv_indptr = kv_indptr[:bs + 1]
        kv_indices = self._gather_indices(fb.req_pool_indices, fb.extend_prefix_lens, kv_indptr)
        qo_indptr = self.qo_indptr
        qo_indptr[1:bs + 1] = torch.cumsum(fb.extend_seq_lens, dim=0)
        qo_indptr = qo_indptr[:bs + 1]
        self.forward_metadata = ForwardMetadata(
            None, None, max(fb.extend_seq_lens_cpu), None, kv_indptr, kv_indices, qo_indptr,
            None, None, None, None, None, None)

    # ----------------------------------------------------------------------------------------
    # CUDA graphs: parent's buffers + our decode workspace, static split count per batch size.
    # ----------------------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None,
                              cuda_graph_num_kv_splits_buf=None):
        super().init_cuda_graph_state(max_bs, max_num_tokens, kv_indices_buf=kv_indices_buf,
                                      cuda_graph_num_kv_splits_buf=cuda_graph_num_kv_splits_buf)
        self.decode_workspace = self._make_workspace(max_num_tokens)
        self._workspace_bs = max_num_tokens if self.decode_workspace is not None else 0

    def _make_workspace(self, max_bs: int):
        """One DecodeWorkspace (split-K partials) shared by all quantized layers, sized for the largest
        captured batch and the largest static split count (+ 1 with a recent window: the ring's partial);
        allocated before capture."""
        if not self.on_cuda:
            return None
        max_splits = max(self.num_splits(b) or 1 for b in range(1, max_bs + 1)) + (1 if self.window else 0)
        return self.ops.DecodeWorkspace.create(max_bs, self.num_head, self.v_head_dim, max_splits, self.device,
                                               head_dim_k=self.tq_pool.head_dim)

    def _warm_tables(self):
        """Build every codec's device tables now (eagerly), never inside a CUDA-graph capture."""
        try:
            from tq_kernels._common import kernel_tables
        except ImportError:  # pragma: no cover
            return
        for kc, vc in zip(self.tq_pool.k_codecs, self.tq_pool.v_codecs):
            for codec in (kc, vc):
                if codec is not None:
                    kernel_tables(codec, self.device)

    def warm_extend_kernels(self, dtype, block_ms=(64, 128), logit_caps=(0.0,)) -> int:
        """Run the packed-prefix extend once per distinct (K format, V format) of the quantized layers,
        per query-block size the automatic choice takes and per logit soft-cap the model's attention
        layers use (0: none), on a 2-token prefill over a 1-token prefix (slot 0, SGLang's padding slot),
        with and without the query group packed into the rows, so Triton compiles every variant before
        the first request. Only the constexprs select a variant (formats, block size, GQA packing,
        window, causal, soft-cap on or off; strides and the index dtypes are the
        serving ones: the parent's own indptr buffers), so serving finds them all compiled. It also
        runs a prefill-sized compress (its own tile size) into slot 0, the padding slot; it writes no
        other cache row. Returns the number of extend runs."""
        pool, dev = self.tq_pool, self.device
        n_new, h_q, h_kv = 2, self.num_head, pool.head_num
        qo_indptr = self.qo_indptr[:2]
        kv_indptr = self.kv_indptr[:2]
        qo_indptr.copy_(torch.tensor([0, n_new], dtype=qo_indptr.dtype))
        kv_indptr.copy_(torch.tensor([0, 1], dtype=kv_indptr.dtype))
        kv_indices = torch.zeros(1, dtype=torch.int64, device=dev)
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(n_new, h_q, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        k = torch.randn(n_new, h_kv, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        v = torch.randn(n_new, h_kv, pool.v_head_dim, generator=gen).to(device=dev, dtype=dtype)
        extra = {}
        if self.prefill_from_cache and self.window:
            from tq_kernels.window import ExtendWindow
            extra["window"] = ExtendWindow(k, v, self.window)
        # short runs pack the query group (tq_kernels.extend.choose_gqa_pack): a variant of its own
        packings = (False,) if (self.batch_invariant or h_q == h_kv) else (False, True)
        # split-K over the prefix, where the kernel chooses it itself (tq_kernels.extend.AUTO_SPLITS)
        auto = self.extend_splits is not False
        splittings = (1, 2) if (auto and not self.batch_invariant) else (1,)
        variants = [dict(block_m=block_m, logit_cap=cap, gqa_pack=pack, **({"num_splits": splits} if splits > 1 else {}),
                         **extra)
                    for block_m, cap, pack, splits in itertools.product(block_ms, logit_caps, packings, splittings)]
        if self.hybrid_extend:  # the prefix-only variant that takes the new tokens' part from outside
            new_part = (torch.zeros(n_new, h_q, pool.v_head_dim, device=dev, dtype=dtype),
                        torch.zeros(n_new, h_q, device=dev, dtype=torch.float32))
            variants += [dict(block_m=block_m, logit_cap=cap, gqa_pack=False, new_part=new_part)
                         for block_m, cap in itertools.product(block_ms, logit_caps)]
        seen, runs = set(), 0
        for i, quantized in enumerate(pool.quantized):
            if not quantized:
                continue
            lid = pool.start_layer + i
            kb, vb = pool.get_kv_buffer(lid)
            if (kb.codec.fmt, vb.codec.fmt) in seen:
                continue
            seen.add((kb.codec.fmt, vb.codec.fmt))
            # the prefill's compress tiles (tq_kernels.compress.choose_compress_tile: 16 rows up to 16
            # tokens, 32 from 17 on) into slot 0, SGLang's padding slot, no ring row written
            for n_rows in (2, 32):
                rows = torch.randn(n_rows, 2 * h_kv, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
                pool.set_kv_buffer(None, torch.zeros(n_rows, dtype=torch.int64, device=dev), rows[:, :h_kv],
                                   rows[:, h_kv:, :pool.v_head_dim], layer_id_override=lid,
                                   window_rows=(torch.full((n_rows,), -1, dtype=torch.int32, device=dev)
                                                if self.window else None))
            for kw in variants:
                self._extend(q, k, v, kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec,
                             qo_indptr, kv_indptr, kv_indices, pool.head_dim ** -0.5, causal=True,
                             max_extend_len=n_new, k_mean=None if kw["logit_cap"] else pool.key_mean(lid), **kw)
                runs += 1
        return runs

    def warm_plain_prefill(self, dtype, logit_caps=(0.0,)) -> bool:
        """One tiny plain prefill per logit soft-cap through FlashInfer's ragged prefill (with its lse, as
        the hybrid extend asks for it), so its JIT build happens at start-up and not at the first request.
        If FlashInfer cannot serve this model (a head size or dtype it was not built for), plain prefills
        go back to SGLang's Triton kernel: logged, returns False."""
        pool, dev = self.tq_pool, self.device
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(2, self.num_head, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        kv = torch.randn(2, 2 * pool.head_num, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        out = torch.empty(2, self.num_head, pool.v_head_dim, device=dev, dtype=dtype)
        lse = torch.empty(2, self.num_head, device=dev, dtype=torch.float32)
        try:
            for cap in logit_caps:
                self.ragged_prefill.run(q, kv[:, :pool.head_num], kv[:, pool.head_num:, :pool.v_head_dim], out, [2],
                                        pool.head_dim ** -0.5, cap, True, lse=lse)
        except Exception as e:  # noqa: BLE001 - any FlashInfer failure: keep serving on Triton
            logger.warning("TurboQuant: FlashInfer's ragged prefill failed at start-up (%s: %s); plain "
                           "prefills use SGLang's Triton extend kernel", type(e).__name__, e)
            self.ragged_prefill = None
            self.hybrid_extend = False
            return False
        return True

    def num_splits(self, bs: int) -> Optional[int]:
        """Static split-K count for a decode batch of `bs` (cached): the same for eager and graph runs;
        with SGLANG_TQ_BATCH_INVARIANT=1 the batch-size-1 count for every batch."""
        n = self._splits.get(bs, 0)
        if n == 0:
            from tq_kernels.decode import choose_num_splits
            n = (choose_num_splits(1 if self.batch_invariant else bs, self.num_kv_head, self.max_context_len,
                                   self.num_sms) if self.on_cuda else None)
            self._splits[bs] = n
        return n

    def _decode_plan(self, bs: int, kcodec, vcodec):
        """The kernels' launch plan for a decode batch of `bs` with these codecs (cached per batch size and
        formats): the static split count of `num_splits`, the recent window's ring, batch invariance."""
        key = (bs, kcodec.fmt, vcodec.fmt)
        plan = self._plans.get(key)
        if plan is None:
            plan = self.ops.plan_decode(kcodec, vcodec, bs, self.num_kv_head, self.max_context_len, self.device,
                                        window=bool(self.window), batch_invariant=self.batch_invariant,
                                        num_splits=self.num_splits(bs))
            self._plans[key] = plan
        return plan

    # ----------------------------------------------------------------------------------------
    # Recent window: ring rows and bounds, once per forward batch (inside a CUDA graph the first
    # quantized layer's ops are captured, and every later layer reuses their outputs)
    # ----------------------------------------------------------------------------------------
    def _window_metadata(self, fb, layer_id: int) -> dict:
        """Recomputed at the first quantized layer of every forward (so a CUDA-graph capture records it,
        even after eager warm-up runs of the same batch object) and whenever the batch changes."""
        if self._window_fb is fb and layer_id != self.tq_pool.first_quantized_layer:
            return self._window_md
        W, R = self.window, self.window_requests
        start = self.tq_pool.window_start
        req = fb.req_pool_indices.to(torch.int64)
        in_ring = req < R
        req_c = torch.clamp(req, max=R - 1)
        seq_lens = fb.seq_lens.to(torch.int64)
        if fb.forward_mode.is_decode_or_idle():
            bs = req.shape[0]
            loc = fb.out_cache_loc.to(torch.int64)[:bs]
            last = seq_lens - 1
            rows = torch.where(in_ring & (loc != 0), req_c * W + last % W, -1)  # loc 0: graph padding
            lo = torch.where(in_ring, torch.maximum(seq_lens - W, start[req_c].to(torch.int64)), seq_lens)
            md = dict(rows=rows.to(torch.int32), lo=lo.to(torch.int32), base=(req_c * W).to(torch.int32))
        else:
            # a piecewise-CUDA-graph extend pads the tokens (out_cache_loc) to a captured count; the
            # padding rows (after the batch's extend_num_tokens real ones) get no ring row
            n_rows = fb.out_cache_loc.shape[0]
            n_tok = min(int(fb.extend_num_tokens), n_rows) if fb.extend_num_tokens is not None else n_rows
            ext = fb.extend_seq_lens.to(torch.int64)
            seq = torch.repeat_interleave(torch.arange(req.shape[0], device=req.device), ext, output_size=n_tok)
            first = torch.cumsum(ext, 0) - ext  # each sequence's first token in the batch
            pos = (fb.extend_prefix_lens.to(torch.int64)[seq] + torch.arange(n_tok, device=req.device)
                   - first[seq])
            keep = in_ring[seq] & (pos >= seq_lens[seq] - W)  # each sequence's last W new tokens
            rows = torch.where(keep, req_c[seq] * W + pos % W, -1)
            if n_rows > n_tok:
                rows = torch.cat([rows, rows.new_full((n_rows - n_tok,), -1)])
            # ring rows before this extend's tokens are not this sequence's (radix hit, retraction):
            # decode reads them from the codes
            # (requests outside the ring write row R, which nothing reads: no boolean index, no host sync)
            start[torch.where(in_ring, req, R)] = fb.extend_prefix_lens.to(torch.int32)
            md = dict(rows=rows.to(torch.int32))
        self._window_fb, self._window_md = fb, md
        return md

    # ----------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------
    def _causal(self, layer) -> bool:
        if (layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY
                or (layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL
                    and self.allow_bidirectional_attention_in_extend)):
            return False
        return True

    @staticmethod
    def _unsupported(layer, sinks) -> Optional[str]:
        """Why the TurboQuant kernels (and the boundary layers' plain-prefill routing) cannot serve this
        layer, or None."""
        if sinks is not None:
            return "attention sinks are not supported"
        window = getattr(layer, "sliding_window_size", None)
        if window is not None and window > -1:
            return "sliding-window layers are not supported"
        if getattr(layer, "is_cross_attention", False):
            return "cross attention is not supported"
        return None

    @classmethod
    def _check_layer(cls, layer, sinks):
        why = cls._unsupported(layer, sinks)
        if why is not None:
            raise NotImplementedError(f"TurboQuant: {why}")

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        pool = forward_batch.token_to_kv_pool
        if not pool.is_quantized(layer.layer_id):
            if self.on_cuda:
                if (self._ragged_ok(layer) and self._unsupported(layer, sinks) is None
                        and self._no_cached_prefix(forward_batch)):
                    # a boundary layer's plain prefill: the same FlashInfer kernel as the quantized layers'
                    if save_kv_cache:
                        pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v)
                    o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
                    return self._plain_extend(q, k, v, o, layer, forward_batch)
                return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks)
            return self._torch_extend(q, k, v, layer, forward_batch, save_kv_cache)
        self._check_layer(layer, sinks)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        wmd = self._window_metadata(forward_batch, layer.layer_id) if self.window else None
        if save_kv_cache:
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v,
                               **({"window_rows": wmd["rows"]} if wmd is not None else {}))
        kb, vb = pool.get_kv_buffer(layer.layer_id)
        md = self.forward_metadata
        k_mean = self._key_mean(pool, layer)
        if (self.on_cuda and self.plain_prefill and not self.prefill_from_cache
                and self._no_cached_prefix(forward_batch)):
            return self._plain_extend(q, k, v, o, layer, forward_batch)
        extra = {}
        if self.prefill_from_cache:
            # stored keys are codes of k - mu: dequantized they are already centered like the prefix
            k_old, v_old = self._stored_kv(kb, vb, forward_batch.out_cache_loc, q.dtype)
            if self.window:  # decode's view: the last W positions exact, older ones from the codes
                from tq_kernels.window import ExtendWindow
                extra["window"] = ExtendWindow(k_old, v_old, self.window)
                if k_mean is not None:
                    extra["k_mean"] = k_mean
            else:
                k, v = k_old, v_old
        elif k_mean is not None:
            extra["k_mean"] = k_mean
        if (self.hybrid_extend and not self.prefill_from_cache and md.max_extend_len >= HYBRID_MIN_NEW):
            extra.update(self._new_part(q, k, v, layer, forward_batch, k_mean))
        self._extend(  # views: the launch function rotates q / k / v into new tensors anyway
            _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim),
            _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim),
            _head_rows(v, layer.tp_v_head_num, layer.v_head_dim),
            kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec,
            md.qo_indptr, md.kv_indptr, md.kv_indices, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            causal=self._causal(layer),
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
            max_extend_len=md.max_extend_len,  # python int from the metadata: no host sync
            max_prefix_len=self._max_prefix_len(forward_batch),  # for split-K over the prefix (host ints)
            **({"num_splits": 1} if self.extend_splits is False else {}),
            # the automatic choices (block rows, GQA packing, prefix splits) look at the batch
            **({"block_m": 64, "gqa_pack": False, "num_splits": 1} if self.batch_invariant else {}),
            **extra,
        )
        return o

    def _ragged_ok(self, layer) -> bool:
        """FlashInfer's ragged prefill serves this layer's new tokens: it is there, and the batch has no
        custom mask and the layer no Grok-style temperature (the Triton kernel's extras it lacks)."""
        return (self.ragged_prefill is not None and self.forward_metadata.custom_mask is None
                and getattr(layer, "xai_temperature_len", -1) in (-1, 0, None))

    def _ragged_lens(self, layer, forward_batch, rows: int):
        """The batch's host-side new-token counts when FlashInfer's ragged prefill can run this layer
        over `rows` q rows (padding rows past them stay untouched), else None."""
        lens = getattr(forward_batch, "extend_seq_lens_cpu", None) if forward_batch is not None else None
        return lens if (self._ragged_ok(layer) and lens and sum(lens) <= rows) else None

    def _ragged_run(self, q3, k3, v3, out3, lens, layer, lse=None) -> None:
        """FlashInfer's causal attention of the new tokens over themselves, with the layer's scale and
        soft-cap (and their lse in log2 units where `lse` is given)."""
        self.ragged_prefill.run(q3, k3, v3, out3, lens, layer.scaling,
                                logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
                                self._causal(layer), lse=lse)

    def _new_part(self, q, k, v, layer, forward_batch, k_mean) -> dict:
        """The new tokens' causal attention over themselves through FlashInfer's ragged prefill, with its
        lse, as extend_attention's new_part ({} when FlashInfer cannot run it). Keys go in centered like
        the cache's (k - mu), so both parts' scores shift alike."""
        q3 = _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim)
        lens = self._ragged_lens(layer, forward_batch, q3.shape[0])
        if lens is None:
            return {}
        k3 = _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim)
        if k_mean is not None:
            k3 = k3 - k_mean.to(k3.dtype)
        o_new = q.new_empty((q3.shape[0], layer.tp_q_head_num, layer.v_head_dim))
        lse = torch.empty((q3.shape[0], layer.tp_q_head_num), dtype=torch.float32, device=q.device)
        self._ragged_run(q3, k3, _head_rows(v, layer.tp_v_head_num, layer.v_head_dim), o_new, lens, layer, lse=lse)
        return {"new_part": (o_new, lse)}

    @staticmethod
    def _max_prefix_len(forward_batch) -> Optional[int]:
        """The longest cached prefix of the extend batch, from SGLang's host-side lengths (None if absent)."""
        lens = getattr(forward_batch, "extend_prefix_lens_cpu", None)
        return max(lens) if lens else None

    @staticmethod
    def _no_cached_prefix(forward_batch) -> bool:
        """True when no sequence of this extend batch reads a prefix from the cache (host-side lengths:
        no sync). A first prefill chunk without a radix hit is such a batch."""
        lens = getattr(forward_batch, "extend_prefix_lens_cpu", None)
        return lens is not None and len(lens) > 0 and not any(lens)

    def _plain_extend(self, q, k, v, o, layer, forward_batch=None):
        """Attention of new tokens without a cached prefix: nothing is read from the packed cache, and
        the rotation is orthogonal, so this is plain attention over the new bf16 K/V (key centering
        only shifts each query's scores by a constant). FlashInfer's ragged prefill serves it where it
        imports (`flashinfer_prefill.RaggedPrefill`), else SGLang's own Triton extend kernel, so such a
        prefill runs as fast as with BF16 KV; the K/V were already stored packed. Both kernels take
        row and head strides, so q/k/v go in as the views of the qkv projection they are: no copies
        (a copy of q was 2.5 ms of an 8B-shape 8 x 1K prefill on an H200, tenth session)."""
        md = self.forward_metadata
        q3 = _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim)
        k3 = _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim)
        v3 = _head_rows(v, layer.tp_v_head_num, layer.v_head_dim)
        o3 = o.view(-1, layer.tp_q_head_num, layer.v_head_dim)
        lens = self._ragged_lens(layer, forward_batch, q3.shape[0])
        if lens is not None:
            self._ragged_run(q3, k3, v3, o3, lens, layer)
            return o
        self.extend_attention_fwd(
            q3, k3, v3, o3,
            k3, v3,  # the prefix buffers: every prefix is empty, so the kernel reads none of them
            md.qo_indptr, md.kv_indptr, md.kv_indices, md.custom_mask, self._causal(layer), md.mask_indptr,
            md.max_extend_len, 1.0, 1.0, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            sliding_window_size=-1, sinks=None, window_kv_offsets=None,
            xai_temperature_len=getattr(layer, "xai_temperature_len", -1),
        )
        return o

    @staticmethod
    def _key_mean(pool, layer):
        """The layer's key-centering mean (None without one). Softcapped scores are not shift
        invariant, so centering is refused there."""
        get = getattr(pool, "key_mean", None)
        mu = get(layer.layer_id) if get is not None else None
        if mu is not None and logit_capping_mod(layer.logit_capping_method, layer.logit_cap):
            raise NotImplementedError("TurboQuant: key centering (key_means) is not exact with logit "
                                      "softcapping; remove key_means from the config for this model")
        return mu

    @_no_compile
    def _stored_kv(self, kb, vb, loc, dtype):
        """K/V of the slots `loc` as the cache holds them (dequantized), in `dtype`."""
        loc = loc.long()
        k = kb.codec.decode(kb.codes[loc], kb.scales[loc]).to(dtype)
        v = vb.codec.decode(vb.codes[loc], vb.scales[loc]).to(dtype)
        return k, v

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        pool = forward_batch.token_to_kv_pool
        if not pool.is_quantized(layer.layer_id):
            if self.on_cuda:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks=sinks)
            return self._torch_decode(q, k, v, layer, forward_batch, save_kv_cache)
        self._check_layer(layer, sinks)
        q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        bs = q.shape[0]
        kb, vb = pool.get_kv_buffer(layer.layer_id)
        extra, ws = {}, None
        if self.on_cuda:
            # the workspace is sized for the largest captured batch; bigger (eager) batches allocate
            ws = self.decode_workspace if bs <= self._workspace_bs else None
            extra = dict(workspace=ws, plan=self._decode_plan(bs, kb.codec, vb.codec))
        wmd = self._window_metadata(forward_batch, layer.layer_id) if self.window else None
        if save_kv_cache:
            rot = {}
            if self.on_cuda and not kb.codec.fmt.qjl:  # the new K/V's launch also rotates the queries
                q_rot = (ws.q_rot if ws is not None
                         else q.new_empty((bs, layer.tp_q_head_num, layer.qk_head_dim), dtype=torch.float32))
                rot = dict(q=q, q_rot=q_rot)
                extra["q_rotated"] = q_rot
            if wmd is not None:
                rot["window_rows"] = wmd["rows"]
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v, **rot)
        md = self.forward_metadata
        self._key_mean(pool, layer)  # decode itself is unchanged by centering; only the cap check
        if wmd is not None:
            from tq_kernels.window import DecodeWindow
            ring_k, ring_v = pool.window_buffers(layer.layer_id)
            extra["window"] = DecodeWindow(ring_k, ring_v, self.window, wmd["lo"], wmd["base"])
        self._decode(
            # no copy: decode reads q's values only through q_rotated or a matmul, which takes strides
            q.view(bs, layer.tp_q_head_num, layer.qk_head_dim),
            kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec,
            md.kv_indptr, md.kv_indices, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap),
            out=o.view(bs, layer.tp_q_head_num, layer.v_head_dim),
            **extra,
        )
        return o

    # ----------------------------------------------------------------------------------------
    # CPU path of the unquantized (bf16) layers: plain softmax attention over the bf16 buffers.
    # ----------------------------------------------------------------------------------------
    @staticmethod
    def _attend(q, k, v, scale, cap, mask=None):
        """q [M, Hq, d], k [L, Hkv, d], v [L, Hkv, dv] (float32) -> [M, Hq, dv]."""
        g = q.shape[1] // k.shape[1]
        if k.shape[0] == 0:
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        s = torch.einsum("mhd,lhd->hml", q, k) * scale
        if cap and cap > 0:
            s = cap * torch.tanh(s / cap)
        if mask is not None:
            s = s.masked_fill(~mask[None], float("-inf"))
        return torch.einsum("hml,lhd->mhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)

    def _torch_extend(self, q, k, v, layer, fb, save_kv_cache):
        pool = fb.token_to_kv_pool
        if save_kv_cache:
            pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        kbuf, vbuf = pool.get_kv_buffer(layer.layer_id)
        md = self.forward_metadata
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        q3 = q.view(-1, hq, d).float()
        k3 = k.view(-1, layer.tp_k_head_num, d).float()
        v3 = v.view(-1, layer.tp_v_head_num, dv).float()
        o = q.new_empty((q.shape[0], hq * dv))
        o3 = o.view(-1, hq, dv)
        qo, kvp = md.qo_indptr.tolist(), md.kv_indptr.tolist()
        cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        for i in range(len(qo) - 1):
            a, b = qo[i], qo[i + 1]
            if b <= a:
                continue
            slots = md.kv_indices[kvp[i]:kvp[i + 1]]
            kk = torch.cat([kbuf[slots].float(), k3[a:b]])
            vv = torch.cat([vbuf[slots].float(), v3[a:b]])
            n_pre, n = kvp[i + 1] - kvp[i], b - a
            mask = torch.ones(n, n_pre + n, dtype=torch.bool, device=q.device)
            if self._causal(layer):
                mask[:, n_pre:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            o3[a:b] = self._attend(q3[a:b], kk, vv, layer.scaling, cap, mask).to(o.dtype)
        return o

    def _torch_decode(self, q, k, v, layer, fb, save_kv_cache):
        pool = fb.token_to_kv_pool
        if save_kv_cache:
            pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        kbuf, vbuf = pool.get_kv_buffer(layer.layer_id)
        md = self.forward_metadata
        hq, d, dv = layer.tp_q_head_num, layer.qk_head_dim, layer.v_head_dim
        q3 = q.reshape(-1, hq, d).float()
        o = q.new_empty((q3.shape[0], hq * dv))
        o3 = o.view(-1, hq, dv)
        kvp = md.kv_indptr.tolist()
        cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        for b in range(q3.shape[0]):
            slots = md.kv_indices[kvp[b]:kvp[b + 1]]
            o3[b] = self._attend(q3[b:b + 1], kbuf[slots].float(), vbuf[slots].float(), layer.scaling, cap)[0].to(o.dtype)
        return o
