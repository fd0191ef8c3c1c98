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
  to their ring rows (one launch for all layers, `RowCopy`): how many were accepted follows from its new
  length (that forward's seq_lens), which ones from the req-to-token row SGLang rewrote with their slots.
  The ring then holds what plain decode of the accepted tokens would have written. A request's staged
  step waits for its next verify or decode (a prefill batch of other requests may come first); an extend
  of the request slot (a new request, a retracted one re-prefilled) drops it.

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
        max_bs = int(model_runner.req_to_token_pool.size)
        dev = backend.device
        self.stage_rows = torch.full((max_bs * D,), -1, dtype=torch.int32, device=dev)
        self.ring_lo = torch.zeros(max_bs * D, dtype=torch.int32, device=dev)
        self.ring_base = torch.zeros(max_bs, dtype=torch.int32, device=dev)
        # per ring request slot (row R: the writes of rows outside the ring and of padding, never read): a staged
        # verify step not yet committed, its prefix length and its draft tokens' slots
        self.p_valid = torch.zeros(R + 1, dtype=torch.bool, device=dev)
        self.p_prefix = torch.zeros(R + 1, dtype=torch.int64, device=dev)
        self.p_slots = torch.zeros(R + 1, D, dtype=torch.int64, device=dev)
        self.stage_k, self.stage_v = [], []
        if W and any(pool.quantized):
            for i, quantized in enumerate(pool.quantized):
                if quantized:
                    rk, rv = pool.window_buffers(pool.start_layer + i)
                    self.stage_k.append(torch.zeros((R * D,) + tuple(rk.shape[1:]), dtype=rk.dtype, device=dev))
                    self.stage_v.append(torch.zeros((R * D,) + tuple(rv.shape[1:]), dtype=rv.dtype, device=dev))
                else:
                    self.stage_k.append(None)
                    self.stage_v.append(None)
            rings = [pool.window_buffers(pool.start_layer + i) for i, qz in enumerate(pool.quantized) if qz]
            self.copy_k = backend.ops.row_copy([r[0] for r in rings], [s for s in self.stage_k if s is not None])
            self.copy_v = backend.ops.row_copy([r[1] for r in rings], [s for s in self.stage_v if s is not None])

    # ----------------------------------------------------------------------------------------
    # Metadata
    # ----------------------------------------------------------------------------------------
    def metadata(self, bs: int, raw_bs: int, req_pool_indices, seq_lens, positions, custom_mask,
                 mask_indptr) -> VerifyMetadata:
        """Fill the static buffers for a verify batch of `bs` rows (the first `raw_bs` real; the rest CUDA-graph
        padding) and stage the real rows' step for their next commit. positions: the draft tokens' positions
        (prefix + depth in the tree), at least raw_bs * D of them."""
        D, W, R = self.draft_tokens, self.window, self.window_requests
        T = bs * D
        tree = TreeMask(custom_mask, mask_indptr)
        req = req_pool_indices[:bs].to(torch.int64)
        prefix = seq_lens[:bs].to(torch.int64)
        if not self.stage_k:  # no recent window (or no quantized layer): nothing staged, no ring read
            return VerifyMetadata(tree=tree)
        dev = req.device
        tok = torch.arange(T, device=dev)
        seq, draft = tok // D, tok % D
        in_ring = req < R
        req_c = torch.clamp(req, max=R - 1)
        real = seq < raw_bs
        self._stage(torch.where(in_ring & (torch.arange(bs, device=dev) < raw_bs), req, R), prefix)
        self.stage_rows[:T] = torch.where(in_ring[seq] & real, req_c[seq] * D + draft, -1).to(torch.int32)
        pos = prefix[seq] + draft  # padding rows: any position (their outputs are dropped)
        n = min(int(positions.shape[0]), raw_bs * D)
        pos[:n] = positions[:n].to(torch.int64)
        start = self.pool.window_start[req_c].to(torch.int64)[seq]
        lo = torch.minimum(torch.maximum(pos + 1 - W, start), prefix[seq])
        self.ring_lo[:T] = torch.where(in_ring[seq], lo, prefix[seq]).to(torch.int32)
        self.ring_base[:bs] = (req_c * W).to(torch.int32)
        return VerifyMetadata(tree=tree, stage_rows=self.stage_rows[:T], ring_lo=self.ring_lo[:T],
                              ring_base=self.ring_base[:bs])

    def _stage(self, r, prefix) -> None:
        """Rows r (request slots; R: not staged) of this verify: prefixes and draft slots (req-to-token holds
        the draft slots at positions prefix .. prefix + D - 1 until SGLang rewrites them with the accepted
        ones)."""
        self.p_valid[r] = r < self.window_requests
        self.p_prefix[r] = prefix
        self.p_slots[r] = self._slots_at(torch.clamp(r, max=self.window_requests - 1), prefix)

    def _slots_at(self, req, prefix):
        """[n, D] req_to_token[req, prefix + d] (positions clamped to the row)."""
        pos = prefix[:, None] + torch.arange(self.draft_tokens, device=prefix.device)[None, :]
        return self.req_to_token[req[:, None], pos.clamp(max=self.req_to_token.shape[1] - 1)].to(torch.int64)

    def commit(self, req_pool_indices, new_lens=None, real=None) -> None:
        """Before a forward of the requests `req_pool_indices`: copy each one's staged verify step, if any,
        from the staging rows to the ring rows of its accepted tokens, positions [prefix, new_lens), in every
        layer, and drop the step. The token SGLang kept at a position is found by its slot among the step's
        draft slots. new_lens None (an extend of these request slots): drop without copying. real: the rows
        that are requests (CUDA-graph padding is not)."""
        if not self.stage_k:
            return
        D, W, R = self.draft_tokens, self.window, self.window_requests
        req = req_pool_indices.to(torch.int64)
        keep = req < R if real is None else (req < R) & real
        r = torch.where(keep, req, R)
        if new_lens is not None:
            valid = self.p_valid[r] & keep
            prefix = self.p_prefix[r]
            d = torch.arange(D, device=req.device)
            pos = prefix[:, None] + d[None, :]
            take = valid[:, None] & (pos < new_lens.to(torch.int64)[:, None])
            r_c = torch.clamp(r, max=R - 1)
            match = self._slots_at(r_c, prefix)[:, :, None] == self.p_slots[r][:, None, :]
            src = torch.where(take & match.any(-1), r_c[:, None] * D + match.to(torch.int32).argmax(-1), -1)
            tgt = r_c[:, None] * W + pos % W
            self.copy_k(src.flatten(), tgt.flatten())
            self.copy_v(src.flatten(), tgt.flatten())
        self.p_valid[r] = False

    def warm(self, kb, vb, lid: int, dtype, block_ms, logit_caps) -> int:
        """Run the verify extend of layer `lid` (formats kb / vb) on a draft tree over a 1-token prefix (slot 0,
        nothing written) per query-block size, soft-cap and mask dtype (eager verify: bool, CUDA graphs: uint8),
        so Triton compiles those variants at start-up. Returns the number of runs."""
        backend, pool, dev, n = self.backend, self.pool, self.backend.device, self.draft_tokens
        gen = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(n, backend.num_head, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        k = torch.randn(n, pool.head_num, pool.head_dim, generator=gen).to(device=dev, dtype=dtype)
        v = torch.randn(n, pool.head_num, pool.v_head_dim, generator=gen).to(device=dev, dtype=dtype)
        qo_indptr, kv_indptr = backend.bf16.qo_indptr[:2], backend.bf16.kv_indptr[:2]
        qo_indptr.copy_(torch.tensor([0, n], dtype=qo_indptr.dtype))
        kv_indptr.copy_(torch.tensor([0, 1], dtype=kv_indptr.dtype))
        kv_indices = torch.zeros(1, dtype=torch.int64, device=dev)
        mask_indptr = torch.tensor([0, n * (1 + n)], dtype=torch.int64, device=dev)
        ring = None
        if self.stage_k:
            rk, rv = pool.window_buffers(lid)
            ring = PrefixRing(rk, rv, self.window, torch.ones(n, dtype=torch.int32, device=dev),
                              torch.zeros(1, dtype=torch.int32, device=dev))
        variants = [backend.extend_fixed] if backend.batch_invariant else [dict(block_m=bm) for bm in block_ms]
        runs = 0
        for mask_dtype in (torch.bool, torch.uint8):
            tree = TreeMask(torch.ones(n * (1 + n), dtype=mask_dtype, device=dev), mask_indptr)
            for kw in variants:
                for cap in logit_caps:
                    backend.ops.extend(q, k, v, kb, vb, qo_indptr, kv_indptr, kv_indices, pool.head_dim ** -0.5,
                                       logit_cap=cap, causal=True, max_extend_len=n,
                                       k_mean=None if cap else pool.key_mean(lid), tree=tree, prefix_ring=ring, **kw)
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
            idx = lid - pool.start_layer
            stage = (self.stage_k[idx], self.stage_v[idx]) if self.stage_k else None
            pool.set_kv_buffer(layer, forward_batch.out_cache_loc, k, v,
                               window_rows=vm.stage_rows if stage else None, window_buffers=stage)
        kb, vb = pool.get_kv_buffer(lid)
        ring = None
        if self.stage_k:
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
            k_mean=backend._key_mean(pool, layer), sinks=sinks, tree=vm.tree, prefix_ring=ring,
            **backend.extend_fixed)
        return o
