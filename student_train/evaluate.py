"""Agreement with the teacher: mean KL(teacher || student) per response token on mimic shards."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from shared.mllm import FinalHidden, load_encoder
from student_train.data import check_shards, collate_mimic, iter_examples
from student_train.train import TrainConfig, mimic_terms


@torch.no_grad()
def kl_to_teacher(model_dir: Path, shards: list[Path], image_root: Path | None, tail: str = "rest",
                  batch_size: int = 32) -> float:
    """Streams the shards (one batch in memory at a time)."""
    from transformers import AutoModelForImageTextToText

    enc = load_encoder(model_dir)
    examples = iter_examples(check_shards(shards, "mimic", enc), "mimic", image_root)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cfg = TrainConfig(kd_tail=tail)
    body = FinalHidden(model)
    total = tokens = 0.0
    while batch := list(islice(examples, batch_size)):
        collated = collate_mimic(enc, batch)
        total += float(mimic_terms(model, collated, cfg, body, len(enc.tokenizer))["kl"])
        tokens += collated.tokens
    return total / max(1.0, tokens)
