"""Engine-agnostic TurboQuant codec and Triton kernels (installed as `tq_kernels`; no SGLang import)."""
from .codec import (  # noqa: F401
    ROLE_K, ROLE_QJL, ROLE_V, SUPPORTED_HEAD_DIMS, Quantized, Rotation, TQCodec, VecFormat,
    codebook, derive_seed, fwht, lloyd_max, make_rotation, pack_field, unpack_field,
)
from .ops import (  # noqa: F401,E402
    DecodeWorkspace, choose_num_splits, compress_and_store, decode_attention, extend_attention,
)
