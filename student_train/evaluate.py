"""Agreement with the teacher: mean KL(teacher || student) per response token on mimic shards (per
paired token for a student with another tokenizer)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from shared.evaluation import load_eval_model
from shared.mllm import FinalHidden, load_encoder
from student_train.config import TrainConfig
from student_train.cross_tokenizer import TokenBridge
from student_train.data import check_shards, collate_mimic, iter_examples
from student_train.objectives import mimic_terms


@torch.no_grad()
def kl_to_teacher(model_dir: Path, shards: list[Path], image_root: Path | None, tail: str = "rest",
                  batch_size: int = 32, device: str = "cpu", dtype: str = "float32") -> float:
    """Streams the shards (one batch in memory at a time), on `device` with weights in `dtype` (the
    KL itself is computed in float32)."""
    enc = load_encoder(model_dir)
    bridge = TokenBridge.for_dumps(shards, enc)  # a student with another tokenizer: rows restated
    examples = iter_examples(check_shards(shards, "mimic", enc, cross=bridge is not None), "mimic", image_root)
    model = load_eval_model(model_dir, device, dtype)
    cfg = TrainConfig(kd_tail=tail)
    body = FinalHidden.of(model)
    total = tokens = 0.0
    while batch := list(islice(examples, batch_size)):
        collated = collate_mimic(enc, batch, bridge).to(model.device)
        collated.inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in collated.inputs.items()}
        total += float(mimic_terms(model, collated, cfg, body, len(enc.tokenizer))["kl"])
        tokens += collated.tokens if collated.kd_mask is None else int(collated.kd_mask.sum())
    return total / max(1.0, tokens)
