#!/usr/bin/env bash
# The GPU benchmark in one prepared run (at most 8 minutes): the Qwen3-VL-4B shape with random
# weights (`mmemb init-backbone --size 4b`), bf16, sdpa. Encode tokens/s and FLOP utilisation at
# batch 32 and 128; adaptive / direct and always / direct at 50 % invocation beside the two peer
# baselines; peak memory; one LoRA + GradCache step at per-device batch 128; vLLM where installed.
#
#   bench/gpu.sh                 # on a GPU: writes bench/gpu-results.json, prints it
#   bench/gpu.sh --smoke         # every section on a tiny backbone on the CPU (the test suite runs it)
#
# PYTHON picks the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec timeout 480 "$PYTHON" bench/gpu.py --deadline 450 "$@"
