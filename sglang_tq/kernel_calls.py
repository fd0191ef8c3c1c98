"""The adapter's one dispatch point to tq_kernels: every kernel call of the pool and the backend.

`kernel_calls(device)` picks the implementation once per device through `tq_kernels.ops`: the Triton kernels
on CUDA, the pure-PyTorch reference (same signatures and results; it ignores launch decisions) elsewhere
(the CPU tests; `KernelCalls(device, triton=True)` runs the Triton kernels there under TRITON_INTERPRET=1).
The pool and the backend hold the same object and call only its methods; the launch decisions
(`DecodeLaunch`, the kernels' decode plans) are made in the backend's metadata and passed down as values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch

from tq_kernels.decode import DecodePlan


def _no_compile(fn):
    """Kernel launches stay out of torch.compile graphs (SGLang compiles the model around attention)."""
    return torch.compiler.disable(fn)


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch decisions of one decode batch shape, made in init_forward_metadata / the graph hooks: one
    `tq_kernels` DecodePlan per (K format, V format, recent-window ring, first-token rows) of the model's
    quantized layers (empty off the GPU: the reference takes no launch decisions)."""

    batch: int                 # the batch size the decisions are made for (1: batch-invariant)
    plans: Tuple[Tuple[tuple, DecodePlan], ...] = ()

    def plan(self, kcodec, vcodec, ring: bool, first: bool) -> Optional[DecodePlan]:
        key = (kcodec.fmt, vcodec.fmt, bool(ring), bool(first))
        for fmts, plan in self.plans:
            if fmts == key:
                return plan
        return None

    @property
    def num_splits(self) -> Optional[int]:
        """The largest packed split count of the plans (None without plans)."""
        return max((p.num_splits for _, p in self.plans), default=None)

    @property
    def partials(self) -> int:
        """Workspace partials per (sequence, query head): the largest plan's, ring included."""
        return max((p.partials for _, p in self.plans), default=1)


