#!/usr/bin/env bash
# Device check for a lent CUDA machine (run from the repository root; the image
# there has torch, transformers, peft and safetensors). Runs the equivalence
# tests with the engine on CUDA, then the inference benchmark on CUDA.
# SmolLM2 parts are skipped: its GGUF file (98 MB) does not travel to the device.
set -uo pipefail
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 COSERVE_TEST_DEVICE=cuda
OUT="${OUT:-/tmp/coserve-gpu}"; mkdir -p "$OUT"
nvidia-smi -L; python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"
timeout 200 python3 -m pytest -q -p no:cacheprovider -x \
  tests/models/test_model_equivalence.py tests/engine/test_llm_generate.py tests/engine/test_adapter_roundtrip.py \
  -k "not smollm2" 2>&1 | tee "$OUT/tests.log" | tail -15
timeout 240 python3 -m coserve.cli bench inference --device cuda --skip-real ${BENCH_ARGS:-} > "$OUT/bench.json" 2> "$OUT/bench.err"
echo "bench exit $?"; cat "$OUT/bench.json"; tail -5 "$OUT/bench.err"
