"""Temporary files: unique per host and process, and swept wherever a dump writes them."""

from __future__ import annotations

import socket

from shared.manifest import temp_path


def test_temporary_names_are_unique_per_host_process_and_call(tmp_path):
    a, b = temp_path(tmp_path / "x.parquet"), temp_path(tmp_path / "x.parquet")
    assert a != b and a.parent == tmp_path and a.name.startswith(".x.parquet.tmp-")
    assert socket.gethostname() in a.name


def test_a_dumps_stale_temporaries_are_swept_also_in_the_image_store(tmp_path):
    from teacher_dump.run import _exclusive

    stale = [temp_path(tmp_path / "manifest.json"), temp_path(tmp_path / "mimic" / "shard.parquet"),
             temp_path(tmp_path / "images" / "ab" / "abcdef")]
    kept = tmp_path / "images" / "ab" / "abcdef"
    for path in [*stale, kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    with _exclusive(tmp_path):
        pass
    assert not any(p.exists() for p in stale) and kept.exists()


def test_the_configuration_reference_is_generated_from_trainconfig():
    """docs/config.md is what `python pipelines/config_doc.py` writes now, and names every key."""
    from dataclasses import fields
    from pathlib import Path

    from pipelines.config_doc import render
    from student_train.config import TrainConfig

    doc = (Path(__file__).parent.parent / "docs" / "config.md").read_text()
    assert doc == render(), "docs/config.md is stale: python pipelines/config_doc.py > docs/config.md"
    assert all(f"| `{f.name}` |" in doc for f in fields(TrainConfig))


def test_option_names_say_what_they_take_and_old_spellings_still_work():
    """`--shards` was a count in dump-teacher and a list of dumps in train/eval; `--top-k` was stored
    log-probs in one command and experts per token in another; the shards commands showed `{out}`."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    def usage(*cmd: str) -> str:
        res = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"})
        assert res.exit_code == 0, res.output
        return res.output

    for cmd in (("train",), ("eval",)):
        assert "--dump" in usage(*cmd) and "--shards" in usage(*cmd)  # the old name is an alias
    assert "--dump-image-root" in usage("eval") and "--shards-image-root" in usage("eval")
    assert "--experts-per-token" in usage("student", "upcycle") and "--top-k" in usage("student", "upcycle")
    for cmd in (("shards", "info"), ("shards", "verify")):
        assert "DUMP" in usage(*cmd) and "{out}" not in usage(*cmd)
