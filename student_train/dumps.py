"""The teacher dumps a student command reads, each opened once.

`Dumps.open` reads every dump's manifest a single time; the shard check (data.check_shards), the
tokenizer bridge (cross_tokenizer.TokenBridge.for_dumps) and the image folder default all take the
opened dumps instead of reading the manifests again.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from shared.manifest import Manifest


class ShardError(ValueError):
    """Shards the student cannot use; the message names the file (and row) and what to do."""


@dataclass(frozen=True)
class Dump:
    dir: Path
    manifest: Manifest


@dataclass(frozen=True)
class Dumps:
    """One or more dump directories, in the order given, with their manifests."""

    items: tuple[Dump, ...]

    @classmethod
    def open(cls, dirs: Sequence[Path] | Dumps) -> Dumps:
        """Each manifest read once; a missing one or a directory given twice is a ShardError."""
        if isinstance(dirs, Dumps):
            return dirs
        seen: dict[Path, Path] = {}
        items = []
        for d in map(Path, dirs):
            if d.resolve() in seen:
                raise ShardError(f"{d}: given twice in --dump (as {seen[d.resolve()]}); its rows would be "
                                 "trained twice")
            seen[d.resolve()] = d
            try:
                items.append(Dump(d, Manifest.load(d)))
            except FileNotFoundError as e:
                raise ShardError(str(e)) from None
        return cls(tuple(items))

    def __iter__(self) -> Iterator[Dump]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dirs(self) -> list[Path]:
        return [d.dir for d in self.items]

    def image_root(self, kind: str) -> Path | None:
        """The folder the teacher found this kind's image paths in (recorded in each manifest), when
        every dump recorded the same one and it exists here; else None (pass --image-root)."""
        roots = {d.manifest.image_roots.get(kind) for d in self.items}
        root = roots.pop() if len(roots) == 1 else None
        return Path(root) if root and Path(root).is_dir() else None
