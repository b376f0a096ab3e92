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

import numpy as np
from PIL import Image

from shared.manifest import atomic_file
from shared.prompt import IMAGE_PLACEHOLDER


class InputError(ValueError):
    """A bad input record; the message names file and row and says what to do."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a record, as the input gave it."""

    ref: str | None  # as given (path), or None
    path: str | None  # resolved path, read by the worker (bytes are not held in the driver)
    data: bytes | None  # only when the input carried the image inline


@dataclass
class Record:
    kind: str  # "mimic" | "pref"
    sample_id: str
    input_row: int  # 0-based row (JSONL: line number - 1)
    images: list[ImageRef] = field(default_factory=list)  # in the order of their placeholders
    fields: dict[str, Any] = field(default_factory=dict)  # conversations | question/chosen/rejected


@dataclass
class Rejection:
    file: str
    row: int
    sample_id: str | None
    reason: str


def input_format(path: Path) -> str:
    """jsonl | json | parquet | datasets; anything else is refused."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: input not found")
    if path.is_dir():
        return "datasets"
    if path.suffix in (".jsonl", ".json", ".parquet"):
        return path.suffix[1:]
    raise InputError(f"{path}: unsupported input; use .jsonl, .json, .parquet or a datasets directory")


def _load_dataset(path: Path) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: opening it reads no rows
    if isinstance(ds, datasets.DatasetDict):
        raise InputError(f"{path}: a DatasetDict; point at one split's directory")
    # Images stay bytes ({bytes, path}): decoded where they are checked, not on every row read.
    for name in ("image", "images"):  # one Image, or a list of them, under either name
        if name not in ds.column_names:
            continue
        if isinstance(ds.features[name], datasets.Image):
            ds = ds.cast_column(name, datasets.Image(decode=False))
        elif isinstance(getattr(ds.features[name], "feature", None), datasets.Image):
            ds = ds.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return ds


def _load_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file and rerun") from e
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    return data


def json_list_to_jsonl(src: Path, dst: Path) -> int:
    """Stream one JSON list of records (LLaVA's 665k mix is ~1 GB of it) into JSONL, a record per
    line, in bounded memory (ijson's incremental parser); written to a temporary name and renamed.
    Returns the records written. Line N of the result is record N of the list."""
    import ijson

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    try:
        with open(src, "rb") as f, atomic_file(dst, "w", encoding="utf-8") as out:
            head = f.read(1 << 12).lstrip()
            if not head.startswith(b"["):
                raise InputError(f"{src}: expected a JSON list of records")
            f.seek(0)
            for record in ijson.items(f, "item", use_float=True):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    except ijson.JSONError as e:
        raise InputError(f"{src}: malformed JSON after record {n} ({e}); fix the file and rerun") from None
    return n


_CHUNK = 1 << 22  # bytes read at a time when scanning JSONL for line boundaries


def _jsonl_lines(path: Path) -> int:
    """Lines in the file (a last line without a newline counts), in fixed-size reads."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            n += chunk.count(b"\n")
            last = chunk[-1:]
    return n + (last != b"\n")


def _jsonl_line_starts(path: Path, rows: list[int]) -> list[int]:
    """Byte offset where each of `rows` (ascending line numbers; the line count means end of file)
    starts, found in one more pass of fixed-size reads."""
    offsets: dict[int, int] = {0: 0}
    wanted = sorted(set(rows) - {0})
    i = 0
    line, pos = 0, 0  # lines seen before `pos`, and the byte offset of the current chunk
    with open(path, "rb") as f:
        while i < len(wanted) and (chunk := f.read(_CHUNK)):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            # line `line + j + 1` starts right after the j-th newline of this chunk
            while i < len(wanted) and wanted[i] <= line + len(newlines):
                offsets[wanted[i]] = pos + int(newlines[wanted[i] - line - 1]) + 1
                i += 1
            line += len(newlines)
            pos += len(chunk)
    for row in wanted[i:]:
        offsets[row] = pos  # the end of a file whose last line has no newline
    return [offsets[r] for r in rows]


def count_rows(path: Path) -> int:
    """Rows of an input without reading its records: JSONL lines, Parquet metadata, a dataset's length."""
    path = Path(path)
    fmt = input_format(path)
    if fmt == "jsonl":
        return _jsonl_lines(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    if fmt == "datasets":
        return len(_load_dataset(path))
    return len(_load_json_list(path))


@dataclass(frozen=True)
class InputSlice:
    """Rows [lo, hi) of one input file: what one shard reads. JSONL slices carry byte offsets, so a
    worker seeks to its rows instead of reading the file from the start."""

    path: str
    kind: str
    lo: int
    hi: int
    start: int = 0  # JSONL: byte offset of row lo
    end: int = 0  # JSONL: byte offset of row hi


def plan_slices(path: Path, kind: str, n_shards: int, rows: int) -> list[InputSlice]:
    """`n_shards` contiguous, deterministic row ranges (never more than rows), from the row count only."""
    n = min(n_shards, rows)
    bounds = [i * rows // n for i in range(n + 1)]
    offsets = _jsonl_line_starts(Path(path), bounds) if input_format(path) == "jsonl" else [0] * (n + 1)
    return [InputSlice(str(path), kind, bounds[i], bounds[i + 1], offsets[i], offsets[i + 1]) for i in range(n)]


def iter_slice(sl: InputSlice) -> Iterator[tuple[int, Any, str | None]]:
    """(row, record or None, parse error or None) for the rows of one slice; blank JSONL lines are
    no record. Memory: one line, one Parquet row group, or one dataset row at a time (a JSON list is
    parsed whole, by every slice)."""
    path = Path(sl.path)
    fmt = input_format(path)
    if fmt == "jsonl":
        with open(path, "rb") as f:
            f.seek(sl.start)
            for row in range(sl.lo, sl.hi):
                line = f.readline()
                if not line.strip():
                    continue
                try:
                    yield row, json.loads(line), None
                except UnicodeDecodeError:
                    yield row, None, "not UTF-8 text"
                except json.JSONDecodeError as e:
                    yield row, None, f"malformed JSON ({e.msg} at column {e.colno})"
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        first = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if first < sl.hi and first + n > sl.lo:
                lo, hi = max(sl.lo, first), min(sl.hi, first + n)
                table = pf.read_row_group(g).slice(lo - first, hi - lo)
                yield from ((lo + i, rec, None) for i, rec in enumerate(table.to_pylist()))
            first += n
    elif fmt == "datasets":
        ds = _load_dataset(path)
        for i, rec in enumerate(ds.select(range(sl.lo, sl.hi))):
            yield sl.lo + i, rec, None
    else:
        data = _load_json_list(path)
        yield from ((row, data[row], None) for row in range(sl.lo, sl.hi))


def _where(path: Path, row: int) -> str:
    return f"{path}:{row + 1}" if path.suffix in (".jsonl", ".json") else f"{path} row {row}"


def _check_image(raw: Any, image_root: Path) -> ImageRef:
    """One image as given (a path under the root, bytes, or {bytes, path}); ValueError if unusable."""
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
    return ImageRef(ref, resolved, data)


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
            raise ValueError(f"turn {t}: {IMAGE_PLACEHOLDER} inside an answer; only questions carry images")
    if turns[0]["from"] != "human":
        raise ValueError("conversation must start with a human turn")
    sampled = _sampled_ids(rec)
    # A sampled answer that is only its end token is still a sample to score (on-policy rounds).
    answers = turns[:-1] if sampled else turns
    if not sampled and not any(t["from"] == "gpt" and t["value"].strip() for t in turns):
        raise ValueError("conversation has no response (no non-empty 'gpt' turn)")
    empty = next((i for i, t in enumerate(answers) if t["from"] == "gpt" and not t["value"].strip()), None)
    if empty is not None:
        raise ValueError(f"turn {empty}: an empty answer (the student would learn to say nothing); drop the turn")
    fields: dict[str, Any] = {"conversations": [{"from": t["from"], "value": t["value"]} for t in turns]}
    if sampled:
        if turns[-1]["from"] != "gpt":
            raise ValueError("'generation.response_ids' given, but the conversation does not end with an answer")
        fields["generation"] = {"vocab_sha256": rec["generation"].get("vocab_sha256"), "response_ids": sampled}
    return fields


def _sampled_ids(rec: dict) -> list[int] | None:
    """The ids `lmod generate` sampled for the last answer (its `generation.response_ids`), if any."""
    generation = rec.get("generation")
    ids = generation.get("response_ids") if isinstance(generation, dict) else None
    if ids is None:
        return None
    if not (isinstance(ids, list) and ids and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                  for t in ids)):
        raise ValueError("'generation.response_ids' must be a non-empty list of token ids (as lmod generate "
                         "writes it); drop it to score the answer's text")
    return ids


def _check_pref(rec: dict) -> dict[str, Any]:
    out = {}
    for key in ("question", "chosen", "rejected"):
        v = rec.get(key)
        if not isinstance(v, str) or not v.strip():
            raise ValueError(f"'{key}' missing or empty")
        out[key] = v
    if IMAGE_PLACEHOLDER in out["chosen"] + out["rejected"]:
        raise ValueError(f"{IMAGE_PLACEHOLDER} inside an answer; only the question carries images")
    if out["chosen"] == out["rejected"]:
        raise ValueError("'chosen' equals 'rejected'")
    return out


# ----------------------------------------------------------------------------------------------
# Formats users have, read into lmod's own (LLaVA conversations; id/image/question/chosen/rejected)


def generated_id(path: Path, row: int) -> str:
    """The id of a record that has none (raw RLAIF-V has `idx`, TRL's sets nothing): file and row,
    stable across reruns of the same file."""
    return f"{Path(path).name}:{row}"


def _message_text(content: Any, where: str) -> tuple[str, int]:
    """TRL message content (a string, or parts of type text/image) -> text with an `<image>`
    placeholder per image part, and the number of image parts."""
    if isinstance(content, str):
        return content, content.count(IMAGE_PLACEHOLDER)
    if not isinstance(content, list):
        raise ValueError(f"{where}: 'content' must be a string or a list of parts")
    text, images = "", 0
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            text, images = text + IMAGE_PLACEHOLDER + "\n", images + 1
        elif kind == "text" and isinstance(part.get("text"), str):
            text += part["text"]
        else:
            raise ValueError(f"{where}: a content part must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
    return text, images


def _turns(messages: Any, where: str, roles: tuple[str, ...]) -> list[dict[str, str]]:
    if isinstance(messages, str):  # a conversation stored as a JSON string (Parquet exports do this)
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise ValueError(f"'{where}' is a string that is not JSON") from None
    if not isinstance(messages, list):
        raise ValueError(f"'{where}' must be a list of messages")
    turns = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in roles:
            raise ValueError(f"{where} message {i}: role {role!r}; lmod reads {' and '.join(roles)} turns")
        text, _ = _message_text(m.get("content"), f"{where} message {i}")
        turns.append({"from": "human" if role == "user" else "gpt", "value": text})
    return turns


def _images(rec: dict) -> list[Any]:
    """`image` (one, or a list), or TRL's / LLaVA-OneVision's `images` list, in placeholder order."""
    image, listed = rec.get("image"), rec.get("images")
    if image is not None and listed:
        raise ValueError("both 'image' and 'images' given; keep one")
    # A union of formats (LLaVA rows beside TRL rows in one Parquet table) gives every row both
    # columns, the unused one null or empty: whichever holds images counts.
    images = listed if listed else image if image is not None else listed
    if images is None:
        return []
    if images is listed and images is not None and not isinstance(images, list):
        raise ValueError("'images' must be a list")
    return list(images) if isinstance(images, list) else [images]


def canonical(kind: str, rec: dict) -> dict:
    """A record in any accepted format -> lmod's own fields. Mimic: LLaVA `conversations` (also as
    a JSON string), or TRL's conversational `messages` (+ `images`). Preference: `question` /
    `chosen` / `rejected` strings (lmod's and raw RLAIF-V's), or TRL's vision preference format
    (`prompt`, `chosen`, `rejected` as message lists, `images`)."""
    out = {"id": rec.get("id"), "images": _images(rec)}
    if kind == "mimic" and isinstance(rec.get("generation"), dict):  # written by lmod generate: its sampled ids
        out["generation"] = rec["generation"]
    if kind == "mimic":
        if "conversations" in rec:
            conv = rec["conversations"]
            if isinstance(conv, str):
                try:
                    conv = json.loads(conv)
                except json.JSONDecodeError:
                    raise ValueError("'conversations' is a string that is not JSON") from None
            return {**out, "conversations": conv}
        if "messages" in rec:
            return {**out, "conversations": _turns(rec["messages"], "messages", ("user", "assistant"))}
        raise ValueError("'conversations' (LLaVA) or 'messages' (TRL) missing")
    if isinstance(rec.get("prompt"), (list, str)) and "question" not in rec:
        prompt = _turns(rec["prompt"], "prompt", ("user",))
        answers = {k: _turns(rec.get(k), k, ("assistant",)) for k in ("chosen", "rejected")}
        if len(prompt) != 1 or any(len(a) != 1 for a in answers.values()):
            raise ValueError("TRL preference rows need one user turn in 'prompt' and one assistant turn in 'chosen' "
                             "and 'rejected'")
        return {**out, "question": prompt[0]["value"], **{k: a[0]["value"] for k, a in answers.items()}}
    return {**out, **{k: rec.get(k) for k in ("question", "chosen", "rejected")}}


def check_row(path: Path, kind: str, row: int, rec: Any, parse_error: str | None,
              image_root: Path | None) -> Record | Rejection:
    """One raw row -> a Record, or the reason it is invalid (fields and image header; the image's
    pixels, the template and the length are checked where the record is encoded)."""
    path = Path(path)
    root = Path(image_root) if image_root else (path if path.is_dir() else path.parent)
    sid = None
    if isinstance(rec, dict):
        sid = str(rec["id"]) if rec.get("id") is not None else generated_id(path, row)
    try:
        if parse_error:
            raise ValueError(parse_error)
        if not isinstance(rec, dict):
            raise ValueError("record is not an object")
        if not sid.strip():
            raise ValueError("'id' is empty; give every record a unique id (or none: lmod then uses FILE:ROW)")
        rec = canonical(kind, rec)
        fields = (_check_mimic if kind == "mimic" else _check_pref)(rec)
        images = []
        for i, raw in enumerate(rec["images"]):
            try:
                images.append(_check_image(raw, root))
            except ValueError as e:
                raise ValueError(f"image {i + 1} of {len(rec['images'])}: {e}" if len(rec["images"]) > 1
                                 else str(e)) from None
        placeholders = json.dumps(fields, ensure_ascii=False).count(IMAGE_PLACEHOLDER)
        if placeholders and placeholders != len(images):
            raise ValueError(f"{placeholders} {IMAGE_PLACEHOLDER} placeholders for {len(images)} images; give one "
                             "per image, or none (the images then go before the first question)")
    except ValueError as e:
        return Rejection(str(path), row, sid, str(e))
    return Record(kind, sid, row, images, fields)


def read_records(path: Path, kind: str, image_root: Path | None) -> tuple[list[Record], list[Rejection]]:
    """All valid records of one (small) input file and the rejected ones: benchmarks and tools.
    A dump never holds them all; its workers read slices."""
    path = Path(path)
    records: list[Record] = []
    rejected: list[Rejection] = []
    seen: set[str] = set()
    rows = count_rows(path)
    for sl in plan_slices(path, kind, 1, rows) if rows else []:
        for row, rec, err in iter_slice(sl):
            out = check_row(path, kind, row, rec, err, image_root)
            if isinstance(out, Record) and out.sample_id in seen:
                out = Rejection(str(path), row, out.sample_id, f"duplicate id {out.sample_id!r}")
            if isinstance(out, Rejection):
                rejected.append(out)
            else:
                seen.add(out.sample_id)
                records.append(out)
    return records, rejected


def format_rejection(r: Rejection) -> str:
    where = _where(Path(r.file), r.row)
    ident = f" (id {r.sample_id})" if r.sample_id else ""
    return f"{where}{ident}: {r.reason}"
