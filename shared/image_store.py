"""The images a teacher saw that came inline (bytes in the input: a `datasets` Image column,
RLAIF-V's struct), kept inside the dump so the student can read what the teacher saw: one file per
sha256 of the bytes, `DUMP/images/ab/abcdef...`, written once by whichever worker meets it first.
Images given as paths stay where they are (the shards name them and store their sha256)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

from shared.manifest import atomic_write_bytes

STORE_DIR = "images"


def store_path(dump_dir: Path, sha256: str) -> Path:
    return Path(dump_dir) / STORE_DIR / sha256[:2] / sha256


def put(dump_dir: Path, data: bytes, sha256: str) -> None:
    """Write `data` under its digest unless it is there, intact (a temp name, then an atomic
    rename: two workers writing the same image write the same bytes)."""
    path = store_path(dump_dir, sha256)
    if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == sha256:
        return  # a damaged copy (bytes not its name's digest) is written again
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data)


def stored(dump_dir: Path) -> Iterator[Path]:
    root = Path(dump_dir) / STORE_DIR
    yield from (p for p in sorted(root.glob("*/*")) if p.is_file() and not p.name.startswith(".")) if root.is_dir() \
        else ()


def problems(dump_dir: Path, referenced: set[str]) -> list[str]:
    """Stored files whose bytes are not their name's digest, and referenced digests not stored."""
    found: list[str] = []
    names = set()
    for path in stored(dump_dir):
        names.add(path.name)
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name:
            found.append(f"{STORE_DIR}/{path.parent.name}/{path.name}: bytes differ from their sha256 name")
    found += [f"{STORE_DIR}/{sha[:2]}/{sha}: missing (an inline image the shards use)"
              for sha in sorted(referenced - names)]
    return found
