"""How mimic shards store the teacher's per-token distributions (format versions 2-3), written and read
only through here.

Encodings (the manifest's run["encoding"]; version-1 dumps are "f32"):
  f32  top-k ids (int32) by log-prob descending, float32 log-probs: the exact layout of version 1.
  u16  per position the top-k ids sorted ascending and delta-coded (the first id, then the gaps
       to the previous id), and the log-probs in that order as unsigned integers q on a fixed log
       scale: logprob = -q / 256 (16 bits cover 0 .. -256 nats).
  u8   the same ids; the probabilities as 8-bit q on a square-root scale: p = (q / 255)^2, i.e.
       logprob = 2 ln(q / 255); q = 0 (p below 3.8e-6) decodes as p = 1.3e-6, its bucket's mean.
       An entry's share of the KL error is about p * (relative error)^2, and a square-root scale
       makes that the same for every entry: fine steps where the mass is, coarse ones in the tail.
       (On bench_dump.py's synthetic 151,936-token teacher at k=64: 45 B/token of log-probs for a KL
       error of 1.6e-4 nats; 8-bit steps of 1/16 nat on the log scale took 78 B for 0.8e-4, of 1/8
       nat 67 B for 3.3e-4.)
In every encoding `target_logprobs` (the response token's own log-prob) is stored like the top-k
log-probs but always in 16 bits when quantised (it can be far below the top-k's range), and
`rest_mass` (the teacher's probability outside its top-k, computed in float64 before any
quantisation) stays float32. Decoding renormalises each position so that its top-k probabilities
and rest sum to 1: quantisation moves probability, never creates or loses it.

All columns are plain Parquet integer/float lists: pyarrow, DuckDB and `datasets` read them; to
decode by hand: ids = cumsum(topk_ids[t]); p = (q / 255)^2 (u8) or exp(-q / 256) (u16), then divide
the top-k p and rest_mass[t] by their sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

ENCODINGS = ("f32", "u16", "u8")
DEFAULT_ENCODING = "u8"
_U16_SCALE = 1 / 256  # u16 log-probs (top-k and, in every quantised encoding, targets): 0 .. -256 nats
_SCALE = {"u16": _U16_SCALE}
_ENCODED_COLUMNS = ("topk_ids", "topk_logprobs", "rest_mass", "target_logprobs")  # decoded together
_FORMULA = {"f32": "float32 log-prob", "u16": "logprob = -q / 256", "u8": "p = (q / 255)^2, q = 0: p = 1.3e-6"}
_SQRT_LEVELS = 255
_SQRT_ZERO_P = (0.5 / _SQRT_LEVELS) ** 2 / 3  # mean p of the bucket q = 0
_QTYPE = {"u16": (np.uint16, pa.uint16()), "u8": (np.uint8, pa.uint8())}


@dataclass(frozen=True)
class Encoding:
    name: str = "f32"

    def __post_init__(self) -> None:
        if self.name not in ENCODINGS:
            raise ValueError(f"encoding {self.name!r}; use {' | '.join(ENCODINGS)}")

    @property
    def scale(self) -> float | None:
        return _SCALE.get(self.name)

    def manifest(self) -> dict:
        return {"name": self.name, "topk_logprobs": _FORMULA[self.name],
                "topk_ids": "int32 log-prob descending" if self.name == "f32" else "int32 ascending, delta-coded"}

    @classmethod
    def of_run(cls, run: dict) -> Encoding:
        """The encoding a dump's manifest records (version-1 dumps: f32)."""
        return cls(run.get("encoding", {}).get("name", "f32"))

    # -- types ---------------------------------------------------------------------------------
    def logprob_type(self) -> pa.DataType:
        return pa.float32() if self.name == "f32" else _QTYPE[self.name][1]

    def target_type(self) -> pa.DataType:
        return pa.float32() if self.name == "f32" else pa.uint16()

    # -- writing -------------------------------------------------------------------------------
    def encode_topk(self, ids: np.ndarray, logprobs: np.ndarray) -> tuple[list, list]:
        """[T, k] ids and log-probs (descending) -> the two stored columns of one row."""
        if self.name == "f32":
            return list(ids.astype(np.int32)), list(logprobs.astype(np.float32))
        order = np.argsort(ids, axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(ids.astype(np.int64), order, -1)
        deltas = np.diff(sorted_ids, axis=-1, prepend=0).astype(np.int32)
        ordered = np.take_along_axis(logprobs, order, -1)
        if self.name == "u8":
            q = np.clip(np.rint(_SQRT_LEVELS * np.exp(0.5 * ordered.astype(np.float64))), 0, _SQRT_LEVELS)
            return list(deltas), list(np.nan_to_num(q).astype(np.uint8))
        return list(deltas), list(_quantise(ordered, np.uint16, self.scale))

    def encode_targets(self, logprobs: np.ndarray) -> np.ndarray:
        if self.name == "f32":
            return logprobs.astype(np.float32)
        return _quantise(logprobs, np.uint16, _U16_SCALE)

    # -- reading -------------------------------------------------------------------------------
    def decode(self, table: pa.Table) -> pa.Table:
        """A table of mimic rows in this encoding -> the same rows in the f32 layout (entries stay
        in id order; nothing downstream needs them by log-prob)."""
        if self.name == "f32" or "topk_ids" not in table.column_names:
            return table
        row_offsets, positions = _parts(table.column("topk_ids"))
        pos_offsets, deltas = _parts(positions)
        lengths = np.diff(pos_offsets)
        starts = pos_offsets[:-1]
        nonempty = lengths > 0
        deltas = deltas.to_numpy().astype(np.int64)
        total = np.cumsum(deltas)
        base = np.zeros(len(starts), np.int64)
        base[nonempty] = total[starts[nonempty]] - deltas[starts[nonempty]]
        ids = (total - np.repeat(base, lengths)).astype(np.int32)
        _, q_positions = _parts(table.column("topk_logprobs"))
        q = _parts(q_positions)[1].to_numpy().astype(np.float64)
        if self.name == "u8":
            logp = np.log(np.where(q > 0, (q / _SQRT_LEVELS) ** 2, _SQRT_ZERO_P))
        else:
            logp = -q * self.scale
        rest_offsets, rest = _parts(table.column("rest_mass"))
        rest = rest.to_numpy().astype(np.float64)
        z = rest.copy()
        if nonempty.any():
            z[nonempty] += np.add.reduceat(np.exp(logp), starts[nonempty])
        z = np.where(z > 0, z, 1.0)
        logp -= np.repeat(np.log(z), lengths)
        target_offsets, targets = _parts(table.column("target_logprobs"))
        columns = {
            "topk_ids": _nested(row_offsets, pos_offsets, ids),
            "topk_logprobs": _nested(row_offsets, pos_offsets, logp.astype(np.float32)),
            "rest_mass": pa.ListArray.from_arrays(pa.array(rest_offsets), pa.array((rest / z).astype(np.float32))),
            "target_logprobs": pa.ListArray.from_arrays(
                pa.array(target_offsets),
                pa.array((-targets.to_numpy().astype(np.float64) * _U16_SCALE).astype(np.float32))),
        }
        for name, column in columns.items():
            table = table.set_column(table.column_names.index(name), name, column)
        return table


def _quantise(logprobs: np.ndarray, dtype, scale: float) -> np.ndarray:
    top = np.iinfo(dtype).max
    q = np.rint(-logprobs.astype(np.float64) / scale)
    return np.clip(np.nan_to_num(q, nan=top, posinf=top), 0, top).astype(dtype)


def _parts(column) -> tuple[np.ndarray, pa.Array]:
    """(offsets from 0, flattened values) of a list column, chunked or sliced."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(arr.offsets, dtype=np.int64)
    return (offsets - offsets[0]).astype(np.int32), arr.flatten()


def _nested(row_offsets: np.ndarray, pos_offsets: np.ndarray, values: np.ndarray) -> pa.Array:
    inner = pa.ListArray.from_arrays(pa.array(pos_offsets), pa.array(values))
    return pa.ListArray.from_arrays(pa.array(row_offsets), inner)


def file_encoding(parquet_file) -> Encoding:
    """The encoding a shard file records in its schema metadata (version-1 files: f32)."""
    meta = parquet_file.schema_arrow.metadata or {}
    return Encoding(meta.get(b"lmod.encoding", b"f32").decode())


def read_row_group(parquet_file, group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group of a shard (a `pyarrow.parquet.ParquetFile`), mimic columns decoded to the
    f32 layout whatever the file's encoding: what every reader of shards should call."""
    encoding = file_encoding(parquet_file)
    wanted = columns
    if columns is not None and encoding.name != "f32" and set(columns) & set(_ENCODED_COLUMNS):
        wanted = list(dict.fromkeys([*columns, *_ENCODED_COLUMNS]))  # renormalising needs all four
    table = encoding.decode(parquet_file.read_row_group(group, columns=wanted))
    return table.select(columns) if columns is not None else table


def read_table(path) -> pa.Table:
    """A whole shard file, decoded (for tools and tests; training reads row groups)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if pf.metadata.num_row_groups == 0:
        return pf.schema_arrow.empty_table()
    return pa.concat_tables([read_row_group(pf, g) for g in range(pf.metadata.num_row_groups)])
