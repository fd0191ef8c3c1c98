#!/usr/bin/env bash
# NGRAM speculative decoding on one GPU (scripts/spec_check.py): BF16 (fa3) and turbo4, each with NGRAM off and
# on, on a repetitive-text workload (passages of the given texts quoted back), then the load test with NGRAM on.
# From the repo root, with the offline SGLang bundle carried as .gpu_bundle (scripts/gpu_env.sh):
#
#   bash scripts/gpu_speculative.sh MODEL_DIR TEXT_DIR [STAGES]
#
#   MODEL_DIR  a real checkpoint folder (SmolLM2-135M-Instruct)    TEXT_DIR  .txt files (e.g. the Austen novels)
#   STAGES     comma-separated: bf16, turbo4, load (default bf16,turbo4). Per-server results stay in
#              /tmp/work/spec on the warm machine, so the stages can run as separate commands (each < 9 min):
#                bash scripts/gpu_speculative.sh M T bf16;  ... M T turbo4;  ... M T load
#              The records are written once all four servers have results.
#
# Environment: PROMPTS [50], MAX_NEW [256], DRAFT_TOKENS [8], BF16_BACKEND [fa3], TQ_CONFIG [turbo4],
# DETERMINISTIC=1 (--enable-deterministic-inference on every server), COMMIT (where the checkout has no .git).
# Writes $OUT/speculative_records.json (results/speculative.json records), $OUT/spec.tgz (logs, per-server
# results) and prints the summary last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
MODEL=${1:?usage: gpu_speculative.sh MODEL_DIR TEXT_DIR [STAGES]}
TEXT=${2:?usage: gpu_speculative.sh MODEL_DIR TEXT_DIR [STAGES]}
STAGES=${3:-bf16,turbo4}
OUT=${OUT:-/tmp/out}
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
[ -n "$commit" ] || { echo "no git checkout here: set COMMIT to the checkout's commit"; exit 2; }
W=/tmp/work/spec
mkdir -p "$OUT" "$W"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader
# servers left by a cut-off command: this machine's GPU processes are all ours (never `pkill -f sglang`: the
# device runner's own path contains that word)
nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
timeout -s INT 560 python3 scripts/spec_check.py --model "$MODEL" --text "$TEXT" --stages "$STAGES" --work "$W" \
    --prompts "${PROMPTS:-50}" --max-new "${MAX_NEW:-256}" --draft-tokens "${DRAFT_TOKENS:-8}" \
    --bf16-backend "${BF16_BACKEND:-fa3}" --tq-config "${TQ_CONFIG:-turbo4}" --commit "$commit" \
    ${DETERMINISTIC:+--deterministic} > "$W/spec.log" 2>&1
echo "spec_check exit $?"
nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
cp "$W/speculative_records.json" "$OUT/" 2>/dev/null
tar czf "$OUT/spec.tgz" -C /tmp/work spec
grep -E "error|Error|not started|records:" "$W/spec.log" | cut -c1-400 | tail -12
sed -n '/===== speculative decoding/,$p' "$W/spec.log"
