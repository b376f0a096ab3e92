"""Which transformers class runs a model directory, loading it, and GGUF files as model inputs.

lmod serves any model transformers can run as a generator of text: a multimodal model
(`AutoModelForImageTextToText`: Idefics3, LLaVA, Qwen-VL, ...) or a text-only causal LM
(`AutoModelForCausalLM`: Llama, Qwen2/3, Mistral, Gemma, Mixtral, ...). The kind is read from the
config's `model_type` against transformers' own mappings, preferring the multimodal class where a
type has both (Gemma 3). Anything else (an encoder-only BERT, a speech model) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from shared import logs
from shared.manifest import temp_path

logs.install()  # every process that loads models (CLI, Ray workers, DataLoader workers) imports this module

IMAGE_TEXT = "image-text"
CAUSAL_LM = "causal-lm"


DEVICES = r"auto|cpu|cuda(:\d+)?"  # what a device option takes


def resolve_device(device: str) -> str:
    """'auto': the first GPU when there is one, else the CPU; anything else as given."""
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


class ModelError(ValueError):
    """A model lmod cannot use in this role; the message names it and says what to do."""


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a local model directory, or a one-line ModelError naming the file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelError(f"{model_dir}: no config.json; give a local model directory (or a .gguf file)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: not valid JSON ({e}); restore the model's config.json") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a JSON object; restore the model's config.json")
    return config


def model_kind(model_type: str, where: str | Path = "model") -> str:
    """IMAGE_TEXT or CAUSAL_LM for a transformers `model_type`; ModelError for models that do not
    generate text from a prompt (encoder-only, speech, unknown types)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return IMAGE_TEXT
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in _NOT_GENERATIVE:
        return CAUSAL_LM
    raise ModelError(f"{where}: model_type {model_type!r} is not a text generator transformers can run "
                     "(AutoModelForCausalLM or AutoModelForImageTextToText); lmod needs a chat model")


# Types transformers maps to a causal-LM head that are encoders underneath: their "next token" is
# not what they were trained to predict.
_NOT_GENERATIVE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text",
                             "xlm-roberta-xl", "roberta-prelayernorm", "rembert", "bert-generation",
                             "megatron-bert", "xmod", "big_bird"})


def auto_class(kind: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if kind == IMAGE_TEXT else AutoModelForCausalLM


def kind_of(model_dir: str | Path) -> str:
    return model_kind(read_config(model_dir).get("model_type", ""), model_dir)


def load_model(model_dir: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """The model of a local directory in its own class (multimodal or causal LM)."""
    return auto_class(kind_of(model_dir)).from_pretrained(str(model_dir), dtype=dtype)


def check_embeddings(model: Any, tokenizer_size: int, where: str | Path) -> None:
    """A model whose input or output embedding has fewer rows than its tokenizer has tokens cannot
    take or score every id (an IndexError deep in the first forward): a ModelError instead."""
    layers = (("input embedding", model.get_input_embeddings()), ("output head", model.get_output_embeddings()))
    for what, layer in layers:
        rows = getattr(layer, "num_embeddings", None) or getattr(layer, "out_features", None)
        if rows is not None and rows < tokenizer_size:
            raise ModelError(f"{where}: its {what} has {rows} rows but its tokenizer {tokenizer_size} tokens (ids from "
                             f"{rows} on cannot be used); resize it (model.resize_token_embeddings(len(tokenizer))) "
                             "and save it again")


def vllm_mismatch(model_dir: str | Path) -> str | None:
    """Why vLLM would run this model wrongly without a word, or None. vLLM's Qwen2-MoE always makes
    q/k/v biases (it ignores `qkv_bias`): for a checkpoint without them they stay uninitialised
    memory, which gave NaN log-probs or, worse, finite wrong ones."""
    config = read_config(model_dir)
    for text in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        if text.get("model_type") == "qwen2_moe" and text.get("qkv_bias") is False:
            return (f"{model_dir}: a Qwen2-MoE without q/k/v biases (qkv_bias: false), which vLLM's Qwen2-MoE "
                    "always adds; it would run with uninitialised biases. Use --backend hf, or make the student "
                    "again with `lmod student` (it stores zero biases)")
    return None


def require_vllm_loadable(model_dir: str | Path) -> None:
    """ModelError when vLLM would run this model wrongly (see `vllm_mismatch`)."""
    if (why := vllm_mismatch(model_dir)) is not None:
        raise ModelError(why)


def model_from_config(config: Any, dtype: torch.dtype = torch.float32) -> Any:
    return auto_class(model_kind(config.model_type)).from_config(config, dtype=dtype)


def is_multimodal(model_or_config: Any) -> bool:
    config = getattr(model_or_config, "config", model_or_config)
    return model_kind(config.model_type) == IMAGE_TEXT


# -- logits -----------------------------------------------------------------------------------------

# Config keys of families whose logits are changed after the output projection, as transformers
# applies them: Gemma 2/3 soft-cap (tanh(x / c) * c), Cohere / Aya scale (x * s), Granite divide (x / d).
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def logit_transform(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the family does to the output projection's result before its softmax, or None. A teacher
    that projects its own hidden states (both backends score positions themselves) must apply it, or
    it stores a distribution ~16x too sharp (Gemma 2's cap of 30) without a word."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    cap = getattr(text, "final_logit_softcapping", None)
    scale = getattr(text, "logit_scale", None)
    divide = getattr(text, "logits_scaling", None)
    steps: list[Callable[[torch.Tensor], torch.Tensor]] = []
    if scale not in (None, 1.0):
        steps.append(lambda x: x * scale)
    if divide not in (None, 1.0):
        steps.append(lambda x: x / divide)
    if cap:
        steps.append(lambda x: torch.tanh(x / cap) * cap)
    if not steps:
        return None

    def apply(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step(x)
        return x

    return apply


# -- GGUF -----------------------------------------------------------------------------------------

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(GGUF_SUFFIX)


def from_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """A GGUF checkpoint -> a standard transformers directory (weights de-quantised to float32 in
    safetensors, tokenizer with its chat template, generation config). transformers reads GGUF
    (`gguf` and `accelerate` packages) but will not save a model it loaded from one, so the state
    dict goes into a fresh model of the same config. Written to a temporary folder and renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out = Path(gguf_file), Path(out)
    if not gguf_file.is_file():
        raise ModelError(f"{gguf_file}: no such GGUF file")
    if (out / "config.json").exists():
        raise ModelError(f"{out} already holds a model; choose another --out")
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise ModelError(f"{gguf_file}: reading GGUF needs the `gguf` and `accelerate` packages ({e})") from None
    except (ValueError, KeyError, OSError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"{gguf_file}: transformers cannot read this GGUF file ({first})") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised: a plain float checkpoint
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config = loaded.generation_config
    tmp = temp_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "lmod_gguf.json").write_text(json.dumps({"gguf": name, "sha256": file_sha256(gguf_file)}) + "\n")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.rename(out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process converting the same file
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("LMOD_CACHE", Path.home() / ".cache" / "lmod"))


def resolve_model(path: str | Path) -> Path:
    """A model directory as given, or for a .gguf file its converted directory, made once per file
    content under the lmod cache (`LMOD_CACHE`, default ~/.cache/lmod) and reused after."""
    path = Path(path)
    if not is_gguf(path):
        return path
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    target = cache_dir() / "gguf" / f"{path.stem}-{file_sha256(path)[:16]}"
    if not (target / "config.json").is_file():
        from_gguf(path, target)
    return target
