"""The real-run recipe (pipelines/recipes/distill.sh) on tiny stand-ins: the same commands a GPU
cluster runs, with a SmolVLM-style teacher and an upcycled dense SmolVLM-style base."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "pipelines" / "recipes"

pytestmark = pytest.mark.slow


@pytest.mark.fast
@pytest.mark.parametrize("env_file", ["smolvlm.env", "qwen3_vl.env"])
def test_full_size_settings_name_every_variable_the_recipe_needs(env_file):
    script = (RECIPES / "distill.sh").read_text()
    needed = {v for v in ("TEACHER", "BASE", "RUN", "MIMIC_DATA", "PREF_DATA", "IMAGE_ROOT", "MIMIC_CONFIG",
                          "PREF_CONFIG") if f"${{{v}:?" in script}
    settings = dict(line.split("=", 1) for line in (RECIPES / env_file).read_text().splitlines()
                    if line and not line.startswith("#"))
    assert needed <= set(settings) and len(needed) == 8
    for key in ("MIMIC_CONFIG", "PREF_CONFIG"):
        from student_train.train import TrainConfig

        TrainConfig.from_yaml(ROOT / settings[key])  # the configs it points at are valid


def test_recipe_runs_end_to_end_on_tiny_stand_ins(family_models, family_world, tmp_path):
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text("steps: 3\nbatch_size: 4\nlr: 0.002\nwarmup: 1\n")
    env = {**os.environ, "TEACHER": str(family_models["smolvlm"]), "BASE": str(family_models["smolvlm-base"]),
           "RUN": str(tmp_path / "run"), "MIMIC_DATA": str(family_world / "mimic.jsonl"),
           "PREF_DATA": str(family_world / "pref.jsonl"), "IMAGE_ROOT": str(family_world),
           "EVAL_DATA": str(family_world / "eval.jsonl"), "MIMIC_CONFIG": str(tiny), "PREF_CONFIG": str(tiny),
           "SHARDS": "2", "TOP_K": "8", "BACKEND": "hf", "DTYPE": "float32", "MAX_MODEL_LEN": "512",
           "LMOD": f"{sys.executable} -m pipelines.cli"}
    res = subprocess.run(["bash", str(RECIPES / "distill.sh")], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "run"
    student = json.loads((run / "student" / "config.json").read_text())
    assert student["text_config"]["model_type"] == "qwen2_moe"  # SmolVLM's Llama, interleaved MoE layers
    assert (run / "pref" / "model.safetensors").is_file()
    metrics = json.loads((run / "eval.json").read_text())
    from safetensors.torch import load_file

    from shared.evaluation import evaluate_model

    # The recipe evaluated the model its last stage wrote, and each stage changed the weights.
    assert metrics == json.loads(json.dumps(evaluate_model(run / "pref", family_world / "eval.jsonl",
                                                           family_world)))
    weights = {name: load_file(run / name / "model.safetensors") for name in ("student", "mimic", "pref")}
    for a, b in (("student", "mimic"), ("mimic", "pref")):
        assert any(not torch.equal(weights[a][k], weights[b][k]) for k in weights[a]), (a, b)
    # Rerun: finished shards are skipped, the student is kept, training resumes at its end.
    again = subprocess.run(["bash", str(RECIPES / "distill.sh")], env={**env, "RESUME": "1"}, cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 already finished" in again.stderr or "4 already finished" in again.stderr  # progress: stderr
