"""Held-out evaluation of any model directory on world-style eval JSONL (greedy answers; `image`
optional: text-only questions work for any model)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from shared.images import open_rgb
from shared.mllm import FinalHidden, SampleEncoder, batch_inputs, expert_counts, load_encoder, moe_routers
from shared.models import check_embeddings, resolve_device
from shared.prompt import pref_messages


def normalise(answer: str) -> str:
    return answer.strip().lower().rstrip(".").strip()


@torch.no_grad()
def greedy_answers(model: Any, encoder: SampleEncoder, records: list[dict], root: Path,
                   batch_size: int = 64, max_new_tokens: int = 24,
                   expert_counts: list[torch.Tensor] | None = None, progress: bool = False) -> list[str]:
    """Greedy decoding with the model's own chat template, batched with left padding; stops at any
    of the model's end-of-turn tokens. With `expert_counts`, appends per MoE layer the routed-slot
    counts [E] over the real tokens (prompt and answer through its end-of-turn, no padding)."""
    from tqdm import tqdm

    tok = encoder.tokenizer
    eos = sorted(encoder.eos_ids)
    answers: list[str] = []
    bar = tqdm(total=len(records), desc="eval", unit="question", disable=not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        prompts = [
            encoder.encode_prompt(pref_messages(rec["question"], None, bool(rec.get("image"))),
                                  encoder.image_features(open_rgb(root / rec["image"]))
                                  if rec.get("image") else None)
            for rec in chunk
        ]
        inputs = batch_inputs(encoder, [p.ids for p in prompts], [p.images for p in prompts], device=model.device,
                              float_dtype=model.dtype, left=True)
        width = inputs["input_ids"].shape[1]
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=encoder.pad_id,
        )
        answer_ids = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            answers.append(tok.decode(row[:cut], skip_special_tokens=True))
            # An image token in a (poorly trained) answer has no image behind it: it is left out.
            answer_ids.append([t for t in row[: cut + 1] if t != encoder.image_token_id])
        if expert_counts is not None:
            expert_counts.extend(_routed_slots(model, encoder, [p.ids + a for p, a in zip(prompts, answer_ids)],
                                               [p.images for p in prompts]))
        bar.update(len(chunk))
    bar.close()
    return answers


def _routed_slots(model: Any, encoder: SampleEncoder, seqs: list[list[int]], images: list) -> list[torch.Tensor]:
    """One teacher-forced pass over whole sequences: per MoE layer, how often each expert is among a
    real token's top-k (generation's left padding and finished rows would count otherwise)."""
    routers = moe_routers(model)
    if not routers:
        return []
    top_k = model.config.get_text_config().num_experts_per_tok
    logits: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, i, o: logits.append(o[0])) for m in routers]
    try:
        inputs = batch_inputs(encoder, seqs, images, device=model.device, float_dtype=model.dtype)
        FinalHidden.of(model, student=False)(model, inputs)  # the body only: routing needs no logits
    finally:
        for h in handles:
            h.remove()
    return list(expert_counts(logits, inputs["attention_mask"], top_k).long().cpu())


def _first_word(answer: str) -> str:
    words = normalise(answer).replace(",", " ").split()
    return words[0].strip(".!") if words else ""


def score(records: list[dict], answers: list[str]) -> dict[str, Any]:
    """Accuracy by type; POPE-style metrics on the yes/no existence questions ("yes" = positive)."""
    by_type: dict[str, list[bool]] = defaultdict(list)
    tp = fp = fn = tn = 0
    for rec, ans in zip(records, answers):
        ok = normalise(ans) == normalise(rec["answer"])
        if rec.get("type") == "pope":
            # A real model says "Yes, there is a ..." : its first word is the answer (as POPE's scripts).
            said_yes = _first_word(ans) == "yes"
            truth_yes = normalise(rec["answer"]) == "yes"
            ok = said_yes == truth_yes
            tp += said_yes and truth_yes
            fp += said_yes and not truth_yes
            fn += (not said_yes) and truth_yes
            tn += (not said_yes) and not truth_yes
        by_type[rec.get("type", "all")].append(ok)
    total = [ok for oks in by_type.values() for ok in oks]
    metrics: dict[str, Any] = {
        "n": len(total),
        "accuracy": sum(total) / max(1, len(total)),
        "accuracy_by_type": {t: sum(v) / len(v) for t, v in sorted(by_type.items())},
    }
    n_pope = tp + fp + fn + tn
    if n_pope:
        precision = tp / max(1, tp + fp)
        recall = tp / max(1, tp + fn)
        metrics["pope"] = {
            "accuracy": (tp + tn) / n_pope,
            "precision": precision,
            "recall": recall,
            "f1": 2 * precision * recall / max(1e-12, precision + recall),
            "yes_ratio": (tp + fp) / n_pope,
        }
        # Hallucination: saying "yes" to an object that is not in the picture.
        metrics["hallucination_rate"] = fp / max(1, fp + tn)
    return metrics


class EvalDataError(ValueError):
    """Unusable evaluation data; the message names the file and line."""


def _from_pope(rec: dict) -> dict:
    """POPE's own question files (`question_id`, `image`, `text`, `label`) -> lmod's eval records."""
    if not isinstance(rec, dict):
        raise TypeError("not a JSON object")
    if "text" in rec and "label" in rec and "question" not in rec:
        return {"id": str(rec.get("question_id", "")), "image": rec.get("image"), "question": rec["text"],
                "answer": rec["label"], "type": "pope"}
    return rec


def read_eval_records(data: Path, image_root: Path) -> list[dict]:
    """Every record checked before any model runs: JSON, `question`/`answer` strings (or POPE's
    `text`/`label`), an image that exists and decodes. Line numbers are 1-based lines of the file."""
    try:
        lines = Path(data).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalDataError(f"{data}: cannot read it ({e})") from None
    records = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = _from_pope(json.loads(line))
        except json.JSONDecodeError as e:
            raise EvalDataError(f"{data}:{no}: malformed JSON ({e.msg}); fix the line") from None
        except TypeError:
            raise EvalDataError(f"{data}:{no}: not a JSON object") from None
        missing = [k for k in ("question", "answer") if not isinstance(rec.get(k), str)]
        if missing:
            raise EvalDataError(f"{data}:{no}: {', '.join(repr(k) for k in missing)} missing or not a string")
        if rec.get("image") is None:  # a text-only question
            records.append(rec)
            continue
        if not isinstance(rec["image"], str):
            raise EvalDataError(f"{data}:{no}: 'image' must be a path under --image-root (or absent)")
        if rec.get("type") == "pope" and normalise(rec["answer"]) not in ("yes", "no"):
            raise EvalDataError(f"{data}:{no}: POPE label {rec['answer']!r} is not yes or no; fix or drop the line")
        path = image_root / rec["image"]
        if not path.is_file():
            raise EvalDataError(f"{data}:{no}: image not found: {path} (check --image-root)")
        try:
            with Image.open(path) as im:
                im.load()  # a truncated file passes a header check and fails mid-evaluation otherwise
        except Exception as e:  # PIL raises several types for truncated or corrupt images
            raise EvalDataError(f"{data}:{no}: image {path} cannot be decoded ({type(e).__name__}: {e}); "
                                "replace it or drop the line") from None
        records.append(rec)
    if not records:
        raise EvalDataError(f"{data}: no records; nothing to evaluate")
    return records


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_eval_model(model_dir: Path, device: str = "cpu", dtype: str = "float32") -> Any:
    """A model directory ready for evaluation on `device` in `dtype` (weights in that dtype)."""
    from shared.models import load_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}; use {' | '.join(DTYPES)}")
    model = load_model(model_dir, DTYPES[dtype])
    return model.to(resolve_device(device)).eval()


def evaluate_model(model_dir: Path, data: Path, image_root: Path | None = None, limit: int | None = None,
                   device: str = "cpu", dtype: str = "float32", batch_size: int = 64, progress: bool = False) -> dict:
    records = read_eval_records(data, image_root or Path(data).parent)[:limit]
    encoder = load_encoder(model_dir)
    model = load_eval_model(model_dir, device, dtype)
    check_embeddings(model, len(encoder.tokenizer), f"--model {model_dir}")
    counts: list[torch.Tensor] = []
    answers = greedy_answers(model, encoder, records, image_root or Path(data).parent, batch_size=batch_size,
                             expert_counts=counts, progress=progress)
    metrics = score(records, answers)
    if counts:
        total = torch.stack(counts).sum(0).float()
        metrics["expert_utilisation"] = (total / total.sum()).tolist()  # share of routed slots per expert
    return metrics
