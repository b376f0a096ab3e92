"""Shards -> student examples. The student builds prompts with its own processor and takes the
stored response ids as labels, so teacher and student may differ in template, never in vocabulary."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image

from shared.fingerprint import tokenizer_fingerprint
from shared.manifest import Manifest
from shared.mllm import SampleEncoder
from shared.prompt import conversation_segments, pref_segments, with_placeholder
from shared.shards import shard_paths


class ShardError(ValueError):
    """Shards the student cannot use; the message names the directory and what to do."""


@dataclass
class MimicExample:
    ids: list[int]
    label_positions: list[int]  # positions p in ids whose token is a label (predicted from p-1)
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    image: Image.Image | None


@dataclass
class PrefExample:
    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_positions: list[int]
    rejected_positions: list[int]
    ref_chosen: float
    ref_rejected: float
    image: Image.Image | None


def check_shards(dirs: list[Path], kind: str, encoder: SampleEncoder) -> list[Path]:
    """Shard files of `kind` from every dir, after checking each dir's tokenizer fingerprint."""
    mine = tokenizer_fingerprint(encoder.tokenizer)
    files: list[Path] = []
    for d in dirs:
        try:
            manifest = Manifest.load(d)
        except FileNotFoundError as e:
            raise ShardError(str(e)) from None
        if manifest.run["tokenizer_sha256"] != mine:
            raise ShardError(
                f"{d}: shards were made with another tokenizer ({manifest.run['tokenizer_sha256'][:12]} != "
                f"student's {mine[:12]}); train a student with the teacher's tokenizer or re-dump"
            )
        files.extend(shard_paths(d, kind))
    if not files:
        raise ShardError(f"no {kind} shards in {', '.join(map(str, dirs))}; run `lmod dump-teacher` first")
    return files


def _image(ref: str | None, image_root: Path | None) -> Image.Image | None:
    if not ref:
        return None
    path = Path(ref) if image_root is None else image_root / ref
    return Image.open(io.BytesIO(path.read_bytes())).convert("RGB")


def _with_response_ids(encoder: SampleEncoder, segments: list[tuple[str, bool]],
                       responses: list[list[int]]) -> tuple[list[int], list[int]]:
    """Prompt tokenised by the student; response segments take the stored ids. Returns the
    expanded ids and the label positions."""
    enc = encoder.encode(segments, responses)
    return enc.ids, [p for p, m in enumerate(enc.response_mask) if m]


def load_mimic(files: list[Path], encoder: SampleEncoder, image_root: Path | None) -> list[MimicExample]:
    out = []
    for f in files:
        for row in pq.read_table(f).to_pylist():
            turns = json.loads(row["conversations_json"])
            turns = with_placeholder(turns, bool(row["image"]))
            lengths, responses, start = row["response_turn_lengths"], [], 0
            for n in lengths:
                responses.append(row["response_ids"][start : start + n])
                start += n
            ids, positions = _with_response_ids(encoder, conversation_segments(turns), responses)
            out.append(MimicExample(ids, positions, row["topk_ids"], row["topk_logprobs"],
                                    _image(row["image"], image_root)))
    return out


def load_pref(files: list[Path], encoder: SampleEncoder, image_root: Path | None) -> list[PrefExample]:
    out = []
    for f in files:
        for row in pq.read_table(f).to_pylist():
            segs = pref_segments(row["question"], "", bool(row["image"]))
            c_ids, c_pos = _with_response_ids(encoder, segs, [row["chosen_ids"]])
            r_ids, r_pos = _with_response_ids(encoder, segs, [row["rejected_ids"]])
            out.append(PrefExample(c_ids, r_ids, c_pos, r_pos, row["chosen_logprob_sum"],
                                   row["rejected_logprob_sum"], _image(row["image"], image_root)))
    return out


def sequence_logprobs(logits: torch.Tensor, ids: torch.Tensor, positions: list[list[int]]) -> torch.Tensor:
    """Sum over each row's label positions of log p(ids[p] | ids[:p]); logits [B, L, V]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    sums = []
    for b, pos in enumerate(positions):
        p = torch.tensor(pos, device=logits.device)
        sums.append(logp[b, p - 1].gather(-1, ids[b, p][:, None]).sum())
    return torch.stack(sums)
