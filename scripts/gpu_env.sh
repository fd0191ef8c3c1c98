# Source on the GPU machine (repo root): puts tq_kernels and sglang_tq on the path and, if the
# offline SGLang bundle is in .gpu_bundle/, installs it into /tmp/site (once per machine).
mkdir -p /tmp/tqp && ln -sfn "$PWD/kernels" /tmp/tqp/tq_kernels
if [ -d .gpu_bundle ]; then bash .gpu_bundle/install.sh >/dev/null; fi
export PYTHONPATH=/tmp/tqp:$PWD:/tmp/site:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
# JIT caches under /tmp, kept between runs on the same machine: FlashInfer's prefill module takes ~100 s to
# build on a fresh H200, Triton's kernels a few seconds each
export FLASHINFER_WORKSPACE_BASE=${FLASHINFER_WORKSPACE_BASE:-/tmp/fi_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
