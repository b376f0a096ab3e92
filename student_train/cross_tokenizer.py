"""A dump for a student with another tokenizer: the stored teacher rows restated in the student's
token ids (shared/token_alignment.py says how positions and vocabularies correspond).

Mimic: the student's labels are its own tokenisation of the answers; a label position paired with a
teacher position gets that teacher row, its ids mapped to the student's and the mass of teacher
tokens the student lacks moved to the rest bucket (as padded-vocabulary ids are); an unpaired
position gets CE only (`kd_mask` False). When every position and id maps, the rows are the
same-tokenizer rows with the ids renamed, and so are the losses.

Preference: the stored references are log-probs of whole answers, which do not depend on the
tokenizer; the student scores its own tokenisation of the same answers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from shared.fingerprint import vocabulary_facts
from shared.mllm import SampleEncoder
from shared.token_alignment import TEACHER_TOKENIZER_DIR, VocabMap, align_turn, load_teacher_tokenizer
from student_train.dumps import Dumps


class AlignmentError(ValueError):
    """The dump cannot be restated for this student; the message says why and what to do."""


@dataclass
class Coverage:
    """How much of the teacher's signal reaches the student: label positions paired with a teacher
    position, and the teacher's top-k probability mass that lands on student ids there."""

    positions: int = 0
    paired: int = 0
    topk_mass: float = 0.0  # the teacher's top-k mass over all its response positions
    mapped_mass: float = 0.0  # the part of it on student ids at paired positions

    def add(self, other: Coverage) -> Coverage:
        return Coverage(self.positions + other.positions, self.paired + other.paired,
                        self.topk_mass + other.topk_mass, self.mapped_mass + other.mapped_mass)

    @property
    def position_share(self) -> float:
        return self.paired / self.positions if self.positions else 0.0

    @property
    def mass_share(self) -> float:
        return self.mapped_mass / self.topk_mass if self.topk_mass else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"positions": self.positions, "paired_positions": round(self.position_share, 4),
                "mapped_topk_mass": round(self.mass_share, 4)}


