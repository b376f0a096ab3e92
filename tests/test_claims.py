"""claims.py's verdicts, its mean +- std over seeds, and the plot `lmod report` draws from them."""

from __future__ import annotations

import json

import pytest

from pipelines.claims import MODELS, claims, summary, table
from pipelines.report import report


def _row(model: str, acc: float, halluc: float, yes: float, kl: float, active: int) -> dict:
    return {"model": model, "accuracy": acc, "hallucination_rate": halluc, "kl_to_teacher": kl,
            "active_params": active, "accuracy_by_type": {"color": acc, "pope": 1 - halluc / 2},
            "pope": {"f1": 0.8, "yes_ratio": yes, "accuracy": 1 - halluc / 2}}


def _report(shift: float) -> dict:
    return {"rows": [_row("teacher", 0.90, 0.10, 0.5, 0.0, 1000),
                     _row("sft", 0.80 + shift, 0.30, 0.6, 0.30, 400),
                     _row("mimic", 0.84 + shift, 0.30, 0.6, 0.20, 400),
                     _row("mimic+pref", 0.86 + shift, 0.20, 0.5, 0.22, 400)]}


def test_claims_summary_and_plot(tmp_path):
    reports = {0: _report(0.0), 1: _report(0.02)}
    held = claims({r["model"]: r for r in reports[0]["rows"]})
    assert held == {"mimic beats SFT (accuracy and KL)": True, "pref lowers hallucination (no collapse)": True,
                    "final within 5 points of the teacher": True}
    collapsed = _report(0.0)
    collapsed["rows"][3]["pope"]["f1"] = 0.79  # less hallucination, but a lower POPE F1 than mimic's
    assert not claims({r["model"]: r for r in collapsed["rows"]})["pref lowers hallucination (no collapse)"]
    behind = _report(-0.02)  # 0.84 against 0.90: six points behind
    assert not claims({r["model"]: r for r in behind["rows"]})["final within 5 points of the teacher"]
    more_active = _report(0.0)
    more_active["rows"][3]["active_params"] = 2000  # within 5 points, but not with fewer active parameters
    assert not claims({r["model"]: r for r in more_active["rows"]})["final within 5 points of the teacher"]

    stats = summary(reports)
    assert list(stats) == list(MODELS)
    assert stats["sft"]["accuracy"]["mean"] == pytest.approx(0.81)
    assert stats["sft"]["accuracy"]["std"] == pytest.approx(0.0141421, rel=1e-4)  # sample std of 0.80, 0.82
    assert stats["teacher"]["accuracy color"]["std"] == 0.0
    reports[1]["teacher_tries"] = [
        {"try": 0, "accuracy": 0.80, "pope_accuracy": 0.70, "yes_ratio": 0.8, "kept": False},
        {"try": 1, "accuracy": 0.91, "pope_accuracy": 0.96, "yes_ratio": 0.5, "kept": True}]
    reports[0]["rows"][0]["pope"]["yes_ratio"] = 0.7  # over the bar's 0.65: a teacher that leans to "yes"
    text = table(reports)
    assert "0.810 +-0.014" in text and "by type" in text and "seed 1:" in text
    assert ("seed 0: teacher on held-out: accuracy 0.900, POPE accuracy 0.950, yes-ratio 0.700: MISSES the bar\n"
            in text)
    assert ("seed 1: teacher on held-out: accuracy 0.900, POPE accuracy 0.950, yes-ratio 0.500: meets the bar "
            "(try 2 of 2; on validation 0.910, 0.960, 0.500)") in text

    (tmp_path / "claims.json").write_text(json.dumps({"seeds": [0, 1], "summary": stats}))
    written = report(tmp_path)
    assert written == [tmp_path / "demo.png"] and (tmp_path / "demo.png").stat().st_size > 10_000
