"""A shard of records -> teacher rows of the shared schema. `TeacherWorker` is the thin Ray actor
around it: it builds its backend once and then writes one shard per call."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from shared.codec import Encoding
from shared.manifest import ShardEntry
from shared.mllm import ImageFeatures, ModelInputs, SampleEncoder
from shared.prompt import llava_messages, pref_messages
from teacher_dump.backends import ScoreRequest, ScoreResult, TeacherBackend
from teacher_dump.inputs import Record
from teacher_dump.shard_writer import write_shard


@dataclass
class ShardTask:
    kind: str
    index: int
    rel_path: str
    records: list[Record]


def load_image(rec: Record) -> tuple[Image.Image | None, str]:
    if rec.image_path is None and rec.image_bytes is None:
        return None, ""
    data = rec.image_bytes if rec.image_bytes is not None else Path(rec.image_path).read_bytes()
    return Image.open(io.BytesIO(data)).convert("RGB"), hashlib.sha256(data).hexdigest()


def encode_record(encoder: SampleEncoder, rec: Record, image: ImageFeatures | None) -> list[ModelInputs]:
    """Mimic: one sequence; pref: the chosen and the rejected sequence (one image, processed once)."""
    has_image = image is not None
    if rec.kind == "mimic":
        return [encoder.encode(llava_messages(rec.fields["conversations"], has_image), image)]
    q = rec.fields["question"]
    return [encoder.encode(pref_messages(q, rec.fields[key], has_image), image) for key in ("chosen", "rejected")]


def _request(enc: ModelInputs, image: Image.Image | None, top_k: int, sample: int = 0,
             sample_seed: int = 0) -> ScoreRequest:
    positions = [i for i, m in enumerate(enc.response_mask) if m]
    return ScoreRequest(ids=enc.ids, prompt_ids=enc.prompt_ids, positions=positions, image=image,
                        features=enc.image, top_k=top_k, sample=sample, sample_seed=sample_seed)


def record_seed(seed: int, sample_id: str) -> int:
    """A record's own sampling seed, from the run's seed and the record's id (not its position)."""
    return int(hashlib.sha256(f"{seed}:{sample_id}".encode()).hexdigest()[:15], 16)


def rest_mass(topk_logprobs: np.ndarray) -> np.ndarray:
    """Probability outside the top-k, in float64 before rounding, never below 0."""
    mass = np.exp(topk_logprobs.astype(np.float64)).sum(axis=-1)
    return np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)


def shard_rows(
    backend: TeacherBackend, encoder: SampleEncoder, records: list[Record], top_k: int,
    encoding: Encoding = Encoding("f32"), sample: int = 0, sample_seed: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """Score all records of one shard in one backend call; returns (rows in `encoding`, response tokens)."""
    images, encoded, requests = [], [], []
    for rec in records:
        image, digest = load_image(rec)
        images.append((rec.image_ref, digest))
        encs = encode_record(encoder, rec, encoder.image_features(image))
        encoded.append(encs)
        k = top_k if rec.kind == "mimic" else 0  # preference rows need the targets' log-probs only
        n = sample if rec.kind == "mimic" else 0
        seed = record_seed(sample_seed, rec.sample_id) if n else 0
        requests.extend(_request(e, image, k, n, seed) for e in encs)
    results: list[ScoreResult] = backend.score(requests) if requests else []
    rows: list[dict[str, Any]] = []
    tokens = 0
    it = iter(results)
    for rec, encs, (ref, digest) in zip(records, encoded, images):
        common = {"sample_id": rec.sample_id, "input_row": rec.input_row, "image": ref, "image_sha256": digest}
        if rec.kind == "mimic":
            (enc,) = encs
            res = next(it)
            response_ids = [t for t, m in zip(enc.ids, enc.response_mask) if m]
            tokens += len(response_ids)
            topk_ids, topk_logprobs = encoding.encode_topk(res.topk_ids, res.topk_logprobs)
            rows.append({
                **common,
                "teacher_prompt": enc.text,
                "conversations_json": json.dumps(rec.fields["conversations"], ensure_ascii=False),
                "response_ids": response_ids,
                "response_turn_lengths": enc.turn_lengths,
                "target_logprobs": encoding.encode_targets(res.target_logprobs),
                "topk_ids": topk_ids,
                "topk_logprobs": topk_logprobs,
                "rest_mass": rest_mass(res.topk_logprobs),  # from the unquantised log-probs
                "sampled_ids": res.sampled_ids,
                "sampled_counts": res.sampled_counts,
            })
        else:
            chosen, rejected = encs
            res_c, res_r = next(it), next(it)
            c_ids = [t for t, m in zip(chosen.ids, chosen.response_mask) if m]
            r_ids = [t for t, m in zip(rejected.ids, rejected.response_mask) if m]
            tokens += len(c_ids) + len(r_ids)
            prompt_text = encoder.render(pref_messages(rec.fields["question"], None, bool(digest)), True)
            rows.append({
                **common,
                "teacher_prompt": prompt_text,
                "question": rec.fields["question"],
                "chosen": rec.fields["chosen"],
                "rejected": rec.fields["rejected"],
                "chosen_ids": c_ids,
                "rejected_ids": r_ids,
                "chosen_logprobs": res_c.target_logprobs,
                "rejected_logprobs": res_r.target_logprobs,
                "chosen_logprob_sum": float(res_c.target_logprobs.astype(np.float64).sum()),
                "rejected_logprob_sum": float(res_r.target_logprobs.astype(np.float64).sum()),
            })
    return rows, tokens


class TeacherWorker:
    """Holds one engine for its whole life; one call = one shard written under `out_dir`."""

    def __init__(self, model_dir: str, backend: str, engine: dict[str, Any], top_k: int, out_dir: str,
                 encoding: str = "f32", sample: int = 0, sample_seed: int = 0):
        from shared.mllm import load_encoder
        from teacher_dump.backends import make_backend

        self.encoder = load_encoder(model_dir)
        self.backend = make_backend(backend, model_dir, **engine)
        self.top_k = top_k
        self.encoding = Encoding(encoding)
        self.sample, self.sample_seed = sample, sample_seed
        self.out_dir = Path(out_dir)

    def run_shard(self, task: ShardTask) -> tuple[str, ShardEntry]:
        rows, tokens = shard_rows(self.backend, self.encoder, task.records, self.top_k, self.encoding, self.sample,
                                  self.sample_seed)
        rng = [task.records[0].input_row, task.records[-1].input_row + 1] if task.records else [0, 0]
        entry = write_shard(self.out_dir, task.rel_path, task.kind, task.index, rows, tokens, rng, self.encoding)
        return task.rel_path, entry
