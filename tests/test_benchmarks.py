"""Benchmarks are run by hand; a tiny run of the quick ones here keeps them from rotting unseen
(a benchmark that trains into its own student's folder went unnoticed until someone ran it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]


def _bench(*args: str) -> str:
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def test_bench_train_runs(hf_dump, world, teacher):
    out = _bench("pipelines/benchmarks/bench_train.py", "--shards", str(hf_dump), "--image-root", str(world),
                 "--teacher", str(teacher), "--steps", "8", "--batch-size", "4")
    assert "KD/CE" in out and "loader/trainer" in out and "dense  active" in out


def test_bench_losses_runs():
    out = _bench("pipelines/benchmarks/bench_losses.py", "--vocab", "2000", "--tokens", "64", "128", "--k", "8")
    assert out.count("True") == 2  # chunked and whole losses agree at both sizes


def test_bench_validate_runs():
    assert "records_per_s" in _bench("pipelines/benchmarks/bench_validate.py", "--records", "8", "--size", "64x64")
