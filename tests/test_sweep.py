"""`lmod sweep`: the grid, the summary's arithmetic, refusals before Ray starts, and real sweeps on
Ray Tune (equal to separate `lmod train` + `lmod eval` runs; killed and rerun; a failing trial)."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.sweep import SweepError, SweepSpec, mean_std, parse_grid, run_sweep, summary_markdown

ROOT = Path(__file__).parents[1]
TINY = "steps: 3\nbatch_size: 4\nwarmup: 1\nloader_workers: 0\nsave_every: 1\n"


def test_grid_values_are_typed_and_bracketed_lists_stay_whole():
    grid = parse_grid(["lr=1e-3,3.0e-3", "kd_tail=rest,renorm", "train=[experts,router],[all]", "steps=5"])
    assert grid == {"lr": [1e-3, 3e-3], "kd_tail": ["rest", "renorm"], "train": [["experts", "router"], ["all"]],
                    "steps": [5]}


@pytest.mark.parametrize("item,message", [
    ("learning_rate=1,2", "not a TrainConfig key"),
    ("seed=1,2", "--seeds"),
    ("stage=mimic,pref", "one --stage"),
    ("lr", "KEY=V1,V2"),
    ("lr=0.1,0.1", "listed twice"),
])
def test_bad_set_items_are_one_line(item, message):
    with pytest.raises(SweepError, match=message):
        parse_grid([item])


def test_an_impossible_value_is_refused_before_anything_is_written_or_ray_starts(tmp_path):
    import ray

    spec = SweepSpec(stage="mimic", dumps=[str(tmp_path / "no-dump")], student=str(tmp_path / "no-student"),
                     base={}, grid=parse_grid(["lr=0.001,-1"]), seeds=[0, 1])
    with pytest.raises(SweepError, match=r"--set lr=-1: lr: -1(\.0)? must be > 0"):
        run_sweep(spec, tmp_path / "sweep", progress=False)
    assert not (tmp_path / "sweep").exists() and not ray.is_initialized()


def test_summary_is_mean_and_std_over_seeds_with_the_difference_to_the_base_and_its_standard_error():
    spec = SweepSpec(stage="mimic", dumps=[], student="", base={"lr": 0.001}, grid={"lr": [0.001, 0.003]},
                     seeds=[0, 1, 2])
    accuracy = {0.001: [0.5, 0.6, 0.7], 0.003: [0.8, 0.8, 0.9]}
    kl = {0.001: [0.3, 0.2, 0.1], 0.003: [0.4, 0.5, 0.6]}
    rows = [{"status": "finished", "trial": t.name, "lr": t.overrides["lr"], "seed": t.seed, "n": 10,
             "accuracy": accuracy[t.overrides["lr"]][t.seed], "kl_to_teacher": kl[t.overrides["lr"]][t.seed]}
            for t in spec.trials()]
    rows[-1] = {"status": "failed", "trial": rows[-1]["trial"], "lr": 0.003, "seed": 2, "error": "TrainError: boom"}
    text = summary_markdown(spec, rows)
    # the failed seed is left out of its cell: 0.8, 0.8
    assert "| accuracy | 0.6 +- 0.1 | **0.8 +- 0** |" in text
    assert "| kl_to_teacher | **0.2 +- 0.1** | 0.45 +- 0.071 |" in text  # lower is better
    se = math.sqrt(0.1**2 / 3 + 0.0**2 / 2)
    assert f"| accuracy | +0.2 +- {se:.2g} |" in text
    assert "lr=0.001 (base), n=3" in text and "lr=0.003, n=2" in text
    assert "- 005-lr=0.003-seed=2: TrainError: boom" in text
    assert "| n |" not in text and "| lr |" not in text  # neither a metric
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                                                             + (4 - 7 / 3) ** 2) / 2))


def _sweep_args(hf_dump: Path, student: Path, world: Path, config: Path, out: Path, sets: list[str],
                seeds: list[int]) -> list[str]:
    import torch

    return [sys.executable, "-m", "pipelines.cli", "sweep", "--stage", "mimic", "--dump", str(hf_dump),
            "--student", str(student), "--config", str(config), *[a for s in sets for a in ("--set", s)],
            "--seeds", *map(str, seeds), "--eval-data", str(world / "eval.jsonl"), "--out", str(out),
            "--cpus-per-trial", str(torch.get_num_threads())]


@pytest.mark.slow
def test_a_sweep_killed_after_a_trial_reruns_only_the_others_reports_failed_ones_and_equals_separate_runs(
        hf_dump, moe_student, world, tmp_path):
    """3 lr values x 2 seeds through Ray Tune. Killed (SIGKILL, driver and Ray) once a trial has
    finished; the rerun keeps the finished ones byte for byte and runs the rest (a trial killed
    mid-run resumes from its checkpoint). The trials of lr 1e30 fail at run time: reported, the
    others finish. Every finished trial's metrics equal `lmod train` then `lmod eval` with the same
    settings, to the last digit."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    config = tmp_path / "base.yaml"
    config.write_text(TINY)
    out = tmp_path / "sweep"
    # lr 1e30 is a valid config whose second step's loss is not finite: those trials fail at run time
    args = _sweep_args(hf_dump, moe_student, world, config, out, ["lr=0.001,0.003,1e30"], [0, 1])
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while not list(out.glob("trials/*/result.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("trials/*/result.json")}
    assert 1 <= len(done) < 4, proc.stdout.read().decode()[-3000:]

    res = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stderr[-3000:]  # the failed trials, reported; the others finished
    assert f"{len(done)} finished earlier, {6 - len(done)} to run" in res.stderr
    assert "lmod: trial 004-lr=1e+30-seed=0 failed: TrainError: step 2: the loss is not finite" in res.stderr
    assert "2 of 6 trials did not finish" in res.stderr
    assert all(p.read_bytes() == b and p.stat().st_mtime_ns == t for p, (b, t) in done.items())
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [(r["lr"], r["seed"], r["status"]) for r in rows] == [
        ("0.001", "0", "finished"), ("0.001", "1", "finished"), ("0.003", "0", "finished"), ("0.003", "1", "finished"),
        ("1e+30", "0", "failed"), ("1e+30", "1", "failed")]
    assert "the loss is not finite" in rows[4]["error"] and rows[0]["accuracy"] != ""
    summary = (out / "summary.md").read_text()
    assert "lr=0.001 (base), n=2" in summary and "Difference to the base configuration" in summary
    assert "- 005-lr=1e+30-seed=1: TrainError: step 2" in summary

    for row in rows[:4]:
        cfg = tmp_path / f"{row['trial']}.yaml"
        cfg.write_text(TINY + f"lr: {row['lr']}\n")
        run = tmp_path / "separate" / row["trial"]
        trained = CliRunner().invoke(app, ["train", "--stage", "mimic", "--dump", str(hf_dump), "--student",
                                           str(moe_student), "--config", str(cfg), "--seed", row["seed"],
                                           "--out", str(run)])
        assert trained.exit_code == 0, trained.output
        evaluated = CliRunner().invoke(app, ["eval", "--model", str(run), "--data", str(world / "eval.jsonl"),
                                             "--out", str(tmp_path / f"{row['trial']}.json")])
        assert evaluated.exit_code == 0, evaluated.output
        separate = json.loads((tmp_path / f"{row['trial']}.json").read_text())
        trial = json.loads((out / "trials" / row["trial"] / "eval.json").read_text())
        assert trial == separate, row["trial"]
        last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        assert float(row["train_loss"]) == last["loss"] and float(row["train_kl"]) == last["kl"]

    report = CliRunner().invoke(app, ["report", str(out)])
    assert report.exit_code == 0 and (out / "sweep.png").stat().st_size and (out / "curves.png").stat().st_size


def test_an_impossible_value_is_one_line_from_the_cli_and_nothing_is_written(hf_dump, moe_student, world, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    config = tmp_path / "base.yaml"
    config.write_text(TINY)
    refused = CliRunner().invoke(app, ["sweep", "--stage", "mimic", "--dump", str(hf_dump), "--student",
                                       str(moe_student), "--config", str(config), "--set", "lr=0.001,-1",
                                       "--eval-data", str(world / "eval.jsonl"), "--out", str(tmp_path / "no")])
    assert refused.exit_code == 2 and "--set lr=-1: lr: -1" in refused.output and not (tmp_path / "no").exists()
    # a mix of two dumps over one --dump: refused before Ray starts, and no sweep.json is left behind
    mixed = CliRunner().invoke(app, ["sweep", "--stage", "mimic", "--dump", str(hf_dump), "--student",
                                     str(moe_student), "--config", str(config), "--set", "dump_mix=[0.5,0.5]",
                                     "--eval-data", str(world / "eval.jsonl"), "--out", str(tmp_path / "mix")])
    assert mixed.exit_code == 2 and "has 2 shares for 1 --dump directories" in mixed.output, mixed.output
    assert not (tmp_path / "mix" / "sweep.json").exists()
