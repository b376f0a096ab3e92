"""Writing one shard: rows -> Arrow tables of the shared schema -> zstd Parquet, atomically.

`ShardWriter` streams: rows arrive a chunk at a time and leave as row groups, into a temp file
that is renamed when the shard is complete; `table_bytes` is the same encoding for a table in
memory (benchmarks)."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.codec import Encoding
from shared.manifest import ShardEntry, temp_path
from shared.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, ROW_GROUP_ROWS, schema_for

# No timestamps or host names: same rows, same bytes.
_PARQUET_OPTIONS: dict[str, Any] = {
    "compression": PARQUET_COMPRESSION,
    "compression_level": PARQUET_COMPRESSION_LEVEL,
    # Token ids and log-probs do not repeat enough for dictionaries to pay off.
    "use_dictionary": ["sample_id", "image"],
}


def table_bytes(kind: str, rows: list[dict[str, Any]], encoding: Encoding = Encoding("f32")) -> bytes:
    """Serialise rows (already in `encoding`) to Parquet bytes, as a shard stores them."""
    buf = io.BytesIO()
    # The student streams shards a row group at a time and shuffles within windows of row groups:
    # small groups keep its reads and memory small, at a negligible cost in size.
    pq.write_table(pa.Table.from_pylist(rows, schema=schema_for(kind, encoding)), buf,
                   row_group_size=ROW_GROUP_ROWS, **_PARQUET_OPTIONS)
    return buf.getvalue()


class _HashingFile:
    """A binary file that keeps the sha256 and size of what goes through it (no second read)."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by ShardWriter
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        if not self.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            self.closed = True


class ShardWriter:
    """One shard, written as rows come: full row groups of ROW_GROUP_ROWS as soon as they are
    complete, into `.NAME.tmp-PID` beside the shard, renamed on a clean exit (removed on an
    error). Readers never see half a shard; a worker holds at most one row group of rows."""

    def __init__(self, out_dir: Path, rel_path: str, kind: str, index: int, input_range: list[int],
                 encoding: Encoding = Encoding("f32")):
        self.path = Path(out_dir) / rel_path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.path)
        self.kind, self.index, self.input_range = kind, index, input_range
        self.schema = schema_for(kind, encoding)
        self.file = _HashingFile(self.tmp)
        self.writer = pq.ParquetWriter(self.file, self.schema, **_PARQUET_OPTIONS)
        self.pending: list[dict[str, Any]] = []
        self.rows = self.tokens = 0
        self.entry: ShardEntry | None = None

    def write(self, rows: list[dict[str, Any]], tokens: int) -> None:
        self.pending.extend(rows)
        self.rows += len(rows)
        self.tokens += tokens
        while len(self.pending) >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, n: int) -> None:
        table = pa.Table.from_pylist(self.pending[:n], schema=self.schema)
        self.writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        del self.pending[:n]

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.writer.close()
            self.file.close()
            self.tmp.unlink(missing_ok=True)
            return
        if self.pending:
            self._flush(len(self.pending))
        self.writer.close()
        self.file.close()
        os.replace(self.tmp, self.path)
        self.entry = ShardEntry(kind=self.kind, index=self.index, rows=self.rows, tokens=self.tokens,
                                bytes=self.file.size, sha256=self.file.sha256.hexdigest(),
                                input_range=self.input_range)


def write_shard(
    out_dir: Path, rel_path: str, kind: str, index: int, rows: list[dict[str, Any]], tokens: int,
    input_range: list[int], encoding: Encoding = Encoding("f32"),
) -> ShardEntry:
    """A shard from rows in memory (benchmarks, tools): the same bytes as streaming them."""
    with ShardWriter(out_dir, rel_path, kind, index, input_range, encoding) as writer:
        writer.write(rows, tokens)
    assert writer.entry is not None
    return writer.entry
