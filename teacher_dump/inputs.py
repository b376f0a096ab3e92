"""Reading and validating the teacher's input data before any teacher starts.

Mimic records are LLaVA-style (`id`, `image`, `conversations` of human/gpt turns); preference
records carry `id`, `image`, `question`, `chosen`, `rejected`. Inputs may be JSONL, JSON (a list),
Parquet, or a `datasets.save_to_disk` directory. Images are paths under the image root, or bytes
(a `datasets` Image column gives {"bytes", "path"}).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from shared.prompt import IMAGE_PLACEHOLDER


class InputError(ValueError):
    """A bad input record; the message names file and row and says what to do."""


@dataclass
class Record:
    kind: str  # "mimic" | "pref"
    sample_id: str
    input_row: int  # 0-based row (JSONL: line number - 1)
    image_ref: str | None  # as given (path), or None
    image_path: str | None  # resolved path, read by the worker (bytes are not held in the driver)
    image_bytes: bytes | None  # only when the input carried the image inline
    fields: dict[str, Any] = field(default_factory=dict)  # conversations | question/chosen/rejected


@dataclass
class Rejection:
    file: str
    row: int
    sample_id: str | None
    reason: str


def _iter_raw(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(row, record or None, parse error or None) for every row of the input."""
    if path.is_dir():
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise InputError(f"{path}: a DatasetDict; point at one split's directory")
        if "image" in ds.column_names and isinstance(ds.features["image"], datasets.Image):
            ds = ds.cast_column("image", datasets.Image(decode=False))
        for i, rec in enumerate(ds):
            yield i, rec, None
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, json.loads(line), None
                except json.JSONDecodeError as e:
                    yield i, None, f"malformed JSON ({e.msg} at column {e.colno})"
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file and rerun") from e
        if not isinstance(data, list):
            raise InputError(f"{path}: expected a JSON list of records")
        yield from ((i, rec, None) for i, rec in enumerate(data))
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield i, rec, None
    else:
        raise InputError(f"{path}: unsupported input; use .jsonl, .json, .parquet or a datasets directory")


def _where(path: Path, row: int) -> str:
    return f"{path}:{row + 1}" if path.suffix in (".jsonl", ".json") else f"{path} row {row}"


def _check_image(raw: Any, image_root: Path) -> tuple[str | None, str | None, bytes | None]:
    """Returns (reference, resolved path, inline bytes); raises ValueError if unusable."""
    if raw is None:
        return None, None, None
    ref: str | None = None
    data: bytes | None = None
    if isinstance(raw, dict):
        data, ref = raw.get("bytes"), raw.get("path")
    elif isinstance(raw, (bytes, bytearray)):
        data = bytes(raw)
    elif isinstance(raw, str):
        ref = raw
    else:
        raise ValueError(f"image must be a path, bytes or {{bytes, path}}, got {type(raw).__name__}")
    resolved = None
    if data is None:
        if not ref:
            raise ValueError("image has neither path nor bytes")
        p = image_root / ref
        if not p.is_file():
            raise ValueError(f"image not found: {p} (check --image-root)")
        resolved = str(p.resolve())
    try:
        with Image.open(resolved or io.BytesIO(data)) as im:
            _ = im.size  # header only: cheap, catches non-images
    except Exception as e:  # PIL raises several types for unreadable images
        raise ValueError(f"image {ref or '<bytes>'} cannot be decoded ({type(e).__name__})") from e
    return ref, resolved, data


def _check_mimic(rec: dict) -> dict[str, Any]:
    turns = rec.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' missing or empty")
    for t, turn in enumerate(turns):
        ok = isinstance(turn, dict) and turn.get("from") in ("human", "gpt") and isinstance(turn.get("value"), str)
        if not ok:
            raise ValueError(f"turn {t} must be {{'from': 'human'|'gpt', 'value': str}}")
    for t, turn in enumerate(turns):
        if turn["from"] == "gpt" and IMAGE_PLACEHOLDER in turn["value"]:
            raise ValueError(f"turn {t}: {IMAGE_PLACEHOLDER} inside an answer; only questions carry the image")
    if turns[0]["from"] != "human":
        raise ValueError("conversation must start with a human turn")
    if not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise ValueError("conversation has no response (no non-empty 'gpt' turn)")
    if sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) > 1:
        raise ValueError(f"more than one {IMAGE_PLACEHOLDER} placeholder; one image per sample is supported")
    return {"conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}


def _check_pref(rec: dict) -> dict[str, Any]:
    out = {}
    for key in ("question", "chosen", "rejected"):
        v = rec.get(key)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"'{key}' missing or empty")
        out[key] = v
    if IMAGE_PLACEHOLDER in out["chosen"] + out["rejected"]:
        raise ValueError(f"{IMAGE_PLACEHOLDER} inside an answer; only the question carries the image")
    if out["chosen"] == out["rejected"]:
        raise ValueError("'chosen' equals 'rejected'")
    return out


def read_records(path: Path, kind: str, image_root: Path | None) -> tuple[list[Record], list[Rejection]]:
    """All valid records of one input file, and the rejected ones with reasons."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input not found")
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    check = _check_mimic if kind == "mimic" else _check_pref
    records: list[Record] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    for row, rec, parse_error in _iter_raw(path):
        sid = str(rec["id"]) if isinstance(rec, dict) and rec.get("id") is not None else None
        try:
            if parse_error:
                raise ValueError(parse_error)
            if not isinstance(rec, dict):
                raise ValueError("record is not an object")
            if sid is None:
                raise ValueError("'id' missing")
            if sid in seen:
                raise ValueError(f"duplicate id {sid!r}")
            fields = check(rec)
            ref, resolved, data = _check_image(rec.get("image"), root)
            if ref is None and data is None and IMAGE_PLACEHOLDER in json.dumps(fields):
                raise ValueError(f"{IMAGE_PLACEHOLDER} placeholder but no 'image'")
        except ValueError as e:
            rejected.append(Rejection(str(path), row, sid, str(e)))
            continue
        seen.add(sid)
        records.append(Record(kind, sid, row, ref, resolved, data, fields))
    return records, rejected


def format_rejection(r: Rejection) -> str:
    where = _where(Path(r.file), r.row)
    ident = f" (id {r.sample_id})" if r.sample_id else ""
    return f"{where}{ident}: {r.reason}"
