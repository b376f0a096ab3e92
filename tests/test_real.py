"""The real tier: a real instruct model that no one here made (SmolLM2-135M-Instruct, shipped on
PyPI as GGUF, Llama architecture, ChatML template with string content) as the teacher of both
backends, checked against an independent transformers forward of the GGUF file itself; a student
cut from its first layers, upcycled, trained mimic and pref; text-only evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.real.smollm2 import GGUF_NAME, gguf_path, teacher_dir
from shared.shards import shard_paths

pytestmark = pytest.mark.real

QA = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Explain in one sentence what `json.dumps` does in Python.", "It turns a Python object into a JSON string."),
    ("Name a primary colour.", "Red is a primary colour."),
    ("What does the `len` function return?", "The number of items in a container."),
    ("Why is the sky blue?", "Sunlight scatters off air molecules, and blue light scatters the most."),
]
PREF = [
    ("What is 2 + 2?", "2 + 2 is 4.", "2 + 2 is 5."),
    ("Is the sky green?", "No, the sky is usually blue.", "Yes, the sky is green."),
    ("Which is larger, 10 or 3?", "10 is larger than 3.", "3 is larger than 10."),
]


@pytest.fixture(scope="session")
def real_teacher() -> Path:
    return teacher_dir()


@pytest.fixture(scope="session")
def real_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real_data")
    rows = [{"id": f"qa{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
            for i, (q, a) in enumerate(QA)]
    rows.append({"id": "multi", "conversations": [
        {"from": "human", "value": "What does a Python list store?"},
        {"from": "gpt", "value": "An ordered sequence of items."},
        {"from": "human", "value": "Can it change?"}, {"from": "gpt", "value": "Yes, lists are mutable."}]})
    (out / "mimic.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "pref.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "question": q, "chosen": c, "rejected": r})
                                            + "\n" for i, (q, c, r) in enumerate(PREF)))
    (out / "eval.jsonl").write_text("".join(json.dumps({"id": f"e{i}", "question": q, "answer": a}) + "\n"
                                            for i, (q, a) in enumerate(QA[:3])))
    return out


def _dump(model: Path, data: Path, out: Path, backend: str) -> Path:
    from teacher_dump.run import DumpConfig, dump_teacher

    dump_teacher(DumpConfig(model=model, out=out, mimic_data=data / "mimic.jsonl", pref_data=data / "pref.jsonl",
                            shards=1, top_k=16, backend=backend, max_model_len=512, progress=False, encoding="f32"))
    return out


@pytest.fixture(scope="session")
def real_dumps(tmp_path_factory, real_teacher, real_data) -> dict[str, Path]:
    return {b: _dump(real_teacher, real_data, tmp_path_factory.mktemp(f"real_dump_{b}"), b) for b in ("hf", "vllm")}


def _rows(dump: Path, kind: str) -> list[dict]:
    return [r for p in shard_paths(dump, kind) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def gguf_reference():
    """transformers reading the GGUF file directly (not lmod's converted directory), with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    return tok, model


def _reference(tok, model, turns: list[tuple[str, str]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Per assistant turn: the response ids (the answer's tokens through <|im_end|>, found from the
    template's own string rendering) and the full-vocabulary log-probs predicting each of them."""
    messages = [{"role": r, "content": t} for r, t in turns]
    full = tok.apply_chat_template(messages, tokenize=False)
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    responses, logps = [], []
    for i, (role, _) in enumerate(turns):
        if role != "assistant":
            continue
        start = len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
        first = next(t for t, (s, e) in enumerate(offsets) if e > start)
        end = next(t for t in range(first, len(ids)) if ids[t] == tok.eos_token_id)
        responses.append(ids[first : end + 1])
        logps.append(logp[first - 1 : end])  # the state at p - 1 predicts ids[p]
    return responses, logps


@pytest.mark.parametrize("backend", ["hf", "vllm"])
def test_real_teacher_dump_equals_an_independent_forward_of_the_gguf(backend, real_dumps, gguf_reference):
    tok, model = gguf_reference
    dump = real_dumps[backend]
    rows = _rows(dump, "mimic")
    assert len(rows) == len(QA) + 1
    for row in rows:
        turns = [("user" if t["from"] == "human" else "assistant", t["value"])
                 for t in json.loads(row["conversations_json"])]
        responses, logps = _reference(tok, model, turns)
        assert row["response_ids"] == [i for r in responses for i in r], row["sample_id"]
        assert row["response_turn_lengths"] == [len(r) for r in responses]
        logp = torch.cat(logps)
        ids = torch.tensor(row["response_ids"])
        np.testing.assert_allclose(row["target_logprobs"], logp[torch.arange(len(ids)), ids].numpy(), atol=1e-3)
        top = logp.topk(16, -1)
        np.testing.assert_allclose(np.asarray(row["topk_logprobs"]), top.values.numpy(), atol=1e-3)
        np.testing.assert_allclose(row["rest_mass"], (1 - top.values.exp().sum(-1)).numpy(), atol=1e-3)
        # A real model's distributions are not one-hot: the rest mass is what top-16 leaves out.
        assert max(row["rest_mass"]) > 0.01
    for row in _rows(dump, "pref"):
        for key in ("chosen", "rejected"):
            (response,), (logp,) = _reference(tok, model, [("user", row["question"]), ("assistant", row[key])])
            assert row[f"{key}_ids"] == response
            expected = logp[torch.arange(len(response)), torch.tensor(response)].sum().item()
            assert abs(row[f"{key}_logprob_sum"] - expected) < 1e-3 * len(response), (key, row["sample_id"])


def test_a_text_only_teacher_refuses_records_with_images_per_record(real_teacher, real_data, tmp_path):
    from PIL import Image

    from teacher_dump.inputs import InputError
    from teacher_dump.run import DumpConfig, dump_teacher

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = (real_data / "mimic.jsonl").read_text().splitlines()
    rows.append(json.dumps({"id": "img", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A square."}]}))
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    cfg = DumpConfig(model=real_teacher, out=tmp_path / "dump", mimic_data=tmp_path / "mixed.jsonl", shards=1,
                     top_k=4, backend="hf", progress=False, dry_run=True)
    with pytest.raises(InputError, match="text-only model"):
        dump_teacher(cfg)


def test_a_student_cut_from_the_real_teacher_upcycles_and_trains_mimic_and_pref(real_teacher, real_dumps,
                                                                                real_data, tmp_path):
    from typer.testing import CliRunner

    from pipelines.cli import app
    from shared.evaluation import evaluate_model
    from student_train.evaluate import kl_to_teacher
    from student_train.train import TrainConfig, train

    res = CliRunner().invoke(app, ["student", "from-teacher", "--teacher", str(real_teacher), "--layers", "2",
                                   "--out", str(tmp_path / "student")])
    assert res.exit_code == 0, res.output
    student = tmp_path / "student"
    config = json.loads((student / "config.json").read_text())
    assert config["model_type"] == "qwen2_moe" and config["num_hidden_layers"] == 2
    assert config["mlp_only_layers"] == [0] and config["num_experts"] == 4  # every other layer is MoE
    # vLLM's Qwen2-MoE always has q/k/v biases: the student stores zero ones (a checkpoint without
    # them ran on uninitialised memory there, NaN log-probs), and vLLM answers as transformers does
    assert config["qkv_bias"] is True
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, (q, _) in enumerate(QA[:3])))
    ids = {}
    for backend in ("hf", "vllm"):
        _generate(student, prompts, tmp_path / f"{backend}.jsonl", backend, "--max-new-tokens", "8")
        ids[backend] = [json.loads(line)["generation"]["response_ids"] for line in
                        (tmp_path / f"{backend}.jsonl").read_text().splitlines()]
    assert sum(h == v for h, v in zip(ids["hf"], ids["vllm"])) >= 2, ids
    config["qkv_bias"] = False
    (tmp_path / "no_bias").mkdir()
    (tmp_path / "no_bias" / "config.json").write_text(json.dumps(config))
    from shared.models import vllm_mismatch

    assert "vLLM's Qwen2-MoE always adds" in vllm_mismatch(tmp_path / "no_bias")
    (tmp_path / "no_bias" / "model.safetensors").symlink_to(student / "model.safetensors")
    refused = CliRunner().invoke(app, ["dump-teacher", "--model", str(tmp_path / "no_bias"), "--mimic-data",
                                       str(real_data / "mimic.jsonl"), "--out", str(tmp_path / "no_bias_dump")])
    assert refused.exit_code == 2 and "qkv_bias: false" in refused.output  # before Ray starts
    assert not (tmp_path / "no_bias_dump").exists()
    dump = real_dumps["vllm"]
    before = kl_to_teacher(student, [dump], None)
    cfg = TrainConfig(stage="mimic", steps=6, batch_size=3, lr=1e-3, warmup=1, loader_workers=0, train=["all"])
    train([dump], student, tmp_path / "mimic", cfg, progress=False)
    after = kl_to_teacher(tmp_path / "mimic", [dump], None)
    assert after < 0.9 * before, (before, after)
    pref = TrainConfig(stage="pref", steps=2, batch_size=3, lr=1e-4, warmup=1, loader_workers=0)
    history = train([real_dumps["hf"]], tmp_path / "mimic", tmp_path / "pref", pref, progress=False)
    assert len(history) == 2 and all(np.isfinite(h["dpo_loss"]) for h in history)
    metrics = evaluate_model(tmp_path / "pref", real_data / "eval.jsonl")
    assert metrics["n"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0


def test_models_that_cannot_teach_are_one_line_before_ray(real_teacher, real_data, tmp_path):
    import shutil

    from typer.testing import CliRunner

    from pipelines.cli import app

    bert = tmp_path / "bert"
    shutil.copytree(real_teacher, bert)
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    no_template = tmp_path / "no_template"
    shutil.copytree(real_teacher, no_template)
    (no_template / "chat_template.jinja").unlink()
    tok_config = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_config))
    for model, expected in ((bert, "not a text generator"), (no_template, "ships no chat template"),
                            (tmp_path / "missing.gguf", "no such GGUF file")):
        res = CliRunner().invoke(app, ["dump-teacher", "--model", str(model), "--mimic-data",
                                       str(real_data / "mimic.jsonl"), "--out", str(tmp_path / "o"),
                                       "--backend", "hf"])
        errors = [line for line in res.output.splitlines() if line.startswith("lmod: error:")]
        assert res.exit_code == 2 and len(errors) == 1 and expected in errors[0], res.output[-1500:]
        assert not (tmp_path / "o").exists()


def _generate(model: Path, data: Path, out: Path, backend: str, *flags: str) -> dict:
    """`lmod generate` in its own process (a vLLM engine core left in the pytest process would hold
    threads that a later test's DataLoader fork deadlocks on)."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(model), "--data",
                          str(data), "--out", str(out), "--backend", backend, *flags],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "WARNING" not in res.stderr, res.stderr[-3000:]  # the engine's output is in OUT.engine.log
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_generate_is_deterministic_resumable_and_its_records_feed_a_dump(real_teacher, real_data, tmp_path):
    from teacher_dump.generate import STATE_SUFFIX
    from teacher_dump.run import DumpConfig, dump_teacher

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"q{i}", "question": q} for i, (q, _) in enumerate(QA)]
    rows.append(json.loads((real_data / "mimic.jsonl").read_text().splitlines()[-1]))  # its last answer is redone
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from teacher_dump.backends import Sampling
    from teacher_dump.generate import GenerateConfig, generate

    def run(out: str, seed: int = 3) -> dict:  # in this process: transformers leaves no engine thread
        return generate(GenerateConfig(model=real_teacher, data=prompts, out=tmp_path / out, backend="hf",
                                       sampling=Sampling(1.0, 1.0, 12), seed=seed, batch_size=2))

    flags = ("--temperature", "1.0", "--seed", "3", "--batch-size", "2", "--max-new-tokens", "12")
    first = _generate(real_teacher, prompts, tmp_path / "a.jsonl", "hf", *flags)  # the command itself, once
    assert first["records"] == 6 and first["generated_tokens"] > 0
    run("b.jsonl")
    a = (tmp_path / "a.jsonl").read_bytes()
    assert (tmp_path / "b.jsonl").read_bytes() == a  # same seed, same bytes
    # Killed mid-write after the first batch: a whole batch and half a line on disk.
    lines = a.splitlines(keepends=True)
    (tmp_path / "c.jsonl").write_bytes(b"".join(lines[:2]) + lines[2][:40])
    state = json.loads((tmp_path / ("a.jsonl" + STATE_SUFFIX)).read_text())
    (tmp_path / ("c.jsonl" + STATE_SUFFIX)).write_text(json.dumps({"settings": state["settings"], "complete": False}))
    resumed = run("c.jsonl")
    assert resumed["resumed_after"] == 2 and (tmp_path / "c.jsonl").read_bytes() == a
    records = [json.loads(line) for line in lines]
    assert records[-1]["conversations"][:3] == rows[-1]["conversations"][:3]  # earlier turns kept
    assert records[-1]["conversations"][3]["value"] != rows[-1]["conversations"][3]["value"]
    assert all(r["generation"]["temperature"] == 1.0 and r["generation"]["seed"] == 3 for r in records)
    # Another seed, other samples; other settings into the same file are refused.
    run("d.jsonl", seed=4)
    assert (tmp_path / "d.jsonl").read_bytes() != a
    import subprocess
    import sys

    refused = subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(real_teacher),
                              "--data", str(prompts), "--out", str(tmp_path / "a.jsonl"), "--backend", "hf",
                              "--seed", "9"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "written with other settings" in refused.stderr and "seed" in refused.stderr
    manifest = dump_teacher(DumpConfig(model=real_teacher, out=tmp_path / "dump", mimic_data=tmp_path / "a.jsonl",
                                       shards=1, top_k=8, backend="hf", progress=False, skip_invalid=True))
    assert manifest.record.records["mimic"] >= 5  # answers of the teacher itself are valid mimic records


def test_vllm_and_hf_generate_the_same_greedy_answers(real_teacher, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "question": q}) + "\n" for i, (q, _) in enumerate(QA[:3])))
    for backend in ("hf", "vllm"):
        _generate(real_teacher, prompts, tmp_path / f"{backend}.jsonl", backend, "--max-new-tokens", "16")
    answers = {b: [json.loads(line)["conversations"][-1]["value"] for line in
                   (tmp_path / f"{b}.jsonl").read_text().splitlines()] for b in ("hf", "vllm")}
    assert answers["hf"][0].startswith("The capital of France is Paris")
    assert sum(h == v for h, v in zip(answers["hf"], answers["vllm"])) >= 2, answers
