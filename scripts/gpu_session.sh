#!/usr/bin/env bash
# The GPU steps of an evaluation run, one command each, back to back on the same machine (its /tmp holds
# the models between steps). Each step needs the git-ignored folders it lists next to the checkout (made by
# scripts/prepare_gpu_assets.sh). Work goes to /tmp/work/<step>; each step ends by packing it into
# $OUT/<step>.tgz.
#   1. upload-a   needs .gpu_model/a                    first GGUF half into /tmp/models
#   2. upload-b   needs .gpu_model/b                    second half, assemble SmolLM2, build its TP copy,
#                                                       run the kernel tests on the GPU
#   3. checks     needs .gpu_bundle .gpu_data .gpu_tok  nothing timed; one GPU each, up to 9.5 minutes:
#        scripts/gpu_server_check.py --stages load (GPU 0); --stages smollm2 for $SMOLLM2_SERVERS (GPU 1);
#        --stages tp on GPUs 2, 3 (4-GPU machine only)
#   3a. presets   needs .gpu_bundle .gpu_data .gpu_tok  perplexity servers of $SMOLLM2_PRESETS spread over the GPUs
#   3b. tp        needs .gpu_data                       2-GPU machine: --stages tp on GPUs 0, 1 ($TP_SERVERS)
#   3c. eval      needs .gpu_bundle .gpu_data .gpu_tok  passkey + ASDiv QA of $EVAL_SERVERS (bf16,turbo4,turbo3)
#   0. kernels    needs .gpu_bundle (.gpu_tok for onebatch)  $KERNEL_PARTS of: tests, bench (FlashInfer
#        baselines), extend (packed prefix, first prefill), step (decode graph per layer), onebatch
#        (8B shape without a server, profiled); dealt out over the GPUs when there are several
#   4. timed      needs .gpu_bundle                     scripts/gpu_serving.sh $SERVING_STEP (default smoke) with
#        $SERVING_CONFIGS: the serving benchmark on one card, its servers one after another
#   4a. onebatch  needs .gpu_bundle .gpu_tok            scripts/bench_one_batch_tq.py, 8B shape: prefill and decode
#        latencies of BF16 (triton) and turbo4 without a server, and the B=1 / B=8 prefills' kernels (profiled)
# Servers left by a cut-off step are killed first (every process on the GPUs is ours).
set -uo pipefail
OUT=${OUT:-/tmp/out}
STEP=${1:-}
W=/tmp/work/$STEP
mkdir -p "$OUT" "$W"
NGPU=$(nvidia-smi -L | wc -l)
TP_SERVERS=${TP_SERVERS:-tp1_bf16,tp2_bf16,tp1_turbo4,tp2_turbo4}
kill_gpu_procs() {  # GPU processes, and servers that have not reached the GPU yet (a cut-off job's last
    # start). Never `pkill -f sglang`: the device runner's own path contains that word.
    nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
    ps -eo pid,args | grep "[l]aunch_server\|[s]glang::" | awk '{print $1}' | xargs -r kill -9 2>/dev/null
    sleep 2
}
pack() { kill_gpu_procs; tar czf "$OUT/$STEP.tgz" -C /tmp/work "$STEP"; ls -la "$OUT"; }
job() {  # job GPUS PORT LIMIT_S NAME SCRIPT ARGS...: scripts/SCRIPT on those GPUs, servers on PORT
    local gpus=$1 port=$2 lim=$3 name=$4 script=$5; shift 5
    CUDA_VISIBLE_DEVICES=$gpus TQ_CHECK_PORT=$port timeout -s INT "$lim" python3 "scripts/$script" \
        --out "$W/$name" "$@" > "$W/$name.log" 2>&1
}
check() { job "$1" "$2" "$3" "$4" gpu_server_check.py "${@:5}"; }  # check GPUS PORT LIMIT_S NAME ARGS...
dummy_8b() {  # the config-only Llama-3-8B-shape folder at /tmp/models/llama8b-shape (needs .gpu_tok)
    python3 -c "import sys; sys.path.insert(0, 'scripts'); import gpu_server_check as g; g.make_dummy_8b(g.tokenizer_dir(None))"
}
onebatch() {  # onebatch GPU NAME BACKEND-ARGS...: scripts/bench_one_batch_tq.py on the 8B shape, B 1 and 8
    # x 1K (prefill and decode latencies without server or scheduler), then the B=1 and B=8 prefills profiled and
    # summarized by kernel (scripts/trace_summary.py; the trace itself is not kept). ONEBATCH_INPUT_LENS: the
    # unprofiled run's prompt lengths (default 1024; e.g. "1024 16384")
    local gpu=$1 name=$2; shift 2
    local common=(--model-path /tmp/models/llama8b-shape --load-format dummy --grammar-backend none
        --mem-fraction-static 0.8 --chunked-prefill-size 16384 --input-len 1024 --output-len 32)
    CUDA_VISIBLE_DEVICES=$gpu timeout "${ONEBATCH_LIMIT_S:-240}" python3 scripts/bench_one_batch_tq.py "${common[@]}" \
        --input-len ${ONEBATCH_INPUT_LENS:-1024} --batch-size 1 8 --run-name "$name" --result-filename "$W/onebatch.jsonl" "$@" > "$W/onebatch_$name.log" 2>&1
    mkdir -p "$W/trace_$name"
    CUDA_VISIBLE_DEVICES=$gpu SGLANG_TORCH_PROFILER_DIR="$W/trace_$name" timeout "${ONEBATCH_LIMIT_S:-240}" \
        python3 scripts/bench_one_batch_tq.py "${common[@]}" --batch-size 1 8 --profile --profile-stage prefill \
        --run-name "${name}_profiled" --result-filename "$W/onebatch_profiled.jsonl" "$@" > "$W/onebatch_${name}_prof.log" 2>&1
    python3 scripts/trace_summary.py "$W/trace_$name" > "$W/trace_$name.txt" 2>&1
    rm -rf "$W/trace_$name"
}
kernel_part() {  # kernel_part PART GPU: one part of the `kernels` step (CUDA_VISIBLE_DEVICES set by the caller)
    case "$1" in
    tests) kernel_tests ;;
    bench) timeout "${BENCH_LIMIT_S:-240}" python3 scripts/bench_kernels.py \
            ${BENCH_ARGS:---batch 1 32 --ctx 1024 32768 --codecs K4V4 K3V3 --shapes hd128 --window 32} \
            ${BENCH_EXTRA:-} --out "$W/bench" > "$W/bench.log" 2>&1 ;;
    grid-hd128|grid-hd64)  # the whole decode grid for one shape: B 1/8/32/128 x 1K-32K x K4V4, K3V3, K4V2, PROD-K3
        timeout "${GRID_LIMIT_S:-540}" python3 scripts/bench_kernels.py --check --shapes "${1#grid-}" \
            --codecs K4V4 K3V3 K4V2 PROD-K3 --out "$W/$1" > "$W/$1.log" 2>&1 ;;
    extend)  # extend over a packed prefix (GQA packing, split-K) vs SGLang's Triton extend over BF16: short
        # chat turns over a long cached history, long continuations; and one layer's first prefill.
        # EXTEND_CODECS: e.g. "K4V4 K3V3" (K3V3 adds the split register LUT's column)
        timeout 300 python3 scripts/bench_kernels.py --no-baselines --batch 1 --ctx 1024 --codecs ${EXTEND_CODECS:-K4V4} --shapes hd128 \
            --extend 16384:32 16384:32:32 4096:128:64 16384:512 8192:2048 8192:8192 \
            --prefill ${PREFILL_POINTS:-1:1024 8:1024 4:4096 1:16384} --out "$W/extend" > "$W/extend.log" 2>&1 ;;
    step)  # per-layer decode step, L layers in one graph, against BF16 / FP8 KV
        timeout 300 python3 scripts/bench_layer_step.py --out "$W/step" \
            > "$W/step.log" 2>&1 ;;
    onebatch) dummy_8b  # ONEBATCH_BASELINES: the BF16 runs' attention backends (default triton)
        for b in $(echo "${ONEBATCH_BASELINES:-triton}" | tr , ' '); do
            onebatch "$2" "bf16$([ "$b" = triton ] || echo "_$b")" --attention-backend "$b"
        done
        onebatch "$2" turbo4 --attention-backend turboquant --tq-config turbo4 ;;
    *) echo "unknown kernel part $1" >&2 ;;
    esac
}
kernel_summary() {  # kernel_summary PART: the lines of its log worth reading
    case "$1" in
    tests) tail -15 "$W/tests.log" ;;
    bench) grep -v "^    " "$W/bench.log" | tail -40 ;;
    grid-*) grep -v "^    " "$W/$1.log" | tail -24 ;;
    extend) grep "extend\|prefill" "$W/extend.log" | tail -14 ;;
    step) grep -v "^    " "$W/step.log" | tail -12; grep "^    " "$W/step.log" | cut -c1-400 | tail -24 ;;
    onebatch) grep -h "latency\|throughput" "$W"/onebatch_*.log | grep -v "^ " | tail -24; head -30 "$W"/trace_*.txt ;;
    esac
}
kernel_tests() {  # the GPU kernel tests (over 5 minutes on an H200)
    timeout "${KERNEL_TESTS_LIMIT_S:-480}" python3 -m pytest -q -p no:cacheprovider ${KERNEL_TEST_FILES:-tests/test_kernels_decode.py \
        tests/test_kernels_extend.py tests/test_kernels_compress.py tests/test_kernels_window.py tests/test_kernels_first_token.py} \
        > "$W/tests.log" 2>&1
}
case "$STEP" in
upload-a)
    mkdir -p /tmp/models && cp .gpu_model/a/* /tmp/models/ && ls -la /tmp/models && nvidia-smi -L ;;
upload-b)
    bash .gpu_model/b/assemble.sh && python3 scripts/make_tp_model.py /tmp/models/SmolLM2-135M-Instruct /tmp/models/SmolLM2-dup
    # the kernel tests on this GPU before any server uses the kernels (about 2 minutes; SKIP_KERNEL_TESTS=1:
    # skip them, e.g. when the kernels step runs them next)
    source scripts/gpu_env.sh
    [ "${SKIP_KERNEL_TESTS:-0}" = 1 ] || { kernel_tests; tail -15 "$W/tests.log"; } ;;
kernels)
    # KERNEL_PARTS (default "tests,bench"; also "step": scripts/bench_layer_step.py, "extend": extend
    # over a packed prefix with and without GQA packing and split-K, and one layer's first-prefill work;
    # "onebatch": bench_one_batch_tq of BF16 and turbo4 on the 8B shape, profiled, needs .gpu_tok): any of
    # them, so the step can be split into several runs. On a machine with several GPUs the parts are dealt out
    # over them (one after another on each GPU, so no two timings share a card).
    source scripts/gpu_env.sh
    IFS=, read -ra PARTS <<< "${KERNEL_PARTS:-tests,bench}"
    for g in $(seq 0 $((NGPU - 1))); do
        (for j in "${!PARTS[@]}"; do
            [ $((j % NGPU)) -eq "$g" ] && CUDA_VISIBLE_DEVICES=$g kernel_part "${PARTS[$j]}" "$g"
        done) &
    done
    wait
    pack
    for part in "${PARTS[@]}"; do kernel_summary "$part"; done ;;
checks)
    source scripts/gpu_env.sh
    kill_gpu_procs
    # GPU 0: the load test (server start ~100 s, 2,000 requests ~200 s, then the idle / flush check)
    check 0 30000 "${LOAD_LIMIT_S:-480}" load --stages load &
    if [ "$NGPU" -ge 2 ]; then
        check 1 30100 560 smollm2 --stages smollm2 \
            --servers "${SMOLLM2_SERVERS:-bf16,turbo4,turbo4_nograph,turbo4_nowindow,bf16_deterministic,turbo4_deterministic,turbo3}" &
    fi
    if [ "$NGPU" -ge 4 ]; then check 2,3 30200 540 tp --stages tp --servers "$TP_SERVERS" & fi
    wait
    pack
    for f in "$W"/*.log; do echo "== $f"; tail -15 "$f"; done ;;
presets)
    # perplexity-only servers of the other presets (about 60 s each), PRESET_SLOTS checks per GPU at the
    # same time (SmolLM2 is small: each server gets PRESET_MEM_FRACTION of the GPU's memory)
    source scripts/gpu_env.sh
    kill_gpu_procs
    IFS=, read -ra P <<< "${SMOLLM2_PRESETS:-bf16,turbo2,turbo3.5,k4v2,turbo4_noboundary,turbo3_noboundary,k4v2_noboundary,turbo2_noboundary,turbo3.5_noboundary,k5v4,turbo3_nowindow,calibrated4}"
    # 3 slots at 0.2 each started together fine on an H200; a fourth failed SGLang's free-memory check at
    # start
    SLOTS=${PRESET_SLOTS:-3}
    n=$((NGPU * SLOTS))
    frac=${PRESET_MEM_FRACTION:-0.2}
    for j in $(seq 0 $((n - 1))); do
        mine=""; for i in "${!P[@]}"; do [ $((i % n)) -eq "$j" ] && mine="$mine,${P[$i]}"; done
        [ -n "$mine" ] && check $((j % NGPU)) $((30000 + 100 * j)) 540 "presets$j" --stages smollm2 \
            --servers "${mine#,}" --server-mem-fraction "$frac" &
    done
    wait
    pack
    grep -h ": ppl" "$W"/presets*.log ;;
eval)
    # passkey retrieval and ASDiv QA (scripts/eval_quality.py) on SmolLM2 servers, one after another
    source scripts/gpu_env.sh
    kill_gpu_procs
    check 0 30000 540 eval --stages eval --servers "${EVAL_SERVERS:-bf16,turbo4,turbo3}"
    pack
    grep "passkey\|qa \|summary" -A1 "$W/eval.log" | tail -12 ;;
tp)
    source scripts/gpu_env.sh
    kill_gpu_procs
    check 0,1 30200 540 tp --stages tp --servers "$TP_SERVERS"
    pack
    tail -15 "$W/tp.log" ;;
timed)
    bash scripts/gpu_serving.sh "${SERVING_STEP:-smoke}" "${SERVING_CONFIGS:-}" ;;
onebatch)  # needs .gpu_bundle .gpu_tok: the model step of both systems without a server, one after the other
    source scripts/gpu_env.sh
    kill_gpu_procs
    kernel_part onebatch 0
    pack
    kernel_summary onebatch ;;
*)
    echo "usage: $0 kernels|upload-a|upload-b|checks|presets|eval|tp|timed|onebatch" >&2; exit 2 ;;
esac
