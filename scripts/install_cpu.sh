#!/usr/bin/env bash
# Installs sglang_tq, its CPU dependencies and the test tools into the *current* Python environment.
# Idempotent: a second run only re-links the editable install.
#
# torch is installed first and pinned: an unpinned torch (asked for by any later package) would pull
# a multi-GB CUDA build; torch==2.13.0 resolves to the CPU wheel on this project's machines. Every
# later install runs under a constraints file that holds torch and triton at these versions.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-$(command -v python || command -v python3)}
TORCH_VERSION=2.13.0
TRITON_VERSION=3.6.0

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
printf 'torch==%s\ntriton==%s\n' "$TORCH_VERSION" "$TRITON_VERSION" > "$CONSTRAINTS"

pip_install() { "$PYTHON" -m pip install --quiet --disable-pip-version-check "$@"; }

# --- core: torch (CPU), triton (its interpreter runs the kernel tests), the package ---
pip_install "torch==$TORCH_VERSION" "triton==$TRITON_VERSION"
pip_install -c "$CONSTRAINTS" -e ".[test]"
"$PYTHON" -c "import torch, triton, tq_kernels, sglang_tq; print('sglang_tq', sglang_tq.__version__, '| torch', torch.__version__, '| triton', triton.__version__)"

# --- SGLang (CPU, for integration tests) ---
# SGLang itself WITHOUT its dependency tree (that pins a CUDA torch, torchvision, sgl-kernel, flashinfer,
# ...), then only the pure-Python packages its modules import at module level. The constraints file keeps
# torch/triton where they are (compressed-tensors asks for torch). tests/sglang_cpu_shim.py (imported by
# tests/conftest.py) stubs torchvision and sgl_kernel, which have no CPU wheels. TQ_SKIP_SGLANG=1 skips
# this section; the SGLang tests then skip themselves.
SGLANG_VERSION=0.5.10.post1
if [ "${TQ_SKIP_SGLANG:-0}" != "1" ]; then
    pip_install -c "$CONSTRAINTS" --no-deps "sglang==$SGLANG_VERSION"
    pip_install -c "$CONSTRAINTS" \
        "transformers==5.3.0" "openai==2.6.1" tqdm pybase64 requests ipython pydantic aiohttp orjson \
        psutil packaging pillow starlette pyzmq partial_json_parser dill sentencepiece compressed-tensors \
        gguf einops msgspec
    "$PYTHON" -W ignore -c "
import sys; sys.path.insert(0, 'tests')
import sglang_cpu_shim
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend
from sglang.srt.model_executor.model_runner_kv_cache_mixin import ModelRunnerKVCacheMixin
import sglang, sglang_tq.backend
print('sglang', sglang.__version__, '(CPU, shimmed) imports OK')"
fi
