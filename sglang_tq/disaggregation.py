"""Prefill/decode disaggregation with packed TurboQuant KV, on SGLang's own transfer backends.

What moves: the pool's `get_contiguous_buf_infos` (pool.py) registers every storage tensor, K side (all
layers) then V side in the same order; a quantized layer contributes its codes then its scales, a bf16
boundary layer its plain buffer. Mooncake and NIXL copy `item_len` bytes per page of each tensor with that
tensor's own item length (`send_kvcache`), so packed rows cross as bytes and the decode worker reads them
as its own. `transfer_layout` lists these descriptors; `transfer_bytes_per_token` is what one token costs
on the wire (SGLang's `sum(kv_item_lens) / page_size`), equal to the config's bytes per token.

Not moved: the recent window's ring. Its rows are indexed by the request slot (req_pool_idx), which differs
between the two workers, and it only holds the last W positions of running requests. The decode worker
never runs an extend for a transferred request (SGLang builds a PREBUILT batch), so the backend's extend
rule that sets `window_start` to the prefix length never runs; `prepare_for_prebuilt` is extended here to
set `window_start` of those request slots to the transferred length, so decode reads every transferred
position from the codes and only its own new tokens from the ring (lo = max(L - W, window_start)).
Nor the exact first token's table (pool.py): the same hook clears the first-token flag of each transferred
request's position-0 slot, a slot the decode worker may have used before, so decode reads position 0 from
the transferred codes.

Agreement: the two workers must hold identical layouts. Each prefill scheduler publishes the fingerprint of
its pool (`config_fingerprint`: per-layer formats, seed, heads, layers, dtype, item lengths, key means) on
SGLang's bootstrap server (`PUT /sglang_tq/config`); a decode worker compares it with its own where SGLang
checks page size and KV dtype (`CommonKVManager.try_ensure_parallel_info`, before the first transfer from
that prefill server) and refuses a mismatch, a mixed set-up (BF16 prefill -> TurboQuant decode or the
reverse), and different attention TP or PP sizes (SGLang's head-slicing path assumes one item length for
every layer, which packed layers do not have).
"""
from __future__ import annotations

import hashlib
import json
import logging
from typing import Dict, List, NamedTuple, Optional

import torch

from sglang_tq.compat import TQUnsupportedError
from sglang_tq.sglang_internals import wrap_method

logger = logging.getLogger("sglang_tq")

ROUTE = "/sglang_tq/config"
# transfer backends whose per-layer item lengths were checked against the packed layout
SUPPORTED_TRANSFER_BACKENDS = ("mooncake", "nixl", "fake")


class TQDisaggregationError(TQUnsupportedError):
    """Prefill and decode workers that cannot exchange TurboQuant KV."""


class TransferDescriptor(NamedTuple):
    """One registered buffer, in `get_contiguous_buf_infos` order."""

    layer: int    # global layer id
    role: str     # "k" or "v"
    part: str     # "codes", "scales" or "bf16"
    ptr: int
    nbytes: int
    item_len: int  # bytes of one page


def transfer_layout(pool) -> List[TransferDescriptor]:
    """The pool's registered buffers with their layer, role and part; the same pointers, lengths and item
    lengths as `pool.get_contiguous_buf_infos()` (checked), so SGLang transfers exactly these."""
    out = []
    for role in ("k", "v"):
        for i in range(pool.layer_num):
            parts = ("codes", "scales") if pool.quantized[i] else ("bf16",)
            for part, t in zip(parts, pool._layer_tensors(i, role)):
                out.append(TransferDescriptor(pool.start_layer + i, role, part, t.data_ptr(), t.nbytes,
                                              t[0].nbytes * pool.page_size))
    ptrs, lens, items = pool.get_contiguous_buf_infos()
    if [(d.ptr, d.nbytes, d.item_len) for d in out] != list(zip(ptrs, lens, items)):
        raise RuntimeError("TurboQuant: transfer_layout disagrees with the pool's get_contiguous_buf_infos")
    return out


def transfer_bytes_per_token(pool) -> int:
    """Bytes SGLang moves per token for this rank (sum of item lengths over the page size)."""
    _, _, items = pool.get_contiguous_buf_infos()
    return sum(items) // pool.page_size


# --------------------------------------------------------------------------------------------
# Config fingerprint
# --------------------------------------------------------------------------------------------
def _is_tq_pool(pool) -> bool:
    from sglang_tq.pool import TQTokenToKVPool

    return isinstance(pool, TQTokenToKVPool)


