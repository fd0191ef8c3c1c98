"""Engine-agnostic TurboQuant codec and Triton kernels (installed as `tq_kernels`; no SGLang import).
Adapters use `tq_kernels.ops.for_device(device)`."""
from .codec import (  # noqa: F401
    ROLE_K, ROLE_QJL, ROLE_V, SUPPORTED_HEAD_DIMS, Quantized, Rotation, TQCodec, VecFormat,
    codebook, derive_seed, fwht, lloyd_max, make_rotation, pack_field, unpack_field,
)
