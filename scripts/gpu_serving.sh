#!/usr/bin/env bash
# The serving benchmark on a GPU machine: scripts/bench_serving.py on one card (GPU 0, or the first of
# CUDA_VISIBLE_DEVICES), its servers one after another. From the repo root, with the offline SGLang bundle
# carried as .gpu_bundle (scripts/gpu_env.sh installs it into /tmp/site and puts it on PYTHONPATH):
#
#   bash scripts/gpu_serving.sh smoke                      every workload at small sizes, turbo4 and BF16 fa3
#   bash scripts/gpu_serving.sh WORKLOAD [CONFIGS] [FIRST_REP]
#        WORKLOAD: a | b | c | d | sweep at full size (scripts/bench_serving.py's defaults); CONFIGS: comma-
#        separated (default: all of bench_serving's); FIRST_REP: the number of this command's first
#        repetition (default 1). A workload whose configs do not fit one command runs as several commands on
#        the same warm machine: the same card, date and commit make them one run, and
#        `bench_serving.py --merge results/serving.json --from ...` joins their repetitions. E.g.
#          b turbo4,bf16_fa3            then   b fp8_fa3,fp8_flashinfer     then   b bf16_flashinfer,bf16_triton
#          b turbo4,bf16_fa3,fp8_fa3 2  (second repetitions of turbo4, BF16 fa3 and the faster FP8)
#
# Environment (sizes only): REPS (repetitions per command of turbo4, BF16 fa3 and the fastest FP8; default
# 1), BUDGET_S (no server is started later than this many seconds, less 150, after the start; default 420), MODEL (a real checkpoint folder,
# e.g. Qwen2.5-Coder-1.5B, instead of the dummy-weight Llama-3-8B shape), COMMIT (recorded commit where the
# checkout has no .git).
# Writes $OUT/<step>/ (records, progress, plot) packed as $OUT/<step>.tgz, $OUT/<step>_records.json, and prints
# the summary table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEP=${1:?usage: gpu_serving.sh smoke | a | b | c | d | sweep [CONFIGS] [FIRST_REP]}
CONFIGS=${2:-}
FIRST_REP=${3:-1}
OUT=${OUT:-/tmp/out}
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
[ -n "$commit" ] || { echo "no git checkout here: set COMMIT to the checkout's commit"; exit 2; }
W=/tmp/work/serving_$STEP
rm -rf "$W"; mkdir -p "$OUT" "$W"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=index,name,uuid --format=csv,noheader
# servers left by a cut-off command: this machine's GPU processes are all ours. Never `pkill -f sglang`:
# the device runner's own path contains that word.
nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
args=(--out "$W" --reps "${REPS:-1}" --first-rep "$FIRST_REP" --budget-s "${BUDGET_S:-420}" --min-config-s 150
      --commit "$commit" ${MODEL:+--model "$MODEL"})
case "$STEP" in
smoke)
    args+=(--workloads a,b,c,d,sweep --configs "${CONFIGS:-turbo4,bf16_fa3}"
           --a 4096:64:8 --a-requests 8 --b 1024:1024:64 --b-warmup-s 10 --b-window-s 10
           --c 4096:2:8:64:32 --d 512:64:4 --d-requests 8 --sweep-clients 16,64 --sweep-warmup-s 5
           --sweep-window-s 5 --cuda-graph-max-bs 64 --max-load-s 60 --min-config-s 60) ;;
a|b|c|d|sweep)
    args+=(--workloads "$STEP" ${CONFIGS:+--configs "$CONFIGS"}) ;;
*)
    echo "unknown step $STEP (smoke | a | b | c | d | sweep)"; exit 2 ;;
esac
timeout -s INT 540 python3 scripts/bench_serving.py "${args[@]}" > "$W/bench.log" 2>&1
echo "bench_serving exit $?"
nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
cp "$W/serving_records.json" "$OUT/${STEP}_records.json" 2>/dev/null
[ -f "$W/sweep.png" ] && cp "$W/sweep.png" "$OUT/${STEP}_sweep.png"
tar czf "$OUT/$STEP.tgz" -C /tmp/work "serving_$STEP"
grep -E "skipped|stopped|error" "$W/progress.log" | cut -c1-300 | tail -12
sed -n '/===== serving benchmark/,$p' "$W/bench.log"
