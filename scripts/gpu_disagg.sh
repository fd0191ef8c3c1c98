#!/usr/bin/env bash
# Prefill/decode disaggregation with TurboQuant on a GPU machine (repo root; carry .gpu_bundle, .gpu_model,
# .gpu_data as for scripts/gpu_check.sh). Needs SGLang's router (sglang-router) and a KV transfer backend
# (NIXL by default: the nixl package; Mooncake needs RDMA devices) installed next to SGLang; without them
# it prints `blocked: ...` and exits 3.
#
#   bash scripts/gpu_disagg.sh          # both workers on GPU 0
#   GPUS=2 bash scripts/gpu_disagg.sh   # prefill on GPU 0, decode on GPU 1
#
# SmolLM2-135M-Instruct (and Qwen2.5-Coder-1.5B-Instruct when /tmp/models has it), turbo4 and turbo4
# without its recent window: greedy tokens of 50 prompts through prefill worker + decode worker + router
# against one turbo4 server, and bytes per token transferred against the config's. Records in
# $OUT/distributed.json (results/distributed.json format), logs of every server in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
SMOL=/tmp/models/SmolLM2-135M-Instruct
if [ ! -f "$SMOL/config.json" ] && [ -d .gpu_model/a ]; then  # as scripts/gpu_session.sh upload-a/upload-b
    mkdir -p /tmp/models && cp .gpu_model/a/* /tmp/models/ && bash .gpu_model/b/assemble.sh
fi
MODELS=$SMOL
[ -f /tmp/models/Qwen2.5-Coder-1.5B-Instruct/config.json ] && MODELS=$MODELS,/tmp/models/Qwen2.5-Coder-1.5B-Instruct
timeout 3000 python3 scripts/disagg_check.py --models "$MODELS" --gpus "${GPUS:-1}" --backend "${BACKEND:-nixl}" \
    --out "$OUT"
echo "disagg_check exit $?"
