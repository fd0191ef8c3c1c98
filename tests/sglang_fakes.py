"""Test helpers for the SGLang integration tests (CPU): a fake model runner that runs SGLang's real
`ModelRunnerKVCacheMixin` methods, real `ServerArgs` objects without `__post_init__`, and
ForwardBatch builders. Import only after `sglang_cpu_shim` (conftest does that)."""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Sequence
from unittest import mock

import torch

import sglang_tq
from sglang.srt.configs.model_config import AttentionArch
from sglang.srt.model_executor import model_runner_kv_cache_mixin as mix
from sglang.srt.model_executor.forward_batch_info import ForwardBatch, ForwardMode
from sglang.srt.server_args import ServerArgs

sglang_tq.register()


def _tp1():
    return 1


# No torch.distributed in unit tests: attention TP size 1 (as SGLang's own backend tests do).
import sglang.srt.layers.dp_attention as _dp  # noqa: E402
import sglang.srt.layers.attention.triton_backend as _tb  # noqa: E402

for _m in (_dp, mix, _tb):
    _m.get_attention_tp_size = _tp1

GB = 1 << 30


def server_args(**kw) -> ServerArgs:
    """A real ServerArgs with every field at its default (no __post_init__: no device/model probing)."""
    sa = object.__new__(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        if f.default is not dataclasses.MISSING:
            setattr(sa, f.name, f.default)
        elif f.default_factory is not dataclasses.MISSING:
            setattr(sa, f.name, f.default_factory())
        else:
            setattr(sa, f.name, None)
    sa.model_path = "dummy"
    sa.device = "cpu"
    sa.attention_backend = "turboquant"
    sa.page_size = 1
    sa.disable_cuda_graph = True
    sa.chunked_prefill_size = 8192
    for k, v in kw.items():
        setattr(sa, k, v)
    return sa


class FakeHFConfig:
    architectures = ["LlamaForCausalLM"]

    def get_text_config(self):
        return self


class FakeModelConfig:
    def __init__(self, num_layers, num_q_heads, num_kv_heads, head_dim, v_head_dim=None, context_len=256,
                 attention_arch=AttentionArch.MHA):
        self.num_hidden_layers = num_layers
        self.num_attention_layers = num_layers
        self.num_attention_heads = num_q_heads
        self.num_key_value_heads = num_kv_heads
        self.head_dim = head_dim
        self.v_head_dim = head_dim if v_head_dim is None else v_head_dim
        self.context_len = context_len
        self.attention_arch = attention_arch
        self.hf_config = FakeHFConfig()
        self.hf_text_config = self.hf_config
        self.is_hybrid_swa = False
        self.is_hybrid_swa_compress = False
        self.is_encoder_decoder = False
        self.attention_chunk_size = None
        self.is_multimodal = False
        self.is_local_attention_model = False

    def get_num_kv_heads(self, tp_size):
        return max(1, self.num_key_value_heads // tp_size)


class FakeRunner(mix.ModelRunnerKVCacheMixin):
    """Just what SGLang's _init_pools / profile_max_num_token / TritonAttnBackend read."""

    def __init__(self, model_config: FakeModelConfig, sa: Optional[ServerArgs] = None, dtype=torch.bfloat16,
                 start_layer: int = 0, num_layers: Optional[int] = None):
        self.model_config = model_config
        self.server_args = sa if sa is not None else server_args()
        self.device = "cpu"
        self.gpu_id = 0
        self.tp_rank, self.tp_size, self.pp_rank, self.pp_size, self.dp_size = 0, 1, 0, 1, 1
        self.dtype = dtype
        self.kv_cache_dtype = dtype
        self.page_size = self.server_args.page_size
        self.start_layer = start_layer
        n = model_config.num_hidden_layers - start_layer if num_layers is None else num_layers
        self.end_layer = start_layer + n
        self.num_effective_layers = n
        self.is_draft_worker = False
        self.use_mla_backend = model_config.attention_arch == AttentionArch.MLA
        self.is_hybrid_swa = False
        self.is_hybrid_swa_compress = False
        self.mambaish_config = None
        self.hybrid_gdn_config = None
        self.kimi_linear_config = None
        self.enable_hisparse = False
        self.sliding_window_size = None
        self.attention_chunk_size = None
        self.mem_fraction_static = 0.9
        self.req_to_token_pool = None
        self.token_to_kv_pool_allocator = None
        self.attn_cp_size = 1

        class _Spec:
            def is_none(self):
                return True

        self.spec_algorithm = _Spec()
        self.model = None  # a test that serves `key_means: auto` sets a model for the start-up probe

    def _init_pools(self):
        """SGLang's own (patched by sglang_tq); without a model there is nothing to run `key_means: auto`'s
        probe through, and the keys stay uncentered."""
        if self.model is not None:
            return super()._init_pools()
        from sglang_tq import registration

        with mock.patch.object(registration, "run_key_means_probe", lambda runner, pool: None):
            return super()._init_pools()

    def build_pools(self, max_total_num_tokens: int, max_running_requests: int = 8):
        """SGLang's own _init_pools (patched by sglang_tq when the backend is turboquant)."""
        self.max_total_num_tokens = max_total_num_tokens
        self.max_running_requests = max_running_requests
        self._init_pools()
        return self.token_to_kv_pool

    def profile_tokens(self, free_gb: float) -> int:
        """SGLang's profile_max_num_token with `free_gb` of memory for the KV cache."""
        orig_mem, orig_world = mix.get_available_gpu_memory, mix.get_world_group
        mix.get_available_gpu_memory = lambda *a, **k: free_gb
        mix.get_world_group = lambda: type("W", (), {"world_size": 1, "cpu_group": None})()
        try:
            self.mem_fraction_static = 1.0
            return self.profile_max_num_token(pre_model_load_memory=free_gb)
        finally:
            mix.get_available_gpu_memory, mix.get_world_group = orig_mem, orig_world


def first_token_cut(runner, layers, tokens: int, cell: float, extra_bytes: int = 0) -> int:
    """Tokens a `tokens`-token budget gives up (cell: bytes of one token) for the exact first token's tables
    and slot flags over `layers` (registration.first_token_bytes; page size 1) plus `extra_bytes`."""
    from sglang_tq.registration import first_token_bytes

    heads = runner.model_config.get_num_kv_heads(1)
    return int(-(-(first_token_bytes(runner._tq_plan, heads, layers, tokens + 1) + extra_bytes) // cell))


def write_tq_config(tmp_path, text: str, name: str = "tq.yaml") -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def write_hf_config(tmp_path, **over) -> str:
    """A Llama-style HF config.json folder (no weights) that SGLang's ModelConfig can read offline."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
           "num_hidden_layers": 32, "vocab_size": 128256, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "bfloat16", "hidden_act": "silu",
           "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
    cfg.update(over)
    d = tmp_path / "model"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


# ------------------------------------------------------------------------------------------------
# Forward batches
# ------------------------------------------------------------------------------------------------
def extend_batch(runner, req_ids: Sequence[int], prefix_lens: Sequence[int], new_lens: Sequence[int],
                 out_cache_loc: torch.Tensor, backend) -> ForwardBatch:
    seq = [p + n for p, n in zip(prefix_lens, new_lens)]
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        batch_size=len(req_ids),
        # token ids 1000 + the request slot: at position 0 a token's K/V depend on its id alone (the exact
        # first-token table is keyed by it), and the tests' random K/V differ per request
        input_ids=torch.repeat_interleave(1000 + torch.tensor(list(req_ids), dtype=torch.int64),
                                          torch.tensor(list(new_lens), dtype=torch.int64)),
        req_pool_indices=torch.tensor(list(req_ids), dtype=torch.int64),
        seq_lens=torch.tensor(seq, dtype=torch.int64),
        out_cache_loc=out_cache_loc,
        seq_lens_sum=sum(seq),
        seq_lens_cpu=torch.tensor(seq, dtype=torch.int64),
        extend_num_tokens=sum(new_lens),
        extend_seq_lens=torch.tensor(list(new_lens), dtype=torch.int32),
        extend_prefix_lens=torch.tensor(list(prefix_lens), dtype=torch.int32),
        extend_seq_lens_cpu=list(new_lens),
        extend_prefix_lens_cpu=list(prefix_lens),
        attn_backend=backend,
    )
    fb.req_to_token_pool = runner.req_to_token_pool
    fb.token_to_kv_pool = runner.token_to_kv_pool
    return fb


def decode_batch(runner, req_ids: Sequence[int], seq_lens: Sequence[int], out_cache_loc: torch.Tensor,
                 backend) -> ForwardBatch:
    fb = ForwardBatch(
        forward_mode=ForwardMode.DECODE,
        batch_size=len(req_ids),
        input_ids=torch.zeros(len(req_ids), dtype=torch.int64),
        req_pool_indices=torch.tensor(list(req_ids), dtype=torch.int64),
        seq_lens=torch.tensor(list(seq_lens), dtype=torch.int64),
        out_cache_loc=out_cache_loc,
        seq_lens_sum=sum(seq_lens),
        seq_lens_cpu=torch.tensor(list(seq_lens), dtype=torch.int64),
        attn_backend=backend,
    )
    fb.req_to_token_pool = runner.req_to_token_pool
    fb.token_to_kv_pool = runner.token_to_kv_pool
    return fb


# ------------------------------------------------------------------------------------------------
# The attention backend on the CPU
# ------------------------------------------------------------------------------------------------
from sglang.srt.layers.attention.triton_backend import ForwardMetadata, TritonAttnBackend, logit_capping_mod  # noqa: E402
from sglang_tq.backend import TurboQuantAttnBackend  # noqa: E402


class _KVIndicesTwin:
    """torch twin of SGLang's create_flashinfer_kv_indices_triton (a Triton kernel, launched as
    `kernel[grid](...)`): kv_indices[indptr[b]:indptr[b] + len[b]] = req_to_token[req[b], start[b]:][:len[b]].
    Installed in triton_backend, so its sliding-window helpers (update_sliding_window_buffer*) run here."""

    def __getitem__(self, grid):
        def launch(req_to_token, req_pool_indices, lens, kv_indptr, kv_start_idx, kv_indices, stride):
            for b in range(int(grid[0])):
                start = int(kv_start_idx[b]) if kv_start_idx is not None else 0
                n, at = int(lens[b]), int(kv_indptr[b])
                kv_indices[at:at + n] = req_to_token[int(req_pool_indices[b]), start:start + n].to(kv_indices.dtype)
        return launch


_tb.create_flashinfer_kv_indices_triton = _KVIndicesTwin()


class TorchTritonTwin(TritonAttnBackend):
    """SGLang's Triton backend with its metadata and its bf16 attention computed in torch (its own are
    Triton kernels, which need a GPU): the same kv_indptr / kv_indices / qo_indptr as on the GPU, and
    plain softmax attention over the pool's bf16 buffers for the unquantized layers."""

    def _gather_indices(self, req_pool_indices, lens):
        """torch twin of create_flashinfer_kv_indices_triton: concatenated req_to_token[r, :len]."""
        rows = self.req_to_token[req_pool_indices.long()]
        cols = torch.arange(rows.shape[1], device=rows.device)[None, :]
        mask = cols < lens.to(rows.device).long()[:, None]
        return rows[mask].to(torch.int64)

    def init_forward_metadata(self, fb):
        bs = fb.batch_size
        kv_indptr = self.kv_indptr
        none = dict(attn_logits=None, attn_lse=None, num_kv_splits=None, custom_mask=None, mask_indptr=None,
                    window_kv_indptr=None, window_kv_indices=None, window_num_kv_splits=None, window_kv_offsets=None)
        if fb.forward_mode.is_decode_or_idle():
            kv_indptr[1:bs + 1] = torch.cumsum(fb.seq_lens, dim=0)
            kv_indptr = kv_indptr[:bs + 1]
            self.forward_metadata = ForwardMetadata(
                max_extend_len=None, kv_indptr=kv_indptr, kv_indices=self._gather_indices(fb.req_pool_indices, fb.seq_lens),
                qo_indptr=None, **none)
            return
        if fb.forward_mode.is_target_verify():  # prefixes = seq_lens; D draft tokens each under the tree mask
            d = fb.spec_info.draft_token_num
            kv_indptr[1:bs + 1] = torch.cumsum(fb.seq_lens, dim=0)
            mask_indptr = self.mask_indptr[:bs + 1]
            mask_indptr[1:] = torch.cumsum(d * (fb.seq_lens + d), dim=0)
            self.forward_metadata = ForwardMetadata(
                max_extend_len=d, kv_indptr=kv_indptr[:bs + 1],
                kv_indices=self._gather_indices(fb.req_pool_indices, fb.seq_lens),
                qo_indptr=torch.arange(0, (bs + 1) * d, d, dtype=torch.int32),
                **dict(none, custom_mask=fb.spec_info.custom_mask, mask_indptr=mask_indptr))
            return
        kv_indptr[1:bs + 1] = torch.cumsum(fb.extend_prefix_lens, dim=0)
        kv_indptr = kv_indptr[:bs + 1]
        qo_indptr = self.qo_indptr
        qo_indptr[1:bs + 1] = torch.cumsum(fb.extend_seq_lens, dim=0)
        if self.sliding_window_size is not None and self.sliding_window_size > 0:  # as the Triton backend
            (none["window_kv_indptr"], none["window_kv_indices"], _,
             none["window_kv_offsets"]) = _tb.update_sliding_window_buffer(
                self.window_kv_indptr, self.req_to_token, self.sliding_window_size, fb.extend_prefix_lens,
                fb.req_pool_indices, bs, self.device, self.token_to_kv_pool_allocator)
        self.forward_metadata = ForwardMetadata(
            max_extend_len=max(fb.extend_seq_lens_cpu), kv_indptr=kv_indptr,
            kv_indices=self._gather_indices(fb.req_pool_indices, fb.extend_prefix_lens),
            qo_indptr=qo_indptr[:bs + 1], **none)

    @staticmethod
    def _attend(q, k, v, scale, cap, mask=None):
        """q [M, Hq, d], k [L, Hkv, d], v [L, Hkv, dv] (float32) -> [M, Hq, dv]."""
        g = q.shape[1] // k.shape[1]
        if k.shape[0] == 0:
            return q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
        k = k.repeat_interleave(g, dim=1)
        v = v.repeat_interleave(g, dim=1)
        s = torch.einsum("mhd,lhd->hml", q, k) * scale
        if cap and cap > 0:
            s = cap * torch.tanh(s / cap)
        if mask is not None:
            s = s.masked_fill(~mask[None], float("-inf"))
        return torch.einsum("hml,lhd->mhd", torch.softmax(s, dim=-1).nan_to_num(0.0), v)

    def _start(self, q, k, v, layer, fb, save_kv_cache):
        """Store the new K/V; return the layer's buffers, q as float [T, Hq, d], the output and its view."""
        pool = fb.token_to_kv_pool
        if save_kv_cache:
            pool.set_kv_buffer(layer, fb.out_cache_loc, k, v)
        kbuf, vbuf = pool.get_kv_buffer(layer.layer_id)
        hq, dv = layer.tp_q_head_num, layer.v_head_dim
        q3 = q.reshape(-1, hq, layer.qk_head_dim).float()
        o = q.new_empty((q3.shape[0], hq * dv))
        return kbuf, vbuf, q3, o, o.view(-1, hq, dv)

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, sinks=None):
        kbuf, vbuf, q3, o, o3 = self._start(q, k, v, layer, fb, save_kv_cache)
        md = self.forward_metadata
        k3 = k.view(-1, layer.tp_k_head_num, layer.qk_head_dim).float()
        v3 = v.view(-1, layer.tp_v_head_num, layer.v_head_dim).float()
        qo, kvp = md.qo_indptr.tolist(), md.kv_indptr.tolist()
        cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        for i in range(len(qo) - 1):
            a, b = qo[i], qo[i + 1]
            if b <= a:
                continue
            slots = md.kv_indices[kvp[i]:kvp[i + 1]]
            kk = torch.cat([kbuf[slots].float(), k3[a:b]])
            vv = torch.cat([vbuf[slots].float(), v3[a:b]])
            n_pre, n = kvp[i + 1] - kvp[i], b - a
            mask = torch.ones(n, n_pre + n, dtype=torch.bool, device=q.device)
            if md.custom_mask is not None:  # a verify's tree mask (SGLang's layout: rows prefix + drafts wide)
                m0 = int(md.mask_indptr[i])
                mask = md.custom_mask[m0:m0 + n * (n_pre + n)].view(n, n_pre + n).bool()
            else:
                mask[:, n_pre:] = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            o3[a:b] = self._attend(q3[a:b], kk, vv, layer.scaling, cap, mask).to(o.dtype)
        return o

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, sinks=None):
        kbuf, vbuf, q3, o, o3 = self._start(q, k, v, layer, fb, save_kv_cache)
        kvp = self.forward_metadata.kv_indptr.tolist()
        cap = logit_capping_mod(layer.logit_capping_method, layer.logit_cap)
        for b in range(q3.shape[0]):
            slots = self.forward_metadata.kv_indices[kvp[b]:kvp[b + 1]]
            o3[b] = self._attend(q3[b:b + 1], kbuf[slots].float(), vbuf[slots].float(), layer.scaling, cap)[0].to(o.dtype)
        return o


