"""Kill a running dump, rerun it: finished shards are kept, the rest is done, bytes match."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared.manifest import Manifest
from shared.shards import verify_dump
from tests.conftest import dump

pytestmark = pytest.mark.slow

SHARDS = 6


def _args(world: Path, teacher: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "dump-teacher", "--model", str(teacher),
            "--mimic-data", str(world / "mimic.jsonl"), "--pref-data", str(world / "pref.jsonl"),
            "--out", str(out), "--backend", "hf", "--shards", str(SHARDS), "--top-k", "8",
            "--max-model-len", "256", "--workers", "1"]


def _cmdline(p) -> str:
    import psutil

    try:
        return " ".join(p.cmdline())
    except psutil.Error:  # gone, or a zombie
        return ""


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_killed_dump_resumes_without_recomputing_and_leaves_no_ray_behind(world, teacher, tmp_path):
    """SIGKILL of the driver alone (as a scheduler or an OOM killer does it): its local Ray cluster,
    agents and teacher actors included, goes with it; the rerun keeps the finished shards."""
    import time

    import psutil

    out = tmp_path / "killed"
    proc = subprocess.Popen(_args(world, teacher, out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, cwd=Path(__file__).parents[1])
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "lmod: finished" in line:
            ray_procs = {p: _cmdline(p) for p in psutil.Process(proc.pid).children(recursive=True)}
            ray_procs = {p: cmd for p, cmd in ray_procs.items() if "teacher_dump.reaper" not in cmd}
            os.kill(proc.pid, signal.SIGKILL)  # the driver only, mid-run
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(seen)
    assert any("raylet" in cmd for cmd in ray_procs.values()), list(ray_procs.values())
    deadline = time.time() + 60
    while time.time() < deadline and any(_alive(p) for p in ray_procs):
        time.sleep(0.5)
    left = [cmd[:80] for p, cmd in ray_procs.items() if _alive(p)]
    assert not left, f"orphaned Ray processes: {left}"
    done = Manifest.load(out).shards
    assert 1 <= len(done) < 2 * SHARDS, "the kill must land mid-run"
    kept = {rel: (out / rel).stat().st_mtime_ns for rel in done}

    res = subprocess.run(_args(world, teacher, out), capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(done)} already finished, {2 * SHARDS - len(done)} to run" in res.stderr
    assert {rel: (out / rel).stat().st_mtime_ns for rel in kept} == kept  # not recomputed
    assert verify_dump(out) == []

    fresh = tmp_path / "fresh"
    dump(world, teacher, fresh, "hf", shards=SHARDS, top_k=8, encoding="u8")  # the CLI default
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert files == sorted(p.relative_to(fresh) for p in fresh.rglob("*.parquet")) and len(files) == 2 * SHARDS
    for rel in files:
        assert (out / rel).read_bytes() == (fresh / rel).read_bytes(), rel
    assert (out / "manifest.json").read_bytes() == (fresh / "manifest.json").read_bytes()


def test_resume_redoes_a_shard_whose_bytes_changed(hf_dump, world, teacher, tmp_path):
    """A same-size shard with one flipped byte must not count as finished on rerun."""
    import shutil

    from shared.shards import shard_paths

    out = tmp_path / "dump"
    shutil.copytree(hf_dump, out)
    path = shard_paths(out, "mimic")[0]
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(flipped) // 2] ^= 0xFF
    path.write_bytes(bytes(flipped))
    dump(world, teacher, out, "hf")
    assert path.read_bytes() == good and verify_dump(out) == []


def test_a_vllm_dumps_stdout_is_lmods_json_only(world, teacher, tmp_path):
    """vLLM's warnings reached stdout through Ray's log forwarding: `lmod dump-teacher ... | jq` broke."""
    import json

    args = _args(world, teacher, tmp_path / "out")
    args[args.index("hf")] = "vllm"
    args[args.index(str(SHARDS))] = "1"
    res = subprocess.run(args, capture_output=True, text=True, timeout=900, cwd=Path(__file__).parents[1])
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout)
    assert info["backend"] == "vllm" and "WARNING" not in res.stdout
