"""Public kernel API: dispatches to Triton when the tensors are on CUDA or TRITON_INTERPRET=1 is
set, else to the pure-PyTorch reference (same signatures; Triton-only keyword arguments such as
workspace / num_splits / block sizes are ignored by the reference; the key-centering mean `k_mean`
of compress_and_store / extend_attention and the recent window (`ring` / `window`, tq_kernels.window)
are honoured by both)."""
from __future__ import annotations

from . import reference as _ref
from ._common import kernel_tables, use_triton
from .decode import DecodeWorkspace, choose_num_splits  # noqa: F401


def compress_and_store(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales, **kw):
    if use_triton(k_codes):
        from .compress import compress_and_store as fn
        return fn(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales, **kw)
    _ref.compress_and_store(k, v, slots, kcodec, vcodec, k_codes, k_scales, v_codes, v_scales,
                            k_mean=kw.get("k_mean"), ring=kw.get("ring"))
    if kw.get("q") is not None:  # the decode queries rotated like the keys (decode_attention's q_rotated)
        q, q_rot = kw["q"], kw["q_rot"]
        n = k.shape[0]
        wt = kernel_tables(kcodec, q.device)["wt"]  # M_k^T (keys without QJL), cached in the codec
        q_rot[:n] = (q.reshape(n, -1, kcodec.fmt.head_dim).float() @ wt).view_as(q_rot[:n])


def decode_attention(q, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, kv_indptr, kv_indices, sm_scale,
                     logit_cap=0.0, out=None, **kw):
    if use_triton(k_codes):
        from .decode import decode_attention as fn
        return fn(q, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, kv_indptr, kv_indices, sm_scale,
                  logit_cap, out, **kw)
    return _ref.decode_attention(q, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, kv_indptr, kv_indices,
                                 sm_scale, logit_cap, out, window=kw.get("window"))


def extend_auto_splits() -> bool:
    """Whether the Triton extend chooses split-K over the prefix by itself (tq_kernels.extend.AUTO_SPLITS)."""
    from . import extend
    return bool(extend.AUTO_SPLITS)


def extend_attention(q, k_new, v_new, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, qo_indptr, kv_indptr,
                     kv_indices, sm_scale, logit_cap=0.0, causal=True, out=None, **kw):
    if use_triton(k_codes):
        from .extend import extend_attention as fn
        return fn(q, k_new, v_new, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, qo_indptr, kv_indptr,
                  kv_indices, sm_scale, logit_cap, causal, out, **kw)
    return _ref.extend_attention(q, k_new, v_new, k_codes, k_scales, v_codes, v_scales, kcodec, vcodec, qo_indptr,
                                 kv_indptr, kv_indices, sm_scale, logit_cap, causal, out, k_mean=kw.get("k_mean"),
                                 window=kw.get("window"))
