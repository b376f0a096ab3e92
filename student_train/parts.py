"""What trains: the student's parameters by part (vision tower, projector, language model, and inside
the language model the MoE experts and routers), resolved from parameter names for every family
lmod supports. LLaVA-MoD keeps the vision encoder frozen; its dense-to-sparse stages train the
experts and routers (MoE-LLaVA's `--train_modules`)."""

from __future__ import annotations

import torch

from shared.models import is_multimodal

PARTS = ("vision", "projector", "language", "experts", "router")
# The paper's choice for both distillation stages. The tiny demo's student keeps the teacher's
# frozen tower and trains its projector and random text model (pipelines/configs/mimic.yaml).
DEFAULT_TRAIN = ("experts", "router")

# Components of a parameter's dotted name, checked in this order (the projector inside Qwen-VL's
# `visual` module is its `merger`; BLIP-2's Q-Former and query tokens bridge the two towers).
_PROJECTOR = ("connector", "multi_modal_projector", "mm_projector", "language_projection", "qformer",
              "query_tokens", "image_newline", "merger", "deepstack_merger_list")
_VISION = ("vision_model", "vision_tower", "visual", "image_tower", "vision_encoder")
_LANGUAGE = ("text_model", "language_model", "lm_head", "embed_tokens")


def part_of(name: str, text_only: bool = False) -> str | None:
    """'vision' | 'projector' | 'language' for a parameter name; None when the name says neither.
    Every parameter of a text-only model is its language model."""
    if text_only:
        return "language"
    pieces = name.split(".")
    for part, keys in (("projector", _PROJECTOR), ("vision", _VISION), ("language", _LANGUAGE)):
        if any(p in keys for p in pieces):
            return part
    return None


def is_router(name: str) -> bool:
    return ".mlp.gate." in name or name.endswith(".mlp.gate.weight") or ".shared_expert_gate." in name


def is_expert(name: str) -> bool:
    return ".mlp.experts." in name or ".mlp.shared_expert." in name


def trainable_names(model: torch.nn.Module, train: tuple[str, ...] | list[str], family: str) -> set[str]:
    """The parameter names that train for `train` (parts of PARTS, or ["all"]). Fails in one line
    naming the family when a part is not found or a parameter belongs to no known part."""
    names = [n for n, _ in model.named_parameters()]
    text_only = not is_multimodal(model)
    if list(train) == ["all"]:
        return set(names)
    unknown = sorted(set(train) - set(PARTS))
    if unknown:
        raise ValueError(f"train: unknown part(s) {unknown}; use any of {list(PARTS)} or [all]")
    chosen: set[str] = set()
    for part in train:
        if part in ("experts", "router"):
            test = is_expert if part == "experts" else is_router
            found = {n for n in names if part_of(n, text_only) == "language" and test(n)}
        else:
            unplaced = [n for n in names if part_of(n, text_only) is None]
            if unplaced:
                raise ValueError(f"{family}: cannot tell which part parameter {unplaced[0]!r} belongs to; "
                                 "name it in student_train/parts.py or use train: [all]")
            found = {n for n in names if part_of(n, text_only) == part}
        if not found:
            what = "an MoE student (lmod student upcycle)" if part in ("experts", "router") else "that part"
            raise ValueError(f"{family}: train: {part!r} matches no parameter of this model; it needs {what}")
        chosen |= found
    return chosen


def apply_trainable(model: torch.nn.Module, train: tuple[str, ...] | list[str], family: str) -> dict[str, int]:
    """Freeze everything outside `train`; returns parameter counts per part that train."""
    keep = trainable_names(model, train, family)
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)
        if name in keep:
            part = part_of(name, not is_multimodal(model)) or "other"
            counts[part] = counts.get(part, 0) + p.numel()
    return counts


def unused_safe_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Trainable vision and projector parameters: a micro-batch without images (or a CLIP tower's
    last layer and post-layernorm, which LLaVA-family students never read) gives them no gradient,
    and DDP stops when a rank's gradient set differs. Adding 0 * their sum to each rank's loss gives
    them a zero gradient everywhere (one reduction over these parameters per micro-batch)."""
    return [p for n, p in model.named_parameters() if p.requires_grad and part_of(n) in ("vision", "projector")]
