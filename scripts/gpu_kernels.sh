#!/usr/bin/env bash
# One GPU call for the kernels (carry .gpu_bundle): the kernel tests on the GPU, then the benchmark
# with correctness check. Results land in $OUT/bench (results.json, speedup.png).
#   bash scripts/gpu_kernels.sh [extra bench_kernels.py args]
set -uo pipefail
source scripts/gpu_env.sh
python3 -m pytest -q -p no:cacheprovider tests/test_kernels_decode.py tests/test_kernels_extend.py \
    tests/test_kernels_compress.py tests/test_kernels_window.py tests/test_kernels_first_token.py 2>&1 | tail -4
python3 scripts/bench_kernels.py --check --quick --out "${OUT:-bench_out}/bench" "$@"
