"""TQTokenToKVPool: SGLang KV pool whose quantized layers hold packed TurboQuant slots.

Built by SGLang's own `ModelRunnerKVCacheMixin._init_pools` (registration.py swaps this class in for
`MHATokenToKVPool` while that method runs), so the stock allocator, radix cache, chunked prefill and
retraction work unchanged: they only deal in token slot ids.

Buffers of one layer (rows = slots; `size + page_size` rows, row 0 is the dummy slot that padded
CUDA-graph tokens write to; the allocator hands out 1..size):

* quantized layer (`LayerPlan.quantized`): four tensors, as `tq_kernels` expects them
    k_codes  uint8   [size + page, H_kv, kfmt.code_bytes]
    k_scales float16 [size + page, H_kv, kfmt.n_scales]
    v_codes  uint8   [size + page, H_kv, vfmt.code_bytes]
    v_scales float16 [size + page, H_kv, vfmt.n_scales]
* unquantized (boundary) layer: plain `[size + page, H_kv, head_dim]` buffers in the model dtype,
  exactly like `MHATokenToKVPool`, so SGLang's Triton kernels read them directly.
* fp8 layer (`format: fp8`): the same plain buffers as uint8 holding e4m3 values of x / scale
  (`tq_kernels.codec.fp8_encode`), the layout of `MHATokenToKVPool` with an fp8 `--kv-cache-dtype`:
  the accessors return float8_e4m3fn views, and SGLang's Triton kernels multiply by the layer's
  k_scale / v_scale (1.0 when the checkpoint has none), the scale the pool divided by.

What the accessors return:

* `get_key_buffer(l)` / `get_value_buffer(l)`: the model-dtype tensor for an unquantized layer; for a
  quantized layer a `TQLayerBuffer(codes, scales, codec)` (a NamedTuple, plus a `.shape` property with
  the *logical* `(rows, H_kv, head_dim)` shape so code that only reads `.shape[-1]` keeps working).
  Anything that tries to use it as a tensor fails loudly instead of reading packed bytes as bf16.
* `get_kv_buffer(l)`: the pair of the above.

Key centering (`key_means:` in the config): the pool holds one fp32 `[H_kv_local, head_dim]` mean per
quantized layer (`key_mean(l)`, None otherwise) and stores codes of `k - mean`; the attention backend
centers the new tokens' keys of extend with the same mean. Under tensor parallelism each rank takes
its own heads of the `[num_layers, H_kv_total, head_dim]` file (`key_mean_heads`).

Recent window (`window: {tokens: W, requests: R}` in the config; `tq_kernels.window`): per quantized
layer two bf16 rings `[R * W, H_kv, head_dim]` hold the exact rotated K/V of each request's last W
positions (row `req * W + position % W`, req = SGLang's req_pool_idx < R), and `window_start` (int32
[R + 1]) the first position the request holding each slot wrote there (WINDOW_FRESH: the slot was handed
to a request that has not run yet). The attention backend
decides rows and bounds; the ring's memory is taken out of the token budget (registration.py).

Exact first token (`first_token: exact` in the config; `tq_kernels.window.FirstRows`): per quantized layer
two bf16 tables `[FIRST_TOKEN_ENTRIES, H_kv, head_dim]` of exact rotated K/V rows, shared by every request
whose first token has the entry's id (`first_ids`, int32, -1 = free: at position 0 the K/V depend on the
token id alone), and one byte per slot (`first_flags`: entry + 1 of the position-0 token the slot holds,
0 = none). The flag lives with the slot, so a prefix served from the radix cache carries it. Every path
that fills a slot's K/V other than set_kv_buffer must set its flag (move_kv_cache, the retraction copy) or
clear it (`clear_first_flags`: disaggregation's transferred slots).

Hybrid models (bottom of this module): `TQSWAKVPool` (SGLang's hybrid SWA memory: a full-attention and a
sliding-window pool, slot ids translated by its allocator) and `TQHybridLinearKVPool` (a linear-attention
hybrid's attention layers next to SGLang's recurrent-state pool) are SGLang's own hybrid pools whose
sub-pools are TQTokenToKVPools holding the model layer ids they are given (`layer_ids`); `TQPoolGroup`
answers the backend's calls by model layer id.

`self.dtype` is `sglang_internals.POOL_DTYPE` (uint8, never bf16) on purpose: models with a fused RoPE +
KV-write path (`models/utils.py: enable_fused_set_kv_buffer`) check `token_to_kv_pool.dtype ==
torch.bfloat16` and would otherwise write raw bf16 rows past `set_kv_buffer` (tested against SGLang in
tests/test_sglang_internals.py). The model dtype is `self.model_dtype`.
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

from sglang.srt.constants import GPU_MEMORY_TYPE_KV_CACHE
from sglang.srt.mem_cache.memory_pool import HybridLinearKVPool, KVCache
from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
from sglang_tq.config import FIRST_TOKEN_ENTRIES, FIRST_TOKEN_EXACT
from sglang_tq.kernel_calls import kernel_calls
from sglang_tq.sglang_internals import POOL_DTYPE
from tq_kernels.codec import FP8_DTYPE, fp8_encode

logger = logging.getLogger(__name__)

# window_start of a request slot just handed to a new request: above every position, so nothing of the slot's
# ring is read until the request's first extend sets its own start
WINDOW_FRESH = torch.iinfo(torch.int32).max

def _attention_tp_rank_size() -> Tuple[int, int]:
    """(rank, size) of the attention TP group; (0, 1) when SGLang's groups are not initialised."""
    try:
        from sglang.srt.layers.dp_attention import get_attention_tp_rank, get_attention_tp_size

        return int(get_attention_tp_rank()), int(get_attention_tp_size())
    except Exception:  # not initialised (tests, tools) or an older SGLang
        return 0, 1


