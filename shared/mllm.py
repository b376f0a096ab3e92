"""Loading an MLLM's processor and turning samples into model inputs (teacher hf backend, tiny
teacher training and the student all go through here)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.prompt import IMAGE_PLACEHOLDER, EncodedSample, encode_segments, expand_placeholder


@dataclass
class ModelInputs:
    ids: list[int]  # expanded (image tokens in place)
    prompt_ids: list[int]  # unexpanded (one placeholder per image)
    response_mask: list[bool]
    turn_lengths: list[int]
    text: str


class SampleEncoder:
    """Segment-wise tokenisation plus the model's image-token expansion, learnt once from the
    processor so that it matches what the model (and vLLM) expect."""

    def __init__(self, processor: Any):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.placeholder_id = self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        blank = Image.new("RGB", (32, 32))
        self.image_expansion: list[int] = processor(text=IMAGE_PLACEHOLDER, images=[blank])["input_ids"][0]
        if hasattr(self.image_expansion, "tolist"):
            self.image_expansion = self.image_expansion.tolist()

    def encode(
        self, segments: Sequence[tuple[str, bool]], responses: Sequence[Sequence[int]] | None = None
    ) -> ModelInputs:
        sample: EncodedSample = encode_segments(self.tokenizer, segments, responses)
        ids, mask = expand_placeholder(sample, self.placeholder_id, self.image_expansion)
        return ModelInputs(ids, sample.ids, mask, sample.turn_lengths, sample.text)

    def image_tensors(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        out = self.processor.image_processor([[im] for im in images], return_tensors="pt")
        return {k: v for k, v in out.items() if k in ("pixel_values", "pixel_attention_mask")}


def load_processor(model_dir: str | Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(model_dir))


def moe_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router modules of a transformers MoE text model (their forward returns router logits first)."""
    return [m for name, m in model.named_modules() if name.endswith("mlp.gate") and hasattr(m, "num_experts")]


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists; returns (input_ids, attention_mask)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn
