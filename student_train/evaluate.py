"""Agreement with the teacher: mean KL(teacher || student) per response token on mimic shards."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.mllm import load_encoder
from student_train.data import check_shards, load_mimic
from student_train.train import RouterTap, TrainConfig, _mimic_loss


@torch.no_grad()
def kl_to_teacher(model_dir: Path, shards: list[Path], image_root: Path | None, tail: str = "rest",
                  batch_size: int = 32) -> float:
    from transformers import AutoModelForImageTextToText

    enc = load_encoder(model_dir)
    examples = load_mimic(check_shards(shards, "mimic", enc), image_root)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tap, cfg = RouterTap(model), TrainConfig(kd_tail=tail)
    total = tokens = 0.0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        _, parts = _mimic_loss(model, enc, batch, cfg, tap, "cpu")
        total += parts["kl"] * parts["tokens"]
        tokens += parts["tokens"]
    return total / max(1.0, tokens)
