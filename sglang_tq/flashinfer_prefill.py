"""FlashInfer's ragged prefill for the batches that read nothing from the packed cache.

A first prefill chunk without a radix hit attends only to its own new tokens, whose K/V are still bf16
when attention runs (they are stored packed in the same step). That is plain causal attention, so any
fast prefill kernel serves it. FlashInfer's ragged prefill (FA3 kernels on sm_90, the kernel SGLang's own
`flashinfer` backend runs for such batches) gives it the BF16-KV prefill speed of SGLang's fastest
backend, well above SGLang's Triton extend kernel on long prompts (docs/RESULTS.md).

One plan per batch, made by the backend's init_forward_metadata on the host-side lengths (no device
sync) with the model's attention parameters (one scale / soft-cap / causality for every layer), then run
per layer on the strided q/k/v views of the qkv projection. Rows past the batch's tokens (a piecewise CUDA
graph's padding) are left untouched, as the Triton path leaves them."""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 128 << 20


@dataclass(frozen=True)
class RaggedParams:
    """What FlashInfer's plan fixes besides the lengths: the same for every layer of a model."""

    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    dtype: torch.dtype
    sm_scale: float
    logit_cap: float
    causal: bool


class RaggedPrefill:
    """Causal attention of each sequence's new tokens over themselves, through
    `flashinfer.BatchPrefillWithRaggedKVCacheWrapper` (backend "auto": FA3 on sm_90, FA2 elsewhere)."""

    def __init__(self, device, params: RaggedParams, workspace_bytes: int = WORKSPACE_BYTES):
        from flashinfer import BatchPrefillWithRaggedKVCacheWrapper

        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="auto")
        self.params = params
        self._lens: Optional[Tuple[int, ...]] = None  # the lengths of the current plan
        self._tokens = 0

    @classmethod
    def create(cls, device, params: RaggedParams) -> Optional["RaggedPrefill"]:
        """None where FlashInfer cannot be imported or the GPU predates sm_80 (the caller then keeps
        SGLang's Triton extend kernel)."""
        if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
            return None
        try:
            return cls(device, params)
        except Exception as e:  # ImportError, or a FlashInfer build without this wrapper
            logger.warning("TurboQuant: FlashInfer ragged prefill unavailable (%s); plain prefills use "
                           "SGLang's Triton extend kernel", e)
            return None

    def plan(self, lens: Sequence[int]) -> None:
        """Plan the batch whose sequences have `lens` new tokens (again only when the lengths change)."""
        lens = tuple(int(n) for n in lens)
        if lens == self._lens:
            return
        p = self.params
        indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)  # host: no sync
        self.wrapper.plan(indptr, indptr, p.num_qo_heads, p.num_kv_heads, p.head_dim, head_dim_vo=p.v_head_dim,
                          causal=p.causal, logits_soft_cap=float(p.logit_cap), sm_scale=float(p.sm_scale),
                          q_data_type=p.dtype, kv_data_type=p.dtype)
        self._lens, self._tokens = lens, sum(lens)

    def run(self, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, out3: torch.Tensor,
            lse: Optional[torch.Tensor] = None) -> None:
        """out3[:tokens] = attention of q3 over k3 / v3 ([tokens, heads, dim] views, unit last stride), sequence
        by sequence as the planned lengths cut them; lse (fp32 [>= tokens, heads]) also gets each row's
        log-sum-exp in log2 units (FlashInfer's convention, what tq_kernels.extend_attention(new_part=) takes)."""
        n = self._tokens
        if lse is None:
            self.wrapper.run(q3[:n], k3[:n], v3[:n], out=out3[:n])
        else:
            self.wrapper.run(q3[:n], k3[:n], v3[:n], out=out3[:n], lse=lse[:n], return_lse=True)
