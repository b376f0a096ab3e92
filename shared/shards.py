"""Reading a dump directory: verification against the manifest, and a summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shared import image_store
from shared.codec import Encoding, read_table
from shared.fingerprint import sha256_file
from shared.manifest import Manifest, ShardEntry
from shared.schema import KINDS, row_images, schema_for


def shard_file_problem(path: Path, entry: ShardEntry) -> str | None:
    """Why a shard file is not the one its manifest entry describes, or None when it is (size,
    then sha256: a flipped byte in a float column reads fine and would train a NaN student)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing"
    except OSError as e:
        return f"cannot read it ({e.strerror})"
    if size != entry.bytes:
        return f"{size} bytes, manifest says {entry.bytes} (truncated or replaced)"
    if sha256_file(path) != entry.sha256:
        return "its bytes differ from the manifest's checksum (corrupted or replaced)"
    return None


# Columns by what their values must be: token ids, log-probabilities, probabilities, log-prob sums.
_ID_COLUMNS = ("response_ids", "topk_ids", "sampled_ids", "chosen_ids", "rejected_ids")
_LOGPROB_COLUMNS = ("target_logprobs", "topk_logprobs", "chosen_logprobs", "rejected_logprobs",
                    "chosen_logprob_sum", "rejected_logprob_sum")
_LOGPROB_SLACK = 1e-4  # float32 rounding of log-probs of ~1


def _flat(column: pa.ChunkedArray) -> np.ndarray:
    while pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        column = pc.list_flatten(column)
    return column.to_numpy() if isinstance(column, pa.ChunkedArray) else np.asarray(column)


def value_problems(table: pa.Table, vocab_size: int) -> list[str]:
    """Values no teacher can have written (a shard edited by hand, its checksum updated): ids
    outside the vocabulary, log-probabilities above 0 or not finite, rest masses outside [0, 1]."""
    problems = []
    for name in _ID_COLUMNS:
        if name in table.column_names:
            ids = _flat(table.column(name))
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                problems.append(f"{name} holds ids outside the teacher's vocabulary [0, {vocab_size})")
    for name in _LOGPROB_COLUMNS:
        if name in table.column_names:
            values = _flat(table.column(name)).astype(np.float64)
            if not np.isfinite(values).all():
                problems.append(f"{name} holds NaN or infinite values")
            elif values.size and values.max() > _LOGPROB_SLACK:
                problems.append(f"{name} holds log-probabilities above 0 (max {values.max():.4g})")
    if "rest_mass" in table.column_names:
        rest = _flat(table.column("rest_mass")).astype(np.float64)
        if not (np.isfinite(rest).all() and (rest >= 0).all() and (rest <= 1 + _LOGPROB_SLACK).all()):
            problems.append("rest_mass holds values outside [0, 1]")
    return problems


def teacher_tokenizer_problem(out_dir: Path, manifest: Manifest) -> str | None:
    """Whether DUMP/teacher_tokenizer/ is the tokenizer the teacher dumped with (students of another
    tokenizer read the stored ids through it)."""
    from shared.fingerprint import tokenizer_fingerprint
    from shared.token_alignment import TEACHER_TOKENIZER_DIR, load_teacher_tokenizer

    where = out_dir / TEACHER_TOKENIZER_DIR
    if not where.is_dir():
        return f"{TEACHER_TOKENIZER_DIR}/: missing; rerun `lmod dump-teacher` with the same command to restore it"
    try:
        tokenizer = load_teacher_tokenizer(out_dir)
    except Exception as e:  # transformers raises several types for damaged tokenizer files
        return f"{TEACHER_TOKENIZER_DIR}/: unreadable ({type(e).__name__}); delete it and rerun `lmod dump-teacher`"
    if tokenizer_fingerprint(tokenizer) != manifest.run.get("tokenizer_sha256"):
        return (f"{TEACHER_TOKENIZER_DIR}/: not the tokenizer the teacher dumped with (its fingerprint differs); "
                "delete it and rerun `lmod dump-teacher` with the same command")
    return None


