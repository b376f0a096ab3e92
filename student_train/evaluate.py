"""Agreement with the teacher on held-out mimic shards: mean KL(teacher || student) per response
token (per paired token for a student with another tokenizer) and, for a student of the teacher's
tokenizer, how often its most likely next token is the teacher's (top-1 agreement)."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import torch

from shared.evaluation import load_eval_model
from shared.mllm import FinalHidden, load_encoder
from shared.models import check_embeddings
from student_train.config import TrainConfig
from student_train.cross_tokenizer import TokenBridge
from student_train.data import check_shards, collate_mimic, iter_examples
from student_train.dumps import Dumps
from student_train.losses import OutputHead
from student_train.objectives import mimic_terms


@torch.no_grad()
def kl_to_teacher(model_dir: Path, shards: list[Path], image_root: Path | None, tail: str = "rest",
                  batch_size: int = 32, device: str = "cpu", dtype: str = "float32") -> float:
    """Streams the shards (one batch in memory at a time), on `device` with weights in `dtype` (the
    KL itself is computed in float32)."""
    return held_out_agreement(model_dir, shards, image_root, tail, batch_size, device, dtype)["kl_to_teacher"]


@torch.no_grad()
def held_out_agreement(model_dir: Path, shards: list[Path], image_root: Path | None, tail: str = "rest",
                       batch_size: int = 32, device: str = "cpu", dtype: str = "float32") -> dict[str, float]:
    """`kl_to_teacher` and (same tokenizer only) `agreement_with_teacher`: the share of response
    positions where the student's argmax is the teacher's top-1 id."""
    enc = load_encoder(model_dir)
    dumps = Dumps.open(shards)
    if image_root is None:  # where the teacher found the images, when the dumps recorded it
        image_root = dumps.image_root("mimic")
    bridge = TokenBridge.for_dumps(dumps, enc)  # a student with another tokenizer: rows restated
    examples = iter_examples(check_shards(dumps, "mimic", enc, cross=bridge is not None), "mimic", image_root)
    model = load_eval_model(model_dir, device, dtype)
    check_embeddings(model, len(enc.tokenizer), f"--model {model_dir}")
    cfg = TrainConfig(kd_tail=tail)
    body = FinalHidden.of(model)
    vocab = len(enc.tokenizer)
    total = tokens = agree = 0.0
    while batch := list(islice(examples, batch_size)):
        collated = collate_mimic(enc, batch, bridge).to(model.device)
        collated.inputs = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in collated.inputs.items()}
        total += float(mimic_terms(model, collated, cfg, body, vocab)["kl"])
        tokens += collated.tokens if collated.kd_mask is None else int(collated.kd_mask.sum())
        if bridge is None:
            agree += _top1_agreements(model, body, collated, vocab)
    out = {"kl_to_teacher": total / max(1.0, tokens)}
    if bridge is None:
        out["agreement_with_teacher"] = agree / max(1.0, tokens)
    return out


def _top1_agreements(model, body: FinalHidden, batch, vocab: int, chunk: int = 256) -> int:
    """Positions where the student's argmax (over the shared vocabulary) is the teacher's top-1."""
    hidden = body(model, batch.inputs)[batch.rows, batch.cols]
    weight, bias = OutputHead.of(body.head, vocab).parts()
    # float32 once, not per chunk: a bf16 head at V = 151,936 is a 2.2 GB copy
    weight = weight.float()
    bias = None if bias is None else bias.float()
    teacher_top1 = batch.topk_ids.gather(1, batch.topk_logprobs.argmax(1, keepdim=True))[:, 0]
    hits = 0
    for s in range(0, hidden.shape[0], chunk):
        logits = hidden[s : s + chunk].float() @ weight.T
        student_top1 = (logits if bias is None else logits + bias).argmax(1)
        hits += int((student_top1 == teacher_top1[s : s + chunk]).sum())
    return hits