def _key_means_digest(pool) -> Optional[str]:
    means = [m for m in pool.key_means if m is not None]
    if not means:
        return None
    h = hashlib.sha256()
    for i, m in enumerate(pool.key_means):
        if m is not None:
            h.update(str(i).encode())
            h.update(m.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def config_fingerprint(pool) -> Dict:
    """What both workers must share, as a JSON-able dict. A TurboQuant pool: its resolved per-layer formats,
    seed, heads, layer range, dtype, page size, item lengths and key means, plus their digest; any other
    pool: its class and dtype (`turboquant: False`)."""
    if not _is_tq_pool(pool):
        return {"turboquant": False, "pool": type(pool).__name__, "dtype": str(getattr(pool, "dtype", None))}
    _, _, items = pool.get_contiguous_buf_infos()
    fields = {
        "seed": int(pool.seed),
        "kv_heads": int(pool.head_num),
        "head_dim": [int(pool.head_dim), int(pool.v_head_dim)],
        "layers": [int(pool.start_layer), int(pool.layer_num)],
        "dtype": str(pool.model_dtype),
        "page_size": int(pool.page_size),
        "formats": [repr(lp) for lp in pool.layer_plans],
        "item_lens": [int(x) for x in items],
        "key_means": _key_means_digest(pool),
    }
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"turboquant": True, "name": pool.plan.name, "digest": digest, "fields": fields,
            "summary": [" / ".join(lp.describe()) for lp in pool.layer_plans]}


def _describe(fp: Optional[Dict]) -> str:
    if fp is None:
        return "a worker without sglang_tq (no TurboQuant config published)"
    if not fp["turboquant"]:
        return f"a {fp['dtype']} KV cache ({fp['pool']})"
    return f"TurboQuant config '{fp['name']}' (fingerprint {fp['digest']})"


def _field_differences(local: Dict, remote: Dict) -> List[str]:
    out = []
    lf, rf = local["fields"], remote["fields"]
    for key in sorted(set(lf) | set(rf)):
        if lf.get(key) == rf.get(key):
            continue
        if key == "formats":
            ls, rs = local["summary"], remote["summary"]
            first = lf["layers"][0]
            diff = [f"layer {first + i}: prefill {b}, decode {a}" for i, (a, b) in enumerate(zip(ls, rs)) if a != b]
            out.append("per-layer formats differ (" + "; ".join(diff[:4]) + ("; ..." if len(diff) > 4 else "") + ")"
                       if diff else "per-layer formats differ")
        else:
            out.append(f"{key}: prefill {rf.get(key)}, decode {lf.get(key)}")
    return out


def check_peer(local: Dict, remote: Optional[Dict], prefill: str) -> None:
    """Refuse a prefill worker (`prefill`: its bootstrap address) whose KV this decode worker cannot read.
    `remote` None: the prefill worker published nothing (no sglang_tq there)."""
    local_tq = local["turboquant"]
    remote_tq = bool(remote and remote["turboquant"])
    if not local_tq and not remote_tq:
        return
    if local_tq != remote_tq:
        direction = ("BF16 prefill -> TurboQuant decode" if local_tq else "TurboQuant prefill -> BF16 decode")
        raise TQDisaggregationError(
            f"TurboQuant disaggregation: the prefill worker at {prefill} runs {_describe(remote)}, this decode "
            f"worker runs {_describe(local)}. Mixed set-ups ({direction}) are not supported: the KV crosses as "
            f"raw bytes, so run both workers with --attention-backend turboquant and the same TurboQuant config")
    if local["digest"] != remote["digest"]:
        raise TQDisaggregationError(
            f"TurboQuant disaggregation: the prefill worker at {prefill} runs {_describe(remote)}, this decode "
            f"worker runs {_describe(local)}; the packed KV would be misread. Differences: "
            + "; ".join(_field_differences(local, remote))
            + ". Give both workers the same SGLANG_TQ_CONFIG / --tq-config, model and parallel layout")


def check_layout(local_tq: bool, remote_tq: bool, prefill: str, prefill_tp: int, prefill_pp: int,
                 decode_tp: int, decode_pp: int) -> None:
    """TurboQuant transfers need the same attention TP and PP sizes on both sides."""
    if not (local_tq or remote_tq):
        return
    if prefill_tp != decode_tp or prefill_pp != decode_pp:
        raise TQDisaggregationError(
            f"TurboQuant disaggregation: the prefill worker at {prefill} has attention TP {prefill_tp}, PP "
            f"{prefill_pp}; this decode worker has attention TP {decode_tp}, PP {decode_pp}. Packed layers have "
            f"one item length per tensor, which SGLang's head-slicing and layer-slicing transfers do not "
            f"handle: use the same --tp-size (and --pp-size) on both workers")


