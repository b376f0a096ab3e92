"""The student: a small dense MLLM (Idefics3 around a Qwen3 text model) and its sparse upcycling
into Idefics3 around a Qwen3-MoE text model, a standard transformers class that loads with
`AutoModelForImageTextToText.from_pretrained` (no remote code).

Upcycling (LLaVA-MoD / MoE-LLaVA): every chosen layer's FFN becomes E experts that start as copies
of it, with a fresh router; with top-k weights renormalised to sum to 1 the upcycled model computes
exactly what the dense one did until training moves the experts apart.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shared.world import IMAGE_SIZE

_PROCESSOR_FILES = ("processor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "preprocessor_config.json")


@dataclass
class StudentConfig:
    """The tiny dense student: smaller than the tiny teacher in both towers."""

    text_hidden: int = 128
    text_layers: int = 2
    text_heads: int = 2  # head_dim 64
    text_intermediate: int = 384
    vision_hidden: int = 64
    vision_layers: int = 1
    vision_heads: int = 1
    vision_intermediate: int = 256


def copy_processor(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in _PROCESSOR_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def make_dense_student(teacher_dir: Path, out: Path, cfg: StudentConfig | None = None, seed: int = 0) -> None:
    """Random-init dense student sharing the teacher's tokenizer and processor (same vocabulary)."""
    from transformers import AutoConfig, Idefics3Config, Idefics3ForConditionalGeneration

    cfg = cfg or StudentConfig()
    teacher_cfg = AutoConfig.from_pretrained(str(teacher_dir))
    tcfg = teacher_cfg.text_config
    config = Idefics3Config(
        vision_config={
            "hidden_size": cfg.vision_hidden, "intermediate_size": cfg.vision_intermediate,
            "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
            "image_size": IMAGE_SIZE, "patch_size": teacher_cfg.vision_config.patch_size,
        },
        text_config={
            "model_type": "qwen3", "vocab_size": tcfg.vocab_size, "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate, "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads, "num_key_value_heads": cfg.text_heads,
            "head_dim": cfg.text_hidden // cfg.text_heads, "max_position_embeddings": tcfg.max_position_embeddings,
            "pad_token_id": tcfg.pad_token_id, "eos_token_id": tcfg.eos_token_id, "bos_token_id": None,
            "tie_word_embeddings": False,
        },
        scale_factor=teacher_cfg.scale_factor,
        image_token_id=teacher_cfg.image_token_id,
        pad_token_id=tcfg.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config.eos_token_id = tcfg.eos_token_id
    model.generation_config.pad_token_id = tcfg.pad_token_id
    copy_processor(Path(teacher_dir), Path(out))
    model.save_pretrained(str(out))


def default_moe_layers(n_layers: int) -> list[int]:
    """MoE on every other layer, starting with the second (MoE-LLaVA's default)."""
    return [i for i in range(n_layers) if i % 2 == 1]


def upcycle(
    dense_dir: Path, out: Path, num_experts: int = 4, top_k: int = 2, moe_layers: list[int] | None = None,
    noise: float = 0.0, aux_loss_coef: float = 0.01, seed: int = 0,
) -> list[int]:
    """Write the MoE student under `out`; returns the layers that became MoE."""
    from transformers import AutoModelForImageTextToText, Idefics3Config, Idefics3ForConditionalGeneration

    dense = AutoModelForImageTextToText.from_pretrained(str(dense_dir), dtype=torch.float32)
    dcfg = dense.config
    text = dcfg.text_config
    if text.model_type != "qwen3":
        raise ValueError(f"{dense_dir}: upcycling needs a Qwen3 text model, found {text.model_type!r}")
    n_layers = text.num_hidden_layers
    layers = sorted(default_moe_layers(n_layers) if moe_layers is None else moe_layers)
    if not layers or any(not 0 <= i < n_layers for i in layers):
        raise ValueError(f"moe layers {layers} must be a non-empty subset of 0..{n_layers - 1}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k {top_k} must be between 1 and num_experts {num_experts}")
    moe_text = text.to_dict()
    moe_text.update({
        "model_type": "qwen3_moe", "num_experts": num_experts, "num_experts_per_tok": top_k,
        "moe_intermediate_size": text.intermediate_size, "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(n_layers) if i not in layers],
        # Renormalised top-k weights sum to 1: identical experts reproduce the dense FFN exactly.
        "norm_topk_prob": True, "router_aux_loss_coef": aux_loss_coef, "output_router_logits": False,
    })
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype"):
        moe_text.pop(key, None)
    config = Idefics3Config(
        vision_config=dcfg.vision_config.to_dict(), text_config=moe_text, scale_factor=dcfg.scale_factor,
        image_token_id=dcfg.image_token_id, pad_token_id=dcfg.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    moe = Idefics3ForConditionalGeneration(config)
    dense_sd = dense.state_dict()
    moe_sd = moe.state_dict()
    new_sd = {}
    for key, value in moe_sd.items():
        if key in dense_sd:
            new_sd[key] = dense_sd[key]
        elif key.endswith("mlp.experts.gate_up_proj"):
            prefix = key[: -len("experts.gate_up_proj")]
            fused = torch.cat([dense_sd[prefix + "gate_proj.weight"], dense_sd[prefix + "up_proj.weight"]], 0)
            new_sd[key] = fused.unsqueeze(0).repeat(num_experts, 1, 1)
        elif key.endswith("mlp.experts.down_proj"):
            prefix = key[: -len("experts.down_proj")]
            new_sd[key] = dense_sd[prefix + "down_proj.weight"].unsqueeze(0).repeat(num_experts, 1, 1)
        elif key.endswith("mlp.gate.weight"):
            new_sd[key] = torch.randn_like(value) * text.initializer_range  # a fresh router
        else:
            raise KeyError(f"upcycling: no source for {key}")
        if noise > 0 and ".experts." in key:
            new_sd[key] = new_sd[key] + noise * new_sd[key].std() * torch.randn_like(new_sd[key])
    moe.load_state_dict(new_sd, strict=True)
    moe.generation_config = dense.generation_config
    copy_processor(Path(dense_dir), Path(out))
    moe.save_pretrained(str(out))
    return layers


def active_parameters(model: torch.nn.Module) -> int:
    """Parameters used per token: experts count top_k / num_experts of their size."""
    total = 0
    text = getattr(model.config, "text_config", model.config)
    frac = getattr(text, "num_experts_per_tok", 1) / max(1, getattr(text, "num_experts", 1) or 1)
    for name, p in model.named_parameters():
        total += int(p.numel() * frac) if ".experts." in name else p.numel()
    return total