class CPUTurboQuantAttnBackend(TurboQuantAttnBackend):
    """The production backend with the torch twin serving its bf16 layers and slot indices."""

    bf16_backend_cls = TorchTritonTwin


def tq_backend(runner, **kw) -> CPUTurboQuantAttnBackend:
    return CPUTurboQuantAttnBackend(runner, **kw)


def tq_and_reference_runners(config_path: str, mc, num_tokens: int, max_running_requests: int):
    """A TurboQuant runner (pool and CPU backend built from `config_path`) and a TorchNative BF16 reference
    runner with its own pool that shares the TurboQuant runner's req-to-token pool (the same slot mapping
    for both). -> (runner, pool, backend, ref_runner, ref_pool)."""
    with env(SGLANG_TQ_CONFIG=config_path):
        runner = FakeRunner(mc)
        pool = runner.build_pools(num_tokens, max_running_requests=max_running_requests)
        backend = tq_backend(runner)
        ref_runner = FakeRunner(mc, server_args(attention_backend="torch_native"))
        ref_pool = ref_runner.build_pools(num_tokens, max_running_requests=max_running_requests)
        ref_runner.req_to_token_pool = runner.req_to_token_pool
    return runner, pool, backend, ref_runner, ref_pool


def random_qkv(gen, n: int, hq: int, hkv: int, d: int):
    """bf16 q [n, hq * d], k and v [n, hkv * d] as a model's projections hand them over."""
    return [(torch.randn(n, h * d, generator=gen) * s).to(torch.bfloat16) for h, s in ((hq, 2.0), (hkv, 1.0), (hkv, 1.0))]


