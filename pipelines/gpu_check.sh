#!/usr/bin/env bash
# The GPU-only paths (device placement, NCCL, bf16, torchrun kill/resume, eval on the GPU, peak
# memory at V = 151,936), checked on a machine with one or more GPUs in under 10 minutes. CI does
# not run it (no GPU there). Needs the project installed (pip install -e ".[gpu,test]" on a GPU box);
# see pipelines/gpu_check.py for what each check asserts.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && . .venv/bin/activate
export TOKENIZERS_PARALLELISM=false
exec python -m pipelines.gpu_check "$@"