# --------------------------------------------------------------------------------------------
# Decode side: the recent window after a transfer
# --------------------------------------------------------------------------------------------
def restart_window(pool, req_pool_indices: torch.Tensor, positions: torch.Tensor) -> None:
    """Set the first ring position of these request slots to `positions` (their transferred length): decode
    reads earlier positions from the codes. No-op without a recent window."""
    if not getattr(pool, "window_size", 0):
        return
    R = pool.window_requests
    req = req_pool_indices.to(device=pool.window_start.device, dtype=torch.int64)
    pool.window_start[torch.where(req < R, req, R)] = positions.to(device=req.device, dtype=torch.int32)


def clear_first_rows(pool, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor) -> None:
    """Clear the first-token flag of these requests' position-0 slots: their K/V came over the wire without
    the prefill worker's exact first-token rows. No-op with first_token: codes."""
    req = req_pool_indices.to(device=req_to_token.device, dtype=torch.int64)
    pool.clear_first_flags(req_to_token[req, 0])


# --------------------------------------------------------------------------------------------
# Hooks into SGLang's disaggregation modules
# --------------------------------------------------------------------------------------------
def _bootstrap_url(kv_manager) -> str:
    """The bootstrap server this prefill manager registered with (as CommonKVManager.register_to_bootstrap)."""
    from sglang.srt.disaggregation.common.conn import NetworkAddress

    host = (NetworkAddress.parse(kv_manager.dist_init_addr).resolved().host if kv_manager.dist_init_addr
            else kv_manager.bootstrap_host)
    return NetworkAddress(host, kv_manager.bootstrap_port).to_url()


def _rank_key(tp_rank, pp_rank) -> str:
    return f"{int(tp_rank)}.{int(pp_rank)}"


def publish_fingerprint(kv_manager, fingerprint: Dict, tries: int = 60, wait_s: float = 0.5) -> None:
    """PUT this prefill rank's fingerprint on the bootstrap server. The server starts in the launcher process
    while the schedulers load the model; an unreachable server is retried for tries * wait_s seconds."""
    import time

    import requests

    url = _bootstrap_url(kv_manager) + ROUTE
    body = {"rank": _rank_key(kv_manager.attn_tp_rank, kv_manager.pp_rank), "fingerprint": fingerprint}
    for i in range(tries):
        try:
            resp = requests.put(url, json=body, timeout=5)
        except requests.RequestException as e:
            if i == tries - 1:
                raise RuntimeError(f"TurboQuant: the bootstrap server {url} did not answer: {e}") from e
            time.sleep(wait_s)
            continue
        if resp.status_code != 200:
            raise RuntimeError(f"TurboQuant: could not publish the KV config to the bootstrap server {url}: "
                               f"HTTP {resp.status_code} {resp.text}")
        return


_PENDING = object()


def fetch_fingerprint(bootstrap_addr: str, tp_rank: int, pp_rank: int):
    """The prefill rank's fingerprint; None when that server has no such route (no sglang_tq there);
    _PENDING when it is not published yet or the server did not answer."""
    import requests

    try:
        resp = requests.get(f"http://{bootstrap_addr}{ROUTE}", params={"rank": _rank_key(tp_rank, pp_rank)},
                            timeout=5)
    except requests.RequestException as e:
        logger.warning("TurboQuant: no KV config from the prefill bootstrap server %s yet: %s", bootstrap_addr, e)
        return _PENDING
    if resp.status_code == 404:
        return None
    if resp.status_code != 200:
        return _PENDING
    return resp.json()


def config_route(store: Dict, method: str, rank: str, data: Optional[Dict]):
    """(status, JSON body) of the bootstrap server's config route: PUT stores a rank's fingerprint, GET
    returns it (503 until that rank published)."""
    if method == "PUT":
        if not isinstance(data, dict) or "rank" not in data or "fingerprint" not in data:
            return 400, {"error": "expected {rank, fingerprint}"}
        store[str(data["rank"])] = data["fingerprint"]
        return 200, {"ok": True}
    if method != "GET":
        return 405, {"error": f"method {method} not allowed"}
    fp = store.get(rank)
    return (503, {"error": f"rank {rank} has not published its config"}) if fp is None else (200, fp)


