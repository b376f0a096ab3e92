"""Fingerprints that tie shards to the teacher and tokenizer that produced them."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

# Weights up to this size are hashed in full; above it names, sizes, safetensors headers (tensor
# names, shapes, dtypes) and SAMPLED_BLOCKS blocks of content at fixed offsets per file, so that
# fingerprinting a 70B teacher does not read 140 GB and a retrained teacher of the same shape differs.
FULL_HASH_LIMIT_BYTES = 4 << 30
SAMPLED_BLOCKS = 64
SAMPLED_BLOCK_BYTES = 1 << 16


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the vocabulary (token -> id, added tokens included) and the special tokens.

    Two tokenizers with the same fingerprint map every string to the same ids, which is all the
    student needs to use the teacher's stored response ids as labels.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return sha256_json({"vocab": vocab, "special": special})


def vocabulary_facts(tokenizer: Any) -> dict[str, Any]:
    """What the student stage needs to decide whether stored ids mean the same to it: the hash of
    every token -> id (added tokens included; special-token *roles* do not change ids), the hash of
    the base vocabulary alone, the tokenizer's length and its added tokens. Embedding matrices may
    be padded beyond `size` (Qwen: 151,936 rows for ~151,665 tokens): that is not compared."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    added = {str(t): int(i) for i, t in sorted(tokenizer.added_tokens_decoder.items())}
    base = [(t, i) for t, i in vocab if t not in added]
    return {"vocab_sha256": sha256_json(vocab), "base_vocab_sha256": sha256_json(base), "size": len(tokenizer),
            "added_tokens": added}


def vocabulary_mismatch(teacher: dict[str, Any], student: dict[str, Any]) -> str | None:
    """None when the stored ids mean the same to both; else what differs, in a few words."""
    if teacher["vocab_sha256"] == student["vocab_sha256"]:
        return None
    if teacher["base_vocab_sha256"] == student["base_vocab_sha256"]:
        t, s = teacher["added_tokens"], student["added_tokens"]
        only_t = sorted(set(t.items()) - set(s.items()), key=lambda kv: kv[1])
        only_s = sorted(set(s.items()) - set(t.items()), key=lambda kv: kv[1])
        fmt = lambda items: ", ".join(f"{tok!r}={i}" for tok, i in items[:6]) or "none"  # noqa: E731
        return (f"the tokenizers share their base vocabulary but differ in added special tokens (teacher only: "
                f"{fmt(only_t)}; student only: {fmt(only_s)}); add the teacher's tokens to the student's "
                "tokenizer with the same ids, or re-dump with the student's tokenizer")
    return (f"another vocabulary ({teacher['size']} tokens vs the student's {student['size']}); the stored ids are the "
            "teacher's: read them restated for the student (student_train/cross_tokenizer.py; `lmod train` does)")


def teacher_fingerprint(model_dir: Path) -> dict[str, Any]:
    """Config hash plus a weights hash (full content, or headers for very large checkpoints)."""
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    mode = "full" if total <= FULL_HASH_LIMIT_BYTES else "headers+samples"
    for f in files:
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
        if mode == "full":
            h.update(bytes.fromhex(sha256_file(f)))
        else:
            with open(f, "rb") as fh:
                if f.suffix == ".safetensors":
                    (n,) = struct.unpack("<Q", fh.read(8))
                    h.update(fh.read(n))
                size = f.stat().st_size
                for i in range(SAMPLED_BLOCKS):  # spread over the file: every tensor region is sampled
                    fh.seek(size * i // SAMPLED_BLOCKS)
                    h.update(fh.read(SAMPLED_BLOCK_BYTES))
    return {
        "model": model_dir.name,
        "config_sha256": sha256_json(config),
        "weights_sha256": h.hexdigest(),
        "weights_hash_mode": mode,
    }
