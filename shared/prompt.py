"""Turning conversations into token ids with a response mask, the same way for every backend.

Text is tokenised segment by segment (never across a prompt/response boundary), so we know
exactly which ids are response tokens. The single `<image>` placeholder id is then replaced by the
model's own expansion (e.g. Idefics3: <fake><global-img><image>*n<fake>), which the caller gets once
from the model's processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"
END_OF_TURN = "<end_of_utterance>"
USER_PREFIX = "User:"
ASSISTANT_PREFIX = "\nAssistant:"


@dataclass
class EncodedSample:
    ids: list[int]  # unexpanded: one placeholder id per image
    response_mask: list[bool]  # True where ids[i] is a response token (a label)
    turn_lengths: list[int]  # response tokens per assistant turn
    text: str  # the joined text, for humans


def conversation_segments(turns: Sequence[dict[str, str]]) -> list[tuple[str, bool]]:
    """LLaVA-style turns -> [(text, is_response)] in the tiny chat format.

    User:<image>\\nQ<end_of_utterance>\\nAssistant: A<end_of_utterance>\\nUser:...
    """
    segments: list[tuple[str, bool]] = []
    for turn in turns:
        if turn["from"] == "human":
            lead = "\n" if segments else ""
            segments.append((f"{lead}{USER_PREFIX}{turn['value']}{END_OF_TURN}{ASSISTANT_PREFIX}", False))
        else:
            segments.append((f" {turn['value']}{END_OF_TURN}", True))
    return segments


def with_placeholder(turns: list[dict], has_image: bool) -> list[dict]:
    """LLaVA data sometimes omits `<image>`; like LLaVA, put it before the first question."""
    if not has_image or any(IMAGE_PLACEHOLDER in t["value"] for t in turns):
        return turns
    first = {"from": turns[0]["from"], "value": f"{IMAGE_PLACEHOLDER}\n{turns[0]['value']}"}
    return [first, *turns[1:]]


def encode_segments(
    tokenizer: Any, segments: Sequence[tuple[str, bool]], responses: Sequence[Sequence[int]] | None = None
) -> EncodedSample:
    """Tokenise segment by segment; with `responses`, response segments take those ids instead
    (the student uses the teacher's stored response ids as labels)."""
    ids: list[int] = []
    mask: list[bool] = []
    turn_lengths: list[int] = []
    stored = iter(responses) if responses is not None else None
    for text, is_response in segments:
        if is_response and stored is not None:
            piece = list(next(stored))
        else:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        mask.extend([is_response] * len(piece))
        if is_response:
            turn_lengths.append(len(piece))
    return EncodedSample(ids, mask, turn_lengths, "".join(t for t, _ in segments))


def expand_placeholder(
    sample: EncodedSample, placeholder_id: int, expansion: Sequence[int]
) -> tuple[list[int], list[bool]]:
    """Replace each placeholder id by the model's image token run (never a response token)."""
    ids: list[int] = []
    mask: list[bool] = []
    for tok, m in zip(sample.ids, sample.response_mask):
        if tok == placeholder_id:
            ids.extend(expansion)
            mask.extend([False] * len(expansion))
        else:
            ids.append(tok)
            mask.append(m)
    return ids, mask


def pref_segments(question: str, answer: str, has_image: bool) -> list[tuple[str, bool]]:
    q = question if (not has_image or IMAGE_PLACEHOLDER in question) else f"{IMAGE_PLACEHOLDER}\n{question}"
    return conversation_segments([{"from": "human", "value": q}, {"from": "gpt", "value": answer}])