def key_mean_heads(total: int, local: int, tp_rank: int, tp_size: int) -> slice:
    """KV heads of this rank in a key-means tensor with `total` heads: all of them when local ==
    total; heads [rank * local, (rank + 1) * local) when the heads are split over the ranks; the
    replicated head rank // (tp_size / total) when tp_size > total (SGLang replicates KV heads)."""
    from sglang_tq.config import TQConfigError

    if total == local:
        return slice(0, total)
    if local * tp_size == total and 0 <= tp_rank < tp_size:
        return slice(tp_rank * local, (tp_rank + 1) * local)
    if local == 1 and tp_size > total and tp_size % total == 0:
        h = tp_rank // (tp_size // total)
        return slice(h, h + 1)
    raise TQConfigError(f"key_means has {total} KV heads, which does not fit {local} KV heads per rank "
                        f"(attention TP rank {tp_rank} of {tp_size}); expected the model's total KV head count")


def fp8_layer_scales(layer) -> Tuple[float, float]:
    """(k_scale, v_scale) of an fp8 layer: the checkpoint's (RadixAttention.k_scale_float /
    v_scale_float, which SGLang's Triton kernels multiply by), else 1.0. Taken from the layer, not
    from set_kv_buffer's arguments, so that every caller stores with the scale the kernels read with."""
    if getattr(layer, "k_scale", None) is None or getattr(layer, "v_scale", None) is None:
        return 1.0, 1.0
    return float(layer.k_scale_float), float(layer.v_scale_float)