def dequant_slots(pool, layer_id: int, slots: torch.Tensor):
    """float32 K, V [len(slots), H_kv, head_dim] of a quantized layer's slots, decoded from the packed cache."""
    kb, vb = pool.get_kv_buffer(layer_id)
    slots = slots.long()
    return (kb.codec.decode(kb.codes[slots], kb.scales[slots]).float(),
            vb.codec.decode(vb.codes[slots], vb.scales[slots]).float())


def exact_first_rows(pool, layer_id: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """k, v [len(slots), H_kv, head_dim] with the rows of flagged slots (a position-0 token whose exact row the
    first-token table keeps) replaced by that row, un-rotated: what the cache's readers take for them."""
    first = pool.first_rows(layer_id)
    if first is None:
        return k, v
    e = first.flags[slots.long()].long() - 1
    if not (e >= 0).any():
        return k, v
    kc, vc = pool.codecs(layer_id)
    k, v = k.clone(), v.clone()
    k[e >= 0] = kc.unrotate(first.k[e[e >= 0]].float()).to(k.dtype)
    v[e >= 0] = vc.unrotate(first.v[e[e >= 0]].float()).to(v.dtype)
    return k, v


def sequence_kv(pool, layer_id: int, slots: torch.Tensor):
    """float32 K, V of a quantized layer's slots as the cache's readers take them (`dequant_slots`, then
    `exact_first_rows`)."""
    return exact_first_rows(pool, layer_id, slots, *dequant_slots(pool, layer_id, slots))


def sink_attention_row(q, k, v, sink, lo: int):
    """One query row [Hq, d] over keys / values [L, H_kv, d] from position lo on, plain softmax with one
    sink logit per head added to the denominator (gpt-oss)."""
    hq, hkv, d = q.shape[0], k.shape[1], q.shape[-1]
    k, v = k[lo:].repeat_interleave(hq // hkv, 1), v[lo:].repeat_interleave(hq // hkv, 1)
    s = torch.einsum("hd,lhd->hl", q.float(), k) * d ** -0.5
    p = torch.softmax(torch.cat([s, sink[:, None]], 1), 1)[:, :-1]
    return torch.einsum("hl,lhd->hd", p, v)


def env(**kw):
    """Context manager setting environment variables."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        old = {k: os.environ.get(k) for k in kw}
        try:
            for k, v in kw.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    return cm()
