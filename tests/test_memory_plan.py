"""`lmod train --dry-run`: the per-rank memory plan, checked against measured step memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from student_train.config import TrainConfig
from student_train.memory_plan import plan_memory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def deep_student(tmp_path_factory) -> Path:
    """A text-only Qwen3-MoE stand-in deep enough for checkpointing to matter (8 layers, the first
    dense, 4 experts top-2), random weights: the plan reads only its config, the measurement runs it."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = tmp_path_factory.mktemp("deep_student")
    cfg = Qwen3MoeConfig(vocab_size=512, hidden_size=128, intermediate_size=384, moe_intermediate_size=384,
                         num_hidden_layers=8, num_attention_heads=2, num_key_value_heads=2, head_dim=64, num_experts=4,
                         num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(cfg).save_pretrained(out)
    return out


def test_the_plan_predicts_measured_step_memory_and_what_checkpointing_saves(deep_student):
    """Between micro-batches of 4 and 16 rows the predicted difference is within 30% of the measured
    one (peak RSS of one step in a fresh process), with and without activation checkpointing, and
    checkpointing lowers both the prediction and the measurement to under half."""
    from pipelines.benchmarks.bench_memory_plan import compare

    got = {ck: compare(deep_student, (4, 16), 256, {"train": ["experts", "router"], "activation_checkpointing": ck})
           for ck in (False, True)}
    for ck, g in got.items():
        assert 0.7 <= g["ratio"] <= 1.3, (ck, g)
    assert got[True]["measured_difference"] < 0.5 * got[False]["measured_difference"]
    assert got[True]["predicted_difference"] < 0.5 * got[False]["predicted_difference"]


def test_the_plan_counts_weights_grads_and_adam_by_dtype_and_parallelism(deep_student):
    base = {"train": ["experts", "router"], "batch_size": 8}
    fp32, measured = plan_memory(deep_student, TrainConfig(**base), 1, 64)
    n, n_train = fp32.detail["parameters"], fp32.detail["trainable_parameters"]
    assert 0 < n_train < n
    assert (fp32.weights, fp32.grads, fp32.optimizer) == (4 * n, 4 * n_train, 8 * n_train)
    bf16, _ = plan_memory(deep_student, TrainConfig(**base, dtype="bfloat16"), 1, 64)
    assert (bf16.weights, bf16.grads) == (6 * n, 6 * n_train)  # float32 masters + bf16 working copies
    fsdp, _ = plan_memory(deep_student, TrainConfig(**base, parallel="fsdp"), 4, 64, measured)
    assert fsdp.optimizer == 8 * n_train // 4 and fsdp.weights < fp32.weights
    per_rank = plan_memory(deep_student, TrainConfig(**{**base, "batch_size": 2}), 1, 64, measured)[0]
    assert fsdp.activations == per_rank.activations  # 8 rows over 4 ranks: 2 per rank
    assert fp32.total == fp32.weights + fp32.grads + fp32.optimizer + fp32.activations + fp32.head_chunk


def test_dry_run_prints_the_plan_and_the_largest_batch_that_fits_and_trains_nothing(hf_dump, world, moe_student,
                                                                                    tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app

    args = ["train", "--stage", "mimic", "--shards", str(hf_dump), "--student", str(moe_student), "--out",
            str(tmp_path / "run"), "--image-root", str(world), "--dry-run"]
    res = CliRunner().invoke(app, [*args, "--gpu-memory", "1"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.stdout)
    for key in ("weights", "grads", "optimizer", "activations", "head_chunk", "total"):
        assert plan[key] > 0, key
    assert plan["fits"] is True and plan["largest_batch_size"] > plan["rows_per_rank"]
    assert plan["tokens_per_row"] > 0
    assert not (tmp_path / "run").exists()
    tight = json.loads(CliRunner().invoke(app, [*args, "--gpu-memory", "0.1", "--ranks", "2"]).stdout)
    assert tight["ranks"] == 2 and tight["rows_per_rank"] == 8
    assert tight["fits"] is (tight["total"] <= 0.1 * 1024**3)
    if not tight["fits"]:
        assert tight["largest_batch_size"] < 16 and tight["largest_batch_size"] % 2 == 0
