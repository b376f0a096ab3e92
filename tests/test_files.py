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