def verify_dump(out_dir: Path) -> list[str]:
    """Every problem found, one line each naming the shard; empty when the dump is sound."""
    out_dir = Path(out_dir)
    manifest = Manifest.load(out_dir)
    problems: list[str] = []
    encoding = Encoding.of_run(manifest.run)
    for rel, entry in sorted(manifest.shards.items()):
        path = out_dir / rel
        problem = shard_file_problem(path, entry)
        if problem:
            problems.append(f"{rel}: {problem}")
            continue
        try:
            meta = pq.ParquetFile(path)
            schema = meta.schema_arrow
        except Exception as e:  # pyarrow raises ArrowInvalid/OSError for unreadable files
            problems.append(f"{rel}: unreadable Parquet ({e})")
            continue
        expected = schema_for(entry.kind, encoding, manifest.format_version)
        if not schema.remove_metadata().equals(expected.remove_metadata()):
            problems.append(f"{rel}: schema differs from the {entry.kind} schema")
            continue
        if meta.metadata.num_rows != entry.rows:
            problems.append(f"{rel}: {meta.metadata.num_rows} rows, manifest says {entry.rows}")
            continue
        problems += [f"{rel}: {p}" for p in value_problems(read_table(path), int(manifest.run["vocab_size"]))]
    referenced: set[str] = set()  # inline images (no path) the shards use: they must be in the store
    for rel in sorted(manifest.shards):
        if out_dir.joinpath(rel).is_file() and not any(p.startswith(rel) for p in problems):
            table = pq.read_table(out_dir / rel, columns=["image", "image_sha256"])
            referenced |= {sha for refs, digests in zip(table.column(0).to_pylist(), table.column(1).to_pylist())
                           for ref, sha in row_images(refs, digests) if sha and not ref}
    problems += image_store.problems(out_dir, referenced)
    if manifest.shards:
        problem = teacher_tokenizer_problem(out_dir, manifest)
        if problem:
            problems.append(problem)
    run = manifest.record
    for kind in KINDS:
        done = sum(e.kind == kind for e in manifest.shards.values())
        if done < run.planned_shards(kind):
            problems.append(f"{kind}: {done} of {run.planned_shards(kind)} shards finished; rerun `lmod dump-teacher` "
                            "to resume")
        listed = {rel for rel in manifest.shards if rel.startswith(f"{kind}/")}
        for path in sorted((out_dir / kind).glob("*.parquet")) if (out_dir / kind).is_dir() else []:
            if f"{kind}/{path.name}" not in listed:
                problems.append(f"{kind}/{path.name}: not in the manifest")
    return problems


def dump_info(out_dir: Path) -> dict[str, Any]:
    manifest = Manifest.load(out_dir)
    run = manifest.record
    info: dict[str, Any] = {
        "teacher": run.teacher["model"],
        "teacher_config_sha256": run.teacher["config_sha256"][:16],
        "tokenizer_sha256": run.tokenizer_sha256[:16],
        "backend": run.backend,
        "dtype": run.dtype,
        "top_k": run.top_k,
        "encoding": Encoding.of_run(manifest.run).name,
        "format_version": manifest.format_version,
    }
    for kind in KINDS:
        entries = [e for e in manifest.shards.values() if e.kind == kind]
        if not entries:
            continue
        rows = sum(e.rows for e in entries)
        tokens = sum(e.tokens for e in entries)
        size = sum(e.bytes for e in entries)
        info[kind] = {
            "shards": f"{len(entries)}/{run.planned_shards(kind) or len(entries)}",
            "rows": rows,
            "tokens": tokens,
            "bytes": size,
            "bytes_per_token": round(size / tokens, 2) if tokens else None,
        }
    return info


def shard_paths(out_dir: Path, kind: str, manifest: Manifest | None = None) -> list[Path]:
    """Finished shards of one kind, in index order (what the student reads); `manifest`: the dump's,
    when the caller has it open."""
    manifest = manifest or Manifest.load(out_dir)
    entries = sorted((e.index, rel) for rel, e in manifest.shards.items() if e.kind == kind)
    return [Path(out_dir) / rel for _, rel in entries]
