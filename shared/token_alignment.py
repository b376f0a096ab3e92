"""Teacher tokens in a student's terms: the pieces of cross-tokenizer distillation that depend on the
two tokenizers only (no model, no shards).

- Surfaces: every token id as the bytes of text it stands for, whatever the tokenizer's spelling
  (byte-level BPE's `Ġ`/byte alphabet, SentencePiece's `▁` and `<0xNN>` byte fallbacks). Special
  tokens have no surface: they are matched by their content.
- Vocabulary map: teacher id -> student id of the same surface (-1: no student counterpart; its
  teacher mass goes to the rest bucket).
- Position alignment of one assistant turn: both sides end with their end-of-turn token (paired with
  each other) and otherwise cover the same answer text. A student label position is paired with
  the teacher position whose token *starts at the same character of the answer*: both models then
  predict the next token from the same text, so their next-token distributions over token strings
  are comparable (whatever the lengths of the tokens that follow). Student positions with no teacher
  token starting there learn from the text (CE) only.

The dump keeps its teacher's tokenizer files in DUMP/teacher_tokenizer/ for this.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

TEACHER_TOKENIZER_DIR = "teacher_tokenizer"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def save_teacher_tokenizer(dump_dir: Path, tokenizer: Any) -> None:
    """The teacher's tokenizer files inside the dump (once; written to a temp dir and renamed)."""
    target = Path(dump_dir) / TEACHER_TOKENIZER_DIR
    if (target / "tokenizer_config.json").is_file():
        return
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".teacher_tokenizer-", dir=dump_dir))
    tokenizer.save_pretrained(str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it 0700: the dump's readers are often other users
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def load_teacher_tokenizer(dump_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(Path(dump_dir) / TEACHER_TOKENIZER_DIR))


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte -> printable character table, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def spelling(tokenizer: Any) -> str:
    """How the tokenizer spells text in its vocabulary: byte_level | metaspace | plain."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return "plain"
    spec = json.loads(backend.to_str())
    described = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder"), spec.get("normalizer")])
    if '"ByteLevel"' in described:
        return "byte_level"
    if '"Metaspace"' in described or "\u2581" in described or (spec.get("model") or {}).get("byte_fallback"):
        return "metaspace"
    return "plain"


def token_surfaces(tokenizer: Any) -> list[bytes | None]:
    """Per id, the bytes of text the token stands for; None for special tokens (matched by content)."""
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {int(i) for i, t in added.items() if getattr(t, "special", False)}
    plain_added = {int(i) for i in added} - special
    kind = spelling(tokenizer)
    table = _byte_level_table()
    out: list[bytes | None] = []
    for i, tok in enumerate(tokens):
        if tok is None or i in special:
            out.append(None)
        elif i in plain_added:  # added tokens are stored as their text
            out.append(tok.encode())
        elif kind == "byte_level" and all(c in table for c in tok):
            out.append(bytes(table[c] for c in tok))
        elif kind == "metaspace":
            fallback = _BYTE_FALLBACK.match(tok)
            out.append(bytes([int(fallback.group(1), 16)]) if fallback else tok.replace("\u2581", " ").encode())
        else:
            out.append(tok.encode())
    return out


def special_contents(tokenizer: Any, surfaces: list[bytes | None]) -> dict[str, int]:
    """Content string -> id of the tokens without a surface (special tokens)."""
    tokens = tokenizer.convert_ids_to_tokens([i for i, s in enumerate(surfaces) if s is None])
    ids = [i for i, s in enumerate(surfaces) if s is None]
    return {str(t): i for t, i in zip(tokens, ids, strict=True) if t is not None}


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id of the same surface (or the same special content); -1 where none."""

    teacher_to_student: np.ndarray  # int64 [teacher vocabulary]
    teacher_surfaces: list[bytes | None]
    student_surfaces: list[bytes | None]

    @classmethod
    def between(cls, teacher_tok: Any, student_tok: Any, project: str = "exact") -> VocabMap:
        """`project="exact"`: only equal spellings map. `"first_token"`: a teacher token the student
        lacks maps to the student's first token of its text (the teacher's " triangle" to the
        student's " t" of " t|ri|angle"): the student's probability of starting with " t" is the
        mass of every continuation it starts, so the teacher's choice among answers survives where
        the student spells the answer in more pieces. Equal spellings map the same either way."""
        if project not in ("exact", "first_token"):
            raise ValueError(f"unknown vocabulary projection {project!r}; use exact or first_token")
        t_surf, s_surf = token_surfaces(teacher_tok), token_surfaces(student_tok)
        by_surface: dict[bytes, int] = {}
        for i, s in enumerate(s_surf):
            if s:
                by_surface.setdefault(s, i)  # the lowest id of a duplicated spelling
        by_content = special_contents(student_tok, s_surf)
        t_special = {i: c for c, i in special_contents(teacher_tok, t_surf).items()}
        mapping = np.full(len(t_surf), -1, dtype=np.int64)
        for i, s in enumerate(t_surf):
            hit = by_surface.get(s) if s else by_content.get(t_special.get(i, ""))
            if hit is not None:
                mapping[i] = hit
        if project == "first_token":
            _project_first_tokens(mapping, t_surf, s_surf, student_tok)
        return cls(mapping, t_surf, s_surf)

    def mapped_share(self) -> float:
        """Share of the teacher's non-special tokens that have a student counterpart."""
        real = np.array([s is not None for s in self.teacher_surfaces])
        return float((self.teacher_to_student[real] >= 0).mean()) if real.any() else 0.0


def _project_first_tokens(mapping: np.ndarray, t_surf: list[bytes | None], s_surf: list[bytes | None],
                          student_tok: Any) -> None:
    """Unmapped teacher tokens with whole-character text -> the student's first token of that text,
    when its spelling is a proper prefix of it (tokenised in one batch)."""
    todo, texts = [], []
    for i, surface in enumerate(t_surf):
        if mapping[i] < 0 and surface:
            try:
                texts.append(surface.decode("utf-8"))
            except UnicodeDecodeError:  # a piece of a character: no student token starts with it alone
                continue
            todo.append(i)
    if not todo:
        return
    firsts = student_tok(texts, add_special_tokens=False)["input_ids"]
    for i, ids in zip(todo, firsts, strict=True):
        first = s_surf[ids[0]] if ids else None
        if first and t_surf[i].startswith(first):
            mapping[i] = ids[0]


def _starts(ids: list[int], surfaces: list[bytes | None]) -> tuple[bytes, list[int]]:
    """The text of some tokens and where each starts in it (-1 for tokens without text)."""
    parts, starts, pos = [], [], 0
    for i in ids:
        s = surfaces[i] if 0 <= i < len(surfaces) else None
        starts.append(pos if s else -1)
        if s:
            parts.append(s)
            pos += len(s)
    return b"".join(parts), starts


def _char_map(a: bytes, b: bytes) -> np.ndarray:
    """For each byte of `a`, the byte of `b` it matches (-1 where none): identity when equal, a
    shift when one is the other with a prefix (a boundary space one template keeps in the prompt),
    else difflib's matching blocks."""
    out = np.full(len(a) + 1, -1, dtype=np.int64)
    if a == b:
        out[:] = np.arange(len(a) + 1)
    elif a.endswith(b) or b.endswith(a):
        shift = len(a) - len(b)
        lo = max(0, shift)
        out[lo:] = np.arange(lo, len(a) + 1) - shift
    else:
        for block in difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks():
            out[block.a : block.a + block.size] = np.arange(block.b, block.b + block.size)
    return out


def align_turn(teacher_ids: list[int], student_ids: list[int], vocab: VocabMap) -> list[int]:
    """For each student position of one assistant turn, the teacher position it is paired with (-1:
    none). Both turns end with their end-of-turn token, paired with each other; other positions pair
    where a student token and a teacher token start at the same character of the answer."""
    if not teacher_ids or not student_ids:
        return [-1] * len(student_ids)
    a, a_starts = _starts(teacher_ids[:-1], vocab.teacher_surfaces)
    b, b_starts = _starts(student_ids[:-1], vocab.student_surfaces)
    to_b = _char_map(a, b)
    teacher_at = {int(to_b[s]): i for i, s in enumerate(a_starts) if s >= 0 and to_b[s] >= 0}
    pairs = [teacher_at.get(s, -1) if s >= 0 else -1 for s in b_starts]
    return pairs + [len(teacher_ids) - 1]
