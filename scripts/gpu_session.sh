#!/usr/bin/env bash
# The device calls of one evaluation session on a two- or four-GPU machine (nvidia-h100-x2/x4; on four
# GPUs step 3 also runs the TP check on GPUs 2 and 3), back to back (the
# machine keeps /tmp only while warm, 30 s between calls). Each step is one call; carry what it says:
#   1. upload-a           carry .gpu_model/a           first GGUF half into /tmp/models
#   2. upload-b           carry .gpu_model/b           second half, assemble SmolLM2, build its TP copy
#   3. serve-and-quality  carry .gpu_bundle .gpu_data .gpu_tok
#        GPU 0: scripts/bench_serving.py (8B shape, dummy weights: turbo4, BF16, FP8 KV)
#        GPU 1: scripts/gpu_server_check.py --stages smollm2 (perplexity, parity, bad requests)
#   4. tp-load-kernels    carry .gpu_data               (the bundle is still installed in /tmp/site)
#        both GPUs: --stages tp (TP = 2 vs TP = 1); then GPU 0: scripts/bench_kernels.py --quick,
#        GPU 1: --stages load (2000 requests, aborts, retraction)
# Results under $OUT/<part>/; logs in $OUT/*.log. Servers left by a cut-off step are killed first.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
kill_gpu_procs() {  # every process on the GPUs is ours: servers of an earlier, cut-off step
    nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | xargs -r kill -9 2>/dev/null
    sleep 2
}
case "${1:-}" in
upload-a)
    mkdir -p /tmp/models && cp .gpu_model/a/* /tmp/models/ && ls -la /tmp/models && nvidia-smi -L ;;
upload-b)
    bash .gpu_model/b/assemble.sh && python3 scripts/make_tp_model.py /tmp/models/SmolLM2-135M-Instruct /tmp/models/SmolLM2-dup ;;
serve-and-quality)
    source scripts/gpu_env.sh
    kill_gpu_procs
    CUDA_VISIBLE_DEVICES=0 TQ_CHECK_PORT=30000 timeout -s INT 560 python3 scripts/bench_serving.py \
        --configs turbo4,bf16,fp8 --points 16384:512:64,1024:256:8 \
        --extra "--cuda-graph-max-bs 64 --chunked-prefill-size 16384" --out "$OUT/serving" > "$OUT/serving.log" 2>&1 &
    if [ "$(nvidia-smi -L | wc -l)" -ge 4 ]; then  # a 4-GPU machine: the TP check on GPUs 2, 3 meanwhile
        CUDA_VISIBLE_DEVICES=2,3 TQ_CHECK_PORT=30200 timeout -s INT 400 python3 scripts/gpu_server_check.py --stages tp \
            --out "$OUT/tp" > "$OUT/tp.log" 2>&1 && touch /tmp/tq_tp_done &
    fi
    CUDA_VISIBLE_DEVICES=1 TQ_CHECK_PORT=30100 timeout -s INT 560 python3 scripts/gpu_server_check.py --stages smollm2 \
        --out "$OUT/check" > "$OUT/check.log" 2>&1
    wait
    kill_gpu_procs
    tail -25 "$OUT/serving.log"; tail -30 "$OUT/check.log"; tail -12 "$OUT/tp.log" 2>/dev/null ;;
tp-load-kernels)
    source scripts/gpu_env.sh
    kill_gpu_procs
    if [ ! -f /tmp/tq_tp_done ]; then
        CUDA_VISIBLE_DEVICES=0,1 TQ_CHECK_PORT=30200 timeout -s INT 240 python3 scripts/gpu_server_check.py --stages tp \
            --out "$OUT/tp" > "$OUT/tp.log" 2>&1
        kill_gpu_procs
    fi
    CUDA_VISIBLE_DEVICES=0 timeout -s INT 300 python3 scripts/bench_kernels.py --quick --codecs K4V4 K3V3 \
        --out "$OUT/bench" > "$OUT/bench.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 TQ_CHECK_PORT=30300 timeout -s INT 300 python3 scripts/gpu_server_check.py --stages load \
        --out "$OUT/load" > "$OUT/load.log" 2>&1
    wait
    kill_gpu_procs
    tail -12 "$OUT/tp.log"; tail -40 "$OUT/bench.log"; tail -15 "$OUT/load.log" ;;
*)
    echo "usage: $0 upload-a|upload-b|serve-and-quality|tp-load-kernels" >&2; exit 2 ;;
esac
