"""The one interface between an engine adapter and the kernels: `for_device(device)` returns a
`KernelOps` whose functions have the same signatures for the Triton kernels (CUDA) and the pure-PyTorch
reference (every other device):

  compress_and_store(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales,
                     *, k_mean=None, q=None, q_rot=None, ring=None, first=None)
  plan_decode(kcodec, vcodec, batch, num_kv_heads, max_seq_len, device,
              *, window=False, batch_invariant=False, max_splits=64,
              num_splits=None, block_n=None, sm_count=None) -> DecodePlan
  decode_attention(q, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, kv_indptr, kv_indices,
                   sm_scale, logit_cap=0.0, out=None, *, plan=None, workspace=None, q_rotated=None,
                   window=None, first=None, sliding_window=0, sinks=None)
  claim_first_rows(ids, slots, at_zero, table, flags) -> entries
  extend_attention(q, k_new, v_new, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, qo_indptr,
                   kv_indptr, kv_indices, sm_scale, logit_cap=0.0, causal=True, out=None,
                   *, max_extend_len=None, max_prefix_len=None, k_mean=None, window=None, new_part=None,
                   block_m=None, gqa_pack=None, num_splits=None, sliding_window=0, sinks=None, first=None)
  DecodeWorkspace.create(max_batch, num_q_heads, head_dim_v, max_splits, device, head_dim_k=None)

The reference takes the launch arguments (plan, workspace, block sizes, splits) and ignores them; it
honours k_mean, the recent window (ring / window), the exact first token (first), compress's query
rotation (q, q_rot), the sliding window (the query at position i sees positions j > i - sliding_window;
0: all) and attention sinks (sinks [H_q]: a logit per query head in the softmax's denominator,
natural-log units like the scaled scores)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import reference as _ref
from .compress import compress_and_store as _tq_compress
from .decode import DecodePlan, DecodeWorkspace, decode_attention as _tq_decode, plan_decode
from .extend import extend_attention as _tq_extend
from .first_token import claim_first_rows as _tq_claim


@dataclass(frozen=True)
class KernelOps:
    name: str
    compress_and_store: Callable
    plan_decode: Callable
    decode_attention: Callable
    extend_attention: Callable
    claim_first_rows: Callable
    DecodeWorkspace: type = DecodeWorkspace


def _ref_compress_and_store(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales, *, k_mean=None,
                            q=None, q_rot=None, ring=None, first=None, **_launch):
    _ref.compress_and_store(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales, k_mean=k_mean,
                            ring=ring, first=first)
    if q is not None:  # the decode queries rotated like the keys (decode_attention's q_rotated)
        n = k.shape[0]
        q_rot[:n] = kcodec.rotate(q.reshape(n, -1, kcodec.fmt.in_dim)).to(q_rot.device).view_as(q_rot[:n])


TRITON = KernelOps("triton", _tq_compress, plan_decode, _tq_decode, _tq_extend, _tq_claim)
REFERENCE = KernelOps("reference", _ref_compress_and_store, plan_decode, _ref.decode_attention,
                      _ref.extend_attention, _ref.claim_first_rows)


def for_device(device) -> KernelOps:
    """The Triton kernels on CUDA devices, the reference elsewhere (tests call the Triton launch
    functions on CPU tensors under TRITON_INTERPRET=1 through `TRITON` directly)."""
    return TRITON if torch.device(device).type == "cuda" else REFERENCE


__all__ = ["KernelOps", "TRITON", "REFERENCE", "for_device", "DecodePlan", "DecodeWorkspace", "plan_decode"]
