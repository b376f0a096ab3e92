"""Pinned trajectories (as torchtune and TRL keep them): the per-step loss and gradient norm of a
few mimic and preference steps on the tiny world, stored in tests/trajectories.json with their
tolerance, and the equivalence classes that must reproduce them: one batch of 8 == two
micro-batches of 4 (accumulation), and a run stopped after 2 steps and resumed == uninterrupted.
(2 ranks == 1 process is tests/test_train.py::test_two_ddp_ranks_match_one_process.)

A deliberate change of numerics regenerates the file: LMOD_PIN_TRAJECTORIES=1 pytest -m integration
tests/test_trajectories.py, and the diff goes into the commit that changes them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from student_train.train import TrainConfig, train

PINNED = Path(__file__).with_name("trajectories.json")
STEPS = 4


def _run(stage: str, shards: Path, start: Path, world: Path, out: Path, **kw) -> list[dict]:
    base = {"steps": STEPS, "batch_size": 8, "lr": 0.002 if stage == "mimic" else 0.0005, "warmup": 1,
            "loader_workers": 0, "train": ["all"], "pref_ce_weight": 0.5 if stage == "pref" else 0.0,
            "aux_loss_coef": 0.0}  # the router's balance loss is per micro-batch (Switch, Megatron): not additive
    base.update({k: v for k, v in kw.items() if k != "stop_after"})
    cfg = TrainConfig(stage=stage, **base)
    if "stop_after" in kw:
        train([shards], start, out, cfg, image_root=world, progress=False, stop_after=kw["stop_after"])
        return train([shards], start, out, cfg, image_root=world, progress=False, resume=True)
    return train([shards], start, out, cfg, image_root=world, progress=False)


def _curve(history: list[dict]) -> dict[str, list[float]]:
    return {"step": [h["step"] for h in history], "loss": [h["loss"] for h in history],
            "grad_norm": [h["grad_norm"] for h in history]}


@pytest.mark.integration
def test_pinned_trajectories_and_their_equivalence_classes(hf_dump, world, moe_student, tmp_path):
    runs = {}
    for stage in ("mimic", "pref"):
        start = moe_student if stage == "mimic" else tmp_path / "mimic-one"
        runs[stage] = {
            "one batch of 8": _run(stage, hf_dump, start, world, tmp_path / f"{stage}-one"),
            "2 micro-batches of 4": _run(stage, hf_dump, start, world, tmp_path / f"{stage}-ga", batch_size=4,
                                         grad_accum=2),
            "stopped after 2 and resumed": _run(stage, hf_dump, start, world, tmp_path / f"{stage}-resumed",
                                                stop_after=2),
        }
    if os.environ.get("LMOD_PIN_TRAJECTORIES"):
        PINNED.write_text(json.dumps({
            "tolerance": {"rtol": 1e-4, "atol": 1e-6},
            "equivalence_classes": {stage: sorted(r) for stage, r in runs.items()},
            "trajectories": {stage: _curve(r["one batch of 8"]) for stage, r in runs.items()},
        }, indent=2) + "\n")
    pinned = json.loads(PINNED.read_text())
    tol = pinned["tolerance"]
    for stage, variants in runs.items():
        assert sorted(variants) == pinned["equivalence_classes"][stage]
        want = pinned["trajectories"][stage]
        for name, history in variants.items():
            got = _curve(history)
            if name == "stopped after 2 and resumed":  # the resumed run logs steps 3.. only
                want_part = {k: v[2:] for k, v in want.items()}
            else:
                want_part = want
            assert got["step"] == want_part["step"], (stage, name)
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want_part[key], rel=tol["rtol"], abs=tol["atol"]), (stage, name, key)
