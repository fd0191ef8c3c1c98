#!/usr/bin/env bash
# Real-model quality of every KV format on one GPU, one server after another (scripts/eval_quality.py):
#
#   OUT=/tmp/out bash scripts/gpu_quality.sh MODEL_DIR [smoke|full]
#
# Decode-path server per config (what users receive: answers generated over the compressed cache):
#   needle (passkey) retrieval, ASDiv through /v1/chat/completions, greedy agreement with the BF16 run.
# Perplexity servers per TurboQuant config, with `evaluation: {prefill_from_cache: true}` so every scored
#   token reads the compressed cache: with the preset's recent window and with `window: {tokens: 0}`.
# Records (a JSON list each) go to $OUT/records/; `eval_quality.py merge` writes $OUT/quality.json with
# bf16_mean from the BF16 (flashinfer) server; logs to $OUT/logs/. Every server is bounded by SERVER_LIMIT_S
# and killed (its process group) before the next starts.
#
# Environment (defaults in brackets):
#   CONFIGS      [bf16_flashinfer,bf16_fa3,fp8,turbo4,turbo3,k4v2,turbo3.5,turbo2,turbo4_nocenter,turbo4_calibrated]
#                bf16_* / fp8: SGLang's own backends; turboN...: presets (their default key centering);
#                X_nocenter: preset X without key centering; X_calibrated: preset X centered with $KEY_MEANS
#   KEY_MEANS    key-means file for *_calibrated (scripts/calibrate.py --key-means-out); skipped when unset
#   AUSTEN [.gpu_data/austen]   ASDIV [.gpu_data/asdiv/test.jsonl]   PORT [30000]
#   SERVER_LIMIT_S [540 smoke, 1800 full]   EXTRA_ARGS: more launch_server flags
# Sizes (smoke | full): needle lengths 4096,8192 x 5 depths x 1 trial | 4K,8K,16K,32K x 5 x 10 (200);
#   ASDiv 30 | 600 problems; greedy 8 x 64 | 100 prompts x 256 tokens; perplexity 3 x 512 | 6 x 2048-token
#   spans of the Austen texts. Override with NEEDLE_LENGTHS, NEEDLE_TRIALS, ASDIV_LIMIT, GREEDY_PROMPTS,
#   GREEDY_TOKENS, PPL_SPANS, PPL_SPAN_TOKENS.
set -uo pipefail
MODEL=${1:?usage: gpu_quality.sh MODEL_DIR [smoke|full]}
SIZE=${2:-smoke}
OUT=${OUT:-/tmp/out}
PORT=${PORT:-30000}
URL=http://127.0.0.1:$PORT
AUSTEN=${AUSTEN:-.gpu_data/austen}
ASDIV=${ASDIV:-.gpu_data/asdiv/test.jsonl}
CONFIGS=${CONFIGS:-bf16_flashinfer,bf16_fa3,fp8,turbo4,turbo3,k4v2,turbo3.5,turbo2,turbo4_nocenter,turbo4_calibrated}
case "$SIZE" in
smoke) : "${NEEDLE_LENGTHS:=4096,8192}" "${NEEDLE_TRIALS:=1}" "${ASDIV_LIMIT:=30}" "${GREEDY_PROMPTS:=8}" \
         "${GREEDY_TOKENS:=64}" "${PPL_SPANS:=3}" "${PPL_SPAN_TOKENS:=512}" "${SERVER_LIMIT_S:=540}" ;;
full)  : "${NEEDLE_LENGTHS:=4096,8192,16384,32768}" "${NEEDLE_TRIALS:=10}" "${ASDIV_LIMIT:=600}" \
         "${GREEDY_PROMPTS:=100}" "${GREEDY_TOKENS:=256}" "${PPL_SPANS:=6}" "${PPL_SPAN_TOKENS:=2048}" \
         "${SERVER_LIMIT_S:=1800}" ;;
*) echo "gpu_quality.sh: size must be smoke or full, got '$SIZE'" >&2; exit 2 ;;
esac
[ -d "$MODEL" ] || { echo "gpu_quality.sh: no model folder $MODEL" >&2; exit 2; }
[ -d "$AUSTEN" ] || { echo "gpu_quality.sh: no Austen texts at $AUSTEN (set AUSTEN)" >&2; exit 2; }
[ -f "$ASDIV" ] || { echo "gpu_quality.sh: no ASDiv file at $ASDIV (set ASDIV)" >&2; exit 2; }
mkdir -p "$OUT/records" "$OUT/logs" "$OUT/configs"
source scripts/gpu_env.sh
NAME=$(basename "$MODEL")
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
EV="python3 scripts/eval_quality.py"
SERVER_PID=""

stop_server() {  # the server's whole process group (launch_server's scheduler and detokenizer children)
    if [ -n "$SERVER_PID" ]; then
        kill -TERM -- "-$SERVER_PID" 2>/dev/null; sleep 5; kill -KILL -- "-$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
    fi
}
trap stop_server EXIT

start_server() {  # start_server NAME MODULE ARGS...: up and healthy within 600 s, else 1
    local name=$1 mod=$2; shift 2
    setsid python3 -m "$mod" --model-path "$MODEL" --host 127.0.0.1 --port "$PORT" --mem-fraction-static 0.8 \
        ${EXTRA_ARGS:-} "$@" > "$OUT/logs/server_$name.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)' "$URL/health" \
            2>/dev/null && { echo "[$name] up"; return 0; }
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 1
    done
    echo "[$name] did not start; last lines of its log:"; tail -20 "$OUT/logs/server_$name.log"; stop_server; return 1
}

