#!/usr/bin/env bash
# Hybrid model shapes served on one GPU (repo root; carry .gpu_bundle and .gpu_tok, SmolLM2's tokenizer from
# scripts/prepare_gpu_assets.sh). One command under 9 minutes:
#
#   bash scripts/gpu_models.sh                      # gpt-oss and Qwen3-Next shapes
#   SHAPES=qwen3-next bash scripts/gpu_models.sh    # one of them
#
# Builds the config-only model folders (scripts/make_model_configs.py, --load-format dummy) and runs
# scripts/gpu_models.py: BF16 vs turbo4 servers, CUDA graphs on vs off, capacity against the config's byte
# ratio, teacher-forced logprobs against BF16; gpt-oss also with --disable-hybrid-swa-memory. Records in
# $OUT/models.json (results/models.json format: merge by hand, then python scripts/make_tables.py), server
# logs in $OUT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -f .gpu_tok/tokenizer.json ] || { echo "blocked: no .gpu_tok/tokenizer.json (scripts/prepare_gpu_assets.sh)"; exit 3; }
timeout 560 python3 scripts/gpu_models.py --out "$OUT" --shapes "${SHAPES:-gpt-oss,qwen3-next}" --tokenizer .gpu_tok \
    --budget-s "${BUDGET_S:-470}"
echo "gpu_models exit $?"
