"""The adapter's one dispatch point to tq_kernels: every kernel call of the pool and the backend.

`kernel_calls(device)` picks the implementation once per device: the Triton kernels (`tq_kernels.ops`) on
CUDA, the pure-PyTorch reference (`tq_kernels.reference`, same results, no launch parameters) elsewhere
(the CPU tests; `KernelCalls(device, triton=True)` runs the Triton kernels there under TRITON_INTERPRET=1). The pool and the backend hold the same object and call only its methods, so the launch
decisions (`DecodeLaunch`) are made in the backend's metadata and passed down here as values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch


def _no_compile(fn):
    """Kernel launches stay out of torch.compile graphs (SGLang compiles the model around attention)."""
    return torch.compiler.disable(fn)


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch decisions of one decode batch shape, made in init_forward_metadata / the graph hooks."""

    num_splits: Optional[int]  # split-K count (None: the kernel's choice; the reference ignores it)
    warps_for_batch: int       # the batch size the warp count is chosen for (1: batch-invariant)


class KernelCalls:
    def __init__(self, device, triton: Optional[bool] = None):
        self.device = torch.device(device)
        self.triton = self.device.type == "cuda" if triton is None else triton
        if self.triton:
            try:
                from tq_kernels import ops as mod
            except ImportError as e:  # pragma: no cover - GPU only
                raise RuntimeError(f"TurboQuant: the Triton kernels (tq_kernels.ops) could not be imported on "
                                   f"{self.device}: {e}. Is the repo's kernels/ folder installed as tq_kernels?") from e
        else:
            from tq_kernels import reference as mod
        self._mod = mod

    # ------------------------------------------------------------------------------------------
    # Launch decisions (host side, once per batch shape)
    # ------------------------------------------------------------------------------------------
    def decode_launch(self, bs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                      batch_invariant: bool) -> DecodeLaunch:
        """Static split count and warp choice for a decode batch of `bs`; batch-invariant: batch size 1's
        for every batch, so a sequence's split-K partition depends on its length alone."""
        b = 1 if batch_invariant else bs
        splits = self._mod.choose_num_splits(b, num_kv_heads, max_context_len, num_sms) if self.triton else None
        return DecodeLaunch(num_splits=splits, warps_for_batch=b)

    def decode_workspace(self, max_bs: int, num_q_heads: int, v_head_dim: int, max_splits: int, head_dim_k: int):
        """Preallocated split-K partials for CUDA graphs (None off the GPU: the reference needs none)."""
        if not self.triton:
            return None
        return self._mod.DecodeWorkspace.create(max_bs, num_q_heads, v_head_dim, max_splits, self.device,
                                                head_dim_k=head_dim_k)

    def rotates_queries(self, kcodec) -> bool:
        """Whether decode's compress launch also rotates the queries (keys without QJL, Triton only)."""
        return self.triton and not kcodec.fmt.qjl

    def extend_splits_prefix(self) -> bool:
        """Whether the Triton extend splits the packed prefix over several programs by itself."""
        return self.triton and self._mod.extend_auto_splits()

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
    def compress(self, k, v, loc, kb, vb, *, k_mean=None, ring=None, q=None, q_rot=None) -> None:
        """Quantize k / v into rows `loc` of the packed buffers kb / vb (pool.TQLayerBuffer); with q / q_rot
        the same launch writes the queries rotated like the keys (GPU)."""
        extra: Dict[str, object] = {}
        if k_mean is not None:
            extra["k_mean"] = k_mean
        if ring is not None:
            extra["ring"] = ring
        if q is not None:
            extra.update(q=q, q_rot=q_rot)
        self._mod.compress_and_store(k, v, loc, kb.codec, vb.codec, kb.codes, kb.scales, vb.codes, vb.scales, **extra)

    @_no_compile
    def decode(self, q, kb, vb, kv_indptr, kv_indices, sm_scale: float, *, logit_cap: float, out,
               launch: DecodeLaunch, workspace=None, q_rotated=None, window=None):
        args = (q, kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec, kv_indptr, kv_indices, sm_scale,
                logit_cap, out)
        if not self.triton:
            return self._mod.decode_attention(*args, window=window)
        return self._mod.decode_attention(*args, workspace=workspace, num_splits=launch.num_splits,
                                          warps_for_batch=launch.warps_for_batch, q_rotated=q_rotated, window=window)

    @_no_compile
    def extend(self, q, k, v, kb, vb, qo_indptr, kv_indptr, kv_indices, sm_scale: float, *, logit_cap: float,
               causal: bool, out=None, max_extend_len: Optional[int] = None, max_prefix_len: Optional[int] = None,
               k_mean=None, window=None, new_part=None, block_m: Optional[int] = None,
               gqa_pack: Optional[bool] = None, num_splits: Optional[int] = None):
        """block_m / gqa_pack / num_splits: fixed by batch-invariant runs and the start-up warm-up; None
        leaves the choice to the kernel."""
        args = (q, k, v, kb.codes, kb.scales, vb.codes, vb.scales, kb.codec, vb.codec, qo_indptr, kv_indptr,
                kv_indices, sm_scale, logit_cap, causal, out)
        if not self.triton:
            return self._mod.extend_attention(*args, k_mean=k_mean, window=window)
        extra: Dict[str, object] = {}
        for name, value in (("block_m", block_m), ("gqa_pack", gqa_pack), ("num_splits", num_splits),
                            ("new_part", new_part)):
            if value is not None:
                extra[name] = value
        return self._mod.extend_attention(*args, max_extend_len=max_extend_len, max_prefix_len=max_prefix_len,
                                          k_mean=k_mean, window=window, **extra)


_CALLS: Dict[str, KernelCalls] = {}


def kernel_calls(device) -> KernelCalls:
    """The KernelCalls of `device` (one per device type, shared by the pool and the backend)."""
    key = torch.device(device).type
    if key not in _CALLS:
        _CALLS[key] = KernelCalls(device)
    return _CALLS[key]
