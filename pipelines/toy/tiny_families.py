"""Tiny random-init stand-ins of real MLLM families, built from configs: the same architecture
classes, processors and chat templates as the real checkpoints, scaled down (no downloads).

They share one tokenizer (the tiny world's BPE plus every family's special tokens), so a student
of one family can learn from a teacher of another. Used by the tests, the benchmarks and
`lmod student make-tiny`, which builds a dense base here and upcycles it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

# Chat templates as the real checkpoints ship them (newlines as {{ '\n' }}: templates are compiled
# with trim_blocks, which would eat a literal newline after a block tag).
SMOLVLM_TEMPLATE = (  # HuggingFaceTB/SmolVLM-Instruct
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (  # llava-hf/llava-v1.6-vicuna style
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'][0]['text'] }} "
    "{% elif message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{{ '\\n' }}{% endif %}{% endfor %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} {% else %}ASSISTANT: "
    "{% for item in message['content'] %}{{ item['text'] }}{% endfor %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

FAMILY_TOKENS = ["<|im_start|>"] + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
TINY_FAMILIES = ("smolvlm", "llava_next", "blip2")


def family_tokenizer(out: Path) -> Any:
    """The tiny world's BPE with every family's special tokens, saved under `out`."""
    from transformers import AutoTokenizer

    from pipelines.toy.tiny_teacher import train_tokenizer

    train_tokenizer(out, 512)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_special_tokens({"additional_special_tokens": FAMILY_TOKENS})
    tok.save_pretrained(str(out))
    return tok


def _text_config(kind: str, tok: Any, hidden: int, layers: int, intermediate: int) -> dict[str, Any]:
    """head_dim 64: vLLM's CPU attention refuses smaller heads."""
    cfg = {"model_type": kind, "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": intermediate,
           "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
           "max_position_embeddings": 1024, "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
           "bos_token_id": None, "tie_word_embeddings": False}
    if kind in ("llama", "qwen2", "qwen3", "mistral"):
        cfg["head_dim"] = 64
    if kind == "opt":
        cfg.update({"ffn_dim": intermediate, "word_embed_proj_dim": hidden})
    return cfg


def build_tiny_family(family: str, out: Path, tokenizer: Any, text_model: str | None = None, hidden: int = 128,
                      layers: int = 2, intermediate: int = 256, seed: int = 0, image_tokens_per_crop: int = 4) -> Path:
    """A random-init tiny MLLM of `family` saved under `out` (weights, processor, chat template).
    `image_tokens_per_crop` (SmolVLM: 4 or 16) sets how image-heavy its prompts are."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    if family == "smolvlm":
        model, processor = _smolvlm(tokenizer, _text_config(text_model or "llama", tokenizer, hidden, layers,
                                                            intermediate), image_tokens_per_crop)
    elif family == "llava_next":
        model, processor = _llava_next(tokenizer, _text_config(text_model or "qwen2", tokenizer, hidden, layers,
                                                               intermediate))
    elif family == "blip2":
        model, processor = _blip2(tokenizer, _text_config(text_model or "opt", tokenizer, hidden, layers,
                                                          intermediate))
    else:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY_FAMILIES)}")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


def _smolvlm(tok: Any, text: dict, image_tokens_per_crop: int) -> tuple[Any, Any]:
    """Idefics3 (SmolVLM v1) with image splitting: the image-token count depends on the image."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
    )

    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size={"longest_edge": 128}, max_image_size={"longest_edge": 64}, do_image_splitting=True)
    scale_factor = {4: 2, 16: 1}[image_tokens_per_crop]  # 64 px crops, 16 px patches: 16 / scale_factor^2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=image_tokens_per_crop, chat_template=SMOLVLM_TEMPLATE)
    config = Idefics3Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "image_size": 64, "patch_size": 16},
        text_config=text, scale_factor=scale_factor, image_token_id=tok.convert_tokens_to_ids("<image>"),
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    return Idefics3ForConditionalGeneration(config), processor


def _llava_next(tok: Any, text: dict) -> tuple[Any, Any]:
    """LLaVA-NeXT anyres with a tiny CLIP tower: 38, 54 and 90 prompt tokens for `<image>hi` with
    56x56, 112x56 and 112x112 images (36, 52 and 88 image tokens, CLIP's CLS token counted)."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                   vision_feature_select_strategy="default", chat_template=LLAVA_NEXT_TEMPLATE,
                                   num_additional_image_tokens=1)  # CLIP's CLS, as llava-hf checkpoints
    config = LlavaNextConfig(
        vision_config={"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128,
                       "num_hidden_layers": 2, "num_attention_heads": 1, "image_size": 56, "patch_size": 14,
                       "projection_dim": 64},
        text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=16)
    return LlavaNextForConditionalGeneration(config), processor


def _blip2(tok: Any, text: dict) -> tuple[Any, Any]:
    """BLIP-2 (Q-Former, OPT text model): image tokens go before the text."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    # Blip2Processor wants the image token as an AddedToken of its own making, not a tokenizer attribute.
    tok = type(tok)(tokenizer_object=tok.backend_tokenizer, pad_token=tok.pad_token, unk_token=tok.unk_token,
                    eos_token=tok.eos_token)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": 56, "width": 56}),
                               tokenizer=tok, num_query_tokens=8)
    config = Blip2Config(
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "image_size": 56, "patch_size": 14},
        qformer_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                        "num_attention_heads": 1, "encoder_hidden_size": 64, "vocab_size": len(tok)},
        text_config=text, num_query_tokens=8, image_token_index=tok.convert_tokens_to_ids("<image>"))
    return Blip2ForConditionalGeneration(config), processor
