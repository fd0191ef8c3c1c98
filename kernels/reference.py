"""Pure-PyTorch reference ops with exactly the signatures of the Triton launch functions.

Used by the SGLang backend when neither CUDA nor the Triton interpreter is available, and by the
kernel tests as ground truth: codec (TQCodec.encode / decode) plus plain softmax attention over the
dequantized K/V. Slow (per-sequence loops, host syncs) but simple and exact in float32.

Cache buffers of one layer (slot 0 is a dummy row, slots are row indices):
  k_codes uint8 [S, H_kv, kfmt.code_bytes], k_scales fp16 [S, H_kv, kfmt.n_scales]
  v_codes uint8 [S, H_kv, vfmt.code_bytes], v_scales fp16 [S, H_kv, vfmt.n_scales]
"""
from __future__ import annotations

from typing import Optional

import torch

from .codec import TQCodec
from .verify import PrefixRing, TreeMask
from .window import DecodeWindow, ExtendWindow, FirstRows, RingWrite


def compress_and_store(k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, kcodec: TQCodec, vcodec: TQCodec,
                       k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
                       v_scales: torch.Tensor, k_mean: Optional[torch.Tensor] = None,
                       ring: Optional[RingWrite] = None, first: Optional[RingWrite] = None,
                       **_unused) -> None:
    """k [N, H_kv, d_k], v [N, H_kv, d_v] (any float dtype); slots [N] row indices. In place.
    k_mean: optional fp32 [H_kv, d_k] (key centering): codes of k - k_mean[h] are stored.
    ring / first: optional recent-window rows / first-token table rows (tq_kernels.window): exact rotated
    K/V in bf16 at rows >= 0."""
    if k.shape[0] == 0:
        return
    for rw in (ring, first):
        if rw is None:
            continue
        rows = rw.rows.reshape(-1)[:k.shape[0]].to(device=rw.k.device, dtype=torch.long)
        keep = rows >= 0
        rw.k[rows[keep]] = kcodec.rotate(_center(k, k_mean)).to(rw.k.device)[keep].to(torch.bfloat16)
        rw.v[rows[keep]] = vcodec.rotate(v.to(torch.float32)).to(rw.v.device)[keep].to(torch.bfloat16)
    slots = slots.to(device=k_codes.device, dtype=torch.long)
    kc, ks = kcodec.encode(_center(k, k_mean))
    vc, vs = vcodec.encode(v.to(torch.float32))
    k_codes[slots] = kc.to(k_codes.device)
    k_scales[slots] = ks.to(device=k_scales.device, dtype=k_scales.dtype)
    v_codes[slots] = vc.to(v_codes.device)
    v_scales[slots] = vs.to(device=v_scales.device, dtype=v_scales.dtype)


def _center(k: torch.Tensor, k_mean: Optional[torch.Tensor]) -> torch.Tensor:
    """float32 k [..., H_kv, d] minus the per-head mean (None: unchanged)."""
    k = k.to(torch.float32)
    if k_mean is None:
        return k
    assert tuple(k_mean.shape) == tuple(k.shape[-2:]), f"k_mean {tuple(k_mean.shape)} vs keys {tuple(k.shape)}"
    return k - k_mean.to(device=k.device, dtype=torch.float32)


def _softcap(s: torch.Tensor, logit_cap: float) -> torch.Tensor:
    if logit_cap and logit_cap > 0:
        return logit_cap * torch.tanh(s / logit_cap)
    return s


