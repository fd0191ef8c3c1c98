"""Speculative decoding over the packed cache: SGLang's TARGET_VERIFY forward mode on the TurboQuant backend.

A verify step runs the target model over each request's draft tokens (NGRAM's n-gram matches, in a tree)
at once. SGLang hands the backend the batch with `seq_lens` = the cached prefix, `out_cache_loc` = one new
slot per draft token, and the tree as `spec_info.custom_mask` (its layout: `tq_kernels.verify.TreeMask`).
On the quantized layers:

* the draft tokens' K/V are compressed into their slots, as any new token's (the launch that a decode step
  would run), so an accepted token's codes are exactly what plain decode would have stored; SGLang then
  frees the rejected tokens' slots and points the request's req-to-token row at the accepted ones (page
  size 1: no K/V moves);
* attention is the extend kernel over the packed prefix plus the draft tokens, exact, under the tree mask;
  with a recent window each draft token reads the prefix positions decode would read exactly from the ring
  (`PrefixRing`): a draft token sees what decode would see at its position;
* with a recent window, the draft tokens' exact rotated K/V go to staging rows (one per request slot and
  draft index), not to the ring: tree siblings share a position, and rejected tokens must leave no ring
  row behind. The request's next forward on the backend first copies its accepted tokens' staging rows
  to their ring rows (`tq_kernels.verify.DraftStaging`, one launch for all layers): how many were accepted
  follows from its new length (that forward's seq_lens), which ones from the req-to-token row SGLang
  rewrote with their slots.
  The ring then holds what plain decode of the accepted tokens would have written. A request's staged
  step waits for its next forward (a prefill batch of other requests may come first); an extend of the
  request slot commits the tokens before its prefix (a streaming session's next turn keeps its ring; a new
  request in that slot reads its ring from its prefix on, so what this writes below it is never read).

CUDA graphs: capture and replay fill static buffers (ring bounds, staging rows); padding rows of a replay
(beyond the real batch) write no staging row.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sglang_tq.compat import DRAFT_MODEL_REFUSAL, SPECULATIVE_ALGORITHMS
from sglang_tq.sglang_internals import server_arg
from tq_kernels.verify import PrefixRing, TreeMask


@dataclass
class VerifyMetadata:
    """What a verify forward reads besides the stock extend metadata (views of static buffers)."""

    tree: TreeMask
    stage_rows: Optional[torch.Tensor] = None  # int32 [T]: staging row of each draft token (< 0: none)
    ring_lo: Optional[torch.Tensor] = None     # int32 [T]: first prefix position read from the ring
    ring_base: Optional[torch.Tensor] = None   # int32 [B]: ring row of position 0 (mod W)


class SpeculativeVerify:
    """Verify metadata, the staging rows of the draft tokens' exact K/V and their commit to the ring."""

    def __init__(self, backend, model_runner):
        sa = model_runner.server_args
        algo = server_arg(sa, "speculative_algorithm")
        if algo and str(algo).upper() not in SPECULATIVE_ALGORITHMS:
            raise NotImplementedError(f"TurboQuant: --speculative-algorithm {algo}: {DRAFT_MODEL_REFUSAL}")
        self.backend = backend
        self.pool = pool = backend.tq_pool
        self.draft_tokens = D = int(server_arg(sa, "speculative_num_draft_tokens") or 0)
        if D < 1:
            raise ValueError(f"TurboQuant: speculative decoding needs --speculative-num-draft-tokens >= 1, got {D}")
        self.window, self.window_requests = W, R = backend.window, backend.window_requests
        if W and D > W:
            raise ValueError(f"TurboQuant: window.tokens ({W}) in the config must be at least "
                             f"--speculative-num-draft-tokens ({D}) with speculative decoding: the draft tokens of "
                             f"one step are committed to the recent window together")
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        self.graphs = not server_arg(sa, "disable_cuda_graph")  # verify from CUDA graphs (warm-up's variants)
        # the quantized layers' staging rows and ring commits (tq_kernels.verify.DraftStaging); None without a
        # recent window: nothing staged, no ring read
        self.staging = None
        self.stage_index = {}
        # model layer ids (a linear-attention hybrid's attention layers are not contiguous)
        lids = [lid for lid in pool.quantized_layer_ids if pool.window_buffers(lid)[0] is not None] if W else []
        if lids:
            rings = [pool.window_buffers(lid) for lid in lids]
            self.staging = backend.ops.draft_staging([r[0] for r in rings], [r[1] for r in rings], W, R, D,
                                                     int(model_runner.req_to_token_pool.size))
            self.stage_index = {lid: n for n, lid in enumerate(lids)}

    # ----------------------------------------------------------------------------------------
    # Metadata
    # ----------------------------------------------------------------------------------------
    def metadata(self, bs: int, raw_bs: int, req_pool_indices, seq_lens, positions, custom_mask,
                 mask_indptr) -> VerifyMetadata:
        """Fill the static buffers for a verify batch of `bs` rows (the first `raw_bs` real; the rest CUDA-graph
        padding) and stage the real rows' step for their next commit. positions: the draft tokens' positions
        (prefix + depth in the tree), at least raw_bs * D of them."""
        tree = TreeMask(custom_mask, mask_indptr)
        if self.staging is None:
            return VerifyMetadata(tree=tree)
        rows, lo, base = self.staging.stage(req_pool_indices[:bs], seq_lens[:bs], positions, raw_bs,
                                            self.req_to_token, self.pool.window_start)
        return VerifyMetadata(tree=tree, stage_rows=rows, ring_lo=lo, ring_base=base)

    def commit(self, req_pool_indices, new_lens, n_real=None) -> None:
        """Before a forward of the requests `req_pool_indices` (the first n_real real; default all) whose cache
        then holds new_lens tokens (an extend: its prefix): their last verify's accepted tokens into the ring
        (DraftStaging.commit)."""
        if self.staging is not None:
            n = req_pool_indices.shape[0]
            self.staging.commit(req_pool_indices, new_lens, n if n_real is None else n_real, self.req_to_token)

    def warm(self, kb, vb, lid: int, dtype, block_ms, logit_caps) -> int:
        """Run the verify extend of layer `lid` (formats kb / vb) on a draft tree over a 1-token prefix (slot 0,
        nothing written) per query-block size, soft-cap and prefix split (split by the longest context, as small
        grids take it, and unsplit), with the index and mask dtypes of the path that serves verify (CUDA graphs:
        SGLang's int64 qo_indptr and uint8 mask buffers; eager: int32 and bool), so Triton compiles those
        variants at start-up. Returns the number of runs."""
        backend, pool, dev, n = self.backend, self.pool, self.backend.device, self.draft_tokens
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(n, backend.num_head, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        k = torch.randn(n, pool.head_num, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        v = torch.randn(n, pool.head_num, pool.v_head_dim, generator=gen).to(device=dev, dtype=dtype)
        kv_indptr = backend.bf16.kv_indptr[:2]
        kv_indptr.copy_(torch.tensor([0, 1], dtype=kv_indptr.dtype))
        if self.graphs:
            qo_indptr = backend.bf16.qo_indptr[:2]
            qo_indptr.copy_(torch.tensor([0, n], dtype=qo_indptr.dtype))
        else:
            qo_indptr = torch.tensor([0, n], dtype=torch.int32, device=dev)
        tree = TreeMask(torch.ones(n * (1 + n), dtype=torch.uint8 if self.graphs else torch.bool, device=dev),
                        torch.tensor([0, n * (1 + n)], dtype=torch.int64, device=dev))
        kv_indices = torch.zeros(1, dtype=torch.int64, device=dev)
        ring = None
        if self.staging is not None:
            rk, rv = pool.window_buffers(lid)
            ring = PrefixRing(rk, rv, self.window, torch.ones(n, dtype=torch.int32, device=dev),
                              torch.zeros(1, dtype=torch.int32, device=dev))
        variants = [backend.extend_fixed] if backend.batch_invariant else [
            dict(block_m=bm, num_splits=splits) for bm in block_ms for splits in (None, 1)]
        runs = 0
        for kw in variants:
            for cap in logit_caps:
                backend.ops.extend(q, k, v, kb, vb, qo_indptr, kv_indptr, kv_indices, pool.head_dim ** -0.5,
                                   logit_cap=cap, causal=True, max_extend_len=n, max_prefix_len=backend.max_context_len,
                                   k_mean=None if cap else pool.key_mean(lid), tree=tree, prefix_ring=ring,
                                   first=backend.first_rows(pool, lid), **kw)
                runs += 1
        return runs

    # ----------------------------------------------------------------------------------------
    # Forward (quantized layers)
    # ----------------------------------------------------------------------------------------
    def forward(self, q, k, v, layer, forward_batch, md, save_kv_cache=True, sinks=None):
        from sglang.srt.layers.attention.triton_backend import logit_capping_mod
        from sglang_tq.backend import _head_rows

        backend, pool, vm = self.backend, forward_batch.token_to_kv_pool, md.verify
        if backend._sliding_window(layer):
            raise NotImplementedError(f"TurboQuant: speculative verify on a sliding-window layer (layer "
                                      f"{layer.layer_id}) is not supported")
        lid = layer.layer_id
        if save_kv_cache:
            stage = None
            if self.staging is not None:
                n = self.stage_index[lid]
                stage = (self.staging.stage_k[n], self.staging.stage_v[n])
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v,
                               window_rows=vm.stage_rows if stage else None, window_buffers=stage)
        kb, vb = pool.get_kv_buffer(lid)
        ring = None
        if self.staging is not None:
            rk, rv = pool.window_buffers(lid)
            ring = PrefixRing(rk, rv, self.window, vm.ring_lo, vm.ring_base)
        o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        backend.ops.extend(
            _head_rows(q, layer.tp_q_head_num, layer.qk_head_dim),
            _head_rows(k, layer.tp_k_head_num, layer.qk_head_dim),
            _head_rows(v, layer.tp_v_head_num, layer.v_head_dim),
            kb, vb, md.qo_indptr, md.kv_indptr, md.kv_indices, layer.scaling,
            logit_cap=logit_capping_mod(layer.logit_capping_method, layer.logit_cap), causal=True,
            out=o.view(-1, layer.tp_q_head_num, layer.v_head_dim), max_extend_len=md.max_extend_len,
            max_prefix_len=backend.max_context_len,  # prefix splits by the longest context: one count per batch size
            k_mean=backend._key_mean(pool, layer, sinks), sinks=sinks, tree=vm.tree, prefix_ring=ring,
            first=backend.first_rows(pool, lid), **backend.extend_fixed)
        return o