def install_conn(mod) -> None:
    """sglang.srt.disaggregation.common.conn: the bootstrap server's config route, and the decode-side check
    next to SGLang's own page-size / KV-dtype checks."""
    def make_routes(orig):
        def _setup_routes(self):
            orig(self)
            self._tq_fingerprints = {}

            async def handle(request):
                from aiohttp import web

                data = await request.json() if request.method == "PUT" else None
                status, body = config_route(self._tq_fingerprints, request.method, request.query.get("rank", ""), data)
                return web.json_response(body, status=status)

            self.app.router.add_route("*", ROUTE, handle)
        return _setup_routes

    def make_ensure(orig):
        def try_ensure_parallel_info(self, bootstrap_addr: str) -> bool:
            known = bootstrap_addr in self.prefill_info_table
            ok = orig(self, bootstrap_addr)
            local = getattr(self, "_tq_fingerprint", None)  # set on decode managers (install_decode)
            if not ok or known or local is None:
                return ok
            info = self.prefill_info_table[bootstrap_addr]
            remote = fetch_fingerprint(bootstrap_addr, info.target_tp_rank, info.target_pp_ranks[0])
            if remote is _PENDING:
                del self.prefill_info_table[bootstrap_addr]  # asked again on the next scheduling step
                return False
            check_layout(local["turboquant"], bool(remote and remote["turboquant"]), bootstrap_addr,
                         info.attn_tp_size, info.pp_size, self.attn_tp_size, self.pp_size)
            check_peer(local, remote, bootstrap_addr)
            return True
        return try_ensure_parallel_info

    wrap_method(mod.CommonKVBootstrapServer, "_setup_routes", make_routes)
    wrap_method(mod.CommonKVManager, "try_ensure_parallel_info", make_ensure)


def _is_common_manager(kv_manager) -> bool:
    from sglang.srt.disaggregation.common.conn import CommonKVManager

    return isinstance(kv_manager, CommonKVManager)


def _after_kv_manager(cls, use) -> None:
    """cls._init_kv_manager, then use(queue, kv_manager) for SGLang's common (mooncake / nixl / fake) managers."""
    def make(orig):
        def _init_kv_manager(self):
            kv_manager = orig(self)
            if _is_common_manager(kv_manager):
                use(self, kv_manager)
            return kv_manager
        return _init_kv_manager

    wrap_method(cls, "_init_kv_manager", make)


def install_prefill(mod) -> None:
    """sglang.srt.disaggregation.prefill: publish the pool's fingerprint once the KV manager registered."""
    _after_kv_manager(mod.PrefillBootstrapQueue,
                      lambda queue, mgr: publish_fingerprint(mgr, config_fingerprint(queue.token_to_kv_pool)))


def install_decode(mod) -> None:
    """sglang.srt.disaggregation.decode: the decode manager keeps its pool's fingerprint for the check."""
    def keep(queue, mgr):
        mgr._tq_fingerprint = config_fingerprint(queue.token_to_kv_pool)

    _after_kv_manager(mod.DecodePreallocQueue, keep)


def install_prebuilt(mod) -> None:
    """sglang.srt.disaggregation.decode_schedule_batch_mixin: transferred requests start their recent window
    at their transferred length (see the module docstring)."""
    def make(orig):
        def prepare_for_prebuilt(self):
            orig(self)
            pool = self.token_to_kv_pool_allocator.get_kvcache()
            if _is_tq_pool(pool):
                restart_window(pool, self.req_pool_indices, self.seq_lens)
                clear_first_rows(pool, self.req_to_token_pool.req_to_token, self.req_pool_indices)
        return prepare_for_prebuilt

    wrap_method(mod.ScheduleBatchDisaggregationDecodeMixin, "prepare_for_prebuilt", make)


def problems_server_args(arg) -> List[str]:
    """Start-up refusals for a disaggregated TurboQuant worker (`arg(name)`: a server argument)."""
    mode = arg("disaggregation_mode")
    if mode in (None, "null"):
        return []
    p = []
    backend = arg("disaggregation_transfer_backend")
    if backend not in SUPPORTED_TRANSFER_BACKENDS:
        p.append(f"PD disaggregation over --disaggregation-transfer-backend {backend} (supported: "
                 f"{', '.join(SUPPORTED_TRANSFER_BACKENDS)}; their per-tensor item lengths carry packed layers)")
    try:
        from sglang.srt.environ import envs

        staging = bool(envs.SGLANG_DISAGG_STAGING_BUFFER.get())
    except (ImportError, AttributeError):  # pragma: no cover - older SGLang without staging
        staging = False
    if staging:
        p.append("PD disaggregation with SGLANG_DISAGG_STAGING_BUFFER (the staging gather reads bf16 "
                 "k_buffer/v_buffer tensors; packed layers have none)")
    return p