def _dequant(codes, scales, codec: TQCodec, slots: torch.Tensor) -> torch.Tensor:
    """[L, H_kv, d] float32 dequantized vectors of the given slots (original domain)."""
    return codec.decode(codes[slots], scales[slots]).to(torch.float32)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float, logit_cap: float,
            mask: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q [M, H_q, d], k [L, H_kv, d], v [L, H_kv, d_v] float32 -> [M, H_q, d_v]; GQA by repeating
    KV heads (q head h reads KV head h // (H_q / H_kv)); mask [M, L] bool (True = attend).
    sinks [H_q]: a logit per query head in the softmax's denominator only (a key whose value is 0)."""
    h_q, h_kv = q.shape[1], k.shape[1]
    if k.shape[0] == 0:
        return q.new_zeros(q.shape[0], h_q, v.shape[-1])
    g = h_q // h_kv
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    s = torch.einsum("mhd,lhd->hml", q, k) * sm_scale
    s = _softcap(s, logit_cap)
    if mask is not None:
        s = s.masked_fill(~mask[None], float("-inf"))
    if sinks is not None:  # the sink as one more key column, dropped after the softmax
        sink = sinks.to(device=s.device, dtype=torch.float32)[:, None, None].expand(h_q, s.shape[1], 1)
        s = torch.cat([s, sink], dim=-1)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with nothing to attend to -> 0
    if sinks is not None:
        p = p[..., :-1]
    return torch.einsum("hml,lhd->mhd", p, v)


def decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scales: torch.Tensor, v_codes: torch.Tensor,
                     v_scales: torch.Tensor, kcodec: TQCodec, vcodec: TQCodec, kv_indptr: torch.Tensor,
                     kv_indices: torch.Tensor, sm_scale: float, logit_cap: float = 0.0,
                     out: Optional[torch.Tensor] = None, window: Optional[DecodeWindow] = None,
                     first: Optional[FirstRows] = None, sliding_window: int = 0,
                     sinks: Optional[torch.Tensor] = None, **_unused) -> torch.Tensor:
    """q [B, H_q, d_k] (or [B, H_q * d_k]) -> out [B, H_q, d_v]: softmax attention of each query over
    the dequantized K/V of slots kv_indices[kv_indptr[b]:kv_indptr[b+1]]. An empty sequence gives 0.
    window: positions [window.lo[b], L) come from the recent window's ring instead.
    first: position 0 comes from first-token entry flags[slot of position 0] - 1 where that is >= 0 and
    the ring does not hold position 0 (tq_kernels.window).
    sliding_window: only the last `sliding_window` positions are attended to (0: all).
    sinks: fp32 [H_q] logits in the softmax's denominator (`_attend`)."""
    d_k, d_v = kcodec.fmt.in_dim, vcodec.fmt.in_dim
    B = q.shape[0]
    q3 = q.reshape(B, -1, d_k)
    h_q = q3.shape[1]
    res = torch.zeros(B, h_q, d_v, dtype=torch.float32, device=q.device)
    indptr = kv_indptr.tolist()
    for b in range(B):
        slots = kv_indices[indptr[b]:indptr[b + 1]].to(device=k_codes.device, dtype=torch.long)
        k = _dequant(k_codes, k_scales, kcodec, slots).to(q.device)
        v = _dequant(v_codes, v_scales, vcodec, slots).to(q.device)
        n = slots.shape[0]
        lo = n
        if window is not None:  # positions [lo, L) from the ring (un-rotated back to K's / V's domain)
            lo = min(max(int(window.lo[b]), 0), n)
            rows = (int(window.base[b]) + torch.arange(lo, n) % window.size).to(window.k.device)
            k = torch.cat([k[:lo], kcodec.unrotate(window.k[rows].float()).to(q.device)])
            v = torch.cat([v[:lo], vcodec.unrotate(window.v[rows].float()).to(q.device)])
        e = int(first.flags[slots[0]]) - 1 if first is not None and lo > 0 else -1
        if e >= 0:  # the exact first token (a sliding window past position 0 drops it below)
            k[0] = kcodec.unrotate(first.k[e].float()).to(q.device)
            v[0] = vcodec.unrotate(first.v[e].float()).to(q.device)
        start = max(0, k.shape[0] - sliding_window) if sliding_window > 0 else 0
        res[b] = _attend(q3[b:b + 1].to(torch.float32), k[start:], v[start:], sm_scale, logit_cap, sinks=sinks)[0]
    if out is None:
        return res.to(q.dtype)
    out.view(B, h_q, d_v).copy_(res.to(out.dtype))
    return out


