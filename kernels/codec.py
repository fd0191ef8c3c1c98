"""TurboQuant codec: the one definition of rotation, codebooks, formats and the packed slot layout.

Everything that touches the compressed KV cache (the PyTorch reference below, the Triton kernels in
this package, the SGLang pool) takes its numbers from here, so a slot written by one is read
identically by the others.

Method (arXiv 2504.19874): a vector x (one token, one KV head) is stored as a scale plus codes of
u = R x / |x|, R a randomized Walsh-Hadamard rotation. After rotation every coordinate of u follows
the law of one coordinate of a uniform unit vector in R^d, density ~ (1 - t^2)^((d-3)/2), so one
fixed Lloyd-Max codebook per (d, bits) is near-optimal. PROD keys (arXiv 2406.03482) spend one of
their bits on QJL signs of the residual, which makes <q, k_hat> unbiased.

Layout of one token-head (see docs/LAYOUT.md for the table):
  codes  uint8[code_bytes]  = [main fields over all d coordinates][QJL signs][outlier refinement fields]
  scales fp16[n_scales]     = [norm scale] or [norm scale, QJL scale]
Each field packs fixed-width codes LSB-first inside bytes (coordinate i of a w-bit field sits in
byte i*w//8 at bit (i*w)%8); b-bit codes are split into power-of-two fields (6 -> [4, 2],
5 -> [4, 1], 4 -> [4], 3 -> [2, 1], 2 -> [2], 1 -> [1]), low bits first. Every field starts at a multiple of d/8 bytes, so fields are
16-byte aligned for d >= 128 and rows stay vector-loadable. Unpacking a field is a shift-and-mask
per field plus an interleave, the cheapest thing a GPU can do with bytes.

Coordinates are in *storage order*: the rotation matrix has the permutation from rotated
coordinate to storage position folded in, so kernels never permute. Outlier splits give the
storage positions j * (d / n_outlier) (every r-th position) more bits: all d coordinates carry the
low-bit fields and the outlier positions carry extra high bits, which index the high-bit codebook.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

CODEC_DIMS = (64, 128, 256)  # dimensions the rotation, codebooks and kernels work in (powers of two)
# Model head dims that are no power of two: vectors are zero-padded to the next codec dim before the
# rotation (the Walsh-Hadamard transform needs a power of two) and the codes cover all its coordinates,
# so d = 80 and 96 cost what d = 128 does (4-bit: 66 B per vector vs 160 / 192 B in bf16).
PADDED_HEAD_DIMS = {80: 128, 96: 128}
SUPPORTED_HEAD_DIMS = tuple(sorted(CODEC_DIMS + tuple(PADDED_HEAD_DIMS)))  # model head dims


def codec_dim(head_dim: int) -> int:
    """The codec dimension of a model head dim (itself, or the padded one)."""
    return PADDED_HEAD_DIMS.get(head_dim, head_dim)
MIN_BITS, MAX_BITS = 1, 6
SCALE_DTYPE = torch.float16
FP16_MAX = 65504.0

ROLE_K, ROLE_V, ROLE_QJL = 0, 1, 2


# --------------------------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------------------------
def field_widths(bits: int) -> Tuple[int, ...]:
    """Power-of-two field widths (low bits first) that together hold a `bits`-bit code."""
    return {1: (1,), 2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2)}[bits]


@dataclass(frozen=True)
class VecFormat:
    """How one K or V vector of one token-head is compressed.

    bits: total bits per coordinate of the non-outlier coordinates. For PROD keys (qjl=True) this
      includes the QJL bit: (bits - 1)-bit MSE codes + 1 sign bit per coordinate.
    outlier_channels / outlier_bits: that many coordinates (a power of two dividing d) get
      `outlier_bits` (> bits; counted like `bits`, i.e. including the QJL bit for PROD keys).
    norm_correction: store |x| / |c_hat| so the dequantized vector keeps the norm of x.
    head_dim: the codec dimension (a power of two: rotation, codes, kernels). model_head_dim: the model's
      head dim when it is padded up to head_dim (PADDED_HEAD_DIMS); 0 = the same as head_dim.
    """

    head_dim: int
    bits: int
    qjl: bool = False
    norm_correction: bool = True
    outlier_channels: int = 0
    outlier_bits: int = 0
    model_head_dim: int = 0

    @classmethod
    def for_model(cls, model_head_dim: int, bits: int, **kw) -> "VecFormat":
        """The format of a model head dim: padded to its codec dim where that differs."""
        d = codec_dim(model_head_dim)
        return cls(d, bits, model_head_dim=0 if d == model_head_dim else model_head_dim, **kw)

    @property
    def in_dim(self) -> int:
        """Coordinates of the vectors that go in and come out (the model's head dim)."""
        return self.model_head_dim or self.head_dim

    def __post_init__(self):
        d = self.head_dim
        if d not in CODEC_DIMS:
            raise ValueError(f"codec dim {d} not supported (supported: {CODEC_DIMS}; model head dims "
                             f"{tuple(PADDED_HEAD_DIMS)} are padded, VecFormat.for_model)")
        if self.model_head_dim and PADDED_HEAD_DIMS.get(self.model_head_dim) != d:
            raise ValueError(f"model_head_dim {self.model_head_dim} is not padded to {d} "
                             f"(padded head dims: {PADDED_HEAD_DIMS})")
        lo = self.mse_bits
        if not (MIN_BITS <= lo <= MAX_BITS):
            raise ValueError(f"MSE bits {lo} out of range [{MIN_BITS}, {MAX_BITS}] (bits={self.bits}, qjl={self.qjl})")
        if self.outlier_channels:
            n = self.outlier_channels
            if n < 8 or n >= d or d % n or (n & (n - 1)):
                raise ValueError(f"outlier_channels {n} must be a power of two in [8, {d // 2}] for head_dim {d}")
            if not (lo < self.outlier_mse_bits <= MAX_BITS):
                raise ValueError(f"outlier_bits {self.outlier_bits} must be in ({self.bits}, {MAX_BITS + (self.bits - lo)}]")
        elif self.outlier_bits:
            raise ValueError("outlier_bits given without outlier_channels")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def mse_bits(self) -> int:
        return self.bits - 1 if self.qjl else self.bits

    @property
    def outlier_mse_bits(self) -> int:
        return self.outlier_bits - 1 if self.qjl else self.outlier_bits

    @property
    def extra_bits(self) -> int:
        return self.outlier_mse_bits - self.mse_bits if self.outlier_channels else 0

    @property
    def outlier_stride(self) -> int:
        return self.head_dim // self.outlier_channels if self.outlier_channels else 0

    @property
    def qjl_dim(self) -> int:
        return self.head_dim if self.qjl else 0

    @property
    def fields(self) -> Tuple[Tuple[str, int, int, int, int], ...]:
        """(kind, width, n_coords, byte_offset, bit_shift) for every field, in byte order.

        kind: 'main' (all d coordinates), 'extra' (outlier positions), 'qjl' (sign bits).
        bit_shift: where the field's bits sit in the assembled code.
        """
        d, out, off = self.head_dim, [], 0
        shift = 0
        for w in field_widths(self.mse_bits):
            out.append(("main", w, d, off, shift))
            off += d * w // 8
            shift += w
        if self.qjl:
            out.append(("qjl", 1, d, off, 0))
            off += d // 8
        if self.outlier_channels:
            n = self.outlier_channels
            for w in field_widths(self.extra_bits):
                out.append(("extra", w, n, off, shift))
                off += n * w // 8
                shift += w
        return tuple(out)

    @property
    def code_bytes(self) -> int:
        return sum(n * w // 8 for _, w, n, _, _ in self.fields)

    @property
    def n_scales(self) -> int:
        return 2 if self.qjl else 1

    @property
    def slot_bytes(self) -> int:
        """Bytes of one token-head: codes plus fp16 scales."""
        return self.code_bytes + self.n_scales * SCALE_DTYPE.itemsize

    @property
    def avg_bits(self) -> float:
        return 8.0 * self.code_bytes / self.head_dim

    def describe(self) -> str:
        s = f"{'PROD' if self.qjl else 'MSE'}{self.bits}"
        if self.outlier_channels:
            s += f"+{self.outlier_channels}ch@{self.outlier_bits}"
        if self.norm_correction:
            s += "/nc"
        if self.model_head_dim:
            s += f"/pad{self.model_head_dim}->{self.head_dim}"
        return s


BF16_BYTES_PER_HEAD = lambda head_dim: 2 * head_dim  # noqa: E731  (one K or V vector in bf16)
FP8_BYTES_PER_HEAD = lambda head_dim: head_dim  # noqa: E731  (one K or V vector in fp8 e4m3, no stored scale)


# --------------------------------------------------------------------------------------------
# fp8 layers (per-layer `format: fp8`)
# --------------------------------------------------------------------------------------------
# Layout of SGLang's own fp8 KV cache, so its Triton decode/extend kernels read such a layer directly:
# e4m3 values of x / scale, one per-tensor scale per layer and role (the checkpoint's k_scale / v_scale,
# 1.0 without one), stored as uint8 rows (index_put is not implemented for float8) and read as a
# float8_e4m3fn view. Values past the e4m3 range saturate instead of turning into NaN.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def fp8_encode(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """x [..., d] -> uint8 [..., d]: the e4m3 bits of x / scale, saturated at +-448."""
    y = x.to(torch.float32) if scale == 1.0 else x.to(torch.float32) / scale
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)


def fp8_decode(data: torch.Tensor, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or float8_e4m3fn) [..., d] -> x_hat [..., d] in `dtype`: e4m3 value x scale."""
    y = data.view(FP8_DTYPE).to(torch.float32)
    return (y if scale == 1.0 else y * scale).to(dtype)


def padded_launch(fn):
    """Decorator of an attention launch fn(q, ..., kcodec, vcodec, ..., out, ...) that works at the codec
    dims: for padded formats (head_dim 80 / 96) it zero-pads q, k_new / v_new, k_mean, an extend window's
    k_old / v_old and new_part's output to the codec dims, and slices the output back to the model's head
    dim (into `out` when given). q_rotated, workspaces and rings are at the codec dims already."""
    import inspect

    sig = inspect.signature(fn)
    at_k, at_v = list(sig.parameters).index("kcodec"), list(sig.parameters).index("vcodec")

    @functools.wraps(fn)
    def launch(*args, **kwargs):
        kc = args[at_k] if len(args) > at_k else kwargs["kcodec"]
        vc = args[at_v] if len(args) > at_v else kwargs["vcodec"]
        if not (kc.fmt.model_head_dim or vc.fmt.model_head_dim):  # the common case: no binding cost
            return fn(*args, **kwargs)
        bound = sig.bind(*args, **kwargs)
        p = bound.arguments
        n = p["q"].shape[0]
        kp = lambda x: kc.pad(x.reshape(n, -1, kc.fmt.in_dim))  # noqa: E731
        vp = lambda x: vc.pad(x.reshape(n, -1, vc.fmt.in_dim))  # noqa: E731
        p["q"] = kp(p["q"])
        for name, pad in (("k_new", kp), ("v_new", vp)):
            if name in p:
                p[name] = pad(p[name])
        if p.get("k_mean") is not None:
            p["k_mean"] = kc.pad(p["k_mean"].to(torch.float32))
        window = p.get("window")
        if window is not None and hasattr(window, "k_old"):  # extend's evaluation window (model dims)
            p["window"] = window._replace(k_old=kp(window.k_old), v_old=vp(window.v_old))
        if p.get("new_part") is not None:
            p["new_part"] = (vp(p["new_part"][0]), p["new_part"][1])
        out, p["out"] = p.get("out"), None
        o = vc.unpad(fn(*bound.args, **bound.kwargs))
        if out is None:
            return o.contiguous()
        out.view(o.shape).copy_(o)
        return out

    return launch


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------
def derive_seed(base_seed: int, layer_id: int, role: int) -> int:
    """Seed scheme: one independent stream per (layer, role); role 0 = K rotation, 1 = V rotation,
    2 = QJL projection. Documented so that any reader can rebuild the matrices of a stored cache."""
    return (int(base_seed) * 1_000_003 + int(layer_id) * 7_919 + int(role) * 104_729) % (2**63 - 1)


def random_signs(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (d,), generator=g) * 2 - 1).to(torch.float32)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (butterfly, O(d log d)).
    Symmetric and self-inverse."""
    d = x.shape[-1]
    assert d & (d - 1) == 0, "power-of-two length required"
    shape = x.shape
    y = x.reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(d)).to(x.dtype)


