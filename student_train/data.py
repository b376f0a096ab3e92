"""Shards -> student examples. The student builds prompts with its own processor and takes the
stored response ids as labels, so teacher and student may differ in template, never in vocabulary."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from shared.fingerprint import tokenizer_fingerprint, vocabulary_facts, vocabulary_mismatch
from shared.manifest import Manifest
from shared.mllm import ModelInputs, SampleEncoder
from shared.prompt import Messages, llava_messages, pref_messages
from shared.shards import shard_paths


class ShardError(ValueError):
    """Shards the student cannot use; the message names the directory and what to do."""


@dataclass
class MimicExample:
    messages: Messages  # rendered by the student's own template
    responses: list[list[int]]  # the teacher's response ids per assistant turn (the labels)
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    image: Image.Image | None


@dataclass
class PrefExample:
    chosen: Messages
    rejected: Messages
    chosen_ids: list[int]
    rejected_ids: list[int]
    ref_chosen: float
    ref_rejected: float
    image: Image.Image | None


def check_shards(dirs: list[Path], kind: str, encoder: SampleEncoder, allow_partial: bool = False) -> list[Path]:
    """Shard files of `kind` from every dir, after checking that each dir's stored ids mean the
    same to the student's tokenizer (tokenizers are compared, not embedding shapes) and that the
    dump is complete (unless `allow_partial`)."""
    mine = vocabulary_facts(encoder.tokenizer)
    files: list[Path] = []
    for d in dirs:
        try:
            manifest = Manifest.load(d)
        except FileNotFoundError as e:
            raise ShardError(str(e)) from None
        if "vocabulary" in manifest.run:
            problem = vocabulary_mismatch(manifest.run["vocabulary"], mine)
        elif manifest.run["tokenizer_sha256"] != tokenizer_fingerprint(encoder.tokenizer):  # older dumps
            problem = "shards were made with another tokenizer"
        else:
            problem = None
        if problem:
            raise ShardError(f"{d}: {problem}")
        planned = manifest.run.get("plan", {}).get("shards", {}).get(kind, 0)
        done = sum(e.kind == kind for e in manifest.shards.values())
        if done < planned and not allow_partial:
            raise ShardError(f"{d}: only {done} of {planned} {kind} shards are finished; rerun `lmod dump-teacher` "
                             "to finish the dump, or pass --allow-partial to train on what is there")
        files.extend(shard_paths(d, kind))
    if not files:
        raise ShardError(f"no {kind} shards in {', '.join(map(str, dirs))}; run `lmod dump-teacher` first")
    return files


def _image(row: dict, image_root: Path | None, where: str) -> Image.Image | None:
    """The image the teacher saw for this row, checked against the digest it stored."""
    if not row["image_sha256"]:
        return None
    if not row["image"]:
        raise ShardError(f"{where}: the teacher was given inline image bytes, which shards do not keep; "
                         "dump from image files (a path per record) to train on it")
    path = Path(row["image"]) if image_root is None else image_root / row["image"]
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{where}: cannot read image {path} ({e.strerror}); check --image-root") from None
    if hashlib.sha256(data).hexdigest() != row["image_sha256"]:
        raise ShardError(f"{where}: {path} is not the image the teacher saw (sha256 differs); point --image-root "
                         "at the images of the dump")
    return Image.open(io.BytesIO(data)).convert("RGB")


def read_shard(path: Path) -> list[dict]:
    """A shard's rows, after checking its bytes against the sha256 in its dump's manifest (a flipped
    byte in a float column reads fine and trains a NaN student)."""
    dump, rel = path.parent.parent, f"{path.parent.name}/{path.name}"
    entry = Manifest.load(dump).shards.get(rel)
    if entry is None:
        raise ShardError(f"{path}: not listed in {dump / 'manifest.json'}; rerun `lmod dump-teacher` on {dump}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardError(f"{path}: cannot read it ({e.strerror})") from None
    if len(data) != entry.bytes or hashlib.sha256(data).hexdigest() != entry.sha256:
        raise ShardError(f"{path}: its bytes differ from the manifest's checksum (corrupted or replaced); "
                         f"`lmod shards verify {dump}` lists the bad shards, rerun `lmod dump-teacher` to redo them")
    return pq.read_table(pa.BufferReader(data)).to_pylist()


def load_mimic(files: list[Path], image_root: Path | None) -> list[MimicExample]:
    out = []
    for f in files:
        for i, row in enumerate(read_shard(f)):
            has_image = bool(row["image_sha256"])
            lengths, responses, start = row["response_turn_lengths"], [], 0
            for n in lengths:
                responses.append(row["response_ids"][start : start + n])
                start += n
            messages = llava_messages(json.loads(row["conversations_json"]), has_image)
            out.append(MimicExample(messages, responses, row["topk_ids"], row["topk_logprobs"],
                                    _image(row, image_root, f"{f} row {i} (id {row['sample_id']})")))
    return out


def load_pref(files: list[Path], image_root: Path | None) -> list[PrefExample]:
    out = []
    for f in files:
        for i, row in enumerate(read_shard(f)):
            has_image = bool(row["image_sha256"])
            out.append(PrefExample(
                pref_messages(row["question"], row["chosen"], has_image),
                pref_messages(row["question"], row["rejected"], has_image),
                row["chosen_ids"], row["rejected_ids"], row["chosen_logprob_sum"], row["rejected_logprob_sum"],
                _image(row, image_root, f"{f} row {i} (id {row['sample_id']})")))
    return out


def label_positions(enc: ModelInputs) -> list[int]:
    """Positions p whose token is a label (predicted from the logits at p - 1)."""
    return [p for p, m in enumerate(enc.response_mask) if m]


def encode_mimic(encoder: SampleEncoder, ex: MimicExample) -> ModelInputs:
    """The student's own prompt around the teacher's stored response ids."""
    return encoder.encode(ex.messages, encoder.image_features(ex.image), responses=ex.responses)


def encode_pref(encoder: SampleEncoder, ex: PrefExample) -> tuple[ModelInputs, ModelInputs]:
    image = encoder.image_features(ex.image)  # one image, processed once for both answers
    return (encoder.encode(ex.chosen, image, responses=[ex.chosen_ids]),
            encoder.encode(ex.rejected, image, responses=[ex.rejected_ids]))


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Sum over each row's label positions of log p(ids[p] | ids[:p]); logits [B, L, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    sums = []
    for b, pos in enumerate(positions):
        p = torch.tensor(pos, device=logits.device)
        sums.append(logp[b, p - 1].gather(-1, ids[b, p][:, None]).sum())
    return torch.stack(sums)
