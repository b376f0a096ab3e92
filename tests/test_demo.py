"""The README's first command, scaled down: the whole demo runs, writes its report and plots, and
a rerun of a finished demo skips every step, and a second demo from scratch gives the same table."""

from __future__ import annotations

import json

import pytest

from pipelines.demo import DemoConfig, run_demo

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_resumes_and_repeats(tmp_path):
    cfg = DemoConfig(out=tmp_path / "demo", n_mimic=32, n_pref=8, n_eval=8, teacher_steps=2, shards=1, top_k=4,
                     backend="hf", student_steps=2, pref_steps=2, student_batch=4, n_val=8, pref_eval_every=1)
    run_demo(cfg)
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == ["teacher", "sft", "mimic", "mimic+pref"]
    assert (tmp_path / "demo" / "demo.png").is_file() and (tmp_path / "demo" / "mimic" / "training.png").is_file()
    # A 2-step teacher misses the bar on validation: a second one is trained from another initialisation
    # and the better by validation accuracy (ties: the first) is the teacher, moved into place.
    tries = report["teacher_tries"]
    assert [(t["try"], t["init_seed"], t["meets_bar"]) for t in tries] == [(0, 0, False), (1, 1000, False)]
    kept = max(tries, key=lambda t: (t["accuracy"], -t["try"]))
    assert [t["kept"] for t in tries] == [t is kept for t in tries]
    assert not (tmp_path / "demo" / f"teacher-try{kept['try']}").exists()
    assert (tmp_path / "demo" / f"teacher-try{1 - kept['try']}" / "lmod_recipe.json").is_file()
    selection = json.loads((tmp_path / "demo" / "mimic+pref" / "selection.json").read_text())
    assert [c["step"] for c in selection["candidates"]] == [0, 1, 2]  # the mimic student is a candidate
    best = max(c["accuracy"] for c in selection["candidates"])
    assert selection["kept_step"] == min(c["step"] for c in selection["candidates"] if c["accuracy"] == best)
    before = (tmp_path / "demo" / "mimic" / "model.safetensors").stat().st_mtime_ns
    run_demo(cfg)  # everything finished: nothing is retrained
    assert (tmp_path / "demo" / "mimic" / "model.safetensors").stat().st_mtime_ns == before
    # Killed after the last preference segment trained but before its validation ran (the log lost
    # its last two entries): the rerun validates the checkpoint it finds, labelled with its real step.
    import shutil

    log = tmp_path / "demo" / "pref-run" / "selection.json"
    log.write_text(json.dumps(json.loads(log.read_text())[:1]))
    shutil.rmtree(tmp_path / "demo" / "mimic+pref")
    run_demo(cfg)
    selection = json.loads((tmp_path / "demo" / "mimic+pref" / "selection.json").read_text())
    assert [c["step"] for c in selection["candidates"]] == [0, 2]
    # (Same inputs and seed give byte-identical shards and identical losses: tests/test_dump.py,
    # tests/test_trajectories.py; a second demo from scratch here cost 40 s of CI for no other check.)


@pytest.mark.integration
@pytest.mark.parametrize("text", ['{"not": "a list"}', '[{"try": 0}]', "[1, 2]"])
def test_a_teacher_tries_log_of_another_shape_is_validated_again(text, world, teacher, tmp_path):
    """A teacher-tries.json that is valid JSON of another shape (edited by hand) gave a traceback;
    it is now treated as a damaged log: the teacher on disk is validated again."""
    import shutil

    from pipelines.demo import teacher_with_validation

    shutil.copytree(teacher, tmp_path / "teacher")
    (tmp_path / "teacher-tries.json").write_text(text)
    history = teacher_with_validation(world, tmp_path / "teacher", steps=1, seed=0, tries=1)
    assert [h["try"] for h in history] == [0] and history[0]["kept"]
    assert json.loads((tmp_path / "teacher-tries.json").read_text())[0]["trained_in"] == str(tmp_path / "teacher")