class TokenBridge:
    """Teacher rows -> student rows for one (teacher tokenizer, student tokenizer) pair. The
    vocabulary map is computed once (about a second at 151,936 tokens) and travels to the loader
    workers with the data set."""

    def __init__(self, vocab: VocabMap):
        self.vocab = vocab

    @classmethod
    def for_dumps(cls, dumps: Dumps | Sequence[Path], encoder: SampleEncoder, project: str = "first_token"
                  ) -> TokenBridge | None:
        """None when every dump's stored ids mean the same to the student; else the bridge from the
        teacher tokenizer the dumps keep (all dumps must share it)."""
        mine = vocabulary_facts(encoder.tokenizer)["vocab_sha256"]
        theirs: dict[str, Path] = {}
        for dump in Dumps.open(dumps):
            vocabulary = dump.manifest.record.vocabulary
            if vocabulary is None or vocabulary["vocab_sha256"] != mine:
                theirs.setdefault(vocabulary["vocab_sha256"] if vocabulary else "unknown", dump.dir)
        if not theirs:
            return None
        if len(theirs) > 1:
            a, b = list(theirs.values())[:2]
            raise AlignmentError(f"{a} and {b} were dumped with different teacher tokenizers; a cross-tokenizer run "
                                 "takes dumps of one teacher tokenizer: train on them one at a time")
        (want, d), = theirs.items()
        if not (Path(d) / TEACHER_TOKENIZER_DIR).is_dir():
            raise AlignmentError(f"{d}: the student's tokenizer differs from the teacher's and the dump keeps no "
                                 f"teacher tokenizer ({TEACHER_TOKENIZER_DIR}/, written by dumps since lmod 0.3); "
                                 f"save the teacher's tokenizer files there, or use a student with its tokenizer")
        try:
            teacher_tok = load_teacher_tokenizer(d)
        except Exception as e:  # a damaged file: transformers raises JSON, OS and value errors alike
            raise AlignmentError(f"{d}/{TEACHER_TOKENIZER_DIR}: unreadable ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0] if str(e) else ''}); copy the teacher's tokenizer "
                                 "files there again") from None
        if vocabulary_facts(teacher_tok)["vocab_sha256"] != want:
            raise AlignmentError(f"{d}/{TEACHER_TOKENIZER_DIR}: not the tokenizer the teacher dumped with "
                                 "(its vocabulary differs from the manifest's); put the teacher's tokenizer there")
        return cls(VocabMap.between(teacher_tok, encoder.tokenizer, project))

    # -- mimic ------------------------------------------------------------------------------------
    def mimic_rows(self, encoder: SampleEncoder, example: Any, student_turns: list[list[int]] | None = None
                   ) -> tuple[Any, Coverage]:
        """A MimicExample of teacher ids restated in student ids (labels, top-k rows, `kd_mask`).
        `student_turns`: the student's own response ids per turn, when the caller has encoded them."""
        if student_turns is None:
            student_turns = encoder.response_ids(example.messages)
        if len(student_turns) != len(example.responses):
            raise AlignmentError(f"{len(example.responses)} stored responses for the student's "
                                 f"{len(student_turns)} assistant turns")
        pairs: list[int] = []
        offset = 0
        for teacher_turn, student_turn in zip(example.responses, student_turns, strict=True):
            pairs += [offset + p if p >= 0 else -1 for p in align_turn(list(teacher_turn), student_turn, self.vocab)]
            offset += len(teacher_turn)
        topk_ids = np.asarray(example.topk_ids, dtype=np.int64).reshape(offset, -1)
        topk_lps = np.asarray(example.topk_logprobs, dtype=np.float32).reshape(offset, -1)
        rest = np.asarray(example.rest_mass, dtype=np.float32).reshape(offset)
        # Each side's end-of-turn token is the other's, whatever their names.
        ends = {int(t[-1]): int(s[-1]) for t, s in zip(example.responses, student_turns, strict=True) if len(t)}
        ids, lps, rest_out, usable, mapped = self._map_rows(topk_ids, topk_lps, rest, ends)
        sel = np.asarray(pairs, dtype=np.int64)
        paired = sel >= 0
        take = np.where(paired, sel, 0)
        kd_mask = paired & usable[take]  # every turn holds its end-of-turn token: offset >= 1
        out_ids = np.zeros((len(sel), topk_ids.shape[1]), dtype=np.int64)
        out_lps = np.full(out_ids.shape, -np.inf, dtype=np.float32)
        out_lps[:, 0] = 0.0  # an unpaired row: one certain entry, KL 0 under either tail (masked anyway)
        out_rest = np.zeros(len(sel), dtype=np.float32)
        out_ids[kd_mask], out_lps[kd_mask], out_rest[kd_mask] = ids[take[kd_mask]], lps[take[kd_mask]], \
            rest_out[take[kd_mask]]
        coverage = Coverage(len(sel), int(kd_mask.sum()), float(np.exp(topk_lps.astype(np.float64)).sum()),
                            float(mapped[take[kd_mask]].sum()))
        return replace(example, responses=student_turns, topk_ids=out_ids, topk_logprobs=out_lps, rest_mass=out_rest,
                       kd_mask=kd_mask.tolist(), sampled_ids=None, sampled_counts=None), coverage

    def _map_rows(self, topk_ids: np.ndarray, topk_lps: np.ndarray, rest: np.ndarray, ends: dict[int, int]):
        """Teacher rows in student ids: unmapped entries get log-prob -inf (pointing at a mapped id of
        the row) and their mass joins the rest; entries mapping to one student id are merged."""
        table = self.vocab.teacher_to_student
        inside = (topk_ids >= 0) & (topk_ids < len(table))
        ids = np.where(inside, table[np.where(inside, topk_ids, 0)], -1)
        for t_end, s_end in ends.items():
            ids[topk_ids == t_end] = s_end
        prob = np.exp(topk_lps.astype(np.float64))
        prob[np.isneginf(topk_lps)] = 0.0
        lost = ids < 0
        usable = (~lost & (prob > 0)).any(-1)
        first = np.take_along_axis(ids, np.argmax(~lost, -1)[:, None], -1)
        ids = np.where(lost, np.maximum(first, 0), ids)
        lps = np.where(lost, -np.inf, topk_lps).astype(np.float32)
        rest_out = (rest.astype(np.float64) + np.where(lost, prob, 0.0).sum(-1)).astype(np.float32)
        real = np.where(lost, -1, ids)
        srt = np.sort(real, -1)
        for r in np.nonzero(((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1))[0]:
            self._merge_row(ids[r], lps[r], real[r])
        mapped = np.where(np.isneginf(lps), 0.0, np.exp(lps.astype(np.float64))).sum(-1)
        return ids, lps, rest_out, usable, mapped

    @staticmethod
    def _merge_row(ids: np.ndarray, lps: np.ndarray, real: np.ndarray) -> None:
        """Two teacher tokens with one student counterpart: one entry with their summed probability."""
        seen: dict[int, int] = {}
        for j, sid in enumerate(real):
            if sid < 0:
                continue
            if sid in seen:
                keep = seen[sid]
                lps[keep] = np.logaddexp(lps[keep], lps[j])
                lps[j] = -np.inf
            else:
                seen[sid] = j

    def coverage(self, encoder: SampleEncoder, examples) -> Coverage:
        total = Coverage()
        for example in examples:
            total = total.add(self.mimic_rows(encoder, example)[1])
        return total
