"""FlashInfer's ragged prefill for the batches that read nothing from the packed cache.

A first prefill chunk without a radix hit attends only to its own new tokens, whose K/V are still bf16
when attention runs (they are stored packed in the same step). That is plain causal attention, so any
fast prefill kernel serves it. SGLang's Triton extend kernel took 11.4 ms per layer for one 16K prompt
of the 8B shape on an H200 (tenth session); FlashInfer's ragged prefill (FA3 kernels on sm_90, the
kernel SGLang's own `flashinfer` backend runs for such batches) is meant to take it to the BF16-KV
prefill speed of SGLang's fastest backend.

One plan per batch on the host-side lengths (no device sync), run per layer on the strided q/k/v
views of the qkv projection. Rows past the batch's tokens (a piecewise CUDA graph's padding) are left
untouched, as the Triton path leaves them."""
from __future__ import annotations

import itertools
import logging
from typing import Optional, Sequence

import torch

logger = logging.getLogger(__name__)

WORKSPACE_BYTES = 128 << 20


class RaggedPrefill:
    """Causal attention of each sequence's new tokens over themselves, through
    `flashinfer.BatchPrefillWithRaggedKVCacheWrapper` (backend "auto": FA3 on sm_90, FA2 elsewhere)."""

    def __init__(self, device, workspace_bytes: int = WORKSPACE_BYTES):
        from flashinfer import BatchPrefillWithRaggedKVCacheWrapper

        workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.wrapper = BatchPrefillWithRaggedKVCacheWrapper(workspace, "NHD", backend="auto")
        self._planned = None  # the key of the current plan

    @classmethod
    def create(cls, device) -> Optional["RaggedPrefill"]:
        """None where FlashInfer cannot be imported or the GPU predates sm_80 (the caller then keeps
        SGLang's Triton extend kernel)."""
        if torch.device(device).type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8:
            return None
        try:
            return cls(device)
        except Exception as e:  # ImportError, or a FlashInfer build without this wrapper
            logger.warning("TurboQuant: FlashInfer ragged prefill unavailable (%s); plain prefills use "
                           "SGLang's Triton extend kernel", e)
            return None

    def run(self, q3: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor, out3: torch.Tensor,
            lens: Sequence[int], sm_scale: float, logit_cap: float, causal: bool,
            lse: Optional[torch.Tensor] = None) -> None:
        """out3[:sum(lens)] = attention of q3 over k3 / v3 ([tokens, heads, dim] views, unit last stride),
        sequence by sequence as `lens` cuts them; lse (fp32 [>= tokens, heads]) also gets each row's
        log-sum-exp in log2 units (FlashInfer's convention, what tq_kernels.extend_attention(new_part=)
        takes). Plans again only when the lengths, shapes or parameters change (once per batch in a
        model: every layer has the same ones)."""
        n = sum(lens)
        key = (tuple(lens), q3.shape[1], k3.shape[1], q3.shape[2], v3.shape[2], q3.dtype, k3.dtype,
               float(sm_scale), float(logit_cap), bool(causal))
        if key != self._planned:
            indptr = torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)  # host: no sync
            self.wrapper.plan(indptr, indptr, q3.shape[1], k3.shape[1], q3.shape[2], head_dim_vo=v3.shape[2],
                              causal=causal, logits_soft_cap=float(logit_cap), sm_scale=float(sm_scale),
                              q_data_type=q3.dtype, kv_data_type=k3.dtype)
            self._planned = key
        if lse is None:
            self.wrapper.run(q3[:n], k3[:n], v3[:n], out=out3[:n])
        else:
            self.wrapper.run(q3[:n], k3[:n], v3[:n], out=out3[:n], lse=lse[:n], return_lse=True)
