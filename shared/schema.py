"""The shard contract between the teacher stage (writer) and the student stage (reader).

Layout of a dump directory:
    OUT/manifest.json            run-level facts + one entry per finished shard
    OUT/mimic/shard-XXXXX-of-YYYYY.parquet
    OUT/pref/shard-XXXXX-of-YYYYY.parquet
    OUT/rejected.jsonl           ids and reasons of records dropped with --skip-invalid (empty when none)

Token positions: for a mimic row, `response_ids[t]` is the t-th response token (all assistant turns
concatenated, each ending with the end-of-turn token) and every per-token column at index t holds
the teacher's distribution *for predicting response_ids[t]*, i.e. computed from the logits at the
position just before it. Students must shift their own logits the same way.
"""

from __future__ import annotations

import pyarrow as pa

from shared.codec import Encoding

# 2: mimic log-probs and ids in a manifest-recorded encoding (shared/codec.py); 3: `image` and
# `image_sha256` are lists (several images per sample; version 1-2: one string, "" for none)
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"
KINDS = ("mimic", "pref")
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 9
ROW_GROUP_ROWS = 128  # the unit the student reads (and shuffles) by

_ids = pa.list_(pa.int32())
_floats = pa.list_(pa.float32())
_strings = pa.list_(pa.string())

# Columns both kinds carry: where the sample came from and what the teacher saw.
_COMMON = [
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("input_row", pa.int64(), nullable=False),  # 0-based row in the input file
    # Per image, in placeholder order: the reference as given in the input (a path under
    # --image-root; null for an image that came inline, kept in the dump's image store) and the
    # sha256 of its bytes. Empty lists: no image.
    pa.field("image", _strings, nullable=False),
    pa.field("image_sha256", _strings, nullable=False),
    pa.field("teacher_prompt", pa.string(), nullable=False),  # exact text the teacher was given
]
_COMMON_V2 = [f.with_type(pa.string()).with_nullable(True) if f.name in ("image", "image_sha256") else f
              for f in _COMMON]


def row_images(refs: list | str | None, digests: list | str | None) -> list[tuple[str | None, str]]:
    """A row's images as (reference or None, sha256), whatever its format version (1-2 stored one
    string per column, "" or null for no image)."""
    if isinstance(digests, list):
        return list(zip(refs or [None] * len(digests), digests, strict=True))
    return [(refs or None, digests)] if digests else []

# The mimic columns after the common ones, in the f32 layout (format version 1).
_MIMIC_FIELDS = pa.schema(
    [
        # The conversation as LLaVA-style JSON ([{"from": "human"|"gpt", "value": ...}]), so a
        # student can rebuild prompts with its own template and processor.
        pa.field("conversations_json", pa.string(), nullable=False),
        pa.field("response_ids", _ids, nullable=False),
        pa.field("response_turn_lengths", _ids, nullable=False),  # tokens per assistant turn
        pa.field("target_logprobs", _floats, nullable=False),  # quantised in u8/u16 (shared/codec.py)
        # [T][k]: f32 by log-prob descending; u8/u16 ids ascending, delta-coded, log-probs quantised
        pa.field("topk_ids", pa.list_(_ids), nullable=False),
        pa.field("topk_logprobs", pa.list_(_floats), nullable=False),
        pa.field("rest_mass", _floats, nullable=False),  # 1 - sum(exp(topk_logprobs[t]))
        # RS-KD (dump-teacher --sample N; empty lists otherwise, absent in version 1): per position
        # the unique ids of N draws from the teacher (ascending) and how often each was drawn.
        pa.field("sampled_ids", pa.list_(_ids), nullable=False),
        pa.field("sampled_counts", pa.list_(pa.list_(pa.uint16())), nullable=False),
    ],
)
SAMPLED_COLUMNS = ("sampled_ids", "sampled_counts")


def mimic_schema(encoding: Encoding = Encoding("f32")) -> pa.Schema:
    """The mimic schema; the f32 encoding is the layout of format version 1."""
    logprob, target = encoding.logprob_type(), encoding.target_type()
    return pa.schema(
        [
            *_COMMON,
            *[f.with_type(pa.list_(target) if f.name == "target_logprobs" else pa.list_(pa.list_(logprob))
                          if f.name == "topk_logprobs" else f.type) for f in _MIMIC_FIELDS],
        ],
        metadata={"lmod.kind": "mimic", "lmod.format_version": str(FORMAT_VERSION), "lmod.encoding": encoding.name},
    )


MIMIC_SCHEMA = mimic_schema()

PREF_SCHEMA = pa.schema(
    [
        *_COMMON,
        pa.field("question", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_ids", _ids, nullable=False),
        pa.field("rejected_ids", _ids, nullable=False),
        pa.field("chosen_logprobs", _floats, nullable=False),
        pa.field("rejected_logprobs", _floats, nullable=False),
        # Summed in float64 from the float32 per-token values: the DPO reference log-likelihoods.
        pa.field("chosen_logprob_sum", pa.float64(), nullable=False),
        pa.field("rejected_logprob_sum", pa.float64(), nullable=False),
    ],
    metadata={"lmod.kind": "pref", "lmod.format_version": str(FORMAT_VERSION)},
)



def schema_for(kind: str, encoding: Encoding, format_version: int = FORMAT_VERSION) -> pa.Schema:
    if kind != "mimic":
        return _older(PREF_SCHEMA, format_version)
    schema = mimic_schema(encoding)
    if format_version < 2:  # no sampled columns yet
        schema = pa.schema([f for f in schema if f.name not in SAMPLED_COLUMNS], metadata=schema.metadata)
    return _older(schema, format_version)


def _older(schema: pa.Schema, format_version: int) -> pa.Schema:
    if format_version >= 3:
        return schema
    common = {f.name: f for f in _COMMON_V2}
    return pa.schema([common.get(f.name, f) for f in schema], metadata=schema.metadata)


def shard_name(kind: str, index: int, total: int) -> str:
    """Relative path of a shard inside the dump directory."""
    return f"{kind}/shard-{index:05d}-of-{total:05d}.parquet"