@dataclass
class Rotation:
    """u = P H D x / sqrt(d): D = diag(random signs), H the Walsh-Hadamard matrix, P the
    rotated-coordinate -> storage-position permutation (identity unless calibration chose outliers).
    `perm[j]` is the rotated coordinate stored at position j."""

    signs: torch.Tensor  # [d] float32 of +-1
    perm: Optional[torch.Tensor] = None  # [d] int64

    @property
    def dim(self) -> int:
        return self.signs.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = fwht(x * self.signs.to(x.device, x.dtype))
        return u if self.perm is None else u[..., self.perm.to(u.device)]

    def inverse(self, u: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            y = torch.empty_like(u)
            y[..., self.perm.to(u.device)] = u
            u = y
        return fwht(u) * self.signs.to(u.device, u.dtype)

    def matrix(self) -> torch.Tensor:
        """Dense M (float32 [d, d]) with u = M x; kernels use it (and M^T) as tensor-core matmuls."""
        return self.forward(torch.eye(self.dim, dtype=torch.float64)).T.to(torch.float32).contiguous()


def make_rotation(d: int, seed: int, outlier_positions_channels: Optional[Sequence[int]] = None,
                  outlier_stride: int = 0) -> Rotation:
    """Rotation for one (layer, role). If calibration picked rotated channels as outliers, the
    permutation moves them to the outlier storage positions j * outlier_stride."""
    signs = random_signs(d, seed)
    if not outlier_positions_channels:
        return Rotation(signs)
    chosen = [int(c) for c in outlier_positions_channels]
    if len(set(chosen)) != len(chosen) or any(not 0 <= c < d for c in chosen):
        raise ValueError(f"outlier channel list must hold distinct indices in [0, {d})")
    if outlier_stride * len(chosen) != d:
        raise ValueError(f"{len(chosen)} outlier channels do not match stride {outlier_stride} for d={d}")
    rest = iter(c for c in range(d) if c not in set(chosen))
    perm = [chosen[j // outlier_stride] if j % outlier_stride == 0 else next(rest) for j in range(d)]
    return Rotation(signs, torch.tensor(perm, dtype=torch.int64))


# --------------------------------------------------------------------------------------------
# Lloyd-Max codebooks for one coordinate of a uniform unit vector in R^d
# --------------------------------------------------------------------------------------------
def _coord_cdf(t: np.ndarray, d: int) -> np.ndarray:
    from scipy.special import betainc

    t = np.clip(t, -1.0, 1.0)
    return 0.5 + 0.5 * np.sign(t) * betainc(0.5, (d - 1) / 2.0, t * t)


def _coord_partial_mean(t: np.ndarray, d: int) -> np.ndarray:
    """Integral of s * f(s) ds from -1 to t, f the normalized coordinate density."""
    from scipy.special import betaln

    t = np.clip(t, -1.0, 1.0)
    a = (d - 1) / 2.0  # f(s) = (1 - s^2)^(a - 1) / B(1/2, a)
    return -np.power(1.0 - t * t, a) / (2.0 * a) / np.exp(betaln(0.5, a))


@functools.lru_cache(maxsize=None)
def lloyd_max(d: int, bits: int) -> Tuple[np.ndarray, np.ndarray, float]:
    """Optimal scalar quantizer for density ~ (1 - t^2)^((d-3)/2) on [-1, 1].

    Returns (centroids [2^b] ascending, boundaries [2^b - 1], per-coordinate MSE), float64.
    Closed-form interval masses and means (regularized incomplete beta), iterated to a fixed point.
    """
    from scipy.stats import norm as gauss

    n = 1 << bits
    c = gauss.ppf((np.arange(n) + 0.5) / n) / math.sqrt(d)  # Gaussian N(0, 1/d) start
    for _ in range(10_000):
        b = (c[1:] + c[:-1]) / 2.0
        edges = np.concatenate(([-1.0], b, [1.0]))
        mass = np.diff(_coord_cdf(edges, d))
        mean = np.diff(_coord_partial_mean(edges, d))
        new = mean / mass
        if np.max(np.abs(new - c)) < 1e-15:
            c = new
            break
        c = new
    b = (c[1:] + c[:-1]) / 2.0
    edges = np.concatenate(([-1.0], b, [1.0]))
    # E[t^2] over each interval: use E[t^2] = 1/d overall minus cross terms computed numerically
    grid = np.linspace(-1, 1, 400_001)
    from scipy.special import betaln

    a = (d - 1) / 2.0
    dens = np.power(np.clip(1 - grid * grid, 0, None), a - 1) / np.exp(betaln(0.5, a))
    idx = np.searchsorted(b, grid)
    err = (grid - c[idx]) ** 2 * dens
    mse = float(np.trapezoid(err, grid)) if hasattr(np, "trapezoid") else float(np.trapz(err, grid))
    return c.astype(np.float64), b.astype(np.float64), mse


def codebook(d: int, bits: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    c, b, _ = lloyd_max(d, bits)
    return (torch.tensor(c, dtype=torch.float32, device=device),
            torch.tensor(b, dtype=torch.float32, device=device))


# --------------------------------------------------------------------------------------------
# Bit packing (LSB-first fields)
# --------------------------------------------------------------------------------------------
def pack_field(values: torch.Tensor, width: int) -> torch.Tensor:
    """values [..., n] (ints < 2^width) -> uint8 [..., n * width / 8], LSB-first."""
    per = 8 // width
    n = values.shape[-1]
    v = values.to(torch.int32).reshape(*values.shape[:-1], n // per, per)
    shifts = torch.arange(per, device=values.device, dtype=torch.int32) * width
    return (v << shifts).sum(-1).to(torch.uint8)


def unpack_field(data: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """uint8 [..., n * width / 8] -> int64 [..., n]."""
    per = 8 // width
    shifts = torch.arange(per, device=data.device, dtype=torch.int32) * width
    v = (data.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << width) - 1)
    return v.reshape(*data.shape[:-1], n).to(torch.int64)


# --------------------------------------------------------------------------------------------
# The codec of one (layer, role)
# --------------------------------------------------------------------------------------------
@dataclass
class Quantized:
    """Unpacked codes: indices [..., d] in storage order (outlier positions hold outlier-bit codes),
    signs [..., d] of +-1 (PROD only), scales [..., n_scales] float32."""

    indices: torch.Tensor
    scales: torch.Tensor
    signs: Optional[torch.Tensor] = None


@dataclass
class TQCodec:
    """Reference quantizer for one K or V format of one layer (pure PyTorch; CPU or GPU)."""

    fmt: VecFormat
    rotation: Rotation
    qjl_matrix: Optional[torch.Tensor] = None  # [m, d] float32 Gaussian N(0, 1), rotated domain
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, fmt: VecFormat, base_seed: int = 0, layer_id: int = 0, role: int = ROLE_K,
              outlier_channel_list: Optional[Sequence[int]] = None) -> "TQCodec":
        d = fmt.head_dim
        rot = make_rotation(d, derive_seed(base_seed, layer_id, role), outlier_channel_list, fmt.outlier_stride)
        s = None
        if fmt.qjl:
            g = torch.Generator().manual_seed(derive_seed(base_seed, layer_id, ROLE_QJL))
            s = torch.randn(fmt.qjl_dim, d, generator=g, dtype=torch.float32)
        return cls(fmt, rot, s)

    # --- tables ---------------------------------------------------------------------------
    def outlier_mask(self, device=None) -> torch.Tensor:
        d, r = self.fmt.head_dim, self.fmt.outlier_stride
        pos = torch.arange(d, device=device)
        return (pos % r == 0) if r else torch.zeros(d, dtype=torch.bool, device=device)

    def centroid_table(self, device=None) -> torch.Tensor:
        """float32 [2^lo + 2^hi]: low-bit codebook, then the outlier codebook (if any). A code c at
        an outlier position reads entry 2^lo + c; elsewhere entry c."""
        c_lo, _ = codebook(self.fmt.head_dim, self.fmt.mse_bits, device)
        if not self.fmt.outlier_channels:
            return c_lo
        c_hi, _ = codebook(self.fmt.head_dim, self.fmt.outlier_mse_bits, device)
        return torch.cat([c_lo, c_hi])

    def _centroids(self, idx: torch.Tensor) -> torch.Tensor:
        table = self.centroid_table(idx.device)
        if self.fmt.outlier_channels:
            idx = idx + self.outlier_mask(idx.device).to(idx.dtype) * (1 << self.fmt.mse_bits)
        return table[idx]

    # --- quantize / dequantize --------------------------------------------------------------
    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_dim] -> [..., head_dim]: zero-padded for a padded format (no copy otherwise)."""
        extra = self.fmt.head_dim - x.shape[-1]
        if extra == 0:
            return x
        assert x.shape[-1] == self.fmt.in_dim, (tuple(x.shape), self.fmt)
        return torch.nn.functional.pad(x, (0, extra))

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] -> [..., in_dim] (a view)."""
        return x[..., :self.fmt.in_dim]

    def quantize(self, x: torch.Tensor) -> Quantized:
        """x [..., in_dim] (or already padded [..., head_dim])."""
        fmt = self.fmt
        x = self.pad(x.to(torch.float32))
        norm = x.norm(dim=-1, keepdim=True)
        u = self.rotation.forward(x / norm.clamp_min(1e-30))
        _, b_lo = codebook(fmt.head_dim, fmt.mse_bits, x.device)
        idx = torch.searchsorted(b_lo, u.contiguous(), right=False)  # = #(boundaries < u)
        if fmt.outlier_channels:
            _, b_hi = codebook(fmt.head_dim, fmt.outlier_mse_bits, x.device)
            idx_hi = torch.searchsorted(b_hi, u.contiguous(), right=False)
            idx = torch.where(self.outlier_mask(x.device), idx_hi, idx)
        c = self._centroids(idx)
        a = 1.0 / c.norm(dim=-1, keepdim=True).clamp_min(1e-30) if fmt.norm_correction else torch.ones_like(norm)
        scales = [norm * a]
        signs = None
        if fmt.qjl:
            r = u - a * c
            proj = r @ self.qjl_matrix.to(x.device).T
            signs = torch.where(proj >= 0, 1.0, -1.0)
            scales.append(norm * r.norm(dim=-1, keepdim=True) * math.sqrt(math.pi / 2) / fmt.qjl_dim)
        scales = torch.cat(scales, dim=-1).clamp(max=FP16_MAX)
        return Quantized(idx, scales, signs)

    def dequantize_rotated(self, q: Quantized) -> torch.Tensor:
        """x_hat in the rotated (storage-order) domain: scale * c[idx] (+ QJL residual estimate)."""
        y = q.scales[..., :1] * self._centroids(q.indices)
        if self.fmt.qjl:
            y = y + q.scales[..., 1:2] * (q.signs @ self.qjl_matrix.to(q.signs.device))
        return y

    def dequantize(self, q: Quantized) -> torch.Tensor:
        """-> x_hat [..., in_dim] (the padding coordinates are dropped)."""
        return self.unpad(self.rotation.inverse(self.dequantize_rotated(q)))

    def inner_product(self, query: torch.Tensor, q: Quantized) -> torch.Tensor:
        """<query, x_hat> the way the kernels score: from codes, with the query rotated once.
        query [..., d] broadcast against the quantized vectors [..., d]."""
        qr = self.rotation.forward(self.pad(query.to(torch.float32)))
        s = q.scales[..., 0] * (qr * self._centroids(q.indices)).sum(-1)
        if self.fmt.qjl:
            sketch = qr @ self.qjl_matrix.to(qr.device).T
            s = s + q.scales[..., 1] * (sketch * q.signs).sum(-1)
        return s

    # --- packing ---------------------------------------------------------------------------
    def pack(self, q: Quantized) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (codes uint8 [..., code_bytes], scales fp16 [..., n_scales])."""
        fmt = self.fmt
        parts = []
        lo_mask = (1 << fmt.mse_bits) - 1
        out_pos = self.outlier_mask(q.indices.device)
        for kind, w, n, _, shift in fmt.fields:
            if kind == "main":
                v = (q.indices & lo_mask) >> shift
            elif kind == "extra":
                v = q.indices[..., out_pos] >> shift
            else:
                v = (q.signs > 0).to(torch.int64)
            parts.append(pack_field(v & ((1 << w) - 1), w))
        return torch.cat(parts, dim=-1), q.scales.to(SCALE_DTYPE)

    def unpack(self, codes: torch.Tensor, scales: torch.Tensor) -> Quantized:
        fmt = self.fmt
        idx = torch.zeros(*codes.shape[:-1], fmt.head_dim, dtype=torch.int64, device=codes.device)
        out_pos = self.outlier_mask(codes.device)
        signs = None
        for kind, w, n, off, shift in fmt.fields:
            v = unpack_field(codes[..., off:off + n * w // 8], w, n)
            if kind == "main":
                idx |= v << shift
            elif kind == "extra":
                idx[..., out_pos] |= v << shift
            else:
                signs = v.to(torch.float32) * 2 - 1
        return Quantized(idx, scales.to(torch.float32), signs)

    def encode(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.pack(self.quantize(x))

    def decode(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.dequantize(self.unpack(codes, scales))

    def decode_rotated(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        return self.dequantize_rotated(self.unpack(codes, scales))

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """x in the codes' rotated (storage-order) domain, unnormalized: M x (the recent window's ring)."""
        return self.rotation.forward(self.pad(x.to(torch.float32)))

    def unrotate(self, u: torch.Tensor) -> torch.Tensor:
        """-> [..., in_dim]."""
        return self.unpad(self.rotation.inverse(u.to(torch.float32)))

    # --- what the kernels need on the device -----------------------------------------------
    def device_tables(self, device) -> dict:
        """Cached device tensors: rotation matrix M (u = M x), centroid table, boundaries (low
        codebook, then outlier codebook) and the QJL projection (rotated domain)."""
        key = str(device)
        if key not in self._cache:
            fmt = self.fmt
            _, b_lo = codebook(fmt.head_dim, fmt.mse_bits, device)
            b = b_lo
            if fmt.outlier_channels:
                _, b_hi = codebook(fmt.head_dim, fmt.outlier_mse_bits, device)
                b = torch.cat([b_lo, b_hi])
            self._cache[key] = dict(
                rotation=self.rotation.matrix().to(device),
                centroids=self.centroid_table(device).contiguous(),
                boundaries=b.contiguous(),
                qjl=None if self.qjl_matrix is None else self.qjl_matrix.to(device).contiguous(),
            )
        return self._cache[key]
