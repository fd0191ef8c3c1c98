#!/usr/bin/env bash
# Gemma-3-270M (real weights) served with BF16 KV and `turbo4` on one GPU (repo root). Beforehand, here:
#   bash ../shared/models/fetch_gguf.sh gemma3-270m .gpu_models/gemma3-270m 60   (5 chunks + tools/)
#   bash scripts/prepare_gpu_assets.sh                                             (.gpu_bundle, .gpu_data)
# Then on one warm machine, back to back (its /tmp holds the partial GGUF only while warm):
#   for NN in 00 01 02 03 04:  carry [.gpu_models/gemma3-270m/NN]  command: bash .gpu_models/gemma3-270m/NN/put.sh
#   carry [.gpu_models/gemma3-270m/tools, .gpu_bundle, .gpu_data]  command: bash scripts/gpu_gemma3.sh
# (.gpu_bundle may stay behind when SGLang is already in /tmp/site from an earlier command on that machine.)
#
# This command (< 9 minutes): checks and assembles the GGUF (tools/assemble.sh), converts it with
# scripts/gguf_gemma3_to_hf.py into /tmp/models/gemma3-270m (skipped when already there), and runs
# scripts/gpu_gemma3.py: BF16 (triton) and turbo4 servers, perplexity, greedy agreement, CUDA graphs on/off,
# capacity. Records in $OUT/models.json (results/models.json format), details and server logs in $OUT.
# SGLang 0.5.10 gives Gemma 3 one pool for all layers (its hybrid SWA memory is for gpt-oss, Llama 4, MiMo);
# EXTRA_ARGS adds launch_server flags to every server.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-/tmp/out}
DEST=${DEST:-.gpu_models/gemma3-270m}
GGUF=/tmp/models/gemma3-270m.gguf
HF=/tmp/models/gemma3-270m
mkdir -p "$OUT"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
[ -d .gpu_data ] || { echo "blocked: no .gpu_data (scripts/prepare_gpu_assets.sh)"; exit 3; }
python3 -c "import sglang" 2>/dev/null || { echo "blocked: SGLang is not importable (carry .gpu_bundle)"; exit 3; }
if [ ! -f "$HF/config.json" ]; then
    if [ ! -f "$GGUF" ]; then
        [ -f "$DEST/tools/assemble.sh" ] || { echo "blocked: no $DEST/tools (carry it)"; exit 3; }
        bash "$DEST/tools/assemble.sh" || exit 3  # checks the sha256, leaves $GGUF and the gguf package in /tmp/gguf-site
    fi
    [ -d /tmp/gguf-site/gguf ] || python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-site "$DEST"/tools/gguf-*.whl
    t0=$(date +%s)
    PYTHONPATH=/tmp/gguf-site:$PYTHONPATH python3 scripts/gguf_gemma3_to_hf.py "$GGUF" "$HF" || exit 3
    echo "converted in $(( $(date +%s) - t0 )) s"
fi
timeout 470 python3 scripts/gpu_gemma3.py --model "$HF" --text .gpu_data --out "$OUT" --budget-s "${BUDGET_S:-360}" \
    --extra-args "${EXTRA_ARGS:-}"
echo "gpu_gemma3 exit $?"