class KernelCalls:
    def __init__(self, device, triton: Optional[bool] = None):
        from tq_kernels import ops

        self.device = torch.device(device)
        self.triton = self.device.type == "cuda" if triton is None else triton
        self._ops = ops.TRITON if self.triton else ops.REFERENCE

    # ------------------------------------------------------------------------------------------
    # Launch decisions (host side, once per batch shape)
    # ------------------------------------------------------------------------------------------
    def decode_launch(self, bs: int, codec_pairs: Sequence[tuple], num_kv_heads: int, max_context_len: int,
                      num_sms: int, batch_invariant: bool, window: bool, first: bool = False,
                      ringless_pairs: Sequence[tuple] = ()) -> DecodeLaunch:
        """The decode plans of a batch of `bs` for every distinct (K, V) format pair (with the recent window's
        ring when `window` and the first-token rows when `first`; ringless_pairs: layers without either, the
        sliding-window pool's); batch-invariant: batch size 1's decisions for every batch, so a sequence's
        split-K partition depends on its length alone."""
        b = 1 if batch_invariant else bs
        if not self.triton:
            return DecodeLaunch(batch=b)
        plans = {}
        for pairs, ring, with_first in ((codec_pairs, bool(window), bool(first)), (ringless_pairs, False, False)):
            for kc, vc in pairs:
                key = (kc.fmt, vc.fmt, ring, with_first)
                if key not in plans:
                    plans[key] = self._ops.plan_decode(kc, vc, b, num_kv_heads, max_context_len, self.device,
                                                       window=ring, first=with_first, sm_count=num_sms)
        return DecodeLaunch(batch=b, plans=tuple(plans.items()))

    def decode_workspace(self, max_bs: int, num_q_heads: int, v_head_dim: int, max_partials: int, head_dim_k: int):
        """Preallocated split-K partials for CUDA graphs (None off the GPU: the reference needs none), at the
        codec dims (a head_dim of 80 / 96 is padded)."""
        if not self.triton:
            return None
        from tq_kernels.codec import codec_dim

        return self._ops.DecodeWorkspace.create(max_bs, num_q_heads, codec_dim(v_head_dim), max_partials, self.device,
                                                head_dim_k=codec_dim(head_dim_k))

    def rotates_queries(self, kcodec) -> bool:
        """Whether decode's compress launch also rotates the queries (keys without QJL, Triton only)."""
        return self.triton and not kcodec.fmt.qjl

    def extend_splits_prefix(self) -> bool:
        """Whether the extend splits the packed prefix over several programs where the grid is small (the
        Triton kernel does; the reference has no programs)."""
        return self.triton

    def warm_tables(self, codecs) -> None:
        """Build every codec's device tables now, never inside a CUDA-graph capture."""
        if not self.triton:
            return
        from tq_kernels._common import kernel_tables

        for codec in codecs:
            if codec is not None:
                kernel_tables(codec, self.device)

    # ------------------------------------------------------------------------------------------
    # Kernels
    # ------------------------------------------------------------------------------------------
    @_no_compile
    def compress(self, k, v, loc, kb, vb, *, k_mean=None, ring=None, first=None, q=None, q_rot=None) -> None:
        """Quantize k / v into rows `loc` of the packed buffers kb / vb (pool.TQLayerBuffer); with q / q_rot
        the same launch writes the queries rotated like the keys; ring / first: exact rows (tq_kernels.window)."""
        self._ops.compress_and_store(k, v, loc, kb.codec, vb.codec, kb.codes, kb.scales, vb.codes, vb.scales,
                                     k_mean=k_mean, ring=ring, first=first, q=q, q_rot=q_rot)

    @_no_compile
    def claim_first_rows(self, ids, loc, at_zero, table, flags):
        """First-token table entries of the new tokens (tq_kernels.first_token.claim_first_rows)."""
        return self._ops.claim_first_rows(ids, loc, at_zero, table, flags)

    @_no_compile
    def decode(self, q, kb, vb, kv_indptr, kv_indices, sm_scale: float, *, logit_cap: float, out,
               launch: DecodeLaunch, workspace=None, q_rotated=None, window=None, first=None, sliding_window: int = 0,
               sinks=None):
        plan = launch.plan(kb.codec, vb.codec, window is not None, first is not None)
        return self._ops.decode_attention(q, kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec, kv_indptr,
                                          kv_indices, sm_scale, logit_cap, out, plan=plan, workspace=workspace,
                                          q_rotated=q_rotated, window=window, first=first,
                                          sliding_window=sliding_window, sinks=sinks)

    @_no_compile
    def extend(self, q, k, v, kb, vb, qo_indptr, kv_indptr, kv_indices, sm_scale: float, *, logit_cap: float,
               causal: bool, out=None, max_extend_len: Optional[int] = None, max_prefix_len: Optional[int] = None,
               k_mean=None, window=None, new_part=None, block_m: Optional[int] = None,
               gqa_pack: Optional[bool] = None, num_splits: Optional[int] = None, sliding_window: int = 0,
               sinks=None, tree=None, prefix_ring=None, first=None):
        """block_m / gqa_pack / num_splits: fixed by batch-invariant runs and the start-up warm-up; None
        leaves the choice to the kernel. sliding_window / sinks: the layer's (`extend_attention`).
        tree / prefix_ring: speculative verify (`tq_kernels.verify`); first: the exact first-token rows."""
        return self._ops.extend_attention(q, k, v, kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec,
                                          qo_indptr, kv_indptr, kv_indices, sm_scale, logit_cap, causal, out,
                                          max_extend_len=max_extend_len, max_prefix_len=max_prefix_len,
                                          k_mean=k_mean, window=window, new_part=new_part, block_m=block_m,
                                          gqa_pack=gqa_pack, num_splits=num_splits, sliding_window=sliding_window,
                                          sinks=sinks, tree=tree, prefix_ring=prefix_ring, first=first)

    def draft_staging(self, rings_k, rings_v, window: int, requests: int, draft_tokens: int, max_rows: int):
        """A `tq_kernels.verify.DraftStaging` over these rings (one launch per call on the GPU)."""
        from tq_kernels.verify import DraftStaging

        return DraftStaging(rings_k, rings_v, window, requests, draft_tokens, max_rows, triton_kernel=self.triton)


_CALLS: Dict[str, KernelCalls] = {}


def kernel_calls(device) -> KernelCalls:
    """The KernelCalls of `device` (one per device type, shared by the pool and the backend)."""
    key = torch.device(device).type
    if key not in _CALLS:
        _CALLS[key] = KernelCalls(device)
    return _CALLS[key]