def extend_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_codes: torch.Tensor,
                     k_scales: torch.Tensor, v_codes: torch.Tensor, v_scales: torch.Tensor, kcodec: TQCodec,
                     vcodec: TQCodec, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor,
                     sm_scale: float, logit_cap: float = 0.0, causal: bool = True,
                     out: Optional[torch.Tensor] = None, k_mean: Optional[torch.Tensor] = None,
                     window: Optional[ExtendWindow] = None, sliding_window: int = 0,
                     sinks: Optional[torch.Tensor] = None, tree: Optional[TreeMask] = None,
                     prefix_ring: Optional[PrefixRing] = None, first: Optional[FirstRows] = None,
                     **_unused) -> torch.Tensor:
    """Chunked prefill over a packed prefix. q [T, H_q, d_k], k_new [T, H_kv, d_k], v_new [T, H_kv, d_v]
    (rows of sequence i: qo_indptr[i]:qo_indptr[i+1]); the queries of sequence i attend fully to
    the dequantized prefix (slots kv_indices[kv_indptr[i]:kv_indptr[i+1]]) and (causally) to the
    sequence's own new, unquantized K/V. -> out [T, H_q, d_v]. k_mean: the key-centering mean the
    cache was written with (optional, [H_kv, d_k]); the new keys are centered with it too.
    window: new key j is seen exact by query i when i - j < window.size, else as window.k_old / v_old.
    sliding_window: query at position i sees the keys at positions j > i - sliding_window only (0: all;
    positions count the prefix first). sinks: fp32 [H_q] logits in the softmax's denominator.
    tree: the new tokens see each other where SGLang's tree mask says (instead of causally); prefix_ring:
    new token r reads prefix positions [lo[r], prefix) from the ring (`tq_kernels.verify`). first: the
    prefix's position 0 from first-token entry flags[its slot] - 1 where that is >= 0 (tq_kernels.window)."""
    if (tree is not None or prefix_ring is not None) and (sliding_window > 0 or (window is not None and window.size > 0)):
        raise ValueError("extend: a draft tree / prefix ring (verify) does not combine with a sliding window or "
                         "an evaluation window")
    d_k, d_v = kcodec.fmt.in_dim, vcodec.fmt.in_dim
    T = q.shape[0]
    q3 = q.reshape(T, -1, d_k)
    h_q = q3.shape[1]
    h_kv = k_new.reshape(T, -1, d_k).shape[1] if T else k_codes.shape[1]
    k_new = _center(k_new.reshape(T, h_kv, d_k), k_mean)
    v_new = v_new.reshape(T, h_kv, d_v)
    res = torch.zeros(T, h_q, d_v, dtype=torch.float32, device=q.device)
    qo, kvp = qo_indptr.tolist(), kv_indptr.tolist()
    for i in range(len(qo) - 1):
        a, b = qo[i], qo[i + 1]
        if b <= a:
            continue
        slots = kv_indices[kvp[i]:kvp[i + 1]].to(device=k_codes.device, dtype=torch.long)
        kp = _dequant(k_codes, k_scales, kcodec, slots).to(q.device)
        vp = _dequant(v_codes, v_scales, vcodec, slots).to(q.device)
        e = int(first.flags[slots[0]]) - 1 if first is not None and slots.shape[0] else -1
        if e >= 0:  # the exact first token (the ring, where a row reads it from there, still wins below)
            kp[0] = kcodec.unrotate(first.k[e].float()).to(q.device)
            vp[0] = vcodec.unrotate(first.v[e].float()).to(q.device)
        k = torch.cat([kp, k_new[a:b].to(torch.float32)])
        v = torch.cat([vp, v_new[a:b].to(torch.float32)])
        n_new, n_pre = b - a, kp.shape[0]
        mask = torch.ones(n_new, n_pre + n_new, dtype=torch.bool, device=q.device)
        if tree is not None:  # row r of the sequence's block is prefix + drafts wide; the drafts' columns
            m0, width = int(tree.indptr[i]), n_pre + n_new
            mask[:, n_pre:] = tree.mask[m0:m0 + n_new * width].view(n_new, width)[:, n_pre:].to(
                device=q.device, dtype=torch.bool)
        elif causal:
            mask[:, n_pre:] = torch.ones(n_new, n_new, dtype=torch.bool, device=q.device).tril()
        if prefix_ring is not None:  # each prefix position from the codes or the ring: two key sets
            lo = prefix_ring.lo[a:b].to(device=q.device, dtype=torch.long).clamp(max=n_pre)
            pos = torch.arange(n_pre, device=q.device)
            rows = (int(prefix_ring.base[i]) + pos % prefix_ring.size).to(prefix_ring.k.device)
            kr = kcodec.unrotate(prefix_ring.k[rows].float()).to(q.device)
            vr = vcodec.unrotate(prefix_ring.v[rows].float()).to(q.device)
            from_ring = pos[None, :] >= lo[:, None]
            k, v = torch.cat([k, kr]), torch.cat([v, vr])
            mask = torch.cat([mask, from_ring], dim=1)
            mask[:, :n_pre] &= ~from_ring
        if sliding_window > 0:
            pos = torch.arange(n_pre + n_new, device=q.device)
            mask &= (n_pre + pos[:n_new, None]) - pos[None, :] < sliding_window
        if window is not None and window.size > 0:  # two key sets, each query picks per key by distance
            i = torch.arange(n_new, device=q.device)
            recent = (i[:, None] - i[None, :]) < window.size
            ko = torch.cat([kp, window.k_old.reshape(T, h_kv, d_k)[a:b].to(device=q.device, dtype=torch.float32)])
            vo = torch.cat([vp, window.v_old.reshape(T, h_kv, d_v)[a:b].to(device=q.device, dtype=torch.float32)])
            m_new = mask.clone()
            m_new[:, :n_pre] = False
            m_new[:, n_pre:] &= recent
            # one softmax over both key sets, each key visible in exactly one of them
            k, v = torch.cat([k, ko]), torch.cat([v, vo])
            mask = torch.cat([m_new, mask & ~m_new], dim=1)
        res[a:b] = _attend(q3[a:b].to(torch.float32), k, v, sm_scale, logit_cap, mask, sinks)
    if out is None:
        return res.to(q.dtype)
    out.view(T, h_q, d_v).copy_(res.to(out.dtype))
    return out