tq_yaml() {  # tq_yaml NAME PRESET CENTER EVAL WINDOW: the preset's YAML with these changes -> its path
    # CENTER: keep | none | FILE; EVAL: 1 = evaluation.prefill_from_cache; WINDOW: keep | N tokens
    python3 - "$OUT/configs/$1.yaml" "$2" "$3" "$4" "$5" <<'EOF'
import sys, yaml
from sglang_tq.config import load_config, presets_dir
out, preset, center, ev, window = sys.argv[1:]
d = yaml.safe_load(open(presets_dir() / f"{preset}.yaml"))
if center != "keep":
    d.pop("key_means", None)
    if center != "none":
        d["key_means"] = center
if ev == "1":
    d["evaluation"] = {"prefill_from_cache": True}
if window != "keep":
    d["window"] = {**(d.get("window") or {}), "tokens": int(window)}
yaml.safe_dump(d, open(out, "w"), sort_keys=False)
load_config(out)  # validated here, not by a failing server
print(out)
EOF
}

labels() {  # labels CONFIG PATH: the record fields eval_quality cannot see, into the array LAB
    LAB=(--model "$NAME" --config "$1" --path "$2" --card "$CARD" --commit "$COMMIT")
}

decode_evals() {  # decode_evals CONFIG: needle, ASDiv, greedy on the running server
    local c=$1 r="$OUT/records/$1" lim=$SERVER_LIMIT_S
    labels "$c" decode
    timeout "$lim" $EV needle --url "$URL" --haystack "$AUSTEN" --lengths "$NEEDLE_LENGTHS" \
        --trials "$NEEDLE_TRIALS" "${LAB[@]}" --json "${r}_needle.json" 2>&1 | tail -8
    timeout "$lim" $EV asdiv --url "$URL" --data "$ASDIV" --limit "$ASDIV_LIMIT" "${LAB[@]}" --json "${r}_asdiv.json" 2>&1 | tail -3
    local ref="$OUT/greedy_bf16_flashinfer.json"
    if [ "$c" = bf16_flashinfer ]; then
        timeout "$lim" $EV greedy --url "$URL" --text "$AUSTEN" --prompts "$GREEDY_PROMPTS" --tokens "$GREEDY_TOKENS" \
            "${LAB[@]}" --save "$ref" 2>&1 | tail -2
    elif [ -f "$ref" ]; then
        timeout "$lim" $EV greedy --url "$URL" --text "$AUSTEN" --prompts "$GREEDY_PROMPTS" --tokens "$GREEDY_TOKENS" \
            "${LAB[@]}" --save "$OUT/greedy_$c.json" --reference "$ref" --json "${r}_greedy.json" 2>&1 | tail -3
    fi
}

ppl_eval() {  # ppl_eval CONFIG PATH-LABEL
    labels "$1" "$2"
    timeout "$SERVER_LIMIT_S" $EV ppl --url "$URL" --text "$AUSTEN" --spans "$PPL_SPANS" --span-tokens "$PPL_SPAN_TOKENS" \
        "${LAB[@]}" --json "$OUT/records/$1_ppl.json" 2>&1 | tail -3
}

serve_sglang() {  # serve_sglang CONFIG ARGS...: one SGLang server (BF16 / FP8 KV) for every evaluation
    local c=$1; shift
    start_server "$c" sglang.launch_server "$@" || return 0
    decode_evals "$c"
    ppl_eval "$c" "extend (exact prefill)"
    stop_server
}

serve_tq() {  # serve_tq CONFIG PRESET CENTER: decode server, then perplexity servers with and without the window
    local c=$1 p=$2 center=$3 y
    y=$(tq_yaml "$c" "$p" "$center" 0 keep) || return 0
    start_server "$c" sglang_tq.launch_server --attention-backend turboquant --tq-config "$y" || return 0
    decode_evals "$c"
    stop_server
    y=$(tq_yaml "${c}_eval" "$p" "$center" 1 keep) || return 0
    start_server "${c}_eval" sglang_tq.launch_server --attention-backend turboquant --tq-config "$y" || return 0
    ppl_eval "$c" "extend, evaluation.prefill_from_cache"
    stop_server
    y=$(tq_yaml "${c}_eval_nowindow" "$p" "$center" 1 0) || return 0
    start_server "${c}_eval_nowindow" sglang_tq.launch_server --attention-backend turboquant --tq-config "$y" || return 0
    ppl_eval "${c}_nowindow" "extend, evaluation.prefill_from_cache, window 0"
    stop_server
}

IFS=, read -ra LIST <<< "$CONFIGS"
for c in "${LIST[@]}"; do
    echo "=== $c ($SIZE) $(date -u +%H:%M:%S)"
    case "$c" in
    bf16_flashinfer) serve_sglang "$c" --attention-backend flashinfer ;;
    bf16_fa3)        serve_sglang "$c" --attention-backend fa3 ;;
    bf16_triton)     serve_sglang "$c" --attention-backend triton ;;
    fp8)             serve_sglang "$c" --attention-backend flashinfer --kv-cache-dtype fp8_e4m3 ;;
    *_nocenter)      serve_tq "$c" "${c%_nocenter}" none ;;
    *_calibrated)    if [ -n "${KEY_MEANS:-}" ]; then serve_tq "$c" "${c%_calibrated}" "$(realpath "$KEY_MEANS")"
                     else echo "[$c] skipped: set KEY_MEANS to a key-means file"; fi ;;
    *)               serve_tq "$c" "$c" keep ;;
    esac
done
stop_server
shopt -s nullglob
recs=("$OUT"/records/*.json)
if [ ${#recs[@]} -gt 0 ]; then
    $EV merge "${recs[@]}" --baseline bf16_flashinfer --out "$OUT/quality.json"
fi
