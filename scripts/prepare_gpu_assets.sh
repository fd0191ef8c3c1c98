#!/usr/bin/env bash
# Builds, on a CPU machine with network access, what the offline GPU machine needs next to the checkout
# (all git-ignored):
#   .gpu_bundle/  offline SGLang 0.5.10.post1 + FlashInfer bundle (../shared/device/build_bundle.py, 52 MiB)
#   .gpu_model/a, .gpu_model/b  SmolLM2-135M-Instruct halves (../shared/models/fetch_smollm2.sh)
#   .gpu_data/    prideprejudice.txt, emma.txt, asdiv.jsonl (../shared does not travel to the GPU)
#   .gpu_tok/     SmolLM2's tokenizer + config alone (for the config-only 8B shape; needs .gpu_model)
# Run it in the project venv (the tokenizer step converts the GGUF with numpy/safetensors).
# scripts/gpu_session.sh lists which step needs which.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SHARED=${SHARED:-../shared}
[ -d .gpu_bundle ] || python3 "$SHARED/device/build_bundle.py" .gpu_bundle
[ -d .gpu_model/a ] || bash "$SHARED/models/fetch_smollm2.sh" .gpu_model
mkdir -p .gpu_data
cp "$SHARED/data/austen/prideprejudice.txt" "$SHARED/data/austen/emma.txt" .gpu_data/
cp "$SHARED/data/asdiv/test.jsonl" .gpu_data/asdiv.jsonl
if [ ! -f .gpu_tok/tokenizer.json ]; then
    # assemble the model once here (CPU) to take its tokenizer files
    tmp=$(mktemp -d)
    cat .gpu_model/a/SmolLM2.gguf.part00 .gpu_model/b/SmolLM2.gguf.part01 > "$tmp/SmolLM2.gguf"
    python3 -m pip install -q --no-deps --target "$tmp/site" .gpu_model/b/gguf-*.whl
    PYTHONPATH="$tmp/site" "${PYTHON:-python3}" .gpu_model/b/gguf_to_hf.py "$tmp/SmolLM2.gguf" "$tmp/hf" >/dev/null
    mkdir -p .gpu_tok
    cp "$tmp"/hf/{tokenizer.json,tokenizer_config.json,config.json,generation_config.json} .gpu_tok/
    rm -rf "$tmp"
fi
du -sh .gpu_bundle .gpu_model/a .gpu_model/b .gpu_data .gpu_tok