def new_token_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, qo_indptr: torch.Tensor,
                        sm_scale: float, logit_cap: float = 0.0, causal: bool = True,
                        k_mean: Optional[torch.Tensor] = None) -> tuple:
    """The new tokens' attention over themselves only, with its log-sum-exp: what
    extend_attention(new_part=) takes from another kernel. -> (out fp32 [T, H_q, d_v], lse fp32 [T, H_q]
    in log2 units: log2 of the sum of exp(soft-capped score * sm_scale), FlashInfer's convention). Keys
    are centered with k_mean like the cache's, so the scores match the prefix part's."""
    d_k, d_v = q.shape[-1], v_new.shape[-1]
    T = q.shape[0]
    q3 = q.reshape(T, -1, d_k).to(torch.float32)
    h_q, h_kv = q3.shape[1], k_new.reshape(T, -1, d_k).shape[1]
    k = _center(k_new.reshape(T, h_kv, d_k), k_mean).to(torch.float32).repeat_interleave(h_q // h_kv, dim=1)
    v = v_new.reshape(T, h_kv, d_v).to(torch.float32).repeat_interleave(h_q // h_kv, dim=1)
    out = torch.zeros(T, h_q, d_v, dtype=torch.float32, device=q.device)
    lse = torch.full((T, h_q), float("-inf"), dtype=torch.float32, device=q.device)
    qo = qo_indptr.tolist()
    for i in range(len(qo) - 1):
        a, b = qo[i], qo[i + 1]
        if b <= a:
            continue
        s = _softcap(torch.einsum("mhd,lhd->hml", q3[a:b], k[a:b]) * sm_scale, logit_cap)
        if causal:
            s = s.masked_fill(~torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).tril()[None],
                              float("-inf"))
        out[a:b] = torch.einsum("hml,lhd->mhd", torch.softmax(s, dim=-1), v[a:b])
        lse[a:b] = (torch.logsumexp(s, dim=-1) * 1.4426950408889634).transpose(0, 1)
    return out, lse


def claim_first_rows(ids: torch.Tensor, slots: torch.Tensor, at_zero: torch.Tensor, table: torch.Tensor,
                     flags: torch.Tensor) -> torch.Tensor:
    """`tq_kernels.first_token.claim_first_rows` token by token: the entry holding the token id, else the
    first free one (-1), else none (-1); flags[slots] = entry + 1."""
    entries = torch.full((ids.shape[0],), -1, dtype=torch.int32, device=ids.device)
    held = table.tolist()
    for i, (tok, zero) in enumerate(zip(ids.tolist(), at_zero.tolist())):
        if not zero:
            continue
        e = held.index(tok) if tok in held else (held.index(-1) if -1 in held else -1)
        if e >= 0:
            held[e] = tok
        entries[i] = e
    table.copy_(torch.tensor(held, dtype=table.dtype))
    flags[slots.to(device=flags.device, dtype=torch.long)] = (entries + 1).to(device=flags.device, dtype=torch.uint8)
    return entries
