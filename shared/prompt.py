"""Conversations -> standard chat messages -> the model's own chat template, with response spans.

LLaVA-style data (human/gpt turns, an `<image>` placeholder in the text) becomes standard
messages (`{"role", "content": [{"type": "image"}, {"type": "text", "text": ...}]}`), which the
model's chat template renders. Response spans come from the template itself: for assistant turn
i, the rendering of messages[:i] with `add_generation_prompt=True` must be a prefix of the
rendering of messages[:i+1]; what follows it is that turn's chunk. The caller (shared.mllm) keeps
the chunk's tokens up to and including the first end-of-turn token as the response, so the
student learns to stop. A template that rewrites earlier turns (no prefix property) is refused:
we never guess where a response starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

IMAGE_PLACEHOLDER = "<image>"  # the placeholder of LLaVA-style *data*; models render their own token

Messages = list[dict[str, Any]]


class TemplateError(ValueError):
    """A chat template that cannot be split into prompt and response; names the model."""


def _content(text: str, images_here: int) -> list[dict[str, Any]]:
    """Text with `<image>` placeholders -> content items; whitespace next to a placeholder goes
    (the template decides the layout around an image). `images_here` more go first."""
    items: list[dict[str, Any]] = []
    parts = text.split(IMAGE_PLACEHOLDER)
    for i, part in enumerate(parts):
        if i > 0:
            items.append({"type": "image"})
        part = part.strip() if len(parts) > 1 else part
        if part:
            items.append({"type": "text", "text": part})
    return [{"type": "image"}] * images_here + items


def llava_messages(turns: Sequence[dict[str, str]], images: int | bool) -> Messages:
    """LLaVA turns -> messages with `images` images (a bool: one or none). Placeholders put each
    image where it is; data without any gets its images before the first question, as LLaVA does."""
    placed = any(IMAGE_PLACEHOLDER in t["value"] for t in turns)
    messages: Messages = []
    for i, turn in enumerate(turns):
        role = "user" if turn["from"] == "human" else "assistant"
        if role == "assistant":
            messages.append({"role": role, "content": [{"type": "text", "text": turn["value"]}]})
        else:
            messages.append({"role": role, "content": _content(turn["value"], int(images) if not placed and i == 0
                                                               else 0)})
    return messages


def pref_messages(question: str, answer: str | None, images: int | bool) -> Messages:
    """A preference prompt (and one of its answers): one user turn, one assistant turn."""
    turns = [{"from": "human", "value": question}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return llava_messages(turns, images)


@dataclass
class Rendered:
    text: str
    chunks: list[tuple[int, int]]  # character span of each assistant turn's chunk in `text`


Render = Callable[[Messages, bool], str]  # (messages, add_generation_prompt) -> text


def render_with_spans(render: Render, messages: Messages, model: str) -> Rendered:
    """The full rendering and, per assistant turn, the span the template gives it."""
    text = render(messages, False)
    chunks: list[tuple[int, int]] = []
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not upto.startswith(prefix) or not text.startswith(upto):
            raise TemplateError(
                f"{model}: its chat template does not render conversations incrementally (turn {i} changes "
                "what came before it), so prompt and response cannot be told apart; use a template that "
                "renders earlier turns unchanged"
            )
        if chunks and len(prefix) < chunks[-1][1]:
            raise TemplateError(f"{model}: its chat template renders assistant turns that overlap")
        chunks.append((len(prefix), len(upto)))
    return Rendered(text, chunks)
