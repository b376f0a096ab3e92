"""Small inputs a hostile user tried that were accepted and silently ignored or mis-scored: each is
now one line naming what is wrong (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipelines.cli import app


def _cli(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


def test_pope_labels_other_than_yes_or_no_are_refused_with_the_line(world, tmp_path):
    from shared.evaluation import EvalDataError, read_eval_records

    pope = next(json.loads(line) for line in (world / "eval.jsonl").read_text().splitlines()
                if json.loads(line).get("type") == "pope")
    data = tmp_path / "pope.jsonl"
    data.write_text(json.dumps(pope) + "\n" + json.dumps({**pope, "answer": "maybe"}) + "\n")
    with pytest.raises(EvalDataError, match=r"pope.jsonl:2: POPE label 'maybe' is not yes or no"):
        read_eval_records(data, world)
    data.write_text(json.dumps({"question_id": 1, "image": pope["image"], "text": "Is there a cat?",
                                "label": "Yes"}) + "\n")
    assert read_eval_records(data, world)[0]["answer"] == "Yes"  # POPE's own files, any case


def test_negative_counts_and_noise_are_refused(tmp_path):
    from student_train.moe import upcycle

    res = _cli("world", "make", "--out", tmp_path / "w", "--n-mimic", "-5")
    assert res.exit_code == 2 and not (tmp_path / "w").exists()
    res = _cli("student", "upcycle", "--base", tmp_path, "--out", tmp_path / "s", "--noise", "-1")
    assert res.exit_code == 2
    for noise in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="must be >= 0"):
            upcycle(tmp_path / "none", tmp_path / "s", noise=noise)


@pytest.mark.parametrize("record,reason", [
    ({"id": "", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
     "'id' is empty"),
    ({"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
                                   {"from": "human", "value": "and?"}, {"from": "gpt", "value": "  "}]},
     "turn 3: an empty answer"),
])
def test_empty_ids_and_empty_answer_turns_are_refused(record, reason, tmp_path):
    from teacher_dump.inputs import Rejection, check_row

    got = check_row(Path(tmp_path / "m.jsonl"), "mimic", 0, record, None, tmp_path)
    assert isinstance(got, Rejection) and reason in got.reason
