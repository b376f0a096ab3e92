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


def test_bench_step_memory_runs():
    out = _bench("pipelines/benchmarks/bench_step_memory.py", "--vocab", "2000", "--shapes", "1x64", "--response",
                 "16", "--k", "8")
    assert "1x64" in out and out.rstrip().endswith("True")  # fused and full-logits losses and gradients agree


def test_bench_teacher_head_runs_and_both_heads_store_the_same_top_k():
    out = _bench("pipelines/benchmarks/bench_teacher_head.py", "--vocab", "2000", "--prompt", "64", "--response",
                 "16", "--batch", "1", "--k", "8", "--repeat", "1")
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |diff|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4, out  # own vocabulary, then padded (the head resized too)


def test_bench_plan_runs():
    out = _bench("pipelines/benchmarks/bench_plan.py", "--records", "500", "--shards", "4", "--validate", "0",
                 "--skip-hold")
    assert "16x the records" in out
