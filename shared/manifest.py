"""The dump manifest: run-level facts and one entry per finished shard. Written atomically."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

from shared.schema import FORMAT_VERSION, MANIFEST_NAME, READABLE_VERSIONS


@dataclass
class ShardEntry:
    kind: str
    index: int
    rows: int
    tokens: int  # response tokens (mimic) or chosen + rejected tokens (pref)
    bytes: int
    sha256: str
    input_range: list[int]  # [first, last + 1) rows of the input file


@dataclass
class RunRecord:
    """The manifest's `run` section, typed and defined once: what the teacher run was (written by
    the dump, read by `shards info/verify`, the resume checks and the student). The JSON keys are
    the field names; fields older dumps lack get their defaults."""

    teacher: dict[str, Any]  # model (path), config_sha256, weights digest
    tokenizer_sha256: str
    top_k: int
    backend: str
    dtype: str
    vocabulary: dict[str, Any] | None = None  # shared/fingerprint.py:vocabulary_facts (older dumps: none)
    vocab_size: int | None = None
    encoding: dict[str, Any] = field(default_factory=lambda: {"name": "f32"})
    sample: dict[str, int] | None = None  # RS-KD draws and seed
    vllm_scoring: str | None = None  # vllm backend only: hidden | logprobs
    max_model_len: int | None = None
    max_images: int | None = None  # most images per sample (--max-images); older dumps: none
    inputs: dict[str, Any] = field(default_factory=dict)  # per kind: file, sha256, rows (, converted)
    plan: dict[str, Any] = field(default_factory=dict)  # shards_requested, shards per kind
    records: dict[str, int] | None = None  # valid records per kind (after validation)
    rejected: int | None = None  # records refused (OUT/rejected.jsonl)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None or k in ("sample",)}

    def planned_shards(self, kind: str) -> int:
        return int(self.plan.get("shards", {}).get(kind, 0))

    def input_sha256(self, kind: str) -> str | None:
        return self.inputs.get(kind, {}).get("sha256")


class ManifestError(ValueError):
    """A dump's manifest lmod cannot read; the message names the file and what to do."""


@dataclass
class Manifest:
    run: dict[str, Any]  # a RunRecord as JSON: read it through `record`
    shards: dict[str, ShardEntry] = field(default_factory=dict)  # relative path -> entry
    format_version: int = FORMAT_VERSION
    # Where each kind's image paths were found when the dump ran (absolute): the student's default
    # --image-root. Not part of the run: moving the images does not change what was dumped.
    image_roots: dict[str, str] = field(default_factory=dict)

    @property
    def record(self) -> RunRecord:
        return RunRecord.from_dict(self.run)

    def to_json(self) -> str:
        body = {
            "format_version": self.format_version,
            "run": self.run,
            "shards": {name: asdict(e) for name, e in sorted(self.shards.items())},
        }
        if self.image_roots:
            body["image_roots"] = dict(sorted(self.image_roots.items()))
        return json.dumps(body, indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, out_dir: Path) -> Manifest:
        path = Path(out_dir) / MANIFEST_NAME
        if not Path(out_dir).is_dir():
            raise FileNotFoundError(f"{out_dir}: not a directory; give a `lmod dump-teacher` output directory")
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no manifest; is this a `lmod dump-teacher` output?") from None
        except json.JSONDecodeError as e:
            raise ManifestError(f"{path}: manifest is not valid JSON ({e.msg})") from e
        if body.get("format_version") not in READABLE_VERSIONS:
            raise ManifestError(f"{path}: shard format version {body.get('format_version')}, this lmod reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))}; upgrade lmod")
        if not isinstance(body.get("run"), dict) or not body["run"]:
            raise ManifestError(f"{path}: records no run (an empty or hand-made manifest); rerun `lmod dump-teacher`")
        try:
            shards = {name: ShardEntry(**e) for name, e in body.get("shards", {}).items()}
        except TypeError as e:
            raise ManifestError(f"{path}: a shard entry is malformed ({e}); rerun `lmod dump-teacher`") from None
        try:
            RunRecord.from_dict(body["run"])
        except TypeError as e:
            raise ManifestError(f"{path}: its run section is incomplete ({e}); rerun `lmod dump-teacher`") from None
        roots = body.get("image_roots") or {}
        return cls(run=body["run"], shards=shards, format_version=body["format_version"],
                   image_roots={str(k): str(v) for k, v in roots.items()} if isinstance(roots, dict) else {})

    def save(self, out_dir: Path) -> None:
        atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, self.to_json().encode())


def temp_path(path: Path) -> Path:
    """A temporary name beside `path` that no other process writes, on any host sharing the
    filesystem (host, pid and a random part): `.NAME.tmp-HOST-PID-RANDOM`. Sweeps match `.*.tmp-*`."""
    import socket
    import uuid

    return Path(path).with_name(f".{Path(path).name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextmanager
def atomic_file(path: Path, mode: str = "wb", **open_kw: Any) -> Iterator[IO]:
    """A file written under a temporary name in the same directory, fsynced and renamed onto
    `path` when the block ends without an error (else removed): readers never see half a file."""
    tmp = temp_path(path)
    try:
        with open(tmp, mode, **open_kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`data` at `path`, all or nothing (atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)
