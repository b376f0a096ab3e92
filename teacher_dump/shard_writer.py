"""Writing one shard: rows -> Arrow table of the shared schema -> zstd Parquet, atomically."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.codec import Encoding
from shared.manifest import ShardEntry, atomic_write_bytes
from shared.schema import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL, ROW_GROUP_ROWS, schema_for


def table_bytes(kind: str, rows: list[dict[str, Any]], encoding: Encoding = Encoding("f32")) -> bytes:
    """Serialise rows (already in `encoding`) to Parquet bytes. No timestamps or host names: same
    rows, same bytes."""
    table = pa.Table.from_pylist(rows, schema=schema_for(kind, encoding))
    buf = io.BytesIO()
    pq.write_table(
        table,
        buf,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        # Token ids and log-probs do not repeat enough for dictionaries to pay off.
        use_dictionary=["sample_id", "image"],
        # The student streams shards a row group at a time and shuffles within windows of row
        # groups: small groups keep its reads and memory small, at a negligible cost in size.
        row_group_size=ROW_GROUP_ROWS,
    )
    return buf.getvalue()


def write_shard(
    out_dir: Path, rel_path: str, kind: str, index: int, rows: list[dict[str, Any]], tokens: int,
    input_range: list[int], encoding: Encoding = Encoding("f32"),
) -> ShardEntry:
    path = Path(out_dir) / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    data = table_bytes(kind, rows, encoding)
    atomic_write_bytes(path, data)
    return ShardEntry(  # size and digest of the bytes written, not a second read of the file
        kind=kind, index=index, rows=len(rows), tokens=tokens, bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(), input_range=input_range,
    )