class TQLayerBuffer(NamedTuple):
    """Packed K (or V) cache of one quantized layer."""

    codes: torch.Tensor  # uint8 [rows, H_kv, code_bytes]
    scales: torch.Tensor  # fp16 [rows, H_kv, n_scales]
    codec: object  # tq_kernels.codec.TQCodec

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Logical (rows, H_kv, head_dim) shape, as an unpacked buffer would have (the model's head_dim,
        also where the codes cover a padded one)."""
        return (self.codes.shape[0], self.codes.shape[1], self.codec.fmt.in_dim)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


class TQTokenToKVPool(KVCache):
    """KV pool with per-layer TurboQuant formats (see the module docstring for the layout)."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        enable_memory_saver: bool,
        v_head_dim: Optional[int] = None,
        start_layer: Optional[int] = None,
        end_layer: Optional[int] = None,
        enable_alt_stream: bool = True,
        enable_kv_cache_copy: bool = False,
        *,
        plan=None,
        seed: Optional[int] = None,
        window_requests: int = 0,
        layer_ids: Optional[Sequence[int]] = None,
        first_token: bool = True,
        **unused,
    ):
        if plan is None:
            raise ValueError("TQTokenToKVPool needs the resolved TurboQuant plan (plan=...)")
        if unused:
            raise ValueError(f"TQTokenToKVPool: unsupported arguments {sorted(unused)}")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"TurboQuant: the KV cache dtype must be bfloat16 or float16, got {dtype}")
        super().__init__(size, page_size, dtype, layer_num, device, enable_memory_saver, start_layer, end_layer)
        # KVCache.__init__ sets end_layer = end_layer or layer_num - 1 (inclusive, as MHATokenToKVPool)
        self.model_dtype = dtype
        self.dtype = POOL_DTYPE  # never bf16: see module docstring
        self.store_dtype = torch.uint8
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.plan = plan
        self.seed = plan.seed if seed is None else seed
        if plan.head_dim != self.head_dim or plan.v_head_dim != self.v_head_dim:
            raise ValueError(f"TurboQuant plan was resolved for head_dim {plan.head_dim}/{plan.v_head_dim}, "
                             f"pool has {self.head_dim}/{self.v_head_dim}")
        # model layer ids of this pool's layers: a rank's contiguous range, or the full-attention / sliding-window
        # / attention layers of a hybrid model's sub-pool (TQSWAKVPool, TQHybridLinearKVPool)
        self.layer_ids = (list(range(self.start_layer, self.start_layer + layer_num)) if layer_ids is None
                          else [int(i) for i in layer_ids])
        if len(self.layer_ids) != layer_num:
            raise ValueError(f"TurboQuant: a pool of {layer_num} layers was given {len(self.layer_ids)} layer ids")
        if self.layer_ids and max(self.layer_ids) >= plan.num_layers:
            raise ValueError(f"TurboQuant plan covers {plan.num_layers} layers; this pool holds layers "
                             f"{self.layer_ids[0]}..{self.layer_ids[-1]}")
        with_kv = set(plan.attention_layers)
        no_kv = [i for i in self.layer_ids if i not in with_kv]
        if no_kv:
            raise ValueError(f"TurboQuant: layers {no_kv} have no KV cache in the plan (recurrent layers)")
        self._index = {lid: i for i, lid in enumerate(self.layer_ids)}
        if enable_kv_cache_copy:
            logger.warning("TurboQuant: enable_kv_cache_copy (speculative decoding) is not supported; ignored")

        self.layer_plans = [plan.layers[lid] for lid in self.layer_ids]
        self.quantized = [lp.quantized for lp in self.layer_plans]
        self.fp8 = [lp.format == "fp8" for lp in self.layer_plans]
        self.quantized_layer_ids = [lid for lid, qz in zip(self.layer_ids, self.quantized) if qz]
        self.first_quantized_layer = self.quantized_layer_ids[0] if self.quantized_layer_ids else -1
        self.k_codecs: List[object] = []
        self.v_codecs: List[object] = []
        for lp in self.layer_plans:
            kc, vc = lp.codecs(self.seed)
            self.k_codecs.append(kc)
            self.v_codecs.append(vc)
        # recent window: W ring rows for each of the first `window_requests` request slots
        self.window_size = int(getattr(plan, "window_tokens", 0) or 0) if window_requests > 0 else 0
        self.window_requests = int(window_requests) if self.window_size else 0
        # exact first token (first_token: a sub-pool whose slots are not the model's positions holds none)
        self.first_token = bool(first_token and getattr(plan, "first_token", None) == FIRST_TOKEN_EXACT
                                and any(self.quantized))
        self._create_buffers()
        self.key_means: List[Optional[torch.Tensor]] = self._load_key_means()
        self.ops = kernel_calls(self.device)
        self._finalize_allocation_log(size)

    # ----------------------------------------------------------------------------------------
    # Allocation
    # ----------------------------------------------------------------------------------------
    def _create_buffers(self):
        rows, h, dev = self.size + self.page_size, self.head_num, self.device
        self.k_buffer: List[Optional[torch.Tensor]] = []
        self.v_buffer: List[Optional[torch.Tensor]] = []
        self.k_codes: List[Optional[torch.Tensor]] = []
        self.k_scales: List[Optional[torch.Tensor]] = []
        self.v_codes: List[Optional[torch.Tensor]] = []
        self.v_scales: List[Optional[torch.Tensor]] = []
        self.ring_k: List[Optional[torch.Tensor]] = []
        self.ring_v: List[Optional[torch.Tensor]] = []
        self.first_k: List[Optional[torch.Tensor]] = []
        self.first_v: List[Optional[torch.Tensor]] = []
        ring_rows = self.window_requests * self.window_size
        custom = (torch.cuda.use_mem_pool(self.custom_mem_pool)
                  if getattr(self, "enable_custom_mem_pool", False) else nullcontext())
        with self.memory_saver_adapter.region(GPU_MEMORY_TYPE_KV_CACHE), custom:
            for i, lp in enumerate(self.layer_plans):
                if lp.quantized:
                    kf, vf = lp.k, lp.v
                    self.k_codes.append(torch.zeros((rows, h, kf.code_bytes), dtype=torch.uint8, device=dev))
                    self.k_scales.append(torch.zeros((rows, h, kf.n_scales), dtype=torch.float16, device=dev))
                    self.v_codes.append(torch.zeros((rows, h, vf.code_bytes), dtype=torch.uint8, device=dev))
                    self.v_scales.append(torch.zeros((rows, h, vf.n_scales), dtype=torch.float16, device=dev))
                    if ring_rows:
                        self.ring_k.append(torch.zeros((ring_rows, h, kf.head_dim), dtype=torch.bfloat16, device=dev))
                        self.ring_v.append(torch.zeros((ring_rows, h, vf.head_dim), dtype=torch.bfloat16, device=dev))
                    else:
                        self.ring_k.append(None)
                        self.ring_v.append(None)
                    entries = FIRST_TOKEN_ENTRIES if self.first_token else 0
                    self.first_k.append(torch.zeros((entries, h, kf.head_dim), dtype=torch.bfloat16, device=dev)
                                        if entries else None)
                    self.first_v.append(torch.zeros((entries, h, vf.head_dim), dtype=torch.bfloat16, device=dev)
                                        if entries else None)
                    self.k_buffer.append(None)
                    self.v_buffer.append(None)
                else:
                    plain = torch.uint8 if self.fp8[i] else self.model_dtype
                    self.k_buffer.append(torch.zeros((rows, h, self.head_dim), dtype=plain, device=dev))
                    self.v_buffer.append(torch.zeros((rows, h, self.v_head_dim), dtype=plain, device=dev))
                    for lst in (self.k_codes, self.k_scales, self.v_codes, self.v_scales, self.ring_k, self.ring_v,
                                self.first_k, self.first_v):
                        lst.append(None)
            # first ring position of each request slot (set at its first extend): decode never reads older
            # rows. Row R takes the writes of requests outside the ring (so the backend writes without a mask,
            # and without the host sync a boolean index costs); nothing reads it.
            self.window_start = torch.full((self.window_requests + 1,), WINDOW_FRESH, dtype=torch.int32, device=dev)
            self.first_flags = torch.zeros((rows,) if self.first_token else (0,), dtype=torch.uint8, device=dev)
            self.first_ids = torch.full((FIRST_TOKEN_ENTRIES if self.first_token else 0,), -1, dtype=torch.int32,
                                        device=dev)

    def _load_key_means(self) -> List[Optional[torch.Tensor]]:
        """One fp32 [H_local, head_dim] device tensor per quantized local layer (None elsewhere)."""
        means = getattr(self.plan, "key_means", None)
        if means is None:
            return [None] * self.layer_num
        from sglang_tq.config import TQConfigError

        if means.dim() != 3 or means.shape[0] != self.plan.num_layers or means.shape[2] != self.head_dim:
            raise TQConfigError(f"key_means {self.plan.key_means_path}: shape {list(means.shape)}; expected "
                                f"[{self.plan.num_layers}, num_kv_heads, {self.head_dim}]")
        rank, size = _attention_tp_rank_size()
        heads = key_mean_heads(int(means.shape[1]), self.head_num, rank, size)
        out = []
        for lid in self.layer_ids:
            mu = self.plan.layer_key_mean(lid, heads)
            out.append(None if mu is None else mu.to(device=self.device, dtype=torch.float32).contiguous())
        return out

    def use_auto_key_means(self, means: Dict[int, torch.Tensor]) -> None:
        """`key_means: auto`: {layer_id: [H_local, head_dim]} measured by the start-up probe
        (sglang_tq.key_means); bf16 layers stay uncentered. Called before any key is stored."""
        self.key_means = [means[lid].to(device=self.device, dtype=torch.float32).contiguous()
                          if q and lid in means else None for lid, q in zip(self.layer_ids, self.quantized)]

    def key_mean(self, layer_id: int) -> Optional[torch.Tensor]:
        """fp32 [H_kv, head_dim] key-centering mean of a quantized layer, or None."""
        return self.key_means[self._local(layer_id)]

    def drop_key_means(self) -> None:
        """Store every key uncentered (a model whose scores are not shift invariant). Before any key is stored."""
        self.key_means = [None] * self.layer_num

    def _layer_tensors(self, idx: int, role: str) -> List[torch.Tensor]:
        """Storage tensors of one local layer and role ('k' or 'v'), in a fixed order."""
        if self.quantized[idx]:
            return ([self.k_codes[idx], self.k_scales[idx]] if role == "k"
                    else [self.v_codes[idx], self.v_scales[idx]])
        return [self.k_buffer[idx] if role == "k" else self.v_buffer[idx]]

    def _all_tensors(self, role: str) -> List[torch.Tensor]:
        return [t for i in range(self.layer_num) for t in self._layer_tensors(i, role)]

    def _clear_buffers(self):
        for name in ("k_buffer", "v_buffer", "k_codes", "k_scales", "v_codes", "v_scales", "ring_k", "ring_v",
                     "first_k", "first_v", "first_flags", "first_ids"):
            if hasattr(self, name):
                delattr(self, name)

    def get_kv_size_bytes(self):
        k = sum(t.numel() * t.element_size() for t in self._all_tensors("k"))
        v = sum(t.numel() * t.element_size() for t in self._all_tensors("v"))
        return k, v

    def bytes_per_token(self) -> int:
        """Cache bytes of one token on this rank (all local layers, K + V)."""
        return sum(t[0].numel() * t.element_size() for t in self._all_tensors("k") + self._all_tensors("v"))

    def get_contiguous_buf_infos(self):
        """(data_ptrs, data_lens, item_lens): every storage tensor, K side (all layers) then V side
        (same order), as for MHATokenToKVPool; a quantized layer contributes codes then scales.
        item_len = bytes of one page of that tensor."""
        tensors = self._all_tensors("k") + self._all_tensors("v")
        return ([t.data_ptr() for t in tensors], [t.nbytes for t in tensors],
                [t[0].nbytes * self.page_size for t in tensors])

    # ----------------------------------------------------------------------------------------
    # Access
    # ----------------------------------------------------------------------------------------
    def _local(self, layer_id: int) -> int:
        idx = self._index.get(layer_id)
        if idx is None:
            raise IndexError(f"layer {layer_id} is not held by this pool (layers {self.layer_ids})")
        return idx

    def is_quantized(self, layer_id: int) -> bool:
        return self.quantized[self._local(layer_id)]

    def codecs(self, layer_id: int):
        idx = self._local(layer_id)
        return self.k_codecs[idx], self.v_codecs[idx]

    def _wait(self, layer_id: int):
        if self.layer_transfer_counter is not None:
            self.layer_transfer_counter.wait_until(self._local(layer_id))

    def _key(self, idx: int):
        if self.quantized[idx]:
            return TQLayerBuffer(self.k_codes[idx], self.k_scales[idx], self.k_codecs[idx])
        return self.k_buffer[idx].view(FP8_DTYPE) if self.fp8[idx] else self.k_buffer[idx]

    def _value(self, idx: int):
        if self.quantized[idx]:
            return TQLayerBuffer(self.v_codes[idx], self.v_scales[idx], self.v_codecs[idx])
        return self.v_buffer[idx].view(FP8_DTYPE) if self.fp8[idx] else self.v_buffer[idx]

    def is_fp8(self, layer_id: int) -> bool:
        return self.fp8[self._local(layer_id)]

    def _buffer_index(self, layer_id: int) -> int:
        # TritonAttnBackend.__init__ reads get_value_buffer(0) (global id 0) even on later PP ranks,
        # where MHATokenToKVPool silently wraps around its Python list; answer with the first local layer.
        if layer_id == 0 and 0 not in self._index:
            return 0
        return self._local(layer_id)

    def get_key_buffer(self, layer_id: int):
        idx = self._buffer_index(layer_id)
        self._wait(layer_id)
        return self._key(idx)

    def get_value_buffer(self, layer_id: int):
        idx = self._buffer_index(layer_id)
        self._wait(layer_id)
        return self._value(idx)

    def get_kv_buffer(self, layer_id: int):
        return self.get_key_buffer(layer_id), self.get_value_buffer(layer_id)

    def window_buffers(self, layer_id: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(ring_k, ring_v) of a quantized layer with a recent window; (None, None) otherwise."""
        idx = self._local(layer_id)
        return self.ring_k[idx], self.ring_v[idx]

    def window_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.ring_k + self.ring_v if t is not None)

    def first_rows(self, layer_id: int):
        """The exact first-token rows a quantized layer's decode reads (`tq_kernels.window.FirstRows`), or None."""
        from tq_kernels.window import FirstRows

        idx = self._local(layer_id)
        if self.first_k[idx] is None:
            return None
        return FirstRows(self.first_k[idx], self.first_v[idx], self.first_flags)

    def first_row_bytes(self) -> int:
        """Bytes of the first-token tables, their ids and the slots' flags."""
        return sum(t.numel() * t.element_size()
                   for t in self.first_k + self.first_v + [self.first_flags, self.first_ids] if t is not None)

    def claim_first_rows(self, ids: torch.Tensor, loc: torch.Tensor, at_zero: torch.Tensor) -> Optional[torch.Tensor]:
        """The table entry of each new token (int32 [N], -1: none; `tq_kernels.first_token`): tokens at
        position 0 (at_zero) find or claim their id's entry; every slot in `loc` gets its flag. None when
        this pool keeps no first-token rows."""
        if not self.first_token:
            return None
        return self.ops.claim_first_rows(ids, loc, at_zero, self.first_ids, self.first_flags)

    def clear_first_flags(self, loc: torch.Tensor) -> None:
        """These slots' K/V came from elsewhere (a transfer): their position 0, if any, is read from the codes."""
        if self.first_token:
            self.first_flags[loc.to(device=self.first_flags.device, dtype=torch.int64)] = 0

    def get_v_head_dim(self) -> int:
        return self.v_head_dim

    def set_kv_buffer(
        self,
        layer,
        loc: torch.Tensor,
        cache_k: torch.Tensor,
        cache_v: torch.Tensor,
        k_scale: Optional[float] = None,
        v_scale: Optional[float] = None,
        layer_id_override: Optional[int] = None,
        q: Optional[torch.Tensor] = None,
        q_rot: Optional[torch.Tensor] = None,
        window_rows: Optional[torch.Tensor] = None,
        window_buffers: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
        first_entries: Optional[torch.Tensor] = None,
    ) -> None:
        """q / q_rot (quantized layers, decode): the same compress launch writes the queries rotated like
        the keys into q_rot (tq_kernels.compress_and_store); the decode kernel then reads them.
        window_rows (int32 [N], < 0 = none): ring rows of the recent window for the new tokens.
        window_buffers: (k, v) rows that window_rows index instead of the ring (speculative verify stages
        its draft tokens there).
        first_entries (int32 [N], < 0 = none; `claim_first_rows`): first-token table entries the new tokens'
        exact rows go to."""
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        idx = self._local(layer_id)
        # k_scale / v_scale (fp8 KV scales of a quantized checkpoint) are ignored by the bf16 and packed
        # layers, as MHATokenToKVPool ignores them for a 16-bit cache; fp8 layers take them from `layer`.
        k = cache_k.reshape(-1, self.head_num, self.head_dim)
        v = cache_v.reshape(-1, self.head_num, self.v_head_dim)
        if self.quantized[idx]:
            from tq_kernels.window import RingWrite

            ring = first = None
            if window_rows is not None and self.ring_k[idx] is not None:
                ring = RingWrite(*(window_buffers or (self.ring_k[idx], self.ring_v[idx])), window_rows)
            if first_entries is not None and self.first_k[idx] is not None:
                first = RingWrite(self.first_k[idx], self.first_v[idx], first_entries)
            self.ops.compress(k, v, loc, self._key(idx), self._value(idx), k_mean=self.key_means[idx], ring=ring,
                              first=first, q=q, q_rot=q_rot)
        elif self.fp8[idx]:
            ks, vs = fp8_layer_scales(layer)
            self.k_buffer[idx][loc] = fp8_encode(k, ks)
            self.v_buffer[idx][loc] = fp8_encode(v, vs)
        else:
            kb, vb = self.k_buffer[idx], self.v_buffer[idx]
            kb[loc] = k.to(kb.dtype)
            vb[loc] = v.to(vb.dtype)

    def move_kv_cache(self, tgt_loc: torch.Tensor, src_loc: torch.Tensor):
        """Copy whole slots (all layers, all storage tensors, the first-token flags): packed rows move as bytes."""
        if tgt_loc.numel() == 0:
            return
        for t in self._all_tensors("k") + self._all_tensors("v") + self._flag_tensors():
            t[tgt_loc] = t[src_loc]

    def _flag_tensors(self) -> List[torch.Tensor]:
        return [self.first_flags] if self.first_token else []

    # PD-decode retraction offload (schedule_batch: get_cpu_copy / load_cpu_copy)
    def get_cpu_copy(self, indices):
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
        out = []
        for i in range(self.layer_num):
            out.append([t[indices].to("cpu", non_blocking=True)
                        for t in self._layer_tensors(i, "k") + self._layer_tensors(i, "v")])
        out.append([t[indices].to("cpu", non_blocking=True) for t in self._flag_tensors()])  # the entries persist
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()
        return out

    def load_cpu_copy(self, kv_cache_cpu, indices):
        for i in range(self.layer_num):
            for t, src in zip(self._layer_tensors(i, "k") + self._layer_tensors(i, "v"), kv_cache_cpu[i]):
                t[indices] = src.to(t.device, non_blocking=True)
        for t, src in zip(self._flag_tensors(), kv_cache_cpu[self.layer_num]):
            t[indices] = src.to(t.device, non_blocking=True)
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize()



# --------------------------------------------------------------------------------------------
# Hybrid models: SGLang's two-pool layouts with TQTokenToKVPool sub-pools
# --------------------------------------------------------------------------------------------
class _SubPools:
    """Stands in for SGLang's token_to_kv_pool_class / MHATokenToKVPool inside a hybrid pool's __init__:
    its n-th call builds a TQTokenToKVPool of the n-th list of model layer ids (checked against the
    layer count SGLang asks for, so a reordering in SGLang fails loudly). The ring of the recent window
    and the first-token rows go to the one sub-pool named in `ring` (its slots are the model's positions)."""

    def __init__(self, plan, layer_ids: Sequence[Sequence[int]], window_requests: int, ring: Sequence[bool]):
        self.plan, self.layer_ids, self.window_requests, self.ring = plan, list(layer_ids), window_requests, list(ring)
        self.built: List[TQTokenToKVPool] = []

    def __call__(self, *args, layer_num: int, **kwargs) -> TQTokenToKVPool:
        n = len(self.built)
        if n >= len(self.layer_ids) or len(self.layer_ids[n]) != layer_num:
            raise RuntimeError(f"TurboQuant: SGLang asked for KV sub-pool #{n} of {layer_num} layers; expected "
                               f"{[len(ids) for ids in self.layer_ids]} layers in that order")
        pool = TQTokenToKVPool(*args, layer_num=layer_num, plan=self.plan, layer_ids=self.layer_ids[n],
                               window_requests=self.window_requests if self.ring[n] else 0,
                               first_token=self.ring[n], **kwargs)
        self.built.append(pool)
        return pool


class TQPoolGroup:
    """What the attention backend reads of a pool, for a pool made of TQTokenToKVPool sub-pools: every
    call takes the model's layer id and goes to the sub-pool holding that layer."""

    def _init_group(self, subpools: Sequence[TQTokenToKVPool], plan) -> None:
        self.tq_subpools = list(subpools)
        self._pool_of: Dict[int, TQTokenToKVPool] = {lid: p for p in subpools for lid in p.layer_ids}
        first = self.tq_subpools[0]
        self.plan, self.seed, self.ops = plan, first.seed, first.ops
        self.model_dtype, self.dtype = first.model_dtype, POOL_DTYPE  # never bf16 (module docstring)
        self.head_dim, self.v_head_dim = first.head_dim, first.v_head_dim
        ringed = [p for p in self.tq_subpools if p.window_size]
        self.window_size = ringed[0].window_size if ringed else 0
        self.window_requests = ringed[0].window_requests if ringed else 0
        self.window_start = (ringed[0] if ringed else first).window_start
        # the sub-pool with the first-token rows (the one with the ring); the others read position 0 from the codes
        self.first_pool = next((p for p in self.tq_subpools if p.first_token), None)
        self.first_token = self.first_pool is not None
        self.k_codecs = [c for p in self.tq_subpools for c in p.k_codecs]
        self.v_codecs = [c for p in self.tq_subpools for c in p.v_codecs]
        self.quantized_layer_ids = sorted(lid for p in self.tq_subpools for lid in p.quantized_layer_ids)

    def tq_pool_of(self, layer_id: int) -> TQTokenToKVPool:
        pool = self._pool_of.get(layer_id)
        if pool is None:
            raise IndexError(f"layer {layer_id} has no KV cache in this pool (layers {sorted(self._pool_of)})")
        return pool

    def get_key_buffer(self, layer_id: int):
        return self.tq_pool_of(layer_id).get_key_buffer(layer_id)

    def get_value_buffer(self, layer_id: int):
        return self.tq_pool_of(layer_id).get_value_buffer(layer_id)

    def get_kv_buffer(self, layer_id: int):
        return self.tq_pool_of(layer_id).get_kv_buffer(layer_id)

    def get_v_head_dim(self) -> int:
        return self.v_head_dim

    def is_quantized(self, layer_id: int) -> bool:
        return self.tq_pool_of(layer_id).is_quantized(layer_id)

    def is_fp8(self, layer_id: int) -> bool:
        return self.tq_pool_of(layer_id).is_fp8(layer_id)

    def codecs(self, layer_id: int):
        return self.tq_pool_of(layer_id).codecs(layer_id)

    def key_mean(self, layer_id: int) -> Optional[torch.Tensor]:
        return self.tq_pool_of(layer_id).key_mean(layer_id)

    def window_buffers(self, layer_id: int):
        return self.tq_pool_of(layer_id).window_buffers(layer_id)

    def window_bytes(self) -> int:
        return sum(p.window_bytes() for p in self.tq_subpools)

    def first_rows(self, layer_id: int):
        return self.tq_pool_of(layer_id).first_rows(layer_id)

    def first_row_bytes(self) -> int:
        return sum(p.first_row_bytes() for p in self.tq_subpools)

    def claim_first_rows(self, ids, loc, at_zero):
        return self.first_pool.claim_first_rows(ids, loc, at_zero) if self.first_pool is not None else None

    def clear_first_flags(self, loc) -> None:
        if self.first_pool is not None:
            self.first_pool.clear_first_flags(loc)

    def bytes_per_token(self) -> int:
        """Cache bytes of one token in every sub-pool (each holds its own tokens)."""
        return sum(p.bytes_per_token() for p in self.tq_subpools)

    def use_auto_key_means(self, means: Dict[int, torch.Tensor]) -> None:
        for p in self.tq_subpools:
            p.use_auto_key_means(means)

    def drop_key_means(self) -> None:
        for p in self.tq_subpools:
            p.drop_key_means()

    def _sub_set_kv_buffer(self, layer, loc, cache_k, cache_v, layer_id_override=None, **extra) -> None:
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        self.tq_pool_of(layer_id).set_kv_buffer(layer, loc, cache_k, cache_v, layer_id_override=layer_id, **extra)


class TQSWAKVPool(TQPoolGroup, SWAKVPool):
    """SGLang's hybrid SWA memory (SWAKVPool: a full-attention pool of `size` tokens and a sliding-window
    pool of `size_swa` tokens, slot ids translated by the allocator's full_to_swa_index_mapping) with
    TQTokenToKVPool sub-pools: each layer is stored in its plan's format in its own pool. The recent
    window's ring serves the full-attention layers only (the backend reads a sliding-window layer's last
    positions through translated window indices, not by position)."""

    def __init__(self, *args, plan=None, window_requests: int = 0, swa_attention_layer_ids, full_attention_layer_ids,
                 token_to_kv_pool_class=None, **kwargs):
        subs = _SubPools(plan, [swa_attention_layer_ids, full_attention_layer_ids], window_requests, ring=[False, True])
        SWAKVPool.__init__(self, *args, swa_attention_layer_ids=swa_attention_layer_ids,
                           full_attention_layer_ids=full_attention_layer_ids, token_to_kv_pool_class=subs, **kwargs)
        self._init_group(subs.built, plan)

    def is_swa_layer(self, layer_id: int) -> bool:
        return self.layers_mapping[layer_id][1]

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale=None, v_scale=None, layer_id_override=None, **extra):
        """As SWAKVPool.set_kv_buffer (a sliding-window layer's slots translated to its pool), passing the
        layer and the TurboQuant arguments (q / q_rot / window_rows) through."""
        layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
        if self.is_swa_layer(layer_id):
            loc = self.swa_loc if self.swa_loc is not None else self.translate_loc_from_full_to_swa(loc)
        self._sub_set_kv_buffer(layer, loc, cache_k, cache_v, layer_id_override=layer_id, **extra)


class TQHybridLinearKVPool(TQPoolGroup, HybridLinearKVPool):
    """SGLang's pool of a linear-attention hybrid (HybridLinearKVPool: the attention layers' KV pool next to
    the recurrent-state MambaPool, which stays SGLang's) with a TQTokenToKVPool of the attention layers."""

    def __init__(self, *args, plan=None, window_requests: int = 0, full_attention_layer_ids, **kwargs):
        from sglang.srt.mem_cache import memory_pool as sglang_pools
        from sglang_tq.sglang_internals import pool_class_during

        subs = _SubPools(plan, [full_attention_layer_ids], window_requests, ring=[True])
        with pool_class_during(sglang_pools, subs):  # HybridLinearKVPool builds its MHATokenToKVPool by name
            HybridLinearKVPool.__init__(self, *args, full_attention_layer_ids=full_attention_layer_ids, **kwargs)
        self._init_group(subs.built, plan)

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, k_scale=None, v_scale=None, layer_id_override=None, **extra):
        self._sub_set_kv_buffer(layer, loc, cache_k, cache_v, layer_id_override=layer_id_override, **extra)


TQ_POOLS = (TQTokenToKVPool, TQPoolGroup)  # pools the attention backend serves
