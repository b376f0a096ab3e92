"""Decoding an image the way every stage sees it: RGB, from its bytes, with one kind of error.

The teacher, the student's loader, evaluation and generation must see the same pixels for the
same file; PIL raises several exception types for truncated or corrupt data, turned here into one
ValueError that says what failed (the caller adds where)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


class ImageError(ValueError):
    """An image that cannot be decoded; the message says why."""


def decode_rgb(data: bytes) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... for damaged files
        raise ImageError(f"cannot be decoded ({type(e).__name__}: {e})") from None


def open_rgb(path: Path) -> Image.Image:
    """The image at `path`, decoded (an unreadable file is an OSError, a damaged one an ImageError)."""
    return decode_rgb(Path(path).read_bytes())
